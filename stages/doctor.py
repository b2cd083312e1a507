"""Pre-flight checks: can this machine run the workshop?

Each check looks at the real kernel, not at a version number: a namespace type counts as available when a
short-lived child process could actually unshare(2) it, overlayfs when a child could mount one in a private
mount namespace, a cgroup controller when we could create a cgroup below our own that has its files. What
a check creates (a child process, a temporary directory, a probe cgroup) is gone before it returns, and
mounts only ever happen in the child's own mount namespace, which dies with it.

Checks are *required* (the workshop cannot run without them: ``stages doctor`` exits non-zero) or
*informational* (a note, such as a hybrid cgroup layout, which the stages handle). Use it from Python::

    from stages import doctor
    for check in doctor.checks():
        print(check.name, check.ok, check.detail, check.fix)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stages import kernel, observe

ROOT_FIX = "run it as root: sudo .venv/bin/stages doctor (or inside the workshop VM)"
NOT_PROBED = "not probed: needs root"

CONTROLLERS = ("memory", "pids", "cpu")
"""The cgroup controllers the workshop puts limits with (see cgroups(7))."""

# A file each controller's cgroup has, per cgroup version: if the probe cgroup has it, limits work there.
_LIMIT_FILES = {
    "v1": {"memory": "memory.limit_in_bytes", "pids": "pids.max", "cpu": "cpu.cfs_quota_us"},
    "v2": {"memory": "memory.max", "pids": "pids.max", "cpu": "cpu.max"},
}

# The programs the stages run, and the Debian package that ships each.
TOOLS: dict[str, tuple[tuple[str, ...], str, str]] = {
    # name: (any of these programs, package, what for)
    "busybox": (("busybox",), "busybox-static", "the default rootfs is one static busybox"),
    "ip": (("ip",), "iproute2", "veth pairs, bridges and addresses (stage 2)"),
    "firewall": (("nft", "iptables"), "nftables", "NAT for the isolate's network (stage 2)"),
    "nsenter": (("nsenter",), "util-linux", "entering a namespace, shown beside setns(2)"),
    "unshare": (("unshare",), "util-linux", "the command every --explain line starts with"),
}

# Where Debian puts the tools; a learner's PATH (sudo's secure_path, a login shell) may lack the sbin ones.
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Check:
    """One pre-flight check: ``ok`` says whether it passed, ``detail`` what was found, ``fix`` the one line
    to type (or to know) when it did not. An informational check (``required=False``) never fails the
    doctor: it is a note."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    @property
    def mark(self) -> str:
        if self.ok:
            return "✓"
        return "✗" if self.required else "!"


# == running a probe in a short-lived child ==========================================================
def probe(action: Callable[[], object]) -> str | None:
    """Run ``action`` in a forked child and return None if it succeeded, else the error, in one line.

    The child is single-threaded (unshare(2) of a user namespace needs that), and whatever it changes
    about itself (namespaces, mounts in its own mount namespace, its uid) ends when it exits.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        status = 0
        try:
            os.close(read_end)
            action()
        except BaseException as error:  # noqa: B036 - everything must reach the parent, then _exit
            status = 1
            with contextlib.suppress(BaseException):
                text = str(error).splitlines()[0] if str(error) else type(error).__name__
                os.write(write_end, text.encode(errors="replace")[:2000])
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as handle:
        message = handle.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return message or f"the probe child ended with status {os.waitstatus_to_exitcode(status)}"


def _private_mounts() -> None:
    """In the probe child: a new mount namespace whose mounts never propagate to the host (mount(2),
    mount_namespaces(7): a shared / would otherwise carry our mounts back out)."""
    kernel.unshare(kernel.CLONE_NEWNS)
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE)


# == the checks ======================================================================================
def check_root() -> Check:
    """Running as root (uid 0): namespaces, mounts, chroot and cgroups are privileged."""
    uid = os.geteuid()
    if uid == 0:
        return Check("root", True, "running as root (uid 0)")
    return Check("root", False, f"running as uid {uid}, not root: namespaces, mounts and chroot need root",
                 ROOT_FIX)


def _unshare_probe(name: str) -> None:
    flag = kernel.NAMESPACES[name][0]
    kernel.unshare(flag)
    if name == "pid":
        # unshare(2): a new PID namespace applies to the children, the first of which is its PID 1.
        child = os.fork()
        if child == 0:
            os._exit(0 if os.getpid() == 1 else 1)
        _, status = os.waitpid(child, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise OSError(errno.EINVAL, "the first child in the new PID namespace was not PID 1")


def check_namespaces() -> list[Check]:
    """Each namespace type: its /proc/self/ns file exists, and (as root) a child can unshare(2) it."""
    result = []
    root = os.geteuid() == 0
    for name, (_, proc_name, option) in kernel.NAMESPACES.items():
        label = f"namespace {name}"
        path = f"/proc/self/ns/{proc_name}"
        if not os.path.exists(path):
            result.append(Check(label, False, f"{path} is missing: this kernel has no {name} namespaces",
                                f"use a kernel built with CONFIG_{_KCONFIG[name]}=y (Debian 12 and Ubuntu "
                                "24.04 kernels have it)"))
            continue
        if not root:
            result.append(Check(label, True, f"{path} exists; {NOT_PROBED}"))
            continue
        error = probe(lambda name=name: _unshare_probe(name))
        if error is None:
            what = "; its first child is PID 1" if name == "pid" else ""
            result.append(Check(label, True, f"{path} exists; unshare {option} works in a child{what}"))
        else:
            result.append(Check(label, False, f"{path} exists but unshare {option} failed: {error}",
                                _namespace_fix(name)))
    return result


_KCONFIG = {"user": "USER_NS", "mount": "NAMESPACES", "uts": "UTS_NS", "ipc": "IPC_NS", "pid": "PID_NS",
            "net": "NET_NS", "cgroup": "CGROUP_NS", "time": "TIME_NS"}


def _namespace_fix(name: str) -> str:
    if name == "user":
        return "sysctl -w user.max_user_namespaces=15000 (0 turns user namespaces off)"
    limit = {"mount": "mnt"}.get(name, name)
    return f"check the limit: sysctl user.max_{limit}_namespaces (0 turns them off); raise it with sysctl -w"


def _overlay_probe(directory: str) -> None:
    _private_mounts()
    # A tmpfs of its own, so the probe does not depend on what the temporary directory is on (overlayfs
    # refuses an upper directory on another overlayfs, see the kernel's overlayfs documentation).
    kernel.mount("tmpfs", directory, "tmpfs", 0, "size=1m")
    for part in ("lower", "upper", "work", "merged"):
        os.mkdir(os.path.join(directory, part))
    with open(os.path.join(directory, "lower", "from-lower"), "w") as handle:
        handle.write("lower\n")
    kernel.mount("overlay", os.path.join(directory, "merged"), "overlay", 0,
                 f"lowerdir={directory}/lower,upperdir={directory}/upper,workdir={directory}/work")
    with open(os.path.join(directory, "merged", "from-lower")) as handle:
        if handle.read() != "lower\n":
            raise OSError(errno.EIO, "the merged directory does not show the lower layer's file")
    with open(os.path.join(directory, "merged", "written"), "w") as handle:
        handle.write("upper\n")
    if not os.path.exists(os.path.join(directory, "upper", "written")):
        raise OSError(errno.EIO, "a file written to the merged directory did not land in the upper layer")


def check_overlay() -> Check:
    """overlayfs: listed in /proc/filesystems, and (as root) a real overlay mount works in a child."""
    with open("/proc/filesystems") as handle:
        listed = any(line.split()[-1] == "overlay" for line in handle if line.strip())
    if not listed:
        return Check("overlayfs", False, "overlay is not in /proc/filesystems: image layers need it",
                     "load the module: modprobe overlay")
    if os.geteuid() != 0:
        return Check("overlayfs", False, f"overlay is in /proc/filesystems; {NOT_PROBED}", ROOT_FIX)
    directory = tempfile.mkdtemp(prefix="stages-doctor-overlay-")
    try:
        error = probe(lambda: _overlay_probe(directory))
    finally:
        # The tmpfs was mounted only in the child's mount namespace: here the directory is empty.
        os.rmdir(directory)
    if error is None:
        return Check("overlayfs", True,
                     "in /proc/filesystems; a child mounted lower+upper and wrote through it")
    return Check("overlayfs", False, f"in /proc/filesystems, but a test mount failed: {error}",
                 "modprobe overlay, and keep stages' state off another overlay filesystem")


# -- cgroups ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Hierarchy:
    version: str  # "v1" or "v2"
    mount_point: str
    controllers: tuple[str, ...]
    mount_root: str  # the cgroup the mount shows at its top (not "/" inside a cgroup namespace)


def _hierarchies() -> list[_Hierarchy]:
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields = left.split(" ")
            fstype, _, super_options = (right.split(" ") + ["", ""])[:3]
            target = observe._unescape(fields[4])
            if fstype == "cgroup":
                names = tuple(word for word in super_options.split(",")
                              if word not in ("rw", "ro") and "=" not in word and word not in _V1_OPTIONS)
                found.append(_Hierarchy("v1", target, names, observe._unescape(fields[3])))
            elif fstype == "cgroup2":
                try:
                    with open(os.path.join(target, "cgroup.controllers")) as controllers:
                        names = tuple(controllers.read().split())
                except OSError:
                    names = ()
                found.append(_Hierarchy("v2", target, names, observe._unescape(fields[3])))
    return found


_V1_OPTIONS = {"noprefix", "clone_children", "xattr", "nosuid", "nodev", "noexec", "relatime",
               "cpuset_v2_mode"}


def _own_directory(hierarchy: _Hierarchy) -> str:
    """The directory of our own cgroup in this hierarchy (from /proc/self/cgroup, see cgroups(7))."""
    own = observe.cgroups_of("self")
    if hierarchy.version == "v2":
        path = own.get("", "/")
    else:
        path = next((p for key, p in own.items() if set(key.split(",")) & set(hierarchy.controllers)), "/")
    if hierarchy.mount_root != "/" and path.startswith(hierarchy.mount_root):
        path = path[len(hierarchy.mount_root):] or "/"
    return os.path.normpath(hierarchy.mount_point + "/" + path.lstrip("/"))


def describe_cgroups() -> dict:
    """The cgroup layout: ``{"layout": "hybrid", "v1": {"memory": "/sys/fs/cgroup/memory", ...},
    "v2": {"mount": "/sys/fs/cgroup/unified", "controllers": [...]}}`` (``v2`` is None without cgroup2)."""
    v1: dict[str, str] = {}
    v2 = None
    for hierarchy in _hierarchies():
        if hierarchy.version == "v1":
            for name in hierarchy.controllers:
                v1.setdefault(name, hierarchy.mount_point)
        elif v2 is None or hierarchy.mount_point == "/sys/fs/cgroup":
            v2 = {"mount": hierarchy.mount_point, "controllers": list(hierarchy.controllers)}
    return {"layout": observe.cgroup_layout(), "v1": v1, "v2": v2}


def check_cgroup_layout() -> Check:
    """Which cgroup layout this machine has: v2 only (like the workshop VM), hybrid, or v1. A note."""
    info = describe_cgroups()
    layout, v1, v2 = info["layout"], info["v1"], info["v2"]
    v1_text = f"v1 controllers {', '.join(sorted(v1))} under /sys/fs/cgroup" if v1 else ""
    if v2 is not None:
        names = ", ".join(v2["controllers"]) or "no controllers"
        v2_text = f"cgroup2 at {v2['mount']} with {names}"
    else:
        v2_text = ""
    if layout == "v2":
        return Check("cgroup layout", True, f"v2 only: {v2_text}", required=False)
    if layout == "hybrid":
        return Check("cgroup layout", False, f"hybrid: {v1_text}; {v2_text}",
                     "cgroup v1 (hybrid): limits use the v1 files (memory.limit_in_bytes ...); fine",
                     required=False)
    if layout == "v1":
        return Check("cgroup layout", False, f"v1 only: {v1_text}",
                     "cgroup v1: limits use the v1 files (memory.limit_in_bytes ...); fine", required=False)
    return Check("cgroup layout", False, "no cgroup filesystem is mounted under /sys/fs/cgroup",
                 "mount one: mount -t cgroup2 none /sys/fs/cgroup", required=False)


def _controller_hierarchy(controller: str) -> _Hierarchy | None:
    hierarchies = _hierarchies()
    # A controller is bound to at most one hierarchy: a v1 one if any mounts it, else cgroup2 (cgroups(7)).
    for hierarchy in hierarchies:
        if hierarchy.version == "v1" and controller in hierarchy.controllers:
            return hierarchy
    for hierarchy in sorted(hierarchies, key=lambda h: h.mount_point != "/sys/fs/cgroup"):
        if hierarchy.version == "v2" and controller in hierarchy.controllers:
            return hierarchy
    return None


def check_controller(controller: str) -> Check:
    """Whether we can create a cgroup below our own with ``controller``'s limit file, then remove it."""
    label = f"cgroup {controller}"
    hierarchy = _controller_hierarchy(controller)
    if hierarchy is None:
        return Check(label, False, f"no mounted cgroup hierarchy has the {controller} controller",
                     f"enable it on the kernel command line: cgroup_enable={controller} (then reboot)")
    own = _own_directory(hierarchy)
    ours = own[len(hierarchy.mount_point):] or "/"
    limit_file = _LIMIT_FILES[hierarchy.version][controller]
    where = f"{hierarchy.version} at {hierarchy.mount_point}"
    if os.geteuid() != 0:
        return Check(label, False, f"{where}, our cgroup {own}; {NOT_PROBED}", ROOT_FIX)
    probe_dir = os.path.join(own, f"stages-doctor-{os.getpid()}-{controller}")
    try:
        os.mkdir(probe_dir)
    except OSError as error:
        return Check(label, False, f"{where}: cannot create a cgroup below ours ({own}): "
                     f"{os.strerror(error.errno or errno.EIO)}",
                     f"make {own} writable for us (a delegated cgroup), or run as root")
    try:
        has_limit = os.path.exists(os.path.join(probe_dir, limit_file))
    finally:
        os.rmdir(probe_dir)  # empty: no process ever joined it
    if has_limit:
        return Check(label, True, f"{where}: a cgroup made below ours ({ours}) had {limit_file}; removed")
    # cgroup v2: a child gets a controller only if its parent lists it in cgroup.subtree_control, and a
    # cgroup other than the root may not both hold processes and enable controllers for children (the
    # "no internal processes" rule, cgroups(7)). The doctor writes nothing there; it tells what will work.
    try:
        with open(os.path.join(own, "cgroup.controllers")) as handle:
            available = handle.read().split()
    except OSError:
        available = []
    if controller in available and ours == "/":
        return Check(label, True, f"{where}: we are in the root cgroup, which may enable {controller} for "
                     f"a cgroup of ours (echo +{controller} > cgroup.subtree_control)")
    if controller in available:
        return Check(label, False, f"{where}: our cgroup {ours} holds processes, so cgroup v2 will not hand "
                     f"{controller} down to a cgroup below it (no internal processes, cgroups(7))",
                     "run from a delegated cgroup (systemd-run --scope -p Delegate=yes ...) or from the root "
                     "cgroup, as the workshop VM does")
    return Check(label, False, f"{where}: {controller} is not enabled for our cgroup {ours} by its parent",
                 f"enable it in the parent: echo +{controller} > "
                 f"{os.path.dirname(own)}/cgroup.subtree_control")


def check_cgroups() -> list[Check]:
    """The layout (a note) and, for each of memory, pids and cpu, a probe cgroup below our own."""
    return [check_cgroup_layout(), *(check_controller(name) for name in CONTROLLERS)]


# -- user namespaces without root -------------------------------------------------------------------
def _read_sysctl(name: str) -> str | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _unprivileged_userns_probe() -> None:
    # As nobody, with no capability left: exactly what a learner's own account could do.
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    kernel.unshare(kernel.CLONE_NEWUSER)


def check_unprivileged_userns() -> Check:
    """Whether an unprivileged user may create a user namespace (rootless containers). A note."""
    clone = _read_sysctl("kernel.unprivileged_userns_clone")
    limit = _read_sysctl("user.max_user_namespaces")
    apparmor = _read_sysctl("kernel.apparmor_restrict_unprivileged_userns")
    facts = [f"user.max_user_namespaces={limit}" if limit is not None else "user.max_user_namespaces absent"]
    if clone is not None:
        facts.append(f"kernel.unprivileged_userns_clone={clone}")
    if apparmor is not None:
        facts.append(f"kernel.apparmor_restrict_unprivileged_userns={apparmor}")
    who = "nobody" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    error = probe(_unprivileged_userns_probe)
    works = error is None
    facts.append(f"a child as {who} could unshare --user" if works else f"as {who}: {error}")
    detail = "; ".join(facts)
    if works:
        return Check("unprivileged userns", True, detail, required=False)
    if apparmor == "1":
        fix = ("Ubuntu's AppArmor restricts them; only the rootless part needs them: "
               "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")
    elif clone == "0":
        fix = "only the rootless part needs them: sysctl -w kernel.unprivileged_userns_clone=1"
    elif limit == "0":
        fix = "only the rootless part needs them: sysctl -w user.max_user_namespaces=15000"
    else:
        fix = "only the rootless part needs them; the workshop itself runs as root"
    return Check("unprivileged userns", False, detail, fix, required=False)


# -- tools ------------------------------------------------------------------------------------------
def check_tools(path: str | None = None) -> list[Check]:
    """The programs the stages use, looked up in ``path`` (default: $PATH plus the usual sbin
    directories, and for busybox the places :func:`stages.rootfs.find_busybox` looks)."""
    from stages import rootfs

    search = path if path is not None else os.environ.get("PATH", "") + ":" + _SYSTEM_PATH
    result = []
    for label, (programs, package, purpose) in TOOLS.items():
        candidates = [shutil.which(program, path=search) for program in programs]
        if label == "busybox" and path is None:
            candidates = [p for p in rootfs.BUSYBOX_PATHS if os.path.isfile(p)] + candidates
        # /bin is a link to /usr/bin on merged-/usr systems: name each program once.
        found = list({os.path.realpath(c): c for c in reversed(candidates) if c}.values())[::-1]
        fix = f"apt-get install -y {package}"
        if not found:
            names = " or ".join(programs)
            result.append(Check(label, False, f"{names} not found in PATH ({purpose})", fix))
            continue
        if label == "busybox":
            static = [candidate for candidate in found if rootfs.is_static(candidate)]
            if not static:
                result.append(Check(label, False, f"{found[0]} is dynamically linked: a rootfs of it would "
                                    "need the host's libraries", fix))
                continue
            found = static
        result.append(Check(label, True, f"{', '.join(found)}"
                            f"{' (static)' if label == 'busybox' else ''}: {purpose}"))
    return result


# -- pivot_root -------------------------------------------------------------------------------------
def _pivot_root_probe(directory: str) -> None:
    _private_mounts()
    # pivot_root(2): the new root must be a mount point, so the probe gives it a tmpfs of its own.
    kernel.mount("tmpfs", directory, "tmpfs", 0, "size=64k")
    os.mkdir(os.path.join(directory, "old-root"))
    kernel.pivot_root(directory, os.path.join(directory, "old-root"))
    os.chdir("/")
    kernel.umount("/old-root", kernel.MNT_DETACH)
    if os.listdir("/") != ["old-root"]:
        raise OSError(errno.EIO, "after pivot_root, / is not the new root")


def check_pivot_root() -> Check:
    """Whether pivot_root(2) works in a child's private mount namespace; reports whether / is shared."""
    root_mount = next((m for m in reversed(observe.mounts()) if m.target == "/"), None)
    shared = root_mount is not None and "shared:" in root_mount.propagation
    propagation = ("/ is shared on the host: fine, stages makes it private in each new mount namespace "
                   "(mount --make-rprivate /)" if shared else "/ is private on the host")
    if root_mount is not None and root_mount.fstype in ("rootfs", "ramfs"):
        return Check("pivot_root", False, f"/ is the initial {root_mount.fstype}, which pivot_root(2) cannot "
                     "move", "boot from a real root filesystem (or a VM)")
    if os.geteuid() != 0:
        return Check("pivot_root", False, f"{propagation}; {NOT_PROBED}", ROOT_FIX)
    directory = tempfile.mkdtemp(prefix="stages-doctor-pivot-")
    try:
        error = probe(lambda: _pivot_root_probe(directory))
    finally:
        os.rmdir(directory)
    if error is None:
        return Check("pivot_root", True, f"{propagation}; a child pivoted into a tmpfs")
    return Check("pivot_root", False, f"{propagation}; a test pivot_root failed: {error}",
                 "run the workshop in the VM: a machine whose / cannot be pivoted cannot host stage 2")


# -- where the rootfs lives ------------------------------------------------------------------------
def check_state_directory() -> Check:
    """Whether programs may run from where stages keeps its rootfs (:func:`stages.paths.state_dir`): a
    filesystem mounted noexec there makes every jail and isolate fail with EACCES (mount(8), noexec)."""
    from stages import rootfs

    directory = rootfs.state_dir()
    try:
        noexec = rootfs.is_noexec(directory)
        exists = "exists" if directory.exists() else "will be made on first use"
    except OSError as error:  # not root: a parent such as /root may be closed to us
        return Check("state directory", False, f"cannot look at {directory}: "
                     f"{os.strerror(error.errno or errno.EACCES)}", ROOT_FIX)
    if noexec:
        point = rootfs.mount_point(directory)
        return Check("state directory", False, f"{directory} is on {point}, mounted noexec: nothing in a "
                     "rootfs there could run",
                     f"keep it elsewhere (export STAGES_HOME=/var/tmp/stages), or allow programs there: "
                     f"mount -o remount,exec {point}")
    return Check("state directory", True, f"{directory} ({exists}) allows running programs")


# -- stage 3's container init ---------------------------------------------------------------------
NO_INIT_LIMITS = ("containers run their command as PID 1 itself, as with --no-init: orphaned processes "
                  "stay zombies, and a command without a SIGTERM handler ignores `stages stop` until its "
                  "SIGKILL")


def check_init() -> Check:
    """Which init ``stages run`` will give its containers (stages.runtime.overlay.which_init): the one
    prebuilt into the wheel, one compiled from init.c (cached, or compiled now in a temporary directory to
    see that it works), or none, whose limits it says. A missing init.c is a broken install: required."""
    from stages import paths
    from stages.runtime import overlay

    label = "container init"
    try:
        kind, program, detail = overlay.which_init(paths.state_dir())
    except OSError as error:  # not root: a parent such as /root may be closed to us
        return Check(label, False, f"cannot look at {paths.state_dir() / 'init'}: "
                     f"{os.strerror(error.errno or errno.EACCES)}", ROOT_FIX)
    if kind in ("prebuilt", "cached"):
        return Check(label, True, f"{program} ({detail})")
    if kind == "missing":
        return Check(label, False, detail, "pip install --force-reinstall stages", required=True)
    if kind == "compile":
        directory = Path(tempfile.mkdtemp(prefix="stages-doctor-init-"))
        try:
            error = overlay.compile_init(program, directory / "building", directory / "stages-init")
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        if error is None:
            return Check(label, True, f"{detail} (a test build worked) and caches it in "
                         f"{paths.state_dir() / 'init'}")
        detail = error
    return Check(label, False, f"none: {detail}; {NO_INIT_LIMITS}",
                 "apt-get install -y gcc libc6-dev (the first run compiles the init), or install stages "
                 "from a wheel built where they are (it carries the init prebuilt)", required=False)


# == all of them ======================================================================================
def checks(path: str | None = None) -> list[Check]:
    """Every pre-flight check, in the order the stages need them. ``path`` is where to look for tools
    (default: $PATH plus the sbin directories)."""
    return [
        check_root(),
        *check_namespaces(),
        check_pivot_root(),
        check_overlay(),
        *check_cgroups(),
        check_unprivileged_userns(),
        check_state_directory(),
        check_init(),
        *check_tools(path),
    ]


def passed(results: list[Check]) -> bool:
    """True iff every required check passed (notes never fail)."""
    return all(check.ok for check in results if check.required)


def report(results: list[Check]) -> str:
    """The checks as aligned text, one line per check, with the fix under each one that did not pass."""
    width = max(len(check.name) for check in results)
    lines = []
    for check in results:
        lines.append(f"  {check.mark} {check.name:<{width}}  {check.detail}")
        if not check.ok and check.fix:
            lead = "fix" if check.required else "note"
            lines.append(f"    {'':<{width}}  {lead}: {check.fix}")
    failed = [check for check in results if check.required and not check.ok]
    notes = sum(1 for check in results if not check.required and not check.ok)
    required = sum(1 for check in results if check.required)
    note_text = f" ({notes} note{'s' if notes != 1 else ''})" if notes else ""
    lines.append("")
    if failed:
        lines.append(f"{len(failed)} of {required} required checks failed{note_text}: "
                     "fix them as shown above, then run stages doctor again")
    else:
        lines.append(f"all {required} required checks passed{note_text}: this machine can run the workshop")
    return "\n".join(lines)
