"""``stages jail ROOTFS [--proc] [--explain] -- CMD ...``: stage 1, a command chrooted into a rootfs.

The command uses this terminal and its exit code becomes ours (``128+N`` when a signal N killed it, as
a shell reports it). With no command, it starts ``/bin/sh`` inside.
"""

from __future__ import annotations

import argparse
import signal

from stages import steps

USAGE = "stages jail ROOTFS [--proc] [--explain] [-- CMD ...]"
_OPTIONS = ("--proc", "--explain")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = USAGE
    parser.epilog = ("example: stages jail default --proc -- ps    "
                     "(the host's processes, seen from inside the jail)")
    parser.add_argument("rootfs", metavar="ROOTFS",
                        help='the root filesystem directory, or "default" for the embedded busybox one')
    parser.add_argument("--proc", action="store_true",
                        help="mount proc at /proc inside (in a private mount namespace: the host never sees "
                             "the mount)")
    parser.add_argument("--explain", action="store_true",
                        help="print each step on stderr as the shell command it stands for")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD",
                        help="the command to run inside, after -- (default: /bin/sh)")


def _split(args: argparse.Namespace) -> list[str]:
    # argparse hands every word after ROOTFS to the REMAINDER, options included: take ours off the front.
    words = list(args.command)
    while words and words[0] in _OPTIONS:
        setattr(args, words.pop(0).lstrip("-"), True)
    if words and words[0] == "--":
        words.pop(0)
    return words or ["/bin/sh"]


def run(args: argparse.Namespace) -> int:
    from stages import jail, rootfs

    command = _split(args)
    directory = rootfs.default_rootfs() if args.rootfs == "default" else args.rootfs
    record = steps.StepRecord(title=f"stages jail {args.rootfs}")
    if args.explain:
        record.listeners.append(steps.explain_printer())
    result = jail.run(directory, command, mount_proc=args.proc, record=record, capture=False)
    if result.returncode < 0:  # killed by a signal: report it the way a shell does
        return 128 - result.returncode if -result.returncode in signal.valid_signals() else 1
    return result.returncode
