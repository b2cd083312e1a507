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
import sys
import zlib
from pathlib import Path

from stages import kernel
from stages.errors import RootfsError, StagesError

INIT_SOURCE = Path(__file__).with_name("init.c")
#: The init compiled when the wheel was built (setup.py); absent in a source tree and in a pure wheel.
INIT_PREBUILT = Path(__file__).with_name("stages-init")
MISSING_INIT = "the container init (stages/runtime/init.c) is not installed: reinstall stages"


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


def _cache_name(source: bytes) -> str:
    # CRC-32 tells one version of init.c from another, which is all a cache name needs; zlib is loaded
    # already (shutil uses it), hashlib would load OpenSSL for every `stages run`.
    return f"stages-init-{zlib.crc32(source):08x}{len(source):08x}"


def _compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def which_init(state: Path) -> tuple[str, str | None, str]:
    """Which init a run will use, without building anything: ``(kind, program, detail)``.

    ``kind`` is ``"prebuilt"`` (compiled when the wheel was built, see setup.py), ``"cached"`` (compiled
    from init.c by an earlier run), ``"compile"`` (the first run will compile init.c with ``program``, the
    compiler), ``"none"`` (no compiler: the command runs as PID 1 itself, as with ``--no-init``) or
    ``"missing"`` (neither init.c nor a prebuilt init is installed: a broken install).
    """
    if os.access(INIT_PREBUILT, os.X_OK):
        return "prebuilt", str(INIT_PREBUILT), "prebuilt when the wheel was built"
    try:
        source = INIT_SOURCE.read_bytes()
    except FileNotFoundError:
        return "missing", None, MISSING_INIT
    program = state / "init" / _cache_name(source)
    if program.exists():
        return "cached", str(program), "compiled from init.c on an earlier run"
    compiler = _compiler()
    if compiler is None:
        return "none", None, "no prebuilt init and no C compiler (cc or gcc) to build init.c"
    return "compile", compiler, f"the first run compiles init.c with {compiler} -static"


def init_program(state: Path) -> str | None:
    """The container's init: the one prebuilt into the wheel (setup.py), else ``init.c`` built static once
    per source version and cached in ``state/init``.

    None when it cannot be had (no prebuilt init, and no C compiler, or one that cannot link statically):
    the container then runs its command as PID 1 directly, as ``docker run`` without ``--init`` does, and a
    command that is not an init neither reaps orphans nor sees SIGTERM; that is said once, on stderr, and
    ``stages doctor`` says it every time. Every run after the first finds the program (the prebuilt one, or
    the cached one by the checksum of the source): no compiler runs on the hot path. Raises StagesError
    when neither init.c nor a prebuilt init is installed.
    """
    if os.access(INIT_PREBUILT, os.X_OK):
        return str(INIT_PREBUILT)
    try:
        source = INIT_SOURCE.read_bytes()
    except FileNotFoundError:
        raise StagesError(MISSING_INIT, "pip install --force-reinstall stages (a wheel or sdist has init.c), "
                          "or run the container without an init: stages run --no-init ...") from None
    directory = state / "init"
    program = directory / _cache_name(source)
    if program.exists():
        return str(program)
    compiler = _compiler()
    if compiler is None:
        _say_once(directory, "no C compiler (cc or gcc) to build stages/runtime/init.c, and no prebuilt init")
        return None
    directory.mkdir(parents=True, exist_ok=True)
    lock = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if program.exists():
            return str(program)
        error = compile_init(compiler, directory / f".build-{os.getpid()}", program)
    finally:
        os.close(lock)
    if error is not None:
        _say_once(directory, error)
        return None
    return str(program)


def compile_init(compiler: str, temporary: Path, program: Path) -> str | None:
    """Build init.c static with ``compiler`` into ``program`` (through ``temporary``, renamed into place:
    a reader never sees half a program). None on success, else why not, in one line."""
    import subprocess

    result = subprocess.run([compiler, "-static", "-O2", "-o", str(temporary), str(INIT_SOURCE)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        last = (result.stderr.strip().splitlines() or [f"status {result.returncode}"])[-1]
        return f"{compiler} -static could not build init.c (Debian: apt-get install libc6-dev): {last}"
    os.replace(temporary, program)
    return None


def _say_once(directory: Path, why: str) -> None:
    """Tell, once per state directory, that containers run without an init, and what that costs."""
    marker = directory / ".said-no-init"
    if marker.exists():
        return
    print(f"stages: running containers without an init ({why}): the command is PID 1 itself, as with "
          "--no-init, so orphaned processes stay zombies and a command without a SIGTERM handler ignores "
          "`stages stop` until its SIGKILL, 10 s later. Fix: apt-get install -y gcc libc6-dev, or install "
          "stages from a wheel built with a compiler. (Said once; `stages doctor` says it every time.)",
          file=sys.stderr)
    with contextlib.suppress(OSError):
        directory.mkdir(parents=True, exist_ok=True)
        marker.touch()
