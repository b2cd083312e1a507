"""``stages rm``: remove a stopped container: its overlay mount and upper directory, cgroup, veth, state."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("-f", "--force", action="store_true", help="kill it first if it runs")
    parser.add_argument("containers", nargs="+", help="names or IDs")


def run(args) -> int:
    from stages.runtime import engine

    for name in args.containers:
        engine.remove(name, force=args.force)
        print(name)
    return 0
