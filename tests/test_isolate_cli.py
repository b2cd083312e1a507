"""``stages isolate``: the whole manual sequence from the command line, --explain, exit codes, Ctrl-C,
and --cleanup."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from stages import rootfs

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def open_rootfs():
    top = tempfile.mkdtemp(prefix="stages-isolate-cli-", dir="/var/tmp")
    os.chmod(top, 0o755)
    try:
        yield Path(rootfs.build(Path(top) / "rootfs", source="busybox"))
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "STAGES_RUN": str(tmp_path / "run")}


def cli(python, env, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "stages.cli", "isolate", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60, **kwargs)


def test_the_command_runs_inside_and_its_exit_code_comes_back(python, env, open_rootfs):
    result = cli(python, env, str(open_rootfs), "--hostname", "web", "--",
                 "sh", "-c", "hostname; ps -o pid | tail -n +2 | head -1; ls /dev | wc -l; exit 7")
    assert result.returncode == 7, result.stderr
    assert result.stdout.split() == ["web", "1", "13"]
    assert not list((Path(env["STAGES_RUN"]) / "isolates").glob("*.json"))


def test_explain_prints_each_step_as_a_shell_command_in_order(python, env, open_rootfs):
    result = cli(python, env, str(open_rootfs), "--explain", "--namespaces", "user,uts,mount,pid", "--",
                 "true")
    assert result.returncode == 0, result.stderr
    steps = [re.match(r"^\s*[\d.]+ ms\s+(\S+)\s+(.*)$", line) for line in result.stderr.splitlines()]
    assert all(steps), result.stderr
    assert {match[1] for match in steps} <= {"inside", "outside", "host"}
    commands = [match[2] for match in steps if not match[2].startswith("#")]
    expected = ["unshare --user", "setpriv --regid 0 --reuid 0", "unshare --uts", "unshare --mount",
                "mount --make-rprivate /", "unshare --pid", "hostname", "mount -t proc", "mount -t sysfs",
                f"mount -t tmpfs -o nosuid,mode=755,size=65536k tmpfs {open_rootfs}/dev",
                f"mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs {open_rootfs}/tmp",
                f"mount --rbind {open_rootfs} {open_rootfs}", f"cd {open_rootfs}", "pivot_root . .",
                "umount -l .", "capsh --drop=", "setpriv --no-new-privs"]
    positions = [next(i for i, line in enumerate(commands) if line.startswith(word)) for word in expected]
    assert positions == sorted(positions), commands
    assert any(line.startswith("echo '0 100000 65536' > /proc/") for line in commands)


def test_bad_input_is_one_sentence_and_a_hint_never_a_traceback(python, env, open_rootfs, tmp_path):
    for args, words in [
        ((str(tmp_path / "nothing"), "--", "true"), "does not exist"),
        ((str(open_rootfs), "--namespaces", "uts,bogus", "--", "true"), "no 'bogus' namespace"),
        ((str(open_rootfs), "--publish", "80", "--namespaces", "uts", "--", "true"),
         "need the net namespace"),
        ((str(open_rootfs), "--", "no-such-program"), "cannot run inside"),
        ((str(open_rootfs), "--harden", "--namespaces", "uts", "--", "true"), "--harden needs the mount"),
    ]:
        result = cli(python, env, *args)
        assert result.returncode != 0
        assert words in result.stderr and "hint:" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert cli(python, env, str(open_rootfs), "--", "no-such-program").returncode == 127


def test_ctrl_c_ends_the_run_and_releases_everything(python, env, open_rootfs):
    process = subprocess.Popen([python, "-m", "stages.cli", "isolate", str(open_rootfs), "--pids", "16", "--",
                                "sh", "-c", "echo ready; sleep 60"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    os.kill(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not list((Path(env["STAGES_RUN"]) / "isolates").glob("*.json"))


def test_cleanup_after_sigkill_of_the_command_line(python, env, open_rootfs):
    process = subprocess.Popen([python, "-m", "stages.cli", "isolate", str(open_rootfs), "--pids", "16",
                                "--name", "killed", "--", "sh", "-c", "echo ready; sleep 60"], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    process.kill()
    process.communicate(timeout=30)
    state = Path(env["STAGES_RUN"]) / "isolates" / "killed.json"
    assert state.exists()
    deadline = time.monotonic() + 10
    while True:  # the holder follows its parent (PR_SET_PDEATHSIG) and takes PID 1 along
        result = cli(python, env, "--cleanup")
        if "killed" in result.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert result.returncode == 0 and "killed" in result.stdout, result.stdout + result.stderr
    assert not state.exists()
    from stages.isolate import cgroups

    assert "stages-killed" not in cgroups.find()


@pytest.mark.net
def test_net_and_publish_wire_the_isolate_to_a_stand_in_host(python, env, open_rootfs):
    from stages.isolate import network

    with network.test_host() as host:
        result = cli(python, env, str(open_rootfs), "--publish", "8082:80", "--host-netns", host, "--explain",
                     "--", "sh", "-c", "ip -4 -o addr show eth0; ip route")
        assert result.returncode == 0, result.stderr
        assert "eth0" in result.stdout and "default via 10." in result.stdout
        assert "DNAT" in result.stderr or "dnat" in result.stderr  # the publish step, explained
        links = subprocess.run(["ip", "-n", host, "-o", "link"], capture_output=True, text=True).stdout
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
