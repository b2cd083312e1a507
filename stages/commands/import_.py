"""``stages import FILE [NAME[:TAG]]``: a rootfs tarball, a docker save archive or an OCI layout."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("file", metavar="FILE",
                        help="a rootfs tarball, a `docker save` archive, or an OCI image layout (dir or tar)")
    parser.add_argument("name", metavar="NAME[:TAG]", nargs="?",
                        help="the name to give it (default: the names the archive carries)")


def run(args) -> int:
    from stages.rootfs import human_size
    from stages.runtime import images

    image = images.import_archive(args.file, args.name)
    names = ", ".join(image["names"]) or "no name (tag it by importing again with NAME)"
    print(f"imported {image['id']}: {len(image['layers'])} layer(s), {human_size(image['size'])}, {names}")
    return 0
