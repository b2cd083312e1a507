"""Two small Sphinx additions for the stages docs.

- The widget JavaScript, offline: the vendored ``@jupyter-widgets/html-manager`` bundle (see
  ``_vendor/fetch-widgets.sh``) is unpacked into the build's ``_static/widgets/`` and checked against its
  SHA256SUMS, so a rendered notebook's widgets load from the build itself and never from a CDN.
- ``.. stages-submodules:: PACKAGE``: one section with the autodoc reference per submodule of PACKAGE
  (subpackages included), found on disk, so a module added to ``stages.isolate`` or ``stages.runtime``
  joins the API reference without anyone editing the docs.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import pkgutil
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

VENDOR = Path(__file__).resolve().parent.parent / "_vendor" / "html-manager"
#: Where the widget files land, relative to the build's _static directory (conf.py's nb_ipywidgets_js).
WIDGETS_STATIC = "widgets"


def unpack_widgets(app: Sphinx) -> None:
    """Unpack embed.js and its fonts into <outdir>/_static/widgets, checking each file's sha256."""
    if app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / WIDGETS_STATIC
    target.mkdir(parents=True, exist_ok=True)
    for line in (VENDOR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        packed = VENDOR / (name + ".gz")
        data = gzip.decompress(packed.read_bytes()) if packed.exists() else (VENDOR / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ExtensionError(f"the vendored widget file {name} does not match its sha256 in "
                                 f"{VENDOR / 'SHA256SUMS'}: run docs/_vendor/fetch-widgets.sh again")
        # Written beside the build, never into the sources, and only when it changed (incremental builds).
        destination = target / name
        if not destination.exists() or destination.read_bytes() != data:
            destination.write_bytes(data)


class SubmodulesDirective(SphinxDirective):
    """``.. stages-submodules:: stages.isolate``: a section with its reference per submodule, found on disk.

    Subpackages are walked too. A module gets its members; a package only its docstring, since what it
    offers is imported from its modules, where each name is documented once (twice would be a duplicate
    object description, which -W turns into an error).
    """

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        package = importlib.import_module(self.arguments[0])
        found = sorted(
            (info.name, info.ispkg)
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
            if not any(part.startswith("_") for part in info.name.split("."))  # __main__, private helpers
        )
        lines: list[str] = []
        for name, is_package in found:
            title = f"``{name}``"
            lines += [title, "-" * len(title), "", f".. automodule:: {name}"]
            lines += ["   :no-members:", ""] if is_package else ["   :members:", "   :show-inheritance:", ""]
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source=self.get_source_info()[0]), container)
        # Rebuild the page when a submodule changes; a new one is found at the next full build.
        for name, _ in found:
            module = importlib.import_module(name)
            if getattr(module, "__file__", None):
                self.env.note_dependency(module.__file__)
        return container.children


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", unpack_widgets)
    app.add_directive("stages-submodules", SubmodulesDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
