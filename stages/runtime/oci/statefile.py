"""Where a container's state lives, and how its status is told truthfully.

One directory per container below the runtime's *root* (``/run/stages/oci``, or ``$STAGES_OCI_ROOT``):
``state.json`` (written atomically: a temporary file, then rename(2)) and ``exec.fifo``, the FIFO the init
waits on until ``start``. The status is never just believed from the file: a container whose init has
died (or whose PID now belongs to another process) is ``stopped``, whatever the file says (runtime.md,
"State").
"""

from __future__ import annotations

import json
import os

from stages.errors import StagesError

DEFAULT_ROOT = "/run/stages/oci"
STATE_FILE = "state.json"
FIFO = "exec.fifo"
#: The fields runtime.md defines for a container's state; the rest of state.json is ours.
SPEC_FIELDS = ("ociVersion", "id", "status", "pid", "bundle", "annotations")


class ContainerNotFoundError(StagesError):
    """No container of that ID exists under the runtime's root."""


def root_directory(root: str | os.PathLike | None = None) -> str:
    """The runtime's state root: ``root``, else ``$STAGES_OCI_ROOT``, else :data:`DEFAULT_ROOT`."""
    return os.path.abspath(root or os.environ.get("STAGES_OCI_ROOT") or DEFAULT_ROOT)


def directory(container_id: str, root: str | os.PathLike | None = None) -> str:
    return os.path.join(root_directory(root), container_id)


def write(path: str, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` atomically: a reader sees the old file or the new, never half."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(temporary, path)


def read(container_id: str, root: str | os.PathLike | None = None) -> dict:
    path = os.path.join(directory(container_id, root), STATE_FILE)
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ContainerNotFoundError(f"there is no container {container_id!r} (in {root_directory(root)})",
                                     "list them with stages.runtime.oci.list_containers()") from None
    except ValueError:
        raise StagesError(f"the state of container {container_id!r} is damaged ({path})",
                          f"remove it with delete({container_id!r}, force=True)") from None


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (field 22 of /proc/PID/stat, in clock ticks since boot), or None if it
    is gone or a zombie: together with the PID it names one process, even after the PID is reused."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int, started: int | None) -> bool:
    """Whether ``pid`` still runs and is the process that started at ``started``."""
    return bool(pid) and start_time(pid) is not None and (started is None or start_time(pid) == started)


def status(data: dict, root: str | os.PathLike | None = None) -> str:
    """creating, created, running, paused or stopped: what is true now, not what was written."""
    private = data.get("stages", {})
    pid = data.get("pid") or 0
    if not pid:
        if data.get("status") == "creating" and (
                alive(private.get("setup_pid") or 0, private.get("setup_started"))
                or alive(private.get("runtime_pid") or 0, private.get("runtime_started"))):
            return "creating"
        return "stopped"
    if not alive(pid, private.get("init_started")):
        return "stopped"
    if private.get("freezer"):
        if _frozen(*private["freezer"]):  # the kernel's word, not ours (v1 freezer.state, v2 cgroup.events)
            return "paused"
    if os.path.exists(os.path.join(directory(data["id"], root), FIFO)):
        return "created"
    return "running"


def _frozen(directory: str, version: int) -> bool:
    """stages.isolate.cgroups.is_frozen, read here without importing that module: `stages-oci state`,
    which a supervisor calls several times per container, would spend ~20 ms on the import alone."""
    try:
        if version == 1:
            with open(os.path.join(directory, "freezer.state")) as handle:
                return handle.read().strip() != "THAWED"  # FROZEN, or FREEZING on the way
        with open(os.path.join(directory, "cgroup.events")) as handle:
            if "frozen 1" in handle.read().splitlines():
                return True
        with open(os.path.join(directory, "cgroup.freeze")) as handle:
            return handle.read().strip() == "1"  # freezing on the way (cgroup-v2.rst)
    except OSError:
        return False  # gone with the container


def spec_state(data: dict, root: str | os.PathLike | None = None) -> dict:
    """The state as runtime.md defines it (plus ``created`` and ``rootfs``, as runc shows them)."""
    result = {name: data.get(name) for name in SPEC_FIELDS}
    result["status"] = status(data, root)
    result["annotations"] = result["annotations"] or {}
    if result["status"] == "stopped":
        result["pid"] = 0
    for name in ("created", "rootfs"):
        if name in data.get("stages", {}):
            result[name] = data["stages"][name]
    if isinstance(result.get("created"), str) and result["created"].endswith("+00:00"):
        result["created"] = result["created"][:-6] + "Z"  # a state written before RFC 3339's Z
    result["owner"] = owner(data.get("id", ""), root)
    return result


def rfc3339(moment) -> str:
    """A UTC datetime as RFC 3339 with ``Z``, as runc writes ``created`` (``2026-12-08T04:12:10.123456Z``)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def owner(container_id: str, root: str | os.PathLike | None = None) -> str:
    """The user who owns the container's state directory (runc's ``owner``), "" if unknown."""
    import pwd

    try:
        return pwd.getpwuid(os.stat(directory(container_id, root)).st_uid).pw_name
    except (OSError, KeyError):
        return ""


def remove(container_id: str, root: str | os.PathLike | None = None) -> None:
    import shutil  # here: `state` and `list` need no archive modules at start-up (shutil imports them)

    shutil.rmtree(directory(container_id, root), ignore_errors=True)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a PID file a supervisor may read at any moment)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)
