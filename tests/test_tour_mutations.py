"""Every section of the tour can fail: break the step a section is about and its verdict changes, with a
message that names the missing step.

Each test runs the tour as test_tour.py does (``python -m stages.cli tour``), with a ``sitecustomize``
module on PYTHONPATH that breaks one step: Python imports it at start-up, in the tour's process and in the
isolate's holder (a Python of its own, started with the same environment), so a step taken in either can
be made a no-op. Nothing else of the tour changes.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
from test_tour import assert_nothing_left, environment, lines_about
from test_tour import stages_home as stages_home  # the fixture

pytestmark = pytest.mark.root


def run_broken_tour(python: str, home: Path, tmp_path: Path, breakage: str, *arguments: str,
                    timeout: float = 180, leaves: bool = False) -> str:
    """The output of the tour run with ``breakage`` (Python source) executed at every start-up."""
    patches = tmp_path / "patches"
    patches.mkdir()
    # (a line on stderr says the module was loaded: a print inside a patch may run in a child whose
    # stderr is captured)
    loaded = "import sys\nprint('BROKEN: a step of the tour', file=sys.stderr)\n"
    (patches / "sitecustomize.py").write_text(loaded + textwrap.dedent(breakage))
    env = environment(home, tmp_path)
    env["PYTHONPATH"] = str(patches)
    result = subprocess.run([python, "-m", "stages.cli", "tour", *arguments], capture_output=True, text=True,
                            env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert "BROKEN" in result.stderr, "the breakage was never applied: " + result.stderr
    if not leaves:
        assert_nothing_left(home, tmp_path)
    return result.stdout


def section(output: str, number: str) -> str:
    """The text of section ``number`` (e.g. "2.1")."""
    body = output.split(f"-- {number} ")[1]
    return body.split("\n-- ")[0].split("\n== ")[0]


def test_stage_1_without_the_chroot_says_the_jail_sees_the_host(python, stages_home, tmp_path):
    out = run_broken_tour(python, stages_home, tmp_path, """
        import sys
        from stages import kernel
        real = kernel.chroot
        def chroot(path, what=""):
            if what.startswith("from now on"):   # jail.run's chroot into the rootfs: skipped
                print("BROKEN: no chroot", file=sys.stderr)
                return None
            return real(path, what=what)
        kernel.chroot = chroot
        """, "--stage", "1")
    listing = lines_about(section(out, "1.1"), "ls /")
    assert "[SHARED]" in listing and "not the rootfs's names" in listing and "no chroot" in listing, listing
    files = lines_about(section(out, "1.2"), "files")
    assert "[SHARED]" in files, files


def test_stage_1_escape_without_the_last_chroot_fails(python, stages_home, tmp_path):
    out = run_broken_tour(python, stages_home, tmp_path, """
        import subprocess
        from stages import kernel
        real_chroot, real_run = kernel.chroot, subprocess.run
        def chroot(path, what=""):
            if what.startswith("make the real root our root"):   # the climb's last `chroot .`: skipped
                return None
            return real_chroot(path, what=what)
        kernel.chroot = chroot
        def run(argv, *arguments, **options):
            # the escape's child is `python -S -c CODE`: without site, it loads this module only if asked
            if isinstance(argv, list) and "-S" in argv and "_escape_child" in argv[argv.index("-c") + 1]:
                at = argv.index("-c") + 1
                argv = [*argv[:at], "import sitecustomize; " + argv[at], *argv[at + 1:]]
            return real_run(argv, *arguments, **options)
        subprocess.run = run
        """, "--stage", "1")
    escape = lines_about(section(out, "1.3"), "the escape")
    assert "[isolated] failed" in escape, escape


def test_stage_2_without_the_old_root_unmount(python, stages_home, tmp_path):
    out = run_broken_tour(python, stages_home, tmp_path, """
        import sys
        from stages import kernel
        real = kernel.umount
        def umount(target, flags=0, what=""):
            if what.startswith("detach the old root"):   # pivot_root's umount -l of the old root: skipped
                print("BROKEN: the old root stays", file=sys.stderr)
                return None
            return real(target, flags, what=what)
        kernel.umount = umount
        """, "--stage", "2")
    pivot = lines_about(section(out, "2.1"), "pivot_root")
    assert "[SHARED]" in pivot and "the old root was not unmounted" in pivot, pivot
    escape = lines_about(section(out, "2.3"), "the escape")
    read = "read the canary: stages-canary-" in escape or "was refused" in escape
    assert "[SHARED]" in escape and read, escape


def test_stage_2_without_the_ipc_namespace(python, stages_home, tmp_path):
    out = run_broken_tour(python, stages_home, tmp_path, """
        import sys
        from stages.isolate import Isolate
        real = Isolate.unshare
        def unshare(self, *names):
            if "ipc" in names:
                print("BROKEN: no ipc namespace", file=sys.stderr)
            return real(self, *[name for name in names if name != "ipc"])
        Isolate.unshare = unshare
        """, "--stage", "2")
    assert "[SHARED]" in lines_about(section(out, "2.1"), "ipc")
    ipc = lines_about(section(out, "2.2"), "System V IPC")
    assert "[SHARED]" in ipc and "/proc/sysvipc/msg lists queue" in ipc, ipc


def test_stage_2_without_user_namespace_or_defences_root_keeps_its_power(python, stages_home, tmp_path):
    from stages import rootfs

    built = rootfs.build(tmp_path / "private" / "rootfs", source="busybox")  # 0700 above: no user namespace
    out = run_broken_tour(python, stages_home, tmp_path, """
        import sys
        from stages.isolate import Isolate
        def drop_capabilities(self, keep=()):
            print("BROKEN: no capabilities dropped", file=sys.stderr)
            self.capabilities = []
            return {"dropped": [], "bounding": []}
        def protect_proc(self):
            print("BROKEN: /proc/sys stays writable", file=sys.stderr)
            return []
        Isolate.drop_capabilities = drop_capabilities
        Isolate.protect_proc = protect_proc
        """, "--stage", "2", "--rootfs", str(built))
    power = lines_about(section(out, "2.2"), "root's power")
    assert "[HOST ROOT'S POWER]" in power and "ALLOWED" in power, power
    assert "CAP_SYS_NICE" in power and "core_pattern" in power


def test_stage_2_without_the_cgroup_write_the_hog_survives(python, stages_home, tmp_path):
    out = run_broken_tour(python, stages_home, tmp_path, """
        import sys
        from stages.isolate import Isolate
        real = Isolate.limit
        def limit(self, *, memory=None, **others):
            print("BROKEN: no memory limit written", file=sys.stderr)
            return real(self, **others)
        Isolate.limit = limit
        """, "--stage", "2")
    memory = lines_about(section(out, "2.4"), "memory")
    assert "[UNLIMITED]" in memory and "survived" in memory, memory


def test_stage_2_without_the_bridge_the_pings_fail(python, stages_home, tmp_path):
    out = run_broken_tour(python, stages_home, tmp_path, """
        from stages.isolate import network
        real = network.Wiring._outside
        def outside(self, what, *args):
            if "master" in args:   # the host end of the veth is never plugged into the bridge
                return None
            return real(self, what, *args)
        network.Wiring._outside = outside
        """, "--stage", "2")
    wired = section(out, "2.5")
    assert "failed" in lines_about(wired, "isolate -> host"), wired
    assert "failed" in lines_about(wired, "host -> isolate"), wired


def test_stage_2_teardown_that_leaves_the_holder_says_so(python, stages_home, tmp_path):
    out = run_broken_tour(python, stages_home, tmp_path, """
        import sys
        from stages.isolate import Isolate
        real = Isolate.close
        skipped = []
        def close(self):
            if not skipped:   # the first close (section 2.6's) does nothing; the tour's own ends it
                skipped.append(self)
                print("BROKEN: the isolate is not closed", file=sys.stderr)
                return None
            return real(self)
        Isolate.close = close
        """, "--stage", "2")
    teardown = lines_about(section(out, "2.6"), "teardown")
    assert "[LEFT BEHIND]" in teardown and "or its cgroup is still there" in teardown, teardown


def test_stage_3_without_memory_and_rm(python, stages_home, tmp_path):
    out = run_broken_tour(python, stages_home, tmp_path, """
        import sys
        from stages import tour
        from stages.runtime import flags
        real = flags.Options.__init__
        def init(self, *arguments, **options):
            if options.get("name", "").startswith("tour-"):
                print("BROKEN: no --memory, no --rm", file=sys.stderr)
                options.update(memory=None, remove=False)
            real(self, *arguments, **options)
        flags.Options.__init__ = init
        """, "--stage", "2", "--stage", "3", leaves=True)
    run = section(out, "3.1")
    memory = lines_about(run, "memory")
    assert "[UNLIMITED]" in memory and "--memory not given" in memory, memory
    left = lines_about(run, "--rm")
    assert "[LEFT BEHIND]" in left and "its record" in left, left
    # 3.2's script has no memory write, and 3.3 counts one by hand and none automated
    assert f"echo {64 << 20} > " not in section(out, "3.2")
    rows = [line.split() for line in section(out, "3.3").split("side by side")[1].splitlines()]
    memory_rows = [row[-2:] for row in rows if row[:1] == [">"] and row[1].startswith("memory.")]
    assert memory_rows and all(row == ["1", "0"] for row in memory_rows), memory_rows
    # the stopped container the broken run left: removed as a person would
    name = lines_about(run, "command").split("--name ")[1].split()[0]
    removed = subprocess.run([python, "-m", "stages.cli", "rm", "-f", name], capture_output=True, text=True,
                             env=environment(stages_home, tmp_path), timeout=60)
    assert removed.returncode == 0, removed.stderr
    assert_nothing_left(stages_home, tmp_path)
