"""Stage 2, the isolate wired by hand, on the real kernel: each namespace by its effect, pivot_root and
the minimal mounts, privileges, order errors as lessons, and teardown however the isolate ends."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from stages import jail, observe, rootfs
from stages.errors import CommandNotFoundError, RootfsError, StagesError, StepOrderError
from stages.isolate import DEFAULT_CAPS, Isolate, seccomp_available, state

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def open_rootfs():
    """A busybox rootfs every user can reach: inside a user namespace the host's root is nobody, so a
    rootfs below pytest's private (0700) temporary directory could not even be entered."""
    top = tempfile.mkdtemp(prefix="stages-isolate-", dir="/var/tmp")
    os.chmod(top, 0o755)
    try:
        yield Path(rootfs.build(Path(top) / "rootfs", source="busybox"))
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    """Each test keeps its isolate state files in a directory of its own."""
    monkeypatch.setenv("STAGES_RUN", str(tmp_path / "run"))
    return tmp_path / "run" / "isolates"


def host_mounts() -> str:
    with open("/proc/self/mountinfo") as handle:
        return handle.read()


# == one namespace at a time, each by its effect ====================================================
def test_uts_the_hostname_inside_changes_and_the_hosts_does_not(open_rootfs):
    host = socket.gethostname()
    with Isolate(open_rootfs) as iso:
        assert iso.run(["hostname"]).stdout.strip() == host  # nothing isolated yet
        views = iso.unshare("uts")
        assert views["uts"].own and views["uts"].host != views["uts"].inside
        assert iso.set_hostname("box-one") == "box-one"
        assert iso.run(["hostname"]).stdout.strip() == "box-one"
        assert socket.gethostname() == host
        assert [name for name, view in iso.namespaces().items() if view.own] == ["uts"]


def test_pid_before_the_namespace_proc_shows_the_host_after_it_ps_shows_pid_1(open_rootfs):
    with Isolate(open_rootfs) as iso:
        iso.unshare("mount")
        iso.mount_proc()
        before = iso.run(["ps", "-o", "pid"]).stdout.split()[1:]
        assert str(os.getpid()) in before  # the host's processes, ours among them
        holder_pid = iso.pid
        iso.unshare("pid")
        assert iso.pid != holder_pid  # the holder forked: its child is PID 1 of the new namespace
        assert observe.status(iso.pid)["NSpid"].split() == [str(iso.pid), "1"]
        iso.mount_proc()  # again: a /proc for the new PID namespace
        pids = [int(word) for word in iso.run(["ps", "-o", "pid"]).stdout.split()[1:]]
        assert pids[0] == 1 and len(pids) == 2  # the holder and ps itself


def test_mount_a_mount_inside_is_invisible_on_the_host(open_rootfs):
    with Isolate(open_rootfs) as iso:
        iso.unshare("mount")
        mounts = iso.mount_tmp()
        target = str(open_rootfs / "tmp")
        assert [m.fstype for m in mounts] == ["tmpfs"]
        assert f" {target} " not in host_mounts()
        assert [m.fstype for m in observe.mounts(iso.pid) if m.target == target] == ["tmpfs"]
        iso.run(["touch", "/tmp/only-inside"], check=True)
        assert not (open_rootfs / "tmp" / "only-inside").exists()
        assert all(p.startswith("/ ") or " private" in p or p.endswith("private")
                   for p in iso.make_private())


def test_ipc_a_host_message_queue_is_invisible_inside(open_rootfs):
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x5174_9E11
    queue = libc.msgget(key, 0o1600)  # IPC_CREAT | 0600
    assert queue >= 0, os.strerror(ctypes.get_errno())
    try:
        with Isolate(open_rootfs) as iso:
            iso.unshare("mount")
            iso.mount_proc()
            assert str(key) in iso.run(["cat", "/proc/sysvipc/msg"]).stdout
            iso.unshare("ipc")
            assert str(key) not in iso.run(["cat", "/proc/sysvipc/msg"]).stdout
    finally:
        libc.msgctl(queue, 0, None)  # IPC_RMID


def test_net_only_a_loopback_device_inside(open_rootfs):
    with Isolate(open_rootfs) as iso:
        assert observe.net_devices(iso.pid) == observe.net_devices()
        iso.unshare("net")
        assert observe.net_devices(iso.pid) == ["lo"]
        iso.unshare("mount")
        iso.mount_sys()  # our own network namespace: a fresh sysfs shows its devices
        assert iso.run(["ls", "/sys/class/net"]).stdout.split() == ["lo"]
        assert len(observe.net_devices()) > 1


def test_user_root_inside_is_uid_100000_outside(open_rootfs):
    with Isolate(open_rootfs) as iso:
        iso.unshare("user")
        assert iso.run(["id", "-u"]).stdout.strip() == "65534"  # unmapped: nobody
        assert iso.map_user(inside=0, outside=100000, count=65536).split() == ["0", "100000", "65536"]
        assert iso.run(["id", "-u"]).stdout.strip() == "0"
        iso.run(["touch", "/var/tmp/made-inside"], check=True)
        made = open_rootfs / "var" / "tmp" / "made-inside"
        try:
            assert (made.stat().st_uid, made.stat().st_gid) == (100000, 100000)
        finally:
            made.unlink()
        assert observe.status(iso.pid)["Uid"].split()[0] == "100000"
        assert iso.record.steps[1].where == "outside" and "setgroups" in iso.record.steps[1].shell


def test_cgroup_the_isolates_own_cgroup_looks_like_the_root(open_rootfs):
    with Isolate(open_rootfs) as iso:
        iso.limit(pids=64)
        outside = observe.cgroups_of(iso.pid)
        assert any(path.endswith(f"stages-{iso.name}") for path in outside.values())
        iso.unshare("cgroup")
        iso.unshare("mount")
        iso.mount_proc()
        inside = dict(line.split(":", 2)[1:] for line in iso.run(["cat", "/proc/self/cgroup"]).stdout.split())
        for controllers, path in outside.items():
            if path.endswith(f"stages-{iso.name}"):
                assert inside[controllers] == "/"


def test_time_the_boot_clock_inside_is_shifted(open_rootfs):
    with Isolate(open_rootfs) as iso:
        iso.unshare("time")
        offsets = iso.time_offsets(monotonic=86400, boottime=2 * 86400)
        assert "boottime" in offsets and "172800" in offsets
        iso.unshare("mount")
        iso.mount_proc()
        inside = float(iso.run(["cat", "/proc/uptime"]).stdout.split()[0])
        host = float(Path("/proc/uptime").read_text().split()[0])
        assert 2 * 86400 - 60 < inside - host < 2 * 86400 + 60


# == the whole sequence: pivot_root and a minimal root ============================================
def test_pivot_root_with_proc_readonly_sys_minimal_dev_and_tmp(open_rootfs):
    with Isolate(open_rootfs) as iso:
        iso.unshare("uts", "ipc", "net", "mount", "pid")
        iso.mount_proc()
        iso.mount_sys()
        assert sorted(iso.mount_dev()) == ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr",
                                           "stdin", "stdout", "tty", "urandom", "zero"]
        iso.mount_tmp()
        listing = iso.pivot_root()
        assert listing == sorted(p.name for p in open_rootfs.iterdir())
        assert observe.mounts(iso.pid)[0].target == "/"
        assert iso.run(["ls", "/dev"]).stdout.split() == ["fd", "full", "null", "ptmx", "pts", "random",
                                                          "shm", "stderr", "stdin", "stdout", "tty",
                                                          "urandom", "zero"]
        assert iso.run("echo hi > /dev/null && head -c 4 /dev/zero | wc -c").stdout.strip() == "4"
        denied = iso.run(["sh", "-c", "echo 1 > /sys/kernel/profiling"])
        assert denied.returncode != 0 and "Read-only" in denied.stderr
        assert iso.run(["mkdir", "/sys/x"]).returncode != 0
        table = iso.run(["cat", "/proc/self/mountinfo"]).stdout
        assert " /tmp " in table and " /proc " in table and " /dev/pts " in table
        assert not [m for m in observe.mounts(iso.pid) if m.target.startswith(str(open_rootfs))]
        assert iso.run(["ps", "-o", "pid"]).stdout.split()[1] == "1"
        assert f" {open_rootfs}/proc " not in host_mounts()


def test_the_stage_1_escape_fails_after_pivot_root(open_rootfs, tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("only on the host")
    with Isolate(open_rootfs) as iso:
        iso.unshare("mount")
        iso.pivot_root()
        with pytest.raises(FileNotFoundError):
            iso.call(jail.climb_out, str(secret))
        assert any(step.shell.startswith("chroot") for step in iso.record.steps)  # it did climb
    assert jail.escape(open_rootfs, secret).content == "only on the host"  # a chroot alone leaks


def test_the_whole_sequence_in_a_user_namespace(open_rootfs):
    with Isolate(open_rootfs, name="userful") as iso:
        iso.unshare("user")
        iso.map_user()
        iso.unshare("uts", "ipc", "net", "mount", "cgroup", "pid")
        iso.set_hostname("unpriv")
        iso.mount_proc()
        iso.mount_sys()
        iso.mount_dev()  # bind-mounted host devices: mknod is refused in a user namespace
        iso.mount_tmp()
        iso.pivot_root()
        out = iso.run(["sh", "-c", "id -u; hostname; ls /dev | wc -l; echo x > /dev/null && echo ok"]).stdout
        assert out.split() == ["0", "unpriv", "13", "ok"]
        assert any(s.shell == "mount --bind /dev/null " + str(open_rootfs / "dev" / "null")
                   for s in iso.record.steps)
        assert all(view.own for view in iso.namespaces().values() if view.name != "time")


# == privileges =====================================================================================
def test_capabilities_reduced_and_no_new_privs_inside(open_rootfs):
    def status(iso) -> dict:
        return dict(line.split(":\t") for line in iso.run(["cat", "/proc/self/status"]).stdout.splitlines()
                    if ":\t" in line)

    with Isolate(open_rootfs) as iso:
        iso.unshare("mount")
        iso.mount_proc()
        before = status(iso)
        assert before["NoNewPrivs"] == "0"
        result = iso.drop_capabilities()
        assert "sys_admin" in result["dropped"] and set(result["bounding"]) == set(DEFAULT_CAPS)
        assert iso.set_no_new_privs() is True
        after = status(iso)
        assert int(after["CapBnd"], 16) < int(before["CapBnd"], 16)
        assert int(after["CapEff"], 16) == int(after["CapBnd"], 16)
        assert not int(after["CapEff"], 16) & (1 << 21)  # CAP_SYS_ADMIN
        assert after["NoNewPrivs"] == "1"
        refused = iso.run(["sh", "-c", "mount -t tmpfs none /tmp"])
        assert refused.returncode != 0  # root without CAP_SYS_ADMIN may not mount


@pytest.mark.skipif(not seccomp_available(), reason="libseccomp is not installed")
def test_seccomp_makes_the_denied_system_calls_fail(open_rootfs):
    with Isolate(open_rootfs) as iso:
        iso.unshare("mount")
        iso.mount_tmp()
        assert iso.run(["mkdir", "/tmp/before"]).returncode == 0
        assert "mkdir" in iso.seccomp(["mkdir", "mkdirat"])
        refused = iso.run(["mkdir", "/tmp/after"])
        assert refused.returncode != 0 and "Operation not permitted" in refused.stderr


# == order errors are lessons =======================================================================
def test_order_errors_explain_what_the_kernel_needs_first(open_rootfs):
    with Isolate(open_rootfs) as iso:
        with pytest.raises(StepOrderError, match="rename the host"):
            iso.set_hostname("nope")
        with pytest.raises(StepOrderError, match="change the host's root"):
            iso.pivot_root()
        with pytest.raises(StepOrderError, match="mount it on the host"):
            iso.mount_proc()
        with pytest.raises(StepOrderError, match="no network namespace"):
            iso.connect()
        with pytest.raises(StepOrderError, match="no user namespace"):
            iso.map_user()
        with pytest.raises(StepOrderError, match="time namespace"):
            iso.time_offsets(monotonic=5)
        iso.unshare("uts")
        with pytest.raises(StepOrderError, match="already has its own uts"):
            iso.unshare("uts")
        with pytest.raises(StepOrderError, match="user namespace must come first.*EPERM"):
            iso.unshare("user")
        iso.unshare("mount", "time")
        iso.run(["true"])  # the first process enters the time namespace
        with pytest.raises(StepOrderError, match="before the first process"):
            iso.time_offsets(monotonic=5)
        iso.mount_tmp()
        with pytest.raises(StepOrderError, match="mounted already"):
            iso.mount_tmp()
        iso.pivot_root()
        with pytest.raises(StepOrderError, match="pivoted already"):
            iso.pivot_root()
        assert socket.gethostname() != "nope"


def test_user_namespace_order_errors(open_rootfs):
    with Isolate(open_rootfs) as iso:
        iso.unshare("user", "mount")
        with pytest.raises(StepOrderError, match="map_user"):
            iso.mount_tmp()
        iso.map_user()
        with pytest.raises(StepOrderError, match="only once"):
            iso.map_user()
        with pytest.raises(StepOrderError, match="PID namespace that user namespace owns"):
            iso.mount_proc()
        iso.pivot_root()
        with pytest.raises(StepOrderError, match="before pivot_root"):
            iso.mount_dev()


def test_bad_input_gets_one_sentence_and_a_hint(open_rootfs, tmp_path):
    with pytest.raises(RootfsError, match="does not exist"):
        Isolate(tmp_path / "missing").start()
    with pytest.raises(StagesError, match="cannot name an isolate"):
        Isolate(open_rootfs, name="Has Spaces")
    with Isolate(open_rootfs) as iso:
        with pytest.raises(StagesError, match="no 'utz' namespace") as info:
            iso.unshare("utz")
        assert info.value.hint
        iso.unshare("uts")
        with pytest.raises(StagesError, match="is not a hostname"):
            iso.set_hostname("bad name!")
        with pytest.raises(CommandNotFoundError) as missing:
            iso.run(["no-such-program"])
        assert missing.value.exit_code == 127
        with pytest.raises(StagesError, match="no capability 'cap_flying'"):
            iso.drop_capabilities(keep=["cap_flying"])
        assert iso.run(["true"]).ok  # the isolate is still usable after every error


# == run ============================================================================================
def test_run_returns_code_output_input_and_honours_timeout(open_rootfs):
    with Isolate(open_rootfs) as iso:
        result = iso.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
        assert iso.run(["cat"], input="fed in").stdout == "fed in"
        assert iso.run("pwd", cwd="/etc").stdout == "/etc\n"
        assert iso.run(["sh", "-c", "echo $MESSAGE"], env={"PATH": "/bin", "MESSAGE": "hi"}).stdout == "hi\n"
        slow = iso.run(["sleep", "30"], timeout=0.3)
        assert slow.timed_out and slow.returncode == -9
        # a background process that keeps the pipe open neither blocks run() nor survives the isolate
        assert iso.run("sleep 60 & echo started").stdout == "started\n"
        with pytest.raises(StagesError, match="exit code 1"):
            iso.run(["false"], check=True)


# == the record =====================================================================================
def test_the_record_is_a_script_with_inside_and_outside_steps(open_rootfs):
    with Isolate(open_rootfs) as iso:
        iso.unshare("user", "uts", "mount")
        iso.map_user()
        iso.set_hostname("rec")
    script = iso.record.script()
    assert "unshare --user --mount --uts" in script
    assert "mount --make-rprivate /" in script
    assert f"echo '0 100000 65536' > /proc/{iso.pid}/uid_map" in script
    assert "hostname rec" in script
    wheres = {step.where for step in iso.record.steps}
    assert wheres == {"inside", "outside"}


# == teardown, however it ends ======================================================================
def test_normal_close_removes_the_state_file_and_the_holder(open_rootfs, run_dir):
    iso = Isolate(open_rootfs).start()
    holder = iso._process.pid
    assert (run_dir / f"{iso.name}.json").exists()
    iso.unshare("mount", "pid")
    iso.mount_proc()
    iso.close()
    iso.close()  # twice is fine
    assert not (run_dir / f"{iso.name}.json").exists()
    assert not os.path.exists(f"/proc/{holder}/status")
    with pytest.raises(StepOrderError, match="closed"):
        iso.run(["true"])


def test_an_exception_halfway_leaves_nothing(open_rootfs, run_dir):
    with pytest.raises(ZeroDivisionError):
        with Isolate(open_rootfs) as iso:
            iso.limit(pids=32)
            iso.unshare("mount", "net")
            iso.mount_tmp()
            iso.run("sleep 60 &")
            raise ZeroDivisionError("halfway")
    assert iso.cgroup.removed
    assert list(run_dir.iterdir()) == [] or not any(run_dir.glob("*.json"))


def test_sigkill_of_the_holder_then_cleanup_removes_the_leftovers(open_rootfs, run_dir):
    from stages.isolate import HolderDiedError, cgroups

    iso = Isolate(open_rootfs).start()
    iso.limit(memory="64M", pids=32)
    iso.unshare("mount", "pid")
    iso.mount_tmp()
    directories = iso.cgroup.unique_directories()
    os.kill(iso._process.pid, 9)
    iso._process.wait()
    with pytest.raises(HolderDiedError):
        iso.run(["true"])
    assert all(os.path.isdir(d) for d in directories)  # the kernel keeps the cgroups ...
    assert (run_dir / f"{iso.name}.json").exists()  # ... and the state file says whose they are
    assert state.cleanup() == [iso.name]
    assert not any(os.path.isdir(d) for d in directories)
    assert not (run_dir / f"{iso.name}.json").exists()
    assert f"stages-{iso.name}" not in cgroups.find()
    iso._closed = True  # what close() would do is done


def test_ctrl_c_during_a_command_ends_the_command_and_keeps_the_isolate(open_rootfs):
    import signal
    import threading

    with Isolate(open_rootfs) as iso:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            iso.run(["sleep", "30"])
        timer.join()
        assert iso.run(["echo", "still here"]).stdout == "still here\n"


def test_a_script_that_forgets_close_leaves_nothing(open_rootfs, python, run_dir):
    import subprocess

    from stages.isolate import cgroups

    script = ("import sys; from stages.isolate import Isolate\n"
              "iso = Isolate(sys.argv[1], name='forgotten').start()\n"
              "iso.limit(pids=16); iso.unshare('mount', 'pid'); iso.mount_tmp(); print(iso.pid)\n")
    result = subprocess.run([python, "-c", script, str(open_rootfs)], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parent.parent,
                            env={**os.environ, "STAGES_RUN": str(run_dir.parent)})
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(f"/proc/{int(result.stdout)}")
    assert "stages-forgotten" not in cgroups.find()
    assert not (run_dir / "forgotten.json").exists()


def test_limits_the_memory_hog_is_killed_and_the_fork_bomb_stopped(open_rootfs):
    with Isolate(open_rootfs) as iso:
        iso.unshare("mount", "pid")
        iso.mount_dev()
        iso.mount_proc()
        iso.limit(memory="32M", pids=12)
        # tail -n 1 keeps the whole last line in memory, and /dev/zero has no newline: one big line
        fine = iso.run("head -c 8000000 /dev/zero | tail -n 1 | wc -c")
        assert fine.stdout.strip() == "8000000"  # 8 MB: under the limit
        hog = iso.run("head -c 200000000 /dev/zero | tail -n 1 | wc -c")
        assert hog.stdout.strip() != "200000000"
        kills = iso.cgroup.stats().oom_kills
        assert kills is None or kills >= 1
        bomb = iso.run("for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do sleep 5 & done; wait", timeout=20)
        assert "can't fork" in bomb.stderr or "Resource temporarily unavailable" in bomb.stderr


def test_limit_devices_the_kernel_refuses_a_device_the_allowlist_leaves_out(open_rootfs):
    # cgroup v1's devices.deny/devices.allow here, cgroup v2's BPF program in the VM: the same observable
    # effect. Only /dev/null is allowed, so /dev/zero (made by mount_dev, a node that worked a moment ago)
    # can no longer be opened, nor any node made.
    with Isolate(open_rootfs) as iso:
        iso.unshare("mount", "pid")
        iso.mount_dev()
        iso.mount_proc()
        assert iso.run("head -c 3 /dev/zero | wc -c").stdout.strip() == "3"
        shown = iso.limit_devices([("c", 1, 3, "rwm", "/dev/null")])
        assert shown == ["c 1:3 rwm"]
        assert iso.run("echo x > /dev/null").ok
        refused = iso.run("head -c 3 /dev/zero")
        assert not refused.ok and "Operation not permitted" in refused.stderr
        made = iso.run("mknod /tmp/zero c 1 5")
        assert not made.ok and "Operation not permitted" in made.stderr
        version = iso.cgroup.versions["devices"]
    script = iso.record.script()
    assert ("devices.deny" in script) if version == 1 else ("BPF_PROG_ATTACH" in script), script


def test_cleanup_leaves_a_living_isolate_alone(open_rootfs, run_dir):
    with Isolate(open_rootfs) as iso:
        iso.limit(pids=16)
        saved = state.load_all()
        expected = [(iso.name, iso._process.pid, [iso.name])]
        assert [(s.name, s.holder_pid, s.cgroups) for s in saved] == expected
        assert state.cleanup() == []
        assert iso.run(["true"]).ok and iso.cgroup.pids()


# == network, wired to a namespace that stands in for the host ====================================
@pytest.mark.net
def test_connect_and_publish_a_server_inside_answers_through_the_published_port(open_rootfs):
    import subprocess

    from stages.isolate import network

    with network.test_host() as host:
        with Isolate(open_rootfs) as iso:
            with pytest.raises(StepOrderError, match="no network namespace"):
                iso.connect(host_netns=host)
            iso.unshare("net", "mount", "pid")
            with pytest.raises(StepOrderError, match="connect\\(\\) first"):
                iso.publish(8080, 80)
            wiring = iso.connect(host_netns=host)
            assert iso.publish(8080, 80) == f"8080 -> {wiring.address.ip}:80"
            iso.mount_tmp()
            iso.pivot_root()
            assert iso.run(["ping", "-c", "1", "-W", "2", str(wiring.gateway.ip)]).ok
            iso.run("mkdir -p /tmp/www && echo hello from inside > /tmp/www/index.html && "
                    "httpd -p 80 -h /tmp/www", check=True)  # httpd goes to the background
            fetched = subprocess.run(["ip", "netns", "exec", host, "busybox", "wget", "-q", "-O", "-",
                                      f"http://{wiring.gateway.ip}:8080/"], capture_output=True, text=True,
                                     timeout=20)
            assert fetched.stdout == "hello from inside\n", fetched.stderr
            assert any(step.where == "outside" and "netns" in step.shell for step in iso.record.steps)
        links = subprocess.run(["ip", "-n", host, "-o", "link"], capture_output=True, text=True).stdout
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]


@pytest.mark.net
def test_sigkill_then_cleanup_removes_the_bridge_and_rules_too(open_rootfs, run_dir):
    import subprocess

    from stages.isolate import network

    with network.test_host() as host:
        iso = Isolate(open_rootfs).start()
        iso.unshare("net")
        iso.connect(host_netns=host)
        iso.publish(8081, 80)
        os.kill(iso._process.pid, 9)
        iso._process.wait()
        bridge = network.devices(iso.name).bridge
        assert bridge in subprocess.run(["ip", "-n", host, "-o", "link"], capture_output=True,
                                        text=True).stdout
        assert state.cleanup() == [iso.name]
        links = subprocess.run(["ip", "-n", host, "-o", "link"], capture_output=True, text=True).stdout
        assert bridge not in links and "stg" not in links
        rules = subprocess.run(["ip", "netns", "exec", host, "iptables-save"], capture_output=True,
                               text=True).stdout
        assert "stages:" not in rules
        iso._closed = True
