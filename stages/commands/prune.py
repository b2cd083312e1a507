"""``stages prune``: remove stopped containers and whatever a crashed run left behind."""

from __future__ import annotations


def configure(parser) -> None:
    pass


def run(args) -> int:
    from stages.runtime import engine

    notes: list[str] = []
    removed = engine.prune(notes=notes)
    for name in removed:
        print(name)
    for note in notes:
        print(note)
    print(f"removed {len(removed)} stopped container{'s' if len(removed) != 1 else ''}")
    return 0
