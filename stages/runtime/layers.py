"""Image layers: digests, unpacking a layer tarball for overlayfs, and flattening layers into one rootfs.

A layer is a tarball of the changes one build step made (OCI image spec, "Image Layer Filesystem
Changeset"). Added and changed files are plain entries; a deleted file is an empty entry named
``.wh.NAME`` (a *whiteout*), and a directory whose lower contents are all hidden holds ``.wh..wh..opq``
(an *opaque* whiteout). Whiteouts only hide what lower layers have, never what the same layer adds.

Unpacked for overlayfs, each layer is its own directory, and the whiteouts must be said the way the
kernel understands them (overlay(5), "whiteouts and opaque directories"; containerd's overlay
snapshotter does the same): a deleted NAME becomes a character device 0/0 called NAME, an opaque
directory carries the xattr ``trusted.overlay.opaque="y"``.

The tar entries themselves go through stage 1's extractor (:func:`stages.rootfs.extract`), with all its
refusals of hostile entries (``..``, absolute paths, links out); this module only rewrites the
whiteouts it left behind as empty files.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import shutil
import stat
from pathlib import Path

from stages.errors import RootfsError

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"


def sha256_file(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of the bytes of ``path``: the digest that names a blob."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def open_uncompressed(path: str | os.PathLike):
    """``path`` opened for reading with gzip, bzip2 or xz undone (found by the first bytes, not the name)."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(path, "rb")
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        raise RootfsError(f"{path} is compressed with zstd, which stages cannot read in a layer",
                          "save the image with gzip or uncompressed layers")
    return open(path, "rb")


def diff_id(path: str | os.PathLike) -> str:
    """The layer's DiffID: ``sha256:<hex>`` of the *uncompressed* tar (what config.rootfs.diff_ids lists)."""
    digest = hashlib.sha256()
    try:
        with open_uncompressed(path) as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, EOFError, lzma.LZMAError) as error:
        if isinstance(error, RootfsError):
            raise
        raise RootfsError(f"{path} is a damaged compressed file ({error})",
                          "use another copy of it") from None
    return f"sha256:{digest.hexdigest()}"


def unpack(blob: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Unpack the layer tarball ``blob`` into the empty directory ``dest``, for overlayfs.

    Entries go through :func:`stages.rootfs.extract` (hostile ones are refused); then each ``.wh.NAME``
    becomes a 0/0 character device NAME and each ``.wh..wh..opq`` the opaque xattr on its directory.
    Returns the extractor's warnings.
    """
    from stages import rootfs

    warnings = rootfs.extract(blob, dest)
    to_overlay_whiteouts(dest)
    return warnings


def to_overlay_whiteouts(root: str | os.PathLike) -> None:
    """Rewrite the OCI whiteout files under ``root`` as overlayfs whiteouts (overlay(5))."""
    for directory, dirnames, filenames in os.walk(root):  # os.walk never follows symbolic links down
        for name in filenames:
            if not name.startswith(WHITEOUT_PREFIX):
                continue
            path = os.path.join(directory, name)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            os.unlink(path)
            if name == OPAQUE:
                os.setxattr(directory, OPAQUE_XATTR, b"y", follow_symlinks=False)
            elif name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                continue  # other ".wh..wh." names are aufs bookkeeping, meaningless here
            else:
                hidden = os.path.join(directory, name[len(WHITEOUT_PREFIX):])
                _remove(hidden)
                # A character device with device number 0/0 is overlayfs's whiteout (mknod(2)).
                os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0))
                if hidden.rsplit("/", 1)[-1] in dirnames:
                    dirnames.remove(hidden.rsplit("/", 1)[-1])


def is_whiteout(path: str | os.PathLike) -> bool:
    """True if ``path`` is an overlayfs whiteout: a character device numbered 0/0."""
    info = os.lstat(path)
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(0, 0)


def is_opaque(path: str | os.PathLike) -> bool:
    """True if the directory ``path`` carries overlayfs's opaque xattr."""
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _remove(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _empty(directory: str) -> None:
    for name in os.listdir(directory):
        _remove(os.path.join(directory, name))


def flatten_layers(layer_dirs: list[str | os.PathLike], dest: str | os.PathLike) -> Path:
    """Apply the unpacked layers (lowest first) into ``dest``, as overlayfs would show them merged.

    A whiteout deletes the path below it, an opaque directory empties what lower layers put there, a
    directory over a directory merges, anything else replaces what was there. Each path is made in
    ``dest`` from the top down and every parent is a real directory made here, so no entry is ever
    written through a symbolic link.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for layer in layer_dirs:
        layer = os.fspath(layer)
        links: dict[tuple[int, int], str] = {}
        for directory, dirnames, filenames in os.walk(layer):
            relative = os.path.relpath(directory, layer)
            target_dir = os.path.normpath(os.path.join(dest, relative))
            if relative != "." and is_opaque(directory):
                _empty(target_dir)
            for name in sorted(dirnames):
                source, target = os.path.join(directory, name), os.path.join(target_dir, name)
                if os.path.islink(source):  # os.walk lists links to directories as directories
                    filenames.append(name)
                    continue
                if not (os.path.isdir(target) and not os.path.islink(target)):
                    _remove(target)
                    os.mkdir(target)
                info = os.lstat(source)
                os.chown(target, info.st_uid, info.st_gid)
                os.chmod(target, stat.S_IMODE(info.st_mode))
            dirnames[:] = [name for name in dirnames if not os.path.islink(os.path.join(directory, name))]
            for name in filenames:
                source, target = os.path.join(directory, name), os.path.join(target_dir, name)
                info = os.lstat(source)
                _remove(target)
                if stat.S_ISCHR(info.st_mode) and info.st_rdev == os.makedev(0, 0):
                    continue  # a whiteout: the path is gone
                key = (info.st_dev, info.st_ino)
                if info.st_nlink > 1 and key in links:
                    os.link(links[key], target, follow_symlinks=False)
                    continue
                if stat.S_ISLNK(info.st_mode):
                    os.symlink(os.readlink(source), target)
                elif stat.S_ISREG(info.st_mode):
                    shutil.copy2(source, target, follow_symlinks=False)
                else:
                    continue  # devices and FIFOs: a rootfs gets its /dev when it runs
                os.lchown(target, info.st_uid, info.st_gid)
                links[key] = target
    return dest


def tree_size(root: str | os.PathLike) -> int:
    """Bytes in the regular files under ``root`` (each hard-linked file counted once)."""
    seen, total = set(), 0
    for directory, _, filenames in os.walk(root):
        for name in filenames:
            info = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total
