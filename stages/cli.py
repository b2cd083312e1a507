"""The ``stages`` command line.

Each command lives in its own module under :mod:`stages.commands` and is imported only when it is
asked for, so ``stages run`` does not pay for the import of ``stages tour``. A command module has
``configure(parser)`` and ``run(args) -> int``. Errors a learner can fix (:class:`StagesError`) print one
clear sentence and a hint, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from stages.errors import StagesError

# name -> (module, one line for the help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tour": ("stages.commands.tour", "walk from a chroot jail to a container, showing each step"),
    "doctor": ("stages.commands.doctor", "check that this machine can run the workshop"),
    "rootfs": ("stages.commands.rootfs", "build a small root filesystem (busybox, host binaries, tarball)"),
    "jail": ("stages.commands.jail", "stage 1: run a command chrooted into a root filesystem"),
    "isolate": ("stages.commands.isolate", "stage 2: run a command in namespaces wired step by step"),
    "run": ("stages.commands.run", "stage 3: run a container from an image, in one command"),
    "ps": ("stages.commands.ps", "list the containers (-a: stopped ones too)"),
    "logs": ("stages.commands.logs", "print what a container wrote (-f: follow)"),
    "exec": ("stages.commands.exec_", "run one more command in a running container"),
    "stop": ("stages.commands.stop", "stop a container: SIGTERM, then SIGKILL after -t seconds"),
    "start": ("stages.commands.start", "start a stopped container again, its files kept (-a: attached)"),
    "restart": ("stages.commands.restart", "stop a container and start it again"),
    "kill": ("stages.commands.kill", "send a signal to a container (-s SIGNAL)"),
    "rm": ("stages.commands.rm", "remove a container: its mount, changes, cgroup, veth and state"),
    "inspect": ("stages.commands.inspect", "everything known about a container, as JSON"),
    "prune": ("stages.commands.prune", "remove stopped containers and what a crashed run left"),
    "images": ("stages.commands.images", "stage 3: list the images in the store"),
    "import": ("stages.commands.import_", "stage 3: import a rootfs tarball, docker save or OCI layout"),
    "history": ("stages.commands.history", "stage 3: an image's layers, with what made each"),
    "rmi": ("stages.commands.rmi", "stage 3: remove an image and the layers no other image uses"),
    "build": ("stages.commands.build", "stage 3: build an image from a Containerfile, with a cache"),
}


def _overview() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: stages COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `stages COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0
    if argv[0] == "--version":
        from stages import __version__

        print(f"stages {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"stages: unknown command {name!r}\n\n{_overview()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"stages {name}", description=COMMANDS[name][1])
    module.configure(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except StagesError as error:
        print(f"stages {name}: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"stages {name}: interrupted; everything it had set up was released", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`stages ... | head`): not an error worth a traceback. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:
        from stages.runtime import store

        if not store.is_full(error):
            raise
        # a full disk is not a bug in stages: one sentence, whichever write found it (each cleans up)
        print(f"stages {name}: {store.no_space(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
