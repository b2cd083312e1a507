"""``stages doctor``: every check must say what this machine really has.

Each test compares a check with an independent look at the same fact (util-linux's unshare(1),
/proc/filesystems, /proc/self/cgroup, a run as nobody), so a doctor that always said yes would fail them.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from stages import doctor, kernel, observe
from stages.errors import StagesError

pytestmark = pytest.mark.root


def by_name(results: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {check.name: check for check in results}


def test_doctor_passes_on_this_machine_and_names_the_cgroup_layout(python, tmp_path):
    before = set(os.listdir(tempfile_dir()))
    result = subprocess.run([python, "-m", "stages.cli", "doctor"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    layout = observe.cgroup_layout()
    line = next(line for line in result.stdout.splitlines() if "cgroup layout" in line)
    expected = {"v2": "v2 only", "hybrid": "hybrid", "v1": "v1 only"}[layout]
    assert expected in line
    if layout == "hybrid":
        # A note, not a failure: marked "!" and explained, and the doctor still passes.
        assert line.lstrip().startswith("!")
        assert "cgroup2 at" in line
    assert "required checks passed" in result.stdout
    # Every probe cleaned its temporary directory.
    assert not {n for n in set(os.listdir(tempfile_dir())) - before if n.startswith("stages-doctor")}


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


def test_each_namespace_check_matches_the_kernel():
    checks = by_name(doctor.check_namespaces())
    assert set(checks) == {f"namespace {name}" for name in kernel.NAMESPACES}
    for name, (_, proc_name, option) in kernel.NAMESPACES.items():
        check = checks[f"namespace {name}"]
        exists = os.path.exists(f"/proc/self/ns/{proc_name}")
        if not exists:
            assert not check.ok and "missing" in check.detail
            continue
        # util-linux's unshare(1) is the independent witness of what the kernel allows.
        witness = subprocess.run(["unshare", option, "--fork", "true"], capture_output=True).returncode == 0
        assert check.ok == witness, (name, check)
        if check.ok:
            assert f"unshare {option} works" in check.detail
    assert checks["namespace time"].ok == os.path.exists("/proc/self/ns/time")


def test_overlay_check_mounts_a_real_overlay_and_leaves_nothing():
    with open("/proc/filesystems") as handle:
        listed = "overlay" in handle.read().split()
    check = doctor.check_overlay()
    assert check.ok == listed
    if listed:
        assert "wrote through it" in check.detail
    # The overlay lived in the probe child's mount namespace only (the leak fixture checks the host's).
    assert not any(m.fstype == "overlay" and "stages-doctor" in m.target for m in observe.mounts())


def test_cgroup_layout_and_controllers_are_reported_truthfully():
    layout_check, *controller_checks = doctor.check_cgroups()
    layout = observe.cgroup_layout()
    assert layout_check.required is False
    assert layout_check.ok == (layout == "v2")
    own = observe.cgroups_of()
    v1_controllers = {name for key in own for name in key.split(",") if key and "=" not in name}
    for name in v1_controllers:
        assert name in layout_check.detail
    checks = by_name(controller_checks)
    assert set(checks) == {"cgroup memory", "cgroup pids", "cgroup cpu"}
    for controller in doctor.CONTROLLERS:
        check = checks[f"cgroup {controller}"]
        version = "v1" if controller in v1_controllers else "v2"
        assert check.detail.startswith(version), check
        if check.ok:
            assert doctor._LIMIT_FILES[version][controller] in check.detail
    if layout == "hybrid":
        # This machine: memory in a v1 hierarchy, our memory cgroup is below /process_api or /.
        memory_path = next(path for key, path in own.items() if "memory" in key.split(","))
        assert checks["cgroup memory"].ok
        assert f"({memory_path})" in checks["cgroup memory"].detail


def test_a_path_without_busybox_fails_with_the_package_to_install(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("ip", "nft", "nsenter", "unshare"):
        os.symlink(shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin"), bin_dir / program)
    checks = by_name(doctor.check_tools(path=str(bin_dir)))
    assert not checks["busybox"].ok
    assert checks["busybox"].required
    assert checks["busybox"].fix == "apt-get install -y busybox-static"
    assert all(checks[name].ok for name in ("ip", "firewall", "nsenter", "unshare"))
    assert not doctor.passed(list(checks.values()))

    # A dynamically linked busybox is no good either: the rootfs would need the host's libraries.
    os.symlink(os.path.realpath(shutil.which("true")), bin_dir / "busybox")
    check = by_name(doctor.check_tools(path=str(bin_dir)))["busybox"]
    assert not check.ok and "dynamically linked" in check.detail


def run_as_nobody(argv: list[str], tmp_path) -> tuple[int, str, str]:
    """``stages ARGV`` through the CLI's main(), in a forked child that became nobody (uid 65534) with
    setuid(2), which drops every capability. (A fresh interpreter would not do: it lives under /root,
    which nobody may not enter.)"""
    import contextlib
    import traceback

    import stages.cli
    import stages.commands.doctor  # noqa: F401 - imported before the child loses the right to read it
    import stages.rootfs  # noqa: F401

    out_path, err_path = tmp_path / "out", tmp_path / "err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = stages.cli.main(argv)
            except BaseException:  # noqa: B036 - the traceback is what the test looks for
                traceback.print_exc(file=err)
            finally:
                out.flush()
                err.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out_path.read_text(), err_path.read_text()


def test_doctor_as_nobody_fails_and_says_to_run_as_root(tmp_path):
    code, out, err = run_as_nobody(["doctor"], tmp_path)
    assert code == 1, out + err
    assert "Traceback" not in out + err
    assert "running as uid 65534, not root" in out
    assert "fix: run it as root" in out
    assert "required checks failed" in out


def test_unprivileged_user_namespaces_note_matches_a_run_as_nobody():
    check = doctor.check_unprivileged_userns()
    assert check.required is False
    with open("/proc/sys/user/max_user_namespaces") as handle:
        assert f"user.max_user_namespaces={handle.read().strip()}" in check.detail
    witness = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                              "unshare", "--user", "true"], capture_output=True).returncode == 0
    assert check.ok == witness


def test_pivot_root_check_reports_how_root_propagates():
    check = doctor.check_pivot_root()
    root = [m for m in observe.mounts() if m.target == "/"][-1]
    assert check.ok
    assert ("/ is shared" in check.detail) == ("shared:" in root.propagation)


def test_required_failures_fail_and_notes_do_not():
    notes_only = [doctor.Check("a", True, "fine"), doctor.Check("b", False, "hybrid", "fine", required=False)]
    assert doctor.passed(notes_only)
    text = doctor.report(notes_only)
    assert "! b" in text and "note: fine" in text and "all 1 required checks passed (1 note)" in text
    failing = [*notes_only, doctor.Check("c", False, "missing", "apt-get install -y c")]
    assert not doctor.passed(failing)
    text = doctor.report(failing)
    assert "✗ c" in text and "fix: apt-get install -y c" in text and "1 of 2 required checks failed" in text


@pytest.mark.parametrize("ours, available, ok, words", [
    ("/", "memory pids cpu", True, "root cgroup"),
    ("/user.slice/session-1.scope", "memory pids cpu", False, "no internal processes"),
    ("/user.slice/session-1.scope", "pids", False, "not enabled for our cgroup"),
])
def test_cgroup_v2_without_the_controller_below_us_says_why(tmp_path, monkeypatch, ours, available, ok,
                                                            words):
    # A stand-in for a cgroup v2 machine such as the workshop VM: a directory tree with the files the
    # kernel would show. The probe cgroup made in it has no memory.max, as when the parent does not
    # enable memory for its children.
    own = tmp_path / ours.lstrip("/")
    own.mkdir(parents=True, exist_ok=True)
    (own / "cgroup.controllers").write_text(available + "\n")
    fake = doctor._Hierarchy("v2", str(tmp_path), tuple(available.split()), "/")
    monkeypatch.setattr(doctor, "_controller_hierarchy", lambda controller: fake)
    monkeypatch.setattr(observe, "cgroups_of", lambda pid="self": {"": ours})
    check = doctor.check_controller("memory")
    assert check.ok is ok and words in check.detail, check
    assert not check.ok or not check.fix
    assert sorted(os.listdir(own)) == ["cgroup.controllers"]  # the probe cgroup was removed


def _noexec_state_directory(directory: str) -> None:
    """In a probe child with a private mount namespace: STAGES_HOME on a tmpfs mounted noexec."""
    doctor._private_mounts()
    kernel.mount("tmpfs", directory, "tmpfs", kernel.MS_NOEXEC, "size=64k")
    os.environ["STAGES_HOME"] = os.path.join(directory, "stages")
    check = doctor.check_state_directory()
    if check.ok or "mounted noexec" not in check.detail or "STAGES_HOME" not in check.fix:
        raise AssertionError(f"a noexec state directory passed: {check}")


def test_a_state_directory_on_a_noexec_filesystem_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGES_HOME", str(tmp_path / "stages"))
    assert doctor.check_state_directory().ok  # pytest's /tmp allows programs here
    # The noexec mount lives only in a probe child's own mount namespace, as the doctor's probes do.
    assert doctor.probe(lambda: _noexec_state_directory(str(tmp_path))) is None


def test_the_init_check_names_the_init_a_run_will_use(tmp_path, monkeypatch):
    """A prebuilt init (an installed wheel's) is used as it is; without one (a source tree), the first run
    compiles init.c (the doctor test-builds it), later runs find the compiled copy, without a compiler a
    run has no init, and without init.c the install is broken. Each answer is checked against what the
    runtime really does."""
    from stages.runtime import overlay

    monkeypatch.setenv("STAGES_HOME", str(tmp_path))
    prebuilt = tmp_path / "prebuilt" / "stages-init"
    prebuilt.parent.mkdir()
    shutil.copy(shutil.which("true"), prebuilt)
    monkeypatch.setattr(overlay, "INIT_PREBUILT", prebuilt)
    check = doctor.check_init()
    assert check.ok and check.detail == f"{prebuilt} (prebuilt when the wheel was built)"
    assert overlay.init_program(tmp_path) == str(prebuilt)
    prebuilt.unlink()

    compiler = shutil.which("cc") or shutil.which("gcc")
    check = doctor.check_init()
    assert check.ok and f"compiles init.c with {compiler}" in check.detail
    assert "test build worked" in check.detail
    assert not (tmp_path / "init").exists()  # the test build was made, and removed, elsewhere
    program = overlay.init_program(tmp_path)
    check = doctor.check_init()
    assert check.ok and check.detail.startswith(f"{program} (compiled from init.c")

    empty = tmp_path / "no-compiler"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert doctor.check_init().ok  # the compiled copy needs no compiler
    shutil.rmtree(tmp_path / "init")
    check = doctor.check_init()
    assert overlay.init_program(tmp_path) is None  # the runtime agrees: no init
    assert not check.ok and not check.required and check.detail.startswith("none: ")
    assert "zombies" in check.detail and "apt-get install -y gcc libc6-dev" in check.fix
    assert doctor.passed([check])  # a note: stage 3 still runs

    monkeypatch.setattr(overlay, "INIT_SOURCE", tmp_path / "gone" / "init.c")
    check = doctor.check_init()
    assert not check.ok and check.required
    assert check.detail == "the container init (stages/runtime/init.c) is not installed: reinstall stages"
    with pytest.raises(StagesError, match="not installed: reinstall stages"):
        overlay.init_program(tmp_path)
