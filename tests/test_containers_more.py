"""Stage 3's engine, the rest of it: the logs of a foreground run, /etc/hosts and friends, start and
restart, and a terminal of its own (-t).

The fixtures are test_containers.py's: the command line run as a learner would, with a temporary
STAGES_HOME and STAGES_RUN, and a network namespace standing in for the host for the bridge.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import test_containers as _base
from test_containers import inspect, wait_for

# test_containers' fixtures, used here by name
home, python, stages, host_netns = _base.home, _base.python, _base.stages, _base.host_netns

pytestmark = [pytest.mark.root]


# -- the logs of a foreground run -------------------------------------------------------------------------
def test_a_foreground_run_keeps_its_output_for_logs_and_rm_does_not(stages, python, tmp_path):
    result = stages("run", "--name", "said", "--network", "none", "busybox", "sh", "-c",
                    "echo out; echo err >&2; exit 3", check=False)
    assert result.returncode == 3
    assert result.stdout == "out\n" and result.stderr == "err\n"  # each stream where it was going
    try:
        assert sorted(stages("logs", "said").stdout.split()) == ["err", "out"]  # and both kept
    finally:
        stages("rm", "said")
    typed = stages("run", "-i", "--name", "typed", "--network", "none", "busybox", "sh",
                   input="echo typed; echo $((6*7)) >&2\n")
    try:
        assert (typed.stdout, typed.stderr) == ("typed\n", "42\n")
        assert sorted(stages("logs", "typed").stdout.split()) == ["42", "typed"]
    finally:
        stages("rm", "typed")
    # --rm keeps nothing, so nothing is copied: the container writes to our stdout itself
    where = tmp_path / "out"
    for flags in (["--rm"], ["--name", "copied"]):
        with open(where, "w") as out:
            subprocess.run([python, "-m", "stages.cli", "run", *flags, "--network", "none", "busybox",
                            "readlink", "/proc/self/fd/1"], env=stages.env, stdout=out, check=True,
                           stdin=subprocess.DEVNULL, timeout=60)
        seen = where.read_text()
        if flags == ["--rm"]:
            assert "pipe:" not in seen and seen.strip().endswith("/out")  # our own file
        else:
            assert seen.startswith("pipe:")  # the tee's pipe
            stages("rm", "copied")
    assert stages("ps", "-a", "-q").stdout.strip() == ""


def test_a_long_output_comes_through_whole_and_in_order(stages):
    result = stages("run", "--name", "long", "--network", "none", "busybox", "seq", "1", "200000")
    try:
        expected = "".join(f"{n}\n" for n in range(1, 200001))
        assert result.stdout == expected
        assert stages("logs", "long").stdout == expected
    finally:
        stages("rm", "long")


# -- /etc/hosts, /etc/hostname, /etc/resolv.conf ----------------------------------------------------------
SHOW = ("cat /etc/hostname; echo --; cat /etc/hosts; echo --; cat /etc/resolv.conf; echo --; "
        "grep /etc/ /proc/mounts")


def sections(text: str) -> list[str]:
    return text.split("--\n")


def test_network_none_has_its_own_hosts_hostname_and_resolv_conf(stages):
    result = stages("run", "--name", "named", "--hostname", "box", "--network", "none", "busybox",
                    "sh", "-c", SHOW)
    try:
        hostname, hosts, resolv, mounts = sections(result.stdout)
        assert hostname == "box\n"
        assert "127.0.0.1\tlocalhost\n" in hosts and "127.0.1.1\tbox\n" in hosts
        host_servers = [line.split()[1] for line in Path("/etc/resolv.conf").read_text().splitlines()
                        if line.startswith("nameserver")]
        inside = [line.split()[1] for line in resolv.splitlines() if line.startswith("nameserver")]
        assert inside == [s for s in host_servers if not s.startswith("127.")]
        for path in ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf"):
            assert f" {path} " in mounts  # each bound over the image's file
        paths = inspect(stages, "named")["paths"]
        assert Path(paths["hosts"]).read_text() == hosts  # from the container's own directory
        assert Path(paths["resolv.conf"]).read_text() == resolv
        assert Path(paths["hosts"]).parent == Path(paths["directory"])
        image = Path(inspect(stages, "named")["layers"][0])
        assert not any("box" in path.read_text() for path in (image / "etc").glob("host*"))  # unchanged
    finally:
        stages("rm", "named")


def test_resolv_conf_leaves_out_loopback_name_servers_with_a_comment(tmp_path):
    from stages.runtime import hostfiles

    host = tmp_path / "resolv.conf"
    host.write_text("# comment\nnameserver 127.0.0.53\nnameserver 192.0.2.1\nsearch example.org\n"
                    "options edns0\n")
    bridge = hostfiles.resolv_conf_text("bridge", str(host))
    assert "nameserver 192.0.2.1\n" in bridge and "search example.org\n" in bridge
    assert "options edns0\n" in bridge and "127.0.0.53" in bridge and "nameserver 127" not in bridge
    assert "nameserver 127.0.0.53\n" in hostfiles.resolv_conf_text("host", str(host))
    host.write_text("nameserver 127.0.0.53\n")
    alone = hostfiles.resolv_conf_text("bridge", str(host))
    assert "nameserver" not in alone.replace("# no name server", "").replace("name servers", "")
    assert "# no name server" in alone


@pytest.mark.net
def test_bridge_hosts_has_the_containers_own_address(stages, host_netns):
    stages("run", "-d", "--name", "addressed", "--hostname", "web", "busybox", "sleep", "30")
    try:
        address = inspect(stages, "addressed")["network"]["address"]
        assert address
        hosts = stages("exec", "addressed", "cat", "/etc/hosts").stdout
        assert f"{address}\tweb\n" in hosts and "127.0.1.1" not in hosts
        assert stages("exec", "addressed", "ping", "-c", "1", "-W", "2", "web").returncode == 0
        assert stages("exec", "addressed", "cat", "/etc/hostname").stdout == "web\n"
    finally:
        stages("rm", "-f", "addressed")


def test_a_volume_on_etc_hosts_wins(stages, tmp_path):
    mine = tmp_path / "hosts"
    mine.write_text("10.1.2.3 mine\n")
    result = stages("run", "--rm", "--network", "none", "-v", f"{mine}:/etc/hosts:ro", "busybox",
                    "cat", "/etc/hosts")
    assert result.stdout == "10.1.2.3 mine\n"


# -- start and restart ------------------------------------------------------------------------------------
def test_start_runs_a_stopped_container_again_with_its_files_and_rm_leaves_nothing(stages):
    script = "echo run >> /runs; cat /runs | wc -l; sleep 30"
    stages("run", "-d", "--name", "again", "--network", "none", "busybox", "sh", "-c", script)
    try:
        first = inspect(stages, "again")
        stages("stop", "-t", "0", "again")
        assert inspect(stages, "again")["state"]["status"] == "stopped"
        assert stages("start", "again").stdout.strip() == "again"
        second = inspect(stages, "again")
        assert second["state"]["status"] == "running" and second["id"] == first["id"]
        assert second["pid"] != first["pid"]
        assert "again" in stages("ps").stdout  # running again
        assert stages("exec", "again", "cat", "/runs").stdout == "run\nrun\n"  # the upper layer kept
        wait_for(lambda: stages("logs", "again").stdout.split() == ["1", "2"])
        already = stages("start", "again", check=False)
        assert already.returncode == 0  # starting a running container changes nothing (as docker)
        stages("restart", "-t", "0", "again")
        third = inspect(stages, "again")
        assert third["state"]["status"] == "running" and third["pid"] != second["pid"]
        assert stages("exec", "again", "cat", "/runs").stdout == "run\nrun\nrun\n"
        # two `stages start` at once: one of them starts it, the other finds it started
        stages("stop", "-t", "0", "again")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda _: stages("start", "again", check=False), range(2)))
        assert [result.returncode for result in both] == [0, 0], [result.stderr for result in both]
        wait_for(lambda: inspect(stages, "again")["state"]["status"] == "running")
        assert stages("exec", "again", "cat", "/runs").stdout == "run\nrun\nrun\nrun\n"
    finally:
        stages("rm", "-f", "again")
    assert stages("ps", "-a", "-q").stdout.strip() == ""
    assert not [p for p in (stages.home / "containers").iterdir() if not p.name.startswith(".")]
    with open("/proc/self/mountinfo") as handle:
        assert first["id"] not in handle.read()


def test_start_attach_runs_in_the_foreground_with_its_exit_code(stages):
    stages("run", "--name", "counted", "--network", "none", "busybox", "sh", "-c",
           "echo x >> /runs; wc -l < /runs; exit 7", check=False)
    try:
        again = stages("start", "-a", "counted", check=False)
        assert again.returncode == 7 and again.stdout == "2\n"
        assert stages("logs", "counted").stdout == "1\n2\n"
        assert inspect(stages, "counted")["exit_code"] == 7
        missing = stages("start", "no-such-container", check=False)
        assert missing.returncode != 0 and "there is no container" in missing.stderr
    finally:
        stages("rm", "counted")


def test_start_refuses_a_port_another_container_publishes_now(stages, host_netns):
    stages("run", "--name", "first", "-p", "18181:80", "busybox", "true")
    stages("run", "-d", "--name", "second", "-p", "18181:80", "busybox", "sleep", "30")
    try:
        taken = stages("start", "first", check=False)
        assert taken.returncode != 0 and "18181" in taken.stderr and "published already" in taken.stderr
        assert inspect(stages, "first")["state"]["status"] == "stopped"  # refused, and kept
    finally:
        stages("rm", "-f", "first", "second")



# -- a terminal of its own: -t -------------------------------------------------------------------------
class Typist:
    """The command line on a pseudo-terminal of the test's own, as a learner's terminal window: its
    controlling terminal, so that the window size and the keys reach it as they would from a person."""

    def __init__(self, stages, *argv: str, rows: int = 24, columns: int = 80):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.modes = termios.tcgetattr(slave)

        def controlling_terminal():
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen([sys.executable, "-m", "stages.cli", *argv], env=stages.env,
                                        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                        preexec_fn=controlling_terminal)
        self.slave = slave
        self.seen = b""

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, wanted: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while wanted.encode() not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{wanted!r} never came; the terminal showed {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    chunk = b""
                assert chunk, f"{wanted!r} never came before the end: {self.seen[-2000:]!r}"
                self.seen += chunk
        return self.seen.decode(errors="replace")

    def resize(self, rows: int, columns: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def finish(self, timeout: float = 20.0) -> int:
        code = self.process.wait(timeout)
        while select.select([self.master], [], [], 0.1)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.seen += chunk
        self.restored = termios.tcgetattr(self.slave) == self.modes
        os.close(self.slave)
        os.close(self.master)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for fd in (self.slave, self.master):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def typist(stages):
    started = []

    def start(*argv: str, **size) -> Typist:
        started.append(Typist(stages, *argv, **size))
        return started[-1]

    yield start
    for one in started:
        one.close()


def test_run_it_gives_the_container_a_terminal_of_its_own(stages, typist):
    window = typist("run", "-it", "--rm", "--network", "none", "busybox", "sh", rows=33, columns=111)
    window.expect("# ")
    window.type("tty; echo $((6*7)); stty size\n")
    seen = window.expect("33 111")  # our window's size, passed on
    assert "/dev/pts/0" in seen and "42" in seen
    window.resize(40, 120)  # SIGWINCH: passed on again
    window.type("stty size\n")
    window.expect("40 120")
    window.type("sleep 30\n")
    time.sleep(0.5)
    window.type("\x03")  # Ctrl-C: a byte for the container's terminal, which interrupts its sleep
    window.type("echo after-ctrl-c\n")
    window.expect("after-ctrl-c\r\n")
    window.type("exit 3\n")
    assert window.finish() == 3
    assert window.restored  # our terminal is as it was: echo, lines, Ctrl-C
    assert stages("ps", "-a", "-q").stdout.strip() == ""


def test_run_t_keeps_what_the_terminal_showed_in_the_logs(stages, typist):
    window = typist("run", "-t", "--name", "shown", "--network", "none", "busybox", "sh", "-c", "tty; exit 4")
    window.expect("/dev/pts/0")
    assert window.finish() == 4 and window.restored
    try:
        assert "/dev/pts/0" in stages("logs", "shown").stdout
    finally:
        stages("rm", "shown")
    piped = stages("run", "-t", "--rm", "--network", "none", "busybox", "sh", "-c", "tty; echo done")
    assert piped.stdout.replace("\r", "").split() == ["/dev/pts/0", "done"]  # a terminal, even from a pipe


def test_run_dt_and_exec_it(stages, typist):
    stages("run", "-dt", "--name", "held", "--network", "none", "busybox", "sh", "-c",
           "tty; while true; do sleep 1; done")
    try:
        wait_for(lambda: "/dev/pts/0" in stages("logs", "held").stdout)  # the monitor holds its master
        window = typist("exec", "-it", "held", "sh")
        window.expect("# ")
        window.type("tty; echo $((6*7)); echo $$\n")
        seen = window.expect("42")
        assert "/dev/pts/" in seen and "/dev/pts/0" not in seen.split("42")[0].split("tty;")[-1]
        window.type("exit 3\n")
        assert window.finish() == 3 and window.restored
        assert inspect(stages, "held")["state"]["status"] == "running"
    finally:
        stages("rm", "-f", "held")
    assert stages("ps", "-a", "-q").stdout.strip() == ""


def test_an_interrupted_run_it_gives_the_terminal_back_and_leaves_nothing(stages, typist):
    window = typist("run", "-it", "--rm", "--name", "cut", "--network", "none", "busybox", "sh")
    window.expect("# ")
    window.process.send_signal(signal.SIGINT)  # not a key (that would reach the container): a signal to us
    assert window.finish() == 130
    assert window.restored
    assert "Traceback" not in window.seen.decode(errors="replace")
    assert stages("ps", "-a", "-q").stdout.strip() == ""


def test_without_t_on_a_terminal_one_pipe_keeps_stdout_and_stderr_in_order(stages, typist):
    # our stdout and stderr are one terminal: the container's two streams share one pipe, so the log
    # has them in the order they were written
    script = "for i in 1 2 3; do echo out$i; echo err$i >&2; done; exit 5"
    window = typist("run", "--name", "ordered", "--network", "none", "busybox", "sh", "-c", script)
    assert window.finish() == 5
    try:
        assert stages("logs", "ordered").stdout.split() == ["out1", "err1", "out2", "err2", "out3", "err3"]
        assert "out1\r\nerr1\r\n" in window.seen.decode()  # and the terminal showed them so
    finally:
        stages("rm", "ordered")
