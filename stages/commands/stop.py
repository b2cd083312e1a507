"""``stages stop``: SIGTERM to the container, SIGKILL if it has not stopped in time."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("-t", "--time", type=float, default=10.0, metavar="S",
                        help="seconds to wait after SIGTERM before SIGKILL (default 10)")
    parser.add_argument("containers", nargs="+", help="names or IDs")


def run(args) -> int:
    from stages.runtime import engine

    for name in args.containers:
        engine.stop(name, args.time)
        print(name)
    return 0
