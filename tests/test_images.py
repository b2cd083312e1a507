"""Stage 3's image store: built-in images, imports (rootfs tarball, docker save, OCI layout), whiteouts
as overlayfs understands them, rmi, concurrency and errors, each checked by its effect."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from stages import cli, jail
from stages.errors import StagesError, UnsafeArchiveError
from stages.runtime import images, layers

pytestmark = pytest.mark.root


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Each test its own state directory, so the store starts empty."""
    monkeypatch.setenv("STAGES_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-home")


# -- building archives in the test, from real layers -------------------------------------------------
def _tar(entries: list[tuple[str, bytes | None]], mode: str = "w") -> bytes:
    """A tarball of ``(name, content)`` entries, content None meaning a directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), 0o644
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


LAYER1 = [("etc", None), ("etc/keep", b"kept\n"), ("etc/gone", b"deleted by layer 2\n"), ("data", None),
          ("data/old1", b"old\n"), ("data/old2", b"old\n")]
# Layer 2 deletes etc/gone with a whiteout, makes data/ opaque and adds a file to it.
LAYER2 = [("etc", None), ("etc/.wh.gone", b""), ("etc/added", b"from layer 2\n"), ("data", None),
          ("data/.wh..wh..opq", b""), ("data/new", b"new\n")]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _config(diff_ids: list[str]) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05Z",
        "config": {"Env": ["PATH=/bin", "GREETING=hi"], "Cmd": ["/bin/sh"], "WorkingDir": "/data",
                   "Labels": {"lesson": "stage3"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-02T03:04:05Z", "created_by": "ADD base /"},
                    {"created": "2024-01-02T03:04:06Z", "created_by": "RUN rm /etc/gone"}],
    }).encode()


def make_oci(directory: Path, *, gzip_first: bool = True, ref: str = "lesson:oci") -> dict:
    """An OCI image layout in ``directory``: layer 1 gzipped, layer 2 plain, a manifest and an index."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    plain = [_tar(LAYER1), _tar(LAYER2)]
    stored = [gzip.compress(plain[0]) if gzip_first else plain[0], plain[1]]

    def put(data: bytes) -> str:
        (blobs / _sha(data).split(":")[1]).write_bytes(data)
        return _sha(data)

    config = _config([_sha(data) for data in plain])
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": images.MEDIA_CONFIG, "digest": put(config), "size": len(config)},
        "layers": [{"mediaType": images.MEDIA_LAYER + ("+gzip" if gzip_first and i == 0 else ""),
                    "digest": put(data), "size": len(data)} for i, data in enumerate(stored)],
    }).encode()
    digest = put(manifest)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": len(manifest),
         "annotations": {"org.opencontainers.image.ref.name": ref}}]}))
    return {"layers": [_sha(data) for data in stored], "config": _sha(config)}


def make_docker_save(directory: Path) -> None:
    """A ``docker save`` archive's contents (the classic layout: <id>/layer.tar, <config>.json)."""
    plain = [_tar(LAYER1), _tar(LAYER2)]
    config = _config([_sha(data) for data in plain])
    names = []
    for number, data in enumerate(plain):
        (directory / f"layer{number}").mkdir(parents=True)
        (directory / f"layer{number}" / "layer.tar").write_bytes(data)
        names.append(f"layer{number}/layer.tar")
    config_name = _sha(config).split(":")[1] + ".json"
    (directory / config_name).write_bytes(config)
    (directory / "manifest.json").write_text(json.dumps(
        [{"Config": config_name, "RepoTags": ["lesson:docker"], "Layers": names}]))
    (directory / "repositories").write_text(json.dumps({"lesson": {"docker": "x"}}))


def tar_directory(directory: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as tar:
        for entry in sorted(directory.iterdir()):
            tar.add(entry, arcname=entry.name)
    return out


def check_two_layers(image: dict, tmp_path: Path) -> None:
    """The whiteouts of the two-layer image, in the per-layer dirs and in the flattened rootfs."""
    lower, upper = (Path(p) for p in images.layer_dirs(image))
    assert (lower / "etc" / "gone").read_text() == "deleted by layer 2\n"
    assert layers.is_whiteout(upper / "etc" / "gone")
    info = os.lstat(upper / "etc" / "gone")
    assert stat.S_ISCHR(info.st_mode) and (os.major(info.st_rdev), os.minor(info.st_rdev)) == (0, 0)
    assert os.getxattr(upper / "data", "trusted.overlay.opaque") == b"y"
    assert not (upper / "data" / ".wh..wh..opq").exists() and not (upper / "etc" / ".wh.gone").exists()
    flat = images.flatten(image, tmp_path / "flat")
    assert sorted(os.listdir(flat / "etc")) == ["added", "keep"]
    assert sorted(os.listdir(flat / "data")) == ["new"]
    assert (flat / "etc" / "keep").read_text() == "kept\n"
    config = images.config_of(image)
    assert config["rootfs"]["type"] == "layers" and len(config["rootfs"]["diff_ids"]) == 2
    assert config["config"]["Env"] == ["PATH=/bin", "GREETING=hi"]
    assert config["config"]["Labels"] == {"lesson": "stage3"}


# -- built-in images -----------------------------------------------------------------------------------
def test_builtin_images_list_and_flatten_into_a_rootfs_that_runs(tmp_path, capsys):
    assert cli.main(["images"]) == 0
    assert "busybox" not in capsys.readouterr().out  # made on first use, not before
    busybox = images.ensure_builtin("busybox")
    images.ensure_builtin("host-minimal")
    assert images.ensure_builtin("busybox")["id"] == busybox["id"]  # the second time is the same image
    assert cli.main(["images"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME:TAG", "ID", "CREATED", "SIZE", "LAYERS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"busybox:latest", "host-minimal:latest"}
    assert rows["busybox:latest"][1] == busybox["id"].split(":")[1][:12] and rows["busybox:latest"][-1] == "1"
    blob = images.blob_path(busybox["layers"][0]["digest"])
    assert layers.sha256_file(blob) == busybox["layers"][0]["digest"]  # content-addressed, really
    for name in ("busybox", "host-minimal"):
        flat = images.flatten(name, tmp_path / name)
        result = jail.run(flat, ["/bin/sh", "-c", "echo hello from $$; ls /bin"])
        assert result.returncode == 0, result.stderr
        first, *programs = result.stdout.split()[2:]
        assert int(first) > 1 and {"sh", "ls", "cat"} <= set(programs)
    assert cli.main(["history", "busybox"]) == 0
    assert "stages rootfs --source busybox" in capsys.readouterr().out


def test_engine_resolves_through_the_store():
    found = images.resolve_for_engine("busybox")
    assert found["name"] == "busybox:latest" and found["config"]["Cmd"] == ["sh"]
    assert os.path.exists(os.path.join(found["layers"][0], "bin", "sh"))


# -- imports --------------------------------------------------------------------------------------------
def test_import_a_rootfs_tarball(tmp_path, busybox_rootfs, capsys):
    archive = tmp_path / "rootfs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(busybox_rootfs, arcname=".")
    assert cli.main(["import", str(archive), "mine:1"]) == 0
    assert "1 layer(s)" in capsys.readouterr().out
    image = images.resolve("mine:1")
    assert image["layers"][0]["digest"] == layers.sha256_file(archive)
    with gzip.open(archive) as handle:
        assert image["layers"][0]["diff_id"] == _sha(handle.read())
    result = jail.run(images.flatten("mine:1", tmp_path / "flat"), ["sh", "-c", "echo ok"])
    assert result.stdout == "ok\n"


def test_import_docker_save_archive(tmp_path):
    make_docker_save(tmp_path / "save")
    image = images.import_archive(tar_directory(tmp_path / "save", tmp_path / "save.tar"))
    assert image["names"] == ["lesson:docker"] and len(image["layers"]) == 2
    check_two_layers(image, tmp_path)
    made_by = [row["created_by"] for row in images.history("lesson:docker")]
    assert made_by == ["RUN rm /etc/gone", "ADD base /"]


@pytest.mark.parametrize("as_tar", [False, True], ids=["directory", "tar"])
def test_import_oci_layout(tmp_path, as_tar):
    made = make_oci(tmp_path / "oci")
    source = tar_directory(tmp_path / "oci", tmp_path / "oci.tar") if as_tar else tmp_path / "oci"
    image = images.import_archive(source)
    assert image["names"] == ["lesson:oci"]
    assert [layer["digest"] for layer in image["layers"]] == made["layers"]
    assert images.blob_path(made["layers"][0]).read_bytes()[:2] == b"\x1f\x8b"  # stored as it came (gzip)
    check_two_layers(image, tmp_path)
    renamed = images.import_archive(source, "again")
    assert renamed["id"] == image["id"] and renamed["names"] == ["again:latest", "lesson:oci"]


def test_overlayfs_honours_the_unpacked_whiteouts(tmp_path):
    """Mount the layers with overlayfs in a child's private mount namespace: the kernel hides the file
    layer 2 deleted and the opaque directory's old contents."""
    make_oci(tmp_path / "oci")
    image = images.import_archive(tmp_path / "oci")
    lowerdir = ":".join(reversed(images.layer_dirs(image)))  # overlay(5): the topmost layer comes first
    merged = tmp_path / "merged"
    merged.mkdir()
    script = (f"mount -t overlay overlay -o lowerdir={lowerdir} {merged} && "
              f"ls {merged}/etc; echo --; ls {merged}/data; echo --; ls {images.layer_dirs(image)[1]}/etc")
    # unshare(1) makes the new mount namespace's propagation private (its default), so the host never sees it.
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    etc, data, upper = out.stdout.split("--\n")
    assert etc.split() == ["added", "keep"]
    assert data.split() == ["new"]
    assert upper.split() == ["added", "gone"]  # the whiteout itself is there in the layer ...
    assert not os.listdir(merged)  # ... and the mount died with the child


# -- refusals -------------------------------------------------------------------------------------------
def test_digest_mismatch_is_refused_naming_the_blob(tmp_path, home):
    made = make_oci(tmp_path / "oci")
    blob = tmp_path / "oci" / "blobs" / "sha256" / made["layers"][1].split(":")[1]
    blob.write_bytes(_tar(LAYER2 + [("evil", b"added after the digest was taken")]))
    with pytest.raises(StagesError) as caught:
        images.import_archive(tmp_path / "oci", "tampered")
    assert made["layers"][1] in str(caught.value) and "layer 2" in str(caught.value)
    assert caught.value.hint
    assert images.list_images() == [] and images.repositories() == {}
    assert os.listdir(home / "images" / "tmp") == [] and os.listdir(home / "images" / "layers") == []


def test_hostile_layer_is_refused(tmp_path, home):
    blobs = tmp_path / "oci" / "blobs" / "sha256"
    make_oci(tmp_path / "oci")
    hostile = _tar([("../escaped", b"outside\n")])
    (blobs / _sha(hostile).split(":")[1]).write_bytes(hostile)
    manifest_digest = json.loads((tmp_path / "oci" / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((blobs / manifest_digest.split(":")[1]).read_bytes())
    manifest["layers"][1] = {"mediaType": images.MEDIA_LAYER, "digest": _sha(hostile), "size": len(hostile)}
    body = json.dumps(manifest).encode()
    (blobs / _sha(body).split(":")[1]).write_bytes(body)
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    index["manifests"][0]["digest"] = _sha(body)
    (tmp_path / "oci" / "index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./escaped'"):
        images.import_archive(tmp_path / "oci", "hostile")
    assert not (tmp_path / "escaped").exists() and not (home / "images" / "escaped").exists()
    assert images.list_images() == [] and os.listdir(home / "images" / "tmp") == []


def test_errors_are_one_sentence_with_a_hint(tmp_path, capsys):
    not_tar = tmp_path / "notes.txt"
    not_tar.write_text("not an archive\n")
    (tmp_path / "plain-dir").mkdir()
    for argv in (["rmi", "nope"], ["history", "nope:1"], ["import", str(not_tar), "x"],
                 ["import", str(tmp_path / "missing.tar")], ["import", str(tmp_path / "plain-dir")],
                 ["import", str(not_tar), "bad name"]):
        assert cli.main(argv) != 0
        message, hint = capsys.readouterr().err.strip().splitlines()
        assert message.startswith(f"stages {argv[0]}: ") and message.count(". ") == 0, message
        assert hint.startswith("  hint: ")


# -- rmi and concurrency ----------------------------------------------------------------------------------
def test_rmi_removes_only_what_no_other_image_uses(tmp_path, home, capsys):
    make_oci(tmp_path / "a")
    first = images.import_archive(tmp_path / "a", "first")
    busybox = images.ensure_builtin("busybox")
    images.import_archive(tmp_path / "a", "alias")
    shared = images.blob_path(first["layers"][0]["digest"])
    assert cli.main(["rmi", "first"]) == 0
    assert capsys.readouterr().out.split("\n")[0] == "untagged first:latest"
    assert shared.exists() and images.resolve("alias")["id"] == first["id"]  # "alias" still names it
    assert cli.main(["rmi", "alias"]) == 0
    assert capsys.readouterr().out.splitlines() == ["untagged alias:latest", f"deleted {first['id']}"]
    for layer in first["layers"]:
        assert not images.blob_path(layer["digest"]).exists()
        assert not images.layer_dir(layer["diff_id"]).exists()
    assert not images.blob_path(first["config_digest"]).exists()
    assert images.resolve("busybox")["id"] == busybox["id"]
    assert images.blob_path(busybox["layers"][0]["digest"]).exists()
    assert os.path.isdir(images.layer_dirs(busybox)[0])


def test_rmi_refuses_an_image_a_container_uses(monkeypatch, capsys):
    image = images.ensure_builtin("busybox")
    monkeypatch.setattr(images, "in_use", lambda image_id: ["web"] if image_id == image["id"] else [])
    assert cli.main(["rmi", "busybox"]) != 0
    assert "used by the container(s) web" in capsys.readouterr().err
    assert images.resolve("busybox")["id"] == image["id"]


def test_in_use_is_empty_without_containers():
    image = images.ensure_builtin("busybox")
    assert images.in_use(image["id"]) == []


def test_concurrent_imports_keep_the_index_whole(tmp_path, python, home):
    make_oci(tmp_path / "oci")
    children = [subprocess.Popen([python, "-c", f"from stages.runtime import images; "
                                  f"images.import_archive({str(tmp_path / 'oci')!r}, 'same:{n}')"],
                                 env={**os.environ, "STAGES_HOME": str(home)},
                                 cwd=Path(__file__).parent.parent,
                                 stderr=subprocess.PIPE, text=True) for n in range(4)]
    for child in children:
        assert child.wait(timeout=60) == 0, child.stderr.read()
        child.stderr.close()
    repos = json.loads((home / "images" / "repositories.json").read_text())
    assert {f"same:{n}" for n in range(4)} <= set(repos) and len(set(repos.values())) == 1
    assert len(images.list_images()) == 1 and len(os.listdir(home / "images" / "layers")) == 2
    assert os.listdir(home / "images" / "tmp") == []
    shutil.rmtree(tmp_path / "oci")


def test_rmi_refuses_while_a_real_container_stands_on_the_image(python, home):
    """A stopped container still uses its image's layers as overlayfs lower directories."""
    env = {**os.environ, "STAGES_HOME": str(home), "STAGES_RUN": str(home / "run")}

    def stages(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, "-m", "stages.cli", *argv], env=env, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL, cwd=Path(__file__).parent.parent)

    try:
        ran = stages("run", "--name", "user-of-busybox", "--network", "none", "busybox", "true")
        assert ran.returncode == 0, ran.stderr
        refused = stages("rmi", "busybox")
        assert refused.returncode != 0 and "used by the container(s) user-of-busybox" in refused.stderr
        assert "stages rm user-of-busybox" in refused.stderr
        assert images.resolve("busybox")["names"] == ["busybox:latest"]
    finally:
        stages("rm", "-f", "user-of-busybox")
    removed = stages("rmi", "busybox")
    assert removed.returncode == 0, removed.stderr
    assert images.list_images() == [] and os.listdir(home / "images" / "layers") == []


def test_flatten_never_writes_through_a_lower_layers_symlink(tmp_path):
    """Layer 1 makes ``lib`` a link to the host-looking /tmp path; layer 2 puts ``lib/x`` there. The
    merged view has a real directory ``lib`` (a directory above replaces a link below, as in overlay(5)),
    and nothing is written where the link pointed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        link = tarfile.TarInfo("lib")
        link.type, link.linkname = tarfile.SYMTYPE, str(outside)
        tar.addfile(link)
    (tmp_path / "l1.tar").write_bytes(buffer.getvalue())
    (tmp_path / "l2.tar").write_bytes(_tar([("lib", None), ("lib/x", b"x\n")]))
    dirs = []
    for name in ("l1", "l2"):
        (tmp_path / name).mkdir()
        layers.unpack(tmp_path / f"{name}.tar", tmp_path / name)
        dirs.append(tmp_path / name)
    flat = layers.flatten_layers(dirs, tmp_path / "flat")
    assert not (flat / "lib").is_symlink() and (flat / "lib" / "x").read_text() == "x\n"
    assert os.listdir(outside) == []


def test_import_docker_save_with_blobs_and_refuse_a_changed_one(tmp_path):
    """Newer ``docker save`` archives name their files blobs/sha256/<digest>: each is checked."""
    made = make_oci(tmp_path / "save", gzip_first=False)
    blobs = tmp_path / "save" / "blobs" / "sha256"
    (tmp_path / "save" / "manifest.json").write_text(json.dumps([{
        "Config": f"blobs/sha256/{made['config'].split(':')[1]}", "RepoTags": ["lesson:blobs"],
        "Layers": [f"blobs/sha256/{digest.split(':')[1]}" for digest in made["layers"]]}]))
    (tmp_path / "save" / "oci-layout").unlink()  # so that the docker manifest is what is read
    image = images.import_archive(tar_directory(tmp_path / "save", tmp_path / "save.tar"))
    assert image["names"] == ["lesson:blobs"]
    check_two_layers(image, tmp_path)
    images.remove("lesson:blobs")
    (blobs / made["layers"][0].split(":")[1]).write_bytes(_tar(LAYER1 + [("extra", b"!")]))
    with pytest.raises(StagesError, match=f"blob {made['layers'][0]} \\(layer 1\\) does not match"):
        images.import_archive(tar_directory(tmp_path / "save", tmp_path / "changed.tar"))
    assert images.list_images() == []
