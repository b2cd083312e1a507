"""Stage 3's default container is Docker's: each default closes a door, checked by trying the door.

Issue #10: a default container could read and write the host's disks through a device node it made
(no device allowlist, CAP_MKNOD kept), had no seccomp filter (a nested ``unshare -U -r`` got every
capability), and a few flags took values that made root of a user (``-u 4294967295``) or broke later
with a raw error. Here each default is tried from inside a real container, and ``--privileged`` and
``--security-opt seccomp=unconfined`` are shown to open what the defaults closed.

The fixtures are test_containers.py's: the command line run as a learner would, with a temporary
STAGES_HOME and STAGES_RUN.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
import test_containers as _base
from test_containers import inspect

from stages.runtime.oci import spec

# test_containers' fixtures, used here by name
home, python, stages, host_netns = _base.home, _base.python, _base.stages, _base.host_netns

pytestmark = [pytest.mark.root]

SECRET = b"STAGES-DISK-1234"  # 16 bytes at the start of the scratch disk


def run(stages, *argv: str, **extra) -> subprocess.CompletedProcess:
    return stages("run", "--rm", "--network", "none", *argv, check=False, **extra)


# -- 1. the device allowlist -----------------------------------------------------------------------------
@pytest.fixture
def loop_device(tmp_path):
    """A loop device of the host (losetup(8)) over a scratch file that starts with :data:`SECRET`."""
    image = tmp_path / "disk.img"
    image.write_bytes(SECRET + bytes(1 << 20))
    device = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True,
                            check=True).stdout.strip()
    try:
        yield device, image
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_a_default_container_cannot_open_a_host_disk_it_makes_a_node_for(stages, loop_device):
    device, image = loop_device
    minor = os.minor(os.stat(device).st_rdev)
    # mknod itself is allowed (Docker keeps CAP_MKNOD, and the allowlist says "m" for every node) ...
    read = run(stages, "busybox", "sh", "-c", f"mknod /tmp/d b 7 {minor} && echo made; head -c16 /tmp/d")
    assert "made" in read.stdout, read.stderr
    # ... but opening the node is not: the device cgroup (v1 devices.deny, v2 a BPF program) says EPERM
    assert SECRET.decode() not in read.stdout
    assert "Operation not permitted" in read.stderr
    write = run(stages, "busybox", "sh", "-c",
                f"mknod /tmp/d b 7 {minor}; dd if=/dev/zero of=/tmp/d bs=16 count=1 conv=notrunc "
                "&& echo written")
    assert "written" not in write.stdout and "Operation not permitted" in write.stderr
    assert image.read_bytes()[:16] == SECRET  # the host's disk is untouched
    # a terminal of the host (tty1, c 4:1): no write reaches it
    tty = run(stages, "busybox", "sh", "-c", "mknod /tmp/t c 4 1 && echo x > /tmp/t && echo wrote-tty")
    assert "wrote-tty" not in tty.stdout and "Operation not permitted" in tty.stderr
    # the devices every container needs still work
    needed = run(stages, "busybox", "sh", "-c", "echo x > /dev/null && head -c4 /dev/urandom | wc -c")
    assert needed.stdout.split() == ["4"], needed.stderr


def test_privileged_turns_the_allowlist_off(stages, loop_device):
    """What closed the door was the allowlist: --privileged has none, and the same read succeeds."""
    device, _ = loop_device
    minor = os.minor(os.stat(device).st_rdev)
    read = run(stages, "--privileged", "busybox", "sh", "-c", f"mknod /tmp/d b 7 {minor}; head -c16 /tmp/d")
    assert read.stdout == SECRET.decode(), read.stderr


# -- 2. seccomp --------------------------------------------------------------------------------------------
NESTED = "grep Seccomp: /proc/self/status; unshare -U -r true && echo nested-userns"


def test_a_default_container_runs_under_dockers_seccomp_profile(stages):
    default = run(stages, "busybox", "sh", "-c", NESTED)
    assert "Seccomp:\t2" in default.stdout  # 2: a filter (proc(5), SECCOMP_MODE_FILTER)
    # a new user namespace would give root in it every capability: refused (unshare is not allowed
    # without CAP_SYS_ADMIN in Docker's profile)
    assert "nested-userns" not in default.stdout and "Operation not permitted" in default.stderr
    unconfined = run(stages, "--security-opt", "seccomp=unconfined", "busybox", "sh", "-c", NESTED)
    assert "Seccomp:\t0" in unconfined.stdout and "nested-userns" in unconfined.stdout, unconfined.stderr


def test_a_profile_file_replaces_the_default(stages, tmp_path):
    profile = tmp_path / "no-mkdir.json"
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}]}))
    result = run(stages, "--security-opt", f"seccomp={profile}", "busybox", "sh", "-c",
                 "mkdir /tmp/x || echo refused; unshare -U -r true && echo nested-userns")
    assert "refused" in result.stdout and "Permission denied" in result.stderr  # errnoRet 13, EACCES
    assert "nested-userns" in result.stdout  # only what the file says: unshare is allowed by it


@pytest.mark.parametrize(("content", "words"), [
    (None, "the profile does not exist"),
    ("{not json", "is not valid JSON"),
    ('{"syscalls": []}', "has no defaultAction"),
    ('{"defaultAction": "SCMP_ACT_NOPE"}', "'SCMP_ACT_NOPE' is not a seccomp action"),
])
def test_a_bad_profile_file_is_refused_in_a_sentence(stages, tmp_path, content, words):
    path = tmp_path / "profile.json"
    if content is not None:
        path.write_text(content)
    result = run(stages, "--security-opt", f"seccomp={path}", "busybox", "true")
    assert result.returncode != 0
    assert f"--security-opt seccomp={path}" in result.stderr and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "hint:" in result.stderr
    assert stages("ps", "-a", "-q").stdout.strip() == ""


def test_an_unknown_security_option_is_refused(stages):
    result = run(stages, "--security-opt", "apparmor=docker-default", "busybox", "true")
    assert result.returncode != 0 and "is not an option this runtime knows" in result.stderr


def test_the_compiled_profile_is_cached_in_the_state_root(stages, tmp_path, monkeypatch):
    from stages.runtime import seccomp_profile
    from stages.runtime.oci import seccomp

    assert run(stages, "busybox", "true").returncode == 0
    cache = os.path.join(stages.env["STAGES_RUN"], "oci", ".seccomp-cache")
    entries = os.listdir(cache)
    assert len(entries) == 1 and entries[0].endswith(".json")
    assert os.stat(cache).st_mode & 0o777 == 0o700 and os.stat(os.path.dirname(cache)).st_mode & 0o077 == 0
    assert run(stages, "busybox", "true").returncode == 0
    assert os.listdir(cache) == entries  # the second container found it

    # the cache in the library's own terms: a hit skips libseccomp; a file that is not ours is ignored
    profile = seccomp_profile.resolve(seccomp_profile.DEFAULT, ["CAP_CHOWN"])
    mine = str(tmp_path / "cache")
    first = seccomp.compile_profile(profile, mine)
    monkeypatch.setattr(seccomp, "_generate", lambda *_: pytest.fail("compiled again"))
    assert seccomp.compile_profile(profile, mine) == first
    (path,) = [os.path.join(mine, name) for name in os.listdir(mine)]
    os.chmod(path, 0o666)  # anyone could have written it: not trusted
    monkeypatch.setattr(seccomp, "_generate", lambda *_: b"\0" * 8)
    assert seccomp.compile_profile(profile, mine)["program"] == "00" * 8
    with open(path, "w") as handle:  # and an entry for another text is never used
        json.dump({"key": "something else", "compiled": first}, handle)
    os.chmod(path, 0o600)
    assert seccomp.compile_profile(profile, mine)["program"] == "00" * 8


def test_the_default_profile_follows_the_containers_capabilities():
    """Docker's rule: a call a capability guards anyway is allowed to a container holding it."""
    from stages.runtime import seccomp_profile

    plain = seccomp_profile.resolve(seccomp_profile.DEFAULT, ["CAP_CHOWN"], machine="x86_64")
    admin = seccomp_profile.resolve(seccomp_profile.DEFAULT, ["CAP_SYS_ADMIN"], machine="x86_64")

    def allowed(resolved):
        return {name for rule in resolved["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" and
                not rule.get("args") for name in rule["names"]}

    assert plain["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert {"unshare", "mount", "setns"} & allowed(plain) == set()
    assert {"unshare", "mount", "setns"} <= allowed(admin)
    assert {"init_module", "kexec_load", "add_key", "keyctl", "reboot"} & allowed(plain) == set()
    clone = [rule for rule in plain["syscalls"] if rule["names"] == ["clone"]]
    assert clone[0]["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"  # only without CLONE_NEW* flags
    assert [rule["errnoRet"] for rule in plain["syscalls"] if rule["names"] == ["clone3"]] == [38]


# -- 3. --privileged -----------------------------------------------------------------------------------------
def _bounding() -> str:
    with open("/proc/self/status") as handle:
        return next(line.split()[1] for line in handle if line.startswith("CapBnd:"))


def test_privileged_turns_off_what_contains_root(stages):
    script = ("grep -E 'Seccomp:|CapEff:' /proc/self/status; "
              "echo 1 > /proc/sys/net/ipv4/ip_forward && echo proc-sys-writable; "
              "grep ' /sys ' /proc/mounts")
    privileged = run(stages, "--privileged", "busybox", "sh", "-c", script)
    assert "Seccomp:\t0" in privileged.stdout, privileged.stderr
    assert f"CapEff:\t{_bounding()}" in privileged.stdout  # every capability we hold ourselves
    assert "proc-sys-writable" in privileged.stdout  # (its own network namespace's ip_forward)
    assert " rw," in privileged.stdout.split("sysfs", 1)[1]
    default = run(stages, "busybox", "sh", "-c", script)
    assert "Seccomp:\t2" in default.stdout and "proc-sys-writable" not in default.stdout
    assert "Read-only file system" in default.stderr and " ro," in default.stdout.split("sysfs", 1)[1]


def test_privileged_is_explained_in_the_help_and_the_record(stages):
    text = " ".join(stages("run", "--help").stdout.split())
    assert "--privileged" in text and "no seccomp filter, no device allowlist" in text
    explained = run(stages, "--explain", "--privileged", "busybox", "true")
    assert "# --privileged: every capability, no seccomp filter, no device allowlist" in explained.stderr
    assert "seccomp" not in explained.stderr.split("--privileged:", 1)[0]  # no filter step before it
    assert "--privileged" not in run(stages, "--explain", "busybox", "true").stderr


# -- 4. masked and read-only /proc paths -------------------------------------------------------------------
def test_the_kernels_knobs_in_proc_cannot_be_changed(stages):
    with open("/proc/sys/kernel/core_pattern") as handle:
        before = handle.read()
    script = ("cat /proc/sys/kernel/core_pattern > /proc/sys/kernel/core_pattern && echo core-writable; "
              "echo h > /proc/sysrq-trigger && echo sysrq-writable; "
              "wc -c < /proc/timer_list; stat -c %t:%T /proc/kcore")
    result = run(stages, "busybox", "sh", "-c", script)
    assert "core-writable" not in result.stdout and "Read-only file system" in result.stderr
    assert "sysrq-writable" not in result.stdout  # read-only, or (as here, maybe) not in this kernel
    with open("/proc/sys/kernel/core_pattern") as handle:
        assert handle.read() == before
    assert result.stdout.split()[0] == "0"  # /proc/timer_list masked: /dev/null bound over it
    with open("/proc/timer_list", "rb") as handle:
        assert handle.read(1)  # while the host's has something to say
    if os.path.exists("/proc/kcore"):
        assert "1:3" in result.stdout  # masked: it is /dev/null (char 1:3)


# -- 5. flags that made root of a user, and other findings --------------------------------------------------
@pytest.mark.parametrize("user", ["4294967295", "1000:4294967295", "4294967296"])
def test_an_id_out_of_range_is_refused(stages, user):
    result = run(stages, "-u", user, "busybox", "id", "-u")
    assert result.returncode != 0 and result.stdout == ""
    assert "is not a" in result.stderr and "4294967294" in result.stderr and "Traceback" not in result.stderr


def _bundle(tmp_path, **process_user) -> dict:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    config = spec.default_spec(["true"])
    config["process"]["user"].update(process_user)
    return config


@pytest.mark.parametrize("user", [{"uid": -1}, {"gid": -1}, {"uid": 4294967295},
                                  {"additionalGids": [4294967295]}])
def test_stages_oci_refuses_an_id_out_of_range_at_create(tmp_path, user):
    with pytest.raises(spec.SpecError, match="is not a user or group ID"):
        spec.plan(_bundle(tmp_path, **user), str(tmp_path))


@pytest.mark.parametrize(("field", "value"), [("memory.limit", -5), ("memory.swap", -2), ("pids.limit", -3),
                                              ("cpu.quota", -7)])
def test_stages_oci_refuses_a_negative_limit_other_than_minus_one(tmp_path, field, value):
    config = _bundle(tmp_path)
    group, name = field.split(".")
    config["linux"]["resources"] = {group: {name: value}}
    if field == "memory.swap":
        config["linux"]["resources"]["memory"]["limit"] = 1 << 26
    with pytest.raises(spec.SpecError, match=f"linux.resources.{field}: {value} is not a limit"):
        spec.plan(config, str(tmp_path))
    config["linux"]["resources"][group][name] = -1  # -1 is "no limit", which the spec allows
    spec.plan(config, str(tmp_path))


def test_pids_limit_counts_the_containers_processes_only(stages):
    """pids.max counts what the container runs, as under Docker: the runtime's setup process leaves the
    cgroup once the init is in (before: it counted, so --pids-limit 3 left the shell no fork, and less
    than 3 was refused). Too few for the init and the command is one sentence, not a failed fork."""
    refused = run(stages, "--pids-limit", "1", "busybox", "true")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "the container's init (PID 1) and the command are two" in refused.stderr
    assert "--no-init" in refused.stderr
    # the init and sh: full; sh's own fork for `echo` of a builtin needs none, a pipe's second side fails
    assert run(stages, "--pids-limit", "2", "busybox", "echo", "two").stdout == "two\n"
    assert run(stages, "--pids-limit", "1", "--no-init", "busybox", "echo", "one").stdout == "one\n"
    # three: the init, sh, and one child of sh (Docker's --pids-limit 3 gives sh two children: no init)
    forked = run(stages, "--pids-limit", "3", "busybox", "sh", "-c", "cat /sys/fs/cgroup/pids.max "
                 "/sys/fs/cgroup/pids/pids.max 2>/dev/null; ls / >/dev/null && echo forked")
    assert forked.stdout.split() == ["3", "forked"], forked
    starved = run(stages, "--pids-limit", "2", "busybox", "sh", "-c", "ls / >/dev/null; true")
    assert starved.returncode != 0 and "can't fork" in starved.stderr, starved


def test_an_oom_killed_container_is_said_to_be(stages):
    hog = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"
    result = stages("run", "--name", "hog", "--network", "none", "--memory", "16M", "busybox", "sh", "-c",
                    hog, check=False)
    try:
        assert result.returncode == 137 and "survived" not in result.stdout
        assert "Exited (137, OOM-killed)" in stages("ps", "-a").stdout
        state = inspect(stages, "hog")["state"]
        assert state["oom_killed"] is True and "OOM-killed" in state["description"]
    finally:
        stages("rm", "-f", "hog")
    stages("run", "--name", "calm", "--network", "none", "--memory", "16M", "busybox", "true")
    try:
        assert inspect(stages, "calm")["state"]["oom_killed"] is False
        assert "Exited (0)" in stages("ps", "-a").stdout
    finally:
        stages("rm", "-f", "calm")


@pytest.fixture
def listener(host_netns):
    """A TCP server listening on a port of the stand-in host."""
    from stages.runtime.network import in_netns

    def listen() -> socket.socket:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        return server

    server = in_netns(f"/run/netns/{host_netns}", listen)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


@pytest.mark.net
def test_a_host_port_a_process_listens_on_is_refused(stages, listener):
    result = stages("run", "--rm", "-p", f"{listener}:80", "busybox", "true", check=False)
    assert result.returncode != 0, result.stdout
    assert f"host port {listener} is in use: a process listens on it" in result.stderr
    assert stages("ps", "-a", "-q").stdout.strip() == ""


def test_a_port_given_twice_is_said_to_be(stages):
    result = stages("run", "--rm", "-p", "18080:80", "-p", "18080:81", "busybox", "true", check=False)
    assert "host port 18080 is given twice (-p 18080:80 -p 18080:81)" in result.stderr
    assert "published already" not in result.stderr


@pytest.mark.parametrize(("argv", "words"), [
    (["--hostname", "h" * 65], "is 65 characters long; the kernel keeps at most 64"),
    (["--hostname", "web_1"], "is not a host name"),
    (["--hostname=-web"], "is not a host name"),
    (["-v", "/tmp:/"], "a volume cannot be mounted on /"),
])
def test_other_bad_flags_get_a_sentence(stages, argv, words):
    result = run(stages, *argv, "busybox", "true")
    assert result.returncode != 0 and words in result.stderr and "Traceback" not in result.stderr
    assert stages("ps", "-a", "-q").stdout.strip() == ""


def test_a_64_character_hostname_is_fine(stages):
    assert run(stages, "--hostname", "h" * 64, "busybox", "hostname").stdout.strip() == "h" * 64


def test_the_run_record_shows_each_default_as_a_step(stages):
    explained = run(stages, "--explain", "busybox", "true")
    assert "seccomp" in explained.stderr
    assert "devices" in explained.stderr  # devices.deny (v1) or the BPF device program (v2)
