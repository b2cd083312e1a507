"""Docker's default seccomp profile, written as our own data, and how a profile becomes config.json's
``linux.seccomp`` (config-linux.md "Seccomp").

A seccomp filter answers every system call a container makes (seccomp(2)). Docker's default is an *allow
list*: a call not named here fails with EPERM (``defaultAction`` SCMP_ACT_ERRNO), so a kernel interface
added next year is closed until someone decides it is safe. The calls left out are those a container
must not make because what they touch is not namespaced, or because they have been the way out of
containers before: loading kernel modules (init_module), rebooting, setting the clock, the kernel
keyring (add_key, keyctl), kexec, swapon, BPF and perf events, mount and the new mount API, pivot_root,
and making new namespaces (unshare, setns, clone with CLONE_NEW* flags), through which a root without
CAP_SYS_ADMIN would otherwise get a full set of capabilities in a new user namespace.

Some calls are allowed only when the container holds the capability that guards them anyway (Docker's
``includes: caps``): a container given CAP_SYS_ADMIN gets mount and unshare back, one given
CAP_SYS_PTRACE gets ptrace of any process. And some only with certain arguments: clone without the
namespace flags, personality only for the few execution domains programs use, socket without AF_VSOCK
(talks to the hypervisor) and AF_ALG (the kernel's crypto API).

Where the list comes from: moby's default profile (github.com/moby/profiles, ``seccomp/default_linux.go``,
which Docker ships as ``profiles/seccomp/default.json``; podman's, containers-common ``seccomp.json``, is
the same list). It is written here in Docker's profile-file format (``archMap``, ``includes``,
``excludes``), so that :func:`resolve` turns our default and a learner's own profile file
(``stages run --security-opt seccomp=FILE``) into config.json the same way, as dockerd does for runc.
"""

from __future__ import annotations

import errno
import json
import os

# System calls every container may make, whatever its capabilities (Docker's first rule).
ALLOWED = """
    accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown chown32
    clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime clock_gettime64
    clock_nanosleep clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2 dup3
    epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old
    eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate
    fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown fchown32 fchownat fcntl fcntl64 fdatasync
    fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync
    ftruncate ftruncate64 futex futex_requeue futex_time64 futex_wait futex_waitv futex_wake futimesat
    get_robust_list get_thread_area getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32
    getgid getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid getppid getpriority
    getrandom getresgid getresgid32 getresuid getresuid32 getrlimit getrusage getsid getsockname getsockopt
    gettid gettimeofday getuid getuid32 getxattr getxattrat inotify_add_watch inotify_init inotify_init1
    inotify_rm_watch io_cancel io_destroy io_getevents io_pgetevents io_pgetevents_time64 io_setup io_submit
    ioctl ioprio_get ioprio_set ipc kill landlock_add_rule landlock_create_ruleset landlock_restrict_self
    lchown lchown32 lgetxattr link linkat listen listmount listxattr listxattrat llistxattr _llseek
    lremovexattr lseek lsetxattr lstat lstat64 madvise map_shadow_stack membarrier memfd_create memfd_secret
    mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify
    mq_open mq_timedreceive mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap mseal
    msgctl msgget msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep newfstatat
    _newselect open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free
    pkey_mprotect poll ppoll ppoll_time64 prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6
    pselect6_time64 pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv recv recvfrom
    recvmmsg recvmmsg_time64 recvmsg remap_file_pages removexattr removexattrat rename renameat renameat2
    restart_syscall riscv_hwprobe rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo
    rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo
    sched_get_priority_max sched_get_priority_min sched_getaffinity sched_getattr sched_getparam
    sched_getscheduler sched_rr_get_interval sched_rr_get_interval_time64 sched_setaffinity sched_setattr
    sched_setparam sched_setscheduler sched_yield seccomp select semctl semget semop semtimedop
    semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto set_robust_list set_thread_area
    set_tid_address setfsgid setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer
    setpgid setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32
    setrlimit setsid setsockopt setuid setuid32 setxattr setxattrat shmat shmctl shmdt shmget shutdown
    sigaltstack signalfd signalfd4 sigprocmask sigreturn socketcall socketpair splice stat stat64 statfs
    statfs64 statmount statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time
    timer_create timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64
    timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times tkill truncate
    truncate64 ugetrlimit umask uname unlink unlinkat uretprobe utime utimensat utimensat_time64 utimes
    vfork vmsplice wait4 waitid waitpid write writev
""".split()

# clone(2)'s flags that make new namespaces (linux/sched.h): CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS,
# CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET
CLONE_NAMESPACE_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
                         | 0x40000000)
AF_ALG, AF_VSOCK = 38, 40  # address_families(7): the kernel's crypto API, and the hypervisor's sockets


def _allow(names, **extra) -> dict:
    return {"names": list(names), "action": "SCMP_ACT_ALLOW", **extra}


def _with_cap(capability: str, *names: str) -> dict:
    """Allowed only for a container whose bounding set holds ``capability``: the call needs it anyway."""
    return _allow(names, includes={"caps": [capability]})


def _argument(index: int, op: str, value: int, value_two: int | None = None) -> dict:
    item = {"index": index, "op": op, "value": value}
    if value_two is not None:
        item["valueTwo"] = value_two
    return item


RULES = [
    _allow(ALLOWED),
    # reading another process's memory: before Linux 4.8 ptrace could get around seccomp itself
    _allow(["process_vm_readv", "process_vm_writev", "ptrace"], includes={"minKernel": "4.8"}),
    # socket(2) of every address family but AF_ALG (38) and AF_VSOCK (40)
    _allow(["socket"], args=[_argument(0, "SCMP_CMP_LT", AF_ALG)]),
    _allow(["socket"], args=[_argument(0, "SCMP_CMP_EQ", AF_ALG + 1)]),
    _allow(["socket"], args=[_argument(0, "SCMP_CMP_GT", AF_VSOCK)]),
    # personality(2): Linux (0), its 32-bit variant (PER_LINUX32, 8), with UNAME26 (0x20000), and the
    # query 0xffffffff; not the domains that change how the kernel reads a program's memory
    *[_allow(["personality"], args=[_argument(0, "SCMP_CMP_EQ", domain)])
      for domain in (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)],
    # the calls one architecture has and the others do not
    _allow(["sync_file_range2", "swapcontext"], includes={"arches": ["ppc64le"]}),
    _allow(["arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint", "cacheflush",
            "set_tls"], includes={"arches": ["arm", "arm64"]}),
    _allow(["arch_prctl"], includes={"arches": ["amd64", "x32"]}),
    _allow(["modify_ldt"], includes={"arches": ["amd64", "x32", "x86"]}),
    _allow(["s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"],
           includes={"arches": ["s390", "s390x"]}),
    _allow(["riscv_flush_icache"], includes={"arches": ["riscv64"]}),
    # each capability's own calls, back for a container that holds it
    _with_cap("CAP_DAC_READ_SEARCH", "open_by_handle_at"),
    _with_cap("CAP_SYS_ADMIN", "bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount", "fsopen",
              "fspick", "lookup_dcookie", "lsm_get_self_attr", "lsm_list_modules", "lsm_set_self_attr",
              "mount", "mount_setattr", "move_mount", "open_tree", "perf_event_open", "quotactl",
              "quotactl_fd", "setdomainname", "sethostname", "setns", "syslog", "umount", "umount2",
              "unshare"),
    # without CAP_SYS_ADMIN: clone only without the namespace flags (fork and threads need it)...
    _allow(["clone"], args=[_argument(0, "SCMP_CMP_MASKED_EQ", CLONE_NAMESPACE_FLAGS, 0)],
           excludes={"caps": ["CAP_SYS_ADMIN"], "arches": ["s390", "s390x"]}),
    _allow(["clone"], args=[_argument(1, "SCMP_CMP_MASKED_EQ", CLONE_NAMESPACE_FLAGS, 0)],
           comment="s390 passes clone's flags second", includes={"arches": ["s390", "s390x"]},
           excludes={"caps": ["CAP_SYS_ADMIN"]}),
    # ... and clone3, whose flags are in memory a filter cannot read, says ENOSYS: the C library then
    # falls back to clone, which the rule above can check
    {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS,
     "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
    _with_cap("CAP_SYS_BOOT", "reboot"),
    _with_cap("CAP_SYS_CHROOT", "chroot"),
    _with_cap("CAP_SYS_MODULE", "delete_module", "init_module", "finit_module"),
    _with_cap("CAP_SYS_PACCT", "acct"),
    _with_cap("CAP_SYS_PTRACE", "kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv",
              "process_vm_writev", "ptrace"),
    _with_cap("CAP_SYS_RAWIO", "iopl", "ioperm"),
    _with_cap("CAP_SYS_TIME", "settimeofday", "stime", "clock_settime", "clock_settime64"),
    _with_cap("CAP_SYS_TTY_CONFIG", "vhangup"),
    _with_cap("CAP_SYS_NICE", "get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"),
    _with_cap("CAP_SYSLOG", "syslog"),
    _with_cap("CAP_BPF", "bpf"),
    _with_cap("CAP_PERFMON", "perf_event_open"),
]

# Each machine's own architecture and the older ones its kernel also runs (a 64-bit x86 kernel runs
# 32-bit and x32 programs: a filter for x86_64 alone would let them through by another system call table)
ARCH_MAP = [
    {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
    {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
    {"architecture": "SCMP_ARCH_S390X", "subArchitectures": ["SCMP_ARCH_S390"]},
    {"architecture": "SCMP_ARCH_PPC64LE", "subArchitectures": []},
    {"architecture": "SCMP_ARCH_RISCV64", "subArchitectures": []},
    {"architecture": "SCMP_ARCH_LOONGARCH64", "subArchitectures": []},
]

# The whole default profile, in Docker's profile-file format (plain comments, not #:, so that the API
# page does not print the list).
DEFAULT = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": errno.EPERM, "archMap": ARCH_MAP,
           "syscalls": RULES}

# uname(2)'s machine -> (libseccomp's name for it, the word Docker's profiles use in ``arches``)
_MACHINES = {"x86_64": ("SCMP_ARCH_X86_64", "amd64"), "aarch64": ("SCMP_ARCH_AARCH64", "arm64"),
             "armv7l": ("SCMP_ARCH_ARM", "arm"), "i686": ("SCMP_ARCH_X86", "x86"),
             "ppc64le": ("SCMP_ARCH_PPC64LE", "ppc64le"), "s390x": ("SCMP_ARCH_S390X", "s390x"),
             "riscv64": ("SCMP_ARCH_RISCV64", "riscv64"), "loongarch64": ("SCMP_ARCH_LOONGARCH64", "loong64")}


class ProfileError(ValueError):
    """A profile that cannot be turned into config.json; the message names the field."""


def resolve(profile: dict, bounding: list[str], machine: str | None = None) -> dict:
    """``profile`` (Docker's format, or config.json's own ``linux.seccomp``) for a container whose bounding
    set is ``bounding`` on this machine: what dockerd hands runc. The ``archMap`` entry of this machine
    becomes ``architectures``; a rule whose ``includes`` this container does not meet, or whose
    ``excludes`` it does, is left out; ``comment``, ``includes`` and ``excludes`` go."""
    if not isinstance(profile, dict):
        raise ProfileError("must be a JSON object with defaultAction and syscalls")
    if not profile.get("defaultAction"):
        raise ProfileError('has no defaultAction (for instance "SCMP_ACT_ERRNO")')
    if profile.get("architectures") and profile.get("archMap"):
        raise ProfileError("gives both architectures and archMap: use one of them")
    machine = machine or os.uname().machine
    native, word = _MACHINES.get(machine, (None, machine))
    result = {key: value for key, value in profile.items() if key not in ("archMap", "syscalls")}
    if profile.get("archMap"):
        if not isinstance(profile["archMap"], list):
            raise ProfileError("archMap must be a list")
        for entry in profile["archMap"]:
            if isinstance(entry, dict) and entry.get("architecture") == native:
                result["architectures"] = [native, *(entry.get("subArchitectures") or [])]
                break
    syscalls = profile.get("syscalls") or []
    if not isinstance(syscalls, list):
        raise ProfileError("syscalls must be a list")
    kept = []
    for index, rule in enumerate(syscalls):
        if not isinstance(rule, dict):
            raise ProfileError(f"syscalls[{index}] must be an object")
        rule = dict(rule)
        if rule.get("name"):  # the old format: one name per rule
            if rule.get("names"):
                raise ProfileError(f"syscalls[{index}] gives both name and names: use names")
            rule["names"] = [rule.pop("name")]
        includes, excludes = rule.pop("includes", None) or {}, rule.pop("excludes", None) or {}
        rule.pop("comment", None)
        if not isinstance(includes, dict) or not isinstance(excludes, dict):
            raise ProfileError(f"syscalls[{index}]: includes and excludes must be objects")
        if word in (excludes.get("arches") or []) or any(c in bounding for c in excludes.get("caps") or []):
            continue
        if excludes.get("minKernel") and _kernel_at_least(excludes["minKernel"], index):
            continue
        if includes.get("arches") and word not in includes["arches"]:
            continue
        if not all(c in bounding for c in includes.get("caps") or []):
            continue
        if includes.get("minKernel") and not _kernel_at_least(includes["minKernel"], index):
            continue
        kept.append(rule)
    result["syscalls"] = kept
    return result


def _kernel_at_least(wanted, index: int) -> bool:
    try:
        want = tuple(int(part) for part in str(wanted).split("."))
    except ValueError:
        raise ProfileError(f"syscalls[{index}]: minKernel {wanted!r} is not a version like 4.8") from None
    release = os.uname().release.split("-")[0].split(".")
    have = tuple(int(part) for part in release if part.isdigit())
    return have >= want


def load(path: str) -> dict:
    """A profile file as a dict (Docker's format or config.json's ``linux.seccomp``); a
    :class:`ProfileError` in a sentence if it cannot be read."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ProfileError("does not exist") from None
    except IsADirectoryError:
        raise ProfileError("is a directory, not a profile file") from None
    except OSError as error:
        raise ProfileError(f"cannot be read: {error.strerror}") from None
    except ValueError as error:
        raise ProfileError(f"is not valid JSON: {error}") from None
