"""What the test VM is, as JSON on stdout: the host checks it really was a cgroup v2 only machine.

Run by job.sh inside the VM. The facts come from the kernel's own tables, not from our library, so that
a bug in stages cannot make the VM look right: /proc/self/mountinfo (proc(5)) for what is mounted where,
and cgroup.controllers in the root of the unified hierarchy for the controllers it offers (cgroups(7)).
"""

import json
import os
import platform


def cgroup_mounts() -> list[dict[str, str]]:
    """Every cgroup (v1) and cgroup2 mount, with its mount point and file system type."""
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields, _, rest = line.partition(" - ")
            fstype = rest.split()[0]
            if fstype in ("cgroup", "cgroup2"):
                found.append({"mount_point": fields.split()[4], "fstype": fstype})
    return found


def controllers(root: str = "/sys/fs/cgroup") -> list[str]:
    try:
        with open(os.path.join(root, "cgroup.controllers")) as handle:
            return handle.read().split()
    except FileNotFoundError:
        return []


with open("/proc/self/cgroup") as handle:
    own_cgroup = handle.read().splitlines()
print(json.dumps({
    "cgroup_mounts": cgroup_mounts(),
    "controllers": controllers(),
    "own_cgroup": own_cgroup,
    "kernel": platform.release(),
    "python": platform.python_version(),
    "cpus": os.cpu_count(),
    # seconds since this kernel booted, as the job starts (proc(5)): the VM's start time, which notebook 00
    # shows beside a container's
    "uptime": float(open("/proc/uptime").read().split()[0]),
}, indent=2))
