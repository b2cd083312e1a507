"""The tour: from a chroot jail to a container, each step run on the real kernel and what it showed.

``stages tour`` (and ``bash workshop.sh tour``) walks the whole progression on the embedded busybox rootfs
(:func:`stages.rootfs.default_rootfs`): stage 1 chroots into it and looks at what that hides and what it
does not, then breaks out; stage 2 does the same in an isolate wired by hand, where the same looks come back
isolated and the escape fails; stage 3 runs one container with the engine (``stages run --rm``), looks at
it from inside and from the host, and ends with stage 2's steps beside stage 3's: what one command
replaced. Nothing here is canned text: every finding printed is something a command just observed.

The tour is a list of *sections*. A section is a function that takes the :class:`Tour` (the rootfs, the
options, facts earlier sections left) and returns a :class:`Section`: its findings and the
:class:`~stages.steps.StepRecord` of what it did. A later stage adds itself with the :func:`section`
decorator::

    @tour.section(3, "the same container, automated")
    def automated(t: tour.Tour) -> tour.Section:
        ...
        return tour.Section(findings=[tour.Finding("hostname", "web", holds=True)], record=record)

Every section releases what it made (a temporary canary file, the isolate, its network namespace, its
cgroups, the container), whether it ends well, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from stages import kernel
from stages.errors import NotRootError, StagesError
from stages.steps import StepRecord

WIDTH = 100
"""Where the tour wraps its text."""


VERDICTS = {
    "isolation": ("isolated", "SHARED"),
    "power": ("held back", "HOST ROOT'S POWER"),
    "limit": ("limited", "UNLIMITED"),
    "cleanup": ("cleaned up", "LEFT BEHIND"),
    "host": ("untouched", "CHANGED"),
}
"""The words a finding's verdict is printed with, by kind, (holds, fails): a limit is not isolation
(what a process may use is not what it may see, cgroups(7) vs namespaces(7)), and neither is a clean-up."""


@dataclass
class Finding:
    """One thing a section observed. ``holds`` is what was measured: True when the jail or isolate saw
    something else than the host (or, by ``kind``, root was refused, the limit held, nothing was left,
    the host was untouched), False when it did not, None for a plain fact. ``kind`` picks the words the
    verdict is printed with (:data:`VERDICTS`); every verdict is computed by the section, never written in."""

    subject: str
    text: str
    holds: bool | None = None
    why: str = ""
    verbatim: bool = False  # print the lines as they are (a script), never wrapped
    kind: str = "isolation"

    @property
    def isolated(self) -> bool | None:
        """The verdict of an isolation finding (None for a limit, a clean-up... or a plain fact)."""
        return self.holds if self.kind == "isolation" else None

    @property
    def mark(self) -> str:
        if self.holds is None:
            return ""
        return VERDICTS[self.kind][0 if self.holds else 1]


@dataclass
class Section:
    """What one section of the tour did and saw. ``skipped`` says why a part did not run."""

    findings: list[Finding] = field(default_factory=list)
    record: StepRecord | None = None
    lesson: str = ""
    skipped: str = ""
    stage: int = 0
    title: str = ""
    error: str = ""


@dataclass(frozen=True)
class SectionSpec:
    stage: int
    title: str
    function: Callable[[Tour], Section]


SECTIONS: list[SectionSpec] = []
"""Every section of the tour, in the order it runs; :func:`section` appends to it."""

STAGE_TITLES = {1: "stage 1: the chroot jail", 2: "stage 2: an isolate wired by hand",
                3: "stage 3: the container runtime"}


def section(stage: int, title: str) -> Callable[[Callable[[Tour], Section]], Callable[[Tour], Section]]:
    """Register a function as a section of ``stage`` (it runs after the sections registered before it)."""
    def register(function: Callable[[Tour], Section]) -> Callable[[Tour], Section]:
        SECTIONS.append(SectionSpec(stage, title, function))
        return function
    return register


def stages_available() -> list[int]:
    """The stage numbers that have at least one section."""
    return sorted({spec.stage for spec in SECTIONS})


class Tour:
    """The state one run of the tour shares between its sections.

    ``rootfs`` is the root filesystem to tour (default: :func:`stages.rootfs.default_rootfs`, built on
    first use); ``explain`` also prints each section's steps as shell commands; ``facts`` is where a
    section leaves what a later one compares with (the hostname the jail saw, the canary...).
    """

    def __init__(self, rootfs: str | os.PathLike | None = None, *, explain: bool = False,
                 out: TextIO | None = None):
        self._rootfs = Path(rootfs) if rootfs is not None else None
        self.explain = explain
        self.out = out if out is not None else sys.stdout
        self.facts: dict[str, object] = {}
        self.resources = contextlib.ExitStack()
        """What outlives one section (stage 2's isolate); released when the tour ends, however it ends."""

    @property
    def rootfs(self) -> Path:
        if self._rootfs is None:
            from stages import rootfs

            self._rootfs = rootfs.default_rootfs()
        return self._rootfs

    # -- printing ---------------------------------------------------------------------------------
    def say(self, text: str = "", indent: int = 0) -> None:
        prefix = " " * indent
        if not text:
            print(file=self.out, flush=True)
            return
        for paragraph in text.split("\n"):
            print(textwrap.fill(paragraph, WIDTH, initial_indent=prefix, subsequent_indent=prefix,
                                break_on_hyphens=False) or "",
                  file=self.out, flush=True)

    def show(self, result: Section) -> None:
        """Print what one section found: its lesson, findings, what it skipped, and with ``explain`` its
        steps (the title was printed when the section started)."""
        if result.lesson:
            self.say(result.lesson, 2)
        width = max([len(finding.subject) for finding in result.findings] + [8])
        for finding in result.findings:
            mark = f"[{finding.mark}] " if finding.mark else ""
            lead = f"  {finding.subject:<{width}}  "
            for number, line in enumerate((mark + finding.text).split("\n")):
                indent = lead if number == 0 else " " * len(lead)
                if finding.verbatim:
                    print(indent + line, file=self.out)
                    continue
                print(textwrap.fill(line, WIDTH, initial_indent=indent, subsequent_indent=" " * len(lead),
                                    break_on_hyphens=False), file=self.out)
            if finding.why:
                self.say(f"why: {finding.why}", len(lead))
        if result.skipped:
            self.say(f"skipped: {result.skipped}", 2)
        if result.error:
            self.say(f"FAILED: {result.error}", 2)
        if self.explain and result.record is not None and len(result.record):
            print("\n  the same steps, as a person would type them:", file=self.out)
            for line in result.record.script().splitlines():
                print(f"    {line}", file=self.out)
        self.out.flush()

    # -- running ------------------------------------------------------------------------------------
    def run(self, stages: Iterable[int] | None = None) -> list[Section]:
        """Run the sections of ``stages`` (default: all), printing each as it ends; return them all."""
        if not kernel.is_root():
            raise NotRootError("the tour")
        wanted = set(stages) if stages is not None else set(stages_available())
        unknown = wanted - set(stages_available())
        if unknown:
            raise StagesError(f"the tour has no stage {min(unknown)}",
                              f"choose from: {', '.join(map(str, stages_available()))}")
        print(f"stages tour: from a chroot jail to a container, on the rootfs {self.rootfs}", file=self.out)
        with self.resources:
            results = self._run_sections(wanted)
        failed = [result for result in results if result.error]
        print(f"\n{len(results)} sections, {len(failed)} failed; everything the tour made is gone again.",
              file=self.out)
        return results

    def _run_sections(self, wanted: set[int]) -> list[Section]:
        results = []
        current = None
        counter = 0
        for spec in SECTIONS:
            if spec.stage not in wanted:
                continue
            if spec.stage != current:
                current, counter = spec.stage, 0
                title = STAGE_TITLES.get(spec.stage, f"stage {spec.stage}")
                print(f"\n== {title} ==", file=self.out)
            counter += 1
            # The title first, so that a learner watching knows what the pause is for.
            print(f"\n-- {spec.stage}.{counter} {spec.title} --", file=self.out, flush=True)
            try:
                result = spec.function(self)
            except StagesError as error:
                result = Section(error=error.message + (f"; hint: {error.hint}" if error.hint else ""))
            result.stage, result.title = spec.stage, spec.title
            self.show(result)
            results.append(result)
        return results


def run(stages: Iterable[int] | None = None, *, rootfs: str | os.PathLike | None = None,
        explain: bool = False, out: TextIO | None = None) -> list[Section]:
    """Run the tour (or only ``stages``) on ``rootfs`` and print it to ``out``; return its sections."""
    return Tour(rootfs, explain=explain, out=out).run(stages)


# == stage 1: the chroot jail =========================================================================
@section(1, "a root filesystem is only a directory")
def stage1_rootfs(t: Tour) -> Section:
    from stages import jail, rootfs

    info = rootfs.describe(t.rootfs)
    record = StepRecord("look inside the rootfs")
    inside = jail.run(t.rootfs, ["ls", "/"], record=record)
    commands = len(os.listdir(rootfs.resolve(t.rootfs, "/bin")))
    names = sorted(name for name in os.listdir(t.rootfs) if not name.startswith("."))
    jailed = sorted(name for name in inside.stdout.split() if not name.startswith(".")) == names
    return Section(
        lesson="A container's files are a directory on the host. This one holds a static busybox, which "
               "is sh, ls, ps, ip and a few hundred other commands at once.",
        findings=[
            Finding("rootfs", f"{info['path']}: {info['size']} in {info['files']} files and "
                              f"{info['symlinks']} symbolic links ({commands} entries in /bin)"),
            Finding("ls /", f"inside the jail: {' '.join(inside.stdout.split())}"
                            + ("" if jailed else f"; not the rootfs's names ({' '.join(names)}): no chroot"),
                    holds=jailed, why="chroot(2): / of the jailed process is the rootfs"),
        ],
        record=record,
    )


@section(1, "what chroot hides, and what it does not")
def stage1_observations(t: Tour) -> Section:
    from stages import jail

    record = StepRecord("look around from inside the jail")
    # The observations run their own commands; these two show, for --explain, what each one is made of.
    jail.run(t.rootfs, ["hostname"], record=record)
    jail.run(t.rootfs, ["ps"], mount_proc=True, record=record)
    facts = jail.observations(t.rootfs)
    findings = []
    for fact in facts:
        findings.append(Finding(fact.name, f"host: {fact.host_value}\njail: {fact.jail_value}",
                                holds=fact.isolated, why=fact.explanation))
    t.facts["stage1 observations"] = {fact.name: fact for fact in facts}
    hidden = [fact.name for fact in facts if fact.isolated]
    shared = [fact.name for fact in facts if not fact.isolated]
    findings.append(Finding("summary", f"chroot isolated: {', '.join(hidden) or 'nothing'}; "
                                       f"shared with the host: {', '.join(shared) or 'nothing'}"))
    return Section(
        lesson="Each fact is looked at twice, from the host and from inside the jail, by running real "
               "commands (cat, ps, hostname, ip link, id, kill) chrooted into the rootfs.",
        findings=findings, record=record)


@contextlib.contextmanager
def canary(label: str) -> Iterator[tuple[Path, str]]:
    """A host file with a random token, removed however the block ends: what an escape tries to read."""
    token = f"stages-canary-{secrets.token_hex(6)}"
    with tempfile.TemporaryDirectory(prefix="stages-tour-") as directory:
        path = Path(directory) / f"{label}.txt"
        path.write_text(f"{token}: a file on the host, outside every rootfs\n")
        yield path, token


@section(1, "root walks out of the jail")
def stage1_escape(t: Tour) -> Section:
    from stages import jail

    with canary("canary") as (path, token):
        result = jail.escape(t.rootfs, path)
    t.facts["stage1 escape"] = result
    findings = [
        Finding("canary", f"made {path} on the host, holding {token}"),
        Finding("by its path", "the jail could not read it by name: chroot hides it"
                if not result.visible_in_jail else "the jail read it by name: chroot did not hide it",
                holds=not result.visible_in_jail),
    ]
    if result.escaped:
        findings.append(Finding("the escape", f"climbed {result.levels} levels with chroot + cd ..\n"
                                              f"read the canary: {(result.content or '').strip()}",
                                holds=not result.escaped,
                                why="chroot(2) does not change the working directory, and root may chroot "
                                    "again: a chroot below the working directory leaves it outside the "
                                    "root, where `cd ..` never stops."))
    else:
        findings.append(Finding("the escape", f"failed: {result.error or 'the canary was not read'}",
                                holds=not result.escaped))
    return Section(
        lesson="Root inside the jail keeps every capability, including CAP_SYS_CHROOT: it chroots into a "
               "directory below itself without cd, climbs with cd .. to the real root, and reads a host "
               "file made for the occasion (removed again).",
        findings=findings, record=result.record)


# == stage 2: an isolate wired by hand =================================================================
ISOLATE_HOSTNAME = "isolate"
"""The hostname the tour gives its isolate."""

BOOT_OFFSET_DAYS = 100
"""How many days the isolate's boot clock is shifted (a time namespace of its own)."""


def _reachable_by_anyone(path: Path) -> bool:
    """Whether every directory on the way to ``path`` lets others in (o+x): root of a user namespace is a
    nobody on the host (user_namespaces(7)) and could not even reach a rootfs below a 0700 directory."""
    current = Path(os.path.realpath(path))
    for directory in [current, *current.parents]:
        if not os.stat(directory).st_mode & 0o001:
            return False
    return True


def _isolate(t: Tour):
    iso = t.facts.get("isolate")
    if iso is None:
        raise StagesError("the isolate of section 2.1 was not made, so there is nothing to look at",
                          "see why 2.1 failed above, or run stages doctor")
    return iso


def _since(iso, start: int, title: str) -> StepRecord:
    """The steps the isolate recorded since ``start``: what one section did."""
    record = StepRecord(title)
    record.steps = list(iso.record.steps[start:])
    return record


@contextlib.contextmanager
def _owned_by_host_root(root: Path) -> Iterator[Path]:
    """A file of the host's uid 0, mode 0644, at the top of ``root``, removed however the block ends: what
    root of a user namespace (a nobody on the host) must not be able to change."""
    path = Path(root) / f".stages-tour-{secrets.token_hex(4)}"
    path.write_text("the host's root owns this file\n")
    try:
        os.chown(path, 0, 0)
        os.chmod(path, 0o644)
        yield path
    finally:
        path.unlink(missing_ok=True)


def _host_root_mount() -> tuple[str, str]:
    """``(major:minor, root)`` of the host's / (proc(5), mountinfo's fields 3 and 4)."""
    with open("/proc/self/mountinfo") as handle:
        fields = next(line.split() for line in handle if line.split()[4] == "/")
    return fields[2], fields[3]


def _measure_pivot_root(iso, root: Path, listing: list[str]) -> Finding:
    """Whether / inside is the rootfs and the host's root is gone from the isolate's mount table, looked at
    from inside (/proc/self/mountinfo), not assumed from the call having returned."""
    device, host_root = _host_root_mount()
    table = iso.run(["cat", "/proc/self/mountinfo"]).stdout.splitlines()
    fields = [line.split() for line in table if len(line.split()) > 4]
    host_root_there = [f[4] for f in fields if f[2] == device and f[3] == host_root]
    same_listing = sorted(listing) == sorted(os.listdir(root))
    text = (f"/ inside lists {' '.join(listing)}" + (", the rootfs's names" if same_listing else
                                                     ", not the rootfs's names"))
    if host_root_there:
        text += (f"; the host's root ({device}, {host_root}) is still mounted inside at "
                 f"{', '.join(host_root_there)}: the old root was not unmounted (umount -l after pivot_root)")
    else:
        text += f"; the host's root ({device}) is in none of the {len(fields)} mounts of the isolate's table"
    return Finding("pivot_root", text, holds=same_listing and not host_root_there,
                   why="pivot_root(2) moves the old root aside, and only unmounting it takes the host's "
                       "files out of the mount namespace")


def _measure_user(iso, uid_map: str, probe: Path) -> Finding:
    """Root of the user namespace tries to change a file of the host's root: the claim of the user row."""
    before = probe.read_text()
    tried = iso.run(["sh", "-c", f"echo changed >> /{probe.name}"])
    changed = probe.read_text() != before
    said = (tried.stderr.strip() or f"exit {tried.returncode}").splitlines()[-1]
    return Finding("user", f"uid_map {uid_map}: root inside is uid {uid_map.split()[1]} on the host; it "
                           f"tried to append to /{probe.name}, a file of the host's root: "
                           + ("the file changed" if changed else f"refused ({said})"),
                   holds=not changed and tried.returncode != 0, kind="power",
                   why="capabilities in a user namespace act only on what that namespace owns "
                       "(user_namespaces(7)): the host's files are not its root's")


@section(2, "one namespace at a time")
def stage2_namespaces(t: Tour) -> Section:
    from stages.isolate import ISOLATES, Isolate

    name = f"tour-{secrets.token_hex(2)}"
    iso = t.resources.enter_context(Isolate(t.rootfs, name=name))
    t.facts["isolate"] = iso
    # The same record object keeps growing through every stage 2 section and the teardown: stage 3
    # compares its own record with all of it.
    t.facts["stage2 record"] = iso.record
    findings = [Finding("holder", f"process {iso.pid} will hold the namespaces; the tour (pid {os.getpid()}) "
                                  "never leaves the host's")]
    before = iso.run(["hostname"]).stdout.strip()
    import socket

    findings.append(Finding("hostname", f"before any unshare the holder sees {before}, the host's is "
                                        f"{socket.gethostname()}", holds=before != socket.gethostname()))
    wanted = ["uts", "ipc", "net", "mount", "cgroup", "pid"]
    skipped = ""
    user = False
    if _reachable_by_anyone(t.rootfs):
        try:
            views = iso.unshare("user")
        except StagesError as error:  # user.max_user_namespaces=0, or a kernel without them
            skipped = f"the user namespace: {error.message} (see stages doctor)"
        else:
            uid_map = " ".join(iso.map_user().split())
            user = views["user"].own
            t.facts["stage2 uid_map"] = uid_map
    else:
        skipped = (f"the user namespace: {t.rootfs} is below a directory only root may enter, and root of "
                   "a user namespace is a nobody on the host (make each parent directory mode 0755)")
    if kernel.namespace_available("time"):
        wanted.append("time")
    views = iso.unshare(*wanted)
    if "time" in wanted:
        # time_namespaces(7): the offsets can be set only before the first process enters the namespace.
        iso.time_offsets(boottime=BOOT_OFFSET_DAYS * 86400)
    # PID and time namespaces hold the holder's first child, made after the unshare: look again now.
    views = iso.namespaces()
    for kind in wanted:
        view = views[kind]
        findings.append(Finding(kind, f"namespace {view.host} -> {view.inside}: isolates {ISOLATES[kind]}",
                                holds=view.own))
    iso.set_hostname(ISOLATE_HOSTNAME)
    iso.mount_proc()
    iso.mount_tmp()
    if not iso.namespaces()["user"].own:
        # Without a user namespace root inside is the host's root (user_namespaces(7)): what holds it back
        # is what Docker does, /proc/sys read-only (its files need only uid 0, no capability) and a
        # bounding set without CAP_SYS_ADMIN, CAP_SYS_NICE... (capabilities(7)); after pivot_root, which
        # needs CAP_SYS_ADMIN itself.
        iso.protect_proc()
    with _owned_by_host_root(t.rootfs) as probe:
        listing = iso.pivot_root()
        if not iso.namespaces()["user"].own:
            dropped = iso.drop_capabilities()["dropped"]
            findings.append(Finding("defences", f"no user namespace: /proc/sys made read-only, and "
                                                f"{len(dropped)} capabilities dropped from the bounding set "
                                                f"(Docker's {len(iso.capabilities or [])} kept)"))
        findings.append(_measure_pivot_root(iso, t.rootfs, listing))
        if user:
            findings.append(_measure_user(iso, t.facts["stage2 uid_map"], probe))
    return Section(
        lesson="An isolate is a process (the holder) moved into new namespaces one unshare(2) at a time. "
               "Each step is one call; the inode of each namespace, host -> isolate, shows it is a new one.",
        findings=findings, record=_since(iso, 0, "one namespace at a time"), skipped=skipped)


POWER_PROBES = {
    "raise its priority (CAP_SYS_NICE)": "renice -n -5 -p $$",
    "write /proc/sys/kernel/core_pattern":
        "cat /proc/sys/kernel/core_pattern > /proc/sys/kernel/core_pattern",
}
"""Privileged acts root may do on the host, each harmless: a shell's own priority raised (the shell then
ends), and the host's core_pattern written back with the value it holds (core(5))."""


def _measure_power(iso) -> tuple[bool, str, str]:
    """Each :data:`POWER_PROBES` act tried on the host (by this root process, with the rootfs's busybox) and
    inside the isolate: held back when every act the host may do is refused inside."""
    import subprocess

    from stages import rootfs

    busybox = rootfs.find_busybox()
    host, inside, held = [], [], True
    for act, command in POWER_PROBES.items():
        on_host = subprocess.run([busybox, "sh", "-c", command], capture_output=True, text=True, timeout=30)
        there = iso.run(["sh", "-c", command])
        host.append(f"{act}: " + ("allowed" if on_host.returncode == 0 else "refused"))
        said = (there.stderr.strip() or f"exit {there.returncode}").splitlines()[-1]
        inside.append(f"{act}: " + ("ALLOWED" if there.returncode == 0 else f"refused ({said})"))
        held = held and on_host.returncode == 0 and there.returncode != 0
    return held, "; ".join(host), "; ".join(inside)


@section(2, "the same looks, now isolated")
def stage2_observations(t: Tour) -> Section:
    import socket
    import subprocess

    iso = _isolate(t)
    start = len(iso.record.steps)
    mine = os.getpid()
    findings = []
    jail_facts = t.facts.get("stage1 observations", {})

    def compare(subject: str, host: str, inside: str, holds: bool, why: str = "",
                kind: str = "isolation") -> None:
        earlier = jail_facts.get(subject) if isinstance(jail_facts, dict) else None
        jail_line = ("\njail (stage 1): " + ("isolated" if earlier.isolated else "shared with the host")
                     if earlier is not None else "")
        findings.append(Finding(subject, f"host: {host}\nisolate: {inside}{jail_line}",
                                holds, why, kind=kind))

    with canary("canary") as (path, _):
        seen = iso.run(["cat", str(path)])
    compare("files", f"{path} exists on the host",
            seen.stdout.strip() if seen.returncode == 0 else (seen.stderr.strip() or "not there"),
            seen.returncode != 0)
    listing = iso.run(["ps", "-o", "pid,comm"]).stdout.split("\n")[1:]
    pids = [int(line.split()[0]) for line in listing if line.split() and line.split()[0].isdigit()]
    host_count = sum(1 for name in os.listdir("/proc") if name.isdigit())
    first = next((line.split(None, 1)[1] for line in listing if line.split()[:1] == ["1"]), "?")
    compare("processes", f"{host_count} processes, among them pid {mine} (the tour)",
            f"ps lists {len(pids)}: PID 1 is {first}" + (f"; pid {mine} is not among them"
                                                        if mine not in pids else f", and pid {mine}"),
            mine not in pids and 1 in pids, "a PID namespace numbers its processes from 1 and shows no other")
    inside = iso.run(["hostname"]).stdout.strip()
    compare("hostname", socket.gethostname(), inside, inside != socket.gethostname())
    link_lines = iso.run(["ip", "-o", "link"]).stdout.splitlines()
    links = sorted(line.split(": ")[1].split("@")[0] for line in link_lines if ": " in line)
    host_links = sorted(os.listdir("/sys/class/net"))
    compare("network interfaces", ", ".join(host_links), ", ".join(links) or "none",
            set(links) != set(host_links),
            "a new network namespace has only a loopback device, and it is down")
    ids = iso.run(["sh", "-c", "id; cat /proc/self/uid_map"]).stdout.split("\n", 1)
    uid_map = " ".join(ids[1].split()) if len(ids) > 1 else ""
    mapped = bool(uid_map) and uid_map.split()[1] != "0"
    compare("users", f"uid {os.geteuid()}", f"{ids[0].strip()}; uid_map {uid_map}", mapped,
            "root inside is root only in its user namespace" if mapped else "without a user namespace, "
            "root inside is the host's root")
    made = subprocess.run(["ipcmk", "-Q"], capture_output=True, text=True)
    if made.returncode == 0:
        queue = made.stdout.split()[-1]
        try:
            table = iso.run(["cat", "/proc/sysvipc/msg"]).stdout
        finally:
            subprocess.run(["ipcrm", "-q", queue], capture_output=True)
        listed = queue in [line.split()[1] for line in table.splitlines()[1:] if len(line.split()) > 1]
        compare("System V IPC", f"message queue {queue} made on the host (ipcmk -Q)",
                f"/proc/sysvipc/msg {'lists' if listed else 'does not list'} queue {queue}", not listed)
    held, host_text, inside_text = _measure_power(iso)
    compare("root's power", host_text, inside_text, held,
            "root of a user namespace holds capabilities only over what its namespace owns, and the "
            "host's /proc/sys files only let the host's uid 0 write (user_namespaces(7))"
            if iso.namespaces()["user"].own else "without a user namespace root inside is the host's "
            "root: only a read-only /proc/sys and a bounding set without CAP_SYS_NICE hold it back",
            kind="power")
    if "time" in iso.unshared:
        uptime_inside = float(iso.run(["cat", "/proc/uptime"]).stdout.split()[0])
        with open("/proc/uptime") as handle:
            uptime_host = float(handle.read().split()[0])
        compare("boot clock", f"up {uptime_host / 86400:.2f} days", f"up {uptime_inside / 86400:.2f} days",
                abs(uptime_inside - uptime_host) > 86400,
                "a time namespace shifts the monotonic and boot clocks, e.g. for a container migrated "
                "between machines; the wall clock stays the host's")
    kernel_inside = iso.run(["uname", "-r"]).stdout.strip()
    compare("kernel", os.uname().release, kernel_inside, kernel_inside != os.uname().release,
            "still one kernel: namespaces partition what it shows, they do not make another one")
    t.facts["stage2 observations"] = {finding.subject: finding for finding in findings}
    return Section(
        lesson="The looks of stage 1, run again inside the isolate: everything but the kernel is now the "
               "isolate's own.",
        findings=findings, record=_since(iso, start, "the same looks, now isolated"))


@section(2, "the stage 1 escape fails")
def stage2_escape(t: Tour) -> Section:
    from stages import jail

    iso = _isolate(t)
    start = len(iso.record.steps)
    with canary("canary") as (path, token):
        refused = ""
        try:
            content = iso.call(jail.climb_out, str(path))
        except FileNotFoundError:
            content = None
        except PermissionError as error:  # out, at the host's root, but its files are not root's to read
            content, refused = None, str(error)
    t.facts["stage2 escaped"] = content is not None or bool(refused)
    if refused:
        finding = Finding("the escape", f"climbed out to the host's root and found {path}, but reading it "
                                        f"was refused ({refused}): the old root is still there",
                          holds=False, why="the user namespace held, not the mount namespace: pivot_root(2) "
                                           "moves the old root aside, and it must be unmounted too")
    elif content is None:
        finding = Finding("the escape", f"the same chroot + cd .. climb ended at the isolate's own root, "
                                        f"where {path} does not exist", holds=content is None,
                          why="pivot_root(2) swapped the root of the mount namespace and the old root was "
                              "unmounted: there is nothing above the rootfs to climb to.")
    else:
        finding = Finding("the escape", f"read the canary: {content.strip()}", holds=content is None)
    return Section(
        lesson=f"Root inside runs the very climb that broke out of the jail, after a canary ({token}) was "
               "made on the host.",
        findings=[finding], record=_since(iso, start, "the stage 1 escape, inside the isolate"))


@section(2, "a limit the kernel enforces")
def stage2_limit(t: Tour) -> Section:
    from stages import observe

    iso = _isolate(t)
    start = len(iso.record.steps)
    cgroup = iso.limit(memory="24M", pids=64)
    # The hog volunteers as the OOM killer's first choice (proc(5), oom_score_adj; raising it needs no
    # privilege): else the killer may pick the larger holder, PID 1, and the whole PID namespace dies.
    hog = iso.run("echo 1000 > /proc/self/oom_score_adj; a=$(yes | head -c 67108864); echo survived ${#a}",
                  timeout=60)
    stats = cgroup.stats()
    killed = hog.returncode in (-9, 137) and bool(stats.oom_kills)
    where = ", ".join(f"{controller}: cgroup v{version}" for controller, version in cgroup.versions.items())
    findings = [
        Finding("cgroup", f"{cgroup.name} ({where}; this machine's layout: {observe.cgroup_layout()})"),
        Finding("memory", "a shell collecting 64 MB under a 24 MB limit "
                          + (f"was killed (exit {hog.returncode}); the kernel counted {stats.oom_kills} "
                             "OOM kill(s)" if killed else f"survived: {hog.stdout.strip()}"),
                holds=killed, kind="limit",
                why="the OOM killer acts inside the cgroup only: the host never noticed"),
        Finding("peak", f"{(stats.memory_peak or 0) / (1 << 20):.1f} MB at most, of {stats.memory_max} bytes "
                        "allowed"),
    ]
    t.facts["stage2 oom killed"] = killed
    return Section(
        lesson="From outside, as LXC's monitor does, the isolate is put in a cgroup of its own and its "
               "memory is limited by writing a file; then a memory hog runs inside (it sets its "
               "oom_score_adj to 1000 first, so that the OOM killer picks it and not PID 1).",
        findings=findings, record=_since(iso, start, "a cgroup limit"))


@section(2, "a network of its own")
def stage2_network(t: Tour) -> Section:
    import importlib.util
    import inspect
    import subprocess

    if importlib.util.find_spec("stages.isolate.network") is None:
        return Section(skipped="the network part: stages.isolate.network is not in this version yet")
    from stages import rootfs
    from stages.isolate import network

    if "host_netns" not in inspect.signature(network.wire).parameters:
        return Section(skipped="the network part: the isolate's network API takes no host_netns, and the "
                               "tour wires nothing to the real host's network")
    iso = _isolate(t)
    start = len(iso.record.steps)
    busybox = rootfs.find_busybox()
    host_devices = sorted(os.listdir("/sys/class/net"))
    findings = []
    # The "host" side is a network namespace the tour makes (ip netns add) and removes: nothing touches
    # the real host's network, and nothing can leave the machine.
    with network.test_host(record=iso.record) as host_netns:
        wiring = iso.connect(host_netns=host_netns)
        try:
            findings.append(Finding("wiring", wiring.diagram(), verbatim=True))
            out = iso.run(["ping", "-c", "1", "-W", "2", str(wiring.gateway.ip)])
            findings.append(Finding("isolate -> host", f"ping {wiring.gateway.ip} (the bridge) "
                                    + ("answered" if out.returncode == 0 else
                                       f"failed: {(out.stdout + out.stderr).strip()[-120:]}")))
            back = subprocess.run(["ip", "netns", "exec", host_netns, busybox, "ping", "-c", "1", "-W", "2",
                                   str(wiring.address.ip)], capture_output=True, text=True, timeout=30)
            findings.append(Finding("host -> isolate", f"ping {wiring.address.ip} (the isolate's eth0) "
                                    + ("answered" if back.returncode == 0 else
                                       f"failed: {(back.stdout + back.stderr).strip()[-120:]}")))
            t.facts["stage2 pings"] = (out.returncode == 0, back.returncode == 0)
        finally:
            wiring.teardown()
    untouched = sorted(os.listdir("/sys/class/net")) == host_devices
    findings.append(Finding("the real host", f"its interfaces are the same before and after "
                            f"({', '.join(host_devices)}): the host side was the network namespace "
                            f"{host_netns}, removed again" if untouched else
                            "its interfaces changed during the network part", holds=untouched, kind="host"))
    return Section(
        lesson="A new network namespace has only a loopback device. A veth pair is a cable with two ends: "
               "one is pushed into the isolate and named eth0, the other plugged into a bridge on the host "
               "side; addresses, a default route and NAT follow.",
        findings=findings, record=_since(iso, start, "a network of its own"))


@section(2, "the whole isolate, as a script")
def stage2_script(t: Tour) -> Section:
    iso = _isolate(t)
    record = iso.record
    outside = sum(1 for step in record.steps if step.where == "outside")
    findings = [Finding("steps", f"{len(record)} steps in {record.seconds * 1000:.0f} ms: "
                                 f"{len(record) - outside} inside the holder, {outside} from outside"),
                Finding("script", "\n".join(step.line() for step in record.steps), verbatim=True)]
    pid, directories = iso.pid, list(iso.cgroup.unique_directories()) if iso.cgroup else []
    iso.close()
    t.facts.pop("isolate", None)
    gone = not os.path.exists(f"/proc/{pid}") and not any(os.path.isdir(d) for d in directories)
    findings.append(Finding("teardown", f"closed: holder {pid} " + (
        "and its cgroup are gone" if gone else "or its cgroup is still there"), holds=gone, kind="cleanup"))
    return Section(
        lesson="Every step above, in order, as the commands a person would type: what stage 3 automates.",
        findings=findings)



# == stage 3: the container runtime =====================================================================
CONTAINER_HOSTNAME = "runtime"
"""The hostname the tour's container gets (--hostname)."""

CONTAINER_MEMORY = "64M"
"""The container's memory limit (--memory)."""

RELEASE_TIMEOUT = 10
"""Seconds the container waits for the tour's go-ahead line before it ends anyway (never hangs the tour)."""

# What the container looks at, one ``key=value`` line each, then it waits on its standard input until
# the tour has looked at it from the host (a line arrives), so that it is still running while it is
# looked at. `read -t` bounds the wait if the go-ahead never comes.
CONTAINER_LOOK = ('echo "hostname=$(hostname)"; echo "pid1=$(cat /proc/1/comm)"; echo "self=$$"; '
                  'echo links=$(ls /sys/class/net); '
                  'echo "cgroup=$(grep -m 1 memory /proc/self/cgroup || head -n 1 /proc/self/cgroup)"; '
                  f'read -t {RELEASE_TIMEOUT} go')


def command_line(options) -> str:
    """The ``stages run`` command a person would type for ``options`` (the flags the tour uses)."""
    import shlex

    words = ["stages", "run"]
    if options.remove:
        words.append("--rm")
    if options.name:
        words += ["--name", options.name]
    if options.network != "bridge":
        words += ["--network", options.network]
    if options.hostname:
        words += ["--hostname", options.hostname]
    if options.memory:
        words += ["--memory", options.memory]
    if options.pids_limit is not None:
        words += ["--pids-limit", str(options.pids_limit)]
    return shlex.join(words + [options.image, *options.command])


def limit_file(pid: int, controller: str, v1_name: str, v2_name: str) -> str:
    """The path of one cgroup file of process ``pid``'s cgroup (the v1 or v2 name, as this machine has
    ``controller``), found the way a person would: /proc/PID/cgroup (cgroups(7)) below the mount point."""
    from stages import observe
    from stages.isolate import cgroups

    hierarchy = cgroups.detect().hierarchy(controller)
    paths = observe.cgroups_of(pid)
    if hierarchy.version == 2:
        path, name = paths[""], v2_name
    else:
        path = next(path for key, path in paths.items() if controller in key.split(","))
        name = v1_name
    # Below a sub-tree mount, mountinfo's root field says which part of the tree the mount shows (proc(5))
    if hierarchy.mount_root != "/" and path.startswith(hierarchy.mount_root):
        path = path[len(hierarchy.mount_root):]
    return os.path.normpath(f"{hierarchy.mountpoint}/{path.lstrip('/')}/{name}")


def _megabytes(value: str | None) -> int | None:
    """Bytes of a ``--memory`` value the tour gives (``64M``), None for none."""
    if not value or value[-1] not in "mM" or not value[:-1].isdigit():
        return None
    return int(value[:-1]) << 20


class _LookFromHost:
    """A step-record listener: once the engine has released the container's init (the runtime's state
    says ``running``), look at the container from the host by its pid, then write the line it waits for.

    The engine's run blocks until the container ends, and its record is the one hook that runs meanwhile
    in this process; the state, not a step's wording, says when the container runs.
    """

    def __init__(self, name: str, release_fd: int):
        self.name = name
        self.release_fd = release_fd
        self.container_id: str | None = None
        self.seen: dict | None = None

    def __call__(self, _step) -> None:
        from stages.runtime import containers, engine, oci

        if self.seen is not None:
            return
        try:
            if self.container_id is None:
                self.container_id = containers.find(self.name)["id"]
            state = oci.state(self.container_id, root=engine.oci_root())
        except (StagesError, OSError, ValueError):
            return  # not created yet: a later step will look again
        if state.get("status") != "running":
            return
        self.seen = {}
        try:
            self.seen = self.look(state["pid"])
        except (OSError, StagesError, StopIteration) as error:
            self.seen = {"error": str(error)}
        finally:
            os.write(self.release_fd, b"go\n")

    @staticmethod
    def look(pid: int) -> dict:
        from stages import observe

        memory = limit_file(pid, "memory", "memory.limit_in_bytes", "memory.max")
        with open(memory) as handle:
            limit = handle.read().strip()
        shared = observe.shared_namespaces(pid)
        return {"pid": pid, "memory file": memory, "memory limit": limit,
                "new namespaces": sorted(name for name, same in shared.items() if not same),
                "host cgroup": observe.cgroups_of(pid), "devices": observe.net_devices(pid)}


def _parse_looks(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@section(3, "one command: stages run")
def stage3_run(t: Tour) -> Section:
    import socket
    import time

    from stages import observe
    from stages.runtime import containers, engine
    from stages.runtime.flags import Options

    name = f"tour-{secrets.token_hex(3)}"
    options = Options(image="busybox", command=["sh", "-c", CONTAINER_LOOK], name=name,
                      hostname=CONTAINER_HOSTNAME, memory=CONTAINER_MEMORY, network="none", remove=True)
    line = command_line(options)
    record = StepRecord(line)
    release, go = os.pipe()
    watch = _LookFromHost(name, go)
    record.listeners.append(watch)
    started = time.perf_counter()
    with tempfile.TemporaryFile() as output, contextlib.ExitStack() as close:
        close.callback(os.close, release)
        close.callback(os.close, go)
        # stdin is the pipe the listener writes the go-ahead into; stdout and stderr are a file the tour
        # reads afterwards (a foreground run returns only once the container has ended).
        info, code = engine.run(options, record=record, stdio=(release, output, output))
        output.seek(0)
        said = output.read().decode(errors="replace")
    seconds = time.perf_counter() - started
    inside = _parse_looks(said)
    seen = watch.seen or {}
    t.facts["stage3 record"] = record
    t.facts["stage3 seconds"] = seconds
    t.facts["stage3 command"] = line
    host = socket.gethostname()
    findings = [Finding("command", line, verbatim=True),
                Finding("exit", f"{info['name']} ran for {seconds:.2f} s and exited {code}")]
    findings.append(Finding("hostname", f"host: {host}\ncontainer: {inside.get('hostname', '?')}",
                            holds=inside.get("hostname") == CONTAINER_HOSTNAME != host))
    own_pid = inside.get("self", "")
    findings.append(Finding("PID 1", f"inside: PID 1 is {inside.get('pid1', '?')} and the command's shell "
                                     f"is pid {own_pid or '?'}; on the host that PID 1 is pid "
                                     f"{seen.get('pid', '?')}",
                            holds=own_pid.isdigit() and int(own_pid) <= 2,
                            why="the engine's init is PID 1 (Docker's --init): it reaps orphans and passes "
                                "signals on, and the command is its child" if own_pid != "1" else
                                "without a C compiler there is no init: the command itself is PID 1"))
    links = inside.get("links", "").split()
    findings.append(Finding("network", f"container: {', '.join(links) or 'none'} (--network none); the host "
                                       f"has {', '.join(sorted(os.listdir('/sys/class/net')))}",
                            holds=links == ["lo"]))
    if "memory limit" in seen:
        # v2 says "max" where there is no limit, v1 a number near 2**63 (cgroups(7))
        limit = int(seen["memory limit"]) if seen["memory limit"].isdigit() else 0
        short = os.path.join("...", *Path(seen["memory file"]).parts[-2:])
        asked = _megabytes(options.memory)
        findings.append(Finding("memory", f"{short} holds {seen['memory limit']} ({limit >> 20} MB; "
                                          f"--memory {options.memory or 'not given'}), read on the host "
                                          f"while it ran; inside, /proc/self/cgroup says "
                                          f"{inside.get('cgroup', '?')}",
                                holds=asked is not None and limit == asked, kind="limit",
                                why="a cgroup namespace shows the container its own cgroup as the root "
                                    "(cgroup_namespaces(7))"))
        shared = sorted(set(observe.namespace_inodes()) - set(seen["new namespaces"]))
        findings.append(Finding("namespaces", f"new: {', '.join(seen['new namespaces'])}; shared with the "
                                              f"host: {', '.join(shared)}"))
    else:
        findings.append(Finding("from the host", f"the container was not looked at while it ran: "
                                                 f"{seen.get('error', 'it was never seen running')}"))
    # --rm: nothing of it may be left, which is what `stages rm` would otherwise have to do.
    left = []
    try:
        containers.find(name)
        left.append("its record")
    except containers.NoSuchContainerError:
        pass
    directory = containers.directory(info["id"])
    if directory.exists():
        left.append(str(directory))
    if any(str(directory) in mount.target for mount in observe.mounts()):
        left.append("its overlay mount")
    if seen.get("memory file") and os.path.exists(os.path.dirname(seen["memory file"])):
        left.append(os.path.dirname(seen["memory file"]))
    findings.append(Finding("--rm", "gone: its record, directory, overlay mount and cgroup" if not left
                            else f"left behind: {', '.join(left)}", holds=not left,
                            kind="cleanup"))
    return Section(
        lesson="One command does what stage 2 took a step per call for: the engine checks the flags, mounts "
               "the image's layers with overlayfs, writes config.json and hands it to its OCI runtime, which "
               "unshares, limits, pivots and starts the command. The container looks around; the tour looks "
               "at it from the host by its pid while it runs.",
        findings=findings, record=record)


@section(3, "the steps one command took")
def stage3_steps(t: Tour) -> Section:
    record = t.facts.get("stage3 record")
    if not isinstance(record, StepRecord):
        raise StagesError("the container of section 3.1 did not run, so it has no steps to show",
                          "see why 3.1 failed above, or run stages doctor")
    inside = sum(1 for step in record.steps if step.where == "inside")
    return Section(
        lesson="Everything the engine and its runtime did, in order, as the commands a person would type: "
               "the record of one `stages run`.",
        findings=[Finding("steps", f"{len(record)} steps in {record.seconds * 1000:.0f} ms: {inside} inside "
                                   f"the container, {len(record) - inside} on the host"),
                  Finding("script", "\n".join(step.line() for step in record.steps), verbatim=True)])


def step_kind(shell: str) -> str:
    """What kind of step a shell line is: its command, or for ``echo VALUE > FILE`` the file written
    (``> memory.max``), so that cgroup and uid_map writes can be counted apart; ``#`` for a note."""
    words = shell.split()
    if not words or words[0].startswith("#"):
        return "#"
    if words[0] == "echo" and ">" in words:
        target = words[words.index(">") + 1:] or [""]
        return "> " + os.path.basename(target[0].strip("'\""))
    return words[0]


def side_by_side(manual: StepRecord, automated: StepRecord) -> list[tuple[str, int, int]]:
    """``(kind, steps by hand, steps automated)`` for every kind of step either record holds, in the
    order they first appear (automated first)."""
    from collections import Counter

    by_hand = Counter(step_kind(step.shell) for step in manual.steps)
    engine = Counter(step_kind(step.shell) for step in automated.steps)
    order = list(dict.fromkeys(list(engine) + list(by_hand)))
    return [(kind, by_hand[kind], engine[kind]) for kind in order if kind != "#"]


@section(3, "by hand vs automated")
def stage3_comparison(t: Tour) -> Section:
    automated = t.facts.get("stage3 record")
    manual = t.facts.get("stage2 record")
    if not isinstance(automated, StepRecord):
        raise StagesError("the container of section 3.1 did not run, so there is nothing to compare",
                          "see why 3.1 failed above")
    if not isinstance(manual, StepRecord):
        return Section(skipped="the comparison with stage 2: stage 2 did not run in this tour (run the whole "
                               "tour, or --stage 2 --stage 3)")
    rows = side_by_side(manual, automated)
    width = max(len(kind) for kind, _, _ in rows)
    table = [f"{'step':<{width}}  by hand  automated"] + [
        f"{kind:<{width}}  {hand:>7}  {auto:>9}" for kind, hand, auto in rows]
    only_by_hand = [kind for kind, hand, auto in rows if hand and not auto]
    only_automated = [kind for kind, hand, auto in rows if auto and not hand]
    findings = [
        Finding("by hand", f"stage 2: {len(manual)} steps, {manual.seconds * 1000:.0f} ms of step time, each "
                           "one a call the learner made and checked"),
        Finding("automated", f"stage 3: {len(automated)} steps, {automated.seconds * 1000:.0f} ms of step "
                             f"time ({t.facts.get('stage3 seconds', 0.0):.2f} s end to end), from one "
                             "command:"),
        Finding("command", str(t.facts.get("stage3 command", "")), verbatim=True),
        Finding("side by side", "\n".join(table), verbatim=True),
    ]
    if only_by_hand or only_automated:
        extras = {"ip": "wired a network (this container ran with --network none)",
                  "> uid_map": "mapped a user namespace", "> timens_offsets": "shifted a time namespace",
                  "chroot": "tried the stage 1 escape"}
        done = [text for kind, text in extras.items() if kind in only_by_hand]
        findings.append(Finding("differences", f"only by hand: {', '.join(only_by_hand) or 'nothing'}\n"
                                               f"only automated: {', '.join(only_automated) or 'nothing'}",
                                why=f"stage 2 also {', '.join(done)}" if done else ""))
    return Section(
        lesson="The same kernel steps, typed one by one in stage 2 and taken by the engine from one command "
               "line in stage 3: unshare, hostname, mount, pivot_root, the cgroup files.",
        findings=findings)


__all__ = ["SECTIONS", "Finding", "Section", "SectionSpec", "Tour", "canary", "command_line", "limit_file",
           "run", "section", "side_by_side", "stages_available", "step_kind"]
