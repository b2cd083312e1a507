"""Stage 3's engine: what ``docker run`` does, in one readable chain.

An engine prepares a container and hands it to a low-level runtime, as dockerd hands a bundle to runc:

1. check every flag (:mod:`stages.runtime.flags`), find the image, reserve a name (under a lock);
2. mount the image's layers with overlayfs as the container's rootfs (:mod:`stages.runtime.overlay`);
3. write the OCI bundle: config.json per the runtime spec, the rootfs beside it;
4. ``oci.create``: namespaces, cgroup and limits, pivot_root, /proc, /dev, capabilities, no_new_privs;
   the container's init waits;
5. the network (:class:`stages.runtime.network.NetworkManager`): a veth onto the bridge, published ports;
6. ``oci.start``, then wait for the exit code: the *monitor* (:mod:`stages.runtime.monitor`) does
   this for a detached container, as conmon does for podman; for a foreground one, ``stages run`` itself;
7. when it stops: the runtime's state and cgroup, the network and the overlay mount are released; the
   upper directory (what the container changed) stays until ``stages rm``.

Every step lands in one :class:`stages.steps.StepRecord` (the runtime's and the network's steps merged in
order): ``stages run --explain`` prints it, the manual steps of stage 2 that one command replaced.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from stages.errors import CommandNotFoundError, StagesError
from stages.runtime import containers, overlay
from stages.runtime.flags import Options
from stages.steps import StepRecord

#: How long ``stages run -d`` waits for its monitor to say the container runs.
START_TIMEOUT = 60.0


# -- where things are ---------------------------------------------------------------------------------
def oci_root(base: Path | None = None) -> str:
    """The low-level runtime's state root: ``$STAGES_RUN/oci`` when set (tests), else the runtime's own
    default (``$STAGES_OCI_ROOT`` or /run/stages/oci)."""
    return containers.oci_root()


def network_manager(base: Path | None = None, record: StepRecord | None = None):
    """The network manager for this state directory; ``$STAGES_HOST_NETNS`` names a network namespace
    that stands in for the host (tests, notebooks)."""
    from stages.runtime.network import NetworkManager

    return NetworkManager(base or containers.home(), host_netns=os.environ.get("STAGES_HOST_NETNS") or None,
                          record=record)


# -- images ---------------------------------------------------------------------------------------------
def find_image(name: str, base: Path | None = None) -> dict:
    """The image ``name`` as ``{"id", "name", "layers": [dir, ...] (lowest first), "config": {...}}``."""
    try:
        from stages.runtime import images  # the image store (stage 3's `stages images`)
    except ImportError:
        images = None
    if images is not None and hasattr(images, "resolve_for_engine"):
        return images.resolve_for_engine(name)
    return _builtin_image(name, base)


def _builtin_image(name: str, base: Path | None) -> dict:
    """Until the image store is there: ``busybox`` and ``host-minimal`` built as one layer each."""
    from stages import rootfs

    plain = name.split(":")[0]
    sources = {"busybox": "busybox", "host-minimal": "host"}
    if plain not in sources:
        raise StagesError(f"there is no image {name!r}", "`stages images` lists them; busybox is built in")
    layer = (base or containers.home()) / "containers" / ".builtin-images" / plain
    with containers.locked(base):
        if not rootfs.is_rootfs(layer):
            rootfs.build(layer, sources[plain])
    return {"id": f"builtin-{plain}", "name": f"{plain}:latest", "layers": [str(layer)],
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                       "Cmd": ["sh"], "WorkingDir": "/"}}


def _command(options: Options, image: dict) -> list[str]:
    """Entrypoint + (our command, else the image's Cmd), as Docker combines them."""
    config = image.get("config") or {}
    args = list(config.get("Entrypoint") or []) + (list(options.command) or list(config.get("Cmd") or []))
    if not args:
        raise StagesError(f"the image {image['name']} says no command to run", f"give one: stages run "
                          f"{options.image} sh -c 'echo hello'")
    return args


def _find_in_layers(program: str, layers: list[str], env: list[str], workdir: str) -> bool:
    """Whether ``program`` exists in the image (topmost layer first), looked up like execvp(3)."""
    path = next((item[5:] for item in env if item.startswith("PATH=")), "/usr/bin:/bin")
    candidates = [program] if "/" in program else [os.path.join(d, program) for d in path.split(":")]
    for candidate in candidates:
        inside = candidate if os.path.isabs(candidate) else os.path.join(workdir, candidate)
        for layer in reversed(layers):
            where = os.path.join(layer, inside.lstrip("/"))
            if os.path.lexists(where):
                return True
    return False


# -- run ------------------------------------------------------------------------------------------------
def prepare(options: Options, base: Path | None = None) -> dict:
    """Check everything that can be checked before anything is made, and reserve the container's name.

    Returns the container's record (status ``creating``), written under the state directory. Raises a
    :class:`StagesError` for an unknown image, a name in use, a bad flag or a command not in the image.
    """
    from stages import kernel
    from stages.errors import NotRootError
    from stages.runtime import flags

    if not kernel.is_root():
        raise NotRootError("running a container")
    limits = flags.check(options)
    image = find_image(options.image, base)
    args = _command(options, image)
    env = flags.merge_env((image.get("config") or {}).get("Env") or [], flags.parse_env(options.env))
    workdir = options.workdir or (image.get("config") or {}).get("WorkingDir") or "/"
    if not _find_in_layers(args[0], image["layers"], env, workdir):
        raise CommandNotFoundError(f"{args[0]} was not found in the image {image['name']}",
                                   f"check the spelling, or look: stages run {options.image} ls /bin")
    record = {"id": containers.new_id(), "image": image["name"], "image_id": image["id"],
              "layers": image["layers"], "image_config": image.get("config") or {}, "args": args,
              "options": options.to_dict(), "limits": limits, "status": "creating",
              "monitor_pid": os.getpid(), "monitor_started": _start_time(os.getpid()), "exit_code": None,
              "network": None, "steps": []}
    with containers.locked(base):
        _check_ports(options, base)
    return containers.reserve(record, options.name, base)


def _check_ports(options: Options, base: Path | None, container_id: str | None = None) -> None:
    """Refuse a host port another running container publishes already (call it under the lock), or one a
    process of the host listens on: its connections would silently go to the container instead (the
    DNAT rule comes before any socket, and no bind(2) would fail to tell)."""
    if not options.publish:
        return  # nothing to clash: no need to read every record
    published = {int(port.split(":")[0]) for port in options.publish}
    for other in containers.all_records(base):
        in_use = {int(p.split(":")[0]) for p in other.get("options", {}).get("publish", [])}
        if published & in_use and other["id"] != container_id and containers.status(other) != "stopped":
            port = sorted(published & in_use)[0]
            raise StagesError(f"host port {port} is published already by container {other['name']}",
                              f"pick another host port (-p {port + 1}:...), or stop {other['name']}")
    for port in sorted(published):
        if _host_port_in_use(port):
            where = os.environ.get("STAGES_HOST_NETNS")
            raise StagesError(f"host port {port} is in use: a process listens on it"
                              + (f" (in the network namespace {where}, the stand-in host)" if where else ""),
                              f"pick another host port (-p {port + 1}:...), or stop that process "
                              f"(ss -ltnp 'sport = :{port}' names it)")


def _host_port_in_use(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` of the host (or of ``$STAGES_HOST_NETNS``): we try to bind
    it. With SO_REUSEADDR, bind(2) fails with EADDRINUSE only because of a listening socket, not because
    of connections lingering in TIME_WAIT (socket(7), tcp(7))."""
    import errno
    import socket

    def bind() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0", port))
            except OSError as error:
                return error.errno == errno.EADDRINUSE
        return False

    host = os.environ.get("STAGES_HOST_NETNS")
    if not host:
        return bind()
    from stages.runtime.network import in_netns

    return in_netns(f"/run/netns/{host}", bind)


def _start_time(pid: int) -> int | None:
    from stages.runtime.oci.statefile import start_time

    return start_time(pid)


def execute(container_id: str, *, base: Path | None = None, stdio=None, record: StepRecord | None = None,
            on_running=None, keep_output: bool = False, host_files: bool = True) -> int | None:
    """Create, start and wait for a prepared container, then release what it held (not its upper
    directory). Returns its exit code (128 + N when signal N ended it). This is the monitor's work.

    Whatever happens — an error halfway, Ctrl-C — everything made so far is undone, and the record says
    ``stopped``. ``on_running(record)`` is called once the container's program runs. ``keep_output``:
    its stdout and stderr go where ``stdio`` says *and* into its log (:class:`stages.runtime.attach.Output`),
    for ``stages logs`` later. ``host_files``: its own /etc/hosts, /etc/hostname and /etc/resolv.conf
    (:mod:`stages.runtime.hostfiles`); a build step goes without, as its upper directory becomes a layer.
    """
    from stages.runtime import flags, hostfiles, oci

    record = record if record is not None else StepRecord(f"stages run {container_id}")
    monitor = {"monitor_pid": os.getpid(), "monitor_started": _start_time(os.getpid())}
    info = containers.read(container_id, base)
    if any(info.get(key) != value for key, value in monitor.items()):
        # a detached container: its monitor is not the process that prepared it
        info = containers.update(container_id, base, **monitor)
    options = Options(**info["options"])
    where = containers.directory(container_id, base)
    bundle = where / "bundle"
    rootfs = bundle / "rootfs"
    root = oci_root(base)
    exit_code = None
    with contextlib.ExitStack() as undo, record.active():
        undo.callback(_finish, container_id, base, record)
        for sub in (where / "upper", where / "work", rootfs):
            sub.mkdir(parents=True, exist_ok=True)
        # overlayfs wants the topmost lower layer first (lowerdir=top:...:bottom)
        overlay.mount(list(reversed(info["layers"])), where / "upper", where / "work", rootfs)
        init = overlay.init_program(base or containers.home()) if options.init else None
        config = flags.build_config(options, info["image_config"], str(rootfs), info["args"], init,
                                    info["limits"])
        # relative: below our own cgroup, in the stages parent, where Cgroup.open("stages-ID") finds it
        config["linux"]["cgroupsPath"] = f"stages/stages-{container_id}"
        turned_off = flags.turned_off(options)
        if turned_off:
            record.add(_note(f"# {turned_off}", "a default of Docker's left out, as asked"))
        # /etc/hosts, /etc/hostname, /etc/resolv.conf: the container's own, bound over the image's
        if host_files:
            config["mounts"] += hostfiles.mounts(hostfiles.write(where, config["hostname"], options.network),
                                                 config["mounts"])
        output = terminal = None
        if options.tty:
            # -t: a pseudo-terminal of its own (process.terminal); its master comes to us (console=)
            from stages.runtime import attach

            ours = stdio or (None, None, None)
            terminal = attach.Terminal(
                stdin=0 if options.interactive and ours[0] is None else None,
                stdout=1 if ours[1] is None else attach.descriptor(ours[1], 1),
                log_path=where / containers.LOG_FILE if keep_output else None)
            undo.callback(terminal.close)
            terminal.configure(config["process"])
        elif keep_output:
            from stages.runtime import attach

            output = attach.Output(where / containers.LOG_FILE, stdio)
            undo.callback(output.close)
            stdio = output.stdio
        oci.write_bundle(bundle, config)
        record.add(_note(f"# config.json written: {bundle}/config.json", "the OCI bundle for the runtime"))
        state = oci.create(container_id, str(bundle), root=root, stdio=stdio, record=record,
                           **({"console": terminal.receive} if terminal is not None else {}))
        if output is not None:
            output.created()
        if options.network == "bridge":
            # written down first: a monitor killed halfway through attach leaves a record that says
            # there is a veth to remove
            containers.update(container_id, base, init=init, network={"mode": "bridge"})
            network = network_manager(base, record)
            attachment = network.attach(container_id, state["pid"])
            if host_files:
                hostfiles.add_address(where, config["hostname"], attachment.address)
            for item in options.publish:
                host_port, container_port = flags.parse_publish(item)
                network.publish(container_id, host_port, container_port)
            attached = {"mode": "bridge", "address": attachment.address, "gateway": attachment.gateway,
                        "veth": attachment.veth_host, "ports": options.publish}
        else:
            attached = {"mode": options.network}  # nothing to release later: written with the rest
        oci.start(container_id, root=root, record=record)
        # The steps first (`run -d` reads them once the record says running), then one write for all
        # that is known now (each write is a record rewritten under the lock)
        containers.write_steps(container_id, record.to_dicts(), base)
        info = containers.update(container_id, base, status="running", pid=state["pid"], init=init,
                                 network=attached, started=containers.now())
        if on_running is not None:
            on_running(info)
        if terminal is not None:
            terminal.attach()  # until the container's side of the terminal closes: its processes ended
        elif output is not None:
            output.relay()  # until the container's output ends: all its processes have gone
        code = oci.wait(container_id, root=root)
        # The init ends as its command did; the setup process passes that on (a signal as -N)
        exit_code = 128 - code if code is not None and code < 0 else code
        containers.update(container_id, base, use_reserve=True, exit_code=exit_code,
                          oom_killed=_oom_killed(container_id, root, exit_code))
    return exit_code


def _oom_killed(container_id: str, root: str, exit_code: int | None) -> bool:
    """Whether the kernel's OOM killer killed a process of the container (Docker's ``OOMKilled``): its
    memory cgroup counts it (v2 memory.events ``oom_kill``, v1 memory.oom_control ``oom_kill``, since
    Linux 4.13; before that, a SIGKILL after the limit was hit, memory.failcnt). Read before the cgroup
    goes."""
    from stages.runtime.oci import container as oci_container
    from stages.runtime.oci import statefile

    try:
        cgroup = oci_container._cgroup_of(statefile.read(container_id, root))
    except StagesError:
        return False
    if cgroup is None or "memory" not in cgroup.directories:
        return False
    stats = cgroup.stats()
    if stats.oom_kills is not None:
        return stats.oom_kills > 0
    return exit_code == 128 + signal.SIGKILL and bool(stats.memory_limit_hits)


def _note(shell: str, what: str):
    from stages.steps import Step

    return Step(shell=shell, what=what, where="host")


def _finish(container_id: str, base: Path | None, record: StepRecord | None = None,
            mark_stopped: bool = True) -> None:
    """Release what a container holds once it has stopped: the runtime's state (kills what is left) and
    cgroup, the network, the overlay mount. Safe to call twice, and after a crash. ``mark_stopped``:
    the record then says so (not when ``stages start`` has claimed it already)."""
    from stages.runtime import oci

    root = oci_root(base)
    with contextlib.suppress(StagesError):
        oci.delete(container_id, force=True, root=root, record=record)
    try:
        current = containers.read(container_id, base)
        network = (current.get("network") or {}).get("mode")
    except StagesError:
        current = None
        network = "bridge"  # no record to tell: ask the network (a no-op if it never attached it)
    if network == "bridge":
        with contextlib.suppress(StagesError, OSError):
            network_manager(base, record if record is not None else StepRecord()).detach(container_id)
    overlay.unmount(containers.directory(container_id, base) / "bundle" / "rootfs")
    if mark_stopped and current is not None and not (current.get("status") == "stopped"
                                                     and current.get("finished")):
        with contextlib.suppress(StagesError):  # (the second call, from `stages rm`, has nothing to add)
            containers.update(container_id, base, use_reserve=True, status="stopped",
                              finished=containers.now())


def run(options: Options, *, base: Path | None = None, record: StepRecord | None = None,
        stdio=None) -> tuple[dict, int | None]:
    """``stages run``: a foreground container (this process is its monitor), or with ``options.detach`` a
    monitor started in its own session, and back as soon as the container runs. Returns its record and
    exit code (None when detached)."""
    info = prepare(options, base)
    if options.detach:
        return start_detached(info, base, record), None
    started = []
    # If this process dies (SIGKILL), the watcher finishes what it started: see watch().
    watcher = _start_watcher(info["id"], base, info.get("monitor_started"))
    try:
        try:
            with _proxy_signals(info["id"], base):
                # a container that stays (no --rm) keeps its output for `stages logs`, as a detached one
                code = execute(info["id"], base=base, stdio=stdio, record=record,
                               on_running=started.append, keep_output=not options.remove)
        except OSError as error:
            # The runtime raises the kernel's own error for a step that failed (its message names it)
            if options.remove or not started:
                with contextlib.suppress(StagesError):
                    remove(info["id"], force=True, base=base)
            from stages.runtime.store import is_full, no_space

            if is_full(error):
                raise no_space(error) from None
            raise StagesError(f"the container could not be run: {error.strerror or error}",
                              "run it again with --explain to see the step that failed") from error
        except BaseException:
            # A container that never ran is not kept (Docker would keep it as "Created"): nothing is left
            # behind by a run that failed halfway, or by Ctrl-C.
            if options.remove or not started:
                with contextlib.suppress(StagesError):
                    remove(info["id"], force=True, base=base)
            raise
        if options.remove:
            remove(info["id"], force=True, base=base)
    finally:
        watcher.stop()
    return info, code


# -- when the client of a foreground run dies -------------------------------------------------------
# A foreground `stages run` is its container's monitor: the setup process is its child, it waits, it
# releases, and with --rm it removes. Killed (SIGKILL: nothing of it runs any more), nobody would: the
# container would run on unwatched, an init waiting on exec.fifo would wait for ever, and the record, the
# cgroup and the overlay mount would stay. docker run leaves that to the daemon, which owns the container;
# here a small *watcher* does it: forked before the container is created, in a session of its own, it
# holds nothing of the client's (its stdio is /dev/null) and waits on a pidfd of the client
# (pidfd_open(2): readable once that process has ended). When the client ends normally it kills the
# watcher; when the client dies first, the watcher becomes the monitor.
class _Watcher:
    def __init__(self, pid: int = 0, popen=None):
        self.pid, self.popen = pid, popen

    def stop(self) -> None:
        if self.popen is not None:
            self.popen.kill()
            self.popen.wait()
        elif self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


def _start_watcher(container_id: str, base: Path | None, client_started: int | None) -> _Watcher:
    """The watcher of this process's foreground container: forked when this process is single-threaded,
    else a fresh ``python -m stages.runtime.monitor --watch`` (as for the monitor, fork(2) copies one
    thread only)."""
    client = os.getpid()
    if _single_threaded():
        pid = os.fork()
        if pid == 0:
            try:
                import gc

                gc.disable()
                _detach_from_caller()
                if base is not None:
                    os.environ["STAGES_HOME"] = str(base)
                watch(client, client_started, container_id, base)
            finally:
                os._exit(0)
        return _Watcher(pid)
    import subprocess

    env = dict(os.environ)
    if base is not None:
        env["STAGES_HOME"] = str(base)
    return _Watcher(popen=subprocess.Popen(
        [sys.executable, "-m", "stages.runtime.monitor", "--watch", str(client), str(client_started),
         container_id], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env=env, close_fds=True))


def _detach_from_caller() -> None:
    """In a forked helper: a session of its own (no Ctrl-C, no SIGHUP from the terminal), /dev/null as
    stdio and nothing else of the caller's open (a pipe held open would keep `stages run | cat` going)."""
    os.setsid()
    for number in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(number, signal.SIG_IGN)
    nothing = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(nothing, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))


def _wait_for_end(pid: int, started: int | None) -> None:
    """Until process ``pid`` (the one that started at ``started``) has ended: a pidfd (pidfd_open(2)),
    which works for any process, not only a child; else a look every 50 ms."""
    import select

    from stages.runtime.oci.statefile import alive

    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        fd = None
    try:
        while alive(pid, started):  # (after the open: the pidfd is of the right process, or of none)
            if fd is not None:
                select.select([fd], [], [])
            else:
                time.sleep(0.05)
    finally:
        if fd is not None:
            os.close(fd)


def watch(client: int, client_started: int | None, container_id: str, base: Path | None = None) -> None:
    """Wait for the foreground run ``client``; if it dies before it ends its container's life, become its
    monitor: wait for the container to end, release what it held, and remove it with --rm (or if it never
    ran: a run that failed halfway keeps nothing)."""
    _wait_for_end(client, client_started)
    try:
        info = containers.read(container_id, base)
    except StagesError:
        return  # removed (the run ended), or damaged: `stages rm -f` is the way then
    if info.get("monitor_pid") != client:
        return  # `stages start` has claimed it since
    remove_it = bool(info.get("options", {}).get("remove"))
    if info.get("status") == "stopped" and info.get("finished"):
        if remove_it:  # the client died while removing it
            with contextlib.suppress(StagesError, OSError):
                remove(container_id, force=True, base=base)
        return
    # the monitor now: `stages ps` says Up while it runs, and `stages prune` leaves it alone
    with contextlib.suppress(StagesError):
        info = containers.update(container_id, base, monitor_pid=os.getpid(),
                                 monitor_started=_start_time(os.getpid()))
    state = containers.runtime_state(container_id) or {}
    if containers.runtime_status(container_id) == "running":
        _wait_for_end(state["pid"], (state.get("stages") or {}).get("init_started"))
    # created, or still being created: nothing will start it now (its init would wait on exec.fifo for
    # ever); oci.delete in _finish kills it, and its setup process
    with contextlib.suppress(StagesError, OSError):
        _finish(container_id, base)
    if remove_it or not info.get("started"):
        with contextlib.suppress(StagesError, OSError):
            remove(container_id, force=True, base=base)


def start(name: str, *, attach: bool = False, base: Path | None = None, record: StepRecord | None = None,
          stdio=None) -> tuple[dict, int | None]:
    """``stages start``: run a stopped container again, with the configuration it was run with: the same
    name and ID, the same upper directory (the files it wrote are there), a new process, cgroup and veth.

    With ``attach`` this process is its monitor and its output comes here (and into its log), else a
    monitor starts it in the background. Returns its record and exit code (None when not attached). A
    running container is left as it is. If it cannot start, it stays, stopped, as it was.
    """
    from stages import kernel
    from stages.errors import NotRootError

    if not kernel.is_root():
        raise NotRootError("starting a container")
    info = containers.find(name, base)
    with containers.locked(base):
        # Claimed under the lock: of two `stages start` at once, the second finds it starting already.
        info = containers.read(info["id"], base)
        if containers.status(info) != "stopped":
            return info, None
        _check_ports(Options(**info["options"]), base, info["id"])
        info.update(status="creating", monitor_pid=os.getpid(), monitor_started=_start_time(os.getpid()))
        containers.write(info, base)
    # whatever a monitor that died left behind (a no-op after a clean stop)
    _finish(info["id"], base, mark_stopped=False)
    info = containers.read(info["id"], base)
    for key in ("error", "started", "finished", "pid", "oom_killed"):
        info.pop(key, None)
    info.update(network=None, exit_code=None, steps=[])
    with containers.locked(base):
        containers.write(info, base)
    if not attach:
        try:
            return start_detached(info, base, record, keep=True), None
        except BaseException:
            _finish(info["id"], base)
            raise
    try:
        with _proxy_signals(info["id"], base):
            code = execute(info["id"], base=base, stdio=stdio, record=record, keep_output=True)
    except OSError as error:
        raise StagesError(f"the container could not be started: {error.strerror or error}",
                          f"run it again with: stages run --explain ... {info['image']}") from error
    if info["options"].get("remove"):
        remove(info["id"], force=True, base=base)
    return info, code


def restart(name: str, timeout: float = 10.0, base: Path | None = None,
            record: StepRecord | None = None) -> dict:
    """``stages restart``: :func:`stop` (SIGTERM, SIGKILL after ``timeout`` s), then :func:`start` it
    again in the background."""
    info = stop(name, timeout, base)
    return start(info["id"], base=base, record=record)[0]


#: Signals a foreground ``stages run`` passes on to its container (``docker run --sig-proxy``); Ctrl-C's
#: SIGINT reaches the container directly, from the terminal, as it is in our process group.
PROXIED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def _proxy_signals(container_id: str, base: Path | None):
    """While a foreground container runs, a signal sent to ``stages run`` goes to the container, whose
    end then ends us the ordinary way (everything released), instead of killing us halfway."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(number, _frame):
        from stages.runtime import oci

        with contextlib.suppress(StagesError, OSError):
            oci.kill(container_id, number, root=oci_root(base))

    previous = {number: signal.signal(number, forward) for number in PROXIED}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def start_detached(info: dict, base: Path | None = None, record: StepRecord | None = None,
                   keep: bool = False) -> dict:
    """Start the monitor of a prepared container and wait until its program runs (or failed). A container
    that cannot start is removed, unless ``keep`` (``stages start``: it stays as it was)."""
    where = containers.directory(info["id"], base)
    log = os.open(where / containers.LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    ready, ready_write = os.pipe()  # the monitor writes one byte into it once the container runs
    try:
        monitor = _start_monitor(info["id"], base, log, ready_write)
    finally:
        os.close(log)
        os.close(ready_write)
    try:
        return _wait_running(info, base, record, keep, monitor, ready)
    finally:
        os.close(ready)


def _start_monitor(container_id: str, base: Path | None, log: int, ready: int):
    """The monitor, in a session of its own (setsid(2)), its output into ``log``: forked from this
    process when it is single-threaded (fork(2) copies one thread only), else a fresh interpreter.
    Returns an object with ``pid`` and ``poll()`` (None while it runs), as :class:`subprocess.Popen`."""
    if _single_threaded():
        import gc

        pid = os.fork()
        if pid == 0:  # the monitor: never returns into the caller's code
            code = 1
            try:
                # A collection could run the finalizer of a caller's object that closes a descriptor
                # number we reuse below (and would copy every page the caller holds, fork(2)).
                gc.disable()
                os.setsid()
                nothing = os.open(os.devnull, os.O_RDONLY)
                for target, fd in enumerate((nothing, log, log)):
                    os.dup2(fd, target)
                # nothing of the caller's stays open for the container's lifetime (as close_fds=True)
                os.closerange(3, ready)
                os.closerange(ready + 1, os.sysconf("SC_OPEN_MAX"))
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # not a caller's (a test's capture)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                if base is not None:
                    os.environ["STAGES_HOME"] = str(base)
                from stages.runtime import monitor

                code = monitor.main([container_id], ready=ready)
            except BaseException:  # noqa: B036 - reported in the container's log, never raised into the caller
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        return _Forked(pid)
    import subprocess

    env = dict(os.environ)
    if base is not None:
        env["STAGES_HOME"] = str(base)
    with open(os.devnull) as nothing:
        return subprocess.Popen([sys.executable, "-m", "stages.runtime.monitor", container_id, str(ready)],
                                stdin=nothing, stdout=log, stderr=log, start_new_session=True, env=env,
                                close_fds=True, pass_fds=(ready,))


class _Forked:
    """A forked monitor, with the two things :func:`start_detached` asks of a :class:`subprocess.Popen`."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(self.pid, os.WNOHANG)
                if done:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _wait_running(info: dict, base: Path | None, record: StepRecord | None, keep: bool, monitor,
                  ready: int) -> dict:
    """Until the monitor says the container runs (a byte in ``ready``), or it ended, or time ran out."""
    import select

    where = containers.directory(info["id"], base)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        ended = monitor.poll() is not None
        try:
            current = containers.read(info["id"], base)
        except containers.NoSuchContainerError:
            if ended:  # --rm, and it ran and ended already
                return dict(info, status="stopped")
            raise
        if current.get("error") and ended:
            error = current["error"]
            if not keep:
                remove(info["id"], force=True, base=base)
            failed = StagesError(error["message"], error.get("hint"))
            failed.__class__ = _error_class(error.get("type", ""))
            raise failed
        if current.get("status") == "running" and current.get("monitor_pid") == monitor.pid:
            break
        if ended:
            if current.get("status") == "stopped" and current.get("started"):
                break  # it ran, and ended already
            try:
                said = (where / containers.LOG_FILE).read_text(errors="replace").strip().splitlines()[-3:]
            except OSError:
                said = []
            if not keep:
                remove(info["id"], force=True, base=base)
            raise StagesError("the container's monitor ended before the container ran"
                              + (": " + " / ".join(said) if said else ""),
                              "run it in the foreground (without -d) with --explain to see each step")
        if time.monotonic() > deadline:
            raise StagesError(f"the container did not start within {START_TIMEOUT:g} s",
                              f"stages rm -f {info['name']}; then try again")
        # Woken by the monitor's byte, or by its end of file, else a look at the record again in 50 ms
        if ready >= 0 and select.select([ready], [], [], 0.05)[0]:
            if not os.read(ready, 1):
                ready = -1  # end of file: no more news from the pipe, only from the record
        elif ready < 0:
            time.sleep(0.01)
    if record is not None:
        record.extend(containers.read_steps(info["id"], base) or current.get("steps") or [])
    # The monitor is not our child any more once we exit; reaping it is init's work (or a subreaper's).
    return current


def _error_class(name: str) -> type:
    from stages import errors

    found = getattr(errors, name, None) or getattr(containers, name, None)
    return found if isinstance(found, type) and issubclass(found, StagesError) else StagesError


# -- the other verbs ------------------------------------------------------------------------------------
def wait_stopped(container_id: str, timeout: float | None, base: Path | None = None) -> bool:
    """Wait until the container is stopped (its monitor recorded it); whether it is."""
    def current() -> dict:
        try:
            return containers.lookup(container_id, base)
        except containers.NoSuchContainerError:  # removed by its monitor (--rm): stopped, and done
            return {"id": container_id, "status": "stopped"}

    deadline = None if timeout is None else time.monotonic() + timeout
    while containers.status(current()) != "stopped":
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    # the monitor records the exit code, then releases; wait for it to finish that
    while containers.process_alive(*(lambda r: (r.get("monitor_pid"), r.get("monitor_started")))(
            current())):
        if deadline is not None and time.monotonic() > deadline + 10:
            break
        time.sleep(0.02)
    return True


def kill(name: str, sig: int | str = "KILL", base: Path | None = None) -> dict:
    """``stages kill``: send a signal to the container's PID 1 (its init forwards it to the command)."""
    from stages.runtime import oci

    info = containers.find(name, base)
    if containers.status(info) != "running":
        raise StagesError(f"container {info['name']} is not running", "`stages ps -a` shows its state")
    oci.kill(info["id"], oci.signal_number(sig), root=oci_root(base))
    return info


def stop(name: str, timeout: float = 10.0, base: Path | None = None) -> dict:
    """``stages stop``: SIGTERM, and SIGKILL if it has not stopped after ``timeout`` seconds."""
    from stages.runtime import oci

    info = containers.find(name, base)
    if containers.status(info) != "running":
        return info
    with contextlib.suppress(StagesError, ProcessLookupError):
        oci.kill(info["id"], signal.SIGTERM, root=oci_root(base))
    if not wait_stopped(info["id"], timeout, base):
        with contextlib.suppress(StagesError, ProcessLookupError):
            oci.kill(info["id"], signal.SIGKILL, root=oci_root(base))
        wait_stopped(info["id"], 10.0, base)
    try:
        return containers.lookup(info["id"], base)
    except containers.NoSuchContainerError:
        return dict(info, status="stopped", removed=True)  # --rm: its monitor removed it


def remove(name: str, force: bool = False, base: Path | None = None) -> dict:
    """``stages rm``: a stopped container's overlay mount, upper directory, cgroup, veth and record.
    ``force`` kills a running one first. A container whose record is damaged is removed by its ID all
    the same (what runs is found in the OCI runtime's state). Nothing is written before everything is
    deleted, so that ``rm`` frees space on a full disk."""
    info = containers.find(name, base)
    if containers.status(info) != "stopped":
        if not force:
            raise StagesError(f"container {info['name']} is running", f"stop it first, or: stages rm -f "
                              f"{info['name']}")
        if info.get("monitor_pid") != os.getpid():
            with contextlib.suppress(StagesError, ProcessLookupError):
                kill(info["id"], "KILL", base)
            wait_stopped(info["id"], 10.0, base)
    _finish(info["id"], base, mark_stopped=False)
    if info.get("damaged"):
        # its runtime state may be gone too: the cgroup is found by its name (cgroupsPath stages-ID), and
        # removing it kills what is left in it
        from stages.errors import CgroupError
        from stages.isolate.cgroups import Cgroup

        with contextlib.suppress(CgroupError, OSError):
            Cgroup.open(f"stages-{info['id']}").remove()
    where = containers.directory(info["id"], base)
    # out of sight in one rename(2) first, so that nobody lists a half-removed container as damaged
    going = where.with_name(f".removing-{info['id']}")
    try:
        os.rename(where, going)
    except OSError:
        going = where
    overlay.remove_tree(going)
    if ((base or containers.home()) / "network").is_dir():
        # again, now that there is room: on a full disk the network state could not be written above
        with contextlib.suppress(StagesError, OSError):
            network_manager(base, StepRecord()).detach(info["id"])
    return info


def prune(base: Path | None = None, notes: list[str] | None = None) -> list[str]:
    """``stages prune``: remove every stopped container, and whatever a crashed run left (a runtime
    state, a cgroup, a veth, an overlay mount nobody owns, a killed build's scratch directory). Returns
    the names removed; ``notes`` receives a sentence for everything else it did or left alone.

    A container whose record is damaged is left as it is, running or not (its upper directory may be
    all someone has of its work): a note says so, and how to remove it."""
    from stages.runtime import oci

    notes = notes if notes is not None else []
    removed = []
    for info in containers.all_records(base):
        if info.get("damaged"):
            running = containers.status(info) != "stopped"
            notes.append(f"left container {info['id']} alone{' (it runs)' if running else ''}: its record "
                         f"{info['damaged']}: `stages rm -f {info['id']}` removes it")
        elif containers.status(info) == "stopped":
            with contextlib.suppress(containers.NoSuchContainerError):  # (removed meanwhile: by its --rm)
                remove(info["id"], force=True, base=base)
                removed.append(info["name"])
    root = oci_root(base)
    states = oci.list_containers(root)  # before the records: a record is written before its state
    top = (base or containers.home()) / "containers"
    with containers.locked(base):  # no record is half-written while we look (reserve holds the lock)
        live = {info["id"] for info in containers.all_records(base)}
        for entry in top.iterdir() if top.is_dir() else []:
            if entry.name.startswith(".removing-"):
                overlay.remove_tree(entry)  # an `rm` killed halfway
            elif not entry.name.startswith(".") and entry.name not in live and entry.is_dir():
                overlay.remove_tree(entry)  # a directory whose record was never written
    for state in states:
        if state["id"] not in live:
            with contextlib.suppress(StagesError):
                oci.delete(state["id"], force=True, root=root)
                notes.append(f"removed the runtime state and cgroup of {state['id']}, which had no record")
    if ((base or containers.home()) / "network").is_dir():  # never a network touched for nothing
        live = {info["id"] for info in containers.all_records(base)}
        network = None
        try:
            network = network_manager(base, StepRecord())
            gone = network.prune(live)
        except (StagesError, OSError) as error:
            notes.append(f"the network was left as it is: {error}")
        else:
            notes.extend(f"removed the veth and address of {cid}, which had no record" for cid in gone)
        notes.extend(network.notes if network is not None else [])
    from stages.runtime import store

    notes.extend(f"removed {name}, left by a build or import that was killed"
                 for name in store.prune_scratch())
    return removed


def exec_in(name: str, args: list[str], *, env: list[str] | None = None, workdir: str | None = None,
            user: str | None = None, base: Path | None = None, stdio=None,
            record: StepRecord | None = None, tty: bool = False) -> int | None:
    """``stages exec``: run ``args`` in a running container's namespaces and cgroup; its exit code.
    ``tty``: a terminal of its own, attached to ours (with our input when ``stdio`` leaves stdin ours)."""
    from stages.runtime import flags, oci

    info = containers.find(name, base)
    if containers.status(info) != "running":
        raise StagesError(f"container {info['name']} is not running", f"start it again: stages start "
                          f"{info['name']}")
    bundle = containers.directory(info["id"], base) / "bundle"
    config = _config(bundle)
    process = dict(config["process"])
    process["args"] = list(args)
    process["env"] = flags.merge_env(process.get("env", []), flags.parse_env(env or []))
    if workdir:
        process["cwd"] = workdir
    if user:
        uid, gid = flags.parse_user(user, str(bundle / "rootfs"))
        process["user"] = {"uid": uid, "gid": gid}
    process["terminal"] = False  # the container's own -t is not ours
    process.pop("consoleSize", None)
    if not tty:
        code = oci.exec_process(info["id"], process, root=oci_root(base), stdio=stdio, record=record)
        return 128 - code if code is not None and code < 0 else code
    from stages.runtime import attach

    ours = stdio or (None, None, None)
    terminal = attach.Terminal(stdin=0 if ours[0] is None else None, stdout=attach.descriptor(ours[1], 1))
    terminal.configure(process)

    def received(master: int, terminal_name: str) -> None:
        # the relay runs beside us while exec_process waits for the process to end
        terminal.receive(master, terminal_name)
        terminal.start()

    try:
        terminal.follow_window()
        code = oci.exec_process(info["id"], process, root=oci_root(base), stdio=stdio, record=record,
                                console=received)
        terminal.join(timeout=2.0)  # its terminal closed as it ended (unless a background job holds it)
    finally:
        terminal.close()
    return 128 - code if code is not None and code < 0 else code


def _config(bundle: Path) -> dict:
    import json

    with open(bundle / "config.json") as handle:
        return json.load(handle)


def logs(name: str, follow: bool = False, out=None, base: Path | None = None) -> None:
    """``stages logs``: what a container wrote to its stdout and stderr (detached, or in the foreground
    without --rm); ``follow`` keeps printing until it stops."""
    info = containers.find(name, base)
    path = containers.directory(info["id"], base) / containers.LOG_FILE
    out = out or sys.stdout.buffer
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return  # it never ran, or was run before foreground runs kept their output
    with handle:
        while True:
            chunk = handle.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not follow or containers.status(containers.read(info["id"], base)) == "stopped":
                chunk = handle.read()
                if chunk:
                    out.write(chunk)
                    out.flush()
                return
            time.sleep(0.05)


def inspect(name: str, base: Path | None = None) -> dict:
    """``stages inspect``: the record, with the state as it is now."""
    info = containers.find(name, base)
    # (a record written before the steps had a file of their own holds them itself)
    info = dict(info, steps=containers.read_steps(info["id"], base) or info.get("steps") or [])
    info["state"] = {"status": containers.status(info), "exit_code": info.get("exit_code"),
                     "oom_killed": bool(info.get("oom_killed")),
                     "pid": info.get("pid") if containers.status(info) == "running" else 0,
                     "description": containers.exit_description(info)}
    info["paths"] = {"directory": str(containers.directory(info["id"], base)),
                     "rootfs": str(containers.directory(info["id"], base) / "bundle" / "rootfs"),
                     "log": str(containers.directory(info["id"], base) / containers.LOG_FILE)}
    from stages.runtime.hostfiles import FILES  # docker inspect's HostsPath, HostnamePath, ResolvConfPath

    directory = containers.directory(info["id"], base)
    info["paths"].update({name: str(directory / name) for name in FILES.values()})
    return info
