"""Root filesystems: each source builds a directory a chrooted child can live in; tarballs never write
outside it; a directory that is not ours is never clobbered.

Every "does it run" check forks, chroots and execs in a child (subprocess's preexec_fn): the pytest process
itself never changes its root.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from stages import cli, kernel, rootfs
from stages.errors import RootfsError, UnsafeArchiveError

pytestmark = pytest.mark.root


def run_chrooted(root: Path, argv: list[str], *, proc: bool = False, env: dict | None = None,
                 ) -> subprocess.CompletedProcess:
    """Fork, chroot into ``root`` and exec ``argv`` in the child. With ``proc``, the child first gets a
    mount namespace of its own, made private, with a fresh /proc inside the rootfs (gone when it exits)."""

    def enter() -> None:
        if proc:
            kernel.unshare(kernel.CLONE_NEWNS)
            kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE)
            kernel.mount("proc", str(root / "proc"), "proc")
        os.chroot(root)
        os.chdir("/")

    return subprocess.run(argv, preexec_fn=enter, capture_output=True, text=True, timeout=20,
                          env={"PATH": rootfs.PATH_INSIDE, **(env or {})})


def assert_runs_hi(root: Path) -> None:
    result = run_chrooted(root, ["/bin/sh", "-c", "echo hi; ls /"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert lines[0] == "hi"
    assert {"bin", "etc", "proc", "tmp"} <= set(lines[1:])
    # What the child lists is the rootfs, not the host's /: the host has /work, the rootfs does not.
    assert "work" not in lines


def snapshot_tree(path: Path) -> dict[str, tuple]:
    """Everything under ``path`` (lstat), to prove later that nothing changed."""
    found = {}
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(top, name)
            info = os.lstat(full)
            content = Path(full).read_bytes() if stat.S_ISREG(info.st_mode) else b""
            found[full] = (info.st_mode, info.st_size, info.st_mtime_ns, content)
    return found


# == busybox ===========================================================================================
def test_busybox_rootfs_runs_a_shell_in_a_chrooted_child(busybox_rootfs):
    assert_runs_hi(busybox_rootfs)


def test_busybox_rootfs_is_small_static_and_complete(busybox_rootfs):
    busybox = busybox_rootfs / "bin" / "busybox"
    assert rootfs.is_static(busybox)
    assert os.readlink(busybox_rootfs / "bin" / "sh") == "busybox"
    # Every applet is a link that, read as chroot(2) would, lands on busybox inside the rootfs.
    applets = rootfs.busybox_applets(rootfs.find_busybox())
    assert len(applets) > 100
    for name in applets:
        assert rootfs.resolve(busybox_rootfs, name) == busybox, name
    for name in ("proc", "sys", "dev", "tmp", "root", "etc", "home", "var", "run"):
        assert (busybox_rootfs / name).is_dir(), name
    assert stat.S_IMODE((busybox_rootfs / "tmp").stat().st_mode) == 0o1777
    passwd = (busybox_rootfs / "etc" / "passwd").read_text()
    assert passwd.startswith("root:x:0:0:") and "\nnobody:x:65534:" in passwd
    assert "stages" in (busybox_rootfs / "etc" / "os-release").read_text()
    assert "nameserver" not in (busybox_rootfs / "etc" / "resolv.conf").read_text()
    info = rootfs.describe(busybox_rootfs)
    assert info["rootfs"] and info["source"] == "busybox" and info["shell"]
    assert info["bytes"] < 5 * 1024 * 1024
    assert info["symlinks"] == len(applets) - 1


def test_busybox_applets_answer_to_their_names(busybox_rootfs):
    result = run_chrooted(busybox_rootfs, ["/bin/sh", "-c", "hostname; cat /etc/hostname; id -u; uname -s"])
    assert result.returncode == 0, result.stderr
    host_name, file_name, uid, system = result.stdout.split()
    assert file_name == "stages" and uid == "0" and system == "Linux"
    # stage 1's lesson starts here: the jail still shows the host's hostname.
    assert host_name == os.uname().nodename


def test_busybox_build_is_fast(tmp_path):
    start = time.perf_counter()
    rootfs.build(tmp_path / "fast")
    assert time.perf_counter() - start < 1.0


def test_busybox_commands_pick_the_applets(tmp_path):
    root = rootfs.build(tmp_path / "few", commands=["ls", "cat"])
    assert sorted(os.listdir(root / "bin")) == ["busybox", "cat", "ls", "sh"]
    assert run_chrooted(root, ["/bin/ls", "/etc"]).stdout.split().count("passwd") == 1
    with pytest.raises(RootfsError, match="no command 'no-such-applet'"):
        rootfs.build(tmp_path / "bad", commands=["no-such-applet"])
    assert not (tmp_path / "bad").exists()


def test_missing_busybox_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(rootfs, "BUSYBOX_PATHS", (str(tmp_path / "none"),))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    with pytest.raises(RootfsError) as caught:
        rootfs.build(tmp_path / "r")
    assert "apt-get install busybox-static" in caught.value.hint
    assert not (tmp_path / "r").exists()


def test_dynamic_busybox_is_refused(tmp_path, monkeypatch):
    dynamic = tmp_path / "busybox"
    shutil.copy2("/bin/ls", dynamic)
    monkeypatch.setattr(rootfs, "BUSYBOX_PATHS", (str(dynamic),))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    with pytest.raises(RootfsError, match="dynamically linked") as caught:
        rootfs.build(tmp_path / "r")
    assert "busybox-static" in caught.value.hint


def test_elf_interpreter(tmp_path):
    loader = rootfs.elf_interpreter(os.path.realpath("/bin/ls"))
    assert loader and loader.startswith("/") and os.path.exists(loader)
    assert rootfs.elf_interpreter("/bin/busybox") is None
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    assert not rootfs.is_static(script)
    with pytest.raises(RootfsError, match="not an ELF"):
        rootfs.elf_interpreter(script)


# == host ==============================================================================================
@pytest.fixture(scope="module")
def host_rootfs(tmp_path_factory) -> Path:
    return rootfs.build(tmp_path_factory.mktemp("host") / "rootfs", "host")


def test_host_rootfs_runs_a_shell_in_a_chrooted_child(host_rootfs):
    assert_runs_hi(host_rootfs)


def test_host_rootfs_library_closure_is_complete(host_rootfs):
    # The loader itself, run inside the chroot, lists what each program would load: LD_TRACE_LOADED_OBJECTS
    # is what ldd(1) sets. "not found" would mean the copy missed a library.
    for name in rootfs.HOST_COMMANDS:
        result = run_chrooted(host_rootfs, [f"/bin/{name}"], env={"LD_TRACE_LOADED_OBJECTS": "1"})
        assert result.returncode == 0, (name, result.stderr)
        assert "not found" not in result.stdout, (name, result.stdout)
    # And every program really runs (ps needs a /proc: the child mounts one in its own mount namespace).
    script = ("echo hi; ls /etc >/dev/null; cat /etc/hostname; id -u; hostname >/dev/null; uname -s; "
              "env >/dev/null; true; ! false; sleep 0; ip -V >/dev/null; mount --version >/dev/null; "
              "ps -o pid= -p $$")
    result = run_chrooted(host_rootfs, ["/bin/sh", "-c", script], proc=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:4] == ["hi", "stages", "0", "Linux"]
    assert rootfs.describe(host_rootfs)["commands"] == list(rootfs.HOST_COMMANDS)
    # Building the same again does nothing.
    marker = (host_rootfs / rootfs.MARKER).stat().st_ino
    rootfs.build(host_rootfs, "host")
    assert (host_rootfs / rootfs.MARKER).stat().st_ino == marker


def test_host_rootfs_keeps_the_loader_at_its_absolute_path(host_rootfs):
    loader = rootfs.elf_interpreter(os.path.realpath("/bin/ls"))
    assert rootfs.resolve(host_rootfs, loader).is_file()
    # The program inside asks for the same loader, so the kernel finds it after chroot(2).
    assert rootfs.elf_interpreter(rootfs.resolve(host_rootfs, "/bin/ls")) == loader


def test_host_commands_and_scripts(tmp_path, monkeypatch):
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "hello").write_text("#!/bin/sh\necho hello from a script\n")
    (tools / "hello").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")
    root = rootfs.build(tmp_path / "r", "host", commands=["hello", "cat"])
    names = set(os.listdir(root / "bin"))
    assert {"hello", "cat", "sh"} <= names and "ls" not in names
    result = run_chrooted(root, ["/bin/hello"])
    assert result.stdout == "hello from a script\n", result.stderr
    with pytest.raises(RootfsError, match="no program 'no-such-program'"):
        rootfs.build(tmp_path / "bad", "host", commands=["no-such-program"])
    assert not (tmp_path / "bad").exists()


# == tarballs ==========================================================================================
def add_file(tar: tarfile.TarFile, name: str, data: bytes = b"x", mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def add_link(tar: tarfile.TarFile, name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tar.addfile(info)


def add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    tar.addfile(info)


@pytest.fixture(scope="module")
def busybox_tarball(tmp_path_factory, busybox_rootfs) -> Path:
    """The busybox rootfs as a tarball, with what real images have: an absolute symlink, a hard link, a
    setuid program and a device node."""
    path = tmp_path_factory.mktemp("tarball") / "busybox.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(busybox_rootfs, arcname=".", filter=lambda info: None if info.name == f"./{rootfs.MARKER}"
                else info)
        add_link(tar, "usr/local/bin/sh", "/bin/busybox")
        add_link(tar, "bin/hard-busybox", "bin/busybox", tarfile.LNKTYPE)
        add_file(tar, "usr/bin/setuid-thing", b"#!/bin/sh\n", mode=0o4755)
        device = tarfile.TarInfo("dev/null")
        device.type, device.devmajor, device.devminor, device.mode = tarfile.CHRTYPE, 1, 3, 0o666
        tar.addfile(device)
        fifo = tarfile.TarInfo("run/pipe")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    return path


def compressed(tarball: Path, suffix: str) -> Path:
    target = tarball.with_name(tarball.name + suffix)
    if target.exists():
        return target
    if suffix == ".gz":
        subprocess.run(["gzip", "-kf", str(tarball)], check=True)
    elif suffix == ".xz":
        subprocess.run(["xz", "-kf", "-T1", "-0", str(tarball)], check=True)
    elif suffix == ".zst":
        if not shutil.which("zstd"):
            pytest.skip("zstd is not installed")
        subprocess.run(["zstd", "-qf", str(tarball), "-o", str(target)], check=True)
    return target


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz", ".zst"])
def test_tarball_rootfs_runs_a_shell_in_a_chrooted_child(tmp_path, busybox_tarball, suffix, caplog):
    archive = compressed(busybox_tarball, suffix) if suffix else busybox_tarball
    root = rootfs.build(tmp_path / "r", archive)
    assert_runs_hi(root)
    # An absolute target is kept as it is: chroot(2) reads it inside the rootfs.
    assert os.readlink(root / "usr" / "local" / "bin" / "sh") == "/bin/busybox"
    assert run_chrooted(root, ["/usr/local/bin/sh", "-c", "echo via-absolute"]).stdout == "via-absolute\n"
    assert (root / "bin" / "hard-busybox").stat().st_ino == (root / "bin" / "busybox").stat().st_ino
    # Skipped and changed entries are named, in the log and in what describe() says.
    assert not os.path.lexists(root / "dev" / "null") and not os.path.lexists(root / "run" / "pipe")
    assert not (root / "usr" / "bin" / "setuid-thing").stat().st_mode & stat.S_ISUID
    warnings = rootfs.describe(root)["warnings"]
    assert any("'dev/null'" in line and "character device" in line for line in warnings)
    assert any("'run/pipe'" in line for line in warnings)
    assert any("setuid" in line and "usr/bin/setuid-thing" in line for line in warnings)
    assert "'dev/null'" in caplog.text
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert rootfs.describe(root)["tarball"] == os.path.abspath(archive)
    assert rootfs.describe(root)["source"] == "tarball"


def test_tarball_rebuild_is_a_noop_until_it_changes(tmp_path, busybox_tarball):
    copy = tmp_path / "image.tar"
    shutil.copy2(busybox_tarball, copy)
    root = rootfs.build(tmp_path / "r", copy)
    marker = (root / rootfs.MARKER).stat().st_ino
    rootfs.build(root, copy)
    assert (root / rootfs.MARKER).stat().st_ino == marker
    with tarfile.open(copy, "a") as tar:
        add_file(tar, "etc/motd", b"new\n")
    rootfs.build(root, copy)
    assert (root / "etc" / "motd").read_text() == "new\n"


def hostile(tar: tarfile.TarFile, kind: str, outside: Path) -> str:
    """Write one hostile archive; return the entry that must be named in the refusal."""
    add_file(tar, "etc/harmless", b"first, something harmless\n")
    if kind == "dotdot":
        add_file(tar, "../outside/canary", b"pwned")
        return "../outside/canary"
    if kind == "dotdot-deep":
        add_file(tar, "etc/../../outside/new", b"pwned")
        return "etc/../../outside/new"
    if kind == "absolute":
        add_file(tar, f"{outside}/canary", b"pwned")
        return f"{outside}/canary"
    if kind == "symlink-escape":
        add_link(tar, "etc/up", "../../outside")
        add_file(tar, "etc/up/canary", b"pwned")
        return "etc/up"
    if kind == "symlink-absolute-dotdot":
        add_link(tar, "up", "/../../../../../../../../" + str(outside).lstrip("/"))
        return "up"
    if kind == "through-symlink":
        add_link(tar, "evil", str(outside))  # absolute: allowed as a link, but never written through
        add_file(tar, "evil/canary", b"pwned")
        return "evil/canary"
    if kind == "dir-through-symlink":
        add_link(tar, "evil", str(outside))
        add_dir(tar, "evil/newdir")
        return "evil/newdir"
    if kind == "hardlink-outside":
        add_link(tar, "etc/stolen", "../outside/canary", tarfile.LNKTYPE)
        return "etc/stolen"
    if kind == "hardlink-absolute":
        add_link(tar, "etc/stolen", str(outside / "canary"), tarfile.LNKTYPE)
        return "etc/stolen"
    if kind == "hardlink-through-symlink":
        add_link(tar, "evil", str(outside))
        add_link(tar, "etc/stolen", "evil/canary", tarfile.LNKTYPE)
        return "etc/stolen"
    if kind == "relink-then-traverse":
        add_file(tar, "sub", b"a plain file first")
        add_link(tar, "sub", str(outside))  # replaces the file, as tar(1) would
        add_file(tar, "sub/canary", b"pwned")
        return "sub/canary"
    raise AssertionError(kind)


HOSTILE = ["dotdot", "dotdot-deep", "absolute", "symlink-escape", "symlink-absolute-dotdot",
           "through-symlink", "dir-through-symlink", "hardlink-outside", "hardlink-absolute",
           "hardlink-through-symlink", "relink-then-traverse"]


@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "empty-dir"])
def test_hostile_tarball_is_refused_and_nothing_escapes(tmp_path, kind, existing):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("the canary\n")
    (outside / "canary").chmod(0o600)
    before = snapshot_tree(outside)
    archive = tmp_path / f"{kind}.tar"
    with tarfile.open(archive, "w") as tar:
        entry = hostile(tar, kind, outside)
    target = tmp_path / "deep" / "rootfs"
    if existing:
        target.mkdir(parents=True)
    with pytest.raises(UnsafeArchiveError) as caught:
        rootfs.build(target, archive)
    assert repr(entry) in caught.value.message
    assert caught.value.hint
    assert snapshot_tree(outside) == before
    # What was extracted before the hostile entry is gone again: the directory is as it was found.
    assert (list(target.iterdir()) == []) if existing else not (tmp_path / "deep").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["outside", archive.name]
                                                                + (["deep"] if existing else []))


def test_extract_never_writes_through_a_symlink_made_before(tmp_path):
    # A link already in the directory (say, made by an earlier layer) is not followed either.
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "rootfs"
    target.mkdir()
    (target / "etc").symlink_to(outside)
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        add_file(tar, "etc/passwd", b"pwned")
    with pytest.raises(UnsafeArchiveError, match="'etc/passwd'.*symbolic link 'etc'"):
        rootfs.extract(archive, target)
    assert list(outside.iterdir()) == []


def test_later_entries_replace_earlier_ones_without_following_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("safe\n")
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        add_link(tar, "file", str(outside / "canary"))
        add_file(tar, "file", b"replaced\n")  # must replace the link, not write into the canary
        add_dir(tar, "ro", 0o555)
        add_file(tar, "ro/inside", b"written before the directory became read-only\n")
    target = tmp_path / "rootfs"
    target.mkdir()
    assert rootfs.extract(archive, target) == []
    assert (target / "file").read_text() == "replaced\n" and not (target / "file").is_symlink()
    assert (outside / "canary").read_text() == "safe\n"
    assert stat.S_IMODE((target / "ro").stat().st_mode) == 0o555
    assert (target / "ro" / "inside").exists()


def test_symlink_escapes():
    assert not rootfs.symlink_escapes("bin/sh", "busybox")
    assert not rootfs.symlink_escapes("bin/sh", "/bin/busybox")
    assert not rootfs.symlink_escapes("usr/bin/x", "../../bin/busybox")
    assert rootfs.symlink_escapes("usr/bin/x", "../../../etc/passwd")
    assert rootfs.symlink_escapes("x", "..")
    assert rootfs.symlink_escapes("x", "/../etc")
    assert not rootfs.symlink_escapes("a/b", "../a/../b/./c")


def test_not_a_tarball(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_text("not a tar archive\n")
    with pytest.raises(RootfsError, match="not a tar archive"):
        rootfs.build(tmp_path / "r", junk)
    with pytest.raises(RootfsError, match="no tarball"):
        rootfs.build(tmp_path / "r", tmp_path / "missing.tar.gz")
    with pytest.raises(RootfsError, match="commands can only be picked"):
        rootfs.build(tmp_path / "r", junk, commands=["ls"])
    assert not (tmp_path / "r").exists()


# == idempotency and no-clobber ========================================================================
def test_building_again_is_a_noop_and_force_rebuilds(tmp_path):
    root = rootfs.build(tmp_path / "r")
    busybox = (root / "bin" / "busybox").stat().st_ino
    (root / "tmp" / "mine").write_text("left by the learner\n")
    assert rootfs.build(root) == root
    assert (root / "bin" / "busybox").stat().st_ino == busybox
    assert (root / "tmp" / "mine").exists()
    rootfs.build(root, force=True)
    assert not (root / "tmp" / "mine").exists()
    assert_runs_hi(root)


def test_a_different_source_replaces_our_rootfs_cleanly(tmp_path):
    root = rootfs.build(tmp_path / "r")
    rootfs.build(root, "host", commands=["ls"])
    assert not (root / "bin" / "busybox").exists()
    assert rootfs.describe(root)["source"] == "host"
    assert_runs_hi(root)


def test_a_directory_that_is_not_ours_is_never_clobbered(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work\n")
    before = snapshot_tree(precious)
    for force in (False, True):
        with pytest.raises(RootfsError, match="not empty and was not built by stages") as caught:
            rootfs.build(precious, force=force)
        assert "new or empty directory" in caught.value.hint
    assert snapshot_tree(precious) == before
    info = rootfs.describe(precious)
    assert not info["rootfs"] and info["files"] == 1 and not info["shell"]
    assert snapshot_tree(precious) == before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RootfsError, match="is a file"):
        rootfs.build(a_file)
    with pytest.raises(RootfsError, match="cannot be /"):
        rootfs.build("/")


def test_an_empty_directory_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    assert rootfs.is_rootfs(rootfs.build(tmp_path / "empty"))


def test_an_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rootfs.shutil, "copy2", interrupt)
    with pytest.raises(KeyboardInterrupt):
        rootfs.build(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyboardInterrupt):
        rootfs.build(tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_half_built_rootfs_of_ours_is_rebuilt(tmp_path):
    root = rootfs.build(tmp_path / "r")
    marker = json.loads((root / rootfs.MARKER).read_text())
    marker["complete"] = False  # as if the build had been killed (SIGKILL: no cleanup ran)
    (root / rootfs.MARKER).write_text(json.dumps(marker))
    (root / "bin" / "busybox").unlink()
    assert not rootfs.is_rootfs(root)
    rootfs.build(root)
    assert rootfs.is_rootfs(root) and (root / "bin" / "busybox").is_file()


def test_rebuild_refuses_while_something_is_mounted_inside(tmp_path, scratch_rootfs, python):
    # In a child's private mount namespace (mount_namespaces(7)), so the host never sees the mount.
    code = (
        "import sys\n"
        "from stages import rootfs\n"
        "from stages.errors import RootfsError\n"
        "try:\n"
        "    rootfs.build(sys.argv[1], force=True)\n"
        "except RootfsError as error:\n"
        "    print(error)\n"
    )
    (scratch_rootfs / "proc" / "kept").write_text("under the mount\n")
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs none "$1/proc" && echo inside > "$1/proc/file" && {python} -c "$2" "$1" && '
         f'cat "$1/proc/file"', "sh", str(scratch_rootfs), code],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert "still has something mounted inside it" in result.stdout
    assert "umount" in result.stdout
    assert result.stdout.strip().endswith("inside")  # the mounted filesystem was not emptied
    assert (scratch_rootfs / "proc" / "kept").exists()


# == checks ============================================================================================
def test_check(tmp_path, busybox_rootfs):
    assert rootfs.check(busybox_rootfs) == busybox_rootfs
    with pytest.raises(RootfsError, match="does not exist") as caught:
        rootfs.check(tmp_path / "missing")
    assert "stages rootfs build" in caught.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(RootfsError, match=r"empty is not a root filesystem: it has no /bin/sh") as caught:
        rootfs.check(tmp_path / "empty")
    assert caught.value.hint == f"build one with: stages rootfs build {tmp_path / 'empty'}"


def test_noexec_is_detected(tmp_path, python):
    # A tmpfs mounted noexec, in a child's private mount namespace: the host never sees it.
    code = (
        "import sys\n"
        "from stages import rootfs\n"
        "from stages.errors import RootfsError\n"
        "print(rootfs.is_noexec(sys.argv[1]), rootfs.is_noexec('/'))\n"
        "root = rootfs.build(sys.argv[1] + '/rootfs')\n"
        "try:\n"
        "    rootfs.check(root)\n"
        "except RootfsError as error:\n"
        "    print(error)\n"
    )
    (tmp_path / "mnt").mkdir()
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs -o noexec none "$1" && {python} -c "$2" "$1"', "sh", str(tmp_path / "mnt"), code],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "True False"
    assert "mounted noexec" in lines[1] and "hint:" in lines[2]
    assert not rootfs.is_noexec(tmp_path)


def test_resolve_stays_inside(scratch_rootfs):
    root = scratch_rootfs
    (root / "etc" / "up").symlink_to("../../../../..")
    (root / "etc" / "abs").symlink_to("/etc/passwd")
    assert rootfs.resolve(root, "/../../etc/passwd") == root / "etc" / "passwd"
    assert rootfs.resolve(root, "/etc/up/etc/passwd") == root / "etc" / "passwd"
    assert rootfs.resolve(root, "etc/abs") == root / "etc" / "passwd"
    (root / "loop").symlink_to("loop")
    with pytest.raises(RootfsError, match="loop of symbolic links"):
        rootfs.resolve(root, "/loop")


def test_default_rootfs_is_built_once_and_shared(tmp_path, monkeypatch, python):
    monkeypatch.setenv("STAGES_HOME", str(tmp_path / "state"))
    assert rootfs.state_dir() == tmp_path / "state"
    # Three processes at once: one builds, the others wait on the lock and get the same rootfs.
    code = "from stages import rootfs; print(rootfs.default_rootfs())"
    children = [subprocess.Popen([python, "-c", code], stdout=subprocess.PIPE, text=True,
                                 cwd=Path(__file__).parent.parent) for _ in range(3)]
    outputs = {child.communicate(timeout=30)[0].strip() for child in children}
    assert all(child.returncode == 0 for child in children)
    assert outputs == {str(tmp_path / "state" / "rootfs" / "busybox")}
    root = rootfs.default_rootfs()
    assert rootfs.is_rootfs(root)
    marker = (root / rootfs.MARKER).stat().st_ino
    assert rootfs.default_rootfs() == root and (root / rootfs.MARKER).stat().st_ino == marker
    assert_runs_hi(root)


# == the command line ==================================================================================
def test_cli_build_show_check(tmp_path, capsys):
    target = tmp_path / "r"
    assert cli.main(["rootfs", "build", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"built a busybox rootfs in {target}" in out and " MB" in out and "files" in out
    assert cli.main(["rootfs", "build", str(target)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli.main(["rootfs", "show", str(target)]) == 0
    out = capsys.readouterr().out
    assert "busybox" in out and "yes, built by stages" in out
    assert cli.main(["rootfs", "check", str(target)]) == 0
    assert_runs_hi(target)


def test_cli_host_with_commands_and_explain(tmp_path, capsys):
    target = tmp_path / "h"
    assert cli.main(["rootfs", "build", str(target), "--from", "host", "--command", "ls", "--command", "cat",
                     "--explain"]) == 0
    out = capsys.readouterr().out
    assert "ldd " in out and "cp --parents" in out and "built a host rootfs" in out
    assert run_chrooted(target, ["/bin/cat", "/etc/hostname"]).stdout == "stages\n"


def test_cli_tarball_warns_about_skipped_entries(tmp_path, capsys, busybox_tarball):
    assert cli.main(["rootfs", "build", str(tmp_path / "t"), "--from", str(busybox_tarball)]) == 0
    captured = capsys.readouterr()
    assert "warning: skipped 'dev/null'" in captured.err
    assert f"built from {busybox_tarball} in {tmp_path / 't'}" in captured.out


def test_cli_errors_are_one_sentence_and_a_hint(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "file").write_text("x")
    assert cli.main(["rootfs", "build", str(tmp_path / "mine")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("stages rootfs: ") and "\n  hint: " in err and "Traceback" not in err
    assert cli.main(["rootfs", "check", str(tmp_path / "mine")]) == 1
    assert "has no /bin/sh" in capsys.readouterr().err


def test_cli_as_a_program(tmp_path, python):
    result = subprocess.run([python, "-m", "stages.cli", "rootfs", "build", str(tmp_path / "r")],
                            capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert "built a busybox rootfs" in result.stdout
    assert_runs_hi(tmp_path / "r")
