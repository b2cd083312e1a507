"""``stages ps``: the containers, and what is true about them now."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("-a", "--all", action="store_true", help="stopped containers too")
    parser.add_argument("-q", "--quiet", action="store_true", help="only the IDs")


def run(args) -> int:
    from stages.runtime import containers

    rows = []
    for info in containers.all_records():
        status = containers.status(info)
        if status == "stopped" and not args.all:
            continue
        if args.quiet:
            print(info["id"][:12])
            continue
        network = info.get("network") or {}
        rows.append((info["id"][:12], info.get("image", ""), " ".join(info.get("args", []))[:30],
                     containers.exit_description(info), network.get("address") or network.get("mode") or "",
                     ",".join(p.replace(":", "->") for p in network.get("ports") or []), info["name"]))
    if args.quiet:
        return 0
    header = ("CONTAINER ID", "IMAGE", "COMMAND", "STATUS", "ADDRESS", "PORTS", "NAMES")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0
