"""``stages tour``: the whole progression, run as the README runs it, must show what the kernel did.

The tour runs as a subprocess of the command line (``python -m stages.cli tour``), with its state
(``STAGES_HOME``: the embedded rootfs; ``STAGES_RUN``: isolate state files) and its temporary files
(``TMPDIR``: the canaries) in directories of the test, so the test can see that it left nothing behind;
the leak fixture checks mounts, network namespaces, veths, cgroups and processes.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from stages import tour

pytestmark = pytest.mark.root


@pytest.fixture
def stages_home():
    """A home for the tour's rootfs that root of a user namespace (a nobody on the host) can enter:
    pytest's own temporary directories are 0700."""
    top = tempfile.mkdtemp(prefix="stages-tour-test-", dir="/var/tmp")
    os.chmod(top, 0o755)
    try:
        yield Path(top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def environment(home: Path, tmp_path: Path) -> dict[str, str]:
    for name in ("tmp", "run"):
        (tmp_path / name).mkdir(exist_ok=True)
    return {**os.environ, "STAGES_HOME": str(home), "TMPDIR": str(tmp_path / "tmp"),
            "STAGES_RUN": str(tmp_path / "run")}


def assert_nothing_left(home: Path, tmp_path: Path) -> None:
    # Every canary and temporary directory the tour made is gone, and so is every isolate state file.
    assert os.listdir(tmp_path / "tmp") == [], os.listdir(tmp_path / "tmp")
    # (the OCI runtime's cache of compiled seccomp profiles stays, by design: the next run uses it)
    assert not [path for path in (tmp_path / "run").rglob("*.json") if ".seccomp-cache" not in path.parts]
    # No holder process outlived the tour (an orphan would escape the leak fixture's child check).
    for process in psutil.process_iter(["cmdline"]):
        assert str(home) not in " ".join(process.info["cmdline"] or []), process


def run_tour(python: str, home: Path, tmp_path: Path, *arguments: str,
             timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([python, "-m", "stages.cli", "tour", *arguments], capture_output=True, text=True,
                            env=environment(home, tmp_path), timeout=timeout, stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert_nothing_left(home, tmp_path)
    return result


def lines_about(output: str, subject: str) -> str:
    """The lines of one finding: its first line starts with the subject, the rest are indented under."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(subject))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(" " * 6) or line.strip().startswith(("[", "--")):
            break
        block.append(line)
    return " ".join(" ".join(block).split())  # wrapped lines joined again


def test_the_whole_tour_shows_the_jail_leak_and_the_isolate_hold(python, stages_home, tmp_path):
    result = run_tour(python, stages_home, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "== stage 1: the chroot jail ==" in out and "== stage 2: an isolate wired by hand ==" in out
    stage1, stage2 = out.split("== stage 2: an isolate wired by hand ==")
    stage2, stage3 = stage2.split("== stage 3: the container runtime ==")
    host = socket.gethostname()

    # Stage 1. Files are hidden: the jail could not cat the host's canary by name ...
    files = lines_about(stage1, "files")
    assert "[isolated]" in files and "No such file" in files
    # ... but the hostname is the host's, seen from inside ...
    hostname = lines_about(stage1, "hostname")
    assert "[SHARED]" in hostname and f"jail: {host}" in hostname
    # ... and the escape read the canary made for it, whose random token only the tour knew.
    token = lines_about(stage1, "canary").split("holding ")[1].split()[0]
    assert token.startswith("stages-canary-")
    escape = lines_about(stage1, "the escape")
    assert "[SHARED]" in escape and f"read the canary: {token}" in escape

    # Stage 2: the same looks, isolated. The hostname inside differs from the host's.
    looks = stage2.split("-- 2.2")[1].split("-- 2.3")[0]
    hostname = lines_about(looks, "hostname")
    assert "[isolated]" in hostname and f"host: {host}" in hostname
    assert f"isolate: {tour.ISOLATE_HOSTNAME}" in hostname and host != tour.ISOLATE_HOSTNAME
    assert "jail (stage 1): shared with the host" in hostname
    processes = lines_about(looks, "processes")
    assert "[isolated]" in processes and "PID 1 is" in processes
    assert "isolate: lo" in lines_about(looks, "network interfaces")
    assert "[SHARED]" in lines_about(looks, "kernel")  # still one kernel
    # Root's power is measured: acts the host's root may do (renice -5, write core_pattern back) are
    # refused inside, by the user namespace.
    power = lines_about(looks, "root's power")
    assert "[held back]" in power and power.count("allowed") == 2 and power.count("refused (") == 2, power
    # 2.1 measured pivot_root (the host's root is not in the isolate's mount table) and the user row.
    namespaces = stage2.split("-- 2.1")[1].split("-- 2.2")[0]
    assert "[isolated]" in lines_about(namespaces, "pivot_root")
    assert "is in none of the" in lines_about(namespaces, "pivot_root")
    user = lines_about(namespaces, "user")
    assert "[held back]" in user and "refused (" in user and "Permission denied" in user, user
    # The stage 1 escape fails after pivot_root.
    escape = lines_about(stage2.split("-- 2.3")[1], "the escape")
    assert "[isolated]" in escape and "does not exist" in escape
    # The memory hog was killed by the kernel, inside the cgroup only.
    memory = lines_about(stage2, "memory")
    assert "[limited]" in memory and "was killed" in memory  # a limit, not isolation
    # The network: a veth pair to a stand-in host (a network namespace the tour made), pinged both ways.
    wired = stage2.split("-- 2.5")[1].split("-- 2.6")[0]
    assert "veth pair" in wired and "eth0" in wired
    assert "answered" in lines_about(wired, "isolate -> host")
    assert "answered" in lines_about(wired, "host -> isolate")
    assert "[untouched]" in lines_about(wired, "the real host")
    # The record, as a script, and the teardown that followed.
    assert "unshare --user" in stage2 and "pivot_root . ." in stage2
    assert "[cleaned up] closed: holder" in lines_about(stage2, "teardown")
    assert "and its cgroup are gone" in lines_about(stage2, "teardown")

    # Stage 3: one `stages run --rm`, looked at from inside and from the host, then gone.
    run = stage3.split("-- 3.1")[1].split("-- 3.2")[0]
    command = lines_about(run, "command")
    assert command.startswith("command stages run --rm --name tour-") and "--memory 64M busybox" in command
    hostname = lines_about(run, "hostname")
    assert "[isolated]" in hostname and f"container: {tour.CONTAINER_HOSTNAME}" in hostname
    assert "[isolated]" in lines_about(run, "PID 1") and "exited 0" in lines_about(run, "exit")
    assert "[isolated] container: lo (--network none)" in lines_about(run, "network")
    memory = lines_about(run, "memory")
    assert "[limited]" in memory and f"holds {64 << 20} (64 MB; --memory 64M)" in memory
    assert "new: cgroup, ipc, mount, net, pid, uts" in lines_about(run, "namespaces")
    assert "[cleaned up] gone:" in lines_about(run, "--rm")
    script = stage3.split("-- 3.2")[1].split("-- 3.3")[0]
    assert "unshare --mount --uts --ipc --pid --net" in script and "pivot_root . ." in script
    assert f"echo {64 << 20} > " in script
    # It ends with the comparison: both records counted, the one command, and the steps side by side.
    comparison = stage3.split("-- 3.3 by hand vs automated --")[1]
    assert "-- 3." not in comparison  # the last section of the tour
    by_hand = int(lines_about(comparison, "by hand").split("stage 2: ")[1].split()[0])
    automated = int(lines_about(comparison, "automated").split("stage 3: ")[1].split()[0])
    # Stage 2's record is the one 2.6 printed, and then its teardown (kill, rmdir) on top.
    assert by_hand >= int(lines_about(stage2.split("-- 2.6")[1], "steps").split()[1]) > 0
    assert automated == int(lines_about(script, "steps").split()[1]) > 0
    assert automated == len(script.split("script", 1)[1].strip().splitlines())
    assert "stages run --rm" in lines_about(comparison, "command")
    rows = {line.split()[0] if not line.strip().startswith(">") else " ".join(line.split()[:2]):
            line.split()[-2:] for line in comparison.split("side by side")[1].splitlines()[1:]
            if line.startswith(" " * 8) and line.split()[-1].isdigit()}
    for kind in ("unshare", "pivot_root", "hostname"):
        assert all(int(count) > 0 for count in rows[kind]), (kind, rows[kind])
    memory_file = "> memory.max" if "> memory.max" in rows else "> memory.limit_in_bytes"
    assert rows[memory_file] == ["1", "1"]
    assert "0 failed" in out


def test_explain_prints_the_shell_steps_of_each_section(python, stages_home, tmp_path):
    result = run_tour(python, stages_home, tmp_path, "--explain")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # stage 1: 3 sections; stage 2: namespaces, escape, limit, network (commands run inside are not steps);
    # stage 3: the run
    assert out.count("the same steps, as a person would type them:") == 8
    rootfs = os.path.join(stages_home, "rootfs", "busybox")
    assert f"    chroot {rootfs}" in out
    assert "    mount --make-rprivate /" in out
    assert "    chroot /.stages-escape" in out and "    cd ../" in out
    stage2 = out.split("== stage 2")[1]
    assert "    unshare --user" in stage2 and "    pivot_root . ." in stage2
    assert "memory.limit_in_bytes" in stage2 or "memory.max" in stage2
    assert "    ip netns add stgns" in stage2 and "type veth peer name" in stage2
    stage3 = out.split("== stage 3")[1].split("-- 3.2")[0]
    assert "    mount -t overlay -o lowerdir=" in stage3 and "    pivot_root . ." in stage3
    assert "    unshare --cgroup" in stage3 and "exec.fifo" in stage3


def test_a_rootfs_nobody_may_enter_skips_the_user_namespace_and_says_so(python, stages_home, tmp_path):
    from stages import rootfs

    private = tmp_path / "private"  # pytest's directories are 0700: root of a user namespace stops here
    built = rootfs.build(private / "rootfs", source="busybox")
    result = run_tour(python, stages_home, tmp_path, "--stage", "2", "--rootfs", str(built))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped: the user namespace" in " ".join(result.stdout.split())
    users = lines_about(result.stdout.split("-- 2.2")[1], "users")
    assert "[SHARED]" in users and "uid_map 0 0 4294967295" in users
    # Without a user namespace root inside is the host's root: the tour drops capabilities and makes
    # /proc/sys read-only, and root's power is held back by those.
    out = " ".join(result.stdout.split())
    assert "no user namespace: /proc/sys made read-only, and" in out and "capabilities dropped" in out
    power = lines_about(result.stdout.split("-- 2.2")[1], "root's power")
    assert "[held back]" in power and power.count("refused (") == 2, power


def test_ctrl_c_in_stage_2_releases_the_isolate(python, stages_home, tmp_path):
    process = subprocess.Popen([python, "-m", "stages.cli", "tour", "--stage", "2"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environment(stages_home, tmp_path),
                               stdin=subprocess.DEVNULL)
    try:
        for line in process.stdout:
            if line.startswith("-- 2.2"):  # the isolate is up, with its namespaces and mounts
                process.send_signal(signal.SIGINT)
                break
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, (out, err)
    assert "interrupted; everything it had set up was released" in err
    assert "Traceback" not in err
    assert_nothing_left(stages_home, tmp_path)


def assert_no_container_left(home: Path, tmp_path: Path) -> None:
    # --rm: no container directory, no runtime state, no overlay mount below the state directory.
    containers = home / "containers"
    if containers.is_dir():
        assert [p.name for p in containers.iterdir() if not p.name.startswith(".")] == []
    oci = tmp_path / "run" / "oci"
    assert not oci.is_dir() or os.listdir(oci) in ([], [".seccomp-cache"])  # no container's state left
    with open("/proc/self/mountinfo") as handle:
        assert not [line for line in handle if str(home) in line]


def test_stage_3_alone_runs_its_container_and_says_the_comparison_needs_stage_2(python, stages_home,
                                                                                tmp_path):
    result = run_tour(python, stages_home, tmp_path, "--stage", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "== stage 1" not in out and "== stage 2" not in out
    assert "[cleaned up] gone: its record, directory, overlay mount and cgroup" in lines_about(out, "--rm")
    assert "skipped: the comparison with stage 2: stage 2 did not run in this tour" in " ".join(out.split())
    seconds = float(lines_about(out, "exit").split("ran for ")[1].split()[0])
    assert seconds < 5, seconds  # the container's part of the tour stays quick
    assert_no_container_left(stages_home, tmp_path)


def test_ctrl_c_in_stage_3_removes_the_container(python, stages_home, tmp_path):
    process = subprocess.Popen([python, "-m", "stages.cli", "tour", "--stage", "3"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environment(stages_home, tmp_path),
                               stdin=subprocess.DEVNULL)
    try:
        for line in process.stdout:
            if line.startswith("-- 3.1"):  # the engine is about to make the container
                process.send_signal(signal.SIGINT)
                break
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, (out, err)
    assert "Traceback" not in err
    assert_nothing_left(stages_home, tmp_path)
    assert_no_container_left(stages_home, tmp_path)


def test_an_unknown_stage_is_one_clear_sentence(python, stages_home, tmp_path):
    result = run_tour(python, stages_home, tmp_path, "--stage", "9")
    assert result.returncode == 1
    assert "the tour has no stage 9" in result.stderr and "hint: choose from: 1, 2, 3" in result.stderr


def test_sections_return_their_findings_and_a_later_stage_can_add_itself(tmp_path, busybox_rootfs):
    seen = []

    @tour.section(99, "a stage added later")
    def later(t: tour.Tour) -> tour.Section:
        seen.append(t.facts["stage1 escape"].escaped)
        return tour.Section(findings=[tour.Finding("hello", "from stage 99", holds=True)])

    try:
        out = io.StringIO()
        results = tour.run([1, 99], rootfs=busybox_rootfs, out=out)
    finally:
        tour.SECTIONS.pop()
    assert [(r.stage, r.title) for r in results][-1] == (99, "a stage added later")
    assert seen == [True]  # facts left by stage 1 reach later sections
    observed = {f.subject: f for r in results if r.stage == 1 for f in r.findings}
    assert observed["files"].isolated is True
    assert observed["hostname"].isolated is False
    assert observed["the escape"].isolated is False
    assert "== stage 99 ==" in out.getvalue() and "[isolated] from stage 99" in out.getvalue()
    assert 99 not in tour.stages_available()
