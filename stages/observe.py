"""Read-only views of kernel state, for every stage, the notebooks and the tests.

Nothing here changes anything: it reads /proc and /sys so that a learner can compare a process inside a
jail, an isolate or a container with one on the host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from stages.kernel import NAMESPACES


def namespace_inodes(pid: int | str = "self") -> dict[str, int]:
    """The inode of each namespace ``pid`` is in: two processes share a namespace iff the inodes match."""
    inodes = {}
    for name, (_, proc_name, _) in NAMESPACES.items():
        try:
            inodes[name] = os.stat(f"/proc/{pid}/ns/{proc_name}").st_ino
        except FileNotFoundError:  # a namespace type this kernel lacks
            continue
    return inodes


def shared_namespaces(pid_a: int | str, pid_b: int | str = "self") -> dict[str, bool]:
    """For each namespace type, whether the two processes are in the same one."""
    a, b = namespace_inodes(pid_a), namespace_inodes(pid_b)
    return {name: a[name] == b.get(name) for name in a}


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    root: str
    target: str
    options: str
    propagation: str  # "shared:N", "master:N", "" (private) ...
    fstype: str
    source: str
    super_options: str = ""  # the filesystem's own options (an overlay's lowerdir=, upperdir= ...)


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts(pid: int | str = "self") -> list[Mount]:
    """The mount table of ``pid``'s mount namespace, from /proc/PID/mountinfo (see proc(5))."""
    result = []
    with open(f"/proc/{pid}/mountinfo") as handle:
        for line in handle:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields = left.split(" ")
            fstype, source, *rest = right.split(" ")
            result.append(Mount(
                mount_id=int(fields[0]), parent_id=int(fields[1]), root=_unescape(fields[3]),
                target=_unescape(fields[4]), options=fields[5], propagation=" ".join(fields[6:]),
                fstype=fstype, source=_unescape(source), super_options=rest[0] if rest else "",
            ))
    return result


def net_devices(pid: int | str = "self") -> list[str]:
    """Names of the network interfaces in ``pid``'s network namespace."""
    with open(f"/proc/{pid}/net/dev") as handle:
        lines = handle.readlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines)


def cgroups_of(pid: int | str = "self") -> dict[str, str]:
    """``pid``'s cgroup path per hierarchy, from /proc/PID/cgroup: ``{"memory": "/a/b", "": "/"}``.

    The key is the controller list of a v1 hierarchy (``"cpu,cpuacct"``, ``"name=systemd"``) or ``""``
    for the cgroup v2 hierarchy.
    """
    result = {}
    with open(f"/proc/{pid}/cgroup") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            result[controllers] = path
    return result


def status(pid: int | str = "self") -> dict[str, str]:
    """/proc/PID/status as a dict (Uid, Gid, CapEff, CapBnd, NoNewPrivs, NSpid ...)."""
    result = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            result[key] = value.strip()
    return result


def cgroup_layout() -> str:
    """``"v2"`` (unified only), ``"hybrid"`` (v1 controllers plus an empty cgroup2), or ``"v1"``."""
    types = {m.target: m.fstype for m in mounts() if m.fstype in ("cgroup", "cgroup2")}
    if types.get("/sys/fs/cgroup") == "cgroup2":
        return "v2"
    has_v1 = "cgroup" in types.values()
    has_v2 = "cgroup2" in types.values()
    if has_v1 and has_v2:
        return "hybrid"
    if has_v1:
        return "v1"
    return "none"


def processes() -> list[dict]:
    """Every process this PID namespace can see: pid, parent, name, command line (through psutil)."""
    import psutil

    result = []
    for process in psutil.process_iter(["pid", "ppid", "name", "cmdline", "username"]):
        result.append(dict(process.info))
    return result
