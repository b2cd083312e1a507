"""linux.seccomp: a whole seccomp profile (config-linux.md "Seccomp") as a filter, built with libseccomp.

A seccomp filter is a small program the kernel runs on every system call the process makes (seccomp(2)):
it looks at the call's number, the architecture and the arguments, and says what happens — let it
through, make it fail with an errno, kill the thread or the process, send SIGTRAP, wake a tracer, log
it. Docker's and podman's default profiles are *allow lists*: every call fails (``defaultAction``
SCMP_ACT_ERRNO, ENOSYS) except the ~370 a program normally needs, a few of those only with certain
arguments (``personality`` only for a few execution domains, ``clone`` without the namespace flags).

Two steps:

1. :func:`compile_profile` (at ``create``, in the runtime): check every field, resolve each system call
   name to its number (unknown names on this architecture are skipped, as runc does: a profile names
   calls of many kernels), have libseccomp generate the BPF program (seccomp_export_bpf(3)), and return
   it as *plain data* the plan carries. Errors in the profile appear here, by field name, before any
   process exists; and the ~20 ms libseccomp needs for podman's profile are spent once, here.
2. :func:`install` (in the container's init, and in each exec'd process): one seccomp(2) system call
   loads that program, as late as possible — just before execve(2) when no_new_privs is set, or before
   the capabilities are dropped when it is not (without no_new_privs, loading a filter needs
   CAP_SYS_ADMIN, seccomp(2)), as runc does.

We use libseccomp (through ctypes) rather than write the BPF by hand: its job — the same rule for three
architectures, a 64-bit comparison on a 32-bit machine, a binary tree over 370 numbers — is not the
lesson; the profile is. (The device allowlist in :mod:`stages.runtime.oci.devices` *is* hand-written BPF.)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os

from stages import steps
from stages.errors import StagesError

# libseccomp's action values (seccomp.h), the kernel's SECCOMP_RET_* with the errno or tracer data in the
# low 16 bits.
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_KILL_THREAD = 0x00000000
SCMP_ACT_TRAP = 0x00030000
SCMP_ACT_ERRNO = 0x00050000
SCMP_ACT_TRACE = 0x7FF00000
SCMP_ACT_LOG = 0x7FFC0000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_NOTIFY = 0x7FC00000

#: config.json's action names -> (the value, whether it carries errnoRet in its low 16 bits)
ACTIONS = {
    "SCMP_ACT_KILL": (SCMP_ACT_KILL_THREAD, False),
    "SCMP_ACT_KILL_THREAD": (SCMP_ACT_KILL_THREAD, False),
    "SCMP_ACT_KILL_PROCESS": (SCMP_ACT_KILL_PROCESS, False),
    "SCMP_ACT_TRAP": (SCMP_ACT_TRAP, False),
    "SCMP_ACT_ERRNO": (SCMP_ACT_ERRNO, True),
    "SCMP_ACT_TRACE": (SCMP_ACT_TRACE, True),
    "SCMP_ACT_LOG": (SCMP_ACT_LOG, False),
    "SCMP_ACT_ALLOW": (SCMP_ACT_ALLOW, False),
}

#: enum scmp_compare (seccomp.h)
OPERATORS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5,
             "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
_OPERATOR_WORDS = {1: "!=", 2: "<", 3: "<=", 4: "==", 5: ">=", 6: ">", 7: "&"}

# enum scmp_filter_attr (seccomp.h)
_ATTR_CTL_TSYNC = 4
_ATTR_CTL_LOG = 6
_ATTR_CTL_SSB = 7

#: seccomp(2)'s SECCOMP_FILTER_FLAG_* -> (the libseccomp attribute for it, the flag's bit)
FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": (_ATTR_CTL_TSYNC, 1), "SECCOMP_FILTER_FLAG_LOG": (_ATTR_CTL_LOG, 2),
         "SECCOMP_FILTER_FLAG_SPEC_ALLOW": (_ATTR_CTL_SSB, 4)}
#: ... and those this runtime cannot honour, with the reason
_REFUSED_FLAGS = {
    "SECCOMP_FILTER_FLAG_NEW_LISTENER": "a user-space notifier (SCMP_ACT_NOTIFY) is not supported by this "
                                        "runtime",
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV": "belongs to a notifier (and libseccomp 2.6), which this "
                                              "runtime has not",
}

_NR_SCMP_ERROR = -1  # what seccomp_syscall_resolve_name returns for a name it does not know


class _Condition(ctypes.Structure):
    """struct scmp_arg_cmp: argument ``arg`` compared by ``op`` with ``datum_a`` (and ``datum_b``, the
    value that ``arg & datum_a`` must equal for SCMP_CMP_MASKED_EQ)."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _library():
    """libseccomp (loaded once, by stage 2's loader), with the functions a whole profile needs."""
    from stages.isolate import privileges

    library = privileges._library()
    if not hasattr(library, "_stages_profiles"):
        library.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                                   ctypes.c_uint, ctypes.POINTER(_Condition)]
        library.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        library.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        library.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        library.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        library.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        library._stages_profiles = True
    return library


@functools.cache
def available() -> bool:
    """Whether libseccomp can be loaded (Debian: the libseccomp2 package). Asked once: finding a library
    by name runs ldconfig (ctypes.util.find_library), 10 ms each time."""
    try:
        _library()
    except StagesError:
        return False
    return True


def _refuse(field_name: str, why: str, hint: str | None = None) -> StagesError:
    from stages.runtime.oci.spec import refuse

    return refuse(field_name, why, hint)


def _action(name, errno_ret, where: str, default_errno: int = errno.EPERM) -> int:
    if name == "SCMP_ACT_NOTIFY":
        raise _refuse(where, "SCMP_ACT_NOTIFY hands system calls to a user-space agent (listenerPath), which "
                      "this runtime does not support",
                      "use SCMP_ACT_ERRNO or SCMP_ACT_ALLOW for those calls, or run the bundle with runc")
    if name not in ACTIONS:
        raise _refuse(where, f"{name!r} is not a seccomp action",
                      f"use one of {', '.join(ACTIONS)} (config-linux.md, Seccomp)")
    value, takes_errno = ACTIONS[name]
    if errno_ret is not None:
        if isinstance(errno_ret, bool) or not isinstance(errno_ret, int) or not 0 <= errno_ret <= 0xFFFF:
            raise _refuse(where.rpartition(".")[0] + ".errnoRet", f"{errno_ret!r} is not an errno number",
                          "give a number such as 1 (EPERM) or 38 (ENOSYS)")
        if not takes_errno:
            raise _refuse(where.rpartition(".")[0] + ".errnoRet", f"{name} returns no errno",
                          "use errnoRet only with SCMP_ACT_ERRNO or SCMP_ACT_TRACE")
    if takes_errno:
        return value | (default_errno if errno_ret is None else errno_ret)
    return value


class _Version(ctypes.Structure):
    """struct scmp_version (seccomp_version(3))."""

    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


def library_version() -> str:
    """libseccomp's version, ``2.5.4``: the program it generates for a profile may change with it."""
    library = _library()
    library.seccomp_version.restype = ctypes.POINTER(_Version)
    found = library.seccomp_version().contents
    return f"{found.major}.{found.minor}.{found.micro}"


def compile_profile(profile: dict, cache: str | None = None) -> dict:
    """Check config.json's ``linux.seccomp`` and compile it to the BPF program :func:`install` loads.
    Raises :class:`~stages.runtime.oci.spec.SpecError` naming the field at fault.

    ``cache``: a directory (the runtime's state root keeps one) where compiled profiles are kept, so that
    the next container with the same profile skips libseccomp's ~20 ms. An entry is found by a CRC-32 of
    the profile, this machine, its kernel and libseccomp's version, and used only if it holds that very
    text (a CRC is no proof), is a regular file of ours that nobody else may write; else it is compiled
    again. The runtime state root is a tmpfs (/run): a reboot, perhaps into another kernel, empties it.

    The result is plain data: ``program`` (the struct sock_filter array, hex), ``flags`` (seccomp(2)'s
    SECCOMP_FILTER_FLAG_* bits), ``syscall`` (seccomp(2)'s number here), and for people: ``default``
    (``"ERRNO(38)"``), ``rules`` and ``architectures`` (how many), ``skipped`` (names this machine's
    libseccomp does not know) and ``names`` (how many the profile gave).
    """
    from stages.runtime.oci.spec import _typed

    if not available():
        raise _refuse("linux.seccomp", "libseccomp, which builds the filter, is not installed",
                      "install it (apt-get install libseccomp2), or remove linux.seccomp")
    if cache is not None:
        key = _cache_key(profile)
        found = _cached(cache, key)
        if found is not None:
            return found
        compiled = compile_profile(profile)
        _store(cache, key, compiled)
        return compiled
    library = _library()
    for name in ("listenerPath", "listenerMetadata"):
        if profile.get(name) not in (None, ""):
            raise _refuse(f"linux.seccomp.{name}", "a user-space notifier (SCMP_ACT_NOTIFY) is not supported "
                          "by this runtime", f"remove linux.seccomp.{name} and the SCMP_ACT_NOTIFY rules")
    default_errno = _typed(profile.get("defaultErrnoRet"), int, "linux.seccomp.defaultErrnoRet")
    if "defaultAction" not in profile:
        raise _refuse("linux.seccomp.defaultAction", "is missing", 'add "defaultAction": "SCMP_ACT_ERRNO"')
    default = _action(profile["defaultAction"], default_errno, "linux.seccomp.defaultAction")

    architectures = []
    for index, word in enumerate(_typed(profile.get("architectures"), list, "linux.seccomp.architectures",
                                        [])):
        where = f"linux.seccomp.architectures[{index}]"
        if not isinstance(word, str) or not word.startswith("SCMP_ARCH_"):
            raise _refuse(where, f"{word!r} is not an architecture", "write names like SCMP_ARCH_X86_64")
        token = library.seccomp_arch_resolve_name(word.removeprefix("SCMP_ARCH_").lower().encode())
        if token == 0:
            raise _refuse(where, f"{word} is not an architecture libseccomp knows",
                          "remove it, or use SCMP_ARCH_X86_64, SCMP_ARCH_X86, SCMP_ARCH_AARCH64 ...")
        architectures.append(token)

    flags = 0
    for index, flag in enumerate(_typed(profile.get("flags"), list, "linux.seccomp.flags", [])):
        where = f"linux.seccomp.flags[{index}]"
        if flag in _REFUSED_FLAGS:
            raise _refuse(where, f"{flag}: {_REFUSED_FLAGS[flag]}")
        if flag not in FLAGS:
            raise _refuse(where, f"{flag!r} is not a seccomp filter flag",
                          f"use {', '.join(FLAGS)} (seccomp(2))")
        _check_flag(library, flag)
        flags |= FLAGS[flag][1]

    rules: list[list] = []
    skipped: list[str] = []
    given = 0
    for index, rule in enumerate(_typed(profile.get("syscalls"), list, "linux.seccomp.syscalls", [])):
        where = f"linux.seccomp.syscalls[{index}]"
        _typed(rule, dict, where)
        names = _typed(rule.get("names"), list, f"{where}.names", [])
        if not names or not all(isinstance(name, str) and name for name in names):
            raise _refuse(f"{where}.names", "must be a non-empty list of system call names")
        action = _action(rule.get("action"), rule.get("errnoRet"), f"{where}.action",
                         default_errno=errno.EPERM)
        conditions = []
        for number, item in enumerate(_typed(rule.get("args"), list, f"{where}.args", [])):
            here = f"{where}.args[{number}]"
            _typed(item, dict, here)
            arg = _typed(item.get("index"), int, f"{here}.index")
            if arg is None or not 0 <= arg <= 5:
                raise _refuse(f"{here}.index", "must be 0 to 5: a system call has at most six arguments")
            if item.get("op") not in OPERATORS:
                raise _refuse(f"{here}.op", f"{item.get('op')!r} is not a comparison",
                              f"use one of {', '.join(OPERATORS)}")
            value = _typed(item.get("value"), int, f"{here}.value", 0)
            value_two = _typed(item.get("valueTwo"), int, f"{here}.valueTwo", 0)
            for name, datum in (("value", value), ("valueTwo", value_two)):
                if not 0 <= datum < 1 << 64:
                    raise _refuse(f"{here}.{name}", f"{datum} does not fit in 64 bits")
            conditions.append([arg, OPERATORS[item["op"]], value, value_two])
        if action == default:
            given += len(names)
            continue  # the default does it already (and libseccomp refuses a rule that repeats it)
        # Conditions on different arguments must all hold (one rule); several on the same argument are
        # alternatives, one rule each (as runc reads them: libseccomp cannot AND two tests of one argument).
        indexes = [arg for arg, *_ in conditions]
        groups = [[c] for c in conditions] if len(set(indexes)) < len(indexes) else [conditions]
        for name in names:
            given += 1
            number = library.seccomp_syscall_resolve_name(name.encode())
            if number == _NR_SCMP_ERROR:
                skipped.append(name)
                continue
            for group in groups:
                rules.append([action, number, group, name])
    compiled = {"default_action": default, "architectures": architectures, "rules": rules}
    program = _generate(library, compiled)
    return {"program": program.hex(), "flags": flags,
            "syscall": library.seccomp_syscall_resolve_name(b"seccomp"),  # its number on this architecture
            "default": describe_action(default), "rules": len(rules),
            "architectures": len(architectures) or 1, "skipped": skipped, "names": given}


def _cache_key(profile: dict) -> str:
    import json

    uname = os.uname()
    return json.dumps([uname.machine, uname.release, library_version(), profile], sort_keys=True)


def _cache_path(cache: str, key: str) -> str:
    import zlib  # a CRC-32 names the file (hashlib would import OpenSSL on every run); the text decides

    return os.path.join(cache, f"{zlib.crc32(key.encode()):08x}-{len(key):x}.json")


def _cached(cache: str, key: str) -> dict | None:
    """The compiled profile kept for ``key``, or None (none, not ours, or for another text)."""
    import json
    import stat

    try:
        fd = os.open(_cache_path(cache, key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            return None
        with open(fd, closefd=False) as handle:
            entry = json.load(handle)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("compiled"), dict):
        return None
    return entry["compiled"]


def _store(cache: str, key: str, compiled: dict) -> None:
    """Keep ``compiled`` for ``key``: written to a temporary file, then renamed over (rename(2) is
    atomic: a reader sees no entry or a whole one). A cache that cannot be written is no error."""
    import json
    import stat

    temporary = None
    try:
        # (the state root first, as create makes it: makedirs gives the mode to the last directory only)
        os.makedirs(os.path.dirname(cache), mode=0o700, exist_ok=True)
        os.makedirs(cache, mode=0o700, exist_ok=True)
        info = os.lstat(cache)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            return  # not a directory only we may write into: keep nothing there
        path = _cache_path(cache, key)
        temporary = f"{path}.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with open(fd, "w", closefd=False) as handle:
                json.dump({"key": key, "compiled": compiled}, handle)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def _check_flag(library, flag: str) -> None:
    """Ask libseccomp whether this kernel can set ``flag`` (it knows which kernel brought which), so that
    a profile it cannot honour is refused at create rather than in the container."""
    context = library.seccomp_init(SCMP_ACT_ALLOW)
    try:
        result = library.seccomp_attr_set(context, FLAGS[flag][0], 1)
        if result < 0:
            raise _refuse("linux.seccomp.flags", f"{flag} cannot be set here: {os_error(result)}",
                          "this kernel or libseccomp is too old for it; remove the flag")
    finally:
        library.seccomp_release(context)


def os_error(result: int) -> str:
    return os.strerror(-result)


def describe_action(value: int) -> str:
    """``0x50026`` -> ``"ERRNO(38)"``: an action number in the profile's words."""
    for name, (base, takes_errno) in ACTIONS.items():
        if name == "SCMP_ACT_KILL":
            continue
        if takes_errno and value & 0xFFFF0000 == base:
            return f"{name.removeprefix('SCMP_ACT_')}({value & 0xFFFF})"
        if value == base:
            return name.removeprefix("SCMP_ACT_")
    return hex(value)


def _generate(library, compiled: dict) -> bytes:
    """The filter as the kernel will run it: libseccomp builds its context and writes the classic BPF
    program (seccomp_export_bpf(3)), an array of struct sock_filter, into a memory file."""
    context = library.seccomp_init(compiled["default_action"])
    if not context:
        raise _refuse("linux.seccomp.defaultAction", "libseccomp refused it (seccomp_init)")
    try:
        for token in compiled["architectures"]:
            result = library.seccomp_arch_add(context, token)
            if result < 0 and result != -errno.EEXIST:  # the native one is in every new context
                raise _refuse("linux.seccomp.architectures", f"libseccomp could not add {token:#x}: "
                              f"{os_error(result)}")
        for action, number, conditions, name in compiled["rules"]:
            array = (_Condition * max(len(conditions), 1))(*[_Condition(*c) for c in conditions])
            result = library.seccomp_rule_add_array(context, action, number, len(conditions), array)
            if result < 0:
                test = " and ".join(f"arg{a} {_OPERATOR_WORDS[o]} {x:#x}" for a, o, x, _ in conditions)
                condition = f" if {test}" if test else ""
                raise _refuse("linux.seccomp.syscalls", f"libseccomp refused the rule for {name} "
                              f"({describe_action(action)}{condition}): {os_error(result)}",
                              "correct or remove that rule")
        memory = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            result = library.seccomp_export_bpf(context, memory)
            if result < 0:
                raise OSError(-result, "seccomp_export_bpf failed")
            os.lseek(memory, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(memory, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(memory)
    finally:
        library.seccomp_release(context)


def describe(compiled: dict) -> str:
    """One line for the step record: the default action, the rules, the size of the program."""
    line = (f"# seccomp: by default {compiled['default']}, {compiled['rules']} rules for "
            f"{compiled['architectures']} architecture(s): {len(compiled['program']) // 16} BPF instructions")
    if compiled["skipped"]:
        line += f" ({len(compiled['skipped'])} names unknown here were skipped)"
    return line


class _Program(ctypes.Structure):
    """struct sock_fprog (seccomp(2)): how many instructions, and where they are."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


SECCOMP_SET_MODE_FILTER = 1


class Prepared:
    """A compiled filter in memory, ready for the one system call that loads it (:meth:`load`)."""

    def __init__(self, compiled: dict):
        code = bytes.fromhex(compiled["program"])
        self.compiled = compiled
        self.buffer = ctypes.create_string_buffer(code, len(code))
        self.program = _Program(len(code) // 8, ctypes.addressof(self.buffer))

    def load(self) -> None:
        """seccomp(2) SECCOMP_SET_MODE_FILTER: from now on the kernel runs the filter on every system call
        of this process and its future children, and nothing takes it away. Without no_new_privs the
        kernel wants CAP_SYS_ADMIN for it."""
        from stages import kernel

        flags = self.compiled["flags"]
        kernel.syscall(self.compiled["syscall"], ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(flags),
                       ctypes.byref(self.program), call="seccomp",
                       arguments=f"SECCOMP_SET_MODE_FILTER, {flags:#x}, <{self.program.len} instructions>")


def prepare(compiled: dict) -> Prepared:
    """Get the filter ready to load just before execve(2) (recorded now: after the exec nothing reports)."""
    with steps.record(describe(compiled) + "; loaded right before execve", where="inside",
                      what="a seccomp filter (seccomp(2)) from linux.seccomp; no shell command does this"):
        return Prepared(compiled)


def install(compiled: dict) -> None:
    """Load the filter into this process now (one recorded step). The program was generated at
    ``create``: here it is a single system call."""
    with steps.record(describe(compiled), where="inside",
                      what="a seccomp filter (seccomp(2)) from linux.seccomp; no shell command does this"):
        Prepared(compiled).load()
