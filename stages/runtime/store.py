"""The image store's ground floor: where it lives, how its files are written, and its lock.

Everything stage 3 keeps lives in the state directory (:func:`state_dir`: ``$STAGES_HOME``, else
``/var/lib/stages``, the same place stage 1 uses). The image store is ``images/`` in it::

    images/blobs/sha256/<digest>   layer tarballs and config JSON, named by the sha256 of their bytes
    images/layers/<diffid>/        each layer unpacked: an overlayfs lower directory (see overlay(5))
    images/imagedb/<id>.json       one image: its config digest and its layers, lowest first
    images/repositories.json       the name index: "name:tag" -> image id
    images/.lock                   flock(2)ed by every command that changes the store

Files are written atomically (a temporary file, fsync(2), rename(2)), so a reader sees the old
file or the new one, never half of one, and a crash leaves no torn index.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from stages.paths import state_dir

# typing.TYPE_CHECKING without importing typing: the names below only annotate, and typing
# costs every `stages` command milliseconds at start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def images_dir() -> Path:
    """The image store's top directory, ``<state>/images``, created (mode 0700) if missing."""
    top = state_dir() / "images"
    if not os.path.isdir(top / "tmp"):  # made last: once it is there, so are the others (one stat per call)
        for sub in ("", "blobs/sha256", "layers", "imagedb", "tmp"):
            (top / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    return top


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically: rename(2) replaces the old file in one step."""
    import tempfile  # here: `stages run` writes nothing in the store, and need not import it

    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` if there is no such file."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return default


@contextlib.contextmanager
def locked(name: str = ".lock") -> Iterator[Path]:
    """Hold the image store's lock (flock(2) on images/NAME) for the ``with`` block; yields images_dir().

    Two ``stages import`` at once both unpack their layers, but only one at a time changes the index.
    """
    top = images_dir()
    fd = os.open(top / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield top
    finally:
        os.close(fd)  # closing the last descriptor releases the flock(2)
