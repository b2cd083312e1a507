"""``stages rm``: remove a stopped container: its overlay mount and upper directory, cgroup, veth, state."""

from __future__ import annotations

import sys


def configure(parser) -> None:
    parser.add_argument("-f", "--force", action="store_true", help="kill it first if it runs")
    parser.add_argument("containers", nargs="+", help="names or IDs")


def run(args) -> int:
    """Each container in turn: one that cannot be removed is said and skipped, the others are removed,
    and the exit code says whether all were (as ``docker rm``)."""
    from stages.errors import StagesError
    from stages.runtime import engine

    failed = 0
    for name in args.containers:
        try:
            engine.remove(name, force=args.force)
        except StagesError as error:
            print(f"stages rm: {error}", file=sys.stderr)
            failed += 1
            continue
        print(name)
    return 1 if failed else 0
