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
from collections.abc import Callable, Iterable
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

    def show(self, result: Section, number: str) -> None:
        """Print one section: its title, lesson, findings, what it skipped, and with ``explain`` its steps."""
        print(f"\n-- {number} {result.title} --", file=self.out)
        if result.lesson:
            self.say(result.lesson, 2)
        width = max([len(finding.subject) for finding in result.findings] + [8])
        for finding in result.findings:
            mark = f"[{finding.mark}] " if finding.mark else ""
            lead = f"  {finding.subject:<{width}}  "
            for number, line in enumerate((mark + finding.text).split("\n")):
                print(textwrap.fill(line, WIDTH, initial_indent=lead if number == 0 else " " * len(lead),
                                    subsequent_indent=" " * len(lead), break_on_hyphens=False),
                      file=self.out)
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
            try:
                result = spec.function(self)
            except StagesError as error:
                result = Section(error=error.message + (f"; hint: {error.hint}" if error.hint else ""))
            result.stage, result.title = spec.stage, spec.title
            self.show(result, f"{spec.stage}.{counter}")
            results.append(result)
        failed = [result for result in results if result.error]
        print(f"\n{len(results)} sections, {len(failed)} failed; everything the tour made is gone again.",
              file=self.out)
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
def canary(label: str) -> Iterable[tuple[Path, str]]:
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


__all__ = ["SECTIONS", "Finding", "Section", "SectionSpec", "Tour", "canary", "run", "section",
           "stages_available"]
