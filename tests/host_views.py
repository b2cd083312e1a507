"""Views of a process's kernel state read straight from /proc and /sys, independent of the code under test."""

import os
from pathlib import Path


def cgroup_file(pid: int, controller: str, v1_file: str, v2_file: str) -> str:
    """One cgroup file of ``pid``'s cgroup: the v1 hierarchy holding ``controller`` if /proc/PID/cgroup
    names one, else the v2 hierarchy (cgroups(7))."""
    with open(f"/proc/{pid}/cgroup") as handle:
        lines = [line.strip().split(":", 2) for line in handle]
    for _, controllers, path in lines:
        if controller in controllers.split(","):
            mount = "/sys/fs/cgroup/" + controllers
            if not os.path.isdir(mount):
                mount = "/sys/fs/cgroup/" + controller
            return Path(mount + path, v1_file).read_text().strip()
    for number, _, path in lines:
        if number == "0":
            return Path("/sys/fs/cgroup" + path, v2_file).read_text().strip()
    raise AssertionError(f"no {controller} cgroup for {pid}")

def net_devices(pid: int) -> list[str]:
    """The interfaces of ``pid``'s network namespace: /proc/PID/net is the view of that namespace."""
    with open(f"/proc/{pid}/net/dev") as handle:
        return sorted(line.split(":", 1)[0].strip() for line in handle.readlines()[2:])
