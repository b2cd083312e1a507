"""cgroups by hand: the kernel enforces the limits we write, on cgroup v1 (this host) and v2 (the VM).

Each test puts a plain child process into a cgroup and watches the kernel act on it: a memory hog is
OOM-killed, a fork bomb hits pids.max, a busy loop is throttled. The child waits for a line on stdin
before it does its work, so that it is inside the cgroup first (memory charged before a move stays where
it was, cgroups(7)). Tests that need the unified hierarchy with controllers are marked ``cgroup_v2`` and
skip here; the cgroup v2 VM runs them. Only stages, psutil, pytest, busybox and python3 are needed.
"""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time

import pytest

from stages.errors import CgroupError, LimitError
from stages.isolate import cgroups
from stages.isolate.cgroups import Cgroup, parse_cpus, parse_memory, parse_pids
from stages.steps import StepRecord

LAYOUT = cgroups.detect() if os.path.exists("/proc/self/cgroup") else None
HAS = {name: LAYOUT is not None and name in LAYOUT.controllers for name in cgroups.CONTROLLERS}
V2 = LAYOUT is not None and all(HAS.values()) and all(
    LAYOUT.controllers[name].version == 2 for name in cgroups.CONTROLLERS)
V1_MEMORY = HAS["memory"] and LAYOUT.controllers["memory"].version == 1

root = pytest.mark.root
v2_only = pytest.mark.skipif(
    not V2, reason="needs memory, pids and cpu on the cgroup v2 hierarchy (runs in the cgroup v2 VM)")


def needs(*controllers: str):
    missing = [c for c in controllers if not HAS[c]]
    why = "; ".join(LAYOUT.missing.get(c, "") for c in missing) if LAYOUT else ""
    return pytest.mark.skipif(bool(missing), reason=f"no usable {', '.join(missing)} controller here: {why}")


_names = itertools.count()


def unique(word: str) -> str:
    """A name no concurrent test run picks: our pid and a counter."""
    return f"test-{word}-{os.getpid()}-{next(_names)}"


@pytest.fixture
def cgroup():
    made = Cgroup.create(unique("t"))
    try:
        yield made
    finally:
        made.remove()


def gated(argv: list[str], **kwargs) -> subprocess.Popen:
    """Start ``argv``, which reads one line from stdin before it does anything that counts."""
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **kwargs)


def go(process: subprocess.Popen) -> None:
    process.stdin.write(b"go\n")
    process.stdin.flush()  # left open: communicate() closes it


def reap(process: subprocess.Popen) -> None:
    """Make sure a child is dead and waited for, whatever the test did."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream and not stream.closed:
            stream.close()


# -- parsing: no root needed ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("64M", 64 << 20), ("64m", 64 << 20), ("64MiB", 64 << 20), ("64mb", 64 << 20), ("1g", 1 << 30),
    ("67108864", 67108864), (" 32M ", 32 << 20), ("1.5G", 3 << 29), (67108864, 67108864),
])
def test_parse_memory_reads_the_usual_ways_of_writing_a_size(text, expected):
    assert parse_memory(text, maximum=1 << 40) == expected  # whatever this machine's RAM (the VM has little)


def test_parse_memory_reads_kilobytes_when_the_floor_is_lowered():
    assert parse_memory("512k", minimum=0) == 512 * 1024


@pytest.mark.parametrize("junk", ["sixty", "", "64X", "-5M", "M", "1e9", "64 M B"])
def test_parse_memory_rejects_junk_with_a_hint(junk):
    with pytest.raises(LimitError) as caught:
        parse_memory(junk)
    assert "is not a memory size" in caught.value.message
    assert "64M" in caught.value.hint


def test_parse_memory_rejects_absurd_sizes_in_the_learners_words():
    with pytest.raises(LimitError, match="at least 4M to start a shell"):
        parse_memory("512k")
    with pytest.raises(LimitError, match="at least 4M"):
        parse_memory("1M")
    total = cgroups.machine_memory()
    with pytest.raises(LimitError) as caught:
        parse_memory("1000T")
    assert cgroups.format_bytes(total) in caught.value.message
    assert "RAM" in caught.value.message
    assert parse_memory(total) == total


def test_parse_cpus_and_pids():
    assert parse_cpus("0.5") == 0.5
    assert parse_cpus(1) == 1.0
    assert parse_pids("64") == 64 and parse_pids(1) == 1
    count = os.cpu_count()
    for bad, words in [("0", "more than 0"), ("-1", "more than 0"), ("half", "not a number of CPUs"),
                       (str(count + 1), f"has \\({count} CPU"), ("0.001", "0.01"), ("nan", "more than 0")]:
        with pytest.raises(LimitError, match=words):
            parse_cpus(bad)
    for bad, words in [("0", "no room"), ("many", "not a number"), ("2.5", "not a number"),
                       (str(cgroups.pid_max() + 1), "more than the kernel allows")]:
        with pytest.raises(LimitError, match=words):
            parse_pids(bad)


# -- where things are ---------------------------------------------------------------------------------
@root
def test_detect_places_each_controller_in_a_hierarchy_that_holds_us():
    layout = cgroups.detect()
    assert layout.controllers, layout.describe()
    own = {}
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            number, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(",") if names else [""]:
                own[name] = path
    for name, hierarchy in layout.controllers.items():
        assert hierarchy.own == own[name if hierarchy.version == 1 else ""]
        # the directory we computed really is our cgroup: the kernel lists us in it
        listed = open(os.path.join(hierarchy.own_directory, "cgroup.procs")).read().split()
        assert str(os.getpid()) in listed, (name, hierarchy)
        if hierarchy.version == 2:
            assert name in open(os.path.join(hierarchy.own_directory, "cgroup.controllers")).read().split()
        else:
            assert name in open("/proc/self/mountinfo").read().split(hierarchy.mountpoint + " ", 1)[1] \
                .splitlines()[0]
    kind = layout.kind
    if kind == "v2":
        assert all(h.version == 2 for h in layout.controllers.values())
    assert set(layout.controllers) | set(layout.missing) == set(cgroups.CONTROLLERS)


@root
def test_create_makes_one_directory_per_hierarchy_below_our_own_cgroup_and_remove_takes_it_away():
    record = StepRecord("make and remove")
    made = Cgroup.create(unique("dirs"), record=record)
    try:
        assert made.name.startswith("stages-test-dirs-")
        for controller, directory in made.directories.items():
            hierarchy = made.layout.controllers[controller]
            assert directory == os.path.join(hierarchy.own_directory, "stages", made.name)
            assert os.path.isdir(directory)
            # the kernel filled it with the controller's files
            assert any(name.startswith(controller + ".") for name in os.listdir(directory)), controller
    finally:
        made.remove()
    for directory in made.directories.values():
        assert not os.path.exists(directory)
    made.remove()  # a second time does nothing
    assert all(step.ok for step in record.steps)


@root
def test_bad_names_and_a_second_cgroup_of_the_same_name_are_refused_and_nothing_is_lost(cgroup):
    for bad in ["a/b", "../x", "", "x" * 80, "with space"]:
        with pytest.raises(CgroupError, match="cannot be a cgroup name"):
            Cgroup.create(bad)
    with pytest.raises(CgroupError, match="exists already") as caught:
        Cgroup.create(cgroup.name)
    assert "pick another name" in caught.value.hint
    # the first one is untouched
    assert all(os.path.isdir(d) for d in cgroup.directories.values())
    with pytest.raises(CgroupError, match="is not a controller"):
        Cgroup.create(unique("bad"), controllers=["memroy"])


# -- the limits, enforced -----------------------------------------------------------------------------
HOG = """
import sys, time
sys.stdin.readline()
chunks = []
for step in range(25):                      # 25 x 8M = 200M
    chunks.append(b"x" * (8 << 20))         # b"x" * n writes every page, so it is really charged
    print(len(chunks) * 8, flush=True)
    time.sleep(0.01)
print("survived", flush=True)
"""


@root
@needs("memory")
def test_a_memory_hog_is_oom_killed_at_32M_and_the_kill_is_counted(cgroup, python):
    limit = cgroup.set_memory("32M")
    assert limit == 32 << 20
    before = cgroup.stats()
    assert before.memory_max == 32 << 20
    hog = gated([python, "-c", HOG])
    try:
        cgroup.add(hog.pid)
        go(hog)
        out, err = hog.communicate(timeout=30)
    finally:
        reap(hog)
    # the kernel's OOM killer sends SIGKILL: no traceback, no MemoryError, just death
    assert hog.returncode == -signal.SIGKILL, (hog.returncode, out, err)
    reached = [int(line) for line in out.decode().split() if line.isdigit()]
    assert b"survived" not in out
    assert reached and max(reached) < 40, reached
    after = cgroup.stats()
    assert after.oom_kills is not None and after.oom_kills >= 1, after
    # usage went right up to the limit and no further
    if after.memory_peak is not None:  # memory.peak: v1, and v2 from Linux 5.19
        assert (31 << 20) <= after.memory_peak <= (32 << 20) + (1 << 20), after
    if cgroup.versions["memory"] == 2:
        assert after.memory_limit_hits >= 1, after  # memory.events "max"
    # (v1's memory.failcnt is not asserted: recent kernels, 6.18 here, leave it at 0 on a v1 hierarchy)


@root
@needs("memory")
@pytest.mark.skipif(not V1_MEMORY, reason="cgroup v1 memory hierarchy only")
def test_v1_memory_limit_closes_the_swap_loophole_in_either_direction(cgroup):
    directory = cgroup.directory("memory")
    memsw = os.path.join(directory, "memory.memsw.limit_in_bytes")
    if not os.path.exists(memsw):
        pytest.skip("this kernel does not account swap (no memory.memsw.*)")
    # v1 refuses memsw < limit at any moment: raising and lowering must each write in the right order
    for size in ["64M", "128M", "16M", "256M"]:
        number = cgroup.set_memory(size)
        assert int(open(os.path.join(directory, "memory.limit_in_bytes")).read()) == number
        assert int(open(memsw).read()) == number


@root
@needs("memory")
def test_swap_beyond_the_limit_is_ram_plus_swap_as_the_oci_spec_counts_it(cgroup):
    """set_memory(limit, swap=...): swap is RAM plus swap (config-linux.md); -1 leaves swap unlimited."""
    directory = cgroup.directory("memory")
    v2 = cgroup.versions["memory"] == 2
    swap_file = os.path.join(directory, "memory.swap.max" if v2 else "memory.memsw.limit_in_bytes")

    def expect(total: int, ram: int) -> str:
        return str(total - ram) if v2 else str(total)  # v2 counts the swap alone
    if not os.path.exists(swap_file):
        pytest.skip(f"this kernel does not account swap (no {os.path.basename(swap_file)})")
    # every order v1 could trip over: more swap, less RAM, then RAM above the old RAM-plus-swap
    for ram, total in [(64 << 20, 128 << 20), (32 << 20, 48 << 20), (256 << 20, 512 << 20)]:
        assert cgroup.set_memory(ram, swap=total) == ram
        assert open(swap_file).read().strip() == expect(total, ram)
    cgroup.set_memory(64 << 20, swap=-1)
    assert open(swap_file).read().strip() in ("max", str(2**63 - 4096), "9223372036854771712")
    with pytest.raises(LimitError, match="cannot be less than the memory limit"):
        cgroup.set_memory(64 << 20, swap=32 << 20)


@root
@needs("memory")
@pytest.mark.parametrize("junk", ["sixty", "1M"])
def test_a_bad_memory_limit_changes_nothing(cgroup, junk):
    cgroup.set_memory("64M")
    with pytest.raises(LimitError):
        cgroup.set_memory(junk)
    assert cgroup.stats().memory_max == 64 << 20


@root
@needs("pids")
def test_a_fork_bomb_stops_at_pids_max(cgroup):
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs busybox (apt-get install busybox-static)")
    cgroup.set_pids(8)
    # bounded: 40 background sleeps at most, each muted so only the shell's own error reaches us
    bomb = gated([busybox, "sh", "-c",
                  "read go; i=0; while [ $i -lt 40 ]; do sleep 30 </dev/null >/dev/null 2>&1 & "
                  "i=$((i+1)); done; echo all 40 started"])
    try:
        cgroup.add(bomb.pid)
        go(bomb)
        out, err = bomb.communicate(timeout=15)
        stats = cgroup.stats()
        in_cgroup = cgroup.pids()
    finally:
        victims = cgroup.kill()
        reap(bomb)
    assert b"all 40 started" not in out
    assert b"Resource temporarily unavailable" in err, err
    assert stats.pids_max == 8
    assert stats.pids_limit_hits >= 1, stats
    # the shell is gone (its fork failed, it gave up); the sleeps it managed to start fill the rest
    assert 1 <= len(in_cgroup) <= 8 and stats.pids_current <= 8, (in_cgroup, stats)
    assert set(in_cgroup) <= set(victims)
    assert cgroup.pids() == []


BUSY = """
import os, sys, time
sys.stdin.readline()
start, cpu = time.monotonic(), os.times()
while time.monotonic() - start < 1.0:
    pass
end = os.times()
print(end.user + end.system - cpu.user - cpu.system, flush=True)
"""


@root
@needs("cpu")
@pytest.mark.slow
def test_a_busy_loop_under_a_fifth_of_a_cpu_is_throttled(cgroup, python):
    cgroup.set_cpus("0.2")
    busy = gated([python, "-c", BUSY])
    try:
        cgroup.add(busy.pid)
        go(busy)
        out, err = busy.communicate(timeout=30)
    finally:
        reap(busy)
    assert busy.returncode == 0, err
    cpu_seconds = float(out)
    stats = cgroup.stats()
    # one second of wall time, at most ~0.2 s of it on a CPU (a little slack for the first period).
    # Throttling needs the loop to reach its quota: a machine saturated by other work (load far above its
    # CPU count) can starve the loop below 0.2 CPU, and then nr_throttled stays 0.
    assert cpu_seconds < 0.5, cpu_seconds
    assert stats.cpu_throttled > 0 and stats.cpu_throttled_usec > 0, stats
    assert stats.cpu_periods >= stats.cpu_throttled


# -- the record reads as shell ------------------------------------------------------------------------
@root
def test_the_recorded_steps_are_shell_a_person_could_type(python):
    record = StepRecord("cgroups by hand")
    name = unique("shell")
    sleeper = subprocess.Popen([python, "-c", "import time; time.sleep(30)"])
    try:
        made = Cgroup.create(name, record=record)
        with made:
            if HAS["memory"]:
                made.set_memory("64M")
            if HAS["pids"]:
                made.set_pids(20)
            if HAS["cpu"]:
                made.set_cpus(0.5)
            made.add(sleeper.pid)
            assert made.pids() == [sleeper.pid]
    finally:
        reap(sleeper)
    lines = [step.shell for step in record.steps]
    words = {shlex.split(line)[0] for line in lines}
    assert words <= {"mkdir", "echo", "rmdir", "kill"}, lines
    text = record.script()
    assert "mkdir " in text and f"/stages/{made.name}\n" in text + "\n"
    if HAS["memory"]:
        assert any(line.startswith("echo 67108864 > ") and
                   line.endswith(("/memory.max", "/memory.limit_in_bytes")) for line in lines), lines
    if HAS["pids"]:
        assert any(line.startswith("echo 20 > ") and line.endswith("/pids.max") for line in lines), lines
    assert any(line == f"echo {sleeper.pid} > {d}/cgroup.procs" for d in made.unique_directories()
               for line in lines), lines
    assert lines[-1].startswith("rmdir ")
    assert all(step.ok for step in record.steps)

    # and the record is not just pretty: sh, fed the steps up to the move, makes the same cgroup
    replay = []
    for line in lines:
        if "cgroup.procs" in line:
            break
        if line.startswith("mkdir ") and os.path.isdir(shlex.split(line)[1]):
            continue  # the shared stages parent is still there (another test run uses it)
        replay.append(line)
    subprocess.run(["sh", "-e", "-c", "\n".join(replay)], check=True)
    again = Cgroup.open(name)
    try:
        if HAS["memory"]:
            assert again.stats().memory_max == 64 << 20
        if HAS["pids"]:
            assert again.stats().pids_max == 20
    finally:
        again.remove()
    assert not any(os.path.exists(d) for d in again.directories.values())


# -- cleanup after a crash ----------------------------------------------------------------------------
CRASHER = """
import subprocess, sys, time
from stages.isolate.cgroups import Cgroup
made = Cgroup.create(sys.argv[1])
holder = subprocess.Popen(["sleep", "60"])
made.add(holder.pid)
print(holder.pid, flush=True)
time.sleep(60)
"""


@root
def test_cleanup_removes_what_a_sigkilled_holder_left_and_nothing_alive(python):
    name = unique("crash")
    crasher = subprocess.Popen([python, "-c", CRASHER, name], stdout=subprocess.PIPE,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    holder_pid = None
    try:
        holder_pid = int(crasher.stdout.readline())
        # SIGKILL: no finally, no atexit, nothing of the crasher's own cleanup runs
        os.kill(holder_pid, signal.SIGKILL)
        crasher.kill()
        crasher.wait(timeout=10)
    finally:
        reap(crasher)
    left = Cgroup.open(name)
    assert left.directories and left.wait_empty(5)
    assert name not in cgroups.find() and "stages-" + name in cgroups.find()

    # a cgroup that still holds a live process is left alone
    alive = Cgroup.create(unique("alive"))
    sleeper = subprocess.Popen([python, "-c", "import time; time.sleep(30)"])
    try:
        alive.add(sleeper.pid)
        removed = cgroups.cleanup([name, alive.name])
        assert removed == ["stages-" + name]
        assert not any(os.path.exists(d) for d in left.directories.values())
        assert all(os.path.isdir(d) for d in alive.directories.values())
        assert cgroups.cleanup([alive.name]) == []
        # unless told to kill: then the process dies first and the cgroup goes
        assert cgroups.cleanup([alive.name], kill=True) == [alive.name]
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        assert not any(os.path.exists(d) for d in alive.directories.values())
    finally:
        reap(sleeper)
        alive.remove()
    assert cgroups.cleanup([name]) == []  # nothing left to do: idempotent


@root
def test_remove_kills_what_is_still_inside(cgroup, python):
    children = [subprocess.Popen([python, "-c", "import time; time.sleep(30)"]) for _ in range(3)]
    try:
        for child in children:
            cgroup.add(child.pid)
        assert cgroup.pids() == sorted(child.pid for child in children)
        start = time.monotonic()
        # remove() kills and waits until the cgroup is empty; a thread reaps the children meanwhile
        reaper = threading.Thread(target=lambda: [child.wait() for child in children])
        reaper.start()
        cgroup.remove()
        reaper.join(timeout=10)
        assert time.monotonic() - start < 5
    finally:
        for child in children:
            reap(child)
    assert all(child.returncode == -signal.SIGKILL for child in children)
    assert not any(os.path.exists(d) for d in cgroup.directories.values())


# -- cgroup v2 only: the no-internal-process rule -------------------------------------------------------
@root
@pytest.mark.cgroup_v2
@v2_only
def test_no_internal_processes_a_parent_with_a_process_cannot_hand_down_controllers(python):
    parent = Cgroup.create(unique("parent"))
    sleeper = subprocess.Popen([python, "-c", "import time; time.sleep(30)"])
    try:
        parent.add(sleeper.pid)
        child_name = unique("child")
        with pytest.raises(CgroupError) as caught:
            Cgroup.create(child_name, parent=parent)
        assert "no internal processes" in caught.value.message
        assert "either holds processes or hands controllers to child cgroups" in caught.value.message
        assert str(sleeper.pid) in caught.value.message
        assert not os.path.exists(os.path.join(parent.directory("memory"), "stages-" + child_name))
        # take the process out again (kill it) and the very same call works
        parent.kill()
        sleeper.wait(timeout=10)
        parent.wait_empty()
        with Cgroup.create(child_name, parent=parent) as child:
            enabled = open(os.path.join(parent.directory("memory"), "cgroup.subtree_control")).read().split()
            assert {"memory", "pids", "cpu"} <= set(enabled)
            assert os.path.exists(child.file("memory", "memory.max"))
    finally:
        reap(sleeper)
        parent.remove()


@root
@pytest.mark.cgroup_v2
@v2_only
def test_v2_memory_limit_allows_no_swap_and_cgroup_kill_empties_at_once(python):
    with Cgroup.create(unique("v2")) as made:
        made.set_memory("64M")
        swap = made.file("memory", "memory.swap.max")
        if os.path.exists(swap):
            assert open(swap).read().strip() == "0"
        made.set_cpus(0.5)
        assert open(made.file("cpu", "cpu.max")).read().split() == ["50000", "100000"]
        sleeper = subprocess.Popen([python, "-c", "import time; time.sleep(30)"])
        try:
            made.add(sleeper.pid)
            assert made.kill() == [sleeper.pid]
            assert sleeper.wait(timeout=10) == -signal.SIGKILL
        finally:
            reap(sleeper)



# -- the v2 write order, on a stand-in tree (runs everywhere; the real kernel checks it in the VM) ------
def test_v2_writes_enable_controllers_top_down_before_each_mkdir(tmp_path, monkeypatch):
    """On v2 the order is the lesson: +controllers in our cgroup, mkdir stages, +controllers, mkdir ours."""
    files = {"cgroup.procs": "", "cgroup.controllers": "memory pids cpu\n", "cgroup.subtree_control": "",
             "memory.max": "max\n", "memory.swap.max": "max\n", "pids.max": "max\n",
             "cpu.max": "max 100000\n",
             "memory.events": "max 3\noom_kill 1\n", "pids.events": "max 4\n",
             "cpu.stat": "usage_usec 9\nnr_periods 7\nnr_throttled 6\nthrottled_usec 5000\n"}

    def populate(directory):  # what the kernel does on mkdir in a cgroup2 file system
        for name, text in files.items():
            (directory / name).write_text(text)

    populate(tmp_path)
    real_mkdir = os.mkdir

    def mkdir(path, *args):
        real_mkdir(path, *args)
        populate(type(tmp_path)(path))

    hierarchy = cgroups.Hierarchy(2, str(tmp_path), "/", cgroups.CONTROLLERS)
    layout = cgroups.Layout({c: hierarchy for c in cgroups.CONTROLLERS}, {}, "v2")
    monkeypatch.setattr(cgroups, "detect", lambda: layout)
    monkeypatch.setattr(cgroups.os, "mkdir", mkdir)
    record = StepRecord("v2")
    made = Cgroup.create("v2-order", record=record)
    made.set_memory("64M")
    made.set_pids(20)
    made.set_cpus(0.5)
    own, parent, ours = tmp_path, tmp_path / "stages", tmp_path / "stages" / "stages-v2-order"
    assert [step.shell for step in record.steps] == [
        f"echo +memory +pids +cpu > {own}/cgroup.subtree_control",
        f"mkdir {parent}",
        f"echo +memory +pids +cpu > {parent}/cgroup.subtree_control",
        f"mkdir {ours}",
        f"echo 67108864 > {ours}/memory.max",
        f"echo 0 > {ours}/memory.swap.max",
        f"echo 20 > {ours}/pids.max",
        f"echo 50000 100000 > {ours}/cpu.max",
    ]
    assert (ours / "memory.max").read_text() == "67108864"
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    stats = made.stats()
    assert (stats.memory_limit_hits, stats.oom_kills, stats.pids_limit_hits) == (3, 1, 4)
    assert (stats.cpu_throttled, stats.cpu_throttled_usec, stats.cpu_usage_usec) == (6, 5000, 9)
    assert made.version == 2 and made.unique_directories() == [str(ours)]


# -- the freezer: pause and resume ------------------------------------------------------------------------
HAS_FREEZER = LAYOUT is not None and "freezer" in LAYOUT.extras


def _size_after(path, seconds: float) -> tuple[int, int]:
    before = os.path.getsize(path)
    time.sleep(seconds)
    return before, os.path.getsize(path)


@root
@pytest.mark.skipif(not HAS_FREEZER, reason="no freezer here (cgroup v1 freezer or cgroup v2 on Linux 5.2+)")
def test_freeze_stops_a_counting_process_thaw_lets_it_go_on_and_a_frozen_cgroup_can_be_killed(tmp_path,
                                                                                            python):
    counter = tmp_path / "count"
    record = StepRecord("freeze")
    made = Cgroup.create(unique("freeze"), controllers=["pids", "freezer"], record=record)
    counting = None
    try:
        version = made.versions["freezer"]
        assert made.directory("freezer") == os.path.join(LAYOUT.extras["freezer"].own_directory, "stages",
                                                          made.name)
        with open(counter, "w") as output:
            counting = subprocess.Popen([python, "-u", "-c", "import time\nwhile True:\n print(time.time())\n"
                                                             " time.sleep(0.002)"], stdout=output)
        made.add(counting.pid)
        deadline = time.monotonic() + 10
        while os.path.getsize(counter) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not made.frozen
        made.freeze()
        assert made.frozen
        before, after = _size_after(counter, 0.3)
        assert before == after, "a frozen process went on writing"
        assert counting.poll() is None  # stopped, not ended
        made.thaw()
        assert not made.frozen
        before, after = _size_after(counter, 0.3)
        assert after > before, "a thawed process did not go on"
        script = record.script()
        assert ("echo 1 > " if version == 2 else "echo FROZEN > ") in script
        assert ("echo 0 > " if version == 2 else "echo THAWED > ") in script
        made.freeze()
        # killing a frozen cgroup works: the freezer lets the SIGKILL through (v1 after a thaw)
        assert made.kill() == [counting.pid]
        assert counting.wait(timeout=10) == -signal.SIGKILL
    finally:
        if counting is not None:
            reap(counting)
        made.remove()
    assert not any(os.path.exists(d) for d in made.directories.values())


@root
def test_the_freezer_and_devices_are_named_only_when_asked_for():
    with Cgroup.create(unique("plain")) as plain:
        assert not {"freezer", "devices"} & set(plain.directories)
    with pytest.raises(CgroupError, match="not a controller this module knows"):
        Cgroup.create(unique("bad"), controllers=["freezer", "blkio"])


@root
@pytest.mark.skipif(not HAS_FREEZER, reason="no freezer here (cgroup v1 freezer or cgroup v2 on Linux 5.2+)")
def test_cleanup_with_kill_removes_a_frozen_leftover(python):
    name = unique("frozen-left")
    made = Cgroup.create(name, controllers=["pids", "freezer"])
    sleeper = subprocess.Popen([python, "-c", "import time; time.sleep(60)"])
    try:
        made.add(sleeper.pid)
        made.freeze()
        # as after a crash: the cgroup stays, frozen, with its process
        assert cgroups.cleanup([name]) == []
        assert cgroups.cleanup([name], kill=True) == [made.name]
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        assert not any(os.path.exists(d) for d in made.directories.values())
    finally:
        reap(sleeper)
        made.remove()
