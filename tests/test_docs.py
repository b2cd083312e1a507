"""The docs build, offline, with every notebook executed, and nothing loaded from outside.

One build (about a minute: the notebooks run) serves every test here. It is the build an instructor runs,
``python -m sphinx -W --keep-going docs OUT``: a warning fails it, and so does a notebook whose check
cell fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9]*.ipynb"))

pytestmark = [pytest.mark.root, pytest.mark.slow]

pytest.importorskip("sphinx", reason="the docs extra is not installed: pip install -e '.[docs]'")
pytest.importorskip("myst_nb", reason="the docs extra is not installed: pip install -e '.[docs]'")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The docs, built once for this module into a temporary directory."""
    from conftest import leaks, snapshot  # the leak check, around the build (this fixture outlives tests)

    out = tmp_path_factory.mktemp("docs")
    # sys.executable as it is, not its realpath: the virtualenv's python is a link to the base interpreter,
    # and only the link finds the virtualenv's packages (sphinx, myst-nb).
    python = sys.executable
    before = snapshot()
    built = subprocess.run(
        [python, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", "-d", str(out / "doctrees"),
         str(DOCS), str(out / "html")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        # No proxy: nothing in the build may need the network (and a proxy would hide it if it did).
        env={**os.environ, "STAGES_DOCS_EXECUTE": "force", "http_proxy": "", "https_proxy": "",
             "no_proxy": "*"},
    )
    assert built.returncode == 0, f"sphinx-build failed:\n{built.stdout[-3000:]}\n{built.stderr[-6000:]}"
    # Other test runs on this machine may be running the same notebooks right now, and their cgroups and
    # namespaces come and go while we look: what the build left stays, so look again until it is stable.
    left = _ours(leaks(before, snapshot()))
    deadline = time.monotonic() + 15
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = _ours(leaks(before, snapshot()))
    assert not left, "building the docs (running the notebooks) left these behind:\n  " + "\n  ".join(left)
    return out / "html"


def _ours(found: list[str]) -> list[str]:
    """Leave out what another run's notebook, still running, holds right now.

    Notebooks and tests name what they create after a PID (``stages-nb03-22175-demo``). Once the
    build has returned, every kernel it started is gone, so a name whose PID is a living process belongs
    to someone else's run (nbmake, JupyterLab in tests/test_browser.py), and so does the shared parent
    (``.../stages``) that holds it. Our own leftovers name dead PIDs, and stay reported.
    """
    living = set(psutil.pids())
    theirs = [item for item in found if item.split(":")[0] in ("cgroup", "netns", "net device", "mount")
              and any(int(number) in living for number in re.findall(r"(?<!\d)\d{3,7}(?!\d)",
                                                                    item.rsplit("/", 1)[-1]))]
    return [item for item in found
            if item not in theirs and not any(other.startswith(item + "/") for other in theirs)]


class _Resources(HTMLParser):
    """Every URL a page makes the browser load: scripts, stylesheets, images, frames, media."""

    LOADS = {("script", "src"), ("img", "src"), ("iframe", "src"), ("source", "src"), ("audio", "src"),
             ("video", "src"), ("embed", "src"), ("object", "data")}

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        for element, attribute in self.LOADS:
            if tag == element and values.get(attribute):
                self.urls.append(values[attribute])
        rel = set((values.get("rel") or "").split())
        if tag == "link" and values.get("href") and rel & {"stylesheet", "preload", "modulepreload", "icon"}:
            self.urls.append(values["href"])


def _remote(url: str) -> bool:
    return bool(re.match(r"^([a-z][a-z0-9+.-]*:)?//", url, re.IGNORECASE)) and not url.startswith("data:")


def _page(site: Path, notebook: Path) -> Path:
    return site / "notebooks" / (notebook.stem + ".html")


def _text(page: Path) -> str:
    return re.sub(r"<[^>]+>", "", page.read_text())


def test_every_notebook_is_rendered_with_its_outputs(site):
    assert NOTEBOOKS, "no notebooks found"
    learners = (site / "learners.html").read_text()
    # The instructor's guide carries myst-nb's table of this build's runs: one row per notebook.
    runs = _text(site / "instructors.html")
    for notebook in NOTEBOOKS:
        # The notebooks are committed without outputs, so every output on the page came from the build.
        stored = json.loads(notebook.read_text())
        assert all(not cell.get("outputs") for cell in stored["cells"]), f"{notebook.name} stores outputs"
        page = _page(site, notebook)
        assert page.exists(), f"{notebook.name} has no page"
        html = page.read_text()
        assert html.count('class="cell_output') >= 3, f"{notebook.name}'s page shows (almost) no output"
        assert 'class="output stream' in html, f"{notebook.name}'s page shows nothing the notebook printed"
        assert "Traceback" not in _text(page), f"{notebook.name} raised while the docs were built"
        link = f'href="notebooks/{notebook.stem}.html"'
        assert link in learners, f"the learner's path does not link {notebook.name}"
        assert re.search(rf"notebooks/{re.escape(notebook.stem)}\s+\S+ \S+\s+force\s+[0-9.]+\s+✅", runs), \
            f"the instructor's guide does not show {notebook.name} run by this build"


def test_a_notebook_prints_its_check(site):
    page = _page(site, REPO / "notebooks" / "02-namespaces-by-hand.ipynb")
    if not page.exists():
        pytest.skip("notebook 02 is not there")
    assert "all checks passed" in _text(page)


def test_pictures_drawn_from_the_kernel_are_in_the_pages(site):
    """Notebooks 02, 04 and 06 draw namespaces, mount trees, the network and overlay layers with graphviz
    (stages.diagrams) while the build runs them: each page holds those SVGs, inline or as local files."""
    import shutil

    if shutil.which("dot") is None:
        pytest.skip("graphviz's dot is not installed: the pictures are text (apt-get install graphviz)")
    titles = {"02-namespaces-by-hand": ["namespaces: host", "mount tree of pid"],
              "04-networking-by-hand": ["network: devices, bridge, veth pairs, NAT"],
              "06-images-and-builds": ["overlay on / of pid"]}
    for stem, wanted in titles.items():
        page = site / "notebooks" / f"{stem}.html"
        html = page.read_text()
        svgs = [html] if "<svg" in html else []
        for source in re.findall(r'<img[^>]+src="([^"]+\.svg)"', html):
            svgs.append((page.parent / source).read_text())
        for title in wanted:
            assert any(title in svg for svg in svgs), f"{stem}'s page has no picture titled {title!r}"


def test_the_notebooks_run_in_the_notebooks_directory():
    """myst-nb runs a notebook in its source's directory: docs/notebooks must lead to notebooks/."""
    assert (DOCS / "notebooks").resolve() == (REPO / "notebooks").resolve()


def test_widget_state_is_embedded_and_the_widget_script_is_local(site):
    with_widgets = [notebook for notebook in NOTEBOOKS if "ipywidgets" in notebook.read_text()]
    assert with_widgets, "no notebook uses ipywidgets"
    for notebook in with_widgets:
        html = _page(site, notebook).read_text()
        states = re.findall(r'<script type="application/vnd.jupyter.widget-state\+json">(.*?)</script>',
                            html, re.DOTALL)
        assert len(states) == 1, f"{notebook.name}: no widget state embedded"
        state = json.loads(states[0])["state"]
        assert state, f"{notebook.name}: the widget state is empty"
        # embed.js renders the widgets ipywidgets ships; any other module would need a loader and a CDN.
        modules = {model["model_module"] for model in state.values()}
        assert modules <= {"@jupyter-widgets/controls", "@jupyter-widgets/base", "@jupyter-widgets/output"}, \
            f"{notebook.name} uses widgets the offline bundle cannot render: {modules}"
        assert 'type="application/vnd.jupyter.widget-view+json"' in html, f"{notebook.name}: no widget view"
        assert re.search(r'<script src="\.\./_static/widgets/embed\.js[?"]', html), \
            f"{notebook.name} does not load the vendored embed.js"
    sums = (DOCS / "_vendor" / "html-manager" / "SHA256SUMS").read_text().split()
    assert hashlib.sha256((site / "_static" / "widgets" / "embed.js").read_bytes()).hexdigest() == sums[0]


def test_no_page_loads_anything_from_outside(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        parser = _Resources()
        parser.feed(page.read_text())
        remote = [url for url in parser.urls if _remote(url)]
        assert not remote, f"{page.relative_to(site)} loads {remote}"
        # Nothing else spelled out either: a CDN named in an attribute or a script body (require.js
        # config, data-jupyter-widgets-cdn) would be fetched by the JavaScript at run time.
        html = page.read_text()
        for cdn in ("cdn.jsdelivr.net", "unpkg.com", "cdnjs.cloudflare.com", "googleapis.com"):
            assert cdn not in html.lower(), f"{page.relative_to(site)} names {cdn}"
    for script in (site / "_static").rglob("*.js"):
        if script.name == "embed.js":
            continue  # the bundle holds a CDN default it never uses without a module loader (see below)
        assert "cdn.jsdelivr.net" not in script.read_text(errors="replace"), script


def test_api_reference_lists_each_stage(site):
    expected = {
        "api/jail.html": ["stages.jail.run", "stages.jail.escape"],
        "api/kernel.html": ["stages.kernel.pivot_root", "stages.kernel.unshare"],
        "api/steps.html": ["stages.steps.StepRecord"],
        "api/errors.html": ["stages.errors.StagesError"],
        "api/observe.html": ["stages.observe.mounts"],
        "api/diagrams.html": ["stages.diagrams.namespaces", "stages.diagrams.network"],
        "api/rootfs.html": ["stages.rootfs.build"],
        "api/doctor.html": ["stages.doctor.checks"],
        "api/tour.html": ["stages.tour.Finding", "stages.tour.side_by_side"],
        "api/isolate.html": ["stages.isolate.isolate.Isolate", "stages.isolate.cgroups.Cgroup"],
    }
    for page, names in expected.items():
        html = (site / page).read_text()
        for name in names:
            assert f'id="{name}"' in html, f"{page} does not document {name}"
    # Every module of stages.isolate and stages.runtime is there, found on disk (a new one joins by itself).
    for package in ("isolate", "runtime"):
        page = site / "api" / f"{package}.html"
        for source in sorted((REPO / "stages" / package).rglob("*.py")):
            parts = source.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if any(part.startswith("_") for part in parts):
                continue
            module = ".".join(parts)
            assert f'id="module-{module}"' in page.read_text(), f"the API reference lacks {module}"


CHROMIUM = "/usr/bin/chromium"


def _browser_missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing: apt-get install chromium"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -e '.[test]'"
    return None


@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_widgets_render_in_a_browser_without_network(site):
    """Debian's chromium opens each page with widgets, every request that is not a file refused and
    recorded: the widgets render from the build alone, and the page asks for nothing outside."""
    from playwright.sync_api import sync_playwright

    with_widgets = [n for n in NOTEBOOKS if "ipywidgets" in n.read_text()]
    if not with_widgets:
        pytest.skip("no notebook uses ipywidgets")
    outside: list[str] = []

    def refuse_outside(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page()
            page.route("**/*", refuse_outside)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            for notebook in with_widgets:
                # As built, the page holds only <script> tags with the widgets' JSON; embed.js makes them.
                assert "lm-Widget" not in _page(site, notebook).read_text()
                page.goto(_page(site, notebook).as_uri())
                # a rendered view is an .lm-Widget in its output's subarea (a RadioButtons' view has no
                # "jupyter-widgets" class when rendered without a kernel: "jupyter-widgets-disconnected")
                page.wait_for_selector(".widget-subarea > .lm-Widget", timeout=15_000)
                views = page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
                rendered = page.locator(".widget-subarea > .lm-Widget").count()
                assert rendered == views, f"{notebook.name}: {rendered} of {views} widgets rendered"
        finally:
            browser.close()
    assert not outside, f"the pages asked for {outside}"
    assert not errors, f"JavaScript errors: {errors}"
