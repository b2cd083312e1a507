"""stages-oci against the runtime spec's finer points (issue 16): cgroupsPath, the other linux.resources,
rootfsPropagation, namespaces joined by path, the PID file and the state. Each runs a real container
and reads what the kernel shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_conformance import HarnessCgroup, in_cgroup_namespace

from stages.errors import StagesError
from stages.isolate import cgroups
from stages.runtime import oci

pytestmark = pytest.mark.root
STAGES_OCI = os.path.join(os.path.dirname(sys.executable), "stages-oci")


def bundle_of(tmp_path, rootfs, args, change=None) -> str:
    config = oci.default_spec(args, rootfs=str(rootfs))
    if change:
        change(config)
    return oci.write_bundle(tmp_path / "bundle", config)


def open_cgroup(container_id: str, root: str) -> cgroups.Cgroup:
    private = oci.state(container_id, root=root) and json.load(
        open(os.path.join(root, container_id, "state.json")))["stages"]
    return cgroups.Cgroup(private["cgroup"], dict(private["cgroup_directories"]),
                          dict(private["cgroup_versions"]))


def read(path: str) -> str:
    with open(path) as handle:
        return handle.read().strip()


# -- cgroupsPath ---------------------------------------------------------------------------------------
def test_an_absolute_cgroups_path_is_from_the_mount_point_of_the_runtimes_cgroup_namespace(tmp_path,
                                                                                         busybox_rootfs):
    """/abs-test/c1 in a cgroup namespace rooted at a cgroup of ours lands below that cgroup, never at
    the host's hierarchy root; the parent made on the way goes with the container."""
    def change(config):
        config["linux"]["cgroupsPath"] = "/abs-test/c1"
    bundle = bundle_of(tmp_path, busybox_rootfs, ["cat", "/proc/self/cgroup"], change)
    harness = HarnessCgroup.create(f"stages-test-abs-{os.getpid()}")
    try:
        done = in_cgroup_namespace(harness, [STAGES_OCI, "--root", str(tmp_path / "state"), "run", "--bundle",
                                             bundle, "abs"], timeout=60)
        assert done.returncode == 0, done.stderr
        memory = next(line.split(":", 2)[2] for line in done.stdout.splitlines()
                      if line.split(":")[1] == "memory")
        # the container has no cgroup namespace of its own: it sees its path in the harness's namespace
        assert memory == "/abs-test/c1"
        assert not os.path.exists("/sys/fs/cgroup/memory/abs-test")
        assert harness.leftovers() == ([], [])  # the run removed c1 and abs-test
    finally:
        harness.remove()


def test_a_relative_cgroups_path_is_below_the_runtimes_own_cgroup(tmp_path, root, busybox_rootfs):
    def change(config):
        config["linux"]["cgroupsPath"] = f"rel-test-{os.getpid()}/c2"
    oci.create("rel", bundle_of(tmp_path, busybox_rootfs, ["true"], change), root=root)
    try:
        own = cgroups.detect().controllers["pids"].own_directory
        cgroup = open_cgroup("rel", root)
        assert cgroup.directories["pids"] == os.path.join(own, f"rel-test-{os.getpid()}", "c2")
        assert str(oci.state("rel", root=root)["pid"]) in read(os.path.join(cgroup.directories["pids"],
                                                                             "cgroup.procs")).split()
    finally:
        oci.delete("rel", force=True, root=root)
    assert not os.path.exists(os.path.join(own, f"rel-test-{os.getpid()}"))


# -- the other resources -------------------------------------------------------------------------------
def test_reservation_shares_cpuset_quota_and_period_reach_the_cgroup(tmp_path, root, busybox_rootfs):
    def change(config):
        config["linux"]["resources"] = {
            "memory": {"limit": 64 << 20, "reservation": 32 << 20},
            "cpu": {"shares": 2048, "quota": 30000, "period": 300000, "cpus": "0", "mems": "0"}}
    oci.create("res", bundle_of(tmp_path, busybox_rootfs, ["true"], change), root=root)
    try:
        cgroup = open_cgroup("res", root)
        memory, cpu = cgroup.directories["memory"], cgroup.directories["cpu"]
        if cgroup.versions["memory"] == 2:
            assert read(f"{memory}/memory.low") == str(32 << 20)
        else:
            assert read(f"{memory}/memory.soft_limit_in_bytes") == str(32 << 20)
        if cgroup.versions["cpu"] == 2:
            assert read(f"{cpu}/cpu.weight") == str(1 + (2048 - 2) * 9999 // 262142)  # 79, runc's and crun's
            assert read(f"{cpu}/cpu.max") == "30000 300000"
        else:
            assert read(f"{cpu}/cpu.shares") == "2048"
            assert (read(f"{cpu}/cpu.cfs_quota_us"), read(f"{cpu}/cpu.cfs_period_us")) == ("30000", "300000")
        assert "cpuset" in cgroup.directories
        assert read(f"{cgroup.directories['cpuset']}/cpuset.cpus") == "0"
        assert read(f"{cgroup.directories['cpuset']}/cpuset.mems") == "0"
    finally:
        oci.delete("res", force=True, root=root)


def test_a_kernel_memory_limit_the_kernel_ignores_is_a_warning_and_the_container_runs(tmp_path, root,
                                                                                       busybox_rootfs):
    """memory.kernel and kernelTCP are deprecated (config-linux.md: NOT RECOMMENDED; Linux 5.16+ accepts a
    write to memory.kmem.limit_in_bytes and keeps nothing, cgroup v2 has no such file): set where the kernel
    keeps them, else a warning in the step record, and the container runs (as under runc)."""
    from stages.steps import StepRecord

    memory = cgroups.detect().controllers["memory"]
    # Linux 5.16 made a write to kmem.limit_in_bytes change nothing (commit 58056f77502f)
    release = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    kept = memory.version == 1 and release < (5, 16) and os.path.exists(
        f"{memory.mountpoint}/memory.kmem.limit_in_bytes")

    def change(config):
        config["linux"]["resources"] = {"memory": {"limit": 64 << 20, "kernel": 50593792,
                                                   "kernelTCP": 50593792}}
    record = StepRecord("kmem")
    stdin, out = open(os.devnull), open(tmp_path / "out", "w")
    with stdin, out:
        code = oci.run("kmem", bundle_of(tmp_path, busybox_rootfs, ["echo", "ran"], change), root=root,
                       stdio=(stdin, out, out), record=record)
    assert code == 0, (tmp_path / "out").read_text()
    assert (tmp_path / "out").read_text() == "ran\n"
    warned = [step.error for step in record.steps if step.error.startswith("warning: ")]
    if kept:  # an old kernel with kmem accounting: set, and nothing to warn about
        assert not any("memory.kernel:" in line for line in warned), warned
    else:
        assert any("linux.resources.memory.kernel: this kernel" in line for line in warned), warned
    # v1 kernels still keep the TCP buffer limit (memory.kmem.tcp.limit_in_bytes): set, as the cgroup
    # shows it while the container runs (its step); cgroup v2 has none: a warning
    assert (memory.version == 1) != any("memory.kernelTCP:" in line for line in warned), warned
    if memory.version == 1:
        assert any(step.shell.startswith("echo 50593792 > ") and step.ok
                   and step.shell.endswith("kmem.tcp.limit_in_bytes")
                   for step in record.steps), record.script()
    assert oci.list_containers(root) == []


# -- rootfsPropagation ---------------------------------------------------------------------------------
def test_shared_root_propagation_stays_inside_the_container(tmp_path, root, busybox_rootfs):
    """rshared: the container's / is shared (its own peer group), and a mount made inside, below a shared
    mount of ours that holds the rootfs, never reaches our mount namespace."""
    rootfs = tmp_path / "shared"
    rootfs.mkdir()
    subprocess.run(["mount", "--bind", str(busybox_rootfs), str(rootfs)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(rootfs)], check=True)

        def change(config):
            config["root"]["path"] = str(rootfs)
            config["linux"]["rootfsPropagation"] = "rshared"
            config["process"]["capabilities"] = {k: ["CAP_SYS_ADMIN"] for k in
                                                 ("bounding", "effective", "permitted")}
        bundle = bundle_of(tmp_path, rootfs, ["sh", "-c", "mount -t tmpfs stages-leak-probe /tmp && "
                                              "awk '$5 == \"/\"' /proc/self/mountinfo"], change)
        output = tmp_path / "out"
        with open(os.devnull) as stdin, open(output, "w") as out:
            code = oci.run("shared", bundle, root=root, stdio=(stdin, out, out))
        text = output.read_text()
        assert code == 0, text
        assert "shared:" in text  # the container's / is a shared mount
        assert "stages-leak-probe" not in read("/proc/self/mountinfo")
        assert sorted(os.listdir(rootfs / "tmp")) == sorted(os.listdir(busybox_rootfs / "tmp"))
    finally:
        subprocess.run(["umount", "-l", str(rootfs)], check=False)


# -- namespaces by path --------------------------------------------------------------------------------
def test_a_uts_namespace_joined_by_path_gets_the_hostname(tmp_path, root, busybox_rootfs):
    holder = subprocess.Popen(["unshare", "--uts", "sleep", "60"])
    try:
        path = f"/proc/{holder.pid}/ns/uts"
        for _ in range(100):
            if os.readlink(path) != os.readlink("/proc/self/ns/uts"):
                break
            subprocess.run(["sleep", "0.02"])

        def change(config):
            config["hostname"] = "joined-box"
            config["linux"]["namespaces"] = [{"type": "mount"}, {"type": "pid"},
                                             {"type": "uts", "path": path}]
        output = tmp_path / "out"
        with open(os.devnull) as stdin, open(output, "w") as out:
            code = oci.run("uts", bundle_of(tmp_path, busybox_rootfs, ["hostname"], change), root=root,
                           stdio=(stdin, out, out))
        assert code == 0, output.read_text()
        assert output.read_text().strip() == "joined-box"
        there = subprocess.run(["nsenter", "-u", "-t", str(holder.pid), "hostname"], capture_output=True,
                               text=True, check=True).stdout.strip()
        assert there == "joined-box" and os.uname().nodename != "joined-box"
    finally:
        holder.kill()
        holder.wait()


def test_a_hostname_in_our_own_uts_namespace_by_path_is_refused(tmp_path, root, busybox_rootfs):
    def change(config):
        config["hostname"] = "renamed"
        config["linux"]["namespaces"] = [{"type": "mount"}, {"type": "uts", "path": "/proc/self/ns/uts"}]
    with pytest.raises(StagesError, match="hostname: needs a UTS namespace of the container's own"):
        oci.create("ours", bundle_of(tmp_path, busybox_rootfs, ["true"], change), root=root)


# -- PID file and state --------------------------------------------------------------------------------
def test_the_pid_file_has_no_newline_and_the_state_has_owner_and_rfc3339_created(tmp_path, root,
                                                                                  busybox_rootfs):
    pid_file = tmp_path / "pid"
    oci.create("st", bundle_of(tmp_path, busybox_rootfs, ["true"]), root=root, pid_file=str(pid_file))
    try:
        text = pid_file.read_text()
        assert text == str(oci.state("st", root=root)["pid"])  # "16579", not "16579\n" (runc's)
        shown = json.loads(subprocess.run([STAGES_OCI, "--root", root, "state", "st"], capture_output=True,
                                          text=True, check=True).stdout)
        assert shown["owner"] == "root"
        assert shown["created"].endswith("Z") and "+00:00" not in shown["created"]
    finally:
        oci.delete("st", force=True, root=root)


# -- update and events ---------------------------------------------------------------------------------
def test_update_changes_a_running_containers_limits_and_events_reads_them(tmp_path, root, busybox_rootfs):
    oci.create("upd", bundle_of(tmp_path, busybox_rootfs, ["sleep", "30"]), root=root)
    try:
        oci.start("upd", root=root)
        resources = tmp_path / "resources.json"
        resources.write_text(json.dumps({"memory": {"limit": 96 << 20}, "pids": {"limit": 17}}))
        for extra in (["--resources", str(resources)], ["--cpu-shares", "512", "--cpu-quota", "20000"]):
            done = subprocess.run([STAGES_OCI, "--root", root, "update", *extra, "upd"], capture_output=True,
                                  text=True)
            assert done.returncode == 0, done.stderr
        cgroup = open_cgroup("upd", root)
        assert read(f"{cgroup.directories['pids']}/pids.max") == "17"
        memory = cgroup.directories["memory"]
        assert read(f"{memory}/memory.max" if cgroup.versions["memory"] == 2
                    else f"{memory}/memory.limit_in_bytes") == str(96 << 20)
        cpu = cgroup.directories["cpu"]
        if cgroup.versions["cpu"] == 2:
            assert read(f"{cpu}/cpu.max") == "20000 100000"
        else:
            assert (read(f"{cpu}/cpu.shares"), read(f"{cpu}/cpu.cfs_quota_us")) == ("512", "20000")
        shown = subprocess.run([STAGES_OCI, "--root", root, "events", "--stats", "upd"], capture_output=True,
                               text=True, check=True).stdout
        event = json.loads(shown)
        assert event["type"] == "stats" and event["id"] == "upd"
        assert event["data"]["pids"] == {"current": 1, "limit": 17}  # sleep, the container's only process
        assert event["data"]["memory"]["usage"]["limit"] == 96 << 20
        assert event["data"]["memory"]["usage"]["usage"] > 0
        assert set(event["data"]["cpu"]) == {"usage", "throttling"}
    finally:
        oci.delete("upd", force=True, root=root)


def test_events_with_an_interval_streams_until_the_container_stops(tmp_path, root, busybox_rootfs):
    oci.create("ev", bundle_of(tmp_path, busybox_rootfs, ["sleep", "0.6"]), root=root)
    try:
        oci.start("ev", root=root)
        done = subprocess.run([STAGES_OCI, "--root", root, "events", "--interval", "0.2", "ev"],
                              capture_output=True, text=True, timeout=20)
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert done.returncode == 0 and 2 <= len(lines) <= 10, done.stdout + done.stderr
        assert all(line["type"] == "stats" for line in lines)
    finally:
        oci.delete("ev", force=True, root=root)
