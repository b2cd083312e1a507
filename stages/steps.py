"""The step record: every privileged action, with the shell command a person would type for it.

Stage 1 records its chroot, stage 2 every namespace, mount and cgroup write, and stage 3 the whole list of
manual steps one ``stages run`` replaced. Notebooks put two records side by side; ``--explain`` prints
one as it grows. A record is plain data (:meth:`StepRecord.to_dicts`), so a child process that did the
steps can send them back to the parent that shows them.

Kernel wrappers in :mod:`stages.kernel` record themselves into whichever record is *active*::

    record = StepRecord("my jail")
    with record.active():
        kernel.chroot("/tmp/rootfs")      # recorded as `chroot /tmp/rootfs`

and code that does a step another way (writing a cgroup file, running ``ip``) uses :meth:`StepRecord.step`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# typing.TYPE_CHECKING without importing typing: the names below only annotate, and typing
# costs every `stages` command milliseconds at start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_active: list[StepRecord] = []


@dataclass
class Step:
    shell: str  # what a person would type, e.g. "mount -t proc proc /proc"
    what: str = ""  # one line in the learner's words, e.g. "a fresh /proc for the new PID namespace"
    where: str = "host"  # "host", "inside" (in the isolate) or "outside" (the monitor, acting on it)
    seconds: float = 0.0
    ok: bool = True
    error: str = ""

    def line(self) -> str:
        mark = "" if self.ok else f"   # FAILED: {self.error}"
        return f"{self.shell}{mark}"


@dataclass
class StepRecord:
    title: str = ""
    steps: list[Step] = field(default_factory=list)
    listeners: list[Callable[[Step], None]] = field(default_factory=list, repr=False)

    # -- recording -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, shell: str, what: str = "", where: str = "host") -> Iterator[Step]:
        """Time the body and record it as one step, failed if the body raises."""
        item = Step(shell=shell, what=what, where=where)
        start = time.perf_counter()
        try:
            yield item
        except BaseException as error:
            item.ok = False
            item.error = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise
        finally:
            item.seconds = time.perf_counter() - start
            self.add(item)

    def do(self, shell: str, action: Callable[..., Any], *args: Any, what: str = "", where: str = "host",
           **kwargs: Any) -> Any:
        """Run ``action(*args, **kwargs)`` as one recorded step and return its result."""
        with self.step(shell, what=what, where=where):
            return action(*args, **kwargs)

    def add(self, item: Step) -> None:
        self.steps.append(item)
        for listener in self.listeners:
            listener(item)

    def extend(self, items: list[dict] | list[Step]) -> None:
        """Append steps done elsewhere (for instance in a child process, sent back as dicts)."""
        for item in items:
            self.add(item if isinstance(item, Step) else Step(**item))

    @contextlib.contextmanager
    def active(self) -> Iterator[StepRecord]:
        """Make this the record that kernel wrappers write into, for the body of the block."""
        _active.append(self)
        try:
            yield self
        finally:
            _active.remove(self)

    # -- reading ---------------------------------------------------------------------------------
    @property
    def seconds(self) -> float:
        return sum(item.seconds for item in self.steps)

    def to_dicts(self) -> list[dict]:
        # A step holds only strings, numbers and booleans: a copy of its fields is what asdict() makes,
        # without its deep copy of each value (a run's 70 steps cost milliseconds that way).
        return [dict(vars(item)) for item in self.steps]

    def script(self) -> str:
        """The record as a shell script a person could type, one command per line."""
        lines = [f"# {self.title}"] if self.title else []
        for item in self.steps:
            if item.what:
                lines.append(f"# {item.what}")
            lines.append(item.line())
        return "\n".join(lines)

    def table(self) -> str:
        """Aligned text: time, where, command; the shape ``--explain`` prints."""
        return "\n".join(format_step(item) for item in self.steps)

    def __len__(self) -> int:
        return len(self.steps)


def format_step(item: Step) -> str:
    return f"{item.seconds * 1000:8.2f} ms  {item.where:<7}  {item.line()}"


def current() -> StepRecord | None:
    """The innermost active record, or None when nobody is recording."""
    return _active[-1] if _active else None


def record(shell: str, what: str = "", where: str = "host") -> contextlib.AbstractContextManager:
    """Record into the active record if there is one; otherwise just run the body."""
    active = current()
    if active is None:
        return contextlib.nullcontext(Step(shell=shell, what=what, where=where))
    return active.step(shell, what=what, where=where)


def explain_printer(stream=None) -> Callable[[Step], None]:
    """A listener that prints each step as it lands (used by ``--explain``)."""
    import sys

    out = stream or sys.stderr

    def show(item: Step) -> None:
        print(format_step(item), file=out, flush=True)

    return show
