"""linux.resources.devices: the device allowlist, enforced by the kernel through the container's cgroup.

A container whose root may mknod (CAP_MKNOD) could make /dev/sda and read the host's disk; the allowlist
says no. The container tests run on whatever this machine has (v1 devices controller here, the v2 BPF
program in the cgroup v2 VM); the BPF program is also tested directly on this machine's cgroup2 mount,
where it works whether or not that hierarchy has controllers.

Device numbers used: 8:0 (sda: opened, never read, as the answer is EPERM) and 240:0, 240:1 (the
"local/experimental" range, devices.txt: no driver has them, so an allowed open fails with ENXIO, "No
such device or address", and a refused one with EPERM: no real device is touched).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from stages.isolate import cgroups
from stages.runtime import oci
from stages.runtime.oci import devices
from stages.steps import StepRecord

LAYOUT = cgroups.detect()
EPERM = "Operation not permitted"
ENXIO = "No such device or address"
DENY_ALL = [{"allow": False, "access": "rwm"}]  # what podman sends


# -- the rules, as plain data (no kernel) ------------------------------------------------------------------
def test_podmans_deny_all_becomes_a_default_deny_with_the_default_devices_allowed():
    rules = devices.parse(DENY_ALL)
    default_allow, exceptions = devices.reduce(rules)
    assert default_allow is False
    lines = [rule.line() for rule in exceptions]
    for line in ("c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",
                 "c 5:0 rwm", "c 5:2 rwm", "c 136:* rwm"):
        assert line in lines
    assert all(rule.allow for rule in exceptions)
    assert devices.parse(None) is None and devices.parse([]) is None  # no rule: no restriction


def test_later_rules_win():
    rules = devices.parse([
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 240, "minor": 0, "access": "rw"},
        {"allow": False, "type": "c", "major": 240, "minor": 0, "access": "w"},  # takes w back
        {"allow": True, "access": "rwm"},  # and then everything is allowed again ...
        {"allow": False, "type": "b", "major": 8, "access": "rw"},  # ... but sd* disks
    ])
    default_allow, exceptions = devices.reduce(rules)
    assert default_allow is True
    assert [(rule.allow, rule.line()) for rule in exceptions] == [(False, "b 8:* rw")]
    default_allow, exceptions = devices.reduce(rules[:3])
    assert default_allow is False and [rule.line() for rule in exceptions] == ["c 240:0 r"]


@pytest.mark.parametrize("item, field", [
    ({"access": "rwm"}, "linux.resources.devices[0].allow"),
    ({"allow": False, "type": "x"}, "linux.resources.devices[0].type"),
    ({"allow": False, "access": "rwx"}, "linux.resources.devices[0].access"),
    ({"allow": False, "major": "8"}, "linux.resources.devices[0].major"),
])
def test_bad_rules_are_refused_by_name(item, field):
    with pytest.raises(oci.SpecError) as caught:
        devices.parse([item])
    assert caught.value.message.startswith(f"config.json: {field}:")


def test_the_program_reads_like_the_rules():
    program = devices.assemble(devices.parse(DENY_ALL + [
        {"allow": True, "type": "c", "major": 240, "minor": 0, "access": "r"}]))
    text = devices.listing(program)
    assert "r0 = 1              # allow c 240:0 r" in text and "# allow c 1:3 rwm" in text
    assert text.splitlines()[-2].endswith("# otherwise: deny")
    assert all(len(item.encode()) == 8 for item in program)


# -- the v2 program on the real kernel ---------------------------------------------------------------------
def _unified() -> str | None:
    """Our own cgroup's directory on the cgroup2 mount, if there is one (v2, or hybrid like here)."""
    own = next((line.split(":", 2)[2].strip() for line in open("/proc/self/cgroup")
                if line.startswith("0::")), None)
    mount = next((target for target, fstype, mount_root, _ in cgroups._cgroup_mounts()
                  if fstype == "cgroup2" and mount_root == "/"), None)
    if own is None or mount is None:
        return None
    return os.path.normpath(mount + "/" + own)


UNIFIED = _unified()


@pytest.fixture
def v2_cgroup():
    """A cgroup of our own on the cgroup2 mount: <our cgroup>/stages/stages-test-devices-PID."""
    parent = os.path.join(UNIFIED, "stages")
    directory = os.path.join(parent, f"stages-test-devices-{os.getpid()}")
    os.makedirs(directory)
    try:
        yield directory
    finally:
        os.rmdir(directory)  # the kernel detaches the program with it
        try:
            os.rmdir(parent)
        except OSError:
            pass  # another stages cgroup is still in it


def _run_in(directory: str, nodes: str, script: str) -> str:
    """Run ``script`` in the cgroup at ``directory``, in a directory of device nodes made by ``nodes``
    (mknod commands): a tmpfs in a mount namespace of its own (made private before the mount), since
    /tmp may be mounted nodev (as in the cgroup v2 VM), where every device open fails with EACCES."""
    def enter():
        with open(os.path.join(directory, "cgroup.procs"), "w") as handle:
            handle.write(str(os.getpid()))
    inner = f"mount -t tmpfs devices /mnt && cd /mnt && {nodes} && {script}"
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
                          preexec_fn=enter, capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


NODES = "mknod sda b 8 0 && mknod x240 c 240 0 && mknod x241 c 240 1"


@pytest.mark.root
@pytest.mark.skipif(UNIFIED is None, reason="no cgroup2 mount here")
def test_the_bpf_program_allows_and_denies_on_the_real_kernel(v2_cgroup):
    script = ("cat /dev/null && echo null-ok; head -c1 /dev/zero | wc -c; "
              "head -c1 sda; head -c1 x240; head -c1 x241; mknod made c 240 1 && echo mknod-ok")
    before = _run_in(v2_cgroup, NODES, script.replace("head -c1 sda; ", ""))  # a real disk is never read
    assert f"head: cannot open 'x240' for reading: {ENXIO}" in before and EPERM not in before, before
    record = StepRecord("devices")
    with record.active():
        devices.attach_program(v2_cgroup, devices.parse(DENY_ALL + [
            {"allow": True, "type": "c", "major": 240, "minor": 0, "access": "r"}]))
    assert "bpf(BPF_PROG_LOAD)" in record.script()
    out = _run_in(v2_cgroup, NODES, script)
    lines = out.splitlines()
    assert "null-ok" in lines and "1" in lines, out  # the default devices
    assert f"head: cannot open 'sda' for reading: {EPERM}" in lines, out
    assert f"head: cannot open 'x240' for reading: {ENXIO}" in lines, out  # allowed: on to the driver
    assert f"head: cannot open 'x241' for reading: {EPERM}" in lines, out
    assert "mknod-ok" in lines  # mknod of anything is allowed; opening it is not


@pytest.mark.root
@pytest.mark.skipif(UNIFIED is None, reason="no cgroup2 mount here")
def test_a_deny_list_program_refuses_only_what_it_names(v2_cgroup):
    devices.attach_program(v2_cgroup, devices.parse([
        {"allow": False, "type": "c", "major": 240, "minor": 0, "access": "r"}]))
    out = _run_in(v2_cgroup, "mknod x240 c 240 0", "head -c1 x240; echo x > x240; cat /dev/null && echo ok")
    assert f"head: cannot open 'x240' for reading: {EPERM}" in out, out
    assert ENXIO in out and "ok" in out.splitlines(), out  # writing is not refused: on to the driver


# -- containers ------------------------------------------------------------------------------------------
SCRIPT = ("cat /dev/null && echo null-ok; head -c1 /dev/zero | wc -c; echo x > /dev/full; "
          "mknod /dev/sda b 8 0 && echo mknod-ok; head -c1 /dev/sda; "
          "mknod /dev/x240 c 240 0; head -c1 /dev/x240")


def run(tmp_path, root, rootfs, rules, record=None):
    config = oci.default_spec(["sh", "-c", SCRIPT], rootfs=str(rootfs))
    config["linux"]["resources"] = {"devices": rules}
    bundle = oci.write_bundle(tmp_path / "bundle", config)
    output = tmp_path / "output"
    with open(os.devnull) as stdin, open(output, "w") as out:
        code = oci.run(f"dev-{os.getpid()}-{tmp_path.name[-12:]}", bundle, root=root, stdio=(stdin, out, out),
                       record=record)
    return code, output.read_text()


@pytest.mark.root
@pytest.mark.skipif("devices" not in LAYOUT.extras, reason="no devices cgroup (v1) nor cgroup2 here")
def test_a_container_with_deny_all_uses_its_default_devices_and_nothing_else(tmp_path, root, busybox_rootfs):
    record = StepRecord("devices")
    code, out = run(tmp_path, root, busybox_rootfs, DENY_ALL, record)
    lines = out.splitlines()
    assert "null-ok" in lines and "1" in lines, out
    assert "No space left on device" in out  # /dev/full opened for writing: its own answer, ENOSPC
    assert "mknod-ok" in lines
    assert f"head: /dev/sda: {EPERM}" in lines or f"head: can't open '/dev/sda': {EPERM}" in lines, out
    assert f"head: /dev/x240: {EPERM}" in lines or f"head: can't open '/dev/x240': {EPERM}" in lines, out
    script = record.script()
    if LAYOUT.extras["devices"].version == 1:
        assert "echo a > " in script and "devices.deny" in script
        assert "echo c 1:3 rwm > " in script and "devices.allow" in script
        assert "echo 'c *:* m' > " in script  # quoted, as a person must type it
    else:
        assert "bpf(BPF_PROG_LOAD)" in script
    # an extra rule lets one more device through
    code, out = run(tmp_path, root, busybox_rootfs, DENY_ALL + [
        {"allow": True, "type": "c", "major": 240, "minor": 0, "access": "r"}])
    assert ENXIO in out and out.count(EPERM) == 1, out  # only /dev/sda is refused now
