"""pause and resume (runc pause/resume): the container's cgroup freezer stops every process where it stands.

Each test runs a real container counting in a loop and looks at its output from the host. Runs on the
cgroup v1 freezer here and on cgroup v2's cgroup.freeze in the cgroup v2 VM.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from stages.errors import StagesError
from stages.isolate import cgroups
from stages.runtime import oci
from stages.steps import StepRecord

LAYOUT = cgroups.detect()
pytestmark = [pytest.mark.root,
              pytest.mark.skipif("freezer" not in LAYOUT.extras,
                                 reason="no freezer here (cgroup v1 freezer, or cgroup v2 on Linux 5.2+)")]

COUNT = "i=0; while :; do i=$((i+1)); echo $i; usleep 2000; done"


@pytest.fixture
def counting(tmp_path, root, busybox_rootfs):
    """A running container that prints 1, 2, 3 ... into a file: (its ID, that file)."""
    bundle = oci.write_bundle(tmp_path / "bundle", oci.default_spec(["sh", "-c", COUNT],
                                                                    rootfs=str(busybox_rootfs)))
    output = tmp_path / "output"
    name = f"pause-{os.getpid()}-{tmp_path.name[-12:]}"
    with open(os.devnull) as stdin, open(output, "w") as out:
        oci.create(name, bundle, root=root, stdio=(stdin, out, out))
    oci.start(name, root=root)
    deadline = time.monotonic() + 10
    while os.path.getsize(output) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    yield name, output


def last_number(path) -> int:
    lines = path.read_text().split()
    return int(lines[-1]) if lines else 0


def advanced(path, seconds: float = 0.3) -> bool:
    """Whether the count goes on within ``seconds`` (give a running container longer on a slow machine,
    such as the emulated cgroup v2 VM)."""
    before = last_number(path)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.02)
        if last_number(path) > before:
            return True
    return False


def test_a_paused_container_does_not_count_and_counts_on_after_resume(counting, root):
    name, output = counting
    assert advanced(output, 10)
    record = StepRecord("pause")
    state = oci.pause(name, root=root, record=record)
    assert state["status"] == "paused" == oci.state(name, root=root)["status"]
    assert state["pid"] > 0
    assert not advanced(output), "a paused container went on counting"
    assert ("FROZEN" if LAYOUT.extras["freezer"].version == 1 else "cgroup.freeze") in record.script()
    # the status comes from the kernel's freezer, not from state.json
    with pytest.raises(StagesError, match="is paused"):
        oci.pause(name, root=root)
    with pytest.raises(StagesError, match="is paused; exec needs a running container"):
        oci.exec_process(name, {"args": ["true"], "cwd": "/"}, root=root)
    assert oci.resume(name, root=root)["status"] == "running"
    assert advanced(output, 10), "a resumed container did not count on"
    with pytest.raises(StagesError, match="not paused"):
        oci.resume(name, root=root)
    assert oci.list_containers(root)[0]["status"] == "running"


def test_kill_of_a_paused_container_ends_it_and_delete_leaves_nothing(counting, root):
    name, output = counting
    oci.pause(name, root=root)
    oci.kill(name, "KILL", root=root)
    assert oci.wait(name, root=root) == -signal.SIGKILL
    assert oci.state(name, root=root)["status"] == "stopped"
    oci.delete(name, root=root)
    assert oci.list_containers(root) == []
    assert not any(name in entry for entry in cgroups.find())


def test_delete_force_of_a_paused_container_leaves_nothing(counting, root):
    name, _ = counting
    oci.pause(name, root=root)
    started = time.monotonic()
    oci.delete(name, force=True, root=root)
    assert time.monotonic() - started < 3, "delete waited for a frozen process"
    assert oci.list_containers(root) == []
    assert not any(name in entry for entry in cgroups.find())


def test_a_stopped_container_cannot_be_paused(tmp_path, root, busybox_rootfs):
    bundle = oci.write_bundle(tmp_path / "bundle", oci.default_spec(["true"], rootfs=str(busybox_rootfs)))
    with open(os.devnull) as null:
        assert oci.run("short", bundle, root=root, stdio=(null, null, null), keep=True) == 0
    with pytest.raises(StagesError, match="is stopped; only a running container can be paused"):
        oci.pause("short", root=root)
    oci.delete("short", root=root)
