"""``stages exec``: one more process in a running container's namespaces and cgroup (setns(2))."""

from __future__ import annotations

import argparse


def configure(parser) -> None:
    parser.add_argument("-i", "--interactive", action="store_true", help="pass your input through")
    parser.add_argument("-t", "--tty", action="store_true",
                        help="a terminal of its own (a pseudo-terminal, pty(7)); with -i, your keys reach it")
    parser.add_argument("-e", "--env", action="append", default=[], metavar="K=V", help="set a variable")
    parser.add_argument("-w", "--workdir", metavar="DIR", help="the working directory inside")
    parser.add_argument("-u", "--user", metavar="UID[:GID]", help="the user it runs as")
    parser.add_argument("container", help="name or ID")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")


def run(args) -> int:
    import os

    from stages.runtime import engine

    if not args.command:
        from stages.errors import StagesError

        raise StagesError("stages exec needs a command to run",
                          f"for instance: stages exec {args.container} ps")
    stdio = None if args.interactive else (os.open(os.devnull, os.O_RDONLY), None, None)
    code = engine.exec_in(args.container, args.command, env=args.env, workdir=args.workdir, user=args.user,
                          stdio=stdio, tty=args.tty)
    return code if code is not None else 0
