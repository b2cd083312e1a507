"""What a command-line OCI runtime must do for podman and conmon: a detached create, a terminal through a
console socket, the config.json that ``runc spec`` and podman write. Each test runs real containers.

Bundles point at the session's busybox rootfs (root.path may be absolute), which no test changes.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from stages.errors import StagesError
from stages.runtime import oci
from stages.runtime.oci import process as oci_process
from stages.runtime.oci import statefile as oci_state

pytestmark = pytest.mark.root

PROJECT = os.path.abspath(os.path.join(os.path.dirname(oci.__file__), "..", "..", ".."))


def make_bundle(directory, rootfs, args, change=None, **options) -> str:
    config = oci.default_spec(args, rootfs=str(rootfs), **options)
    if change:
        change(config)
    return oci.write_bundle(directory, config)


def run_script(python: str, body: str, **values) -> dict:
    """Run ``body`` in a fresh interpreter that made itself a child subreaper first, as conmon and
    containerd-shim do (PR_SET_CHILD_SUBREAPER, prctl(2)); ``values`` are its globals; it prints JSON."""
    script = ("import json, os, signal, threading, time\n"
              "from stages import kernel\nfrom stages.runtime import oci\n"
              "kernel.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER\n"
              + "".join(f"{name} = {value!r}\n" for name, value in values.items())
              + textwrap.dedent(body))
    result = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=PROJECT))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return int(next(line.split()[1] for line in handle if line.startswith("PPid:")))


# -- 1. detached create and exec ---------------------------------------------------------------------------
@pytest.mark.parametrize("threaded", [False, True], ids=["forked", "spawned"])
def test_a_detached_container_is_reaped_by_the_callers_subreaper(tmp_path, root, busybox_rootfs, python,
                                                                 threaded):
    bundle = make_bundle(tmp_path / "bundle", busybox_rootfs, ["sh", "-c", "sleep 0.2; exit 7"])
    report = run_script(python, """
        if THREADED:  # a thread makes the runtime start a fresh setup process instead of forking
            stop = threading.Event()
            threading.Thread(target=stop.wait, daemon=True).start()
        created = oci.create("sub", BUNDLE, root=ROOT, pid_file=PID_FILE, detach=True)
        pid = int(open(PID_FILE).read())
        with open(f"/proc/{pid}/status") as handle:
            status = dict(line.split(":", 1) for line in handle)
        try:  # the setup process has been reaped: the init is our only child
            others = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            others = None
        oci.start("sub", root=ROOT)
        # the init has ended but is not collected yet (a zombie): the state says stopped already
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        stopped = oci.state("sub", root=ROOT)["status"]
        _, code = os.waitpid(pid, 0)
        oci.delete("sub", root=ROOT)
        print(json.dumps({"pid": pid, "state_pid": created["pid"], "ppid": int(status["PPid"]),
                          "me": os.getpid(), "sig": status["SigCgt"].strip(), "others": others,
                          "stopped": stopped, "code": os.waitstatus_to_exitcode(code)}))
    """, BUNDLE=bundle, ROOT=root, PID_FILE=str(tmp_path / "pid"), THREADED=threaded)
    assert report["pid"] == report["state_pid"]
    assert report["ppid"] == report["me"], "the init was not reparented to the subreaper"
    assert report["others"] == [0, 0], "a process of the runtime is still a child of the caller"
    assert report["stopped"] == "stopped"
    assert report["code"] == 7
    assert oci.list_containers(root) == []


def test_a_detached_init_has_no_parent_death_signal(tmp_path, root, busybox_rootfs):
    bundle = make_bundle(tmp_path / "bundle", busybox_rootfs, ["sleep", "60"])
    # without a subreaper above us, the init goes to the machine's init: it must survive its setup process
    created = oci.create("nodeath", bundle, root=root, detach=True)
    assert parent_of(created["pid"]) != os.getpid() and oci_state.alive(created["pid"], None)
    assert oci.state("nodeath", root=root)["status"] == "created"
    oci.start("nodeath", root=root)
    assert oci.state("nodeath", root=root)["status"] == "running"
    oci.delete("nodeath", force=True, root=root)
    assert oci.list_containers(root) == []


def test_a_detached_exec_is_reaped_by_the_callers_subreaper(tmp_path, root, busybox_rootfs, python):
    bundle = make_bundle(tmp_path / "bundle", busybox_rootfs, ["sleep", "60"])
    report = run_script(python, """
        created = oci.create("ex", BUNDLE, root=ROOT, detach=True)
        oci.start("ex", root=ROOT)
        pid = oci.exec_process("ex", {"args": ["sh", "-c", "sleep 0.2; exit 5"], "cwd": "/"}, root=ROOT,
                               detach=True)
        ppid = int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("PPid")))
        _, code = os.waitpid(pid, 0)
        oci.kill("ex", "KILL", root=ROOT)
        _, init = os.waitpid(created["pid"], 0)
        try:
            others = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            others = None
        oci.delete("ex", root=ROOT)
        print(json.dumps({"ppid": ppid, "me": os.getpid(), "code": os.waitstatus_to_exitcode(code),
                          "init": os.waitstatus_to_exitcode(init), "others": others}))
    """, BUNDLE=bundle, ROOT=root)
    assert report["ppid"] == report["me"]
    assert report["code"] == 5
    assert report["init"] == -9
    assert report["others"] is None  # no helper of ours was left to reap


def test_wait_collects_a_detached_init_when_we_are_its_subreaper(tmp_path, root, busybox_rootfs, python):
    bundle = make_bundle(tmp_path / "bundle", busybox_rootfs, ["sh", "-c", "exit 3"])
    report = run_script(python, """
        oci.create("w", BUNDLE, root=ROOT, detach=True)
        oci.start("w", root=ROOT)
        code = oci.wait("w", root=ROOT)
        oci.delete("w", root=ROOT)
        print(json.dumps({"code": code}))
    """, BUNDLE=bundle, ROOT=root)
    assert report["code"] == 3


# -- 2. a terminal through a console socket ------------------------------------------------------------------
@pytest.fixture
def console_socket(tmp_path):
    """A listening AF_UNIX stream socket, as conmon offers with --console-socket."""
    path = str(tmp_path / "console.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(10)
    yield path, server
    server.close()


def receive_terminal(server) -> tuple[str, int]:
    """The terminal's name and master, as the runtime sends them (runc's protocol)."""
    connection, _ = server.accept()
    with connection:
        name, fds, _, _ = socket.recv_fds(connection, 4096, 1)
    assert len(fds) == 1
    return name.decode(), fds[0]


def read_until(master: int, wanted: bytes, timeout: float = 10) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{wanted!r} never came: {seen!r}"
        ready, _, _ = select.select([master], [], [], left)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_a_terminal_reaches_the_console_socket(tmp_path, root, busybox_rootfs, console_socket):
    path, server = console_socket

    def change(config):
        config["process"].update(terminal=True, consoleSize={"height": 30, "width": 100})

    bundle = make_bundle(tmp_path / "bundle", busybox_rootfs,
                         ["sh", "-c", "tty; stty size; read x; echo got $x"], change)
    oci.create("tty", bundle, root=root, console_socket=path)
    name, master = receive_terminal(server)
    try:
        assert name == "/dev/pts/0"
        oci.start("tty", root=root)
        seen = read_until(master, b"30 100\r\n")  # all of it: what we type next is echoed
        os.write(master, b"hello\n")
        seen += read_until(master, b"got hello")
    finally:
        os.close(master)
    assert oci.wait("tty", root=root) == 0
    oci.delete("tty", root=root)
    lines = seen.decode().replace("\r", "").splitlines()
    # its own devpts, process.consoleSize, and what we typed (echoed by the terminal) read by the program
    assert lines == ["/dev/pts/0", "30 100", "hello", "got hello"], lines


def test_terminal_without_a_console_socket_is_refused(tmp_path, root, busybox_rootfs):
    bundle = make_bundle(tmp_path / "bundle", busybox_rootfs, ["true"],
                         lambda config: config["process"].update(terminal=True))
    with pytest.raises(oci.SpecError, match="process.terminal: is true") as caught:
        oci.create("notty", bundle, root=root)
    assert "console" in caught.value.hint
    assert oci.list_containers(root) == []


def test_exec_with_a_terminal_and_an_in_process_console(tmp_path, root, busybox_rootfs):
    bundle = make_bundle(tmp_path / "bundle", busybox_rootfs, ["sleep", "60"])
    oci.create("exectty", bundle, root=root)
    oci.start("exectty", root=root)
    got = []

    def console(master: int, name: str) -> None:  # the engine's way: no socket, the master itself
        got.append((master, name))
        os.write(master, b"6\n")  # typed ahead: the terminal keeps it until the program reads

    try:
        code = oci.exec_process("exectty", {"args": ["sh", "-c", "tty; read x; exit $x"], "cwd": "/",
                                            "terminal": True}, root=root, console=console)
        [(master, name)] = got
        seen = read_until(master, b"pts")
        os.close(master)
    finally:
        oci.delete("exectty", force=True, root=root)
    assert code == 6
    assert name.startswith("/dev/pts/") and name.encode() in seen


# -- 3. what runc spec and podman write --------------------------------------------------------------------
CGROUP_MOUNT = {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}


def run_container(tmp_path, root, rootfs, args, change=None, name="c", **options) -> tuple[int, str]:
    """Run ``args`` in a container; its exit code and what it wrote (stdout and stderr together)."""
    bundle = make_bundle(tmp_path / "bundle", rootfs, args, change, **options)
    output = tmp_path / "output"
    with open(os.devnull) as stdin, open(output, "w") as out:
        code = oci.run(name, bundle, root=root, stdio=(stdin, out, out))
    return code, output.read_text()


def cgroup_layout():
    from stages.isolate import cgroups

    return cgroups.detect()


def with_cgroup_mount(cgroupns: bool, user: bool = False):
    def change(config):
        config["mounts"].append(dict(CGROUP_MOUNT))
        config["linux"]["resources"] = {"memory": {"limit": 48 << 20}}
        if cgroupns:
            config["linux"]["namespaces"].append({"type": "cgroup"})
        if user:
            user_namespace(config)
    return change


@pytest.mark.parametrize("cgroupns", [False, True], ids=["host-cgroupns", "cgroupns"])
def test_v1_a_container_reads_its_own_memory_limit_in_sys_fs_cgroup(tmp_path, root, busybox_rootfs, cgroupns):
    layout = cgroup_layout()
    if layout.kind == "v2" or "memory" not in layout.controllers or layout.controllers["memory"].version != 1:
        pytest.skip("needs the memory controller on cgroup v1 (this machine and CI)")
    code, out = run_container(tmp_path, root, busybox_rootfs, [
        "sh", "-c", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes; ls /sys/fs/cgroup; "
                    "touch /sys/fs/cgroup/x"], with_cgroup_mount(cgroupns))
    lines = out.splitlines()
    assert code == 1, out  # read-only: touch fails
    assert lines[0] == str(48 << 20), out
    assert "Read-only file system" in lines[-1]
    # one directory per hierarchy the host has, as runc makes them
    assert {os.path.basename(m) for m, _, _ in oci_process.container_cgroups()
            if os.path.dirname(m) == "/sys/fs/cgroup"} <= set(lines[1:-1])


@pytest.mark.cgroup_v2
@pytest.mark.parametrize("cgroupns, user", [(True, False), (False, False), (False, True)],
                         ids=["cgroupns", "host-cgroupns", "user-namespace"])
def test_v2_a_container_reads_its_own_memory_limit_in_sys_fs_cgroup(tmp_path, root, reachable_rootfs,
                                                                    cgroupns, user):
    layout = cgroup_layout()
    if layout.kind != "v2" or "memory" not in layout.controllers:
        pytest.skip("needs the memory controller on cgroup v2 alone (runs in the cgroup v2 VM)")
    # with a cgroup namespace (or a user namespace, which may not mount cgroup2 without one: the
    # container's own cgroup is bound instead) /sys/fs/cgroup is the container's cgroup; without, a fresh
    # cgroup2 mount shows the whole tree, where /proc/self/cgroup says the container's cgroup is
    script = ("own=$(sed -n 's/^0:://p' /proc/self/cgroup); echo $own; "
              + ("cat /sys/fs/cgroup/memory.max; " if cgroupns or user
                 else "cat /sys/fs/cgroup$own/memory.max; ")
              + "touch /sys/fs/cgroup/x")
    code, out = run_container(tmp_path, root, reachable_rootfs, ["sh", "-c", script],
                              with_cgroup_mount(cgroupns, user))
    lines = out.splitlines()
    assert code == 1, out
    assert (lines[0] == "/") == cgroupns, out
    assert lines[1] == str(48 << 20), out
    assert "Read-only file system" in lines[-1]


def test_linux_devices_are_made_with_their_mode_and_owner(tmp_path, root, busybox_rootfs):
    def change(config):
        config["linux"]["devices"] = [
            {"path": "/dev/extra/null2", "type": "c", "major": 1, "minor": 3, "fileMode": 0o620,
             "uid": 1000, "gid": 5},
            {"path": "/dev/pipe", "type": "p", "fileMode": 0o600},
        ]

    code, out = run_container(tmp_path, root, busybox_rootfs,
                              ["sh", "-c", "stat -c '%F %t %T %a %u %g' /dev/extra/null2 /dev/pipe; "
                                           "echo x > /dev/extra/null2 && echo written"], change)
    assert code == 0, out
    assert out.splitlines() == ["character special file 1 3 620 1000 5", "fifo 0 0 600 0 0", "written"]


def test_linux_devices_in_a_user_namespace_borrow_the_hosts_node(tmp_path, root, reachable_rootfs):
    def change(config):
        user_namespace(config)
        config["linux"]["devices"] = [{"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11}]

    if not os.path.exists("/dev/kmsg"):
        pytest.skip("this machine has no /dev/kmsg")
    code, out = run_container(tmp_path, root, reachable_rootfs,
                              ["stat", "-c", "%F %t %T", "/dev/kmsg"], change)
    assert (code, out.strip()) == (0, "character special file 1 b")


def test_ambient_capabilities_not_inheritable_are_skipped_with_a_step(tmp_path, root, busybox_rootfs):
    from stages.steps import StepRecord

    def change(config):
        caps = ["CAP_KILL", "CAP_NET_BIND_SERVICE"]
        config["process"]["capabilities"] = {"bounding": caps, "effective": caps, "permitted": caps,
                                             "ambient": caps, "inheritable": ["CAP_KILL"]}
        config["process"]["user"] = {"uid": 1000, "gid": 1000}

    bundle = make_bundle(tmp_path / "bundle", busybox_rootfs, ["grep", "CapAmb", "/proc/self/status"], change)
    record = StepRecord()
    output = tmp_path / "output"
    with open(output, "w") as out:
        code = oci.run("amb", bundle, root=root, stdio=(None, out, out), record=record)
    assert code == 0, output.read_text()
    # only CAP_KILL (5) was raised: CAP_NET_BIND_SERVICE is not inheritable, as runc warns and goes on
    assert output.read_text().split() == ["CapAmb:", f"{1 << 5:016x}"]
    assert "# ambient net_bind_service not raised" in record.script()


def user_namespace(config, host_id: int = 100000) -> None:
    config["linux"]["namespaces"].append({"type": "user"})
    config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": host_id, "size": 65536}]
    config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": host_id, "size": 65536}]


# -- joining another container's namespaces by path ----------------------------------------------------------
def join(config, **paths) -> None:
    """Replace each named namespace of ``config`` by the namespace file to join (``net="/proc/1/ns/net"``)."""
    config["linux"]["namespaces"] = [
        {"type": item["type"], "path": paths[item["type"]]} if item["type"] in paths else item
        for item in config["linux"]["namespaces"]]
    for kind, path in paths.items():
        if kind not in [item["type"] for item in config["linux"]["namespaces"]]:
            config["linux"]["namespaces"].append({"type": kind, "path": path})


def test_joining_another_containers_network_and_pid_namespaces(tmp_path, root, busybox_rootfs):
    first = make_bundle(tmp_path / "first", busybox_rootfs, ["sleep", "60"])
    created = oci.create("first", first, root=root)
    oci.start("first", root=root)
    pid = created["pid"]
    subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "link", "add", "oci-core0", "type",
                    "veth", "peer", "name", "oci-core1"], check=True)  # gone with the namespace
    try:
        code, out = run_container(
            tmp_path, root, busybox_rootfs, ["sh", "-c", "ls /sys/class/net; ps -o pid,args"],
            lambda config: join(config, network=f"/proc/{pid}/ns/net", pid=f"/proc/{pid}/ns/pid"),
            name="second")
    finally:
        oci.delete("first", force=True, root=root)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[:3] == ["lo", "oci-core0", "oci-core1"], out  # the first container's interfaces
    processes = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in lines[4:]}
    assert processes["1"] == "sleep 60", out  # its PID 1, seen from the second container


def test_joining_another_containers_user_namespace(tmp_path, root, reachable_rootfs):
    first = make_bundle(tmp_path / "first", reachable_rootfs, ["sleep", "60"], user_namespace)
    created = oci.create("userfirst", first, root=root)
    oci.start("userfirst", root=root)
    userns = f"/proc/{created['pid']}/ns/user"
    try:
        second = make_bundle(tmp_path / "second", reachable_rootfs,
                             ["sh", "-c", "id -u; cat /proc/self/uid_map; readlink /proc/self/ns/user"],
                             lambda config: join(config, user=userns))
        output = tmp_path / "output"
        with open(output, "w") as out:
            joined = oci.create("usersecond", second, root=root, stdio=(None, out, out))
            with open(f"/proc/{joined['pid']}/status") as handle:  # root inside, 100000 on the host
                host_uid = next(line.split()[1] for line in handle if line.startswith("Uid:"))
            oci.start("usersecond", root=root)
            assert oci.wait("usersecond", root=root) == 0
        oci.delete("usersecond", root=root)
        # mappings that differ from the joined namespace's are refused
        wrong = make_bundle(tmp_path / "wrong", reachable_rootfs, ["true"],
                            lambda config: (join(config, user=userns), user_namespace(config, 200000),
                                            config["linux"]["namespaces"].pop()))
        with pytest.raises(oci.SpecError, match="linux.uidMappings: the joined user namespace maps 0 100000"):
            oci.create("userwrong", wrong, root=root)
        assert os.readlink(userns) in output.read_text()
    finally:
        oci.delete("userfirst", force=True, root=root)
    assert host_uid == "100000"
    assert output.read_text().split()[:4] == ["0", "0", "100000", "65536"]
    assert [item["id"] for item in oci.list_containers(root)] == []


def test_joining_a_mount_namespace_is_refused_with_the_reason(tmp_path, root, busybox_rootfs):
    bundle = make_bundle(tmp_path / "bundle", busybox_rootfs, ["true"],
                         lambda config: join(config, mount="/proc/1/ns/mnt"))
    with pytest.raises(oci.SpecError, match="change the root of every process already in it") as caught:
        oci.create("mnt", bundle, root=root)
    assert "exec" in caught.value.hint


# -- bundles as runc and podman write them -------------------------------------------------------------------
def test_an_unedited_runc_spec_bundle_runs(tmp_path, root, busybox_rootfs):
    runc = shutil.which("runc")
    if runc is None:
        pytest.skip("runc is not installed (workshop.sh installs it)")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    subprocess.run([runc, "spec"], cwd=bundle, check=True)
    (bundle / "rootfs").symlink_to(busybox_rootfs)
    config = json.loads((bundle / "config.json").read_text())
    # only what the task of the test needs: its own program, and no terminal (stdout is a file here)
    config["process"].update(terminal=False, args=[
        "sh", "-c", "hostname; grep CapAmb /proc/self/status; ls /sys/fs/cgroup | grep -c .; "
                    "touch /x 2>/dev/null || echo read-only"])
    (bundle / "config.json").write_text(json.dumps(config))
    output = tmp_path / "output"
    with open(output, "w") as out:
        code = oci.run("runc-spec", str(bundle), root=root, stdio=(None, out, out))
    lines = output.read_text().splitlines()
    assert code == 0, lines
    assert lines[0] == "runc"
    # runc spec's ambient capabilities are not inheritable: not raised, and no error (as under runc)
    assert lines[1].split() == ["CapAmb:", "0" * 16]
    assert int(lines[2]) > 0  # the cgroup mount shows the container's cgroups
    assert lines[3] == "read-only"


def test_podmans_config_json_runs(tmp_path, root, busybox_rootfs):
    """podman's own config.json (tests/data/podman-config.json, from `podman run --rm --network none
    --ulimit ... echo hi`): its files to bind are made here, and its rootfs is ours."""
    config = json.loads((Path(__file__).parent / "data" / "podman-config.json").read_text())
    config["root"]["path"] = str(busybox_rootfs)
    for item in config["mounts"]:
        if item.get("type") == "bind":  # podman's files for the container, made at `podman create`
            source = tmp_path / "userdata" / os.path.basename(item["source"])
            source.parent.mkdir(exist_ok=True)
            if item["destination"] == "/dev/shm":
                source.mkdir()
            else:
                source.write_text({"/etc/hosts": "127.0.0.1 localhost\n", "/etc/hostname": "from-podman\n",
                                   "/run/.containerenv": "engine=\"podman\"\n"}[item["destination"]])
            item["source"] = str(source)
    config["process"]["args"] = [
        "sh", "-c", "hostname; cat /etc/hostname /etc/hosts /run/.containerenv; umask; "
                    "grep ' /dev/pts ' /proc/self/mountinfo | grep -o 'gid=5'; "
                    "grep Seccomp: /proc/self/status; cat /proc/sys/net/ipv4/ping_group_range; "
                    "touch /dev/shm/x && echo shm-ok; echo hi"]
    bundle = oci.write_bundle(tmp_path / "bundle", config)
    output = tmp_path / "output"
    with open(output, "w") as out:
        code = oci.run("podman-config", bundle, root=root, stdio=(None, out, out))
    lines = output.read_text().splitlines()
    assert code == 0, lines
    assert lines[:4] == ["be94b851e401", "from-podman", "127.0.0.1 localhost", 'engine="podman"'], lines
    assert lines[4:] == ["0022", "gid=5", "Seccomp:\t2", "0\t0", "shm-ok", "hi"], lines
    assert (tmp_path / "userdata" / "shm" / "x").exists()  # /dev/shm was podman's directory


# -- preserve_fds ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threaded", [False, True], ids=["forked", "spawned"])
def test_preserved_descriptors_reach_the_program_and_no_others(tmp_path, root, busybox_rootfs, python,
                                                               threaded):
    bundle = make_bundle(tmp_path / "bundle", busybox_rootfs,
                         ["sh", "-c", "echo run > /proc/self/fd/3; ls /proc/self/fd > /proc/self/fd/3"])
    sleeper = make_bundle(tmp_path / "sleeper", busybox_rootfs, ["sleep", "60"])
    report = run_script(python, """
        if THREADED:  # a thread makes the runtime spawn its helpers: the descriptors go as file actions
            stop = threading.Event()
            threading.Thread(target=stop.wait, daemon=True).start()
        def through(call):
            os.open(os.devnull, os.O_RDONLY)  # holds 3, so that the pipe comes above it
            read, write = os.pipe()  # close-on-exec, as Python opens everything (PEP 446)
            os.dup2(write, 3, inheritable=False)
            extra = os.open("/", os.O_RDONLY)  # 5: open here, never passed on
            os.close(write)
            try:
                code = call()
            finally:
                os.close(3)
                os.close(extra)
            with os.fdopen(read) as handle:
                return code, handle.read().split()
        ran = through(lambda: oci.run("pf", BUNDLE, root=ROOT, preserve_fds=1))
        oci.create("pfx", SLEEPER, root=ROOT)
        oci.start("pfx", root=ROOT)
        try:
            execed = through(lambda: oci.exec_process(
                "pfx", {"args": ["sh", "-c", "echo exec > /proc/self/fd/3"], "cwd": "/"}, root=ROOT,
                preserve_fds=1))
        finally:
            oci.delete("pfx", force=True, root=ROOT)
        print(json.dumps({"ran": ran, "execed": execed}))
        """, THREADED=threaded, BUNDLE=bundle, SLEEPER=sleeper, ROOT=root)
    code, words = report["ran"]
    # stdio, the pipe at 3, and ls's own directory at 4: not the caller's 5 (the root directory)
    assert code == 0 and words == ["run", "0", "1", "2", "3", "4"], words
    assert report["execed"] == [0, ["exec"]]


def test_preserve_fds_of_a_closed_descriptor_is_refused(tmp_path, root, busybox_rootfs):
    bundle = make_bundle(tmp_path / "bundle", busybox_rootfs, ["true"])
    with pytest.raises(StagesError, match=r"--preserve-fds 998: descriptor \d+ is not open"):
        oci.create("pf", bundle, root=root, preserve_fds=998)
    assert oci.list_containers(root) == []


# -- what the runtime refuses, as docs/oci-runtime.md lists it ---------------------------------------------
def set_field(config: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        config = config[int(part)] if part.isdigit() else config.setdefault(part, {})
    config[parts[-1]] = value


@pytest.mark.parametrize("field, value, named", [
    ("linux.resources.blockIO.throttleReadBpsDevice", [{"major": 8, "minor": 0, "rate": 1}], None),
    ("linux.resources.memory.useHierarchy", False, None),
    ("linux.resources.cpu.burst", 1000, None),
    ("linux.memoryPolicy", {"mode": "MPOL_BIND", "nodes": "0"}, None),
    ("linux.netDevices", {"eth1": {"name": "eth1"}}, None),
    ("mounts.0.uidMappings", [{"containerID": 0, "hostID": 1000, "size": 1}], "mounts[0].uidMappings"),
    ("process.commandLine", "sh -c true", None),
    ("windows", {"layerFolders": ["C:\\\\layers"]}, None),
    ("vm", {"kernel": {"path": "/vmlinuz"}}, None),
])
def test_a_field_the_runtime_cannot_honour_is_refused_by_name(tmp_path, busybox_rootfs, field, value, named):
    config = oci.default_spec(["true"], rootfs=str(busybox_rootfs))
    set_field(config, field, value)
    bundle = oci.write_bundle(tmp_path / "b", config)
    with pytest.raises(oci.SpecError, match=re.escape(f"config.json: {named or field}: ")):
        oci.load(bundle)


def test_false_asks_for_nothing(tmp_path, busybox_rootfs):
    config = oci.default_spec(["true"], rootfs=str(busybox_rootfs))
    config["linux"].setdefault("resources", {})["memory"] = {
        "limit": 64 << 20, "disableOOMKiller": False, "useHierarchy": True, "checkBeforeUpdate": False}
    oci.load(oci.write_bundle(tmp_path / "b", config))


def test_the_commands_the_docs_call_missing_are_missing():
    from stages.runtime.oci import cli

    text = Path(PROJECT, "docs", "oci-runtime.md").read_text()
    line = text.partition("**Commands runc has and stages-oci has not**")[2].partition("\n- ")[0]
    missing, _, present = line.partition("(`ps`")
    present = "`ps`" + present
    missing_names = re.findall(r"`(\w+)`", missing)
    assert {"checkpoint", "restore"} <= set(missing_names)  # update and events exist now (issue 16)
    assert not set(missing_names) & set(cli.HANDLERS)
    assert set(re.findall(r"`(\w+)`", present)) <= set(cli.HANDLERS)
