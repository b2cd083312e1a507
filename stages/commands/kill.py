"""``stages kill``: send a signal to the container (its PID 1, which passes it on to the command)."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("-s", "--signal", default="KILL", help="a name or number (default KILL)")
    parser.add_argument("containers", nargs="+", help="names or IDs")


def run(args) -> int:
    from stages.runtime import engine

    for name in args.containers:
        engine.kill(name, args.signal)
        print(name)
    return 0
