"""``stages isolate ROOTFS [options] -- CMD ...``: stage 2, the whole manual sequence, in order.

It does what a person would type, one step after another: the user namespace and its ID map first, the
cgroup, each other namespace, the hostname, the network, the mounts, /proc's dangerous files hidden or made
read-only, pivot_root, then the privileges dropped (capabilities, no_new_privs); ``--harden`` adds the rest
of Docker's defences (the device allowlist and a seccomp filter); then it runs CMD inside, connected to
this terminal, and passes its exit code on (``128+N`` when a signal N killed it, as a shell reports it).
``--explain`` prints each step as it happens, as the shell command it stands for. Everything it set up is
released on exit, on error and on Ctrl-C.

``stages isolate --cleanup`` removes what isolates killed by SIGKILL left behind (cgroups, network
devices, firewall rules, state files).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal

from stages import steps
from stages.errors import StagesError

USAGE = ("stages isolate ROOTFS [--namespaces uts,pid,...] [--hostname NAME] [--memory 64M] [--pids 32] "
         "[--cpus 0.5] [--net] [--publish 8080:80] [--harden] [--explain] [-- CMD ...]\n"
         "       stages isolate --cleanup")
ALL_NAMESPACES = ("user", "uts", "pid", "mount", "ipc", "net", "cgroup", "time")
DEFAULT_NAMESPACES = "uts,pid,mount,ipc,net,cgroup"
# The order of the manual sequence: user first (it must own the others), cgroup after the limits are set
# (so that inside, /proc/self/cgroup shows the limited cgroup as /), time and pid last: they apply to
# children, so the holder forks once for both.
_ORDER = ("uts", "ipc", "net", "mount", "cgroup", "time", "pid")
_FLAGS = ("--net", "--explain", "--cleanup", "--harden")  # the options that take no value


def _add_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    default = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    parser.add_argument("--namespaces", default=default(DEFAULT_NAMESPACES), metavar="LIST",
                        help=f"which namespaces, comma-separated, from {','.join(ALL_NAMESPACES)} "
                             f"(default {DEFAULT_NAMESPACES})")
    parser.add_argument("--hostname", default=default(None), metavar="NAME",
                        help="the hostname inside (default: the isolate's name)")
    parser.add_argument("--memory", default=default(None), metavar="SIZE", help="memory limit, e.g. 64M")
    parser.add_argument("--pids", default=default(None), metavar="N", help="at most N processes")
    parser.add_argument("--cpus", default=default(None), metavar="CPUS", help="CPU limit, e.g. 0.5")
    parser.add_argument("--net", action="store_true", default=default(False),
                        help="wire the network namespace to the host (veth pair and bridge)")
    parser.add_argument("--publish", action="append", default=default([]), metavar="HOST:CONTAINER",
                        help="forward a host port to a port inside (implies --net); may be repeated")
    parser.add_argument("--host-netns", default=default(None), metavar="NETNS",
                        help="with --net: wire to this network namespace instead of the real host's network "
                             "(for tests and demos: ip netns add NETNS)")
    parser.add_argument("--harden", action="store_true", default=default(False),
                        help="add the rest of Docker's defences: the device allowlist (cgroup v1; on v2 no "
                             "CAP_MKNOD instead) and a seccomp filter (no new namespaces, mount, modules...)")
    parser.add_argument("--explain", action="store_true", default=default(False),
                        help="print each step on stderr as the shell command it stands for")
    parser.add_argument("--name", default=default(None), help="the isolate's name (default: a random one)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.usage = USAGE
    parser.epilog = ("example: stages isolate default --explain -- ps ax    "
                     "(PID 1 is the isolate's first process; the host's processes are gone)")
    parser.add_argument("--cleanup", action="store_true",
                        help="remove what isolates killed by SIGKILL left behind, and exit")
    _add_options(parser)
    parser.add_argument("rootfs", nargs="?", metavar="ROOTFS",
                        help='the root filesystem directory, or "default" for the embedded busybox one')
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD",
                        help="the command to run inside, after -- (default: /bin/sh)")


def _split(args: argparse.Namespace) -> list[str]:
    """argparse hands every word after ROOTFS to the REMAINDER, options included: parse those before
    ``--`` as options, the rest is the command."""
    words = list(args.command)
    if "--" in words:
        cut = words.index("--")
        options, command = words[:cut], words[cut + 1:]
    else:
        options = []
        while words and words[0].startswith("--"):
            options.append(words.pop(0))
            if options[-1].split("=")[0] not in _FLAGS and "=" not in options[-1] and words:
                options.append(words.pop(0))
        command = words
    if options:
        inner = argparse.ArgumentParser(prog="stages isolate", add_help=False)
        _add_options(inner, defaults=False)
        inner.add_argument("--cleanup", action="store_true", default=argparse.SUPPRESS)
        parsed, unknown = inner.parse_known_args(options)
        if unknown:
            raise StagesError(f"stages isolate does not know {' '.join(unknown)}",
                              "see stages isolate --help; the command to run goes after --")
        for key, value in vars(parsed).items():
            if key == "publish":
                value = args.publish + value
            setattr(args, key, value)
    return command or ["/bin/sh"]


def _namespaces(text: str) -> list[str]:
    names = [word.strip() for word in text.split(",") if word.strip()]
    unknown = [name for name in names if name not in ALL_NAMESPACES]
    if unknown:
        raise StagesError(f"there is no {unknown[0]!r} namespace",
                          f"choose from {','.join(ALL_NAMESPACES)}")
    return names


def _ports(specs: list[str]) -> list[tuple[int, int]]:
    ports = []
    for spec in specs:
        host, _, inside = spec.partition(":")
        try:
            pair = (int(host), int(inside or host))
        except ValueError:
            pair = (0, 0)
        if not all(0 < port < 65536 for port in pair):
            raise StagesError(f"--publish {spec} is not HOST:CONTAINER",
                              "give two port numbers between 1 and 65535, e.g. --publish 8080:80")
        ports.append(pair)
    return ports


def run(args: argparse.Namespace) -> int:
    from stages.isolate import Isolate, cleanup

    command = _split(args)
    if args.cleanup:
        cleaned = cleanup()
        names = f": {', '.join(cleaned)}" if cleaned else ""
        print(f"removed the leftovers of {len(cleaned)} isolate(s){names}")
        return 0
    if not args.rootfs:
        raise StagesError("which root filesystem?",
                          'give a directory, or "default": stages isolate default -- sh')
    names = _namespaces(args.namespaces)
    ports = _ports(args.publish)
    if args.host_netns and not (args.net or ports):
        raise StagesError("--host-netns only matters with --net or --publish", "add --net")
    if (args.net or ports) and "net" not in names:
        raise StagesError("--net and --publish need the net namespace",
                          f"add it: --namespaces {','.join([*names, 'net'])}")
    if args.harden and "mount" not in names:
        raise StagesError("--harden needs the mount namespace: it makes the isolate's /proc/sys read-only, "
                          "which only a mount table of the isolate's own can do",
                          f"add it: --namespaces {','.join([*names, 'mount'])}")
    from stages import rootfs

    def terminated(number, frame):  # SIGTERM: release everything, as for Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    directory = rootfs.default_rootfs() if args.rootfs == "default" else args.rootfs
    record = steps.StepRecord(title=f"stages isolate {args.rootfs}")
    if args.explain:
        record.listeners.append(steps.explain_printer())
    with Isolate(directory, name=args.name, record=record) as iso:
        if "user" in names:
            iso.unshare("user")
            iso.map_user()
        if args.memory or args.pids or args.cpus:
            iso.limit(memory=args.memory, pids=args.pids, cpus=args.cpus)
        for name in _ORDER:
            if name in names:
                iso.unshare(name)
        if "uts" in names:
            iso.set_hostname(args.hostname or iso.name)
        if args.net or ports:
            iso.connect(host_netns=args.host_netns)
            for host_port, container_port in ports:
                iso.publish(host_port, container_port)
        if "mount" in names:
            iso.mount_proc()
            iso.mount_sys()
            iso.mount_dev()
            iso.mount_tmp()
            # /proc/sys is the host's (core_pattern names what the host's kernel runs as root at a crash):
            # hidden or read-only before anything runs inside
            iso.protect_proc()
            iso.pivot_root()
        iso.drop_capabilities()
        iso.set_no_new_privs()
        if args.harden:
            iso.harden()  # the device allowlist from outside, then the seccomp filter: the last step
        env = {"PATH": "/bin:/sbin:/usr/bin:/usr/sbin", "HOME": "/root",
               "TERM": os.environ.get("TERM", "xterm"), "PS1": f"{args.hostname or iso.name}# "}
        with record.step(shlex.join(command), what="the command, inside", where="inside"):
            result = iso.run(command, capture=False, env=env)
    if result.returncode < 0:  # killed by a signal: report it the way a shell does
        return 128 - result.returncode if -result.returncode in signal.valid_signals() else 1
    return result.returncode
