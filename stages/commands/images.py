"""``stages images``: the images in the store (the built-in ones appear once they have been used)."""

from __future__ import annotations

import sys


def configure(parser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="only the IDs")
    parser.add_argument("--builtin", action="store_true",
                        help="make the built-in images (busybox, host-minimal) first if they are missing")
    parser.add_argument("--repair", action="store_true",
                        help="rebuild a damaged name index (repositories.json) from the image records")


def run(args) -> int:
    from stages.rootfs import human_size
    from stages.runtime import images

    if args.repair:
        for line in images.repair():
            print(line)
        return 0
    if args.builtin:
        for name in images.BUILTIN:
            images.ensure_builtin(name)
    rows = []
    problems: list[str] = []
    for image in images.list_images(problems):
        short = image["id"].split(":", 1)[1][:12]
        if args.quiet:
            print(short)
            continue
        damaged = bool(image.get("damaged"))
        for name in image["names"] or ["<none>:<none>"]:
            rows.append((name, short, "damaged" if damaged else image.get("created", ""),
                         "?" if damaged else human_size(image.get("size", 0)),
                         "?" if damaged else str(len(image["layers"]))))
    for problem in problems:
        print(f"stages images: {problem}", file=sys.stderr)
    if args.quiet:
        return 0
    header = ("NAME:TAG", "ID", "CREATED", "SIZE", "LAYERS")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0
