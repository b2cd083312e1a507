"""The image store: images as ordered layers plus a config, content-addressed by sha256.

Vocabulary is the OCI image spec's, so an OCI runtime bundle can be made from it later: an image's id
is the digest of its config JSON; the config says ``config.Env``, ``config.Cmd``, ``config.Entrypoint``,
``config.WorkingDir``, ``config.User``, ``config.ExposedPorts``, ``config.Labels``, a ``history``, and
``rootfs`` = ``{"type": "layers", "diff_ids": [...]}`` (the sha256 of each layer's uncompressed tar).
Layout on disk: see :mod:`stages.runtime.store`.

What comes in (:func:`import_archive`): a rootfs tarball (one layer), a ``docker save`` archive, or an
OCI image layout (a directory or a tar of one). Every blob's digest is checked before it is used, and
every layer goes through stage 1's safe extractor. The built-in images ``busybox`` and ``host-minimal``
are made offline by stage 1's rootfs builder the first time they are asked for (:func:`ensure_builtin`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
from pathlib import Path

from stages.errors import RootfsError, StagesError, UnsafeArchiveError
from stages.runtime import store

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at every start
if TYPE_CHECKING:
    import tarfile

# The layer code (tarfile, gzip, bz2, lzma, hashlib) and tempfile are imported by the functions that write
# the store: `stages run` only reads it, and pays for none of that.

DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
BUILTIN = {"busybox": "busybox", "host-minimal": "host"}
HOST_MINIMAL_COMMANDS = ("sh", "ls", "cat", "echo", "env", "id", "hostname", "ps", "sleep", "mount", "uname")
CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Labels")
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"


class ImageError(StagesError):
    """An image that does not exist, or an archive that is not an image stages can import."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# Docker's reference grammar (distribution/reference, "reference.go"): NAME[:TAG], where NAME is an optional
# registry host (a DNS name or an address, maybe :PORT) and a path of lower-case components
# separated by "/". It is what keeps `../x`, `/abs`, `UPPER` and `a:b:c` out of the store's names.
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
#: Docker's NameTotalLengthMax: the name (without the tag) is at most this long.
NAME_MAX = 255


def parse_reference(reference: str) -> str:
    """``name`` or ``name:tag`` -> ``name:tag`` (the tag defaults to ``latest``), checked against Docker's
    reference grammar: lower-case path components (``[a-z0-9]+`` joined by ``.``, ``_``, ``__`` or
    dashes) separated by ``/``, an optional registry ``host[:port]/`` first, a tag of at most 128 of
    ``[A-Za-z0-9_.-]`` not starting with ``.`` or ``-``, and at most 255 characters of name. Every
    command that takes an image name (``build -t``, ``import``, ``run``, ``rmi``) goes through here."""
    def refuse(problem: str, hint: str = "use NAME or NAME:TAG, e.g. myimage:1.0") -> ImageError:
        shown = reference if len(reference) <= 80 else reference[:77] + "..."
        return ImageError(f"{shown!r} is not an image name: {problem}", hint)

    if not isinstance(reference, str) or not reference:
        raise refuse("it is empty")
    if "@" in reference:
        raise refuse("stages names images by NAME[:TAG], not by @digest",
                     "use the name, or the image id that `stages images` shows")
    last = reference.rsplit("/", 1)[-1]
    name, _, tag = reference.rpartition(":") if ":" in last else (reference, "", "latest")
    if not tag:
        raise refuse("the tag after ':' is empty", "write NAME:TAG, e.g. myimage:1.0, or leave ':' out")
    if not _TAG.fullmatch(tag):
        raise refuse(f"the tag {tag[:40]!r} is not 1 to 128 letters, digits, '_', '.' or '-' (not starting "
                     "with '.' or '-')", "use a tag such as latest, 1.0 or v2_test")
    if not name:
        raise refuse("the name before ':' is empty")
    if len(name) > NAME_MAX:
        raise refuse(f"the name is {len(name)} characters long, more than Docker's {NAME_MAX}",
                     "use a shorter name")
    components = name.split("/")
    if any(component in ("", ".", "..") for component in components):
        raise refuse("it is not a path: an image name has no empty, '.' or '..' parts between '/'s",
                     "write NAME or PATH/NAME, e.g. lesson/web:1.0")
    first = components[0]
    # Docker's rule: the first component is a registry host when it has a '.' or a ':', or is localhost
    if len(components) > 1 and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.fullmatch(first):
            raise refuse(f"{first!r} is not a registry host[:port]", "write registry.example:5000/name:tag")
        components = components[1:]
    for component in components:
        if not _PATH_COMPONENT.fullmatch(component):
            if component != component.lower() and _PATH_COMPONENT.fullmatch(component.lower()):
                raise refuse("repository names must be lower case (a tag may have capitals)",
                             f"write {name.lower()}{reference[len(name):]}")
            if ":" in component:
                raise refuse("only the last ':' may separate a tag", "write NAME:TAG, e.g. myimage:1.0")
            raise refuse(f"{component[:40]!r} is not lower-case letters and digits joined by '.', '_', "
                         "'__' or '-'", "use a name such as myimage, my-image or lesson/web_1")
    return f"{name}:{tag}"


def _hex(digest: str) -> str:
    return digest.split(":", 1)[-1]


def blob_path(digest: str) -> Path:
    """Where the blob ``sha256:<hex>`` lives in the store."""
    return store.images_dir() / "blobs" / "sha256" / _hex(digest)


def layer_dir(diff_id: str) -> Path:
    """The unpacked layer ``diff_id``: an overlayfs lower directory."""
    return store.images_dir() / "layers" / _hex(diff_id)


# -- reading the store -------------------------------------------------------------------------------
REPAIR_HINT = ("`stages images --repair` rebuilds it from the image records (imagedb/): every image stays, "
               "the built-in ones get their names back, the others are listed by id, <none>")


def repositories() -> dict[str, str]:
    """The name index: ``name:tag`` -> image id (``sha256:...``). A damaged index is refused with the
    way to rebuild it (:func:`repair`): a guess at the names could run the wrong image."""
    path = store.images_dir() / "repositories.json"
    try:
        index = store.read_json(path, {})
    except store.DamagedFileError as error:
        raise ImageError(f"the image store's name index {path} is damaged ({error.why})",
                         REPAIR_HINT) from None
    if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
        raise ImageError(f"the image store's name index {path} is damaged (not a name -> id table)",
                         REPAIR_HINT)
    return index


def _damaged(path: Path, why: str) -> dict:
    """A stand-in for an image whose record (imagedb/HEX.json) is damaged: named by its id (the file's
    name), with ``"damaged"`` saying what is wrong; ``stages rmi`` removes it."""
    return {"id": f"sha256:{path.stem}", "config_digest": f"sha256:{path.stem}", "created": "", "size": 0,
            "layers": [], "damaged": f"its record {path} is {why}"}


def _record(image_id: str) -> dict | None:
    path = store.images_dir() / "imagedb" / f"{_hex(image_id)}.json"
    try:
        record = store.read_json(path)
    except store.DamagedFileError as error:
        return _damaged(path, error.why)
    if record is not None and not _well_formed(record):
        return _damaged(path, "not an image record")
    return record


def _well_formed(record: object) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("id"), str)
            and isinstance(record.get("config_digest"), str) and isinstance(record.get("layers"), list)
            and all(isinstance(layer, dict) and {"digest", "diff_id"} <= set(layer)
                    for layer in record["layers"]))


def list_images(problems: list[str] | None = None) -> list[dict]:
    """Every image: ``{"id", "names", "created", "size", "layers": [...], "config_digest"}``, newest first.
    An image whose record is damaged is there with ``"damaged"``; ``problems`` (if given) receives a
    sentence for each damaged file, the name index too (whose names are then left out)."""
    names: dict[str, list[str]] = {}
    try:
        index = repositories()
    except ImageError as error:
        if problems is None:
            raise
        problems.append(f"{error.message}: {error.hint}")
        index = {}
    for name, image_id in index.items():
        names.setdefault(image_id, []).append(name)
    found = []
    for path in sorted((store.images_dir() / "imagedb").glob("*.json")):
        record = _record(path.stem)
        if record:
            found.append({**record, "names": sorted(names.get(record["id"], []))})
            if record.get("damaged") and problems is not None:
                short = record["id"].split(":", 1)[1][:12]
                problems.append(f"image {short}: {record['damaged']}: `stages rmi {short}` removes it "
                                "(then import or build it again)")
    return sorted(found, key=lambda record: record.get("created", ""), reverse=True)


def _healthy(image: dict) -> dict:
    """``image``, unless its record is damaged: then an error that says how to get it back."""
    if image.get("damaged"):
        short = image["id"].split(":", 1)[1][:12]
        raise ImageError(f"the image {short} cannot be used: {image['damaged']}",
                         f"remove it with `stages rmi {short}`, then import or build it again")
    return image


def repair() -> list[str]:
    """``stages images --repair``: rebuild the name index (repositories.json) when it is damaged, from the
    image records; drop the names of images that are gone. Returns what was done, one line each."""
    with store.locked() as top:
        path = top / "repositories.json"
        done = []
        try:
            index = repositories()
        except ImageError as error:
            kept = path.with_name(f"repositories.json.damaged-{_now()}")
            os.replace(path, kept)
            done.append(f"{error.message}: kept as {kept.name}")
            index = {}
            for image in list_images():
                if image.get("damaged"):
                    continue
                with contextlib.suppress(OSError, ValueError, KeyError):
                    said = " ".join(entry.get("created_by", "") for entry in config_of(image).get("history"))
                    for plain, source in BUILTIN.items():
                        if f"stages rootfs --source {source} (built in)" in said:
                            index[f"{plain}:latest"] = image["id"]
                            done.append(f"named {image['id'][:19]} {plain}:latest again (it is built in)")
        for name, image_id in sorted(index.items()):
            if _record(image_id) is None:
                del index[name]
                done.append(f"dropped the name {name}: its image {image_id[:19]} is gone")
        if done:
            store.write_json(path, index)
            unnamed = [image["id"][:19] for image in list_images() if not image["names"]]
            if unnamed:
                done.append(f"{len(unnamed)} image(s) have no name now: run them by id, or import/build them "
                            "again to name them")
        else:
            done.append("the name index is whole: nothing to repair")
    return done


def resolve(reference: str) -> dict:
    """The image named ``reference`` (``name[:tag]``, a full id, or an id prefix of 4+ hex digits).

    Raises :class:`ImageError` with a hint if there is none.
    """
    repos = repositories()
    with contextlib.suppress(ImageError):
        name = parse_reference(reference)
        if name in repos and (record := _record(repos[name])):  # (a name of a removed image: no image)
            return {**record, "names": sorted(n for n, i in repos.items() if i == record["id"])}
    prefix = _hex(reference.lower())
    if len(prefix) >= 4 and all(c in "0123456789abcdef" for c in prefix):
        matches = [image for image in list_images() if _hex(image["id"]).startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ImageError(f"{reference!r} is the start of {len(matches)} image ids",
                             "give more of the id (`stages images` shows them)")
    parse_reference(reference)  # a name against the grammar is told what is wrong with it
    raise ImageError(f"there is no image {reference!r}",
                     "`stages images` lists them; busybox and host-minimal are built in, "
                     "`stages import FILE NAME` adds one")


def config_of(image: dict) -> dict:
    """The image's whole config JSON (the OCI image config, with ``config``, ``rootfs``, ``history``)."""
    path = blob_path(_healthy(image)["config_digest"])
    short = image["id"].split(":", 1)[1][:12]
    try:
        config = store.read_json(path)
    except store.DamagedFileError as error:
        raise ImageError(f"the config of image {short} ({path}) is damaged ({error.why})",
                         f"remove it with `stages rmi {short}`, then import or build it again") from None
    if not isinstance(config, dict):
        raise ImageError(f"the config of image {short} ({path}) is "
                         f"{'missing' if config is None else 'not an image config'}",
                         f"remove it with `stages rmi {short}`, then import or build it again")
    return config


def get(reference: str) -> dict:
    """The image ``reference``, the built-ins made on first use."""
    try:
        return resolve(reference)
    except ImageError:
        plain = reference.split(":")[0]
        if plain in BUILTIN and parse_reference(reference) == f"{plain}:latest":
            return ensure_builtin(plain)
        raise


def layer_dirs(image: dict) -> list[str]:
    """The image's unpacked layers, lowest first (overlayfs wants them the other way: ``lowerdir=top:..``)."""
    return [str(layer_dir(layer["diff_id"])) for layer in _healthy(image)["layers"]]


def resolve_for_engine(reference: str) -> dict:
    """What the engine needs to run ``reference``: ``{"id", "name", "layers": [dir, ...], "config"}``."""
    image = get(reference)
    name = parse_reference(reference) if parse_reference(reference) in image["names"] else (
        image["names"][0] if image["names"] else image["id"][:19])
    return {"id": image["id"], "name": name, "layers": layer_dirs(image),
            "config": config_of(image).get("config") or {}}


def flatten(image: dict | str, dest: str | os.PathLike) -> Path:
    """Apply every layer of ``image`` (a record or a reference) into ``dest``, whiteouts resolved."""
    from stages.runtime import layers as layerlib

    image = get(image) if isinstance(image, str) else image
    return layerlib.flatten_layers(layer_dirs(image), dest)


def history(reference: str) -> list[dict]:
    """The image's build history, newest first: ``{"created", "created_by", "size", "layer"}`` each;
    ``layer`` is the diff_id (None for steps that changed only the config)."""
    image = resolve(reference)
    rows, remaining = [], list(image["layers"])
    for entry in config_of(image).get("history") or []:
        layer = None if entry.get("empty_layer") or not remaining else remaining.pop(0)
        rows.append({"created": entry.get("created", ""), "created_by": entry.get("created_by", ""),
                     "size": layer["size"] if layer else 0, "layer": layer["diff_id"] if layer else None})
    return rows[::-1]


# -- writing the store -------------------------------------------------------------------------------
def _store_blob(source: str | os.PathLike, digest: str, created: list[Path]) -> None:
    """Copy ``source`` into the blob store under ``digest`` (already checked), unless already there."""
    target = blob_path(digest)
    if target.exists():
        return
    created.append(target)
    import tempfile

    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".incoming.")
    os.close(fd)
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _add_layer(blob: str | os.PathLike, digest: str, work: Path, created: list[Path]) -> dict:
    """Store one checked layer blob and its unpacked directory; returns its descriptor. What it adds
    to the store goes into ``created``, to be taken back if the import fails (:func:`_roll_back`)."""
    import tempfile

    from stages.runtime import layers as layerlib

    diff = layerlib.diff_id(blob)
    target = layer_dir(diff)
    if not target.exists():
        unpacked = Path(tempfile.mkdtemp(dir=work, prefix="layer."))
        layerlib.unpack(blob, unpacked)
        unpacked.chmod(0o755)
        with contextlib.suppress(OSError):  # another import unpacked the same layer first: keep theirs
            os.rename(unpacked, target)
            created.append(target)
    _store_blob(blob, digest, created)
    return {"digest": digest, "diff_id": diff, "size": layerlib.tree_size(target)}


def _commit(config: dict, layers: list[dict], names: list[str]) -> dict:
    """Write the config blob, the image record and the names, under the lock; returns the image."""
    config = {**config, "rootfs": {"type": "layers", "diff_ids": [layer["diff_id"] for layer in layers]}}
    body = json.dumps(config, indent=2, sort_keys=True).encode()
    import hashlib
    import tempfile

    image_id = f"sha256:{hashlib.sha256(body).hexdigest()}"
    with store.locked() as top:
        target = blob_path(image_id)
        if not target.exists():
            fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".incoming.")
            with os.fdopen(fd, "wb") as handle:
                handle.write(body)
            os.replace(temporary, target)
        existing = _record(image_id)  # (a damaged record is written anew: the import repairs it)
        record = existing if existing and not existing.get("damaged") else {
            "id": image_id, "config_digest": image_id, "created": config.get("created") or _now(),
            "layers": layers, "size": sum(layer["size"] for layer in layers)}
        store.write_json(top / "imagedb" / f"{_hex(image_id)}.json", record)
        if names:
            repos = repositories()
            repos.update({name: image_id for name in names})
            store.write_json(top / "repositories.json", repos)
    return resolve(image_id)


def _clean_config(raw: dict, created_by: str) -> dict:
    """An OCI image config from what an archive carried: nulls dropped, our defaults where it says nothing."""
    inner = {key: value for key, value in (raw.get("config") or {}).items() if key in CONFIG_KEYS and value}
    inner.setdefault("Env", DEFAULT_ENV)
    config = {"architecture": raw.get("architecture") or "amd64", "os": raw.get("os") or "linux",
              "created": raw.get("created") or _now(), "config": inner}
    config["history"] = raw.get("history") or [{"created": config["created"], "created_by": created_by}]
    return config


@contextlib.contextmanager
def _workspace():
    """A scratch directory in the store (same filesystem: layers rename(2) into place), and the list of
    blobs and layers added; on failure (or Ctrl-C) those no image uses are removed, and the scratch always."""
    work = store.scratch("import.")  # with an owner file: `stages prune` removes it if we are killed
    created: list[Path] = []
    try:
        yield work, created
    except BaseException:
        _roll_back(created)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _roll_back(created: list[Path]) -> None:
    """Remove what a failed import added, unless an image (another import's, meanwhile) now uses it."""
    with store.locked():
        used = set()
        for image in list_images():
            used.add(_hex(image["config_digest"]))
            used.update(_hex(layer[key]) for layer in image["layers"] for key in ("digest", "diff_id"))
        for path in created:
            if path.name in used:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _without_setuid(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """The host's setuid programs (mount) lose the bit in a built-in image, as the extractor would drop
    it anyway (with a warning the learner cannot act on)."""
    member.mode &= ~0o6000
    return member


def ensure_builtin(name: str) -> dict:
    """The built-in image ``name`` (``busybox`` or ``host-minimal``), built offline by stage 1's rootfs
    builder and stored as a one-layer image the first time it is asked for."""
    import tarfile

    from stages import rootfs
    from stages.runtime import layers as layerlib

    plain = name.split(":")[0]
    if plain not in BUILTIN:
        raise ImageError(f"there is no built-in image {name!r}",
                         f"the built-in ones are {', '.join(BUILTIN)}")
    with contextlib.suppress(ImageError):
        return resolve(f"{plain}:latest")
    with store.locked(".builtin.lock"), _workspace() as (work, created):
        with contextlib.suppress(ImageError):  # another command built it while we waited
            return resolve(f"{plain}:latest")
        commands = HOST_MINIMAL_COMMANDS if BUILTIN[plain] == "host" else None
        built = rootfs.build(work / "rootfs", BUILTIN[plain], commands=commands)
        blob = work / "layer.tar"
        with tarfile.open(blob, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(built, arcname=".", filter=_without_setuid)
        layer = _add_layer(blob, layerlib.sha256_file(blob), work, created)
        cmd = ["sh"]
        config = _clean_config({"config": {"Env": DEFAULT_ENV, "Cmd": cmd, "WorkingDir": "/"}},
                               f"stages rootfs --source {BUILTIN[plain]} (built in)")
        return _commit(config, [layer], [f"{plain}:latest"])


# -- importing ---------------------------------------------------------------------------------------
def _checked_blob(root: Path, digest: str, what: str) -> Path:
    """The blob ``digest`` in the layout at ``root``, its bytes checked against the digest."""
    from stages.runtime import layers as layerlib

    algorithm, _, hexpart = digest.partition(":")
    if algorithm != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise ImageError(f"the archive names {what} by {digest!r}, which is not a sha256 digest",
                         "this archive is damaged; save the image again")
    path = root / "blobs" / "sha256" / hexpart
    if not path.is_file() or path.is_symlink():
        raise ImageError(f"the archive has no blob {digest} ({what})",
                         "this archive is incomplete; save it again")
    actual = layerlib.sha256_file(path)
    if actual != digest:
        raise ImageError(f"the blob {digest} ({what}) does not match its digest: its bytes hash to {actual}",
                         "the archive is damaged or was changed; save or download it again")
    return path


def _read_json_file(path: Path, what: str):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise ImageError(f"{what} in the archive cannot be read as JSON ({error})",
                         "this archive is damaged; save the image again") from None


def _inside(root: Path, relative: str, what: str) -> Path:
    """``root/relative``, refused if it climbs out of ``root`` (a path named inside a manifest)."""
    path = (root / relative).resolve()
    if not str(path).startswith(str(root.resolve()) + "/"):
        raise UnsafeArchiveError(f"the archive's manifest names {what} {relative!r}, outside the archive",
                                 "this archive is hostile or damaged; use another one")
    if not path.is_file():
        raise ImageError(f"the archive's manifest names {what} {relative!r}, which is not in it",
                         "this archive is incomplete; save it again")
    return path


def _check_diff_ids(config: dict, stored: list[dict]) -> None:
    wanted = (config.get("rootfs") or {}).get("diff_ids")
    found = [layer["diff_id"] for layer in stored]
    if wanted is not None and list(wanted) != found:
        raise ImageError("the layers' contents do not match the diff_ids their config lists "
                         f"(config {wanted}, layers {found})",
                         "the archive is damaged or was changed; save it again")


def _import_oci(root: Path, work: Path, created: list[Path], source: str
                ) -> tuple[dict, list[dict], list[str]]:
    index = _read_json_file(root / "index.json", "index.json")
    manifests = index.get("manifests") or []
    if not manifests:
        raise ImageError(f"{source} is an OCI layout whose index.json lists no image", "save the image again")
    descriptor = manifests[0]
    names = [descriptor.get("annotations", {}).get("org.opencontainers.image.ref.name")]
    manifest = _read_json_file(_checked_blob(root, descriptor["digest"], "the manifest"), "the manifest")
    for _ in range(4):  # an index of manifests (several platforms): take linux/amd64, else the first
        if "manifests" not in manifest:
            break
        pick = [m for m in manifest["manifests"] if (m.get("platform") or {}).get("architecture") == "amd64"]
        chosen = (pick or manifest["manifests"])[0]
        manifest = _read_json_file(_checked_blob(root, chosen["digest"], "the manifest"), "the manifest")
    raw = _read_json_file(_checked_blob(root, manifest["config"]["digest"], "the config"), "the config")
    checked = [(_checked_blob(root, layer["digest"], f"layer {number}"), layer["digest"])
               for number, layer in enumerate(manifest.get("layers") or [], 1)]  # all, before storing any
    stored = [_add_layer(path, digest, work, created) for path, digest in checked]
    _check_diff_ids(raw, stored)
    # The ref name annotation is often a bare tag ("latest"); only a whole NAME:TAG names the image.
    ref = names[0] or ""
    return raw, stored, [parse_reference(ref)] if ":" in ref else []


def _import_docker(root: Path, work: Path, created: list[Path], source: str
                   ) -> tuple[dict, list[dict], list[str]]:
    from stages.runtime import layers as layerlib

    manifest = _read_json_file(root / "manifest.json", "manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise ImageError(f"{source}'s manifest.json lists no image", "save the image again with docker save")
    entry = manifest[0]
    config_path = _inside(root, entry["Config"], "the config")
    digest = layerlib.sha256_file(config_path)
    if entry["Config"].startswith("blobs/sha256/") or len(config_path.stem) == 64:
        expected = f"sha256:{config_path.stem if config_path.name.endswith('.json') else config_path.name}"
        if expected != digest:
            raise ImageError(f"the blob {expected} (the config) does not match its digest: its bytes hash to "
                             f"{digest}", "the archive is damaged or was changed; save it again")
    raw = _read_json_file(config_path, "the config")
    stored = []
    for number, name in enumerate(entry.get("Layers") or [], 1):
        path = _inside(root, name, f"layer {number}")
        layer_digest = layerlib.sha256_file(path)
        if name.startswith("blobs/sha256/") and layer_digest != f"sha256:{path.name}":
            raise ImageError(f"the blob sha256:{path.name} (layer {number}) does not match its digest: "
                             f"its bytes hash to {layer_digest}",
                             "the archive is damaged or was changed; save it again")
        stored.append(_add_layer(path, layer_digest, work, created))
    _check_diff_ids(raw, stored)
    return raw, stored, [parse_reference(tag) for tag in entry.get("RepoTags") or []]


def import_archive(source: str | os.PathLike, name: str | None = None) -> dict:
    """Import ``source`` into the store and return the image (as :func:`resolve` does).

    ``source`` is an OCI image layout (a directory, or a tar of one: ``oci-layout``, ``index.json``,
    ``blobs/sha256/...``), a ``docker save`` archive (``manifest.json``), or any other tarball, which
    becomes a one-layer image of that rootfs. ``name`` (``NAME[:TAG]``) tags it; without it, the names
    the archive carries are used. Digests are checked; a mismatch, a hostile entry or a damaged archive
    is refused (:class:`StagesError`) and leaves nothing behind in the store.
    """
    import tarfile

    from stages.runtime import layers as layerlib

    source = os.fspath(source)
    names = [parse_reference(name)] if name else []
    if not os.path.exists(source):
        raise ImageError(f"there is no file {source}", "give the path of a tarball, a docker save archive "
                         "or an OCI layout directory")
    with _workspace() as (work, created):
        if os.path.isdir(source):
            root = Path(source)
            if not (root / "oci-layout").is_file() or not (root / "index.json").is_file():
                raise ImageError(f"{source} is a directory but not an OCI image layout (no oci-layout and "
                                 "index.json)", "give an OCI layout, or a tarball: tar -C DIR -cf out.tar .")
            kind = "oci"
        else:
            try:
                with tarfile.open(source, "r:*") as tar:
                    top = {member.name.lstrip("./") for member in tar.getmembers()[:2000]}
            except (tarfile.TarError, OSError, EOFError):
                raise ImageError(f"{source} is not a tar archive, so stages cannot import it",
                                 "give a .tar or .tar.gz: a rootfs, a docker save archive or an OCI layout"
                                 ) from None
            kind = "oci" if "oci-layout" in top and "index.json" in top else (
                "docker" if "manifest.json" in top else "rootfs")
            if kind != "rootfs":
                from stages import rootfs

                root = work / "archive"
                root.mkdir()
                rootfs.extract(source, root)  # stage 1's extractor: hostile entries are refused here too
        if kind == "oci":
            raw, stored, carried = _import_oci(root, work, created, source)
        elif kind == "docker":
            raw, stored, carried = _import_docker(root, work, created, source)
        else:
            stored = [_add_layer(source, layerlib.sha256_file(source), work, created)]
            raw, carried = {"config": {"Cmd": ["/bin/sh"]}}, []
        config = _clean_config(raw, f"stages import {os.path.basename(source)}")
        return _commit(config, stored, names or carried)


# -- removing ----------------------------------------------------------------------------------------
def in_use(image_id: str) -> list[str]:
    """The names of the containers (running or stopped) that stand on the image ``image_id``.

    Reads the container state (:func:`stages.runtime.containers.using_image`) when that exists; [] if
    there is no container machinery or no container."""
    try:
        from stages.runtime import containers
    except ImportError:
        return []
    names = set(containers.using_image(image_id))
    for name, owner in repositories().items():
        if owner == image_id:
            names.update(containers.using_image(name))
    return sorted(names)


def remove(reference: str, force: bool = False) -> list[str]:
    """``stages rmi``: untag ``reference``; when no name is left (or it was given by id), delete the image
    and every blob and layer no other image uses. Refused while a container uses the image: one whose
    record names it, or one whose record is damaged and whose overlay mount has one of the layers that
    would go (or whose layers cannot be learnt: then it is refused, with a sentence).

    On a full disk it still frees space: the image's record, blobs and layers are deleted before the
    name index is written. An image whose record is damaged is removed with its names (its layers,
    which only its record listed, stay). Returns what was done, one line each ("untagged NAME",
    "deleted sha256:...").
    """
    done: list[str] = []
    with store.locked() as top:
        image = resolve(reference)
        users = in_use(image["id"])
        if users:
            raise ImageError(f"the image {reference} is used by the container(s) {', '.join(users)}",
                             f"remove them first: stages rm {' '.join(users)}")
        repos = repositories()
        by_name = None
        with contextlib.suppress(ImageError):
            wanted = parse_reference(reference)
            by_name = wanted if repos.get(wanted) == image["id"] else None
        doomed = [by_name] if by_name and not force else [n for n, i in repos.items() if i == image["id"]]
        for name in doomed:
            del repos[name]
        if any(i == image["id"] for i in repos.values()):
            store.write_json(top / "repositories.json", repos)  # only untagged: nothing to delete
            return [f"untagged {name}" for name in doomed]
        keep_blobs, keep_layers = set(), set()
        for other in list_images():
            if other["id"] != image["id"]:
                keep_blobs.add(other["config_digest"])
                keep_blobs.update(layer["digest"] for layer in other["layers"])
                keep_layers.update(layer["diff_id"] for layer in other["layers"])
        going = [layer["diff_id"] for layer in image["layers"] if layer["diff_id"] not in keep_layers]
        _refuse_if_a_damaged_container_stands_on(reference, {os.path.realpath(layer_dir(d)) for d in going})
        (top / "imagedb" / f"{_hex(image['id'])}.json").unlink()
        for digest in [image["config_digest"], *(layer["digest"] for layer in image["layers"])]:
            if digest not in keep_blobs:
                with contextlib.suppress(FileNotFoundError):
                    blob_path(digest).unlink()
        for diff_id in going:
            shutil.rmtree(layer_dir(diff_id), ignore_errors=True)
        # the index last: there is room for it now, and a name left by a crash before it names no image
        # (resolve() finds nothing, `stages images --repair` drops it)
        store.write_json(top / "repositories.json", repos)
        done += [f"untagged {name}" for name in doomed]
        done.append(f"deleted {image['id']}" + (" (its record was damaged: the layers only it listed "
                                                "stay, as nothing says which they are)"
                                                if image.get("damaged") else ""))
    return done


def _refuse_if_a_damaged_container_stands_on(reference: str, going: set[str]) -> None:
    """A container whose record is damaged cannot say which image it uses; its overlay mount can (the
    lower directories in /proc/self/mountinfo). Refuse to delete a layer one of them stands on, or when
    one of them has no mount to tell by (it is not running here): when in doubt, nothing is deleted."""
    if not going:
        return  # no layer goes: what a container stands on stays
    from stages.runtime import containers

    for container_id, layers in containers.damaged_layers().items():
        if layers is None:
            raise ImageError(f"the record of container {container_id} is damaged, so stages cannot tell "
                             f"whether it uses the layers of {reference}",
                             f"remove that container first (stages rm -f {container_id}), then rmi again")
        if going & {os.path.realpath(layer) for layer in layers}:
            raise ImageError(f"the image {reference} is used by the container {container_id} (its record "
                             "is damaged, but its overlay mount stands on the image's layers)",
                             f"remove it first: stages rm -f {container_id}")


__all__ = ["ImageError", "import_archive", "ensure_builtin", "resolve", "get", "list_images", "flatten",
           "history", "remove", "in_use", "resolve_for_engine", "layer_dirs", "repositories", "RootfsError"]
