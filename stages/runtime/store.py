"""The image store's ground floor: where it lives, how its files are written, and its lock.

Everything stage 3 keeps lives in the state directory (:func:`state_dir`: ``$STAGES_HOME``, else
``/var/lib/stages``, the same place stage 1 uses). The image store is ``images/`` in it::

    images/blobs/sha256/<digest>   layer tarballs and config JSON, named by the sha256 of their bytes
    images/layers/<diffid>/        each layer unpacked: an overlayfs lower directory (see overlay(5))
    images/imagedb/<id>.json       one image: its config digest and its layers, lowest first
    images/repositories.json       the name index: "name:tag" -> image id
    images/.lock                   flock(2)ed by every command that changes the store
    images/tmp/import.*, build.*   scratch directories of an import or a build; each has an ``.owner``
                                   file (PID and start time), so that ``stages prune`` removes those
                                   whose owner died (SIGKILL, a crash) and never a running build's

Files are written atomically (a temporary file, fsync(2), rename(2)), so a reader sees the old
file or the new one, never half of one, and a crash leaves no torn index. A full disk is said in one
sentence (:class:`NoSpaceError`), never as an OSError.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from stages.errors import StagesError
from stages.paths import state_dir

# typing.TYPE_CHECKING without importing typing: the names below only annotate, and typing
# costs every `stages` command milliseconds at start-up.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


#: The errnos of a full filesystem: no blocks or inodes left (ENOSPC), or over a quota (EDQUOT).
FULL = (28, 122)


class NoSpaceError(StagesError):
    """The state directory's filesystem is full: nothing new can be written there."""


def no_space(error: OSError | None = None) -> NoSpaceError:
    """The one sentence for a full STAGES_HOME (``error``: the OSError that said so)."""
    where = state_dir()
    return NoSpaceError(f"no space left in STAGES_HOME ({where}): free some with stages prune / rmi",
                        f"`stages prune` removes stopped containers and build leftovers, `stages rmi IMAGE` "
                        f"an image; `df -h {where}` shows what is left")


def is_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in FULL


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
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if is_full(error):
            raise no_space(error) from None
        raise


class DamagedFileError(StagesError):
    """A file of the store is there but is not the JSON it should be (truncated, overwritten)."""

    def __init__(self, path: Path, why: str, hint: str | None = None):
        super().__init__(f"{path} is damaged ({why})", hint)
        self.path = path
        self.why = why


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` if there is no such file; :class:`DamagedFileError` if it is
    not JSON (a file cut short by a full disk or a crash of an older version, or overwritten by hand)."""
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        return default
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError
        why = "empty" if not os.path.getsize(path) else f"not JSON: {str(error).split(':')[0]}"
        raise DamagedFileError(Path(path), why) from None


# -- scratch directories ---------------------------------------------------------------------------
OWNER_FILE = ".owner"
#: A scratch directory without an owner file is left alone this long (it was just made, and its owner
#: is about to write the file) before ``stages prune`` takes it for a leftover.
YOUNG = 60.0


def scratch(prefix: str) -> Path:
    """A new scratch directory in images/tmp (same filesystem as the layers: they rename(2) into place),
    with an owner file naming this process, so that :func:`prune_scratch` can tell a leftover of a killed
    build or import from a running one's."""
    import tempfile

    from stages.runtime.oci.statefile import start_time

    work = Path(tempfile.mkdtemp(dir=images_dir() / "tmp", prefix=prefix))
    try:
        (work / OWNER_FILE).write_text(f"{os.getpid()} {start_time(os.getpid())}\n")
    except OSError as error:
        import shutil

        shutil.rmtree(work, ignore_errors=True)  # nothing left behind by a build that could not begin
        if is_full(error):
            raise no_space(error) from None
        raise
    return work


def _owner_alive(work: Path) -> bool | None:
    """Whether the process that made ``work`` still runs (None: no owner file to tell)."""
    from stages.runtime.oci.statefile import alive

    try:
        pid, started = (work / OWNER_FILE).read_text().split()
        return alive(int(pid), None if started == "None" else int(started))
    except FileNotFoundError:
        return None
    except ValueError:
        return False  # cut short: its owner never finished writing it, and is gone (or it is older)


def prune_scratch() -> list[str]:
    """Remove the scratch directories (``images/tmp/*``) whose build or import is gone: their owner process
    died (SIGKILL, a crash), or they have no owner file and are old. Returns their names."""
    import shutil
    import time

    tmp = state_dir() / "images" / "tmp"
    removed = []
    for work in sorted(tmp.iterdir()) if tmp.is_dir() else []:
        if not work.is_dir() or work.is_symlink():
            continue
        alive = _owner_alive(work)
        if alive or (alive is None and time.time() - work.stat().st_mtime < YOUNG):
            continue
        shutil.rmtree(work, ignore_errors=True)
        removed.append(f"images/tmp/{work.name}")
    return removed


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
