"""The holder: the child process that holds an isolate's namespaces and does the steps that happen inside.

A notebook kernel, a script or the command line must never unshare itself (a Jupyter kernel has threads,
and the host would lose its hostname, its mounts ...). So :class:`stages.isolate.Isolate` starts this
module as a fresh, single-threaded Python (``python -m stages.isolate FD PARENT ROOTFS``) and drives
it one request at a time over a socketpair: JSON, one object per line. Each request is one step (unshare,
sethostname, mount, pivot_root ...) or one command to run inside; each reply carries the result and the
steps it recorded, which the parent merges into its own record.

Two kinds of namespace apply only to the *children* of the process that unshares them: PID and time
(unshare(2): "the calling process is not moved into the new namespace"). After such an unshare the parent
asks the holder to ``enter``: the holder forks, the child becomes PID 1 of the new PID namespace (and lives
in the new time namespace) and carries on serving; the forking process stays behind as a *waiter* that
only reaps and passes the exit status on. Parent death signals chain the two: if the parent dies, the
waiter is killed, and with it PID 1 and everything in its PID namespace (pid_namespaces(7)).

Everything the holder needs is imported at start: after pivot_root(2) the host's Python library is no
longer reachable, so nothing can be imported later.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback

from stages import errors, kernel, steps
from stages.errors import StagesError
from stages.isolate import filesystem
from stages.rootfs import Root

# The device nodes and links of a minimal /dev live with the other filesystem steps, shared with stage 3.
DEVICES = filesystem.DEVICES
DEVICE_LINKS = filesystem.DEVICE_LINKS

# What a command inside sees unless the caller says otherwise.
DEFAULT_ENV = {"PATH": "/bin:/sbin:/usr/bin:/usr/sbin", "HOME": "/root", "TERM": "xterm", "LANG": "C"}


# Modules a step may call inside (see ``call``); imported now, while the host's library is reachable.
PRELOAD = ("stages.jail",)

_READ_SIZE = 65536
HOLDER_OOM_SCORE_ADJ = -1000
COMMAND_OOM_SCORE_ADJ = 500
PR_SET_DUMPABLE = 4


class Channel:
    """JSON lines over a socket: ``send(obj)`` and ``receive() -> obj`` (None at end of file)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def send(self, message: dict) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def receive(self, timeout: float | None = None) -> dict | None:
        self.sock.settimeout(timeout)
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(_READ_SIZE)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)


def error_reply(error: BaseException) -> dict:
    """An exception as plain data (:func:`stages.errors.error_reply`), with the traceback of one that is
    neither ours nor the kernel's: a bug, which the parent shows whole."""
    reply = errors.error_reply(error)
    if "stages" not in reply and "errno" not in reply:
        reply["traceback"] = traceback.format_exc()
    return reply


class Holder:
    """The serving side. Its methods named ``op_*`` are the requests the parent can make."""

    def __init__(self, channel: Channel, rootfs: str):
        self.channel = channel
        self.rootfs = rootfs
        self.pivoted = False
        self.in_user_namespace = False
        self.exited: dict[int, int] = {}  # statuses of children reaped while waiting for another one

    # -- the loop -----------------------------------------------------------------------------------
    def serve(self) -> int:
        while True:
            request = self.channel.receive()
            if request is None:  # the parent went away: end, taking everything inside with us
                self.kill_children()
                return 0
            op = request.pop("op")
            record = steps.StepRecord()
            try:
                with record.active():
                    result = getattr(self, f"op_{op}")(**request)
            except BaseException as error:  # noqa: B036 - everything goes back to the parent
                self.channel.send({"ok": False, "error": error_reply(error), "steps": record.to_dicts()})
                continue
            if isinstance(result, _Forked):
                if result.child:  # the new PID 1: the waiter answers this request
                    continue
                self.channel.send({"ok": True, "result": {"pid": result.pid}, "steps": record.to_dicts()})
                self.channel.sock.close()
                return self.wait_for(result.pid)
            self.channel.send({"ok": True, "result": result, "steps": record.to_dicts()})
            if op == "stop":
                return 0

    def base(self, path: str) -> str:
        """``path`` as seen by this process: below the rootfs until pivot_root, at / after."""
        return path if self.pivoted else os.path.join(self.rootfs, path.lstrip("/"))

    # -- namespaces ---------------------------------------------------------------------------------
    def op_unshare(self, names: list[str]) -> dict:
        kernel.unshare(kernel.namespace_flags(names), what=f"new {', '.join(names)} namespace(s)")
        if "user" in names:
            self.in_user_namespace = True
        if "mount" in names:
            # A new mount namespace starts as a copy whose mounts still propagate to and from the host's
            # (shared subtrees, mount_namespaces(7)); unshare(1) makes everything private by default,
            # and so do we, before anything is mounted: nothing we mount may appear on the host.
            kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE,
                         what="stop mount events propagating between the host and the isolate")
        return {"pid": os.getpid()}

    def op_become(self, uid: int, gid: int) -> dict:
        # After uid_map is written our kernel IDs (the host's root) are still unmapped inside, so we show
        # as nobody and may create no file; switch to the mapped IDs, which we may do because we hold
        # CAP_SETUID and CAP_SETGID in the new user namespace (user_namespaces(7)).
        with steps.record(f"setpriv --regid {gid} --reuid {uid}", where="inside",
                          what="become the mapped root: the IDs we had are not in the map"):
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        # Changing IDs made us non-dumpable, which hands our /proc/self files to the host's root, whom
        # this namespace cannot see (proc(5), /proc/sys/fs/suid_dumpable): take them back.
        kernel.prctl(PR_SET_DUMPABLE, 1)
        return {"uid": os.getuid(), "gid": os.getgid()}

    def op_time_offsets(self, monotonic: float, boottime: float) -> str:
        # time_namespaces(7): the offsets of the namespace our children will enter, writable only until
        # the first process enters it.
        lines = [f"monotonic {int(monotonic)} {int((monotonic % 1) * 1e9)}",
                 f"boottime {int(boottime)} {int((boottime % 1) * 1e9)}"]
        for line in lines:
            with steps.record(f"echo '{line}' > /proc/self/timens_offsets", where="inside",
                              what="shift the clocks of the new time namespace"):
                with open("/proc/self/timens_offsets", "w") as handle:
                    handle.write(line + "\n")
        with open("/proc/self/timens_offsets") as handle:
            return handle.read()

    def op_enter(self) -> _Forked:
        waiter = os.getpid()
        with steps.record("# fork: the child is the first process of the new PID/time namespace",
                          where="inside", what="unshare(2) moved only our children; so fork one"):
            pid = os.fork()
        if pid == 0:
            kernel.set_parent_death_signal(signal.SIGKILL)
            # The waiter died between fork and prctl? (In a new PID namespace the parent, being outside
            # it, shows as pid 0.)
            if os.getppid() not in (waiter, 0):
                os._exit(1)
            return _Forked(child=True, pid=0)
        return _Forked(child=False, pid=pid)

    def wait_for(self, pid: int) -> int:
        """The waiter's life: reap children (as PID 1's parent, or as init of the namespace) until ``pid``
        ends, then end with its status."""
        while True:
            try:
                done, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return 0
            except InterruptedError:
                continue
            if done == pid:
                return os.waitstatus_to_exitcode(status) & 0xFF

    # -- hostname, mounts, root ---------------------------------------------------------------------
    def op_set_hostname(self, name: str) -> str:
        kernel.sethostname(name, what="a hostname of the isolate's own")
        return socket.gethostname()

    def op_make_private(self) -> list[str]:
        return filesystem.make_private()

    def inside(self) -> contextlib.AbstractContextManager[Root | None]:
        """The rootfs, opened for one request, in which every target is looked up before pivot_root: a
        rootfs is hostile input, and its /dev may be a link to the host's /tmp (:class:`Root`). Opened
        here, in the isolate's mount namespace, since a mount point must belong to it. None after
        pivot_root: the rootfs is / then, and nothing can lead out of it."""
        if self.pivoted:
            return contextlib.nullcontext()
        return Root(self.rootfs, owner="the rootfs's")

    def op_mount_proc(self, replace: bool = False) -> str:
        with self.inside() as root:
            return filesystem.mount_proc("/proc", replace, root=root)

    def op_mount_sys(self) -> str:
        with self.inside() as root:
            return filesystem.mount_sys("/sys", self.pivoted, root=root)

    def op_mount_tmp(self) -> str:
        with self.inside() as root:
            return filesystem.mount_tmp("/tmp", root=root)

    def op_mount_dev(self) -> list[str]:
        with self.inside() as root:
            return filesystem.mount_dev("/dev", self.in_user_namespace, root=root)

    def op_protect_proc(self) -> list[str]:
        return filesystem.protect_proc(self.base("/"))

    def op_pivot_root(self) -> list[str]:
        names = filesystem.pivot_root(self.rootfs)
        self.pivoted = True
        return names

    # -- privileges ---------------------------------------------------------------------------------
    def op_drop_capabilities(self, keep: list[str]) -> dict:
        keep_words = {name.lower().removeprefix("cap_") for name in keep}
        known = kernel.CAPABILITIES[: kernel.last_capability() + 1]
        drop = [name for name in known if name not in keep_words and kernel.in_bounding_set(name)]
        kernel.drop_bounding(drop, what="no program started inside can ever gain these")
        return {"dropped": drop, "bounding": [name for name in known if kernel.in_bounding_set(name)]}

    def op_set_no_new_privs(self) -> bool:
        kernel.set_no_new_privs(what="setuid programs and file capabilities grant nothing any more")
        return kernel.no_new_privs()

    def op_seccomp(self, deny: list[str], namespace_flags: tuple = (), enosys: tuple = ()) -> list[str]:
        from stages.isolate import privileges

        return privileges.install_seccomp(deny, namespace_flags=namespace_flags, enosys=enosys)

    # -- commands -----------------------------------------------------------------------------------
    def op_run(self, argv: list[str], env: dict | None = None, cwd: str = "/", capture: bool = True,
               input: str | None = None, timeout: float | None = None) -> dict:
        environment = dict(DEFAULT_ENV if env is None else env)
        read_error, write_error = os.pipe2(os.O_CLOEXEC)
        pipes = {}
        if capture:
            pipes = {"stdout": os.pipe(), "stderr": os.pipe(), "stdin": os.pipe()}
        root = None if self.pivoted else self.rootfs
        pid = os.fork()
        if pid == 0:  # the command: never returns
            _exec_child(argv, environment, cwd, root, pipes, write_error)
        os.close(write_error)
        for name, (read_end, write_end) in pipes.items():
            os.close(read_end if name == "stdin" else write_end)
        failure = _read_all(read_error)
        os.close(read_error)
        if failure:
            self.wait(pid, None)
            for name, (read_end, write_end) in pipes.items():
                os.close(write_end if name == "stdin" else read_end)
            number, _, where = failure.decode().partition(":")
            raise OSError(int(number), f"{where}: {os.strerror(int(number))}")
        output = {"stdout": b"", "stderr": b""}
        if capture:
            stdin = pipes["stdin"][1]
            if input is not None:
                try:
                    os.write(stdin, input.encode())
                except BrokenPipeError:
                    pass
            os.close(stdin)
            returncode, timed_out = self.collect(pid, pipes["stdout"][0], pipes["stderr"][0], output, timeout)
        else:
            returncode, timed_out = self.wait(pid, timeout)
        return {"returncode": returncode, "stdout": output["stdout"].decode(errors="replace"),
                "stderr": output["stderr"].decode(errors="replace"), "timed_out": timed_out}

    def collect(self, pid: int, stdout: int, stderr: int, output: dict, timeout: float | None):
        deadline = None if timeout is None else time.monotonic() + timeout
        selector = selectors.DefaultSelector()
        selector.register(stdout, selectors.EVENT_READ, "stdout")
        selector.register(stderr, selectors.EVENT_READ, "stderr")
        pidfd = os.pidfd_open(pid)
        selector.register(pidfd, selectors.EVENT_READ, "exit")
        timed_out = False
        exited = False
        try:
            while selector.get_map():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if exited:  # the command ended: take what its pipes still hold, but do not wait for
                    left = 0.0  # a background process that inherited them
                events = selector.select(left)
                if not events:
                    if exited:
                        break
                    timed_out = True
                    os.kill(pid, signal.SIGKILL)
                    deadline = None
                    continue
                for key, _ in events:
                    if key.data == "exit":
                        selector.unregister(pidfd)
                        exited = True
                        continue
                    chunk = os.read(key.fd, _READ_SIZE)
                    if chunk:
                        output[key.data] += chunk
                    else:
                        selector.unregister(key.fd)
        finally:
            selector.close()
            os.close(pidfd)
            os.close(stdout)
            os.close(stderr)
        return self.wait(pid, None)[0], timed_out

    def wait(self, pid: int, timeout: float | None) -> tuple[int | None, bool]:
        """Wait for ``pid`` while reaping every other child that ends (orphans are reparented to us,
        the subreaper or PID 1). The return code is negative for a signal, as in subprocess."""
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        while pid not in self.exited:
            try:
                flags = 0 if deadline is None else os.WNOHANG
                done, status = os.waitpid(-1, flags)
            except ChildProcessError:
                return None, timed_out
            if done:
                self.exited[done] = os.waitstatus_to_exitcode(status)
            elif deadline is not None:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    deadline, timed_out = None, True
                else:
                    time.sleep(0.01)
        return self.exited.pop(pid), timed_out

    def reap(self) -> None:
        while True:
            try:
                done, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not done:
                return
            self.exited[done] = os.waitstatus_to_exitcode(status)

    def op_call(self, module: str, function: str, args: list) -> dict:
        """Call ``module.function(*args)`` in a forked child inside the isolate (for example the stage-1
        escape, stages.jail.climb_out); its return value or exception comes back as data."""
        try:
            target = getattr(importlib.import_module(module), function)
        except ImportError:
            raise StagesError(
                f"the module {module} cannot be loaded inside the isolate: after pivot_root the host's "
                "Python files are out of reach",
                f"call it before pivot_root(), or add {module!r} to stages.isolate.holder.PRELOAD",
            ) from None
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            record = steps.StepRecord()
            try:
                with record.active():
                    value = target(*args)
                if isinstance(value, bytes):
                    value = value.decode(errors="replace")
                reply = {"ok": True, "value": value}
            except BaseException as error:  # noqa: B036 - reported, not raised
                reply = {"ok": False, "error": error_reply(error)}
            reply["steps"] = record.to_dicts()
            os.write(write_end, json.dumps(reply, default=str).encode())
            os._exit(0)
        os.close(write_end)
        data = _read_all(read_end)
        os.close(read_end)
        self.wait(pid, None)
        reply = json.loads(data or b'{"ok": false, "error": {"type": "ChildDied", "message": "no reply"}}')
        steps.current().extend(reply.pop("steps", []))
        return reply

    # -- looking ------------------------------------------------------------------------------------
    def op_status(self) -> dict:
        self.reap()
        return {"pid": os.getpid(), "hostname": socket.gethostname(), "root": self.pivoted,
                "uid": os.getuid(), "cwd": os.getcwd()}

    def op_stop(self) -> bool:
        self.kill_children()
        return True

    def kill_children(self) -> None:
        """Kill every process started inside: our children, and the orphans the kernel reparented to us."""
        for _ in range(50):
            children = _children_of(os.getpid())
            if not children:
                break
            for child in children:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)
            self.reap()
        self.reap()


class _Forked:
    def __init__(self, child: bool, pid: int):
        self.child, self.pid = child, pid


def _children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(word) for word in handle.read().split()]
    except OSError:
        return []


def _read_all(fd: int) -> bytes:
    data = b""
    while True:
        chunk = os.read(fd, _READ_SIZE)
        if not chunk:
            return data
        data += chunk


def _exec_child(argv, env, cwd, root, pipes, report) -> None:
    """In the forked child: connect the pipes, enter the root, exec. Reports a failure as 'errno:where'."""
    where = "exec"
    try:
        for number in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTOU, signal.SIGTTIN,
                       signal.SIGPIPE):
            signal.signal(number, signal.SIG_DFL)  # ignored signals would stay ignored across execve
        _set_oom_score_adj(COMMAND_OOM_SCORE_ADJ)
        if pipes:
            os.dup2(pipes["stdin"][0], 0)
            os.dup2(pipes["stdout"][1], 1)
            os.dup2(pipes["stderr"][1], 2)
            for read_end, write_end in pipes.values():
                os.close(read_end)
                os.close(write_end)
        if root is not None:
            # Before pivot_root the holder still lives in the host's root; commands already run in
            # the rootfs, as a jail would (stage 1), so what they see is the isolate's files.
            where = f"chroot {root}"
            os.chroot(root)
        where = f"cd {cwd}"
        os.chdir(cwd)
        where = argv[0]
        os.execvpe(argv[0], argv, env)
    except OSError as error:
        os.write(report, f"{error.errno or errno.EIO}:{where}".encode())
    except BaseException:  # noqa: B036 - the child must never return into the holder's loop
        os.write(report, f"{errno.EIO}:{where}".encode())
    os._exit(127)


def _set_oom_score_adj(value: int) -> bool:
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write(str(value))
        return True
    except OSError:  # lowering it needs CAP_SYS_RESOURCE (proc(5))
        return False


def main(argv: list[str]) -> int:
    fd, parent, rootfs = int(argv[0]), int(argv[1]), argv[2]
    # Die with the parent (prctl(2)); and if it already died before this line, go now.
    kernel.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        return 1
    # Ctrl-C in a terminal reaches the whole foreground process group; the parent tears us down then.
    for number in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP):
        signal.signal(number, signal.SIG_IGN)
    # Orphaned grandchildren of commands are reparented to us (not to the host's init), so that stop()
    # can find and end them (PR_SET_CHILD_SUBREAPER, prctl(2)).
    kernel.prctl(kernel.PR_SET_CHILD_SUBREAPER, 1)
    # When a memory limit is hit, the kernel's OOM killer must pick the command that ate the memory, never
    # the holder (the whole isolate would go): the holder asks to be spared, and every command is made a
    # preferred victim (proc(5), /proc/PID/oom_score_adj), which works even where lowering is refused.
    _set_oom_score_adj(HOLDER_OOM_SCORE_ADJ)
    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    from stages.isolate import privileges

    if privileges.seccomp_available():  # load libseccomp now: after pivot_root it is out of reach
        privileges._library()

    ctypes.get_errno()
    channel = Channel(socket.socket(fileno=fd))
    return Holder(channel, rootfs).serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
