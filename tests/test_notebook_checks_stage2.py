"""Every "check your work" cell of notebooks 02, 03, 04 and 06 can fail: each test breaks the step a lesson
is about (through tests/test_notebook_checks.py's :func:`run_broken`) and asserts that the check cell then
raises with a message naming that step.

Steps the holder takes inside the isolate (``mount --make-rprivate /`` after ``unshare --mount``, the old
root's unmount after ``pivot_root``) run in the holder process, ``python -m stages.isolate``, not in the
notebook's kernel: they are broken there through a ``sitecustomize`` module on the holder's PYTHONPATH that
turns that one call into nothing, and only for the isolates the lesson starts before the step.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_notebook_checks import cell_source, patched, run_broken

pytestmark = [pytest.mark.root, pytest.mark.slow]

NB02, NB03, NB04, NB06 = ("02-namespaces-by-hand.ipynb", "03-cgroups-by-hand.ipynb",
                          "04-networking-by-hand.ipynb", "06-images-and-builds.ipynb")
CHECK02, CHECK03, CHECK04, CHECK06 = "afe913b6", "2fd0c0f2", "6b99244d", "a1d8185d"


def without(notebook: str, cell_id: str, line: str, instead: str = "pass  # broken: step left out") -> dict:
    """The cell ``cell_id`` with ``line`` (one step, a whole line of it) replaced."""
    source = cell_source(notebook, cell_id)
    assert line in source, f"{line!r} is not in cell {cell_id} of {notebook}"
    return {cell_id: source.replace(line, instead, 1)}


@pytest.fixture
def leftovers():
    """A broken run stops at its check, before the clean-up the check cell would do last (notebook 03's
    cgroups, 02's rootfs when a mount still held it): remove what it made."""
    from stages.isolate import cgroups

    before = set(glob.glob("/tmp/stages-0[2346]-*"))
    cgroups_before = set(cgroups.find())
    yield
    for name in set(cgroups.find()) - cgroups_before:
        if name.startswith("stages-nb03-"):
            cgroups.Cgroup.open(name[len("stages-"):]).remove()
    for directory in set(glob.glob("/tmp/stages-0[2346]-*")) - before:
        shutil.rmtree(directory, ignore_errors=True)


def holder_patch(tmp_path: Path, body: str, undo_after: str | None, notebook: str, undo: str = "") -> dict:
    """Cells that start the notebook's holders with ``body`` (a sitecustomize) in effect: set in the
    setup cell, and taken away again after the cell ``undo_after``, so that later isolates are whole."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(body)
    setup = "f09cdc1b"
    start = f"import os\nos.environ['PYTHONPATH'] = {str(site)!r}"
    cells = {setup: patched(cell_source(notebook, setup), start)}
    if undo_after:
        cells[undo_after] = (cell_source(notebook, undo_after)
                             + f"\nos.environ.pop('PYTHONPATH', None)\n{undo}\n")
    return cells


# -- notebook 02 ----------------------------------------------------------------------------------------
SKIP_RPRIVATE = """
import stages.kernel as _kernel
_mount = _kernel.mount
_skipped = []


def mount(source, target, fstype=None, flags=0, *args, **kwargs):
    if source is None and target == "/" and flags == _kernel.MS_REC | _kernel.MS_PRIVATE and not _skipped:
        _skipped.append(target)
        return None  # broken: the first mount --make-rprivate / (unshare --mount's) is skipped
    return _mount(source, target, fstype, flags, *args, **kwargs)


_kernel.mount = mount
"""

SKIP_OLD_ROOT_UNMOUNT = """
import stages.kernel as _kernel
_umount = _kernel.umount


def umount(target, flags=0, what=""):
    if what.startswith("detach the old root"):
        return None  # broken: the old root stays stacked on top after pivot_root
    return _umount(target, flags, what)


_kernel.umount = umount
"""


def test_02_fails_without_make_rprivate(tmp_path, leftovers):
    # Without --make-rprivate a new mount namespace keeps its copy's peer groups: the isolate's tmpfs
    # appears in the kernel's namespace. The tests run in a private mount namespace, where nothing would
    # propagate anyway; so this run goes in a mount namespace of its own whose mounts are shared again
    # (unshare --propagation shared), as a host's are under systemd.
    # after the step the lesson is about, the isolate's mounts are made private after all (pivot_root(2)
    # refuses a shared parent mount), so that the rest of the notebook runs up to its check
    cells = holder_patch(tmp_path, SKIP_RPRIVATE, "0faba68d", NB02, undo="iso.make_private()")
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from test_notebook_checks import run_broken\n"
              f"print(run_broken({NB02!r}, {cells!r}, check={CHECK02!r}))\n")
    result = subprocess.run(["unshare", "--mount", "--propagation", "shared", sys.executable, "-c", script],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "section 3" in result.stdout and "rprivate" in result.stdout, result.stdout


def test_02_fails_without_the_old_root_unmount(tmp_path, leftovers):
    cells = holder_patch(tmp_path, SKIP_OLD_ROOT_UNMOUNT, "754579ca", NB02)
    # with the host's root stacked on the isolate's /, the probes of root's doors would act on the host's
    # /dev and /proc/sys: they are left out (the check stops before it reads them)
    cells.update({"fea2549e": "pass", "5081afe6": "pass"})
    error = run_broken(NB02, cells, check=CHECK02)
    assert "section 8" in error and "old root's unmount" in error, error


def test_02_fails_without_unshare_ipc(leftovers):
    error = run_broken(NB02, without(NB02, "39a4323b", 'iso.unshare("ipc")'), check=CHECK02)
    assert "section 5: the IPC namespace" in error, error


def test_02_fails_without_unshare_cgroup(leftovers):
    error = run_broken(NB02, without(NB02, "5a339275", 'iso.unshare("cgroup")'), check=CHECK02)
    assert "section 7: with unshare --cgroup" in error, error


def test_02_fails_without_dropping_capabilities(leftovers):
    error = run_broken(NB02, without(NB02, "e97d4b52", "iso.drop_capabilities()"), check=CHECK02)
    assert "section 9: drop_capabilities()" in error, error


def test_02_checkboxes_measure_what_they_build(leftovers):
    # a look() that ignores the ipc box (as the old one showed nothing for it) fails the check
    source = cell_source(NB02, "183d281c")
    broken = source.replace('if name in names and name != "user"]',
                            'if name in names and name not in ("user", "ipc")]')
    assert broken != source
    error = run_broken(NB02, {"183d281c": broken}, check=CHECK02)
    assert "ipc: the host's queue is hidden" in error, error


# -- notebook 03 ----------------------------------------------------------------------------------------
def test_03_fails_without_the_cgroup_procs_write(leftovers):
    error = run_broken(NB03, without(NB03, "44389627", "    cgroup.add(hog.pid)",
                                     "    pass  # broken: the hog is never moved into the cgroup"),
                       check=CHECK03)
    assert "cgroup.procs" in error, error


def test_03_fails_without_pids_max(leftovers):
    error = run_broken(NB03, without(NB03, "1bb2dd4c", "bomb_cgroup.set_pids(10)"), check=CHECK03)
    assert "pids.max" in error, error


# -- notebook 04 ----------------------------------------------------------------------------------------
@pytest.mark.net
def test_04_fails_without_masquerade(leftovers):
    error = run_broken(NB04, without(NB04, "31f0dee2", "        wiring.masquerade()",
                                     "        pass  # broken: no MASQUERADE rule"), check=CHECK04)
    assert "section 7: with MASQUERADE" in error, error


# -- notebook 06 ----------------------------------------------------------------------------------------
def test_06_fails_without_the_env_line(leftovers):
    error = run_broken(NB06, without(NB06, "471c2faf", '                 "ENV GREETING=hello-from-ENV\\n"\n',
                                     ""), check=CHECK06)
    assert "the ENV line" in error, error


def test_06_fails_when_the_container_deletes_nothing(leftovers):
    error = run_broken(NB06, without(NB06, "b2081601", " rm /etc/motd;", ""), check=CHECK06)
    assert "whiteout" in error, error
