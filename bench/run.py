"""``make bench``: how long stage 3 takes to run ``true`` in a container, next to runc, crun and unshare.

Each tool runs ``true`` in a busybox rootfs from start to exit, N times (``BENCH_RUNS``, default 30), the
tools alternating run by run (A B C D A B C D ...) after a few warm-up runs, and the table gives the
median, p90 and min in milliseconds and each median's ratio to runc's and to ours.

Then two comparisons with runc, when ``.venv/bin/stages-oci`` is installed: the OCI operations ``create``,
``start`` and ``delete`` of one unedited ``runc spec`` bundle, each timed on its own, with ``stages-oci`` and
with runc (the bench is the subreaper that collects each container's exit, as conmon is); and ``podman run
--rm`` with each of them as podman's runtime (when podman is installed), with podman's state in the same
temporary directory.

Everything lives in one temporary directory (STAGES_HOME, STAGES_RUN, the OCI bundle, the runc and crun
state roots); it is removed at the end, also on Ctrl-C, and the bench then checks that no container,
mount or cgroup of it is left. Run as root: ``make bench`` (or ``.venv/bin/python bench/run.py``).
"""

from __future__ import annotations

import contextlib
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
VENV_PYTHON = HERE / ".venv" / "bin" / "python"
STAGES = HERE / ".venv" / "bin" / "stages"
STAGES_OCI = HERE / ".venv" / "bin" / "stages-oci"
# podman with all its state in the bench's directory, set up as tests/test_podman.py sets it up
sys.path.insert(0, str(HERE / "tests"))
from podman_sandbox import sandbox, write_runc_wrapper  # noqa: E402

PODMAN_IMAGE = "localhost/stages-bench-busybox"
# no hard rlimit may be raised without CAP_SYS_RESOURCE (setrlimit(2)); podman's defaults are higher
PODMAN_RUN = ["run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024",
              "--ulimit", "nproc=32768:32768"]
PREFIX = "stages-bench-"
WARMUP = 3


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- what the bench needs ---------------------------------------------------------------------------
def install() -> None:
    """The venv (``workshop.sh setup``) and runc, crun, podman, conmon from Debian when they are missing."""
    if not VENV_PYTHON.exists() or not STAGES.exists():
        say("setting up the virtualenv: bash workshop.sh setup")
        subprocess.run(["bash", str(HERE / "workshop.sh"), "setup"], check=True)
    missing = [name for name in ("runc", "crun", "podman", "conmon") if shutil.which(name) is None]
    if missing:
        say(f"installing {' '.join(missing)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env,
                       stdout=subprocess.DEVNULL)


def version(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "?"
    return out.splitlines()[0].strip() if out else "?"


# -- the setups -----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, runs: int):
        self.runs = runs
        self.tmp = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/var/tmp"))
        self.home = self.tmp / "home"
        self.run_dir = self.tmp / "run"
        self.bundle = self.tmp / "bundle"
        self.rootfs = self.bundle / "rootfs"
        self.ours_bundle = self.tmp / "bundle-oci-run"
        self.runc_root = self.tmp / "runc-state"
        self.crun_root = self.tmp / "crun-state"
        self.oci_root = self.tmp / "oci-state"
        self.cli_root = self.tmp / "stages-oci-state"
        self.podman_dir = self.tmp / "podman"
        self.podman_command: list[str] = []
        self.podman_env: dict[str, str] = {}
        self.counter = 0
        self.env = dict(os.environ, STAGES_HOME=str(self.home), STAGES_RUN=str(self.run_dir))
        # Our commands write their bytecode as a learner's do: a module changed during the bench is compiled
        # once, not at every run (see prepare)
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        # the library path runs in this process: it reads the same variables
        os.environ["STAGES_HOME"] = str(self.home)
        os.environ["STAGES_RUN"] = str(self.run_dir)
        self.notes: list[str] = []
        self.devnull = os.open(os.devnull, os.O_RDONLY)

    def next_id(self, tool: str) -> str:
        self.counter += 1
        return f"{PREFIX}{tool}-{self.counter}"

    def prepare(self) -> None:
        for directory in (self.home, self.run_dir, self.runc_root, self.crun_root, self.oci_root,
                          self.cli_root):
            directory.mkdir(parents=True)
        # A learner's `stages` loads the bytecode its first run wrote (__pycache__). Write it now: with
        # PYTHONDONTWRITEBYTECODE set (CI, some sandboxes) every run would compile every module again,
        # and that, not the containers, is what the bench would time.
        subprocess.run([str(VENV_PYTHON), "-m", "compileall", "-q", str(HERE / "stages")], check=True,
                       stdout=subprocess.DEVNULL)
        say(f"building the busybox rootfs: stages rootfs build {self.rootfs}")
        self.bundle.mkdir()
        subprocess.run([str(STAGES), "rootfs", "build", str(self.rootfs)], check=True, env=self.env,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["runc", "spec", "--bundle", str(self.bundle)], check=True)
        config_path = self.bundle / "config.json"
        config = json.loads(config_path.read_text())
        config["root"]["path"] = str(self.rootfs)
        config["process"]["args"] = ["true"]
        config["process"]["terminal"] = False
        # runc spec's namespaces: pid, network, ipc, uts, mount, as stages run's (no user, no cgroup)
        config_path.write_text(json.dumps(config, indent=2))
        # Our runtime refuses linux.resources.devices (it sets no devices cgroup): oci.run gets a copy of
        # the same config.json without it, on the same rootfs.
        # Nor does it mount a cgroup v1 tree (runc makes a tmpfs with one mount per controller there).
        config["mounts"] = [m for m in config["mounts"] if m["destination"] != "/sys/fs/cgroup"]
        config["linux"].get("resources", {}).pop("devices", None)
        # runc spec lists ambient capabilities without inheritable ones: raising them fails (EPERM,
        # capabilities(7)); runc goes on without them, our runtime stops. Leave them out.
        config["process"]["capabilities"].pop("ambient", None)
        if not config["linux"].get("resources"):
            config["linux"].pop("resources", None)
        self.ours_bundle.mkdir()
        (self.ours_bundle / "config.json").write_text(json.dumps(config, indent=2))

    # each returns the command's exit status; the timer is around the call
    def stages_cli(self) -> int:
        return subprocess.run([str(STAGES), "run", "--rm", "--network", "none", "busybox", "true"],
                              env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode

    def runc(self) -> int:
        return subprocess.run(["runc", "--root", str(self.runc_root), "run", "--bundle", str(self.bundle),
                               self.next_id("runc")], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL).returncode

    def crun(self) -> int:
        return subprocess.run(["crun", "--root", str(self.crun_root), "run", "--bundle", str(self.bundle),
                               self.next_id("crun")], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode

    def unshare(self) -> int:
        return subprocess.run(["unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "--net",
                               "--mount-proc", "-R", str(self.rootfs), "/bin/true"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).returncode

    def library(self) -> int:
        from stages.runtime import oci

        code = oci.run(self.next_id("lib"), str(self.ours_bundle), root=str(self.oci_root),
                       stdio=(self.devnull, None, None))
        return code if code is not None else 0

    # -- create, start, delete on their own: the bench is the subreaper, as conmon is ---------------------
    def lifecycle(self, tool: str) -> tuple[float, float, float]:
        """One container of the runc spec bundle through ``tool``'s create, start and delete: the time of
        each, in ms. Between start and delete the bench collects the container's exit (untimed): the
        runtime's create has left the init to its nearest subreaper, which is this process."""
        command = ["runc", "--root", str(self.runc_root)] if tool == "runc" else \
            [str(STAGES_OCI), "--root", str(self.cli_root)]
        name = self.next_id(tool)
        pid_file = self.tmp / f"{name}.pid"
        said = self.tmp / f"{name}.err"
        times = []
        for step in (["create", "--bundle", str(self.bundle), "--pid-file", str(pid_file), name],
                     ["start", name], ["delete", name]):
            if step[0] == "delete":
                reap(int(pid_file.read_text()))
            # With terminal false the container keeps the runtime's stdio: a file, never a pipe, which
            # would stay open (and keep us waiting) for as long as the container lives.
            with open(said, "w") as errors:
                start = time.perf_counter_ns()
                result = subprocess.run([*command, *step], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=errors)
                times.append((time.perf_counter_ns() - start) / 1e6)
            if result.returncode != 0:
                raise SystemExit(f"bench: {tool} {step[0]} exited with {result.returncode}: "
                                 f"{said.read_text().strip()}")
        pid_file.unlink()
        said.unlink()
        reap_orphans()
        return times[0], times[1], times[2]

    # -- podman run --rm, with stages-oci or runc as its runtime ---------------------------------------------
    def prepare_podman(self) -> None:
        """podman with all its state below the bench's directory, the configuration of
        tests/test_podman.py (vfs storage, file locks and events, cgroups = "disabled"), and the busybox
        rootfs imported as an image."""
        base = self.podman_dir
        base.mkdir(parents=True, exist_ok=True)
        wrapper = write_runc_wrapper(base / "runc-wrapper")
        self.podman_command, self.podman_env = sandbox(base, [str(STAGES_OCI), wrapper])
        archive = base / "busybox.tar"
        subprocess.run(["tar", "-C", str(self.rootfs), "-cf", str(archive), "."], check=True)
        subprocess.run([*self.podman_command, "import", str(archive), PODMAN_IMAGE], env=self.podman_env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def podman_run(self, runtime: str) -> int:
        path = str(self.podman_dir / "runc-wrapper") if runtime == "runc" else str(STAGES_OCI)
        return subprocess.run([*self.podman_command, "--runtime", path, *PODMAN_RUN, PODMAN_IMAGE, "true"],
                              env=self.podman_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode

    def check_crun(self) -> str | None:
        """None when crun runs the bundle; else the first line of its error."""
        result = subprocess.run(["crun", "--root", str(self.crun_root), "run", "--bundle", str(self.bundle),
                                 self.next_id("crun")], stdin=subprocess.DEVNULL, capture_output=True,
                                text=True)
        if result.returncode == 0:
            return None
        lines = (result.stderr or result.stdout or f"exit status {result.returncode}").strip().splitlines()
        return lines[0] if lines else f"exit status {result.returncode}"

    # -- clean-up -------------------------------------------------------------------------------------
    def cleanup(self) -> list[str]:
        """Remove every container, mount, cgroup and file of the bench; returns what was still there."""
        left = []
        if self.podman_command and (self.podman_dir / "root").exists():
            listing = subprocess.run([*self.podman_command, "ps", "-a", "-q"], capture_output=True, text=True,
                                     env=self.podman_env)
            for name in listing.stdout.split():
                left.append(f"podman container {name}")
                subprocess.run([*self.podman_command, "rm", "--force", "--time", "0", name],
                               capture_output=True, env=self.podman_env)
        for tool, root in (("runc", self.runc_root), ("crun", self.crun_root),
                           (str(STAGES_OCI), self.cli_root)):
            if shutil.which(tool) is None or not root.exists():
                continue
            listing = subprocess.run([tool, "--root", str(root), "list", "-q"], capture_output=True,
                                     text=True)
            for name in listing.stdout.split():
                left.append(f"{tool} container {name}")
                subprocess.run([tool, "--root", str(root), "delete", "--force", name], capture_output=True)
        with contextlib.suppress(Exception):
            from stages.runtime import oci

            for item in oci.list_containers(str(self.oci_root)):
                left.append(f"library container {item['id']}")
                oci.delete(item["id"], force=True, root=str(self.oci_root))
        if STAGES.exists() and self.home.exists():
            listing = subprocess.run([str(STAGES), "ps", "-a", "-q"], capture_output=True, text=True,
                                     env=self.env)
            for name in listing.stdout.split():
                left.append(f"stages container {name}")
                subprocess.run([str(STAGES), "rm", "-f", name], capture_output=True, env=self.env)
        for mount in reversed(mounts_under(self.tmp)):
            left.append(f"mount {mount}")
            subprocess.run(["umount", "-l", mount], capture_output=True)
        for directory in cgroups_named(PREFIX):
            left.append(f"cgroup {directory}")
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        with contextlib.suppress(OSError):
            os.close(self.devnull)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return left


def reap(pid: int) -> None:
    """Wait for a container's init to end: collect it when it is our child (we are its subreaper), else
    watch /proc until it is gone (a runtime that keeps it as its own child)."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.001)


def reap_orphans() -> None:
    """Collect the runtimes' helper processes that ended after their parent did: as a subreaper we
    inherit them (runc's intermediate processes), and nobody else will wait for them."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass


def mounts_under(path: Path) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(f"{path}/"):
                found.append(point)
    return found


def cgroups_named(prefix: str) -> list[str]:
    """Cgroup directories whose name starts with ``prefix`` (runc's, crun's: named after the container ID;
    ours: stages-ID), deepest first."""
    found = []
    for top, directories, _ in os.walk("/sys/fs/cgroup"):
        for name in directories:
            if name.startswith(prefix) or name.startswith(f"stages-{prefix}"):
                found.append(os.path.join(top, name))
    return sorted(found, key=lambda item: -item.count("/"))


# -- the numbers ----------------------------------------------------------------------------------------
def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def table(results: dict[str, list[float]], labels: dict[str, str]) -> str:
    medians = {name: statistics.median(times) for name, times in results.items() if times}
    runc = medians.get("runc")
    ours = medians.get("stages run")
    rows = [f"{'tool':<28} {'median':>8} {'p90':>8} {'min':>8} {'x runc':>7} {'x ours':>7}  runs"]
    for name, times in results.items():
        if not times:
            continue
        median = medians[name]
        rows.append(f"{labels[name]:<28} {median:8.1f} {percentile(times, 0.9):8.1f} {min(times):8.1f} "
                    f"{median / runc if runc else float('nan'):7.2f} "
                    f"{median / ours if ours else float('nan'):7.2f}  {len(times)}")
    return "\n".join(rows)


def ratio_table(results: dict[str, dict[str, list[float]]], tools: list[str]) -> str:
    """One row per operation: each tool's median, and the ratio of the last tool's to the first's."""
    first, last = tools[0], tools[-1]
    header = " ".join(f"{tool:>12}" for tool in tools)
    rows = [f"{'operation':<24} {header} {last + ' / ' + first:>20}"]
    for operation, by_tool in results.items():
        medians = {tool: statistics.median(by_tool[tool]) for tool in tools}
        rows.append(f"{operation:<24} " + " ".join(f"{medians[tool]:12.1f}" for tool in tools)
                    + f" {medians[last] / medians[first]:20.2f}")
    return "\n".join(rows)


def compare_with_runc(bench: Bench, runs: int) -> None:
    """create/start/delete, then podman run --rm: stages-oci against runc, alternating, medians in ms."""
    if not STAGES_OCI.exists():
        print(f"\n{STAGES_OCI} is not installed: no stages-oci comparison (pip install -e .)")
        return
    from stages import kernel

    # Like conmon: each container's init is reparented to us when its runtime's create returns (prctl(2)).
    kernel.prctl(kernel.PR_SET_CHILD_SUBREAPER, 1)
    tools = ["runc", "stages-oci"]
    operations: dict[str, dict[str, list[float]]] = {
        op: {tool: [] for tool in tools} for op in ("create", "start", "delete", "create+start+delete")}
    say(f"create, start, delete: {WARMUP} warm-up and {runs} runs each of runc and stages-oci, alternating")
    for index in range(WARMUP + runs):
        for tool in tools:
            create, start, delete = bench.lifecycle(tool)
            if index < WARMUP:
                continue
            for op, value in (("create", create), ("start", start), ("delete", delete),
                              ("create+start+delete", create + start + delete)):
                operations[op][tool].append(value)
    print()
    print(f"OCI operations on one `runc spec` bundle (`true`), ms, median of {runs} runs each, alternating")
    print(ratio_table(operations, tools))
    if shutil.which("podman") is None or shutil.which("conmon") is None:
        print("\npodman or conmon is not installed: no podman comparison")
        return
    bench.prepare_podman()
    podman: dict[str, dict[str, list[float]]] = {"podman run --rm true": {tool: [] for tool in tools}}
    say(f"podman run --rm: {WARMUP} warm-up and {runs} runs each with runc and stages-oci, alternating")
    for index in range(WARMUP + runs):
        for tool in tools:
            start = time.perf_counter_ns()
            code = bench.podman_run(tool)
            elapsed = (time.perf_counter_ns() - start) / 1e6
            if code != 0:
                raise SystemExit(f"bench: podman run with {tool} exited with {code}")
            if index >= WARMUP:
                podman["podman run --rm true"][tool].append(elapsed)
    print()
    print(f"podman run --rm --network none busybox true, ms, median of {runs} runs each, alternating "
          f"({version(['podman', '--version'])}, {version(['conmon', '--version'])})")
    print(ratio_table(podman, tools))


def main() -> int:
    if os.geteuid() != 0:
        print("bench: this needs root (containers); try: sudo make bench", file=sys.stderr)
        return 1
    runs = int(os.environ.get("BENCH_RUNS", "30"))
    install()
    if Path(sys.prefix) != HERE / ".venv" and os.environ.get("STAGES_BENCH_REEXEC") != "1":
        # the library path imports stages: run again with the venv's interpreter
        os.environ["STAGES_BENCH_REEXEC"] = "1"
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])
    bench = Bench(runs)
    interrupted = False
    try:
        bench.prepare()
        tools = {"stages run": bench.stages_cli, "runc": bench.runc, "crun": bench.crun,
                 "unshare": bench.unshare, "oci.run (library)": bench.library}
        labels = {"stages run": "stages run (console script)", "runc": "runc run", "crun": "crun run",
                  "unshare": "unshare -R", "oci.run (library)": "stages oci.run (in-process)"}
        crun_error = bench.check_crun()
        if crun_error is not None:
            print(f"crun refuses this setup, skipped: {crun_error}")
            del tools["crun"]
        say(f"warm-up: {WARMUP} runs each (the first `stages run` builds the busybox image and the init)")
        for _ in range(WARMUP):
            for name, call in tools.items():
                code = call()
                if code != 0:
                    raise SystemExit(f"bench: {name} exited with {code} in the warm-up")
        results: dict[str, list[float]] = {name: [] for name in tools}
        say(f"{runs} runs each, alternating: {', '.join(tools)}")
        for index in range(runs):
            for name, call in tools.items():
                start = time.perf_counter_ns()
                code = call()
                elapsed = (time.perf_counter_ns() - start) / 1e6
                if code != 0:
                    raise SystemExit(f"bench: {name} exited with {code} (run {index + 1})")
                results[name].append(elapsed)
        print()
        print(f"`true` in a busybox rootfs, start to exit, ms ({runs} runs each, {WARMUP} warm-up, "
              "alternating)")
        print(f"runc: {version(['runc', '--version'])}; crun: {version(['crun', '--version'])}; "
              f"unshare: {version(['unshare', '--version'])}; kernel {os.uname().release}")
        print(table(results, labels))
        compare_with_runc(bench, runs)
    except KeyboardInterrupt:
        print("bench: interrupted; cleaning up", file=sys.stderr)
        interrupted = True
    finally:
        left = bench.cleanup()
    if left:
        print("cleaned up after the bench (was left behind): " + ", ".join(left))
    still = mounts_under(bench.tmp) + cgroups_named(PREFIX) + ([str(bench.tmp)] if bench.tmp.exists() else [])
    if still:
        print("bench: still there after the clean-up: " + ", ".join(still), file=sys.stderr)
        return 1
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
