"""``stages build`` against hostile or careless input (issue #10, findings 6 and 14): a fork bomb in a RUN
is held to the RUN's pids limit, every RUN has a pids and a memory limit by default, a malformed
Containerfile or ignore file is refused naming its line, ARG and ENV values are read as Docker reads them,
image names follow Docker's reference grammar, and a Containerfile of 10000 lines costs what its lines
cost. Each checked by its effect: processes counted on the host, the cgroup files the kernel enforces,
the image's config, what is left in the store."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stages.runtime import build, images, store

pytestmark = pytest.mark.root


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("STAGES_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STAGES_RUN", str(tmp_path / "run"))
    return tmp_path / "home"


@pytest.fixture
def env(home, tmp_path) -> dict:
    env = dict(os.environ, STAGES_HOME=str(home), STAGES_RUN=str(tmp_path / "run"))
    env.pop("STAGES_HOST_NETNS", None)
    return env


@pytest.fixture
def stages(env, home):
    """``stages(*argv)`` runs the command line in the test's own state directory."""
    def call(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stages.cli", *argv], capture_output=True, text=True,
                              env=env, timeout=timeout, stdin=subprocess.DEVNULL)

    yield call
    for record in (home / "containers").glob("*/container.json"):
        call("rm", "-f", record.parent.name)


@pytest.fixture
def context(tmp_path) -> Path:
    directory = tmp_path / "context"
    directory.mkdir()
    (directory / "hello.txt").write_text("hello\n")
    return directory


def _left_behind(home: Path) -> list[str]:
    found = [str(p) for p in (home / "containers").glob("*/container.json")]
    scratch = home / "images" / "tmp"
    found += [str(p) for p in scratch.iterdir()] if scratch.exists() else []
    with open("/proc/self/mountinfo") as handle:
        found += [line.split()[4] for line in handle if str(home) in line.split()[4]]
    return found


# -- finding 6: every RUN under a pids and a memory limit ------------------------------------------------
class RunWatcher:
    """Watches, from the host, the processes of the RUN containers of a build in ``home``: the most seen
    at once (counted in /proc: each process whose /proc/PID/cgroup names a container of the build), and
    the limits in that container's cgroup files (pids.max; memory.max or memory.limit_in_bytes)."""

    def __init__(self, home: Path):
        self.home, self.most, self.limits = home, 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> RunWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _watch(self) -> None:
        from stages.isolate.cgroups import detect

        layout = detect()
        while not self._stop.is_set():
            names = [f"stages-{path.name}" for path in (self.home / "containers").glob("*")]
            count = 0
            if names:
                for pid in (entry for entry in os.listdir("/proc") if entry.isdigit()):
                    try:
                        with open(f"/proc/{pid}/cgroup") as handle:
                            lines = handle.read().splitlines()
                    except OSError:
                        continue  # it ended meanwhile
                    if any(name in line for line in lines for name in names):
                        count += 1
                        # read again until a limit is there: the runtime writes pids.max once its init
                        # is made (runc's order), so the first process seen may be in the cgroup before
                        self._read_limits(layout, lines)
            self.most = max(self.most, count)
            time.sleep(0.02)

    def _read_limits(self, layout, lines: list[str]) -> None:
        wanted = (("pids", ("pids.max",)), ("memory", ("memory.max", "memory.limit_in_bytes")))
        for controller, files in wanted:
            hierarchy = layout.controllers.get(controller)
            if hierarchy is None:
                continue
            for line in lines:
                _, names, path = line.split(":", 2)
                if (hierarchy.version == 2 and names == "") or controller in names.split(","):
                    for name in files:
                        with_root = os.path.join(hierarchy.mountpoint, path.lstrip("/"), name)
                        try:
                            value = Path(with_root).read_text().strip()
                        except OSError:
                            continue
                        if self.limits.get(controller, "max") == "max":
                            self.limits[controller] = value


def test_every_run_has_a_pids_and_a_memory_limit_by_default_and_the_flags_set_them(stages, context, home):
    from stages.isolate.cgroups import detect, machine_memory

    missing = {"pids", "memory"} - set(detect().controllers)
    if missing:
        pytest.skip(f"no {' or '.join(sorted(missing))} controller on this machine: no default limit then")
    (context / "Containerfile").write_text("FROM busybox\nRUN sleep 2; echo default\n")
    with RunWatcher(home) as watcher:
        result = stages("build", "-t", "limited", str(context))
    assert result.returncode == 0, result.stdout + result.stderr
    # what the kernel enforces on the RUN: podman's 2048 processes (and one more if the runtime gives its
    # setup process a slot of its own), half of this machine's memory
    assert build.DEFAULT_PIDS_LIMIT == 2048 and watcher.limits.get("pids") in ("2048", "2049")
    page = os.sysconf("SC_PAGE_SIZE")
    assert abs(int(watcher.limits["memory"]) - machine_memory() // 2) < page

    (context / "Containerfile").write_text("FROM busybox\nRUN sleep 2; echo flags\n")
    with RunWatcher(home) as watcher:
        result = stages("build", "-t", "limited", "--pids-limit", "77", "--memory", "256M", str(context))
    assert result.returncode == 0, result.stdout + result.stderr
    assert watcher.limits.get("pids") in ("77", "78") and watcher.limits.get("memory") == str(256 << 20)


def test_a_run_past_its_memory_limit_is_killed_inside_the_build_and_the_build_says_so(stages, context, home):
    """200 MB held by tail (its last "line" of /dev/zero never ends) under --memory 32M: the kernel's OOM
    killer ends it in the RUN's own cgroup. (Without a limit it ends by itself, having used 200 MB.)"""
    (context / "Containerfile").write_text(
        "FROM busybox\nRUN set -o pipefail; head -c 200000000 /dev/zero | tail -n 1 | wc -c\n")
    result = stages("build", "-t", "hungry", "--memory", "32M", str(context))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Containerfile line 2: `RUN set -o pipefail;" in result.stderr
    assert "the kernel's OOM killer ended the command" in result.stderr and "32M of memory" in result.stderr
    assert "--memory" in result.stderr and "Traceback" not in result.stderr
    assert "hungry:latest" not in images.repositories() and _left_behind(home) == []


@pytest.mark.parametrize("flags, problem", [
    (("--pids-limit", "0"), "--pids-limit 0: a process limit of 0 leaves no room"),
    (("--pids-limit", "many"), "--pids-limit many: 'many' is not a number of processes"),
    (("--pids-limit", "99999999"), "is more than the kernel allows"),
    (("--memory", "lots"), "'lots' is not a memory size"),
    (("--memory", "1k"), "is too small"),
])
def test_a_limit_that_is_no_limit_is_refused_before_any_step(stages, context, home, flags, problem):
    (context / "Containerfile").write_text("FROM busybox\nRUN true\n")
    result = stages("build", "-t", "x", *flags, str(context))
    assert result.returncode == 1 and problem in result.stderr, result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.stderr and "STEP" not in result.stdout


def test_a_fork_bomb_in_a_run_stays_inside_its_pids_limit(stages, context, home):
    """First a bomb that ends by itself (a binary tree of shells 8 deep, about 1000 processes, each
    living 2 s): without a limit the host sees them all at once, with --pids-limit 50 at most 50. (The
    RUN's own shell only starts it, then counts without forking: a shell whose fork fails gives up, and
    when that shell, the PID namespace's init, ends, the kernel kills every process in it,
    pid_namespaces(7).) Only when that held, the classic unbounded one (`f() { f | f & }; f`), which ends
    with the RUN's shell."""
    limit, margin = 50, 10  # (the margin: processes counted as they leave, the runtime's setup process)
    bounded = ("f() { if [ $1 -lt 8 ]; then f $(($1+1)) & f $(($1+1)) & fi; sleep 2; wait; }; "
               "(f 0) 2>/dev/null; i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; echo the tree ended")
    (context / "Containerfile").write_text(f"FROM busybox\nRUN {bounded}\n")
    with RunWatcher(home) as watcher:
        result = stages("build", "-t", "bomb", "--pids-limit", str(limit), str(context), timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "the tree ended" in result.stdout
    assert 5 < watcher.most <= limit + margin, f"{watcher.most} processes at once"
    assert watcher.limits.get("pids") in (str(limit), str(limit + 1))

    (context / "Containerfile").write_text("FROM busybox\nRUN f() { f | f & }; f; sleep 3\n")
    started = time.monotonic()
    with RunWatcher(home) as watcher:
        result = stages("build", "-t", "bomb", "--pids-limit", str(limit), str(context), timeout=120)
    assert watcher.most <= limit + margin, f"{watcher.most} processes at once"
    assert time.monotonic() - started < 100
    assert "Traceback" not in result.stderr
    # it ends one way or the other, and says so: the shell could not fork sleep, or sleep ran out
    if result.returncode != 0:
        assert "Containerfile line 2: `RUN f() { f | f & }; f; sleep 3`: the command exited" in result.stderr
        assert "a RUN may have 50 processes at once" in result.stderr and "--pids-limit" in result.stderr
    else:
        assert "COMMIT bomb:latest" in result.stdout
    assert _left_behind(home) == []


# -- finding 14: the Containerfile ------------------------------------------------------------------------
@pytest.mark.parametrize("text, line, problem", [
    ('FROM busybox\nCMD ["sh", "-c"\n', 2, "meant as the JSON (exec) form but is not JSON"),
    ("FROM busybox\n\nENTRYPOINT ['sh', '-c']\n", 3, "meant as the JSON (exec) form but is not JSON"),
    ("FROM busybox\nRUN [echo, hi]\n", 2, "meant as the JSON (exec) form but is not JSON"),
    ('FROM busybox\nCMD ["sleep", 5]\n', 2, "takes strings only, and 5 is not one"),
    ('FROM busybox\nCOPY ["hello.txt", "/"\n', 2, "meant as the JSON (exec) form"),
    ('FROM busybox\nENV A="open\n', 2, 'a double quote (") is not closed'),
    ("FROM busybox\nLABEL a='open\n", 2, "a single quote (') is not closed"),
    ("FROM busybox\nARG A=${B\n", 2, "a ${ is not closed with }"),
    ("FROM busybox\nARG A B\n", 2, "ARG takes one NAME or NAME=default"),
    (b"FROM busybox\nENV A=\xff\n", 2, "the file is not UTF-8 text"),
])
def test_a_malformed_line_is_refused_with_its_number_before_any_step(stages, context, home, text, line,
                                                                     problem):
    path = context / "Containerfile"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    result = stages("build", "-t", "malformed", str(context))
    assert result.returncode == 1
    assert f"Containerfile line {line}:" in result.stderr and problem in result.stderr, result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.stderr
    assert "STEP" not in result.stdout  # refused while reading the file, before step 1
    assert "malformed:latest" not in images.repositories()


@pytest.mark.parametrize("text, line, problem", [
    ("FROM busybox\nUSER ${WHO:?give --build-arg WHO}\n", 2, "WHO is not set: give --build-arg WHO"),
    ("FROM busybox\nENV ${NONE}=x\n", 2, "which cannot name a variable"),
    ("FROM busybox\nWORKDIR /${A%b}\n", 2, "${A%...} is not a substitution stages build knows"),
    ("FROM busybox\nCOPY hello.txt /" + "x" * 300 + "\n", 2, "File name too long"),
])
def test_a_line_that_fails_as_it_runs_is_a_sentence_with_its_number(stages, context, home, text, line,
                                                                   problem):
    (context / "Containerfile").write_text(text)
    result = stages("build", "-t", "failing", str(context))
    assert result.returncode == 1
    assert f"Containerfile line {line}:" in result.stderr and problem in result.stderr, result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.stderr
    assert "failing:latest" not in images.repositories() and _left_behind(home) == []


def test_no_prefix_of_any_line_gives_a_traceback(home, context, monkeypatch):
    """Every line of a Containerfile that uses every instruction but RUN, cut at every character: each
    build either succeeds or fails with a sentence naming a line, never with another exception."""
    lines = ["ARG BASE=busybox", "FROM ${BASE} AS one", 'ARG V="1 2"', "ENV A=${V:-x} B=\"q r\" C='$A'",
             "LABEL k=\"v w\" other=${A}", "EXPOSE 80/tcp 53/udp", "USER 0:0", "WORKDIR /w/${A}",
             'COPY --chown=0:0 --chmod=644 ["hello.txt", "/x/"]', "ADD hello.txt /y",
             'CMD ["sh", "-c", "echo hi"]', 'ENTRYPOINT ["/bin/sh", "-c"]', "FROM one",
             "COPY --from=one /x/hello.txt /z"]
    outcomes = {"built": 0, "refused": 0}
    for number, line in enumerate(lines):
        for cut in range(len(line) + 1):
            text = "\n".join([*lines[:number], line[:cut], *(["FROM busybox"] if number == 0 else [])])
            (context / "Containerfile").write_text(text + "\n")
            try:
                build.build(context, "cut", out=lambda _: None)
                outcomes["built"] += 1
            except build.StagesError as error:
                assert "Containerfile" in error.message and error.hint, (text, error.message)
                outcomes["refused"] += 1
    assert outcomes["built"] > 50 and outcomes["refused"] > 100, outcomes


def test_a_shell_command_that_starts_with_the_test_command_stays_shell_form(stages, context):
    (context / "Containerfile").write_text(
        'FROM busybox\nRUN [ -f /etc/passwd ] && echo yes > /tested\nRUN [ "$(cat /tested)" = yes ] && '
        'touch /compared\nCMD [ -f /compared ] && echo both\n')
    result = stages("build", "-t", "tested", str(context))
    assert result.returncode == 0, result.stdout + result.stderr
    assert images.config_of(images.resolve("tested"))["config"]["Cmd"] == [
        "/bin/sh", "-c", "[ -f /compared ] && echo both"]
    assert stages("run", "--rm", "tested").stdout == "both\n"


ARGS_AND_ENV = """\
ARG TOP=global
FROM busybox
ARG TOP
ARG A=1
ARG B=${B}y
ARG C=${A}x${Y}z
ARG Q="quoted value"
ENV D=${C:-no} E=${UNSET:-dflt} F=${A:+alt} G=${UNSET:+alt} H='$A' I="$A and $B" J=\\$A K=$Y
ENV L=${EMPTY-unset} M=${TOP}
ENV A=2 N=$A
LABEL who="${I}" where=${Q}
RUN echo "$B $C $Q" > /seen
"""


def test_arg_and_env_values_are_read_as_docker_reads_them(stages, context, tmp_path):
    (context / "Containerfile").write_text(ARGS_AND_ENV)
    result = stages("build", "-t", "expanded", str(context))
    assert result.returncode == 0, result.stdout + result.stderr
    config = images.config_of(images.resolve("expanded"))["config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    # undefined is empty (ARG B=${B}y is y, $Y is nothing); ${X:-} ${X:+} ${X-}; '' keeps $, "" expands
    assert {k: env[k] for k in "DEFGHIJKLMN"} == {
        "D": "1xz", "E": "dflt", "F": "alt", "G": "", "H": "$A", "I": "1 and y", "J": "$A", "K": "",
        "L": "unset", "M": "global", "N": "1"}  # (N: the A from before the line, Docker's rule)
    assert env["A"] == "2" and list(env)[0] == "PATH"  # the image's PATH first, a new name at the end
    assert config["Labels"] == {"who": "1 and y", "where": "quoted value"}
    layer = images.resolve("expanded")["layers"][-1]
    assert (images.layer_dir(layer["diff_id"]) / "seen").read_text() == "y 1xz quoted value\n"
    # a --build-arg is the value as given: never expanded
    result = stages("build", "-t", "expanded", "--build-arg", "B=$given", str(context))
    assert result.returncode == 0, result.stdout + result.stderr
    env = dict(item.split("=", 1) for item in images.config_of(images.resolve("expanded"))["config"]["Env"])
    assert env["I"] == "1 and $given"


def test_a_malformed_ignore_pattern_is_refused_naming_its_line(stages, context, home):
    (context / ".dockerignore").write_text("# comment\n*.key\n[\n")
    (context / "Containerfile").write_text("FROM busybox\nCOPY . /ctx/\n")
    result = stages("build", "-t", "ignoring", str(context))
    assert result.returncode == 1
    assert ".dockerignore line 3: the pattern '[' is malformed: a [ is not closed with ]" in result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.stderr and "STEP" not in result.stdout
    assert _left_behind(home) == []


def test_ignore_patterns_match_as_docker_matches_them(stages, context, tmp_path):
    for name in ("a.log", "deep/er/b.log", "sub/c.tmp", "top.tmp", "keep/d.log", "x[1].txt"):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        (context / name).write_text(name)
    # **/ is any number of directories, none too; * never crosses a /; \[ is a literal [
    (context / ".containerignore").write_text("**/*.log\n!keep/*.log\n*.tmp\nx\\[1\\].txt\n")
    (context / "Containerfile").write_text("FROM busybox\nCOPY . /ctx/\n")
    result = stages("build", "-t", "ignoring", str(context))
    assert result.returncode == 0, result.stdout + result.stderr
    flat = images.flatten("ignoring", tmp_path / "flat") / "ctx"
    kept = {str(path.relative_to(flat)) for path in flat.rglob("*") if path.is_file()}
    assert kept == {"hello.txt", "Containerfile", ".containerignore", "keep/d.log", "sub/c.tmp"}


BAD_NAMES = ["../x", "/abs", "UPPER", "a" * 1000, "a:b:c", "x:", "x:-tag", "a//b", "ok@sha256:00"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_follow_docker_reference_grammar_in_build_and_import(stages, context, home, tmp_path, name):
    (context / "Containerfile").write_text("FROM busybox\nCOPY hello.txt /\n")
    result = stages("build", "-t", name, str(context))
    assert result.returncode == 1 and "is not an image name" in result.stderr, result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.stderr and "STEP" not in result.stdout
    tarball = tmp_path / "rootfs.tar"
    subprocess.run(["tar", "-C", str(context), "-cf", str(tarball), "."], check=True)
    result = stages("import", str(tarball), name)
    assert result.returncode == 1 and "is not an image name" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert set(images.repositories()) <= {"busybox:latest"}  # nothing was named, nothing written
    assert [image["names"] for image in images.list_images()] in ([], [["busybox:latest"]])


def test_good_names_are_kept_and_a_bad_one_to_run_says_what_is_wrong(stages, context):
    (context / "Containerfile").write_text("FROM busybox\nCOPY hello.txt /\n")
    names = ["lesson/web_1:v2.0", "localhost:5000/a/b-c:Tag_1", "a__b.c--d:" + "t" * 128, "x" * 255]
    for name in names:
        result = stages("build", "-t", name, str(context))
        assert result.returncode == 0, result.stdout + result.stderr
    assert set(images.repositories()) >= {"lesson/web_1:v2.0", "localhost:5000/a/b-c:Tag_1",
                                           "a__b.c--d:" + "t" * 128, "x" * 255 + ":latest"}
    result = stages("run", "--rm", "Lesson/Web_1:v2.0", "true")
    assert result.returncode != 0 and "repository names must be lower case" in result.stderr
    assert "lesson/web_1:v2.0" in result.stderr  # the hint spells it right


# -- finding 14: 10000 ENV lines and a 1 MB LABEL --------------------------------------------------------
def test_the_build_cache_is_written_once_per_build_not_once_per_step(home, context, monkeypatch):
    """The cost that grew with the square of the lines: each step rewrote the whole cache file (and
    fsync'ed it). Counted, not timed: a build of 500 steps writes the cache once."""
    (context / "Containerfile").write_text(
        "FROM busybox\n" + "".join(f"ENV V{i}=value{i}\n" for i in range(500)))
    build.build(context, "warm", out=lambda _: None)  # (busybox made, and its own writes done)
    (context / "Containerfile").write_text(
        "FROM busybox\n" + "".join(f"ENV W{i}=value{i}\n" for i in range(500)))
    written = []
    real = store.write_json
    monkeypatch.setattr(store, "write_json", lambda path, data: (written.append(Path(path).name),
                                                                 real(path, data))[1])
    build.build(context, "many", out=lambda _: None)
    assert written.count(build.CACHE_FILE) == 1
    assert len(store.read_json(store.images_dir() / build.CACHE_FILE)) >= 1000  # both builds' steps kept


@pytest.mark.timeout(90)  # (> 300 s before; about 1 s now: the bound is for a loaded machine)
def test_ten_thousand_env_lines_and_a_one_megabyte_label_build(home, context):
    lines = "".join(f"ENV V{i}=value{i}\n" for i in range(10_000))
    label = "x" * (1 << 20)
    (context / "Containerfile").write_text(f"FROM busybox\n{lines}LABEL big={label}\nENV V3=again\n")
    started = time.monotonic()
    build.build(context, "long", out=lambda _: None)
    took = time.monotonic() - started
    config = images.config_of(images.resolve("long"))["config"]
    env = config["Env"]
    assert len(env) == 10_001 and env[1] == "V0=value0" and env[4] == "V3=again"  # set again, same place
    assert config["Labels"]["big"] == label
    assert took < 60, took
