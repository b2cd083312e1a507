"""``stages stop``: SIGTERM to the container, SIGKILL if it has not stopped in time."""

from __future__ import annotations

import sys


def configure(parser) -> None:
    parser.add_argument("-t", "--time", type=float, default=10.0, metavar="S",
                        help="seconds to wait after SIGTERM before SIGKILL (default 10)")
    parser.add_argument("containers", nargs="+", help="names or IDs")


def run(args) -> int:
    from stages.runtime import engine

    for name in args.containers:
        info = engine.stop(name, args.time)
        if info.get("exit_code") is None and info.get("started") and not info.get("damaged") \
                and not info.get("removed"):
            # its monitor could not write it (a full disk), or died before it could
            print(f"stages stop: {name} has stopped, but its exit code could not be recorded "
                  "(`stages inspect` says what is known)", file=sys.stderr)
        print(name)
    return 0
