"""``stages logs``: what a container wrote to its stdout and stderr (kept unless it ran with --rm)."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing until it stops")
    parser.add_argument("container", help="name or ID")


def run(args) -> int:
    from stages.runtime import engine

    engine.logs(args.container, follow=args.follow)
    return 0
