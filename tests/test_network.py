"""Networking by hand, on the real kernel, inside network namespaces the tests make.

The topology every test builds (nothing touches the real host's network, nothing leaves the machine)::

    [isolate: a child in its own netns] ==veth== [host: netns "stgns..."] ==veth== [outside: netns "stgns..."]
      eth0 10.200.X.2                      stgbrNAME 10.200.X.1  tsth 10.201.0.1      tsto 10.201.0.2

Each effect is observed for real: ping across the veth, a TCP server inside answering through the
published port (from the host's own addresses, from 127.0.0.1, and from the outside namespace), outbound
NAT seen by a server outside as the host's address, and nothing left after teardown or cleanup.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from net_peers import CLIENT, Server, connect

from stages.errors import NetworkError
from stages.isolate import network
from stages.steps import StepRecord

pytestmark = [pytest.mark.root, pytest.mark.net]

PYTHON = os.path.realpath(sys.executable)
HOST_ADDRESS = "10.201.0.1"  # the host netns's address on its link to the outside netns
OUTSIDE_ADDRESS = "10.201.0.2"


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    """Sysctl notes go to a directory of the test's own."""
    monkeypatch.setenv("STAGES_RUN", str(tmp_path / "run"))
    return tmp_path / "run" / "network"


def ns_exec(netns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=check)


@pytest.fixture
def isolate():
    """A process alone in a new network namespace, standing for the isolate; its pid."""
    process = subprocess.Popen(["unshare", "--net", "--", "/bin/busybox", "sleep", "60"])
    try:
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{process.pid}/ns/net") == own:
            assert time.monotonic() < deadline, "unshare --net did not take effect"
            time.sleep(0.01)
        yield process
    finally:
        process.kill()
        process.wait()


def netns_name() -> str:
    """A name that says these tests made it (other tests use test_host's default, stgns...)."""
    return f"stgtnet{os.getpid() % 100000}{next(_counter)}"


_counter = iter(range(1_000_000))


@pytest.fixture
def host():
    with network.test_host(netns_name()) as name:
        yield name


@pytest.fixture
def world(host):
    """The host netns plus an "outside" netns joined to it by a veth pair; yields (host, outside)."""
    with network.test_host(netns_name()) as outside:
        run(["ip", "-n", host, "link", "add", "tsth", "type", "veth", "peer", "name", "tsto",
             "netns", outside])
        run(["ip", "-n", host, "addr", "add", f"{HOST_ADDRESS}/24", "dev", "tsth"])
        run(["ip", "-n", host, "link", "set", "tsth", "up"])
        run(["ip", "-n", outside, "addr", "add", f"{OUTSIDE_ADDRESS}/24", "dev", "tsto"])
        run(["ip", "-n", outside, "link", "set", "tsto", "up"])
        yield host, outside


def ping(prefix: list[str], address: str) -> bool:
    return run([*prefix, "/bin/busybox", "ping", "-c", "1", "-W", "2", address], check=False).returncode == 0


def links(netns: str) -> set[str]:
    return {link["ifname"] for link in json.loads(run(["ip", "-n", netns, "-j", "link"]).stdout)}


def ruleset(netns: str) -> str:
    return run(ns_exec(netns, "nft", "list", "ruleset")).stdout


def rules(netns: str) -> list[str]:
    """The rules in ``netns``, without the tables and empty base chains iptables leaves, as it always does."""
    structure = ("table ", "chain ", "type ", "}", "{")
    return [line.strip() for line in ruleset(netns).splitlines()
            if line.strip() and not line.strip().startswith(structure)]


def sysctls(netns: str) -> tuple[str, str]:
    return tuple(run(ns_exec(netns, "sysctl", "-n", key)).stdout.strip()
                 for key in (network.FORWARD, network.ROUTE_LOCALNET))


# == names ==========================================================================================
def test_device_names_fit_ifnamsiz_and_can_be_found_again():
    for name in ("a", "web", "iso-abc123", "iso-abcdef12", "x" * 32):
        names = network.devices(name)
        assert all(len(device) <= 15 for device in (names.host_veth, names.inside_veth, names.bridge))
        assert all(device.startswith("stg") for device in (names.host_veth, names.inside_veth, names.bridge))
        assert network.devices(name) == names
    assert network.devices("iso-abcdef12") != network.devices("iso-abcdef13")
    for bad in ("", "Web", "-x", "a b", "x" * 33, "a_b"):
        with pytest.raises(NetworkError, match="cannot name"):
            network.devices(bad)


def test_host_side_commands_run_where_the_host_is():
    """Without host_netns the commands are the plain ones a person types on the host (not run here)."""
    assert network.Host().ip("link") == ["ip", "link"]
    assert network.Host().exec("iptables", "-S") == ["iptables", "-S"]
    assert network.Host("ns1").ip("link") == ["ip", "-n", "ns1", "link"]
    assert network.Host("ns1").exec("sysctl", "x") == ["ip", "netns", "exec", "ns1", "sysctl", "x"]
    assert network.inside(42, "ip", "route") == ["nsenter", "--target", "42", "--net", "ip", "route"]


def test_test_host_is_a_netns_with_lo_up_and_goes_away():
    with network.test_host(netns_name()) as name:
        assert os.path.exists(f"/run/netns/{name}")
        assert links(name) == {"lo"}
        assert "UP" in run(["ip", "-n", name, "link", "show", "lo"]).stdout
        with pytest.raises(NetworkError, match="exists already"):
            with network.test_host(name):
                pass
    assert not os.path.exists(f"/run/netns/{name}")


# == the wiring, each effect observed ===============================================================
def test_wire_the_isolate_pings_its_gateway_and_the_host_pings_back(isolate, host):
    record = StepRecord("wire")
    before = sysctls(host)
    with network.wire(isolate.pid, name="ping", host_netns=host, record=record) as wiring:
        inside = ["nsenter", "--target", str(isolate.pid), "--net"]
        assert ping(inside, str(wiring.gateway.ip))
        assert ping(ns_exec(host), str(wiring.address.ip))
        facts = wiring.facts()
        assert facts["inside addresses"]["eth0"] == [str(wiring.address)]
        assert facts["inside addresses"]["lo"] == ["127.0.0.1/8"]
        assert facts["inside default route"] == str(wiring.gateway.ip)
        assert facts["bridge addresses"] == [str(wiring.gateway)]
        assert facts["bridge ports"] == [wiring.devices.host_veth]
        assert sysctls(host)[0] == "1"
        assert wiring.subnet.subnet_of(network.ipaddress.ip_network("10.200.0.0/16"))
        # The isolate's end is in its namespace, not the host's.
        assert wiring.devices.inside_veth not in links(host)
        assert {"eth0", "lo"} == set(wiring.facts()["inside addresses"])
        # Shown as typed: host-side commands in the host netns, the rest inside by nsenter.
        typed = [(step.where, step.shell) for step in record.steps]
        assert ("outside", f"ip -n {host} link add stgping-h type veth peer name stgping-c") in typed
        assert ("outside", f"ip -n {host} link set stgping-c netns {isolate.pid}") in typed
        assert ("inside", f"nsenter --target {isolate.pid} --net ip route add default via "
                          f"{wiring.gateway.ip}") in typed
        assert ("outside", f"ip netns exec {host} sysctl -w net.ipv4.ip_forward=1") in typed
        assert any(shell.startswith(f"ip netns exec {host} iptables -t nat -A POSTROUTING -s {wiring.subnet}")
                   and "stages:ping" in shell for _, shell in typed)
        assert all(step.ok for step in record.steps)
        text = wiring.check()
        assert f"$ nsenter --target {isolate.pid} --net ip route" in text
        assert f"default via {wiring.gateway.ip} dev eth0" in text
        picture = wiring.diagram()
        assert wiring.devices.bridge in picture and str(wiring.address) in picture
    assert links(host) == {"lo"}
    assert sysctls(host) == before
    assert not ping(ns_exec(host), str(wiring.address.ip))


@pytest.mark.parametrize("firewall", ["iptables", "nft"])
def test_published_port_nat_and_teardown(isolate, world, firewall, run_dir):
    host, outside = world
    before_sysctls = sysctls(host)
    assert rules(host) == []
    inside = ["nsenter", "--target", str(isolate.pid), "--net"]
    wiring = network.wire(isolate.pid, name="pub", host_netns=host, firewall=firewall)
    try:
        assert wiring.publish(8080, 80) == f"8080 -> {wiring.address.ip}:80"
        assert sysctls(host) == ("1", "1")
        with Server(inside, 80):
            # The host's own connections (OUTPUT): to its address on the outside link, to the bridge's,
            # and to 127.0.0.1, which reaches the isolate masqueraded as the bridge's address.
            assert connect(ns_exec(host), HOST_ADDRESS, 8080) == HOST_ADDRESS
            assert connect(ns_exec(host), str(wiring.gateway.ip), 8080) == str(wiring.gateway.ip)
            assert connect(ns_exec(host), "127.0.0.1", 8080) == str(wiring.gateway.ip)
            # Another machine's connection (PREROUTING): it keeps its own source address.
            assert connect(ns_exec(outside), HOST_ADDRESS, 8080) == OUTSIDE_ADDRESS
        # Outbound NAT: the outside server sees the host's address, not the isolate's private one
        # (which it could not even answer: it has no route to 10.200.0.0/16).
        with Server(ns_exec(outside), 9000):
            assert connect(inside, OUTSIDE_ADDRESS, 9000) == HOST_ADDRESS
        wiring.unpublish(8080)
        with Server(inside, 80):
            result = run([*ns_exec(outside), PYTHON, "-c", CLIENT, HOST_ADDRESS, "8080"], check=False)
            assert result.returncode != 0  # nothing listens on the host itself
    finally:
        wiring.teardown()
    wiring.teardown()  # twice is fine
    assert links(host) == {"lo", "tsth"}
    assert rules(host) == []
    assert "stages" not in ruleset(host)
    assert sysctls(host) == before_sysctls
    assert not list(run_dir.glob("sysctl-*"))


# == errors =========================================================================================
def test_a_port_published_twice_is_refused_naming_it(isolate, host):
    with network.wire(isolate.pid, name="one", host_netns=host) as wiring:
        wiring.publish(8080, 80)
        with pytest.raises(NetworkError, match="port 8080 is published already"):
            wiring.publish(8080, 81)
        second = subprocess.Popen(["unshare", "--net", "--", "/bin/busybox", "sleep", "60"])
        try:
            time.sleep(0.05)
            with network.wire(second.pid, name="two", host_netns=host) as other:
                assert other.subnet != wiring.subnet  # the first subnet was taken: a free one was chosen
                with pytest.raises(NetworkError, match="port 8080 is published already, by one"):
                    other.publish(8080, 80)
                assert other.publish(8081, 80)
            # The second one's teardown left the first one working, and forwarding on.
            assert sysctls(host)[0] == "1"
            assert ping(ns_exec(host), str(wiring.address.ip))
        finally:
            second.kill()
            second.wait()
        for bad in (0, 70000, "80", True):
            with pytest.raises(NetworkError, match="not a port number"):
                wiring.publish(bad, 80)
    assert links(host) == {"lo"}


def test_a_name_in_use_is_refused_and_the_first_wiring_survives(isolate, host):
    with network.wire(isolate.pid, name="same", host_netns=host) as wiring:
        with pytest.raises(NetworkError, match="the name same is in use"):
            network.wire(isolate.pid, name="same", host_netns=host)
        assert ping(ns_exec(host), str(wiring.address.ip))
        assert network.devices("same").bridge in links(host)
    assert links(host) == {"lo"}


def test_bad_input_is_one_clear_sentence(isolate, host):
    with pytest.raises(NetworkError, match="not an IPv4 subnet") as error:
        network.wire(isolate.pid, name="bad", host_netns=host, subnet="10.300.0.0/24")
    assert error.value.hint
    with pytest.raises(NetworkError, match="too small"):
        network.wire(isolate.pid, name="bad", host_netns=host, subnet="10.200.9.0/31")
    with pytest.raises(NetworkError, match="no network namespace named"):
        network.wire(isolate.pid, name="bad", host_netns="stgns-not-there")
    gone = subprocess.Popen(["/bin/busybox", "true"])
    gone.wait()
    for pid in (gone.pid, "1", None):
        with pytest.raises(NetworkError, match="there is no process"):
            network.wire(pid, name="bad", host_netns=host)
    with pytest.raises(NetworkError, match="not a firewall"):
        network.wire(isolate.pid, name="bad", host_netns=host, firewall="pf")
    assert links(host) == {"lo"}


def test_a_subnet_in_use_is_refused_and_undone(isolate, host):
    with network.wire(isolate.pid, name="first", host_netns=host, subnet="10.200.44.0/24"):
        record = StepRecord()
        with pytest.raises(NetworkError, match="subnet 10.200.44.0/24 is in use"):
            network.wire(isolate.pid, name="second", host_netns=host, subnet="10.200.44.0/24", record=record)
        assert any("link del stgsecond-h" in step.shell for step in record.steps)
        assert network.devices("second").bridge not in links(host)
    assert links(host) == {"lo"}


def test_a_failure_halfway_undoes_what_was_done(host, run_dir):
    # A zombie: its pid is still in /proc, but it has no namespaces left to move a device into.
    zombie = subprocess.Popen(["/bin/busybox", "true"])
    deadline = time.monotonic() + 5
    while not open(f"/proc/{zombie.pid}/stat").read().rpartition(")")[2].split()[0] == "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    record = StepRecord()
    before = sysctls(host)
    with pytest.raises(NetworkError, match="netns") as error:
        network.wire(zombie.pid, name="half", host_netns=host, record=record)
    zombie.wait()
    assert "isolate's process is gone" in error.value.hint
    shells = [step.shell for step in record.steps]
    assert any("link add stghalf-h" in shell for shell in shells)  # it got that far ...
    assert [step.ok for step in record.steps].count(False) == 1  # ... then one step failed ...
    assert f"ip -n {host} link del stghalf-h" in shells  # ... and what was done was undone
    assert links(host) == {"lo"}
    assert sysctls(host) == before


def test_ctrl_c_halfway_undoes_what_was_done(isolate, host):
    record = StepRecord()
    interrupted = []

    def press_ctrl_c(step):
        if "sysctl -w net.ipv4.ip_forward=1" in step.shell and not interrupted:
            interrupted.append(step.shell)
            raise KeyboardInterrupt

    record.listeners.append(press_ctrl_c)
    before = sysctls(host)
    with pytest.raises(KeyboardInterrupt):
        network.wire(isolate.pid, name="ctrlc", host_netns=host, record=record)
    assert interrupted
    assert links(host) == {"lo"}
    assert sysctls(host) == before  # forwarding was on for a moment, and is put back
    assert "stages" not in ruleset(host)


def test_an_explicit_address(isolate, host):
    with network.wire(isolate.pid, name="addr", host_netns=host, address="10.200.33.7/24") as wiring:
        assert str(wiring.gateway) == "10.200.33.1/24"
        assert wiring.facts()["inside addresses"]["eth0"] == ["10.200.33.7/24"]
        assert ping(ns_exec(host), "10.200.33.7")


# == leftovers after SIGKILL ========================================================================
@pytest.mark.parametrize("by_name", [True, False])
def test_cleanup_after_the_isolate_is_killed(isolate, host, by_name, run_dir):
    before = sysctls(host)
    wiring = network.wire(isolate.pid, name="dead", host_netns=host)
    wiring.publish(8080, 80)
    isolate.send_signal(signal.SIGKILL)
    isolate.wait()
    # The kernel took the isolate's namespace, and the veth pair with it; the bridge and rules stay.
    deadline = time.monotonic() + 5
    while wiring.devices.host_veth in links(host) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert links(host) == {"lo", wiring.devices.bridge}
    assert "stages:dead" in run(ns_exec(host, "iptables", "-t", "nat", "-S")).stdout
    removed = network.cleanup(["dead"] if by_name else None, host_netns=host)
    assert any("link del stgbrdead" in line for line in removed)
    assert links(host) == {"lo"}
    assert "stages" not in ruleset(host)
    assert sysctls(host) == before
    assert not list(run_dir.glob("sysctl-*"))
    assert network.cleanup(host_netns=host) == []  # nothing left to find
    wiring.teardown()  # the owner's teardown afterwards finds everything gone, and is fine with it


def test_cleanup_without_names_leaves_a_live_wiring_alone(isolate, host):
    other = subprocess.Popen(["unshare", "--net", "--", "/bin/busybox", "sleep", "60"])
    try:
        time.sleep(0.05)
        live = network.wire(isolate.pid, name="live", host_netns=host)
        gone = network.wire(other.pid, name="gone", host_netns=host, firewall="nft")
        other.kill()
        other.wait()
        deadline = time.monotonic() + 5
        while gone.devices.host_veth in links(host) and time.monotonic() < deadline:
            time.sleep(0.02)
        network.cleanup(host_netns=host)
        assert links(host) == {"lo", live.devices.bridge, live.devices.host_veth}
        assert "stages_gone" not in ruleset(host)
        assert "stages:live" in run(ns_exec(host, "iptables", "-t", "nat", "-S")).stdout
        assert sysctls(host)[0] == "1"  # the live one still needs forwarding
        assert ping(ns_exec(host), str(live.address.ip))
        live.teardown()
        gone.teardown()
    finally:
        other.kill()
        other.wait()
    assert links(host) == {"lo"}


# == with the real Isolate ==========================================================================
@pytest.mark.slow
def test_an_isolate_connected_to_a_test_host(host, tmp_path):
    isolate_module = pytest.importorskip("stages.isolate.isolate")
    from stages import rootfs

    top = tmp_path / "open"
    top.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(top, 0o755)
    root = rootfs.build(top / "rootfs", source="busybox")
    with isolate_module.Isolate(root, name="netiso") as iso:
        iso.unshare("net")
        wiring = iso.connect(host_netns=host)
        iso.publish(8080, 80)
        result = iso.run(["ping", "-c", "1", "-W", "2", str(wiring.gateway.ip)])
        assert result.returncode == 0, result
        assert any(step.shell.startswith(f"ip -n {host} link add") for step in iso.record.steps)
    assert links(host) == {"lo"}
    assert "stages" not in ruleset(host)


# == the chains iptables-nft makes (finding 13 of issue 10) ===========================================
def test_teardown_leaves_no_empty_chain_behind_and_keeps_the_hosts_own(isolate, host):
    # iptables-nft makes table ip filter / chain FORWARD and table ip nat / chain POSTROUTING at the first
    # rule; deleting our rules alone left them there, empty
    assert ruleset(host).strip() == ""
    wiring = network.wire(isolate.pid, name="chains", host_netns=host, firewall="iptables")
    wiring.publish(8080, 80)
    wiring.teardown()
    assert ruleset(host).strip() == ""
    # a chain the host had before keeps its own rules, and stays
    run(ns_exec(host, "iptables", "-A", "FORWARD", "-s", "10.250.0.0/24", "-j", "ACCEPT"))
    wiring = network.wire(isolate.pid, name="chains", host_netns=host, firewall="iptables")
    wiring.teardown()
    assert run(ns_exec(host, "iptables", "-S", "FORWARD")).stdout.splitlines()[1:] == [
        "-A FORWARD -s 10.250.0.0/24 -j ACCEPT"]
    assert "POSTROUTING" not in ruleset(host)
    run(ns_exec(host, "iptables", "-D", "FORWARD", "-s", "10.250.0.0/24", "-j", "ACCEPT"))


def test_cleanup_after_a_kill_leaves_no_empty_chain_behind(isolate, host):
    wiring = network.wire(isolate.pid, name="killed", host_netns=host, firewall="iptables")
    wiring.publish(8080, 80)
    isolate.send_signal(signal.SIGKILL)
    isolate.wait()
    removed = network.cleanup(["killed"], host_netns=host)
    assert any("nft delete chain ip filter FORWARD" in line for line in removed)
    assert ruleset(host).strip() == ""
    wiring.teardown()
