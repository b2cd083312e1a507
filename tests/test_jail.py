"""Stage 1, the chroot jail, on the real kernel: what comes back, what is hidden, what is not, the escape,
and every error a learner can meet (from Python and from ``stages jail``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from stages import jail, observe, rootfs
from stages.errors import CommandNotFoundError, NotRootError, RootfsError, StagesError
from stages.steps import StepRecord

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent


def cli(python: str, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "stages.cli", "jail", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=60, **kwargs)


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


def mount_table() -> str:
    with open("/proc/self/mountinfo") as handle:
        return handle.read()


# == run: output, exit code, environment, steps ======================================================
def test_exit_code_stdout_and_stderr_come_back_unchanged(busybox_rootfs):
    result = jail.run(busybox_rootfs, ["sh", "-c", "echo out; echo err >&2; printf 'no newline'; exit 3"])
    assert result.returncode == 3
    assert result.stdout == "out\nno newline"
    assert result.stderr == "err\n"
    assert not result.ok


def test_a_signal_comes_back_as_a_negative_code(busybox_rootfs):
    assert jail.run(busybox_rootfs, ["sh", "-c", "kill -TERM $$"]).returncode == -signal.SIGTERM


def test_the_jail_sees_the_rootfs_files_not_the_hosts(busybox_rootfs):
    inside = jail.run(busybox_rootfs, "cat /etc/os-release").stdout
    assert inside == (busybox_rootfs / "etc" / "os-release").read_text()
    assert inside != Path("/etc/os-release").read_text()
    listing = jail.run(busybox_rootfs, ["ls", "/"]).stdout.split()
    assert sorted(listing) == sorted(p.name for p in busybox_rootfs.iterdir() if not p.name.startswith("."))


def test_environment_and_working_directory_are_the_jails(busybox_rootfs, monkeypatch):
    monkeypatch.setenv("STAGES_HOST_ONLY", "leak")
    result = jail.run(busybox_rootfs, ["sh", "-c", "echo $GREETING; pwd; env"], env={"GREETING": "hi"},
                      cwd="/tmp")
    greeting, directory, *variables = result.stdout.splitlines()
    assert (greeting, directory) == ("hi", "/tmp")
    names = {line.split("=", 1)[0] for line in variables}
    assert "STAGES_HOST_ONLY" not in names
    assert {"PATH", "HOME", "GREETING"} <= names
    # a relative cwd is taken from the jail's root, never from the caller's working directory outside
    monkeypatch.chdir(busybox_rootfs.parent)
    assert jail.run(busybox_rootfs, ["pwd"], cwd="tmp").stdout == "/tmp\n"


def test_steps_are_recorded_as_shell_commands(busybox_rootfs):
    record = StepRecord("mine")
    result = jail.run(busybox_rootfs, ["echo", "hi there"], record=record)
    assert result.record is record
    assert [step.shell for step in record.steps] == [
        f"chroot {busybox_rootfs}", "cd /", "exec echo 'hi there'"]
    assert all(step.ok for step in record.steps)
    assert "chroot" in record.script() and "# mine" in record.script()


def test_mount_proc_shows_host_processes_and_leaves_the_host_mount_table_alone(busybox_rootfs):
    before = mount_table()
    result = jail.run(busybox_rootfs, ["sh", "-c", "ps; echo NS $(readlink /proc/self/ns/mnt) "
                                                   "$(readlink /proc/self/ns/pid)"], mount_proc=True)
    assert result.returncode == 0, result.stderr
    pids = {int(line.split()[0]) for line in result.stdout.splitlines() if line.split()[0].isdigit()}
    assert os.getpid() in pids and 1 in pids  # the test itself and the host's init
    mount_ns, pid_ns = result.stdout.splitlines()[-1].split()[1:]
    # its own mount namespace (so the proc mount died with it) but the host's PID namespace
    assert mount_ns != os.readlink("/proc/self/ns/mnt")
    assert pid_ns == os.readlink("/proc/self/ns/pid")
    assert mount_table() == before
    assert os.listdir(busybox_rootfs / "proc") == []
    shells = [step.shell for step in result.record.steps]
    assert shells[:3] == ["unshare --mount", "mount --make-rprivate /",
                          f"mount -t proc proc {busybox_rootfs}/proc"]
    assert shells[3:5] == [f"chroot {busybox_rootfs}", "cd /"]


def test_without_proc_ps_sees_nothing(busybox_rootfs):
    result = jail.run(busybox_rootfs, ["ps"])
    assert [line for line in result.stdout.splitlines()[1:] if line.strip()] == []


def test_timeout_kills_the_command(busybox_rootfs):
    started = time.monotonic()
    with pytest.raises(jail.JailTimeoutError, match="did not finish within 0.3 s"):
        jail.run(busybox_rootfs, ["sleep", "30"], timeout=0.3)
    assert time.monotonic() - started < 5
    assert not [p for p in psutil.Process().children(recursive=True) if p.name() == "sleep"]


def test_safe_to_call_from_many_threads(busybox_rootfs):
    # A notebook kernel has threads; the preexec_fn must not deadlock or mix up results.
    failures: list[str] = []

    def worker(number: int) -> None:
        for round_ in range(10):
            result = jail.run(busybox_rootfs, ["echo", f"{number}-{round_}"], timeout=20)
            if result.stdout != f"{number}-{round_}\n":
                failures.append(result.stdout)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    assert not any(thread.is_alive() for thread in threads)


# == observations: each asserted by its effect ======================================================
@pytest.fixture(scope="module")
def facts(busybox_rootfs) -> dict[str, jail.Observation]:
    return {fact.name: fact for fact in jail.observations(busybox_rootfs)}


def test_only_files_are_isolated(facts):
    assert [name for name, fact in facts.items() if fact.isolated] == ["files"]
    assert set(facts) == {"files", "processes", "hostname", "network interfaces", "users", "System V IPC",
                          "root's power", "kernel"}
    assert all(fact.explanation for fact in facts.values())


def test_files_a_host_canary_is_invisible_by_path(facts, busybox_rootfs, tmp_path):
    assert "No such file" in facts["files"].jail_value
    canary = tmp_path / "canary"
    canary.write_text("host secret\n")
    inside = jail.run(busybox_rootfs, ["cat", str(canary)])
    assert inside.returncode != 0 and "host secret" not in inside.stdout


def test_processes_this_test_is_listed_by_ps_inside(facts, busybox_rootfs):
    assert f"pid {os.getpid()}" in facts["processes"].jail_value
    # A process started after the observation is just as visible: the jail shares the process table.
    with subprocess.Popen(["sleep", "30"]) as sleeper:
        try:
            listed = jail.run(busybox_rootfs, ["ps"], mount_proc=True).stdout
        finally:
            sleeper.kill()
    assert any(line.split()[0] == str(sleeper.pid) for line in listed.splitlines() if line.strip())


def test_hostname_is_the_hosts(facts, busybox_rootfs):
    assert facts["hostname"].jail_value == socket.gethostname() == facts["hostname"].host_value
    assert (busybox_rootfs / "etc" / "hostname").read_text().strip() != socket.gethostname()


def test_network_interfaces_are_the_hosts(facts):
    assert facts["network interfaces"].jail_value.split(", ") == observe.net_devices()


def test_users_root_inside_is_root_outside(facts, busybox_rootfs):
    assert facts["users"].jail_value.startswith("uid=0(root)")
    assert "uid_map 0 0 4294967295" in facts["users"].jail_value
    # The same uid 0: a file root makes in the jail belongs to the host's root.
    made = jail.run(busybox_rootfs, ["sh", "-c", "echo x > /tmp/owner-check; stat -c %u /tmp/owner-check"])
    try:
        assert made.stdout.strip() == "0"
        assert os.stat(busybox_rootfs / "tmp" / "owner-check").st_uid == 0
    finally:
        (busybox_rootfs / "tmp" / "owner-check").unlink(missing_ok=True)


@pytest.mark.skipif(shutil.which("ipcmk") is None, reason="needs ipcmk (util-linux)")
def test_ipc_a_host_message_queue_is_visible_and_removed_afterwards(facts):
    fact = facts["System V IPC"]
    queue = fact.host_value.split()[2]
    assert f"lists queue {queue}" in fact.jail_value
    with open("/proc/sysvipc/msg") as handle:
        assert queue not in [line.split()[1] for line in handle.readlines()[1:]]


def test_roots_power_the_jail_can_signal_a_host_process(facts, busybox_rootfs):
    assert "exited 0" in facts["root's power"].jail_value
    with subprocess.Popen(["sleep", "30"]) as victim:
        result = jail.run(busybox_rootfs, ["kill", "-TERM", str(victim.pid)])
        assert result.returncode == 0
        assert victim.wait(5) == -signal.SIGTERM  # a process outside the jail, killed from inside


def test_kernel_is_the_hosts(facts):
    assert facts["kernel"].jail_value == os.uname().release


# == the escape =======================================================================================
def test_root_escapes_and_reads_a_host_canary(busybox_rootfs, tmp_path):
    canary = tmp_path / "outside" / "canary.txt"
    canary.parent.mkdir()
    canary.write_text("only the host should read this\n")
    before = sorted(os.listdir(busybox_rootfs))
    result = jail.escape(busybox_rootfs, canary)
    assert result.escaped, result.error
    assert result.content == "only the host should read this\n"
    assert not result.visible_in_jail
    assert result.levels >= len(busybox_rootfs.parts) - 1
    shells = [step.shell for step in result.steps]
    assert shells[0] == f"chroot {busybox_rootfs}"
    assert shells[-2:] == ["chroot .", f"cat {canary}"]
    assert f"cat {canary}" in shells[:3] and not result.steps[2].ok  # tried by path first: not there
    assert sorted(os.listdir(busybox_rootfs)) == before  # the scratch directory is gone again
    assert "chroot /.stages-escape" in result.record.script()


def test_the_escape_gets_the_hosts_file_not_the_rootfs_one(busybox_rootfs):
    result = jail.escape(busybox_rootfs, "/etc/os-release")
    assert result.escaped
    assert result.content == Path("/etc/os-release").read_text()
    assert not result.visible_in_jail  # the jail has its own /etc/os-release, another file


def test_escape_of_a_missing_file_says_so(busybox_rootfs, tmp_path):
    result = jail.escape(busybox_rootfs, tmp_path / "nothing-here")
    assert not result.escaped and result.content is None
    assert "No such file" in result.error


def test_escape_needs_an_absolute_path(busybox_rootfs):
    with pytest.raises(StagesError, match="not an absolute path"):
        jail.escape(busybox_rootfs, "etc/hostname")


# == errors: one sentence and a fix ===================================================================
def test_missing_rootfs(tmp_path):
    with pytest.raises(RootfsError, match="not a root filesystem") as caught:
        jail.run(tmp_path / "nowhere", ["ls"])
    assert caught.value.hint


def test_command_not_in_the_rootfs(busybox_rootfs):
    with pytest.raises(CommandNotFoundError) as caught:
        jail.run(busybox_rootfs, ["python3", "-V"])
    assert str(caught.value).startswith(f"python3 is not in the rootfs {busybox_rootfs} (looked in ")
    assert "/bin" in caught.value.message and "/usr/bin" in caught.value.message
    assert caught.value.hint and caught.value.exit_code == 127


def test_symlinks_are_followed_inside_the_rootfs(scratch_rootfs):
    # /bin/bash exists on the host, not in the rootfs: a link to it must not count.
    assert Path("/bin/bash").exists()
    (scratch_rootfs / "bin" / "hostbash").symlink_to("/bin/bash")
    with pytest.raises(CommandNotFoundError, match="hostbash is not in the rootfs"):
        jail.run(scratch_rootfs, ["hostbash"])
    # ... while a relative and an absolute link inside the rootfs both work (busybox picks its applet by
    # argv[0], so the first link keeps the name echo)
    (scratch_rootfs / "bin" / "hello").symlink_to("../bin/echo")
    (scratch_rootfs / "usr" / "local" / "bin").mkdir(parents=True, exist_ok=True)
    (scratch_rootfs / "usr" / "local" / "bin" / "echo").symlink_to("/bin/hello")
    assert jail.find_command(scratch_rootfs, "echo") == "/usr/local/bin/echo"
    result = jail.run(scratch_rootfs, ["echo", "there"])
    assert result.stdout == "there\n" and result.record.steps[-1].shell == "exec echo there"


def test_a_file_that_is_not_executable(scratch_rootfs):
    (scratch_rootfs / "bin" / "notes").write_text("just text\n")
    with pytest.raises(StagesError, match="not executable") as caught:
        jail.run(scratch_rootfs, ["notes"])
    assert "chmod +x" in caught.value.hint


def test_a_dynamic_program_without_its_libraries(scratch_rootfs):
    shutil.copy("/bin/true", scratch_rootfs / "bin" / "hosttrue")  # dynamically linked on Debian
    assert rootfs.elf_interpreter("/bin/true")
    with pytest.raises(RootfsError, match="could not start") as caught:
        jail.run(scratch_rootfs, ["hosttrue"])
    assert "ldd" in caught.value.hint


def test_a_missing_working_directory(busybox_rootfs):
    with pytest.raises(StagesError, match="working directory /no/such does not exist"):
        jail.run(busybox_rootfs, ["pwd"], cwd="/no/such")


NOEXEC = """
import os, shutil, sys
from stages import cli, jail, kernel, rootfs
import stages.commands.jail
point, which = sys.argv[1], sys.argv[2]
# In a mount namespace of this child only, so the host's mount table never sees the tmpfs.
kernel.unshare(kernel.CLONE_NEWNS)
kernel.mount(None, "/", flags=kernel.MS_REC | kernel.MS_PRIVATE)
if which == "rootfs":  # the whole rootfs is on a noexec tmpfs
    kernel.mount("tmpfs", point, "tmpfs", kernel.MS_NOEXEC, "size=16m")
    box, command = rootfs.build(os.path.join(point, "box")), "true"
else:  # an ordinary rootfs, but the command is on a noexec mount below it
    box, command = point, "/opt/true"
    os.makedirs(point + "/opt", exist_ok=True)
    kernel.mount("tmpfs", point + "/opt", "tmpfs", kernel.MS_NOEXEC, "size=16m")
    shutil.copy("/bin/busybox", point + "/opt/true")
try:
    jail.run(box, [command])
except Exception as error:
    print(type(error).__name__, error.message)
    print("HINT", error.hint)
sys.stdout.flush()
sys.exit(cli.main(["jail", str(box), "--", command]))
"""


def test_a_rootfs_on_a_noexec_filesystem(tmp_path, python):
    point = tmp_path / "noexec"
    point.mkdir()
    done = subprocess.run([python, "-c", NOEXEC, str(point), "rootfs"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    error, hint = done.stdout.splitlines()[:2]
    assert error.startswith("RootfsError ") and "mounted noexec" in error, done.stderr
    assert "remount,exec" in hint
    assert done.returncode == 1 and "noexec" in done.stderr and "hint:" in done.stderr
    assert_no_traceback(done.stderr)
    assert os.listdir(point) == []  # the tmpfs was only ever mounted in the child


def test_a_command_on_a_noexec_mount_inside_the_rootfs(scratch_rootfs, python):
    # /bin/sh is fine, the command is not: the noexec check is made for the command too.
    done = subprocess.run([python, "-c", NOEXEC, str(scratch_rootfs), "command"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert done.stdout.startswith("RootfsError the rootfs"), (done.stdout, done.stderr)
    assert f"mounted noexec ({scratch_rootfs}/opt)" in done.stdout
    assert done.returncode == 1 and "remount,exec" in done.stderr
    assert_no_traceback(done.stderr)


NOT_ROOT = """
import locale, os, sys  # locale: argparse's gettext imports it late, where nobody may not read pyenv's /root
from stages import cli, jail, rootfs
import stages.commands.jail
os.seteuid(65534)  # nobody: the kernel takes root's capabilities away with the effective uid
try:
    os.chroot({root!r})
except PermissionError:
    print("kernel says EPERM")
if sys.argv[1] == "cli":
    sys.exit(cli.main(["jail", {root!r}, "--", "true"]))
try:
    jail.run({root!r}, ["true"])
except Exception as error:
    print(type(error).__name__, error)
"""


def test_not_root(busybox_rootfs, python):
    code = NOT_ROOT.format(root=str(busybox_rootfs))
    library = subprocess.run([python, "-c", code, "library"], capture_output=True, text=True, cwd=REPO)
    assert library.stdout.splitlines() == [
        "kernel says EPERM",
        "NotRootError chroot needs root: namespaces, mounts and chroot are privileged operations",
        "  hint: run it again with sudo, or as root inside the workshop VM",
    ], library.stderr
    command = subprocess.run([python, "-c", code, "cli"], capture_output=True, text=True, cwd=REPO)
    assert command.returncode == NotRootError.exit_code == 1
    assert "needs root" in command.stderr and "sudo" in command.stderr
    assert_no_traceback(command.stderr)


# == the command line =================================================================================
def test_cli_passes_output_and_exit_code_through(busybox_rootfs, python):
    done = cli(python, str(busybox_rootfs), "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_cli_reads_stdin_and_runs_sh_by_default(busybox_rootfs, python):
    done = cli(python, str(busybox_rootfs), input="echo typed; exit 4\n")
    assert (done.returncode, done.stdout) == (4, "typed\n")


def test_cli_signal_exit_code_like_a_shell(busybox_rootfs, python):
    assert cli(python, str(busybox_rootfs), "--", "sh", "-c", "kill -KILL $$").returncode == 128 + 9


def test_cli_explain_prints_the_steps_on_stderr(busybox_rootfs, python):
    done = cli(python, str(busybox_rootfs), "--explain", "--proc", "--", "hostname")
    assert done.returncode == 0 and done.stdout == socket.gethostname() + "\n"
    commands = [line.split(None, 3)[3] for line in done.stderr.splitlines()]
    assert commands == ["unshare --mount", "mount --make-rprivate /",
                        f"mount -t proc proc {busybox_rootfs}/proc", f"chroot {busybox_rootfs}", "cd /",
                        "exec hostname"]
    quiet = cli(python, str(busybox_rootfs), "--", "hostname")
    assert quiet.stderr == ""


def test_cli_options_before_the_rootfs_work_too(busybox_rootfs, python):
    done = cli(python, "--proc", str(busybox_rootfs), "--", "sh", "-c", "ls /proc | grep -c '^[0-9]'")
    assert done.returncode == 0 and int(done.stdout) > 5


@pytest.mark.parametrize("args, code, words, hint", [
    (["/no/such/rootfs", "--", "ls"], 1, "is not a root filesystem", True),
    (["ROOTFS", "--", "no-such-command"], 127, "no-such-command is not in the rootfs", True),
    (["ROOTFS", "--", "ls", "/no-such-file"], 1, "No such file", False),  # the command's own error
])
def test_cli_errors(busybox_rootfs, python, args, code, words, hint):
    args = [str(busybox_rootfs) if word == "ROOTFS" else word for word in args]
    done = cli(python, *args)
    assert done.returncode == code
    assert words in done.stderr
    assert ("hint:" in done.stderr) == hint
    assert_no_traceback(done.stderr)


def test_cli_default_rootfs(python, tmp_path):
    done = cli(python, "default", "--", "cat", "/etc/os-release", env={"STAGES_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "stages" in done.stdout.lower()


def test_cli_ctrl_c_stops_the_command_and_leaves_nothing(busybox_rootfs, python):
    # A terminal's Ctrl-C is SIGINT to the whole foreground process group: the CLI and the jailed command.
    process = subprocess.Popen([python, "-m", "stages.cli", "jail", str(busybox_rootfs), "--proc", "--",
                                "sleep", "30"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 10
    while not [c for c in psutil.Process(process.pid).children() if c.name() == "sleep"]:
        assert time.monotonic() < deadline, "the jailed sleep never started"
        time.sleep(0.02)
    time.sleep(0.1)  # let the CLI reach its wait
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 128 + signal.SIGINT  # the command died of it, and the CLI says so
    assert stderr == ""


def test_ctrl_c_at_a_jailed_shell_is_the_shells(busybox_rootfs, python):
    # sh survives SIGINT (as at a prompt), so the CLI must too: it waits and returns the shell's status.
    process = subprocess.Popen([python, "-m", "stages.cli", "jail", str(busybox_rootfs), "--", "sh", "-c",
                                "trap 'echo caught' INT; sleep 0.5; sleep 0.5; echo still here; exit 5"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 10
    while not [c for c in psutil.Process(process.pid).children(recursive=True) if c.name() == "sleep"]:
        assert time.monotonic() < deadline, "the jailed shell never started"
        time.sleep(0.02)
    time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 5, stderr
    assert "caught" in stdout and "still here" in stdout
    assert_no_traceback(stderr)

PIVOTED = """
import os, sys
from stages import jail, kernel
root, canary = sys.argv[1], sys.argv[2]
kernel.unshare(kernel.CLONE_NEWNS)
kernel.mount(None, "/", flags=kernel.MS_REC | kernel.MS_PRIVATE)
kernel.mount(root, root, flags=kernel.MS_BIND | kernel.MS_REC)   # pivot_root needs a mount point
os.chdir(root)
kernel.pivot_root(".", "tmp")
kernel.umount("/tmp", kernel.MNT_DETACH)                            # the old root is gone from here on
try:
    print("READ", jail.climb_out(canary))
except FileNotFoundError:
    print("NOT FOUND")
"""


def test_climb_out_finds_nothing_after_pivot_root(scratch_rootfs, tmp_path, python):
    # What stage 2 relies on: the same climb, after pivot_root in a mount namespace, stays inside.
    canary = tmp_path / "canary"
    canary.write_text("host\n")
    done = subprocess.run([python, "-c", PIVOTED, str(scratch_rootfs), str(canary)], capture_output=True,
                          text=True, cwd=REPO, timeout=30)
    assert done.stdout.strip() == "NOT FOUND", done.stderr
    assert not (scratch_rootfs / ".stages-escape").exists()
