"""Manual vs automated: a stage 2 isolate and a stage 3 container, asked for the same settings, must put
the kernel in the same state.

Both get the namespaces uts, pid, mount, ipc, net and cgroup, the hostname ``same``, 64 MB of memory, 32
processes and no network. The isolate is wired by hand, one call per step; the container comes from one
``stages run -d`` (the command line, with a temporary STAGES_HOME and STAGES_RUN as in test_containers),
running a long sleep so that it can be looked at through its pid, then ``stages rm -f``. Everything is
read from the host through /proc/PID (proc(5)) and the cgroup files, the same way for both, never
through the code that made them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from host_views import cgroup_file, net_devices

from stages.isolate import Isolate
from stages.runtime.flags import INIT_PATH
from stages.runtime.oci.spec import MASKED_PATHS, READONLY_PATHS

pytestmark = [pytest.mark.root]

NAMESPACES = ("uts", "pid", "mount", "ipc", "net", "cgroup")
HOSTNAME = "same"
MEMORY = 64 << 20
PIDS = 32

#: The /proc/PID/ns entries each one must have of its own: the six asked for, with ``pid_for_children``
#: (a process's PID namespace is also the one its children are born in) and ``mnt`` for mount.
OWN_NAMESPACES = {"uts", "pid", "pid_for_children", "mnt", "ipc", "net", "cgroup"}


# -- looking from the host -----------------------------------------------------------------------------
def own_namespaces(pid: int) -> set[str]:
    """The entries of /proc/PID/ns whose inode differs from this test's (namespaces(7): same inode, same
    namespace)."""
    differ = set()
    for name in os.listdir(f"/proc/{pid}/ns"):
        if os.stat(f"/proc/{pid}/ns/{name}").st_ino != os.stat(f"/proc/self/ns/{name}").st_ino:
            differ.add(name)
    return differ


def mount_table(pid: int) -> dict[str, str]:
    """Mount point -> filesystem type, from /proc/PID/mountinfo (proc(5)): the mount points are relative to
    the process's root, so after pivot_root they read as the container sees them. The topmost mount wins."""
    table = {}
    with open(f"/proc/{pid}/mountinfo") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            table[left.split(" ")[4].replace("\\040", " ")] = right.split(" ")[0]
    return table


def hostname_of(pid: int) -> str:
    """The hostname in ``pid``'s UTS namespace: the host's uname run there (nsenter(1))."""
    result = subprocess.run(["nsenter", "--target", str(pid), "--uts", "uname", "-n"], capture_output=True,
                            text=True, timeout=10, check=True)
    return result.stdout.strip()


def kernel_state(pid: int) -> dict:
    return {"namespaces": own_namespaces(pid), "mounts": mount_table(pid), "hostname": hostname_of(pid),
            "memory": int(cgroup_file(pid, "memory", "memory.limit_in_bytes", "memory.max")),
            "pids": cgroup_file(pid, "pids", "pids.max", "pids.max"), "devices": net_devices(pid)}


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` on the host (the longest mount point above it)."""
    table = mount_table(os.getpid())
    real = os.path.realpath(path)
    best = max((point for point in table if real == point or real.startswith(point.rstrip("/") + "/")),
               key=len)
    return table[best]


def shells(steps) -> list[str]:
    return [step["shell"] if isinstance(step, dict) else step.shell for step in steps]


def has(lines: list[str], pattern: str) -> bool:
    return any(re.search(pattern, line) for line in lines)


# -- the two -----------------------------------------------------------------------------------------------
@pytest.fixture
def stages(tmp_path):
    """``stages(*argv)`` runs the command line with a state directory and runtime state of the test's own;
    whatever a failing test left is removed afterwards, so that the leak check reports this test."""
    env = dict(os.environ, STAGES_HOME=str(tmp_path / "home"), STAGES_RUN=str(tmp_path / "run"))
    env.pop("STAGES_HOST_NETNS", None)
    # The virtualenv's interpreter itself, not its realpath: the monitor `run -d` starts imports from it.
    python = sys.executable

    def call(*argv: str) -> subprocess.CompletedProcess:
        result = subprocess.run([python, "-m", "stages.cli", *argv], capture_output=True, text=True, env=env,
                                timeout=120, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"stages {' '.join(argv)}: {result.stdout}{result.stderr}"
        return result

    yield call
    subprocess.run([python, "-m", "stages.cli", "prune"], env=env, capture_output=True, timeout=60)


@pytest.fixture
def container(stages):
    """A stage 3 container with the settings, sleeping; its ``stages inspect`` record. Removed after."""
    name = f"mva-{secrets.token_hex(3)}"
    stages("run", "-d", "--name", name, "--hostname", HOSTNAME, "--memory", "64M", "--pids-limit", str(PIDS),
           "--network", "none", "busybox", "sleep", "1000")
    try:
        yield json.loads(stages("inspect", name).stdout)[0]
    finally:
        stages("rm", "-f", name)


@pytest.fixture
def isolate(busybox_rootfs):
    """A stage 2 isolate with the same settings, wired by hand, one call per step. Closed after."""
    with Isolate(busybox_rootfs, name=f"mva-{secrets.token_hex(2)}") as iso:
        iso.unshare(*NAMESPACES)
        iso.set_hostname(HOSTNAME)
        iso.mount_proc()
        iso.mount_dev()
        iso.mount_sys()
        iso.pivot_root()
        iso.limit(memory=MEMORY, pids=PIDS)
        yield iso


def test_a_container_and_an_isolate_with_the_same_settings_put_the_kernel_in_the_same_state(
        container, isolate, busybox_rootfs):
    assert container["state"]["status"] == "running"
    automated = kernel_state(container["state"]["pid"])
    manual = kernel_state(isolate.pid)

    # The same namespaces of their own, and no other (user and time stay the host's).
    assert manual["namespaces"] == automated["namespaces"] == OWN_NAMESPACES
    assert manual["hostname"] == automated["hostname"] == HOSTNAME
    assert manual["memory"] == automated["memory"] == MEMORY
    assert manual["pids"] == automated["pids"] == str(PIDS)
    assert manual["devices"] == automated["devices"] == ["lo"]

    # The same mount layout: /, /proc, /dev, /dev/pts, /dev/shm, /sys, each of the same type ...
    by_hand, engine = manual["mounts"], automated["mounts"]
    for point, fstype in {"/proc": "proc", "/dev": "tmpfs", "/dev/pts": "devpts", "/dev/shm": "tmpfs",
                          "/sys": "sysfs"}.items():
        assert by_hand[point] == engine[point] == fstype, point
    # ... except the root: the image's layers joined by overlayfs (overlay(5)) against a directory bound
    # on itself, so the isolate's / is the filesystem the rootfs directory lives on.
    assert engine["/"] == "overlay"
    assert by_hand["/"] == filesystem_of(busybox_rootfs)
    # The isolate has nothing the container lacks; the container has exactly what the runtime spec adds
    # to stage 2's steps (config.md): a POSIX message queue filesystem, the init bound in, and the masked
    # and read-only paths of /proc and /sys (the same kernel: those this machine has).
    assert set(by_hand) - set(engine) == set()
    documented = {"/dev/mqueue"} | ({INIT_PATH} if container.get("init") else set())
    documented |= {path for path in MASKED_PATHS + READONLY_PATHS if os.path.lexists(path)}
    documented |= {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}  # the engine's own, per container
    # Docker's read-only /sys/fs/cgroup: on cgroup v1 a tmpfs with one bind mount per hierarchy
    documented |= {point for point in engine if (point + "/").startswith("/sys/fs/cgroup/")}
    assert set(engine) - set(by_hand) == documented
    assert engine["/dev/mqueue"] == "mqueue"

    # And both records hold the equivalent steps, as a person would type them.
    typed, replaced = shells(isolate.record.steps), shells(container["steps"])
    for pattern in (r"^unshare .*--uts", r"^unshare .*--pid", r"^unshare .*--net", r"^unshare .*--cgroup",
                    rf"^hostname {HOSTNAME}$", r"^mount -t proc ", r"^mount -t devpts ",
                    r"^pivot_root \. \.$", r"^umount -l \.$",
                    rf"^echo {MEMORY} > \S+/memory\.(limit_in_bytes|max)$", rf"^echo {PIDS} > \S+/pids\.max$",
                    r"^echo \d+ > \S+/cgroup\.procs$"):
        assert has(typed, pattern), (pattern, typed)
        assert has(replaced, pattern), (pattern, replaced)
