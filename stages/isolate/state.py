"""A small JSON file per isolate, so that what a killed isolate leaves behind can be found and removed.

When the holder dies, even by SIGKILL, the kernel releases its namespaces and, with the mount namespace,
every mount made inside. What the kernel does *not* release is what lives on the host: cgroup directories,
veth pairs and bridges, firewall rules. So before an isolate creates any of those it writes down, atomically,
what it is about to create; :func:`cleanup` (``stages isolate --cleanup``) later removes the leftovers of
every isolate whose holder is gone.

The files live in ``$STAGES_RUN/isolates`` (default ``/run/stages/isolates``: /run is a tmpfs, emptied at
boot, like the namespaces themselves).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


def run_dir() -> Path:
    """Where isolate state files live: ``$STAGES_RUN/isolates``, default ``/run/stages/isolates``."""
    return Path(os.environ.get("STAGES_RUN") or "/run/stages") / "isolates"


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (proc(5), /proc/PID/stat field 22), or None
    when there is no such process. A pid plus its start time names one process even after pid reuse."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    return int(text.rpartition(")")[2].split()[19])


@dataclass
class IsolateState:
    """What one isolate created on the host, written before it creates it."""

    name: str
    holder_pid: int = 0
    holder_start: int | None = None
    rootfs: str = ""
    cgroups: list[str] = field(default_factory=list)
    networks: list[dict] = field(default_factory=list)  # {"name": ..., "host_netns": ... or None}

    @property
    def path(self) -> Path:
        return run_dir() / f"{self.name}.json"

    def save(self) -> None:
        """Write atomically (a temporary file renamed over the old one): a reader never sees half a file."""
        directory = run_dir()
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{self.name}.json.tmp"
        with open(temporary, "w") as handle:
            json.dump(asdict(self), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def holder_alive(self) -> bool:
        return self.holder_start is not None and start_time(self.holder_pid) == self.holder_start


def load_all() -> list[IsolateState]:
    """Every isolate state file that can be read (broken ones are skipped)."""
    states = []
    directory = run_dir()
    if not directory.is_dir():
        return states
    for path in sorted(directory.glob("*.json")):
        try:
            states.append(IsolateState(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return states


@contextlib.contextmanager
def _lock():
    directory = run_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def release(state: IsolateState) -> None:
    """Remove what ``state`` lists (cgroups, then networks), then the state file itself."""
    if state.cgroups:
        cgroups = importlib.import_module("stages.isolate.cgroups")
        for name in state.cgroups:
            # The holder is gone, so whatever is still in its cgroup is a leftover of this isolate (a
            # process still dying, or one that escaped the PID namespace's end): kill it, then rmdir.
            try:
                cgroups.Cgroup.open(name).remove()
            except cgroups.CgroupError:
                cgroups.cleanup([name])
    if state.networks:
        network = importlib.import_module("stages.isolate.network")
        for entry in state.networks:
            network.cleanup([entry["name"]], host_netns=entry.get("host_netns"))
    state.remove()


def cleanup() -> list[str]:
    """Release the leftovers of every isolate whose holder is gone; return their names.

    Safe to run at any time: isolates whose holder still runs are left alone.
    """
    cleaned = []
    with _lock():
        for state in load_all():
            if state.holder_alive():
                continue
            release(state)
            cleaned.append(state.name)
    return cleaned
