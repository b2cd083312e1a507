"""The escape probes (tests/escape_probes.py) in each stage: every door open in a stage-1 jail (that is its
lesson), the ones a default stage-2 isolate still leaves, none in a hardened isolate, none in a default
stage-3 container.

The host the probes look for is a network namespace the test makes (with a veth pair in it), a loop device
over a scratch file, and a sleeping process: stages 1 and 2 run in that network namespace (nsenter
--net), stage 3 uses it as its stand-in host (STAGES_HOST_NETNS). A probe whose door this kernel lacks
altogether (no /proc/sysrq-trigger, no module support) says ABSENT, and only those may.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import escape_probes as probes
import pytest

from stages import rootfs
from stages.isolate import Isolate, cgroups, seccomp_available
from stages.isolate.network import test_host as make_test_host

pytestmark = [pytest.mark.root]

REPO = Path(__file__).resolve().parent.parent
LACKS = probes.host_lacks()


def expect(open_doors: set[str]) -> dict[str, str]:
    """Every probe BLOCKED but ``open_doors`` OPEN, and those this kernel lacks ABSENT."""
    return {name: "ABSENT" if name in LACKS else "OPEN" if name in open_doors else "BLOCKED"
            for name in probes.NAMES}


@pytest.fixture(scope="module")
def box(tmp_path_factory) -> Iterator[Path]:
    """A rootfs of this module's own (the probes make and remove nodes in it), on a filesystem that allows
    device nodes: a jail on a ``nodev`` /tmp (Debian 13 mounts one) could open none, and the stage-1 probes
    would show the mount option, not the jail."""
    top = tmp_path_factory.mktemp("probes")
    made = None
    if os.statvfs(top).f_flag & os.ST_NODEV:
        top = made = Path(tempfile.mkdtemp(prefix="stages-probes-", dir="/var/tmp"))
    assert not os.statvfs(top).f_flag & os.ST_NODEV, f"{top} is on a nodev filesystem"
    try:
        yield Path(rootfs.build(top / "box", source="busybox"))
    finally:
        if made is not None:
            shutil.rmtree(made)


@pytest.fixture
def host(tmp_path):
    """(network namespace name, :class:`escape_probes.Targets`), all removed afterwards."""
    name = f"stgprb{os.getpid() % 100000}"
    with make_test_host(name), probes.host_targets(tmp_path, name) as targets:
        yield name, targets


def in_host(netns: str, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``stages ARGV`` run in the stand-in host's network namespace (nsenter changes nothing else)."""
    return subprocess.run(["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-m", "stages.cli", *argv],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


def verdicts_of(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return probes.verdicts(result.stdout)


def test_the_probes_see_a_door_where_the_host_has_it():
    # the probes know which doors this kernel lacks; that list is what the rest of the tests allow ABSENT
    assert set(LACKS) <= set(probes.NAMES)
    assert "raw_disk" not in LACKS and "core_pattern" not in LACKS and "mount" not in LACKS


def test_stage_1_a_chroot_jail_leaves_every_door_open(box, host):
    netns, targets = host
    result = in_host(netns, "jail", str(box), "--proc", "--", "sh", "-c", probes.script(targets))
    # All but one: the kernel itself refuses a new user namespace to a chrooted process (unshare(2),
    # EPERM "the caller is in a chroot environment"), and root there holds every capability already.
    assert verdicts_of(result) == expect(set(probes.NAMES) - {"nested_userns"}), result.stdout
    assert not list(box.glob("tmp/.probe-*")) and not list(box.glob(".probe-*"))  # nothing left behind


def test_stage_2_a_default_isolate_closes_proc_sys_but_not_the_devices_or_user_namespaces(box, host):
    netns, targets = host
    result = in_host(netns, "isolate", str(box), "--explain", "--", "sh", "-c", probes.script(targets))
    # /proc/sys read-only by default (core_pattern, sysrq: finding 3); what only --harden closes is open
    assert verdicts_of(result) == expect({"raw_disk", "host_tty", "nested_userns"}), result.stdout
    assert re.search(r"remount \S*/proc/sys\n", result.stderr), result.stderr  # --explain shows the step
    assert "# seccomp" not in result.stderr and "devices.deny" not in result.stderr


@pytest.mark.skipif(not seccomp_available(), reason="libseccomp is not installed")
def test_stage_2_hardened_closes_every_door(box, host):
    netns, targets = host
    result = in_host(netns, "isolate", str(box), "--harden", "--explain", "--", "sh", "-c",
                     probes.script(targets))
    assert verdicts_of(result) == expect(set()), result.stdout
    # --explain shows each defence as the step it is
    assert re.search(r"remount \S*/proc/sys\n", result.stderr), result.stderr
    assert re.search(r"mount --bind /dev/null \S*/proc/", result.stderr), result.stderr
    assert "# seccomp: " in result.stderr and "clone(CLONE_NEWUSER)" in result.stderr
    if cgroups.detect().hierarchy("devices").version == 1:
        assert "echo a > " in result.stderr and "devices.deny" in result.stderr


@pytest.mark.skipif(not seccomp_available(), reason="libseccomp is not installed")
def test_stage_2_each_defence_closes_its_door_step_by_step(box, host):
    _, targets = host

    def probe(iso, name: str) -> str:
        return probes.verdicts(iso.run(probes.script(targets, [name])).stdout)[name]

    with Isolate(box) as iso:
        iso.unshare("uts", "ipc", "net", "mount", "pid")
        iso.mount_proc()
        iso.mount_sys()
        iso.mount_dev()
        iso.mount_tmp()
        iso.pivot_root()
        iso.limit(pids=64)  # a cgroup without the devices controller: harden() adds it
        iso.drop_capabilities()
        iso.set_no_new_privs()
        # no_new_privs and Docker's capabilities alone leave these three doors
        assert probe(iso, "core_pattern") == "OPEN"
        assert probe(iso, "raw_disk") == "OPEN"
        assert probe(iso, "nested_userns") == "OPEN"
        assert "/proc/sys" in iso.protect_proc()
        assert probe(iso, "core_pattern") == "BLOCKED"
        done = iso.harden()
        assert set(done) == {"devices", "seccomp"} or set(done) == {"devices", "drop_capabilities", "seccomp"}
        assert probe(iso, "raw_disk") == "BLOCKED"
        assert probe(iso, "host_tty") == "BLOCKED"
        assert probe(iso, "nested_userns") == "BLOCKED"
        assert iso.run("grep Seccomp: /proc/self/status").stdout.split() == ["Seccomp:", "2"]
        # fork (clone without namespace flags) still works under the filter
        assert iso.run("echo $(echo forked)").stdout == "forked\n"
        # the limit is still there, and on cgroup v1 the holder is in a devices cgroup of its own too
        assert iso.cgroup.pids() and cgroups.parse_pids(
            open(iso.cgroup.file("pids", "pids.max")).read().strip()) == 64
    script = iso.record.script()
    assert "devices.deny" in script or "CAP_MKNOD" in str(done["devices"])


@pytest.mark.skipif(not seccomp_available(), reason="libseccomp is not installed")
def test_stage_2_harden_without_a_device_allowlist_takes_cap_mknod_away(box, host, monkeypatch):
    # a machine with no device cgroup at all (neither v1's controller nor v2): stand in for it by hiding
    # the devices controller from harden()
    _, targets = host
    real = cgroups.detect
    monkeypatch.setattr(cgroups, "detect", lambda: dataclasses.replace(
        real(), extras={k: v for k, v in real().extras.items() if k != "devices"}))
    with Isolate(box) as iso:
        iso.unshare("uts", "ipc", "net", "mount", "pid")
        iso.mount_proc()
        iso.mount_dev()
        iso.pivot_root()
        done = iso.harden()
        assert "CAP_MKNOD is dropped instead" in done["devices"]
        assert "mknod" not in done["drop_capabilities"]["bounding"]
        verdicts = probes.verdicts(iso.run(probes.script(targets, ["raw_disk", "host_tty"])).stdout)
        assert verdicts["raw_disk"] == verdicts["host_tty"] == "BLOCKED"
        assert iso.cgroup is None  # nothing was made in a cgroup
    assert any("CAP_MKNOD goes instead" in step.shell for step in iso.record.steps)


def test_stage_3_a_default_container_closes_every_door_and_privileged_opens_them(host, tmp_path):
    netns, targets = host
    env = dict(os.environ, STAGES_HOME=str(tmp_path / "home"), STAGES_RUN=str(tmp_path / "run"),
               STAGES_HOST_NETNS=netns)

    def run(*flags: str) -> dict[str, str]:
        result = subprocess.run([sys.executable, "-m", "stages.cli", "run", "--rm", *flags, "busybox", "sh",
                                 "-c", probes.script(targets)], capture_output=True, text=True, timeout=120,
                                cwd=REPO, env=env, stdin=subprocess.DEVNULL)
        return verdicts_of(result)

    try:
        assert run() == expect(set())
        # the probes are not blind in a container: --privileged turns the defences off, and they see it
        privileged = run("--privileged")
        assert {name for name, verdict in privileged.items() if verdict == "OPEN"} >= {
            "raw_disk", "host_tty", "core_pattern", "sys_write", "mount", "nested_userns"}
    finally:
        subprocess.run([sys.executable, "-m", "stages.cli", "prune"], env=env, capture_output=True,
                       timeout=60)
