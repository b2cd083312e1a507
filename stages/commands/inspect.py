"""``stages inspect``: everything the engine knows about a container, as JSON."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("containers", nargs="+", help="names or IDs")


def run(args) -> int:
    import json

    from stages.runtime import engine

    print(json.dumps([engine.inspect(name) for name in args.containers], indent=2, sort_keys=True))
    return 0
