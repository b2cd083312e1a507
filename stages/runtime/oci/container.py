"""The runtime spec's operations on one container: create, start, state, kill, delete (runtime.md).

``create`` does everything but run the program: it reads the bundle, makes the state directory and the
cgroup (with its limits), starts the setup process (see :mod:`stages.runtime.oci.process`), writes its
uid_map/gid_map and moves it into the cgroup from outside, and returns once the init has set itself up
and waits. ``start`` releases the init (one byte into ``exec.fifo``); ``kill`` signals it; ``delete``
removes what is left. Every step lands in a :class:`stages.steps.StepRecord`, in stage 2's words: the
record of one run is the list of manual steps it replaced.

Whatever goes wrong halfway, an :class:`contextlib.ExitStack` undoes what was done; a runtime killed by
SIGKILL leaves at most a state directory and a cgroup, which ``delete(id, force=True)`` removes.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import signal
import sys
import time
from collections.abc import Callable

from stages.errors import NotRootError, StagesError
from stages.runtime.oci import statefile as oci_state

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without the import of typing at run time
if TYPE_CHECKING:
    import socket

    from stages.runtime.oci import spec as oci_spec
    from stages.steps import StepRecord

# stages-oci runs once per operation, and conmon or podman call it several times per container: what only
# create and exec need (the spec, the hooks, the devices, kernel.py's ctypes, the step record's dataclasses,
# sockets) is imported inside them, so that `start` and `delete` of a container without hooks do not pay for
# it at each start of the interpreter.

#: How long ``create`` waits for the init to report (a rootfs on a slow disk, a busy machine).
CREATE_TIMEOUT = 60.0


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _fd(item) -> int | None:
    if item is None:
        return None
    return item if isinstance(item, int) else item.fileno()


def _posix_spawn(args: list[str], targets: dict[int, int | None]) -> int:
    """``posix_spawn`` of ``args`` with each ``targets`` item (descriptor number in the child -> ours).

    Each of ours is first copied above the targets, so that one dup2 cannot overwrite the source of
    the next (ours may be 3 and a target 3: the file actions run in order, posix_spawn(3))."""
    import fcntl

    above = max(10, max(targets) + 1)
    copies = {target: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for target, fd in targets.items()
              if fd is not None}
    try:
        actions = [(os.POSIX_SPAWN_DUP2, copy, target) for target, copy in copies.items()]
        return os.posix_spawn(args[0], args, _child_environment(), file_actions=actions)
    finally:
        for copy in copies.values():
            os.close(copy)


def _spawn(plan: oci_spec.Plan, fifo: int, stdio, detach: bool = False) -> tuple[int, socket.socket]:
    """Start the setup process: a fork of this process when it is single-threaded (fast, as a CLI is),
    else a fresh ``python -m stages.runtime.oci.process`` (a notebook kernel has threads, and
    unshare(CLONE_NEWUSER) refuses a threaded process)."""
    import socket

    from stages.runtime.oci import process

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = [_fd(item) for item in (stdio or (None, None, None))]
    try:
        if _single_threaded():
            pid = os.fork()
            if pid == 0:  # the setup process: never returns into the caller's code
                try:
                    # A collection would touch every object the caller (a test runner, a big program)
                    # holds, copying its pages into the container's cgroup (copy-on-write, fork(2)).
                    gc.disable()
                    ours.close()
                    process.setup_process(theirs, plan, fifo, fds, detach)
                finally:
                    os._exit(1)
        else:
            python = sys.executable  # the virtualenv's own, so that its packages are found
            # dup2 clears close-on-exec: the fresh interpreter finds the socket and the FIFO just above
            # stdio and the descriptors preserved for the program (which keep their numbers)
            kept = _preserved(plan.preserve_fds)
            sock_fd, fifo_at = 3 + plan.preserve_fds, 4 + plan.preserve_fds
            pid = _posix_spawn([python, "-m", "stages.runtime.oci.process", str(sock_fd), str(fifo_at)],
                               {**dict(enumerate(fds)), **kept, sock_fd: theirs.fileno(), fifo_at: fifo})
            process.send(ours, {"plan": plan.to_dict(), "detach": detach})
    finally:
        theirs.close()
    return pid, ours


def _preserved(count: int) -> dict[int, int]:
    """Descriptors 3 .. 3+count-1, each passed on at its own number (runc's --preserve-fds)."""
    return {number: number for number in range(3, 3 + count)}


def _check_preserved(count: int) -> None:
    """``preserve_fds``: a number, and each of those descriptors open here (or the program would get one
    of the runtime's own under that number)."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise StagesError(f"--preserve-fds {count!r}: give a number of descriptors (0 or more)",
                          "for instance --preserve-fds 1 passes descriptor 3 on")
    for number in range(3, 3 + count):
        try:
            os.fstat(number)
        except OSError:
            raise StagesError(f"--preserve-fds {count}: descriptor {number} is not open, so there is nothing "
                              "to pass on",
                              f"open descriptors 3 to {2 + count} before calling the runtime, or pass "
                              f"--preserve-fds {number - 3}") from None


def _child_environment() -> dict[str, str]:
    """Our environment, with this package findable by a fresh interpreter."""
    from stages import kernel

    package = os.path.dirname(os.path.dirname(os.path.abspath(kernel.__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [package] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def _write_maps(pid: int, plan: oci_spec.Plan, record: StepRecord) -> None:
    """uid_map and gid_map of the setup process, written from outside (user_namespaces(7)).

    We are root on the host, so setgroups stays allowed: process.user.additionalGids can be set inside.
    """
    for name, mappings in (("uid_map", plan.uid_mappings), ("gid_map", plan.gid_mappings)):
        value = "\n".join(f"{inside} {outside} {size}" for inside, outside, size in mappings)
        path = f"/proc/{pid}/{name}"
        shell = f"echo '{value}' > {path}".replace("\n", "\\n")
        inside, outside, _ = mappings[0]
        what = f"{name.split('_')[0]} {inside} inside is {outside} on the host"
        with record.step(shell, where="outside", what=what):
            with open(path, "w") as handle:
                handle.write(value + "\n")


def _cgroup_name(container_id: str, cgroups_path: str) -> str:
    # We create cgroups only below our own (cgroups(7), and the project's rule); cgroupsPath's last part
    # names ours, in the shape systemd ("slice:prefix:name") or a path ("/a/b/name") gives it.
    name = cgroups_path.replace(":", "/").rstrip("/").rpartition("/")[2] if cgroups_path else container_id
    cleaned = "".join(c if c.isalnum() or c in "_.-" else "-" for c in name).lstrip("._-")[:56]
    return cleaned or container_id[:56]


def create(container_id: str, bundle: str | os.PathLike, *, root: str | os.PathLike | None = None,
           pid_file: str | os.PathLike | None = None, stdio=None, record: StepRecord | None = None,
           detach: bool = False, console_socket: str | os.PathLike | None = None,
           console: Console | None = None, preserve_fds: int = 0) -> dict:
    """Create the container ``container_id`` from the OCI bundle ``bundle``; returns its state.

    The init is left waiting: ``start`` makes it exec ``process.args``. ``root`` is the state root
    (default ``$STAGES_OCI_ROOT`` or /run/stages/oci); ``pid_file`` receives the init's PID; ``stdio`` is
    ``(stdin, stdout, stderr)``, each a file descriptor, a file object or None (inherit ours);
    ``record`` collects the steps (a new :class:`StepRecord` otherwise).

    ``detach`` is how a command-line runtime (``runc create``) behaves: no process of ours stays behind.
    The setup process ends (and is reaped here) once the init has reported, so the init is reparented
    to the nearest subreaper above us (conmon, containerd-shim, or a program that set
    PR_SET_CHILD_SUBREAPER, prctl(2)); that one collects the exit code with waitpid() on the PID in
    ``pid_file``. Without ``detach`` (the engine's way) the setup process stays our child and passes the
    init's end on, which :func:`wait` returns.

    With ``process.terminal`` true the init gets a new pseudo-terminal (its stdin, stdout, stderr and
    controlling terminal) and the terminal's master goes to ``console_socket``: the path of a listening
    AF_UNIX stream socket, which receives one message whose payload is the terminal's name and whose
    SCM_RIGHTS carry the master (runc's protocol, ``--console-socket``); or, in-process, to
    ``console(master_fd, name)``, which then owns the descriptor (closes it when done). The master
    arrives during ``create``, before the program runs.

    ``preserve_fds`` N (``runc create --preserve-fds``): the program inherits this process's descriptors
    3 .. 3+N-1 at the same numbers (a socket for socket activation, a pipe), after stdio; each must be
    open. Every other descriptor of ours is closed at its execve(2).
    """
    import datetime

    from stages import kernel
    from stages.isolate import cgroups
    from stages.isolate.cgroups import Cgroup
    from stages.runtime.oci import devices as oci_devices
    from stages.runtime.oci import hooks as oci_hooks
    from stages.runtime.oci import process
    from stages.runtime.oci import spec as oci_spec
    from stages.steps import StepRecord

    oci_spec.check_id(container_id)
    if not kernel.is_root():
        raise NotRootError("creating a container")
    _check_preserved(preserve_fds)
    # compiled seccomp profiles are kept in the state root (the same profile, container after container)
    config, plan = oci_spec.load(bundle, seccomp_cache=os.path.join(oci_state.root_directory(root),
                                                                    ".seccomp-cache"))
    plan.preserve_fds = preserve_fds
    _check_console(plan.process.terminal, console_socket, console)
    record = record if record is not None else StepRecord(f"create {container_id}")
    base = oci_state.root_directory(root)
    os.makedirs(base, mode=0o700, exist_ok=True)
    where = os.path.join(base, container_id)
    try:
        os.mkdir(where, 0o700)
    except FileExistsError:
        raise StagesError(f"a container named {container_id!r} exists already (in {base})",
                          f"pick another ID, or delete({container_id!r}) it first") from None
    state_file = os.path.join(where, oci_state.STATE_FILE)
    data = {"ociVersion": config["ociVersion"], "id": container_id, "status": "creating", "pid": 0,
            "bundle": plan.bundle, "annotations": plan.annotations,
            "stages": {"created": oci_state.rfc3339(datetime.datetime.now(datetime.timezone.utc)),
                       "rootfs": plan.rootfs, "cgroup": None, "setup_pid": 0,
                       "runtime_pid": os.getpid(), "runtime_started": oci_state.start_time(os.getpid())}}
    data["stages"]["hooks"] = plan.hooks  # start and delete run the rest (config.json may change by then)
    if plan.seccomp is not None:
        data["stages"]["seccomp"] = plan.seccomp  # exec loads the same filter (as runc does)
    with contextlib.ExitStack() as undo, record.active():
        undo.push(oci_hooks.poststop_on_failure(plan.hooks, data, record))  # last, once all is undone
        undo.callback(oci_state.remove, container_id, root)
        oci_state.write(state_file, data)
        fifo = os.path.join(where, oci_state.FIFO)
        with record.step(f"mkfifo {fifo}", what="the init waits on it until start"):
            os.mkfifo(fifo, 0o600)
        if ":" not in plan.cgroups_path:
            # config-linux.md: an absolute cgroupsPath is relative to the cgroup mount point (as our cgroup
            # namespace shows it), a relative one is below our own cgroup; `stages run` gives a relative one.
            # None given: stages/stages-ID below our own, as Cgroup.create names it.
            path = plan.cgroups_path or f"{cgroups.PARENT}/{cgroups.PREFIX}{_cgroup_name(container_id, '')}"
            limited = [c for c in ("memory", "pids", "cpu") if c in _controllers(plan)]
            limited += ["cpuset"] * any(k in plan.resources for k in ("cpu.cpus", "cpu.mems"))
            limited += ["blkio"] * ("blockIO.weight" in plan.resources)
            # an absolute path (the caller manages cgroups: podman, the runtime spec's tests) joins every
            # hierarchy, as runc does; a relative one (stages run) only those its limits need, so that
            # --explain shows no cgroup the learner did not ask for
            extra = list(_RUNTIME_HIERARCHIES) if path.startswith("/") else limited
            cgroup = Cgroup.create_path(path, record=record, enable=limited,
                                        controllers=list(dict.fromkeys(_controllers(plan) + extra)))
        else:  # systemd's slice:prefix:name, which only a systemd cgroup manager reads
            cgroup = Cgroup.create(_cgroup_name(container_id, plan.cgroups_path), record=record,
                                   controllers=_controllers(plan))
        undo.callback(cgroup.remove)
        data["stages"]["cgroup"] = cgroup.name
        # where it is, for the commands after this one: they may run in another cgroup than ours (conmon
        # creates, podman deletes), so looking it up below their own cgroup would not find it
        data["stages"].update(cgroup_directories=cgroup.directories, cgroup_versions=cgroup.versions,
                              cgroup_parents=cgroup.managed_parents, cgroup_made=cgroup.made_parents)
        if "freezer" in cgroup.directories:  # how statefile.status tells "paused" without detect()
            data["stages"]["freezer"] = [cgroup.directories["freezer"], cgroup.versions["freezer"]]
        oci_state.write(state_file, data)
        if plan.memory is not None:
            cgroup.set_memory(plan.memory, swap=plan.memory_swap)
        if plan.cpus is not None and "cpu.quota" not in plan.resources:
            cgroup.set_cpus(plan.cpus)
        for message in plan.process.warnings + set_resources(cgroup, plan.resources):
            warn(record, message)
        if plan.devices is not None:  # before any process of the container is in the cgroup
            oci_devices.apply(cgroup, plan.devices)
        fifo_fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
        try:
            setup_pid, channel = _spawn(plan, fifo_fd, stdio, detach)
        finally:
            os.close(fifo_fd)
        undo.callback(_end_setup, setup_pid)
        undo.callback(channel.close)
        data["stages"].update(setup_pid=setup_pid, setup_started=oci_state.start_time(setup_pid))
        oci_state.write(state_file, data)
        channel.settimeout(CREATE_TIMEOUT)
        pid = 0
        created = False
        paused = resumed = False  # the init pauses before pivot_root for the hooks
        # Two processes write to this socket: the setup process (the init's PID, as the host sees it) and
        # the init ("created"); on a busy machine either may come first.
        while not (pid and created):
            try:
                fds: list[int] = []
                message = process.receive(channel, fds)
            except TimeoutError:
                raise StagesError(f"the container's init did not report within {CREATE_TIMEOUT:g} s",
                                  "look at what it was doing with the step record; try again") from None
            if message is None:
                raise _died(setup_pid, plan)
            record.extend(message.get("steps", []))
            if "console" in message:
                _pass_console(fds, message["console"], console_socket, console, record)
            if "error" in message:
                failed = [item["shell"] for item in message.get("steps", []) if not item["ok"]]
                raise _rebuild(message["error"], failed[-1] if failed else None)
            if "unshared" in message:
                if plan.user_namespace:
                    _write_maps(message["unshared"], plan, record)
                cgroup.add(message["unshared"])
                process.send(channel, {"go": True})
            if "pid" in message:
                pid = message["pid"]
                # The init is in the cgroup now (a child inherits it): its setup process goes back to
                # ours, so that it counts in none of the container's limits, as runc's own helpers do
                # not (they have ended by then; this one stays, to pass on how the init ended).
                _leave_cgroup(setup_pid, cgroup, record)
            paused = paused or bool(message.get("hooks"))
            if paused and pid and not resumed:  # the hooks read its host PID: wait for both messages
                oci_hooks.resume_init(channel, plan.hooks, data, pid, where, record)
                resumed = True
            created = created or bool(message.get("created"))
        if plan.pids is not None:
            # Set once the container holds its own processes only, as runc sets the limits once its
            # init is ready: pids.max counts every task in the cgroup (pids.rst), so --pids-limit 1 is
            # the init alone, as under runc.
            cgroup.set_pids(plan.pids)
        data.update(status="created", pid=pid)
        data["stages"]["init_started"] = oci_state.start_time(pid)
        if detach:
            # it ends once the init no longer needs it; 0 says the init cleared its death signal first
            ended = _reap(setup_pid, 5.0)
            if ended is None or os.waitstatus_to_exitcode(ended) != 0:
                raise StagesError("the container's init ended right after it was created" if ended else
                                  "the container's setup process did not end once the init was created",
                                  "run it again with a step record to see the last step it took")
            # reaped: its PID may be anyone's now, so nothing may signal or wait for it later
            data["stages"].update(detached=True, setup_pid=0, setup_started=None)
        oci_state.write(state_file, data)
        if pid_file is not None:
            undo.callback(_unlink, os.fspath(pid_file))  # a create cut short leaves no PID file either
            oci_state.write_text(os.fspath(pid_file), str(pid))  # no newline: runc writes none
        channel.close()
        undo.pop_all()
    return oci_state.spec_state(data, root)


#: ``console(master_fd, name)``: receives a container's terminal (see :func:`create`).
Console = Callable[[int, str], None]


def _check_console(terminal: bool, console_socket, console: Console | None) -> None:
    from stages.runtime.oci import spec as oci_spec

    if terminal and console_socket is None and console is None:
        raise oci_spec.refuse("process.terminal", "is true, but nothing was given to receive the terminal",
                              "pass a console socket (--console-socket PATH, console_socket=PATH) or "
                              "console=callable, or set terminal to false")
    if not terminal and (console_socket is not None or console is not None):
        raise StagesError("a console socket was given, but process.terminal is false: there is no terminal "
                          "to send", "set process.terminal to true, or leave the console socket out")


def _pass_console(fds: list[int], name: str, console_socket, console: Console | None,
                  record: StepRecord) -> None:
    """Hand the terminal's master (``fds[0]``) to ``console`` or to the console socket; ours is closed."""
    import socket

    try:
        if not fds:
            raise StagesError("the container's terminal did not arrive with its message",
                              "this is a bug in stages: please report it with the step record")
        if console is not None:
            master = fds.pop(0)
            console(master, name)  # theirs now
            return
        path = os.fspath(console_socket)
        with record.step(f"# send {name}'s master to {path} (SCM_RIGHTS)", where="outside",
                         what="the terminal goes to whoever listens on the console socket"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                try:
                    connection.connect(path)
                except OSError as error:
                    raise StagesError(f"cannot reach the console socket {path}: {error.strerror}",
                                      "listen on it first (an AF_UNIX stream socket), as conmon does"
                                      ) from None
                socket.send_fds(connection, [name.encode()], fds[:1])
    finally:
        for fd in fds:
            os.close(fd)
        fds.clear()


#: hierarchies a container with a cgroupsPath joins beyond its limits' (as runc joins every one): where
#: the cgroupsPath is looked for, by the container's tools and by the runtime spec's tests
_RUNTIME_HIERARCHIES = ("cpuset", "cpuacct", "blkio", "devices", "freezer", "hugetlb", "net_cls", "net_prio",
                        "perf_event")


def warn(record: StepRecord, message: str) -> None:
    """A warning (runtime.md "Warnings"): what config.json asked for and the container goes on without, a
    failed step of ``record`` whose error starts "warning: ", as a failing poststart hook's; the command
    line logs them (:func:`stages.runtime.oci.hooks.warnings_of`)."""
    with record.step(f"# warning: {message}", what="left out; the container goes on (runtime.md)") as item:
        item.ok = False
        item.error = f"warning: {message}"


def set_resources(cgroup, resources: dict) -> list[str]:
    """Write the linux.resources that :func:`stages.runtime.oci.spec.plan` checked into ``resources``
    (``create``, and ``update``): each a file of the cgroup, or a clear error where this kernel lacks it;
    returns the warnings (the deprecated kernel memory limits, where this kernel keeps none)."""
    from stages.errors import CgroupError

    warnings: list[str] = []

    def needs(controller: str, field: str) -> None:
        if controller not in cgroup.directories:
            raise StagesError(f"config.json: linux.resources.{field}: this machine has no {controller} "
                              "cgroup controller for the container", f"leave linux.resources.{field} out")

    if "cpu.quota" in resources:
        cgroup.set_cpu_quota(resources["cpu.quota"], resources["cpu.period"])
    if "cpu.shares" in resources:
        cgroup.set_cpu_shares(resources["cpu.shares"])
    if "cpu.realtimePeriod" in resources or "cpu.realtimeRuntime" in resources:
        cgroup.set_realtime(resources.get("cpu.realtimeRuntime"), resources.get("cpu.realtimePeriod"))
    if "cpu.cpus" in resources or "cpu.mems" in resources:
        needs("cpuset", "cpu.cpus")
        cgroup.set_cpuset(resources.get("cpu.cpus"), resources.get("cpu.mems"))
    if "memory.reservation" in resources:
        cgroup.set_memory_reservation(resources["memory.reservation"])
    if "memory.swappiness" in resources:
        cgroup.set_swappiness(resources["memory.swappiness"])
    if resources.get("memory.disableOOMKiller"):
        cgroup.disable_oom_killer()
    # memory.kernel and kernelTCP are NOT RECOMMENDED in config-linux.md, and deprecated in its Go
    # bindings ("kernel-memory limits are not supported in cgroups v2, and were obsoleted in kernel v5.4
    # ... it may be ignored by runtimes"): written where the kernel keeps them, else a warning and the
    # container goes on (as runc, which warns and ignores them on kernels without kmem accounting).
    for field, name in (("memory.kernel", "memory.kmem.limit_in_bytes"),
                        ("memory.kernelTCP", "memory.kmem.tcp.limit_in_bytes")):
        if field not in resources:
            continue
        path = os.path.join(cgroup.directories.get("memory", ""), name)
        if "memory" not in cgroup.directories or cgroup.versions["memory"] == 2 or not os.path.exists(path):
            warnings.append(f"linux.resources.{field}: this kernel has no {name} (cgroup v2 counts kernel "
                            "memory in memory.max): not set, memory.limit covers kernel memory")
            continue
        try:
            cgroup._write(path, str(resources[field]), what="the kernel memory limit (deprecated)")
            with open(path) as handle:
                taken = handle.read().strip()
        except (OSError, CgroupError) as error:
            warnings.append(f"linux.resources.{field}: the kernel refused {name}: {error}: not set")
            continue
        # Linux 5.16 on accepts a write to kmem.limit_in_bytes and keeps nothing (the limit is
        # deprecated): said, not pretended
        if resources[field] != -1 and taken != str(resources[field]):
            warnings.append(f"linux.resources.{field}: this kernel ignores {name} (Linux 5.16 and later "
                            f"keep no kernel memory limit; it reads {taken}): memory.limit covers kernel "
                            "memory")
    if "blockIO.weight" in resources:
        needs("blkio", "blockIO.weight")
        try:
            cgroup.set_block_io_weight(resources["blockIO.weight"])
        except CgroupError as error:
            raise StagesError(f"config.json: linux.resources.blockIO.weight: {error}",
                              "leave it out") from None
    return warnings


def _controllers(plan: oci_spec.Plan) -> list[str]:
    """The cgroup controllers a container gets: every limit this machine offers, and the freezer (for
    pause) where there is one."""
    from stages.isolate import cgroups
    from stages.runtime.oci import spec as oci_spec

    layout = cgroups.detect()
    wanted = [name for name in cgroups.CONTROLLERS if name in layout.controllers]
    wanted += [name for name in ("freezer",) if name in layout.extras]
    if not wanted:
        layout.hierarchy("memory")  # raises, saying why no controller can be used
    if plan.devices is not None:
        if "devices" not in layout.extras:
            raise oci_spec.refuse("linux.resources.devices", "this machine has no way to enforce it: "
                                  f"{layout.missing.get('devices', 'no devices cgroup')}",
                                  "leave linux.resources.devices out, or run on cgroup v1 or v2 as root")
        wanted.append("devices")
    return wanted


def _died(setup_pid: int, plan: oci_spec.Plan | None) -> StagesError:
    status = _reap(setup_pid, 2.0)
    how = ""
    if status is not None and os.WIFSIGNALED(status):
        how = f": killed by {signal.Signals(os.WTERMSIG(status)).name}"
    hint = "run it again with a step record to see the last step it took"
    if how and plan is not None and plan.memory is not None:
        hint = (f"the memory limit ({plan.memory} bytes) may be too small even for setting up: "
                "raise linux.resources.memory.limit")
    return StagesError(f"the container's setup process ended before the container was created{how}", hint)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"its init was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"its init exited with {os.waitstatus_to_exitcode(status)}"


def _rebuild(error: dict, step: str | None = None) -> BaseException:
    """The init's error, raised again here; ``step`` is the shell line of the step that failed."""
    if error.get("stages"):
        rebuilt = StagesError(error["message"], error.get("hint"))
        rebuilt.__class__ = _error_class(error.get("type", ""))
        return rebuilt
    if "errno" in error:
        message = error["message"]
        if step and step not in message:
            message = f"{message} (in the container, at: {step})"
        return OSError(error["errno"], message)
    return StagesError(f"the container's setup failed: {error.get('type')}: {error.get('message')}",
                       "this is a bug in stages: please report it with the step record")


def _error_class(name: str) -> type:
    from stages import errors
    from stages.runtime.oci import hooks as oci_hooks
    from stages.runtime.oci import spec as oci_spec

    found = getattr(errors, name, None) or getattr(oci_spec, name, None) or getattr(oci_hooks, name, None)
    return found if isinstance(found, type) and issubclass(found, StagesError) else StagesError


def _leave_cgroup(pid: int, cgroup, record: StepRecord) -> None:
    """Move process ``pid`` out of the container's ``cgroup``, into our own cgroup in each hierarchy
    (where the process came from: it was forked from us). A hierarchy whose own cgroup we cannot find
    (a cgroup namespace hides it) leaves the process where it is."""
    from stages.isolate import cgroups

    layout = cgroups.detect()
    hierarchies = {}
    for controller in cgroup.directories:
        with contextlib.suppress(StagesError):
            hierarchy = layout.hierarchy(controller)
            hierarchies[os.path.normpath(hierarchy.mountpoint)] = hierarchy.own_directory
    for directory in cgroup.unique_directories():
        mountpoint = max((point for point in hierarchies if directory.startswith(point + "/")), key=len,
                         default=None)
        if mountpoint is None:
            continue
        procs = os.path.join(hierarchies[mountpoint], "cgroup.procs")
        with record.step(f"echo {pid} > {procs}", where="outside",
                         what="the setup process leaves the container's cgroup: only the container counts"):
            try:
                with open(procs, "w") as handle:
                    handle.write(str(pid))
            except ProcessLookupError:  # detached, it may have ended already: nothing to move
                return


def _end_setup(pid: int) -> None:
    """Kill the setup process (its init dies with it, PR_SET_PDEATHSIG) and reap it."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid, 5.0)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _reap(pid: int, timeout: float) -> int | None:
    """Collect ``pid``'s exit status if it is our child; None if it is not, or did not end in time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(0.002)


def start(container_id: str, *, root: str | os.PathLike | None = None,
          record: StepRecord | None = None) -> dict:
    """Run the program of a created container: one byte into its exec.fifo releases the waiting init."""
    data = oci_state.read(container_id, root)
    status = oci_state.status(data, root)
    if status != "created":
        setup = data.get("stages", {}).get("setup_pid")
        ended = _reap(setup, 0) if status == "stopped" and setup else None  # never waitpid(-1): any child
        how = f" ({_describe(ended)})" if ended is not None else ""
        raise StagesError(f"container {container_id!r} is {status}{how}; only a created container can be "
                          "started",
                          "create it again" if status == "stopped" else "it is started already")
    fifo = os.path.join(oci_state.directory(container_id, root), oci_state.FIFO)
    shell = f"echo 0 > {fifo}"
    with (record.step(shell, what="release the init: it execs process.args") if record is not None
          else contextlib.nullcontext()):
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as error:
            if error.errno in (errno.ENXIO, errno.ENOENT):
                raise StagesError(f"container {container_id!r} is no longer waiting to start",
                                  "its init has gone; delete it and create it again") from None
            raise
        hooks = data["stages"].get("hooks") or {}
        if any(hooks.values()):
            from stages.runtime.oci import hooks as oci_hooks
        else:
            oci_hooks = None  # nothing to run or wait for
        report = None
        if oci_hooks is not None:
            report = oci_hooks.open_start_report(oci_state.directory(container_id, root))  # before release
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
        os.unlink(fifo)
    if oci_hooks is not None:
        oci_hooks.started(report, hooks, data["pid"], record)  # startContainer
    data["status"] = "running"
    oci_state.write(os.path.join(oci_state.directory(container_id, root), oci_state.STATE_FILE), data)
    if oci_hooks is not None:
        oci_hooks.run_poststart(data, record)  # a failure is a warning: the program runs already
    return oci_state.spec_state(data, root)


def state(container_id: str, *, root: str | os.PathLike | None = None) -> dict:
    """The container's state (runtime.md): ociVersion, id, status, pid, bundle, annotations."""
    return oci_state.spec_state(oci_state.read(container_id, root), root)


def signal_number(value: int | str) -> int:
    """``9``, ``"9"``, ``"KILL"`` or ``"SIGKILL"`` as a signal number."""
    if isinstance(value, int) or str(value).isdigit():
        number = int(value)
        if 0 < number < signal.NSIG:
            return number
    else:
        name = str(value).upper()
        name = name if name.startswith("SIG") else "SIG" + name
        found = getattr(signal.Signals, name, None) if hasattr(signal.Signals, name) else None
        if found is not None:
            return int(found)
    raise StagesError(f"{value!r} is not a signal", "give a number or a name such as TERM, KILL or SIGHUP")


def kill(container_id: str, sig: int | str = signal.SIGTERM, *,
         root: str | os.PathLike | None = None, all_processes: bool = False) -> None:
    """Send ``sig`` to the container's init (PID 1 inside).

    PID 1 of a PID namespace gets only the signals it has a handler for, and SIGKILL from outside
    (pid_namespaces(7)): a plain ``sleep`` as PID 1 ignores SIGTERM, as it would under runc.

    ``all_processes`` (``runc kill --all``) signals every process in the container's cgroup: without a
    PID namespace of its own, the init's end does not end the rest (podman stop of a ``--pid host``).
    """
    number = signal_number(sig)
    data = oci_state.read(container_id, root)
    status = oci_state.status(data, root)
    if status not in ("created", "running", "paused"):
        raise StagesError(f"container {container_id!r} is {status}: there is no process to signal",
                          f"delete({container_id!r}) removes it")
    victims = [data["pid"]]
    cgroup = _cgroup_of(data) if all_processes else None
    if cgroup is not None:
        victims = cgroup.pids() or victims
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)
    if status == "paused" and number == signal.SIGKILL:
        # A frozen process acts on SIGKILL only once thawed (v1 freezer-subsystem.rst); runc thaws too.
        _thaw(data)


def _cgroup_of(data: dict, record: StepRecord | None = None):
    """The container's cgroup where ``create`` made it (the directories its state keeps), or None if it is
    gone. Not looked up below our own cgroup: the caller may live in another one than the creator."""
    from stages.errors import CgroupError
    from stages.isolate.cgroups import Cgroup

    private = data.get("stages", {})
    name = private.get("cgroup")
    if not name:
        return None
    directories = {controller: directory for controller, directory
                   in (private.get("cgroup_directories") or {}).items() if os.path.isdir(directory)}
    if directories:
        versions = private.get("cgroup_versions") or {}
        return Cgroup(name, directories, {controller: versions[controller] for controller in directories},
                      record=record, managed_parents=list(private.get("cgroup_parents") or []),
                      made_parents=list(private.get("cgroup_made") or []))
    try:
        return Cgroup.open(name, record=record)  # a state file written before the directories were kept
    except CgroupError:
        return None


def _freezer(data: dict, record: StepRecord | None = None):
    cgroup = _cgroup_of(data, record)
    if cgroup is None or "freezer" not in cgroup.directories:
        raise StagesError(f"container {data['id']!r} has no freezer cgroup, so it cannot be paused",
                          "this machine offers no freezer (cgroup v1 freezer, or cgroup v2 on Linux 5.2+)")
    return cgroup


def _thaw(data: dict, record: StepRecord | None = None) -> None:
    with contextlib.suppress(StagesError):
        _freezer(data, record).thaw()


def pause(container_id: str, *, root: str | os.PathLike | None = None,
          record: StepRecord | None = None) -> dict:
    """Freeze every process of a running (or created) container where it stands (``runc pause``): its
    cgroup's freezer stops them without a signal; the status becomes ``paused``. Returns the state."""
    data = oci_state.read(container_id, root)
    status = oci_state.status(data, root)
    if status not in ("created", "running"):
        raise StagesError(f"container {container_id!r} is {status}; only a running container can be paused",
                          f"resume({container_id!r}) it" if status == "paused" else "start it first")
    _freezer(data, record).freeze()
    return oci_state.spec_state(data, root)


def resume(container_id: str, *, root: str | os.PathLike | None = None,
           record: StepRecord | None = None) -> dict:
    """Let the processes of a paused container run again (``runc resume``). Returns the state."""
    data = oci_state.read(container_id, root)
    status = oci_state.status(data, root)
    if status != "paused":
        raise StagesError(f"container {container_id!r} is {status}, not paused: there is nothing to resume",
                          f"pause({container_id!r}) pauses it")
    _freezer(data, record).thaw()
    return oci_state.spec_state(data, root)


def delete(container_id: str, force: bool = False, *, root: str | os.PathLike | None = None,
           record: StepRecord | None = None) -> None:
    """Remove a stopped container: its cgroup and its state. ``force`` kills a live one first (SIGKILL)."""
    from stages.errors import CgroupError

    data = oci_state.read(container_id, root)
    status = oci_state.status(data, root)
    private = data.get("stages", {})
    if status != "stopped" and not force:
        raise StagesError(f"container {container_id!r} is {status}; only a stopped container can be deleted",
                          f"kill({container_id!r}, 'KILL') it first, or delete it with force=True")
    for pid, started in ((data.get("pid"), private.get("init_started")),
                         (private.get("setup_pid"), private.get("setup_started"))):
        if pid and oci_state.alive(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if status == "paused":
        _thaw(data, record)  # or the killed init stays frozen, and its setup process waits for it
    if private.get("setup_pid"):
        _reap(private["setup_pid"], 5.0)  # if it is our child, no zombie stays behind
    cgroup = _cgroup_of(data, record)  # None: never made, or removed already
    if cgroup is not None:
        with contextlib.suppress(CgroupError):
            cgroup.remove()
    oci_state.remove(container_id, root)
    if any((private.get("hooks") or {}).values()):
        from stages.runtime.oci import hooks as oci_hooks

        oci_hooks.run_poststop(data, record)  # after the container is gone (runtime.md); failures warn


def list_containers(root: str | os.PathLike | None = None) -> list[dict]:
    """The state of every container under the root, by ID."""
    base = oci_state.root_directory(root)
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    result = []
    for name in names:
        try:
            result.append(state(name, root=root))
        except StagesError:
            continue
    return result


def cleanup(root: str | os.PathLike | None = None) -> list[str]:
    """Delete every stopped container under the root (after a crash, a SIGKILL, a reboot); returns their
    IDs. Containers still creating, created or running are left alone."""
    removed = []
    for item in list_containers(root):
        if item["status"] == "stopped":
            delete(item["id"], root=root)
            removed.append(item["id"])
    return removed


def wait(container_id: str, *, root: str | os.PathLike | None = None) -> int | None:
    """Wait for the container to stop; its exit code (negative: the signal that ended it), like
    :mod:`subprocess`. None when this process did not create it (only the parent learns an exit code),
    or created it detached without being the subreaper its init was reparented to."""
    data = oci_state.read(container_id, root)
    private = data.get("stages", {})
    # detached, the init itself is the child of its subreaper (which may be us); else the setup process
    # is ours and ends as the init did
    waited = data.get("pid") if private.get("detached") else private.get("setup_pid")
    try:
        if not waited or waited <= 0:
            raise ChildProcessError
        _, status = os.waitpid(waited, 0)
        return os.waitstatus_to_exitcode(status)
    except ChildProcessError:
        while oci_state.status(data, root) != "stopped":
            time.sleep(0.01)
        return None


def run(container_id: str, bundle: str | os.PathLike, *, root: str | os.PathLike | None = None, stdio=None,
        record: StepRecord | None = None, keep: bool = False, console: Console | None = None,
        preserve_fds: int = 0) -> int | None:
    """create + start + wait, then delete (unless ``keep``): the container's exit code, negative for the
    signal that killed it. ``console`` receives the terminal of a ``process.terminal`` container, and
    ``preserve_fds`` descriptors pass on to it (see :func:`create`)."""
    create(container_id, bundle, root=root, stdio=stdio, record=record, console=console,
           preserve_fds=preserve_fds)
    try:
        start(container_id, root=root, record=record)
        return wait(container_id, root=root)
    finally:
        if not keep:
            delete(container_id, force=True, root=root, record=record)


def exec_process(container_id: str, process: dict, *, root: str | os.PathLike | None = None, stdio=None,
                 record: StepRecord | None = None, detach: bool = False,
                 console_socket: str | os.PathLike | None = None,
                 console: Console | None = None, preserve_fds: int = 0,
                 pid_file: str | os.PathLike | None = None,
                 started: Callable[[int], None] | None = None) -> int | None:
    """Run one more process in a running container (``runc exec``); its exit code, or with ``detach``
    its PID (on the host) as soon as it runs. Detached, no process of ours stays behind: the helper
    ends once the process has exec'd (and is reaped here), so the process is reparented to the nearest
    subreaper above us, as under ``runc exec --detach`` (conmon collects its exit code).

    ``process`` is config.json's ``process`` object (args, env, cwd, user, capabilities, rlimits,
    noNewPrivileges). The new process joins the container's cgroup, then its namespaces by
    /proc/PID/ns/* (setns(2)), which also puts it in the container's root, then takes its user and
    capabilities and execs. ``terminal`` true in ``process`` gives it a new pseudo-terminal, whose master
    goes to ``console_socket`` or ``console``, as in :func:`create` (``podman exec -it``).

    ``preserve_fds`` N passes our descriptors 3 .. 3+N-1 on, as in :func:`create`. ``pid_file`` receives
    the new process's host PID once it runs; ``started(pid)`` is called then too, before the wait: a
    command-line runtime forwards the signals it gets to that PID (``runc exec`` in the foreground).
    """
    import socket

    from stages.runtime.oci import process as oci_process
    from stages.runtime.oci import spec as oci_spec
    from stages.steps import StepRecord

    data = oci_state.read(container_id, root)
    status = oci_state.status(data, root)
    if status != "running":
        raise StagesError(f"container {container_id!r} is {status}; exec needs a running container",
                          f"start({container_id!r}) it first" if status == "created" else "create it again")
    wanted = oci_spec._process({"process": process}, [], [])
    _check_console(wanted.terminal, console_socket, console)
    cgroup_files = []
    cgroup = _cgroup_of(data)
    if cgroup is not None:
        cgroup_files = [os.path.join(d, "cgroup.procs") for d in cgroup.unique_directories()]
    record = record if record is not None else StepRecord(f"exec {container_id}")
    for message in wanted.warnings:  # capabilities left out (config.md), logged by the command line
        warn(record, message)
    seccomp = data.get("stages", {}).get("seccomp")  # the container's filter binds what is exec'd in it too
    _check_preserved(preserve_fds)
    message = {"exec": {"target": data["pid"], "cgroup_files": cgroup_files, "process": wanted.__dict__,
                        "seccomp": seccomp, "preserve_fds": preserve_fds}, "detach": detach}
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = [_fd(item) for item in (stdio or (None, None, None))]
    try:
        if _single_threaded():
            helper = os.fork()
            if helper == 0:
                try:
                    gc.disable()
                    ours.close()
                    oci_process.exec_process(theirs, data["pid"], cgroup_files, wanted, fds, detach,
                                             seccomp=seccomp, preserve_fds=preserve_fds)
                finally:
                    os._exit(1)
        else:
            sock_fd = 3 + preserve_fds  # above the preserved descriptors, which keep their numbers
            helper = _posix_spawn([sys.executable, "-m", "stages.runtime.oci.process", str(sock_fd)],
                                  {**dict(enumerate(fds)), **_preserved(preserve_fds),
                                   sock_fd: theirs.fileno()})
            oci_process.send(ours, message)
    finally:
        theirs.close()
    pid = None
    with contextlib.ExitStack() as undo, ours:
        undo.callback(_end_setup, helper)
        ours.settimeout(CREATE_TIMEOUT)
        while True:
            fds: list[int] = []
            reply = oci_process.receive(ours, fds)
            if reply is None:
                break
            record.extend(reply.get("steps", []))
            if "console" in reply:
                _pass_console(fds, reply["console"], console_socket, console, record)
            if "error" in reply:
                failed = [item["shell"] for item in reply.get("steps", []) if not item["ok"]]
                if pid is not None:
                    # The process was forked into the container and ends now (127): its helper, its
                    # parent, must live to reap it. Killed first, it would leave the zombie to the host's
                    # PID 1 (the reaper of the *parent's* PID namespace, pid_namespaces(7)), and the
                    # container's cgroup would not empty until then (the next stop waits for it).
                    undo.pop_all()
                    if _reap(helper, 5.0) is None:
                        _end_setup(helper)
                raise _rebuild(reply["error"], failed[-1] if failed else None)
            pid = reply.get("pid", pid)
        if pid is None:
            raise _died(helper, None)
        if pid_file is not None:
            oci_state.write_text(os.fspath(pid_file), str(pid))  # no newline: runc writes none
        undo.pop_all()
    if started is not None:
        started(pid)
    if detach:
        _reap(helper, 5.0)  # it ended as the process exec'd
        return pid
    _, status = os.waitpid(helper, 0)
    return os.waitstatus_to_exitcode(status)
