"""Stage 3's networking (pyroute2 and nft), on the real kernel, inside network namespaces the tests make.

The topology (nothing touches the real host's network, nothing leaves the machine)::

    [container a: own netns]  eth0 10.88.0.2 ==veth==+
                                                      stages0 10.88.0.1 [host: netns] rth 10.202.0.1 ==veth==
    [container b: own netns]  eth0 10.88.0.3 ==veth==+                          [outside: netns] 10.202.0.2

Every effect is observed: pings between containers and to the gateway, a TCP server in a container
answering through a published port from the outside namespace and from 127.0.0.1 in the host namespace,
outbound NAT seen by a server outside as the host's address, twenty processes allocating at once, and
nothing left in the host namespace after detach or prune (``nft list ruleset`` empty, no devices).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from net_peers import Server, cannot_connect, connect

from stages.errors import NetworkError
from stages.isolate.network import test_host as make_test_host
from stages.runtime import network
from stages.runtime.network import NetworkManager
from stages.steps import StepRecord

pytestmark = [pytest.mark.root, pytest.mark.net]

PYTHON = os.path.realpath(sys.executable)  # for the stdlib-only client and server: fast to start
VENV_PYTHON = os.path.abspath(sys.executable)  # for programs that import stages (and pyroute2)
HOST_ADDRESS = "10.202.0.1"  # the host netns's address on its link to the outside netns
OUTSIDE_ADDRESS = "10.202.0.2"


_counter = iter(range(1_000_000))


def netns_name() -> str:
    """A name that says these tests made it."""
    return f"stgrtnet{os.getpid() % 100000}x{next(_counter)}"


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=check)


def in_netns(netns: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}"]


def in_container(pid: int) -> list[str]:
    return ["nsenter", "--target", str(pid), "--net"]


def links(netns: str) -> set[str]:
    return {link["ifname"] for link in json.loads(run(["ip", "-n", netns, "-j", "link"]).stdout)}


def ruleset(netns: str) -> str:
    return run([*in_netns(netns), "nft", "list", "ruleset"]).stdout.strip()


def ping(prefix: list[str], address: str) -> bool:
    return run([*prefix, "/bin/busybox", "ping", "-c", "1", "-W", "2", address], check=False).returncode == 0


@pytest.fixture
def host():
    """A network namespace standing in for the host; at the end, nothing of ours may be left in it."""
    with make_test_host(netns_name()) as name:
        yield name


@pytest.fixture
def outside(host):
    """Another namespace, joined to the host by a veth pair: "the internet" (it has no route back to
    the containers' subnet, exactly like the real one)."""
    with make_test_host(netns_name()) as name:
        run(["ip", "-n", host, "link", "add", "rth", "type", "veth", "peer", "name", "rto", "netns", name])
        run(["ip", "-n", host, "addr", "add", f"{HOST_ADDRESS}/24", "dev", "rth"])
        run(["ip", "-n", host, "link", "set", "rth", "up"])
        run(["ip", "-n", name, "addr", "add", f"{OUTSIDE_ADDRESS}/24", "dev", "rto"])
        run(["ip", "-n", name, "link", "set", "rto", "up"])
        yield name


def start_container() -> subprocess.Popen:
    """A process alone in a new network namespace, standing for a container."""
    process = subprocess.Popen(["unshare", "--net", "--", "/bin/busybox", "sleep", "120"])
    own = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + 5
    while os.readlink(f"/proc/{process.pid}/ns/net") == own:
        assert time.monotonic() < deadline, "unshare --net did not take effect"
        time.sleep(0.01)
    return process


@pytest.fixture
def containers():
    """A factory of container processes; all killed at the end."""
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        started.append(start_container())
        return started[-1]

    yield start
    for process in started:
        process.kill()
        process.wait()


@pytest.fixture
def manager(tmp_path, host):
    record = StepRecord("automated")
    manager = NetworkManager(state_dir=tmp_path / "state", host_netns=host, record=record)
    yield manager
    manager.prune([])  # whatever a failing test left
    assert "stages0" not in links(host)
    assert ruleset(host) == ""


def assert_all_gone(manager: NetworkManager, host: str) -> None:
    assert links(host) - {"rth"} == {"lo"}, links(host)
    assert ruleset(host) == ""
    assert not manager.state_file.exists()
    assert manager.attachments() == {}


# == no cost when unused ============================================================================
def test_importing_the_module_does_not_import_pyroute2():
    code = ("import sys, importlib.util, stages.runtime.network\n"
            "assert importlib.util.find_spec('pyroute2'), 'pyroute2 cannot be found at all'\n"
            "assert 'pyroute2' not in sys.modules, 'pyroute2 imported'")
    result = run([VENV_PYTHON, "-c", code], check=False)
    assert result.returncode == 0, result.stderr


# == attach: two containers on one bridge ===========================================================
def test_two_containers_get_distinct_addresses_and_ping_each_other_and_the_gateway(manager, host, containers):
    a, b = containers(), containers()
    started = time.perf_counter()
    first = manager.attach("web", a.pid)
    attach_seconds = time.perf_counter() - started  # with the bridge and the NAT
    started = time.perf_counter()
    second = manager.attach("db", b.pid)
    attach_again_seconds = time.perf_counter() - started
    assert first.address != second.address
    assert first.gateway == second.gateway == "10.88.0.1"
    assert {first.address, second.address} == {"10.88.0.2", "10.88.0.3"}

    # The kernel agrees: eth0 with the address inside, the host end plugged into the bridge.
    inside = json.loads(run([*in_container(a.pid), "ip", "-4", "-j", "addr", "show", "dev", "eth0"]).stdout)
    assert [info["local"] for info in inside[0]["addr_info"]] == [first.address]
    route = json.loads(run([*in_container(a.pid), "ip", "-j", "route", "show", "default"]).stdout)
    assert route[0]["gateway"] == "10.88.0.1"
    ports = {link["ifname"] for link in json.loads(run(["ip", "-n", host, "-j", "link", "show",
                                                        "master", "stages0"]).stdout)}
    assert ports == {first.veth_host, second.veth_host}

    assert ping(in_container(a.pid), second.address)
    assert ping(in_container(b.pid), first.address)
    assert ping(in_container(a.pid), "10.88.0.1")
    assert ping(in_container(a.pid), "127.0.0.1")  # lo is up

    # Recorded as the commands a person types, each with its time.
    script = manager.record.script()
    assert f"ip -n {host} link add {first.veth_host} type veth peer name eth0 netns {a.pid}" in script
    assert f"nsenter --target {a.pid} --net ip addr add 10.88.0.2/16 dev eth0" in script
    assert f"ip -n {host} link add stages0 type bridge" in script
    assert "masquerade" in script
    assert all(step.seconds > 0 for step in manager.record.steps)
    assert manager.attachment("web") == first

    started = time.perf_counter()
    assert manager.detach("web")
    detach_seconds = time.perf_counter() - started
    assert first.veth_host not in links(host)
    assert not ping(in_container(b.pid), first.address)
    assert ping(in_container(b.pid), "10.88.0.1")  # the bridge stays for the other container
    started = time.perf_counter()
    assert manager.detach("db")
    detach_last_seconds = time.perf_counter() - started
    assert not manager.detach("db")  # twice is fine
    assert_all_gone(manager, host)
    print(f"\nattach (first, with bridge and NAT) {attach_seconds * 1000:.1f} ms, "
          f"attach {attach_again_seconds * 1000:.1f} ms, detach {detach_seconds * 1000:.1f} ms, "
          f"detach (last, bridge and NAT go) {detach_last_seconds * 1000:.1f} ms")


def test_a_container_that_dies_is_still_detached_cleanly(manager, host, containers):
    process = containers()
    attachment = manager.attach("short", process.pid)
    process.kill()
    process.wait()
    # The veth goes with the namespace (the kernel removes a dead namespace a moment later, in a worker);
    # it never would if we still held the namespace open, by a descriptor or a socket in it.
    deadline = time.monotonic() + 10
    while attachment.veth_host in links(host):
        assert time.monotonic() < deadline, "the container's namespace is still held by something"
        time.sleep(0.05)
    assert manager.detach("short")
    assert_all_gone(manager, host)


def test_two_bridges_on_one_host_keep_their_own_nat(manager, host, outside, containers):
    second = NetworkManager(state_dir=manager.directory.parent, host_netns=host, record=manager.record,
                            bridge="stages1", subnet="10.89.0.0/24")
    overlapping = NetworkManager(state_dir=manager.directory.parent, host_netns=host, bridge="stages2",
                                 subnet="10.88.5.0/24")
    a, b = containers(), containers()
    manager.attach("a", a.pid)
    assert second.attach("b", b.pid).address == "10.89.0.2"
    with pytest.raises(NetworkError, match="overlaps bridge stages0"):
        overlapping.attach("c", containers().pid)
    assert "stages2" not in links(host)
    with Server(in_netns(outside), 7002):
        assert connect(in_container(b.pid), OUTSIDE_ADDRESS, 7002) == HOST_ADDRESS
        manager.detach("a")
        assert "stages0" not in links(host) and "stages0" not in ruleset(host)
        assert connect(in_container(b.pid), OUTSIDE_ADDRESS, 7002) == HOST_ADDRESS  # stages1's NAT stays
    second.detach("b")
    assert_all_gone(manager, host)


# == outbound NAT ===================================================================================
def test_outbound_nat_the_outside_sees_the_hosts_address(manager, host, outside, containers):
    container = containers()
    manager.attach("client", container.pid)
    with Server(in_netns(outside), 7000):
        assert connect(in_container(container.pid), OUTSIDE_ADDRESS, 7000) == HOST_ADDRESS
    manager.detach("client")
    assert_all_gone(manager, host)


def test_a_forward_policy_of_drop_is_let_through_and_put_back(manager, host, outside, containers):
    """As on a host with Docker: the FORWARD chain drops by default. Without our two ACCEPT rules the
    connection below would time out."""
    run([*in_netns(host), "iptables", "-w", "-P", "FORWARD", "DROP"])
    container = containers()
    manager.attach("client", container.pid)
    forward = run([*in_netns(host), "iptables", "-w", "-S", "FORWARD"]).stdout
    assert "-i stages0" in forward and "-o stages0" in forward
    with Server(in_netns(outside), 7001):
        assert connect(in_container(container.pid), OUTSIDE_ADDRESS, 7001) == HOST_ADDRESS
    manager.detach("client")
    assert run([*in_netns(host), "iptables", "-w", "-S", "FORWARD"]).stdout.split("\n")[:2] == [
        "-P FORWARD DROP", ""]
    run([*in_netns(host), "iptables", "-w", "-P", "FORWARD", "ACCEPT"])
    run([*in_netns(host), "nft", "flush", "ruleset"])  # iptables-nft's empty filter table


# == published ports ================================================================================
@pytest.mark.parametrize("firewall", ["nft", "iptables"])
def test_a_published_port_answers_from_outside_and_from_localhost(tmp_path, host, outside, containers,
                                                                  firewall):
    manager = NetworkManager(state_dir=tmp_path / "state", host_netns=host, record=StepRecord(),
                             firewall=firewall)
    try:
        web, other = containers(), containers()
        attachment = manager.attach("web", web.pid)
        manager.attach("other", other.pid)
        assert manager.publish("web", 8080, 80) == f"8080 -> {attachment.address}:80"
        with Server(in_container(web.pid), 80):
            # From another namespace, through the host's address (PREROUTING).
            assert connect(in_netns(outside), HOST_ADDRESS, 8080) == OUTSIDE_ADDRESS
            # From the host's own 127.0.0.1 (OUTPUT, route_localnet, masquerade to the bridge's address).
            assert connect(in_netns(host), "127.0.0.1", 8080) == "10.88.0.1"
            # From another container, through the host (hairpin).
            assert connect(in_container(other.pid), HOST_ADDRESS, 8080) == "10.88.0.1"

            with pytest.raises(NetworkError, match="published already, by web"):
                manager.publish("other", 8080, 81)
            with pytest.raises(NetworkError, match="published already, by web"):
                manager.publish("web", 8080, 80)
            manager.publish("other", 8080, 80, proto="udp")  # another protocol is another port

            assert manager.detach("web")
            assert cannot_connect(in_netns(outside), HOST_ADDRESS, 8080)
        listing = run([*in_netns(host), *(["nft", "list", "ruleset"] if firewall == "nft"
                                          else ["iptables", "-t", "nat", "-S"])]).stdout
        assert "container:web" not in listing and "container:other" in listing
        manager.publish("other", 8080, 80)  # the port is free again
        assert manager.detach("other")
        if firewall == "nft":
            assert ruleset(host) == ""
        else:  # iptables-nft leaves its empty tables and base chains behind, as it always does
            assert "stages-runtime" not in run([*in_netns(host), "iptables", "-t", "nat", "-S"]).stdout
            assert "dnat" not in ruleset(host) and "masquerade" not in ruleset(host).lower()
        assert links(host) - {"rth"} == {"lo"}
        assert not manager.state_file.exists()
    finally:
        manager.prune([])


def test_publish_refuses_bad_input_in_the_learners_words(manager, host, containers):
    with pytest.raises(NetworkError, match="not attached"):
        manager.publish("nobody", 8080, 80)
    manager.attach("web", containers().pid)
    for host_port, container_port, message in ((0, 80, "not a port"), (8080, 70000, "not a port"),
                                               ("8080", 80, "not a port"), (True, 80, "not a port")):
        with pytest.raises(NetworkError, match=message) as caught:
            manager.publish("web", host_port, container_port)
        assert caught.value.hint
    with pytest.raises(NetworkError, match="protocol"):
        manager.publish("web", 8080, 80, proto="icmp")
    manager.detach("web")
    assert_all_gone(manager, host)


# == bad input, undone halfway ======================================================================
def test_attach_refuses_bad_input(manager, host, tmp_path, containers):
    with pytest.raises(NetworkError, match="no process"):
        manager.attach("web", 999_999_999)
    with pytest.raises(NetworkError, match="cannot name a container"):
        manager.attach("../etc", os.getpid())
    with pytest.raises(NetworkError, match="cannot name a bridge"):
        NetworkManager(state_dir=tmp_path, host_netns=host, bridge="Br-0")
    with pytest.raises(NetworkError, match="not an IPv4 subnet"):
        NetworkManager(state_dir=tmp_path, host_netns=host, subnet="10.88.0.0/33")
    # A process in the host-side namespace itself has nothing to attach.
    in_host = subprocess.Popen([*in_netns(host), "/bin/busybox", "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{in_host.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(NetworkError, match="host's network namespace"):
            manager.attach("web", in_host.pid)
    finally:
        in_host.kill()
        in_host.wait()
    missing = NetworkManager(state_dir=tmp_path / "s2", host_netns="stgrtnet-missing")
    with pytest.raises(NetworkError, match="no network namespace named"):
        missing.attach("web", containers().pid)
    assert not os.path.exists("/run/netns/stgrtnet-missing")
    container = containers()
    manager.attach("web", container.pid)
    with pytest.raises(NetworkError, match="attached already"):
        manager.attach("web", container.pid)
    manager.detach("web")
    assert_all_gone(manager, host)


def test_a_failure_halfway_undoes_the_bridge_the_veth_and_the_address(manager, host, containers):
    container = containers()
    # Something called eth0 is in the container already: the veth's peer cannot be born there.
    run([*in_container(container.pid), "ip", "link", "add", "eth0", "type", "bridge"])
    with pytest.raises(NetworkError, match="exists") as caught:
        manager.attach("web", container.pid)
    assert "veth peer name eth0" in str(caught.value)
    assert caught.value.hint
    assert_all_gone(manager, host)
    assert any(not step.ok for step in manager.record.steps)


def test_ctrl_c_halfway_undoes_everything(manager, host, containers, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(manager, "_configure_inside", interrupted)
    with pytest.raises(KeyboardInterrupt):
        manager.attach("web", containers().pid)
    assert_all_gone(manager, host)


def test_the_active_record_is_used_when_none_is_given(tmp_path, host, containers):
    record = StepRecord("stages run")
    with record.active():
        manager = NetworkManager(state_dir=tmp_path / "state", host_netns=host)
    assert manager.record is record
    container = containers()
    manager.attach("web", container.pid)
    manager.detach("web")
    shells = [step.shell for step in record.steps]
    assert f"nsenter --target {container.pid} --net ip route add default via 10.88.0.1" in shells
    assert shells[-1] == f"ip -n {host} link del stages0"
    assert all(step.ok for step in record.steps)


# == addresses on disk ==============================================================================
ALLOCATE = """
import sys
from stages.runtime.network import NetworkManager
manager = NetworkManager(state_dir=sys.argv[1], host_netns=sys.argv[2])
print(manager.allocate(sys.argv[3]))
"""


def test_twenty_processes_allocating_at_once_get_distinct_addresses(tmp_path, host):
    state = tmp_path / "state"
    processes = [subprocess.Popen([VENV_PYTHON, "-c", ALLOCATE, str(state), host, f"c{index}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=Path(__file__).resolve().parents[1])
                 for index in range(20)]
    addresses = []
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        addresses.append(out.strip())
    assert len(set(addresses)) == 20
    assert all(address.startswith("10.88.") and address.endswith("/16") for address in addresses)
    manager = NetworkManager(state_dir=state, host_netns=host)
    # Kept on disk: a new manager (a restarted runtime) gives the same answer and hands out another.
    assert str(manager.allocate("c7")) == addresses[7]
    assert str(manager.allocate("c20")) not in addresses
    for index in range(21):
        assert manager.release(f"c{index}")
    assert not manager.release("c0")
    assert not manager.state_file.exists()


# == prune after SIGKILL ============================================================================
ATTACH_AND_DIE = """
import os, signal, sys
from stages.runtime.network import NetworkManager
manager = NetworkManager(state_dir=sys.argv[1], host_netns=sys.argv[2])
manager.attach("lost", int(sys.argv[3]))
manager.publish("lost", 9090, 80)
print("attached", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_prune_after_the_runtime_and_its_container_were_killed(manager, host, containers):
    kept, lost = containers(), containers()
    manager.attach("kept", kept.pid)
    argv = [VENV_PYTHON, "-c", ATTACH_AND_DIE, str(manager.directory.parent), host, str(lost.pid)]
    runtime = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                             cwd=Path(__file__).resolve().parents[1])
    assert runtime.returncode == -signal.SIGKILL, runtime.stderr
    assert "attached" in runtime.stdout
    assert "container:lost" in ruleset(host)
    assert set(manager.attachments()) == {"kept", "lost"}

    # The runtime is gone; the container too.
    lost.kill()
    lost.wait()
    assert manager.prune(["kept"]) == ["lost"]
    assert "container:lost" not in ruleset(host)
    assert set(manager.attachments()) == {"kept"}
    assert ping(in_container(kept.pid), "10.88.0.1")
    assert manager.prune([]) == ["kept"]
    assert_all_gone(manager, host)


DIE_HALFWAY = """
import os, signal, sys
from stages.runtime.network import NetworkManager
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
NetworkManager._configure_inside = die  # killed after the bridge, the NAT and the veth, before the inside
NetworkManager(state_dir=sys.argv[1], host_netns=sys.argv[2]).attach("halfway", int(sys.argv[3]))
"""


def test_prune_after_the_runtime_was_killed_halfway_through_attach(manager, host, containers):
    container = containers()
    argv = [VENV_PYTHON, "-c", DIE_HALFWAY, str(manager.directory.parent), host, str(container.pid)]
    runtime = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                             cwd=Path(__file__).resolve().parents[1])
    assert runtime.returncode == -signal.SIGKILL, runtime.stderr
    assert "stages0" in links(host) and network.veth_name("halfway") in links(host)
    assert "masquerade" in ruleset(host)
    assert manager.prune([]) == ["halfway"]
    assert_all_gone(manager, host)
    assert run([*in_container(container.pid), "ip", "link", "show", "eth0"], check=False).returncode != 0


def test_prune_removes_a_living_containers_veth_too(manager, host, containers):
    container = containers()
    attachment = manager.attach("orphan", container.pid)
    assert attachment.veth_host in links(host)
    assert manager.prune([]) == ["orphan"]
    assert run([*in_container(container.pid), "ip", "link", "show", "eth0"], check=False).returncode != 0
    assert_all_gone(manager, host)


def test_veth_names_fit_and_are_stable():
    assert network.veth_name("abc") == network.veth_name("abc")
    assert network.veth_name("abc") != network.veth_name("abd")
    assert len(network.veth_name("x" * 128)) <= 15


def test_without_host_netns_the_commands_are_the_plain_ones(tmp_path):
    """The real host (not changed here): the record would say ``ip link add``, not ``ip -n NS ...``."""
    manager = NetworkManager(state_dir=tmp_path)
    assert manager.host_path is None
    assert manager._ip("link", "add", "stages0", "type", "bridge") == "ip link add stages0 type bridge"
    assert manager._exec("nft", "-f", "-") == "nft -f -"
    assert manager.state_file == tmp_path / "network" / "host.json"
    assert manager.attachments() == {}
    assert not manager.state_file.exists()
