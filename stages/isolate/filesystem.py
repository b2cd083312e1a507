"""The filesystem steps of a container, one function each, in the words of mount(8).

Stage 2's holder calls them one request at a time while a learner watches; stage 3's runtime
(:mod:`stages.runtime.oci`) calls the very same functions in one go. Both run them *inside*: in a process
that has its own mount namespace (mount_namespaces(7)), never in the caller's.

The order the kernel needs:

1. :func:`make_private` — a new mount namespace starts as a copy whose mounts still propagate to and from
   the host's (shared subtrees); nothing may be mounted before that link is cut.
2. mounts below the rootfs (:func:`mount_proc`, :func:`mount_sys`, :func:`mount_dev`, :func:`mount_tmp`),
   while the host's files (a bind mount's source, /sys to borrow) are still reachable. The rootfs is
   hostile input: each target is a path *inside* it, looked up there by :class:`stages.rootfs.Root`
   (openat2's RESOLVE_IN_ROOT), so a link such as ``/dev -> /tmp/victim`` is refused, never followed
   onto the host;
3. :func:`pivot_root` — the rootfs becomes ``/`` and the old root is detached.

Every function records itself through :mod:`stages.kernel` (or :func:`stages.steps.record`) and returns
what a learner would look at next.
"""

from __future__ import annotations

import os
import stat

from stages import kernel, steps
from stages.errors import StagesError, StepOrderError
from stages.rootfs import Root

#: The device nodes a minimal /dev has (the OCI runtime spec's default devices): name -> (major, minor).
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
#: The symbolic links every /dev has (the OCI runtime spec, config-linux.md "Default Devices").
DEVICE_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
                "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}

PROC_FLAGS = kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC
SYS_FLAGS = kernel.MS_RDONLY | kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC

#: Files below /proc and /sys a container must not read (the OCI spec's maskedPaths, as ``runc spec``
#: writes them and Docker uses them): the kernel's memory (kcore), keyrings, timers and firmware tables.
MASKED_PATHS = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"]
#: ... and those it may read but not change (readonlyPaths). Most of /proc/sys is *not* namespaced: a
#: write to /proc/sys/kernel/core_pattern names the program the host's kernel runs, as the host's root,
#: at every crash (core(5)); /proc/sysrq-trigger reboots the host with one letter (sysrq.rst).
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

# statvfs(3) f_flag bits -> the MS_* flag a bind remount must repeat
_STATVFS_FLAGS = [(1, kernel.MS_RDONLY), (2, kernel.MS_NOSUID), (4, kernel.MS_NODEV), (8, kernel.MS_NOEXEC),
                  (1024, kernel.MS_NOATIME), (2048, 1 << 11), (4096, kernel.MS_RELATIME)]


def make_private(what: str = "no mount event crosses between the host and the container") -> list[str]:
    """``mount --make-rprivate /``: cut the propagation between this mount namespace and the host's.

    Returns each mount point with its propagation, as /proc/self/mountinfo shows them.
    """
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE, what=what)
    return propagations()


def propagations() -> list[str]:
    """``mount-point propagation`` for each line of /proc/self/mountinfo (``private`` when it has none)."""
    with open("/proc/self/mountinfo") as handle:
        return [f"{line.split(' ')[4]} {' '.join(line.split(' - ')[0].split(' ')[6:]) or 'private'}"
                for line in handle]


def _root(root: Root | None) -> Root:
    """The rootfs to write in: ``root``, or, when there is none, ``/`` itself (after pivot_root(2) the
    rootfs is ``/``, and a path there cannot lead out of it)."""
    return root if root is not None else Root("/", owner="the root filesystem's")


def _mount(root: Root | None, source: str | None, target: str, fstype: str | None = None, flags: int = 0,
           data: str | None = None, what: str = "") -> str:
    """mount(2) on ``target``: inside ``root`` (looked up there, never followed out) when given; returns
    the target as a person would write it."""
    if root is None:
        kernel.mount(source, target, fstype, flags, data, what=what)
        return target
    return root.host_path(root.mount(source, target, fstype, flags, data, what=what))


def mount_proc(target: str, replace: bool = False, root: Root | None = None) -> str:
    """``mount -t proc proc TARGET``: a /proc showing the processes of our PID namespace.

    ``replace`` first detaches the /proc already there (the one of the old PID namespace). ``root``: the
    rootfs (before pivot_root) that ``target`` is a path inside, looked up there (:class:`Root`).
    """
    if replace:
        where = target if root is None else root.host_path(root.resolve(target))
        kernel.umount(where, kernel.MNT_DETACH, what="the old /proc belongs to the old PID namespace")
    return _mount(root, "proc", target, "proc", PROC_FLAGS,
                  what="a /proc that shows the processes of our PID namespace")


def mount_sys(target: str, pivoted: bool = False, root: Root | None = None) -> str:
    """A read-only /sys at ``target``: a new sysfs, or the host's bound read-only when that is refused.

    sysfs may be mounted only by a user namespace that owns the network namespace; otherwise, before
    pivot_root (``pivoted`` false), borrow the host's /sys read-only. ``root`` as for :func:`mount_proc`.
    """
    try:
        return _mount(root, "sysfs", target, "sysfs", SYS_FLAGS, what="a read-only /sys")
    except PermissionError:
        if pivoted:
            raise StepOrderError(
                "this user namespace may not mount a new sysfs (it does not own the network namespace), "
                "and after pivot_root the host's /sys cannot be borrowed",
                "unshare the net namespace together with (or after) the user namespace, or call "
                "mount_sys() before pivot_root()",
            ) from None
        _mount(root, "/sys", target, None, kernel.MS_BIND | kernel.MS_REC,
               what="borrow the host's /sys (a new sysfs needs our own network namespace)")
        return _mount(root, None, target, None, kernel.MS_BIND | kernel.MS_REMOUNT | SYS_FLAGS,
                      what="make it read-only")


def mount_tmp(target: str, root: Root | None = None) -> str:
    """``mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs TARGET``: a /tmp of the container's own, in memory."""
    return _mount(root, "tmpfs", target, "tmpfs", kernel.MS_NOSUID | kernel.MS_NODEV, "mode=1777",
                  what="a /tmp of the isolate's own, in memory")


def make_devices(dev: str, in_user_namespace: bool,
                 devices: dict[str, tuple[int, int]] | None = None, root: Root | None = None) -> None:
    """Fill the (empty, in-memory) ``dev`` directory with device nodes: ``name -> (major, minor)``.

    mknod(2) of a device needs CAP_MKNOD in the *initial* user namespace (user_namespaces(7)), which a
    process in a new user namespace never has: there each host node is bind-mounted on an empty file.
    Every node is made inside ``root`` (mknodat(2) in a directory opened there), never through a link.
    """
    inside = _root(root)
    try:
        for name, (major, minor) in (DEVICES if devices is None else devices).items():
            path = dev.rstrip("/") + "/" + name
            if in_user_namespace:
                inside.make_file(path, 0o666, what="a file to mount the device on")
                _mount(root, f"/dev/{name}", path, None, kernel.MS_BIND,
                       what=f"the host's /dev/{name}: mknod is refused inside a user namespace")
            else:
                inside.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor), what=f"the {name} device")
    finally:
        if root is None:
            inside.close()


def make_device_links(dev: str, root: Root | None = None) -> None:
    """The symbolic links of :data:`DEVICE_LINKS` (``/dev/fd`` ...), each unless something is there."""
    inside = _root(root)
    try:
        for name, target in DEVICE_LINKS.items():
            path = dev.rstrip("/") + "/" + name
            if inside.lstat(path) is None:
                inside.symlink(target, path)
    finally:
        if root is None:
            inside.close()


def mount_devpts(pts: str, root: Root | None = None) -> None:
    """A devpts of our own at ``pts``: pseudo-terminals not shared with the host (``newinstance``)."""
    _mount(root, "devpts", pts, "devpts", kernel.MS_NOSUID | kernel.MS_NOEXEC,
           "newinstance,ptmxmode=0666,mode=0620", what="pseudo-terminals of our own")


def mount_dev(dev: str, in_user_namespace: bool = False, root: Root | None = None) -> list[str]:
    """A minimal /dev at ``dev``: a tmpfs, :data:`DEVICES`, devpts, /dev/shm and :data:`DEVICE_LINKS`.

    Returns the names now in ``dev``. ``root`` as for :func:`mount_proc`.
    """
    inside = _root(root)
    try:
        # (after pivot_root, ``root`` None, the mounts take plain paths: /proc may not be mounted yet)
        _mount(root, "tmpfs", dev, "tmpfs", kernel.MS_NOSUID, "mode=755,size=65536k",
               what="an empty /dev in memory, instead of the host's with all its disks")
        make_devices(dev, in_user_namespace, root=root)
        pts, shm = dev.rstrip("/") + "/pts", dev.rstrip("/") + "/shm"
        inside.make_directories(pts, 0o755)
        inside.make_directories(shm, 0o1777)
        mount_devpts(pts, root=root)
        _mount(root, "shm", shm, "tmpfs", kernel.MS_NOSUID | kernel.MS_NODEV, "mode=1777",
               what="POSIX shared memory of our own")
        make_device_links(dev, root=root)
        return inside.listdir(dev)
    finally:
        if root is None:
            inside.close()


def bind_on_itself(rootfs: str) -> None:
    """``mount --rbind ROOTFS ROOTFS``: pivot_root(2) needs the new root to be a mount point."""
    kernel.mount(rootfs, rootfs, None, kernel.MS_BIND | kernel.MS_REC,
                 what="pivot_root(2) needs the new root to be a mount point: bind-mount it on itself")


def pivot_root(rootfs: str, bind: bool = True) -> list[str]:
    """Make ``rootfs`` the root of this mount namespace and detach the old root; returns the names in /.

    ``bind`` first bind-mounts the rootfs on itself (skip it when that was done already).
    """
    if bind:
        bind_on_itself(rootfs)
    with steps.record(f"cd {rootfs}", where="inside"):
        os.chdir(rootfs)
    # pivot_root(".", ".") stacks the old root on top of the new one, so no put_old directory is needed
    # (pivot_root(2), NOTES): good, since inside a user namespace we could not create one in a rootfs owned
    # by the host's root.
    kernel.pivot_root(".", ".", what="the rootfs becomes /, the old root is stacked on top of it")
    kernel.umount(".", kernel.MNT_DETACH, what="detach the old root: the host's files are now out of reach")
    with steps.record("cd /", where="inside"):
        os.chdir("/")
    return sorted(os.listdir("/"))


# -- what /proc may show and change -------------------------------------------------------------------
def locked_flags(path: str) -> int:
    """The flags ``path``'s mount has now that a bind remount must keep: a user namespace may not clear
    nosuid, nodev, noexec or the atime flags of a mount its owner made (mount(2), EPERM; they are "locked",
    mount_namespaces(7))."""
    have = os.statvfs(path).f_flag
    return sum(flag for bit, flag in _STATVFS_FLAGS if have & bit and flag != kernel.MS_RDONLY)


def mask(path: str) -> None:
    """Hide ``path`` (maskedPaths): /dev/null bound over a file, an empty read-only tmpfs over a
    directory. A path this kernel does not have is fine: there is nothing to hide."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path):
        kernel.mount("tmpfs", path, "tmpfs", kernel.MS_RDONLY, what=f"hide {path}: an empty directory")
    else:
        kernel.mount("/dev/null", path, None, kernel.MS_BIND, what=f"hide {path}: it reads as empty")


def make_readonly(path: str) -> None:
    """Make ``path`` read-only (readonlyPaths): bind it on itself, then remount that bind read-only (a bind
    mount has flags of its own, mount(8) "bind mount operation"). A missing path is fine."""
    if not os.path.lexists(path):
        return
    kernel.mount(path, path, None, kernel.MS_BIND | kernel.MS_REC, what=f"{path} on itself, to remount it")
    kernel.mount(None, path, None,
                 kernel.MS_BIND | kernel.MS_REMOUNT | kernel.MS_RDONLY | kernel.MS_REC | locked_flags(path),
                 what=f"{path} read-only: seen, not changed")


def protect_proc(base: str = "/") -> list[str]:
    """Every :data:`MASKED_PATHS` masked and every :data:`READONLY_PATHS` made read-only, below ``base``
    (the rootfs before pivot_root, ``/`` after). Returns the paths it changed, as seen inside."""
    root = os.path.realpath(base)
    done = []
    for path, step in [(p, mask) for p in MASKED_PATHS] + [(p, make_readonly) for p in READONLY_PATHS]:
        target = os.path.join(root, path.lstrip("/"))
        if not os.path.lexists(target):
            continue
        # The kernel's /proc and /sys have no symbolic links on these paths; a rootfs's own files might
        # (a rootfs is hostile input): never mount over a place a link points to outside it.
        if os.path.realpath(target) != target:
            raise StagesError(f"{path} in the rootfs is a symbolic link ({os.path.realpath(target)}), "
                              "not the kernel's file", "mount /proc and /sys first (mount_proc, mount_sys)")
        step(target)
        done.append(path)
    return done
