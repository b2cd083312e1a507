"""The workshop VM's files: the Vagrantfile validates, provision.sh is clean shell, and the provisioning
itself runs here, for real, on this machine's Debian (it is the same script the VM runs).

No VM boots here (no VirtualBox, no libvirt): what a VM would add is systemd as PID 1, and this machine
has none, which is itself a path of provision.sh that these tests take. JupyterLab is started in the
background where a test asks for it, and stopped by the test that started it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
VAGRANT_DIR = REPO / "vagrant"
PROVISION = VAGRANT_DIR / "provision.sh"
VERDICT = re.compile(r"^all \d+ required checks passed", re.MULTILINE)
# workshop.sh's words when it installs something (a Debian package, the virtualenv, the package).
INSTALLING = re.compile(r"installing Debian packages|creating the virtualenv|installing stages")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# == the Vagrantfile ===================================================================================
def vagrant(tmp_path: Path, *args: str, **environment: str) -> subprocess.CompletedProcess:
    """``vagrant ARGS`` in vagrant/, offline, with its state (.vagrant, ~/.vagrant.d) in ``tmp_path``."""
    if shutil.which("vagrant") is None:
        pytest.skip("vagrant is not installed (bash workshop.sh test installs it on Debian: apt-get install "
                    "vagrant)")
    env = {
        **os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot-vagrant"), "VAGRANT_NO_COLOR": "1", **environment,
    }
    return subprocess.run(["vagrant", *args], cwd=VAGRANT_DIR, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("box", ["", "bento/debian-12"], ids=["default box", "debian-12"])
def test_vagrantfile_validates(tmp_path, box):
    result = vagrant(tmp_path, "validate", "-p", **({"STAGES_BOX": box} if box else {}))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_vagrantfile_validation_reads_the_file(tmp_path):
    # The same command fails on a bad setting, so the test above really ran the file.
    result = vagrant(tmp_path, "validate", "-p", STAGES_PORT="not-a-port")
    assert result.returncode != 0
    assert "not-a-port" in result.stdout + result.stderr


def test_vagrantfile_says_what_the_workshop_needs():
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    # JupyterLab runs as root: its port is forwarded to the host's loopback only.
    forward = next(line for line in text.splitlines() if '"forwarded_port"' in line)
    assert 'host_ip: "127.0.0.1"' in forward
    assert 'ENV.fetch("STAGES_BOX", "bento/ubuntu-24.04")' in text
    assert "bento/debian-12" in text
    assert 'provider "virtualbox"' in text and 'provider "libvirt"' in text
    assert 'ENV.fetch("STAGES_MEMORY", "4096")' in text
    assert 'ENV.fetch("STAGES_CPUS", "2")' in text
    assert 'path: "provision.sh"' in text


# == provision.sh as shell =============================================================================
def test_provision_script_is_clean_shell():
    assert os.access(PROVISION, os.X_OK)
    assert PROVISION.read_text().splitlines()[1:].count("set -euo pipefail") == 1
    syntax = subprocess.run(["bash", "-n", str(PROVISION)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (bash workshop.sh test installs it: "
                    "apt-get install shellcheck)")
    lint = subprocess.run(["shellcheck", str(PROVISION)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # provision.sh stands on workshop.sh: it must be sound too (warnings and errors).
    lint = subprocess.run(["shellcheck", "--severity=warning", str(REPO / "workshop.sh")],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


# == provision.sh, run ==================================================================================
def provision(tmp_path: Path, port: int, **environment: str) -> subprocess.CompletedProcess:
    """Run provision.sh for real against this checkout, with its token, unit and pid file in tmp_path."""
    env = {
        **os.environ, "STAGES_CONFIG_DIR": str(tmp_path / "etc"),
        "STAGES_SYSTEMD_DIR": str(tmp_path / "units"), "STAGES_JUPYTER_PORT": str(port), **environment,
    }
    return subprocess.run(["bash", str(PROVISION)], env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def status(port: int, token: str | None) -> int:
    """The HTTP status JupyterLab's /api/status answers with (0: nothing listens)."""
    headers = {"Authorization": f"token {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def stop(pid: int) -> None:
    try:
        process = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for child in process.children(recursive=True):
        child.kill()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except psutil.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@pytest.mark.root
@pytest.mark.slow
def test_provisioning_runs_here_ends_with_doctor_and_installs_nothing_twice(tmp_path):
    if (Path("/run/systemd/system")).is_dir():
        pytest.skip("systemd runs here: the provisioning would start the real service (run this in the VM "
                    "by hand: sudo bash vagrant/provision.sh)")
    port = free_port()
    pid_file = tmp_path / "etc" / "jupyter.pid"

    # No systemd, nothing asked for: it says so, starts nothing, and still ends with a passing doctor.
    first = provision(tmp_path, port)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out
    assert "systemd is not running here" in out and "STAGES_JUPYTER=background" in out
    assert VERDICT.search(first.stdout), out
    assert not pid_file.exists()
    assert status(port, None) == 0
    env_file = tmp_path / "etc" / "jupyter.env"
    assert env_file.stat().st_mode & 0o077 == 0, "the token must be readable by root only"
    token = re.search(r"^JUPYTER_TOKEN=([0-9a-f]{48})$", env_file.read_text(), re.MULTILINE).group(1)
    unit = tmp_path / "units" / "stages-jupyter.service"
    unit_text = unit.read_text()
    assert f"--port={port}" in unit_text and "--allow-root" in unit_text
    assert f"--notebook-dir={REPO}/notebooks" in unit_text
    assert token not in unit_text, "the token belongs in the environment file, not on a command line"
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stdout + verify.stderr

    pid = None
    try:
        # Asked for: JupyterLab in the background, answering with the token and refusing without it.
        second = provision(tmp_path, port, STAGES_JUPYTER="background")
        out = second.stdout + second.stderr
        assert second.returncode == 0, out
        pid = int(pid_file.read_text())
        assert not INSTALLING.search(out), f"a second run installed something:\n{out}"
        assert "making JupyterLab's token" not in out and "is up to date" in out
        assert f"http://127.0.0.1:{port}/lab?token={token}" in out
        assert VERDICT.search(second.stdout), out
        assert status(port, token) == 200
        assert status(port, None) == 403
        assert status(port, "0" * 48) == 403
        assert token not in " ".join(psutil.Process(pid).cmdline())

        # Once more: everything is in place, the same JupyterLab keeps running.
        third = provision(tmp_path, port, STAGES_JUPYTER="background")
        out = third.stdout + third.stderr
        assert third.returncode == 0, out
        assert not INSTALLING.search(out), out
        assert f"running already in the background (pid {pid})" in out
        assert int(pid_file.read_text()) == pid and unit.read_text() == unit_text
        assert re.search(r"^JUPYTER_TOKEN=(\w+)$", env_file.read_text(), re.MULTILINE).group(1) == token
        assert VERDICT.search(third.stdout), out
    finally:
        if pid is not None:
            stop(pid)
    deadline = time.monotonic() + 10
    while status(port, token) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status(port, token) == 0


# == provision.sh, failing loudly =========================================================================
def fake_repository(tmp_path: Path, *, setup: int = 0, doctor: int = 0) -> Path:
    """A stand-in repository whose workshop.sh and stages doctor end with the given exit codes."""
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / "notebooks").mkdir()
    (repo / "workshop.sh").write_text(f"echo 'fake setup' >&2\nexit {setup}\n")
    verdict = "all 3 required checks passed" if doctor == 0 else "1 of 3 required checks failed"
    for name, body in {"jupyter": "exit 0", "python": "exit 0",
                       "stages": f"echo '{verdict}'\nexit {doctor}"}.items():
        path = repo / ".venv" / "bin" / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return repo


@pytest.mark.root
@pytest.mark.parametrize(("setup", "doctor", "expected"), [
    (0, 1, "stages doctor failed (exit 1)"),
    (3, 0, ""),
], ids=["doctor fails", "setup fails"])
def test_a_broken_provisioning_fails_loudly(tmp_path, setup, doctor, expected):
    repo = fake_repository(tmp_path, setup=setup, doctor=doctor)
    result = provision(tmp_path, free_port(), STAGES_REPO=str(repo), STAGES_JUPYTER="none")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert expected in out
    if setup:
        assert "stages doctor" not in out, "after a failed set-up nothing else may run"
    else:
        assert "1 of 3 required checks failed" in out and "done: the workshop is ready" not in out


@pytest.mark.parametrize(("environment", "words"), [
    ({"STAGES_JUPYTER": "sometimes"}, "STAGES_JUPYTER is 'sometimes': use auto"),
    ({"STAGES_JUPYTER_PORT": "88a"}, "must be port numbers"),
    ({"STAGES_REPO": "/nonexistent-stages"}, "no workshop.sh in /nonexistent-stages: set STAGES_REPO"),
], ids=["mode", "port", "repository"])
def test_bad_settings_get_one_clear_sentence(tmp_path, environment, words):
    env = {"STAGES_CONFIG_DIR": str(tmp_path / "etc"), "STAGES_SYSTEMD_DIR": str(tmp_path / "units")}
    result = subprocess.run(["bash", str(PROVISION)], env={**os.environ, **env, **environment},
                            capture_output=True, text=True, timeout=30)
    if os.geteuid() != 0:
        assert result.returncode == 1 and "this needs root" in result.stderr
        return
    assert result.returncode == 1
    assert words in result.stderr
    assert not (tmp_path / "etc").exists() and not (tmp_path / "units").exists(), "nothing written"
