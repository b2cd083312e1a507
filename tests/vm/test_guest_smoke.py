"""A guard that runs inside the cgroup v2 test VM: the kernel there enforces v2 limits.

It talks to the cgroup2 files directly, not through stages, so that when the VM test fails it is plain
whether the machine or the library is at fault. Elsewhere (the cgroup v1 host, a systemd machine where
pytest does not sit in the root cgroup) it skips: it creates cgroups right below the root, which is
only ours to do in the VM, where PID 1 and pytest live in the root cgroup.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess

import pytest

CGROUP2 = "/sys/fs/cgroup"


def _in_the_root_of_a_cgroup2_hierarchy() -> bool:
    try:
        with open("/proc/self/cgroup") as handle:
            own = handle.read().splitlines()
        with open(os.path.join(CGROUP2, "cgroup.controllers")) as handle:
            controllers = handle.read().split()
    except OSError:
        return False
    return own == ["0::/"] and {"memory", "pids"} <= set(controllers)


pytestmark = [
    pytest.mark.root,
    pytest.mark.cgroup_v2,
    pytest.mark.skipif(not _in_the_root_of_a_cgroup2_hierarchy(),
                       reason="runs in the cgroup v2 test VM (tests/test_vm_cgroup_v2.py boots it)"),
]


def read_keys(path: str) -> dict[str, int]:
    with open(path) as handle:
        return {key: int(value) for key, value in (line.split() for line in handle)}


def write(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


@pytest.fixture
def cgroup():
    # The root cgroup may hold processes and hand controllers down at once; no other may (cgroups(7),
    # "no internal processes" rule).
    for controller in ("memory", "pids"):
        write(os.path.join(CGROUP2, "cgroup.subtree_control"), "+" + controller)
    path = os.path.join(CGROUP2, f"stages-smoke-{os.getpid()}")
    os.mkdir(path)
    try:
        yield path
    finally:
        os.rmdir(path)


def run_inside(cgroup: str, python: str, code: str) -> subprocess.CompletedProcess:
    """Run code in a child that joined the cgroup before it started, so all its memory is charged there."""
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: write(os.path.join(cgroup, "cgroup.procs"), "0"))


def test_cgroup2_alone_is_mounted_at_sys_fs_cgroup():
    with open("/proc/self/mountinfo") as handle:
        mounts = [(line.split()[4], line.split(" - ")[1].split()[0]) for line in handle]
    assert [m for m in mounts if m[1] in ("cgroup", "cgroup2")] == [(CGROUP2, "cgroup2")]


def test_memory_max_oom_kills_a_hog(cgroup, python):
    write(os.path.join(cgroup, "memory.max"), str(32 << 20))
    if os.path.exists(os.path.join(cgroup, "memory.swap.max")):  # no swap to escape to, either
        write(os.path.join(cgroup, "memory.swap.max"), "0")
    small = run_inside(cgroup, python, "block = b'x' * (8 << 20)")
    hog = run_inside(cgroup, python, "block = b'x' * (128 << 20)")
    assert small.returncode == 0, small.stderr
    assert hog.returncode == -signal.SIGKILL
    assert read_keys(os.path.join(cgroup, "memory.events"))["oom_kill"] >= 1


def test_pids_max_stops_forks(cgroup, python):
    write(os.path.join(cgroup, "pids.max"), "4")
    # The child is one of the 4; its forks fail with EAGAIN once 4 tasks are in the cgroup (fork(2)).
    code = """
import os, signal
children = []
try:
    for _ in range(10):
        pid = os.fork()
        if pid == 0:
            signal.pause()
        children.append(pid)
    print(len(children), 0)
except OSError as error:
    print(len(children), error.errno)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""
    forked, error = map(int, run_inside(cgroup, python, code).stdout.split())
    assert (forked, error) == (3, errno.EAGAIN)
    assert read_keys(os.path.join(cgroup, "pids.events"))["max"] >= 1
