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
whose monitor (the process that created it and waits for it) has died is what the OCI runtime's state
says of its init (running while the init lives; else ``stopped``, with an unknown exit code), whatever
the file says.

A record can be damaged (cut short by a full disk, overwritten by hand, deleted): such a container is
not forgotten. :func:`all_records` lists it as a *damaged* record (``"damaged"`` says which file and how),
named by its ID, with what the OCI runtime's state still knows (its init, its monitor), so that
``stages ps`` shows it, ``stages rm -f ID`` removes it (killing what runs) and ``stages rmi`` does not
delete the layers under it.
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


class DamagedRecordError(NoSuchContainerError):
    """The container's directory is there, but its record is not readable."""

    def __init__(self, container_id: str, why: str, base: Path | None = None):
        where = directory(container_id, base) / STATE_FILE
        super().__init__(f"the record of container {container_id} is damaged: {where} {why}",
                         f"`stages rm -f {container_id}` removes the container (and kills it if it runs)")
        self.why = f"{where} {why}"


#: How large the reserve is: a few rewrites of a record (one page or block each) when the disk is full.
RESERVE_SIZE = 256 * 1024
RESERVE_FILE = ".reserve"


def oci_root() -> str:
    """The OCI runtime's state root the engine uses: ``$STAGES_RUN/oci`` when set (tests), else the
    runtime's own default (``$STAGES_OCI_ROOT`` or /run/stages/oci)."""
    from stages.runtime.oci.statefile import root_directory

    if os.environ.get("STAGES_RUN"):
        return os.path.join(os.environ["STAGES_RUN"], "oci")
    return root_directory(None)


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


def write(record: dict, base: Path | None = None, use_reserve: bool = False) -> None:
    """Write a container's record atomically: a temporary file, then rename(2) over the old, so that a
    reader sees the old record or the new one, never half of one.

    On a full disk nothing is left behind (the temporary file, a directory this write made) and
    :class:`stages.runtime.store.NoSpaceError` says so. ``use_reserve``: the monitor's last words (the
    exit code, "stopped") may use the space the reserve file holds (:func:`keep_reserve`), so that a
    ``stages stop`` on a full disk still keeps the exit code; a new container never does.

    No fsync(2): a record describes processes and mounts that do not outlive a reboot, and losing its
    last write in a crash changes nothing :func:`status` says (the monitor is gone either way), while
    an fsync would cost every write of a ``stages run`` a disk flush. One line of JSON, as the C encoder
    writes it (``indent`` would take the slow pure-Python one); ``stages inspect`` prints it indented.
    """
    where = directory(record["id"], base)
    made = not where.is_dir()
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = where / f".{STATE_FILE}.{os.getpid()}.tmp"
    text = json.dumps(record, sort_keys=True)
    for attempt in (1, 2):
        try:
            with open(temporary, "w") as handle:
                handle.write(text)
            os.replace(temporary, where / STATE_FILE)
            return
        except OSError as error:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            if error.errno not in (28, 122):  # ENOSPC, EDQUOT
                raise
            if attempt == 1 and use_reserve and _release_reserve(base):
                continue
            if made:
                with contextlib.suppress(OSError):
                    where.rmdir()
            from stages.runtime.store import no_space

            raise no_space(error) from None


def keep_reserve(base: Path | None = None) -> None:
    """Make the reserve file (containers/.reserve) if it is missing and there is room: space held back
    for the monitor's last writes on a full disk. posix_fallocate(3) holds the blocks without writing."""
    path = (base or home()) / "containers" / RESERVE_FILE
    if path.exists():
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.posix_fallocate(fd, 0, RESERVE_SIZE)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)  # no room for it: a record written now may fail, but says why
    finally:
        os.close(fd)


def _release_reserve(base: Path | None) -> bool:
    try:
        os.unlink((base or home()) / "containers" / RESERVE_FILE)
        return True
    except OSError:
        return False


def read(container_id: str, base: Path | None = None) -> dict:
    """The record of ``container_id`` as written (see :func:`status` for what is true now). Raises
    :class:`NoSuchContainerError`, or :class:`DamagedRecordError` if the directory is there but the
    record is not readable."""
    path = directory(container_id, base) / STATE_FILE
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        if _has_content(path.parent):
            raise DamagedRecordError(container_id, "is missing", base) from None
        raise NoSuchContainerError(f"there is no container {container_id!r}",
                                   "`stages ps -a` lists the containers") from None
    except OSError as error:
        raise DamagedRecordError(container_id, f"cannot be read: {error.strerror}", base) from None
    try:
        record = json.loads(data)
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
        why = "is empty" if not data else f"is not JSON ({str(error).split(':')[0]})"
        raise DamagedRecordError(container_id, why, base) from None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str) or \
            not isinstance(record.get("name"), str) or not isinstance(record.get("options", {}), dict):
        raise DamagedRecordError(container_id, "is JSON, but not a container's record", base)
    return record


def _has_content(where: Path) -> bool:
    """Whether a container directory without a record holds more than a record being written: a
    directory made a moment ago by :func:`write` (under the lock) has at most its temporary file."""
    try:
        return any(not (name.startswith(f".{STATE_FILE}.") and name.endswith(".tmp"))
                   for name in os.listdir(where))
    except (FileNotFoundError, NotADirectoryError):
        return False


def damaged(container_id: str, why: str, base: Path | None = None) -> dict:
    """A stand-in record for a container whose record is damaged, from what survives elsewhere: the OCI
    runtime's state (its init, and the process that created it: the monitor). Named by its ID."""
    runtime = runtime_state(container_id) or {}
    private = runtime.get("stages") or {}
    return {"id": container_id, "name": container_id, "damaged": why, "image": "?", "image_id": None,
            "args": [], "options": {}, "status": "unknown", "pid": runtime.get("pid") or None,
            "monitor_pid": private.get("runtime_pid"), "monitor_started": private.get("runtime_started"),
            "created": private.get("created", ""), "network": {"mode": "bridge"}, "exit_code": None}


def lookup(container_id: str, base: Path | None = None) -> dict:
    """The record of ``container_id``, or its stand-in (:func:`damaged`) if the record is damaged."""
    try:
        return read(container_id, base)
    except DamagedRecordError as error:
        return damaged(container_id, error.why, base)


def runtime_state(container_id: str) -> dict | None:
    """The OCI runtime's state.json of the container (None: it has none, or it is damaged too)."""
    from stages.runtime.oci import statefile

    try:
        return statefile.read(container_id, oci_root())
    except StagesError:
        return None


def runtime_status(container_id: str) -> str | None:
    """What the OCI runtime says of the container's init now (its PID and start time checked, never just
    believed): ``running`` (or paused), ``created``, ``creating``, or None when it has stopped."""
    from stages.runtime.oci import statefile

    data = runtime_state(container_id)
    if data is None:
        return None
    now = statefile.status(data, oci_root())
    return {"paused": "running", "stopped": None}.get(now, now)


def mounted_layers(container_id: str, base: Path | None = None) -> list[str] | None:
    """The lower directories (lowest first) of the container's overlay mount, read from
    /proc/self/mountinfo (proc(5)); None when its rootfs is not mounted here."""
    target = os.path.realpath(directory(container_id, base) / "bundle" / "rootfs")
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields, _, rest = line.rstrip("\n").partition(" - ")
            if fields.split(" ")[4] != target:
                continue
            kind, _source, options = (rest.split(" ") + ["", "", ""])[:3]
            if kind != "overlay":
                continue
            for option in options.split(","):
                if option.startswith("lowerdir="):
                    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...)
                    value = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), option[9:])
                    return list(reversed(value.split(":")))
    return None


def write_steps(container_id: str, steps: list[dict], base: Path | None = None) -> None:
    """Keep the steps of a container's run (a step record's ``to_dicts()``), atomically as :func:`write`.

    They live beside the record, not in it: seventy steps would make each record ten times the size,
    and every ``stages run`` (for the names in use) and ``stages ps`` reads every record.
    """
    where = directory(container_id, base)
    temporary = where / f".{STEPS_FILE}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as handle:
            handle.write(json.dumps(steps))
        os.replace(temporary, where / STEPS_FILE)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        if error.errno in (28, 122):  # ENOSPC, EDQUOT
            from stages.runtime.store import no_space

            raise no_space(error) from None
        raise


def read_steps(container_id: str, base: Path | None = None) -> list[dict]:
    """The steps of the container's last run (empty before it ran)."""
    try:
        with open(directory(container_id, base) / STEPS_FILE) as handle:
            return json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def update(container_id: str, base: Path | None = None, use_reserve: bool = False, **changes) -> dict:
    """Read, change and write one record under the lock; returns the new record (``use_reserve``: see
    :func:`write`)."""
    with locked(base):
        record = read(container_id, base)
        record.update(changes)
        write(record, base, use_reserve=use_reserve)
    return record


def all_records(base: Path | None = None) -> list[dict]:
    """Every container's record, oldest first; a damaged one as its stand-in (:func:`damaged`, with
    ``"damaged"`` saying what is wrong); half-written directories (no record yet) are skipped."""
    top = (base or home()) / "containers"
    found = []
    for entry in sorted(top.iterdir()) if top.is_dir() else []:
        if entry.name.startswith("."):
            continue
        try:
            found.append(read(entry.name, base))
        except DamagedRecordError as error:
            if entry.is_dir():
                found.append(damaged(entry.name, error.why, base))
        except StagesError:
            continue
    return sorted(found, key=lambda record: str(record.get("created", "")))


def in_use(base: Path | None = None) -> dict[str, list[str]]:
    """Which image each container uses: image id -> the names of the containers built on it.

    The image store asks this before it removes an image (``stages rmi``): an image a container stands on,
    running or stopped, stays (its layers are the container's overlayfs lower directories).
    """
    used: dict[str, list[str]] = {}
    for record in all_records(base):
        if record.get("damaged"):
            continue  # which image it uses is not known: see damaged_layers()
        for key in {record.get("image_id"), record.get("image")} - {None, ""}:
            used.setdefault(key, []).append(record["name"])
    return used


def damaged_layers(base: Path | None = None) -> dict[str, list[str] | None]:
    """The layer directories each container with a damaged record stands on: ID -> its overlay mount's
    lower directories, or None when that cannot be learnt (its rootfs is not mounted here)."""
    return {record["id"]: mounted_layers(record["id"], base) for record in all_records(base)
            if record.get("damaged")}


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
    if record.get("damaged") or not process_alive(record.get("monitor_pid"), record.get("monitor_started")):
        # Its monitor died (or its record cannot say): the OCI runtime's state knows its init, whose PID
        # and start time tell whether it still runs; if not, nobody will record an exit code.
        return runtime_status(record["id"]) or "stopped"
    return written


def exit_description(record: dict) -> str:
    """``Exited (3)``, ``Up``, ``Exited (137, OOM-killed)``, ``Exited (unknown: its monitor died)`` ... as
    ``ps`` shows it."""
    now = status(record)
    if record.get("damaged"):
        return f"Damaged record ({'Up' if now == 'running' else now.capitalize()})"
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
    keep_reserve(base)
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
            return lookup(name_or_id, base)
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
