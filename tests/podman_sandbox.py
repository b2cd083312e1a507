"""A podman of its own, all its state in one directory: used by tests/test_podman.py and bench/run.py.

podman keeps images, containers, locks, events and configuration in places shared by the whole machine
(/var/lib/containers, /run/containers, /etc/containers, $HOME). Here every one of them is a directory
below ``base``, set through podman's own options and the CONTAINERS_* variables, with the configuration
in tests/data/podman/ (vfs storage: no overlay mounts on the host; podman's cgroupfs manager, which makes
/libpod_parent/... at the root of each hierarchy: run it in a :class:`CgroupNamespace`, where that root is
a cgroup of the tests' own, see docs/oci-runtime.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
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


def sandbox(base: Path, runtimes: list[str], cgroups: str = "disabled") -> tuple[list[str], dict[str, str]]:
    """Make podman's directories and configuration files below ``base``; return the podman command (without
    ``--runtime``) and the environment to run it with. ``runtimes`` are the runtime programs it will be
    given with ``--runtime``: the first is the default, and each may run containers without podman's
    cgroups (podman checks that by the program's file name). ``cgroups``: "enabled" (podman's cgroupfs
    manager, for a podman run in a :class:`CgroupNamespace`, as tests/test_podman.py does) or "disabled"
    (the default, for a podman run anywhere else: it then makes no cgroup at the hierarchies' roots)."""
    for name in ("root", "runroot", "tmp", "home", "config", "data", "xdg-run", "networks"):
        (base / name).mkdir(parents=True, mode=0o700, exist_ok=True)
    names = ", ".join(f'"{Path(runtime).name}"' for runtime in runtimes)
    conf = (DATA / "containers.conf").read_text().replace("/usr/local/bin/stages-oci", runtimes[0])
    conf = conf.replace("runtime_supports_nocgroup = [", f"runtime_supports_nocgroup = [{names}, ")
    if cgroups == "disabled":
        # no cgroup namespace of the caller's own here (bench/run.py): podman makes no cgroup, and the
        # runtime makes each container's below its caller's
        conf = conf.replace("[containers]\n", '[containers]\ncgroups = "disabled"\n', 1)
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


class CgroupNamespace:
    """A cgroup namespace rooted at a cgroup of our own in every hierarchy, and a mount namespace in which
    the hierarchies are mounted again as it shows them, both held by a sleeping process. :attr:`prefix`
    runs a command in that cgroup and those namespaces: podman's cgroupfs manager then makes
    ``/libpod_parent/libpod-ID`` (and passes it as an absolute cgroupsPath) below our cgroup, never at
    the roots of the host's hierarchies. :meth:`close` kills whatever is left in it and removes it all."""

    def __init__(self, name: str):
        from test_conformance import MOUNT_HIERARCHIES, HarnessCgroup, hierarchies_environment

        self.cgroup = HarnessCgroup.create(name)
        self.env = hierarchies_environment(self.cgroup)
        # Every process lives in a child, init, not in the namespace's root: on cgroup v2 a cgroup that
        # holds processes cannot hand controllers to its children ("no internal processes", cgroups(7)),
        # and podman enables them in the root it sees for /libpod_parent.
        inits = []
        for directory in self.cgroup.directories:
            os.mkdir(os.path.join(directory, "init"))
            for knob in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset takes no process without them
                if os.path.exists(os.path.join(directory, knob)):
                    Path(directory, "init", knob).write_text(Path(directory, knob).read_text())
            inits.append(os.path.join(directory, "init", "cgroup.procs"))
        self.env["INITS"] = " ".join(inits)
        enter = ('for f in $PROCS; do echo $$ > "$f"; done; '
                 'exec unshare --cgroup --mount --propagation private sh -c "$0"')
        try:
            # rooted at our cgroup (unshare's moment), then into init while the host's paths still show
            script = ('for f in $INITS; do echo $$ > "$f"; done\n' + MOUNT_HIERARCHIES
                      + "echo ready\nexec sleep 1000000\n")
            self.holder = subprocess.Popen(["sh", "-c", enter, script],
                                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.env},
                                           stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            if self.holder.stdout.readline().strip() != "ready":
                raise RuntimeError("the cgroup namespace's holder did not start")
        except BaseException:
            self.cgroup.remove()
            raise
        #: a command's prefix: into our init cgroups (the namespace shows them as /init), then its namespaces
        self.prefix = ["sh", "-c", f'for f in {self.env["INITS"]}; do echo $$ > "$f"; done; '
                       f'exec nsenter -t {self.holder.pid} -C -m -- "$@"', "enter"]

    def mountinfo(self) -> list[str]:
        """The mount points of the namespace's mount table (where podman mounts what it mounts)."""
        with open(f"/proc/{self.holder.pid}/mountinfo") as handle:
            return [line.split(" ")[4] for line in handle]

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()
        self.holder.stdout.close()
        self.cgroup.remove()
