"""What the engine knows about each container: one JSON file per container, written atomically.

Layout below the state directory (``$STAGES_HOME``, default /var/lib/stages)::

    containers/.lock               flock(2): naming and listing are serialised across commands
    containers/ID/container.json   the record: name, image, command, options, status, exit code ...
    containers/ID/steps.json       the steps of its run (what ``--explain`` prints), apart: every
                                   ``stages ps`` and ``stages run`` reads each record, never these
    containers/ID/bundle/          the OCI bundle: config.json, and rootfs/ (the overlayfs mount point)
    containers/ID/upper, work      overlayfs' upper and work directories: what the container changed
    containers/ID/container.log    the output of a detached container

A record says what was true when it was written; :func:`status` says what is true *now*: a container
whose monitor (the process that created it and waits for it) has died is ``stopped`` with an unknown exit
code, whatever the file says.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from stages.errors import StagesError

STATE_FILE = "container.json"
STEPS_FILE = "steps.json"
LOG_FILE = "container.log"

# Docker's names are "adjective_surname"; ours are adjective_scientist-of-the-kernel, short and harmless.
ADJECTIVES = ("agile", "bold", "brave", "calm", "clever", "cosy", "eager", "fond", "gentle", "happy", "jolly",
              "keen", "kind", "lucid", "merry", "modest", "nifty", "noble", "quiet", "quirky", "sharp",
              "shy", "steady", "sunny", "swift", "tender", "tidy", "vivid", "wise", "witty", "zen")
NAMES = ("babbage", "bellard", "corbato", "dijkstra", "hopper", "kerrisk", "knuth", "lamport", "liskov",
         "lovelace", "mccarthy", "ritchie", "thompson", "torvalds", "turing", "wirth", "poettering",
         "kroah", "biederman", "menage", "hallyn", "cox", "tanenbaum", "pike", "hamilton", "allen",
         "goldberg", "kay", "engelbart", "bach")

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
_ID = re.compile(r"^[0-9a-f]{32}$")  # new_id()'s shape


class NoSuchContainerError(StagesError):
    """No container has that name or ID."""


def home() -> Path:
    """The state directory: ``$STAGES_HOME``, else /var/lib/stages (:func:`stages.paths.state_dir`)."""
    from stages.paths import state_dir

    return state_dir()


def directory(container_id: str, base: Path | None = None) -> Path:
    """The directory of one container."""
    return (base or home()) / "containers" / container_id


@contextlib.contextmanager
def locked(base: Path | None = None) -> Iterator[Path]:
    """Hold the containers' lock (flock(2) on containers/.lock) for the ``with`` block."""
    top = (base or home()) / "containers"
    top.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(top / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield top
    finally:
        os.close(fd)


def write(record: dict, base: Path | None = None) -> None:
    """Write a container's record atomically: a temporary file, then rename(2) over the old, so that a
    reader sees the old record or the new one, never half of one.

    No fsync(2): a record describes processes and mounts that do not outlive a reboot, and losing its
    last write in a crash changes nothing :func:`status` says (the monitor is gone either way), while
    an fsync would cost every write of a ``stages run`` a disk flush. One line of JSON, as the C encoder
    writes it (``indent`` would take the slow pure-Python one); ``stages inspect`` prints it indented.
    """
    where = directory(record["id"], base)
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = where / f".{STATE_FILE}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        handle.write(json.dumps(record, sort_keys=True))
    os.replace(temporary, where / STATE_FILE)


def read(container_id: str, base: Path | None = None) -> dict:
    """The record of ``container_id`` as written (see :func:`status` for what is true now)."""
    try:
        with open(directory(container_id, base) / STATE_FILE) as handle:
            return json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        raise NoSuchContainerError(f"there is no container {container_id!r}",
                                   "`stages ps -a` lists the containers") from None


def write_steps(container_id: str, steps: list[dict], base: Path | None = None) -> None:
    """Keep the steps of a container's run (a step record's ``to_dicts()``), atomically as :func:`write`.

    They live beside the record, not in it: seventy steps would make each record ten times the size,
    and every ``stages run`` (for the names in use) and ``stages ps`` reads every record.
    """
    where = directory(container_id, base)
    temporary = where / f".{STEPS_FILE}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        handle.write(json.dumps(steps))
    os.replace(temporary, where / STEPS_FILE)


def read_steps(container_id: str, base: Path | None = None) -> list[dict]:
    """The steps of the container's last run (empty before it ran)."""
    try:
        with open(directory(container_id, base) / STEPS_FILE) as handle:
            return json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def update(container_id: str, base: Path | None = None, **changes) -> dict:
    """Read, change and write one record under the lock; returns the new record."""
    with locked(base):
        record = read(container_id, base)
        record.update(changes)
        write(record, base)
    return record


def all_records(base: Path | None = None) -> list[dict]:
    """Every container's record, oldest first; half-written directories (no record yet) are skipped."""
    top = (base or home()) / "containers"
    found = []
    for entry in sorted(top.iterdir()) if top.is_dir() else []:
        if entry.name.startswith("."):
            continue
        with contextlib.suppress(StagesError):
            found.append(read(entry.name, base))
    return sorted(found, key=lambda record: record.get("created", ""))


def in_use(base: Path | None = None) -> dict[str, list[str]]:
    """Which image each container uses: image id -> the names of the containers built on it.

    The image store asks this before it removes an image (``stages rmi``): an image a container stands on,
    running or stopped, stays (its layers are the container's overlayfs lower directories).
    """
    used: dict[str, list[str]] = {}
    for record in all_records(base):
        for key in {record.get("image_id"), record.get("image")} - {None, ""}:
            used.setdefault(key, []).append(record["name"])
    return used


def using_image(image_id: str, base: Path | None = None) -> list[str]:
    """The names of the containers, running or stopped, built on the image ``image_id`` (or named by
    it, ``name:tag``): the image store's ``in_use(image_id)`` hook for ``stages rmi``."""
    return sorted(name for key, names in in_use(base).items() if key == image_id for name in names)


def process_alive(pid: int | None, started: int | None) -> bool:
    """Whether ``pid`` runs and is the process that started at ``started`` (a PID can be reused)."""
    from stages.runtime.oci.statefile import alive

    return bool(pid) and alive(pid, started)


def status(record: dict) -> str:
    """What is true now: ``creating``, ``created``, ``running`` or ``stopped``."""
    written = record.get("status", "creating")
    if written == "stopped":
        return "stopped"
    if not process_alive(record.get("monitor_pid"), record.get("monitor_started")):
        return "stopped"  # its monitor died: nobody waits for it, nobody will record an exit code
    return written


def exit_description(record: dict) -> str:
    """``Exited (3)``, ``Up``, ``Exited (137, OOM-killed)``, ``Exited (unknown: its monitor died)`` ... as
    ``ps`` shows it."""
    now = status(record)
    if now == "running":
        return "Up"
    if now in ("created", "creating"):
        return now.capitalize()
    if record.get("exit_code") is None:
        return "Exited (unknown: its monitor died)"
    if record.get("oom_killed"):
        # the kernel's OOM killer ended it (137 = 128 + SIGKILL), or one of its processes
        return (f"Exited ({record['exit_code']}, OOM-killed)" if record["exit_code"] == 137 else
                f"Exited ({record['exit_code']}; a process was OOM-killed)")
    return f"Exited ({record['exit_code']})"


def new_id() -> str:
    """A container ID: 32 random hex digits (short enough for a cgroup name, cgroups(7) has no limit
    but a veth name does, so the network hashes it)."""
    return os.urandom(16).hex()  # what secrets.token_hex(16) does, without importing hmac and hashlib


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise StagesError(f"{name!r} cannot name a container",
                          "use letters, digits, '_', '.' or '-' (at most 63), first a letter or digit")
    return name


def pick_name(taken: set[str]) -> str:
    """A docker-style ``adjective_name`` nobody has; a number is added once the pairs run out."""
    for _ in range(200):
        name = f"{_choice(ADJECTIVES)}_{_choice(NAMES)}"
        if name not in taken:
            return name
    number = 2
    while f"{name}{number}" in taken:
        number += 1
    return f"{name}{number}"


def _choice(items: tuple[str, ...]) -> str:
    """One of ``items`` at random (os.urandom(2): :mod:`random` would be one more import per run)."""
    return items[int.from_bytes(os.urandom(2), "little") % len(items)]


def reserve(record: dict, name: str | None, base: Path | None = None) -> dict:
    """Give ``record`` its name (``name``, or a fresh one) and write it, all under the lock: twenty
    ``stages run`` at once get twenty different names."""
    with locked(base):
        records = all_records(base)
        taken = {other["name"] for other in records}
        if name is not None:
            check_name(name)
            if name in taken:
                raise StagesError(f"the name {name!r} is in use by another container",
                                  f"pick another with --name, or remove it: stages rm -f {name}")
        record["name"] = name or pick_name(taken)
        record["created"] = now()
        write(record, base)
    return record


def find(name_or_id: str, base: Path | None = None) -> dict:
    """A container by name, by ID, or by a unique prefix of its ID."""
    if _ID.match(name_or_id):
        # a whole ID (what `stages run --rm` and the monitor hold) names its directory: no need to read
        # every record in the store
        with contextlib.suppress(NoSuchContainerError):
            return read(name_or_id, base)
    records = all_records(base)
    for record in records:
        if name_or_id in (record["name"], record["id"]):
            return record
    matches = [record for record in records if name_or_id and record["id"].startswith(name_or_id)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise StagesError(f"{name_or_id!r} is the start of several container IDs", "give more of the ID")
    raise NoSuchContainerError(f"there is no container {name_or_id!r}", "`stages ps -a` lists the containers")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
