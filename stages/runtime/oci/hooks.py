"""OCI hooks: programs config.json asks the runtime to run at fixed points of a container's life.

config.md ("POSIX-platform Hooks") names six kinds, and runtime.md ("Lifecycle") says when each runs::

    create   ->  the namespaces exist and the mounts are made; the init pauses before pivot_root
                 prestart, createRuntime   run by the runtime, in the runtime's (the host's) namespaces
                 createContainer           run by the init, in the container's namespaces, before pivot_root
    start    ->  startContainer            run by the init, inside the container, just before the program
                 poststart                 run by the runtime once the program runs, before start returns
    delete   ->  poststop                  run by the runtime once the container is gone

Each hook is ``path`` (absolute), ``args`` (argv, ``args[0]`` included), ``env`` (its whole environment;
without one it inherits the runtime's, as under runc) and an optional ``timeout`` in seconds, after
which it is killed. It reads the container's state (the JSON ``state`` prints) on its standard input.
A failing prestart, createRuntime, createContainer or startContainer hook stops the container and
``create``/``start`` raise :class:`HookError`; a failing poststart or poststop hook is only a warning
(a failed step in the record, and a logged warning), as the spec says.

This module runs on both sides of the container: in the runtime (:func:`resume_init`, :func:`started`,
:func:`run_poststart`, :func:`run_poststop`), and in the init (:class:`InitHooks`), where nothing may be
imported after pivot_root — so everything it needs is imported at the top.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import signal
import socket
import time

from stages import steps
from stages.errors import StagesError
from stages.runtime.oci.spec import refuse

#: The hook kinds of config.md, in the order runtime.md runs them.
KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
#: Kinds whose failure stops the container (runtime.md, "Lifecycle" steps 3-5 and 7).
FATAL = ("prestart", "createRuntime", "createContainer", "startContainer")
#: Kinds the init runs in the container's namespaces; for these it pauses before pivot_root.
IN_CONTAINER = ("createContainer", "startContainer")
#: The FIFO through which the init tells ``start`` how its startContainer hooks went.
START_FIFO = "hooks.fifo"
_MESSAGE_SIZE = 1 << 20
_OUTPUT_SHOWN = 400  # characters of a failed hook's output an error message quotes
# Signals Python (SIGPIPE, SIGXFSZ) or the setup process (the keyboard's) ignore: a hook starts with
# them at their defaults and nothing blocked, as from a shell (ignored signals stay so across execve(2)).
_DEFAULT_SIGNALS = {signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGPIPE, signal.SIGXFSZ,
                    signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP, signal.SIGTERM}


class HookError(StagesError):
    """A hook of config.json failed, or did not finish in time."""


# -- reading config.json ---------------------------------------------------------------------------------
def parse(value) -> dict[str, list[dict]]:
    """config.json's ``hooks``, checked: ``{kind: [{"path", "args", "env", "timeout"}, ...]}``.

    Unknown kinds are refused by name (a hook we would silently skip is worse than a clear refusal);
    ``path`` must be absolute, ``args`` and ``env`` lists of strings, ``timeout`` a whole number above 0.
    ``args`` defaults to ``[path]``; ``env`` stays None when absent (the hook inherits our environment).
    """
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        raise refuse("hooks", f"must be an object of hook lists, not {json.dumps(value)}",
                     'for instance {"createRuntime": [{"path": "/usr/bin/true"}]}')
    result: dict[str, list[dict]] = {}
    for kind, items in value.items():
        if kind not in KINDS:
            raise refuse(f"hooks.{kind}", "is not a hook kind of the runtime spec",
                         f"use one of {', '.join(KINDS)}")
        if items is None:
            continue
        if not isinstance(items, list):
            raise refuse(f"hooks.{kind}", "must be a list of hooks", f"correct hooks.{kind} in config.json")
        hooks = []
        for index, item in enumerate(items):
            where = f"hooks.{kind}[{index}]"
            if not isinstance(item, dict):
                raise refuse(where, "must be an object with a path", f"correct {where} in config.json")
            path = item.get("path")
            if not isinstance(path, str) or not path.startswith("/"):
                raise refuse(f"{where}.path", f"{path!r} is not an absolute path",
                             "give the program's full path, like /usr/bin/logger")
            lists = {}
            for name in ("args", "env"):
                words = item.get(name)
                if words is not None and (not isinstance(words, list)
                                          or not all(isinstance(word, str) for word in words)):
                    raise refuse(f"{where}.{name}", "must be a list of strings",
                                 f"correct {where}.{name} in config.json")
                lists[name] = words
            timeout = item.get("timeout")
            if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                        or timeout <= 0):
                raise refuse(f"{where}.timeout", f"{json.dumps(timeout)} is not a number of seconds above 0",
                             "give a whole number such as 5, or leave the timeout out")
            hooks.append({"path": path, "args": lists["args"] or [path], "env": lists["env"],
                          "timeout": timeout})
        if hooks:
            result[kind] = hooks
    return result


def command(hook: dict) -> str:
    """The shell line a person would type to run ``hook`` by hand, state on its standard input."""
    words = [hook["path"], *hook["args"][1:]]
    if hook["env"] is not None:
        words = ["env", "-i", *hook["env"], *words]
    if hook["timeout"]:
        words = ["timeout", "-s", "KILL", str(hook["timeout"]), *words]
    return shlex.join(words) + " < state.json"


def state_for(data: dict, status: str, pid: int) -> dict:
    """The state a hook reads (runtime.md "State") from the runtime's state.json ``data``."""
    return {"ociVersion": data.get("ociVersion"), "id": data.get("id"), "status": status, "pid": pid,
            "bundle": data.get("bundle"), "annotations": data.get("annotations") or {}}


# -- running one hook ------------------------------------------------------------------------------------
def run_hook(kind: str, index: int, hook: dict, state: dict) -> None:
    """Run ``hook`` with ``state`` as JSON on its stdin; :class:`HookError` if it fails or times out.

    Its stdin, stdout and stderr are memory files (memfd_create(2)): no pipe can fill up and block it,
    and no file is needed in a container whose root is read-only. It gets a session of its own
    (setsid(2)), so that a timeout kills it together with everything it started.
    """
    name = f"the {kind} hook #{index} ({hook['path']})"
    stdin = os.memfd_create("state.json")
    output = os.memfd_create("hook-output")
    try:
        os.write(stdin, json.dumps(state).encode())
        os.lseek(stdin, 0, os.SEEK_SET)
        actions = [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, output, 1),
                   (os.POSIX_SPAWN_DUP2, output, 2)]
        environment = (dict(item.partition("=")[::2] for item in hook["env"]) if hook["env"] is not None
                       else os.environ)
        try:
            pid = os.posix_spawn(hook["path"], hook["args"], environment, file_actions=actions, setsid=True,
                                 setsigmask=set(), setsigdef=_DEFAULT_SIGNALS)
        except OSError as error:
            raise HookError(f"{name} cannot be run: {error.strerror}",
                            f"check hooks.{kind}[{index}].path in config.json"
                            + (" (it is looked up in the container's rootfs)" if kind == "startContainer" else
                               " (it is looked up on the host)")) from None
        status = _wait(pid, hook["timeout"])
        if status is None:
            raise HookError(f"{name} did not finish within {hook['timeout']} s and was killed",
                            f"make it faster, or raise hooks.{kind}[{index}].timeout")
        if status != 0:
            how = (f"was killed by {signal.Signals(-status).name}" if status < 0
                   else f"exited with status {status}")
            said = _tail(output)
            raise HookError(f"{name} {how}" + (f": {said}" if said else ""),
                            f"fix the hook, or remove it from hooks.{kind} in config.json")
    finally:
        os.close(stdin)
        os.close(output)


def _wait(pid: int, timeout: int | None) -> int | None:
    """``pid``'s exit code (negative: the signal), or None if it ran past ``timeout`` and was killed."""
    deadline = time.monotonic() + timeout if timeout else None
    delay = 0.0005
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if deadline is not None and time.monotonic() >= deadline:
                _kill_group(pid)
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
    except BaseException:  # Ctrl-C, or the runtime going down: the hook must not outlive us
        _kill_group(pid)
        raise


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # its session's process group: the hook and what it started
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _tail(fd: int) -> str:
    size = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, max(0, size - _OUTPUT_SHOWN), os.SEEK_SET)
    text = os.read(fd, _OUTPUT_SHOWN).decode(errors="replace").strip()
    return " / ".join(line for line in text.splitlines() if line.strip())


def run_hooks(kind: str, hooks: dict[str, list[dict]], state: dict, *, record: steps.StepRecord | None = None,
              where: str = "host") -> list[str]:
    """Run every hook of ``kind`` in order, each a step of ``record`` (else of the active record).

    A fatal kind raises :class:`HookError` at the first failure. For poststart and poststop the failure
    is a warning: the step is marked failed, the warning logged, the next hook runs; returns the warnings.
    """
    warnings = []
    for index, hook in enumerate(hooks.get(kind, [])):
        what = (f"{kind} hook #{index}, " + ("in the container's namespaces" if kind in IN_CONTAINER
                                              else "in the runtime's namespaces") + " (runtime.md)")
        recording = record.step(command(hook), what=what, where=where) if record is not None else \
            steps.record(command(hook), what=what, where=where)
        with recording as item:
            try:
                run_hook(kind, index, hook, state)
            except HookError as error:
                if kind in FATAL:
                    raise
                item.ok = False
                item.error = f"warning: {error.message}"
                warnings.append(error.message)
                if record is None and steps.current() is None:
                    # Nobody keeps a record to read the warning from (warnings_of): log it. Only poststart
                    # and poststop warn, and they run in the runtime, never after pivot_root: logging is
                    # imported here, not by every command that loads this module.
                    import logging

                    logging.getLogger(__name__).warning("%s (runtime.md: the lifecycle goes on)",
                                                        error.message)
    return warnings


# -- create: the runtime's side ------------------------------------------------------------------------
def pauses(hooks: dict[str, list[dict]]) -> bool:
    """Whether the init must pause before pivot_root: for the runtime's create hooks, or to learn the
    state its own hooks read."""
    return any(hooks.get(kind) for kind in FATAL)


def resume_init(channel: socket.socket, hooks: dict[str, list[dict]], data: dict, pid: int, directory: str,
                record: steps.StepRecord) -> None:
    """The init paused before pivot_root: run prestart and createRuntime here, then let it go on.

    The message that lets it go carries the state its own hooks read and, when it has startContainer
    hooks, the FIFO through which it will tell ``start`` how they went (SCM_RIGHTS, unix(7)): after
    pivot_root the init could not open a file of the state directory any more.
    """
    state = state_for(data, "creating", pid)
    for kind in ("prestart", "createRuntime"):
        run_hooks(kind, hooks, state, record=record)
    # create waits for the init's next message; its createContainer hooks may take their whole timeouts
    timeouts = [hook["timeout"] for hook in hooks.get("createContainer", [])]
    if timeouts and channel.gettimeout() is not None:
        channel.settimeout(channel.gettimeout() + sum(timeouts) if all(timeouts) else None)
    message = json.dumps({"hooks_go": state}).encode()
    if not hooks.get("startContainer"):
        channel.send(message)
        return
    path = os.path.join(directory, START_FIFO)
    with record.step(f"mkfifo {path}", what="the init reports its startContainer hooks through it"):
        os.mkfifo(path, 0o600)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        socket.send_fds(channel, [message], [fd])
    finally:
        os.close(fd)


def poststop_on_failure(hooks: dict[str, list[dict]], data: dict, record: steps.StepRecord):
    """An exit callback for ``create``'s ExitStack: after a failed hook the container is destroyed and
    the poststop hooks run (runtime.md, "Lifecycle": continue at step 12)."""
    def after(_kind, error, _traceback) -> bool:
        if isinstance(error, HookError) and hooks.get("poststop"):
            run_hooks("poststop", hooks, state_for(data, "stopped", data.get("pid") or 0), record=record)
        return False

    return after


# -- the init's side -------------------------------------------------------------------------------------
class InitHooks:
    """The init's part: pause before pivot_root, run createContainer hooks, later startContainer hooks.

    Call it just before pivot_root; call :meth:`start_container` after ``start`` released the init.
    """

    def __init__(self, sock: socket.socket, hooks: dict[str, list[dict]], record: steps.StepRecord):
        self.sock = sock
        self.hooks = hooks
        self.record = record
        self.state: dict = {}
        self.report: int | None = None

    @classmethod
    def for_plan(cls, sock: socket.socket, hooks: dict[str, list[dict]],
                 record: steps.StepRecord) -> InitHooks | None:
        return cls(sock, hooks, record) if pauses(hooks) else None

    def __call__(self) -> None:
        # The steps so far go first, so that the runtime's hooks land after them in its record.
        self.sock.send(json.dumps({"hooks": True, "steps": self.record.to_dicts()}).encode())
        self.record.steps.clear()
        data, fds, _flags, _address = socket.recv_fds(self.sock, _MESSAGE_SIZE, 1)
        if not data:  # the runtime died or gave up
            os._exit(1)
        self.state = json.loads(data)["hooks_go"]
        if fds:
            os.set_inheritable(fds[0], False)  # closes when the program execs: start sees end-of-file
            self.report = fds[0]
        run_hooks("createContainer", self.hooks, self.state, where="inside")

    def start_container(self) -> None:
        """startContainer hooks (path resolved inside the container); reports to ``start``; on failure
        the init ends here, and the program never runs."""
        if self.report is None:
            return
        record = steps.StepRecord()
        reply: dict = {}
        with record.active():
            try:
                run_hooks("startContainer", self.hooks, dict(self.state, status="created"), where="inside")
            except HookError as error:
                reply["error"] = {"message": error.message, "hint": error.hint}
        reply["steps"] = record.to_dicts()
        with contextlib.suppress(OSError):
            os.write(self.report, json.dumps(reply).encode() + b"\n")
        if "error" in reply:
            os._exit(1)


# -- start and delete: the runtime's side ----------------------------------------------------------------
def open_start_report(directory: str) -> int | None:
    """Open the startContainer report FIFO for reading, before ``start`` releases the init (else what the
    init writes could be lost with its last descriptor); None when the container has no such hooks."""
    path = os.path.join(directory, START_FIFO)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    os.unlink(path)
    return fd


def started(report: int | None, hooks: dict[str, list[dict]], pid: int,
            record: steps.StepRecord | None) -> None:
    """Wait for the init's startContainer report; :class:`HookError` (the container stopped) if a hook
    failed. The FIFO ends when the program execs (close-on-exec) or the init ends."""
    if report is None:
        return
    timeouts = [hook["timeout"] for hook in hooks.get("startContainer", [])]
    deadline = time.monotonic() + sum(timeouts) + 10 if all(timeouts) else None
    chunks = []
    try:
        poller = select.poll()
        poller.register(report, select.POLLIN)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not poller.poll(None if left is None else left * 1000):
                raise HookError("the container's startContainer hooks did not report in time",
                                "give each hook a timeout in config.json")
            chunk = os.read(report, _MESSAGE_SIZE)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(report)
    text = b"".join(chunks).decode(errors="replace").strip()
    reply = json.loads(text) if text else {}
    if record is not None:
        record.extend(reply.get("steps", []))
    if "error" in reply or not text:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # it ends by itself; never let the program run regardless
        if not text:
            raise HookError("the container's init ended before its startContainer hooks finished",
                            "delete the container and create it again")
        raise HookError(reply["error"]["message"], reply["error"].get("hint"))


def run_poststart(data: dict, record: steps.StepRecord | None) -> list[str]:
    """poststart hooks, once the program runs (failures are warnings); returns the warnings."""
    hooks = data.get("stages", {}).get("hooks") or {}
    return run_hooks("poststart", hooks, state_for(data, "running", data.get("pid") or 0), record=record)


def run_poststop(data: dict, record: steps.StepRecord | None) -> list[str]:
    """poststop hooks, once the container is deleted (failures are warnings); returns the warnings."""
    hooks = data.get("stages", {}).get("hooks") or {}
    return run_hooks("poststop", hooks, state_for(data, "stopped", data.get("pid") or 0), record=record)


def warnings_of(record: steps.StepRecord) -> list[str]:
    """The hook warnings in ``record``: what a command line prints after the operation."""
    return [item.error[len("warning: "):] for item in record.steps
            if not item.ok and item.error.startswith("warning: ")]
