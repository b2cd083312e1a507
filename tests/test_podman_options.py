"""podman's options through stages-oci behave as under runc (issue #16), each tried through podman.

Found running podman 4.3 with stages-oci beside runc: ``--device`` and ``--privileged`` failed (podman
writes ``linux.devices[].fileMode`` with the file-type bits, 0o20666), ``--read-only`` and ``--tmpfs``
failed (the ``tmpcopyup`` mount option), ``--timeout`` left podman's record broken (the init shared
conmon's process group, so conmon's kill(-pgid) killed conmon too; runc's init calls setsid(2)),
``--pids-limit 1`` failed at create (the runtime's own helper counted), a command that is not executable
said "not found"/127 (runc: permission denied/126), ``HOME`` was not taken from /etc/passwd (``podman
build``'s ``RUN mkdir -p $HOME/.config`` made /.config), and a failed ``exec`` returned 1 (runc: 255).
``stages-oci spec`` is compared with the real ``runc spec`` output.

The podman, its fixtures and its clean-up checks are tests/test_podman.py's (state in a temporary
directory, the session's busybox imported, nothing pulled). ``STAGES_PODMAN_RUNTIME=runc`` runs the same
tests with runc: each expectation here is runc's behaviour, so they pass with runc too.

Cost: about 14 podman commands (12 containers and one build of one step), some 30 s here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
import test_podman as _podman
from test_podman import IMAGE, RUN, STAGES_OCI

# test_podman's fixtures, used here by name
runtime, podman, settled = _podman.runtime, _podman.podman, _podman.settled

pytestmark = _podman.pytestmark


def test_device_and_privileged_run_as_under_runc(podman):
    # podman's linux.devices entry for /dev/null has fileMode 8630 (0o20666): before, "is not a file mode"
    device = podman(*RUN, "--rm", "--device", "/dev/null:/dev/other-null", IMAGE, "sh", "-c",
                    "ls -l /dev/other-null; echo text > /dev/other-null && echo written")
    assert device.returncode == 0, device.stderr
    assert device.stdout.startswith("crw-rw-rw-") and "1,   3" in device.stdout, device.stdout
    assert "written" in device.stdout
    privileged = podman(*RUN, "--rm", "--privileged", IMAGE, "sh", "-c", "grep CapEff /proc/self/status")
    assert privileged.returncode == 0, privileged.stderr
    assert int(privileged.stdout.split()[1], 16) == int(open("/proc/self/status").read().split(
        "CapBnd:")[1].split()[0], 16), privileged.stdout  # every capability we hold


def test_read_only_and_tmpfs_copy_the_images_files_up(podman):
    # podman gives --tmpfs (and --read-only's /tmp, /var/tmp, /run) the tmpcopyup option: the new tmpfs
    # starts with what the image had there (runc: fileutils.CopyDirectory), and the rest is read-only
    result = podman(*RUN, "--rm", "--read-only", "--tmpfs", "/etc", IMAGE, "sh", "-c",
                    "head -1 /etc/passwd; grep ' /etc ' /proc/mounts | cut -d' ' -f3; "
                    "touch /etc/new && echo etc-writable; touch /tmp/new && echo tmp-writable; "
                    "touch /new 2>&1")
    assert result.returncode == 1, result  # touch /new fails last
    lines = result.stdout.splitlines()
    assert lines[:4] == ["root:x:0:0:root:/root:/bin/sh", "tmpfs", "etc-writable", "tmp-writable"], lines
    assert "Read-only file system" in result.stdout


def test_timeout_ends_the_container_and_podmans_record_is_right(podman):
    # conmon kills the container's process group when --timeout runs out; before, the init was in
    # conmon's group and took conmon with it: rc 127 after 30 s, the container "Up", cgroups left
    name = "timed-out"
    started = time.monotonic()
    result = podman(*RUN, "--name", name, "--timeout", "2", IMAGE, "sleep", "30", timeout=60)
    took = time.monotonic() - started
    try:
        # runc's result through podman 4.3, the same here: conmon reports no exit code of the killed
        # container (podman's 255, ExitCode -1), within a second of the timeout
        assert result.returncode == 255 and took < 10, (result.returncode, took, result.stderr)
        entry = podman.containers()[name]
        assert entry["State"] == "exited", entry  # not "Up" with conmon gone
    finally:
        podman("rm", "--force", name)


def test_pids_limit_1_runs_one_process_as_under_runc(podman):
    # pids.max counts the container's own processes: the runtime's setup process is out of the cgroup
    # before the limit is set (before: EAGAIN at create); the one process may not fork
    alone = podman(*RUN, "--rm", "--pids-limit", "1", IMAGE, "echo", "alone")
    assert (alone.returncode, alone.stdout) == (0, "alone\n"), alone.stderr
    forks = podman(*RUN, "--rm", "--pids-limit", "1", IMAGE, "sh", "-c", "ls / >/dev/null; true")
    assert forks.returncode != 0 and "can't fork" in forks.stderr, forks


def test_a_command_that_is_not_executable_is_126_permission_denied(podman):
    denied = podman(*RUN, "--rm", IMAGE, "/etc/passwd")
    assert denied.returncode == 126 and "permission denied" in denied.stderr.lower(), denied
    name = "exec-codes"
    podman.ok(*RUN, "-d", "--name", name, IMAGE, "sleep", "60")
    try:
        # podman's exec reads the runtime's 255 and its reason as runc's: 126 not executable, 127 missing
        assert podman("exec", name, "/etc/passwd").returncode == 126
        assert podman("exec", name, "no-such-program").returncode == 127
        assert podman("exec", name, "/no/such/program").returncode == 127
    finally:
        podman("rm", "--force", "--time", "0", name)


def test_podman_build_gets_home_from_passwd(podman, tmp_path):
    # buildah gives RUN no HOME: the runtime takes it from /etc/passwd (runc: /root, or / for a user that
    # passwd does not list); before, `mkdir -p $HOME/.config` made /.config
    context = tmp_path / "context"
    context.mkdir()
    (context / "Containerfile").write_text(
        f"FROM {IMAGE}\nRUN mkdir -p $HOME/.config && echo root=$HOME\nUSER 1000\nRUN echo stranger=$HOME\n"
        "USER 65534\nRUN echo nobody=$HOME\n")
    tag = "localhost/stages-home-test"
    built = podman("build", "--pull=never", "--network", "none", *_podman.LIMITS, "-t", tag, str(context),
                   timeout=120)
    try:
        assert built.returncode == 0, built.stderr
        for line in ("root=/root", "stranger=/", "nobody=/nonexistent"):
            assert line in built.stdout.splitlines(), built.stdout
        inside = podman.ok(*RUN, "--rm", "--user", "0", tag, "sh", "-c", "ls -a /root; echo -; ls -a /")
        in_root, in_top = inside.split("-\n")
        assert ".config" in in_root.split() and ".config" not in in_top.split(), inside
    finally:
        podman("rmi", "--force", tag)


def _runc_spec(directory) -> dict:
    subprocess.run(["runc", "spec", "--bundle", str(directory)], check=True, capture_output=True)
    return json.loads((directory / "config.json").read_text())


@pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed")
def test_stages_oci_spec_writes_what_runc_spec_writes(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "runc"
    ours.mkdir()
    theirs.mkdir()
    written = subprocess.run([str(STAGES_OCI), "spec", "--bundle", str(ours)], capture_output=True, text=True)
    assert written.returncode == 0, written.stderr
    mine = json.loads((ours / "config.json").read_text())
    runc = _runc_spec(theirs)
    mine.pop("ociVersion"), runc.pop("ociVersion")  # 1.0.2 and runc's 1.0.2-dev
    assert mine == runc


def test_exec_fails_with_255_and_takes_home_from_passwd_as_runc(tmp_path, busybox_rootfs, root):
    """stages-oci itself (as conmon calls it), and runc beside it on the same bundle where installed."""
    from stages.runtime import oci

    config = oci.default_spec(["sleep", "30"], rootfs=str(busybox_rootfs), readonly=True,
                              env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])  # no HOME: the runtime's to set
    bundle = oci.write_bundle(tmp_path / "bundle", config)
    runtimes = [str(STAGES_OCI)] + (["runc"] if shutil.which("runc") else [])
    name = f"homes-{os.getpid()}"
    for program in runtimes:
        state = ["--root", str(tmp_path / f"state-{os.path.basename(program)}")]
        # detached, the container holds its stdio: a file, not a pipe of ours (we would wait for its end)
        errors = tmp_path / f"{os.path.basename(program)}.err"
        with open(errors, "w") as handle:
            created = subprocess.run([program, *state, "run", "-d", "--bundle", bundle, name], timeout=30,
                                     stdin=subprocess.DEVNULL, stdout=handle, stderr=handle)
        assert created.returncode == 0, (program, errors.read_text())
        try:
            for command, code in ((["no-such-program"], 255), (["/etc/passwd"], 255),
                                  (["sh", "-c", "exit 3"], 3)):
                ran = _exec(program, state, name, *command)
                assert ran.returncode == code, (program, command, ran.returncode, ran.stderr)
            for user, home in (("0", "/root"), ("65534", "/nonexistent"), ("1000", "/")):
                ran = _exec(program, state, "--user", user, name, "sh", "-c", "echo $HOME")
                assert (ran.returncode, ran.stdout) == (0, f"{home}\n"), (program, user, ran.stderr)
        finally:
            subprocess.run([program, *state, "delete", "--force", name], capture_output=True, timeout=30)
    # and the container's own process: HOME from passwd too
    assert oci.run("home-init", _with_args(tmp_path, config, ["sh", "-c", "test $HOME = /root"]),
                   root=root) == 0


def _exec(program: str, state: list[str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([program, *state, "exec", *argv], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def _with_args(tmp_path, config: dict, args: list[str]) -> str:
    from stages.runtime import oci

    config = json.loads(json.dumps(config))
    config["process"]["args"] = args
    return oci.write_bundle(tmp_path / "bundle-2", config)


def test_file_mode_type_bits_must_agree_with_the_device_type(tmp_path, busybox_rootfs):
    """What podman writes is taken (the permissions kept, mknod gets the type from "type"); type bits
    that contradict "type" are refused by name, and so is tmpcopyup on what is not a tmpfs."""
    import stat

    from stages.runtime import oci
    from stages.runtime.oci import spec

    def plan(devices=(), mounts=()):
        config = oci.default_spec(["true"], rootfs=str(busybox_rootfs))
        config["linux"]["devices"] = list(devices)
        config["mounts"] += list(mounts)
        return spec.plan(config, str(tmp_path))

    null = {"path": "/dev/other-null", "type": "c", "major": 1, "minor": 3}
    assert plan([{**null, "fileMode": stat.S_IFCHR | 0o666}]).device_nodes[0]["mode"] == 0o666
    assert plan([{**null, "fileMode": 0o640}]).device_nodes[0]["mode"] == 0o640
    for wrong in (stat.S_IFBLK | 0o666, 0o1000000):
        with pytest.raises(spec.SpecError, match=r"linux.devices\[0\].fileMode: .* type 'c'"):
            plan([{**null, "fileMode": wrong}])
    copied = plan(mounts=[{"destination": "/etc", "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "tmpcopyup"]}]).mounts[-1]
    assert copied.copy_up and copied.data is None  # ours, never passed to mount(2) as data
    with pytest.raises(spec.SpecError, match="'tmpcopyup' copies a directory into a new tmpfs"):
        plan(mounts=[{"destination": "/etc", "type": "bind", "source": str(tmp_path),
                      "options": ["rbind", "tmpcopyup"]}])
