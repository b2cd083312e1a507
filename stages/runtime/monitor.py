"""The monitor of a detached container, like podman's conmon.

``stages run -d`` returns as soon as the container runs, but someone must stay behind: the process that
created a container is the only one the kernel tells how it ended (wait(2) works for one's own children
only). So ``run -d`` starts this monitor in a session of its own (setsid(2): a Ctrl-C in the terminal
does not reach it); the monitor creates and starts the container with its output going to the
container's log file, waits, records the exit code, releases what the container held, and with ``--rm``
removes it. With ``-t`` the container's terminal is the monitor's to hold: it copies what the terminal
shows into the log (:class:`stages.runtime.attach.Terminal`). Its PID is in the container's record: if
it dies, ``stages ps`` says so (stopped, exit code unknown) and ``stages prune`` cleans up.

``run -d`` forks the monitor from itself (fork(2): no second Python to start, nothing imported twice);
a caller with threads, which must not fork, starts ``python -m stages.runtime.monitor ID [READY_FD]``
instead (and ``python -m stages.runtime.monitor --watch PID STARTED ID`` is the watcher of a foreground
run, :func:`stages.runtime.engine.watch`, for such a caller). Either way the monitor writes one byte
into the *ready* pipe once the container runs, so that ``run -d`` returns at that moment rather than at
its next look at the record.
"""

from __future__ import annotations

import os
import signal
import sys

from stages.errors import StagesError
from stages.runtime import containers, engine
from stages.steps import StepRecord


def main(argv: list[str], ready: int | None = None) -> int:
    """Create, start and wait for the container ``argv[0]``; ``ready`` (or ``argv[1]``) is the write end
    of the ready pipe, if any."""
    if argv[:1] == ["--watch"]:  # a foreground run's watcher, for a caller with threads (engine.watch)
        client, started, container_id = argv[1:4]
        engine.watch(int(client), None if started == "None" else int(started), container_id)
        return 0
    container_id = argv[0]
    if ready is None and len(argv) > 1:
        ready = int(argv[1])
        os.set_inheritable(ready, False)  # passed on to us, it must go no further: not into the container
    # A stray SIGINT or SIGHUP (a terminal closing) must not end the monitor before the container ends.
    for number in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(number, signal.SIG_IGN)
    with open(os.devnull) as nothing:
        stdio = (nothing.fileno(), 1, 2)  # run -d pointed our stdout and stderr at the log file
        record = StepRecord(f"stages run -d {container_id}")
        try:
            engine.execute(container_id, stdio=stdio, record=record,
                           on_running=lambda _info: _tell(ready))
        except StagesError as error:
            _report(container_id, {"type": type(error).__name__, "message": error.message,
                                   "hint": error.hint})
            return 1
        except OSError as error:
            from stages.runtime.store import is_full, no_space

            if is_full(error):  # the one sentence for a full STAGES_HOME, as `stages run` says it
                full = no_space(error)
                _report(container_id, {"type": "NoSpaceError", "message": full.message, "hint": full.hint})
                return 1
            _report(container_id, {"type": "StagesError", "message": str(error),
                                   "hint": "run it in the foreground with --explain to see the step"})
            return 1
        finally:
            _tell(ready)  # (a failure too: `run -d` reads the record's error at once)
    info = containers.read(container_id)
    if info.get("options", {}).get("remove"):
        engine.remove(container_id, force=True)
    return 0


def _tell(ready: int | None) -> None:
    """One byte into the ready pipe (the first call only). The setup process, forked from us, holds the
    pipe open as long as the container runs: its end of file would come too late to mean anything."""
    if ready is None or ready in _told:
        return
    _told.add(ready)
    try:
        os.write(ready, b"1")
        os.close(ready)
    except OSError:
        pass  # `run -d` gave up waiting, or went away: nobody to tell


_told: set[int] = set()


def _report(container_id: str, error: dict) -> None:
    try:
        containers.update(container_id, error=error, status="stopped")
    except StagesError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
