"""linux.seccomp, whole (config-linux.md "Seccomp"): real containers under real filters.

Every action, errnoRet and defaultErrnoRet, architectures, flags, argument conditions, and podman's own
profile (linux.seccomp of tests/data/podman-config.json: what podman 4.3 wrote for ``podman run busybox``).
Each test looks at what a program inside sees: the errno a call fails with, the signal that ends it.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from stages.runtime import oci
from stages.runtime.oci import seccomp

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not seccomp.available(), reason="libseccomp is not installed")]

PODMAN = json.loads((Path(__file__).parent / "data" / "podman-config.json").read_text())["linux"]["seccomp"]
ENOSYS = "Function not implemented"
EPERM = "Operation not permitted"


def run(tmp_path, root, rootfs, script: str, profile: dict | None, no_new_privileges: bool = True,
        every_capability: bool = False):
    """Run ``sh -c script`` in a container under ``profile``; (exit code, output)."""
    config = oci.default_spec(["sh", "-c", script], rootfs=str(rootfs))
    config["process"]["noNewPrivileges"] = no_new_privileges
    if every_capability:
        del config["process"]["capabilities"]
    config["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"})
    if profile is not None:
        config["linux"]["seccomp"] = profile
    bundle = oci.write_bundle(tmp_path / "bundle", config)
    output = tmp_path / "output"
    with open(os.devnull) as stdin, open(output, "w") as out:
        code = oci.run(f"sc-{os.getpid()}-{tmp_path.name[-16:]}", bundle, root=root, stdio=(stdin, out, out))
    return code, output.read_text()


def allow_list(*, without=(), rules=()) -> dict:
    """podman's allow list (default ERRNO(38)), minus the names in ``without``, plus ``rules``."""
    profile = copy.deepcopy(PODMAN)
    for rule in profile["syscalls"]:
        rule["names"] = [name for name in rule["names"] if name not in without]
    profile["syscalls"] = [rule for rule in profile["syscalls"] if rule["names"]] + list(rules)
    return profile


# -- an allow list ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("no_new_privileges", [True, False], ids=["no_new_privs", "privileged-load"])
def test_an_allow_list_runs_busybox_and_a_denied_call_fails_with_its_errno(tmp_path, root, busybox_rootfs,
                                                                          no_new_privileges):
    profile = allow_list(without=("mkdir", "mkdirat", "swapoff"),
                         rules=[{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}])
    script = ("echo hi; grep -E '^Seccomp(_filters)?:' /proc/self/status; mkdir /tmp/new; "
              "swapoff /nothing; touch /tmp/file && echo touched")
    code, out = run(tmp_path, root, busybox_rootfs, script, profile, no_new_privileges)
    lines = out.splitlines()
    assert lines[0] == "hi", out
    assert "Seccomp:\t2" in lines and "Seccomp_filters:\t1" in lines, out  # SECCOMP_MODE_FILTER, one
    assert any("mkdir" in line and EPERM in line for line in lines), out  # the rule's errnoRet
    assert any("swapoff" in line and ENOSYS in line for line in lines), out  # defaultErrnoRet 38
    assert "touched" in lines
    # without the profile: no filter, mkdir works, and swapoff fails for want of CAP_SYS_ADMIN
    code, out = run(tmp_path, root, busybox_rootfs, script, None, no_new_privileges)
    assert "Seccomp:\t0" in out and ENOSYS not in out and "mkdir" not in out, out
    assert "swapoff: /nothing: " + EPERM in out


def test_podmans_whole_profile_runs_echo_and_still_refuses(tmp_path, root, busybox_rootfs):
    started = time.perf_counter()
    compiled = seccomp.compile_profile(PODMAN)
    took = time.perf_counter() - started
    assert compiled["default"] == "ERRNO(38)" and compiled["architectures"] == 3
    assert compiled["rules"] > 350 and not compiled["skipped"]
    assert took < 0.5, f"compiling podman's profile took {took:.3f} s"
    # root with every capability, so that what fails, fails because of the filter
    script = ("echo hi; swapoff /nothing; hostname other || echo hostname-refused; "
              "linux32 true && echo linux32-allowed; grep ^Seccomp: /proc/self/status")
    code, out = run(tmp_path, root, busybox_rootfs, script, PODMAN, no_new_privileges=False,
                    every_capability=True)
    lines = out.splitlines()
    assert lines[0] == "hi", out
    assert "swapoff: /nothing: " + EPERM in lines, out  # errnoRet 1 in podman's profile
    assert "hostname-refused" in lines  # sethostname: errnoRet 1, though we have a UTS namespace
    assert "linux32-allowed" in lines  # personality(PER_LINUX32): one of the argument values podman allows
    assert "Seccomp:\t2" in lines
    code, out = run(tmp_path, root, busybox_rootfs, script, None, no_new_privileges=False,
                    every_capability=True)
    assert "swapoff: /nothing: No such file or directory" in out and "hostname-refused" not in out, out


# -- conditions on arguments --------------------------------------------------------------------------------
PERSONALITY_CASES = {
    # allow personality(2) only when its first argument ...
    "EQ": {"op": "SCMP_CMP_EQ", "value": 0},
    "NE": {"op": "SCMP_CMP_NE", "value": 8},
    "LT": {"op": "SCMP_CMP_LT", "value": 8},
    "LE": {"op": "SCMP_CMP_LE", "value": 7},
    "MASKED_EQ": {"op": "SCMP_CMP_MASKED_EQ", "value": 0xFF, "valueTwo": 0},
    # ... or deny it (EPERM) when ...
    "GE": {"op": "SCMP_CMP_GE", "value": 8, "deny": True},
    "GT": {"op": "SCMP_CMP_GT", "value": 7, "deny": True},
}


@pytest.mark.parametrize("case", PERSONALITY_CASES)
def test_an_argument_condition_is_enforced(tmp_path, root, busybox_rootfs, case):
    condition = dict(PERSONALITY_CASES[case], index=0)
    deny = condition.pop("deny", False)
    rule = {"names": ["personality"], "action": "SCMP_ACT_ERRNO" if deny else "SCMP_ACT_ALLOW",
            "args": [condition]}
    if deny:
        rule["errnoRet"] = 1
    profile = ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]} if deny
               else allow_list(without=("personality",), rules=[rule]))
    # busybox's linux64 calls personality(PER_LINUX = 0), linux32 personality(PER_LINUX32 = 8)
    script = "linux64 true && echo linux64-ran; linux32 true || echo linux32-refused"
    code, out = run(tmp_path, root, busybox_rootfs, script, profile)
    lines = out.splitlines()
    assert "linux64-ran" in lines and "linux32-refused" in lines, out
    assert (EPERM if deny else ENOSYS) in out, out


def test_two_conditions_on_one_argument_are_alternatives(tmp_path, root, busybox_rootfs):
    # as runc reads them: personality is allowed for 0 or for 8, and for nothing else
    rule = {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                     {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]}
    profile = allow_list(without=("personality",), rules=[rule])
    code, out = run(tmp_path, root, busybox_rootfs, "linux64 true && linux32 true && echo both-ran", profile)
    assert "both-ran" in out, out


# -- every action -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action, errno_ret, expected", [
    ("SCMP_ACT_ERRNO", 13, "Permission denied"),
    ("SCMP_ACT_ERRNO", None, EPERM),  # no errnoRet: EPERM, as runc does
    ("SCMP_ACT_KILL_PROCESS", None, "status=159"),  # 128 + SIGSYS
    ("SCMP_ACT_KILL_THREAD", None, "status=159"),
    ("SCMP_ACT_KILL", None, "status=159"),
    ("SCMP_ACT_TRAP", None, "status=159"),  # SIGSYS, which nobody handles
    ("SCMP_ACT_TRACE", None, ENOSYS),  # no tracer attached: the call fails with ENOSYS (seccomp(2))
    ("SCMP_ACT_LOG", None, EPERM),  # let through (and logged): the kernel's own answer, no CAP_SYS_ADMIN
    ("SCMP_ACT_ALLOW", None, EPERM),
])
def test_each_action(tmp_path, root, busybox_rootfs, action, errno_ret, expected):
    rule = {"names": ["swapoff"], "action": action}
    if errno_ret is not None:
        rule["errnoRet"] = errno_ret
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [rule]}
    code, out = run(tmp_path, root, busybox_rootfs, "swapoff /nothing; echo status=$?", profile)
    assert expected in out, out
    assert signal.SIGSYS == 31


def test_a_default_action_kills_and_flags_are_set(tmp_path, root, busybox_rootfs):
    profile = allow_list(without=("swapoff",))
    profile.update(defaultAction="SCMP_ACT_KILL_PROCESS", flags=["SECCOMP_FILTER_FLAG_LOG",
                                                                  "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
                                                                  "SECCOMP_FILTER_FLAG_TSYNC"])
    profile.pop("defaultErrnoRet")
    compiled = seccomp.compile_profile(profile)
    assert compiled["flags"] == 1 | 2 | 4 and compiled["default"] == "KILL_PROCESS"
    code, out = run(tmp_path, root, busybox_rootfs, "echo before; swapoff /nothing; echo status=$?", profile)
    assert out.splitlines() == ["before", "Bad system call", "status=159"], out  # SIGSYS, as sh says it


def test_unknown_names_are_skipped_and_architectures_resolved():
    compiled = seccomp.compile_profile({
        "defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"],
        "syscalls": [{"names": ["no_such_call", "mkdir"], "action": "SCMP_ACT_ERRNO"}]})
    assert compiled["skipped"] == ["no_such_call"] and compiled["rules"] == 1
    assert compiled["architectures"] == 2
    assert "ERRNO" not in compiled["default"]


@pytest.mark.parametrize("threaded", [False, True], ids=["forked", "spawned"])
def test_create_and_exec_load_the_containers_filter(tmp_path, root, busybox_rootfs, threaded):
    # a caller with threads starts fresh interpreters (python -m stages.runtime.oci.process): the compiled
    # filter travels to them in the message, as to a forked helper in its memory
    config = oci.default_spec(["sleep", "30"], rootfs=str(busybox_rootfs))
    config["linux"]["seccomp"] = allow_list(without=("swapoff",))
    bundle = oci.write_bundle(tmp_path / "bundle", config)
    output = tmp_path / "output"
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    if threaded:
        helper.start()
    try:
        with open(os.devnull) as stdin, open(output, "w") as out:
            oci.create("execd-seccomp", bundle, root=root, stdio=(stdin, out, out))
            oci.start("execd-seccomp", root=root)
            for no_new_privileges in (True, False):
                code = oci.exec_process("execd-seccomp", {
                    "args": ["sh", "-c", "grep ^Seccomp: /proc/self/status; grep ^Seccomp: /proc/1/status; "
                                         "swapoff /nothing"], "cwd": "/",
                    "env": ["PATH=/bin:/sbin:/usr/bin"], "noNewPrivileges": no_new_privileges}, root=root,
                    stdio=(stdin, out, out))
                assert code != 0
    finally:
        stop.set()
        if threaded:
            helper.join()
        oci.delete("execd-seccomp", force=True, root=root)
    text = output.read_text()
    assert text.count("Seccomp:\t2") == 4 and text.count(ENOSYS) == 2, text  # the init's and exec's


# -- refused by name ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, profile", [
    ("linux.seccomp.defaultAction", {"defaultAction": "SCMP_ACT_NOTIFY"}),
    ("linux.seccomp.defaultAction", {"defaultAction": "SCMP_ACT_MAYBE"}),
    ("linux.seccomp.defaultAction", {"syscalls": []}),
    ("linux.seccomp.listenerPath", {"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/agent.sock"}),
    ("linux.seccomp.syscalls[0].action", {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}),
    ("linux.seccomp.syscalls[0].errnoRet", {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["mkdir"], "action": "SCMP_ACT_ALLOW", "errnoRet": 1}]}),
    ("linux.seccomp.syscalls[0].args[0].index", {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "op": "SCMP_CMP_EQ"}]}]}),
    ("linux.seccomp.syscalls[0].names", {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": [], "action": "SCMP_ACT_ERRNO"}]}),
    ("linux.seccomp.architectures[0]", {"defaultAction": "SCMP_ACT_ALLOW",
                                        "architectures": ["SCMP_ARCH_Z80"]}),
    ("linux.seccomp.flags[0]", {"defaultAction": "SCMP_ACT_ALLOW",
                                "flags": ["SECCOMP_FILTER_FLAG_NEW_LISTENER"]}),
    ("linux.seccomp.flags[0]", {"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_FAST"]}),
])
def test_what_cannot_be_honoured_is_refused_by_name_at_create(tmp_path, root, busybox_rootfs, field, profile):
    config = oci.default_spec(["true"], rootfs=str(busybox_rootfs))
    config["linux"]["seccomp"] = profile
    bundle = oci.write_bundle(tmp_path / "bundle", config)
    with pytest.raises(oci.SpecError) as caught:
        oci.create("refused", bundle, root=root)
    assert caught.value.message.startswith(f"config.json: {field}:"), caught.value.message
    assert caught.value.hint
    assert oci.list_containers(root) == []
