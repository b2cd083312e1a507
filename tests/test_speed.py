"""What keeps `stages run` fast (issue #4), checked by what a learner could observe.

The time itself is measured by ``make bench`` (bench/run.py) and ``bench/phases.py``, not asserted
here: a busy machine would make such a test fail for nothing. What is asserted is what the speed rests
on: the hot path imports no network, layer or build code; the container's init is compiled once and
then found; ``run -d`` forks its monitor instead of starting a second Python (and still starts a fresh
one from a caller with threads, which must not fork).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root]

#: Modules `stages run --network none` must not import: each is only needed when asked for.
NOT_ON_THE_HOT_PATH = (
    "pyroute2",  # only for --network bridge
    "stages.runtime.network",
    "stages.runtime.layers",  # tarfile, gzip, lzma: only to import or build an image
    "stages.runtime.build",
    "stages.runtime.monitor",  # only for -d
    "hashlib",  # OpenSSL: the init's cache name is a CRC-32
    "psutil",
    # each costs milliseconds at every start, and a run needs none of them (import them where used)
    "typing", "logging", "tarfile", "subprocess", "platform", "tempfile",
)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speed-home")


@pytest.fixture
def env(home, tmp_path) -> dict:
    env = dict(os.environ, STAGES_HOME=str(home), STAGES_RUN=str(tmp_path / "run"))
    env.pop("STAGES_HOST_NETNS", None)
    return env


def cli(env: dict, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "stages.cli", *argv], env=env, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=60)
    if check:
        assert result.returncode == 0, f"stages {' '.join(argv)}: {result.stderr}"
    return result


def test_a_run_imports_nothing_it_does_not_use(env):
    cli(env, "run", "--rm", "--network", "none", "busybox", "true")  # the image and the init, built once
    probe = ("import json, sys\n"
             "from stages.cli import main\n"
             "code = main(['run', '--rm', '--network', 'none', 'busybox', 'sh', '-c', 'exit 7'])\n"
             "print(json.dumps({'code': code, 'modules': sorted(sys.modules)}))\n")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["code"] == 7  # the run really happened
    assert "stages.runtime.oci.process" in seen["modules"]
    assert sorted(set(NOT_ON_THE_HOT_PATH) & set(seen["modules"])) == []


def test_the_init_is_compiled_once_then_found_without_a_compiler(home, monkeypatch):
    from stages.runtime import overlay

    first = overlay.init_program(home)
    assert first is not None and os.access(first, os.X_OK)
    monkeypatch.setattr(overlay.shutil, "which", lambda name: pytest.fail(f"looked for {name} again"))
    assert overlay.init_program(home) == first


@pytest.mark.parametrize("environment", [{"STAGES_HOME": "/tmp/x"}, {}])
def test_the_store_finds_the_state_directory_by_stage_1s_rule(monkeypatch, environment):
    """Stage 1 (stages.rootfs) and stage 3 (the store, the containers) keep their state in one place, by
    one rule (stages.paths), which the store reaches without importing stages.rootfs."""
    from stages import rootfs
    from stages.runtime import containers, store

    monkeypatch.delenv("STAGES_HOME", raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    assert store.state_dir() == Path(rootfs.state_dir()) == containers.home()


def _monitor_command_line(env: dict, name: str) -> str:
    record = json.loads(cli(env, "inspect", name).stdout)[0]
    with open(f"/proc/{record['monitor_pid']}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode()


def test_run_d_forks_its_monitor_and_returns_once_the_container_runs(env):
    started = time.monotonic()
    cli(env, "run", "-d", "--name", "forked", "--network", "none", "busybox", "sleep", "30")
    try:
        assert time.monotonic() - started < 30  # back while the container still runs
        assert "Up" in cli(env, "ps").stdout
        # a fork of `stages run -d` itself: no second interpreter with its imports
        line = _monitor_command_line(env, "forked")
        assert "stages.cli run -d" in line and "stages.runtime.monitor" not in line
    finally:
        cli(env, "rm", "-f", "forked")
    assert cli(env, "ps", "-a", "-q").stdout.strip() == ""


def test_a_caller_with_threads_gets_a_fresh_monitor(env, monkeypatch):
    """fork(2) copies only the calling thread: a threaded caller (a notebook kernel) must not fork."""
    from stages.runtime import engine
    from stages.runtime.flags import Options

    for key in ("STAGES_HOME", "STAGES_RUN"):
        monkeypatch.setenv(key, env[key])
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        info, code = engine.run(Options(image="busybox", command=["sleep", "30"], name="spawned",
                                        network="none", detach=True))
        assert code is None and info["status"] == "running"
        assert "-m stages.runtime.monitor" in _monitor_command_line(env, "spawned")
        engine.remove("spawned", force=True)
    finally:
        stop.set()
        thread.join()
    assert cli(env, "ps", "-a", "-q").stdout.strip() == ""
