"""``stages rootfs``: build, show and check a root filesystem.

::

    stages rootfs build DIR [--from busybox|host|TARBALL] [--command NAME ...] [--force] [--explain]
    stages rootfs show DIR
    stages rootfs check DIR
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from stages import rootfs, steps


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build", help="build a root filesystem in DIR",
        description="Build a root filesystem in DIR: a static busybox (the default), programs copied "
                    "from this machine with their libraries (--from host), or an extracted tarball.")
    build.add_argument("directory", metavar="DIR", help="a new or empty directory, or a rootfs built before")
    build.add_argument("--from", dest="source", default="busybox", metavar="SOURCE",
                       help="busybox (default), host, or the path of a .tar, .tar.gz, .tar.xz, .tar.zst")
    build.add_argument("--command", dest="commands", action="append", metavar="NAME",
                       help="only this command (busybox applet or host program); repeat for more")
    build.add_argument("--force", action="store_true", help="rebuild even if DIR already is this rootfs")
    build.add_argument("--explain", action="store_true", help="print each step as the shell command it is")
    show = actions.add_parser("show", help="say what DIR holds and how it was built")
    show.add_argument("directory", metavar="DIR")
    check = actions.add_parser("check", help="check that a process could live in DIR (chroot into it)")
    check.add_argument("directory", metavar="DIR")


def _print_warning(record: logging.LogRecord) -> bool:
    print(f"warning: {record.getMessage()}", file=sys.stderr)
    return False


def _show(info: dict) -> None:
    width = 10
    rows = [
        ("path", info["path"]),
        ("rootfs", "yes, built by stages" if info["rootfs"] else "no: not built by stages (or unfinished)"),
        ("source", info["tarball"] or info["source"] or "unknown"),
        ("built", info["built"] or "unknown"),
        ("size", f"{info['size']} in {info['files']} files, {info['symlinks']} symbolic links, "
                 f"{info['directories']} directories"),
        ("/bin/sh", "yes" if info["shell"] else "missing: nothing can run in it"),
    ]
    if info["commands"]:
        rows.append(("commands", " ".join(info["commands"])))
    if info["noexec"]:
        rows.append(("noexec", "yes: its filesystem is mounted noexec, so nothing in it can run"))
    for key, value in rows:
        print(f"{key:<{width}} {value}")
    for line in info["warnings"]:
        print(f"{'warning':<{width}} {line}")


def _marker_identity(directory) -> tuple[int, int] | None:
    """Which marker file a rootfs has: a rebuild writes a new one, a no-op leaves it alone."""
    if not rootfs.is_rootfs(directory):
        return None
    info = os.stat(os.path.join(directory, rootfs.MARKER))
    return info.st_ino, info.st_mtime_ns


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        _show(rootfs.describe(args.directory))
        return 0
    if args.action == "check":
        path = rootfs.check(args.directory)
        print(f"{path} is a root filesystem: it has an executable /bin/sh on a filesystem that allows it")
        return 0

    before = _marker_identity(args.directory)
    record = steps.StepRecord(f"stages rootfs build {args.directory} --from {args.source}")
    if args.explain:
        record.listeners.append(steps.explain_printer(sys.stdout))
    # The library logs what it skipped; on the command line that is one "warning:" line each.
    handler = logging.Handler(logging.WARNING)
    handler.filter = _print_warning  # type: ignore[method-assign]
    logger = logging.getLogger("stages.rootfs")
    logger.addHandler(handler)
    try:
        with record.active():
            path = rootfs.build(args.directory, args.source, commands=args.commands, force=args.force)
    finally:
        logger.removeHandler(handler)
    info = rootfs.describe(path)
    if before is not None and _marker_identity(path) == before:
        print(f"{path} already is this {info['source']} rootfs: nothing to do (--force rebuilds it)")
        return 0
    what = f"from {info['tarball']}" if info["tarball"] else f"a {info['source']} rootfs"
    print(f"built {what} in {path}: {info['size']}, {info['files']} files, "
          f"{info['symlinks']} symbolic links, in {info['seconds']:.2f} s")
    print(f"try it: sudo chroot {path} /bin/sh")
    return 0
