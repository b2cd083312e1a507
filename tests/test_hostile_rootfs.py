"""A rootfs is hostile input (issue #10, finding 2): every path the runtime writes inside one is looked up
inside it, and a symbolic link that leads out is refused with one sentence, the host untouched.

Each hostile image points one of the paths the runtime writes (``/dev``, ``/etc``, ``/proc``, ``/sys``,
a mount target, a volume target, ``/etc/hosts``, ``/etc/resolv.conf``, ``/etc/hostname``; the init
is bound at ``/dev/.stages-init``, inside the /dev tmpfs the runtime mounts) at a *victim* directory of
the host, with an absolute link or with ``..`` that climb above the root. Before the fix, ``stages run``
of such an image filled the victim with device nodes (or mounted over it, or created files in it). Each
test asserts the refusal sentence and that the victim is still empty and has nothing mounted on it.
Links that stay inside the rootfs keep working, resolved there.

Stage 3 is driven as a learner would (``stages import`` of a tarball the test builds, ``stages run``),
stages-oci through a bundle, stage 2 through :class:`stages.isolate.Isolate`.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from stages import kernel, rootfs
from stages.errors import RootfsError, StagesError
from stages.isolate import Isolate
from stages.runtime import oci

pytestmark = pytest.mark.root

OUT = "out of its root filesystem"
CLIMB = "../" * 24  # more than enough '..' to climb from any rootfs up to the host's /


@pytest.fixture
def victim():
    """A directory of the host that a hostile image aims at; reachable (not below a 0700 directory)."""
    top = tempfile.mkdtemp(prefix="stages-victim-", dir="/var/tmp")  # not /tmp: stage 2 links /tmp
    os.chmod(top, 0o755)
    yield Path(top)
    shutil.rmtree(top, ignore_errors=True)


def untouched(victim: Path) -> None:
    """The victim holds nothing, and nothing is mounted on it or below it."""
    assert os.listdir(victim) == [], f"the host's {victim} received {os.listdir(victim)}"
    with open("/proc/self/mountinfo") as handle:
        assert not [line for line in handle if str(victim) in line.split(" ")[4]]


def link(rootfs_dir: Path, path: str, target: str) -> None:
    """Make ``path`` of the rootfs a symbolic link to ``target`` (whatever was there goes)."""
    where = rootfs_dir / path.lstrip("/")
    if where.is_dir() and not where.is_symlink():
        shutil.rmtree(where)
    elif where.exists() or where.is_symlink():
        where.unlink()
    where.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, where)


# == the kernel helper: openat2(2) RESOLVE_IN_ROOT, and the walk for kernels without it ===============
@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch):
    """open_in_root with openat2, and forced to the component-by-component walk (as on a kernel without
    openat2: the syscall must not even be tried)."""
    if request.param == "walk":
        monkeypatch.setenv("STAGES_OPENAT2", "0")
        monkeypatch.setattr(kernel, "openat2", lambda *a, **k: pytest.fail("openat2 called in walk mode"))
    return request.param


def test_open_in_root_never_reaches_the_hosts_etc(tmp_path, resolver):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("the rootfs's own passwd\n")
    (root / "a" / "b").mkdir(parents=True)
    os.symlink("../../../../../../etc", root / "a" / "b" / "up")  # climbs far above the root
    os.symlink("/etc", root / "a" / "absolute")
    os.symlink("/proc/self/root/etc", root / "a" / "magic")  # text, as a hostile image can hold
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for path in ("a/b/up/passwd", "a/absolute/passwd", "/a/../../../etc/passwd", "a/magic/passwd"):
            try:
                opened = kernel.open_in_root(fd, path, os.O_RDONLY)
            except OSError as error:  # the magic-link text leads nowhere inside: not found, never the host
                assert path == "a/magic/passwd" and error.errno in (errno.ENOENT, errno.ELOOP), error
                continue
            with os.fdopen(opened) as handle:
                assert handle.read() == "the rootfs's own passwd\n", path
        # created through the climbing link: inside the root, never in the host's /etc
        made = kernel.open_in_root(fd, "a/b/up/stages-test-file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(made)
        assert (root / "etc" / "stages-test-file").exists() and not os.path.exists("/etc/stages-test-file")
        with pytest.raises(FileNotFoundError, match="no such file"):
            kernel.open_in_root(fd, "a/b/missing/x")
    finally:
        os.close(fd)


def test_open_in_root_gives_up_on_a_loop(tmp_path, resolver):
    os.symlink("loop", tmp_path / "loop")
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as caught:
            kernel.open_in_root(fd, "loop/x")
        assert caught.value.errno == errno.ELOOP
    finally:
        os.close(fd)


def test_the_rule_for_links_refuses_those_out_and_follows_those_inside(tmp_path, victim, resolver):
    root = tmp_path / "root"
    for directory in ("etc", "run", "var", "srv/deep"):
        (root / directory).mkdir(parents=True)
    os.symlink(str(victim), root / "dev")  # absolute, and the rootfs has no such path: the host's
    os.symlink("../run/resolv.conf", root / "etc" / "resolv.conf")  # relative, inside
    os.symlink("/run", root / "var" / "run")  # absolute, and the rootfs has /run: its own
    os.symlink("../../../etc", root / "srv" / "deep" / "up")  # climbs above the root
    os.symlink("self", root / "self")
    with rootfs.Root(root) as inside:
        assert inside.resolve("/etc/resolv.conf") == "/run/resolv.conf"
        assert inside.resolve("/var/run/docker.sock") == "/run/docker.sock"
        assert inside.resolve("/../../etc/./hosts") == "/etc/hosts"  # '..' at the root is the root
        with pytest.raises(RootfsError) as caught:
            inside.resolve("/dev/null")
        assert caught.value.message.startswith(f"the image's /dev is a symbolic link to {victim}, {OUT}")
        with pytest.raises(RootfsError, match=r"the image's /srv/deep/up is a symbolic link to "
                                              r"\.\./\.\./\.\./etc, out of its root filesystem: its"):
            inside.resolve("/srv/deep/up/passwd")
        with pytest.raises(RootfsError, match="loop of symbolic links"):
            inside.resolve("/self/x")
        inside.make_file("/etc/resolv.conf")  # made where the link leads, inside
        assert (root / "run" / "resolv.conf").is_file()
    untouched(victim)


# == stage 3: stages import + stages run ==============================================================
@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile-home")


@pytest.fixture
def stages(home, tmp_path):
    env = dict(os.environ, STAGES_HOME=str(home), STAGES_RUN=str(tmp_path / "run"))
    env.pop("STAGES_HOST_NETNS", None)

    def call(*argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "stages.cli", *argv], capture_output=True, text=True,
                                env=env, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"stages {' '.join(argv)} -> {result.returncode}\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result

    yield call
    subprocess.run([sys.executable, "-m", "stages.cli", "prune"], env=env, capture_output=True, timeout=60)


_images = iter(range(1_000_000))


def image(stages, tmp_path: Path, busybox_rootfs: Path, change) -> str:
    """A busybox image changed by ``change(rootfs_dir)``, imported from a tarball; returns its name."""
    tree = tmp_path / f"image-{next(_images)}"
    shutil.copytree(busybox_rootfs, tree, symlinks=True)
    change(tree)
    archive = tree.with_suffix(".tar")
    with tarfile.open(archive, "w") as tar:
        tar.add(tree, arcname=".")
    name = f"hostile{next(_images)}:1"
    stages("import", str(archive), name)
    return name


STAGE3_PATHS = ["/dev", "/proc", "/sys", "/etc", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf"]


@pytest.mark.parametrize("path", STAGE3_PATHS)
def test_stage3_an_image_whose_path_links_out_is_refused(stages, tmp_path, busybox_rootfs, victim, path):
    name = image(stages, tmp_path, busybox_rootfs, lambda tree: link(tree, path, str(victim)))
    result = stages("run", "--rm", "--network", "none", name, "true", check=False)
    assert result.returncode != 0
    assert f"the image's {path} is a symbolic link to {victim}, {OUT}" in result.stderr, result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.stderr
    untouched(victim)
    assert stages("ps", "-a", "-q").stdout.strip() == ""  # --rm removed it, refused or not


def test_stage3_a_volume_whose_target_links_out_is_refused(stages, tmp_path, busybox_rootfs, victim):
    name = image(stages, tmp_path, busybox_rootfs, lambda tree: link(tree, "/data", str(victim)))
    source = tmp_path / "volume"
    source.mkdir()
    (source / "file").write_text("from the volume\n")
    result = stages("run", "--rm", "--network", "none", "-v", f"{source}:/data", name, "true", check=False)
    assert result.returncode != 0
    assert f"the image's /data is a symbolic link to {victim}, {OUT}" in result.stderr, result.stderr
    untouched(victim)


def test_stage3_a_link_that_climbs_out_never_reaches_the_store(stages, tmp_path, victim):
    """A link whose '..' climb above the root cannot even enter an image: `stages import` refuses it
    (stage 1's extractor, tests/test_images.py), and so does a build whose RUN makes one (its layer goes
    through the same extractor). Absolute links can, and are refused at run time (above)."""
    context = tmp_path / "context"
    context.mkdir()
    climbing = CLIMB + str(victim).lstrip("/")
    (context / "Containerfile").write_text(f"FROM busybox\nRUN ln -s {climbing} /data\n")
    result = stages("build", "-t", "climber:1", str(context), check=False)
    assert result.returncode != 0 and "which points outside the rootfs" in result.stderr, result.stderr
    untouched(victim)


def test_stage3_links_inside_the_image_keep_working_resolved_inside(stages, tmp_path, busybox_rootfs, victim):
    def change(tree: Path) -> None:
        link(tree, "/etc/resolv.conf", "../run/resolv.conf")  # Debian's kind of link, and it dangles
        link(tree, "/var/run", "/run")  # absolute, to the image's own /run
        (tree / "devices").mkdir()
        link(tree, "/dev", "/devices")  # absolute, to a directory the image has: its own

    name = image(stages, tmp_path, busybox_rootfs, change)
    source = tmp_path / "volume"
    source.mkdir()
    (source / "file").write_text("from the volume\n")
    result = stages("run", "--rm", "--network", "none", "-v", f"{source}:/var/run/shared", name, "sh", "-c",
                    "head -1 /run/resolv.conf; head -1 /etc/resolv.conf; cat /run/shared/file; "
                    "echo x > /dev/null && ls /devices | grep -c null")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# written by stages for this container"), result.stdout
    assert lines[1] == lines[0]
    assert lines[2] == "from the volume"
    assert lines[3] == "1"  # the container's /dev is a tmpfs on the image's /devices
    untouched(victim)


# == stages-oci: a bundle =============================================================================
def bundle(tmp_path: Path, rootfs_dir: Path, change=None, args=("true",)) -> str:
    config = oci.default_spec(list(args), rootfs=str(rootfs_dir))
    if change is not None:
        change(config)
    return oci.write_bundle(tmp_path / "bundle", config)


def run(tmp_path: Path, root: str, bundle_dir: str, name: str = "hostile") -> tuple[int, str]:
    """``stages-oci run``: the exit code and what the container wrote."""
    output = tmp_path / "output"
    with open(os.devnull) as stdin, open(output, "w") as out:
        code = oci.run(name, bundle_dir, root=root, stdio=(stdin, out, out))
    return code, output.read_text()


def own_rootfs(tmp_path: Path, busybox_rootfs: Path) -> Path:
    tree = tmp_path / "rootfs"
    shutil.copytree(busybox_rootfs, tree, symlinks=True)
    return tree


@pytest.mark.parametrize("kind", ["absolute", "climbing"])
def test_oci_a_dev_that_links_out_is_refused(tmp_path, root, busybox_rootfs, victim, kind):
    tree = own_rootfs(tmp_path, busybox_rootfs)
    target = str(victim) if kind == "absolute" else CLIMB + str(victim).lstrip("/")
    link(tree, "/dev", target)
    with pytest.raises(RootfsError) as caught:
        run(tmp_path, root, bundle(tmp_path, tree))
    assert caught.value.message.startswith(f"the image's /dev is a symbolic link to {target}, {OUT}")
    assert caught.value.hint
    untouched(victim)
    assert oci.list_containers(root) == []


def test_oci_a_mount_target_that_links_out_is_refused(tmp_path, root, busybox_rootfs, victim):
    tree = own_rootfs(tmp_path, busybox_rootfs)
    link(tree, "/srv", str(victim))

    def change(config):
        config["mounts"].append({"destination": "/srv/data", "type": "tmpfs", "source": "tmpfs"})

    with pytest.raises(RootfsError, match=f"the image's /srv is a symbolic link to {victim}, {OUT}"):
        run(tmp_path, root, bundle(tmp_path, tree, change))
    untouched(victim)


def test_oci_a_linux_devices_node_that_links_out_is_refused(tmp_path, root, busybox_rootfs, victim):
    tree = own_rootfs(tmp_path, busybox_rootfs)
    link(tree, "/opt", str(victim))

    def change(config):
        config["linux"]["devices"] = [{"path": "/opt/null2", "type": "c", "major": 1, "minor": 3}]

    with pytest.raises(RootfsError, match=f"the image's /opt is a symbolic link to {victim}, {OUT}"):
        run(tmp_path, root, bundle(tmp_path, tree, change))
    untouched(victim)


def test_oci_a_root_path_that_leads_to_the_hosts_root_is_refused(tmp_path, root):
    os.symlink("/", tmp_path / "rootfs")
    with pytest.raises(StagesError, match=r"root.path: is the host's own root directory / \(.*rootfs leads "
                                          r"there\)"):
        oci.create("hostile", bundle(tmp_path, tmp_path / "rootfs"), root=root)
    assert oci.list_containers(root) == []


def test_oci_a_bind_target_that_links_inside_is_made_there(tmp_path, root, busybox_rootfs, victim):
    tree = own_rootfs(tmp_path, busybox_rootfs)
    (tree / "run").mkdir(exist_ok=True)
    link(tree, "/etc/motd", "../run/motd")
    source = tmp_path / "motd"
    source.write_text("bound\n")

    def change(config):
        config["mounts"].append({"destination": "/etc/motd", "type": "bind", "source": str(source),
                                 "options": ["bind", "ro"]})

    config = bundle(tmp_path, tree, change, ["cat", "/run/motd"])
    assert run(tmp_path, root, config, "inside") == (0, "bound\n")
    assert (tree / "run" / "motd").read_text() == ""  # the empty file made inside to bind on
    untouched(victim)


# == stage 2: the isolate's own mounts before pivot_root ==============================================
@pytest.fixture
def stage2_rootfs(busybox_rootfs, monkeypatch, tmp_path):
    monkeypatch.setenv("STAGES_RUN", str(tmp_path / "run"))
    top = Path(tempfile.mkdtemp(prefix="stages-hostile-", dir="/var/tmp"))
    os.chmod(top, 0o755)
    tree = top / "rootfs"
    shutil.copytree(busybox_rootfs, tree, symlinks=True)
    yield tree
    shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("path, step", [("/dev", "mount_dev"), ("/proc", "mount_proc"), ("/sys", "mount_sys"),
                                        ("/tmp", "mount_tmp")])
@pytest.mark.parametrize("kind", ["absolute", "climbing"])
def test_stage2_a_mount_target_that_links_out_is_refused(stage2_rootfs, victim, path, step, kind):
    target = str(victim) if kind == "absolute" else CLIMB + str(victim).lstrip("/")
    link(stage2_rootfs, path, target)
    with Isolate(stage2_rootfs) as iso:
        iso.unshare("mount", "pid", "net")
        with pytest.raises(RootfsError) as caught:
            getattr(iso, step)()
        assert caught.value.message.startswith(f"the rootfs's {path} is a symbolic link to {target}, {OUT}")
        untouched(victim)
    untouched(victim)


def test_stage2_a_dev_that_links_inside_gets_the_devices_there(stage2_rootfs, victim):
    (stage2_rootfs / "devices").mkdir()
    link(stage2_rootfs, "/dev", "/devices")
    with Isolate(stage2_rootfs) as iso:
        iso.unshare("mount", "pid", "net")
        assert "null" in iso.mount_dev()
        iso.pivot_root()
        assert iso.run("echo x > /dev/null && ls /devices").stdout.split()[:2] == ["fd", "full"]
    untouched(victim)


def test_oci_a_whole_container_with_the_walk_instead_of_openat2(tmp_path, root, busybox_rootfs, victim,
                                                                monkeypatch):
    """A kernel without openat2 (forced: STAGES_OPENAT2=0 reaches the container's init): every mount and
    device still made, inside, and the hostile /dev still refused."""
    monkeypatch.setenv("STAGES_OPENAT2", "0")
    monkeypatch.setattr(kernel, "openat2", lambda *a, **k: pytest.fail("openat2 called in walk mode"))
    code, out = run(tmp_path, root, bundle(tmp_path, busybox_rootfs, args=["sh", "-c", "ls /dev; mount"]))
    assert code == 0, out
    assert {"null", "zero", "pts", "shm", "ptmx", "fd"} <= set(out.split())
    assert " on /dev/pts type devpts " in out and " on /proc type proc " in out
    tree = own_rootfs(tmp_path, busybox_rootfs)
    link(tree, "/dev", str(victim))
    with pytest.raises(RootfsError, match=f"the image's /dev is a symbolic link to {victim}, {OUT}"):
        run(tmp_path, root, bundle(tmp_path, tree))
    untouched(victim)
