"""``stages ps``: the containers, and what is true about them now."""

from __future__ import annotations

import sys


def configure(parser) -> None:
    parser.add_argument("-a", "--all", action="store_true", help="stopped containers too")
    parser.add_argument("-q", "--quiet", action="store_true", help="only the IDs")


def run(args) -> int:
    from stages.runtime import containers

    rows = []
    damaged = []
    for info in containers.all_records():
        status = containers.status(info)
        if status == "stopped" and _abandoned(info) and _finish_removal(info):
            continue  # a --rm container whose monitor died: removed now, as it would have been
        if info.get("damaged"):
            damaged.append(info)
        elif status == "stopped" and not args.all:
            continue
        if args.quiet:
            print(info["id"][:12])
            continue
        network = info.get("network") or {}
        rows.append((info["id"][:12], info.get("image", ""), " ".join(info.get("args", []))[:30],
                     containers.exit_description(info),
                     "" if info.get("damaged") else network.get("address") or network.get("mode") or "",
                     ",".join(p.replace(":", "->") for p in network.get("ports") or []), info["name"]))
    for info in damaged:
        print(f"stages ps: container {info['id']}: its record {info['damaged']}; "
              f"`stages rm -f {info['id']}` removes it", file=sys.stderr)
    if args.quiet:
        return 0
    header = ("CONTAINER ID", "IMAGE", "COMMAND", "STATUS", "ADDRESS", "PORTS", "NAMES")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _abandoned(info: dict) -> bool:
    """A ``--rm`` container that has stopped and whose monitor is gone: nobody else will remove it."""
    from stages.runtime import containers

    return (not info.get("damaged") and bool((info.get("options") or {}).get("remove"))
            and not containers.process_alive(info.get("monitor_pid"), info.get("monitor_started")))


def _finish_removal(info: dict) -> bool:
    """Remove it (as root: its mount and cgroup need it); whether it is gone."""
    import os

    if os.geteuid() != 0:
        return False
    from stages.errors import StagesError
    from stages.runtime import engine

    try:
        engine.remove(info["id"], force=True)
    except (StagesError, OSError):
        return False
    return True
