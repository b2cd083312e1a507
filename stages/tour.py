"""The tour: from a chroot jail to a container, each step run on the real kernel and what it showed.

``stages tour`` (and ``bash workshop.sh tour``) walks the whole progression on the embedded busybox rootfs
(:func:`stages.rootfs.default_rootfs`): stage 1 chroots into it and looks at what that hides and what it
does not, then breaks out; stage 2 does the same in an isolate wired by hand, where the same looks come back
isolated and the escape fails. Nothing here is canned text: every finding printed is something a command
just observed.

The tour is a list of *sections*. A section is a function that takes the :class:`Tour` (the rootfs, the
options, facts earlier sections left) and returns a :class:`Section`: its findings and the
:class:`~stages.steps.StepRecord` of what it did. A later stage adds itself with the :func:`section`
decorator::

    @tour.section(3, "the same container, automated")
    def automated(t: tour.Tour) -> tour.Section:
        ...
        return tour.Section(findings=[tour.Finding("hostname", "web", isolated=True)], record=record)

Every section releases what it made (a temporary canary file, the isolate, its network namespace, its
cgroups), whether it ends well, fails or is interrupted.
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


@dataclass
class Finding:
    """One thing a section observed. ``isolated`` is True when the jail or isolate saw something else
    than the host, False when it saw the host's, None for a plain fact."""

    subject: str
    text: str
    isolated: bool | None = None
    why: str = ""
    verbatim: bool = False  # print the lines as they are (a script), never wrapped

    @property
    def mark(self) -> str:
        return {True: "isolated", False: "SHARED", None: ""}[self.isolated]


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
    return Section(
        lesson="A container's files are a directory on the host. This one holds a static busybox, which "
               "is sh, ls, ps, ip and a few hundred other commands at once.",
        findings=[
            Finding("rootfs", f"{info['path']}: {info['size']} in {info['files']} files and "
                              f"{info['symlinks']} symbolic links ({commands} entries in /bin)"),
            Finding("ls /", f"inside the jail: {' '.join(inside.stdout.split())}"),
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
                                isolated=fact.isolated, why=fact.explanation))
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
                isolated=not result.visible_in_jail),
    ]
    if result.escaped:
        findings.append(Finding("the escape", f"climbed {result.levels} levels with chroot + cd ..\n"
                                              f"read the canary: {(result.content or '').strip()}",
                                isolated=False,
                                why="chroot(2) does not change the working directory, and root may chroot "
                                    "again: a chroot below the working directory leaves it outside the "
                                    "root, where `cd ..` never stops."))
    else:
        findings.append(Finding("the escape", f"failed: {result.error or 'the canary was not read'}",
                                isolated=True))
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


@section(2, "one namespace at a time")
def stage2_namespaces(t: Tour) -> Section:
    from stages.isolate import ISOLATES, Isolate

    name = f"tour-{secrets.token_hex(2)}"
    iso = t.resources.enter_context(Isolate(t.rootfs, name=name))
    t.facts["isolate"] = iso
    findings = [Finding("holder", f"process {iso.pid} will hold the namespaces; the tour (pid {os.getpid()}) "
                                  "never leaves the host's")]
    before = iso.run(["hostname"]).stdout.strip()
    findings.append(Finding("hostname", f"before any unshare the holder sees the host's: {before}",
                            isolated=False))
    wanted = ["uts", "ipc", "net", "mount", "cgroup", "pid"]
    skipped = ""
    if _reachable_by_anyone(t.rootfs):
        try:
            views = iso.unshare("user")
        except StagesError as error:  # user.max_user_namespaces=0, or a kernel without them
            skipped = f"the user namespace: {error.message} (see stages doctor)"
        else:
            uid_map = " ".join(iso.map_user().split())
            findings.append(Finding("user", f"uid_map {uid_map}: root inside is uid {uid_map.split()[1]} on "
                                            "the host, with no power over the host's files or processes",
                                    isolated=views["user"].own))
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
                                isolated=view.own))
    iso.set_hostname(ISOLATE_HOSTNAME)
    iso.mount_proc()
    iso.mount_tmp()
    listing = iso.pivot_root()
    findings.append(Finding("pivot_root", f"/ inside is the rootfs ({' '.join(listing)}); the host's root "
                                          "is unmounted from the isolate's mount table", isolated=True))
    return Section(
        lesson="An isolate is a process (the holder) moved into new namespaces one unshare(2) at a time. "
               "Each step is one call; the inode of each namespace, host -> isolate, shows it is a new one.",
        findings=findings, record=_since(iso, 0, "one namespace at a time"), skipped=skipped)


@section(2, "the same looks, now isolated")
def stage2_observations(t: Tour) -> Section:
    import socket
    import subprocess

    iso = _isolate(t)
    start = len(iso.record.steps)
    mine = os.getpid()
    findings = []
    jail_facts = t.facts.get("stage1 observations", {})

    def compare(subject: str, host: str, inside: str, isolated: bool, why: str = "") -> None:
        earlier = jail_facts.get(subject) if isinstance(jail_facts, dict) else None
        jail_line = ("\njail (stage 1): " + ("isolated" if earlier.isolated else "shared with the host")
                     if earlier is not None else "")
        findings.append(Finding(subject, f"host: {host}\nisolate: {inside}{jail_line}", isolated, why))

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
    power = iso.run(["kill", "-0", str(mine)])
    compare("root's power", f"pid {mine} is the tour, on the host",
            f"kill -0 {mine} exited {power.returncode}: {power.stderr.strip() or 'allowed'}",
            power.returncode != 0)
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
        try:
            content = iso.call(jail.climb_out, str(path))
        except FileNotFoundError:
            content = None
    t.facts["stage2 escaped"] = content is not None
    if content is None:
        finding = Finding("the escape", f"the same chroot + cd .. climb ended at the isolate's own root, "
                                        f"where {path} does not exist", isolated=True,
                          why="pivot_root(2) swapped the root of the mount namespace and the old root was "
                              "unmounted: there is nothing above the rootfs to climb to.")
    else:
        finding = Finding("the escape", f"read the canary: {content.strip()}", isolated=False)
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
                isolated=killed, why="the OOM killer acts inside the cgroup only: the host never noticed"),
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
                            "its interfaces changed during the network part", isolated=untouched))
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
        "and its cgroup are gone" if gone else "or its cgroup is still there")))
    return Section(
        lesson="Every step above, in order, as the commands a person would type: what stage 3 automates.",
        findings=findings)


__all__ = ["SECTIONS", "Finding", "Section", "SectionSpec", "Tour", "canary", "run", "section",
           "stages_available"]
