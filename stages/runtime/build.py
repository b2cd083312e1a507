"""``stages build``: a Containerfile made into an image, one layer per step that changes files, with a cache.

What each instruction does is Docker's ("Dockerfile reference"), written out here; dockerfile-parse only
splits the file into instructions (continuation lines, comments, the escape directive):

- ``FROM`` picks the base image; ``ENV``, ``ARG``, ``WORKDIR``, ``USER``, ``CMD``, ``ENTRYPOINT``,
  ``EXPOSE`` and ``LABEL`` change only the config (an ``empty_layer`` in the history);
- ``RUN`` runs in a stage-3 container on overlayfs (the engine) whose upper directory becomes the new
  layer, on the network ``--network`` names: ``none`` by default (a build is offline unless asked: it
  reproduces, and touches no network of the host), ``bridge`` (outbound through NAT, Docker's default) or
  ``host``; a deleted file is a 0/0 character device there and becomes a ``.wh.NAME`` entry in the tar, a
  directory made opaque carries ``trusted.overlay.opaque`` and gets ``.wh..wh..opq`` (overlay(5));
- ``COPY`` and ``ADD`` put files from the context into a layer; ``ADD`` extracts a local tar archive with
  stage 1's extractor (:func:`stages.rootfs.extract`);
- ``WORKDIR`` makes a layer only when it creates the directory;
- several ``FROM`` lines make a multi-stage build: ``FROM image AS name`` names a stage, ``FROM name``
  starts from an earlier one, ``COPY --from=name|index|image`` copies out of a stage or an image in the
  store; the image is the last stage's (or ``--target``'s), and stages it does not need are skipped.
  ARGs before the first FROM are usable in FROM lines, and in a stage that says ``ARG NAME`` again;
- ``COPY``/``ADD`` ``--chown=USER[:GROUP]`` (numbers, or names looked up in the stage's /etc/passwd and
  /etc/group) and ``--chmod=OCTAL`` set the owner and mode of what they copy.

Each RUN runs under limits, in its container's cgroup: :data:`DEFAULT_PIDS_LIMIT` processes at once
(``--pids-limit``) and :func:`default_memory` (``--memory``), so that a fork bomb or a runaway allocation
in a Containerfile ends inside the build, not in the host's process table or memory.

The file is read as Docker reads it: the words of ARG, ENV, LABEL, ADD, COPY, EXPOSE, FROM, USER and
WORKDIR by BuildKit's shell-word rules (:func:`substitute`), the ignore file by Docker's pattern rules
(:func:`ignored`), image names by Docker's reference grammar (:func:`stages.runtime.images.parse_reference`).
Where Docker would guess (a ``[`` that starts a CMD but is not JSON, an ignore pattern Go cannot read),
stages build refuses, with the line and what is wrong: what Docker does then only fails later, with a
puzzling message.

The cache: each step's key is the digest of the key before it (the base image's id first), the step's
text after ARG/ENV substitution, and the digest of the files it copies; a step whose key is known and
whose layer is still in the store is skipped ("--> cache hit"), as buildah does. A stage's first key is
its base image's id, or the last key of the stage it starts from; ``COPY --from`` keys on the last key of
the stage it copies from (or the image's id) instead of the files' digest.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import glob
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections import ChainMap
from collections.abc import Mapping
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
#: The flags COPY and ADD take (Dockerfile reference); ADD has no --from.
COPY_FLAGS = {"COPY": ("from", "chown", "chmod"), "ADD": ("chown", "chmod")}
#: What ``--network`` may say for the RUN steps. Ours is ``none`` (Docker's is a bridge): offline by default.
NETWORKS = ("bridge", "host", "none")
#: A stage's name (Docker's rule; compared in lower case).
STAGE_NAME = re.compile(r"[a-z][a-z0-9_.-]*")
#: How many processes (and threads) a RUN may have at once (its cgroup's pids.max), unless
#: ``--pids-limit`` says otherwise: podman's default for a container (containers.conf(5), pids_limit).
#: Docker's engine leaves it unlimited, and `RUN f() { f | f & }; f` then fills the host's pid_max:
#: nothing else on the machine can fork until it ends. 2048 is far more than a compiler's make -j needs.
DEFAULT_PIDS_LIMIT = 2048
#: The share of this machine's RAM a RUN may use (memory.max, or memory.limit_in_bytes on cgroup v1),
#: unless ``--memory`` says otherwise: a RUN that allocates without end is killed by the kernel's OOM
#: killer inside its own cgroup (exit 137), instead of pushing the host's own processes out of memory.
DEFAULT_MEMORY_SHARE = 0.5


def default_memory() -> int:
    """A RUN's memory limit without ``--memory``: half of this machine's RAM, in bytes."""
    from stages.isolate.cgroups import machine_memory

    return int(machine_memory() * DEFAULT_MEMORY_SHARE)


class BuildError(StagesError):
    """A Containerfile that cannot be built: a malformed line, a missing file, a RUN that failed."""


@dataclass
class Step:
    line: int  # 1-based, the first line of the instruction
    instruction: str
    value: str
    text: str  # as written, continuation lines joined


@dataclass
class Stage:
    """One FROM and the steps up to the next FROM: a stage of a (multi-stage) build."""
    index: int
    name: str | None  # FROM image AS name
    steps: list[Step]  # the FROM first
    base: str  # what FROM names, the ARGs before the first FROM substituted
    parent: int | None = None  # the earlier stage FROM names, if it names one
    needs: list[tuple[int, Step]] = field(default_factory=list)  # the stages it uses, and the step that does
    copies_from: dict[int, int | str] = field(default_factory=dict)  # COPY --from by line: stage or image

    @property
    def label(self) -> str:
        return self.name or str(self.index)


@dataclass
class State:
    base: dict
    layers: list[dict]
    config: dict
    history: list[dict] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)
    key: str = ""
    #: config.Env as NAME -> value (None for an entry without "="), in order; config["Env"] is written from
    #: it when the stage ends (one dict update per ENV, where a list would be searched and copied each time)
    env: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def starting(cls, base: dict, layers: list[dict], config: dict, **more) -> State:
        env = {}
        for item in config.get("Env") or []:
            name, equals, value = item.partition("=")
            env[name] = value if equals else None
        return cls(base=base, layers=layers, config=config, env=env, **more)

    def env_list(self) -> list[str]:
        return [name if value is None else f"{name}={value}" for name, value in self.env.items()]

    def finish(self) -> State:
        """The state with config["Env"] written from :attr:`env` (when there is any)."""
        if self.env or "Env" in self.config:
            self.config["Env"] = self.env_list()
        return self


def _error(step: Step, problem: str, hint: str) -> BuildError:
    text = step.text if len(step.text) <= 160 else step.text[:120] + f"... ({len(step.text)} characters)"
    return BuildError(f"Containerfile line {step.line}: `{text}`: {problem}", hint)


# -- reading the Containerfile -----------------------------------------------------------------------
def parse(path: str | os.PathLike) -> list[Step]:
    """The instructions of the Containerfile ``path``, comments dropped; malformed ones refused."""
    from dockerfile_parse import DockerfileParser

    try:
        content = Path(path).read_bytes()
    except OSError as error:
        raise BuildError(f"cannot read the Containerfile {path}: {error.strerror or error}",
                         "give its path with -f, or put a Containerfile in the context directory") from None
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = content[:error.start].count(b"\n") + 1
        raise BuildError(f"Containerfile line {line}: the file is not UTF-8 text (byte "
                         f"0x{content[error.start]:02x}, byte {error.start + 1} of the file)",
                         "save it as UTF-8 text; a Containerfile is text, not a binary file") from None
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


class _EveryNameSet(Mapping):
    """Variables for a syntax check: every name has a value, so that only the shape of a word can fail."""

    def __getitem__(self, name: str) -> str:
        return "x"

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def _check(step: Step) -> None:
    """What can be refused before anything runs: the shape of each instruction's arguments, and of every
    word that will be expanded (an open quote, a ``${`` without ``}``)."""
    every = _EveryNameSet()
    if step.instruction in ("COPY", "ADD"):
        flags, rest = copy_flags(step, step.value)
        words = _exec_form(step, rest) or _split_words(step, rest)
        if len(words) < 2:
            raise _error(step, f"{step.instruction} needs a source and a destination",
                         f"write {step.instruction} FILE /destination")
        for word in [*flags.values(), *words]:
            _expanded(step, word, every)
    elif step.instruction in ("ENV", "LABEL"):
        for key, value in _pairs(step, step.value).items():
            _expanded(step, key, every)
            _expanded(step, value, every)
    elif step.instruction in ("RUN", "CMD", "ENTRYPOINT"):
        _exec_form(step, step.value)
    elif step.instruction == "ARG":
        _arg_words(step)
    elif step.instruction in ("USER", "WORKDIR"):
        _expanded(step, step.value, every)
    elif step.instruction == "EXPOSE":
        for word in _split_words(step, step.value):
            _expanded(step, word, every)
    elif step.instruction == "FROM":
        words = step.value.split()
        _expanded(step, words[0], every)
        if words[0].startswith("--"):
            raise _error(step, f"the flag {words[0].split('=')[0]} is not supported by stages build",
                         "leave it out: stages builds for this machine")
        if len(words) == 3 and words[1].lower() == "as":
            if not STAGE_NAME.fullmatch(words[2].lower()):
                raise _error(step, f"{words[2]!r} cannot name a stage",
                             "start it with a letter, then letters, digits, '-', '_' or '.'")
        elif len(words) != 1:
            raise _error(step, "FROM takes one image, and maybe AS and a name for the stage",
                         "write FROM busybox, or FROM busybox AS builder")


def copy_flags(step: Step, value: str) -> tuple[dict[str, str], str]:
    """The ``--name=value`` flags at the start of a COPY or ADD, and the rest of its line. A flag it does
    not take, one without a value, a --chmod that is not octal, or a --chown that is not USER[:GROUP]
    is refused naming the line."""
    flags: dict[str, str] = {}
    rest = value.strip()
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        rest = rest.strip()
        name, equals, item = word[2:].partition("=")
        if name not in COPY_FLAGS[step.instruction]:
            hint = ("ADD cannot copy from a stage; use COPY --from" if name == "from"
                    else f"leave --{name} out")
            raise _error(step, f"the flag --{name} is not supported by stages build for {step.instruction}",
                         hint)
        if not equals or not item:
            raise _error(step, f"--{name} needs a value", {"from": "write --from=STAGE (a name or a number)",
                                                           "chown": "write --chown=1000:1000",
                                                           "chmod": "write --chmod=644"}[name])
        if name in flags:
            raise _error(step, f"--{name} is given twice", f"keep one --{name}")
        if name == "chmod" and not re.fullmatch(r"[0-7]{3,4}", item):
            raise _error(step, f"--chmod={item} is not an octal mode", "write --chmod=644 or --chmod=0755")
        if name == "chown" and not re.fullmatch(r"[^:\s]+(:[^:\s]+)?", item):
            raise _error(step, f"--chown={item} is not USER[:GROUP]",
                         "write --chown=1000:1000 or --chown=nobody")
        flags[name] = item
    return flags, rest


def plan(steps: list[Step], build_args: dict[str, str] | None = None) -> tuple[list[Step], dict[str, str],
                                                                            list[Stage]]:
    """The stages of a Containerfile: ``(the ARGs before the first FROM, their values, the stages)``.

    Each stage knows the stages it needs (``FROM name``, ``COPY --from``); a name given twice, or a
    ``--from`` number past the last stage, is refused here, before anything runs. A ``--from`` that names
    no stage names an image in the store (checked when the step runs).
    """
    build_args = build_args or {}
    prelude: list[Step] = []
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    names: dict[str, int] = {}
    for step in steps:
        if step.instruction == "FROM":
            words = step.value.split()
            name = words[2].lower() if len(words) == 3 else None
            if name in names:
                raise _error(step, f"a stage named {name} exists already (line "
                             f"{stages[names[name]].steps[0].line})", "give each stage its own name")
            if name is not None:
                names[name] = len(stages)
            stages.append(Stage(len(stages), name, [step], _expanded(step, words[0], global_args)))
        elif not stages:
            if step.instruction != "ARG":
                raise _error(step, "only ARG can come before the first FROM", "move it after FROM")
            name, value = _arg(step, build_args, {}, global_args)
            global_args[name] = value
            prelude.append(step)
        else:
            stages[-1].steps.append(step)
    if not stages:
        raise BuildError("the Containerfile has no FROM", "start it with FROM busybox")
    for stage in stages:
        parent = names.get(stage.base.lower())
        if parent is not None and parent < stage.index:  # Docker: FROM names an earlier stage, or an image
            stage.parent = parent
            stage.needs.append((parent, stage.steps[0]))
        for step in stage.steps[1:]:
            if step.instruction != "COPY":
                continue
            source = copy_flags(step, step.value)[0].get("from")
            if source is None:
                continue
            source = _expanded(step, source, global_args)
            if source.isdigit():
                if int(source) >= len(stages):
                    raise _error(step, f"there is no stage {source}: the file has {len(stages)} "
                                 f"(0 to {len(stages) - 1})",
                                 "count the FROM lines from 0, or name the stage")
                index: int | None = int(source)
            else:
                index = names.get(source.lower())
            if index is None:
                stage.copies_from[step.line] = source  # an image
            else:
                stage.copies_from[step.line] = index
                stage.needs.append((index, step))
    return prelude, global_args, stages


def _arg(step: Step, build_args: dict[str, str], global_args: dict[str, str],
         variables: Mapping[str, str | None]) -> tuple[str, str]:
    """An ARG's name and value: the --build-arg, else its default (expanded with the ARGs and ENVs before
    it: ``ARG B=${A}x``), else (``ARG NAME`` in a stage) the value an ARG before the first FROM gave it
    (Docker's rule)."""
    name, equals, default = _arg_words(step)
    if name in build_args:
        return name, build_args[name]  # (Docker expands a default, never a --build-arg)
    return name, _expanded(step, default, variables) if equals else global_args.get(name, "")


def _arg_words(step: Step) -> tuple[str, str, str]:
    """An ARG line's ``(name, "=" or "", default as written)``; a line that is not ``NAME[=default]``, or
    a default that cannot be read, refused."""
    words = _split_words(step, step.value)
    if len(words) != 1:
        raise _error(step, "ARG takes one NAME or NAME=default", "write one ARG line per argument")
    name, equals, default = words[0].partition("=")
    if not re.fullmatch(r"\w+", name, re.ASCII):
        raise _error(step, f"{name!r} is not an argument name", "write ARG NAME or ARG NAME=default")
    _expanded(step, default, _EveryNameSet())
    return name, equals, default


class _Malformed(ValueError):
    """A word the shell-word rules cannot read (an open quote, ``${`` without ``}``): the message says why."""


#: What needs no care in a word: a run of these is copied as it is.
_PLAIN = re.compile(r"""[^'"\\$]+""")
_PLAIN_TO_BRACE = re.compile(r"""[^'"\\$}]+""")
_PLAIN_IN_DOUBLE = re.compile(r'[^"\\$]+')
_VARIABLE_NAME = re.compile(r"[0-9]|[A-Za-z_][A-Za-z0-9_]*")
_MODIFIERS = (":-", ":+", ":?", "-", "+", "?")


def substitute(text: str, variables: Mapping[str, str | None]) -> str:
    """One word read by Docker's rules for ENV, ARG, LABEL, ADD, COPY, EXPOSE, FROM, USER and WORKDIR (the
    shell lexer of BuildKit's dockerfile frontend, a subset of sh(1)'s): ``$VAR`` and ``${VAR}`` are
    replaced (an undefined one by nothing), ``${VAR:-word}`` (``word`` when VAR is unset or empty),
    ``${VAR-word}`` (when unset), ``${VAR:+word}`` and ``${VAR+word}`` (``word`` when set, else nothing),
    ``${VAR:?message}`` (an error when unset); in ``'...'`` nothing is replaced, in ``"..."`` variables
    are; the quotes go; ``\\`` keeps the next character (in double quotes only before ``"``, ``$`` or ``\\``).
    Raises :class:`ValueError` naming what is malformed."""
    value, _ = _read(text, 0, variables, stop=False)
    return value


def _read(text: str, i: int, variables: Mapping[str, str | None], stop: bool) -> tuple[str, int]:
    """The word from ``text[i:]`` to its end (or, with ``stop``, to the ``}`` closing a ``${``), and where
    it ended. Linear in the length: runs of plain characters are copied by one regular expression."""
    out: list[str] = []
    plain = _PLAIN_TO_BRACE if stop else _PLAIN
    n = len(text)
    while i < n:
        match = plain.match(text, i)
        if match:
            out.append(match.group())
            i = match.end()
            continue
        char = text[i]
        if char == "}":  # (only when stop)
            return "".join(out), i
        if char == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise _Malformed("a single quote (') is not closed")
            out.append(text[i + 1:end])
            i = end + 1
        elif char == '"':
            i += 1
            while True:
                if i >= n:
                    raise _Malformed('a double quote (") is not closed')
                match = _PLAIN_IN_DOUBLE.match(text, i)
                if match:
                    out.append(match.group())
                    i = match.end()
                elif text[i] == '"':
                    i += 1
                    break
                elif text[i] == "\\":
                    if text[i + 1:i + 2] in ('"', "$", "\\"):
                        out.append(text[i + 1])
                        i += 2
                    else:
                        out.append("\\")
                        i += 1
                else:
                    value, i = _dollar(text, i, variables)
                    out.append(value)
        elif char == "\\":
            out.append(text[i + 1:i + 2])  # (a \ at the very end is dropped, as Docker does)
            i += 2
        else:
            value, i = _dollar(text, i, variables)
            out.append(value)
    if stop:
        raise _Malformed("a ${ is not closed with }")
    return "".join(out), i


def _dollar(text: str, i: int, variables: Mapping[str, str | None]) -> tuple[str, int]:
    """The value of the ``$...`` at ``text[i]``, and where it ends."""
    i += 1
    if text[i:i + 1] != "{":
        match = _VARIABLE_NAME.match(text, i)
        if not match:
            return "$", i  # a $ before no name is a $
        return variables.get(match.group()) or "", match.end()
    match = _VARIABLE_NAME.match(text, i + 1)
    if not match:
        raise _Malformed("${...} needs a variable name inside (bad substitution)")
    name, i = match.group(), match.end()
    if i >= len(text):
        raise _Malformed("a ${ is not closed with }")
    if text[i:i + 1] == "}":
        return variables.get(name) or "", i + 1
    modifier = next((m for m in _MODIFIERS if text.startswith(m, i)), None)
    if modifier is None:
        known = f"${{{name}}}, ${{{name}:-default}}, ${{{name}:+alternative}}, ${{{name}:?message}}"
        raise _Malformed(f"${{{name}{text[i:i + 1]}...}} is not a substitution stages build knows ({known})")
    word, i = _read(text, i + len(modifier), variables, stop=True)
    value = variables.get(name)
    present = bool(value) if modifier.startswith(":") else value is not None
    if modifier.endswith("-"):
        return (value if present else word), i + 1
    if modifier.endswith("+"):
        return (word if present else ""), i + 1
    if not present:
        raise _Malformed(f"{name} is not set{': ' + word if word else ''} (${{{name}{modifier}...}})")
    return value, i + 1


def _expanded(step: Step, text: str, variables: Mapping[str, str | None]) -> str:
    """:func:`substitute`, a malformed word refused naming the line."""
    try:
        return substitute(text, variables)
    except _Malformed as error:
        raise _error(step, str(error), "close every quote and every ${, or put a \\ before a $ meant "
                     "literally") from None


#: One word of an instruction: plain characters, quoted strings (quotes kept) and escapes, up to a blank.
_WORD = re.compile(r"""(?:[^\s'"\\]+|'[^']*'|"(?:[^"\\]|\\.)*"|\\.|\\$)+""", re.DOTALL)
_BLANKS = re.compile(r"\s*")


def _split_words(step: Step, value: str) -> list[str]:
    """The words of ``value``, split at blanks outside quotes, the quotes still in them (Docker splits
    first and reads each word after, so a variable's value is never split again). An open quote is
    refused naming the line."""
    words, i, n = [], _BLANKS.match(value).end(), len(value)
    while i < n:
        match = _WORD.match(value, i)
        if match is None:
            which = "single quote (')" if value[i] == "'" else 'double quote (")'
            raise _error(step, f"a {which} is not closed", "close every quote")
        words.append(match.group())
        i = _BLANKS.match(value, match.end()).end()
        if i == match.end() and i < n:  # the word stopped at an open quote, not at a blank
            which = "single quote (')" if value[i] == "'" else 'double quote (")'
            raise _error(step, f"a {which} is not closed", "close every quote")
    return words


def _pairs(step: Step, value: str) -> dict[str, str]:
    """``K=V K2="v 2"`` (or the old ``K V`` form of ENV and LABEL) as ``{K: V}``, each still as written
    (quotes in): the step expands them with the variables it has."""
    words = _split_words(step, value)
    if words and "=" not in words[0]:
        if len(words) < 2:
            raise _error(step, f"{step.instruction} needs KEY=VALUE",
                         f"write {step.instruction} {words[0]}=value")
        return {words[0]: value.strip().split(None, 1)[1]}
    result = {}
    for word in words:
        key, equals, item = word.partition("=")
        if not equals or not key:
            raise _error(step, f"{word[:60]!r} is not KEY=VALUE", f"write {step.instruction} KEY=VALUE")
        result[key] = item
    return result


#: How the JSON (exec) form starts when that is what was meant: ``[`` then a quoted string and a comma
#: or the end, ``[]``, or a bare word and a comma (``[sh, -c]``). A shell command that starts with the
#: test command ``[ -f x ]`` or ``[ "$A" = x ]`` does not look like that.
_AFTER_FIRST = r"\s*(?:,|\]\s*$|$)"  # a comma, or the closing ] at the very end, or nothing more
_LOOKS_LIKE_JSON = re.compile(r"\[\s*(?:\]\s*$"  # []
                              r'|"(?:[^"\\]|\\.)*"' + _AFTER_FIRST  # ["sh", ...
                              + r"|'[^']*'" + _AFTER_FIRST  # ['sh', ...
                              + r"""|[^\s,'"\]]+\s*,)""")  # [sh, ...


def _exec_form(step: Step, value: str) -> list[str] | None:
    """The JSON array form (``["a", "b"]``), or None for the shell form. Docker takes anything that is
    not a JSON array of strings as the shell form; a value that plainly meant to be JSON (an unclosed
    ``["sh", "-c"``, single quotes, a number in the list) is refused naming the line instead, as it
    would only fail later, in a container, with a puzzling message."""
    if not value.startswith("["):
        return None
    try:
        parsed = json.loads(value)
    except ValueError as error:
        if not _LOOKS_LIKE_JSON.match(value):
            return None  # the shell's test command: [ -f /etc/passwd ] && ...
        problem = getattr(error, "msg", str(error))
        where = getattr(error, "pos", None)
        raise _error(step, f"this is meant as the JSON (exec) form but is not JSON: {problem}"
                     + (f" at character {where + 1}" if where is not None else ""),
                     'write ["program", "argument"]: double quotes, commas between, a closing ]; or leave '
                     "the brackets out for the shell form") from None
    if not isinstance(parsed, list):
        return None
    wrong = [item for item in parsed if not isinstance(item, str)]
    if wrong:
        quoted = [item if isinstance(item, str) else json.dumps(item) for item in parsed]
        raise _error(step, f"the JSON (exec) form takes strings only, and {json.dumps(wrong[0])} is not one",
                     f"quote every item: {json.dumps(quoted)}")
    return parsed


def _command(step: Step, value: str) -> list[str]:
    return _exec_form(step, value) or ["/bin/sh", "-c", value]


# -- the ignore file ---------------------------------------------------------------------------------
def ignore_patterns(context: Path) -> list[tuple[bool, str]]:
    """``.containerignore`` (else ``.dockerignore``): ``(exclude, pattern)`` per line, ``!`` an exception.

    Read as Docker reads it (moby/patternmatcher's ignorefile): a line starting with ``#`` is a comment,
    blanks around a pattern go, ``!`` makes it an exception, the path is cleaned and a leading ``/``
    dropped. A malformed pattern (an unclosed ``[``, a ``\\`` at the end) is refused naming its line, where
    it would otherwise ignore nothing without a word."""
    for name in (".containerignore", ".dockerignore"):
        path = context / name
        if path.is_file():
            try:
                text = path.read_text(encoding="utf-8", errors="surrogateescape")
            except OSError as error:
                raise BuildError(f"cannot read the ignore file {path}: {error.strerror or error}",
                                 "make it readable, or remove it") from None
            patterns = []
            for number, line in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
                if line.startswith("#") or not line.strip():
                    continue
                line = line.strip()
                negate = line.startswith("!")
                pattern = line[1:].strip() if negate else line
                pattern = os.path.normpath(pattern).lstrip("/") if pattern else ""
                try:
                    _pattern_regex(pattern)
                except ValueError as error:
                    raise BuildError(f"{path.name} line {number}: the pattern {line!r} is malformed: {error}",
                                     "fix it (the syntax is Go's filepath.Match: *, ?, [a-z], [^a-z], \\ to "
                                     "escape; ** for any number of directories), or escape a literal [ as "
                                     "\\[") from None
                patterns.append((not negate, pattern))
            return patterns
    return []


@functools.lru_cache(maxsize=1024)
def _pattern_regex(pattern: str) -> re.Pattern:
    """An ignore pattern as a regular expression, as Docker translates it (moby/patternmatcher): ``*``
    is any run of characters but ``/``, ``?`` one character but ``/``, ``**`` any number of directories
    (none too: ``**/*.log`` matches ``a.log``), ``[...]`` a character class, ``\\`` escapes the next
    character. Raises :class:`ValueError` saying what is malformed (what Go's filepath.Match, which
    Docker checks each pattern with, calls ErrBadPattern)."""
    out, i, n = ["^"], 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "*" and pattern[i + 1:i + 2] == "*":
            i += 2
            if pattern[i:i + 1] == "/":
                i += 1
            out.append(".*" if i >= n else "(?:.*/)?")
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "\\":
            if i + 1 >= n:
                raise ValueError("it ends with a \\ that escapes nothing")
            out.append(re.escape(pattern[i + 1]))
            i += 1
        elif char == "[":
            i, item = _character_class(pattern, i)
            out.append(item)
            continue
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + "$", re.DOTALL)


def _character_class(pattern: str, start: int) -> tuple[int, str]:
    """The ``[...]`` at ``pattern[start]`` as a regular expression, and where it ends (filepath.Match's
    rules: not empty, ``^`` first negates, ``a-z`` ranges, ``-`` and ``]`` only escaped)."""
    i, n = start + 1, len(pattern)
    negate = pattern[i:i + 1] == "^"
    i += negate
    items: list[str] = []

    def one(i: int) -> tuple[str, int]:
        if i >= n:
            raise ValueError("a [ is not closed with ]")
        char = pattern[i]
        if char in "-]":
            raise ValueError(f"a {char} in [...] needs a \\ before it" if items or char == "-"
                             else "[] is empty (a ] first in [...] needs a \\ before it)")
        if char == "\\":
            if i + 1 >= n:
                raise ValueError("a [ is not closed with ]")
            return pattern[i + 1], i + 2
        return char, i + 1

    while True:
        if i >= n:
            raise ValueError("a [ is not closed with ]")
        if pattern[i] == "]" and items:
            return i + 1, "[" + ("^" if negate else "") + "".join(items) + "]"
        low, i = one(i)
        if pattern[i:i + 1] == "-" and pattern[i + 1:i + 2] not in ("", "]"):
            high, i = one(i + 1)
            if high < low:
                raise ValueError(f"the range {low}-{high} runs backwards")
            items.append(f"{re.escape(low)}-{re.escape(high)}")
        else:
            items.append(re.escape(low))


def ignored(relative: str, patterns: list[tuple[bool, str]]) -> bool:
    """Whether ``relative`` (to the context) is excluded: the last pattern matching it or a parent wins
    (Docker's MatchesOrParentMatches)."""
    parts = relative.split("/")
    result = False
    for exclude, pattern in patterns:
        regex = _pattern_regex(pattern)
        if any(regex.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            result = exclude
    return result


# -- the cache -----------------------------------------------------------------------------------------
# Read once when a build starts and written once when it ends (merged under the store's lock with what
# other builds wrote meanwhile): one write per step rewrote the whole file each time, which made a
# Containerfile of n steps cost n^2 (10000 ENV lines: minutes).
def _cache() -> dict:
    try:
        return store.read_json(store.images_dir() / CACHE_FILE, {})
    except store.DamagedFileError:
        return {}  # a cache cut short is an empty cache: the steps run again, and the end rewrites it


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
def _locate(layer_dirs: list[str], path: str) -> tuple[str, os.stat_result] | None:
    """Where ``path`` of the merged image is (topmost layer first), and its stat; None if absent or
    whited out."""
    for layer in reversed(layer_dirs):
        where = os.path.join(layer, path.strip("/"))
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            info = os.lstat(where)
            if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                return None
            return where, info
    return None


def _lookup(layer_dirs: list[str], path: str) -> os.stat_result | None:
    """``path`` as the merged image shows it (topmost layer first), None if absent or whited out."""
    found = _locate(layer_dirs, path)
    return found[1] if found else None


def _in_root(root: Path, path: str) -> Path | None:
    """``path`` inside ``root`` as a process chrooted there would find it: symbolic links followed, an
    absolute one from ``root``, ``..`` never above it (what ``COPY --from`` copies; BuildKit follows the
    source path's links too). None when a link loops."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:  # ELOOP's limit, path_resolution(7)
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [item for item in target.split("/") if item not in ("", ".")] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def _names(text: str) -> dict[str, tuple[int, int]]:
    """/etc/passwd or /etc/group as ``{name: (third field, fourth field)}`` (uid, gid; or gid, 0)."""
    found = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            fourth = int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else 0
            found[fields[0]] = (int(fields[2]), fourth)
    return found


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
        self.work = store.scratch("build.")  # with an owner file: `stages prune` removes it if we are killed
        self.created: list[Path] = []
        self.state: State | None = None
        self.pre_args: dict[str, str] = {}
        self.network = "none"
        self.stages: list[Stage] = []
        self.stage: Stage | None = None  # the one being built
        self.done: dict[int, State] = {}  # the stages built so far
        self.roots: dict[int | str, Path] = {}  # COPY --from's sources, flattened once per build
        self.limits: dict[str, int | None] = {"pids": None, "memory": None}  # a RUN's (set by build())
        self.cache: dict | None = None  # the build cache as it was when it was first needed
        self.remembered: dict[str, dict] = {}  # what this build adds to it (written by save_cache)

    # -- the cache
    def _cached(self, key: str) -> dict | None:
        """What the step with ``key`` made: ``{"layer": descriptor or None, "created"}``; None when it is
        not in the cache or its layer has left the store since (``stages rmi``)."""
        if self.cache is None:
            self.cache = _cache()
        entry = self.remembered.get(key) or self.cache.get(key)
        if entry is None:
            return None
        layer = entry.get("layer")
        if layer and not (images.layer_dir(layer["diff_id"]).is_dir()
                          and images.blob_path(layer["digest"]).exists()):
            return None
        return entry

    def save_cache(self) -> None:
        """Add what this build made to the cache file, under the store's lock (another build may have
        added its own since we read it)."""
        if not self.remembered:
            return
        with store.locked() as top:
            cache = _cache()
            cache.update(self.remembered)
            store.write_json(top / CACHE_FILE, cache)

    # the layer of a step, stored (and taken back if the build fails)
    def _store_layer(self, blob: Path) -> dict:
        return images._add_layer(blob, layerlib.sha256_file(blob), self.work, self.created)

    def variables(self) -> Mapping[str, str | None]:
        """What ``$NAME`` means in this step: an ENV, else an ARG (Docker: ENV wins). A view, not a copy:
        a step costs the same after 10000 ENV lines as after one."""
        return ChainMap(self.state.env, self.state.args)

    def _lower(self) -> list[str]:
        return [str(images.layer_dir(layer["diff_id"])) for layer in self.state.layers]

    def _absolute(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.state.config.get("WorkingDir") or "/", path))

    def build(self, target: str | None = None) -> State:
        """Build the stages the target (default: the last stage) needs, in an order that builds each
        stage after those it uses; return the target's state."""
        prelude, self.pre_args, self.stages = plan(self.steps, self.build_args)
        final = len(self.stages) - 1
        if target is not None:
            by_name = {stage.name: stage.index for stage in self.stages if stage.name}
            if target.lower() not in by_name:
                raise BuildError(f"--target {target}: the Containerfile has no stage named {target}",
                                 "name it there with FROM IMAGE AS " + target.lower() + (
                                     f", or use one of {', '.join(sorted(by_name))}" if by_name else ""))
            final = by_name[target.lower()]
        order = self._order(final)
        multi = len(self.stages) > 1
        for stage in self.stages:
            if stage.index not in order:
                self.out(f"[{stage.index + 1}/{len(self.stages)}] skipped: stage {stage.label} is not needed")
        for index in order:
            self.stage, self.state = self.stages[index], None
            shown = (prelude if index == 0 else []) + self.stage.steps
            prefix = f"[{index + 1}/{len(self.stages)}] " if multi else ""
            for number, step in enumerate(shown, 1):
                self.out(f"{prefix}STEP {number}/{len(shown)}: {step.text}")
                handler = getattr(self, f"do_{step.instruction.lower()}")
                try:
                    handler(step)
                except OSError as error:  # a name too long, a full disk: a sentence that names the line
                    name = str(error.filename or "")
                    where = f" ({name})" if name and len(name) < 200 else ""
                    raise _error(step, f"it could not be done: {error.strerror or error}{where}",
                                 "check the paths this line names (a name has at most 255 characters) and "
                                 "the space left in the store (df -h $STAGES_HOME)") from None
            self.done[index] = self.state.finish()
        return self.done[final]

    def _order(self, final: int) -> list[int]:
        """The stages ``final`` needs (itself last), each after the ones it uses; a cycle anywhere in the
        file is refused, naming the step that closes it."""
        order: list[int] = []
        visiting: list[int] = []

        def visit(index: int) -> None:
            if index in order:
                return
            visiting.append(index)
            for needed, step in self.stages[index].needs:
                if needed in visiting:
                    loop = [self.stages[i].label for i in visiting[visiting.index(needed):]]
                    loop.append(self.stages[needed].label)
                    raise _error(step, f"stage {self.stages[index].label} needs stage "
                                 f"{self.stages[needed].label}, which needs it back: "
                                 f"a cycle ({' -> '.join(loop)})",
                                 "a stage can use only stages that do not use it; move what both need into a "
                                 "stage of its own")
                visit(needed)
            visiting.pop()
            order.append(index)

        for stage in self.stages:
            visit(stage.index)
        needed, todo = set(), [final]
        while todo:
            index = todo.pop()
            if index not in needed:
                needed.add(index)
                todo += [item for item, _ in self.stages[index].needs]
        return [index for index in order if index in needed]

    def _record(self, text: str, layer: dict | None, created: str) -> None:
        self.state.history.append({"created": created, "created_by": text,
                                   **({} if layer else {"empty_layer": True})})
        if layer:
            self.state.layers.append(layer)

    def _cached_step(self, step: Step, text: str, content: str, make) -> None:
        key = _digest(self.state.key, text, content)
        entry = self._cached(key)
        if entry is not None:
            self.out("--> cache hit")
            # the step's first time kept, so that a build wholly from the cache is the same image (same id)
            layer, created = entry["layer"], entry.get("created") or images._now()
        else:
            layer, created = make(), images._now()
            self.remembered[key] = {"layer": layer, "created": created}
        self.state.key = key
        self._record(text, layer, created)

    # -- instructions
    def do_from(self, step: Step) -> None:
        if self.stage.parent is not None:
            # FROM an earlier stage: its layers, config and history, and its last key go on
            done = self.done[self.stage.parent]
            self.state = State.starting(done.base, list(done.layers), copy.deepcopy(done.config),
                                        history=list(done.history), key=done.key)
            return
        reference = self.stage.base
        if reference.lower() == "scratch":
            # Docker's empty image: no layers, no config; what the stage COPYs is all there is
            self.state = State(base={"id": "scratch", "layers": []}, layers=[], config={},
                               key=_digest("scratch"))
            return
        try:
            base = images.get(reference)
        except StagesError as error:
            raise _error(step, error.message, error.hint or "") from None
        raw = images.config_of(base)
        config = {key: value for key, value in (raw.get("config") or {}).items() if key in images.CONFIG_KEYS}
        self.state = State.starting(base, list(base["layers"]), config,
                                    history=list(raw.get("history") or []), key=base["id"])

    def do_arg(self, step: Step) -> None:
        if self.state is None:
            return  # an ARG before the first FROM: plan() took its value
        name, value = _arg(step, self.build_args, self.pre_args, self.variables())
        self.state.args[name] = value
        self._cached_step(step, f"ARG {name}={value}", "", lambda: None)

    def _expanded_pairs(self, step: Step) -> dict[str, str]:
        """An ENV's or LABEL's pairs, every word read with the variables from before the line (Docker:
        ``ENV A=2 B=$A`` gives B the A from before)."""
        variables = self.variables()
        pairs = {}
        for key, value in _pairs(step, step.value).items():
            name = _expanded(step, key, variables)
            if not name or (step.instruction == "ENV" and "=" in name):
                raise _error(step, f"{key!r} gives the name {name!r}, which cannot name a variable",
                             f"write {step.instruction} NAME=value")
            pairs[name] = _expanded(step, value, variables)
        return pairs

    def do_env(self, step: Step) -> None:
        pairs = self._expanded_pairs(step)
        self.state.env.update(pairs)  # a name set again keeps its place in config.Env, as Docker does
        self._cached_step(step, "ENV " + " ".join(f"{k}={v}" for k, v in pairs.items()), "", lambda: None)

    def do_label(self, step: Step) -> None:
        pairs = self._expanded_pairs(step)
        labels = self.state.config.get("Labels")
        if not isinstance(labels, dict):
            labels = self.state.config["Labels"] = {}
        labels.update(pairs)
        self._cached_step(step, "LABEL " + json.dumps(pairs, sort_keys=True), "", lambda: None)

    def do_user(self, step: Step) -> None:
        self.state.config["User"] = _expanded(step, step.value, self.variables())
        self._cached_step(step, f"USER {self.state.config['User']}", "", lambda: None)

    def do_expose(self, step: Step) -> None:
        ports = {}
        variables = self.variables()
        for word in (_expanded(step, word, variables) for word in _split_words(step, step.value)):
            port, _, protocol = word.partition("/")
            if not port.isdigit() or not 0 < int(port) < 65536 or protocol not in ("", "tcp", "udp", "sctp"):
                raise _error(step, f"{word!r} is not a port", "write EXPOSE 80 or EXPOSE 53/udp")
            ports[f"{int(port)}/{protocol or 'tcp'}"] = {}
        self.state.config["ExposedPorts"] = {**(self.state.config.get("ExposedPorts") or {}), **ports}
        self._cached_step(step, "EXPOSE " + " ".join(ports), "", lambda: None)

    def do_cmd(self, step: Step) -> None:
        self.state.config["Cmd"] = _command(step, step.value) if step.value else []
        self._cached_step(step, "CMD " + json.dumps(self.state.config["Cmd"]), "", lambda: None)

    def do_entrypoint(self, step: Step) -> None:
        self.state.config["Entrypoint"] = _command(step, step.value)
        self.state.config.pop("Cmd", None)  # Docker: a new ENTRYPOINT clears the base image's CMD
        self._cached_step(step, "ENTRYPOINT " + json.dumps(self.state.config["Entrypoint"]), "", lambda: None)

    def do_workdir(self, step: Step) -> None:
        path = self._absolute(_expanded(step, step.value, self.variables()))
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

    def _from_sources(self, step: Step, source: int | str, words: list[str]) -> list[tuple[Path, str]]:
        """Each source of a ``COPY --from``, found in the stage's or image's files (flattened once):
        ``(path, the path as the stage knows it, relative to its /)``."""
        if source not in self.roots:
            if isinstance(source, int):
                layer_dirs = [str(images.layer_dir(layer["diff_id"])) for layer in self.done[source].layers]
            else:
                layer_dirs = images.layer_dirs(self._image(step, source))
            self.roots[source] = layerlib.flatten_layers(layer_dirs, Path(tempfile.mkdtemp(dir=self.work,
                                                                                             prefix="from.")))
        root = self.roots[source]
        what = f"stage {self.stages[source].label}" if isinstance(source, int) else f"the image {source}"
        found = []
        for word in words:
            if glob.has_magic(word):
                matches = sorted(os.path.relpath(match, root)
                                 for match in glob.glob(str(root / word.lstrip("/"))))
            else:
                matches = [os.path.normpath(word.lstrip("/") or ".")]
            here = [(path, relative) for relative in matches
                    if (path := _in_root(root, relative)) is not None and os.path.lexists(path)]
            if not here:
                hint = ("check the path: list it with a RUN ls in that stage" if isinstance(source, int)
                        else f"check the path: stages run --rm {source} ls {word}")
                raise _error(step, f"{word} is not in {what}", hint)
            found += here
        return found

    def _image(self, step: Step, reference: str) -> dict:
        try:
            return images.get(reference)
        except StagesError as error:
            raise _error(step, f"--from={reference} names no stage, and {error.message}",
                         "name a stage of this file (FROM IMAGE AS NAME), or an image: "
                         f"{error.hint}") from None

    def _owner(self, step: Step, spec: str) -> tuple[int, int]:
        """--chown's ``USER[:GROUP]`` as numbers. Names are looked up in the stage's /etc/passwd and
        /etc/group (passwd(5), group(5)); a user alone takes its own group: a number's same number, a
        name's group from /etc/passwd."""
        user, _, group = spec.partition(":")

        def table(path: str) -> dict[str, tuple[int, int]]:
            found = _locate(self._lower(), path)
            if found is None or not stat.S_ISREG(found[1].st_mode):
                raise _error(step, f"--chown={spec}: the image has no {path} to look the name up in",
                             "use numbers, e.g. --chown=1000:1000")
            return _names(Path(found[0]).read_text(errors="replace"))

        if user.isdigit():
            uid, primary = int(user), int(user)
        else:
            users = table("/etc/passwd")
            if user not in users:
                raise _error(step, f"--chown={spec}: there is no user {user} in the image's /etc/passwd",
                             f"use a number, or add the user in a RUN before it (adduser -D {user})")
            uid, primary = users[user]
        if not group:
            return uid, primary
        if group.isdigit():
            return uid, int(group)
        groups = table("/etc/group")
        if group not in groups:
            raise _error(step, f"--chown={spec}: there is no group {group} in the image's /etc/group",
                         f"use a number, or add the group in a RUN before it (addgroup {group})")
        return uid, groups[group][0]

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

    def _files(self, sources: list[tuple[Path, str]], patterns: list | None = None) -> list[tuple[Path, str]]:
        """Every file and directory under the sources, ignored ones left out (for the content digest)."""
        patterns = self.patterns if patterns is None else patterns
        every = []
        for source, relative in sources:
            every.append((source, relative))
            if source.is_dir() and not source.is_symlink():
                for directory, dirnames, filenames in os.walk(source):
                    dirnames.sort()
                    for name in sorted(dirnames) + sorted(filenames):
                        path = Path(directory) / name
                        inner = os.path.normpath(os.path.join(relative, os.path.relpath(path, source)))
                        if not ignored(inner, patterns):
                            every.append((path, inner))
        return every

    def do_copy(self, step: Step) -> None:
        self._copy(step, extract=False)

    def do_add(self, step: Step) -> None:
        self._copy(step, extract=True)

    def _copy(self, step: Step, extract: bool) -> None:
        variables = self.variables()
        flags, value = copy_flags(step, step.value)
        flags = {name: _expanded(step, item, variables) for name, item in flags.items()}
        listed = _exec_form(step, value)
        if listed is not None:  # JSON's strings are words already: their quotes and \ are characters
            words = [_expanded(step, re.sub(r"""(['"\\])""", r"\\\1", word), variables) for word in listed]
        else:
            words = [_expanded(step, word, variables) for word in _split_words(step, value)]
        if len(words) < 2:
            raise _error(step, f"{step.instruction} needs a source and a destination",
                         f"write {step.instruction} FILE /destination")
        owner = self._owner(step, flags["chown"]) if "chown" in flags else (0, 0)
        mode = int(flags["chmod"], 8) if "chmod" in flags else None
        source = self.stage.copies_from.get(step.line) if "from" in flags else None
        destination = self._absolute(words[-1])
        existing = _lookup(self._lower(), destination)
        options = "".join(f" --{name}={value}" for name, value in (
            ("chown", f"{owner[0]}:{owner[1]}" if "chown" in flags else None),
            ("chmod", f"{mode:04o}" if mode is not None else None)) if value)
        if source is None:
            sources = self._sources(step, words[:-1])
            content = _tree_digest(self._files(sources))
            text = f"{step.instruction}{options} {' '.join(rel for _, rel in sources)} {destination}"
        else:
            # the stage's last key (or the image's id) says what its files are: no digest of them needed
            of = self.done[source].key if isinstance(source, int) else self._image(step, source)["id"]
            sources, content = [], ""
            text = f"{step.instruction} --from={of}{options} {' '.join(words[:-1])} {destination}"

        def make() -> dict:
            from stages import rootfs

            found = sources or self._from_sources(step, source, words[:-1])
            files = self._files(found, self.patterns if source is None else [])
            into_directory = words[-1].endswith("/") or len(found) > 1 or any(
                path.is_dir() and not path.is_symlink() for path, _ in found)
            # a destination that is a directory in the image already takes the file inside, as in Docker
            into_directory = into_directory or (existing is not None and stat.S_ISDIR(existing.st_mode))
            root = Path(tempfile.mkdtemp(dir=self.work, prefix="copy."))
            target = root / destination.strip("/")
            for path_, relative in found:
                if path_.is_dir() and not path_.is_symlink():
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
                # the name as written (COPY --from=x /bin/sh /usr/bin/ makes sh, wherever the link led)
                place = target / os.path.basename(relative) if into_directory else target
                place.parent.mkdir(parents=True, exist_ok=True)
                if extract and not path_.is_symlink() and tarfile.is_tarfile(path_):
                    # ADD: a local tar archive (plain, gzip, bzip2, xz) is unpacked, by stage 1's extractor
                    target.mkdir(parents=True, exist_ok=True)
                    rootfs.extract(path_, target)
                else:
                    shutil.copy2(path_, place, follow_symlinks=False)
            # root's, unless --chown says whose (Docker: "All new files and directories are created with a
            # UID and GID of 0"); --chmod for what was copied, not the directory it went into
            for directory, dirnames, filenames in os.walk(root):
                for name in [*dirnames, *filenames, "."]:
                    where = os.path.join(directory, name)
                    with contextlib.suppress(OSError):
                        os.lchown(where, *owner)
                    if mode is not None and not os.path.islink(where) and os.path.normpath(where).startswith(
                            str(target) + ("/" if into_directory else "")):
                        os.chmod(where, mode)
            self._keep_parents(root, destination)
            blob = root.with_suffix(".tar")
            tar_tree(root, blob)
            return self._store_layer(blob)

        self._cached_step(step, text, content, make)

    def do_run(self, step: Step) -> None:
        args = _command(step, step.value)
        # ARG values reach RUN as environment variables (and so key its cache), ENV ones do too
        env = [f"{k}={v}" for k, v in sorted(self.state.args.items())]
        text = "RUN " + json.dumps(args) + (" with " + " ".join(env) if env else "")
        self._cached_step(step, text, "", lambda: self._run(step, args, env))

    def _run(self, step: Step, args: list[str], extra_env: list[str]) -> dict:
        from stages.runtime import containers, engine, flags
        from stages.runtime.flags import Options

        lower = self._lower()
        config = dict(self.state.config)
        config["Env"] = flags.merge_env(self.state.env_list() or images.DEFAULT_ENV, extra_env)
        if not lower:
            raise _error(step, "FROM scratch has no files, so no shell and no program to RUN",
                         "RUN in a stage FROM busybox, and COPY --from that stage what the image needs")
        # the network --network chose, no init (a bind-mount target would land in the layer), and the
        # limits: a cgroup with pids.max and a memory limit, so that a fork bomb or a runaway allocation
        # stays inside the RUN (cgroups(7); the kernel's pids and memory controllers)
        options = Options(image=self.state.base["id"], command=args, network=self.network, init=False,
                          pids_limit=self.limits["pids"],
                          memory=None if self.limits["memory"] is None else str(self.limits["memory"]))
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
                from stages.isolate.cgroups import format_bytes

                pids, memory = self.limits["pids"], self.limits["memory"]
                parts = ([f"{pids} processes at once"] if pids is not None else []) + (
                    [f"{format_bytes(memory)} of memory"] if memory is not None else [])
                limits = "a RUN may have " + " and ".join(parts) if parts else "a RUN has no limits here"
                try:  # (the engine asked the memory cgroup, as Docker does for OOMKilled)
                    oom_killed = bool(containers.read(info["id"]).get("oom_killed"))
                except StagesError:
                    oom_killed = False
                if oom_killed:
                    raise _error(step, "the kernel's OOM killer ended the command: it reached the RUN's "
                                 f"memory limit ({limits})",
                                 "give the build more with --memory, or make the command use less")
                raise _error(step, f"the command exited with {code}",
                             f"fix the command; try it with: stages run -it IMAGE sh ({limits}: a command "
                             "that cannot fork (\"Resource temporarily unavailable\") needs a larger "
                             "--pids-limit, one killed (exit 137) maybe a larger --memory)")
            upper = containers.directory(info["id"]) / "upper"
            blob = self.work / f"run-{info['id']}.tar"
            tar_upper(upper, blob)
            return self._store_layer(blob)
        finally:
            with contextlib.suppress(StagesError):
                engine.remove(info["id"], force=True)


def build(context: str | os.PathLike, tag: str, containerfile: str | os.PathLike | None = None,
          build_args: dict[str, str] | None = None, out=print, *, target: str | None = None,
          network: str = "none", pids_limit: int | str | None = None,
          memory: int | str | None = None) -> dict:
    """Build the Containerfile (default ``CONTEXT/Containerfile``, else ``CONTEXT/Dockerfile``) and tag the
    image ``tag``. Returns the image (as :func:`stages.runtime.images.resolve` does). A failure raises a
    :class:`BuildError` naming the line, and leaves no container, mount or partial image behind.

    ``target``: the stage (``FROM image AS name``) whose result is the image, default the last; stages
    it does not need are skipped. ``network``: what RUN steps get, ``none`` (the default: only their
    own loopback, so a build downloads nothing and creates no bridge or firewall rule unless asked),
    ``bridge`` (the stage-3 bridge, outbound through NAT: Docker's default) or ``host`` (the network
    namespace the build runs in). ``pids_limit`` and ``memory``: what each RUN may have (its cgroup's
    pids.max and memory limit), by default :data:`DEFAULT_PIDS_LIMIT` processes and
    :func:`default_memory` bytes (``memory`` as ``--memory`` takes it: 512M, 2G)."""
    from stages.errors import LimitError
    from stages.isolate.cgroups import detect, parse_memory, parse_pids

    context = Path(context)
    name = images.parse_reference(tag)
    if network not in NETWORKS:
        raise BuildError(f"--network {network!r} is not a network a build can use",
                         "use --network none (the default), bridge or host")
    limits: dict[str, int | None] = {}
    available = None
    for flag, key, given, parser, default in (
            ("--pids-limit", "pids", pids_limit, parse_pids, lambda: DEFAULT_PIDS_LIMIT),
            ("--memory", "memory", memory, parse_memory, default_memory)):
        if given is None:
            # the default only where this machine has the controller (a limit asked for and impossible
            # is refused by the runtime, with the reason)
            available = detect().controllers if available is None else available
            limits[key] = default() if key in available else None
            continue
        try:
            limits[key] = parser(given)
        except LimitError as error:
            raise BuildError(f"{flag} {given}: {error.message}", error.hint) from None
    if not context.is_dir():
        raise BuildError(f"the build context {context} is not a directory",
                         "give the directory that holds the files to COPY, e.g. `stages build -t x .`")
    if containerfile is None:
        found = [context / n for n in ("Containerfile", "Dockerfile") if (context / n).is_file()]
        containerfile = found[0] if found else context / "Containerfile"
    steps = parse(containerfile)
    builder = Builder(context, steps, dict(build_args or {}), out)
    builder.network, builder.limits = network, limits
    try:
        state = builder.build(target)
        created = state.history[-1]["created"] if state.history else images._now()
        config = {"architecture": "amd64", "os": "linux", "created": created,
                  "config": {key: value for key, value in state.config.items() if value not in (None, "")},
                  "history": state.history}
        # the cache first: were the commit to fail, the layers go, and entries that name them are ignored
        builder.save_cache()
        image = images._commit(config, state.layers, [name])
    except BaseException:
        images._roll_back(builder.created)
        raise
    finally:
        shutil.rmtree(builder.work, ignore_errors=True)
    out(f"COMMIT {name}\n--> {image['id'][7:19]}")
    return image


__all__ = ["BuildError", "Stage", "build", "copy_flags", "parse", "plan", "substitute", "ignored",
           "ignore_patterns", "tar_upper"]
