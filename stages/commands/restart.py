"""``stages restart``: stop a container (SIGTERM, then SIGKILL) and start it again, in the background."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("-t", "--time", type=float, default=10.0, metavar="S",
                        help="seconds to wait after SIGTERM before SIGKILL (default 10)")
    parser.add_argument("containers", nargs="+", help="names or IDs")


def run(args) -> int:
    from stages.runtime import engine

    for name in args.containers:
        engine.restart(name, args.time)
        print(name)
    return 0
