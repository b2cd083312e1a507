"""Shared fixtures: a busybox root filesystem, and a leak check around every test.

The leak check snapshots what a test could leave on the host (mounts, network devices, network
namespaces, cgroup directories, child processes, firewall rules) before the test and fails it if anything
is left afterwards. A test that means to leave something (to test the cleanup command) calls the cleanup
itself before it ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

CGROUP_ROOT = "/sys/fs/cgroup"


def _mounts() -> set[tuple[str, str]]:
    # /run/netns itself is iproute2's: the first `ip netns add` on a machine bind-mounts the directory on
    # itself (shared) and keeps it there by design (ip-netns(8)); each namespace below it still counts.
    with open("/proc/self/mountinfo") as handle:
        return {(line.split(" ")[4], line.split(" - ")[1].split(" ")[0]) for line in handle
                if line.split(" ")[4] != "/run/netns"}


def _net_devices() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def _netns() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def _own_cgroup_directories() -> list[str]:
    """Our own cgroup in each mounted hierarchy: stages creates cgroups only below these."""
    own = {}
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            own[controllers] = path
    directories = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields, _, rest = line.partition(" - ")
            fstype, _, options = rest.split(" ")[:3]
            mount_root, target = fields.split(" ")[3:5]
            if fstype == "cgroup2":
                path = own.get("")
            elif fstype == "cgroup":
                words = set(options.strip().split(","))
                path = next((p for c, p in own.items() if c and set(c.split(",")) <= words), None)
            else:
                continue
            if path is not None and path.startswith(mount_root):
                directories.append(os.path.join(target, path[len(mount_root):].lstrip("/")))
    return directories


def _cgroups() -> set[str]:
    """cgroup directories a test could have made: below our own cgroups, or named like ours anywhere.

    Siblings of our own cgroup are left out: on a shared machine other programs come and go there, and
    stages never creates cgroups outside its own subtree (DESIGN: never touch cgroups we did not create).
    """
    found = set()
    if not os.path.isdir(CGROUP_ROOT):
        return found
    for own in _own_cgroup_directories():
        for top, dirs, _ in os.walk(own):
            if top[len(own):].count("/") >= 6:
                dirs[:] = []
            found.add(top)
    for top, dirs, _ in os.walk(CGROUP_ROOT):
        if top[len(CGROUP_ROOT):].count("/") >= 7:
            dirs[:] = []
        if "stages" in os.path.basename(top):
            found.add(top)
    return found


def _children() -> set[tuple[int, str]]:
    result = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                result.add((child.pid, " ".join(child.cmdline())[:80]))
        except psutil.NoSuchProcess:
            continue
    return result


def _firewall() -> set[str]:
    lines: set[str] = set()
    if shutil.which("nft"):
        out = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
        lines |= {line.strip() for line in out.splitlines() if line.strip()}
    return lines


def snapshot() -> dict[str, set]:
    return {
        "mount": _mounts(), "net device": _net_devices(), "netns": _netns(), "cgroup": _cgroups(),
        "process": _children(), "firewall rule": _firewall(),
    }


def leaks(before: dict[str, set], after: dict[str, set]) -> list[str]:
    return [f"{kind}: {item}" for kind in before for item in sorted(after[kind] - before[kind], key=str)]


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail the test if it leaves a mount, net device, netns, cgroup, child process or firewall rule."""
    if os.geteuid() != 0 or request.node.get_closest_marker("leaks_ok"):
        yield
        return
    before = snapshot()
    yield
    after = snapshot()
    # Children may take a moment to be reaped by the code under test.
    if after["process"] - before["process"]:
        psutil.wait_procs([psutil.Process(pid) for pid, _ in after["process"] - before["process"]
                           if psutil.pid_exists(pid)], timeout=2)
        after["process"] = _children()
    found = leaks(before, after)
    if found:
        pytest.fail("the test left these behind:\n  " + "\n  ".join(found[:30]), pytrace=False)


def pytest_configure(config):
    config.addinivalue_line("markers", "leaks_ok: the test checks leftovers itself")


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: run the suite as root (sudo bash workshop.sh test)")
        for item in items:
            if item.get_closest_marker("root"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def python() -> str:
    """An absolute interpreter path (the pyenv shim costs ~120 ms a start): the test's own, not the one its
    symlink leads to, which would leave the virtualenv (and import stages from the current directory, or
    not at all, as in workshop.sh's runs on the other Pythons)."""
    return os.path.abspath(sys.executable)


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory) -> Path:
    """A busybox root filesystem built once for the session; tests must not change it."""
    from stages import rootfs

    return Path(rootfs.build(tmp_path_factory.mktemp("rootfs") / "busybox", source="busybox"))


@pytest.fixture
def scratch_rootfs(tmp_path) -> Path:
    """A busybox root filesystem of the test's own, which it may change."""
    from stages import rootfs

    return Path(rootfs.build(tmp_path / "rootfs", source="busybox"))


@pytest.fixture
def root(tmp_path) -> str:
    """An OCI runtime state root of the test's own (``oci.create(..., root=root)``); a container a failed
    test left in it is deleted afterwards, so that one failure does not leak into the next test."""
    from stages.runtime import oci

    directory = tmp_path / "state"
    yield str(directory)
    for item in oci.list_containers(str(directory)):
        oci.delete(item["id"], force=True, root=str(directory))


@pytest.fixture
def reachable_rootfs():
    """A rootfs that root of a user namespace (a nobody on the host) may enter: not below a 0700 directory,
    as pytest's tmp_path is."""
    import tempfile

    from stages import rootfs

    top = tempfile.mkdtemp(prefix="stages-reachable-")
    os.chmod(top, 0o755)
    try:
        yield rootfs.build(os.path.join(top, "rootfs"), source="busybox")
    finally:
        shutil.rmtree(top)
