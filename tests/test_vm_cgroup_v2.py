"""cgroup v2, verified for real: boot the cgroup v2 test VM and run the cgroup and namespace tests in it.

This machine and CI run cgroup v1 (hybrid), where the tests marked ``cgroup_v2`` skip; the workshop VM
runs cgroup v2 only. So this test builds a small Debian VM (tests/vm/build.sh: cached under
/var/cache/stages-vm, about a minute the first time), boots it under QEMU's software emulation
(tests/vm/boot.sh, no KVM needed), and inside it runs pytest over the read-only share of this checkout.
It then checks, from what the VM wrote back, that

* the VM really was cgroup v2 only: /proc/self/mountinfo has cgroup2 at /sys/fs/cgroup and no v1
  hierarchy, and cgroup.controllers offers memory, pids and cpu;
* no inner test failed or errored;
* the tests marked ``cgroup_v2`` ran there: at least one, none skipped.

On failure the inner pytest summary and the end of the VM's console are part of the message.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VM = REPO / "tests" / "vm"
# The cgroup and namespace tests (and the runtime's freezer and device allowlist, which are cgroup v2 files
# and a BPF program there): under emulation a process starts ~35x slower than here, so the VM runs
# these, not the whole suite. Those marked `net` (bridges, firewall rules, published ports) stay on the
# host; `vm` is this test itself.
INNER_TESTS = ["tests/test_cgroups.py", "tests/test_isolate.py", "tests/test_oci_pause.py",
               "tests/test_oci_devices.py", "tests/vm/test_guest_smoke.py",
               "tests/test_oci_core.py::test_v2_a_container_reads_its_own_memory_limit_in_sys_fs_cgroup",
               # podman's own config.json and an unedited `runc spec` bundle on v2: a cgroup2 mount, the
               # devices allowlist as a BPF program, pids.max; and a terminal through a console socket
               "tests/test_oci_core.py::test_podmans_config_json_runs",
               "tests/test_oci_core.py::test_an_unedited_runc_spec_bundle_runs",
               "tests/test_oci_core.py::test_a_terminal_reaches_the_console_socket"]
INNER_MARKERS = "not vm and not net"
BUILD_TIMEOUT = 180  # a cold build: apt-get download, debootstrap, mkfs.ext4; 80 s, 140 s on a busy host
BOOT_TIMEOUT = 420   # boot ~10 s, the inner tests ~3-5 min (a busy 2-CPU machine: the most)
TOOLS = ("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "cpio", "busybox", "flock")

pytestmark = [
    pytest.mark.vm, pytest.mark.slow, pytest.mark.root,
    pytest.mark.timeout(BUILD_TIMEOUT + BOOT_TIMEOUT + 30),
]


LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def end_with_pytest() -> None:
    """In the child, before exec: should pytest die without cleaning up (SIGTERM, SIGKILL), the kernel
    sends the child SIGTERM (PR_SET_PDEATHSIG, prctl(2)); boot.sh's timeout(1) passes it on to QEMU,
    build.sh's trap removes its half-built directory."""
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_in_own_group(argv: list[str], log: Path, timeout: float, **options) -> tuple[int | None, float]:
    """Run argv with its output in log; kill it and everything it started on timeout or Ctrl-C.

    Returns (exit status or None after a timeout, seconds). A session of its own makes QEMU (and
    debootstrap) killable as one process group, whatever the script in between does.
    """
    started = time.monotonic()
    with open(log, "wb") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=options.pop("stderr", subprocess.STDOUT),
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   preexec_fn=end_with_pytest, **options)
        try:
            return process.wait(timeout=timeout), time.monotonic() - started
        except subprocess.TimeoutExpired:
            return None, time.monotonic() - started
        finally:
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path.name} was not written)"
    return "\n".join(text.splitlines()[-lines:])


def inner_summary(out: Path) -> str:
    """pytest's summary from inside the VM: the failures' short tracebacks and the summary lines."""
    try:
        text = (out / "pytest.log").read_text(errors="replace")
    except FileNotFoundError:
        return "(the VM wrote no pytest.log: the job did not start)"
    for marker in ("= FAILURES =", "= ERRORS =", "short test summary info"):
        at = text.find(marker)
        if at != -1:
            return text[text.rfind("\n", 0, at) + 1:][-12000:]
    return text[-4000:]


def test_cgroup_v2_code_paths_pass_in_a_cgroup_v2_vm(tmp_path):
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: apt-get install qemu-system-x86 debootstrap e2fsprogs "
                    "cpio busybox-static (bash workshop.sh test installs them)")

    # 1. the kernel, initramfs and root file system image (cached)
    built = tmp_path / "build.out"
    env = dict(os.environ, PYTHON=os.path.realpath(sys.executable))
    with open(tmp_path / "build.log", "wb") as errors:
        status, build_seconds = run_in_own_group(["bash", str(VM / "build.sh")], built, BUILD_TIMEOUT,
                                                 stderr=errors, env=env)
    assert status == 0, (f"building the VM failed (status {status}, {build_seconds:.0f} s):\n"
                         + tail(tmp_path / "build.log"))
    artifacts = built.read_text().split()[-1]

    # 2. the job: pytest over the read-only repository share, results into the read-write share
    share = tmp_path / "share"
    out = share / "out"
    out.mkdir(parents=True)
    inner = [name for name in INNER_TESTS if (REPO / name.partition("::")[0]).exists()]
    (share / "job").write_text(
        "exec sh /mnt/repo/tests/vm/guest/job.sh " + shlex.join(["-m", INNER_MARKERS, *inner]) + "\n")

    # 3. boot; QEMU exits when the guest powers off (or is killed by boot.sh's timeout, or ours)
    serial = tmp_path / "serial.log"
    status, boot_seconds = run_in_own_group(
        ["bash", str(VM / "boot.sh"), artifacts, str(share), str(REPO)], serial, BOOT_TIMEOUT + 20,
        env=dict(os.environ, TIMEOUT=str(BOOT_TIMEOUT)))
    print(f"cgroup v2 VM: build {build_seconds:.0f} s, boot and inner tests {boot_seconds:.0f} s")
    report = (f"\n--- pytest inside the VM ---\n{inner_summary(out)}"
              f"\n--- the VM's console (end) ---\n{tail(serial, 25)}")
    assert status == 0, f"the VM did not power off by itself (status {status}, {boot_seconds:.0f} s){report}"

    # 4. the VM was cgroup v2 only, as the kernel itself reported it
    facts_file = out / "facts.json"
    assert facts_file.exists(), f"the VM wrote no facts.json: the job did not run{report}"
    facts = json.loads(facts_file.read_text())
    # What notebook 00 shows beside a container: the VM's own kernel and how long it took to start
    # (written next to the cached image, atomically; a figure, not a check).
    figures = Path(artifacts) / "figures.json"
    figures.with_suffix(".tmp").write_text(json.dumps(
        {"kernel": facts.get("kernel"), "uptime_at_job": facts.get("uptime"), "cpus": facts.get("cpus"),
         "qemu_seconds": round(boot_seconds, 1), "accelerator": "tcg (software emulation)"}, indent=1))
    os.replace(figures.with_suffix(".tmp"), figures)
    assert facts["cgroup_mounts"] == [{"mount_point": "/sys/fs/cgroup", "fstype": "cgroup2"}], facts
    assert {"memory", "pids", "cpu"} <= set(facts["controllers"]), facts

    # 5. the inner tests: none failed, and the cgroup v2 ones ran
    junit = out / "junit.xml"
    assert junit.exists(), f"the VM wrote no junit.xml{report}"
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["tests"] > 0 and counts["failures"] == counts["errors"] == 0, f"{counts}{report}"
    assert (out / "rc").read_text().strip() == "0", f"pytest inside the VM exited non-zero{report}"
    ran, skipped = [], []
    for case in suite.iter("testcase"):
        markers = {p.get("value") for p in case.iter("property") if p.get("name") == "markers"}
        if any("cgroup_v2" in value.split() for value in markers):
            name = f"{case.get('classname')}::{case.get('name')}"
            (skipped if case.find("skipped") is not None else ran).append(name)
    assert ran, f"no test marked cgroup_v2 ran in the VM (skipped: {skipped}){report}"
    assert not skipped, f"tests marked cgroup_v2 were skipped in the cgroup v2 VM: {skipped}{report}"
    print(f"inside: {counts}; cgroup_v2 tests that ran: {len(ran)}")
