"""``pip install`` gives a working stages (issue #18): the wheel and the sdist, installed as a teacher would.

The source tree (its git files, as they are now) is copied away and built with ``python -m build``: an
sdist, then a wheel built from that sdist. Each is installed with pip, a regular (non-editable) install,
into a fresh virtualenv, and stages is run from there, from a directory outside the source tree, so that
nothing of the tree can be imported: a stage 1 jail, a stage 2 isolate, a stage 3 container.

Offline, and provably so: every build and install runs in a network namespace of its own with nothing but
a loopback device (``unshare --net``), so a download would fail rather than happen. pip gets
``--no-index --find-links`` a directory of the dependencies' wheels, which this test packs from the
distributions already installed in the test's own environment (psutil, dockerfile-parse, pyroute2, and
setuptools for the sdist's isolated build); its configuration files are switched off
(PIP_CONFIG_FILE=/dev/null).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.slow]

SOURCE = Path(__file__).resolve().parent.parent
MISSING_INIT = "the container init (stages/runtime/init.c) is not installed: reinstall stages"


def offline(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``argv`` in a new network namespace (only lo, down): nothing it runs can reach a network."""
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           **kwargs.pop("env", {})}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["unshare", "--net", "--", *argv], capture_output=True, text=True, env=env,
                            timeout=kwargs.pop("timeout", 300), stdin=subprocess.DEVNULL, **kwargs)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
    return result


# == building ======================================================================================
#: What a tree that is not a git checkout (a `git archive`, an unpacked sdist) holds besides its sources.
NOT_SOURCES = {".git", ".venv", "__pycache__", "build", "dist", "artifacts", "_build", ".pytest_cache",
               ".ruff_cache"}


def source_files() -> list[str]:
    """The tree's files, relative: git's (tracked and untracked, not ignored) in a checkout; elsewhere
    every file but the virtualenv's, the caches' and the build's."""
    if shutil.which("git") and (SOURCE / ".git").exists():
        listed = subprocess.run(["git", "-C", str(SOURCE), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True).stdout
        return [name for name in listed.decode().split("\0") if name]
    found = []
    for top, directories, files in os.walk(SOURCE):
        directories[:] = [d for d in directories if d not in NOT_SOURCES and not d.endswith(".egg-info")]
        found += [os.path.relpath(os.path.join(top, name), SOURCE) for name in files]
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel of the source tree as it is now (its git files, uncommitted changes too)."""
    top = tmp_path_factory.mktemp("packaging")
    copy = top / "source"
    for name in source_files():
        if (SOURCE / name).is_file():  # a file deleted but not yet committed is still listed
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(SOURCE / name, copy / name)
    # python -m build: the sdist, then the wheel from the unpacked sdist (so the sdist must be complete);
    # --no-isolation: with this environment's setuptools, not one downloaded into a fresh build env.
    offline([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(top / "dist"), str(copy)])
    wheel, = (top / "dist").glob("*.whl")
    sdist, = (top / "dist").glob("*.tar.gz")
    return {"top": top, "wheel": wheel, "sdist": sdist, "source": copy}


def test_the_wheel_carries_every_file_of_the_package_and_the_prebuilt_init(built):
    wheel = zipfile.ZipFile(built["wheel"])
    names = set(wheel.namelist())
    package = {str(path.relative_to(built["source"])) for path in (built["source"] / "stages").rglob("*")
               if path.is_file() and "__pycache__" not in path.parts}
    assert "stages/runtime/init.c" in package
    assert package <= names, sorted(package - names)
    # The init, compiled static when the wheel was built, executable once installed (zip keeps the mode).
    info = wheel.getinfo("stages/runtime/stages-init")
    assert (info.external_attr >> 16) & 0o111
    assert wheel.read("stages/runtime/stages-init")[:4] == b"\x7fELF"
    # A program for one platform in it: the wheel says which, and that any Python 3 will do.
    tag = f"py3-none-linux_{platform.machine()}"
    assert built["wheel"].name == f"stages-0.1.0-{tag}.whl"
    wheel_file = wheel.read("stages-0.1.0.dist-info/WHEEL").decode()
    assert f"Tag: {tag}" in wheel_file and "Root-Is-Purelib: false" in wheel_file
    # requires-python and the classifiers say the same versions.
    meta = wheel.read("stages-0.1.0.dist-info/METADATA").decode()
    assert "Requires-Python: >=3.10" in meta
    versions = re.findall(r"Classifier: Programming Language :: Python :: (3\.\d+)", meta)
    assert versions == ["3.10", "3.11", "3.12", "3.13"]


def test_the_sdist_can_build_the_package_again(built):
    with tarfile.open(built["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for needed in ("pyproject.toml", "setup.py", "README.md", "stages/runtime/init.c", "stages/cli.py"):
        assert needed in names, needed
    assert not any(name.endswith("stages-init") for name in names)  # built per platform, never shipped


# == installing ====================================================================================
def pack_installed(name: str, directory: Path) -> Path:
    """A wheel of the distribution ``name`` as it is installed here (its files and dist-info, RECORD
    written anew): pip can then install it with --no-index, offline."""
    distribution = metadata.distribution(name)
    root = Path(distribution.locate_file(""))
    info_dir = next(str(f).split("/")[0] for f in distribution.files
                    if str(f).endswith(".dist-info/METADATA"))
    # The file name's compressed tag set (PEP 425): each part's values joined with dots, py2.py3-none-any.
    tags = re.findall(r"^Tag: (\S+)$", (root / info_dir / "WHEEL").read_text(), re.M)
    tag = "-".join(".".join(dict.fromkeys(parts)) for parts in zip(*(t.split("-") for t in tags)))
    normalized = re.sub(r"[-_.]+", "_", distribution.metadata["Name"]).lower()
    path = directory / f"{normalized}-{distribution.version}-{tag}.whl"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in distribution.files:
            relative = str(file)
            if relative.startswith("..") or "__pycache__" in relative or relative.endswith(".pyc"):
                continue  # scripts in bin/ (pip writes them again) and bytecode
            if relative.startswith(info_dir + "/") and relative.split("/")[1] in (
                    "RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                continue
            data = (root / relative).read_bytes()
            archive.writestr(relative, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow([relative, f"sha256={digest}", len(data)])
        writer.writerow([f"{info_dir}/RECORD", "", ""])
        archive.writestr(f"{info_dir}/RECORD", record.getvalue())
    return path


@pytest.fixture(scope="module")
def dependencies(built) -> Path:
    directory = built["top"] / "dependencies"
    directory.mkdir()
    for name in ("psutil", "dockerfile-parse", "pyroute2", "setuptools"):
        pack_installed(name, directory)
    return directory


def new_venv(path: Path, install: Path, dependencies: Path) -> Path:
    """A fresh virtualenv (no system site-packages) with ``install`` pip-installed into it, regularly."""
    offline([sys.executable, "-m", "venv", "--without-pip", str(path)])
    # This environment's pip, installing into the new one (pip --python): no pip is bootstrapped there.
    offline([sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install", "-q",
             "--no-index", "--find-links", str(dependencies), str(install)])
    return path


@pytest.fixture(scope="module")
def wheel_venv(built, dependencies) -> Path:
    return new_venv(built["top"] / "venv-wheel", built["wheel"], dependencies)


@pytest.fixture(scope="module")
def sdist_venv(built, dependencies) -> Path:
    return new_venv(built["top"] / "venv-sdist", built["sdist"], dependencies)


def stages(venv: Path, *argv: str, home: Path, path: str | None = None,
           expect: int | None = 0) -> subprocess.CompletedProcess:
    """The installed ``stages`` command, run from a directory that holds no stages source."""
    env = {**os.environ, "STAGES_HOME": str(home), "STAGES_RUN": str(home / "run")}
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "STAGES_HOST_NETNS"):
        env.pop(name, None)
    if path is not None:
        env["PATH"] = path
    result = subprocess.run([str(venv / "bin" / "stages"), *argv], capture_output=True, text=True, env=env,
                            cwd=home, timeout=120, stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr, result.stderr
    if expect is not None:
        assert result.returncode == expect, f"stages {' '.join(argv)}: {result.stdout}\n{result.stderr}"
    return result


def installed_package(venv: Path) -> Path:
    """Where the venv's python imports stages from, asked from outside the source tree."""
    result = subprocess.run([str(venv / "bin" / "python"), "-c", "import stages; print(stages.__file__)"],
                            capture_output=True, text=True, cwd="/", check=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return Path(result.stdout.strip()).parent


def doctor_init(venv: Path, home: Path, path: str | None = None) -> dict:
    result = stages(venv, "doctor", "--json", home=home, path=path, expect=None)
    return next(check for check in json.loads(result.stdout) if check["name"] == "container init")


def run_each_stage(venv: Path, home: Path) -> None:
    package = installed_package(venv)
    assert package.is_relative_to(venv) and not package.is_relative_to(SOURCE), package
    # Stage 1: a chroot jail into the embedded busybox rootfs; the host's /work/main is not there.
    jail = stages(venv, "jail", "default", "--", "sh", "-c", f"test -d {SOURCE} && echo host || echo jailed",
                  home=home)
    assert jail.stdout.split() == ["jailed"], jail.stdout
    # Stage 2: an isolate with its own UTS and PID namespaces: its hostname, and PIDs counted from 1 (the
    # isolate's holder is PID 1, the command its child).
    isolate = stages(venv, "isolate", "default", "--namespaces", "uts,pid,mount", "--hostname", "packaged",
                     "--", "sh", "-c", "hostname; echo $$", home=home)
    assert isolate.stdout.split() == ["packaged", "2"], isolate.stdout
    assert os.uname().nodename != "packaged"
    # Stage 3: a container; its PID 1 is the init the package brought, running the command.
    container = stages(venv, "run", "--rm", "--network", "none", "busybox", "cat", "/proc/1/cmdline",
                       home=home)
    assert container.stdout.split("\0")[:3] == ["/dev/.stages-init", "--", "cat"], container.stdout


def test_a_wheel_installed_with_pip_runs_all_three_stages(wheel_venv, tmp_path):
    run_each_stage(wheel_venv, tmp_path)
    check = doctor_init(wheel_venv, tmp_path)
    assert check["ok"] and "prebuilt" in check["detail"]
    assert str(installed_package(wheel_venv) / "runtime" / "stages-init") in check["detail"]


def test_an_sdist_installed_with_pip_runs_all_three_stages(sdist_venv, tmp_path):
    run_each_stage(sdist_venv, tmp_path)
    # pip built a wheel from the sdist where a compiler is: the init was prebuilt there too.
    assert os.access(installed_package(sdist_venv) / "runtime" / "stages-init", os.X_OK)


def test_without_a_compiler_stage_3_runs_with_the_prebuilt_init_then_without_one(built, dependencies,
                                                                                 tmp_path):
    venv = new_venv(tmp_path / "venv", built["wheel"], dependencies)
    runtime = installed_package(venv) / "runtime"
    path = str(venv / "bin")  # PATH: the venv's scripts only, no cc, no gcc
    assert shutil.which("cc", path=path) is None and shutil.which("gcc", path=path) is None
    home = tmp_path / "home"
    home.mkdir()
    command = ("run", "--rm", "--network", "none", "busybox", "cat", "/proc/1/cmdline")

    # The wheel's prebuilt init: nothing to compile.
    ran = stages(venv, *command, home=home, path=path)
    assert ran.stdout.split("\0")[:2] == ["/dev/.stages-init", "--"]
    assert doctor_init(venv, home, path)["ok"]
    assert not (home / "init").exists()  # no compiled copy was made

    # No prebuilt init either: the command is PID 1 itself, said once, and the doctor says what it costs.
    (runtime / "stages-init").unlink()
    first = stages(venv, *command, home=home, path=path)
    assert first.stdout.split("\0")[0] == "cat"
    assert "running containers without an init" in first.stderr and "zombies" in first.stderr
    again = stages(venv, *command, home=home, path=path)
    assert again.stdout.split("\0")[0] == "cat" and "without an init" not in again.stderr
    check = doctor_init(venv, home, path)
    assert not check["ok"] and not check["required"]
    assert check["detail"].startswith("none: no prebuilt init and no C compiler")
    assert "zombies" in check["detail"]
    assert "gcc libc6-dev" in check["fix"]

    # With a compiler back on PATH, the first run compiles init.c: PID 1 is the init again.
    compiled = stages(venv, *command, home=home)
    assert compiled.stdout.split("\0")[:2] == ["/dev/.stages-init", "--"]

    # A broken install (init.c gone too, and no cached copy): the error names what is missing and the fix.
    shutil.rmtree(home / "init")
    (runtime / "init.c").unlink()
    broken = stages(venv, "run", "--rm", "--network", "none", "busybox", "true", home=home, expect=1)
    assert MISSING_INIT in broken.stderr and "hint:" in broken.stderr
    assert "No such file or directory" not in broken.stderr
    check = doctor_init(venv, home)
    assert not check["ok"] and check["required"] and MISSING_INIT in check["detail"]
    # --no-init needs no init at all.
    stages(venv, "run", "--rm", "--network", "none", "--no-init", "busybox", "true", home=home)
    assert stages(venv, "ps", "-a", "-q", home=home).stdout.strip() == ""
