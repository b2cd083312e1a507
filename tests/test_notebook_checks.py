"""Every "check your work" cell can fail: break the step a lesson is about and its check cell must raise,
with a message that names the missing step.

For whoever adds tests here (notebooks 02, 03, 04, 06): the helper is :func:`run_broken`::

    error = run_broken("02-namespaces-by-hand.ipynb", {"CELL-ID": "pass"}, check="CHECK-CELL-ID")
    assert "make-rprivate" in error

It executes the notebook in a fresh kernel (nbclient, as nbmake does) with the cells named by id replaced
by new source (or, with :func:`patched`, with code run before a cell: a monkeypatch of the call the step
makes), runs every cell, the clean-up cells included, even after an error (``allow_errors``), and returns
the ``ename: evalue`` of the error the check cell raised; it fails the test if the check cell passed, or
if a cell other than the check cell raised first. Cell ids are the ``id`` fields of the .ipynb (print them
with ``python -c "import json,sys; [print(c['id'], c['source'][:1]) for c in json.load(open(sys.argv[1]))
['cells']]" notebooks/NN-*.ipynb``).

Cost: one notebook run per test (00 and 01 take a few seconds, 05 and 07 half a minute or so).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def patched(cell_source: str, before: str) -> str:
    """``cell_source`` with ``before`` run first in the same cell (e.g. a monkeypatch of the step's call)."""
    return before.rstrip("\n") + "\n" + cell_source


def cell_source(notebook: str, cell_id: str) -> str:
    import nbformat

    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    return next("".join(cell.source) for cell in nb.cells if cell.get("id") == cell_id)


def run_broken(notebook: str, replace: dict[str, str], *, check: str, timeout: int = 300) -> str:
    """Run ``notebook`` with the cells ``replace`` names (by id) given new source; return the error the
    cell ``check`` raised, as ``"ename: evalue"``. Fails if that cell passed or another cell raised first."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    ids = [cell.get("id") for cell in nb.cells]
    missing = (set(replace) | {check}) - set(ids)
    assert not missing, f"no cell with id {missing} in {notebook}"
    for cell in nb.cells:
        if cell.get("id") in replace:
            assert cell.cell_type == "code", f"cell {cell.get('id')} of {notebook} is not code"
            cell.source = replace[cell.get("id")]
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    env = {**os.environ, "MPLBACKEND": "agg"}
    old = os.environ.copy()
    os.environ.update(env)
    try:
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    errors = {}
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                errors.setdefault(cell.get("id"), f"{output['ename']}: {output['evalue']}")
    first = next((cell_id for cell_id in ids if cell_id in errors), None)
    assert first is not None, f"the check cell {check} of {notebook} passed with the step broken"
    assert first == check, f"cell {first} raised before the check cell: {errors[first]}"
    return errors[check]


# -- notebook 00 ----------------------------------------------------------------------------------------
NO_CHROOT = """
from stages import kernel
kernel.chroot = lambda path, what="": None   # broken: the jail's chroot is skipped
"""


def test_00_check_fails_without_the_chroot():
    error = run_broken("00-why-containers.ipynb",
                       {"4dae5709": patched(cell_source("00-why-containers.ipynb", "4dae5709"), NO_CHROOT)},
                       check="021b64a3")
    assert "the jailed shell's root should be the rootfs" in error and "no chroot?" in error, error


# -- notebook 05 ----------------------------------------------------------------------------------------
def test_05_check_fails_when_memory_is_dropped_from_the_explained_run():
    source = cell_source("05-automated-runtime.ipynb", "dd924647")
    assert '"--memory", "64m",' in source
    error = run_broken("05-automated-runtime.ipynb", {"dd924647": source.replace('"--memory", "64m",', "")},
                       check="84a4b58f")
    assert "--explain should show --memory 64m" in error, error


def test_05_check_fails_when_the_orphans_run_with_the_init():
    source = cell_source("05-automated-runtime.ipynb", "c5e1a002")
    assert '(("--no-init", ["--no-init"]),' in source
    error = run_broken("05-automated-runtime.ipynb",
                       {"c5e1a002": source.replace('(("--no-init", ["--no-init"]),', '(("--no-init", []),')},
                       check="84a4b58f")
    assert "with --no-init the 3 orphans stay zombies" in error, error


# -- notebook 01 ----------------------------------------------------------------------------------------
def test_01_check_fails_without_the_chroot():
    error = run_broken("01-chroot-jail.ipynb",
                       {"9eeeaa72": patched(cell_source("01-chroot-jail.ipynb", "9eeeaa72"), NO_CHROOT)},
                       check="8216b8cc")
    assert "the record shows chroot" in error, error


# -- notebook 07 ----------------------------------------------------------------------------------------
# what the form printed, whatever the flags
FIXED_MOUNTS = ('    lines += ["mount -t proc proc /proc",\n'
                '              "mount -t tmpfs tmpfs /dev   # and the device nodes",\n'
                '              "pivot_root . .", "umount -l ."]\n')


def test_07_check_fails_when_the_form_prints_fixed_mounts():
    source = cell_source("07-manual-vs-automated.ipynb", "667b0088")
    start = source.index("    # the mounts config.json asks for")
    end = source.index("    if config[\"root\"].get(\"readonly\"):")
    broken = source[:start] + FIXED_MOUNTS + source[end:]
    error = run_broken("07-manual-vs-automated.ipynb", {"667b0088": broken}, check="85097239")
    assert "one mount step per mount of config.json" in error, error
