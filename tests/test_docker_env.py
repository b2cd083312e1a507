"""``stages run``'s process environment is Docker's (issue #16), each difference tried inside a container.

What Docker documents or does, and what each test compares with:

- the environment: Docker's daemon sets ``HOSTNAME`` (first, under the image's and the user's variables)
  and the runtime sets ``HOME`` from the image's /etc/passwd when nothing else does (runc's user lookup:
  ``/`` for a user passwd does not list);
- ``-u UID`` without a group: the primary group of that user in the image's /etc/passwd, else 0
  (``docker run -u 1000 busybox id``: uid=1000 gid=0(root));
- the mounts of moby's oci/defaults.go (DefaultLinuxSpec): /proc ``nosuid,noexec,nodev``; /dev a tmpfs
  ``nosuid,strictatime,mode=755,size=65536k`` (no noexec); devpts ``gid=5``; the container's own cgroups
  read-only at /sys/fs/cgroup (so it can read its own limits);
- Docker's init is bound at /sbin/docker-init; ours lives in the container's /dev tmpfs, so nothing of it
  shows in a listing of ``/`` (an http.server's directory page showed ``.stages-init`` before);
- ``-w DIR`` that the image lacks is made (Docker and runc do; before: exit 1);
- a command that is no executable: runc's "permission denied" and exit 126 (before: "not found", 127);
- ``-it`` with an input that is no terminal (``</dev/null``): podman warns and runs (before: "Operation not
  permitted", and ``exec -it`` a PermissionError traceback);
- a failed ``exec`` leaves no zombie in the container (before: ``[stages] <defunct>``, reparented to the
  host's PID 1, and the next ``stop`` waited for it).

Cost: 9 containers of ``stages run``/``exec`` (about 10 s here).
"""

from __future__ import annotations

import pytest
import test_containers as _base

from stages.runtime import flags

home, python, stages = _base.home, _base.python, _base.stages

pytestmark = [pytest.mark.root]


def run(stages, *argv: str, **extra):
    return stages("run", "--rm", "--network", "none", *argv, check=False, **extra)


def _mount_options(mountinfo: str) -> dict[str, set[str]]:
    """mount point -> its mount options and its filesystem's (mountinfo's fields 6 and 11, proc(5))."""
    found = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line:
            continue
        after = line.split(" - ", 1)[1].split()
        found[fields[4]] = set(fields[5].split(",")) | set(after[2].split(","))
    return found


def test_the_environment_mounts_and_init_are_dockers(stages):
    script = ("env; echo ---; id; echo ---; cat /proc/self/mountinfo; echo ---; ls -a /; echo ---; "
              "cat /proc/1/cmdline | tr '\\0' ' '; echo; echo ---; "
              "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null; "
              "echo ---; touch /sys/fs/cgroup/x 2>&1; pwd")
    result = run(stages, "--hostname", "web-1", "--memory", "64M", "-w", "/does/not/exist", "busybox",
                 "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    env, ids, mountinfo, listing, init, limit, write = result.stdout.split("---\n")
    variables = dict(line.split("=", 1) for line in env.splitlines() if "=" in line)
    assert variables["HOME"] == "/root" and variables["HOSTNAME"] == "web-1", variables
    assert ids.startswith("uid=0(root) gid=0(root)"), ids
    mounts = _mount_options(mountinfo)
    assert {"nosuid", "nodev", "noexec"} <= mounts["/proc"], mounts["/proc"]
    assert {"nosuid", "mode=755", "size=65536k"} <= mounts["/dev"] and "noexec" not in mounts["/dev"]
    assert "gid=5" in mounts["/dev/pts"], mounts["/dev/pts"]
    assert "ro" in mounts["/sys/fs/cgroup"], mounts["/sys/fs/cgroup"]
    assert limit.split() == [str(64 * 1024 * 1024)], limit  # its own limit, as the container sees it
    assert "Read-only file system" in write, write
    assert ".stages-init" not in listing.split(), listing
    assert init.split()[:2] == [flags.INIT_PATH, "--"] and flags.INIT_PATH.startswith("/dev/"), init
    assert write.splitlines()[-1] == "/does/not/exist"  # -w of a directory the image lacks: made


def test_a_user_without_a_group_gets_dockers_group_and_home(stages):
    # 1000 is in no /etc/passwd of busybox: gid 0 and HOME=/ (Docker: uid=1000 gid=0(root), HOME=/)
    stranger = run(stages, "-u", "1000", "busybox", "sh", "-c", "id; echo HOME=$HOME")
    assert stranger.stdout.split() == ["uid=1000", "gid=0(root)", "groups=0(root)", "HOME=/"] or \
        stranger.stdout.split()[:2] == ["uid=1000", "gid=0(root)"], stranger
    assert "HOME=/\n" in stranger.stdout
    # nobody is: its passwd entry gives the group and the home
    nobody = run(stages, "-u", "65534", "busybox", "sh", "-c", "id -g; echo HOME=$HOME")
    assert nobody.stdout.split() == ["65534", "HOME=/nonexistent"], nobody


def test_a_file_that_is_not_executable_is_126_permission_denied(stages):
    # through the init (its execvp's EACCES), and as PID 1 itself (the runtime's own check, at create)
    for init in ([], ["--no-init"]):
        denied = run(stages, *init, "busybox", "/etc/passwd")
        assert denied.returncode == 126, denied
        assert "permission denied" in denied.stderr.lower() and "Traceback" not in denied.stderr, denied
    assert run(stages, "--no-init", "busybox", "/no/such/program").returncode == 127


def test_it_with_an_input_that_is_no_terminal_warns_and_runs(stages):
    ran = run(stages, "-it", "busybox", "echo", "hello")  # stdin is /dev/null (the fixture's)
    assert ran.returncode == 0 and "hello" in ran.stdout, ran
    assert "not a TTY" in ran.stderr and "Operation not permitted" not in ran.stderr, ran.stderr
    name = "it-exec"
    stages("run", "-d", "--network", "none", "--name", name, "busybox", "sleep", "60")
    try:
        inside = stages("exec", "-it", name, "echo", "inside", check=False)
        assert inside.returncode == 0 and "inside" in inside.stdout, inside
        assert "Traceback" not in inside.stderr and "not a TTY" in inside.stderr, inside.stderr
    finally:
        stages("rm", "-f", name, check=False)


def test_a_failed_exec_leaves_no_zombie_in_the_container(stages):
    import time

    name = "exec-fails"
    stages("run", "-d", "--network", "none", "--name", name, "busybox", "sleep", "60")
    try:
        for _ in range(3):  # the helper's death raced its child's: before, most tries left a zombie
            failed = stages("exec", name, "no-such-program", check=False)
            assert failed.returncode == 127 and "no-such-program" in failed.stderr, failed
        listing = stages("exec", name, "ps", "-o", "pid,stat,comm").stdout
        assert not [line for line in listing.splitlines()[1:] if line.split()[1].startswith("Z")], listing
        started = time.monotonic()
        stages("stop", "-t", "5", name)
        # sleep as PID 1's child ends at SIGTERM through the init; a zombie kept the cgroup busy ~2 s
        assert time.monotonic() - started < 1.5
    finally:
        stages("rm", "-f", name, check=False)
