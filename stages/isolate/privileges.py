"""What root inside an isolate may still do: capabilities, no_new_privs and a seccomp deny-list.

Namespaces change what a process *sees*; they do not take away what root may *do* with what it sees
(load a kernel module, reboot, set the clock ...). Three more steps take that away, the same three Docker
takes (capabilities(7), prctl(2) PR_SET_NO_NEW_PRIVS, seccomp(2)):

- the *bounding set* limits the capabilities any later execve(2) can grant, even to root, even through a
  setuid program; we keep :data:`DEFAULT_CAPS` (Docker's default list) and drop the rest;
- *no_new_privs* makes execve(2) never grant anything: setuid bits and file capabilities are ignored;
- a *seccomp* filter makes chosen system calls fail with EPERM. We build it through libseccomp (ctypes)
  when the library is installed, and say so clearly when it is not. :data:`HARDENED_DENY` with
  :data:`NAMESPACE_FLAGS` refuses what Docker's default profile refuses: among them a new user namespace,
  whose root would hold every capability again (``unshare -U -r``), which no capability stops.
"""

from __future__ import annotations

import errno
import functools
import os

from stages import steps
from stages.errors import StagesError

DEFAULT_CAPS = (
    "chown", "dac_override", "fowner", "fsetid", "kill", "setgid", "setuid", "setpcap", "net_bind_service",
    "net_raw", "sys_chroot", "mknod", "audit_write", "setfcap",
)
"""The capabilities a container keeps by default (Docker's list): enough to act as root on its own files,
not enough to change the kernel, the clock, the mounts or the network of the machine."""

DEFAULT_DENY = (
    "keyctl", "add_key", "request_key", "ptrace", "mbind", "migrate_pages", "move_pages", "set_mempolicy",
    "userfaultfd", "perf_event_open", "kexec_load", "open_by_handle_at", "init_module", "finit_module",
    "delete_module", "bpf",
)
"""System calls a container rarely needs and attackers often use (after contained.c and Docker's profile):
the kernel keyring, ptrace, NUMA memory placement, userfaultfd, perf, module loading, open_by_handle_at
(the "shocker" escape), bpf."""

HARDENED_DENY = DEFAULT_DENY + (
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick",
    "open_tree", "move_mount", "mount_setattr", "swapon", "swapoff", "reboot", "kexec_file_load", "acct",
    "settimeofday", "clock_settime", "clock_adjtime", "syslog", "quotactl", "lookup_dcookie", "nfsservctl",
    "uselib", "iopl", "ioperm", "create_module", "get_kernel_syms", "query_module", "vm86", "vm86old",
    "_sysctl", "name_to_handle_at",
)
"""What Docker's default profile refuses a container without CAP_SYS_ADMIN, as a deny-list: the above, and
new namespaces (unshare, setns: from inside, ``unshare -U -r`` would make a user namespace whose root holds
every capability again), mounts (the old and the new mount API), swap, reboot, the clocks, the kernel log
and quotas. :data:`NAMESPACE_FLAGS` closes clone(2)'s way to new namespaces too."""

#: The clone(2) flags that make new namespaces (clone(2), sched.h): a clone with any of them is refused, as
#: Docker's profile does; fork and threads (clone without them) still work.
NAMESPACE_FLAGS = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
                   "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
                   "CLONE_NEWNET": 0x40000000}
#: System calls that fail with ENOSYS instead: clone3(2) passes its flags in a struct that a seccomp filter
#: cannot read, so it is refused as if the kernel lacked it, and the C library falls back to clone(2),
#: whose flags the filter sees (Docker's profile does the same).
ENOSYS_CALLS = ("clone3",)

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_ERRNO = 0x00050000
_SCMP_CMP_MASKED_EQ = 7  # enum scmp_compare (seccomp_rule_add(3)): (argument & mask) == value


def seccomp_available() -> bool:
    """Whether libseccomp can be loaded (Debian: the libseccomp2 package)."""
    import ctypes.util  # here: it imports subprocess and tempfile, which a container run needs not

    return ctypes.util.find_library("seccomp") is not None


@functools.cache
def _argument_compare():
    import ctypes

    class ArgumentCompare(ctypes.Structure):  # struct scmp_arg_cmp (seccomp_rule_add(3))
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                    ("datum_b", ctypes.c_uint64)]

    return ArgumentCompare


@functools.cache
def _library():
    import ctypes

    _ArgumentCompare = _argument_compare()  # noqa: N806 - a ctypes type

    try:
        # by its soname first: find_library runs ldconfig (a process, ~15 ms) to learn the same name
        library = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        import ctypes.util

        name = ctypes.util.find_library("seccomp")
        if name is None:
            raise StagesError("seccomp filters are built with libseccomp, which is not installed",
                              "install it (apt-get install libseccomp2) or skip the seccomp step") from None
        library = ctypes.CDLL(name, use_errno=True)
    library.seccomp_init.restype = ctypes.c_void_p
    library.seccomp_init.argtypes = [ctypes.c_uint32]
    library.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    library.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(_ArgumentCompare)]
    library.seccomp_load.argtypes = [ctypes.c_void_p]
    library.seccomp_release.argtypes = [ctypes.c_void_p]
    library.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    return library


def _clone_flags_argument() -> int:
    # clone(2)'s flags are its first argument, except on s390, which swaps the first two (clone(2), NOTES)
    return 1 if os.uname().machine.startswith("s390") else 0


def install_seccomp(deny=DEFAULT_DENY, *, namespace_flags=(), enosys=()) -> list[str]:
    """Install a filter in this process (inherited by its children) that makes each system call in ``deny``
    fail with EPERM, clone(2) with any of ``namespace_flags`` (names of :data:`NAMESPACE_FLAGS`) fail with
    EPERM, and each call in ``enosys`` fail with ENOSYS. System calls this architecture lacks are skipped;
    the rules installed are returned (``clone(CLONE_NEWUSER)``, ``clone3: ENOSYS`` ...)."""
    import ctypes

    library = _library()
    compare = _argument_compare()
    context = library.seccomp_init(_SCMP_ACT_ALLOW)
    if not context:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    rules = []

    def add(name: str, code: int, shown: str, argument: tuple[int, int] | None = None) -> None:
        number = library.seccomp_syscall_resolve_name(name.encode())
        if number < 0:  # __NR_SCMP_ERROR: no such system call here
            return
        if argument is None:
            result = library.seccomp_rule_add(context, _SCMP_ACT_ERRNO | code, number, 0)
        else:
            index, mask = argument
            condition = compare(index, _SCMP_CMP_MASKED_EQ, mask, mask)  # (arg & flag) == flag
            result = library.seccomp_rule_add_array(context, _SCMP_ACT_ERRNO | code, number, 1,
                                                    ctypes.byref(condition))
        if result < 0:
            raise OSError(-result, f"seccomp_rule_add({shown}) failed")
        rules.append(shown)

    try:
        for name in deny:
            add(name, errno.EPERM, name)
        for flag in namespace_flags:
            if flag not in NAMESPACE_FLAGS:
                raise StagesError(f"{flag!r} is not a namespace flag of clone(2)",
                                  f"choose from {', '.join(NAMESPACE_FLAGS)}")
            add("clone", errno.EPERM, f"clone({flag})", (_clone_flags_argument(), NAMESPACE_FLAGS[flag]))
        for name in enosys:
            add(name, errno.ENOSYS, f"{name}: ENOSYS")
        with steps.record(f"# seccomp: {', '.join(rules)} fail with EPERM (ENOSYS where said)",
                          where="inside", what="a seccomp filter (seccomp(2)); no shell command does this"):
            result = library.seccomp_load(context)
            if result < 0:
                raise OSError(-result, "seccomp_load failed")
    finally:
        library.seccomp_release(context)
    return rules
