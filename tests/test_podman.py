"""podman drives stages-oci: conmon calls our runtime's command line as it calls runc (issue #6).

Every podman here runs with state of its own in a temporary directory (``--root``, ``--runroot``,
``--tmpdir``, CONTAINERS_CONF, CONTAINERS_STORAGE_CONF, CONTAINERS_REGISTRIES_CONF, the XDG directories)
and the configuration in tests/data/podman/: vfs storage (no overlay mounts on the host), file locks and
events, and podman's own cgroupfs manager. Every podman command runs in a cgroup namespace rooted at a
cgroup of the tests' own (podman_sandbox.CgroupNamespace), so the /libpod_parent/... podman makes, and
the absolute cgroupsPath it passes, land below that cgroup, never at the roots of the host's
hierarchies. Nothing is pulled: the image is a ``podman import`` of the session's busybox rootfs.

``STAGES_PODMAN_RUNTIME=runc`` runs the same tests with runc instead (through a wrapper that drops the
crun-only ``--cgroup-manager disabled``), to tell a podman problem from one of ours;
``STAGES_PODMAN_RUNTIME=/absolute/path`` runs them with that runtime.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import stat
import subprocess
import tarfile
import tempfile
import termios
import time
from pathlib import Path

import psutil
import pytest
from podman_sandbox import CgroupNamespace, sandbox, write_runc_wrapper

from stages import observe

pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("podman") is None or shutil.which("conmon") is None,
                       reason="podman and conmon are not installed (bash workshop.sh test installs them)"),
]

REPO = Path(__file__).resolve().parent.parent
STAGES_OCI = REPO / ".venv" / "bin" / "stages-oci"
IMAGE = "localhost/stages-busybox"
# podman's default RLIMIT_NOFILE (1048576) and RLIMIT_NPROC are above this machine's hard limits, and
# raising a hard limit needs CAP_SYS_RESOURCE, which we lack (setrlimit(2)): ask for what we may set.
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=32768:32768"]
RUN = ["run", "--network", "none", *LIMITS]


class Podman:
    """One podman installation in a temporary directory, driving ``runtime``."""

    def __init__(self, base: Path, runtime: str, namespace: CgroupNamespace):
        self.base = base
        self.namespace = namespace
        command, self.env = sandbox(base, [runtime], cgroups="enabled")
        self.command = [*namespace.prefix, *command, "--runtime", runtime]

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self.command, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def ok(self, *args: str, timeout: float = 60) -> str:
        result = self(*args, timeout=timeout)
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.returncode}\n{result.stderr}"
        return result.stdout

    def containers(self) -> dict[str, dict]:
        """``podman ps -a`` as JSON: name -> its entry (State, ExitCode, Id ...)."""
        listing = json.loads(self.ok("ps", "-a", "--format", "json") or "[]")
        return {entry["Names"][0]: entry for entry in listing}

    def ids(self) -> set[str]:
        """The ID of every container this podman ever made, from its events file (--rm ones too)."""
        events = self.ok("events", "--stream=false", "--filter", "type=container", "--format", "{{.ID}}")
        return set(events.split())

    def terminal(self, *args: str) -> Terminal:
        return Terminal([*self.command, *args], self.env)


class Terminal:
    """A command on a pseudo-terminal of its own, as if a person typed at it (pty(7))."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.master, slave = os.openpty()
        # 24x80, as a terminal window; podman passes its size on to the container's terminal
        fcntl.ioctl(slave, termios.TIOCSWINSZ, b"\x18\x00\x50\x00\x00\x00\x00\x00")

        def controlling_terminal():
            # a new session whose controlling terminal is the slave (TIOCSCTTY, tty_ioctl(4)), as a login
            # shell has: podman -t checks that stdin is a terminal and makes it raw
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen(command, env=env, stdin=slave, stdout=slave, stderr=slave,
                                        start_new_session=True, preexec_fn=controlling_terminal)
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 20) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.seen)
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} on the terminal within {timeout} s; it showed:\n"
                                     f"{self.seen}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: every slave is closed, the command has ended
                    chunk = b""
                if not chunk:
                    found = re.search(pattern, self.seen)
                    if found:
                        return found
                    raise AssertionError(f"the terminal closed without {pattern!r}; it showed:\n{self.seen}")
                self.seen += chunk.decode(errors="replace")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 30) -> int:
        try:
            code = self.process.wait(timeout)
        finally:
            with contextlib.suppress(OSError):
                while select.select([self.master], [], [], 0.2)[0] and os.read(self.master, 4096):
                    pass
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


def _cgroup_tree() -> set[str]:
    found = set()
    for top, _, _ in os.walk("/sys/fs/cgroup"):
        found.add(top)
    return found


def _mounts_below(podman: Podman) -> list[str]:
    """podman's mounts below its directory, in the mount namespace where it runs (and in ours)."""
    path = str(podman.base)
    targets = podman.namespace.mountinfo() + [m.target for m in observe.mounts()]
    return [target for target in targets if target == path or target.startswith(f"{path}/")]


def _outside(podman: Podman, paths) -> list[str]:
    """Of ``paths`` (cgroup directories), those outside the cgroup podman runs in."""
    return [path for path in paths if not any(path == d or path.startswith(d + "/")
                                              for d in podman.namespace.cgroup.directories)]


def _processes_naming(ids: set[str]) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if any(ident in line for ident in ids):
            found.append(f"{process.info['pid']}: {line[:120]}")
    return found


@pytest.fixture(scope="module")
def runtime(tmp_path_factory) -> str:
    if os.environ.get("STAGES_PODMAN_RUNTIME") == "runc":
        return write_runc_wrapper(tmp_path_factory.mktemp("runc") / "runc-wrapper")
    if os.environ.get("STAGES_PODMAN_RUNTIME", "").startswith("/"):
        return os.environ["STAGES_PODMAN_RUNTIME"]
    assert STAGES_OCI.exists(), f"{STAGES_OCI} is missing: pip install -e . (the stages-oci console script)"
    return str(STAGES_OCI)


@pytest.fixture(scope="module")
def podman(runtime, busybox_rootfs):
    """A podman of our own with the busybox image imported; afterwards nothing of it is left."""
    # a short path: conmon's sockets live below --tmpdir and --runroot (sun_path holds 108 bytes, unix(7))
    base = Path(tempfile.mkdtemp(prefix="stages-podman-", dir="/var/tmp"))
    cgroups_before = _cgroup_tree()
    namespace = CgroupNamespace(f"stages-podman-{os.getpid()}")
    engine = Podman(base, runtime, namespace)
    ids: set[str] = set()
    mounted: list[str] = []
    try:
        archive = base / "busybox.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(busybox_rootfs, arcname=".")
        engine.ok("import", str(archive), IMAGE)
        # podman's cgroupfs manager keeps /libpod_parent and /libpod_parent/conmon once made: made now, by
        # a first container, so that each test's leak check sees only what that test leaves
        engine.ok(*RUN, "--rm", IMAGE, "true")
        yield engine
        # whatever a failed test left: podman removes its containers, then we check the rest
        ids = engine.ids()
        engine("rm", "--all", "--force", "--time", "0")
        mounted = _mounts_below(engine)
    finally:
        namespace.close()  # kills what is left in podman's cgroup; its mount namespace goes with it
        for target in reversed([m.target for m in observe.mounts() if m.target.startswith(f"{base}/")]):
            subprocess.run(["umount", "-l", target], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    # podman's cgroups would be named libpod*, conmon, or after the container ID, anywhere in the tree
    new = [path for path in _cgroup_tree() - cgroups_before
           if re.search(r"libpod|conmon", path) or any(ident in path for ident in ids)]
    assert not new, f"cgroups made by podman or for its containers are still there: {new}"
    assert not mounted, f"podman left these mounted: {mounted}"


@pytest.fixture(autouse=True)
def settled(podman):
    """After each test, wait until podman has finished with its containers: `podman run --rm` returns with
    the exit code while `podman container cleanup`, which conmon starts when the container ends, may still
    be unmounting the container's /dev/shm below podman's directory."""
    yield
    deadline = time.monotonic() + 15
    while _mounts_below(podman) or _processes_naming({str(podman.base)}):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not _processes_naming({str(podman.base)}), "podman or conmon still runs"
    assert not _mounts_below(podman), "podman left mounts below its directory"


def _state_of(podman: Podman, runtime: str, ident: str) -> subprocess.CompletedProcess:
    """The runtime's ``state``, run where podman runs it (the state's cgroup paths are that namespace's)."""
    return subprocess.run([*podman.namespace.prefix, runtime, "state", ident], capture_output=True, text=True,
                          timeout=30)


def test_podman_run_returns_the_containers_exit_code(podman):
    cgroups_before = _cgroup_tree()
    assert podman(*RUN, "--rm", IMAGE, "true").returncode == 0
    assert podman(*RUN, "--rm", IMAGE, "false").returncode == 1
    seven = podman(*RUN, "--rm", IMAGE, "sh", "-c", "echo out; echo err >&2; exit 7")
    # stdout and stderr kept apart (podman's own warnings, if any, go to stderr too)
    assert (seven.returncode, seven.stdout) == (7, "out\n") and "err" in seven.stderr.splitlines(), seven
    # a command that is not in the image: podman's 127 (runc's too), with the runtime's reason
    missing = podman(*RUN, "--rm", IMAGE, "no-such-command")
    assert missing.returncode == 127 and "no-such-command" in missing.stderr, missing.stderr
    # --rm: podman removed every container, and none of them made a cgroup anywhere we did not
    assert podman.containers() == {}
    new = [path for path in _outside(podman, _cgroup_tree() - cgroups_before)
           if "libpod" in path or "conmon" in path]
    assert not new, new


def test_the_container_is_isolated_as_podman_asked(podman):
    out = podman.ok(*RUN, "--rm", "--hostname", "boxed", IMAGE, "sh", "-c",
                    "hostname; echo pid=$$; ls /sys/class/net; ulimit -n; cat /proc/self/cgroup")
    lines = out.splitlines()
    assert lines[:4] == ["boxed", "pid=1", "lo", "1024"], out
    assert os.uname().nodename != "boxed"
    # podman's bind mounts of /etc/hostname and /etc/hosts (files of its own) are in place
    files = podman.ok(*RUN, "--rm", "--hostname", "boxed", IMAGE, "sh", "-c",
                      "cat /etc/hostname; echo; grep -c boxed /etc/hosts")
    assert files.split() == ["boxed", "1"], files


def test_podmans_limits_are_the_containers(podman):
    """--pids-limit and --memory reach the container's cgroup, which it sees at /sys/fs/cgroup (a cgroup
    mount in podman's config.json), and the kernel enforces them."""
    limits = ["--pids-limit", "8", "--memory", "64m", "--memory-swap", "64m"]
    out = podman.ok(*RUN, "--rm", *limits, IMAGE, "sh", "-c",
                    "cd /sys/fs/cgroup; cat pids/pids.max 2>/dev/null || cat pids.max; "
                    "cat memory/memory.limit_in_bytes 2>/dev/null || cat memory.max")
    assert out.split() == ["8", str(64 << 20)], out
    # podman's --memory alone also allows as much swap again (Docker's default): linux.resources.memory.swap
    # is RAM plus swap, 128M, which the container reads in its cgroup (where the kernel accounts swap)
    out = podman.ok(*RUN, "--rm", "--memory", "64m", IMAGE, "sh", "-c",
                    "cd /sys/fs/cgroup; cat memory/memory.memsw.limit_in_bytes 2>/dev/null "
                    "|| cat memory.swap.max 2>/dev/null || echo unaccounted")
    assert out.strip() in (str(128 << 20), str(64 << 20), "unaccounted"), out
    forks = podman(*RUN, "--rm", *limits, IMAGE, "sh", "-c",
                   "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done; wait")
    assert forks.returncode != 0 and "can't fork" in forks.stderr, forks.stderr
    # what our runtime refuses reaches podman's user as its one sentence and hint (podman: 126, the
    # runtime failed), and --rm still removes the container
    # (block I/O throttling: linux.resources.blockIO.throttleReadBpsDevice, on any block device there is)
    device = next((path for path in ("/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/loop0", "/dev/zram0")
                   if os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode)), None)
    if device is None:
        pytest.skip("no block device here for --device-read-bps")
    refused = podman(*RUN, "--rm", "--memory", "64m", "--device-read-bps", f"{device}:1mb", IMAGE, "true")
    assert refused.returncode == 126, refused
    assert "throttleReadBpsDevice" in refused.stderr and "hint:" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert podman.containers() == {}


def test_podman_run_it_through_a_terminal(podman):
    terminal = podman.terminal(*RUN, "--rm", "-it", IMAGE, "sh")
    try:
        terminal.expect(r"/ # ")  # the shell's prompt
        terminal.type("tty; stty size\r")
        terminal.expect(r"/dev/pts/\d+\s+24 80")
        terminal.type("echo $((6*7))\r")
        terminal.expect(r"\r\n42\r\n")
        terminal.type("exit 3\r")
        assert terminal.wait() == 3, terminal.seen
    finally:
        terminal.close()


def test_a_detached_container_exec_stop_and_rm(podman, runtime):
    name = "stages-podman-sleeper"
    podman.ok(*RUN, "-d", "--name", name, IMAGE, "sh", "-c", "echo started; exec sleep 1000")
    try:
        entry = podman.containers()[name]
        ident = entry["Id"]
        assert entry["State"] == "running", entry
        # the runtime knows it under podman's ID, running, with the host PID podman reports
        pid = int(podman.ok("inspect", "--format", "{{.State.Pid}}", name))
        state = _state_of(podman, runtime, ident)
        assert state.returncode == 0, state.stderr
        assert json.loads(state.stdout)["status"] == "running"
        assert json.loads(state.stdout)["pid"] == pid
        # seen from the host: sleep is the process podman names, in namespaces of its own, and a child of
        # conmon (the subreaper that collects its exit status), not of our runtime
        assert psutil.Process(pid).cmdline() == ["sleep", "1000"]
        # what it wrote went through conmon (the pipes it gave our create) into podman's log
        deadline = time.monotonic() + 10
        while podman.ok("logs", name) != "started\n" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert podman.ok("logs", name) == "started\n"
        assert psutil.Process(pid).parent().name() == "conmon"
        theirs, ours = observe.namespace_inodes(pid), observe.namespace_inodes()
        for kind in ("mount", "uts", "ipc", "pid", "net"):
            assert theirs[kind] != ours[kind], f"the container shares the host's {kind} namespace"
        # podman's cgroupfs manager asked for /libpod_parent/libpod-ID, an absolute cgroupsPath, which our
        # runtime made from the root of podman's cgroup namespace: below the cgroup the tests gave podman,
        # in every hierarchy the container has, and in none outside it
        harness = os.path.basename(podman.namespace.cgroup.directories[0])
        its = observe.cgroups_of(pid)
        assert "pids" in its and f"/{harness}/libpod_parent/libpod-{ident}" in its["pids"], its
        for hierarchy, path in its.items():
            assert path == f"/{harness}" or f"/{harness}/" in path, (hierarchy, its)
        # ... and from inside: sleep is PID 1
        inside = podman(*["exec", name, "sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; exit 4"])
        assert (inside.returncode, inside.stdout) == (4, "sleep 1000 "), inside.stderr
        assert podman.ok("exec", name, "hostname") == ident[:12] + "\n"

        terminal = podman.terminal("exec", "-it", name, "sh")
        try:
            terminal.expect(r"/ # ")
            terminal.type("echo $((6*7)) $$\r")
            found = terminal.expect(r"\r\n42 (\d+)\r\n")
            assert int(found.group(1)) > 1  # not PID 1: the exec'd shell joined the container's namespaces
            terminal.type("exit 5\r")
            assert terminal.wait() == 5, terminal.seen
        finally:
            terminal.close()

        started = time.monotonic()
        # sleep as PID 1 has no handler for SIGTERM, which the kernel then does not deliver
        # (pid_namespaces(7)): podman waits 2 s and sends SIGKILL
        podman.ok("stop", "-t", "2", name)
        assert 1.5 < time.monotonic() - started < 30
        entry = podman.containers()[name]
        assert (entry["State"], entry["ExitCode"]) == ("exited", 137), entry
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        podman("rm", "--force", "--time", "0", name)
    assert name not in podman.containers()
    assert _state_of(podman, runtime, ident).returncode != 0, "the runtime still has the container"


def test_podman_init_creates_and_start_starts(podman, runtime):
    """podman init calls only the runtime's create: the container waits, created, until podman start."""
    name = "stages-podman-two-steps"
    podman.ok("create", "--name", name, "--network", "none", *LIMITS, IMAGE, "sh", "-c", "exit 9")
    try:
        assert podman.containers()[name]["State"] == "created"
        podman.ok("init", name)
        ident = podman.containers()[name]["Id"]
        assert podman.containers()[name]["State"] == "initialized"
        assert json.loads(_state_of(podman, runtime, ident).stdout)["status"] == "created"
        podman.ok("start", name)
        assert podman.ok("wait", name).strip() == "9"
        assert podman.containers()[name]["State"] == "exited"
    finally:
        podman("rm", "--force", "--time", "0", name)


def test_nothing_is_left_behind(podman, runtime):
    """After all of the above: no container, conmon, runtime state or mount of podman's is left."""
    ids = podman.ids()
    assert ids, "no test above ran a container"
    assert podman.containers() == {}
    assert not _processes_naming(ids)
    for ident in ids:
        assert _state_of(podman, runtime, ident).returncode != 0, f"the runtime still has {ident}"
    assert not _mounts_below(podman)


def test_podman_stats_reads_the_containers_cgroup(podman):
    """With podman's cgroupfs manager (no cgroups = "disabled"), podman stats reads the cgroup our runtime
    made where podman asked: the memory limit and the processes podman gave the container."""
    name = "stages-podman-stats"
    podman.ok(*RUN, "-d", "--name", name, "--memory", "64m", "--pids-limit", "20", IMAGE,
              "sh", "-c", "sleep 1000 & sleep 1000 & wait")
    try:
        deadline = time.monotonic() + 10
        while True:
            stats = json.loads(podman.ok("stats", "--no-stream", "--format", "json", name))[0]
            if stats.get("pids") in ("3", 3) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert str(stats["pids"]) == "3", stats  # sh and its two sleeps
        assert stats["mem_usage"].split("/")[-1].strip() == "67.11MB", stats  # 64 MiB, in podman's MB
    finally:
        podman("rm", "--force", "--time", "0", name)


def test_podman_pause_freezes_the_container_through_our_runtime(podman):
    name = "stages-podman-pause"
    podman.ok(*RUN, "-d", "--name", name, IMAGE, "sh", "-c", "while :; do echo x >/dev/null; done")
    try:
        pid = int(podman.ok("inspect", "--format", "{{.State.Pid}}", name))
        podman.ok("pause", name)
        assert podman.containers()[name]["State"] == "paused"
        # the kernel's freezer holds it: its state is "D"-like frozen, and it uses no CPU time meanwhile
        before = psutil.Process(pid).cpu_times().user
        time.sleep(0.5)
        assert psutil.Process(pid).cpu_times().user == before
        podman.ok("unpause", name)
        assert podman.containers()[name]["State"] == "running"
        deadline = time.monotonic() + 5
        while psutil.Process(pid).cpu_times().user == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert psutil.Process(pid).cpu_times().user > before
    finally:
        podman("rm", "--force", "--time", "0", name)
