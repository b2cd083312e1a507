"""``stages build``: a Containerfile made into layers on the real kernel (RUN in a stage-3 container on
overlayfs), the cache, whiteouts, the ignore file, ADD of a tar, and errors that name the line; each
checked by its effect: the files in the image, what a container of it prints, what is left behind."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from stages.runtime import build, images, layers

pytestmark = pytest.mark.root


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("STAGES_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STAGES_RUN", str(tmp_path / "run"))
    return tmp_path / "home"


@pytest.fixture
def stages(home, tmp_path):
    """``stages(*argv)`` runs the command line in the test's own state directory."""
    env = dict(os.environ, STAGES_HOME=str(home), STAGES_RUN=str(tmp_path / "run"))
    env.pop("STAGES_HOST_NETNS", None)

    def call(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "stages.cli", *argv], capture_output=True, text=True,
                                env=env, timeout=120, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f"stages {' '.join(argv)} -> {result.returncode}\n{result.stdout}\n"
                                 f"{result.stderr}")
        return result

    yield call
    for record in (home / "containers").glob("*/container.json"):
        call("rm", "-f", record.parent.name, check=False)


@pytest.fixture
def context(tmp_path) -> Path:
    directory = tmp_path / "context"
    directory.mkdir()
    (directory / "hello.txt").write_text("hello from the context\n")
    return directory


CONTAINERFILE = """\
FROM busybox
# a comment, and a continuation line below
ENV GREETING=hi \\
    PLACE=workshop
RUN echo made by run > /made.txt
COPY hello.txt /app/
WORKDIR /app/work
CMD ["cat", "/made.txt"]
"""


def _flat(tmp_path: Path, name: str) -> Path:
    return images.flatten(name, tmp_path / f"flat-{name.replace(':', '-')}")


def _left_behind(home: Path) -> list[str]:
    """Containers, scratch directories and overlay mounts a build could leave."""
    found = [str(p) for p in (home / "containers").glob("*/container.json")]
    scratch = home / "images" / "tmp"
    found += [str(p) for p in scratch.iterdir()] if scratch.exists() else []
    with open("/proc/self/mountinfo") as handle:
        found += [line.split()[4] for line in handle if str(home) in line.split()[4]]
    return found


def test_a_build_has_the_files_and_config_and_runs(stages, context, home, tmp_path):
    (context / "Containerfile").write_text(CONTAINERFILE)
    result = stages("build", "-t", "lesson", str(context))
    assert "STEP 3/6: RUN echo made by run > /made.txt" in result.stdout
    assert "STEP 6/6: CMD" in result.stdout
    image = images.resolve("lesson")
    assert len(image["layers"]) == len(images.resolve("busybox")["layers"]) + 3  # RUN, COPY, WORKDIR
    flat = _flat(tmp_path, "lesson")
    assert (flat / "made.txt").read_text() == "made by run\n"
    assert (flat / "app" / "hello.txt").read_text() == "hello from the context\n"
    assert (flat / "app" / "work").is_dir()
    config = images.config_of(image)["config"]
    assert {"GREETING=hi", "PLACE=workshop"} <= set(config["Env"])
    assert config["Cmd"] == ["cat", "/made.txt"]
    assert config["WorkingDir"] == "/app/work"
    assert stages("run", "--rm", "lesson").stdout == "made by run\n"
    assert stages("run", "--rm", "lesson", "sh", "-c", "pwd; echo $GREETING").stdout == "/app/work\nhi\n"
    assert _left_behind(home) == []


def test_a_second_build_hits_the_cache_and_a_changed_file_invalidates_from_its_step(stages, context):
    (context / "Containerfile").write_text(CONTAINERFILE)
    stages("build", "-t", "lesson", str(context))
    first_image = images.resolve("lesson")
    first = first_image["layers"]
    started = time.monotonic()
    again = stages("build", "-t", "lesson", str(context)).stdout
    elapsed = time.monotonic() - started
    assert again.count("--> cache hit") == 5  # every step after FROM
    lines = again.splitlines()
    assert all(lines[i + 1] == "--> cache hit" for i, line in enumerate(lines) if line.startswith("STEP ")
               and not line.startswith("STEP 1/"))
    assert images.resolve("lesson")["id"] == first_image["id"]  # the same image, no dangling copy
    assert len(images.list_images()) == 2  # busybox and lesson
    assert elapsed < 10, f"an all-cached build took {elapsed:.1f} s"

    (context / "hello.txt").write_text("changed\n")
    changed = stages("build", "-t", "lesson", str(context)).stdout
    lines = changed.splitlines()
    copy_at = lines.index("STEP 4/6: COPY hello.txt /app/")
    assert lines[copy_at - 1] == "--> cache hit"  # the RUN before it still cached
    assert "--> cache hit" not in lines[copy_at:]
    now = images.resolve("lesson")["layers"]
    assert now[:-2] == first[:-2] and now[-2] != first[-2]
    assert stages("run", "--rm", "lesson", "cat", "/app/hello.txt").stdout == "changed\n"


def test_a_run_rm_leaves_a_whiteout_and_the_file_is_gone(stages, context):
    (context / "Containerfile").write_text("FROM busybox\nRUN rm /bin/true && rm -r /root\n")
    stages("build", "-t", "removed", str(context))
    top = images.resolve("removed")["layers"][-1]
    with tarfile.open(images.blob_path(top["digest"])) as tar:
        names = tar.getnames()
    assert "bin/.wh.true" in names and "bin/true" not in names
    assert ".wh.root" in names
    assert layers.is_whiteout(images.layer_dir(top["diff_id"]) / "bin" / "true")
    gone = stages("run", "--rm", "removed", "sh", "-c", "ls /bin/true /root; echo done", check=False)
    assert "No such file" in gone.stderr + gone.stdout and "done" in gone.stdout
    assert stages("run", "--rm", "busybox", "ls", "/bin/true").stdout.strip() == "/bin/true"


def test_a_failing_run_names_the_line_and_leaves_nothing(stages, context, home):
    (context / "Containerfile").write_text("FROM busybox\nCOPY hello.txt /\n\nRUN echo partly; exit 3\n")
    result = stages("build", "-t", "broken", str(context), check=False)
    assert result.returncode == 1
    assert "Containerfile line 4: `RUN echo partly; exit 3`: the command exited with 3" in result.stderr
    assert "hint:" in result.stderr
    assert "broken:latest" not in images.repositories()
    assert [i["names"] for i in images.list_images()] == [["busybox:latest"]]  # no partial image
    layer_dirs = {p.name for p in (home / "images" / "layers").iterdir()}
    assert layer_dirs == {images.resolve("busybox")["layers"][0]["diff_id"][7:]}
    assert _left_behind(home) == []


@pytest.mark.parametrize("text, line, problem, before_any_step", [
    ("FROM busybox\nCOPY onlyone\n", 2, "COPY needs a source and a destination", True),
    ("FROM busybox\n# c\nFROBNICATE x\n", 3, "FROBNICATE is not an instruction", True),
    ("RUN true\n", 1, "the first instruction must be FROM", True),
    ("FROM busybox\nENV =x\n", 2, "is not KEY=VALUE", True),
    ("FROM busybox\nEXPOSE http\n", 2, "'http' is not a port", False),
    ("FROM busybox\nCOPY missing.txt /\n", 2, "missing.txt is not in the build context", False),
    ("FROM no-such-image\n", 1, "there is no image", False),
])
def test_a_malformed_instruction_names_its_line(stages, context, home, text, line, problem, before_any_step):
    (context / "Containerfile").write_text(text)
    result = stages("build", "-t", "malformed", str(context), check=False)
    assert result.returncode == 1
    assert f"Containerfile line {line}: `" in result.stderr and problem in result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.stderr
    assert "malformed:latest" not in images.repositories()
    assert ("STEP" not in result.stdout) == before_any_step  # the file's shape is checked before step 1


def test_the_ignore_file_excludes_files_with_exceptions(stages, context, tmp_path):
    (context / "secret.key").write_text("do not ship\n")
    (context / "logs").mkdir()
    (context / "logs" / "a.log").write_text("a\n")
    (context / "logs" / "keep.log").write_text("keep\n")
    (context / ".dockerignore").write_text("# comment\n*.key\nlogs\n!logs/keep.log\n")
    (context / "Containerfile").write_text("FROM busybox\nCOPY . /ctx/\n")
    stages("build", "-t", "ignoring", str(context))
    flat = _flat(tmp_path, "ignoring")
    assert (flat / "ctx" / "hello.txt").exists()
    assert not (flat / "ctx" / "secret.key").exists()
    assert not (flat / "ctx" / "logs" / "a.log").exists()
    assert (flat / "ctx" / "logs" / "keep.log").read_text() == "keep\n"
    # a changed ignored file does not invalidate the cache
    (context / "secret.key").write_text("changed\n")
    assert "--> cache hit" in stages("build", "-t", "ignoring", str(context)).stdout


def test_add_of_a_local_tar_extracts_it(stages, context, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in (("pkg/bin/tool", b"#!/bin/sh\necho tool\n"), ("pkg/README", b"read me\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    (context / "pkg.tar.gz").write_bytes(buffer.getvalue())
    (context / "Containerfile").write_text("FROM busybox\nADD pkg.tar.gz /opt/\nCOPY pkg.tar.gz /copied/\n")
    stages("build", "-t", "added", str(context))
    flat = _flat(tmp_path, "added")
    assert (flat / "opt" / "pkg" / "README").read_text() == "read me\n"
    assert not (flat / "opt" / "pkg.tar.gz").exists()
    assert (flat / "copied" / "pkg.tar.gz").read_bytes() == buffer.getvalue()  # COPY never extracts
    assert stages("run", "--rm", "added", "/opt/pkg/bin/tool").stdout == "tool\n"


def test_arg_and_env_substitution():
    assert build.substitute("$A/${B}/${C:-dflt}/${A:+alt}/\\$A", {"A": "1", "B": "2"}) == "1/2/dflt/alt/$A"
    patterns = [(True, "*.log"), (False, "keep.log"), (True, "build")]
    assert build.ignored("x.log", patterns) and not build.ignored("keep.log", patterns)
    assert build.ignored("build/deep/file", patterns) and not build.ignored("src/a.py", patterns)


def test_arg_label_expose_user_entrypoint_and_an_opaque_directory(stages, context):
    (context / "Containerfile").write_text(
        "FROM busybox\nARG WHO=world\nLABEL who=\"${WHO}\" lesson=build\nEXPOSE 80 53/udp\n"
        "RUN rm -r /etc && mkdir /etc && echo $WHO > /etc/who\nUSER 65534\nRUN id -u > /tmp/uid\n"
        "ENTRYPOINT [\"sh\", \"-c\"]\nCMD [\"cat /etc/who\"]\n")
    stages("build", "-t", "extra", "--build-arg", "WHO=you", str(context))
    image = images.resolve("extra")
    config = images.config_of(image)["config"]
    assert config["Labels"] == {"who": "you", "lesson": "build"}
    assert config["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}}
    assert config["User"] == "65534" and config["Entrypoint"] == ["sh", "-c"]
    # rm -r of a base directory then mkdir: overlayfs makes it opaque, the layer says .wh..wh..opq
    with tarfile.open(images.blob_path(image["layers"][-2]["digest"])) as tar:
        assert {"etc/.wh..wh..opq", "etc/who"} <= set(tar.getnames())
    assert stages("run", "--rm", "extra").stdout == "you\n"
    # the opaque /etc holds only who (and what every container gets bound in: hostname, hosts, resolv.conf)
    listed = stages("run", "--rm", "extra", "ls /etc; cat /tmp/uid").stdout
    assert listed == "hostname\nhosts\nresolv.conf\nwho\n65534\n"


# -- multi-stage builds (issue #4) ---------------------------------------------------------------------
MULTI_STAGE = """\
ARG BASE=busybox
FROM ${BASE} AS builder
RUN mkdir /out && echo built in the builder > /out/greeting && echo junk > /junk.txt
FROM builder AS tested
RUN test -f /out/greeting && touch /tested
FROM busybox AS broken
RUN echo this stage must be skipped; exit 3
FROM scratch
COPY --from=builder /out/greeting /greeting
COPY --from=1 /tested /
COPY --from=busybox /etc/group /from-the-image/
"""


def _tree(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(top, name), root) for top, dirs, files in os.walk(root)
            for name in dirs + files}


def test_a_multi_stage_build_keeps_only_what_the_last_stage_copied(stages, context, tmp_path):
    (context / "Containerfile").write_text(MULTI_STAGE)
    out = stages("build", "-t", "multi", str(context)).stdout
    assert "[1/4] STEP 1/3: ARG BASE=busybox" in out and "[1/4] STEP 2/3: FROM ${BASE} AS builder" in out
    assert "[3/4] skipped: stage broken is not needed" in out and "must be skipped" not in out
    assert out.index("[1/4] STEP 3/3") < out.index("[2/4] STEP 1/2") < out.index("[4/4] STEP 1/4")
    image = images.resolve("multi")
    assert len(image["layers"]) == 3  # FROM scratch: the three COPYs, nothing of busybox or the builder
    flat = _flat(tmp_path, "multi")
    assert _tree(flat) == {"greeting", "tested", "from-the-image", "from-the-image/group"}
    assert (flat / "greeting").read_text() == "built in the builder\n"
    assert (flat / "from-the-image" / "group").read_text().startswith("root:x:0:")
    # built again: every step of the needed stages from the cache, the same image
    again = stages("build", "-t", "multi", str(context)).stdout
    assert again.count("--> cache hit") == 5 and images.resolve("multi")["id"] == image["id"]
    # the builder changed: its RUN, the stage FROM it, and the COPYs --from it run again (and the one after
    # them: a step's key includes the key before it)
    (context / "Containerfile").write_text(MULTI_STAGE.replace("built in the builder", "built again"))
    assert "--> cache hit" not in stages("build", "-t", "multi", str(context)).stdout
    assert _tree(_flat(tmp_path, "multi")) == _tree(flat)
    assert (tmp_path / "flat-multi" / "greeting").read_text() == "built again\n"

    # --target: the image is that stage's (FROM builder carried the builder's files and config on)
    out = stages("build", "-t", "multi:tested", "--target", "tested", str(context)).stdout
    assert "[3/4] skipped" in out and "[4/4] skipped" in out and "--> cache hit" in out
    assert stages("run", "--rm", "multi:tested", "sh", "-c", "cat /out/greeting /junk.txt; ls /tested"
                  ).stdout == "built again\njunk\n/tested\n"


def test_a_stage_that_starts_from_another_and_copies_a_directory_through_a_link(stages, context):
    (context / "Containerfile").write_text(
        "FROM busybox AS base\nENV WHERE=stage\nRUN mkdir -p /srv/app/sub && echo a > /srv/app/a && "
        "echo b > /srv/app/sub/b && ln -s /srv/app /app\n"
        "FROM base\nARG BASE\nCOPY --from=base /app /copied\nCOPY --from=base /bin/sh /usr/local/bin/\n")
    stages("build", "-t", "derived", str(context))
    shown = stages("run", "--rm", "derived", "sh", "-c",
                   "echo $WHERE; cat /copied/a /copied/sub/b; ls -l /usr/local/bin/sh | cut -c1").stdout
    # ENV from the stage it starts from; the link /app followed (inside the stage), its directory copied
    # as a directory, and /bin/sh (a link to busybox) copied as the file it leads to, named sh
    assert shown == "stage\na\nb\n-\n"


def test_chown_and_chmod_set_the_owner_and_mode_seen_inside(stages, context):
    (context / "Containerfile").write_text(
        "FROM busybox\n"
        "RUN echo 'alice:x:1234:1235::/home/alice:/bin/sh' >> /etc/passwd && "
        "echo 'staff2:x:1240:' >> /etc/group\n"
        "COPY --chown=alice hello.txt /home/alice/\n"
        "COPY --chown=alice:staff2 --chmod=0600 hello.txt /named.txt\n"
        "COPY --chown=7:8 --chmod=640 hello.txt /numbers/\n"
        "ADD --chown=1 hello.txt /added.txt\n")
    stages("build", "-t", "owned", str(context))
    seen = stages("run", "--rm", "owned", "stat", "-c", "%n %u:%g %a", "/home/alice", "/home/alice/hello.txt",
                  "/named.txt", "/numbers", "/numbers/hello.txt", "/added.txt").stdout
    assert seen.splitlines() == [
        "/home/alice 1234:1235 755",  # a directory COPY made takes the owner; --chmod is for what it copied
        "/home/alice/hello.txt 1234:1235 644",  # a name alone: its group from /etc/passwd
        "/named.txt 1234:1240 600",
        "/numbers 7:8 755",
        "/numbers/hello.txt 7:8 640",
        "/added.txt 1:1 644",  # a number alone: the same number for the group, as Docker does
    ]


@pytest.mark.parametrize("text, line, problem, before_any_step", [
    ("FROM busybox\nCOPY --from=nosuchstage /etc/passwd /\n", 2,
     "--from=nosuchstage names no stage, and there is no image 'nosuchstage'", False),
    ("FROM busybox AS a\nCOPY --from=b /x /x\nFROM busybox AS b\nCOPY --from=a /y /y\n", 4,
     "stage b needs stage a, which needs it back: a cycle (a -> b -> a)", True),
    ("FROM busybox AS a\nCOPY --from=a /x /x\n", 2, "a cycle (a -> a)", True),
    ("FROM busybox AS a\nFROM busybox AS A\n", 2, "a stage named a exists already (line 1)", True),
    ("FROM busybox\nCOPY --from=3 /x /x\n", 2, "there is no stage 3", True),
    ("FROM busybox\nADD --from=0 /x /x\n", 2, "the flag --from is not supported by stages build for ADD",
     True),
    ("FROM busybox\nCOPY --chmod=rw hello.txt /\n", 2, "--chmod=rw is not an octal mode", True),
    ("FROM busybox\nCOPY --link hello.txt /\n", 2, "the flag --link is not supported", True),
    ("FROM busybox\nCOPY --chown=alice hello.txt /\n", 2, "there is no user alice in the image's /etc/passwd",
     False),
    ("FROM busybox\nCOPY --chown=0:wheel hello.txt /\n", 2,
     "there is no group wheel in the image's /etc/group", False),
    ("FROM busybox AS b\nFROM busybox\nCOPY --from=b /nothing/here /\n", 3,
     "/nothing/here is not in stage b", False),
    ("FROM scratch\nRUN true\n", 2, "FROM scratch has no files", False),
])
def test_a_multi_stage_mistake_names_its_line(stages, context, home, text, line, problem, before_any_step):
    (context / "Containerfile").write_text(text)
    result = stages("build", "-t", "mistake", str(context), check=False)
    assert result.returncode == 1
    assert f"Containerfile line {line}: `" in result.stderr and problem in result.stderr, result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.stderr
    assert "mistake:latest" not in images.repositories()
    assert ("STEP" not in result.stdout) == before_any_step
    assert _left_behind(home) == []  # no container, mount, or flattened stage left in the scratch space


def test_a_target_that_is_no_stage_and_a_network_that_is_none_are_refused(stages, context):
    (context / "Containerfile").write_text("FROM busybox AS one\nFROM one AS two\n")
    result = stages("build", "-t", "x", "--target", "three", str(context), check=False)
    assert result.returncode == 1 and "the Containerfile has no stage named three" in result.stderr
    assert "one, two" in result.stderr and "STEP" not in result.stdout
    result = stages("build", "-t", "x", "--network", "wifi", str(context), check=False)
    assert result.returncode == 1 and "--network 'wifi' is not a network" in result.stderr


# -- RUN's network: tests make the namespaces, nothing leaves the machine -------------------------------
_netns_counter = iter(range(1_000_000))


def _netns_name() -> str:
    return f"stgbld{os.getpid() % 100000}x{next(_netns_counter)}"


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=20)


def _nc_containerfile(context: Path, address: str, port: int, into: str = "/seen") -> None:
    # the server answers with the address it sees the RUN's connection come from
    (context / "Containerfile").write_text(f"FROM busybox\nRUN nc {address} {port} </dev/null > {into}\n")


def _build_in(env: dict, context: Path, *argv: str, prefix: tuple[str, ...] = ()
              ) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "stages.cli", "build", *argv, str(context)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env)


@pytest.fixture
def build_env(home, tmp_path) -> dict:
    env = dict(os.environ, STAGES_HOME=str(home), STAGES_RUN=str(tmp_path / "run"))
    env.pop("STAGES_HOST_NETNS", None)
    return env


@pytest.mark.net
def test_run_on_the_bridge_reaches_a_server_outside_through_nat(build_env, context):
    """--network bridge: a stand-in host (STAGES_HOST_NETNS) joined by a veth to an "outside" namespace
    with a server; the RUN's connection arrives from the host's address, as NAT makes it."""
    from net_peers import Server

    from stages.isolate.network import test_host as make_test_host

    host, outside = _netns_name(), _netns_name()
    with make_test_host(host), make_test_host(outside):
        _ip("-n", host, "link", "add", "bth", "type", "veth", "peer", "name", "bto", "netns", outside)
        _ip("-n", host, "addr", "add", "10.203.0.1/24", "dev", "bth")
        _ip("-n", host, "link", "set", "bth", "up")
        _ip("-n", outside, "addr", "add", "10.203.0.2/24", "dev", "bto")
        _ip("-n", outside, "link", "set", "bto", "up")
        _nc_containerfile(context, "10.203.0.2", 7300)
        with Server(["ip", "netns", "exec", outside], 7300):
            result = _build_in({**build_env, "STAGES_HOST_NETNS": host}, context, "-t", "bridged",
                               "--network", "bridge")
        assert result.returncode == 0, result.stdout + result.stderr
        links = subprocess.run(["ip", "-n", host, "-o", "link"], capture_output=True, text=True).stdout
        assert "stages0" not in links  # the RUN's veth and the bridge went with its container
    top = images.resolve("bridged")["layers"][-1]
    assert (images.layer_dir(top["diff_id"]) / "seen").read_text().strip() == "10.203.0.1"


@pytest.mark.net
def test_run_with_network_host_and_none_in_a_namespace_the_test_makes(build_env, context):
    """--network host: the RUN shares the network namespace the build runs in (here one the test made,
    with a server on its loopback); --network none, the default: the RUN has only its own lo, and cannot
    reach it."""
    from net_peers import Server

    from stages.isolate.network import test_host as make_test_host

    with make_test_host(_netns_name()) as name:
        _nc_containerfile(context, "127.0.0.1", 7301)
        inside = ("nsenter", f"--net=/run/netns/{name}")  # (ip netns exec would remount /sys: no cgroups)
        with Server(list(inside), 7301):
            host = _build_in(build_env, context, "-t", "hosted", "--network", "host", prefix=inside)
            # another step (the network is not part of a step's cache key, as in Docker)
            _nc_containerfile(context, "127.0.0.1", 7301, into="/seen-without-a-network")
            # no --network: none, the default (a build is offline unless asked)
            none = _build_in(build_env, context, "-t", "unnetworked", prefix=inside)
    assert host.returncode == 0, host.stdout + host.stderr
    top = images.resolve("hosted")["layers"][-1]
    assert (images.layer_dir(top["diff_id"]) / "seen").read_text().strip() == "127.0.0.1"
    assert none.returncode == 1 and "Containerfile line 2: `RUN nc 127.0.0.1 7301" in none.stderr
    assert "the command exited with 1" in none.stderr
