"""Root filesystems: the directory a jail or a container sees as ``/``.

A process only needs a few files to live in a directory of its own: a shell, the programs it runs, the
shared libraries those programs load, and a little of ``/etc``. This module builds such a directory three
ways, each a lesson of its own:

``busybox`` (the default)
    One statically linked program, ``/bin/busybox``, which is ``sh``, ``ls``, ``ps``, ``ip`` and some 270
    other commands at once: it looks at the name it was started under (``argv[0]``) and behaves like that
    command. The rootfs is that one file, a symbolic link per command, a minimal ``/etc`` and the empty
    directories the kernel's filesystems are mounted on. About 2 MB, built offline in milliseconds.
``host``
    Chosen programs copied from this machine, with every shared library they load (what ``ldd`` lists,
    including the dynamic loader at its absolute path). It shows why a static busybox is so convenient:
    ``ls`` alone needs four libraries, and the loader looks for them at the paths it was built with.
a tarball
    Any ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.xz`` (or ``.tar.zst`` when ``zstd`` is installed), such as a
    distribution's minimal root filesystem or ``docker export``. It is extracted by :func:`extract`, which
    never writes outside the target directory (see there for the rules).

Every rootfs built here carries a small JSON file, ``.stages-rootfs``, saying how and when it was built:
:func:`build` rebuilds a directory that has it, but never clobbers a non-empty directory that lacks it.

Other stages call :func:`check` before they chroot(2) or pivot_root(2) into a directory, :func:`resolve` to
find a path the way a process inside would, and :func:`default_rootfs` for the rootfs the tour uses.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import shutil
import stat
import struct
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from stages import kernel, observe, steps
from stages.errors import RootfsError, UnsafeArchiveError
from stages.paths import state_dir  # noqa: F401 - part of this module's API: where rootfs are kept

# logging, subprocess and tarfile are imported by the functions that use them: a container's run needs
# only resolve() from this module, and would pay milliseconds for them at every start.
TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    import tarfile


def _log():
    import logging

    return logging.getLogger(__name__)

MARKER = ".stages-rootfs"
"""The file, at the top of every rootfs built here, that says how it was built (JSON)."""

SOURCES = ("busybox", "host")
"""The named sources; anything else given as ``source`` is the path of a tarball."""

TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst", ".tzst")

BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox", "/usr/lib/busybox/busybox")
"""Where Debian's busybox-static (and other distributions' busybox) puts the program."""

HOST_COMMANDS = ("sh", "ls", "cat", "ps", "hostname", "id", "ip", "mount", "echo", "sleep", "uname", "env",
                 "true", "false")
"""The programs a ``host`` rootfs gets when no ``commands`` are given."""

# The directories every rootfs has, and their usual modes (see hier(7) and file-hierarchy(7)): proc, sys,
# dev and run are where stage 2 mounts the kernel's filesystems; tmp is world-writable with the sticky bit.
SKELETON = {
    "bin": 0o755, "sbin": 0o755, "usr": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755, "etc": 0o755,
    "proc": 0o555, "sys": 0o555, "dev": 0o755, "tmp": 0o1777, "root": 0o700, "home": 0o755, "var": 0o755,
    "var/tmp": 0o1777, "run": 0o755,
}

PATH_INSIDE = "/bin:/sbin:/usr/bin:/usr/sbin"
"""A PATH for processes inside a rootfs built here."""

_SYMLINK_HOPS = 40  # the kernel's own limit for one lookup, see path_resolution(7)


# == small helpers ===================================================================================


def human_size(count: int) -> str:
    """``2093056`` -> ``'2.0 MB'``."""
    size = float(count)
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover - the loop always returns


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    lines = " ".join(shlex.quote(line) for line in text.rstrip("\n").split("\n"))
    with steps.record(f"printf '%s\\n' {lines} > {path}", what=f"write {path.name}"):
        path.write_text(text)
        path.chmod(mode)


def _mounts_below(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    return sorted(mount.target for mount in observe.mounts() if mount.target.startswith(prefix))


def _empty(root: Path) -> None:
    """Remove everything inside ``root`` (not ``root`` itself), never crossing into a mount."""
    below = _mounts_below(root)
    if below:
        raise RootfsError(
            f"{root} still has something mounted inside it ({below[0]}), so it cannot be rebuilt",
            f"unmount it first: umount -R {below[0]} (or stop the jail or container using it)",
        )
    if os.geteuid() != 0:
        # Without root, a directory we extracted read-only (mode 0555) cannot be emptied until it is
        # writable again; root's CAP_DAC_OVERRIDE ignores the mode.
        for top, dirs, _ in os.walk(root):
            for name in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(top, name), 0o700, follow_symlinks=False)
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


# == ELF: static or dynamic ==========================================================================
_PT_INTERP = 3


def elf_interpreter(path: str | os.PathLike) -> str | None:
    """The dynamic loader an ELF program asks for (its ``PT_INTERP``), or None if it has none.

    A program without ``PT_INTERP`` is statically linked: the kernel runs it without any library, which
    is why one static busybox is a whole rootfs (see elf(5) and ld.so(8)). Raises :class:`RootfsError`
    if ``path`` is not an ELF file.
    """
    with open(path, "rb") as handle:
        ident = handle.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF":
            raise RootfsError(f"{path} is not an ELF program", "give the path of a compiled program")
        wide, order = ident[4] == 2, "<" if ident[5] == 1 else ">"
        header = handle.read(48 if wide else 36)
        if wide:
            phoff, = struct.unpack_from(order + "Q", header, 16)
            phentsize, phnum = struct.unpack_from(order + "HH", header, 38)
        else:
            phoff, = struct.unpack_from(order + "I", header, 12)
            phentsize, phnum = struct.unpack_from(order + "HH", header, 26)
        for index in range(phnum):
            handle.seek(phoff + index * phentsize)
            entry = handle.read(phentsize)
            if struct.unpack_from(order + "I", entry, 0)[0] != _PT_INTERP:
                continue
            if wide:
                offset, = struct.unpack_from(order + "Q", entry, 8)
                size, = struct.unpack_from(order + "Q", entry, 32)
            else:
                offset, = struct.unpack_from(order + "I", entry, 4)
                size, = struct.unpack_from(order + "I", entry, 16)
            handle.seek(offset)
            return handle.read(size).rstrip(b"\0").decode()
    return None


def is_static(path: str | os.PathLike) -> bool:
    """True if ``path`` is an ELF program that needs no dynamic loader (and so no shared library)."""
    try:
        return elf_interpreter(path) is None
    except (RootfsError, OSError):
        return False


# == checks other stages call ========================================================================
def is_rootfs(directory: str | os.PathLike) -> bool:
    """True if ``directory`` is a rootfs that :func:`build` finished building."""
    marker = _read_marker(Path(directory))
    return bool(marker) and marker.get("complete", False)


def _read_marker(root: Path) -> dict | None:
    try:
        data = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "source" in data else None


def resolve(directory: str | os.PathLike, path: str) -> Path:
    """Where ``path`` is on the host, for a process whose root is ``directory``.

    Symbolic links are followed the way the kernel does after chroot(2): an absolute target starts again
    at ``directory``, and ``..`` never climbs above it (see path_resolution(7)). The result may not exist.
    Use it to look inside a rootfs without ever being led outside it by a link; to *write* there, use
    :class:`Root`, which also refuses links that lead out and holds a descriptor so nothing can be
    swapped between looking and writing.
    """
    root = os.path.realpath(directory)
    pending = deque(part for part in path.split("/") if part not in ("", "."))
    inside: list[str] = []
    hops = 0
    while pending:
        part = pending.popleft()
        if part == "..":
            if inside:
                inside.pop()
            continue
        candidate = os.path.join(root, *inside, part)
        if os.path.islink(candidate):
            hops += 1
            if hops > _SYMLINK_HOPS:
                raise RootfsError(f"{path} inside {root} is a loop of symbolic links",
                                  f"look at the links with: ls -l {candidate}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                inside = []
            pending.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
            continue
        inside.append(part)
    return Path(root, *inside)


_PATH_ONLY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _parts(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


class Root:
    """A root filesystem opened once, in which every path the runtime *writes* is looked up inside it.

    A rootfs is hostile input: an image whose ``/dev`` is a symbolic link to ``/tmp/victim`` would make a
    runtime that joins strings (``os.path.join(rootfs, "dev")``) and lets the kernel follow the link
    create device nodes in the host's /tmp/victim. So every write here (mkdir, mknod, a file to bind on,
    a symbolic link, a mount) goes through a descriptor of the rootfs: :meth:`resolve` finds the path one
    component at a time, as a process whose root is the rootfs would, and the write is then made on a
    descriptor opened with :func:`stages.kernel.open_in_root` (openat2's RESOLVE_IN_ROOT) or relative to
    one (mkdirat(2), mknodat(2), symlinkat(2)), a mount on ``/proc/self/fd/N`` as runc does. Whatever
    the rootfs holds, and even if it changes meanwhile, nothing is written outside it.

    The rule for the symbolic links met on the way (:meth:`resolve`), read as the link's author meant it:

    - a **relative** link is followed from its own directory, inside the rootfs
      (``/etc/resolv.conf -> ../run/resolv.conf``), unless its ``..`` climb above the root
      (``/dev -> ../../../tmp/victim``): followed on the host, that leaves the rootfs. **Refused.**
    - an **absolute** link names, on the host, the host's file. Inside the rootfs it is followed as the
      kernel does after chroot(2), from the rootfs's own ``/``, when the rootfs has what it names
      (``/var/run -> /run``, the image's own /run): **followed inside**. When the rootfs has no such
      path (``/dev -> /tmp/victim``), the link can only mean the host's, which is what a hostile image
      counts on: **refused**.

    A refusal is a :class:`~stages.errors.RootfsError` whose one sentence names the path and the link:
    "the image's /dev is a symbolic link to /tmp/victim, out of its root filesystem: ...". ``owner`` is
    how that sentence names the rootfs (``the image's``, ``the rootfs's``).

    Open it in the mount namespace where the mounts are made (a descriptor keeps the mount it was opened
    on, and mount(2) refuses a mount point of another namespace), and after anything mounted over the
    rootfs itself (its bind on itself before pivot_root(2)).
    """

    def __init__(self, directory: str | os.PathLike, owner: str = "the image's"):
        self.path = os.path.realpath(directory)
        self.owner = owner
        self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def host_path(self, inside: str) -> str:
        """Where ``inside`` (a path :meth:`resolve` gave) is on the host: for the record, never to open."""
        return self.path.rstrip("/") + "/" + inside.strip("/") if inside.strip("/") else self.path

    # -- looking up -------------------------------------------------------------------------------------
    def resolve(self, path: str) -> str:
        """The path inside the rootfs (``/run/resolv.conf``) that ``path`` names, links followed inside by
        the rule of this class; raises :class:`RootfsError` for a link out. The result holds no symbolic
        link (at the time of the call); its last components may not exist."""
        pending: list[tuple[str, tuple | None]] = [(part, None) for part in reversed(_parts(path))]
        names: list[str] = []
        fds = [self.fd]  # the directories walked (ours is not closed here); None once one is missing
        hops = 0
        try:
            while pending:
                part, origin = pending.pop()  # origin: (link, target, must exist) of a link's components
                if part == "..":
                    if names:
                        names.pop()
                        if fds is not None:
                            os.close(fds.pop())
                    elif origin is not None and not origin[1].startswith("/"):
                        raise self._out(origin[0], origin[1], "its '..' climb above the root, into the "
                                        "host's directories")
                    continue  # '..' at the root is the root, as after chroot(2)
                info = None
                if fds is not None:
                    try:
                        fd = os.open(part, _PATH_ONLY, dir_fd=fds[-1])
                    except (FileNotFoundError, NotADirectoryError):
                        fd = None
                    if fd is not None:
                        info = os.fstat(fd)
                if info is None:  # missing: what follows is made by the caller
                    if origin is not None and origin[2]:
                        raise self._out(origin[0], origin[1], f"on the host it names the host's "
                                        f"{origin[1]}, and the root filesystem has no {origin[1]} of its own")
                    if fds is not None:
                        for opened in fds[1:]:
                            os.close(opened)
                        fds = None
                    names.append(part)
                    continue
                if stat.S_ISLNK(info.st_mode):
                    target = os.readlink("", dir_fd=fd)  # readlinkat(2) on the O_PATH descriptor
                    os.close(fd)
                    hops += 1
                    link = "/" + "/".join([*names, part])
                    if hops > _SYMLINK_HOPS:
                        raise RootfsError(f"{self.owner} {path} is a loop of symbolic links (at {link})",
                                          f"look at the links with: ls -l {self.host_path(link)}")
                    if not target:
                        raise RootfsError(f"{self.owner} {link} is a symbolic link to nothing",
                                          f"remove it from the image: rm {self.host_path(link)}")
                    if target.startswith("/"):
                        must_exist = True
                        while len(fds) > 1:
                            os.close(fds.pop())
                        names = []
                    else:
                        must_exist = origin is not None and origin[2]
                    follow = (link, target, must_exist)
                    pending.extend((item, follow) for item in reversed(_parts(target)))
                    continue
                names.append(part)
                if stat.S_ISDIR(info.st_mode):
                    fds.append(fd)
                else:  # a file: nothing can be below it (the caller's open says ENOTDIR if asked)
                    os.close(fd)
                    for opened in fds[1:]:
                        os.close(opened)
                    fds = None
        finally:
            for opened in (fds or [])[1:]:
                os.close(opened)
        return "/" + "/".join(names)

    def _out(self, link: str, target: str, why: str) -> RootfsError:
        return RootfsError(
            f"{self.owner} {link} is a symbolic link to {target}, out of its root filesystem: {why}, so "
            "stages refuses to write through it",
            f"this image is hostile or broken, and nothing was written: remove the link, or make it point "
            f"inside (a relative link such as ../run/x, or a path the image has); look at it with: "
            f"ls -l {self.host_path(link)}")

    def open(self, path: str, flags: int = os.O_PATH | os.O_CLOEXEC, mode: int = 0) -> int:
        """A descriptor of ``path`` inside the rootfs (resolved by the rule, opened in-root)."""
        return kernel.open_in_root(self.fd, self.resolve(path), flags, mode)

    def lstat(self, path: str) -> os.stat_result | None:
        """What is at ``path`` (a link itself, not followed), or None if nothing is."""
        inside = self.resolve(path)
        try:
            fd = kernel.open_in_root(self.fd, inside, _PATH_ONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def is_directory(self, path: str) -> bool:
        info = self.lstat(path)
        return info is not None and stat.S_ISDIR(info.st_mode)

    def statvfs(self, path: str) -> os.statvfs_result:
        """statvfs(3) of the filesystem mounted at (or holding) ``path``: its mount flags."""
        fd = self.open(path)
        try:
            return os.fstatvfs(fd)
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        fd = self.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)

    # -- writing ----------------------------------------------------------------------------------------
    def _directory(self, inside: str, create: bool) -> int:
        """A descriptor of the directory ``inside`` (resolved), each missing component made with
        mkdirat(2) in the one before it; a component that turned into a link meanwhile is refused."""
        fd = os.dup(self.fd)
        try:
            parts = _parts(inside)
            for index, part in enumerate(parts):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                try:
                    following = os.open(part, _PATH_ONLY | os.O_DIRECTORY, dir_fd=fd)
                except OSError as error:
                    if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    where = "/" + "/".join(parts[:index + 1])
                    raise RootfsError(f"{self.owner} {where} is not a directory, so nothing can be made in "
                                      f"it (a file, or a symbolic link that appeared meanwhile)",
                                      "give a path that is a directory in the image, or none") from None
                os.close(fd)
                fd = following
            return fd
        except BaseException:
            os.close(fd)
            raise

    def make_directories(self, path: str, mode: int | None = None) -> str:
        """``mkdir -p PATH`` inside the rootfs; returns the path inside."""
        inside = self.resolve(path)
        if self.is_directory(inside):
            return inside
        with steps.record(f"mkdir -p {self.host_path(inside)}", where="inside"):
            os.close(self._directory(inside, create=True))
            if mode is not None:
                fd = kernel.open_in_root(self.fd, inside, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
        return inside

    def _parent(self, inside: str) -> tuple[int, str]:
        parent, _, leaf = inside.rpartition("/")
        if not leaf:
            raise RootfsError(f"{self.owner} / cannot be replaced by a file or a device",
                              "give a path below /")
        return self._directory(parent or "/", create=True), leaf

    def make_file(self, path: str, mode: int = 0o644, what: str = "a file to bind the file on") -> str:
        """``touch PATH`` inside the rootfs (an empty file to mount a file on); returns the path inside."""
        inside = self.resolve(path)
        with steps.record(f"touch {self.host_path(inside)}", where="inside", what=what):
            fd, leaf = self._parent(inside)
            try:
                os.close(os.open(leaf, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                                 dir_fd=fd))
            finally:
                os.close(fd)
        return inside

    def mknod(self, path: str, mode: int, device: int = 0, uid: int | None = None,
              gid: int | None = None, what: str = "") -> str:
        """mknod(2) at ``path`` inside the rootfs, with exactly ``mode`` (not filtered by the umask), and
        its owner; a FIFO when ``mode`` says S_IFIFO. Returns the path inside."""
        inside = self.resolve(path)
        kind = "p" if stat.S_ISFIFO(mode) else "b" if stat.S_ISBLK(mode) else "c"
        shell = (f"mkfifo -m {stat.S_IMODE(mode):o} {self.host_path(inside)}" if kind == "p" else
                 f"mknod -m {stat.S_IMODE(mode):o} {self.host_path(inside)} {kind} {os.major(device)} "
                 f"{os.minor(device)}")
        with steps.record(shell, where="inside", what=what):
            fd, leaf = self._parent(inside)
            umask = os.umask(0)
            try:
                os.mknod(leaf, mode, device, dir_fd=fd)  # mknodat(2): a link at leaf makes it EEXIST
                if uid is not None:
                    os.chown(leaf, uid, gid if gid is not None else -1, dir_fd=fd, follow_symlinks=False)
            finally:
                os.umask(umask)
                os.close(fd)
        return inside

    def symlink(self, target: str, path: str) -> str:
        """``ln -s TARGET PATH`` inside the rootfs (the link's text is the container's business)."""
        inside = self.resolve(path)
        with steps.record(f"ln -s {target} {self.host_path(inside)}", where="inside"):
            fd, leaf = self._parent(inside)
            try:
                os.symlink(target, leaf, dir_fd=fd)
            finally:
                os.close(fd)
        return inside

    def unlink(self, path: str, what: str = "") -> None:
        inside = self.resolve(path)
        with steps.record(f"rm {self.host_path(inside)}", where="inside", what=what):
            fd, leaf = self._parent(inside)
            try:
                os.unlink(leaf, dir_fd=fd)
            finally:
                os.close(fd)

    def mount(self, source: str | None, path: str, fstype: str | None = None, flags: int = 0,
              data: str | None = None, what: str = "") -> str:
        """mount(2) on ``path`` inside the rootfs, through an O_PATH descriptor opened in-root
        (:func:`stages.kernel.mount_at`). Returns the path inside. Opened again for each call, so a
        remount reaches the mount just made there, not what was below it."""
        inside = self.resolve(path)
        fd = kernel.open_in_root(self.fd, inside)
        try:
            kernel.mount_at(source, fd, self.host_path(inside), fstype, flags, data, what=what)
        finally:
            os.close(fd)
        return inside


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the filesystem that holds ``path`` (the nearest existing parent, if needed)."""
    current = Path(os.path.realpath(path))
    while not current.exists():
        current = current.parent
    device = current.stat().st_dev
    while current != current.parent and current.parent.stat().st_dev == device:
        current = current.parent
    return current


def is_noexec(path: str | os.PathLike) -> bool:
    """True if ``path`` is on a filesystem mounted ``noexec``, where the kernel refuses to run programs.

    Read from statvfs(3)'s ``ST_NOEXEC`` flag for the nearest existing parent of ``path``.
    """
    current = Path(os.path.abspath(path))
    while not current.exists():
        current = current.parent
    return bool(os.statvfs(current).f_flag & os.ST_NOEXEC)


def _build_hint(root: Path) -> str:
    empty = not root.exists() or (root.is_dir() and not any(root.iterdir()))
    if empty or _read_marker(root):
        return f"build one with: stages rootfs build {root}"
    return "build one in a new or empty directory with: stages rootfs build NEWDIR, and use NEWDIR"


def check(directory: str | os.PathLike) -> Path:
    """Make sure a process can live in ``directory``: it exists, has an executable ``/bin/sh``, and is
    not on a ``noexec`` filesystem. Returns the absolute path; raises :class:`RootfsError` otherwise.
    """
    root = Path(os.path.realpath(directory))
    if not root.exists():
        raise RootfsError(f"{directory} is not a root filesystem: it does not exist", _build_hint(root))
    if not root.is_dir():
        raise RootfsError(f"{directory} is not a root filesystem: it is a file, not a directory",
                          _build_hint(root))
    shell = resolve(root, "/bin/sh")
    if not shell.is_file():
        raise RootfsError(f"{directory} is not a root filesystem: it has no /bin/sh", _build_hint(root))
    if is_noexec(shell):
        point = mount_point(shell)
        raise RootfsError(
            f"the rootfs {directory} is on a filesystem mounted noexec ({point}), so nothing in it can run",
            f"build it somewhere else, e.g. stages rootfs build /var/tmp/rootfs, "
            f"or allow programs there: mount -o remount,exec {point}",
        )
    if not os.access(shell, os.X_OK):
        raise RootfsError(f"{directory} is not a root filesystem: its /bin/sh is not executable",
                          f"make it executable: chmod 755 {shell}")
    return root


# == build ===========================================================================================
def _source_kind(source: str | os.PathLike) -> str:
    text = os.fspath(source)
    if text in SOURCES:
        return text
    if not os.path.exists(text):
        raise RootfsError(
            f"there is no tarball {text}, and a rootfs source is busybox, host or a tarball",
            "give busybox, host, or the path of a .tar, .tar.gz, .tgz, .tar.xz or .tar.zst file",
        )
    if not os.path.isfile(text):
        raise RootfsError(f"{text} is not a file, so it cannot be a tarball",
                          "give the path of a .tar, .tar.gz or .tar.xz file")
    return "tarball"


def _wanted(kind: str, source: str | os.PathLike, commands: Iterable[str] | None) -> dict:
    wanted: dict = {"source": kind, "commands": sorted(set(commands)) if commands is not None else None}
    if kind == "tarball":
        info = os.stat(source)
        wanted["tarball"] = os.path.abspath(source)
        wanted["tarball_size"] = info.st_size
        wanted["tarball_mtime"] = info.st_mtime
    return wanted


def build(directory: str | os.PathLike, source: str | os.PathLike = "busybox", *,
          commands: Iterable[str] | None = None, force: bool = False) -> Path:
    """Build a root filesystem in ``directory`` and return its absolute path.

    ``source`` is ``"busybox"`` (the default: a static busybox and a link per applet), ``"host"`` (this
    machine's programs and the shared libraries they need) or the path of a tarball (see :func:`extract`).
    ``commands`` picks the programs: busybox applets, or host programs (default :data:`HOST_COMMANDS`);
    ``/bin/sh`` is always there.

    ``directory`` may be missing, empty, or a rootfs built here before: building the same thing again is
    a no-op unless ``force``; building something else replaces it cleanly. A non-empty directory that was
    not built here is never touched (:class:`RootfsError`). If the build fails or is interrupted, the
    directory is left as empty as it was found.
    """
    kind = _source_kind(source)
    if kind == "tarball" and commands is not None:
        raise RootfsError("commands can only be picked for a busybox or host rootfs, not from a tarball",
                          "leave out --command, or use --from busybox or --from host")
    root = Path(os.path.realpath(directory))
    wanted = _wanted(kind, source, commands)
    if root == Path("/"):
        raise RootfsError("the rootfs cannot be / itself", "give a new or empty directory, e.g. /tmp/rootfs")
    if root.exists() and not root.is_dir():
        raise RootfsError(f"{directory} is a file, not a directory", "give a new or empty directory")
    created: Path | None = None
    if root.exists() and any(root.iterdir()):
        marker = _read_marker(root)
        if marker is None:
            raise RootfsError(
                f"{directory} is not empty and was not built by stages, so it is left as it is",
                "give a new or empty directory, or remove this one yourself if you are sure",
            )
        same = marker.get("complete") and all(marker.get(key) == value for key, value in wanted.items())
        if same and not force:
            _log().info("%s is already a %s rootfs; nothing to do", root, kind)
            return root
        _empty(root)
    elif not root.exists():
        created = root
        while not created.parent.exists():
            created = created.parent  # the topmost directory this build makes, to remove on failure
        root.mkdir(parents=True)

    start = time.perf_counter()
    marker = dict(wanted, complete=False, built=_now(), warnings=[])
    try:
        # Written first and again last: a build that was killed halfway is still known to be ours, and
        # a later build may clear it.
        _write_marker(root, marker)
        if kind == "busybox":
            marker["busybox"] = _build_busybox(root, commands)
        elif kind == "host":
            marker["programs"] = _build_host(root, commands)
        else:
            marker["warnings"] = extract(source, root)
        marker["seconds"] = round(time.perf_counter() - start, 4)
        marker["complete"] = True
        _write_marker(root, marker)
    except BaseException:
        # An error or Ctrl-C halfway: take back everything this build wrote.
        with contextlib.suppress(OSError, RootfsError):
            _empty(root)
            if created is not None:
                for directory_made in [root, *root.parents]:
                    directory_made.rmdir()
                    if directory_made == created:
                        break
        raise
    _log().info("built a %s rootfs in %s (%.3f s)", kind, root, marker["seconds"])
    return root


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_marker(root: Path, marker: dict) -> None:
    temporary = root / (MARKER + ".new")
    temporary.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(temporary, root / MARKER)


def _skeleton(root: Path, label: str) -> None:
    names = " ".join(SKELETON)
    with steps.record(f"cd {root} && mkdir -p {names} && chmod 1777 tmp var/tmp && chmod 700 root",
                      what="the directories every rootfs has: the kernel's filesystems are mounted on some"):
        for name, mode in SKELETON.items():
            path = root / name
            path.mkdir(exist_ok=True)
            path.chmod(mode)  # mkdir's mode is masked by the umask; these must be exact
    etc = root / "etc"
    _write(etc / "passwd", "root:x:0:0:root:/root:/bin/sh\n"
                           "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    _write(etc / "group", "root:x:0:\nnogroup:x:65534:\n")
    _write(etc / "hostname", "stages\n")
    _write(etc / "hosts", "127.0.0.1\tlocalhost stages\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    # No name server: nothing in the workshop talks to the outside world.
    _write(etc / "resolv.conf", "# no name server: a stages rootfs works offline\n")
    _write(etc / "os-release", f'NAME="stages rootfs"\nID=stages\nPRETTY_NAME="stages {label} rootfs"\n')


# -- busybox ------------------------------------------------------------------------------------------
def find_busybox() -> str:
    """The path of a statically linked busybox on this machine, or :class:`RootfsError` saying what to
    install."""
    dynamic = None
    for candidate in (*BUSYBOX_PATHS, shutil.which("busybox")):
        if candidate and os.path.isfile(candidate):
            if is_static(candidate):
                return candidate
            dynamic = dynamic or candidate
    if dynamic:
        raise RootfsError(
            f"{dynamic} is dynamically linked, so it would need the host's libraries inside the rootfs",
            "install the static build: apt-get install busybox-static (or use --from host)",
        )
    raise RootfsError("busybox is not installed, and the default rootfs is made of it",
                      "apt-get install busybox-static (or build from this machine's programs: --from host)")


def busybox_applets(busybox: str) -> list[str]:
    """Where each applet goes, relative to the rootfs (``bin/sh``, ``usr/bin/env`` ...), as
    ``busybox --list-full`` says; older builds only know ``--list``, and then all go to ``bin/``."""
    import subprocess

    result = subprocess.run([busybox, "--list-full"], capture_output=True, text=True)
    if result.returncode == 0 and result.stdout.strip():
        names = result.stdout.split()
    else:
        listed = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=False)
        names = [f"bin/{name}" for name in listed.stdout.split()]
    # linuxrc is for an initramfs, and anything outside the usual directories is not a command.
    return [name for name in names if name.split("/")[0] in ("bin", "sbin", "usr") and ".." not in name]


def _build_busybox(root: Path, commands: Iterable[str] | None) -> str:
    busybox = find_busybox()
    applets = busybox_applets(busybox)
    if commands is not None:
        wanted = set(commands) | {"sh"}
        known = {os.path.basename(name) for name in applets}
        unknown = sorted(wanted - known)
        if unknown:
            raise RootfsError(f"busybox has no command {unknown[0]!r}",
                              f"see the commands it has with: {busybox} --list")
        applets = [name for name in applets if os.path.basename(name) in wanted]
    _skeleton(root, "busybox")
    with steps.record(f"cp {busybox} {root}/bin/busybox",
                      what="one static program: it needs no library, so it runs in any directory"):
        shutil.copy2(busybox, root / "bin" / "busybox")
        (root / "bin" / "busybox").chmod(0o755)
    # Relative links (sh -> busybox, ../../bin/busybox) rather than the absolute ones `--install -s`
    # makes: they mean the same inside the chroot, and on the host they never point out of the rootfs.
    with steps.record(f"chroot {root} /bin/busybox --install -s",
                      what=f"{len(applets)} commands, each a link to busybox, which acts as its name"):
        for name in applets:
            link = root / name
            if name == "bin/busybox" or os.path.lexists(link):
                continue
            os.symlink(os.path.relpath(root / "bin" / "busybox", link.parent), link)
    return busybox


# -- host -------------------------------------------------------------------------------------------
def shared_libraries(program: str) -> list[str]:
    """The shared libraries ``program`` loads, as absolute host paths, dynamic loader included.

    This is ``ldd``'s answer (ldd(1) asks the loader itself, so it follows ld.so.cache, RUNPATH and
    ``$ORIGIN`` exactly as a real start would); a static program needs none.
    """
    import subprocess

    paths: list[str] = []
    interpreter = elf_interpreter(program)
    if interpreter is None:
        return paths
    paths.append(interpreter)
    if not shutil.which("ldd"):
        raise RootfsError("ldd is not installed, so stages cannot tell which libraries a program needs",
                          "apt-get install libc-bin, or build the busybox rootfs instead")
    with steps.record(f"ldd {program}", what="which shared libraries it loads"):
        result = subprocess.run(["ldd", program], capture_output=True, text=True,
                                env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    for line in result.stdout.splitlines():
        line = line.strip()
        name, arrow, rest = line.partition("=>")
        if arrow:
            where = rest.strip().split(" (")[0].strip()
            if where == "not found":
                raise RootfsError(f"{program} needs {name.strip()}, which this machine does not have",
                                  f"find which package ships it: apt-file search {name.strip()}")
            if where.startswith("/"):
                paths.append(where)
        elif line.startswith("/"):
            paths.append(line.split(" (")[0].strip())
    return list(dict.fromkeys(paths))


def _copy_path(root: Path, host_path: str, hops: int = 0) -> None:
    """Copy ``host_path`` into the rootfs at the same path, recreating every symbolic link on the way
    (``/lib64 -> usr/lib64`` and the loader's own link), so the loader finds each file where the program
    was built to look for it."""
    if hops > _SYMLINK_HOPS:
        raise RootfsError(f"{host_path} is a loop of symbolic links", f"look at it with: ls -l {host_path}")
    parts = [part for part in host_path.split("/") if part]
    current = "/"
    for index, part in enumerate(parts):
        on_host = os.path.join(current, part)
        inside = root / on_host.lstrip("/")
        info = os.lstat(on_host)
        if stat.S_ISLNK(info.st_mode):
            target = os.readlink(on_host)
            if not os.path.lexists(inside):
                os.symlink(target, inside)
            if os.path.islink(inside):
                rest = parts[index + 1:]
                _copy_path(root, os.path.normpath(os.path.join(current, target, *rest)), hops + 1)
                return
            # The rootfs has a real directory where the host has a link (/bin on a merged-/usr host):
            # go on through the real directory, so the file lands at the path that was asked for.
            current = os.path.realpath(on_host)
            continue
        if stat.S_ISDIR(info.st_mode):
            inside.mkdir(exist_ok=True)
            current = on_host
            continue
        if index != len(parts) - 1:
            raise RootfsError(f"{on_host} is not a directory", f"check the path {host_path}")
        if not os.path.lexists(inside):
            shutil.copy2(on_host, inside)


def _host_program(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin")
    if not found:
        raise RootfsError(f"this machine has no program {name!r} to copy into the rootfs",
                          f"check the name with: command -v {name}, or leave it out")
    return os.path.realpath(found)


def _build_host(root: Path, commands: Iterable[str] | None) -> list[str]:
    names = list(dict.fromkeys([*(commands if commands is not None else HOST_COMMANDS), "sh"]))
    programs = {name: _host_program(name) for name in names}
    _skeleton(root, "host")
    needed: list[str] = []
    for name, program in programs.items():
        # A script needs its interpreter (the #! line, see execve(2)) and that interpreter's libraries.
        with open(program, "rb") as handle:
            head = handle.read(256)
        if head.startswith(b"#!"):
            interpreter = head[2:].split(b"\n")[0].strip().split()[0].decode()
            needed.append(interpreter)
            needed += shared_libraries(os.path.realpath(interpreter))
        else:
            needed += shared_libraries(program)
        real_name = os.path.basename(program)
        with steps.record(f"cp {program} {root}/bin/{real_name}", what=f"the program behind {name}"):
            if not os.path.lexists(root / "bin" / real_name):
                shutil.copy2(program, root / "bin" / real_name)
        if real_name != name and not os.path.lexists(root / "bin" / name):
            # sh is dash, and some programs act on the name they are started as: keep the host's link.
            with steps.record(f"ln -s {real_name} {root}/bin/{name}"):
                os.symlink(real_name, root / "bin" / name)
    for path in dict.fromkeys(needed):
        with steps.record(f"cp --parents {path} {root}", what="a library, where the loader looks"):
            _copy_path(root, path)
            if not resolve(root, path).is_file():  # pragma: no cover - a layout _copy_path did not expect
                resolve(root, path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, resolve(root, path))
    return names


# == tarballs ========================================================================================
@contextlib.contextmanager
def _open_archive(archive: str) -> Iterator[tarfile.TarFile]:
    """The open archive: Python's tarfile decompresses gzip, bzip2 and xz itself; zstd(1) does zstd."""
    import subprocess
    import tarfile

    if archive.endswith((".zst", ".tzst")):
        zstd = shutil.which("zstd")
        if not zstd:
            raise RootfsError(f"{archive} is compressed with zstd, which is not installed",
                              "apt-get install zstd, or give a .tar.gz or .tar.xz")
        process = subprocess.Popen([zstd, "-dcq", "--", archive], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
        try:
            with tarfile.open(fileobj=process.stdout, mode="r|") as tar:
                yield tar
        finally:
            process.stdout.close()
            process.kill()
            process.wait()
        return
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise RootfsError(f"{archive} is not a tar archive stages can read ({error})",
                          "give a .tar, .tar.gz, .tgz, .tar.xz or .tar.zst file") from None
    with tar:
        yield tar


def _entry_parts(name: str, archive: str) -> list[str]:
    if "\0" in name:
        raise UnsafeArchiveError(f"{archive} holds an entry whose name has a NUL byte in it ({name!r})",
                                 "this archive is damaged or hostile; use another one")
    if name.startswith("/"):
        raise UnsafeArchiveError(
            f"{archive} holds {name!r}, an absolute path: extracting it would write outside the rootfs",
            "use an archive made relative to its root (tar -C ROOTFS -cf out.tar .)",
        )
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive} holds {name!r}, whose '..' climbs out of the rootfs",
            "this archive is damaged or hostile; use another one",
        )
    return parts


def symlink_escapes(entry: list[str] | str, target: str) -> bool:
    """True if a symbolic link at ``entry`` (a path inside the rootfs) pointing at ``target`` climbs out.

    The target is read the way the kernel reads it after chroot(2): an absolute target starts at the
    rootfs's own root, a relative one at the link's directory, and the link escapes if a ``..`` would go
    above the root. So ``/bin/sh -> /bin/busybox`` is fine and ``etc/x -> ../../../etc/passwd`` is not.
    """
    parts = entry.split("/") if isinstance(entry, str) else entry
    parts = [part for part in parts if part not in ("", ".")]
    depth = 0 if target.startswith("/") else len(parts) - 1
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        else:
            depth += 1
    return False


_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _walk_to_parent(root_fd: int, parts: list[str], entry: str, archive: str, create: bool) -> int:
    """Open the directory that will hold ``parts[-1]``, one component at a time, relative to the rootfs
    and with O_NOFOLLOW (openat(2)): a component that is a symbolic link stops the walk, so no entry can
    be written through a link, whatever the link says."""
    fd = os.dup(root_fd)
    try:
        for index, part in enumerate(parts[:-1]):
            try:
                following = os.open(part, _OPEN_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise RootfsError(f"{archive}: {entry!r} links to a file the archive has not extracted",
                                      "this archive is damaged; use another one") from None
                os.mkdir(part, 0o755, dir_fd=fd)
                following = os.open(part, _OPEN_DIR, dir_fd=fd)
            except OSError as error:
                where = "/".join(parts[:index + 1])
                if error.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(
                        os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise UnsafeArchiveError(
                        f"{archive} holds {entry!r}, which goes through the symbolic link {where!r}: "
                        "extracting it could write outside the rootfs",
                        "this archive is hostile or damaged; use another one",
                    ) from None
                if error.errno == errno.ENOTDIR:
                    raise RootfsError(f"{archive} holds {entry!r}, but {where!r} is a file, not a directory",
                                      "this archive is damaged; use another one") from None
                raise
            os.close(fd)
            fd = following
        return fd
    except BaseException:
        os.close(fd)
        raise


def _clear(fd: int, leaf: str, entry: str, archive: str, keep_directory: bool) -> bool:
    """Make room for ``leaf``, as tar(1) does when a later entry replaces an earlier one. True if a
    directory is already there and is kept."""
    try:
        info = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(info.st_mode):
        if keep_directory:
            return True
        raise RootfsError(f"{archive} holds {entry!r}, which would replace a directory",
                          "this archive is damaged; use another one")
    os.unlink(leaf, dir_fd=fd)
    return False


def extract(archive: str | os.PathLike, directory: str | os.PathLike) -> list[str]:
    """Extract a tarball into ``directory`` (which must exist) without ever writing outside it.

    Returns the warnings, one line each naming the entry, for entries that were skipped or changed.

    Refused (:class:`UnsafeArchiveError` naming the entry; the caller removes what was extracted):

    - an absolute path (``/etc/passwd``) or a path with a ``..`` component;
    - a symbolic link whose target climbs out of the rootfs with ``..``. Its target is read as the kernel
      reads it after chroot(2): an **absolute target is fine** (``/bin/sh -> /bin/busybox`` is in every
      real image) because it means the rootfs's own ``/bin/busybox``; links are created as links and never
      followed while extracting;
    - a hard link to a path with ``..`` or an absolute path (a hard link to a host file);
    - an entry whose parent directory is a symbolic link the archive made earlier (``evil -> /`` then
      ``evil/etc/passwd``): every directory is opened with O_NOFOLLOW, relative to the rootfs.

    Skipped with a warning (so that extraction also works without root): device nodes and FIFOs, since
    a rootfs gets its ``/dev`` at run time. Dropped with a warning: setuid and setgid bits, which would
    let anyone on the host run those programs as their owner. Owners are kept only when run as root.
    """
    import tarfile

    archive = os.fspath(archive)
    root = os.path.realpath(directory)
    warnings: list[str] = []
    setuid: list[str] = []
    directories: list[tuple[list[str], tarfile.TarInfo]] = []
    as_root = os.geteuid() == 0
    root_fd = os.open(root, _OPEN_DIR)
    try:
        with steps.record(f"tar -xpf {archive} -C {root}", what="unpack the archive, entry by entry"), \
                _open_archive(archive) as tar:
            try:
                for member in tar:
                    try:
                        _extract_one(tar, member, root_fd, archive, as_root, warnings, setuid, directories)
                    except OSError as error:  # the disk is full, a read-only filesystem ...
                        raise RootfsError(f"could not extract {member.name!r} from {archive}: "
                                          f"{error.strerror or error}",
                                          "check the space and permissions where the rootfs goes") from None
            except (tarfile.TarError, EOFError) as error:
                raise RootfsError(f"{archive} is damaged: {error}", "use another copy of it") from None
        # Directory modes last, deepest first, so that a read-only directory still took its files.
        for parts, member in sorted(directories, key=lambda item: -len(item[0])):
            fd = _walk_to_parent(root_fd, parts + ["."], member.name, archive, create=False)
            try:
                if as_root:
                    os.chown(fd, member.uid, member.gid)
                os.chmod(fd, member.mode & 0o1777)
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)
    if setuid:
        warnings.append(f"dropped the setuid/setgid bit from {len(setuid)} file(s), e.g. {setuid[0]!r}: "
                        "on the host anyone could run them as their owner")
    for line in warnings:
        _log().warning("%s", line)
    return warnings


def _extract_one(tar: tarfile.TarFile, member: tarfile.TarInfo, root_fd: int, archive: str, as_root: bool,
                 warnings: list[str], setuid: list[str], directories: list) -> None:
    name = member.name
    parts = _entry_parts(name, archive)
    if not parts:
        return  # "./": the rootfs itself, whose mode we keep
    if member.ischr() or member.isblk() or member.isfifo():
        kind = "character device" if member.ischr() else "block device" if member.isblk() else "FIFO"
        warnings.append(f"skipped {name!r} ({kind}): devices and FIFOs are made when a rootfs runs")
        return
    if member.issym():
        if not member.linkname:
            raise RootfsError(f"{archive} holds {name!r}, a symbolic link to nothing",
                              "this archive is damaged; use another one")
        if symlink_escapes(parts, member.linkname):
            raise UnsafeArchiveError(
                f"{archive} holds {name!r}, a symbolic link to {member.linkname!r}, which points outside "
                "the rootfs", "this archive is hostile or damaged; use another one")
    if member.islnk():
        if member.linkname.startswith("/") or ".." in member.linkname.split("/"):
            raise UnsafeArchiveError(
                f"{archive} holds {name!r}, a hard link to {member.linkname!r}, outside the rootfs",
                "this archive is hostile or damaged; use another one")
    if not (member.isdir() or member.isreg() or member.issym() or member.islnk()):
        warnings.append(f"skipped {name!r}: stages does not extract this kind of entry ({member.type!r})")
        return
    fd = _walk_to_parent(root_fd, parts, name, archive, create=True)
    leaf = parts[-1]
    try:
        if member.isdir():
            if not _clear(fd, leaf, name, archive, keep_directory=True):
                os.mkdir(leaf, 0o700, dir_fd=fd)
            directories.append((parts, member))
            return
        _clear(fd, leaf, name, archive, keep_directory=False)
        if member.issym():
            os.symlink(member.linkname, leaf, dir_fd=fd)
            if as_root:
                os.chown(leaf, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
            return
        if member.islnk():
            source = _entry_parts(member.linkname, archive)
            source_fd = _walk_to_parent(root_fd, source, name, archive, create=False)
            try:
                # linkat(2) without AT_SYMLINK_FOLLOW: a link to a symlink is a link to the symlink itself.
                os.link(source[-1], leaf, src_dir_fd=source_fd, dst_dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                raise RootfsError(f"{archive}: {name!r} links to {member.linkname!r}, which is not in it",
                                  "this archive is damaged; use another one") from None
            except OSError as error:  # a hard link to a directory, or across filesystems
                raise RootfsError(f"{archive}: {name!r} cannot be a hard link to {member.linkname!r}: "
                                  f"{error.strerror}", "this archive is damaged; use another one") from None
            finally:
                os.close(source_fd)
            return
        mode = member.mode & 0o7777
        if mode & (stat.S_ISUID | stat.S_ISGID):
            setuid.append(name)
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        out = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=fd)
        with os.fdopen(out, "wb") as handle:
            content = tar.extractfile(member)
            if content is not None:
                shutil.copyfileobj(content, handle, 1 << 20)
            if as_root:
                os.chown(handle.fileno(), member.uid, member.gid)
            os.chmod(handle.fileno(), mode)
            os.utime(handle.fileno(), (member.mtime, member.mtime))
    finally:
        os.close(fd)


# == reading a rootfs ================================================================================
def describe(directory: str | os.PathLike) -> dict:
    """What ``directory`` holds: how it was built (if here), its size, and counts of what is in it.

    Never crosses into a filesystem mounted inside it (a jail's ``/proc``). Keys: ``path``, ``rootfs``
    (built here and complete), ``source`` (busybox, host or tarball), ``tarball`` (its path), ``built``,
    ``seconds`` (to build), ``commands``, ``files``, ``directories``, ``symlinks``, ``bytes``, ``size``
    (for people), ``shell`` (has ``/bin/sh``), ``noexec``, ``warnings``.
    """
    root = Path(os.path.realpath(directory))
    if not root.is_dir():
        raise RootfsError(f"{directory} does not exist or is not a directory", _build_hint(root))
    marker = _read_marker(root) or {}
    device = root.stat().st_dev
    files = directories = links = size = 0
    seen: set[int] = set()
    for top, dirs, names in os.walk(root):
        kept = []
        for name in dirs:
            info = os.lstat(os.path.join(top, name))
            if stat.S_ISLNK(info.st_mode):
                links += 1
            elif info.st_dev == device:
                kept.append(name)
                directories += 1
        dirs[:] = kept
        for name in names:
            if top == str(root) and name == MARKER:
                continue
            info = os.lstat(os.path.join(top, name))
            if stat.S_ISLNK(info.st_mode):
                links += 1
                continue
            files += 1
            if info.st_ino not in seen:  # a hard link takes no room of its own
                seen.add(info.st_ino)
                size += info.st_size
    return {
        "path": str(root),
        "rootfs": bool(marker.get("complete")),
        "source": marker.get("source"),
        "tarball": marker.get("tarball"),
        "built": marker.get("built"),
        "seconds": marker.get("seconds"),
        "commands": marker.get("programs") or marker.get("commands"),
        "files": files,
        "directories": directories,
        "symlinks": links,
        "bytes": size,
        "size": human_size(size),
        "shell": resolve(root, "/bin/sh").is_file(),
        "noexec": is_noexec(root),
        "warnings": marker.get("warnings", []),
    }


def default_rootfs() -> Path:
    """The busybox rootfs the tour uses, under :func:`state_dir`, built on first use.

    Safe to call from several processes at once: one builds while the others wait on a lock.
    """
    target = state_dir() / "rootfs" / "busybox"

    def ready() -> bool:
        return is_rootfs(target) and resolve(target, "/bin/sh").is_file()

    if ready():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".busybox.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready():
            build(target, "busybox", force=True)
    return target
