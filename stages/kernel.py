"""Thin, explained wrappers around the system calls containers are made of.

This is the only module that calls libc through ctypes. Each wrapper

- uses the standard library where it exists (``os.chroot``, ``socket.sethostname``, ``os.unshare`` and
  ``os.setns`` on Python 3.12+);
- raises :class:`OSError` (so ``PermissionError``, ``FileNotFoundError`` ... as the errno says) whose
  message names the call, its arguments and the usual cause in plain words;
- records itself, as the command a person would type, into the active :mod:`stages.steps` record.

Read mount(2), umount(2), pivot_root(2), unshare(2), setns(2), prctl(2), capget(2) and capabilities(7)
beside it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat

from stages import steps

_libc = ctypes.CDLL(None, use_errno=True)

# -- namespaces: clone flags, see unshare(2) and namespaces(7) -------------------------------------
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# The learner's word for each namespace, its clone flag, the /proc/PID/ns file and unshare(1)'s option.
NAMESPACES: dict[str, tuple[int, str, str]] = {
    "user": (CLONE_NEWUSER, "user", "--user"),
    "mount": (CLONE_NEWNS, "mnt", "--mount"),
    "uts": (CLONE_NEWUTS, "uts", "--uts"),
    "ipc": (CLONE_NEWIPC, "ipc", "--ipc"),
    "pid": (CLONE_NEWPID, "pid", "--pid"),
    "net": (CLONE_NEWNET, "net", "--net"),
    "cgroup": (CLONE_NEWCGROUP, "cgroup", "--cgroup"),
    "time": (CLONE_NEWTIME, "time", "--time"),
}

# -- mount(2) flags ---------------------------------------------------------------------------------
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MNT_FORCE = 1
MNT_DETACH = 2

_FLAG_WORDS = [
    (MS_RDONLY, "ro"), (MS_NOSUID, "nosuid"), (MS_NODEV, "nodev"), (MS_NOEXEC, "noexec"),
    (MS_NOATIME, "noatime"), (MS_RELATIME, "relatime"), (MS_REMOUNT, "remount"), (MS_BIND, "bind"),
]
_PROPAGATION = [(MS_PRIVATE, "private"), (MS_SLAVE, "slave"), (MS_SHARED, "shared")]

# -- prctl(2) ---------------------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

# -- capabilities(7), in kernel order ------------------------------------------------------------
CAPABILITIES = [
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
    "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
    "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
    "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease",
    "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
    "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
]
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_SYSCALL_NUMBERS = {  # pivot_root and openat2 have no libc wrapper
    "x86_64": {"pivot_root": 155, "openat2": 437},
    "aarch64": {"pivot_root": 41, "openat2": 437},
    "riscv64": {"pivot_root": 41, "openat2": 437},
    "ppc64le": {"pivot_root": 203, "openat2": 437},
    "s390x": {"pivot_root": 217, "openat2": 437},
}

# -- what an errno usually means for a call, in the learner's words --------------------------------
_CAUSES: dict[tuple[str, int], str] = {
    ("pivot_root", errno.EINVAL): (
        "the new root is not a mount point, put_old is not below it, or / is shared "
        "(make / rprivate and bind-mount the new root on itself first)"
    ),
    ("pivot_root", errno.EBUSY): "the new root or put_old is already mounted on something else",
    ("mount", errno.EINVAL): "a flag combination or option the filesystem does not accept, or the source "
                             "is not a mount point",
    ("mount", errno.ENODEV): "the kernel does not know this filesystem type (is its module loaded?)",
    ("mount", errno.ENOENT): "the mount point or the source does not exist",
    ("mount", errno.EBUSY): "it is already mounted there",
    ("umount2", errno.EINVAL): "nothing is mounted there",
    ("umount2", errno.EBUSY): "something still uses it (try a lazy unmount, MNT_DETACH)",
    ("unshare", errno.EINVAL): "this namespace type is not supported by the kernel, or the process has "
                               "threads (a user namespace needs a single-threaded process)",
    ("unshare", errno.ENOSPC): "the limit on namespaces of this type is reached (/proc/sys/user/max_*)",
    ("unshare", errno.EUSERS): "user namespaces are nested too deep",
    ("setns", errno.EINVAL): "the file is not a namespace of the kind asked for, or the process has threads",
    ("chroot", errno.ENOENT): "the directory does not exist",
    ("chroot", errno.ENOTDIR): "the path is not a directory",
    ("openat2", errno.ELOOP): "too many symbolic links, or a magic link (/proc/PID/fd/N, /proc/PID/root) "
                              "that RESOLVE_NO_MAGICLINKS refuses",
    ("openat2", errno.EXDEV): "the path leads out of the directory it must stay in",
    ("openat2", errno.EAGAIN): "a rename raced with the lookup of '..'; try again",
    ("openat2", errno.E2BIG): "this kernel's struct open_how is older than ours",
    ("open_in_root", errno.ELOOP): "too many symbolic links (40, as the kernel allows)",
}
_GENERAL_CAUSES = {
    errno.EPERM: "needs root (try sudo) or a capability this process does not hold",
    errno.EACCES: "permission denied: needs root (try sudo), or the filesystem is mounted noexec",
    errno.ENOENT: "no such file or directory",
    errno.ENOSYS: "this kernel does not have this system call",
}


def explain(call: str, err: int) -> str:
    """The usual cause of ``err`` from ``call``, in plain words."""
    return _CAUSES.get((call, err)) or _GENERAL_CAUSES.get(err) or os.strerror(err)


def syscall_error(call: str, arguments: str, err: int) -> OSError:
    """An OSError whose subclass follows the errno and whose text names the call and the cause."""
    error = OSError(err, f"{call}({arguments}) failed: {explain(call, err)}")
    error.call = call  # type: ignore[attr-defined]
    return error


def _check(result: int, call: str, arguments: str) -> int:
    if result == -1:
        raise syscall_error(call, arguments, ctypes.get_errno())
    return result


def _os_call(call: str, arguments: str, action, *args):
    try:
        return action(*args)
    except OSError as error:
        raise syscall_error(call, arguments, error.errno or errno.EIO) from None


def _bytes(value: str | os.PathLike | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


# == mount(2), umount(2), pivot_root(2) ==========================================================
def mount_command(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
                  data: str | None = None) -> str:
    """The mount(8) command line that stands for a mount(2) call."""
    recursive = "r" if flags & MS_REC else ""
    for bit, word in _PROPAGATION:
        if flags & bit:
            return f"mount --make-{recursive}{word} {target}"
    if flags & MS_MOVE:
        return f"mount --move {source} {target}"
    if flags & MS_BIND and not flags & MS_REMOUNT:
        return f"mount --{'rbind' if recursive else 'bind'} {source} {target}"
    options = [word for bit, word in _FLAG_WORDS if flags & bit and word != "bind"]
    if flags & MS_BIND and flags & MS_REMOUNT:
        options.insert(1, "bind")
    if data:
        options.append(data)
    parts = ["mount"]
    if fstype:
        parts += ["-t", fstype]
    if options:
        parts += ["-o", ",".join(options)]
    if not flags & MS_REMOUNT:
        parts.append(source or "none")
    parts.append(target)
    return " ".join(parts)


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0,
          data: str | None = None, what: str = "") -> None:
    """mount(2). ``flags`` are the MS_* constants above; ``data`` the comma-separated options."""
    shell = mount_command(source, target, fstype, flags, data)
    with steps.record(shell, what=what, where="inside"):
        result = _libc.mount(_bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags),
                             _bytes(data))
        _check(result, "mount", f"{source!r}, {target!r}, {fstype!r}, {flags:#x}, {data!r}")


def umount(target: str, flags: int = 0, what: str = "") -> None:
    """umount2(2); ``flags=MNT_DETACH`` is ``umount -l``."""
    shell = f"umount {'-l ' if flags & MNT_DETACH else ''}{target}"
    with steps.record(shell, what=what, where="inside"):
        _check(_libc.umount2(_bytes(target), ctypes.c_int(flags)), "umount2", f"{target!r}, {flags}")


def pivot_root(new_root: str, put_old: str, what: str = "") -> None:
    """pivot_root(2): make ``new_root`` the root of this mount namespace, the old root at ``put_old``."""
    # os.uname().machine is what platform.machine() reads, without importing platform at every start
    number = _SYSCALL_NUMBERS.get(os.uname().machine, {}).get("pivot_root")
    if number is None:
        raise syscall_error("pivot_root", f"{new_root!r}, {put_old!r}", errno.ENOSYS)
    with steps.record(f"pivot_root {new_root} {put_old}", what=what, where="inside"):
        result = _libc.syscall(ctypes.c_long(number), _bytes(new_root), _bytes(put_old))
        _check(result, "pivot_root", f"{new_root!r}, {put_old!r}")


def mount_at(source: str | None, fd: int, shown: str, fstype: str | None = None, flags: int = 0,
             data: str | None = None, what: str = "") -> None:
    """mount(2) onto the file or directory that ``fd`` (an O_PATH descriptor) is, as runc does.

    The target is given as ``/proc/self/fd/FD``, a magic link the kernel follows to the very file the
    descriptor holds (proc(5)): the path was looked up once, safely (:func:`open_in_root`), and is not
    looked up again, so nothing can swap a symbolic link in between. ``shown`` is the path the step
    record shows, as a person would type it.
    """
    target = f"/proc/self/fd/{fd}"
    with steps.record(mount_command(source, shown, fstype, flags, data), what=what, where="inside"):
        result = _libc.mount(_bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags),
                             _bytes(data))
        _check(result, "mount", f"{source!r}, {shown!r} (as {target}), {fstype!r}, {flags:#x}, {data!r}")


# == openat2(2): a path looked up inside a directory, as if it were / =================================
# RESOLVE_* flags of struct open_how (openat2(2))
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

_SYMLINK_HOPS = 40  # the kernel's own limit for one lookup (path_resolution(7))
_OPEN_PATH_ONLY = os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_DIRECTORY


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2): openat(2) with a ``resolve`` word that says how symbolic links and ``..`` may be
    followed. Returns the new descriptor; raises OSError (ENOSYS before Linux 5.6)."""
    number = _SYSCALL_NUMBERS.get(os.uname().machine, {}).get("openat2")
    if number is None:
        raise syscall_error("openat2", f"{dirfd}, {path!r}", errno.ENOSYS)
    how = _OpenHow(flags, mode, resolve)
    result = _libc.syscall(ctypes.c_long(number), ctypes.c_int(dirfd), _bytes(path), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
    return _check(result, "openat2", f"{dirfd}, {path!r}, {{flags={flags:#o}, resolve={resolve:#x}}}")


_openat2_missing = False  # set once the kernel said ENOSYS: the walk from then on


def open_in_root(root_fd: int, path: str, flags: int = os.O_PATH | os.O_CLOEXEC, mode: int = 0) -> int:
    """Open ``path`` as a process whose root directory is ``root_fd`` would: never outside it.

    With openat2(2)'s ``RESOLVE_IN_ROOT`` the kernel itself treats ``root_fd`` as ``/`` for this one
    lookup: an absolute symbolic link starts again at it, and ``..`` never climbs above it, as after
    chroot(2); ``RESOLVE_NO_MAGICLINKS`` refuses the /proc/PID/fd and /proc/PID/root links that lead
    anywhere at all. A kernel without openat2 (before 5.6, ENOSYS; or a seccomp filter that hides it) gets
    :func:`walk_in_root`, which does the same by hand. ``STAGES_OPENAT2=0`` in the environment takes the
    walk too: the tests use it to check the walk on a kernel that has openat2.
    """
    global _openat2_missing
    if not _openat2_missing and os.environ.get("STAGES_OPENAT2") != "0":
        for _attempt in range(16):
            try:
                return openat2(root_fd, path, flags | os.O_CLOEXEC, mode,
                               RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
            except OSError as error:
                if error.errno == errno.ENOSYS:
                    _openat2_missing = True
                    break
                if error.errno != errno.EAGAIN:  # EAGAIN: a rename raced with '..' (openat2(2))
                    raise syscall_error("openat2", f"{_fd_path(root_fd)!r} as /, {path!r}",
                                        error.errno) from None
    return walk_in_root(root_fd, path, flags, mode)


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"descriptor {fd}"


def walk_in_root(root_fd: int, path: str, flags: int = os.O_PATH | os.O_CLOEXEC, mode: int = 0) -> int:
    """:func:`open_in_root` by hand, for a kernel without openat2(2): one component at a time.

    Each component is opened with ``O_PATH | O_NOFOLLOW`` relative to the directory before it, so the
    kernel never follows a symbolic link for us: a link is read (readlinkat(2)) and its target walked
    here, from ``root_fd`` when it is absolute and from the link's directory when it is relative; ``..``
    goes back one directory of this walk and stays at ``root_fd`` at the top. Nothing a link says can
    lead out, and a magic link of /proc is read as the text it shows, never followed.
    """
    arguments = f"{path!r} below {_fd_path(root_fd)!r}"
    pending = [part for part in path.split("/") if part not in ("", ".")]
    pending.reverse()  # a stack: the next component last
    stack = [os.dup(root_fd)]  # the directories walked so far, the root first
    hops = 0
    try:
        while pending:
            part = pending.pop()
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            last, top = not pending, stack[-1]
            try:
                fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top)
            except FileNotFoundError:
                if not (last and flags & os.O_CREAT):
                    raise syscall_error("open_in_root", arguments, errno.ENOENT) from None
                fd = None
            info = os.fstat(fd) if fd is not None else None
            if info is not None and stat.S_ISLNK(info.st_mode) and not (last and flags & os.O_NOFOLLOW):
                target = os.readlink("", dir_fd=fd)
                os.close(fd)
                hops += 1
                if hops > _SYMLINK_HOPS:
                    raise syscall_error("open_in_root", arguments, errno.ELOOP)
                if last and flags & os.O_CREAT and flags & os.O_EXCL:
                    raise syscall_error("open_in_root", arguments, errno.EEXIST)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
                continue
            if not last:
                if not stat.S_ISDIR(info.st_mode):
                    os.close(fd)
                    raise syscall_error("open_in_root", arguments, errno.ENOTDIR)
                stack.append(fd)
                continue
            if fd is not None and flags & os.O_PATH and not flags & ~_OPEN_PATH_ONLY:
                if flags & os.O_DIRECTORY and not stat.S_ISDIR(info.st_mode):
                    os.close(fd)
                    raise syscall_error("open_in_root", arguments, errno.ENOTDIR)
                return fd
            if fd is not None:
                os.close(fd)
            try:
                # O_NOFOLLOW: a link put there since we looked is not followed (ELOOP), but read again
                return os.open(part, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=top)
            except OSError as error:
                if error.errno != errno.ELOOP or flags & os.O_NOFOLLOW or hops >= _SYMLINK_HOPS:
                    raise syscall_error("open_in_root", arguments, error.errno) from None
                hops += 1
                pending.append(part)
        return os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=stack[-1])
    finally:
        for fd in stack:
            os.close(fd)


# == chroot(2), sethostname(2) =====================================================================
def chroot(path: str, what: str = "") -> None:
    """chroot(2) through ``os.chroot``."""
    with steps.record(f"chroot {path}", what=what, where="inside"):
        _os_call("chroot", repr(path), os.chroot, path)


def sethostname(name: str, what: str = "") -> None:
    """sethostname(2) through ``socket.sethostname``."""
    with steps.record(f"hostname {name}", what=what, where="inside"):
        _os_call("sethostname", repr(name), socket.sethostname, name)


# == unshare(2), setns(2) ============================================================================
def namespace_flags(names) -> int:
    """The clone flags for namespace names such as ``["uts", "pid"]``."""
    flags = 0
    for name in names:
        if name not in NAMESPACES:
            raise ValueError(f"unknown namespace {name!r}; the kinds are: {', '.join(NAMESPACES)}")
        flags |= NAMESPACES[name][0]
    return flags


def namespace_names(flags: int) -> list[str]:
    return [name for name, (bit, _, _) in NAMESPACES.items() if flags & bit]


def unshare(flags: int, what: str = "") -> None:
    """unshare(2): move this process into new namespaces (PID and time ones apply to its children)."""
    options = " ".join(NAMESPACES[name][2] for name in namespace_names(flags))
    with steps.record(f"unshare {options}", what=what, where="inside"):
        if hasattr(os, "unshare"):
            _os_call("unshare", f"{options}", os.unshare, flags)
        else:
            _check(_libc.unshare(ctypes.c_int(flags)), "unshare", options)


def setns(path: str, flags: int = 0, what: str = "") -> None:
    """setns(2): join the namespace that ``path`` (a /proc/PID/ns/* file) stands for."""
    names = namespace_names(flags) if flags else []
    options = " ".join(NAMESPACES[name][2] for name in names) or "--all"
    pid = path.split("/")[2] if path.startswith("/proc/") else "?"
    shell = f"nsenter --target {pid} {options}"
    with steps.record(shell, what=what, where="inside"):
        fd = _os_call("open", repr(path), os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if hasattr(os, "setns"):
                _os_call("setns", f"{path!r}, {flags:#x}", os.setns, fd, flags)
            else:
                _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(flags)), "setns", f"{path!r}, {flags:#x}")
        finally:
            os.close(fd)


def syscall(number: int, *args, call: str, arguments: str = "") -> int:
    """syscall(2): a system call glibc has no wrapper for (seccomp(2), bpf(2)), by its number on this
    architecture; ``args`` are ctypes values. Returns the result; raises OSError naming ``call``."""
    return _check(_libc.syscall(ctypes.c_long(number), *args), call, arguments)


# == prctl(2) and capabilities(7) ====================================================================
def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4),
                    ctypes.c_ulong(arg5)),
        "prctl", f"{option}, {arg2}",
    )


def set_no_new_privs(what: str = "") -> None:
    """PR_SET_NO_NEW_PRIVS: execve can never grant more privileges (setuid bits, file capabilities)."""
    with steps.record("setpriv --no-new-privs", what=what, where="inside"):
        prctl(PR_SET_NO_NEW_PRIVS, 1)


def no_new_privs() -> bool:
    return bool(prctl(PR_GET_NO_NEW_PRIVS))


def set_parent_death_signal(signal_number: int) -> None:
    """PR_SET_PDEATHSIG: the kernel sends this signal when the parent dies (no orphaned holders)."""
    prctl(PR_SET_PDEATHSIG, signal_number)


def capability_number(name: str) -> int:
    word = name.lower().removeprefix("cap_")
    if word not in CAPABILITIES:
        raise ValueError(f"unknown capability {name!r}; see capabilities(7)")
    return CAPABILITIES.index(word)


def last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            return int(handle.read())
    except OSError:
        return len(CAPABILITIES) - 1


def drop_bounding(names, what: str = "") -> None:
    """Drop capabilities from the bounding set: no later execve can ever regain them."""
    names = list(names)
    shell = "capsh --drop=" + ",".join(f"cap_{n.lower().removeprefix('cap_')}" for n in names)
    with steps.record(shell, what=what, where="inside"):
        for name in names:
            prctl(PR_CAPBSET_DROP, capability_number(name))


def in_bounding_set(name: str) -> bool:
    return bool(prctl(PR_CAPBSET_READ, capability_number(name)))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capget(pid: int = 0) -> dict[str, int]:
    """capget(2): the effective, permitted and inheritable sets of ``pid`` as 64-bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, pid)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget", str(pid))
    return {field: getattr(data[0], field) | (getattr(data[1], field) << 32)
            for field in ("effective", "permitted", "inheritable")}


def capset(effective: int, permitted: int, inheritable: int = 0, what: str = "") -> None:
    """capset(2) on this process: keep only the capabilities whose bits are set."""
    names = ",".join(f"cap_{n}" for i, n in enumerate(CAPABILITIES) if effective >> i & 1)
    with steps.record(f"capsh --caps='{names}=ep'", what=what, where="inside"):
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        for index in (0, 1):
            data[index].effective = (effective >> (32 * index)) & 0xFFFFFFFF
            data[index].permitted = (permitted >> (32 * index)) & 0xFFFFFFFF
            data[index].inheritable = (inheritable >> (32 * index)) & 0xFFFFFFFF
        _check(_libc.capset(ctypes.byref(header), data), "capset", f"{effective:#x}")


def capability_names(mask: int) -> list[str]:
    return [name for index, name in enumerate(CAPABILITIES) if mask >> index & 1]


def capability_mask(names) -> int:
    mask = 0
    for name in names:
        mask |= 1 << capability_number(name)
    return mask


# == small helpers everyone needs ===================================================================
def is_root() -> bool:
    return os.geteuid() == 0


def namespace_available(name: str) -> bool:
    """Whether this kernel has the namespace type (its /proc/self/ns file exists)."""
    return os.path.exists(f"/proc/self/ns/{NAMESPACES[name][1]}")
