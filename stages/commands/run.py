"""``stages run``: one command for everything stage 2 wired by hand (stage 3)."""

from __future__ import annotations

import argparse
import sys

from stages.runtime.flags import Options


def configure(parser) -> None:
    parser.add_argument("-d", "--detach", action="store_true", help="run in the background, print its ID")
    parser.add_argument("--rm", dest="remove", action="store_true", help="remove the container when it stops")
    parser.add_argument("--name", help="a name for the container (default: a made-up adjective_name)")
    parser.add_argument("-e", "--env", action="append", default=[], metavar="K=V", help="set a variable")
    parser.add_argument("-v", "--volume", dest="volumes", action="append", default=[],
                        metavar="HOST:CTR[:ro]", help="bind a host directory into the container")
    parser.add_argument("-w", "--workdir", metavar="DIR", help="the working directory inside")
    parser.add_argument("-u", "--user", metavar="UID[:GID]", help="the user the command runs as")
    parser.add_argument("--hostname", help="the container's hostname (default: container)")
    parser.add_argument("--memory", "-m", metavar="SIZE", help="memory limit, e.g. 64M")
    parser.add_argument("--cpus", metavar="N", help="CPU limit, e.g. 0.5 for half a CPU")
    parser.add_argument("--pids-limit", type=int, metavar="N", help="at most N processes")
    parser.add_argument("--network", default="bridge", choices=("none", "bridge", "host"),
                        help="bridge (default): own address on the bridge; none: only lo; host: the host's")
    parser.add_argument("-p", "--publish", action="append", default=[], metavar="HOSTPORT:CTRPORT",
                        help="publish a container port on the host")
    parser.add_argument("--read-only", action="store_true", help="mount the rootfs read-only")
    parser.add_argument("--privileged", action="store_true",
                        help="turn off what contains root: every capability, no seccomp filter, no device "
                             "allowlist (any device node it makes opens: the host's disks too), nothing of "
                             "/proc masked or read-only, /sys writable")
    parser.add_argument("--security-opt", dest="security_opt", action="append", default=[],
                        metavar="seccomp=unconfined|FILE",
                        help="seccomp=unconfined: no seccomp filter; seccomp=FILE: that profile (Docker's "
                             "JSON format) instead of Docker's default")
    parser.add_argument("--no-init", dest="init", action="store_false",
                        help="run the command itself as PID 1 (no reaper, no signal forwarding)")
    parser.add_argument("-i", "--interactive", action="store_true", help="pass your input through")
    parser.add_argument("-t", "--tty", action="store_true",
                        help="a terminal of its own (a pseudo-terminal, pty(7)); with -i, your keys reach it")
    parser.add_argument("--explain", action="store_true",
                        help="print every step as the command a person would type, with its time")
    parser.add_argument("image", help="the image, e.g. busybox")
    # everything after the image belongs to the container's command (`stages run busybox ls -l /`)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command (default: the image's)")


def options_from(args) -> Options:
    return Options(image=args.image, command=list(args.command), name=args.name, detach=args.detach,
                   remove=args.remove, env=args.env, volumes=args.volumes, workdir=args.workdir,
                   user=args.user, hostname=args.hostname, memory=args.memory, cpus=args.cpus,
                   pids_limit=args.pids_limit, network=args.network, publish=args.publish,
                   read_only=args.read_only, interactive=args.interactive, tty=args.tty, init=args.init,
                   privileged=args.privileged, security_opt=args.security_opt)


def run(args) -> int:
    from stages.runtime import engine
    from stages.steps import StepRecord, explain_printer

    options = options_from(args)
    record = StepRecord(f"stages run {options.image}")
    if args.explain and not options.detach:
        record.listeners.append(explain_printer(sys.stderr))
    stdio = None if options.interactive or options.detach else (_devnull(), None, None)
    info, code = engine.run(options, record=record, stdio=stdio)
    if options.detach:
        if args.explain:
            print(record.table(), file=sys.stderr)
        print(info["id"])
        return 0
    return code if code is not None else 0


def _devnull() -> int:
    import os

    return os.open(os.devnull, os.O_RDONLY)
