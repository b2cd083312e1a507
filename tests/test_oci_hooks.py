"""OCI hooks (config.md "POSIX-platform Hooks", runtime.md "Lifecycle"), run for real.

Every hook here is a small shell script of the host's (or, for startContainer, of the busybox rootfs)
that writes the state it read on stdin, and facts about where it ran, into a directory the test reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
import test_podman
from test_podman import podman, runtime  # noqa: F401 - fixtures of the podman test

from stages.runtime import oci
from stages.runtime.oci import hooks as oci_hooks
from stages.runtime.oci import spec as oci_spec
from stages.steps import StepRecord

pytestmark = pytest.mark.root

SH = "/bin/sh"
# What a hook writes: the state it read, then where it ran (its UTS namespace and its root's inode).
RECORDER = ('cat > "$OUT/$KIND.json"; readlink /proc/self/ns/uts > "$OUT/$KIND.uts"; '
            'stat -c %i / > "$OUT/$KIND.root"; echo "$KIND" >> "$OUT/order"')


@pytest.fixture
def out(tmp_path):
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


def recorder(kind: str, out, inside: bool = False, **extra) -> dict:
    """A hook that records what it saw; inside the container, ``out`` is bind-mounted at /tmp."""
    where = "/tmp" if inside else str(out)
    return {"path": SH, "args": ["sh", "-c", RECORDER], "env": [f"OUT={where}", f"KIND={kind}",
                                                                  "PATH=/usr/bin:/bin"], **extra}


def bundle(tmp_path, rootfs, out, hooks: dict, args=None) -> str:
    config = oci.default_spec(args or ["sh", "-c", "echo program >> /tmp/order"], rootfs=str(rootfs),
                              hostname="hooked")
    config["mounts"].append({"destination": "/tmp", "type": "bind", "source": str(out),
                             "options": ["rbind", "rw"]})
    config["hooks"] = hooks
    return oci.write_bundle(tmp_path / "bundle", config)


def read_state(out, kind: str) -> dict:
    return json.loads((out / f"{kind}.json").read_text())


def name(tmp_path) -> str:
    return f"h-{os.getpid()}-{tmp_path.name[-20:]}"[:60]


# -- the whole lifecycle ---------------------------------------------------------------------------------
def test_every_hook_kind_runs_in_order_with_the_state_and_in_the_right_namespaces(tmp_path, root, out,
                                                                                busybox_rootfs):
    kinds = ("prestart", "createRuntime", "createContainer", "poststart", "poststop")
    hooks = {kind: [recorder(kind, out)] for kind in kinds}
    hooks["startContainer"] = [recorder("startContainer", out, inside=True)]
    path = bundle(tmp_path, busybox_rootfs, out, hooks)
    cid = name(tmp_path)
    record = StepRecord()
    created = oci.create(cid, path, root=root, record=record)
    pid = created["pid"]
    with open(out / "order", "a") as handle:
        handle.write("created\n")
    oci.start(cid, root=root, record=record)
    with open(out / "order", "a") as handle:
        handle.write("started\n")
    assert oci.wait(cid, root=root) == 0
    oci.delete(cid, root=root, record=record)

    order = (out / "order").read_text().split()
    # runtime.md, "Lifecycle": 3-5 during create, 7 (then the program, 8) and 9 during start, 13 on delete
    assert order[:4] == ["prestart", "createRuntime", "createContainer", "created"]
    assert order[4] == "startContainer"
    assert sorted(order[5:7]) == ["poststart", "program"] and order[7:] == ["started", "poststop"]
    expected = {"prestart": "creating", "createRuntime": "creating", "createContainer": "creating",
                "startContainer": "created", "poststart": "running", "poststop": "stopped"}
    for kind, status in expected.items():
        state = read_state(out, kind)
        assert (state["status"], state["id"], state["bundle"]) == (status, cid, path), kind
        assert state["pid"] == pid, kind  # the init's PID as the host sees it
    assert pid != os.getpid() and pid > 1
    # the runtime's hooks run in the host's namespaces, the container's in the container's
    host_uts = os.readlink("/proc/self/ns/uts")
    for kind in ("prestart", "createRuntime", "poststart", "poststop"):
        assert (out / f"{kind}.uts").read_text().strip() == host_uts, kind
    for kind in ("createContainer", "startContainer"):
        assert (out / f"{kind}.uts").read_text().strip() != host_uts, kind
    # createContainer still sees the host's root (before pivot_root), startContainer the rootfs
    host_root = str(os.stat("/").st_ino)
    assert (out / "createContainer.root").read_text().strip() == host_root
    assert (out / "startContainer.root").read_text().strip() == str(os.stat(busybox_rootfs).st_ino)
    # each hook is a step whose shell line is its command, once, in lifecycle order
    lines = [item.shell for item in record.steps if item.shell.startswith("env -i OUT=")]
    assert [line.split("KIND=")[1].split()[0] for line in lines] == list(expected)
    assert all(item.ok for item in record.steps)
    script = record.script()
    assert script.index("mount -t proc") < script.index("KIND=prestart") < script.index("pivot_root . .")


def test_a_hook_gets_exactly_its_args_and_env(tmp_path, root, out, busybox_rootfs, monkeypatch):
    """args[0] is the program's own name; env is its whole environment (without one, the runtime's)."""
    monkeypatch.setenv("STAGES_HOOK_TEST", "inherited")
    plain = {"path": SH, "args": ["sh", "-c", f'echo "$STAGES_HOOK_TEST" > {out}/plain']}
    script = (r'echo "$(tr "\0" " " < /proc/$$/cmdline)" > "$1"; echo "$GREETING ${HOME:-nohome}" >> "$1";'
              r'exec grep -E "^Sig(Blk|Ign)" /proc/self/status >> "$1"')  # exec: the shell's own mask
    hook = {"path": SH, "args": ["my-hook", "-c", script, "zero", str(out / "said")],
            "env": ["GREETING=hello"]}
    path = bundle(tmp_path, busybox_rootfs, out, {"createRuntime": [hook], "createContainer": [plain]},
                  args=["true"])
    assert oci.run(name(tmp_path), path, root=root) == 0
    assert (out / "plain").read_text() == "inherited\n"
    argv, environment, blocked, ignored = (out / "said").read_text().splitlines()
    assert argv.split()[:3] == ["my-hook", "-c", "echo"] and argv.split()[-2:] == ["zero", str(out / "said")]
    assert environment == "hello nohome"
    # no signal blocked or ignored (Python ignores SIGPIPE and SIGXFSZ, and the setup the keyboard's)
    assert int(blocked.split()[1], 16) == 0
    assert int(ignored.split()[1], 16) & 0x7FFFFFFF == 0  # signals 1-31 (glibc keeps its own 32 and 33)


# -- failures --------------------------------------------------------------------------------------------
def test_a_failing_create_runtime_hook_stops_the_container_and_leaves_nothing(tmp_path, root, out,
                                                                            busybox_rootfs):
    failing = {"path": SH, "args": ["sh", "-c", "echo the disk is full >&2; exit 3"]}
    hooks = {"createRuntime": [recorder("createRuntime", out), failing],
             "createContainer": [recorder("createContainer", out)],
             "poststop": [recorder("poststop", out)]}
    path = bundle(tmp_path, busybox_rootfs, out, hooks)
    cid = name(tmp_path)
    with pytest.raises(oci_hooks.HookError) as caught:
        oci.create(cid, path, root=root)
    message = str(caught.value)
    assert "createRuntime hook #1 (/bin/sh)" in message and "status 3" in message
    assert "the disk is full" in message
    # the container is gone: no state directory, no cgroup (the leak check), no process
    assert not os.path.exists(os.path.join(root, cid))
    pid = read_state(out, "createRuntime")["pid"]
    deadline = time.monotonic() + 2
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{pid}")
    # the lifecycle goes on at "destroy", then poststop (runtime.md); createContainer never ran
    assert (out / "order").read_text().split() == ["createRuntime", "poststop"]


def test_a_failing_create_container_hook_is_raised_as_a_hook_error(tmp_path, root, out, busybox_rootfs):
    path = bundle(tmp_path, busybox_rootfs, out,
                  {"createContainer": [{"path": SH, "args": ["sh", "-c", "exit 4"]}]})
    expected = r"createContainer hook #0 \(/bin/sh\) exited with status 4"
    with pytest.raises(oci_hooks.HookError, match=expected):
        oci.create(name(tmp_path), path, root=root)
    assert os.listdir(root) == []


@pytest.mark.parametrize("kind", ["prestart", "createContainer", "startContainer"])
def test_a_timeout_kills_the_hook(tmp_path, root, out, busybox_rootfs, kind):
    """In the runtime, in the init before pivot_root, in the container before its program."""
    sleeper = {"path": "/bin/sleep", "args": ["sleep", "100"], "timeout": 1}
    path = bundle(tmp_path, busybox_rootfs, out, {kind: [sleeper]})
    expected = rf"{kind} hook #0 \(/bin/sleep\) did not finish within 1 s and was killed"
    cid = name(tmp_path)
    began = time.monotonic()
    with pytest.raises(oci_hooks.HookError, match=expected):
        oci.create(cid, path, root=root)
        oci.start(cid, root=root)
    assert time.monotonic() - began < 5
    if kind == "startContainer":
        assert oci.wait(cid, root=root) != 0 and not (out / "order").exists()  # the program never ran
        oci.delete(cid, root=root)
    assert os.listdir(root) == []
    # the sleep was killed (and reaped): the leak check finds no child process left


def test_a_failing_start_container_hook_stops_the_container_before_its_program(tmp_path, root, out,
                                                                             busybox_rootfs):
    failing = {"path": "/bin/sh", "args": ["sh", "-c", "echo no >&2; exit 5"]}
    path = bundle(tmp_path, busybox_rootfs, out, {"startContainer": [failing],
                                                  "poststart": [recorder("poststart", out)]})
    cid = name(tmp_path)
    oci.create(cid, path, root=root)
    expected = r"startContainer hook #0 \(/bin/sh\) exited with status 5: no"
    with pytest.raises(oci_hooks.HookError, match=expected):
        oci.start(cid, root=root)
    oci.wait(cid, root=root)
    assert oci.state(cid, root=root)["status"] == "stopped"
    assert not (out / "order").exists()  # neither the program nor poststart ran
    oci.delete(cid, root=root)


def test_failing_poststart_and_poststop_hooks_are_warnings(tmp_path, root, out, busybox_rootfs, caplog):
    failing = {"path": SH, "args": ["sh", "-c", "exit 6"]}
    hooks = {"poststart": [failing, recorder("poststart", out)],
             "poststop": [failing, recorder("poststop", out)]}
    path = bundle(tmp_path, busybox_rootfs, out, hooks)
    cid = name(tmp_path)
    record = StepRecord()
    oci.create(cid, path, root=root, record=record)
    assert oci.start(cid, root=root, record=record)["status"] in ("running", "stopped")
    assert oci.wait(cid, root=root) == 0
    oci.delete(cid, root=root, record=record)
    # the next hook still ran, the container ran and was deleted
    assert sorted((out / "order").read_text().split()) == ["poststart", "poststop", "program"]
    warnings = oci_hooks.warnings_of(record)
    assert warnings == ["the poststart hook #0 (/bin/sh) exited with status 6",
                        "the poststop hook #0 (/bin/sh) exited with status 6"]
    assert "hook #0" not in caplog.text  # a caller keeping a record reads its warnings from there...
    # ... and one without a record (nor an active one) hears of them through logging
    parsed = oci_hooks.parse({"poststop": [failing]})
    assert oci_hooks.run_hooks("poststop", parsed, {"status": "stopped"}) == [warnings[1]]
    assert "poststop hook #0" in caplog.text


def test_a_missing_hook_program_names_the_hook(tmp_path, root, out, busybox_rootfs):
    path = bundle(tmp_path, busybox_rootfs, out, {"prestart": [{"path": "/no/such/hook"}]})
    with pytest.raises(oci_hooks.HookError, match=r"prestart hook #0 \(/no/such/hook\) cannot be run"):
        oci.create(name(tmp_path), path, root=root)
    assert os.listdir(root) == []


# -- checking config.json --------------------------------------------------------------------------------
@pytest.mark.parametrize("hooks, field", [
    ({"preStart": [{"path": "/bin/true"}]}, "hooks.preStart"),
    ({"poststop": [{"path": "true"}]}, "hooks.poststop[0].path"),
    ({"poststop": [{"args": ["true"]}]}, "hooks.poststop[0].path"),
    ({"poststart": [{"path": "/bin/true", "args": "true"}]}, "hooks.poststart[0].args"),
    ({"poststart": [{"path": "/bin/true", "env": ["A=1", 2]}]}, "hooks.poststart[0].env"),
    ({"prestart": [{"path": "/bin/true", "timeout": 0}]}, "hooks.prestart[0].timeout"),
    ({"prestart": [{"path": "/bin/true", "timeout": 1.5}]}, "hooks.prestart[0].timeout"),
    ({"prestart": {"path": "/bin/true"}}, "hooks.prestart"),
    (["/bin/true"], "hooks"),
])
def test_bad_hooks_are_refused_by_name(tmp_path, busybox_rootfs, hooks, field):
    config = oci.default_spec(["true"], rootfs=str(busybox_rootfs))
    config["hooks"] = hooks
    with pytest.raises(oci_spec.SpecError, match=re.escape(f"config.json: {field}:")):
        oci_spec.plan(config, str(tmp_path))


def test_hooks_become_plain_data_in_the_plan(tmp_path, busybox_rootfs):
    config = oci.default_spec(["true"], rootfs=str(busybox_rootfs))
    config["hooks"] = {"poststop": [{"path": "/bin/true", "timeout": 3}], "prestart": []}
    plan = oci_spec.plan(config, str(tmp_path))
    assert plan.hooks == {"poststop": [{"path": "/bin/true", "args": ["/bin/true"], "env": None,
                                        "timeout": 3}]}
    assert oci_spec.Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).hooks == plan.hooks
    assert oci_hooks.command(plan.hooks["poststop"][0]) == "timeout -s KILL 3 /bin/true < state.json"


# -- the other ways a container is made ------------------------------------------------------------------
@pytest.fixture(scope="module")
def reachable(tmp_path_factory):
    """A rootfs and an output directory root of a user namespace (a nobody on the host) may reach."""
    import shutil
    import tempfile

    from stages import rootfs

    top = tempfile.mkdtemp(prefix="stages-hooks-test-")
    os.chmod(top, 0o755)
    try:
        yield rootfs.build(os.path.join(top, "rootfs"), source="busybox"), top
    finally:
        shutil.rmtree(top)


@pytest.mark.parametrize("way", ["user namespace", "threaded caller"])
def test_hooks_in_a_user_namespace_and_from_a_threaded_caller(tmp_path, root, reachable, way):
    """A threaded caller starts a fresh setup process (python -m), whose init pauses the same way; in a
    user namespace the container's hooks run as its root, a nobody on the host."""
    import threading

    rootfs, top = reachable
    out = tmp_path.__class__(top) / f"out-{way.split()[0]}"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    (out / "order").touch()
    os.chmod(out / "order", 0o666)  # written by the host's root and by the container's
    hooks = {kind: [recorder(kind, out)] for kind in ("createRuntime", "createContainer", "poststart")}
    hooks["startContainer"] = [recorder("startContainer", out, inside=True)]
    config_path = bundle(tmp_path, rootfs, out, hooks)
    if way == "user namespace":
        config = json.loads(open(os.path.join(config_path, "config.json")).read())
        config["linux"]["namespaces"].append({"type": "user"})
        config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        oci.write_bundle(config_path, config)
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    if way == "threaded caller":
        helper.start()
    try:
        cid = name(tmp_path)
        pid = oci.create(cid, config_path, root=root)["pid"]
        oci.start(cid, root=root)
        assert oci.wait(cid, root=root) == 0
        oci.delete(cid, root=root)
    finally:
        stop.set()
        if helper.is_alive():
            helper.join()
    assert (out / "order").read_text().split()[:3] == ["createRuntime", "createContainer", "startContainer"]
    for kind, status in (("createRuntime", "creating"), ("createContainer", "creating"),
                         ("startContainer", "created"), ("poststart", "running")):
        assert (read_state(out, kind)["status"], read_state(out, kind)["pid"]) == (status, pid), kind
    owner = 100000 if way == "user namespace" else 0
    assert os.stat(out / "createRuntime.json").st_uid == 0
    assert os.stat(out / "createContainer.json").st_uid == owner
    assert os.stat(out / "startContainer.json").st_uid == owner


# -- podman ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("podman") is None or shutil.which("conmon") is None,
                    reason="podman and conmon are not installed (bash workshop.sh test installs them)")
def test_podman_hooks_dir_runs_every_kind_through_our_runtime(podman, tmp_path):  # noqa: F811
    """podman reads oci-hooks(5) files from --hooks-dir and writes them into config.json; conmon and
    podman then call stages-oci, which runs them. (podman runs poststop hooks itself, after cleanup.)"""
    # test_podman's fixture, a podman of its own with busybox imported, made before the test begins: its
    # cgroup namespace lives until the module ends, which the leak check must not count as this test's
    engine = podman
    hooks_dir, out = tmp_path / "hooks.d", tmp_path / "out"
    hooks_dir.mkdir()
    out.mkdir()
    for kind in oci_hooks.KINDS:
        where = "/out" if kind == "startContainer" else str(out)  # its path resolves in the container
        script = f'cat > {where}/{kind}.json; echo {kind} >> {where}/order'
        (hooks_dir / f"{kind}.json").write_text(json.dumps({
            "version": "1.0.0", "hook": {"path": "/bin/sh", "args": ["sh", "-c", script]},
            "when": {"always": True}, "stages": [kind]}))
    result = engine("--hooks-dir", str(hooks_dir), *test_podman.RUN, "--rm", "-v", f"{out}:/out",
                    test_podman.IMAGE, "sh", "-c", "echo program >> /out/order; echo hi")
    assert (result.returncode, result.stdout) == (0, "hi\n"), result.stderr
    order = (out / "order").read_text().split()
    assert order[:4] == ["prestart", "createRuntime", "createContainer", "startContainer"]
    assert sorted(order[4:6]) == ["poststart", "program"] and order[6:] == ["poststop"]
    pid = read_state(out, "createRuntime")["pid"]
    for kind, status in (("prestart", "creating"), ("createRuntime", "creating"),
                         ("createContainer", "creating"), ("startContainer", "created"),
                         ("poststart", "running")):
        state = read_state(out, kind)
        assert (state["status"], state["pid"], len(state["id"])) == (status, pid, 64), kind
    assert read_state(out, "poststop")["status"] == "stopped"
