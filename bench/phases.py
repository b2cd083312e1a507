"""Where the time of one ``stages run --rm --network none busybox true`` goes, phase by phase.

``make bench`` compares the whole command with runc; this says what the whole is made of, so that a
change can be measured where it acts (issue #4). Two tables, medians of N runs (``BENCH_RUNS``,
default 20), each run a fresh process where that matters:

1. **start-up**: an empty Python (``-I -S``), the virtualenv's Python (its site, with the editable
   install's finder), the standard library modules the run path imports, our modules on top, and the
   whole command;
2. **phases**: the engine's and the runtime's steps of one run, timed in-process (a wrapper around each
   function; the calls nest, so the rows do not add up).

Run as root: ``.venv/bin/python bench/phases.py``. Everything lives in one temporary directory below
/var/tmp, removed at the end (also after Ctrl-C).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
PYTHON = str(HERE / ".venv" / "bin" / "python")
RUN = ["run", "--rm", "--network", "none", "busybox", "true"]
#: Our modules of the run path (what `python -c` imports for the "our modules" row).
OURS = ("stages.cli", "stages.commands.run", "stages.runtime.engine", "stages.runtime.images",
        "stages.runtime.oci.container", "stages.runtime.oci.process", "stages.isolate.cgroups")
#: (module, function) pairs timed in the phases table, in the order a run reaches them.
PHASES = [
    ("stages.runtime.engine", "prepare"), ("stages.runtime.engine", "find_image"),
    ("stages.runtime.containers", "reserve"), ("stages.runtime.engine", "execute"),
    ("stages.runtime.overlay", "mount"), ("stages.runtime.overlay", "init_program"),
    ("stages.runtime.flags", "build_config"), ("stages.runtime.oci.spec", "write_bundle"),
    ("stages.runtime.oci.container", "create"), ("stages.runtime.oci.container", "start"),
    ("stages.runtime.oci.container", "wait"), ("stages.runtime.engine", "_finish"),
    ("stages.runtime.oci.container", "delete"), ("stages.runtime.overlay", "unmount"),
    ("stages.runtime.engine", "remove"), ("stages.runtime.overlay", "remove_tree"),
    ("stages.runtime.containers", "write"),
]


def timed_runs(argv: list[str], runs: int, env: dict) -> list[float]:
    """Wall time in ms of ``argv`` run ``runs`` times (after one warm-up)."""
    times = []
    for index in range(runs + 1):
        start = time.perf_counter_ns()
        subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
        if index:
            times.append((time.perf_counter_ns() - start) / 1e6)
    return times


def stdlib_modules(env: dict) -> list[str]:
    """The top-level standard library modules a run has imported at its end."""
    probe = ("import json, sys\nfrom stages.cli import main\n"
             f"main({RUN!r})\n"
             "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([PYTHON, "-c", probe], env=env, capture_output=True, text=True, check=True)
    names = json.loads(out.stdout.splitlines()[-1])
    stdlib = set(sys.stdlib_module_names)
    return sorted({name.split(".")[0] for name in names} & stdlib - {"sys", "builtins"})


def startup_table(runs: int, env: dict) -> list[tuple[str, float, float]]:
    modules = ",".join(stdlib_modules(env))
    rows = [("python -I -S -c pass (the interpreter alone)", [PYTHON, "-I", "-S", "-c", "pass"]),
            ("python -c pass (+ the venv's site, editable finder)", [PYTHON, "-c", "pass"]),
            ("+ the stdlib modules a run imports", [PYTHON, "-c", f"import {modules}"]),
            ("+ our modules of the run path", [PYTHON, "-c", f"import {modules}, {', '.join(OURS)}"]),
            ("stages run --rm --network none busybox true", [PYTHON, "-m", "stages.cli", *RUN])]
    result = []
    for label, argv in rows:
        times = timed_runs(argv, runs, env)
        result.append((label, statistics.median(times), min(times)))
    return result


def phases_table(runs: int) -> list[tuple[str, float, float, float]]:
    """Each phase's median and minimum per call and its calls per run, from ``runs`` in-process runs."""
    import importlib

    from stages.cli import main

    times: dict[str, list[float]] = {}

    def wrap(module_name: str, name: str) -> None:
        module = importlib.import_module(module_name)
        original = getattr(module, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def timer(*args, **kwargs):
            start = time.perf_counter_ns()
            try:
                return original(*args, **kwargs)
            finally:
                times.setdefault(f"{module_name.rpartition('.')[2]}.{name}", []).append(
                    (time.perf_counter_ns() - start) / 1e6)

        setattr(module, name, timer)
        # the engine calls the runtime through the package (oci.create): wrap that name too
        package = importlib.import_module("stages.runtime.oci")
        if module_name.startswith("stages.runtime.oci.") and name in getattr(package, "__all__", ()):
            setattr(package, name, timer)

    for module_name, name in PHASES:
        wrap(module_name, name)
    whole = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        code = main(list(RUN))
        whole.append((time.perf_counter_ns() - start) / 1e6)
        assert code == 0, f"stages run exited with {code}"
    rows = [("stages.cli.main (the whole run, imports done)", statistics.median(whole), min(whole), 1.0)]
    for label, values in times.items():
        rows.append((label, statistics.median(values), min(values), len(values) / runs))
    return rows


def main() -> int:
    if os.geteuid() != 0:
        print("phases: this needs root (containers); try: sudo .venv/bin/python bench/phases.py",
              file=sys.stderr)
        return 1
    runs = int(os.environ.get("BENCH_RUNS", "20"))
    tmp = Path(tempfile.mkdtemp(prefix="stages-phases-", dir="/var/tmp"))
    os.environ.update(STAGES_HOME=str(tmp / "home"), STAGES_RUN=str(tmp / "run"))
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # bytecode written as a learner's first run does (bench/run.py)
    try:
        # the bytecode a learner's first run writes (see bench/run.py), the image and the init
        subprocess.run([PYTHON, "-m", "compileall", "-q", str(HERE / "stages")], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([PYTHON, "-m", "stages.cli", *RUN], env=env, check=True)
        print(f"start-up, ms ({runs} runs each, fresh processes)")
        print(f"{'':52} {'median':>8} {'min':>8}")
        for label, median, least in startup_table(runs, env):
            print(f"{label:52} {median:8.1f} {least:8.1f}")
        print(f"\nphases of one run, in-process, ms per call ({runs} runs; nested, so they do not add up)")
        print(f"{'':52} {'median':>8} {'min':>8} {'calls':>6}")
        for label, median, least, calls in phases_table(runs):
            print(f"{label:52} {median:8.2f} {least:8.2f} {calls:6.1f}")
    except KeyboardInterrupt:
        print("phases: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        subprocess.run([PYTHON, "-m", "stages.cli", "prune"], env=env, capture_output=True)
        with open("/proc/self/mountinfo") as handle:
            left = [line.split()[4] for line in handle if line.split()[4].startswith(f"{tmp}/")]
        for point in sorted(left, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
