"""A podman of its own, all its state in one directory: used by tests/test_podman.py and bench/run.py.

podman keeps images, containers, locks, events and configuration in places shared by the whole machine
(/var/lib/containers, /run/containers, /etc/containers, $HOME). Here every one of them is a directory
below ``base``, set through podman's own options and the CONTAINERS_* variables, with the configuration
in tests/data/podman/ (vfs storage: no overlay mounts on the host; cgroups = "disabled": podman makes no
cgroup of its own, and the runtime makes the container's below its caller's, see docs/oci-runtime.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "podman"

#: runc has no --cgroup-manager (crun's global option, which podman passes with cgroups = "disabled"):
#: this wrapper drops it, so that podman can drive runc in the same set-up, for comparison.
RUNC_WRAPPER = """#!/bin/sh
first=1
for argument in "$@"; do
    if [ "$first" = 1 ]; then set --; first=0; fi
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    case "$argument" in --cgroup-manager) skip=1; continue;; esac
    set -- "$@" "$argument"
done
exec /usr/sbin/runc "$@"
"""


def write_runc_wrapper(path: Path) -> str:
    """:data:`RUNC_WRAPPER` as an executable file at ``path``; returns its path."""
    path.write_text(RUNC_WRAPPER)
    path.chmod(0o755)
    return str(path)


def sandbox(base: Path, runtimes: list[str]) -> tuple[list[str], dict[str, str]]:
    """Make podman's directories and configuration files below ``base``; return the podman command (without
    ``--runtime``) and the environment to run it with. ``runtimes`` are the runtime programs it will be
    given with ``--runtime``: the first is the default, and each may run containers without podman's
    cgroups (podman checks that by the program's file name)."""
    for name in ("root", "runroot", "tmp", "home", "config", "data", "xdg-run", "networks"):
        (base / name).mkdir(parents=True, mode=0o700, exist_ok=True)
    names = ", ".join(f'"{Path(runtime).name}"' for runtime in runtimes)
    conf = (DATA / "containers.conf").read_text().replace("/usr/local/bin/stages-oci", runtimes[0])
    conf = conf.replace("runtime_supports_nocgroup = [", f"runtime_supports_nocgroup = [{names}, ")
    conf += f'\n[network]\nnetwork_config_dir = "{base / "networks"}"\n'
    (base / "containers.conf").write_text(conf)
    storage = (DATA / "storage.conf").read_text()  # its [storage] table is the last: add to it
    storage += f'graphroot = "{base / "root"}"\nrunroot = "{base / "runroot"}"\n'
    (base / "storage.conf").write_text(storage)
    shutil.copy(DATA / "registries.conf", base / "registries.conf")
    environment = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(base / "home"), "TMPDIR": str(base / "tmp"),
        "XDG_CONFIG_HOME": str(base / "config"), "XDG_DATA_HOME": str(base / "data"),
        "XDG_RUNTIME_DIR": str(base / "xdg-run"),
        "CONTAINERS_CONF": str(base / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(base / "storage.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(base / "registries.conf"),
    }
    command = ["podman", "--root", str(base / "root"), "--runroot", str(base / "runroot"),
               "--tmpdir", str(base / "tmp"), "--storage-driver", "vfs",
               "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
    return command, environment
