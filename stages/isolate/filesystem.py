"""The filesystem steps of a container, one function each, in the words of mount(8).

Stage 2's holder calls them one request at a time while a learner watches; stage 3's runtime
(:mod:`stages.runtime.oci`) calls the very same functions in one go. Both run them *inside*: in a process
that has its own mount namespace (mount_namespaces(7)), never in the caller's.

The order the kernel needs:

1. :func:`make_private` — a new mount namespace starts as a copy whose mounts still propagate to and from
   the host's (shared subtrees); nothing may be mounted before that link is cut.
2. mounts below the rootfs (:func:`mount_proc`, :func:`mount_sys`, :func:`mount_dev`, :func:`mount_tmp`),
   while the host's files (a bind mount's source, /sys to borrow) are still reachable;
3. :func:`pivot_root` — the rootfs becomes ``/`` and the old root is detached.

Every function records itself through :mod:`stages.kernel` (or :func:`stages.steps.record`) and returns
what a learner would look at next.
"""

from __future__ import annotations

import os
import stat

from stages import kernel, steps
from stages.errors import StepOrderError

#: The device nodes a minimal /dev has (the OCI runtime spec's default devices): name -> (major, minor).
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
#: The symbolic links every /dev has (the OCI runtime spec, config-linux.md "Default Devices").
DEVICE_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
                "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}

PROC_FLAGS = kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC
SYS_FLAGS = kernel.MS_RDONLY | kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC


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


def mount_proc(target: str, replace: bool = False) -> str:
    """``mount -t proc proc TARGET``: a /proc showing the processes of our PID namespace.

    ``replace`` first detaches the /proc already there (the one of the old PID namespace).
    """
    if replace:
        kernel.umount(target, kernel.MNT_DETACH, what="the old /proc belongs to the old PID namespace")
    kernel.mount("proc", target, "proc", PROC_FLAGS,
                 what="a /proc that shows the processes of our PID namespace")
    return target


def mount_sys(target: str, pivoted: bool = False) -> str:
    """A read-only /sys at ``target``: a new sysfs, or the host's bound read-only when that is refused.

    sysfs may be mounted only by a user namespace that owns the network namespace; otherwise, before
    pivot_root (``pivoted`` false), borrow the host's /sys read-only.
    """
    try:
        kernel.mount("sysfs", target, "sysfs", SYS_FLAGS, what="a read-only /sys")
    except PermissionError:
        if pivoted:
            raise StepOrderError(
                "this user namespace may not mount a new sysfs (it does not own the network namespace), "
                "and after pivot_root the host's /sys cannot be borrowed",
                "unshare the net namespace together with (or after) the user namespace, or call "
                "mount_sys() before pivot_root()",
            ) from None
        kernel.mount("/sys", target, None, kernel.MS_BIND | kernel.MS_REC,
                     what="borrow the host's /sys (a new sysfs needs our own network namespace)")
        kernel.mount(None, target, None, kernel.MS_BIND | kernel.MS_REMOUNT | SYS_FLAGS,
                     what="make it read-only")
    return target


def mount_tmp(target: str) -> str:
    """``mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs TARGET``: a /tmp of the container's own, in memory."""
    kernel.mount("tmpfs", target, "tmpfs", kernel.MS_NOSUID | kernel.MS_NODEV, "mode=1777",
                 what="a /tmp of the isolate's own, in memory")
    return target


def make_devices(dev: str, in_user_namespace: bool,
                 devices: dict[str, tuple[int, int]] | None = None) -> None:
    """Fill the (empty, in-memory) ``dev`` directory with device nodes: ``name -> (major, minor)``.

    mknod(2) of a device needs CAP_MKNOD in the *initial* user namespace (user_namespaces(7)), which a
    process in a new user namespace never has: there each host node is bind-mounted on an empty file.
    """
    for name, (major, minor) in (DEVICES if devices is None else devices).items():
        path = os.path.join(dev, name)
        if in_user_namespace:
            with steps.record(f"touch {path}", where="inside", what="a file to mount the device on"):
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))
            kernel.mount(f"/dev/{name}", path, None, kernel.MS_BIND,
                         what=f"the host's /dev/{name}: mknod is refused inside a user namespace")
        else:
            with steps.record(f"mknod -m 666 {path} c {major} {minor}", where="inside",
                              what=f"the {name} device"):
                os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
                os.chmod(path, 0o666)  # mknod's mode is filtered by the umask


def make_device_links(dev: str) -> None:
    """The symbolic links of :data:`DEVICE_LINKS` (``/dev/fd`` ...), each unless something is there."""
    for name, target in DEVICE_LINKS.items():
        path = os.path.join(dev, name)
        if os.path.lexists(path):
            continue
        with steps.record(f"ln -s {target} {path}", where="inside"):
            os.symlink(target, path)


def mount_devpts(pts: str) -> None:
    """A devpts of our own at ``pts``: pseudo-terminals not shared with the host (``newinstance``)."""
    kernel.mount("devpts", pts, "devpts", kernel.MS_NOSUID | kernel.MS_NOEXEC,
                 "newinstance,ptmxmode=0666,mode=0620", what="pseudo-terminals of our own")


def mount_dev(dev: str, in_user_namespace: bool = False) -> list[str]:
    """A minimal /dev at ``dev``: a tmpfs, :data:`DEVICES`, devpts, /dev/shm and :data:`DEVICE_LINKS`.

    Returns the names now in ``dev``.
    """
    kernel.mount("tmpfs", dev, "tmpfs", kernel.MS_NOSUID, "mode=755,size=65536k",
                 what="an empty /dev in memory, instead of the host's with all its disks")
    make_devices(dev, in_user_namespace)
    pts = os.path.join(dev, "pts")
    with steps.record(f"mkdir {pts} {dev}/shm", where="inside"):
        os.mkdir(pts, 0o755)
        os.mkdir(os.path.join(dev, "shm"), 0o1777)
        os.chmod(os.path.join(dev, "shm"), 0o1777)
    mount_devpts(pts)
    kernel.mount("shm", os.path.join(dev, "shm"), "tmpfs", kernel.MS_NOSUID | kernel.MS_NODEV,
                 "mode=1777", what="POSIX shared memory of our own")
    make_device_links(dev)
    return sorted(os.listdir(dev))


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
