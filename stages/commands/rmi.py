"""``stages rmi NAME|ID``: remove an image, and the blobs and layers no other image uses."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("images", nargs="+", metavar="NAME|ID", help="name[:tag] or (a prefix of) the id")
    parser.add_argument("-f", "--force", action="store_true",
                        help="remove the image by a name even if it has other names too")


def run(args) -> int:
    from stages.runtime import images

    for reference in args.images:
        for line in images.remove(reference, force=args.force):
            print(line)
    return 0
