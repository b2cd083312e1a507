"""``stages-oci``: our OCI runtime with runc's command line, so that conmon, containerd-shim and CRI-O can
drive it (podman: ``podman --runtime $(command -v stages-oci) run ...``).

The command line is runc's (and crun's): global options, then a command::

    stages-oci [--root DIR] [--log FILE] [--log-format text|json] [--debug] [--systemd-cgroup] COMMAND ...

    create --bundle DIR --pid-file F [--console-socket S] ID   the init sets itself up and waits
    start ID                                                   it execs process.args
    state ID                                                   runtime.md's state, as JSON
    kill [--all] ID [SIGNAL]                                   default SIGTERM; a number or a name
    delete [--force] ID                                        remove what is left of it
    run [--detach] [--keep] --bundle DIR ID                    create, start, wait (the container's exit code)
    exec [--process FILE | ...] [--detach] [--tty] ID [ARGS]   one more process in a running container
    ps [--format table|json] ID [PS-OPTIONS]                   the processes in it
    pause ID / resume ID                                       freeze and thaw its cgroup
    list [-q] [--format table|json]                            the containers under the root
    features                                                   what this runtime supports, as JSON
    spec [--bundle DIR]                                        write a default config.json

Every operation is one call into :mod:`stages.runtime.oci`; this module only turns options into arguments
and errors into one sentence. An error goes to stderr *and* to the ``--log`` file, where conmon looks for
it (with ``--log-format json`` as runc's JSON lines, ``{"level": "error", "msg": ..., "time": ...}``).
Exit codes are runc's: 0 done, 1 error (2: a wrong command line); ``run`` exits with the container's code
(128 + N for signal N). SIGTERM or SIGHUP during a command undoes what it had done (exit 128 + N).

Options runc takes that mean nothing different here are accepted, and the log says what they mean:
``--no-pivot`` (we always pivot_root(2)), ``--no-new-keyring`` (we never make a session keyring),
``--systemd-cgroup`` and ``--cgroup-manager`` (no systemd unit is asked for: the container's cgroup is
made below the caller's own cgroup, named after cgroupsPath's last part, as cgroups(7) lets a process
manage only its own subtree). ``--preserve-fds N`` passes our descriptors 3 .. 3+N-1 on to the container's
program (conmon's socket activation); each must be open.

In the foreground, ``run`` and ``exec`` pass SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2 and SIGWINCH on to
the container's process (``run``: its init; ``exec``: the exec'd process) and exit as it ended, as runc does.

The supervisor calls the runtime several times per container, so start-up counts: nothing heavier than
:mod:`argparse` is imported until a command needs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["PROGRAM", "Log", "UsageError", "build_parser", "command_name", "exec_process_object", "features",
           "main"]

#: The command's name, in its messages and its log.
PROGRAM = "stages-oci"
#: The runtime spec versions this runtime reads (features.md's ociVersionMin; the maximum is the library's).
OCI_VERSION_MIN = "1.0.0"


class UsageError(Exception):
    """The command line itself is wrong (an unknown option or command, a missing ID)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one sentence through :func:`main`, not a usage dump."""

    def _get_formatter(self):
        # add_argument makes a formatter to check each metavar, and argparse's asks shutil for the terminal's
        # width each time: the width, told once, spares that import at every start of the command
        return self.formatter_class(prog=self.prog, width=_help_width())

    def error(self, message: str):
        command = self.prog.partition(" ")[2]
        if message.startswith("unrecognized arguments: "):
            message = f"unknown option or argument: {message.partition(': ')[2]}"
        elif "invalid choice" in message and message.startswith("argument COMMAND"):
            word = message.partition("invalid choice: ")[2].partition(" (")[0]
            message = f"unknown command {word} (the commands: {', '.join(HANDLERS)})"
        elif message.startswith("the following arguments are required: "):
            message = f"missing {message.partition(': ')[2]}"
        raise UsageError(f"{command}: {message}" if command else message)


def _help_width() -> int:
    """What argparse's help would be wrapped to: $COLUMNS, else the terminal's width, less 2 (as argparse)."""
    global _WIDTH
    if _WIDTH is None:
        try:
            columns = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                columns = 80
        _WIDTH = max(columns, 12) - 2
    return _WIDTH


_WIDTH: int | None = None


# -- the log ------------------------------------------------------------------------------------------------
class Log:
    """Where messages go: ``--log FILE`` (else stderr), as text or as runc's JSON lines.

    The file is opened for each line and closed again, so that no container process inherits it.
    """

    LEVELS = ("debug", "info", "warning", "error")

    def __init__(self, path: str | None = None, form: str = "text", debug: bool = False):
        self.path = path
        self.form = form
        self.debug_on = debug

    def line(self, level: str, message: str) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"
        if self.form == "json":
            return json.dumps({"level": level, "msg": message, "time": stamp})
        return f"time={json.dumps(stamp)} level={level} msg={json.dumps(message)}"

    def write(self, level: str, message: str) -> None:
        if level == "debug" and not self.debug_on:
            return
        text = self.line(level, message) + "\n"
        if self.path is None:
            sys.stderr.write(text)
            sys.stderr.flush()
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            sys.stderr.write(f"{PROGRAM}: cannot write the log {self.path}: {error.strerror}\n")
            return
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def debug(self, message: str) -> None:
        self.write("debug", message)

    def info(self, message: str) -> None:
        self.write("info", message)

    def warning(self, message: str) -> None:
        self.write("warning", message)

    def error(self, message: str) -> None:
        """An error goes to the log and to stderr (once, when the log is stderr), as runc's ``fatal``.

        With a log file a supervisor runs us, and names us itself when it passes the message on
        ("OCI runtime error: /usr/bin/stages-oci: ..."): stderr then carries the bare message, as runc's.
        """
        if self.path is not None:
            self.write("error", message)
            sys.stderr.write(f"{message}\n")
        else:
            sys.stderr.write(f"{PROGRAM}: {message}\n")
        sys.stderr.flush()

    def steps(self, record) -> None:
        """A step record at debug level: what the runtime did, in the words of stage 2."""
        if record is None or not self.debug_on:
            return
        for item in record.to_dicts():
            mark = "" if item.get("ok", True) else " (failed)"
            self.debug(f"step [{item.get('where', 'host')}] {item.get('shell')}{mark}")


# -- the command line -------------------------------------------------------------------------------------
class _Skipped:
    """A command's parser not built this time (see :func:`build_parser`): its options go nowhere."""

    def add_argument(self, *args, **options) -> None:
        pass


#: Global options that take a value (to find the command's name in a command line).
_GLOBAL_VALUES = ("--root", "--log", "--log-format", "--rootless", "--criu", "--cgroup-manager")


def command_name(argv: list[str]) -> str | None:
    """The command a command line asks for: its first word that is neither an option nor an option's value."""
    following_value = False
    for word in argv:
        if following_value:
            following_value = False
        elif word in _GLOBAL_VALUES:
            following_value = True
        elif not word.startswith("-"):
            return word
    return None


def build_parser(only: str | None = None) -> Parser:
    """The whole command line, or with ``only`` the global options and that one command: argparse's
    messages go through gettext, which looks for catalogues on disk for each of them, and building all
    thirteen commands costs more than a ``state`` does."""
    parser = Parser(prog=PROGRAM, description="An OCI runtime with runc's command line (stages, stage 3).",
                    epilog="Run `stages-oci COMMAND --help` for the options of one command.")
    parser.add_argument("--root", help="the directory of the containers' state "
                        "(default $STAGES_OCI_ROOT, else /run/stages/oci)")
    parser.add_argument("--log", metavar="FILE", help="write messages to FILE (default: stderr)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text, or json lines as runc writes them (conmon reads them)")
    parser.add_argument("--debug", action="store_true", help="also log every step the runtime takes")
    parser.add_argument("--systemd-cgroup", action="store_true",
                        help="accepted for conmon's sake: we do not ask systemd for a scope; the container's "
                        "cgroup is made below our own, named by cgroupsPath's last part (slice:prefix:NAME)")
    parser.add_argument("--rootless", default=None, help="accepted and ignored: this runtime runs as root")
    parser.add_argument("--cgroup-manager", choices=("cgroupfs", "systemd", "disabled"), default="cgroupfs",
                        help="crun's option, which podman passes with cgroups = \"disabled\": accepted; the "
                        "container's cgroup is still made below our own, never at cgroupsPath's place")
    parser.add_argument("--criu", help=argparse.SUPPRESS)
    parser.add_argument("--version", "-v", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name: str, text: str, *ids: str) -> Parser | _Skipped:
        if only is not None and name != only:
            return _Skipped()
        sub = commands.add_parser(name, help=text, description=text)
        for item in ids:
            sub.add_argument(item, metavar="ID" if item == "id" else item.upper(),
                             help="the container's ID" if item == "id" else None)
        return sub

    def launch_options(sub: Parser | _Skipped) -> None:
        sub.add_argument("--bundle", "-b", default=".", help="the bundle directory (default: here)")
        sub.add_argument("--pid-file", help="write the container's PID (on the host) to this file")
        sub.add_argument("--console-socket", help="a unix socket to send the terminal's master end to")
        sub.add_argument("--no-pivot", action="store_true",
                         help="accepted; this runtime always uses pivot_root(2), never chroot")
        sub.add_argument("--no-new-keyring", action="store_true",
                         help="accepted; this runtime never makes a session keyring of its own")
        sub.add_argument("--preserve-fds", type=int, default=0, metavar="N",
                         help="pass N more file descriptors (3 .. 3+N-1) on to the program")

    sub = command("create", "create a container: its init sets itself up and waits for start", "id")
    launch_options(sub)
    command("start", "run the program of a created container", "id")
    sub = command("run", "create, start and wait for a container; its exit code", "id")
    launch_options(sub)
    sub.add_argument("--detach", "-d", action="store_true", help="return once it runs")
    sub.add_argument("--keep", action="store_true", help="do not delete the container when it ends")
    sub.add_argument("--no-subreaper", action="store_true", help="accepted; we never become a subreaper")
    command("state", "print the container's state (runtime.md) as JSON", "id")
    sub = command("update", "change a created or running container's cgroup limits", "id")
    sub.add_argument("--resources", "-r", metavar="FILE",
                     help="linux.resources of config.json as a JSON file ('-': standard input)")
    for flag, what in (("--memory", "memory.limit"), ("--memory-reservation", "memory.reservation"),
                       ("--memory-swap", "memory.swap"), ("--cpu-shares", "cpu.shares"),
                       ("--cpu-quota", "cpu.quota"), ("--cpu-period", "cpu.period"),
                       ("--pids-limit", "pids.limit"), ("--blkio-weight", "blockIO.weight")):
        sub.add_argument(flag, type=int, metavar="N", help=f"linux.resources.{what}")
    sub.add_argument("--cpuset-cpus", metavar="LIST", help="linux.resources.cpu.cpus, such as 0-1")
    sub.add_argument("--cpuset-mems", metavar="LIST", help="linux.resources.cpu.mems")
    sub = command("events", "print the container's cgroup statistics as runc's JSON", "id")
    sub.add_argument("--stats", action="store_true", help="once, then end")
    sub.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                     help="between two statistics while the container runs (default 5)")
    sub = command("kill", "send a signal to the container's init (default SIGTERM)", "id")
    sub.add_argument("signal", nargs="?", default="TERM", help="a number or a name: 9, KILL, SIGKILL")
    sub.add_argument("--all", "-a", action="store_true", help="signal every process in the container")
    sub = command("delete", "remove a stopped container (its cgroup and state)", "id")
    sub.add_argument("--force", "-f", action="store_true", help="kill it first if it still runs")
    sub = command("exec", "run one more process in a running container", "id")
    sub.add_argument("--process", "-p", metavar="FILE", help="config.json's process object, as a file")
    sub.add_argument("--detach", "-d", action="store_true", help="return once it runs")
    sub.add_argument("--tty", "-t", action="store_true", help="give it a terminal (needs --console-socket)")
    sub.add_argument("--console-socket", help="a unix socket to send the terminal's master end to")
    sub.add_argument("--pid-file", help="write the new process's PID (on the host) to this file")
    sub.add_argument("--cwd", help="its working directory inside")
    sub.add_argument("--env", "-e", action="append", default=[], metavar="NAME=VALUE", help="add a variable")
    sub.add_argument("--user", "-u", metavar="UID[:GID]", help="run it as this user")
    sub.add_argument("--additional-gids", "-g", action="append", default=[], type=int, metavar="GID")
    sub.add_argument("--cap", "-c", action="append", default=[], metavar="CAP", help="add a capability")
    sub.add_argument("--no-new-privs", action="store_true", help="set no_new_privs")
    sub.add_argument("--preserve-fds", type=int, default=0, metavar="N",
                     help="pass N more file descriptors (3 .. 3+N-1) on to the process")
    sub.add_argument("--ignore-paused", action="store_true", help=argparse.SUPPRESS)
    sub.add_argument("args", nargs=argparse.REMAINDER, help="the command and its arguments")
    sub = command("ps", "the processes in the container (its cgroup), as ps(1) shows them", "id")
    sub.add_argument("--format", "-f", choices=("table", "json"), default="table",
                     help="table (ps's own lines) or json (a list of host PIDs)")
    sub.add_argument("ps_options", nargs=argparse.REMAINDER, metavar="PS-OPTIONS",
                     help="options for ps(1) (default: -ef)")
    command("pause", "freeze every process of the container (the freezer cgroup)", "id")
    command("resume", "thaw a paused container", "id")
    sub = command("list", "list the containers under the root")
    sub.add_argument("--quiet", "-q", action="store_true", help="IDs only")
    sub.add_argument("--format", "-f", choices=("table", "json"), default="table")
    command("features", "what this runtime supports, as runtime-spec features.md's JSON")
    sub = command("spec", "write a default config.json into the bundle, as `runc spec`")
    sub.add_argument("--bundle", "-b", default=".", help="where to write it (default: here)")
    sub.add_argument("--rootless", action="store_true", help="not supported: this runtime runs as root")
    return parser


# -- the commands -----------------------------------------------------------------------------------------
def _oci():
    from stages.runtime import oci

    return oci


def _record(title: str):
    from stages.steps import StepRecord

    return StepRecord(title)


def _check_launch(args, log: Log) -> dict:
    """The options of create and run that go to the library as they are."""
    if args.no_pivot:
        log.info("--no-pivot: this runtime always pivots into the rootfs (pivot_root(2)); it never chroots")
    return {"preserve_fds": args.preserve_fds} if args.preserve_fds else {}


def _accepts(function, name: str) -> bool:
    import inspect

    return name in inspect.signature(function).parameters


def do_create(args, log: Log) -> int:
    oci = _oci()
    options = _check_launch(args, log)
    record = _record(f"create {args.id}")
    options.update(_terminal_options(oci.create, args))
    options.update(_detach_option(oci.create))
    try:
        oci.create(args.id, args.bundle, root=args.root, pid_file=args.pid_file, record=record, **options)
    finally:
        log.steps(record)
        _hook_warnings(record, log)  # and what config.json asked for that was left out (config.md)
    _done()
    return 0


def _done() -> None:
    """The work is done: a late SIGTERM must not report (and exit as) an interruption."""
    import signal

    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)


def _terminal_options(function, args) -> dict:
    from stages.errors import StagesError

    if not getattr(args, "console_socket", None):
        return {}
    if not _accepts(function, "console_socket"):
        raise StagesError("--console-socket: terminals are not supported by this runtime yet",
                          "run without a terminal (podman: leave out -t)")
    return {"console_socket": os.path.abspath(args.console_socket)}


def _detach_option(function) -> dict:
    # A command-line create returns while the container lives on: the library's detached create (if it has
    # one) lets the setup process go, so that the init is the child of the caller's subreaper (conmon).
    return {"detach": True} if _accepts(function, "detach") else {}


def _hook_warnings(record, log: Log) -> None:
    """A failing poststart or poststop hook is a warning, not an error (runtime.md): into the log."""
    from stages.runtime.oci import hooks

    for message in hooks.warnings_of(record):
        log.warning(message)


def _wants_record(args, log: Log) -> bool:
    """Whether a start or delete needs a step record: with --debug (the steps go to the log), or when the
    container has hooks (their failures are warnings read from the record). Without, the record's import
    is spared (`start` and `delete` are called for every container)."""
    if log.debug_on:
        return True
    from stages.runtime.oci import statefile

    try:
        hooks = statefile.read(args.id, args.root).get("stages", {}).get("hooks") or {}
    except Exception:  # not there, unreadable: the operation itself says so
        return False
    return any(hooks.values())


def do_start(args, log: Log) -> int:
    record = _record(f"start {args.id}") if _wants_record(args, log) else None
    try:
        _oci().start(args.id, root=args.root, record=record)
    finally:
        if record is not None:
            log.steps(record)
            _hook_warnings(record, log)
    return 0


def do_state(args, log: Log) -> int:
    # What oci.state() returns, read through the state file's module alone: `state` is the command a
    # supervisor calls most, and this spares it the import of the whole runtime.
    from stages.runtime.oci import statefile

    print(json.dumps(statefile.spec_state(statefile.read(args.id, args.root), args.root), indent=2))
    return 0


def do_kill(args, log: Log) -> int:
    oci = _oci()
    oci.kill(args.id, oci.signal_number(args.signal), root=args.root, all_processes=args.all)
    return 0


def do_delete(args, log: Log) -> int:
    oci = _oci()
    try:
        record = _record(f"delete {args.id}") if _wants_record(args, log) else None
        try:
            oci.delete(args.id, force=args.force, root=args.root, record=record)
        finally:
            if record is not None:
                log.steps(record)
                _hook_warnings(record, log)
    except oci.ContainerNotFoundError:
        if not args.force:
            raise
        # As runc: a forced delete of a container that is not there has nothing left to do (a create that
        # died before its state was written may have left the directory; it goes too).
        from stages.runtime.oci import statefile

        statefile.remove(args.id, args.root)
    return 0


#: The signals ``run`` and ``exec`` in the foreground pass on to the container's process (runc's, less
#: SIGCHLD and the job-control ones, which are the terminal's business).
FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH")


def do_run(args, log: Log) -> int:
    import signal

    oci = _oci()
    options = _check_launch(args, log)
    record = _record(f"run {args.id}")
    options.update(_terminal_options(oci.create, args))
    if args.detach:
        options.update(_detach_option(oci.create))
    try:
        oci.create(args.id, args.bundle, root=args.root, pid_file=args.pid_file, record=record, **options)
    finally:
        log.steps(record)
        _hook_warnings(record, log)  # and what config.json asked for that was left out (config.md)
    if args.detach:
        try:
            oci.start(args.id, root=args.root)
        except BaseException:
            oci.delete(args.id, force=True, root=args.root)
            raise
        _done()
        return 0

    def forward(number, _frame):
        # As runc run: signals sent to the runtime are meant for the container (its init).
        try:
            oci.kill(args.id, number, root=args.root)
        except Exception as error:  # it may be ending already
            log.debug(f"could not forward signal {number}: {error}")

    for name in FORWARDED:
        signal.signal(getattr(signal, name), forward)
    try:
        oci.start(args.id, root=args.root)
        code = oci.wait(args.id, root=args.root)
    finally:
        if not args.keep:
            oci.delete(args.id, force=True, root=args.root)
    if code is None:
        return 0
    return 128 - code if code < 0 else code


def do_exec(args, log: Log) -> int:
    from stages.errors import StagesError

    oci = _oci()
    process = exec_process_object(args)
    if args.tty and not args.console_socket:
        raise StagesError("exec --tty needs --console-socket: the terminal's master end is sent there",
                          "give --console-socket PATH, or leave out --tty")
    options = {}
    if args.tty or args.console_socket:
        options.update(_terminal_options(oci.exec_process, args))
    if args.pid_file and not args.detach:
        if not _accepts(oci.exec_process, "pid_file"):
            raise StagesError("exec --pid-file without --detach is not supported by this runtime yet",
                              "add --detach, or leave out --pid-file")
        options["pid_file"] = args.pid_file
    if args.preserve_fds:
        options["preserve_fds"] = args.preserve_fds
    if not args.detach:
        options["started"] = _forward_signals_to_process(log)
    record = _record(f"exec {args.id}")
    try:
        result = oci.exec_process(args.id, process, root=args.root, record=record, detach=args.detach,
                                  **options)
    except StagesError as error:
        if type(error).__name__ == "ContainerNotFoundError":
            raise  # said in runc's words, which podman looks for
        # runc exec's own failures (no such command, not executable, a bad process.json) end with 255,
        # kept apart from the 0-254 a command itself may return; podman reads 255 as "exec failed"
        log.error(error.message + (f"; hint: {error.hint}" if error.hint else ""))
        return 255
    finally:
        log.steps(record)
        _hook_warnings(record, log)  # capabilities left out (config.md)
    if args.detach:
        if args.pid_file and "pid_file" not in options:
            from stages.runtime.oci import statefile

            statefile.write_text(os.path.abspath(args.pid_file), str(result))  # no newline, as runc
        return 0
    if result is None:
        return 0
    return 128 - result if result < 0 else result


def _forward_signals_to_process(log: Log):
    """From now on the signals in :data:`FORWARDED` are meant for the exec'd process, as under ``runc exec``
    (a supervisor stopping the command stops the process): those that arrive before it runs wait, and go to
    it once it does. Returns the callback that learns its PID (the library's ``started``)."""
    import signal

    pending: list[int] = []
    target: list[int] = []

    def send(number: int) -> None:
        try:
            os.kill(target[0], number)
        except ProcessLookupError:  # it has ended: its end is what we exit with
            pass

    def forward(number: int, _frame) -> None:
        if target:
            send(number)
        else:
            pending.append(number)

    def started(pid: int) -> None:
        target.append(pid)
        log.debug(f"exec: the process runs as PID {pid}; signals to {PROGRAM} go to it")
        while pending:
            send(pending.pop(0))

    for name in FORWARDED:
        signal.signal(getattr(signal, name), forward)
    return started


def exec_process_object(args) -> dict:
    """The process to exec: ``--process FILE`` as it is, or the container's own process (from its bundle's
    config.json) with the command line's args, env, cwd, user and capabilities, as ``runc exec`` does."""
    from stages.errors import StagesError

    if args.process:
        if args.args:
            raise StagesError("exec takes --process FILE or a command, not both",
                              "put the command in the file's args, or leave out --process")
        try:
            with open(args.process) as handle:
                process = json.load(handle)
        except OSError as error:
            raise StagesError(f"cannot read the process file {args.process}: {error.strerror}",
                              "give the path of a JSON file with config.json's process object") from None
        except ValueError as error:
            raise StagesError(f"{args.process} is not valid JSON: {error}", "fix the file") from None
        if not isinstance(process, dict):
            raise StagesError(f"{args.process} must hold one JSON object (config.json's process)",
                              'for instance {"args": ["ps"], "cwd": "/"}')
        if args.tty:
            process["terminal"] = True  # as runc: --tty wins over the file
        return process
    if not args.args:
        raise StagesError("exec needs a command to run (after the ID), or --process FILE",
                          f"for instance: {PROGRAM} exec {args.id} ps")
    process = dict(_container_process(args))
    process.pop("terminal", None)
    process["args"] = list(args.args)
    if args.tty:
        process["terminal"] = True
    if args.env:
        process["env"] = list(process.get("env", [])) + list(args.env)
    if args.cwd:
        process["cwd"] = args.cwd
    if args.user:
        uid, _, gid = args.user.partition(":")
        if not uid.isdigit() or gid and not gid.isdigit():
            raise StagesError(f"--user {args.user!r} is not UID or UID:GID",
                              "give numbers, for instance --user 1000:1000")
        process["user"] = dict(process.get("user", {}), uid=int(uid), gid=int(gid or 0))
    if args.additional_gids:
        process["user"] = dict(process.get("user", {}), additionalGids=list(args.additional_gids))
    if args.cap:
        sets = {name: list(words) for name, words in (process.get("capabilities") or {}).items()}
        for word in args.cap:
            word = word.upper() if word.upper().startswith("CAP_") else "CAP_" + word.upper()
            for name in ("bounding", "effective", "permitted"):
                if word not in sets.setdefault(name, []):
                    sets[name].append(word)
        process["capabilities"] = sets
    if args.no_new_privs:
        process["noNewPrivileges"] = True
    return process


def _container_process(args) -> dict:
    """The ``process`` of the container's config.json (the bundle its state names); {} if unreadable."""
    bundle = _oci().state(args.id, root=args.root).get("bundle")
    try:
        with open(os.path.join(bundle, "config.json")) as handle:
            process = json.load(handle).get("process")
    except (OSError, ValueError, TypeError, AttributeError):
        return {}
    return process if isinstance(process, dict) else {}


def do_ps(args, log: Log) -> int:
    """``runc ps``: the PIDs in the container's cgroup; as a table, ps(1)'s lines for those PIDs."""
    import subprocess

    from stages.errors import StagesError
    from stages.runtime.oci import container, statefile

    cgroup = container._cgroup_of(statefile.read(args.id, args.root))
    pids = cgroup.pids() if cgroup is not None else []
    if args.format == "json":
        print(json.dumps(pids))
        return 0
    options = args.ps_options or ["-ef"]
    try:
        output = subprocess.run(["ps", *options], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise StagesError("ps(1) is not installed", "apt-get install procps, or use --format json") from None
    except subprocess.CalledProcessError as error:
        raise StagesError(f"ps {' '.join(options)} failed: {error.stderr.strip()}",
                          "give options ps(1) understands, for instance -ef") from None
    lines = output.splitlines()
    header = lines[0].split() if lines else []
    if "PID" not in header:
        raise StagesError(f"ps {' '.join(options)} prints no PID column", "use options that show it: -ef")
    column = header.index("PID")
    print(lines[0])
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > column and fields[column].isdigit() and int(fields[column]) in pids:
            print(line)
    return 0


def do_update(args, log: Log) -> int:
    """``runc update``: the limits given (as config.json's linux.resources, in a file or as options) are
    checked as at create and written into the container's cgroup."""
    import types

    from stages.errors import StagesError
    from stages.runtime.oci import container, statefile
    from stages.runtime.oci import spec as oci_spec

    resources: dict = {}
    if args.resources:
        text = sys.stdin.read() if args.resources == "-" else open(args.resources).read()
        try:
            resources = json.loads(text)
        except ValueError as error:
            raise StagesError(f"--resources: not JSON: {error}",
                              "give linux.resources of config.json") from None
    for option, dotted in (("memory", "memory.limit"), ("memory_reservation", "memory.reservation"),
                           ("memory_swap", "memory.swap"), ("cpu_shares", "cpu.shares"),
                           ("cpu_quota", "cpu.quota"), ("cpu_period", "cpu.period"),
                           ("cpuset_cpus", "cpu.cpus"), ("cpuset_mems", "cpu.mems"),
                           ("pids_limit", "pids.limit"), ("blkio_weight", "blockIO.weight")):
        value = getattr(args, option)
        if value is not None:
            group, key = dotted.split(".")
            resources.setdefault(group, {})[key] = value
    if "devices" in resources:
        raise StagesError("update: linux.resources.devices cannot be changed here (nor by runc update)",
                          "leave devices out")
    data = statefile.read(args.id, args.root)
    if statefile.status(data, args.root) not in ("created", "running", "paused"):
        raise StagesError(f"container {args.id!r} is stopped: there is no cgroup to update",
                          f"delete {args.id} and create it again")
    plan = types.SimpleNamespace(memory=None, memory_swap=None, cpus=None, pids=None, resources={},
                                 devices=None)
    oci_spec._resources({"resources": resources}, plan)
    cgroup = container._cgroup_of(data)
    if cgroup is None:
        raise StagesError(f"container {args.id!r} has no cgroup any more", f"delete {args.id}")
    if plan.memory is not None:
        cgroup.set_memory(plan.memory, swap=plan.memory_swap)
    if plan.pids is not None:
        cgroup.set_pids(plan.pids)
    for message in container.set_resources(cgroup, plan.resources):
        log.warning(message)
    return 0


def stats_of(container_id: str, root: str | None) -> dict:
    """runc's ``events --stats`` object: ``{"type": "stats", "id": ID, "data": {"cpu": ..., "memory": ...,
    "pids": ...}}``, from the container's cgroup (its kernel counters, cgroups(7))."""
    from stages.runtime.oci import container, statefile

    cgroup = container._cgroup_of(statefile.read(container_id, root))
    data: dict = {"cpu": {"usage": {}, "throttling": {}}, "memory": {"usage": {}}, "pids": {},
                  "blkio": {}, "hugetlb": {}}
    if cgroup is not None:
        found = cgroup.stats()
        usage = found.cpu_usage_usec
        data["cpu"]["usage"] = {"total": usage * 1000 if usage is not None else 0}
        data["cpu"]["throttling"] = {"periods": found.cpu_periods or 0,
                                     "throttledPeriods": found.cpu_throttled or 0,
                                     "throttledTime": (found.cpu_throttled_usec or 0) * 1000}
        data["memory"]["usage"] = {"usage": found.memory_current or 0, "max": found.memory_peak or 0,
                                   "limit": found.memory_max or 0, "failcnt": found.memory_limit_hits or 0}
        data["pids"] = {"current": found.pids_current or 0, "limit": found.pids_max or 0}
    return {"type": "stats", "id": container_id, "data": data}


def do_events(args, log: Log) -> int:
    """``runc events``: with ``--stats`` one statistics object; without, one every ``--interval`` seconds
    until the container stops."""
    import time

    from stages.runtime.oci import statefile

    while True:
        print(json.dumps(stats_of(args.id, args.root)), flush=True)
        if args.stats:
            return 0
        time.sleep(max(args.interval, 0.05))
        if statefile.status(statefile.read(args.id, args.root), args.root) == "stopped":
            return 0


def do_pause(args, log: Log) -> int:
    _lifecycle("pause", args)
    return 0


def do_resume(args, log: Log) -> int:
    _lifecycle("resume", args)
    return 0


def _lifecycle(verb: str, args) -> None:
    from stages.errors import StagesError

    function = getattr(_oci(), verb, None)
    if function is None:
        raise StagesError(f"{verb} is not supported by this runtime yet",
                          "stop the container instead (kill), or use runc for this one")
    function(args.id, root=args.root)


def do_list(args, log: Log) -> int:
    containers = _oci().list_containers(args.root)
    if args.quiet:
        for item in containers:
            print(item["id"])
        return 0
    rows = []
    for item in containers:
        row = {"ociVersion": item.get("ociVersion"), "id": item["id"], "pid": item.get("pid", 0),
               "status": item["status"], "bundle": item.get("bundle"), "rootfs": item.get("rootfs"),
               "created": item.get("created"), "owner": _owner(item["id"], args.root),
               "annotations": item.get("annotations") or {}}
        rows.append(row)
    if args.format == "json":
        print(json.dumps(rows))
        return 0
    table = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
    table += [(row["id"], str(row["pid"]), row["status"], row["bundle"] or "", row["created"] or "",
               row["owner"]) for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]) - 1)]
    for line in table:
        print("   ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "   " + line[-1])
    return 0


def _owner(container_id: str, root: str | None) -> str:
    import pwd

    from stages.runtime.oci import statefile

    try:
        uid = os.stat(statefile.directory(container_id, root)).st_uid
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError):
        return "?"


#: The architecture names runc's features list (libseccomp's); ours are those this libseccomp resolves.
SECCOMP_ARCHS = tuple(f"SCMP_ARCH_{name}" for name in (
    "AARCH64", "ARM", "MIPS", "MIPS64", "MIPS64N32", "MIPSEL", "MIPSEL64", "MIPSEL64N32", "PPC", "PPC64",
    "PPC64LE", "RISCV64", "S390", "S390X", "X32", "X86", "X86_64"))


def features() -> dict:
    """What this runtime supports, in the shape of the runtime spec's features.md, read from the library
    (so that it cannot claim what the library refuses)."""
    from stages import __version__, kernel
    from stages.runtime.oci import spec

    last = kernel.last_capability()
    return {
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": spec.OCI_VERSION,
        "hooks": _hooks(spec),
        "mountOptions": sorted(set(spec._FLAG_OPTIONS) | set(spec._PROPAGATION_OPTIONS)),
        "linux": {
            "namespaces": sorted(spec.NAMESPACE_TYPES),
            "capabilities": [f"CAP_{name.upper()}" for name in kernel.CAPABILITIES[:last + 1]],
            # cgroupsPath in systemd's shape is read, but no systemd unit is made (see --systemd-cgroup)
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False, "rdma": False},
            "seccomp": _seccomp(spec),
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
        },
        "annotations": {"org.stages.version": __version__, "org.stages.runtime": PROGRAM},
    }


def _hooks(spec) -> list[str]:
    if "hooks" in spec._UNSUPPORTED:
        return []
    from stages.runtime.oci import hooks

    return list(hooks.KINDS)


def _seccomp(spec) -> dict:
    if "linux.seccomp" in spec._UNSUPPORTED:
        return {"enabled": False}
    from stages.runtime.oci import seccomp

    if not seccomp.available():
        return {"enabled": False}
    library = seccomp._library()
    refused = getattr(seccomp, "_REFUSED_FLAGS", {})
    return {
        "enabled": True,
        "actions": sorted(seccomp.ACTIONS),
        "operators": sorted(seccomp.OPERATORS),
        "archs": [name for name in SECCOMP_ARCHS
                  if library.seccomp_arch_resolve_name(name.removeprefix("SCMP_ARCH_").lower().encode())],
        "knownFlags": sorted(set(seccomp.FLAGS) | set(refused)),
        "supportedFlags": sorted(seccomp.FLAGS),
    }


def do_features(args, log: Log) -> int:
    print(json.dumps(features(), indent=4))
    return 0


def do_spec(args, log: Log) -> int:
    from stages.errors import StagesError

    if args.rootless:
        raise StagesError("spec --rootless: this runtime runs containers as root only",
                          "leave out --rootless")
    path = os.path.join(os.path.abspath(args.bundle), "config.json")
    if os.path.exists(path):
        raise StagesError(f"{path} exists already", "remove it first, or write into another --bundle")
    from stages.runtime.oci.spec import runc_spec

    _oci().write_bundle(args.bundle, runc_spec(["sh"]))
    return 0


HANDLERS = {"create": do_create, "start": do_start, "run": do_run, "state": do_state, "kill": do_kill,
            "delete": do_delete, "exec": do_exec, "ps": do_ps, "pause": do_pause, "resume": do_resume,
            "list": do_list, "features": do_features, "spec": do_spec, "update": do_update,
            "events": do_events}


def version_text() -> str:
    from stages import __version__
    from stages.runtime.oci.spec import OCI_VERSION

    return f"{PROGRAM} version {__version__}\nspec: {OCI_VERSION}\npython: {sys.version.split()[0]}"


def main(argv: list[str] | None = None) -> int:
    """``stages-oci``'s entry point: the exit code (0 done, 1 error, 2 a wrong command line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    log = Log()
    name = command_name(argv)
    parser = build_parser(name if name in HANDLERS and "--help" not in argv and "-h" not in argv else None)
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        # The log options may be parsed already: the supervisor looks for the error in its log.
        log = _log_from(argv)
        command = next((word for word in argv if word in HANDLERS), "")
        log.error(f"{error}; hint: see `{' '.join(filter(None, (PROGRAM, command, '--help')))}`")
        return 2
    log = Log(args.log, args.log_format, args.debug)
    if args.version:
        print(version_text())
        return 0
    if not args.command:
        parser.print_help()
        return 0
    if args.systemd_cgroup or args.cgroup_manager != "cgroupfs":
        given = "--systemd-cgroup" if args.systemd_cgroup else f"--cgroup-manager {args.cgroup_manager}"
        log.debug(f"{given}: no systemd scope is asked for; the container's cgroup is made below our own "
                  "cgroup, named by cgroupsPath's last part")
    log.debug(f"{PROGRAM} {' '.join(argv)}")
    return _dispatch(args, log)


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived (a supervisor gave up on us): unwind, so that what was set up is undone.

    A BaseException, as KeyboardInterrupt: no ``except Exception`` on the way may swallow it.
    """

    def __init__(self, number: int):
        super().__init__(number)
        self.number = number


def _interrupt(number: int, _frame) -> None:
    import signal

    # once: a second signal must not break off the undoing the first one started
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise Interrupted(number)


def _dispatch(args, log: Log) -> int:
    import signal

    from stages.errors import StagesError

    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _interrupt)
    try:
        return HANDLERS[args.command](args, log)
    except Interrupted as interrupted:
        name = signal.Signals(interrupted.number).name
        log.error(f"{args.command}: interrupted by {name}; what it had set up was released")
        return 128 + interrupted.number
    except StagesError as error:
        message, hint = error.message, error.hint
        if type(error).__name__ == "ContainerNotFoundError":
            from stages.runtime.oci import statefile

            # runc's words: podman and containerd look for "does not exist" to tell a container is gone
            message = f"container {args.id!r} does not exist (in {statefile.root_directory(args.root)})"
            hint = f"`{PROGRAM} list` shows the containers there; --root picks another directory"
        log.error(message + (f"; hint: {hint}" if hint else ""))
        return 1
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        log.error(f"{args.command}: {error.strerror or error}{where}")
        return 1
    except KeyboardInterrupt:
        log.error(f"{args.command}: interrupted; what it had set up was released")
        return 130
    except Exception as error:  # a bug: one sentence, and the traceback only when asked for
        if args.debug:
            import traceback

            log.debug(traceback.format_exc())
        log.error(f"{args.command}: internal error: {type(error).__name__}: {error} (a bug in stages: please "
                  "report it with the output of --debug)")
        return 1


def _log_from(argv: list[str]) -> Log:
    """The log options of a command line argparse refused, as far as they can be read."""
    path, form = None, "text"
    for index, word in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else None
        if word == "--log" and following:
            path = following
        elif word.startswith("--log="):
            path = word.partition("=")[2]
        elif word == "--log-format" and following in ("text", "json"):
            form = following
        elif word in ("--log-format=json", "--log-format=text"):
            form = word.partition("=")[2]
    return Log(path, form)


if __name__ == "__main__":
    sys.exit(main())
