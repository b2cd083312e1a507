"""A container's root filesystem on overlayfs, and the container's init program.

overlayfs (Documentation/filesystems/overlayfs.rst) stacks directories: the image's layers are the
read-only *lower* directories, and everything the container writes lands in its own *upper* directory
(``work`` is overlayfs' scratch space, on the same filesystem as upper). Twenty containers of one image
share its layers on disk; removing a container removes only its upper directory. This is the mount a
person would type::

    mount -t overlay overlay -o lowerdir=L2:L1,upperdir=U,workdir=W ROOTFS

The mount is made in the host's mount namespace, below the state directory (never elsewhere), so that
the runtime can bind it as the container's rootfs; the container's own mounts happen in its namespace.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import zlib
from pathlib import Path

from stages import kernel
from stages.errors import RootfsError

INIT_SOURCE = Path(__file__).with_name("init.c")


def is_mounted(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a mount point in our mount namespace (/proc/self/mountinfo)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as handle:
        return any(line.split(" ")[4] == target for line in handle)


def mount(layers: list[str], upper: str | os.PathLike, work: str | os.PathLike,
          target: str | os.PathLike) -> str:
    """Mount ``layers`` (topmost first, as lowerdir wants them) with ``upper`` and ``work`` on ``target``.

    Returns the target. Every directory must exist already; overlayfs refuses a lowerdir that is itself
    on overlayfs' upper of another mount in odd ways, so the image's layer directories are used as they
    are.
    """
    if not layers:
        raise RootfsError("the image has no layers to mount", "pull or build the image again")
    for layer in layers:
        if not os.path.isdir(layer):
            raise RootfsError(f"the image's layer {layer} is missing", "remove the image and build it again")
    options = f"lowerdir={':'.join(map(str, layers))},upperdir={upper},workdir={work}"
    try:
        kernel.mount("overlay", str(target), "overlay", 0, options,
                     what="the image's layers read-only, the container's changes in its upper directory")
    except OSError as error:
        raise RootfsError(f"overlayfs refused the container's root filesystem: {error.strerror or error}",
                          "keep STAGES_HOME on a filesystem overlayfs accepts as its upper directory "
                          "(ext4, xfs, tmpfs), not on overlayfs itself") from error
    return str(target)


def unmount(target: str | os.PathLike) -> bool:
    """Unmount ``target`` if it is mounted (lazily when busy: umount2(2) MNT_DETACH). Returns whether it
    was mounted."""
    if not is_mounted(target):
        return False
    try:
        kernel.umount(str(target), what="the container's root filesystem")
    except OSError:
        kernel.umount(str(target), kernel.MNT_DETACH, what="detach it: something still uses it")
    return True


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a container's directory, refusing to cross into a mount that is still there."""
    path = Path(path)
    if not path.exists():
        return
    with open("/proc/self/mountinfo") as handle:
        below = [line.split(" ")[4] for line in handle if line.split(" ")[4].startswith(str(path) + "/")]
    for target in sorted(below, key=len, reverse=True):
        unmount(target)
    shutil.rmtree(path, ignore_errors=True)


def init_program(state: Path) -> str | None:
    """The container's init (``init.c``, built static once per source version, cached in ``state/init``).

    None when no C compiler is there: containers then run their command as PID 1 directly, as
    ``docker run`` without ``--init`` does, and a command that is not an init neither reaps orphans nor
    sees SIGTERM. Every run after the first finds the program by the checksum of the source: no compiler
    runs on the hot path.
    """
    source = INIT_SOURCE.read_bytes()
    # CRC-32 tells one version of init.c from another, which is all a cache name needs; zlib is loaded
    # already (shutil uses it), hashlib would load OpenSSL for every `stages run`.
    digest = f"{zlib.crc32(source):08x}{len(source):08x}"
    directory = state / "init"
    program = directory / f"stages-init-{digest}"
    if program.exists():
        return str(program)
    import subprocess
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    lock = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if program.exists():
            return str(program)
        temporary = directory / f".build-{os.getpid()}"
        result = subprocess.run([compiler, "-static", "-O2", "-o", str(temporary), str(INIT_SOURCE)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            return None
        os.replace(temporary, program)
        return str(program)
    finally:
        os.close(lock)
