"""Control groups by hand: make a cgroup, give it limits, put a process in it, watch the kernel enforce them.

Namespaces decide what a process can *see*; control groups decide how much it can *use*. A cgroup is a
directory in a special file system, and everything about it is a file: ``mkdir`` makes one, writing a
number into ``memory.max`` limits its memory, writing a PID into ``cgroup.procs`` moves a process in, and
``rmdir`` removes it. This module does exactly that, records each write as the shell command a person
would type, and reads the counters back (see cgroups(7) and the kernel's admin-guide/cgroup-v2.rst).

There are two versions of the file system, and a machine may have both:

- **cgroup v1**: one hierarchy per controller (``/sys/fs/cgroup/memory``, ``/sys/fs/cgroup/pids``,
  ``/sys/fs/cgroup/cpu`` ...), each with its own tree and its own file names (``memory.limit_in_bytes``,
  ``cpu.cfs_quota_us``). A process is in one cgroup *per hierarchy*.
- **cgroup v2**: one unified tree, usually at ``/sys/fs/cgroup``, where a controller is switched on for the
  children of a cgroup by writing ``+memory`` into that cgroup's ``cgroup.subtree_control``.

:func:`detect` finds, for each controller we use (memory, pids, cpu), which hierarchy holds it and where
*our own* cgroup is in it (from /proc/self/cgroup). We never assume a layout, and we create cgroups only
below our own cgroup, in a directory called ``stages``, so we never touch a cgroup we did not make::

    <our cgroup>/stages/stages-web        (one such directory per hierarchy that holds a controller)

Why the extra ``stages`` directory? cgroup v2's *no internal processes* rule: a cgroup (other than the
root) may either hold processes or hand controllers down to child cgroups, never both. Our own cgroup
holds us, so on a systemd machine it usually cannot enable controllers for children; a ``stages`` parent
that never holds a process always can. That is what systemd, runc and podman do with delegated subtrees.
In the workshop VM the tests run in the root cgroup, which the rule exempts.

A small session::

    from stages.isolate.cgroups import Cgroup

    with Cgroup.create("demo") as cgroup:       # mkdir .../stages/stages-demo
        cgroup.set_memory("64M")                  # echo 67108864 > .../memory.max
        cgroup.set_pids(20)                       # echo 20 > .../pids.max
        cgroup.set_cpus(0.5)                      # echo 50000 100000 > .../cpu.max
        cgroup.add(pid)                           # echo PID > .../cgroup.procs
        print(cgroup.stats())
    # leaving the block kills what is left inside and removes the directories
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from stages import steps
from stages.errors import CgroupError, LimitError
from stages.steps import StepRecord

#: The controllers this module knows how to limit.
CONTROLLERS = ("memory", "pids", "cpu")
#: What a container runtime needs beyond limits: the freezer (pause and resume) and the device allowlist.
#: A cgroup gets them only when asked (``Cgroup.create(controllers=...)``). On cgroup v2 neither is listed
#: in cgroup.controllers: every non-root cgroup has ``cgroup.freeze`` (Linux 5.2), and device access is
#: checked by a BPF program attached to the cgroup (Linux 4.15; the kernel's cgroup-v2 "Device controller").
EXTRA_CONTROLLERS = ("freezer", "devices")
#: Every cgroup we create is called ``stages-<name>``; :func:`cleanup` only ever touches such names.
PREFIX = "stages-"
#: The stages-owned directory below our own cgroup that holds the ``stages-*`` cgroups.
PARENT = "stages"
#: The smallest memory limit :func:`parse_memory` accepts by default.
MINIMUM_MEMORY = 4 << 20
#: cpu.max / cpu.cfs_period_us: the CFS period, 100 ms, the kernel's default.
CPU_PERIOD_US = 100_000
#: The kernel refuses a CFS quota below 1 ms (sched-bwc.rst).
MINIMUM_QUOTA_US = 1_000

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


# -- where the controllers are ----------------------------------------------------------------------
@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and our own place in it.

    ``version`` is 1 or 2; ``mountpoint`` where it is mounted (``/sys/fs/cgroup/memory``); ``own`` our
    process's cgroup in it as /proc/self/cgroup says (``/process_api/42``); ``controllers`` the
    controllers it holds that this module uses.
    """

    version: int
    mountpoint: str
    own: str
    controllers: tuple[str, ...]
    mount_root: str = "/"

    @property
    def own_directory(self) -> str:
        """Our own cgroup's directory: the only place below which we create anything."""
        own = self.own
        # Inside a cgroup namespace, or when a sub-tree is bind-mounted, the mount shows only part of the
        # tree: mountinfo's root field says which part (proc(5), cgroup_namespaces(7)).
        if self.mount_root != "/" and (own == self.mount_root or own.startswith(self.mount_root + "/")):
            own = own[len(self.mount_root):] or "/"
        return os.path.normpath(self.mountpoint + "/" + own.lstrip("/"))

    @property
    def is_root(self) -> bool:
        """True when our own cgroup is the hierarchy's root (exempt from the no-internal-process rule)."""
        return self.own_directory == os.path.normpath(self.mountpoint)


@dataclass(frozen=True)
class Layout:
    """Where each controller lives on this machine, as found by :func:`detect`.

    ``controllers`` maps ``"memory"``, ``"pids"``, ``"cpu"`` to the :class:`Hierarchy` holding it;
    ``missing`` maps a controller we cannot use to the reason, in plain words; ``kind`` is ``"v1"``,
    ``"v2"`` or ``"hybrid"`` (v1 controllers beside a cgroup2 mount).
    """

    controllers: dict[str, Hierarchy]
    missing: dict[str, str]
    kind: str
    #: ``"freezer"`` and ``"devices"`` (:data:`EXTRA_CONTROLLERS`) -> the hierarchy that provides them
    extras: dict[str, Hierarchy] = field(default_factory=dict)

    def hierarchy(self, controller: str) -> Hierarchy:
        """The hierarchy that holds ``controller``, or a :class:`CgroupError` saying why there is none."""
        if controller in self.controllers:
            return self.controllers[controller]
        if controller in self.extras:
            return self.extras[controller]
        raise CgroupError(
            f"the {controller} controller cannot be used here: {self.missing.get(controller, 'unknown')}",
            "run inside the workshop VM, or on a machine whose kernel has this controller enabled",
        )

    def describe(self) -> str:
        """A few lines for a learner: each controller, its version and where our cgroup is."""
        lines = [f"cgroup layout: {self.kind}"]
        for name in CONTROLLERS:
            if name in self.controllers:
                where = self.controllers[name]
                lines.append(f"  {name:<7} v{where.version}  {where.own_directory}")
            else:
                lines.append(f"  {name:<7} --  {self.missing.get(name, '')}")
        return "\n".join(lines)


def _cgroup_mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mountpoint, fstype, mount root, super options) of every cgroup mount, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields = left.split(" ")
            fstype, _source, *rest = right.split(" ")
            if fstype in ("cgroup", "cgroup2"):
                options = set(rest[0].split(",")) if rest else set()
                found.append((fields[4].replace("\\040", " "), fstype, fields[3], options))
    return found


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def detect() -> Layout:
    """Find each controller (memory, pids, cpu): a v1 hierarchy of its own, the v2 unified tree, or none.

    Our own cgroup in each hierarchy comes from /proc/self/cgroup (``4:memory:/a/b`` for v1, ``0::/a`` for
    v2); the mount point from /proc/self/mountinfo. A v2 controller counts as usable only if it is listed in
    our own cgroup's ``cgroup.controllers`` (that is, our parent handed it to us).
    """
    own_v1: dict[str, str] = {}
    own_v2: str | None = None
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            number, names, path = line.rstrip("\n").split(":", 2)
            if number == "0" and names == "":
                own_v2 = path
            else:
                for name in names.split(","):
                    own_v1[name] = path
    mounts = _cgroup_mounts()
    controllers: dict[str, Hierarchy] = {}
    missing: dict[str, str] = {}
    has_v1 = any(fstype == "cgroup" for _, fstype, _, _ in mounts)
    unified = next(((target, root) for target, fstype, root, _ in mounts if fstype == "cgroup2"), None)
    for name in CONTROLLERS:
        v1 = next(((target, root, options) for target, fstype, root, options in mounts
                   if fstype == "cgroup" and name in options), None)
        if v1 is not None and name in own_v1:
            target, root, options = v1
            held = tuple(c for c in CONTROLLERS if c in options)
            controllers[name] = Hierarchy(1, target, own_v1[name], held, root)
            continue
        if unified is not None and own_v2 is not None:
            hierarchy = Hierarchy(2, unified[0], own_v2, (), unified[1])
            try:
                available = _read(os.path.join(hierarchy.own_directory, "cgroup.controllers")).split()
            except OSError:
                available = []
            if name in available:
                controllers[name] = hierarchy
                continue
            try:
                anywhere = _read(os.path.join(unified[0], "cgroup.controllers")).split()
            except OSError:
                anywhere = []
            if name in anywhere:
                missing[name] = (f"cgroup v2 has it, but our cgroup {own_v2} was not given it "
                                 f"(its parent's cgroup.subtree_control lacks +{name})")
                continue
        missing[name] = "no mounted cgroup hierarchy (v1 or v2) offers it"
    # The v2 hierarchy object lists exactly the controllers it holds for us.
    v2_held = tuple(name for name, where in controllers.items() if where.version == 2)
    for name, where in list(controllers.items()):
        if where.version == 2:
            controllers[name] = Hierarchy(2, where.mountpoint, where.own, v2_held, where.mount_root)
    if unified is not None and unified[0] == "/sys/fs/cgroup" or (unified is not None and not has_v1):
        kind = "v2"
    elif has_v1 and unified is not None:
        kind = "hybrid"
    elif has_v1:
        kind = "v1"
    else:
        kind = "none"
    extras: dict[str, Hierarchy] = {}
    for name in EXTRA_CONTROLLERS:
        v1 = next(((target, root) for target, fstype, root, options in mounts
                   if fstype == "cgroup" and name in options), None)
        if v1 is not None and name in own_v1:
            extras[name] = Hierarchy(1, v1[0], own_v1[name], (name,), v1[1])
        elif unified is not None and own_v2 is not None:
            hierarchy = Hierarchy(2, unified[0], own_v2, (name,), unified[1])
            # the root cgroup has no cgroup.freeze; any other cgroup has it from Linux 5.2 on
            if name == "devices" or hierarchy.is_root or os.path.exists(
                    os.path.join(hierarchy.own_directory, "cgroup.freeze")):
                extras[name] = hierarchy
                continue
            missing[name] = "this kernel's cgroup v2 has no cgroup.freeze (it came with Linux 5.2)"
        else:
            missing[name] = "no mounted cgroup hierarchy (v1 or v2) offers it"
    return Layout(controllers, missing, kind, extras)


# -- parsing the learner's limits ---------------------------------------------------------------------
def machine_memory() -> int:
    """This machine's RAM in bytes (MemTotal)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def format_bytes(number: int) -> str:
    """``67108864`` -> ``"64M"``; ``1610612736`` -> ``"1.5G"`` (powers of 1024, as the limits are)."""
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if number >= size:
            value = number / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{number}B"


def parse_memory(text: str | int, *, minimum: int = MINIMUM_MEMORY, maximum: int | None = None) -> int:
    """A memory size as bytes: ``"64M"``, ``"64m"``, ``"64MiB"``, ``"1g"``, ``"512k"``, ``"67108864"``.

    Units are powers of 1024 (as ``docker run --memory`` reads them). Raises :class:`LimitError` for
    anything else, for a size below ``minimum`` (default 4M: a container needs that much to start a
    shell) and above ``maximum`` (default: the RAM this machine has).
    """
    if isinstance(text, bool):
        raise LimitError(f"{text!r} is not a memory size", "write a size such as 64M, 512k or 1G")
    if isinstance(text, int):
        number = text
        shown = str(text)
    else:
        shown = str(text).strip()
        match = _MEMORY.match(shown)
        if not match:
            raise LimitError(
                f"{shown!r} is not a memory size",
                "write a number with an optional unit: 64M, 512k, 1G (units are powers of 1024)",
            )
        number = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if number < minimum:
        raise LimitError(
            f"a memory limit of {shown} is too small: a container needs at least {format_bytes(minimum)} "
            "to start a shell",
            f"give it {format_bytes(minimum)} or more, for instance 64M",
        )
    total = machine_memory() if maximum is None else maximum
    if number > total:
        raise LimitError(
            f"a memory limit of {shown} is more than this machine has ({format_bytes(total)} of RAM)",
            f"give it at most {format_bytes(total)}, usually far less, for instance 256M",
        )
    return number


def parse_cpus(text: str | float) -> float:
    """A CPU limit as a number of CPUs: ``"0.5"`` is half of one CPU, ``"2"`` two whole CPUs.

    Must be more than 0 (at least 0.01: the kernel's smallest quota is 1 ms per 100 ms period) and at most
    the number of CPUs this machine has.
    """
    count = os.cpu_count() or 1
    try:
        if isinstance(text, bool):
            raise ValueError
        cpus = float(text)
    except (TypeError, ValueError):
        raise LimitError(f"{text!r} is not a number of CPUs",
                         "write a decimal number such as 0.5 (half a CPU) or 2") from None
    if not cpus > 0 or cpus != cpus:
        raise LimitError(f"a CPU limit must be more than 0, not {text}", "for instance 0.5, half of one CPU")
    if cpus * CPU_PERIOD_US < MINIMUM_QUOTA_US:
        raise LimitError(f"a CPU limit of {text} is too small: the kernel's smallest share is 0.01 CPU",
                         "give it 0.01 or more")
    if cpus > count:
        cpus_word = "CPU" if count == 1 else "CPUs"
        raise LimitError(f"a CPU limit of {text} is more than this machine has ({count} {cpus_word})",
                         f"give it at most {count}")
    return cpus


def pid_max() -> int:
    """The largest PID the kernel hands out (/proc/sys/kernel/pid_max): no pids limit can exceed it."""
    try:
        return int(_read("/proc/sys/kernel/pid_max"))
    except (OSError, ValueError):
        return 4194304


def parse_pids(text: str | int) -> int:
    """A limit on the number of processes (and threads): a whole number from 1 to the kernel's pid_max."""
    try:
        if isinstance(text, bool) or (isinstance(text, float) and text != int(text)):
            raise ValueError
        number = int(str(text).strip()) if not isinstance(text, (int, float)) else int(text)
    except (TypeError, ValueError):
        raise LimitError(f"{text!r} is not a number of processes",
                         "write a whole number such as 64") from None
    if number < 1:
        raise LimitError(f"a process limit of {text} leaves no room for even one process",
                         "give it at least 1; a shell and a command need a few, for instance 32")
    highest = pid_max()
    if number > highest:
        raise LimitError(f"a process limit of {text} is more than the kernel allows ({highest})",
                         f"give it at most {highest}, usually far less, for instance 256")
    return number


# -- reading counters ---------------------------------------------------------------------------------
@dataclass
class CgroupStats:
    """What the kernel counted for one cgroup; ``None`` where this kernel or version has no such file.

    - ``memory_current``, ``memory_peak``, ``memory_max``: bytes in use now, the most ever, the limit
      (v2 memory.current/peak/max; v1 memory.usage_in_bytes/max_usage_in_bytes/limit_in_bytes).
    - ``memory_limit_hits``: how often usage hit the limit (v2 memory.events ``max``; v1 memory.failcnt
      plus memory.memsw.failcnt).
    - ``oom_kills``: processes the OOM killer killed in this cgroup (v2 memory.events ``oom_kill``;
      v1 memory.oom_control ``oom_kill``); ``under_oom`` (v1) whether it is out of memory right now.
    - ``pids_current``, ``pids_max``, ``pids_limit_hits``: processes now, the limit, how often a fork was
      refused (pids.events ``max``).
    - ``cpu_periods``, ``cpu_throttled``, ``cpu_throttled_usec``, ``cpu_usage_usec``: CFS periods, how
      many of them the cgroup was throttled in, for how long in total, and the CPU time used (cpu.stat).
    """

    memory_current: int | None = None
    memory_peak: int | None = None
    memory_max: int | None = None
    memory_limit_hits: int | None = None
    oom_kills: int | None = None
    under_oom: bool | None = None
    pids_current: int | None = None
    pids_max: int | None = None
    pids_limit_hits: int | None = None
    cpu_periods: int | None = None
    cpu_throttled: int | None = None
    cpu_throttled_usec: int | None = None
    cpu_usage_usec: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _keyed(path: str) -> dict[str, int]:
    """A flat-keyed file (``key value`` lines: memory.events, cpu.stat, pids.events) as a dict."""
    try:
        text = _read(path)
    except OSError:
        return {}
    result = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            result[key] = int(value)
        except ValueError:
            continue
    return result


def _number(path: str) -> int | None:
    """A single-number file; ``max`` (no limit) and a missing file read as None."""
    try:
        text = _read(path).strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text.split()[0])
    except (ValueError, IndexError):
        return None
    # v1 writes "no limit" as the largest page-aligned 64-bit number.
    return None if value >= (1 << 62) else value


# -- one cgroup ---------------------------------------------------------------------------------------
@dataclass
class Cgroup:
    """A cgroup we created: one directory per hierarchy that holds one of its controllers.

    Make one with :meth:`create` (or find one made earlier with :meth:`open`); use it as a context
    manager to have it removed however the block ends, Ctrl-C included.
    """

    name: str
    directories: dict[str, str]  # controller -> directory of this cgroup in that controller's hierarchy
    versions: dict[str, int]  # controller -> 1 or 2
    record: StepRecord | None = field(default=None, repr=False)  # where writes go; None: the active one
    layout: Layout | None = field(default=None, repr=False)
    managed_parents: list[str] = field(default_factory=list, repr=False)  # stages parents to tidy when empty
    removed: bool = False
    #: directories :meth:`create_path` made on the way down to the cgroup (cgroupsPath ``/a/b``: ``/a``),
    #: removed with it when nothing else is left in them
    made_parents: list[str] = field(default_factory=list, repr=False)

    # -- making and finding ----------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, *, parent: Cgroup | None = None, record: StepRecord | None = None,
               controllers: Iterable[str] | None = None) -> Cgroup:
        """Create the cgroup ``stages-<name>`` below our own cgroup (or below ``parent``), in every hierarchy.

        ``controllers`` defaults to every one of memory, pids and cpu this machine offers; naming one it
        lacks raises :class:`CgroupError`. On cgroup v2 the controllers are switched on for children in
        the parent's ``cgroup.subtree_control`` first, which the *no internal processes* rule forbids
        when that parent holds processes: the :class:`CgroupError` then explains the rule. Anything made
        before an error is removed again. Each write is recorded into ``record`` (or the active record).
        """
        if not isinstance(name, str) or not _NAME.match(name.removeprefix(PREFIX) or "-"):
            raise CgroupError(
                f"{name!r} cannot be a cgroup name",
                "use letters, digits, '.', '_' and '-' (no '/'), at most 64 of them, for instance web-1",
            )
        full = name if name.startswith(PREFIX) else PREFIX + name
        layout = parent.layout if parent is not None and parent.layout is not None else detect()
        if controllers is None:
            wanted = [c for c in CONTROLLERS if c in layout.controllers]
            if parent is not None:
                wanted = [c for c in wanted if c in parent.directories]
            if not wanted:
                raise CgroupError(
                    "no cgroup controller (memory, pids, cpu) can be used on this machine: "
                    + "; ".join(f"{c}: {why}" for c, why in layout.missing.items()),
                    "run inside the workshop VM (cgroup v2 with controllers), or as root on a Linux host",
                )
        else:
            wanted = list(dict.fromkeys(controllers))
            for controller in wanted:
                if controller not in CONTROLLERS + EXTRA_CONTROLLERS:
                    raise CgroupError(f"{controller!r} is not a controller this module knows",
                                      f"choose from {', '.join(CONTROLLERS + EXTRA_CONTROLLERS)}")
                layout.hierarchy(controller)
                if parent is not None and controller not in parent.directories:
                    raise CgroupError(f"the parent cgroup {parent.name} has no {controller} controller",
                                      "create the parent with that controller too")
        cgroup = cls(full, {}, {}, record=record, layout=layout)
        try:
            cgroup._make(wanted, layout, parent)
        except BaseException:
            cgroup.remove()
            raise
        return cgroup

    def _make(self, wanted: list[str], layout: Layout, parent: Cgroup | None) -> None:
        made: dict[str, str] = {}  # our directory in a hierarchy, keyed by its mount point
        for controller in wanted:
            hierarchy = layout.hierarchy(controller)
            key = hierarchy.mountpoint
            if key not in made:
                if parent is not None:
                    base = parent.directories[controller]
                    if hierarchy.version == 2:
                        # the parent is ours; if it holds a process this is where the rule bites
                        self._enable(base, _enabled_v2(wanted, layout))
                    directory = os.path.join(base, self.name)
                    self._mkdir(directory)
                else:
                    for attempt in range(5):
                        directory = os.path.join(self._stages_parent(hierarchy, wanted, layout), self.name)
                        try:
                            self._mkdir(directory)
                            break
                        except CgroupError as error:
                            # another stages program removed the empty shared parent just now: again
                            if attempt == 4 or not isinstance(error.__cause__, FileNotFoundError):
                                raise
                made[key] = directory
            self.directories[controller] = made[key]
            self.versions[controller] = hierarchy.version

    def _stages_parent(self, hierarchy: Hierarchy, wanted: list[str], layout: Layout) -> str:
        """``<own cgroup>/stages``, made if need be, with the v2 controllers enabled on the way down."""
        own = hierarchy.own_directory
        parent = os.path.join(own, PARENT)
        v2 = _enabled_v2(wanted, layout)
        if hierarchy.version == 2:
            self._enable(own, v2, ours=False)
        for _ in range(5):
            if not os.path.isdir(parent):
                try:
                    self._mkdir(parent, what=(
                        "a stages-owned parent: it never holds a process, so it may hand controllers down "
                        "(cgroups(7), no internal processes)" if hierarchy.version == 2 else
                        "a stages-owned parent that holds every stages cgroup in this hierarchy"))
                except CgroupError as error:
                    if not isinstance(error.__cause__, FileExistsError):
                        raise
            if parent not in self.managed_parents:
                self.managed_parents.append(parent)
            try:
                if hierarchy.version == 2:
                    self._enable(parent, v2)
                return parent
            except CgroupError as error:
                # another stages process removed the empty parent between our mkdir and our write: again
                if not isinstance(error.__cause__, FileNotFoundError):
                    raise
        raise CgroupError(f"could not make {parent}: it keeps disappearing",
                          "another program is removing it; try again")

    def _enable(self, directory: str, controllers: list[str], *, ours: bool = True) -> None:
        """Write ``+memory +pids +cpu`` (the ones missing) into ``directory``'s cgroup.subtree_control."""
        path = os.path.join(directory, "cgroup.subtree_control")
        try:
            enabled = _read(path).split()
        except FileNotFoundError as error:
            raise CgroupError(f"{directory} has gone", "try again") from error
        todo = [c for c in controllers if c not in enabled]
        if not todo:
            return
        value = " ".join(f"+{c}" for c in todo)
        try:
            self._write(path, value, what=f"let the children of {directory} use {', '.join(todo)}")
        except CgroupError as error:
            cause = error.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EBUSY:
                holders = _procs(directory)
                raise CgroupError(
                    f"cgroup v2 refused to enable {', '.join(todo)} for the children of {directory}, because "
                    f"processes live in it ({' '.join(map(str, holders[:5])) or 'some'}): the 'no internal "
                    "processes' rule (cgroups(7)) says a cgroup other than the root either holds processes "
                    "or hands controllers to child cgroups, never both",
                    ("move those processes into a child cgroup first, or start from an empty cgroup"
                     if ours else
                     "run from a delegated cgroup (systemd-run --scope -p Delegate=yes ...) or from the root "
                     "cgroup, as the workshop VM does"),
                ) from cause
            raise

    @classmethod
    def create_path(cls, path: str, *, controllers: Iterable[str], record: StepRecord | None = None,
                    enable: Iterable[str] | None = None) -> Cgroup:
        """The cgroup at ``path`` as the OCI runtime spec reads ``linux.cgroupsPath``: an absolute path is
        relative to each hierarchy's mount point as our cgroup namespace shows it (cgroup_namespaces(7)),
        a relative one is below our own cgroup. Directories missing on the way are made (and removed with
        the cgroup when empty); an existing cgroup at ``path`` is joined, as the spec asks ("consistently
        attach to the same place"). ``controllers`` this machine lacks are left out (see
        :func:`find_hierarchy`). On cgroup v2 only ``enable`` (default: the memory, pids and cpu among
        ``controllers``) are switched on for the children on the way down: each costs the "no internal
        processes" rule (cgroups(7)) at every level, so a controller nobody limits is left off."""
        parts = [part for part in path.split("/") if part]
        if not parts or any(part in (".", "..") for part in parts):
            raise CgroupError(f"{path!r} is not a cgroup path",
                              "give a path such as /machine/web-1 or web-1, without '..'")
        layout = detect()
        # stages/stages-NAME, relative, is where Cgroup.create("NAME") puts it: the same name, for open()
        same = not path.startswith("/") and len(parts) == 2 and parts[0] == PARENT \
            and parts[1].startswith(PREFIX)
        cgroup = cls(parts[1] if same else path, {}, {}, record=record, layout=layout)
        wanted = [c for c in dict.fromkeys(controllers) if find_hierarchy(c, layout) is not None]
        switched = [c for c in wanted if c in CONTROLLERS] if enable is None else list(enable)
        v2 = [_V2_NAMES.get(c, c) for c in wanted if find_hierarchy(c, layout).version == 2
              and c not in EXTRA_CONTROLLERS and c in switched]
        try:
            made: dict[str, str] = {}
            for controller in wanted:
                hierarchy = find_hierarchy(controller, layout)
                if hierarchy.mountpoint not in made:
                    base = (os.path.normpath(hierarchy.mountpoint) if path.startswith("/")
                            else hierarchy.own_directory)
                    made[hierarchy.mountpoint] = cgroup._make_path(base, parts, hierarchy, v2)
                    if not path.startswith("/") and parts[0] == PARENT and len(parts) > 1:
                        # the shared stages parent: whoever leaves it empty removes it (Cgroup.create's)
                        cgroup.managed_parents.append(os.path.join(base, PARENT))
                cgroup.directories[controller] = made[hierarchy.mountpoint]
                cgroup.versions[controller] = hierarchy.version
        except BaseException:
            cgroup.remove()
            raise
        return cgroup

    def _make_path(self, base: str, parts: list[str], hierarchy: Hierarchy, v2: list[str]) -> str:
        directory = base
        for index, part in enumerate(parts):
            parent, directory = directory, os.path.join(directory, part)
            if hierarchy.version == 2:
                available = set(_read(os.path.join(parent, "cgroup.controllers")).split())
                self._enable(parent, [c for c in v2 if c in available],
                             ours=parent != hierarchy.own_directory)
            if os.path.isdir(directory):
                continue
            last = index == len(parts) - 1
            self._mkdir(directory, what="" if last else "a parent on the way to cgroupsPath")
            if index < len(parts) - 1 and not (index == 0 and part == PARENT):
                self.made_parents.insert(0, directory)  # deepest first, for remove()
            if hierarchy.version == 1 and "cpuset" in _hierarchy_options(hierarchy):
                # a v1 cpuset takes no process until it has CPUs and memory nodes: the parent's (cpuset(7))
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    value = _read(os.path.join(parent, knob)).strip()
                    self._write(os.path.join(directory, knob), value, what="the parent's, to start with")
        return directory

    @classmethod
    def open(cls, name: str, *, parent: Cgroup | None = None, record: StepRecord | None = None) -> Cgroup:
        """The existing cgroup ``stages-<name>`` below our own cgroup (made earlier, perhaps elsewhere).

        Raises :class:`CgroupError` if no hierarchy has it.
        """
        full = name if name.startswith(PREFIX) else PREFIX + name
        layout = detect()
        cgroup = cls(full, {}, {}, record=record, layout=layout)
        for controller, hierarchy in {**layout.controllers, **layout.extras}.items():
            base = parent.directories.get(controller) if parent else os.path.join(hierarchy.own_directory,
                                                                                  PARENT)
            if base and os.path.isdir(os.path.join(base, full)):
                cgroup.directories[controller] = os.path.join(base, full)
                cgroup.versions[controller] = hierarchy.version
                if parent is None and base not in cgroup.managed_parents:
                    cgroup.managed_parents.append(base)
        if not cgroup.directories:
            raise CgroupError(f"there is no cgroup named {full}", "list them with cgroups.find()")
        return cgroup

    # -- recorded writes ---------------------------------------------------------------------------
    def _step(self, shell: str, what: str = "", where: str = "host"):
        if self.record is not None:
            return self.record.step(shell, what=what, where=where)
        return steps.record(shell, what=what, where=where)

    def _write(self, path: str, value: str, what: str = "", where: str = "host") -> None:
        # quoted only where a shell would change it: 'c *:* m' would glob (devices.allow)
        shown = shlex.quote(value) if set(value) & set("*?[]$`'\"\\;&|<>(){}~#!") else value
        with self._step(f"echo {shown} > {shlex.quote(path)}", what=what, where=where):
            try:
                # one write(2) per value: the kernel parses each write on its own (cgroups(7))
                with open(path, "w") as handle:
                    handle.write(value)
            except OSError as error:
                raise _explain(error, f"writing {value!r} to {path}") from error

    def _mkdir(self, path: str, what: str = "") -> None:
        what = what or "a new cgroup: the kernel fills the directory with files"
        with self._step(f"mkdir {shlex.quote(path)}", what=what):
            try:
                os.mkdir(path)
            except FileExistsError as error:
                if os.path.basename(path) == PARENT:
                    raise CgroupError(f"{path} exists already", "") from error
                raise CgroupError(
                    f"a cgroup named {os.path.basename(path)} exists already ({path})",
                    "pick another name, or remove the leftover with stages.isolate.cgroups.cleanup()",
                ) from error
            except OSError as error:
                raise _explain(error, f"making the cgroup {path}") from error

    # -- files --------------------------------------------------------------------------------------
    def directory(self, controller: str) -> str:
        """This cgroup's directory in the hierarchy that holds ``controller``."""
        if controller not in self.directories:
            why = self.layout.missing.get(controller) if self.layout else None
            raise CgroupError(
                f"the cgroup {self.name} has no {controller} controller"
                + (f": {why}" if why else ""),
                f"create it with controllers including {controller!r}, on a machine that has it",
            )
        return self.directories[controller]

    def file(self, controller: str, name: str) -> str:
        """The path of one control file, e.g. ``file("memory", "memory.max")``."""
        return os.path.join(self.directory(controller), name)

    @property
    def version(self) -> int:
        """2 if any controller of this cgroup is on the unified hierarchy, else 1."""
        return 2 if 2 in self.versions.values() else 1

    def unique_directories(self) -> list[str]:
        """Our directory in each hierarchy, each once."""
        return list(dict.fromkeys(self.directories.values()))

    # -- limits -------------------------------------------------------------------------------------
    def set_memory(self, limit: int | str, swap: int | None = None) -> int:
        """Limit memory to ``limit`` bytes or a size like ``"64M"``; returns the limit in bytes.

        ``swap`` is what the OCI runtime spec calls it: RAM *plus* swap, in bytes, -1 for no limit on swap,
        None (the default) for no swap beyond the limit. v2 writes ``memory.max`` and ``memory.swap.max``
        (the swap alone: ``swap - limit``); v1 ``memory.limit_in_bytes`` and, where the kernel accounts
        swap, ``memory.memsw.limit_in_bytes`` (RAM plus swap), so the cgroup cannot dodge its limit by
        swapping. Where the kernel does not account swap there is nothing to write (runc does the same).
        """
        number = parse_memory(limit) if isinstance(limit, str) else int(limit)
        if number <= 0:
            raise LimitError(f"a memory limit must be more than 0 bytes, not {limit}", "for instance 64M")
        total = number if swap is None else int(swap)
        if total != -1 and total < number:
            raise LimitError(f"RAM plus swap ({total} bytes) cannot be less than the memory limit ({number})",
                             "give a swap limit at least as big as the memory limit, or -1 for no limit")
        directory = self.directory("memory")
        if self.versions["memory"] == 2:
            self._write(f"{directory}/memory.max", str(number), what=f"at most {format_bytes(number)} of RAM")
            if os.path.exists(f"{directory}/memory.swap.max"):
                extra = "max" if total == -1 else str(total - number)
                what = ("and no swap, or the limit leaks" if extra == "0"
                        else "swap allowed beyond the RAM limit")
                self._write(f"{directory}/memory.swap.max", extra, what=what)
            return number
        memsw = f"{directory}/memory.memsw.limit_in_bytes"
        limit_file = f"{directory}/memory.limit_in_bytes"
        if not os.path.exists(memsw):
            self._write(limit_file, str(number), what=f"at most {format_bytes(number)} of RAM")
            return number
        # v1 insists memsw >= limit at every moment: the RAM limit goes first when the RAM-plus-swap limit
        # we have now still covers it, else RAM plus swap goes first (one of the two orders always works).
        current_total = _number(memsw)
        both = "-1" if total == -1 else str(total)
        pair = [(limit_file, str(number), f"at most {format_bytes(number)} of RAM"),
                (memsw, both, "RAM plus swap: the same number, so no swap" if total == number
                 else "RAM plus swap")]
        if current_total is not None and current_total < number:
            pair.reverse()
        for path, value, what in pair:
            self._write(path, value, what=what)
        return number

    def set_pids(self, limit: int | str) -> int:
        """Allow at most ``limit`` processes and threads (``pids.max``); one more fork(2) fails EAGAIN."""
        number = parse_pids(limit)
        self._write(self.file("pids", "pids.max"), str(number),
                    what=f"at most {number} processes; one more fork fails with EAGAIN")
        return number

    def set_cpus(self, cpus: float | str) -> float:
        """Allow ``cpus`` CPUs' worth of time per period: 0.5 is 50 ms of every 100 ms (CFS bandwidth).

        v2 writes ``cpu.max`` as ``"quota period"``; v1 ``cpu.cfs_period_us`` then ``cpu.cfs_quota_us``.
        """
        number = parse_cpus(cpus)
        quota = int(round(number * CPU_PERIOD_US))
        what = f"{quota // 1000} ms of CPU time every {CPU_PERIOD_US // 1000} ms: {number:g} CPU"
        if self.versions.get("cpu") == 2:
            self._write(self.file("cpu", "cpu.max"), f"{quota} {CPU_PERIOD_US}", what=what)
        else:
            self._write(self.file("cpu", "cpu.cfs_period_us"), str(CPU_PERIOD_US), what="the period")
            self._write(self.file("cpu", "cpu.cfs_quota_us"), str(quota), what=what)
        return number

    def set_cpu_quota(self, quota: int, period: int) -> None:
        """CFS bandwidth as the OCI runtime spec gives it: ``quota`` microseconds (-1: no limit) of CPU time
        every ``period`` microseconds. v2 ``cpu.max``; v1 ``cpu.cfs_period_us`` then ``cpu.cfs_quota_us``."""
        what = f"{quota} us of CPU time every {period} us" if quota > 0 else "no CPU quota"
        if self.versions.get("cpu") == 2:
            self._write(self.file("cpu", "cpu.max"), f"{quota if quota > 0 else 'max'} {period}", what=what)
        else:
            self._write(self.file("cpu", "cpu.cfs_period_us"), str(period), what="the period")
            self._write(self.file("cpu", "cpu.cfs_quota_us"), str(quota if quota > 0 else -1), what=what)

    def set_cpu_shares(self, shares: int) -> int:
        """A relative CPU weight, used only when CPUs are contended: v1 ``cpu.shares`` (2..262144, 1024 the
        default); v2 ``cpu.weight`` (1..10000, 100 the default) by runc's and crun's conversion,
        ``1 + (shares - 2) * 9999 // 262142``. Returns the number written."""
        if self.versions.get("cpu") == 2:
            weight = 1 + (max(2, min(shares, 262144)) - 2) * 9999 // 262142
            self._write(self.file("cpu", "cpu.weight"), str(weight),
                        what=f"CPU weight {weight} (the OCI shares {shares}, converted)")
            return weight
        self._write(self.file("cpu", "cpu.shares"), str(shares), what=f"CPU weight {shares} (1024: default)")
        return shares

    def set_realtime(self, runtime: int | None, period: int | None) -> None:
        """Real-time bandwidth (v1 ``cpu.rt_period_us``, ``cpu.rt_runtime_us``; sched(7)); v2 has none."""
        if self.versions.get("cpu") == 2:
            raise LimitError("cgroup v2 has no real-time CPU bandwidth (cpu.rt_*)",
                             "leave realtimeRuntime and realtimePeriod out")
        if period:
            self._write(self.file("cpu", "cpu.rt_period_us"), str(period), what="the real-time period")
        if runtime is not None:
            self._write(self.file("cpu", "cpu.rt_runtime_us"), str(runtime), what="real-time time per period")

    def set_cpuset(self, cpus: str | None = None, mems: str | None = None) -> None:
        """Which CPUs and memory nodes the processes may use (``cpuset.cpus``, ``cpuset.mems``, the same
        names on v1 and v2; cpuset(7)), as lists like ``0-1,3``."""
        for knob, value in (("cpuset.cpus", cpus), ("cpuset.mems", mems)):
            if value:
                self._write(self.file("cpuset", knob), value, what=f"only {knob.split('.')[1]} {value}")

    def set_memory_reservation(self, number: int) -> None:
        """A soft memory limit (-1: none): v1 ``memory.soft_limit_in_bytes``, reclaimed back to first under
        memory pressure; v2 ``memory.low``, memory protected from reclaim up to it (runc's mapping)."""
        if self.versions["memory"] == 2:
            value, name = ("max" if number == -1 else str(number)), "memory.low"
        else:
            value, name = str(number), "memory.soft_limit_in_bytes"
        self._write(self.file("memory", name), value, what="the soft limit")

    def set_swappiness(self, value: int) -> None:
        """v1 ``memory.swappiness`` (0..100: how readily this cgroup's pages are swapped); v2 has none."""
        if self.versions["memory"] == 2:
            raise LimitError("cgroup v2 has no per-cgroup swappiness", "leave swappiness out")
        self._write(self.file("memory", "memory.swappiness"), str(value), what="swappiness")

    def disable_oom_killer(self) -> None:
        """v1 ``memory.oom_control`` 1: at the limit the processes wait instead of being killed; v2 has no
        such switch."""
        if self.versions["memory"] == 2:
            raise LimitError("cgroup v2 cannot turn the OOM killer off", "leave disableOOMKiller out")
        self._write(self.file("memory", "memory.oom_control"), "1", what="no OOM kill: wait at the limit")

    def set_block_io_weight(self, weight: int) -> None:
        """A relative block I/O weight (10..1000): v1 ``blkio.weight`` (or ``blkio.bfq.weight``); v2
        ``io.bfq.weight`` or ``io.weight``, 1..10000, by runc's conversion ``1 + (w - 10) * 9999 // 990``."""
        directory = self.directory("blkio")
        if self.versions["blkio"] == 2:
            candidates = [("io.bfq.weight", str(weight)), ("io.weight", str(1 + (weight - 10) * 9999 // 990))]
        else:
            candidates = [("blkio.weight", str(weight)), ("blkio.bfq.weight", str(weight))]
        for name, value in candidates:
            if os.path.exists(os.path.join(directory, name)):
                self._write(os.path.join(directory, name), value, what="the block I/O weight")
                return
        raise LimitError("this kernel has no block I/O weight (no BFQ or CFQ scheduler's weight file)",
                         "leave blockIO.weight out")

    # -- devices: which device nodes the processes may open or create ---------------------------------
    def add_controller(self, controller: str) -> str:
        """Give this cgroup a controller it was made without (on v1: a directory in that controller's
        hierarchy, and every process of the cgroup moved into it). Returns its directory."""
        if controller in self.directories:
            return self.directories[controller]
        layout = self.layout if self.layout is not None else detect()
        hierarchy = layout.hierarchy(controller)
        for known, directory in self.directories.items():
            if layout.hierarchy(known).mountpoint == hierarchy.mountpoint:  # v2: the same directory
                self.directories[controller], self.versions[controller] = directory, hierarchy.version
                return directory
        processes = self.pids()
        self._make([controller], layout, None)
        for pid in processes:
            self._write(os.path.join(self.directories[controller], "cgroup.procs"), str(pid),
                        what=f"move process {pid} in here too", where="outside")
        return self.directories[controller]

    def allow_devices(self, rules=None) -> list[str]:
        """Deny every device, then allow each of ``rules``, ``(type, major, minor, access, what)`` with
        ``"*"`` or :data:`stages.isolate.devices.ALL` for any number (Docker's list,
        :data:`stages.isolate.devices.DEFAULT_RULES`, by default). Returns the allowlist as the kernel
        keeps it, one ``c 1:3 rwm`` line each.

        Without it, root in a container with CAP_MKNOD may ``mknod /tmp/disk b 8 0`` and read the host's
        disk: a device node is only a number, and /dev's contents are no protection. cgroup v1: ``echo a >
        devices.deny``, then ``echo 'c 1:3 rwm' > devices.allow`` per rule (admin-guide/cgroup-v1/
        devices.rst), read back from devices.list. cgroup v2 has no such files: a BPF program attached to
        the cgroup answers each open(2) and mknod(2) (cgroup-v2.rst, "Device controller"), assembled by hand
        in :mod:`stages.isolate.devices`.
        """
        from stages.isolate import devices

        number = lambda n: devices.ALL if n == "*" else int(n)  # noqa: E731
        listed = [[False, "a", devices.ALL, devices.ALL, "rwm"]] + [
            [True, kind, number(major), number(minor), access]
            for kind, major, minor, access, _what in (devices.DEFAULT_RULES if rules is None else rules)]
        directory = self.add_controller("devices")
        if self.versions["devices"] == 2:
            if self.record is not None:
                with self.record.active():
                    devices.attach_program(directory, listed)
            else:
                devices.attach_program(directory, listed)
            return [rule.line() for rule in devices.reduce(listed)[1]]
        devices.write_v1(self, listed)
        return _read(os.path.join(directory, "devices.list")).split("\n")[:-1]

    # -- processes ----------------------------------------------------------------------------------
    def add(self, pid: int) -> None:
        """Move process ``pid`` into this cgroup, in every hierarchy (``echo PID > cgroup.procs``).

        Its children inherit the cgroup from then on; memory it allocated before stays charged where it
        was (cgroups(7)), so add a process before it does the work you want to limit.
        """
        if self.removed:
            raise CgroupError(f"the cgroup {self.name} has been removed", "create a new one")
        for directory in self.unique_directories():
            self._write(os.path.join(directory, "cgroup.procs"), str(int(pid)),
                        what=f"move process {pid} in; its children follow", where="outside")

    def pids(self) -> list[int]:
        """Every process in this cgroup and the cgroups below it, in any hierarchy."""
        found: set[int] = set()
        for directory in self.unique_directories():
            for top, _, _ in os.walk(directory):
                found.update(_procs(top))
        return sorted(found)

    # -- pause and resume: the freezer ------------------------------------------------------------------
    def freeze(self, timeout: float = 5.0) -> None:
        """Stop every process in the cgroup where it stands, until :meth:`thaw` (``docker pause``).

        The processes are not signalled and cannot tell (unlike SIGSTOP, which a parent would see): the
        scheduler simply stops running them. v1 writes ``FROZEN`` into ``freezer.state`` and reads it back
        until the kernel says FROZEN, not FREEZING (cgroups v1 freezer-subsystem.rst); v2 writes ``1``
        into ``cgroup.freeze`` and waits for ``frozen 1`` in ``cgroup.events`` (cgroup-v2.rst, "Core
        interface files"). A cgroup that does not freeze within ``timeout`` is thawed again and
        :class:`CgroupError` says so.
        """
        directory = self.directory("freezer")
        if self.versions["freezer"] == 2:
            self._write(os.path.join(directory, "cgroup.freeze"), "1",
                        what="freeze: the processes stop where they are, without a signal")
        else:
            self._write(os.path.join(directory, "freezer.state"), "FROZEN",
                        what="freeze: the processes stop where they are, without a signal")
        deadline = time.monotonic() + timeout
        with self._step(f"cat {shlex.quote(_freezer_file(directory, self.versions['freezer']))}",
                        what="wait until the kernel reports every process frozen"):
            while _freezer_state(directory, self.versions["freezer"]) != "FROZEN":
                if time.monotonic() > deadline:
                    self.thaw()
                    raise CgroupError(f"the cgroup {self.name} did not freeze within {timeout:g} s",
                                      "a process may be stuck in the kernel (uninterruptible I/O); try again")
                if self.versions["freezer"] == 1:
                    # a v1 freeze that met a busy task stays FREEZING; writing FROZEN again retries it
                    with open(os.path.join(directory, "freezer.state"), "w") as handle:
                        handle.write("FROZEN")
                time.sleep(0.001)

    def thaw(self) -> None:
        """Let the processes of a frozen cgroup run again (``docker unpause``): v1 ``THAWED`` into
        ``freezer.state``, v2 ``0`` into ``cgroup.freeze``."""
        directory = self.directory("freezer")
        if self.versions["freezer"] == 2:
            self._write(os.path.join(directory, "cgroup.freeze"), "0", what="thaw: the processes run again")
        else:
            self._write(os.path.join(directory, "freezer.state"), "THAWED",
                        what="thaw: the processes run again")

    @property
    def frozen(self) -> bool:
        """Whether the cgroup is frozen (or freezing) now, as the kernel says."""
        return is_frozen(self.directory("freezer"), self.versions["freezer"])

    def kill(self, timeout: float = 5.0) -> list[int]:
        """SIGKILL every process in the cgroup; returns the PIDs that were in it.

        v2 kernels from 5.14 do it in one write to ``cgroup.kill``, which also catches processes forked
        meanwhile; elsewhere we send SIGKILL to each PID in ``cgroup.procs`` and look again, until it is
        empty (a fork bomb can fork between our read and our kill, but pids.max keeps that finite).
        """
        victims: set[int] = set()
        deadline = time.monotonic() + timeout
        v2_kill = [os.path.join(d, "cgroup.kill") for c, d in self.directories.items()
                   if self.versions[c] == 2 and os.path.exists(os.path.join(d, "cgroup.kill"))]
        first = self.pids()
        if not first:
            return []
        victims.update(first)
        for path in dict.fromkeys(v2_kill):
            self._write(path, "1", what="kill every process in the cgroup and below it, at once")
        thawed = False
        while True:
            left = self.pids()
            if not left:
                break
            if not v2_kill or time.monotonic() > deadline - timeout / 2:
                with self._step("kill -KILL " + " ".join(map(str, left)),
                                what="kill each process the cgroup holds"):
                    for pid in left:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            if not thawed and "freezer" in self.directories and self.frozen:
                # A v1-frozen process does not act on SIGKILL until it is thawed (freezer-subsystem.rst);
                # thawed after the signal, it dies before it runs another instruction of its own.
                self.thaw()
            thawed = True
            victims.update(left)
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        return sorted(victims)

    def wait_empty(self, timeout: float = 5.0) -> bool:
        """Wait until no process is left in the cgroup; True if it emptied in time."""
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left inside, wait until it is empty, and remove the directories, children first.

        Safe to call twice, and on a half-made cgroup. Also removes the ``stages`` parent if that leaves
        it empty (another stages cgroup still in it keeps it).
        """
        if self.removed:
            return
        existing = [d for d in self.unique_directories() if os.path.isdir(d)]
        if existing:
            self.kill(timeout=timeout)
            if not self.wait_empty(timeout):
                left = self.pids()
                raise CgroupError(
                    f"the cgroup {self.name} still holds processes {' '.join(map(str, left))} after SIGKILL",
                    "a killed process stays until its parent wait()s for it: wait for your child processes, "
                    "then call remove() again",
                )
        for directory in existing:
            for top, _, _ in sorted(os.walk(directory, topdown=False), key=lambda item: -len(item[0])):
                _rmdir(self, top)
        self.removed = True
        for parent in self.managed_parents:
            _remove_empty_parent(self, parent)
        for parent in self.made_parents:
            try:
                if not any(entry.is_dir() for entry in os.scandir(parent)):
                    _rmdir(self, parent)
            except (OSError, CgroupError):
                pass  # gone already, or another cgroup lives there now: it stays

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    # -- counters -----------------------------------------------------------------------------------
    def memory_current(self) -> int:
        """Bytes of memory charged to the cgroup now (v2 memory.current, v1 memory.usage_in_bytes): cheap."""
        directory = self.directory("memory")
        name = "memory.current" if self.versions["memory"] == 2 else "memory.usage_in_bytes"
        return _number(os.path.join(directory, name)) or 0

    def stats(self) -> CgroupStats:
        """Read the kernel's counters for this cgroup (see :class:`CgroupStats`)."""
        result = CgroupStats()
        if "memory" in self.directories:
            directory = self.directories["memory"]
            if self.versions["memory"] == 2:
                events = _keyed(f"{directory}/memory.events")
                result.memory_current = _number(f"{directory}/memory.current")
                result.memory_peak = _number(f"{directory}/memory.peak")
                result.memory_max = _number(f"{directory}/memory.max")
                result.memory_limit_hits = events.get("max")
                result.oom_kills = events.get("oom_kill")
            else:
                control = _keyed(f"{directory}/memory.oom_control")
                result.memory_current = _number(f"{directory}/memory.usage_in_bytes")
                result.memory_peak = _number(f"{directory}/memory.max_usage_in_bytes")
                result.memory_max = _number(f"{directory}/memory.limit_in_bytes")
                # a charge that fails trips one counter: RAM+swap (memsw, tried first) or RAM alone
                hits = [_number(f"{directory}/memory.failcnt"), _number(f"{directory}/memory.memsw.failcnt")]
                result.memory_limit_hits = None if hits[0] is None else sum(h or 0 for h in hits)
                result.oom_kills = control.get("oom_kill")
                result.under_oom = bool(control["under_oom"]) if "under_oom" in control else None
        if "pids" in self.directories:
            directory = self.directories["pids"]
            result.pids_current = _number(f"{directory}/pids.current")
            result.pids_max = _number(f"{directory}/pids.max")
            result.pids_limit_hits = _keyed(f"{directory}/pids.events").get("max")
        if "cpu" in self.directories:
            directory = self.directories["cpu"]
            stat = _keyed(f"{directory}/cpu.stat")
            result.cpu_periods = stat.get("nr_periods")
            result.cpu_throttled = stat.get("nr_throttled")
            if "throttled_usec" in stat:
                result.cpu_throttled_usec = stat["throttled_usec"]
            elif "throttled_time" in stat:  # v1 counts nanoseconds
                result.cpu_throttled_usec = stat["throttled_time"] // 1000
            if "usage_usec" in stat:
                result.cpu_usage_usec = stat["usage_usec"]
            else:
                usage = _number(f"{directory}/cpuacct.usage")  # v1, when cpu and cpuacct share a hierarchy
                result.cpu_usage_usec = usage // 1000 if usage is not None else None
        return result

    def files(self) -> dict[str, list[str]]:
        """The control files the kernel made in each of our directories, for a learner to look at."""
        return {d: sorted(os.listdir(d)) for d in self.unique_directories() if os.path.isdir(d)}


# -- helpers shared with cleanup -----------------------------------------------------------------------
def _freezer_file(directory: str, version: int) -> str:
    return os.path.join(directory, "cgroup.events" if version == 2 else "freezer.state")


def _freezer_state(directory: str, version: int) -> str:
    """FROZEN, FREEZING or THAWED, the v1 words, for either version."""
    text = _read(_freezer_file(directory, version))
    if version == 1:
        return text.strip()
    events = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    if events.get("frozen", "0").strip() == "1":
        return "FROZEN"
    try:
        wanted = _read(os.path.join(directory, "cgroup.freeze")).strip() == "1"
    except OSError:
        wanted = False
    return "FREEZING" if wanted else "THAWED"


def is_frozen(directory: str, version: int) -> bool:
    """Whether the cgroup at ``directory`` (in a v1 freezer hierarchy, or v2) is frozen or freezing;
    False if it is gone."""
    try:
        return _freezer_state(directory, version) != "THAWED"
    except OSError:
        return False


#: a v1 controller's name on cgroup v2, where it differs
_V2_NAMES = {"blkio": "io"}


def find_hierarchy(controller: str, layout: Layout | None = None) -> Hierarchy | None:
    """The hierarchy holding ``controller`` for us, for the ones :func:`detect` knows and for the others a
    container runtime may use (cpuset, blkio, cpuacct ...): a v1 hierarchy with it among its options,
    or the v2 tree where our cgroup's cgroup.controllers lists it. None if there is none."""
    layout = layout if layout is not None else detect()
    if controller in layout.controllers:
        return layout.controllers[controller]
    if controller in layout.extras:
        return layout.extras[controller]
    own: dict[str, str] = {}
    for line in _read("/proc/self/cgroup").splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(",") if names else [""]:
            own[name] = path
    mounts = _cgroup_mounts()
    for target, fstype, root, options in mounts:
        if fstype == "cgroup" and controller in options and controller in own:
            return Hierarchy(1, target, own[controller], (controller,), root)
    for target, fstype, root, _ in mounts:
        if fstype == "cgroup2" and "" in own:
            hierarchy = Hierarchy(2, target, own[""], (controller,), root)
            try:
                available = _read(os.path.join(hierarchy.own_directory, "cgroup.controllers")).split()
            except OSError:
                return None
            return hierarchy if _V2_NAMES.get(controller, controller) in available else None
    return None


def _hierarchy_options(hierarchy: Hierarchy) -> set[str]:
    for target, _, _, options in _cgroup_mounts():
        if target == hierarchy.mountpoint:
            return options
    return set()


def _enabled_v2(wanted: list[str], layout: Layout) -> list[str]:
    """The v2 controllers to write into cgroup.subtree_control: the freezer and the device allowlist
    are no such controllers on v2 (every cgroup has them), so they are never written there."""
    return [c for c in wanted if c in layout.controllers and layout.controllers[c].version == 2]


def _procs(directory: str) -> list[int]:
    try:
        return [int(line) for line in _read(os.path.join(directory, "cgroup.procs")).split()]
    except (FileNotFoundError, ValueError):
        return []


def _explain(error: OSError, doing: str) -> CgroupError:
    """An OSError from a cgroup file, as one sentence with a fix."""
    code = error.errno
    if code in (errno.EPERM, errno.EACCES):
        hint = "cgroup files belong to root: run as root (sudo), or inside the workshop VM"
    elif code == errno.EROFS:
        hint = "the cgroup file system is mounted read-only here (as in many containers); use the workshop VM"
    elif code == errno.ENOENT:
        hint = "the cgroup or the file is not there: was it removed, or does this kernel lack the controller?"
    elif code == errno.EINVAL:
        hint = "the kernel did not accept that value for this file; see cgroups(7) for what it expects"
    elif code == errno.ESRCH:
        hint = "no such process: it has exited already"
    elif code == errno.EBUSY:
        hint = "the cgroup is in use: processes or child cgroups are still in it"
    else:
        hint = "see cgroups(7)"
    return CgroupError(f"{doing} failed: {os.strerror(code) if code else error}", hint)


def _rmdir(owner: Cgroup | None, path: str) -> bool:
    """rmdir(2) a cgroup (the kernel allows it once it holds no process and no child cgroup)."""
    shell = f"rmdir {shlex.quote(path)}"
    context = owner._step(shell, what="remove the cgroup") if owner else steps.record(shell)
    with context:
        for attempt in range(50):
            try:
                os.rmdir(path)
                return True
            except FileNotFoundError:
                return False
            except OSError as error:
                # a process that just died can hold the cgroup for a moment longer
                if error.errno == errno.EBUSY and attempt < 49:
                    time.sleep(0.02)
                    continue
                raise _explain(error, f"removing the cgroup {path}") from error
    return False


def _remove_empty_parent(owner: Cgroup | None, parent: str) -> None:
    """Remove the stages-owned ``stages`` directory if nothing is left in it; never anything else."""
    if os.path.basename(parent) != PARENT:
        return
    try:
        if any(entry.is_dir() for entry in os.scandir(parent)):
            return
    except FileNotFoundError:  # another stages program removed it first
        return
    try:
        os.rmdir(parent)
    except OSError:
        return  # another stages cgroup appeared meanwhile, or a process: it stays, as it should
    shell = f"rmdir {shlex.quote(parent)}"
    with owner._step(shell, what="the stages parent, now empty") if owner else steps.record(shell):
        pass


def _stages_parents() -> Iterator[str]:
    """``<own cgroup>/stages`` in each hierarchy that holds one of our controllers, when it exists."""
    layout = detect()
    for directory in dict.fromkeys(h.own_directory for h in [*layout.controllers.values(),
                                                             *layout.extras.values()]):
        parent = os.path.join(directory, PARENT)
        if os.path.isdir(parent):
            yield parent


def _kill_tree(owner: Cgroup | None, directories: list[str], timeout: float = 5.0) -> None:
    """SIGKILL every process in these cgroup directories until they are empty (or ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = sorted({pid for directory in directories for pid in _procs(directory)})
        if not left:
            return
        shell = "kill -KILL " + " ".join(map(str, left))
        with owner._step(shell, what="kill what is left") if owner else steps.record(shell):
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _thaw_named(owner, os.path.basename(min(directories, key=len)))
        time.sleep(0.02)


def _thaw_named(owner: Cgroup | None, name: str) -> None:
    """Thaw the stages cgroup ``name`` (and below) in the freezer, wherever that is: a frozen (paused)
    process acts on the SIGKILL it was sent only once thawed (v1 freezer-subsystem.rst)."""
    freezer = detect().extras.get("freezer")
    if freezer is None:
        return
    directory = os.path.join(freezer.own_directory, PARENT, name)
    for top, _, _ in os.walk(directory):
        if is_frozen(top, freezer.version):
            path, value = ((os.path.join(top, "freezer.state"), "THAWED") if freezer.version == 1
                           else (os.path.join(top, "cgroup.freeze"), "0"))
            shell = f"echo {value} > {shlex.quote(path)}"
            with owner._step(shell, what="thaw, so that the killed processes die") if owner else \
                    steps.record(shell):
                with open(path, "w") as handle:
                    handle.write(value)


def _subdirectories(parent: str) -> list[os.DirEntry]:
    """The ``stages-*`` directories in ``parent``; none if another stages program just removed it."""
    try:
        return [e for e in os.scandir(parent) if e.name.startswith(PREFIX) and e.is_dir()]
    except FileNotFoundError:
        return []


def find() -> list[str]:
    """The names of the ``stages-*`` cgroups below our own cgroup, in any hierarchy."""
    names: set[str] = set()
    for parent in _stages_parents():
        names.update(entry.name for entry in _subdirectories(parent))
    return sorted(names)


def cleanup(names: Iterable[str] | None = None, *, kill: bool = False,
            record: StepRecord | None = None) -> list[str]:
    """Remove leftover ``stages-*`` cgroups whose processes are all gone; return the names removed.

    For after a crash or a SIGKILL of an isolate: the processes died, the directories stayed. Only looks
    in the ``stages`` directory below our own cgroup, only at names with our prefix, and leaves every
    cgroup that still holds a process alone, unless ``kill`` is true and ``names`` names it: then its
    processes get SIGKILL first (for an isolate whose holder died but whose children did not).
    ``names`` (with or without the prefix) limits it to those; without it, every empty ``stages-*``
    cgroup goes, so call it that way only when no other stages program is starting one at that moment.
    """
    wanted = None if names is None else {n if n.startswith(PREFIX) else PREFIX + n for n in names}
    owner = Cgroup("cleanup", {}, {}, record=record) if record is not None else None
    removed: set[str] = set()
    busy: set[str] = set()
    parents = list(_stages_parents())
    for parent in parents:
        for entry in _subdirectories(parent):
            if wanted is not None and entry.name not in wanted:
                continue
            tree = sorted(os.walk(entry.path, topdown=False), key=lambda item: -len(item[0]))
            if kill and wanted is not None and any(_procs(top) for top, _, _ in tree):
                _kill_tree(owner, [top for top, _, _ in tree])
            if any(_procs(top) for top, _, _ in tree):
                busy.add(entry.name)
                continue
            try:
                for top, _, _ in tree:
                    _rmdir(owner, top)
            except CgroupError:
                busy.add(entry.name)
                continue
            removed.add(entry.name)
    for parent in parents:
        _remove_empty_parent(owner, parent)
    return sorted(removed - busy)
