"""``stages build``: a Containerfile made into an image, one layer per step that changes files, with a cache.

What each instruction does is Docker's ("Dockerfile reference"), written out here; dockerfile-parse only
splits the file into instructions (continuation lines, comments, the escape directive):

- ``FROM`` picks the base image; ``ENV``, ``ARG``, ``WORKDIR``, ``USER``, ``CMD``, ``ENTRYPOINT``,
  ``EXPOSE`` and ``LABEL`` change only the config (an ``empty_layer`` in the history);
- ``RUN`` runs in a stage-3 container on overlayfs (the engine) whose upper directory becomes the new
  layer; a deleted file is a 0/0 character device there and becomes a ``.wh.NAME`` entry in the tar, a
  directory made opaque carries ``trusted.overlay.opaque`` and gets ``.wh..wh..opq`` (overlay(5));
- ``COPY`` and ``ADD`` put files from the context into a layer; ``ADD`` extracts a local tar archive with
  stage 1's extractor (:func:`stages.rootfs.extract`);
- ``WORKDIR`` makes a layer only when it creates the directory.

The cache: each step's key is the digest of the key before it (the base image's id first), the step's
text after ARG/ENV substitution, and the digest of the files it copies; a step whose key is known and
whose layer is still in the store is skipped ("--> cache hit"), as buildah does.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from stages.errors import StagesError
from stages.runtime import images, store
from stages.runtime import layers as layerlib

CACHE_FILE = "build-cache.json"
CONFIG_ONLY = {"ENV", "ARG", "USER", "CMD", "ENTRYPOINT", "EXPOSE", "LABEL"}
KNOWN = CONFIG_ONLY | {"FROM", "RUN", "COPY", "ADD", "WORKDIR"}
#: Mount points the runtime may make in the rootfs; never part of a layer when they are left empty.
MOUNT_POINTS = ("proc", "sys", "dev")


class BuildError(StagesError):
    """A Containerfile that cannot be built: a malformed line, a missing file, a RUN that failed."""


@dataclass
class Step:
    line: int  # 1-based, the first line of the instruction
    instruction: str
    value: str
    text: str  # as written, continuation lines joined


@dataclass
class State:
    base: dict
    layers: list[dict]
    config: dict
    history: list[dict] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)
    key: str = ""


def _error(step: Step, problem: str, hint: str) -> BuildError:
    return BuildError(f"Containerfile line {step.line}: `{step.text}`: {problem}", hint)


# -- reading the Containerfile -----------------------------------------------------------------------
def parse(path: str | os.PathLike) -> list[Step]:
    """The instructions of the Containerfile ``path``, comments dropped; malformed ones refused."""
    from dockerfile_parse import DockerfileParser

    try:
        content = Path(path).read_bytes()
    except OSError as error:
        raise BuildError(f"cannot read the Containerfile {path}: {error.strerror or error}",
                         "give its path with -f, or put a Containerfile in the context directory") from None
    parser = DockerfileParser(fileobj=io.BytesIO(content), env_replace=False)
    steps = []
    for item in parser.structure:
        if item["instruction"] == "COMMENT":
            continue
        text = " ".join(part.strip().rstrip("\\").strip() for part in item["content"].splitlines()
                        if part.strip() and not part.strip().startswith("#"))
        step = Step(item["startline"] + 1, item["instruction"].upper(), item["value"].strip(), text)
        if step.instruction not in KNOWN:
            raise _error(step, f"{step.instruction} is not an instruction stages build knows",
                         f"use one of {', '.join(sorted(KNOWN))}")
        if not step.value and step.instruction != "CMD":
            raise _error(step, f"{step.instruction} needs an argument", "see the Dockerfile reference")
        _check(step)
        steps.append(step)
    if not steps:
        raise BuildError(f"the Containerfile {path} has no instructions", "start it with FROM busybox")
    if steps[0].instruction not in ("FROM", "ARG"):
        raise _error(steps[0], "the first instruction must be FROM", "start the file with FROM IMAGE")
    return steps


def _check(step: Step) -> None:
    """What can be refused before anything runs: the shape of each instruction's arguments."""
    if step.instruction in ("COPY", "ADD"):
        words = _exec_form(step.value) or step.value.split()
        if len([word for word in words if not word.startswith("--")]) < 2:
            raise _error(step, f"{step.instruction} needs a source and a destination",
                         f"write {step.instruction} FILE /destination")
    elif step.instruction in ("ENV", "LABEL"):
        _pairs(step, step.value)
    elif step.instruction == "FROM" and len(step.value.split()) not in (1, 3):
        raise _error(step, "FROM takes one image", "write FROM busybox")


_VARIABLE = re.compile(r"\\\$|\$(?:\{(\w+)(?::([-+])([^}]*))?\}|(\w+))")


def substitute(text: str, variables: dict[str, str]) -> str:
    """``$VAR``, ``${VAR}``, ``${VAR:-default}`` and ``${VAR:+alt}`` replaced, as Docker does for ENV and
    ARG values in ADD, COPY, ENV, EXPOSE, FROM, LABEL, USER and WORKDIR; ``\\$`` keeps a dollar."""
    def one(match: re.Match) -> str:
        if match.group(0) == "\\$":
            return "$"
        name = match.group(1) or match.group(4)
        value = variables.get(name, "")
        if match.group(2) == "-":
            return value or match.group(3)
        if match.group(2) == "+":
            return match.group(3) if value else ""
        return value

    return _VARIABLE.sub(one, text)


def _pairs(step: Step, value: str) -> dict[str, str]:
    """``K=V K2="v 2"`` (or the old ``K V`` form of ENV and LABEL) as a dict."""
    try:
        words = shlex.split(value)
    except ValueError as error:
        raise _error(step, f"the quoting is broken ({error})", "close every quote") from None
    if words and "=" not in words[0]:
        if len(words) < 2:
            raise _error(step, f"{step.instruction} needs KEY=VALUE",
                         f"write {step.instruction} {words[0]}=value")
        return {words[0]: value.split(None, 1)[1]}
    result = {}
    for word in words:
        key, equals, item = word.partition("=")
        if not equals or not key:
            raise _error(step, f"{word!r} is not KEY=VALUE", f"write {step.instruction} KEY=VALUE")
        result[key] = item
    return result


def _exec_form(value: str) -> list[str] | None:
    """The JSON array form (``["a", "b"]``), or None for the shell form (Docker falls back the same way)."""
    if not value.startswith("["):
        return None
    with contextlib.suppress(ValueError):
        parsed = json.loads(value)
        if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
            return parsed
    return None


def _command(value: str) -> list[str]:
    return _exec_form(value) or ["/bin/sh", "-c", value]


# -- the ignore file ---------------------------------------------------------------------------------
def ignore_patterns(context: Path) -> list[tuple[bool, str]]:
    """``.containerignore`` (else ``.dockerignore``): ``(exclude, pattern)`` per line, ``!`` an exception."""
    for name in (".containerignore", ".dockerignore"):
        path = context / name
        if path.is_file():
            patterns = []
            for line in path.read_text().splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                negate = line.startswith("!")
                pattern = os.path.normpath(line[1:].strip() if negate else line).lstrip("/")
                patterns.append((not negate, pattern))
            return patterns
    return []


def ignored(relative: str, patterns: list[tuple[bool, str]]) -> bool:
    """Whether ``relative`` (to the context) is excluded: the last pattern matching it or a parent wins."""
    parts = relative.split("/")
    result = False
    for exclude, pattern in patterns:
        if any(fnmatch.fnmatchcase("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1)):
            result = exclude
    return result


# -- the cache -----------------------------------------------------------------------------------------
def _cache() -> dict:
    return store.read_json(store.images_dir() / CACHE_FILE, {})


def _cached(key: str) -> dict | None:
    """What the step with ``key`` made: ``{"layer": descriptor or None, "created"}``; None when it is not
    in the cache or its layer has left the store since (``stages rmi``)."""
    entry = _cache().get(key)
    if entry is None:
        return None
    layer = entry.get("layer")
    if layer and not (images.layer_dir(layer["diff_id"]).is_dir()
                      and images.blob_path(layer["digest"]).exists()):
        return None
    return entry


def _remember(key: str, layer: dict | None, created: str) -> None:
    with store.locked() as top:
        cache = _cache()
        cache[key] = {"layer": layer, "created": created}
        store.write_json(top / CACHE_FILE, cache)


def _digest(*parts: str) -> str:
    return "sha256:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _tree_digest(paths: list[tuple[Path, str]]) -> str:
    """A digest of what a COPY or ADD would copy: names, modes, link targets and contents."""
    digest = hashlib.sha256()
    for source, relative in paths:
        info = source.lstat()
        digest.update(f"{relative}\0{info.st_mode:o}\0".encode())
        if stat.S_ISLNK(info.st_mode):
            digest.update(os.readlink(source).encode())
        elif stat.S_ISREG(info.st_mode):
            digest.update(layerlib.sha256_file(source).encode())
    return "sha256:" + digest.hexdigest()


# -- layers --------------------------------------------------------------------------------------------
def _lookup(layer_dirs: list[str], path: str) -> os.stat_result | None:
    """``path`` as the merged image shows it (topmost layer first), None if absent or whited out."""
    for layer in reversed(layer_dirs):
        where = os.path.join(layer, path.strip("/"))
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            info = os.lstat(where)
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                return None
            return info
    return None


def _root_owned(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """COPY and ADD give files to root (Docker does, without --chown)."""
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    return member


def tar_tree(root: Path, blob: Path) -> None:
    """A layer tar of ``root`` as it is (owners kept), sorted, the parents of the entries included."""
    with tarfile.open(blob, "w", format=tarfile.PAX_FORMAT) as tar:
        for directory, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(directory, name)
                tar.add(path, arcname=os.path.relpath(path, root), recursive=False)


def tar_upper(upper: Path, blob: Path) -> None:
    """The layer tar of a container's upper directory: overlay whiteouts (0/0 character devices) become
    ``.wh.NAME`` entries, an opaque directory (``trusted.overlay.opaque=y``) gets ``.wh..wh..opq``
    (overlay(5); the OCI image spec's "Image Layer Filesystem Changeset")."""
    with tarfile.open(blob, "w", format=tarfile.PAX_FORMAT) as tar:
        for directory, dirnames, filenames in os.walk(upper):
            relative_dir = os.path.relpath(directory, upper)
            if relative_dir == ".":
                # the runtime's mount points, left empty: not the RUN's work
                dirnames[:] = [d for d in dirnames if not (d in MOUNT_POINTS and not os.listdir(upper / d))]
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = os.path.join(directory, name)
                arcname = os.path.normpath(os.path.join(relative_dir, name))
                info = os.lstat(path)
                if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                    whiteout = layerlib.WHITEOUT_PREFIX + name
                    entry = tarfile.TarInfo(os.path.join(os.path.dirname(arcname), whiteout))
                    entry.mtime = int(info.st_mtime)
                    tar.addfile(entry)
                    continue
                tar.add(path, arcname=arcname, recursive=False)
                if stat.S_ISDIR(info.st_mode) and layerlib.is_opaque(path):
                    entry = tarfile.TarInfo(os.path.join(arcname, layerlib.OPAQUE))
                    entry.mtime = int(info.st_mtime)
                    tar.addfile(entry)


# -- the build -------------------------------------------------------------------------------------------
class Builder:
    def __init__(self, context: Path, steps: list[Step], build_args: dict[str, str], out):
        self.context, self.steps, self.build_args, self.out = context, steps, build_args, out
        self.patterns = ignore_patterns(context)
        self.work = Path(tempfile.mkdtemp(dir=store.images_dir() / "tmp", prefix="build."))
        self.created: list[Path] = []
        self.state: State | None = None
        self.pre_args: dict[str, str] = {}

    # the layer of a step, stored (and taken back if the build fails)
    def _store_layer(self, blob: Path) -> dict:
        return images._add_layer(blob, layerlib.sha256_file(blob), self.work, self.created)

    def variables(self) -> dict[str, str]:
        env = dict(item.split("=", 1) for item in self.state.config.get("Env") or [] if "=" in item)
        return {**self.state.args, **env}

    def _lower(self) -> list[str]:
        return [str(images.layer_dir(layer["diff_id"])) for layer in self.state.layers]

    def _absolute(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.state.config.get("WorkingDir") or "/", path))

    def build(self) -> dict:
        total = len(self.steps)
        for number, step in enumerate(self.steps, 1):
            self.out(f"STEP {number}/{total}: {step.text}")
            handler = getattr(self, f"do_{step.instruction.lower()}")
            handler(step)
        if self.state is None:
            raise BuildError("the Containerfile has no FROM", "start it with FROM busybox")
        return self.state

    def _record(self, text: str, layer: dict | None, created: str) -> None:
        self.state.history.append({"created": created, "created_by": text,
                                   **({} if layer else {"empty_layer": True})})
        if layer:
            self.state.layers.append(layer)

    def _cached_step(self, step: Step, text: str, content: str, make) -> None:
        key = _digest(self.state.key, text, content)
        entry = _cached(key)
        if entry is not None:
            self.out("--> cache hit")
            # the step's first time kept, so that a build wholly from the cache is the same image (same id)
            layer, created = entry["layer"], entry.get("created") or images._now()
        else:
            layer, created = make(), images._now()
            _remember(key, layer, created)
        self.state.key = key
        self._record(text, layer, created)

    # -- instructions
    def do_from(self, step: Step) -> None:
        if self.state is not None:
            raise _error(step, "a second FROM (multi-stage builds) is not supported",
                         "build each stage as its own image")
        reference = substitute(step.value.split()[0], {**self.pre_args})
        try:
            base = images.get(reference)
        except StagesError as error:
            raise _error(step, error.message, error.hint or "") from None
        raw = images.config_of(base)
        config = {key: value for key, value in (raw.get("config") or {}).items() if key in images.CONFIG_KEYS}
        self.state = State(base=base, layers=list(base["layers"]), config=config,
                           history=list(raw.get("history") or []), key=base["id"])

    def do_arg(self, step: Step) -> None:
        name, equals, default = step.value.partition("=")
        if not re.fullmatch(r"\w+", name):
            raise _error(step, f"{name!r} is not an argument name", "write ARG NAME or ARG NAME=default")
        value = self.build_args.get(name, default.strip('"') if equals else "")
        if self.state is None:
            self.pre_args[name] = value
            return
        self.state.args[name] = value
        self._cached_step(step, f"ARG {name}={value}", "", lambda: None)

    def do_env(self, step: Step) -> None:
        pairs = {key: substitute(value, self.variables()) for key, value in _pairs(step, step.value).items()}
        env = [item for item in self.state.config.get("Env") or [] if item.split("=", 1)[0] not in pairs]
        self.state.config["Env"] = env + [f"{key}={value}" for key, value in pairs.items()]
        self._cached_step(step, "ENV " + " ".join(f"{k}={v}" for k, v in pairs.items()), "", lambda: None)

    def do_label(self, step: Step) -> None:
        pairs = {key: substitute(value, self.variables()) for key, value in _pairs(step, step.value).items()}
        self.state.config["Labels"] = {**(self.state.config.get("Labels") or {}), **pairs}
        self._cached_step(step, "LABEL " + json.dumps(pairs, sort_keys=True), "", lambda: None)

    def do_user(self, step: Step) -> None:
        self.state.config["User"] = substitute(step.value, self.variables())
        self._cached_step(step, f"USER {self.state.config['User']}", "", lambda: None)

    def do_expose(self, step: Step) -> None:
        ports = {}
        for word in substitute(step.value, self.variables()).split():
            port, _, protocol = word.partition("/")
            if not port.isdigit() or not 0 < int(port) < 65536 or protocol not in ("", "tcp", "udp", "sctp"):
                raise _error(step, f"{word!r} is not a port", "write EXPOSE 80 or EXPOSE 53/udp")
            ports[f"{int(port)}/{protocol or 'tcp'}"] = {}
        self.state.config["ExposedPorts"] = {**(self.state.config.get("ExposedPorts") or {}), **ports}
        self._cached_step(step, "EXPOSE " + " ".join(ports), "", lambda: None)

    def do_cmd(self, step: Step) -> None:
        self.state.config["Cmd"] = _command(step.value) if step.value else []
        self._cached_step(step, "CMD " + json.dumps(self.state.config["Cmd"]), "", lambda: None)

    def do_entrypoint(self, step: Step) -> None:
        self.state.config["Entrypoint"] = _command(step.value)
        self.state.config.pop("Cmd", None)  # Docker: a new ENTRYPOINT clears the base image's CMD
        self._cached_step(step, "ENTRYPOINT " + json.dumps(self.state.config["Entrypoint"]), "", lambda: None)

    def do_workdir(self, step: Step) -> None:
        path = self._absolute(substitute(step.value, self.variables()))
        self.state.config["WorkingDir"] = path
        if _lookup(self._lower(), path) is not None:
            self._cached_step(step, f"WORKDIR {path}", "", lambda: None)
            return

        def make() -> dict:
            root = Path(tempfile.mkdtemp(dir=self.work, prefix="workdir."))
            (root / path.strip("/")).mkdir(parents=True, mode=0o755)
            self._keep_parents(root, path)
            blob = root.with_suffix(".tar")
            tar_tree(root, blob)
            return self._store_layer(blob)

        self._cached_step(step, f"WORKDIR {path}", "", make)

    def _keep_parents(self, root: Path, path: str) -> None:
        """Parent directories in a layer take the image's own mode and owner where the image has them,
        else root's 0755 (an upper directory in overlayfs hides the attributes of the lower one)."""
        parts = path.strip("/").split("/")
        for n in range(1, len(parts) + 1):
            relative = "/".join(parts[:n])
            target = root / relative
            if not target.is_dir() or target.is_symlink():
                continue
            info = _lookup(self._lower(), relative)
            if info is not None and stat.S_ISDIR(info.st_mode):
                os.chown(target, info.st_uid, info.st_gid)
                os.chmod(target, stat.S_IMODE(info.st_mode))
            elif n < len(parts):
                os.chown(target, 0, 0)
                os.chmod(target, 0o755)

    def _sources(self, step: Step, words: list[str]) -> list[tuple[Path, str]]:
        """Each source of a COPY/ADD that exists and is not ignored: ``(path, name relative to context)``."""
        context = self.context.resolve()
        found = []
        for word in words:
            if re.match(r"^[a-z]+://", word):
                raise _error(step, f"{word} is a URL; stages build works offline",
                             "download it into the context first, then COPY it")
            matches = sorted(glob.glob(str(context / word.lstrip("/")))) if glob.has_magic(word) else [
                str(context / word.lstrip("/"))]
            matches = [m for m in matches if os.path.lexists(m)]
            for match in matches:
                relative = os.path.relpath(os.path.realpath(match) if not os.path.islink(match) else match,
                                           context)
                if relative == ".." or relative.startswith("../"):
                    raise _error(step, f"{word} is outside the build context {context}",
                                 "copy the file into the context directory first")
                if relative != "." and ignored(relative, self.patterns):
                    continue
                found.append((Path(match), relative))
            if not any(os.path.lexists(m) for m in matches) or not found:
                raise _error(step, f"{word} is not in the build context {context} (or the ignore file "
                             "excludes it)", "check the name, the context directory and .containerignore")
        return found

    def _files(self, sources: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
        """Every file and directory under the sources, ignored ones left out (for the content digest)."""
        every = []
        for source, relative in sources:
            every.append((source, relative))
            if source.is_dir() and not source.is_symlink():
                for directory, dirnames, filenames in os.walk(source):
                    dirnames.sort()
                    for name in sorted(dirnames) + sorted(filenames):
                        path = Path(directory) / name
                        inner = os.path.normpath(os.path.join(relative, os.path.relpath(path, source)))
                        if not ignored(inner, self.patterns):
                            every.append((path, inner))
        return every

    def do_copy(self, step: Step) -> None:
        self._copy(step, extract=False)

    def do_add(self, step: Step) -> None:
        self._copy(step, extract=True)

    def _copy(self, step: Step, extract: bool) -> None:
        value = substitute(step.value, self.variables())
        words = _exec_form(value) or shlex.split(value)
        flags = [word for word in words if word.startswith("--")]
        if flags:
            raise _error(step, f"the flag {flags[0]} is not supported by stages build",
                         f"leave {flags[0]} out")
        if len(words) < 2:
            raise _error(step, f"{step.instruction} needs a source and a destination",
                         f"write {step.instruction} FILE /destination")
        sources = self._sources(step, words[:-1])
        destination = words[-1]
        into_directory = destination.endswith("/") or len(sources) > 1 or any(
            source.is_dir() and not source.is_symlink() for source, _ in sources)
        destination = self._absolute(destination)
        existing = _lookup(self._lower(), destination)
        # a destination that is a directory in the image already takes the file inside, as in Docker
        into_directory = into_directory or (existing is not None and stat.S_ISDIR(existing.st_mode))
        files = self._files(sources)
        content = _tree_digest(files)
        text = f"{step.instruction} {' '.join(rel for _, rel in sources)} {destination}"

        def make() -> dict:
            from stages import rootfs

            root = Path(tempfile.mkdtemp(dir=self.work, prefix="copy."))
            target = root / destination.strip("/")
            for source, relative in sources:
                if source.is_dir() and not source.is_symlink():
                    target.mkdir(parents=True, exist_ok=True)
                    for path, inner in files:
                        if inner == relative or not inner.startswith(relative.rstrip("/") + "/" if
                                                                     relative != "." else ""):
                            continue
                        where = target / os.path.relpath(inner, relative)
                        if path.is_dir() and not path.is_symlink():
                            where.mkdir(parents=True, exist_ok=True)
                            shutil.copystat(path, where)
                        else:
                            where.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(path, where, follow_symlinks=False)
                    continue
                place = target / source.name if into_directory else target
                place.parent.mkdir(parents=True, exist_ok=True)
                if extract and not source.is_symlink() and tarfile.is_tarfile(source):
                    # ADD: a local tar archive (plain, gzip, bzip2, xz) is unpacked, by stage 1's extractor
                    target.mkdir(parents=True, exist_ok=True)
                    rootfs.extract(source, target)
                else:
                    shutil.copy2(source, place, follow_symlinks=False)
            for directory, _, filenames in os.walk(root):
                for name in [*filenames, "."]:
                    with contextlib.suppress(OSError):
                        os.lchown(os.path.join(directory, name), 0, 0)
            self._keep_parents(root, destination)
            blob = root.with_suffix(".tar")
            tar_tree(root, blob)
            return self._store_layer(blob)

        self._cached_step(step, text, content, make)

    def do_run(self, step: Step) -> None:
        args = _command(step.value)
        # ARG values reach RUN as environment variables (and so key its cache), ENV ones do too
        env = [f"{k}={v}" for k, v in sorted(self.state.args.items())]
        text = "RUN " + json.dumps(args) + (" with " + " ".join(env) if env else "")
        self._cached_step(step, text, "", lambda: self._run(step, args, env))

    def _run(self, step: Step, args: list[str], extra_env: list[str]) -> dict:
        from stages.runtime import containers, engine, flags
        from stages.runtime.flags import Options

        lower = self._lower()
        config = dict(self.state.config)
        config["Env"] = flags.merge_env(config.get("Env") or images.DEFAULT_ENV, extra_env)
        # no network (the build is offline) and no init (a bind-mount target would land in the layer)
        options = Options(image=self.state.base["id"], command=args, network="none", init=False)
        record = {"id": containers.new_id(), "image": f"build step {step.line}",
                  "image_id": self.state.base["id"],
                  "layers": lower, "image_config": config, "args": args, "options": options.to_dict(),
                  "limits": flags.check(options), "status": "creating", "monitor_pid": os.getpid(),
                  "monitor_started": engine._start_time(os.getpid()), "exit_code": None, "network": None,
                  "steps": []}
        info = containers.reserve(record, None)
        try:
            try:
                # no /etc/hosts of its own either: its bind-mount target would land in the layer too
                code = engine.execute(info["id"], host_files=False)
            except OSError as error:
                raise _error(step, f"the container could not be run: {error.strerror or error}",
                             "try the command with `stages run --explain` to see the step that failed"
                             ) from None
            except StagesError as error:
                raise _error(step, error.message, error.hint or "") from None
            if code != 0:
                raise _error(step, f"the command exited with {code}",
                             "fix the command; try it with: stages run -it IMAGE sh")
            upper = containers.directory(info["id"]) / "upper"
            blob = self.work / f"run-{info['id']}.tar"
            tar_upper(upper, blob)
            return self._store_layer(blob)
        finally:
            with contextlib.suppress(StagesError):
                engine.remove(info["id"], force=True)


def build(context: str | os.PathLike, tag: str, containerfile: str | os.PathLike | None = None,
          build_args: dict[str, str] | None = None, out=print) -> dict:
    """Build the Containerfile (default ``CONTEXT/Containerfile``, else ``CONTEXT/Dockerfile``) and tag the
    image ``tag``. Returns the image (as :func:`stages.runtime.images.resolve` does). A failure raises a
    :class:`BuildError` naming the line, and leaves no container, mount or partial image behind."""
    context = Path(context)
    name = images.parse_reference(tag)
    if not context.is_dir():
        raise BuildError(f"the build context {context} is not a directory",
                         "give the directory that holds the files to COPY, e.g. `stages build -t x .`")
    if containerfile is None:
        found = [context / n for n in ("Containerfile", "Dockerfile") if (context / n).is_file()]
        containerfile = found[0] if found else context / "Containerfile"
    steps = parse(containerfile)
    builder = Builder(context, steps, dict(build_args or {}), out)
    try:
        state = builder.build()
        created = state.history[-1]["created"] if state.history else images._now()
        config = {"architecture": "amd64", "os": "linux", "created": created,
                  "config": {key: value for key, value in state.config.items() if value not in (None, "")},
                  "history": state.history}
        image = images._commit(config, state.layers, [name])
    except BaseException:
        images._roll_back(builder.created)
        raise
    finally:
        shutil.rmtree(builder.work, ignore_errors=True)
    out(f"COMMIT {name}\n--> {image['id'][7:19]}")
    return image


__all__ = ["BuildError", "build", "parse", "substitute", "ignored", "ignore_patterns", "tar_upper"]
