"""The Isolate: an LXC-style container wired by hand, one step per method call.

::

    from stages.isolate import Isolate

    with Isolate("/var/lib/stages/rootfs/busybox") as iso:
        iso.unshare("uts")                 # unshare --uts
        iso.set_hostname("box")            # hostname box
        print(iso.run(["hostname"]).stdout)   # box (and the host keeps its name)
        iso.unshare("mount", "pid")        # unshare --mount --pid (+ mount --make-rprivate /)
        iso.mount_proc()                   # mount -t proc proc /proc
        iso.pivot_root()                   # the rootfs becomes /
        print(iso.run(["ps", "ax"]).stdout)    # PID 1 is the holder
        iso.harden()                       # Docker's defences: /proc/sys read-only, device allowlist,
                                           # capabilities, no_new_privs, seccomp
    print(iso.record.script())             # the whole sequence, as a person would type it

The namespaces are held by a child process, the *holder* (:mod:`stages.isolate.holder`), never by the
caller. Steps that must happen inside (unshare, sethostname, mount, pivot_root) are sent to the holder;
steps that happen from outside, as LXC's monitor does them (uid_map, cgroup.procs, moving a veth), are done
here, by the caller, on the holder's pid. A step called out of order raises :class:`StepOrderError` whose
message is the lesson: why the kernel needs the other step first.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

from stages import kernel, observe
from stages import rootfs as rootfs_module
from stages import steps as steps_module
from stages.errors import (
    CommandNotFoundError,
    NotRootError,
    StagesError,
    StepOrderError,
)
from stages.isolate import privileges
from stages.isolate.holder import Channel
from stages.isolate.state import IsolateState, start_time

DEFAULT_CAPS = privileges.DEFAULT_CAPS

# Isolates started and not closed yet: closed at interpreter exit, so that a script that forgets close()
# leaves no cgroup or network device behind (the holder itself would die with us anyway, PR_SET_PDEATHSIG).
_open_isolates: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_forgotten() -> None:
    for isolate in list(_open_isolates):
        try:
            isolate.close()
        except Exception:  # noqa: BLE001 - at exit, release what we can
            pass

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,11}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")

# What each namespace isolates, for messages and notebooks (namespaces(7)).
ISOLATES = {
    "uts": "the hostname", "pid": "process IDs", "mount": "the mount table", "ipc": "System V IPC and "
    "POSIX message queues", "net": "network devices, addresses, ports and firewall", "user": "user and "
    "group IDs, and capabilities", "cgroup": "the view of the cgroup tree", "time": "the boot and "
    "monotonic clocks",
}


class StepFailedError(StagesError, OSError):
    """A step the kernel refused; ``errno`` says why, the message names the call and the usual cause."""

    def __init__(self, message: str, hint: str | None = None, errno: int | None = None):
        StagesError.__init__(self, message, hint)
        self.errno = errno


class HolderDiedError(StagesError):
    """The process holding the isolate's namespaces is gone."""


@dataclass
class RunResult:
    """What a command run inside returned, like subprocess.CompletedProcess."""

    argv: list[str]
    returncode: int
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def __str__(self) -> str:
        return self.stdout


@dataclass(frozen=True)
class NamespaceView:
    """One namespace type seen from both sides: the inode on the host (the caller) and inside."""

    name: str
    host: int
    inside: int

    @property
    def own(self) -> bool:
        """Whether the isolate has a namespace of its own of this type."""
        return self.host != self.inside


class Isolate:
    """A process in namespaces of its own, wired step by step. See the module docstring.

    ``rootfs`` is the directory that becomes its root (:func:`stages.rootfs.build` makes one). ``name``
    (letters, digits, '-', at most 12) names its cgroup and network devices; ``record`` receives every step.
    Use it as a context manager, or call :meth:`start` and :meth:`close` yourself.

    The holder dies with the *thread* that started it (PR_SET_PDEATHSIG, prctl(2)), so start an isolate
    from a thread that lives as long as the isolate: the main thread, in a script or a notebook.
    """

    def __init__(self, rootfs: str | os.PathLike, *, name: str | None = None,
                 record: steps_module.StepRecord | None = None):
        self.name = name or f"iso-{secrets.token_hex(3)}"
        if not _NAME.match(self.name):
            raise StagesError(f"{self.name!r} cannot name an isolate",
                              "use lowercase letters, digits and '-', at most 12 (it names network devices)")
        self.rootfs = Path(rootfs)
        self.record = record if record is not None else steps_module.StepRecord(f"isolate {self.name}")
        self.pid: int | None = None  # host pid of the process doing the steps inside (PID 1 after pid)
        self.unshared: list[str] = []
        self.user_map: str | None = None
        self.pivoted = False
        self.mounted: dict[str, int | None] = {}  # mount name -> pid namespace inode it was made in
        self.cgroup = None
        self.wiring = None
        self._pending: set[str] = set()  # pid/time namespaces no process has entered yet
        self.proc_protected: int | None = None  # the PID namespace whose /proc protect_proc() covered
        self.capabilities: list[str] | None = None  # the bounding set after drop_capabilities()
        self.no_new_privs = False
        self.filtered: list[str] = []  # the seccomp rules installed
        self.devices: list[str] | None = None  # the device allowlist, as devices.list shows it
        self._process: subprocess.Popen | None = None
        self._channel: Channel | None = None
        self._busy = False
        self._closed = False
        self._state = IsolateState(self.name)

    # == life ======================================================================================
    def start(self) -> Isolate:
        """Start the holder: a fresh single-threaded Python that will hold the namespaces."""
        if self._process is not None:
            raise StepOrderError("this isolate is already started", "use it, or make a new Isolate")
        if not kernel.is_root():
            raise NotRootError("an isolate")
        root = rootfs_module.check(self.rootfs)
        self.rootfs = root
        if self._state.path.exists():
            old = IsolateState(**__import__("json").loads(self._state.path.read_text()))
            if old.holder_alive():
                raise StagesError(f"an isolate named {self.name} is running already (pid {old.holder_pid})",
                                  "choose another name, or stop that one first")
            from stages.isolate.state import release

            release(old)  # the leftovers of a dead one with the same name
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        package_parent = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        try:
            with ours, theirs:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "stages.isolate", str(theirs.fileno()), str(os.getpid()),
                     str(root)],
                    pass_fds=(theirs.fileno(),), env=env, cwd="/", close_fds=True,
                )
                self._channel = Channel(ours.dup())
        except OSError as error:
            raise StagesError(f"could not start the holder process: {error}",
                              "check that this Python can run: " + sys.executable) from None
        _open_isolates.add(self)
        self._state.holder_pid = self._process.pid
        self._state.holder_start = start_time(self._process.pid)
        self._state.rootfs = str(root)
        self._state.save()
        try:
            self.pid = self._request("status")["pid"]
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Isolate:
        return self.start() if self._process is None else self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None and not self._closed

    def close(self) -> None:
        """Tear everything down: the processes inside, then the network wiring, then the cgroup, then the
        state file. Safe to call twice, after an error, and after the holder was killed."""
        if self._closed:
            return
        self._closed = True
        _open_isolates.discard(self)
        errors: list[BaseException] = []
        try:
            self._stop_holder()
        except BaseException as error:  # noqa: B036 - keep tearing down, raise at the end
            errors.append(error)
        for resource in (self.wiring, self.cgroup):
            if resource is None:
                continue
            try:
                resource.teardown() if hasattr(resource, "teardown") else resource.remove()
            except BaseException as error:  # noqa: B036
                errors.append(error)
        if not errors:
            self._state.remove()
        if errors:
            raise errors[0]

    stop = close

    def _stop_holder(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None and not self._busy and self._channel is not None:
            try:
                self._channel.send({"op": "stop"})
                self._channel.receive(timeout=5)
            except (OSError, ValueError):
                pass
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if process.poll() is None:
            self._kill_tree(process.pid)
            process.wait()
        if self._channel is not None:
            self._channel.sock.close()
            self._channel = None

    @staticmethod
    def _kill_tree(pid: int) -> None:
        """SIGKILL ``pid`` and every process below it (read from /proc/PID/task/*/children, proc(5))."""
        tree, queue = [], [pid]
        while queue:
            current = queue.pop()
            tree.append(current)
            for task in _listdir(f"/proc/{current}/task"):
                try:
                    with open(f"/proc/{current}/task/{task}/children") as handle:
                        queue.extend(int(word) for word in handle.read().split())
                except OSError:
                    continue
        for member in tree:
            try:
                os.kill(member, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # == talking to the holder =====================================================================
    def _request(self, op: str, **arguments):
        if self._process is None:
            raise StepOrderError("the isolate is not started",
                                 "use `with Isolate(rootfs) as iso:` or call start()")
        if self._closed:
            raise StepOrderError("the isolate is closed", "make a new Isolate")
        if self._pending and op not in ("enter", "time_offsets", "status"):
            self._enter()
        self._busy = True
        try:
            self._channel.send({"op": op, **arguments})
            reply = self._channel.receive()
        except OSError as error:
            reply = None
            if not isinstance(error, (BrokenPipeError, ConnectionResetError)):
                raise
        except KeyboardInterrupt:
            # Ctrl-C (or Jupyter's interrupt) while a command ran inside: end the command, collect the
            # holder's answer, and keep the isolate usable.
            if op == "run":
                self._interrupt_command()
            raise
        self._busy = False
        if reply is None:
            code = self._process.poll()
            raise HolderDiedError(
                f"the isolate's holder process died (exit status {code}); its namespaces are gone",
                "close this isolate (stages.isolate.cleanup() removes what it left) and start a new one",
            )
        self.record.extend(reply.get("steps", []))
        if not reply["ok"]:
            raise _error_from(reply["error"], op)
        return reply["result"]

    def _interrupt_command(self) -> None:
        for child in _children_of(self.pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            reply = self._channel.receive(timeout=5)
        except (OSError, ValueError):
            return
        if reply is not None:
            self.record.extend(reply.get("steps", []))
            self._busy = False

    def _enter(self) -> None:
        self._pending.clear()
        self.pid = self._request("enter")["pid"]

    def _require(self, namespace: str, why: str, hint: str | None = None) -> None:
        if namespace not in self.unshared:
            raise StepOrderError(why, hint or f"call unshare({namespace!r}) first")

    def _require_mapped(self, what: str) -> None:
        if "user" in self.unshared and self.user_map is None:
            raise StepOrderError(
                f"{what} needs the user namespace's IDs mapped: until uid_map is written, root inside is "
                "'nobody' (65534) and may create no file",
                "call map_user() first",
            )

    # == namespaces ================================================================================
    def unshare(self, *names: str) -> dict[str, NamespaceView]:
        """Give the isolate new namespaces of the kinds named (uts, pid, mount, ipc, net, user, cgroup,
        time), all in one unshare(2) call. Returns each one's inode on the host and inside.

        PID and time namespaces apply to the *children* of the process that unshares; the holder forks
        its first child into them at the next step (after :meth:`time_offsets`, for time).
        """
        self._not_filtered("unshare")
        if not names:
            raise StagesError("unshare() needs at least one namespace",
                              f"name some of: {', '.join(kernel.NAMESPACES)}")
        for name in names:
            if name not in kernel.NAMESPACES:
                raise StagesError(f"there is no {name!r} namespace",
                                  f"the kinds are: {', '.join(kernel.NAMESPACES)}")
            if name in self.unshared:
                raise StepOrderError(f"the isolate already has its own {name} namespace",
                                     "each namespace is unshared once; look at it with namespaces()")
            if not kernel.namespace_available(name):
                raise StagesError(f"this kernel has no {name} namespaces",
                                  "skip it, or use a newer kernel (time namespaces need Linux 5.6)")
        if "user" in names and self.unshared:
            raise StepOrderError(
                "the user namespace must come first: the namespaces made before it ("
                + ", ".join(self.unshared) + ") belong to the host's user namespace, so root in the new one "
                "would hold no capability over them (sethostname would fail with EPERM)",
                "start a new isolate and unshare('user') first, or together with the others",
            )
        self._request("unshare", names=list(names))
        self.unshared.extend(names)
        self._pending |= {"pid", "time"} & set(names)
        if self._pending and "time" not in self._pending:
            self._enter()
        views = self.namespaces()
        return {name: views[name] for name in names if name in views}

    def time_offsets(self, monotonic: float = 0.0, boottime: float = 0.0) -> str:
        """Shift the monotonic and boot-time clocks of the new time namespace by so many seconds.

        Only possible between ``unshare("time")`` and the first process in the namespace
        (time_namespaces(7)), so it is the step right after that unshare. Returns the offsets as the
        kernel shows them.
        """
        self._require("time", "clock offsets belong to a time namespace, and the isolate has none yet")
        if "time" not in self._pending:
            raise StepOrderError(
                "the time namespace already has a process in it, and its clocks can be shifted only before "
                "the first process enters (time_namespaces(7))",
                "call time_offsets() right after unshare('time'), before any other step",
            )
        text = self._request("time_offsets", monotonic=float(monotonic), boottime=float(boottime))
        self._enter()
        return text

    def namespaces(self) -> dict[str, NamespaceView]:
        """For each namespace type: its inode for the caller (the host) and for the isolate."""
        if self.pid is None:
            raise StepOrderError("the isolate is not started", "call start() first")
        host, inside = observe.namespace_inodes(os.getpid()), observe.namespace_inodes(self.pid)
        return {name: NamespaceView(name, host[name], inside[name]) for name in host if name in inside}

    def map_user(self, inside: int = 0, outside: int = 100000, count: int = 65536) -> str:
        """From outside, map user and group IDs ``inside..inside+count`` of the user namespace to
        ``outside..`` on the host: root inside is then uid ``outside`` on the host, a nobody.

        Writes ``deny`` to setgroups, then uid_map and gid_map of the holder (user_namespaces(7)); each
        map can be written only once. Returns the uid_map as the kernel shows it.
        """
        self._require("user", "there is no user namespace to map IDs into")
        if self.user_map is not None:
            raise StepOrderError("the IDs are mapped already, and uid_map can be written only once "
                                 "(user_namespaces(7))", "start a new isolate for a different map")
        for value, what in ((inside, "inside"), (outside, "outside"), (count, "count")):
            if not isinstance(value, int) or value < 0 or (what == "count" and value == 0):
                raise StagesError(f"map_user({what}={value!r}) is not a valid ID range",
                                  "use whole numbers, e.g. map_user(inside=0, outside=100000, count=65536)")
        line = f"{inside} {outside} {count}"
        # setgroups "deny" first: a process that could drop its supplementary groups could get past a
        # file's "no access for this group" permission; unprivileged maps need it, and so do we.
        for file, value, what in (("setgroups", "deny", "no setgroups(2) inside (user_namespaces(7))"),
                                  ("uid_map", line, f"uid {inside} inside is uid {outside} on the host"),
                                  ("gid_map", line, f"gid {inside} inside is gid {outside} on the host")):
            path = f"/proc/{self.pid}/{file}"
            with self.record.step(f"echo '{value}' > {path}", what=what, where="outside"):
                try:
                    with open(path, "w") as handle:
                        handle.write(value + "\n")
                except OSError as error:
                    raise StepFailedError(f"writing {value!r} to {path} failed: {error.strerror}",
                                          "each ID must be unused in the map, and the range must exist "
                                          "on the host (at most 4294967295)", error.errno) from None
        with open(f"/proc/{self.pid}/uid_map") as handle:
            self.user_map = handle.read()
        self._request("become", uid=inside, gid=inside)
        return self.user_map

    # == hostname, mounts, root ====================================================================
    def set_hostname(self, name: str) -> str:
        """Give the isolate its own hostname (sethostname(2)); returns the hostname seen inside."""
        self._require("uts", "without its own UTS namespace, setting the hostname would rename the host",
                      "call unshare('uts') first")
        if not isinstance(name, str) or not _HOSTNAME.match(name):
            raise StagesError(f"{name!r} is not a hostname",
                              "use letters, digits and '-', at most 63, not starting or ending with '-'")
        return self._request("set_hostname", name=name)

    def make_private(self) -> list[str]:
        """Make every mount private (``mount --make-rprivate /``), so that no mount event crosses between
        the host and the isolate. :meth:`unshare` already does it with the mount namespace, as unshare(1)
        does; call it again to look. Returns each mount point with its propagation."""
        self._require("mount", "without its own mount namespace, this would change the host's mounts",
                      "call unshare('mount') first")
        return self._request("make_private")

    def _not_filtered(self, call: str) -> None:
        if self.filtered and call in self.filtered:
            raise StepOrderError(f"the seccomp filter refuses {call}(2) now, to the holder too",
                                 "make seccomp() the last step: start a new isolate")

    def _mount(self, kind: str) -> str:
        self._not_filtered("mount")
        self._require("mount", f"without its own mount namespace, mounting {kind} would mount it on the host "
                               "(and it would outlive the isolate)", "call unshare('mount') first")
        self._require_mapped(f"mounting {kind}")
        return kind

    def _pid_namespace(self) -> int:
        return observe.namespace_inodes(self.pid).get("pid", 0)

    def mount_proc(self) -> list[observe.Mount]:
        """Mount a fresh /proc. Before the PID namespace it shows the host's processes; after it, the
        isolate's own (PID 1 first). Calling it again after unshare('pid') replaces the old one."""
        self._mount("/proc")
        if "user" in self.unshared and "pid" not in self.unshared:
            raise StepOrderError(
                "inside a user namespace, a /proc can be mounted only for a PID namespace that user "
                "namespace owns, and this isolate still shares the host's",
                "call unshare('pid') first",
            )
        replace = "proc" in self.mounted
        if replace and self.mounted["proc"] == self._pid_namespace():
            raise StepOrderError("/proc is mounted already, for this PID namespace",
                                 "look at it with run(['ps']); mount it again only after unshare('pid')")
        self._request("mount_proc", replace=replace)
        self.mounted["proc"] = self._pid_namespace()
        self.proc_protected = None  # a new /proc: nothing of it is masked yet
        return self._mounts_at("/proc")

    def mount_sys(self) -> list[observe.Mount]:
        """Mount /sys read-only: the kernel's view of devices, which a container may read but not change."""
        self._once("sys", self._mount("/sys"))
        self._request("mount_sys")
        self.mounted["sys"] = None
        return self._mounts_at("/sys")

    def mount_tmp(self) -> list[observe.Mount]:
        """Mount a tmpfs on /tmp: scratch space of the isolate's own, in memory."""
        self._once("tmp", self._mount("/tmp"))
        self._request("mount_tmp")
        self.mounted["tmp"] = None
        return self._mounts_at("/tmp")

    def mount_dev(self) -> list[str]:
        """Make a minimal /dev: a tmpfs with null, zero, full, random, urandom and tty, devpts (with its
        own ptmx) and /dev/shm. Returns the names in /dev.

        Inside a user namespace mknod(2) is refused, so the device nodes are bind-mounted from the host's
        /dev, which is reachable only before :meth:`pivot_root`.
        """
        self._mount("/dev")
        if "dev" in self.mounted:
            raise StepOrderError("/dev is made already", "look at it with run(['ls', '/dev'])")
        if "user" in self.unshared and self.pivoted:
            raise StepOrderError(
                "inside a user namespace device nodes cannot be made (mknod needs CAP_MKNOD in the host's "
                "user namespace), only bind-mounted from the host's /dev, which pivot_root put out of reach",
                "call mount_dev() before pivot_root()",
            )
        names = self._request("mount_dev")
        self.mounted["dev"] = None
        return names

    def _once(self, name: str, kind: str) -> None:
        if name in self.mounted:
            raise StepOrderError(f"{kind} is mounted already", "look at it with run(['mount'])")

    def _mounts_at(self, target: str) -> list[observe.Mount]:
        path = target if self.pivoted else str(self.rootfs / target.lstrip("/"))
        return [m for m in observe.mounts(self.pid) if m.target == path]

    def protect_proc(self) -> list[str]:
        """Hide what /proc and /sys must not show, and make read-only what they must not change, as every
        container runtime does (the OCI spec's maskedPaths and readonlyPaths,
        :data:`stages.isolate.filesystem.MASKED_PATHS` and ``READONLY_PATHS``). Returns the paths changed.

        Most of /proc/sys is the host's, not the isolate's: without this step root inside may write
        /proc/sys/kernel/core_pattern (the program the host's kernel runs as root when anything crashes) or
        /proc/sysrq-trigger (one letter reboots the host). Call it after :meth:`mount_proc` (and
        :meth:`mount_sys`, which it covers too).
        """
        self._mount("/proc")
        if "proc" not in self.mounted:
            raise StepOrderError("there is no /proc of the isolate's own to protect yet",
                                 "call mount_proc() first (and mount_sys(), for /sys/firmware)")
        if self.proc_protected == self.mounted["proc"]:
            raise StepOrderError("/proc is protected already",
                                 "try it: run(['sh', '-c', 'echo x > /proc/sys/kernel/hostname'])")
        changed = self._request("protect_proc")
        self.proc_protected = self.mounted["proc"]
        return changed

    def pivot_root(self) -> list[str]:
        """Make the rootfs the isolate's / and detach the host's root (pivot_root(2)): unlike chroot, the
        old root is gone from the mount namespace, so no climb leads back. Returns the names in / inside.
        """
        self._require("mount", "pivot_root needs a mount namespace of its own, else it would change the "
                               "host's root", "call unshare('mount') first")
        self._not_filtered("pivot_root")
        if self.pivoted:
            raise StepOrderError("the root is pivoted already", "the rootfs is / now; see run(['ls', '/'])")
        self._require_mapped("pivot_root")
        names = self._request("pivot_root")
        self.pivoted = True
        return names

    # == privileges ================================================================================
    def drop_capabilities(self, keep=DEFAULT_CAPS) -> dict:
        """Reduce the capability bounding set to ``keep`` (default: Docker's list): commands started
        inside can never hold the others, even as root. Returns ``{"dropped": [...], "bounding": [...]}``."""
        for name in keep:
            try:
                kernel.capability_number(name)
            except ValueError:
                raise StagesError(f"there is no capability {name!r}",
                                  "see capabilities(7); write them like 'net_admin' or 'CAP_NET_ADMIN'",
                                  ) from None
        result = self._request("drop_capabilities", keep=list(keep))
        self.capabilities = result["bounding"]
        return result

    def set_no_new_privs(self) -> bool:
        """Set no_new_privs: no execve inside can ever grant privileges (setuid bits are ignored)."""
        self.no_new_privs = self._request("set_no_new_privs")
        return self.no_new_privs

    def seccomp(self, deny=privileges.HARDENED_DENY, *, namespace_flags=tuple(privileges.NAMESPACE_FLAGS),
                enosys=privileges.ENOSYS_CALLS) -> list[str]:
        """Make the system calls in ``deny`` fail with EPERM inside (a seccomp filter, seccomp(2)), and
        clone(2) with any of ``namespace_flags``, and those in ``enosys`` fail with ENOSYS.

        The defaults refuse what Docker's default profile refuses a container without CAP_SYS_ADMIN
        (:data:`stages.isolate.privileges.HARDENED_DENY`): new namespaces (``unshare -U -r`` would hand
        root every capability again, in a user namespace of its own), mount, kernel modules, ptrace, the
        keyring, the clocks, reboot ... The filter binds the holder too, so make it the last step.
        Without libseccomp installed this does nothing and returns ``[]``; otherwise it returns the rules.
        """
        if not privileges.seccomp_available():
            return []
        for flag in namespace_flags:
            if flag not in privileges.NAMESPACE_FLAGS:
                raise StagesError(f"{flag!r} is not a namespace flag of clone(2)",
                                  f"choose from {', '.join(privileges.NAMESPACE_FLAGS)}")
        rules = self._request("seccomp", deny=list(deny), namespace_flags=list(namespace_flags),
                              enosys=list(enosys))
        self.filtered.extend(rules)
        return rules

    def limit_devices(self, rules=None) -> list[str]:
        """From outside, let the isolate open and create only the device nodes it needs: deny everything,
        then allow null, zero, full, random, urandom, tty, ptmx, its terminals, /dev/net/tun, and mknod
        (harmless then) (:data:`stages.isolate.devices.DEFAULT_RULES`, Docker's list), in its cgroup:
        cgroup v1's devices.deny and devices.allow, or on cgroup v2 a BPF program attached to it
        (:meth:`stages.isolate.cgroups.Cgroup.allow_devices`). Returns the allowlist.

        A device node is only a number: root with CAP_MKNOD may ``mknod /tmp/disk b 8 0`` anywhere and
        read the host's disk, whatever /dev holds.
        """
        cgroup = self._cgroup(devices=True)
        self.devices = cgroup.allow_devices(rules)
        return self.devices

    def harden(self) -> dict:
        """Every defence Docker applies by default that is still missing, in the order the kernel needs:
        the device allowlist (from outside), :meth:`protect_proc`, :meth:`drop_capabilities`,
        :meth:`set_no_new_privs`, then :meth:`seccomp` (last: it refuses mount to the holder too).

        Where the machine has no device cgroup at all (neither v1's controller nor v2), CAP_MKNOD is
        dropped too, so that no device node can be made at all. Returns what each step did.
        """
        from stages.isolate import cgroups

        self._require("mount", "without a mount namespace of its own the isolate writes the host's /proc/sys "
                               "(no capability is needed for core_pattern, only uid 0), and nothing can make "
                               "it read-only for the isolate alone", "call unshare('mount') first")
        if "proc" not in self.mounted:
            raise StepOrderError("harden() protects the isolate's /proc, and there is none yet",
                                 "call mount_proc() first")
        if not privileges.seccomp_available():
            raise StagesError("harden() needs a seccomp filter, and libseccomp is not installed",
                              "install it (apt-get install libseccomp2), or apply the other steps one by one")
        done: dict = {}
        keep = list(DEFAULT_CAPS)
        if self.devices is None:
            devices = cgroups.detect().extras.get("devices")
            if devices is not None:
                done["devices"] = self.limit_devices()
            else:
                # without any allowlist a node made by mknod opens whatever it names, so no node may be made
                keep.remove("mknod")
                why = "this machine has no devices cgroup"
                with self.record.step(f"# {why}: CAP_MKNOD goes instead", where="outside",
                                      what="no device allowlist, so no device node may be made"):
                    pass
                done["devices"] = f"{why}, so CAP_MKNOD is dropped instead"
        if self.proc_protected != self.mounted["proc"]:
            done["protect_proc"] = self.protect_proc()
        if self.capabilities is None or set(self.capabilities) - set(keep):
            done["drop_capabilities"] = self.drop_capabilities(keep)
        if not self.no_new_privs:
            done["set_no_new_privs"] = self.set_no_new_privs()
        if not self.filtered:
            done["seccomp"] = self.seccomp()
        return done

    # == commands ==================================================================================
    def run(self, argv: list[str] | str, *, input: str | None = None, capture: bool = True,
            timeout: float | None = None, env: dict | None = None, cwd: str = "/",
            check: bool = False) -> RunResult:
        """Run a command inside, in the isolate's root (the rootfs, chrooted until :meth:`pivot_root`),
        namespaces and privileges; return its exit code and output.

        A string is run by ``sh -c``. ``capture=False`` connects the command to the standard input and
        output the caller had when the isolate started (the terminal, for ``stages isolate``).
        After ``timeout`` seconds the command is killed (``timed_out`` is then True). ``check=True``
        raises :class:`StagesError` on a non-zero exit code.
        """
        command = ["sh", "-c", argv] if isinstance(argv, str) else [str(part) for part in argv]
        if not command:
            raise StagesError("run() needs a command", "for instance iso.run(['ps', 'ax'])")
        try:
            reply = self._request("run", argv=command, env=env, cwd=cwd, capture=capture, input=input,
                                  timeout=timeout)
        except StepFailedError as error:
            if error.errno in (2, 13, 8) and str(error.message).startswith(command[0]):
                raise CommandNotFoundError(
                    f"{command[0]} cannot run inside the isolate: {error.message.split(': ', 1)[-1]}",
                    "the isolate sees only its rootfs: is the program in it (and on PATH)? "
                    "look with iso.run(['ls', '/bin'])",
                ) from None
            raise
        result = RunResult(command, reply["returncode"], reply["stdout"], reply["stderr"], reply["timed_out"])
        if check and result.returncode != 0:
            raise StagesError(f"{shlex.join(command)} failed inside the isolate with exit code "
                              f"{result.returncode}: {result.stderr.strip()[:200]}",
                              "look at the command's output (run it without check=True)")
        return result

    def call(self, function, *args):
        """Call ``function(*args)`` in a forked child inside the isolate and return its value (bytes come
        back as text). The function must be importable by module and name, and its module loaded before
        pivot_root (see :data:`stages.isolate.holder.PRELOAD`). Its exceptions are raised here."""
        reply = self._request("call", module=function.__module__, function=function.__qualname__,
                              args=list(args))
        if reply["ok"]:
            return reply["value"]
        error = reply["error"]
        if "errno" in error:  # OSError picks the subclass the errno stands for (FileNotFoundError ...)
            raise OSError(error["errno"], error["message"])
        raise _error_from(error, "call")

    # == resources on the host: cgroups and network ===============================================
    def limit(self, *, memory: int | str | None = None, pids: int | str | None = None,
              cpus: float | str | None = None):
        """Put the isolate in a cgroup of its own with these limits (from outside, as LXC's monitor does).

        ``memory`` like ``"64M"``, ``pids`` a number of processes, ``cpus`` like ``0.5``. Everything
        started inside afterwards is limited. Returns the :class:`stages.isolate.cgroups.Cgroup`.
        """
        if memory is None and pids is None and cpus is None:
            raise StagesError("limit() needs at least one limit", "e.g. iso.limit(memory='64M', pids=32)")
        self._cgroup()
        if memory is not None:
            self.cgroup.set_memory(memory)
        if pids is not None:
            self.cgroup.set_pids(pids)
        if cpus is not None:
            self.cgroup.set_cpus(cpus)
        return self.cgroup

    def _cgroup(self, devices: bool = False):
        """The isolate's cgroup, made (and the holder moved in) on first use; with the devices controller
        too when ``devices``."""
        from stages.isolate import cgroups

        if self.cgroup is None:
            if self.pid is None:
                raise StepOrderError("the isolate is not started", "call start() first")
            self._state.cgroups.append(self.name)
            self._state.save()  # written down before the directory exists: cleanup() can find it
            if devices:
                layout = cgroups.detect()
                controllers = [c for c in cgroups.CONTROLLERS if c in layout.controllers] + ["devices"]
                self.cgroup = cgroups.Cgroup.create(self.name, record=self.record, controllers=controllers)
            else:
                self.cgroup = cgroups.Cgroup.create(self.name, record=self.record)
            self.cgroup.add(self.pid)
        elif devices:
            self.cgroup.add_controller("devices")
        return self.cgroup

    def connect(self, address: str | None = None, *, subnet: str | None = None, host_netns: str | None = None,
                firewall: str | None = None):
        """Wire the isolate's network namespace to the host, from outside: a veth pair whose one end is
        moved into the isolate by pid, a bridge, addresses, a default route, forwarding and outbound NAT
        (see :func:`stages.isolate.network.wire`). Returns the :class:`~stages.isolate.network.Wiring`.

        ``address`` (e.g. ``"10.200.7.2/24"``) or ``subnet`` choose the addresses (default: a free
        10.200.X.0/24). ``host_netns`` names a network namespace that stands in for the host (tests and
        notebooks use :func:`stages.isolate.network.test_host`), so the real host's network is untouched.
        """
        self._require("net", "there is no network namespace to wire: the isolate still uses the host's "
                             "network", "call unshare('net') first")
        from stages.isolate import network

        if self.wiring is not None:
            raise StepOrderError("the isolate is wired already", "publish ports with publish()")
        self._state.networks.append({"name": self.name, "host_netns": host_netns})
        self._state.save()  # written down before the devices exist: cleanup() can find them
        self.wiring = network.wire(self.pid, name=self.name, address=address, subnet=subnet,
                                   host_netns=host_netns, record=self.record, firewall=firewall)
        return self.wiring

    def publish(self, host_port: int, container_port: int):
        """Forward ``host_port`` on the host to ``container_port`` inside (needs :meth:`connect`)."""
        if self.wiring is None:
            raise StepOrderError("a port can be published only once the isolate is wired to the host",
                                 "call connect() first")
        return self.wiring.publish(host_port, container_port)

    def __repr__(self) -> str:
        state = "running" if self.running else ("closed" if self._closed else "not started")
        return f"<Isolate {self.name} {state} pid={self.pid} namespaces={self.unshared}>"


def _children_of(pid: int | None) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(word) for word in handle.read().split()]
    except OSError:
        return []


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


_ERROR_HINTS = {
    "unshare": "are you root, and single-threaded? see stages doctor",
    "mount_sys": "see stages doctor",
}


def _error_from(error: dict, op: str) -> BaseException:
    """The exception a reply from the holder stands for."""
    from stages import errors

    if error.get("stages"):
        cls = getattr(errors, error["type"], None)
        if not (isinstance(cls, type) and issubclass(cls, StagesError)):
            cls = StagesError
        exception = cls.__new__(cls)
        StagesError.__init__(exception, error["message"], error.get("hint"))
        return exception
    if "errno" in error:
        return StepFailedError(error["message"], _ERROR_HINTS.get(op), error["errno"])
    return StagesError(f"the step {op} failed inside the isolate: {error['type']}: {error['message']}",
                       "this is a bug in stages; the holder's traceback: "
                       + error.get("traceback", "")[-500:])
