"""Sphinx configuration for the stages docs: a learner's path, an instructor's guide, an API reference.

Build (as root: the notebooks are executed, and they use namespaces, mounts and cgroups)::

    .venv/bin/python -m sphinx -W --keep-going docs docs/_build/html

The build needs no network: no intersphinx, no CDN (the widget JavaScript is vendored under
``_vendor/``), and the notebooks are executed here, by this interpreter's ``python3`` kernel.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))  # `import stages` even when the package is not installed



def _link_notebooks() -> None:
    """Make ``docs/notebooks`` the symbolic link to ``../notebooks`` it is committed as.

    The rendered notebooks are the project's own files, executed in their own directory (they may use
    relative paths). A checkout without symbolic links (git on Windows) holds a small file with the
    link's text instead, and a copy without the link (an rsync that skips it) holds nothing: both are
    put right here, before Sphinx looks for sources.
    """
    link = DOCS / "notebooks"
    if link.is_dir():
        return
    if link.is_symlink() or (link.is_file() and link.read_text().strip() == "../notebooks"):
        link.unlink()
    if not link.exists():
        link.symlink_to("../notebooks", target_is_directory=True)


_link_notebooks()

project = "stages"
author = "the stages workshop"
copyright = "the stages workshop authors"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "stages_docs",
]

# `notebooks` is a symbolic link to ../notebooks: the rendered notebooks are the project's own, not copies.
exclude_patterns = ["_build", "_vendor", "_ext", "README.md", "**/.ipynb_checkpoints", "Thumbs.db",
                    ".DS_Store"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

# -- MyST -------------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# -- notebooks: executed at every build, with their outputs ---------------------------------------
# "force" runs every notebook at each build, so the pages show what this code does today (the cache
# keys on the notebook's text only, and would keep outputs from an older stages). An instructor
# rebuilding often may pass -D nb_execution_mode=cache.
nb_execution_mode = os.environ.get("STAGES_DOCS_EXECUTE", "force")
nb_execution_timeout = 120        # seconds per cell; the notebooks take a few seconds each
nb_execution_in_temp = False      # run in the notebook's own directory (notebooks/), as nbmake does
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# The vendored html-manager bundle (see _ext/stages_docs.py), never the CDN default of myst-nb.
nb_ipywidgets_js = {"widgets/embed.js": {}}

# -- API reference --------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# -- HTML -----------------------------------------------------------------------------------------
html_theme = "furo"
html_title = "stages: from a chroot jail to a container runtime"
html_static_path: list[str] = []
html_show_sourcelink = False
html_last_updated_fmt = None
