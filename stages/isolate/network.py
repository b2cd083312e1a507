"""Networking by hand: a veth pair, a bridge, routes and NAT, typed the way a person types them.

A new network namespace has nothing but a loopback device that is down (network_namespaces(7)). To let the
isolate talk to anything, LXC and Docker do the same few steps, and stage 2 does them with the same tools a
person would use, each run as a subprocess and recorded as typed::

    ip link add stgweb-h type veth peer name stgweb-c      # a veth pair: a cable with two ends (veth(4))
    ip link set stgweb-c netns 4242                        # push one end into the isolate's namespace
    nsenter --target 4242 --net ip link set stgweb-c name eth0
    ip link add stgbrweb type bridge                       # a switch on the host side
    ip link set stgweb-h master stgbrweb                   # plug the host end into it
    ip addr add 10.200.7.1/24 dev stgbrweb                 # the isolate's gateway
    nsenter --target 4242 --net ip addr add 10.200.7.2/24 dev eth0
    ip link set stgbrweb up; ip link set stgweb-h up; nsenter ... ip link set lo up; ... eth0 up
    nsenter --target 4242 --net ip route add default via 10.200.7.1
    sysctl -w net.ipv4.ip_forward=1                        # let the host route between its devices
    iptables -t nat -A POSTROUTING -s 10.200.7.0/24 ! -o stgbrweb -j MASQUERADE   # outbound NAT
    iptables -t nat -A PREROUTING -p tcp --dport 8080 -m addrtype --dst-type LOCAL \\
             -j DNAT --to-destination 10.200.7.2:80                             # a published port

:func:`wire` does them all and returns a :class:`Wiring`, whose :meth:`Wiring.teardown` undoes every one
(it also runs when ``wire`` fails halfway, or is interrupted). A :class:`Wiring` can also be driven one step
at a time (the notebook does), with :meth:`Wiring.check` showing the addresses and routes between steps.

Where "the host" is: with ``host_netns=None`` the host-side commands change the real host's network (what
``stages isolate --net`` does in the workshop VM). Tests, notebooks and the tour always pass ``host_netns``,
the name of a network namespace made by :func:`test_host` that stands in for the host: every host-side
command then runs in it (``ip -n NS ...``, ``ip netns exec NS iptables ...``), and nothing touches the real
host's network or leaves the machine.

Everything this module creates is named so that it can be found again: devices start with ``stg``
(``stgNAME-h``, ``stgbrNAME``), firewall rules carry the comment ``stages:NAME`` (with nft: they live in
the table ``stages_NAME``). :func:`cleanup` removes what an isolate killed by SIGKILL left behind. The
sysctls it changes (``net.ipv4.ip_forward``, ``net.ipv4.conf.all.route_localnet``) are written down first
(``$STAGES_RUN/network``) and put back when the last stages bridge in that namespace goes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from stages import steps as steps_module
from stages.errors import NetworkError, StagesError

PREFIX = "stg"  # every device this module makes starts with it
COMMENT = "stages:"  # every iptables rule carries "stages:NAME"
NFT_TABLE = "stages_"  # with nft, every rule of NAME lives in the table "stages_NAME"
INSIDE_NAME = "eth0"  # what the isolate's end is called inside, as in Docker and LXC
FORWARD = "net.ipv4.ip_forward"
ROUTE_LOCALNET = "net.ipv4.conf.all.route_localnet"

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_TIMEOUT = 15


# == names ==========================================================================================
@dataclass(frozen=True)
class Devices:
    """The device names one wiring uses: the veth's two ends and the bridge (each at most 15 characters,
    IFNAMSIZ in netdevice(7))."""

    host_veth: str
    inside_veth: str
    bridge: str


def devices(name: str) -> Devices:
    """The device names for the wiring called ``name``: ``stgNAME-h``, ``stgNAME-c``, ``stgbrNAME``.

    A name longer than 10 characters is shortened to its first 4 characters and 6 of its sha1, so that
    the names fit in 15 characters and :func:`cleanup` can compute them again from ``name`` alone.
    """
    check_name(name)
    short = name if len(name) <= 10 else name[:4] + hashlib.sha1(name.encode()).hexdigest()[:6]
    return Devices(f"{PREFIX}{short}-h", f"{PREFIX}{short}-c", f"{PREFIX}br{short}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise NetworkError(f"{name!r} cannot name a network wiring",
                           "use lowercase letters, digits and '-' (at most 32), not starting with '-'")
    return name


def nft_table(name: str) -> str:
    """The nft table holding the rules of ``name`` (nft names have no '-')."""
    return NFT_TABLE + check_name(name).replace("-", "_")


# == running commands ===============================================================================
def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise NetworkError(f"the {tool} command is not installed", f"install it: apt-get install {package}")
    return path


def _run(argv: list[str], *, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=_TIMEOUT)
    except FileNotFoundError:
        raise NetworkError(f"the {argv[0]} command is not installed",
                           "install iproute2, util-linux and iptables (or nftables)") from None
    except subprocess.TimeoutExpired:
        raise NetworkError(f"`{shlex.join(argv)}` did not finish in {_TIMEOUT} s",
                           "is the machine very busy? try again") from None
    if check and result.returncode != 0:
        raise NetworkError(f"`{shlex.join(argv)}` failed: {_first_line(result)}", _hint_for(result))
    return result


def _first_line(result: subprocess.CompletedProcess) -> str:
    text = (result.stderr or result.stdout or "").strip()
    return text.splitlines()[0] if text else f"exit status {result.returncode}"


def _hint_for(result: subprocess.CompletedProcess) -> str:
    text = (result.stderr or "").lower()
    if "operation not permitted" in text or "permission denied" in text:
        return "network changes need root (CAP_NET_ADMIN): run it as root inside the workshop VM"
    if "file exists" in text:
        return "something with that name or address exists already: choose another name or subnet"
    if "no such process" in text:
        return "the isolate's process is gone: start the isolate again"
    if "cannot open network namespace" in text:
        return "that network namespace does not exist: create it with `ip netns add NAME` (or test_host())"
    return "see `ip help`, iptables(8), nft(8)"


class Host:
    """Where the host-side commands run: the real host (``netns=None``) or a network namespace standing
    in for it (``ip -n NS``, ``ip netns exec NS``)."""

    def __init__(self, netns: str | None = None):
        self.netns = netns

    def ip(self, *args: str) -> list[str]:
        return ["ip", "-n", self.netns, *args] if self.netns else ["ip", *args]

    def exec(self, *argv: str) -> list[str]:
        """``argv`` run in the host-side namespace (ip-netns(8): ``ip netns exec`` enters it by name)."""
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)

    @property
    def exists(self) -> bool:
        return self.netns is None or os.path.exists(f"/run/netns/{self.netns}")

    @property
    def key(self) -> str:
        return f"netns-{self.netns}" if self.netns else "host"

    def __str__(self) -> str:
        return f"network namespace {self.netns}" if self.netns else "the host"


def inside(pid: int, *argv: str) -> list[str]:
    """``argv`` run in the network namespace of ``pid`` (nsenter(1) opens /proc/PID/ns/net, setns(2))."""
    return ["nsenter", "--target", str(pid), "--net", *argv]


# == the host stand-in ==============================================================================
@contextlib.contextmanager
def test_host(name: str | None = None, *, record: steps_module.StepRecord | None = None) -> Iterator[str]:
    """A network namespace standing in for the host, with ``lo`` up; yields its name, removes it at the end.

    ``ip netns add`` bind-mounts a new network namespace on /run/netns/NAME (ip-netns(8)), so it lives
    without a process in it. Pass the name as ``host_netns`` to :func:`wire`: nothing then touches the
    real host's network, and nothing it sends can leave the machine (the namespace has no way out).
    """
    name = name or f"{PREFIX}ns{secrets.token_hex(3)}"
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", name):
        raise NetworkError(f"{name!r} cannot name a network namespace",
                           "use letters, digits, '-', '_' or '.'")
    _require("ip", "iproute2")
    if os.path.exists(f"/run/netns/{name}"):
        raise NetworkError(f"a network namespace named {name} exists already",
                           f"choose another name, or remove it: ip netns del {name}")
    record = record if record is not None else steps_module.current() or steps_module.StepRecord()
    with record.step(f"ip netns add {name}", what="a network namespace standing in for the host",
                     where="outside"):
        _run(["ip", "netns", "add", name])
    try:
        with record.step(f"ip -n {name} link set lo up", what="its loopback device up", where="outside"):
            _run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        with record.step(f"ip netns del {name}", what="remove the stand-in host", where="outside"):
            result = _run(["ip", "netns", "del", name], check=False)
            if result.returncode != 0 and os.path.exists(f"/run/netns/{name}"):
                raise NetworkError(f"could not remove network namespace {name}: {_first_line(result)}",
                                   f"remove it by hand: ip netns del {name}")
        # Sysctls of a namespace that is gone need no restoring: forget what we wrote down for it.
        with contextlib.suppress(FileNotFoundError):
            _sysctl_file(Host(name)).unlink()


test_host.__test__ = False  # a helper for tests, not a test: pytest must not collect it when imported


# == sysctls, written down before they change =======================================================
def _state_dir() -> Path:
    return Path(os.environ.get("STAGES_RUN") or "/run/stages") / "network"


def _sysctl_file(host: Host) -> Path:
    return _state_dir() / f"sysctl-{host.key}.json"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    directory = _state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def read_sysctl(key: str, host_netns: str | None = None) -> str:
    """The value of sysctl ``key`` in the host-side network namespace (``sysctl -n KEY``)."""
    return _run(Host(host_netns).exec("sysctl", "-n", key)).stdout.strip()


def _remember_sysctl(host: Host, key: str, value: str) -> None:
    """Write down the value ``key`` had before the first stages wiring changed it, once per namespace."""
    path = _sysctl_file(host)
    saved = json.loads(path.read_text()) if path.exists() else {}
    if key not in saved:
        saved[key] = value
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(saved))
        os.replace(temporary, path)


def _restore_sysctls(host: Host, record: steps_module.StepRecord) -> None:
    """Put back the sysctls stages changed in ``host`` once no stages bridge is left there."""
    path = _sysctl_file(host)
    if not path.exists() or not host.exists:
        return
    if _stages_bridges(host):
        return  # another wiring still routes through this namespace and needs forwarding on
    saved = json.loads(path.read_text())
    for key, value in saved.items():
        if read_sysctl(key, host.netns) == value:
            continue  # it was already so (forwarding on a Docker host, say): nothing to put back
        argv = host.exec("sysctl", "-w", f"{key}={value}")
        with record.step(shlex.join(argv), what=f"put {key} back as it was", where="outside"):
            _run(argv)
    path.unlink()


# == what is there ==================================================================================
def _links(host: Host, *args: str) -> list[dict]:
    result = _run(host.ip("-j", "-d", "link", "show", *args), check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return []
    return json.loads(result.stdout)


def _link_exists(host: Host, device: str) -> bool:
    return _run(host.ip("link", "show", "dev", device), check=False).returncode == 0


def _stages_bridges(host: Host) -> list[str]:
    return [link["ifname"] for link in _links(host, "type", "bridge")
            if link["ifname"].startswith(PREFIX + "br")]


def _ports_of(host: Host, bridge: str) -> list[str]:
    return [link["ifname"] for link in _links(host, "master", bridge)]


def _networks_in_use(host: Host) -> list[ipaddress.IPv4Network]:
    found = []
    result = _run(host.ip("-4", "-j", "route", "show", "table", "all"), check=False)
    for route in json.loads(result.stdout or "[]"):
        destination = route.get("dst", "")
        if destination in ("", "default") or ":" in destination:
            continue
        with contextlib.suppress(ValueError):
            found.append(ipaddress.ip_network(destination, strict=False))
    result = _run(host.ip("-4", "-j", "addr", "show"), check=False)
    for link in json.loads(result.stdout or "[]"):
        for info in link.get("addr_info", []):
            found.append(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network)
    return found


def free_subnet(name: str, host_netns: str | None = None) -> ipaddress.IPv4Network:
    """A 10.200.X.0/24 that no address or route in the host-side namespace overlaps (X starts from a hash
    of ``name``, so the same name tends to get the same subnet)."""
    used = _networks_in_use(Host(host_netns))
    start = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 256
    for step in range(256):
        candidate = ipaddress.ip_network(f"10.200.{(start + step) % 256}.0/24")
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise NetworkError("every subnet 10.200.0.0/24 ... 10.200.255.0/24 is in use",
                       "pass subnet= yourself, or remove old wirings: stages isolate --cleanup")


# == firewalls ======================================================================================
class Iptables:
    """Rules added with iptables(8), each tagged ``-m comment --comment stages:NAME``."""

    kind = "iptables"

    def __init__(self, host: Host, name: str):
        self.host, self.name, self.tag = host, name, COMMENT + name

    def rule(self, verb: str, table: str, chain: str, match: list[str], target: list[str]) -> list[str]:
        return self.host.exec("iptables", "-t", table, verb, chain, *match,
                              "-m", "comment", "--comment", self.tag, "-j", *target)

    def rules(self) -> list[tuple[str, list[str]]]:
        """(table, rule words after ``-A``) of every rule whose comment starts with ``stages:``."""
        found = []
        for table in ("nat", "filter"):
            result = _run(self.host.exec("iptables", "-t", table, "-S"), check=False)
            for line in result.stdout.splitlines():
                words = shlex.split(line)
                if words[:1] == ["-A"] and any(word.startswith(COMMENT) for word in words):
                    found.append((table, words[1:]))
        return found

    @staticmethod
    def owner(words: list[str]) -> str | None:
        for index, word in enumerate(words[:-1]):
            if word == "--comment" and words[index + 1].startswith(COMMENT):
                return words[index + 1][len(COMMENT):]
        return None


def _firewall_kind(preferred: str | None) -> str:
    if preferred not in (None, "iptables", "nft"):
        raise NetworkError(f"{preferred!r} is not a firewall this knows", "use 'iptables' or 'nft'")
    if preferred == "nft" or (preferred is None and shutil.which("iptables") is None):
        _require("nft", "nftables")
        return "nft"
    _require("iptables", "iptables")
    return "iptables"


# == the wiring =====================================================================================
class Wiring:
    """The network of one isolate: a veth pair, a bridge, addresses, a route, NAT and published ports.

    Build it with :func:`wire`, or step by step (each method is one step, recorded as typed)::

        wiring = Wiring(pid, name="web", host_netns="stgns1")
        wiring.create_veth(); wiring.move_into_isolate(); wiring.create_bridge()
        wiring.add_addresses(); wiring.bring_up(); wiring.add_default_route()
        wiring.enable_forwarding(); wiring.masquerade(); wiring.publish(8080, 80)
        print(wiring.check())
        wiring.teardown()

    ``subnet`` (e.g. ``"10.200.7.0/24"``: the bridge gets .1, the isolate .2) or ``address`` (the
    isolate's address with its prefix, e.g. ``"10.200.7.5/24"``) choose the addresses; by default a free
    10.200.X.0/24. ``firewall`` is ``"iptables"`` or ``"nft"`` (default: iptables if installed).
    """

    def __init__(self, pid: int, *, name: str, subnet: str | None = None, address: str | None = None,
                 host_netns: str | None = None, record: steps_module.StepRecord | None = None,
                 firewall: str | None = None):
        if isinstance(pid, bool) or not isinstance(pid, int) or not os.path.exists(f"/proc/{pid}"):
            raise NetworkError(f"there is no process {pid!r} to wire",
                               "give the pid of a process in the isolate's network namespace (Isolate.pid)")
        self.pid = pid
        self.name = check_name(name)
        self.devices = devices(name)
        self.host = Host(host_netns)
        self.host_netns = host_netns
        self.record = record if record is not None else steps_module.StepRecord(f"network {name}")
        _require("ip", "iproute2")
        _require("nsenter", "util-linux")
        if not self.host.exists:
            raise NetworkError(f"there is no network namespace named {host_netns}",
                               f"create it first: ip netns add {host_netns} (or use test_host())")
        self.firewall = _firewall_kind(firewall)
        self._chosen = subnet is None and address is None  # we picked the subnet: we may pick again
        self.subnet, self.gateway, self.address = self._addresses(subnet, address)
        self.inside_name = self.devices.inside_veth
        self.published: dict[int, int] = {}  # host port -> container port
        self._publish_undo: dict[int, contextlib.ExitStack] = {}
        self._undo = contextlib.ExitStack()
        self._errors: list[str] = []
        self._done: list[str] = []
        self._new_chains: list[tuple[str, str]] = []  # iptables-nft base chains that our first rule made
        self._torn_down = False
        self._changed_sysctls = False

    def _addresses(self, subnet, address):
        try:
            if address is not None:
                isolate = ipaddress.IPv4Interface(address)
                network = isolate.network
            else:
                network = (ipaddress.IPv4Network(subnet) if subnet is not None
                           else free_subnet(self.name, self.host_netns))
                isolate = None
        except ValueError as error:
            raise NetworkError(f"{address or subnet!r} is not an IPv4 subnet: {error}",
                               'give one like subnet="10.200.7.0/24" or address="10.200.7.2/24"') from None
        if network.prefixlen > 30:
            raise NetworkError(f"{network} is too small for a bridge address and an isolate",
                               "use a /24, e.g. 10.200.7.0/24")
        hosts = list(network.hosts()) if network.num_addresses <= 1024 else None
        first = hosts[0] if hosts else network.network_address + 1
        gateway = ipaddress.IPv4Interface(f"{first}/{network.prefixlen}")
        if isolate is None:
            isolate = ipaddress.IPv4Interface(f"{first + 1}/{network.prefixlen}")
        if isolate.ip == gateway.ip or isolate.ip in (network.network_address, network.broadcast_address):
            raise NetworkError(f"{isolate.ip} cannot be the isolate's address in {network}",
                               f"{gateway.ip} is the bridge's; pick another host address")
        return network, gateway, isolate

    # -- running steps ---------------------------------------------------------------------------
    def _step(self, argv: list[str], what: str, where: str = "outside") -> subprocess.CompletedProcess:
        with self.record.step(shlex.join(argv), what=what, where=where):
            return _run(argv)

    def _outside(self, what: str, *args: str) -> subprocess.CompletedProcess:
        return self._step(self.host.ip(*args), what)

    def _inside(self, what: str, *argv: str) -> subprocess.CompletedProcess:
        return self._step(inside(self.pid, *argv), what, where="inside")

    def _on_teardown(self, undo: Callable[[], None], stack: contextlib.ExitStack | None = None) -> None:
        """Register ``undo`` *before* the step it undoes runs: a step that fails halfway (or is
        interrupted) is undone too; each undo tolerates finding its object already gone."""
        def guarded() -> None:
            try:
                undo()
            except StagesError as error:
                self._errors.append(error.message)
        (stack or self._undo).callback(guarded)

    def _undo_command(self, argv: list[str], what: str, gone: Callable[[], bool]) -> None:
        """Run ``argv``; a failure is fine if ``gone()`` says the object is not there any more."""
        if not self.host.exists:
            return  # the stand-in host was removed, and everything in it with it
        with self.record.step(shlex.join(argv), what=what, where="outside"):
            result = _run(argv, check=False)
            if result.returncode != 0 and not gone():
                raise NetworkError(f"`{shlex.join(argv)}` failed: {_first_line(result)}",
                                   f"remove it by hand, or run network.cleanup([{self.name!r}])")

    def _delete_link(self, device: str) -> None:
        self._undo_command(self.host.ip("link", "del", device), f"remove {device}",
                           lambda: not _link_exists(self.host, device))

    # -- the steps, in the order the kernel needs them -------------------------------------------
    def create_veth(self) -> Devices:
        """``ip link add NAME-h type veth peer name NAME-c``: a pair of devices, what goes in one comes
        out of the other (veth(4)). Both start in the host-side namespace."""
        host_veth, inside_veth, bridge = (self.devices.host_veth, self.devices.inside_veth,
                                          self.devices.bridge)
        for device in (host_veth, inside_veth, bridge):
            if _link_exists(self.host, device):
                raise NetworkError(f"the name {self.name} is in use: device {device} exists in {self.host}",
                                   "choose another name, or remove the old wiring: "
                                   f"stages.isolate.network.cleanup([{self.name!r}])")
        self._on_teardown(lambda: self._delete_link(host_veth))
        self._outside("a veth pair: two network devices joined like the ends of a cable",
                      "link", "add", host_veth, "type", "veth", "peer", "name", inside_veth)
        self._done.append("veth")
        return self.devices

    def move_into_isolate(self, inside_name: str = INSIDE_NAME) -> str:
        """``ip link set NAME-c netns PID``: move one end into the isolate's network namespace, then
        rename it there (a device name is only unique within its namespace, so every isolate can have
        its own eth0)."""
        self._outside("move one end into the isolate's network namespace (by the pid of a process in it)",
                      "link", "set", self.devices.inside_veth, "netns", str(self.pid))
        self._done.append("moved")
        if inside_name and inside_name != self.devices.inside_veth:
            existing = _run(inside(self.pid, "ip", "link", "show", "dev", inside_name), check=False)
            if existing.returncode != 0:
                self._inside(f"call it {inside_name} inside, as Docker and LXC do",
                             "ip", "link", "set", self.devices.inside_veth, "name", inside_name)
                self.inside_name = inside_name
        return self.inside_name

    def create_bridge(self) -> str:
        """``ip link add stgbrNAME type bridge`` and plug the host end of the veth into it: the bridge is a
        virtual switch, and its address is the isolate's gateway."""
        bridge = self.devices.bridge
        self._on_teardown(lambda: self._delete_link(bridge))
        self._outside("a bridge on the host side: a virtual switch", "link", "add", bridge, "type", "bridge")
        self._outside("plug the host end of the veth into the bridge",
                      "link", "set", self.devices.host_veth, "master", bridge)
        self._done.append("bridge")
        return bridge

    def add_addresses(self) -> tuple[str, str]:
        """The bridge gets the first address of the subnet (the gateway), the isolate the next one.

        With two bridges on the same subnet, the first one's route would win and the second isolate
        would never get an answer; so the subnet is checked again here, under a lock, just before use."""
        with _locked():
            self._claim_subnet()
            self._outside(f"the bridge's address: the isolate's gateway in {self.subnet}",
                          "addr", "add", str(self.gateway), "dev", self.devices.bridge)
        self._inside("the isolate's address", "ip", "addr", "add", str(self.address), "dev", self.inside_name)
        self._done.append("addresses")
        return str(self.gateway), str(self.address)

    def _claim_subnet(self) -> None:
        used = [network for network in _networks_in_use(self.host) if self.subnet.overlaps(network)]
        if not used:
            return
        if self._chosen:
            self.subnet, self.gateway, self.address = self._addresses(None, None)
            return
        raise NetworkError(f"the subnet {self.subnet} is in use in {self.host} (by {used[0]})",
                           "choose another subnet, or leave it out and a free one is chosen")

    def bring_up(self) -> None:
        """Every new device starts down, including the isolate's loopback (network_namespaces(7))."""
        self._outside("bridge up", "link", "set", self.devices.bridge, "up")
        self._outside("host end up", "link", "set", self.devices.host_veth, "up")
        self._inside("the isolate's loopback up (127.0.0.1 works inside from now on)",
                     "ip", "link", "set", "lo", "up")
        self._inside("the isolate's end up", "ip", "link", "set", self.inside_name, "up")
        self._done.append("up")

    def add_default_route(self) -> str:
        """Inside, everything that is not on the subnet goes to the bridge's address."""
        self._inside("a default route inside: everything else goes via the bridge",
                     "ip", "route", "add", "default", "via", str(self.gateway.ip))
        self._done.append("route")
        return str(self.gateway.ip)

    def _set_sysctl(self, key: str, value: str, why: str) -> None:
        old = read_sysctl(key, self.host_netns)
        with _locked():
            _remember_sysctl(self.host, key, old)
        self._changed_sysctls = True  # teardown puts it back, once the last stages bridge here is gone
        if old != value:
            where = "" if self.host_netns else " (on the real host: it is put back at teardown)"
            self._step(self.host.exec("sysctl", "-w", f"{key}={value}"), f"{why}; was {old}{where}")

    def _restore_sysctls(self) -> None:
        with _locked():
            _restore_sysctls(self.host, self.record)

    def enable_forwarding(self) -> None:
        """``sysctl -w net.ipv4.ip_forward=1``: without it the host drops packets that are not for itself,
        so the isolate could reach the bridge but nothing beyond it. The old value is written down and put
        back when the last stages bridge in this namespace is gone."""
        self._set_sysctl(FORWARD, "1", "let the host route packets between its devices")
        if self.firewall == "iptables":
            # A host whose FORWARD policy is DROP (any host with Docker) would still drop them.
            self._rule("filter", "FORWARD", ["-i", self.devices.bridge], ["ACCEPT"],
                       "let the isolate's packets through the FORWARD chain", verb="-I")
            self._rule("filter", "FORWARD", ["-o", self.devices.bridge], ["ACCEPT"],
                       "and the packets for it", verb="-I")
        self._done.append("forwarding")

    def masquerade(self) -> None:
        """Outbound NAT: packets from the subnet leaving by another device get the host's address as their
        source, so that the answers find their way back (the subnet is private: nobody else routes it)."""
        if self.firewall == "iptables":
            self._rule("nat", "POSTROUTING", ["-s", str(self.subnet), "!", "-o", self.devices.bridge],
                       ["MASQUERADE"], "outbound NAT: the isolate's packets leave with the host's address")
        else:
            self._nft_rule("postrouting", ["ip", "saddr", str(self.subnet), "oifname", "!=",
                                           f'"{self.devices.bridge}"', "masquerade"],
                           "outbound NAT: the isolate's packets leave with the host's address")
        self._done.append("masquerade")

    # -- firewall rules ---------------------------------------------------------------------------
    def _rule(self, table: str, chain: str, match: list[str], target: list[str], what: str,
              verb: str = "-A", stack: contextlib.ExitStack | None = None) -> None:
        firewall = Iptables(self.host, self.name)
        if f"chain-{table}-{chain}" not in self._done:
            self._done.append(f"chain-{table}-{chain}")
            # iptables-nft makes the table and the base chain at its first rule there, and deleting the rule
            # leaves them: an empty FORWARD or POSTROUTING the host did not have. Note which ones we made.
            if nft_chain(self.host, table, chain) is None:
                self._new_chains.append((table, chain))
        delete = firewall.rule("-D", table, chain, match, target)
        exists = firewall.rule("-C", table, chain, match, target)
        self._on_teardown(lambda: self._undo_command(
            delete, f"remove the rule in {chain}", lambda: _run(exists, check=False).returncode != 0), stack)
        self._step(firewall.rule(verb, table, chain, match, target), what)

    _NFT_CHAINS = {
        "postrouting": "type nat hook postrouting priority srcnat;",
        "prerouting": "type nat hook prerouting priority dstnat;",
        "output": "type nat hook output priority -100;",
    }

    def _nft(self, *words: str) -> list[str]:
        """``nft 'COMMAND'``: the command quoted as one word, as a person types it (nft(8))."""
        options = [word for word in words if word.startswith("-")]
        return self.host.exec("nft", *options, " ".join(word for word in words if not word.startswith("-")))

    def _nft_rule(self, chain: str, words: list[str], what: str,
                  stack: contextlib.ExitStack | None = None) -> None:
        table = nft_table(self.name)
        if "nft-table" not in self._done:
            self._on_teardown(lambda: self._undo_command(
                self._nft("delete", "table", "ip", table), f"remove the nft table {table} and its rules",
                lambda: _run(self._nft("list", "table", "ip", table), check=False).returncode != 0))
            self._step(self._nft("add", "table", "ip", table), "an nft table for this isolate's rules")
            self._done.append("nft-table")
        if f"nft-{chain}" not in self._done:
            self._step(self._nft("add", "chain", "ip", table, chain, "{ " + self._NFT_CHAINS[chain] + " }"),
                       f"a {chain} chain in it")
            self._done.append(f"nft-{chain}")
        result = self._step(self._nft("--echo", "--handle", "add", "rule", "ip", table, chain, *words,
                                      "comment", f'"{COMMENT}{self.name}"'), what)
        handle = re.search(r"# handle (\d+)", result.stdout)
        if handle and stack is not None:
            argv = self._nft("delete", "rule", "ip", table, chain, "handle", handle.group(1))
            self._on_teardown(lambda: self._undo_command(
                argv, f"remove the rule in {chain}",
                lambda: f"handle {handle.group(1)}" not in
                _run(self._nft("-a", "list", "chain", "ip", table, chain), check=False).stdout), stack)

    # -- published ports --------------------------------------------------------------------------
    def _published_elsewhere(self, host_port: int) -> str | None:
        """The name of the wiring that publishes ``host_port`` in this namespace already, if any."""
        if self.firewall == "iptables" or shutil.which("iptables"):
            for table, words in Iptables(self.host, self.name).rules():
                if table == "nat" and "DNAT" in words and _word_after(words, "--dport") == str(host_port):
                    return Iptables.owner(words)
        if shutil.which("nft"):
            result = _run(self._nft("list", "ruleset"), check=False)
            current = None
            for line in result.stdout.splitlines():
                table = re.match(r"table ip (\S+) \{", line)
                if table:
                    current = table.group(1)
                elif (current and current.startswith(NFT_TABLE) and "dnat" in line
                      and re.search(rf"\bdport {host_port}\b", line)):
                    return current[len(NFT_TABLE):]
        return None

    def publish(self, host_port: int, container_port: int, protocol: str = "tcp") -> str:
        """Publish ``container_port`` of the isolate as ``host_port`` of the host: DNAT rules in PREROUTING
        (connections from other hosts and namespaces) and OUTPUT (the host's own connections, to any of
        its addresses including 127.0.0.1). Returns ``"HOST:PORT -> ISOLATE:PORT"``.

        127.0.0.1 is special: the kernel will not route a packet with a loopback source out of a real
        device unless ``net.ipv4.conf.all.route_localnet=1`` (ip-sysctl docs), and the isolate could not
        answer 127.0.0.1 anyway, so such packets are also masqueraded to the bridge's address.
        """
        for port in (host_port, container_port):
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise NetworkError(f"{port!r} is not a port number", "give a number between 1 and 65535")
        if protocol not in ("tcp", "udp"):
            raise NetworkError(f"{protocol!r} is not a protocol that has ports", "use 'tcp' or 'udp'")
        if self._torn_down:
            raise NetworkError("this wiring was torn down", "wire the isolate again")
        if host_port in self.published:
            raise NetworkError(f"port {host_port} is published already, to port {self.published[host_port]}"
                               f" of {self.name}", "choose another host port, or unpublish it first")
        owner = self._published_elsewhere(host_port)
        if owner is not None:
            raise NetworkError(f"port {host_port} is published already, by {owner}",
                               "choose another host port, or stop that isolate first")
        destination = f"{self.address.ip}:{container_port}"
        stack = contextlib.ExitStack()
        try:
            self._set_sysctl(ROUTE_LOCALNET, "1", "let connections to 127.0.0.1 be routed to the isolate")
            if self.firewall == "iptables":
                match = ["-p", protocol, "--dport", str(host_port), "-m", "addrtype", "--dst-type", "LOCAL"]
                target = ["DNAT", "--to-destination", destination]
                self._rule("nat", "PREROUTING", match, target,
                           f"publish: connections from elsewhere to port {host_port} go to {destination}",
                           stack=stack)
                self._rule("nat", "OUTPUT", match, target,
                           f"publish: the host's own connections to port {host_port} too", stack=stack)
                self._rule("nat", "POSTROUTING",
                           ["-s", "127.0.0.0/8", "-d", str(self.address.ip), "-o", self.devices.bridge],
                           ["MASQUERADE"], "connections from 127.0.0.1 get the bridge's address as source",
                           stack=stack)
            else:
                words = ["fib", "daddr", "type", "local", protocol, "dport", str(host_port),
                         "dnat", "to", destination]
                self._nft_rule("prerouting", words, f"publish: port {host_port} goes to {destination}",
                               stack=stack)
                self._nft_rule("output", words, f"publish: the host's own connections to port {host_port}",
                               stack=stack)
                self._nft_rule("postrouting", ["ip", "saddr", "127.0.0.0/8", "ip", "daddr",
                                               str(self.address.ip), "oifname", f'"{self.devices.bridge}"',
                                               "masquerade"],
                               "connections from 127.0.0.1 get the bridge's address as source", stack=stack)
        except BaseException:
            stack.close()
            raise
        self.published[host_port] = container_port
        self._publish_undo[host_port] = stack
        self._undo.callback(stack.close)
        return f"{host_port} -> {destination}"

    def unpublish(self, host_port: int) -> None:
        """Remove the rules that publish ``host_port``."""
        if host_port not in self.published:
            raise NetworkError(f"port {host_port} is not published by {self.name}",
                               f"published: {sorted(self.published) or 'none'}")
        self._publish_undo.pop(host_port).close()
        del self.published[host_port]

    # -- looking at it -----------------------------------------------------------------------------
    def check(self) -> str:
        """What is there now, as a person would look: the bridge and its ports on the host side, the
        addresses and routes inside. Returns the commands and their output as text."""
        commands = [
            self.host.ip("-br", "addr", "show", "dev", self.devices.bridge),
            self.host.ip("-br", "link", "show", "master", self.devices.bridge),
            inside(self.pid, "ip", "-br", "addr"),
            inside(self.pid, "ip", "route"),
        ]
        if self.firewall == "iptables":
            commands.append(self.host.exec("iptables", "-t", "nat", "-S"))
        else:
            commands.append(self._nft("list", "table", "ip", nft_table(self.name)))
        return "\n".join(show(argv) for argv in commands)

    def facts(self) -> dict[str, object]:
        """What the kernel says, parsed: the addresses and the default route inside, the bridge's ports."""
        addresses = json.loads(_run(inside(self.pid, "ip", "-4", "-j", "addr")).stdout or "[]")
        routes = json.loads(_run(inside(self.pid, "ip", "-4", "-j", "route")).stdout or "[]")
        bridge = json.loads(_run(self.host.ip("-4", "-j", "addr", "show", "dev", self.devices.bridge),
                                 check=False).stdout or "[]")
        def cidr(info: dict) -> str:
            return f"{info['local']}/{info['prefixlen']}"

        return {
            "inside addresses": {link["ifname"]: [cidr(a) for a in link["addr_info"]] for link in addresses},
            "inside default route": next((r.get("gateway") for r in routes if r.get("dst") == "default"),
                                         None),
            "bridge addresses": [cidr(a) for link in bridge for a in link["addr_info"]],
            "bridge ports": _ports_of(self.host, self.devices.bridge),
        }

    def diagram(self) -> str:
        """The topology as text, with the real names and addresses."""
        host = f"host ({self.host})"
        left = [host, "", f"{self.devices.bridge}  {self.gateway}", "   |", f"{self.devices.host_veth}"]
        if "masquerade" in self._done:
            left += ["", f"NAT: {self.subnet} -> host's address"]
        for host_port, container_port in sorted(self.published.items()):
            left.append(f"port {host_port} -> {self.address.ip}:{container_port}")
        right = [f"isolate (pid {self.pid})", "", f"{self.inside_name}  {self.address}",
                 f"default via {self.gateway.ip}", f"{self.inside_name}"]
        width_left = max(len(line) for line in left) + 2
        width_right = max(len(line) for line in right) + 2
        rows = max(len(left), len(right))
        left += [""] * (rows - len(left))
        right += [""] * (rows - len(right))
        cable = " veth pair "
        lines = [f"+{'-' * width_left}+{' ' * len(cable)}+{'-' * width_right}+"]
        for index, (a, b) in enumerate(zip(left, right)):
            middle = cable if index == 4 else " " * len(cable)
            joint = "=" if index == 4 else "|"
            lines.append(f"| {a:<{width_left - 1}}{joint}{middle}{joint} {b:<{width_right - 1}}|")
        lines.append(lines[0])
        return "\n".join(lines)

    # -- the end -----------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Remove every rule, address, veth and bridge this wiring made, and put the sysctls back; safe to
        call twice, after an error halfway through, and after the isolate was killed."""
        if self._torn_down:
            return
        self._torn_down = True
        self._undo.close()
        self.published.clear()
        if self.host.exists:
            for table, chain in self._new_chains:  # after their rules went; each only if still empty
                remove_empty_chain(self.host, table, chain, self.record)
        if self._changed_sysctls:
            # After the bridge is gone: the last wiring out of a namespace puts its sysctls back.
            try:
                self._restore_sysctls()
            except StagesError as error:
                self._errors.append(error.message)
        errors, self._errors = self._errors, []
        if errors:
            raise NetworkError(f"some of {self.name}'s network could not be removed: {'; '.join(errors)}",
                               f"run network.cleanup([{self.name!r}]) (or: stages isolate --cleanup)")

    def __enter__(self) -> Wiring:
        return self

    def __exit__(self, *exc_info) -> None:
        self.teardown()

    def __repr__(self) -> str:
        state = "torn down" if self._torn_down else "wired"
        return (f"<Wiring {self.name} {state} {self.devices.bridge} {self.gateway} <-> "
                f"{self.inside_name} {self.address} published={self.published}>")


def _word_after(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words[:-1] else None


def show(argv: list[str]) -> str:
    """Run a read-only command and return it as a person sees it: ``$ command`` then its output."""
    result = _run(argv, check=False)
    output = (result.stdout + result.stderr).rstrip()
    return f"$ {shlex.join(argv)}\n{output}" if output else f"$ {shlex.join(argv)}"


def wire(pid: int, *, name: str, subnet: str | None = None, address: str | None = None,
         host_netns: str | None = None, record: steps_module.StepRecord | None = None,
         firewall: str | None = None) -> Wiring:
    """Wire the network namespace of ``pid`` to the host (or to ``host_netns``): veth pair, bridge,
    addresses, lo and the veth up, a default route, IPv4 forwarding and outbound NAT. See :class:`Wiring`.

    If any step fails (or Ctrl-C arrives), every step done so far is undone before the error is raised.
    """
    wiring = Wiring(pid, name=name, subnet=subnet, address=address, host_netns=host_netns, record=record,
                    firewall=firewall)
    try:
        wiring.create_veth()
        wiring.move_into_isolate()
        wiring.create_bridge()
        wiring.add_addresses()
        wiring.bring_up()
        wiring.add_default_route()
        wiring.enable_forwarding()
        wiring.masquerade()
    except BaseException:
        with contextlib.suppress(StagesError):
            wiring.teardown()
        raise
    return wiring


# == the chains iptables-nft makes ====================================================================
def nft_chain(host: Host, table: str, chain: str) -> str | None:
    """``nft list chain ip TABLE CHAIN`` in ``host``, or None when there is no such chain (or no nft)."""
    if shutil.which("nft") is None:
        return None
    result = _run(host.exec("nft", "list", "chain", "ip", table, chain), check=False)
    return result.stdout if result.returncode == 0 else None


def _is_empty_accepting(listing: str) -> bool:
    """Whether an ``nft list chain`` listing is a base chain with no rule and the policy accept: a chain
    that changes nothing, whose removal changes nothing either."""
    lines = [line.strip() for line in listing.splitlines()]
    rules = [line for line in lines if line and not line.startswith(("table ", "chain ", "type ", "}"))]
    return not rules and "policy accept;" in listing


def remove_empty_chain(host: Host, table: str, chain: str, record: steps_module.StepRecord) -> list[str]:
    """Delete the base chain ``chain`` of the nft table ``ip TABLE`` if it holds no rule (policy accept),
    then the table if no chain is left in it: what iptables-nft made for our rules and left behind
    (iptables-nft(8)). Returns the commands run."""
    listing = nft_chain(host, table, chain)
    if listing is None or not _is_empty_accepting(listing):
        return []
    done = []
    argv = host.exec("nft", "delete", "chain", "ip", table, chain)
    with record.step(shlex.join(argv), what=f"the {chain} chain iptables made for our rules, empty now",
                     where="outside"):
        _run(argv, check=False)
    done.append(shlex.join(argv))
    table_listing = _run(host.exec("nft", "list", "table", "ip", table), check=False)
    if table_listing.returncode == 0 and "chain " not in table_listing.stdout:
        argv = host.exec("nft", "delete", "table", "ip", table)
        with record.step(shlex.join(argv), what=f"the {table} table, empty now", where="outside"):
            _run(argv, check=False)
        done.append(shlex.join(argv))
    return done


# == leftovers ======================================================================================
def cleanup(names: list[str] | None = None, host_netns: str | None = None,
            record: steps_module.StepRecord | None = None) -> list[str]:
    """Remove what wirings left behind in the host-side namespace (after a SIGKILL, say); return what went.

    With ``names``, everything of those wirings goes: their veth and bridge, the rules commented
    ``stages:NAME`` and the nft table ``stages_NAME``. Without, only what is clearly abandoned: a stages
    bridge with nothing plugged into it (its isolate is gone, and the veth with its namespace) and the
    rules and tables of a name whose bridge is gone or empty. Then, once no stages bridge is left, the
    sysctls stages changed are put back.
    """
    host = Host(host_netns)
    record = record if record is not None else steps_module.StepRecord("network cleanup")
    if not host.exists:
        return []
    _require("ip", "iproute2")
    removed: list[str] = []

    def run(argv: list[str], what: str) -> None:
        with record.step(shlex.join(argv), what=what, where="outside"):
            _run(argv, check=False)
        removed.append(shlex.join(argv))

    def abandoned(name: str) -> bool:
        bridge = devices(name).bridge
        return not _link_exists(host, bridge) or not _ports_of(host, bridge)

    rules = Iptables(host, "").rules() if shutil.which("iptables") else []
    emptied: set[tuple[str, str]] = set()  # (table, chain) a rule was removed from
    tables = []
    if shutil.which("nft"):
        listing = _run(host.exec("nft", "list", "tables"), check=False).stdout
        tables = [words[2] for words in (line.split() for line in listing.splitlines())
                  if len(words) == 3 and words[1] == "ip" and words[2].startswith(NFT_TABLE)]
    if names is None:
        candidates = {Iptables.owner(words) for _, words in rules} - {None}
        candidates |= {table[len(NFT_TABLE):].replace("_", "-") for table in tables}
        wanted = {name for name in candidates if _NAME.match(name) and abandoned(name)}
        empty_bridges = [bridge for bridge in _stages_bridges(host) if not _ports_of(host, bridge)]
    else:
        wanted = {check_name(name) for name in names}
        empty_bridges = []
    with _locked():
        for name in sorted(wanted):
            for device in (devices(name).host_veth, devices(name).bridge):
                if _link_exists(host, device):
                    run(host.ip("link", "del", device), f"remove {device}, left by {name}")
            for table, words in rules:
                if Iptables.owner(words) == name:
                    run(host.exec("iptables", "-t", table, "-D", *words), f"remove a rule left by {name}")
                    emptied.add((table, words[0]))  # the words after -A: CHAIN ...
            if nft_table(name) in tables:
                run(host.exec("nft", "delete", "table", "ip", nft_table(name)), f"remove {name}'s nft table")
        for bridge in empty_bridges:
            if _link_exists(host, bridge):
                run(host.ip("link", "del", bridge), f"remove {bridge}: nothing is plugged into it")
        # Whether a chain was there before the killed isolate's first rule is not known any more; a base
        # chain left with no rule and policy accept changes nothing, so removing it changes nothing either.
        for table, chain in sorted(emptied):
            removed.extend(remove_empty_chain(host, table, chain, record))
        _restore_sysctls(host, record)
    return removed
