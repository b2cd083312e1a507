"""``stages tour``: walk from a chroot jail to a container, showing what each step observed.

::

    stages tour [--stage N ...] [--explain] [--rootfs DIR] [--list]

Runs as root on the real kernel; everything it makes (a canary file, the isolate, its namespaces,
cgroups and network) is removed before it ends. Exits 1 if a section failed.
"""

from __future__ import annotations

import argparse

from stages import tour


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", type=int, action="append", metavar="N", dest="stages",
                        help="run only stage N (1 the chroot jail, 2 the isolate, 3 the runtime)"
                             "; repeat for more")
    parser.add_argument("--explain", action="store_true",
                        help="also print each section's steps as the shell commands a person would type")
    parser.add_argument("--rootfs", metavar="DIR",
                        help="tour this rootfs instead of the embedded busybox one")
    parser.add_argument("--list", action="store_true", help="list the sections and exit")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for spec in tour.SECTIONS:
            print(f"stage {spec.stage}  {spec.title}")
        return 0
    results = tour.run(args.stages, rootfs=args.rootfs, explain=args.explain)
    return 1 if any(result.error for result in results) else 0
