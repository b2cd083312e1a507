"""``stages-oci``, runc's command line over our OCI runtime: each test drives the real command as conmon does
(one process per operation) and looks at the effect on the machine.

The test process is a child subreaper while a test runs (prctl(2) PR_SET_CHILD_SUBREAPER), as conmon is:
what the command leaves running when it exits is re-parented to us, so that the leak check sees it.
"""

from __future__ import annotations

import inspect
import json
import os
import select
import shlex
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from stages import kernel
from stages.isolate import cgroups
from stages.runtime import oci
from stages.runtime.oci import statefile

pytestmark = pytest.mark.root

SCRIPT = Path(sys.executable).parent / "stages-oci"
#: The console script when it is installed (pip install -e .), else the module itself.
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "stages.runtime.oci.cli"]
SCHEMA_DIRECTORY = Path("/usr/share/gocode/src/github.com/opencontainers/runtime-spec/schema")
PR_SET_CHILD_SUBREAPER = 36


class Result:
    def __init__(self, code: int, out: Path, err: Path):
        self.code = code
        self.out_path = out
        self.err_path = err

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def json(self):
        return json.loads(self.out)


class Reaper:
    """conmon's part: collect every child of ours that ends, the commands and what they leave to us (the
    init of a detached create is re-parented to the subreaper, and its exit status is ours to collect)."""

    def __init__(self):
        self.statuses: dict[int, int] = {}
        self.condition = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="reaper", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid:
                with self.condition:
                    self.statuses[pid] = status
                    self.condition.notify_all()
            elif self.stopping:
                return
            else:
                time.sleep(0.005)

    def wait(self, pid: int, timeout: float) -> int:
        with self.condition:
            if not self.condition.wait_for(lambda: pid in self.statuses, timeout):
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"stages-oci (PID {pid}) did not finish within {timeout} s")
            return os.waitstatus_to_exitcode(self.statuses.pop(pid))

    def stop(self, timeout: float = 5.0) -> None:
        """Collect what is still ending, then stop (what stays alive is the leak check's to report)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            time.sleep(0.01)
        self.stopping = True
        self.thread.join()


class Runtime:
    """``stages-oci --root <the test's own> ...`` with stdout and stderr in files (a container created by
    the command keeps them open, as it keeps conmon's pipes)."""

    def __init__(self, directory: Path, reaper: Reaper):
        self.directory = directory
        self.root = directory / "state"
        self.reaper = reaper
        self.count = 0

    def command(self, *args, options=()) -> list[str]:
        return [*COMMAND, "--root", str(self.root), *map(str, options), *map(str, args)]

    def spawn(self, *args, options=(), out: Path | None = None, err: Path | None = None, extra=()) -> int:
        argv = self.command(*args, options=options)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, str(out), flags, 0o644),
                   (os.POSIX_SPAWN_OPEN, 2, str(err), flags, 0o644) if err else (os.POSIX_SPAWN_DUP2, 1, 2),
                   *extra]
        return os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)

    def __call__(self, *args, options=(), timeout: float = 60) -> Result:
        self.count += 1
        out = self.directory / f"out-{self.count}"
        err = self.directory / f"err-{self.count}"
        pid = self.spawn(*args, options=options, out=out, err=err)
        return Result(self.reaper.wait(pid, timeout), out, err)

    def state(self, container_id: str) -> dict:
        result = self("state", container_id)
        assert result.code == 0, result.err
        return result.json()

    def wait_for(self, container_id: str, status: str, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(container_id)
            if state["status"] == status or time.monotonic() > deadline:
                return state
            time.sleep(0.05)


@pytest.fixture
def runtime(tmp_path, busybox_rootfs):
    """A state root of the test's own, and this process as the subreaper of what the command leaves,
    collecting it (busybox_rootfs first: the reaper must not collect the children of other fixtures)."""
    kernel.prctl(PR_SET_CHILD_SUBREAPER, 1)
    reaper = Reaper()
    try:
        yield Runtime(tmp_path, reaper)
    finally:
        try:
            for item in oci.list_containers(str(tmp_path / "state")):
                oci.delete(item["id"], force=True, root=str(tmp_path / "state"))
        finally:
            kernel.prctl(PR_SET_CHILD_SUBREAPER, 0)
            reaper.stop()


def bundle(tmp_path: Path, rootfs: Path, args: list[str], name: str = "bundle", change=None,
           **options) -> Path:
    config = oci.default_spec(args, rootfs=str(rootfs), **options)
    if change:
        change(config)
    return Path(oci.write_bundle(tmp_path / name, config))


def name(tmp_path: Path, suffix: str = "") -> str:
    return f"cli-{os.getpid()}-{tmp_path.name[-16:]}{suffix}"[:60]


def wait_for_text(path: Path, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while text not in path.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.read_text()


def pid_1_inside(pid: int) -> bool:
    """Whether host PID ``pid`` is PID 1 of its own PID namespace (the last NSpid, proc(5))."""
    with open(f"/proc/{pid}/status") as handle:
        line = next(line for line in handle if line.startswith("NSpid:"))
    numbers = line.split()[1:]
    return len(numbers) > 1 and numbers[-1] == "1"


# -- the lifecycle -------------------------------------------------------------------------------------------
def test_create_start_kill_delete_walks_creating_created_running_stopped(tmp_path, runtime, busybox_rootfs):
    container = name(tmp_path)
    path = bundle(tmp_path, busybox_rootfs, ["sh", "-c", "echo started; exec sleep 60"], hostname="clibox")
    pid_file = tmp_path / "init.pid"

    # creating: catch the command between writing its state and the init reporting, and stop it there
    seen = []
    for _ in range(5):
        out = tmp_path / "container-output"
        create = runtime.spawn("create", "--bundle", path, "--pid-file", pid_file, container, out=out)
        state_file = runtime.root / container / statefile.STATE_FILE
        while not state_file.exists() and create not in runtime.reaper.statuses:
            pass
        os.kill(create, signal.SIGSTOP)
        try:
            seen.append(runtime.state(container)["status"])
        finally:
            os.kill(create, signal.SIGCONT)
            assert runtime.reaper.wait(create, 60) == 0, out.read_text()
        if seen[-1] == "creating":
            break
        assert runtime("delete", "--force", container).code == 0
    assert "creating" in seen, seen

    state = runtime.state(container)
    assert state["status"] == "created" and state["id"] == container and state["bundle"] == str(path)
    assert state == oci.state(container, root=str(runtime.root))  # the library's, word for word
    pid = int(pid_file.read_text())
    assert pid == state["pid"] and pid_1_inside(pid)
    assert "started" not in out.read_text()  # created: the init waits, the program has not run

    listed = runtime("list", "--format", "json").json()
    assert [(item["id"], item["status"], item["pid"]) for item in listed] == [(container, "created", pid)]
    assert runtime("list", "-q").out.split() == [container]

    assert runtime("start", container).code == 0
    assert runtime.state(container)["status"] == "running"
    assert "started" in wait_for_text(out, "started")
    again = runtime("start", container)
    assert again.code == 1 and "only a created container can be started" in again.err

    assert runtime("kill", container, "KILL").code == 0
    state = runtime.wait_for(container, "stopped")
    assert state["status"] == "stopped" and state["pid"] == 0
    assert runtime("kill", container, "KILL").code == 1  # nothing left to signal

    assert runtime("delete", container).code == 0
    gone = runtime("state", container)
    assert gone.code == 1 and "does not exist" in gone.err
    assert runtime("list", "-q").out == ""
    assert not (runtime.root / container).exists()


def test_sigterm_during_create_undoes_it(tmp_path, runtime, busybox_rootfs):
    container = name(tmp_path)
    path = bundle(tmp_path, busybox_rootfs, ["sleep", "60"])
    out = tmp_path / "create-output"
    codes = []
    for _ in range(5):  # until the signal lands while create is still at work
        create = runtime.spawn("create", "--bundle", path, "--pid-file", tmp_path / "pid", container, out=out)
        state_file = runtime.root / container / statefile.STATE_FILE
        while not state_file.exists() and create not in runtime.reaper.statuses:
            pass
        os.kill(create, signal.SIGSTOP)
        os.kill(create, signal.SIGTERM)  # delivered when it goes on
        os.kill(create, signal.SIGCONT)
        codes.append(runtime.reaper.wait(create, 60))
        if codes[-1] != 0:
            break
        assert runtime("delete", "--force", container).code == 0  # it was done already: again
        (tmp_path / "pid").unlink()
    assert codes[-1] == 128 + signal.SIGTERM, (codes, out.read_text())
    assert "interrupted by SIGTERM" in out.read_text() and "Traceback" not in out.read_text()
    # nothing is left: no state, no PID file, no cgroup, no process (the leak check)
    assert not (runtime.root / container).exists() and not (tmp_path / "pid").exists()
    assert runtime("list", "-q").out == ""


def test_state_follows_the_runtime_spec_schema(tmp_path, runtime, busybox_rootfs):
    if not (SCHEMA_DIRECTORY / "state-schema.json").exists():
        pytest.skip(f"no {SCHEMA_DIRECTORY}/state-schema.json: apt-get install golang-github-opencontainers-"
                    "specs-dev")
    import jsonschema
    import referencing

    def load(file_name: str) -> dict:
        return json.loads((SCHEMA_DIRECTORY / file_name).read_text())

    registry = referencing.Registry().with_resource(
        "defs.json", referencing.Resource.from_contents(load("defs.json"), referencing.jsonschema.DRAFT4))
    validator = jsonschema.Draft4Validator(load("state-schema.json"), registry=registry)

    container = name(tmp_path)
    path = bundle(tmp_path, busybox_rootfs, ["sleep", "60"],
                  change=lambda config: config.update(annotations={"org.example.test": "yes"}))
    assert runtime("create", "-b", path, container).code == 0
    states = [runtime.state(container)]
    assert runtime("start", container).code == 0
    states.append(runtime.state(container))
    assert runtime("kill", container, "9").code == 0
    states.append(runtime.wait_for(container, "stopped"))
    assert [state["status"] for state in states] == ["created", "running", "stopped"]
    for state in states:
        validator.validate(state)
        assert state["annotations"] == {"org.example.test": "yes"}
    # the check itself can fail: a state without a bundle, or with a status the spec does not name
    broken = [dict(states[0], status="sleeping"), {k: v for k, v in states[0].items() if k != "bundle"}]
    assert all(list(validator.iter_errors(item)) for item in broken)


def test_kill_by_name_and_by_number(tmp_path, runtime, busybox_rootfs):
    container = name(tmp_path)
    script = ("trap 'echo got-usr1' USR1; trap 'echo got-hup' HUP; trap 'echo got-term; exit 3' TERM; "
              "echo ready; while :; do usleep 10000; done")
    path = bundle(tmp_path, busybox_rootfs, ["sh", "-c", script])
    created = runtime("create", "--bundle", path, container)
    assert created.code == 0, created.err
    assert runtime("start", container).code == 0
    wait_for_text(created.out_path, "ready")

    assert runtime("kill", container, "USR1").code == 0  # a name without SIG
    assert "got-usr1" in wait_for_text(created.out_path, "got-usr1")
    assert runtime("kill", container, str(int(signal.SIGHUP))).code == 0  # a number
    assert "got-hup" in wait_for_text(created.out_path, "got-hup")
    wrong = runtime("kill", container, "NOSUCH")
    assert wrong.code == 1 and "is not a signal" in wrong.err and "Traceback" not in wrong.err
    assert runtime.state(container)["status"] == "running"
    assert runtime("kill", container).code == 0  # SIGTERM, the default
    assert "got-term" in wait_for_text(created.out_path, "got-term")
    assert runtime.wait_for(container, "stopped")["status"] == "stopped"
    assert runtime("delete", container).code == 0


def test_kill_all_signals_every_process_of_the_container(tmp_path, runtime, busybox_rootfs):
    container = name(tmp_path)
    # PID 1 has no handler for SIGTERM, so only its children can die of it (pid_namespaces(7))
    script = "sleep 1000 & sleep 1000 & echo ready; wait; echo children-gone; exec sleep 1000"
    created = runtime("create", "-b", bundle(tmp_path, busybox_rootfs, ["sh", "-c", script]), container)
    assert runtime("start", container).code == 0
    wait_for_text(created.out_path, "ready")
    private = json.loads((runtime.root / container / statefile.STATE_FILE).read_text())["stages"]
    cgroup = cgroups.Cgroup.open(private["cgroup"])
    assert len(cgroup.pids()) == 3
    # ps: the same three, as PIDs and as ps(1)'s lines
    assert runtime("ps", "--format", "json", container).json() == cgroup.pids()
    table = runtime("ps", container).out.splitlines()
    assert table[0].split()[:2] == ["UID", "PID"] and len(table) == 4
    assert sum(line.split()[7:] == ["sleep", "1000"] for line in table) == 2  # and their sh

    assert runtime("kill", container, "TERM").code == 0  # the init alone: it ignores it
    time.sleep(0.3)
    assert len(cgroup.pids()) == 3 and "children-gone" not in created.out
    assert runtime("kill", "--all", container, "TERM").code == 0
    assert "children-gone" in wait_for_text(created.out_path, "children-gone")
    assert runtime.state(container)["status"] == "running"
    assert runtime("delete", "-f", container).code == 0


def test_delete_force_of_a_running_container_leaves_nothing(tmp_path, runtime, busybox_rootfs):
    container = name(tmp_path)
    path = bundle(tmp_path, busybox_rootfs, ["sleep", "60"])
    assert runtime("create", "-b", path, container).code == 0
    assert runtime("start", container).code == 0
    pid = runtime.state(container)["pid"]
    private = json.loads((runtime.root / container / statefile.STATE_FILE).read_text())["stages"]
    directories = cgroups.Cgroup.open(private["cgroup"]).unique_directories()
    assert directories and all(os.path.isdir(d) for d in directories)
    assert str(pid) in (Path(directories[0]) / "cgroup.procs").read_text().split()

    refused = runtime("delete", container)
    assert refused.code == 1 and "is running" in refused.err
    assert runtime("delete", "--force", container).code == 0
    assert not statefile.alive(pid, None)
    assert not any(os.path.exists(d) for d in directories)
    assert not (runtime.root / container).exists()
    # as runc: a forced delete of what is not there is done; an unforced one says it does not exist
    assert runtime("delete", "-f", container).code == 0
    missing = runtime("delete", container)
    assert missing.code == 1 and "does not exist" in missing.err


def test_a_container_created_from_another_cgroup_is_found_and_removed(tmp_path, runtime, busybox_rootfs):
    # podman runs `create` through conmon, which lives in a cgroup of its own, and `delete` itself: the
    # container's cgroup must be found where create made it, not below the caller's cgroup
    container = name(tmp_path)
    path = bundle(tmp_path, busybox_rootfs, ["sleep", "60"])
    elsewhere = cgroups.Cgroup.create(f"cli-elsewhere-{os.getpid()}")
    try:
        enter = "; ".join(f"echo $$ > {d}/cgroup.procs" for d in elsewhere.unique_directories())
        command = shlex.join(runtime.command("create", "--bundle", path, container))
        out = tmp_path / "create-output"
        actions = [(os.POSIX_SPAWN_OPEN, 1, str(out), os.O_WRONLY | os.O_CREAT, 0o644),
                   (os.POSIX_SPAWN_DUP2, 1, 2)]
        pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", f"{enter}; exec {command}"], os.environ,
                             file_actions=actions)
        assert runtime.reaper.wait(pid, 60) == 0, out.read_text()
        private = json.loads((runtime.root / container / statefile.STATE_FILE).read_text())["stages"]
        directories = sorted(set(private["cgroup_directories"].values()))
        below = {controller: directory.startswith(elsewhere.directories[controller] + "/")
                 for controller, directory in private["cgroup_directories"].items()
                 if controller in elsewhere.directories}
        assert below and all(below.values()), private["cgroup_directories"]
        assert runtime("start", container).code == 0
        assert runtime("kill", "--all", container, "KILL").code == 0
        assert runtime.wait_for(container, "stopped")["status"] == "stopped"
        assert runtime("delete", container).code == 0
        assert not any(os.path.exists(d) for d in directories)
    finally:
        elsewhere.remove()


def test_no_descriptor_of_the_caller_reaches_the_container(tmp_path, runtime, busybox_rootfs):
    # conmon leaves pipes open for the runtime; a descriptor of a host directory in the container would be
    # a way out of its rootfs (runc's CVE-2024-21626): the program gets stdio and nothing else
    container = name(tmp_path)
    path = bundle(tmp_path, busybox_rootfs, ["sh", "-c", "ls /proc/self/fd; echo end; exec sleep 60"])
    host = [(os.POSIX_SPAWN_OPEN, 5, "/", os.O_RDONLY | os.O_DIRECTORY, 0),
            (os.POSIX_SPAWN_OPEN, 7, "/etc/hostname", os.O_RDONLY, 0)]
    out = tmp_path / "container-output"
    assert runtime.reaper.wait(runtime.spawn("create", "-b", path, container, out=out, extra=host), 60) == 0
    assert runtime("start", container).code == 0
    listed = wait_for_text(out, "end").split()
    assert listed[:3] == ["0", "1", "2"] and listed[-1] == "end", listed
    assert "5" not in listed and "7" not in listed, listed
    exec_out = tmp_path / "exec-output"
    pid = runtime.spawn("exec", container, "ls", "/proc/self/fd", out=exec_out, extra=host)
    assert runtime.reaper.wait(pid, 60) == 0, exec_out.read_text()
    listed = exec_out.read_text().split()
    assert listed[:3] == ["0", "1", "2"] and "5" not in listed and "7" not in listed, listed
    assert runtime("delete", "--force", container).code == 0


# -- exec ----------------------------------------------------------------------------------------------------
def test_exec_runs_inside_from_a_process_file_or_arguments(tmp_path, runtime, busybox_rootfs):
    container = name(tmp_path)
    path = bundle(tmp_path, busybox_rootfs, ["sleep", "60"], hostname="inside")
    assert runtime("create", "-b", path, container).code == 0
    assert runtime("start", container).code == 0
    init = runtime.state(container)["pid"]

    process = tmp_path / "process.json"
    process.write_text(json.dumps({"args": ["sh", "-c", "echo host=$(hostname) one=$(cat /proc/1/comm)"],
                                   "cwd": "/", "env": ["PATH=/bin:/sbin:/usr/bin"]}))
    result = runtime("exec", "--process", process, container)
    assert result.code == 0, result.err
    assert result.out.split() == ["host=inside", "one=sleep"] and os.uname().nodename != "inside"

    result = runtime("exec", "-e", "GREETING=hello", "--cwd", "/tmp", container,
                     "sh", "-c", "echo $GREETING $PWD")
    assert (result.code, result.out.strip()) == (0, "hello /tmp"), result.err
    assert runtime("exec", container, "sh", "-c", "exit 5").code == 5

    pid_file = tmp_path / "exec.pid"
    result = runtime("exec", "--detach", "--pid-file", pid_file, container, "sleep", "30")
    assert result.code == 0, result.err
    pid = int(pid_file.read_text())
    assert os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{init}/ns/pid")
    assert os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")

    missing = runtime("exec", container)
    assert missing.code == 1 and "needs a command" in missing.err
    assert runtime("kill", container, "KILL").code == 0
    assert runtime.wait_for(container, "stopped")["status"] == "stopped"
    stopped = runtime("exec", container, "true")
    # runc exec ends a failure of its own with 255, apart from the 0-254 of the command
    assert stopped.code == 255 and "exec needs a running container" in stopped.err
    assert runtime("delete", container).code == 0


# -- terminals ---------------------------------------------------------------------------------------------
def read_until(fd: int, text: str, timeout: float = 10) -> str:
    """What the terminal's master gives until ``text`` shows (or the terminal closes, or time is up)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: every slave end is closed
                break
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


@pytest.mark.skipif("console_socket" not in inspect.signature(oci.create).parameters,
                    reason="the library has no terminals (console_socket) yet")
def test_a_terminal_through_the_console_socket(tmp_path, runtime, busybox_rootfs):
    container = name(tmp_path)
    path = bundle(tmp_path, busybox_rootfs, ["sh", "-c", "tty; read line; echo got:$line; exec sleep 60"],
                  change=lambda config: config["process"].update(terminal=True))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        # as conmon: listen, let create connect and send the master, take it
        listener.bind(str(tmp_path / "console.sock"))
        listener.listen(1)
        created = runtime("create", "--bundle", path, "--console-socket", tmp_path / "console.sock",
                          container)
        assert created.code == 0, created.err
        listener.settimeout(10)
        connection, _ = listener.accept()
        with connection:
            message, fds, _, _ = socket.recv_fds(connection, 4096, 1)
    assert len(fds) == 1 and message.decode().startswith("/dev/pts/")
    master = fds[0]
    try:
        assert runtime("start", container).code == 0
        assert "/dev/pts/" in read_until(master, "/dev/pts/")
        os.write(master, b"typed\n")
        assert "got:typed" in read_until(master, "got:typed")

        # exec -t: a terminal of its own, to a console socket of its own
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(tmp_path / "exec.sock"))
            listener.listen(1)
            result = runtime("exec", "--tty", "--console-socket", tmp_path / "exec.sock", container,
                             "sh", "-c", "tty; echo exec-tty")
            assert result.code == 0, result.err
            listener.settimeout(10)
            connection, _ = listener.accept()
            with connection:
                _, exec_fds, _, _ = socket.recv_fds(connection, 4096, 1)
        try:
            assert "exec-tty" in read_until(exec_fds[0], "exec-tty")
        finally:
            for fd in exec_fds:
                os.close(fd)
        no_socket = runtime("exec", "--tty", container, "true")
        assert no_socket.code == 1 and "--console-socket" in no_socket.err
    finally:
        os.close(master)
    assert runtime("delete", "--force", container).code == 0


# -- run -----------------------------------------------------------------------------------------------------
def test_run_exits_with_the_containers_code_and_removes_it(tmp_path, runtime, busybox_rootfs):
    container = name(tmp_path)
    path = bundle(tmp_path, busybox_rootfs, ["sh", "-c", "echo from-inside; hostname; exit 7"],
                  hostname="runbox",
                  change=lambda config: config["linux"].update(cgroupsPath="machine.slice:libpod:abc"))
    log = tmp_path / "log"
    # options runc takes that mean nothing different here must not fail: --no-pivot, --no-new-keyring,
    # --systemd-cgroup (conmon passes it when podman's cgroup manager is systemd)
    result = runtime("run", "--bundle", path, "--no-pivot", "--no-new-keyring", container,
                     options=("--systemd-cgroup", "--log", log, "--debug"))
    assert result.code == 7, result.err
    assert result.out.split() == ["from-inside", "runbox"]
    assert runtime("list", "-q").out == "" and not (runtime.root / container).exists()
    text = log.read_text()
    assert "always pivots" in text and "level=debug" in text and "pivot_root" in text

    result = runtime("run", "-b", path, container)
    assert result.code == 7

    # run --detach: back once it runs, and the container stays until deleted
    sleeper = bundle(tmp_path, busybox_rootfs, ["sleep", "60"], name="sleeper")
    result = runtime("run", "--detach", "--bundle", sleeper, "--pid-file", tmp_path / "run.pid", container)
    assert result.code == 0, result.err
    state = runtime.state(container)
    assert state["status"] == "running" and int((tmp_path / "run.pid").read_text()) == state["pid"]
    assert pid_1_inside(state["pid"])
    assert runtime("delete", "--force", container).code == 0


# -- errors --------------------------------------------------------------------------------------------------
def test_an_error_goes_to_stderr_and_to_the_log_as_a_json_line(tmp_path, runtime):
    empty = tmp_path / "empty"
    empty.mkdir()
    log = tmp_path / "oci-log"
    result = runtime("create", "--bundle", empty, "--pid-file", tmp_path / "pid", "bad",
                     options=("--log-format=json", "--log", log))
    assert result.code == 1
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines and lines[-1]["level"] == "error" and "time" in lines[-1]
    assert "has no config.json" in lines[-1]["msg"] and "hint:" in lines[-1]["msg"]
    assert "has no config.json" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "pid").exists() and not (runtime.root / "bad").exists()

    text_log = tmp_path / "text-log"
    assert runtime("state", "bad", options=("--log", text_log)).code == 1
    assert 'level=error msg="container \'bad\' does not exist' in text_log.read_text()


def test_a_wrong_command_line_says_so_in_one_sentence(tmp_path, runtime):
    log = tmp_path / "log"
    for args, words in ((["create", "--frobnicate", "x"], "unknown option or argument: --frobnicate"),
                        (["frobnicate"], "unknown command 'frobnicate'"),
                        (["kill"], "kill: missing ID"),
                        (["create", "--preserve-fds", "2", "x"], "--preserve-fds 2")):
        result = runtime(*args, options=("--log-format", "json", "--log", log))
        assert result.code in (1, 2), (args, result.err)
        assert words in result.err and "Traceback" not in result.err, result.err
        assert len(result.err.strip().splitlines()) == 1, result.err
        assert words in json.loads(log.read_text().splitlines()[-1])["msg"]
    assert runtime("--version").out.startswith("stages-oci version ")
    assert runtime("-v").code == 0 and runtime("--help").code == 0 and runtime("exec", "--help").code == 0


# -- pause, features, spec ----------------------------------------------------------------------------------
@pytest.mark.skipif("freezer" not in cgroups.detect().extras,
                    reason="no freezer here (cgroup v1 freezer, or cgroup v2 on Linux 5.2+)")
def test_pause_and_resume(tmp_path, runtime, busybox_rootfs):
    container = name(tmp_path)
    count_up = "i=0; while :; do i=$((i+1)); echo $i; usleep 2000; done"
    path = bundle(tmp_path, busybox_rootfs, ["sh", "-c", count_up])
    created = runtime("create", "-b", path, container)
    assert runtime("start", container).code == 0
    wait_for_text(created.out_path, "3")

    def count() -> int:
        numbers = created.out.split()
        return int(numbers[-1]) if numbers else 0

    assert runtime("pause", container).code == 0
    assert runtime.state(container)["status"] == "paused"
    before = count()
    time.sleep(0.3)
    assert count() == before
    assert runtime("resume", container).code == 0
    assert runtime.state(container)["status"] == "running"
    time.sleep(0.3)
    assert count() > before
    again = runtime("resume", container)
    assert again.code == 1 and "not paused" in again.err
    assert runtime("delete", "--force", container).code == 0


def test_features_tell_what_the_library_accepts(tmp_path, runtime, busybox_rootfs):
    result = runtime("features")
    assert result.code == 0, result.err
    features = result.json()
    assert features["ociVersionMin"] == "1.0.0" and features["ociVersionMax"].startswith("1.")
    assert set(features) >= {"ociVersionMin", "ociVersionMax", "hooks", "mountOptions", "linux",
                             "annotations"}
    linux = features["linux"]
    assert {"mount", "pid", "network", "uts", "ipc", "user"} <= set(linux["namespaces"])
    assert "CAP_SYS_ADMIN" in linux["capabilities"]
    assert all(word.startswith("CAP_") for word in linux["capabilities"])
    assert set(linux["cgroup"]) == {"v1", "v2", "systemd", "systemdUser", "rdma"}
    assert all(isinstance(value, bool) for value in linux["cgroup"].values())
    for name_ in ("seccomp", "apparmor", "selinux", "intelRdt"):
        assert isinstance(linux[name_]["enabled"], bool)
    if linux["seccomp"]["enabled"]:
        assert "SCMP_ACT_ERRNO" in linux["seccomp"]["actions"]
    assert all(isinstance(value, str) for value in features["annotations"].values())
    assert set(features["hooks"]) <= {"prestart", "createRuntime", "createContainer", "startContainer",
                                      "poststart", "poststop"}
    # true, not hopeful: the library takes every listed mount option, and refuses one left out
    assert "idmap" not in features["mountOptions"]
    for option in features["mountOptions"]:
        config = oci.default_spec(["true"], rootfs=str(busybox_rootfs))
        # the source exists, for "bind" and "rbind" (tmpfs ignores it)
        config["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": str(tmp_path),
                                 "options": [option]})
        oci.write_bundle(tmp_path / "b", config)
        oci.load(tmp_path / "b")
    config["mounts"][-1]["options"] = ["idmap"]
    oci.write_bundle(tmp_path / "b", config)
    with pytest.raises(oci.SpecError):
        oci.load(tmp_path / "b")
    # ... every hook kind listed, and every seccomp action
    config = oci.default_spec(["true"], rootfs=str(busybox_rootfs))
    config["hooks"] = {kind: [{"path": "/bin/true"}] for kind in features["hooks"]}
    oci.write_bundle(tmp_path / "b", config)
    oci.load(tmp_path / "b")
    if linux["seccomp"]["enabled"]:
        assert "SCMP_ACT_NOTIFY" not in linux["seccomp"]["actions"]
        for action in linux["seccomp"]["actions"] + ["SCMP_ACT_NOTIFY"]:
            config = oci.default_spec(["true"], rootfs=str(busybox_rootfs))
            config["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW",
                                          "syscalls": [{"names": ["getppid"], "action": action}]}
            oci.write_bundle(tmp_path / "b", config)
            if action in linux["seccomp"]["actions"]:
                oci.load(tmp_path / "b")
            else:
                with pytest.raises(oci.SpecError):
                    oci.load(tmp_path / "b")


def test_spec_writes_a_default_config_once(tmp_path, runtime):
    target = tmp_path / "new"
    target.mkdir()
    assert runtime("spec", "--bundle", target).code == 0
    config = json.loads((target / "config.json").read_text())
    assert config["process"]["args"] == ["sh"] and config["root"]["path"] == "rootfs"
    assert {"type": "mount"} in config["linux"]["namespaces"]
    again = runtime("spec", "-b", target)
    assert again.code == 1 and "exists already" in again.err


def test_a_failing_poststart_or_poststop_hook_is_a_warning_in_the_log(tmp_path, runtime, busybox_rootfs):
    """runtime.md: a poststart or poststop hook that fails is a warning, and the lifecycle goes on; the
    warning reaches the supervisor's log (conmon reads it), and the command succeeds."""
    fail = {"path": "/bin/sh", "args": ["sh", "-c", "echo hook said no >&2; exit 4"]}

    def with_hooks(config):
        config["hooks"] = {"poststart": [fail], "poststop": [fail]}

    container = name(tmp_path)
    path = bundle(tmp_path, busybox_rootfs, ["sleep", "60"], change=with_hooks)
    log = tmp_path / "oci-log"
    options = ("--log-format=json", "--log", log)
    assert runtime("create", "-b", path, container, options=options).code == 0
    started = runtime("start", container, options=options)
    assert started.code == 0, started.err
    assert runtime.state(container)["status"] == "running"
    deleted = runtime("delete", "--force", container, options=options)
    assert deleted.code == 0, deleted.err
    assert not (runtime.root / container).exists()
    warnings = [json.loads(line) for line in log.read_text().splitlines()]
    warnings = [line["msg"] for line in warnings if line["level"] == "warning"]
    assert len(warnings) == 2, warnings
    assert "poststart" in warnings[0] and "poststop" in warnings[1], warnings
    assert all("status 4" in line or "exit" in line for line in warnings), warnings


def test_a_capability_that_cannot_be_granted_is_a_warning_in_the_log(tmp_path, runtime, busybox_rootfs):
    """config.md: a capability the kernel has no interface for MUST be logged as a warning, and the runtime
    SHOULD NOT fail (runtime-tools' process_capabilities_fail asks for CAP_TEST): the warning reaches the
    --log, and the container runs."""
    def with_test_capability(config):
        config["process"]["capabilities"]["bounding"].append("CAP_TEST")

    container = name(tmp_path)
    path = bundle(tmp_path, busybox_rootfs, ["echo", "ran"], change=with_test_capability)
    log = tmp_path / "oci-log"
    result = runtime("run", "-b", path, container, options=("--log-format=json", "--log", log))
    assert result.code == 0, result.err
    assert result.out == "ran\n"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    warnings = [line["msg"] for line in lines if line["level"] == "warning"]
    assert warnings == ["process.capabilities.bounding: 'CAP_TEST' is not a capability (capabilities(7)): "
                        "left out"], lines


# -- --preserve-fds, and signals in the foreground ---------------------------------------------------------
def read_all(fd: int, timeout: float = 20) -> bytes:
    """What a pipe gives until every write end is closed (or time is up)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            seen += chunk
    return seen


def with_pipes(runtime, tmp_path, *args, pipes: int = 1) -> tuple[int, list[bytes], Path]:
    """The command with the write ends of ``pipes`` new pipes as its descriptors 3, 4 ... (as conmon
    leaves a socket for socket activation); its exit code and what came through each pipe."""
    ends = [os.pipe() for _ in range(pipes)]
    out = tmp_path / f"piped-{runtime.count}"
    runtime.count += 1
    try:
        pid = runtime.spawn(*args, out=out,
                            extra=[(os.POSIX_SPAWN_DUP2, write, 3 + n) for n, (_, write) in enumerate(ends)])
    finally:
        for _, write in ends:
            os.close(write)
    try:
        code = runtime.reaper.wait(pid, 60)
        return code, [read_all(read) for read, _ in ends], out
    finally:
        for read, _ in ends:
            os.close(read)


def test_preserve_fds_passes_the_callers_descriptors_on(tmp_path, runtime, busybox_rootfs):
    container = name(tmp_path)
    path = bundle(tmp_path, busybox_rootfs, ["sh", "-c", "echo through-3 > /proc/self/fd/3"])
    code, (seen,), out = with_pipes(runtime, tmp_path, "run", "--preserve-fds", "1", "-b", path, container)
    assert (code, seen) == (0, b"through-3\n"), out.read_text()
    # without it the descriptor does not reach the container: the write fails, nothing comes through
    code, (seen,), out = with_pipes(runtime, tmp_path, "run", "-b", path, container)
    assert code != 0 and seen == b"" and "/proc/self/fd/3" in out.read_text()

    # create: the waiting init holds it until the program runs (conmon's create, then start)
    read, write = os.pipe()
    try:
        pid = runtime.spawn("create", "--preserve-fds", "1", "-b", path, container, out=tmp_path / "created",
                            extra=[(os.POSIX_SPAWN_DUP2, write, 3)])
        os.close(write)
        assert runtime.reaper.wait(pid, 60) == 0, (tmp_path / "created").read_text()
        assert runtime("start", container).code == 0
        assert read_all(read) == b"through-3\n"
    finally:
        os.close(read)
    assert runtime.wait_for(container, "stopped")["status"] == "stopped"
    assert runtime("delete", container).code == 0

    sleeper = bundle(tmp_path, busybox_rootfs, ["sleep", "60"], name="sleeper")
    assert runtime("run", "--detach", "-b", sleeper, container).code == 0
    code, seen, out = with_pipes(runtime, tmp_path, "exec", "--preserve-fds", "2", container,
                                 "sh", "-c", "echo three > /proc/self/fd/3; echo four > /proc/self/fd/4",
                                 pipes=2)
    assert (code, seen) == (0, [b"three\n", b"four\n"]), out.read_text()
    code, seen, out = with_pipes(runtime, tmp_path, "exec", container, "ls", "/proc/self/fd", pipes=2)
    listed = out.read_text().split()  # ls's own directory is 3
    assert code == 0 and seen == [b"", b""] and listed[:3] == ["0", "1", "2"] and "4" not in listed, listed
    code, _, out = with_pipes(runtime, tmp_path, "exec", "--preserve-fds", "3", container, "true", pipes=2)
    assert code == 255 and "descriptor 5 is not open" in out.read_text()  # runc exec's 255
    assert runtime("delete", "--force", container).code == 0


def container_pids(container: str, root: Path) -> list[int]:
    return oci.container._cgroup_of(statefile.read(container, str(root))).pids()


def test_signals_to_a_foreground_exec_or_run_reach_the_container(tmp_path, runtime, busybox_rootfs):
    # as runc: a supervisor that stops the command stops what it runs, and the command exits as that did
    container = name(tmp_path)
    trapping = "trap 'exit 3' INT; trap 'exit 4' TERM; echo ready; while :; do usleep 10000; done"
    path = bundle(tmp_path, busybox_rootfs, ["sh", "-c", trapping])
    out = tmp_path / "run-out"
    pid = runtime.spawn("run", "-b", path, container, out=out)
    assert "ready" in wait_for_text(out, "ready")
    os.kill(pid, signal.SIGINT)  # the init (PID 1 inside) gets only what it has a handler for
    assert runtime.reaper.wait(pid, 30) == 3, out.read_text()
    assert not (runtime.root / container).exists()

    assert runtime("run", "--detach", "-b", path, container).code == 0
    sleeping = ["sh", "-c", "echo ready; exec sleep 60"]
    for number, args, code in ((signal.SIGTERM, sleeping, 128 + signal.SIGTERM),
                               (signal.SIGHUP, sleeping, 128 + signal.SIGHUP),
                               (signal.SIGINT, ["sh", "-c", trapping], 3)):
        before = set(container_pids(container, runtime.root))
        out = tmp_path / f"exec-out-{number}"
        pid = runtime.spawn("exec", container, *args, out=out)
        # the exec'd process says it runs (new PIDs in the cgroup alone could be the init's usleeps, while
        # the command is still starting, before it listens for signals)
        assert "ready" in wait_for_text(out, "ready"), out.read_text()
        new = set(container_pids(container, runtime.root)) - before
        assert new, out.read_text()
        os.kill(pid, number)
        assert runtime.reaper.wait(pid, 30) == code, (number, out.read_text())
        deadline = time.monotonic() + 5
        while set(container_pids(container, runtime.root)) & new and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not set(container_pids(container, runtime.root)) & new  # the exec'd process has ended
    assert runtime("delete", "--force", container).code == 0


# -- start-up ------------------------------------------------------------------------------------------------
def test_state_start_and_delete_import_only_what_they_use(tmp_path, runtime, busybox_rootfs):
    # a supervisor runs these for every container: a hookless start imports neither the spec, the hooks nor
    # the step record (whose dataclasses import inspect), and state not even shutil
    container = name(tmp_path)
    path = bundle(tmp_path, busybox_rootfs, ["true"])
    assert runtime("create", "-b", path, container).code == 0
    probe = ("import sys\nfrom stages.runtime.oci import cli\ncode = cli.main(sys.argv[1:])\n"
             "print('MODULES', ' '.join(sorted(sys.modules)), file=sys.stderr)\nsys.exit(code)")

    def modules(*args) -> set[str]:
        out, err = tmp_path / "probe-out", tmp_path / "probe-err"
        argv = [sys.executable, "-c", probe, "--root", str(runtime.root), *args]
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        pid = os.posix_spawn(argv[0], argv, os.environ,
                             file_actions=[(os.POSIX_SPAWN_OPEN, 1, str(out), flags, 0o644),
                                           (os.POSIX_SPAWN_OPEN, 2, str(err), flags, 0o644)])
        assert runtime.reaper.wait(pid, 30) == 0, err.read_text()
        return set(err.read_text().partition("MODULES ")[2].split())

    heavy = {"stages.steps", "stages.runtime.oci.hooks", "stages.runtime.oci.spec", "stages.kernel",
             "dataclasses", "socket", "datetime"}
    assert not modules("state", container) & (heavy | {"shutil"})
    assert not modules("start", container) & heavy
    assert runtime.wait_for(container, "stopped")["status"] == "stopped"
    assert "stages.runtime.oci.hooks" not in modules("delete", container)
    assert not (runtime.root / container).exists()
