"""The monitor of a detached container (``python -m stages.runtime.monitor ID``), like podman's conmon.

``stages run -d`` returns as soon as the container runs, but someone must stay behind: the process that
created a container is the only one the kernel tells how it ended (wait(2) works for one's own children
only). So ``run -d`` starts this monitor in a session of its own (setsid(2): a Ctrl-C in the terminal
does not reach it); the monitor creates and starts the container with its output going to the
container's log file, waits, records the exit code, releases what the container held, and with ``--rm``
removes it. Its PID is in the container's record: if it dies, ``stages ps`` says so (stopped, exit code
unknown) and ``stages prune`` cleans up.
"""

from __future__ import annotations

import os
import signal
import sys

from stages.errors import StagesError
from stages.runtime import containers, engine
from stages.steps import StepRecord


def main(argv: list[str]) -> int:
    container_id = argv[0]
    # A stray SIGINT or SIGHUP (a terminal closing) must not end the monitor before the container ends.
    for number in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(number, signal.SIG_IGN)
    with open(os.devnull) as nothing:
        stdio = (nothing.fileno(), 1, 2)  # run -d pointed our stdout and stderr at the log file
        record = StepRecord(f"stages run -d {container_id}")
        try:
            engine.execute(container_id, stdio=stdio, record=record)
        except StagesError as error:
            _report(container_id, {"type": type(error).__name__, "message": error.message,
                                   "hint": error.hint})
            return 1
        except OSError as error:
            _report(container_id, {"type": "StagesError", "message": str(error),
                                   "hint": "run it in the foreground with --explain to see the step"})
            return 1
    info = containers.read(container_id)
    if info.get("options", {}).get("remove"):
        engine.remove(container_id, force=True)
    return 0


def _report(container_id: str, error: dict) -> None:
    try:
        containers.update(container_id, error=error, status="stopped")
    except StagesError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
