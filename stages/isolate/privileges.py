"""What root inside an isolate may still do: capabilities, no_new_privs and a seccomp deny-list.

Namespaces change what a process *sees*; they do not take away what root may *do* with what it sees
(load a kernel module, reboot, set the clock ...). Three more steps take that away, the same three Docker
takes (capabilities(7), prctl(2) PR_SET_NO_NEW_PRIVS, seccomp(2)):

- the *bounding set* limits the capabilities any later execve(2) can grant, even to root, even through a
  setuid program; we keep :data:`DEFAULT_CAPS` (Docker's default list) and drop the rest;
- *no_new_privs* makes execve(2) never grant anything: setuid bits and file capabilities are ignored;
- a *seccomp* filter makes chosen system calls fail with EPERM. We build it through libseccomp (ctypes)
  when the library is installed, and say so clearly when it is not.
"""

from __future__ import annotations

import errno
import functools

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

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_ERRNO = 0x00050000


def seccomp_available() -> bool:
    """Whether libseccomp can be loaded (Debian: the libseccomp2 package)."""
    import ctypes.util  # here: it imports subprocess and tempfile, which a container run needs not

    return ctypes.util.find_library("seccomp") is not None


@functools.cache
def _library():
    import ctypes

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
    library.seccomp_load.argtypes = [ctypes.c_void_p]
    library.seccomp_release.argtypes = [ctypes.c_void_p]
    library.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    return library


def install_seccomp(deny=DEFAULT_DENY) -> list[str]:
    """Install a filter in this process (inherited by its children) that makes each system call in ``deny``
    fail with EPERM. System calls this architecture lacks are skipped; the ones filtered are returned."""
    library = _library()
    context = library.seccomp_init(_SCMP_ACT_ALLOW)
    if not context:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    denied = []
    try:
        for name in deny:
            number = library.seccomp_syscall_resolve_name(name.encode())
            if number < 0:  # __NR_SCMP_ERROR: no such system call here
                continue
            result = library.seccomp_rule_add(context, _SCMP_ACT_ERRNO | errno.EPERM, number, 0)
            if result < 0:
                raise OSError(-result, f"seccomp_rule_add({name}) failed")
            denied.append(name)
        with steps.record(f"# seccomp: {', '.join(denied)} fail with EPERM", where="inside",
                          what="a seccomp filter (seccomp(2)); no shell command does this"):
            result = library.seccomp_load(context)
            if result < 0:
                raise OSError(-result, "seccomp_load failed")
    finally:
        library.seccomp_release(context)
    return denied
