"""Stage 3's engine: `stages run` and friends, each flag checked by its effect in a real container.

Every test runs the command line as a learner would (``python -m stages.cli``), with a temporary
STAGES_HOME (state, images, overlay mounts) and STAGES_RUN (the OCI runtime's state). The network tests
use a network namespace standing in for the host (STAGES_HOST_NETNS), never the host's own network.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from host_views import cgroup_file

from stages.isolate.network import test_host as make_test_host
from stages.runtime.containers import using_image

pytestmark = [pytest.mark.root]

_counter = iter(range(1_000_000))


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stages-home")


@pytest.fixture
def python() -> str:
    """The virtualenv's interpreter itself (not its realpath: the monitor it starts needs pyroute2)."""
    return sys.executable


@pytest.fixture
def stages(home, tmp_path, python):
    """``stages(*argv)`` runs the command line; returns the CompletedProcess."""
    env = dict(os.environ, STAGES_HOME=str(home), STAGES_RUN=str(tmp_path / "run"))
    env.pop("STAGES_HOST_NETNS", None)

    def call(*argv: str, check: bool = True, timeout: float = 60, **extra) -> subprocess.CompletedProcess:
        if "input" not in extra:
            extra["stdin"] = subprocess.DEVNULL
        result = subprocess.run([python, "-m", "stages.cli", *argv], capture_output=True, text=True,
                                env=env, timeout=timeout, **extra)
        if check and result.returncode != 0:
            raise AssertionError(f"stages {' '.join(argv)} -> {result.returncode}\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result

    call.env = env
    call.home = home
    yield call
    # whatever a failing test left: remove it, so that the leak check reports the test, not the next one
    subprocess.run([python, "-m", "stages.cli", "prune"], env=env, capture_output=True, timeout=60)
    for record in (home / "containers").glob("*/container.json"):
        subprocess.run([python, "-m", "stages.cli", "rm", "-f", record.parent.name], env=env,
                       capture_output=True, timeout=60)


def inspect(stages, name: str) -> dict:
    return json.loads(stages("inspect", name).stdout)[0]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- the process: exit code, env, -w, -u, hostname -----------------------------------------------------
def test_exit_code_env_workdir_user_and_hostname_come_through(stages):
    result = stages("run", "--rm", "--network", "none", "-e", "GREETING=hello there", "-w", "/tmp",
                    "-u", "1000:1001", "--hostname", "box", "busybox",
                    "sh", "-c", 'echo "$GREETING"; pwd; id -u; id -g; hostname; exit 3', check=False)
    assert result.returncode == 3, result.stderr
    assert result.stdout.split("\n")[:5] == ["hello there", "/tmp", "1000", "1001", "box"]
    assert stages("ps", "-a", "-q").stdout.strip() == ""  # --rm removed it


def test_interactive_passes_input_through_and_without_it_the_input_is_empty(stages):
    typed = stages("run", "-i", "--rm", "--network", "none", "busybox", "sh", input="echo typed; exit 4\n",
                   check=False)
    assert typed.returncode == 4 and typed.stdout == "typed\n"
    alone = stages("run", "--rm", "--network", "none", "busybox", "cat", input="not passed\n")
    assert alone.stdout == ""
    # -t from a pipe: the container still gets a terminal, our input goes through it (it echoes it)
    terminal = stages("run", "-it", "--rm", "--network", "none", "busybox", "sh", "-c",
                      "read line; tty; exit $line", input="5\n", check=False)
    assert terminal.returncode == 5 and "/dev/pts/0" in terminal.stdout


def test_the_container_has_its_own_pid_namespace_and_default_capabilities(stages):
    result = stages("run", "--rm", "--network", "none", "busybox", "sh", "-c",
                    "echo $$; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; hostname")
    lines = result.stdout.split("\n")
    assert lines[0] == "2"  # PID 1 is the init, the command is its child
    effective = int(lines[1].split()[1], 16)
    assert effective & (1 << 21) == 0  # CAP_SYS_ADMIN is not in Docker's default set
    assert effective & (1 << 0)  # CAP_CHOWN is
    assert lines[2].split() == ["NoNewPrivs:", "1"]
    assert lines[3] == "container"


def test_a_command_missing_from_the_image_unknown_image_bad_memory_and_taken_name(stages):
    missing = stages("run", "--rm", "busybox", "no-such-program", check=False)
    assert missing.returncode != 0 and "no-such-program was not found in the image" in missing.stderr
    unknown = stages("run", "--rm", "no-such-image", "sh", check=False)
    assert unknown.returncode != 0 and "there is no image 'no-such-image'" in unknown.stderr
    memory = stages("run", "--rm", "--memory", "lots", "busybox", "true", check=False)
    assert memory.returncode != 0 and "'lots' is not a memory size" in memory.stderr
    stages("run", "-d", "--name", "taken", "--network", "none", "busybox", "sleep", "30")
    try:
        again = stages("run", "--name", "taken", "--network", "none", "busybox", "true", check=False)
        assert again.returncode != 0 and "the name 'taken' is in use" in again.stderr
        assert "stages rm -f taken" in again.stderr
    finally:
        stages("rm", "-f", "taken")
    for result in (missing, unknown, memory, again):
        assert "Traceback" not in result.stderr
    assert stages("ps", "-a", "-q").stdout.strip() == ""


def test_a_run_that_fails_halfway_leaves_nothing(stages):
    # the user is looked up in the image's /etc/passwd once its rootfs is mounted: a failure halfway
    failed = stages("run", "-u", "nobody-here", "--network", "none", "busybox", "true", check=False)
    assert failed.returncode != 0 and "the image has no user 'nobody-here'" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert stages("ps", "-a", "-q").stdout.strip() == ""
    assert not [p for p in (stages.home / "containers").iterdir() if not p.name.startswith(".")]


def test_network_host_shares_the_hosts_network(stages):
    with open("/proc/net/route") as handle:  # the host's own devices (others' tests add and remove theirs)
        routed = {line.split()[0] for line in list(handle)[1:]}
    inside = stages("run", "--rm", "--network", "host", "busybox", "sh", "-c", "ls /sys/class/net")
    assert routed and routed <= set(inside.stdout.split())
    alone = stages("run", "--rm", "--network", "none", "busybox", "sh", "-c", "ls /sys/class/net")
    assert not routed & set(alone.stdout.split())


# -- the filesystem: overlayfs, -v, --read-only ---------------------------------------------------------
def test_writes_land_in_the_upper_directory_and_rm_removes_mount_upper_and_state(stages, home):
    stages("run", "--name", "writer", "--network", "none", "busybox", "sh", "-c", "echo data > /made-here")
    info = inspect(stages, "writer")
    directory = Path(info["paths"]["directory"])
    assert (directory / "upper" / "made-here").read_text() == "data\n"
    image_layer = Path(info["layers"][0])
    assert not (image_layer / "made-here").exists()  # the image's layer is untouched
    assert info["state"]["status"] == "stopped" and info["exit_code"] == 0
    stages("rm", "writer")
    assert not directory.exists()
    with open("/proc/self/mountinfo") as handle:
        assert str(directory) not in handle.read()


def test_volumes_bind_and_read_only_refuses_writes(stages, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "from-host").write_text("host says hi\n")
    result = stages("run", "--rm", "--network", "none", "-v", f"{shared}:/data", "busybox", "sh", "-c",
                    "cat /data/from-host; echo back > /data/from-container")
    assert result.stdout == "host says hi\n"
    assert (shared / "from-container").read_text() == "back\n"
    readonly = stages("run", "--rm", "--network", "none", "-v", f"{shared}:/data:ro", "busybox", "sh",
                      "-c", "echo no > /data/refused", check=False)
    assert readonly.returncode != 0 and "Read-only file system" in readonly.stderr
    assert not (shared / "refused").exists()


def test_read_only_rootfs_refuses_writes(stages):
    result = stages("run", "--rm", "--read-only", "--network", "none", "busybox", "sh", "-c",
                    "touch /x", check=False)
    assert result.returncode != 0 and "Read-only file system" in result.stderr
    writable = stages("run", "--rm", "--network", "none", "busybox", "sh", "-c", "touch /x && echo ok")
    assert writable.stdout == "ok\n"


# -- limits ----------------------------------------------------------------------------------------------
def test_memory_limit_kills_the_hog(stages):
    result = stages("run", "--rm", "--network", "none", "--memory", "32M", "busybox", "sh", "-c",
                    "head -c 200000000 /dev/zero | tail -n 1 | wc -c", check=False)
    assert result.stdout.strip() != "200000000"
    unlimited = stages("run", "--rm", "--network", "none", "busybox", "sh", "-c",
                       "head -c 50000000 /dev/zero | tail -n 1 | wc -c")
    assert unlimited.stdout.strip() == "50000000"  # the same hog, smaller, passes without a limit


def test_pids_limit_stops_the_fork_bomb(stages):
    # only shell builtins after the loop: with the limit reached, nothing more can be forked
    # the inner shell fills the limit and gives up; the outer one counts with builtins only
    script = ("sh -c 'for i in 1 2 3 4 5 6 7 8 9 10; do sleep 2 & done' 2>/dev/null; "
              "set -- /proc/[0-9]*; echo $#")
    limited = stages("run", "--rm", "--network", "none", "--pids-limit", "6", "busybox", "sh", "-c", script,
                     check=False)
    assert int(limited.stdout.split()[-1]) <= 6
    free = stages("run", "--rm", "--network", "none", "busybox", "sh", "-c", script)
    assert int(free.stdout.split()[-1]) >= 12


def test_cpus_are_written_to_the_cgroup(stages):
    stages("run", "-d", "--name", "halfcpu", "--cpus", "0.5", "--network", "none", "busybox", "sleep", "30")
    try:
        pid = inspect(stages, "halfcpu")["pid"]
        quota = cgroup_file(pid, "cpu", "cpu.cfs_quota_us", "cpu.max")
        assert quota.split()[0] == "50000"
    finally:
        stages("rm", "-f", "halfcpu")


# -- signals, stop, kill, zombies --------------------------------------------------------------------------
def test_stop_sends_term_and_the_command_sees_it(stages):
    stages("run", "-d", "--name", "polite", "--network", "none", "busybox", "sh", "-c",
           'trap "echo got TERM; exit 7" TERM; echo ready; while true; do sleep 0.1; done')
    wait_for(lambda: "ready" in stages("logs", "polite").stdout)
    started = time.monotonic()
    stages("stop", "-t", "10", "polite")
    assert time.monotonic() - started < 5
    assert inspect(stages, "polite")["exit_code"] == 7
    assert "got TERM" in stages("logs", "polite").stdout
    assert "Exited (7)" in stages("ps", "-a").stdout
    stages("rm", "polite")


def test_stop_kills_after_the_timeout_when_term_is_ignored(stages):
    stages("run", "-d", "--name", "stubborn", "--network", "none", "busybox", "sh", "-c",
           "trap '' TERM; echo ready; while true; do sleep 0.1; done")
    wait_for(lambda: "ready" in stages("logs", "stubborn").stdout)
    started = time.monotonic()
    stages("stop", "-t", "1", "stubborn")
    took = time.monotonic() - started
    assert 1 <= took < 6
    assert inspect(stages, "stubborn")["exit_code"] == 128 + signal.SIGKILL
    stages("rm", "stubborn")


def test_kill_sends_the_signal_asked_for(stages):
    stages("run", "-d", "--name", "listener", "--network", "none", "busybox", "sh", "-c",
           'trap "echo got USR1; exit 5" USR1; echo ready; while true; do sleep 0.1; done')
    wait_for(lambda: "ready" in stages("logs", "listener").stdout)
    stages("kill", "-s", "USR1", "listener")
    wait_for(lambda: inspect(stages, "listener")["state"]["status"] == "stopped")
    wait_for(lambda: inspect(stages, "listener")["exit_code"] is not None)
    assert inspect(stages, "listener")["exit_code"] == 5
    assert "got USR1" in stages("logs", "listener").stdout
    stages("rm", "listener")


def zombies(stages, *flags: str) -> int:
    """Zombies in a container whose command leaves an orphan behind and then never waits (exec sleep)."""
    stages("run", "-d", "--name", "parent", *flags, "--network", "none", "busybox", "sh", "-c",
           "(sleep 0.1 &); exec sleep 30")
    try:
        time.sleep(0.6)
        counted = stages("exec", "parent", "sh", "-c", "cat /proc/[0-9]*/stat | grep -c ') Z ' || true")
        return int(counted.stdout.strip())
    finally:
        stages("rm", "-f", "parent")


def test_pid_1_reaps_orphaned_zombies(stages):
    assert zombies(stages) == 0
    # Without the init, `sleep` is PID 1: the orphan is re-parented to it, and nobody reaps it
    assert zombies(stages, "--no-init") == 1


# -- logs, exec, ps, inspect --------------------------------------------------------------------------------
def test_logs_of_a_detached_container_and_follow(stages):
    stages("run", "-d", "--name", "talker", "--network", "none", "busybox", "sh", "-c",
           "for i in 1 2 3; do echo line$i; sleep 0.3; done; echo oops >&2")
    followed = stages("logs", "-f", "talker")
    assert followed.stdout.split() == ["line1", "line2", "line3", "oops"]
    assert inspect(stages, "talker")["state"]["status"] == "stopped"
    assert stages("logs", "talker").stdout == followed.stdout
    stages("rm", "talker")


def test_a_detached_rm_container_removes_itself_when_it_ends(stages):
    stages("run", "-d", "--rm", "--name", "brief", "--network", "none", "busybox", "sleep", "0.3")
    wait_for(lambda: "brief" not in stages("ps", "-a").stdout)
    assert not [p for p in (stages.home / "containers").iterdir() if not p.name.startswith(".")]


def test_exec_joins_the_same_namespaces(stages):
    stages("run", "-d", "--name", "host-of-exec", "--hostname", "inside", "--network", "none", "busybox",
           "sh", "-c", "echo 42 > /tmp/mark; sleep 30")
    try:
        result = stages("exec", "host-of-exec", "sh", "-c",
                        "hostname; cat /tmp/mark; cat /proc/1/cmdline | tr '\\0' ' '")
        lines = result.stdout.split("\n")
        assert lines[0] == "inside"
        assert lines[1] == "42"  # the container's own files
        assert lines[2].startswith("/dev/.stages-init -- sh -c")  # it sees the container's PID 1
        assert stages("exec", "host-of-exec", "sh", "-c", "exit 4", check=False).returncode == 4
    finally:
        stages("rm", "-f", "host-of-exec")
    missing = stages("exec", "host-of-exec", "true", check=False)
    assert "there is no container 'host-of-exec'" in missing.stderr


def test_ps_and_inspect_tell_the_truth(stages):
    stages("run", "-d", "--name", "sleeper", "--network", "none", "busybox", "sleep", "30")
    try:
        listing = stages("ps").stdout
        assert "sleeper" in listing and "Up" in listing
        info = inspect(stages, "sleeper")
        assert info["state"]["status"] == "running" and info["pid"] > 0
        assert os.path.exists(f"/proc/{info['pid']}")
        # the image store's rmi asks this before it removes an image
        assert using_image(info["image_id"], base=stages.home) == ["sleeper"]
        assert using_image("sha256:nothing", base=stages.home) == []
        running = stages("rm", "sleeper", check=False)
        assert running.returncode != 0 and "stages rm -f sleeper" in running.stderr
    finally:
        stages("rm", "-f", "sleeper")
    assert "sleeper" not in stages("ps", "-a").stdout


def test_a_dead_monitor_shows_as_stopped_with_an_unknown_exit_and_prune_cleans_up(stages):
    stages("run", "-d", "--name", "orphan", "--network", "none", "busybox", "sleep", "30")
    info = inspect(stages, "orphan")
    os.kill(info["monitor_pid"], signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{info['monitor_pid']}"))
    # its init still runs: Up (the OCI runtime's state knows its PID and start time), and prune keeps it
    assert "Up" in stages("ps").stdout and "orphan" not in stages("prune").stdout
    os.kill(info["pid"], signal.SIGKILL)
    wait_for(lambda: "unknown" in inspect(stages, "orphan")["state"]["description"])
    assert "Exited (unknown: its monitor died)" in stages("ps", "-a").stdout
    assert "orphan" in stages("prune").stdout
    assert stages("ps", "-a", "-q").stdout.strip() == ""
    wait_for(lambda: not os.path.exists(f"/proc/{info['pid']}"))


@pytest.mark.slow
def test_sigkill_of_a_foreground_run_then_prune_leaves_nothing(stages, python):
    process = subprocess.Popen([python, "-m", "stages.cli", "run", "--name", "killed", "--network", "none",
                                "busybox", "sleep", "30"], env=stages.env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    wait_for(lambda: "Up" in stages("ps").stdout)
    process.kill()
    process.wait()
    # its watcher is its monitor now (engine.watch): it runs on, Up, until it ends or is removed
    assert "Up" in stages("ps").stdout
    stages("stop", "-t", "1", "killed")
    assert "Exited (143)" not in stages("ps", "-a").stdout  # the exit code went with the killed client
    stages("prune")
    assert stages("ps", "-a", "-q").stdout.strip() == ""
    assert not list((stages.home / "containers").glob("*/upper"))


def test_ctrl_c_of_a_foreground_run_releases_everything(stages, python):
    process = subprocess.Popen([python, "-m", "stages.cli", "run", "--rm", "--name", "interrupted",
                                "--network", "none", "busybox", "sleep", "30"], env=stages.env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               text=True)
    wait_for(lambda: "interrupted" in stages("ps").stdout)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=20)
    assert "Traceback" not in err
    assert stages("ps", "-a", "-q").stdout.strip() == ""


def test_sigterm_to_a_foreground_run_reaches_the_container(stages, python):
    script = 'trap "echo got TERM; exit 9" TERM; echo ready; while true; do sleep 0.1; done'
    process = subprocess.Popen([python, "-m", "stages.cli", "run", "--rm", "--name", "proxied", "--network",
                                "none", "busybox", "sh", "-c", script],
                               env=stages.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True)
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 9, err
    assert out == "got TERM\n"
    assert stages("ps", "-a", "-q").stdout.strip() == ""


def test_twenty_parallel_detached_runs_get_distinct_names(stages):
    def start(_):
        return stages("run", "-d", "--network", "none", "busybox", "sleep", "30").stdout.strip()

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(start, range(20)))
    try:
        assert len(set(ids)) == 20
        names = {inspect(stages, cid)["name"] for cid in ids}
        assert len(names) == 20
        assert all("_" in name for name in names)
    finally:
        stages("rm", "-f", *ids)


def test_explain_prints_the_steps_in_order_with_their_time(stages):
    result = stages("run", "--rm", "--explain", "--network", "none", "busybox", "true")
    lines = result.stderr.splitlines()
    words = [line.split(None, 3)[3] for line in lines if " ms " in line]
    order = [next(i for i, w in enumerate(words) if w.startswith(prefix))
             for prefix in ("mount -t overlay", "mkfifo", "unshare", "hostname", "pivot_root", "echo 0 >")]
    assert order == sorted(order)
    assert all(float(line.split()[0]) >= 0 for line in lines if " ms " in line)


# -- the network, in a stand-in host namespace ---------------------------------------------------------
@pytest.fixture
def host_netns(stages, tmp_path):
    """A network namespace standing in for the host, and a state directory of its own (the network's
    state then never names a bridge that a later prune, without the stand-in, would look for on the
    real host)."""
    name = f"stgctr{os.getpid() % 100000}x{next(_counter)}"
    original = stages.env["STAGES_HOME"]
    with make_test_host(name):
        stages.env.update(STAGES_HOST_NETNS=name, STAGES_HOME=str(tmp_path / "net-home"))
        try:
            yield name
        finally:
            stages("prune", check=False)
            for record in (tmp_path / "net-home" / "containers").glob("*/container.json"):
                stages("rm", "-f", record.parent.name, check=False)
            stages.env.pop("STAGES_HOST_NETNS")
            stages.env["STAGES_HOME"] = original


def test_network_none_has_only_lo(stages):
    result = stages("run", "--rm", "--network", "none", "busybox", "sh", "-c", "ls /sys/class/net")
    assert result.stdout.split() == ["lo"]


@pytest.mark.net
def test_bridge_network_and_a_published_port_answer(stages, host_netns):
    stages("run", "-d", "--name", "web", "-p", "18080:80", "busybox", "sh", "-c",
           "mkdir -p /www && echo hello from the container > /www/index.html && exec httpd -f -p 80 -h /www")
    try:
        info = inspect(stages, "web")
        network = info["network"]
        assert network["mode"] == "bridge" and network["address"]
        addresses = stages("exec", "web", "ip", "-4", "-o", "addr").stdout
        assert network["address"] in addresses and "eth0" in addresses
        # from another container (another netns) through the host's published port
        other = stages("run", "--rm", "busybox", "wget", "-q", "-O", "-", f"http://{network['gateway']}:18080/")
        assert other.stdout == "hello from the container\n"
        # from the (stand-in) host itself, on 127.0.0.1
        local = subprocess.run(["ip", "netns", "exec", host_netns, "busybox", "wget", "-q", "-O", "-",
                                "http://127.0.0.1:18080/"], capture_output=True, text=True, timeout=20)
        assert local.stdout == "hello from the container\n", local.stderr
        taken = stages("run", "-d", "-p", "18080:81", "busybox", "sleep", "5", check=False)
        assert taken.returncode != 0 and "18080" in taken.stderr and "published already" in taken.stderr
    finally:
        stages("rm", "-f", "web")
    links = subprocess.run(["ip", "-n", host_netns, "-o", "link"], capture_output=True, text=True).stdout
    assert "veth" not in links


@pytest.mark.net
@pytest.mark.slow
def test_twenty_parallel_runs_on_the_bridge_get_distinct_addresses(stages, host_netns):
    def start(_):
        return stages("run", "-d", "busybox", "sleep", "30").stdout.strip()

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(start, range(20)))
    try:
        addresses = {inspect(stages, cid)["network"]["address"] for cid in ids}
        assert len(addresses) == 20
    finally:
        stages("rm", "-f", *ids)
