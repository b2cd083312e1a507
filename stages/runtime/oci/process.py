"""The container's first processes: the setup chain, in the order the kernel needs.

Two processes do the work, because of two rules of unshare(2): a user namespace can be made only by a
single-threaded process, and a new PID namespace takes in only the *children* of the process that asks
for it. So:

- the **setup process** (forked from the runtime, or started as ``python -m stages.runtime.oci.process``
  when the caller has threads) joins the namespaces config.json names by path (setns(2)), makes the new
  ones (unshare(2)), waits while the runtime writes its uid_map and gid_map and moves it into the cgroup
  (from outside, as LXC's monitor does), then forks the init and stays behind only to pass on how it ended
  (like ``unshare --fork``);
- the **init** is the container's PID 1. It does everything inside — hostname, mounts, pivot_root, masked
  and read-only paths, sysctls, limits, user, capabilities, no_new_privs — tells the runtime "created",
  and then *waits*, like runc's exec.fifo: it blocks reading a FIFO in the state directory until
  ``start`` writes one byte into it, and only then executes the container's program.

:func:`init_chain` is that one readable function; compare contained.c's ``child()``.
Nothing may be imported after pivot_root (the host's Python files are out of reach): everything used
below is imported at the top of this module.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import resource
import signal
import socket
import stat
import struct
import sys
import termios
from collections.abc import Callable

from stages import kernel, steps
from stages.errors import CommandNotFoundError, CommandNotRunnableError, StagesError, error_reply
from stages.isolate import cgroups as host_cgroups
from stages.isolate import filesystem
from stages.rootfs import Root
from stages.runtime.oci import hooks as oci_hooks
from stages.runtime.oci import seccomp as oci_seccomp
from stages.runtime.oci.spec import Mount, Plan, Process, SpecError

PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
_MS_NODIRATIME = 2048
# statvfs(3) f_flag bits -> mount(2) flags, for remounts that must keep the flags a user namespace
# cannot clear ("locked" mount flags, mount_namespaces(7)).
_STATVFS_FLAGS = [(1, kernel.MS_RDONLY), (2, kernel.MS_NOSUID), (4, kernel.MS_NODEV), (8, kernel.MS_NOEXEC),
                  (1024, kernel.MS_NOATIME), (2048, _MS_NODIRATIME), (4096, kernel.MS_RELATIME)]
_MESSAGE_SIZE = 1 << 20
_RESET_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTOU, signal.SIGTTIN,
                  signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1,
                  signal.SIGUSR2)
_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)


# -- talking to the runtime: one JSON object per SOCK_SEQPACKET message --------------------------------
def send(sock: socket.socket, message: dict) -> None:
    sock.send(json.dumps(message, default=str).encode())


def receive(sock: socket.socket, fds: list[int] | None = None) -> dict | None:
    """The next message (None: the other end closed). Descriptors sent with it (SCM_RIGHTS, unix(7)) are
    appended to ``fds``; without ``fds`` they are closed."""
    data, received, _flags, _address = socket.recv_fds(sock, _MESSAGE_SIZE, 4)
    if fds is not None:
        fds.extend(received)
    else:
        for fd in received:
            os.close(fd)
    return json.loads(data) if data else None


def attach_terminal(sock: socket.socket, process: Process) -> None:
    """process.terminal: a new pseudo-terminal of the container's devpts becomes our stdin, stdout,
    stderr and controlling terminal; its master goes to the runtime (which passes it on to the console
    socket, as runc does), and ours is closed: whoever holds the master is the terminal's other end.

    /dev/ptmx is the link to pts/ptmx, so the pair comes from the container's own devpts instance
    (devpts "newinstance", pts(4)). A controlling terminal needs a session of its own: setsid(2), then
    the TIOCSCTTY ioctl (ioctl_tty(2)).
    """
    try:
        with steps.record("# openpty(3): /dev/ptmx -> a new pair in the container's /dev/pts", where="inside",
                          what="process.terminal: the program's terminal"):
            master, slave = os.openpty()
    except OSError as error:
        raise StagesError(f"process.terminal: the container has no pseudo-terminals to give: /dev/ptmx: "
                          f"{error.strerror}",
                          "mount a tmpfs at /dev and a devpts at /dev/pts (newinstance, ptmxmode=0666), as "
                          "runc spec writes them") from None
    try:
        name = os.ttyname(slave)
        if process.console_size:
            rows, columns = process.console_size
            with steps.record(f"stty rows {rows} cols {columns}", where="inside",
                              what="process.consoleSize (TIOCSWINSZ)"):
                fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        with steps.record(f"setsid --ctty # on {name}", where="inside",
                          what="a session of its own, with the terminal as its controlling terminal"):
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for target in (0, 1, 2):
                os.dup2(slave, target)
        socket.send_fds(sock, [json.dumps({"console": name}).encode()], [master])
    finally:
        os.close(master)
        if slave > 2:
            os.close(slave)


# -- the setup process -----------------------------------------------------------------------------------
def _take_stdio_ignore_keyboard(stdio: list[int | None] | None) -> None:
    """Make ``stdio`` this process's 0, 1 and 2, and ignore the keyboard's signals: Ctrl-C reaches the
    container's process itself (same process group); a helper only passes its end on."""
    for number in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP):
        signal.signal(number, signal.SIG_IGN)
    for target, fd in enumerate(stdio or []):
        if fd is not None and fd != target:
            os.dup2(fd, target)


def setup_process(sock: socket.socket, plan: Plan, fifo: int, stdio: list[int | None] | None = None,
                  detach: bool = False):
    """The setup process's life (never returns): namespaces, then fork the init and pass on its end.

    ``fifo`` is the exec FIFO, opened by the runtime (the state directory may be out of reach for the
    root of a new user namespace); ``stdio`` the descriptors to make 0, 1 and 2. With ``detach`` it
    does not stay: it ends as soon as the init has reported "created", so that the init is reparented
    to the runtime's caller when that is a subreaper (conmon, containerd-shim: PR_SET_CHILD_SUBREAPER in
    prctl(2)), whose own waitpid() then collects the container's exit code.
    """
    status = 1
    try:
        _take_stdio_ignore_keyboard(stdio)
        record = steps.StepRecord()
        with record.active():
            # setns(2) before unshare(2), and a joined user namespace first (as runc's nsexec): the others
            # given by path are then checked against it, whose root we become (setns(2): the target's
            # owner must grant CAP_SYS_ADMIN), and the new ones made after it are owned by it. setns into
            # a user namespace needs a single-threaded process: this one is (forked, or started anew).
            for word, path in sorted(plan.join_namespaces, key=lambda item: PATH_JOIN_ORDER.index(item[0])):
                kernel.setns(path, kernel.NAMESPACES[word][0], what=f"join the {word} namespace at {path}")
                if word == "user":
                    check_joined_maps(plan)
            # The cgroup namespace is made after the runtime has moved us into the container's cgroup, so
            # that its root is that cgroup (cgroup_namespaces(7)).
            flags = kernel.namespace_flags([w for w in plan.new_namespaces if w != "cgroup"])
            if flags:
                kernel.unshare(flags, what="the container's new namespaces")
        send(sock, {"unshared": os.getpid(), "steps": record.to_dicts()})
        if receive(sock) is None:  # the runtime died or gave up
            os._exit(1)
        record = steps.StepRecord()
        with record.active():
            if plan.in_user_namespace:
                become_root()
            if any(item.type == "cgroup" for item in plan.mounts):
                # read before a cgroup namespace makes our cgroups look like roots; the init inherits it
                CONTAINER_CGROUPS[:] = container_cgroups()
            if "cgroup" in plan.new_namespaces:
                kernel.unshare(kernel.CLONE_NEWCGROUP,
                               what="a cgroup namespace rooted at the container's cgroup")
            # detached: the init tells us on this pipe when it no longer needs us (end of file: it died)
            released, release = os.pipe2(os.O_CLOEXEC) if detach else (-1, None)
            with steps.record("# fork: the child is PID 1 of the new PID namespace", where="inside",
                              what="unshare(2) moves only our children into a new PID namespace"):
                pid = os.fork()
            if pid == 0:
                if detach:
                    os.close(released)
                init_process(sock, plan, fifo, release)  # never returns
        os.close(fifo)  # only the init may hold it: an open FIFO is how `start` knows someone waits
        send(sock, {"pid": pid, "steps": record.to_dicts()})
        sock.close()
        if detach:
            os.close(release)
            os._exit(0 if os.read(released, 1) == b"1" else 1)
        status = _stay_as_parent(pid)
    except BaseException as error:  # noqa: B036 - reported to the runtime, never raised into a forked caller
        _report_and_exit(sock, error)
    _end_like(status)


def check_joined_maps(plan: Plan) -> None:
    """A joined user namespace has its maps; those config.json gives must be the same (or left out)."""
    for name, wanted in (("uid_map", plan.uid_mappings), ("gid_map", plan.gid_mappings)):
        if not wanted:
            continue
        with open(f"/proc/self/{name}") as handle:
            have = sorted(tuple(map(int, line.split())) for line in handle if line.strip())
        if have != sorted(tuple(item) for item in wanted):
            field_name = "linux.uidMappings" if name == "uid_map" else "linux.gidMappings"
            shown = ", ".join(" ".join(map(str, item)) for item in have)
            raise SpecError(f"config.json: {field_name}: the joined user namespace maps {shown}, not what "
                            "config.json says", f"leave {field_name} out, or give the joined namespace's")


def become_root() -> None:
    """Switch to root of the new user namespace, now that the runtime has written our uid_map."""
    # Our kernel IDs (the host's root) are not in the map, so we show as nobody; the IDs we switch to are
    # mapped, and we may switch because we hold CAP_SETUID and CAP_SETGID in the new user namespace
    # (user_namespaces(7)).
    with steps.record("setpriv --regid 0 --reuid 0", where="inside",
                      what="become the mapped root: the IDs we had are not in the map"):
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    # Changing IDs made us non-dumpable, which gives our /proc files to a root this namespace cannot see.
    kernel.prctl(PR_SET_DUMPABLE, 1)


def _stay_as_parent(pid: int) -> int:
    """Pass the catchable signals on to ``pid`` (our child, the container's process) until it ends, and
    return its wait status, as ``unshare --fork`` does."""
    for number in _FORWARDED:
        signal.signal(number, lambda signum, _frame: _forward(pid, signum))
    return _wait(pid)


def _report_and_exit(sock: socket.socket, error: BaseException, steps_done: list | None = None) -> None:
    """Tell the runtime what went wrong (it raises the same kind of error), and end: a helper forked from
    the runtime must never return into the runtime's own code."""
    try:
        send(sock, {"error": error_reply(error), "steps": steps_done or []})
    except OSError:
        pass
    os._exit(1)


def _forward(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def _wait(pid: int) -> int:
    while True:
        try:
            done, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return 0
        if done == pid:
            return status


def _end_like(status: int) -> None:
    """End the way the init ended: with its exit code, or killed by the same signal (as unshare --fork)."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if number not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [number])
        os.kill(os.getpid(), number)
        os._exit(128 + number)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


# -- the init --------------------------------------------------------------------------------------------
def init_process(sock: socket.socket, plan: Plan, fifo: int, release: int | None = None) -> None:
    """The init's life (never returns): set up, report, wait for ``start``, exec.

    ``release`` (detached mode): the pipe the setup process waits on; one byte lets it end.
    """
    record = steps.StepRecord()
    try:
        kernel.set_parent_death_signal(signal.SIGKILL)  # no init outlives its setup process while setting up
        with record.active():
            hooks = oci_hooks.InitHooks.for_plan(sock, plan.hooks, record)  # None: no hook, no pause
            executable = init_chain(plan, hooks)
            if plan.process.terminal:
                attach_terminal(sock, plan.process)
            seccomp_filter = _seccomp_before_exec(plan.seccomp, plan.process)
            if release is not None:
                # Detached, the init outlives its setup process by design: clear the death signal
                # *before* the setup process may end. If it is killed in between, the init lives on
                # unreported, and the runtime's undo removes the cgroup, which kills it.
                with steps.record("# prctl(PR_SET_PDEATHSIG, 0)", where="inside",
                                  what="detached: the init is reparented to the caller's subreaper"):
                    kernel.set_parent_death_signal(0)
                if not plan.process.terminal:  # with a terminal, attach_terminal made the session
                    # As runc's init (nsexec.c): a session and process group of its own, so that a
                    # supervisor's kill(-pgid) (conmon's --timeout) reaches the container, not the
                    # supervisor that shared its group (setsid(2), credentials(7) "Sessions").
                    with steps.record("setsid", where="inside",
                                      what="detached: the container's own session and process group"):
                        os.setsid()
        send(sock, {"created": True, "steps": record.to_dicts()})
        sock.close()
        if release is not None:
            os.write(release, b"1")
            os.close(release)
    except BaseException as error:  # noqa: B036 - reported to the runtime
        _report_and_exit(sock, error, record.to_dicts())
    try:
        # Block until `start` writes its byte (the FIFO is open read-write, so there is always a writer
        # and the read waits instead of seeing end-of-file).
        if os.read(fifo, 1) != b"0":
            os._exit(1)
        os.close(fifo)
        if hooks is not None:
            hooks.start_container()  # on failure the init reports to `start` and ends here
        close_inherited(plan.preserve_fds)
        for number in _RESET_SIGNALS:
            signal.signal(number, signal.SIG_DFL)  # ignored signals would stay ignored across execve(2)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if seccomp_filter is not None:
            seccomp_filter.load()  # the last system call before execve(2), which the filter must allow
        os.execve(executable, plan.process.args, plan.process.env)
    except OSError as error:
        os.write(2, f"stages: cannot run {plan.process.args[0]}: {error.strerror}\n".encode())
    os._exit(127)


def init_chain(plan: Plan, before_pivot_root: Callable[[], None] | None = None) -> str:
    """Everything the init does before it waits for ``start``, in order. Returns the program to exec.

    ``before_pivot_root`` is called with the mounts made, just before pivot_root: the pause for the
    hooks (:class:`stages.runtime.oci.hooks.InitHooks`).
    """
    process = plan.process
    # 1. names (sethostname(2) in our own UTS namespace)
    if plan.hostname:
        kernel.sethostname(plan.hostname, what="the container's own hostname")
    if plan.domainname:
        with steps.record(f"domainname {plan.domainname}", where="inside"):
            with open("/proc/sys/kernel/domainname", "w") as handle:  # our UTS namespace's value
                handle.write(plan.domainname)
    # 2. the root filesystem, while the host's files are still reachable
    # Recursively slave or private first, whatever rootfsPropagation says: then no mount event made in
    # here crosses to the host's namespace (mount_namespaces(7)); shared or unbindable is set on the new
    # / only after pivot_root(2), which refuses a shared root (EINVAL), and a shared mount made from a
    # slave one propagates to a peer group of its own, inside this namespace, never to its master.
    first = kernel.MS_REC | (kernel.MS_SLAVE if plan.rootfs_propagation & (kernel.MS_SLAVE | kernel.MS_SHARED)
                             else kernel.MS_PRIVATE)
    kernel.mount(None, "/", None, first,
                 what="no mount event crosses from the container to the host (mount_namespaces(7))")
    filesystem.bind_on_itself(plan.rootfs)
    # The rootfs is hostile input: every path written below it (mount targets, the files and directories
    # made for them, device nodes and links) is looked up *inside* it, through a descriptor opened now,
    # on the bind mount just made (stages.rootfs.Root: openat2's RESOLVE_IN_ROOT, mounts on
    # /proc/self/fd/N as runc does); a symbolic link that leads out (/dev -> /tmp/victim) is refused.
    with Root(plan.rootfs) as root:
        dev_is_ours = False
        for item in plan.mounts:
            mount_one(item, plan.in_user_namespace, root)
            dev_is_ours |= item.destination.rstrip("/") == "/dev" and item.type == "tmpfs"
        if dev_is_ours:  # the default devices the spec promises (config-linux.md, "Default Devices")
            filesystem.make_devices("/dev", plan.in_user_namespace, root=root)
            filesystem.make_device_links("/dev", root=root)
        for node in plan.device_nodes:
            make_device_node(node, plan.in_user_namespace, root)
        if not root.is_directory(process.cwd):
            # runc and Docker make a missing working directory (-w /does/not/exist), before the rootfs
            # may turn read-only; inside the rootfs, as every path here
            root.make_directories(process.cwd, 0o755)
    if before_pivot_root is not None:
        # prestart, createRuntime (the runtime) and createContainer hooks (here) run now: the container's
        # environment exists and the host's paths are still in reach (config.md, "POSIX-platform Hooks")
        before_pivot_root()
    filesystem.pivot_root(plan.rootfs, bind=False)
    if plan.rootfs_propagation != first:
        kernel.mount(None, "/", None, plan.rootfs_propagation,
                     what="linux.rootfsPropagation, on the new root")
    # 3. what /proc and /sys may show and change. From here on the rootfs is / and the old root is
    # detached: an absolute link starts at the rootfs and '..' stops there, so sysctl, maskedPaths and
    # readonlyPaths cannot reach a host path whatever the image's links say (path_resolution(7)).
    for key, value in plan.sysctl.items():
        path = "/proc/sys/" + key.replace(".", "/")
        with steps.record(f"sysctl -w {key}={value}", where="inside"):
            with open(path, "w") as handle:
                handle.write(value)
    for path in plan.masked_paths:
        filesystem.mask(path)
    for path in plan.readonly_paths:
        filesystem.make_readonly(path)
    if plan.readonly:
        kernel.mount(None, "/", None, kernel.MS_BIND | kernel.MS_REMOUNT | kernel.MS_RDONLY | _locked("/"),
                     what="root.readonly: the rootfs cannot be changed from inside")
    # 4. the process: limits, directory, program, user, capabilities
    for number, soft, hard, name in process.rlimits:
        word = _RLIMIT_WORDS.get(name, name)
        with steps.record(f"prlimit --{word}={soft}:{hard} --pid $$", where="inside"):
            resource.setrlimit(number, (soft, hard))
    if process.oom_score_adj is not None:
        with steps.record(f"echo {process.oom_score_adj} > /proc/self/oom_score_adj", where="inside"):
            with open("/proc/self/oom_score_adj", "w") as handle:
                handle.write(str(process.oom_score_adj))
    if process.umask is not None:
        os.umask(process.umask)
    with steps.record(f"cd {process.cwd}", where="inside"):
        os.chdir(process.cwd)
    set_home(process)
    executable = find_program(process.args[0], process.env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
    if plan.seccomp is not None and not process.no_new_privileges:
        # Without no_new_privs, loading a filter takes CAP_SYS_ADMIN (seccomp(2)): so now, before
        # become_user drops it, as runc does; what the init still does runs under the filter.
        oci_seccomp.install(plan.seccomp)
    become_user(process)
    if process.no_new_privileges:
        kernel.set_no_new_privs(what="noNewPrivileges: execve can never grant more privileges")
    kernel.set_parent_death_signal(signal.SIGKILL)  # a change of IDs cleared it (prctl(2))
    return executable


def _seccomp_before_exec(compiled: dict | None, process: Process) -> oci_seccomp.Prepared | None:
    """With no_new_privs, the filter is loaded as the very last thing before execve(2) (the fewer of our
    own system calls it sees, the fewer it must allow); without, it was loaded already (init_chain)."""
    if compiled is None or not process.no_new_privileges:
        return None
    return oci_seccomp.prepare(compiled)


_RLIMIT_WORDS = {"RLIMIT_NOFILE": "nofile", "RLIMIT_NPROC": "nproc", "RLIMIT_CORE": "core",
                 "RLIMIT_STACK": "stack", "RLIMIT_AS": "as", "RLIMIT_CPU": "cpu", "RLIMIT_FSIZE": "fsize",
                 "RLIMIT_DATA": "data", "RLIMIT_MEMLOCK": "memlock"}


def _locked(path: str, root: Root | None = None) -> int:
    """The flags ``path``'s mount has now that a remount must keep (a user namespace may not clear them).
    ``root``: ``path`` is inside that rootfs (before pivot_root), looked up there."""
    have = (os.statvfs(path) if root is None else root.statvfs(path)).f_flag
    return sum(flag for bit, flag in _STATVFS_FLAGS if have & bit and flag != kernel.MS_RDONLY)


#: (mount point, file system type, the container's own cgroup directory in it) of each cgroup hierarchy
#: the host has mounted, found by :func:`container_cgroups` in the setup process.
CONTAINER_CGROUPS: list[tuple[str, str, str]] = []


def container_cgroups() -> list[tuple[str, str, str]]:
    """Each mounted cgroup hierarchy (v1 and v2), with our own cgroup's directory in it: where the runtime
    has put us, that is the container's cgroup (/proc/self/cgroup, /proc/self/mountinfo; cgroups(7))."""
    own = {}
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            _number, names, path = line.rstrip("\n").split(":", 2)
            own[names] = path  # "" names the v2 hierarchy
    found = []
    for mountpoint, fstype, mount_root, options in host_cgroups._cgroup_mounts():
        names = "" if fstype == "cgroup2" else next(
            (key for key in own if key and set(key.split(",")) <= options), None)
        path = own.get(names) if names is not None else None
        if path is None:
            continue
        if mount_root != "/":  # the mount shows only part of the tree (mountinfo's root field, proc(5))
            if path != mount_root and not path.startswith(mount_root + "/"):
                continue
            path = path[len(mount_root):]
        found.append((mountpoint, fstype, os.path.normpath(mountpoint + "/" + path.lstrip("/"))))
    return found


def mount_cgroup(item: Mount, in_user_namespace: bool, root: Root) -> None:
    """A ``cgroup`` mount (``/sys/fs/cgroup``): the container sees its own cgroups there, read-only.

    cgroup v2 alone: a fresh cgroup2 mount, whose root is the container's cgroup when the container has
    a cgroup namespace (cgroup_namespaces(7)). cgroup v1 or hybrid, as runc does: a tmpfs, and in it one
    directory per hierarchy (``memory``, ``cpu`` ..., ``unified``) with the container's own cgroup
    directory of that hierarchy bind-mounted on it, and the host's links (``cpuacct -> cpu,cpuacct``).
    Every path is inside ``root``, looked up there.
    """
    target = root.make_directories(item.destination)
    flags = item.flags & ~kernel.MS_RDONLY
    readonly = item.flags & kernel.MS_RDONLY
    hierarchies = [entry for entry in CONTAINER_CGROUPS if os.path.dirname(entry[0]) == "/sys/fs/cgroup"]
    unified = next((entry for entry in CONTAINER_CGROUPS if entry[0] == "/sys/fs/cgroup"), None)
    if unified is not None:
        try:
            root.mount("cgroup2", target, "cgroup2", item.flags, what="the container's cgroups (cgroup v2)")
        except PermissionError:
            if not in_user_namespace:
                raise
            # a user namespace may mount cgroup2 only from a cgroup namespace it owns: bind ours instead
            root.mount(unified[2], target, None, kernel.MS_BIND | kernel.MS_REC,
                       what="the container's own cgroup from the host, since it has no cgroup namespace")
            root.mount(None, target, None,
                       kernel.MS_BIND | kernel.MS_REMOUNT | item.flags | _locked(target, root),
                       what="with the mount's options")
        return
    root.mount("tmpfs", target, "tmpfs", flags, "mode=755",
               what="cgroup v1: a directory per hierarchy, each the container's own cgroup")
    for mountpoint, _fstype, directory in hierarchies:
        inside = root.make_directories(target + "/" + os.path.basename(mountpoint), 0o755)
        root.mount(directory, inside, None, kernel.MS_BIND | kernel.MS_REC,
                   what=f"the container's {os.path.basename(mountpoint)} cgroup")
        root.mount(None, inside, None,
                   kernel.MS_BIND | kernel.MS_REMOUNT | kernel.MS_RDONLY | flags | _locked(inside, root),
                   what="read-only: a container reads its limits, never changes them")
    with os.scandir("/sys/fs/cgroup") as entries:
        for entry in entries:
            link = target + "/" + entry.name
            if entry.is_symlink() and root.lstat(link) is None:
                root.symlink(os.readlink(entry.path), link)
    if readonly:
        root.mount(None, target, None, kernel.MS_REMOUNT | item.flags, "mode=755",
                   what="the directory of hierarchies read-only too")


def mount_one(item: Mount, in_user_namespace: bool, root: Root) -> None:
    """One entry of config.json's ``mounts``: its destination looked up inside ``root`` (the rootfs,
    before pivot_root), never by joining strings; a file or directory to mount on is made there.
    (``item.target`` is only where it would be on the host, for the record.)"""
    if item.type == "cgroup" and not item.bind:
        mount_cgroup(item, in_user_namespace, root)
        if item.propagation:
            root.mount(None, item.destination, None, item.propagation)
        return
    target = root.resolve(item.destination)
    here = root.lstat(target)
    if item.bind and not os.path.isdir(item.source):  # the source is the host's: the host's path
        if here is None:
            root.make_file(target, 0o644)
    elif here is None or not stat.S_ISDIR(here.st_mode):
        root.make_directories(target)
    if item.bind:
        root.mount(item.source, target, None, item.flags & (kernel.MS_BIND | kernel.MS_REC),
                   what=f"{item.source} from the host at {item.destination}")
        # A bind mount ignores every other flag; they take a remount (mount(2), "Creating a bind mount").
        extra = item.flags & ~(kernel.MS_BIND | kernel.MS_REC)
        if extra:
            root.mount(None, target, None, kernel.MS_BIND | kernel.MS_REMOUNT | extra | _locked(target, root),
                       what="apply the options to the bind mount")
    else:
        # tmpcopyup: hold the directory the tmpfs will cover, to copy from it once it is covered
        lower = root.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if item.copy_up else -1
        try:
            try:
                root.mount(item.source, target, item.type, item.flags, item.data, what=f"{item.destination}")
            except PermissionError:
                if item.type != "sysfs" or not in_user_namespace:
                    raise
                # sysfs needs a network namespace owned by our user namespace; borrow the host's, read-only
                filesystem.mount_sys(target, root=root)
            if lower >= 0:
                upper = root.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    with steps.record(f"cp -a {item.destination}/. <the new tmpfs>", where="inside",
                                      what="tmpcopyup: the tmpfs starts with the image's files there"):
                        _copy_tree(lower, upper)
                finally:
                    os.close(upper)
        finally:
            if lower >= 0:
                os.close(lower)
    if item.propagation:
        root.mount(None, target, None, item.propagation)


def _copy_tree(source: int, target: int) -> None:
    """Copy the directory open at ``source`` into the one at ``target`` (``cp -a``: modes, owners, times,
    links as links). Every call is relative to a descriptor (openat(2) and friends, O_NOFOLLOW), so a
    link in the image is copied, never followed out of it."""
    for entry in os.scandir(source):
        name = entry.name
        info = os.stat(name, dir_fd=source, follow_symlinks=False)
        kind = stat.S_IFMT(info.st_mode)
        if kind == stat.S_IFDIR:
            os.mkdir(name, 0o700, dir_fd=target)
            directory = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            below = os.open(name, directory, dir_fd=source)
            try:
                into = os.open(name, directory, dir_fd=target)
                try:
                    _copy_tree(below, into)
                finally:
                    os.close(into)
            finally:
                os.close(below)
        elif kind == stat.S_IFLNK:
            os.symlink(os.readlink(name, dir_fd=source), name, dir_fd=target)
        elif kind == stat.S_IFREG:
            reading = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=source)
            try:
                writing = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  0o600, dir_fd=target)
                try:
                    while os.sendfile(writing, reading, None, 1 << 20):
                        pass
                finally:
                    os.close(writing)
            finally:
                os.close(reading)
        elif kind in (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK):
            os.mknod(name, kind | 0o600, info.st_rdev, dir_fd=target)
        else:
            continue  # a socket: whoever listened on it is not in the copy
        os.chown(name, info.st_uid, info.st_gid, dir_fd=target, follow_symlinks=False)
        if kind != stat.S_IFLNK:
            os.chmod(name, stat.S_IMODE(info.st_mode), dir_fd=target)
        os.utime(name, ns=(info.st_atime_ns, info.st_mtime_ns), dir_fd=target, follow_symlinks=False)


def make_device_node(node: dict, in_user_namespace: bool, root: Root) -> None:
    """One entry of linux.devices: mknod(2) with its mode and owner; a FIFO is mkfifo(3). The node is
    made inside ``root`` (mknodat(2) in a directory opened there), never through a link.

    Inside a user namespace mknod of a device is refused (user_namespaces(7)), so the host's node of the
    same path is bind-mounted, as for the default devices (and as runc does); it must be that device.
    """
    kind, path = node["type"], node["path"]
    number = os.makedev(node["major"], node["minor"])
    kinds = {"c": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}
    target = root.resolve(path)
    parent = target.rpartition("/")[0] or "/"
    if not root.is_directory(parent):
        root.make_directories(parent)
    here = root.lstat(target)
    if here is not None:
        if stat.S_IFMT(here.st_mode) == kinds[kind] and (kind == "p" or here.st_rdev == number):
            return  # made already (a default device, or the rootfs has it)
        root.unlink(target, what="not the device linux.devices asks for")
    if in_user_namespace and kind != "p":
        try:
            host = os.stat(path)
        except FileNotFoundError:
            host = None
        if host is None or stat.S_IFMT(host.st_mode) != kinds[kind] or host.st_rdev != number:
            raise StagesError(f"linux.devices: {path} cannot be made inside a user namespace, and the host "
                              f"has no such device at {path} to lend",
                              "give the path the device has on the host, or run without a user namespace")
        root.make_file(target, 0o600, what="a file to mount the device on")
        root.mount(path, target, None, kernel.MS_BIND,
                   what=f"the host's {path}: mknod is refused inside a user namespace")
        return
    root.mknod(target, kinds[kind] | node["mode"], number, node["uid"], node["gid"],
               what=f"linux.devices: {path}")


def home_directory(uid: int, passwd: str = "/etc/passwd") -> str:
    """The home directory of ``uid`` in the container's passwd(5) ("/" when it has none, as runc's
    user lookup says). Read after pivot_root(2) or setns(2): / is the container's, so is the file."""
    try:
        with open(passwd, errors="replace") as handle:
            for line in handle:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 6 and fields[2] == str(uid) and fields[5]:
                    return fields[5]
    except OSError:
        pass
    return "/"


def set_home(process: Process) -> None:
    """``HOME`` from the container's /etc/passwd when process.env has none, as runc does (so a Dockerfile's
    ``RUN mkdir -p $HOME/.config`` makes /root/.config, not /.config)."""
    if "HOME" not in process.env:
        home = home_directory(process.uid)
        with steps.record(f"export HOME={home}", where="inside",
                          what=f"no HOME in process.env: user {process.uid}'s home in /etc/passwd"):
            process.env["HOME"] = home


def find_program(name: str, path: str) -> str:
    """The file ``execvp`` would run for ``name``, looked up now so that a typo fails at ``create``."""
    candidates = [name] if "/" in name else [os.path.join(d or ".", name) for d in path.split(":")]
    denied = None
    for candidate in candidates:
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = denied or candidate
    if denied is not None:
        # execve(2) would fail with EACCES: runc says "permission denied", and podman and Docker exit 126
        raise CommandNotRunnableError(f"exec {denied}: permission denied: the file is not executable",
                                      f"make it executable (chmod +x {denied}), or run another program")
    # runc's words, which podman reads to tell "not found" (127) from other failures (execvp(3))
    where = "no such file or directory" if "/" in name else f"executable file not found in $PATH ({path})"
    raise CommandNotFoundError(f"{name} was not found in the container's rootfs: {where}",
                               "check process.args[0] and process.env's PATH in config.json")


def become_user(process) -> None:
    """The bounding set, then the user and groups, then the other capability sets (capabilities(7)).

    The bounding set is dropped first: it needs CAP_SETPCAP, which we still hold. Changing from root to
    another user clears the permitted set unless PR_SET_KEEPCAPS is on (prctl(2)), so it is on meanwhile;
    then capset(2) keeps exactly the configured sets, and each ambient one is raised so that a non-root
    program keeps it across execve(2). (A root program gets its bounding and inheritable sets at execve
    whatever capset said: that is how root works, capabilities(7), "Capabilities and execution of
    programs by root".)
    """
    caps = process.capabilities
    if caps is not None:
        known = kernel.CAPABILITIES[: kernel.last_capability() + 1]
        drop = [name for name in known if name not in caps["bounding"] and kernel.in_bounding_set(name)]
        if drop:
            kernel.drop_bounding(drop, what="process.capabilities.bounding: no program can ever gain these")
        kernel.prctl(PR_SET_KEEPCAPS, 1)
    groups = ",".join(map(str, process.additional_gids)) or "none"
    with steps.record(f"setpriv --regid {process.gid} --groups {groups} --reuid {process.uid}",
                      where="inside", what="process.user: the IDs the program runs as"):
        os.setgroups(process.additional_gids)
        os.setresgid(process.gid, process.gid, process.gid)
        os.setresuid(process.uid, process.uid, process.uid)
    if caps is not None:
        kernel.prctl(PR_SET_KEEPCAPS, 0)
        kernel.capset(kernel.capability_mask(caps["effective"]), kernel.capability_mask(caps["permitted"]),
                      kernel.capability_mask(caps["inheritable"]),
                      what="process.capabilities: effective, permitted, inheritable")
        # An ambient capability can be raised only if it is permitted and inheritable (capabilities(7));
        # runc warns about the others and goes on (runc spec lists ambient ones without inheritable), so
        # do we: each one left out is a step that says so.
        raising = [name for name in caps["ambient"]
                   if name in caps["permitted"] and name in caps["inheritable"]]
        for name in caps["ambient"]:
            if name not in raising:
                with steps.record(f"# ambient {name} not raised", where="inside",
                                  what="it is not in both the permitted and the inheritable set"):
                    pass
        if raising:
            with steps.record("setpriv --ambient-caps " + ",".join(f"+{n}" for n in raising),
                              where="inside", what="ambient: kept across execve by a non-root program"):
                for name in raising:
                    kernel.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, kernel.capability_number(name))


# -- exec: one more process in a running container ------------------------------------------------------
#: The order to join a container's namespaces in (as nsenter(1)): the user namespace last, so that we
#: join the others while we still hold the host's capabilities over them.
JOIN_ORDER = ("cgroup", "ipc", "uts", "net", "pid", "time", "mount", "user")
#: The order to join the namespaces config.json names by path in: a user namespace first (runc's
#: nsexec, and the runtime spec's tests), so that the others, another container's, owned by it, are
#: joined as its root; time before pid and mount (it applies to the children, as pid does).
PATH_JOIN_ORDER = ("user", "cgroup", "ipc", "uts", "net", "time", "pid", "mount")


def exec_process(sock: socket.socket, target: int, cgroup_files: list[str], process: Process,
                 stdio: list[int | None] | None = None, detach: bool = False,
                 seccomp: dict | None = None, preserve_fds: int = 0) -> None:
    """The exec helper's life (never returns): join the cgroup and the namespaces of process ``target``
    (the container's init), fork the new process into its PID namespace, and pass on how it ended.

    With ``detach`` the helper ends as soon as the new process has exec'd, so that it is reparented to
    the caller's subreaper (``runc exec --detach`` under conmon). ``seccomp``: the container's compiled
    filter, which binds every process in it (runc applies it on exec too). ``preserve_fds``: the
    process inherits our descriptors 3 .. 3+N-1 (runc exec --preserve-fds)."""
    status = 1
    try:
        _take_stdio_ignore_keyboard(stdio)
        record = steps.StepRecord()
        with record.active():
            for path in cgroup_files:  # before setns: after it the host's /sys/fs/cgroup is out of sight
                with steps.record(f"echo {os.getpid()} > {path}", what="join the container's cgroup"):
                    with open(path, "w") as handle:
                        handle.write(str(os.getpid()))
            for word in JOIN_ORDER:
                ns_file = kernel.NAMESPACES[word][1]
                theirs = f"/proc/{target}/ns/{ns_file}"
                ours = f"/proc/self/ns/{ns_file}"
                if not os.path.exists(theirs) or os.stat(theirs).st_ino == os.stat(ours).st_ino:
                    continue
                # setns(2) into a mount namespace also moves our root and working directory to its root:
                # the container's rootfs, as its init sees it after pivot_root.
                kernel.setns(theirs, kernel.NAMESPACES[word][0],
                             what=f"join the container's {word} namespace")
            # detached: the child holds this pipe's end until execve(2) closes it (close-on-exec)
            execed, holding = os.pipe2(os.O_CLOEXEC) if detach else (-1, -1)
            with steps.record("# fork: the child lives in the container's PID namespace", where="inside"):
                pid = os.fork()
            if pid == 0:
                _exec_child(sock, process, detach, seccomp, preserve_fds)  # never returns
        send(sock, {"pid": pid, "steps": record.to_dicts()})
        sock.close()
        if detach:
            os.close(holding)
            os.read(execed, 1)  # end of file: the child exec'd, or failed and ended
            os._exit(0)
        status = _stay_as_parent(pid)
    except BaseException as error:  # noqa: B036 - reported to the runtime
        _report_and_exit(sock, error)
    _end_like(status)


def close_inherited(keep: int = 0) -> None:
    """Mark every descriptor above stdio (and the ``keep`` after it) close-on-exec, so that the program
    inherits nothing its runtime's caller left open: conmon's pipes, a host file, or a host directory,
    which would be a way out of the rootfs (runc's CVE-2024-21626). runc does the same before execve(2).

    The ``keep`` after stdio (runc's --preserve-fds) are made inheritable: a caller in Python opens its
    descriptors close-on-exec (PEP 446), and passing them on is the point."""
    for number in range(3, 3 + keep):
        os.set_inheritable(number, True)
    try:
        numbers = [int(name) for name in os.listdir("/proc/self/fd")]  # the container's /proc, if mounted
    except OSError:
        numbers = list(range(3, min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 65536)))
    for number in numbers:
        if number >= 3 + keep:
            try:
                os.set_inheritable(number, False)
            except OSError:  # the directory listdir had open, closed by now
                pass


def _exec_child(sock: socket.socket, process: Process, detach: bool = False,
                seccomp: dict | None = None, preserve_fds: int = 0) -> None:
    record = steps.StepRecord()
    try:
        kernel.set_parent_death_signal(signal.SIGKILL)
        with record.active():
            for number, soft, hard, name in process.rlimits:
                with steps.record(f"prlimit --{_RLIMIT_WORDS.get(name, name)}={soft}:{hard}", where="inside"):
                    resource.setrlimit(number, (soft, hard))
            if process.umask is not None:
                os.umask(process.umask)
            with steps.record(f"cd {process.cwd}", where="inside"):
                os.chdir(process.cwd)
            set_home(process)
            executable = find_program(process.args[0],
                                      process.env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
            if seccomp is not None and not process.no_new_privileges:
                oci_seccomp.install(seccomp)  # before become_user drops CAP_SYS_ADMIN, as in init_chain
            become_user(process)
            if process.terminal:
                attach_terminal(sock, process)
            if process.no_new_privileges:
                kernel.set_no_new_privs(what="noNewPrivileges")
            seccomp_filter = _seccomp_before_exec(seccomp, process)
            # detached, it outlives its helper by design (reparented to the caller's subreaper)
            kernel.set_parent_death_signal(0 if detach else signal.SIGKILL)
        send(sock, {"steps": record.to_dicts()})
        close_inherited(preserve_fds)
        for number in _RESET_SIGNALS:
            signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        if seccomp_filter is not None:
            seccomp_filter.load()
        os.execve(executable, process.args, process.env)  # the socket closes on exec: that says "started"
    except BaseException as error:  # noqa: B036 - reported to the runtime
        try:
            send(sock, {"error": error_reply(error), "steps": record.to_dicts()})
        except OSError:
            pass
    os._exit(127)


def main(argv: list[str]) -> int:
    """``python -m stages.runtime.oci.process SOCKET [FIFO]``: the setup process (or an exec helper),
    started fresh by a threaded caller; both are file descriptors (3 and 4, or above the descriptors
    the caller preserves for the program)."""
    sock = socket.socket(fileno=int(argv[0]))
    sock.set_inheritable(False)  # dup2 made it inheritable: the container's program must not hold it
    message = receive(sock)
    if message is None:
        return 1
    ctypes.get_errno()
    if "exec" in message:
        exec_process(sock, message["exec"]["target"], message["exec"]["cgroup_files"],
                     Process(**message["exec"]["process"]), detach=message.get("detach", False),
                     seccomp=message["exec"].get("seccomp"),
                     preserve_fds=message["exec"].get("preserve_fds", 0))
    else:
        setup_process(sock, Plan.from_dict(message["plan"]), int(argv[1]),
                      detach=message.get("detach", False))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
