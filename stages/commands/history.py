"""``stages history NAME``: each layer of an image, newest first, with what made it and its size."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("image", metavar="NAME|ID")
    parser.add_argument("--no-trunc", action="store_true", help="show whole commands")


def run(args) -> int:
    from stages.rootfs import human_size
    from stages.runtime import images

    rows = []
    for entry in images.history(args.image):
        layer = entry["layer"].split(":", 1)[1][:12] if entry["layer"] else "<none>"
        made_by = entry["created_by"] if args.no_trunc or len(entry["created_by"]) <= 60 else \
            entry["created_by"][:57] + "..."
        rows.append((layer, entry["created"], made_by, human_size(entry["size"])))
    header = ("LAYER", "CREATED", "CREATED BY", "SIZE")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0
