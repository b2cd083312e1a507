"""A store that survives damage (issue 10, findings 8 to 13): damaged records, a full disk, killed clients.

Every test runs the command line as a learner would (``python -m stages.cli``) with a STAGES_HOME of its
own, and checks what is true on the machine afterwards: the container's processes, its cgroup, its overlay
mount, the layers on disk, the network devices and firewall rules of a network namespace standing in for
the host. No test passes on a traceback: each checks that what went wrong is said in one sentence.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root]


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def stages(home, tmp_path):
    """``stages(*argv)``: the command line with this test's STAGES_HOME; returns the CompletedProcess. No
    call may print a traceback."""
    env = dict(os.environ, STAGES_HOME=str(home), STAGES_RUN=str(tmp_path / "run"))
    env.pop("STAGES_HOST_NETNS", None)

    def call(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "stages.cli", *argv], capture_output=True, text=True,
                                env=env, timeout=timeout, stdin=subprocess.DEVNULL)
        assert "Traceback" not in result.stderr, f"stages {' '.join(argv)}:\n{result.stderr}"
        if check and result.returncode != 0:
            raise AssertionError(f"stages {' '.join(argv)} -> {result.returncode}\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result

    call.env = env
    yield call
    # whatever a failing test left, so that the leak check names the test and not the next one
    for record in (home / "containers").glob("*/"):
        if not record.name.startswith("."):
            subprocess.run([sys.executable, "-m", "stages.cli", "rm", "-f", record.name], env=env,
                           capture_output=True, timeout=60)
    subprocess.run([sys.executable, "-m", "stages.cli", "prune"], env=env, capture_output=True, timeout=60)


def wait_for(condition, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def cgroups_named(name: str) -> list[str]:
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        if os.path.basename(top) == name:
            found.append(top)
        if top.count("/") > 12:
            dirs[:] = []
    return found


def mounts_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as handle:
        return [line.split(" ")[4] for line in handle if line.split(" ")[4].startswith(str(path))]


def container_dirs(home: Path) -> list[str]:
    top = home / "containers"
    if not top.is_dir():
        return []
    return sorted(entry.name for entry in top.iterdir() if not entry.name.startswith("."))


def runtime_states(stages) -> list[str]:
    """The containers the OCI runtime has a state of (its dot files are caches, not containers)."""
    return [name for name in os.listdir(Path(stages.env["STAGES_RUN"]) / "oci") if not name.startswith(".")]


def inspect(stages, name: str) -> dict:
    return json.loads(stages("inspect", name).stdout)[0]


# -- finding 8: a damaged record of a running container ------------------------------------------------
DAMAGES = {
    "truncated": lambda path: os.truncate(path, 37),
    "garbage": lambda path: path.write_bytes(b"\x00\xff garbage {{{ \x80"),
    "missing": lambda path: path.unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_record_is_listed_kept_by_rmi_and_prune_and_removed_by_rm(stages, home, damage):
    container_id = stages("run", "-d", "--network", "none", "busybox", "sleep", "120").stdout.strip()
    info = inspect(stages, container_id)
    init, layers = info["pid"], info["layers"]
    upper = home / "containers" / container_id / "upper"
    (upper / "work-of-a-day").write_text("all someone has")  # what prune must not delete
    DAMAGES[damage](home / "containers" / container_id / "container.json")

    listed = stages("ps", "-a")
    assert container_id[:12] in listed.stdout and "Damaged record (Up)" in listed.stdout, listed.stdout
    assert f"stages rm -f {container_id}" in listed.stderr
    assert container_id[:12] in stages("ps", "-q").stdout  # running: listed without -a too

    refused = stages("rmi", "busybox", check=False)
    assert refused.returncode != 0 and f"used by the container {container_id}" in refused.stderr
    assert all(os.path.isdir(layer) for layer in layers)

    pruned = stages("prune")
    assert f"left container {container_id} alone (it runs)" in pruned.stdout, pruned.stdout
    assert alive(init) and (upper / "work-of-a-day").exists()

    stages("rm", "-f", container_id)
    assert not alive(init)
    assert cgroups_named(f"stages-{container_id}") == []
    assert mounts_below(home / "containers") == []
    assert container_dirs(home) == []
    assert stages("ps", "-a", "-q").stdout.strip() == ""


def test_rm_f_finds_a_damaged_containers_cgroup_by_name_when_its_runtime_state_is_gone_too(stages, home):
    import shutil

    container_id = stages("run", "-d", "--network", "none", "busybox", "sleep", "120").stdout.strip()
    init = inspect(stages, container_id)["pid"]
    (home / "containers" / container_id / "container.json").write_text("[")
    shutil.rmtree(Path(stages.env["STAGES_RUN"]) / "oci" / container_id)
    assert container_id[:12] in stages("ps", "-a").stdout
    stages("rm", "-f", container_id)
    wait_for(lambda: not alive(init), 5, "its init killed")
    assert cgroups_named(f"stages-{container_id}") == []
    assert mounts_below(home / "containers") == [] and container_dirs(home) == []


def test_rmi_refuses_when_a_damaged_records_layers_cannot_be_learnt(stages, home):
    stages("run", "--name", "stopped-one", "--network", "none", "busybox", "true")
    container_id = inspect(stages, "stopped-one")["id"]
    (home / "containers" / container_id / "container.json").write_text("{")
    refused = stages("rmi", "busybox", check=False)
    assert refused.returncode != 0 and "cannot tell whether it uses the layers" in refused.stderr
    assert f"stages rm -f {container_id}" in refused.stderr
    pruned = stages("prune")  # a stopped one with a damaged record is left alone too, and said so
    assert f"left container {container_id} alone:" in pruned.stdout
    stages("rm", container_id)
    assert container_dirs(home) == []
    assert "deleted sha256:" in stages("rmi", "busybox").stdout


def test_rm_f_goes_on_past_a_name_that_is_not_there(stages, home):
    for name in ("first", "second"):
        stages("run", "--name", name, "--network", "none", "busybox", "true")
    result = stages("rm", "-f", "first", "nosuch", "second", check=False)
    assert result.returncode != 0
    assert "there is no container 'nosuch'" in result.stderr
    assert result.stdout.split() == ["first", "second"]
    assert container_dirs(home) == []


# -- finding 12: damaged image records and name index --------------------------------------------------
def test_a_damaged_image_record_is_listed_and_rmi_removes_it(stages, home, tmp_path):
    stages("images", "--builtin")
    image_id = json.loads((home / "images" / "repositories.json").read_text())["busybox:latest"]
    short = image_id.split(":")[1][:12]
    record = home / "images" / "imagedb" / f"{image_id.split(':')[1]}.json"
    os.truncate(record, 10)

    listed = stages("images")
    assert "busybox:latest" in listed.stdout and "damaged" in listed.stdout
    assert str(record) in listed.stderr and f"stages rmi {short}" in listed.stderr
    ran = stages("run", "--rm", "--network", "none", "busybox", "true", check=False)
    assert ran.returncode != 0 and "cannot be used" in ran.stderr and str(record) in ran.stderr
    removed = stages("rmi", short)
    assert f"deleted {image_id}" in removed.stdout and not record.exists()
    assert "busybox" not in stages("images").stdout


def test_a_damaged_name_index_is_said_and_repaired(stages, home):
    stages("images", "--builtin")
    index = home / "images" / "repositories.json"
    index.write_text('{"busybox:latest": "sha256:')
    listed = stages("images")  # the images are still listed, by id, and the damage said
    assert "<none>:<none>" in listed.stdout
    assert str(index) in listed.stderr and "stages images --repair" in listed.stderr
    ran = stages("run", "--rm", "--network", "none", "busybox", "true", check=False)
    assert ran.returncode != 0 and "name index" in ran.stderr and "--repair" in ran.stderr
    repaired = stages("images", "--repair")
    assert "busybox:latest again" in repaired.stdout and "host-minimal:latest again" in repaired.stdout
    assert list(index.parent.glob("repositories.json.damaged-*"))  # kept, for whoever wants to look
    assert stages("run", "--rm", "--network", "none", "busybox", "echo", "back").stdout == "back\n"
    assert "whole" in stages("images", "--repair").stdout


# -- finding 9: a full STAGES_HOME ---------------------------------------------------------------------
@pytest.fixture
def small_home(tmp_path):
    """A 30 MB tmpfs as STAGES_HOME, unmounted at the end."""
    where = tmp_path / "home"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m,mode=0700", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` up to the last byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:  # unbuffered: the close must have nothing to flush
        for size in (1 << 20, 4096, 1):
            chunk = b"\0" * size
            with contextlib.suppress(OSError):
                while True:
                    handle.write(chunk)
    assert os.statvfs(directory).f_bavail == 0
    return filler


def test_a_full_home_can_be_freed_and_run_and_build_say_so(stages, small_home, tmp_path):
    home = small_home
    context = tmp_path / "context"
    context.mkdir()
    (context / "Containerfile").write_text("FROM busybox\nRUN echo built > /built\n")
    stages("build", "-t", "built", str(context))
    stages("run", "-d", "--name", "running", "--network", "none", "busybox", "sleep", "120")
    stages("run", "--name", "stopped", "--network", "none", "built", "true")
    fill(home)

    for argv in (("run", "--rm", "--network", "none", "busybox", "true"),
                 ("build", "-t", "again", str(context))):
        failed = stages(*argv, check=False)
        assert failed.returncode != 0
        assert f"no space left in STAGES_HOME ({home}): free some with stages prune / rmi" in failed.stderr
    assert sorted(container_dirs(home)) == sorted(inspect(stages, n)["id"] for n in ("running", "stopped"))
    assert os.listdir(home / "images" / "tmp") == []  # nothing left by the build

    stopped = stages("stop", "-t", "1", "running")
    assert "could not be recorded" not in stopped.stderr
    assert inspect(stages, "running")["exit_code"] in (137, 143)  # kept, on a full disk

    stages("rm", "-f", "stopped")
    assert "deleted sha256:" in stages("rmi", "built").stdout
    assert "running" in stages("prune").stdout
    assert container_dirs(home) == [] and mounts_below(home / "containers") == []
    assert os.statvfs(home).f_bavail > 0
    assert "built" not in stages("images").stdout


# -- finding 10: a killed `run --rm` client ------------------------------------------------------------
def test_killed_run_rm_clients_leave_no_container(stages, home):
    """12 clients killed at points spread from 0 to 0.5 s after their start (before, during and after
    the container's creation): after the 5 s of `sleep 5` and a few more, nothing is left."""
    stages("images", "--builtin")
    clients = []
    seen: set[str] = set()
    for number in range(12):
        client = subprocess.Popen([sys.executable, "-m", "stages.cli", "run", "--rm", "--network", "none",
                                   "busybox", "sleep", "5"], env=stages.env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(number * 0.5 / 11)
        client.kill()
        client.wait()
        clients.append(client)
        seen.update(container_dirs(home))
    # never "Exited" while its processes run: each container listed as Exited has no process left
    for line in stages("ps", "-a").stdout.splitlines()[1:]:
        if "Exited" in line:
            full = next(name for name in container_dirs(home) if name.startswith(line.split()[0]))
            assert all(not os.path.exists(os.path.join(directory, "cgroup.procs"))
                       or not open(os.path.join(directory, "cgroup.procs")).read().strip()
                       for directory in cgroups_named(f"stages-{full}")), line
    wait_for(lambda: container_dirs(home) == [], 15, "every container removed without anyone's help")
    assert stages("ps", "-a", "-q").stdout.strip() == ""
    assert mounts_below(home / "containers") == []
    assert seen and [name for name in seen if cgroups_named(f"stages-{name}")] == []
    assert runtime_states(stages) == []


def test_a_killed_clients_container_is_up_while_it_runs_and_is_finished_after(stages, home):
    stages("images", "--builtin")
    for remove in (True, False):
        client = subprocess.Popen([sys.executable, "-m", "stages.cli", "run", *(["--rm"] if remove else []),
                                   "--name", "orphan", "--network", "none", "busybox", "sleep", "2"],
                                  env=stages.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wait_for(lambda: "Up" in stages("ps").stdout, 20, "the container runs")
        init = inspect(stages, "orphan")["pid"]
        client.kill()
        client.wait()
        assert "Up" in stages("ps").stdout and alive(init)  # not "Exited": its init runs on
        wait_for(lambda init=init: not alive(init), 10, "sleep 2 ends")
        if remove:
            wait_for(lambda: container_dirs(home) == [], 10, "--rm removes it")
        else:
            wait_for(lambda: "Exited" in stages("ps", "-a").stdout, 10, "it is stopped")
            assert mounts_below(home / "containers") == []
            assert cgroups_named(f"stages-{inspect(stages, 'orphan')['id']}") == []
            stages("rm", "orphan")


def test_an_init_waiting_on_exec_fifo_dies_with_its_client(stages, home):
    """The client dies between create and start: nothing will ever start the init, which must not wait
    on exec.fifo for ever."""
    stages("images", "--builtin")
    probe = ("import os, signal\n"
             "from stages.runtime import engine, oci\n"
             "from stages.runtime.flags import Options\n"
             "oci.start = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
             "engine.run(Options(image='busybox', command=['sleep', '60'], network='none', remove=True))\n")
    died = subprocess.run([sys.executable, "-c", probe], env=stages.env, capture_output=True, text=True,
                          timeout=60)
    assert died.returncode == -signal.SIGKILL, died.stderr
    wait_for(lambda: container_dirs(home) == [], 10, "the created container removed")
    assert runtime_states(stages) == []
    assert mounts_below(home / "containers") == []
    assert not [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
                .splitlines() if "sleep 60" in line and "busybox" in line]


# -- finding 11: killed builds -------------------------------------------------------------------------
def test_prune_removes_a_killed_builds_leftovers_and_never_a_running_builds(stages, home, tmp_path):
    stages("images", "--builtin")
    context = tmp_path / "context"
    context.mkdir()
    (context / "Containerfile").write_text("FROM busybox\nRUN sleep 2\n")
    tmp = home / "images" / "tmp"

    def build() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "stages.cli", "build", "-t", "slow", str(context)],
                                env=stages.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    running = build()
    wait_for(lambda: list(tmp.glob("build.*")), 20, "the build begins")
    stages("prune")
    assert list(tmp.glob("build.*")), "prune removed a running build's directory"
    assert running.wait(60) == 0, running.stderr.read()
    assert list(tmp.glob("build.*")) == []

    (context / "Containerfile").write_text("FROM busybox\nRUN sleep 1; echo other\n")
    killed = build()
    wait_for(lambda: list(tmp.glob("build.*")), 20, "the build begins")
    killed.kill()
    killed.wait()
    assert list(tmp.glob("build.*"))
    time.sleep(1.5)  # its RUN step's sleep ends
    pruned = stages("prune")
    assert "left by a build or import that was killed" in pruned.stdout
    assert list(tmp.glob("build.*")) == []


# -- finding 13: a damaged network state file ----------------------------------------------------------
def test_prune_removes_the_bridge_and_nft_table_a_damaged_network_state_described(tmp_path):
    from stages.isolate.network import test_host
    from stages.runtime.network import NetworkManager

    with test_host(f"stgdmg{os.getpid() % 100000}") as host:
        process = subprocess.Popen(["unshare", "--net", "--", "/bin/busybox", "sleep", "60"])
        try:
            own = os.readlink("/proc/self/ns/net")
            wait_for(lambda: os.readlink(f"/proc/{process.pid}/ns/net") != own, 5, "unshare --net")
            manager = NetworkManager(state_dir=tmp_path / "state", host_netns=host)
            manager.attach("damaged-one", process.pid)
            manager.publish("damaged-one", 8080, 80)
            manager.state_file.write_text('{"bridges": {"stages0": ')

            def devices() -> set[str]:
                return {link["ifname"] for link in json.loads(subprocess.run(
                    ["ip", "-n", host, "-j", "link"], capture_output=True, text=True).stdout)}

            def ruleset() -> str:
                return subprocess.run(["nsenter", f"--net=/run/netns/{host}", "nft", "list", "ruleset"],
                                      capture_output=True, text=True).stdout.strip()

            assert "stages0" in devices() and "stages" in ruleset()
            again = NetworkManager(state_dir=tmp_path / "state", host_netns=host)
            assert again.prune([]) == []
            assert devices() == {"lo"}, devices()
            assert ruleset() == ""
            assert "was damaged" in again.notes[0]
            assert not again.state_file.exists()
        finally:
            process.kill()
            process.wait()
