"""``stages start``: run a stopped container again, with its saved configuration and its files."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("-a", "--attach", action="store_true",
                        help="stay attached: its output here, its exit code ours (one container only)")
    parser.add_argument("-i", "--interactive", action="store_true", help="with -a: pass your input through")
    parser.add_argument("containers", nargs="+", help="names or IDs")


def run(args) -> int:
    import os

    from stages.errors import StagesError
    from stages.runtime import engine

    if args.attach:
        if len(args.containers) != 1:
            raise StagesError("stages start -a attaches to one container only",
                              f"start them one by one: stages start -a {args.containers[0]}")
        stdio = None if args.interactive else (os.open(os.devnull, os.O_RDONLY), None, None)
        _, code = engine.start(args.containers[0], attach=True, stdio=stdio)
        return code if code is not None else 0
    for name in args.containers:
        engine.start(name)
        print(name)
    return 0
