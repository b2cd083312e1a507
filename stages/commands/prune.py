"""``stages prune``: remove stopped containers and whatever a crashed run left behind."""

from __future__ import annotations


def configure(parser) -> None:
    pass


def run(args) -> int:
    from stages.runtime import engine

    removed = engine.prune()
    for name in removed:
        print(name)
    print(f"removed {len(removed)} stopped container{'s' if len(removed) != 1 else ''}")
    return 0
