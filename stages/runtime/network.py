"""Stage 3's networking: the same veth, bridge, routes and NAT as stage 2, done by a program.

Stage 2 (:mod:`stages.isolate.network`) types ``ip`` and ``iptables`` one command at a time, each a new
process. Here the runtime talks to the kernel itself: links, addresses and routes go over netlink
(rtnetlink(7)) through pyroute2, and the firewall rules of one action go to nftables as one transaction
(``nft -f -``, nft(8)), or to iptables(8) where nft is missing. Every action is still recorded, as the
command a person would have typed for it, so a notebook can put the two side by side::

    ip link add stages0 type bridge                    # once, for the first container
    ip addr add 10.88.0.1/16 dev stages0; ip link set stages0 up
    sysctl -w net.ipv4.ip_forward=1
    nft -f - <<'EOF'                                   # outbound NAT for the bridge's subnet
    ...
    ip link add veth1a2b3c4d type veth peer name eth0 netns 4242   # the peer is born inside
    ip link set veth1a2b3c4d master stages0; ip link set veth1a2b3c4d up
    nsenter --target 4242 --net ip link set lo up      # and the address, eth0 up, the default route

:class:`NetworkManager` is what the engine uses: :meth:`~NetworkManager.attach` a container's network
namespace (by the pid of a process in it), :meth:`~NetworkManager.publish` a port,
:meth:`~NetworkManager.detach` it again, and :meth:`~NetworkManager.prune` what containers killed by
SIGKILL left behind. Addresses are handed out from a file under ``STATE/network/`` kept under an
flock(2) lock, so that twenty ``stages run`` at once never get the same address.

How a program enters a network namespace without a helper process: setns(2) changes the namespace of the
calling *thread* only. A short-lived thread joins the namespace, opens a netlink socket there (a socket
belongs to the namespace it was created in, for good, see network_namespaces(7)) and ends; the socket is
then used from anywhere. Sysctl files under /proc/sys/net and programs started from that thread also see
its namespace. Nothing is left running.

Where "the host" is: with ``host_netns=None``, the real host. Tests and notebooks always pass the name of
a network namespace standing in for it (:func:`stages.isolate.network.test_host`), as stage 2 does.

Importing this module does not import pyroute2: ``stages run --network none`` never pays for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from stages import steps as steps_module
from stages.errors import NetworkError, StagesError

DEFAULT_BRIDGE = "stages0"
DEFAULT_SUBNET = "10.88.0.0/16"
INSIDE_NAME = "eth0"  # the container's end, as in Docker and LXC
NFT_TABLE = "stages"  # one nft table per host; each bridge has its own chains in it
TAG = "stages-runtime:"  # every firewall rule's comment; not "stages:", which stage 2's cleanup owns
FORWARD = "net.ipv4.ip_forward"

_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_BRIDGE_NAME = re.compile(r"^[a-z][a-z0-9]{0,14}$")  # IFNAMSIZ (netdevice(7)), and a valid nft name
_TIMEOUT = 15
_Result = TypeVar("_Result")


@dataclass
class Attachment:
    """One container's place on the network: what :meth:`NetworkManager.attach` returns."""

    container_id: str
    pid: int
    address: str  # the container's address, e.g. "10.88.0.2"
    prefixlen: int  # of the bridge's subnet, e.g. 16
    gateway: str  # the bridge's address, the container's default route, e.g. "10.88.0.1"
    bridge: str  # e.g. "stages0"
    veth_host: str  # the host end of the veth pair, plugged into the bridge
    veth_inside: str = INSIDE_NAME
    ports: list[tuple[int, int, str]] = field(default_factory=list)  # (host port, container port, proto)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# == small helpers ==================================================================================
def check_container_id(container_id: str) -> str:
    if not isinstance(container_id, str) or not _CONTAINER_ID.match(container_id):
        raise NetworkError(f"{container_id!r} cannot name a container on the network",
                           "use letters, digits, '.', '_' or '-' (at most 128), first a letter or digit")
    return container_id


def veth_name(container_id: str) -> str:
    """The host end of a container's veth: ``veth`` and 8 hex digits of a hash of its id (a device name
    has at most 15 characters, IFNAMSIZ in netdevice(7), so the id itself may not fit)."""
    return "veth" + hashlib.sha1(check_container_id(container_id).encode()).hexdigest()[:8]


def _check_port(port: object) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise NetworkError(f"{port!r} is not a port number", "give a number between 1 and 65535")
    return port


def in_netns(path: str | None, action: Callable[[], _Result]) -> _Result:
    """Run ``action`` in the network namespace at ``path`` (``/proc/PID/ns/net``, ``/run/netns/NAME``;
    ``None``: here) and return its result.

    It runs in a new thread that joins the namespace with setns(2), which moves only the calling thread;
    the thread ends with the action, so neither this process nor any helper stays in the namespace.
    Sockets opened, /proc/sys/net files written and programs started by ``action`` belong to it.
    """
    if path is None:
        return action()
    from pyroute2 import netns as pyroute2_netns

    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetworkError(f"there is no network namespace at {path}",
                           "is the container still running? (or create it: ip netns add NAME)") from None
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            pyroute2_netns.setns(descriptor, flags=0)
            outcome["result"] = action()
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    try:
        thread = threading.Thread(target=run, name=f"netns {path}")
        thread.start()
        thread.join()
    finally:
        os.close(descriptor)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _netlink_socket() -> int:
    # NETLINK_ROUTE = 0 (netlink(7)); detached so that the descriptor outlives the socket object.
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0).detach()


@contextlib.contextmanager
def _rtnetlink(path: str | None) -> Iterator[Any]:
    """A pyroute2 ``IPRoute`` whose netlink socket lives in the namespace at ``path``."""
    from pyroute2 import IPRoute

    if path is None:
        ipr = IPRoute()
    else:
        ipr = IPRoute(fileno=in_netns(path, _netlink_socket))
    try:
        yield ipr
    finally:
        ipr.close()


def _netns_inode(path: str) -> int:
    return os.stat(path).st_ino


class _DamagedStateError(NetworkError):
    """The network's state file is there but is not JSON: what it described must be found by name."""


# == the manager ====================================================================================
class NetworkManager:
    """The network of the containers on one bridge of one host.

    ``state_dir``: where stages keeps state (default :func:`stages.paths.state_dir`); this class uses
    ``STATE/network/``. ``host_netns``: the name of a network namespace standing in for the host (tests,
    notebooks), or ``None`` for the real host. ``record``: the :class:`~stages.steps.StepRecord` every
    action is recorded into (default: the active one, else a new one, :attr:`record`). ``bridge`` and
    ``subnet`` choose the bridge (created on first use, with the subnet's first address as the
    containers' gateway) and the addresses handed out. ``firewall``: ``"nft"`` (default when installed)
    or ``"iptables"``.

    All methods are safe to call from many processes at once: they take an flock(2) lock on
    ``STATE/network/.lock`` for their whole work. What the engine does::

        network = NetworkManager(host_netns="stgns1")       # None in the workshop VM: the real host
        attachment = network.attach(container_id, pid)     # .address, .gateway, .veth_host, ...
        network.publish(container_id, 8080, 80)            # curl http://127.0.0.1:8080 reaches it
        network.detach(container_id)                       # when the container is removed
        network.prune(live_container_ids)                  # after a crash: what nobody owns goes
        print(network.record.script())                     # the commands a person would have typed
    """

    def __init__(self, state_dir: str | os.PathLike | None = None, host_netns: str | None = None,
                 record: steps_module.StepRecord | None = None, *, bridge: str = DEFAULT_BRIDGE,
                 subnet: str = DEFAULT_SUBNET, firewall: str | None = None):
        if state_dir is None:
            from stages.paths import state_dir as default_state_dir

            state_dir = default_state_dir()
        self.directory = Path(state_dir) / "network"
        if host_netns is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", host_netns):
            raise NetworkError(f"{host_netns!r} cannot name a network namespace",
                               "use letters, digits, '-', '_' or '.'")
        self.host_netns = host_netns
        if not isinstance(bridge, str) or not _BRIDGE_NAME.match(bridge):
            raise NetworkError(f"{bridge!r} cannot name a bridge",
                               "use lowercase letters and digits, at most 15, starting with a letter")
        self.bridge = bridge
        try:
            self.subnet = ipaddress.IPv4Network(subnet)
        except ValueError as error:
            raise NetworkError(f"{subnet!r} is not an IPv4 subnet: {error}",
                               'give one like "10.88.0.0/16"') from None
        if self.subnet.prefixlen > 29:
            raise NetworkError(f"{self.subnet} is too small for a bridge and its containers",
                               "use a /16 or a /24, e.g. 10.88.0.0/16")
        self.gateway = ipaddress.IPv4Interface(f"{self.subnet.network_address + 1}/{self.subnet.prefixlen}")
        if firewall not in (None, "nft", "iptables"):
            raise NetworkError(f"{firewall!r} is not a firewall this knows", "use 'nft' or 'iptables'")
        self._firewall = firewall
        active = steps_module.current()  # compared with None: an empty record is falsy (it has a len)
        self.record = record if record is not None else active if active is not None else \
            steps_module.StepRecord("network")
        self.notes: list[str] = []  # what prune() did beyond the containers it names
        self._written: str | None = None  # the state as the file has it (nothing rewritten for nothing)

    # -- where things are ------------------------------------------------------------------------
    @property
    def host_path(self) -> str | None:
        """The host-side network namespace as a path (None: the namespace of this process)."""
        return f"/run/netns/{self.host_netns}" if self.host_netns else None

    @property
    def state_file(self) -> Path:
        return self.directory / (f"netns-{self.host_netns}.json" if self.host_netns else "host.json")

    @property
    def firewall(self) -> str:
        if self._firewall is None:
            if shutil.which("nft"):
                self._firewall = "nft"
            elif shutil.which("iptables"):
                self._firewall = "iptables"
            else:
                raise NetworkError("neither nft nor iptables is installed: outbound NAT needs one",
                                   "install one: apt-get install nftables")
        return self._firewall

    def _ip(self, *words: str) -> str:
        """The ``ip`` command a person would type on the host side."""
        return shlex.join(["ip", *(["-n", self.host_netns] if self.host_netns else []), *words])

    def _exec(self, *words: str) -> str:
        return shlex.join([*(["ip", "netns", "exec", self.host_netns] if self.host_netns else []), *words])

    # -- state -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """The state of this host, under the lock; written back (atomically) when the block ends."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._load()
            try:
                yield state
            finally:
                self._save(state)

    def _load(self) -> dict:
        try:
            state = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            state = {}
        except ValueError:
            state = None
        if not isinstance(state, dict) or not isinstance(state.get("bridges", {}), dict) \
                or not isinstance(state.get("containers", {}), dict):
            raise _DamagedStateError(f"{self.state_file} is damaged (not the network's state)",
                                     "`stages prune` removes the bridge and firewall rules it described, "
                                     "found by their names, once no container is on the bridge")
        state.setdefault("bridges", {})
        state.setdefault("containers", {})
        self._written = json.dumps(state, sort_keys=True)
        return state

    def _save(self, state: dict) -> None:
        text = json.dumps(state, sort_keys=True)
        if text == self._written:
            return  # unchanged: nothing written (a full disk must not stop a detach that changes nothing)
        if not state["bridges"] and not state["containers"] and "ip_forward_was" not in state:
            with contextlib.suppress(FileNotFoundError):
                self.state_file.unlink()
            self._written = text
            return
        from stages.runtime.store import write_json

        write_json(self.state_file, state)  # rename(2) is atomic: readers see old or new, never half
        self._written = text

    # -- recording -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _step(self, shell: str, what: str, where: str = "outside") -> Iterator[None]:
        """One recorded step; a netlink or OS error in it becomes a NetworkError naming the command."""
        from pyroute2.netlink.exceptions import NetlinkError

        with self.record.step(shell, what=what, where=where):
            try:
                yield
            except NetlinkError as error:
                raise NetworkError(f"`{shell}` failed: {os.strerror(error.code)}",
                                   _hint(error.code)) from None
            except OSError as error:
                if error.errno is None:
                    raise
                raise NetworkError(f"`{shell}` failed: {os.strerror(error.errno)}",
                                   _hint(error.errno)) from None

    def _run(self, argv: list[str], shell: str, what: str, input: str | None = None) -> str:
        """Run a firewall command in the host-side namespace, recorded as ``shell``."""
        with self._step(shell, what):
            try:
                result = in_netns(self.host_path, lambda: subprocess.run(
                    argv, input=input, capture_output=True, text=True, timeout=_TIMEOUT))
            except FileNotFoundError:
                raise NetworkError(f"the {argv[0]} command is not installed",
                                   "install nftables (or iptables)") from None
            except subprocess.TimeoutExpired:
                raise NetworkError(f"`{shell.splitlines()[0]}` did not finish in {_TIMEOUT} s",
                                   "is the machine very busy? try again") from None
            if result.returncode != 0:
                text = (result.stderr or result.stdout).strip().splitlines() or [f"exit {result.returncode}"]
                raise NetworkError(f"`{shell.splitlines()[0]}` failed: {text[0]}",
                                   "see nft(8) / iptables(8); is the kernel's nf_tables module loaded?")
            return result.stdout

    def _sysctl(self, key: str, value: str | None = None, what: str = "") -> str:
        """Read (``value=None``) or write a sysctl of the host-side namespace through /proc/sys."""
        path = "/proc/sys/" + key.replace(".", "/")
        if value is None:
            return in_netns(self.host_path, lambda: Path(path).read_text().strip())
        with self._step(self._exec("sysctl", "-w", f"{key}={value}"), what):
            in_netns(self.host_path, lambda: Path(path).write_text(value + "\n"))
        return value

    # -- addresses -------------------------------------------------------------------------------
    def allocate(self, container_id: str) -> ipaddress.IPv4Interface:
        """The address of ``container_id`` on the bridge: the lowest free one, kept on disk until
        :meth:`release` (or :meth:`detach`); asking again gives the same address."""
        check_container_id(container_id)
        with self._locked() as state:
            return self._allocate(state, container_id)

    def _allocate(self, state: dict, container_id: str) -> ipaddress.IPv4Interface:
        entry = state["containers"].get(container_id)
        if entry is not None:
            if entry["bridge"] != self.bridge:
                raise NetworkError(f"container {container_id} is on bridge {entry['bridge']} already",
                                   "detach it first")
            return ipaddress.IPv4Interface(entry["address"])
        used = {ipaddress.IPv4Interface(item["address"]).ip for item in state["containers"].values()}
        used.add(self.gateway.ip)
        for candidate in self.subnet.hosts():
            if candidate not in used:
                break
        else:
            raise NetworkError(f"every address of {self.subnet} is taken",
                               "remove stopped containers (stages prune), or use a larger subnet")
        address = ipaddress.IPv4Interface(f"{candidate}/{self.subnet.prefixlen}")
        state["containers"][container_id] = {"bridge": self.bridge, "address": str(address), "pid": None,
                                             "veth_host": None, "ports": []}
        return address

    def release(self, container_id: str) -> bool:
        """Give the address of ``container_id`` back (only the address: :meth:`detach` removes its devices
        and rules as well). Returns whether it had one."""
        check_container_id(container_id)
        with self._locked() as state:
            return state["containers"].pop(container_id, None) is not None

    def attachment(self, container_id: str) -> Attachment | None:
        """What :meth:`attach` returned for ``container_id``, read back from disk (None: not attached)."""
        with self._locked() as state:
            entry = state["containers"].get(container_id)
        return None if entry is None or entry["veth_host"] is None else self._attachment(container_id, entry)

    def attachments(self) -> dict[str, Attachment]:
        """Every attached container of this host, by id."""
        with self._locked() as state:
            return {cid: self._attachment(cid, entry) for cid, entry in state["containers"].items()
                    if entry["veth_host"] is not None}

    def _attachment(self, container_id: str, entry: dict) -> Attachment:
        address = ipaddress.IPv4Interface(entry["address"])
        gateway = address.network.network_address + 1  # the bridge's address, as in __init__
        return Attachment(container_id=container_id, pid=entry["pid"], address=str(address.ip),
                          prefixlen=address.network.prefixlen, gateway=str(gateway), bridge=entry["bridge"],
                          veth_host=entry["veth_host"], ports=[tuple(port) for port in entry["ports"]])

    # -- attach ----------------------------------------------------------------------------------
    def attach(self, container_id: str, pid: int) -> Attachment:
        """Put the network namespace of ``pid`` on the bridge, as ``container_id``.

        A veth pair whose peer is created directly inside the container's namespace and named ``eth0``
        there (``ip link add VETH type veth peer name eth0 netns PID``), the host end plugged into the
        bridge and up; inside: ``lo`` up, the address, ``eth0`` up, a default route via the bridge. The
        bridge, forwarding and outbound NAT are set up with the first container. If anything fails (or
        Ctrl-C arrives) every step done so far is undone before the error is raised.
        """
        check_container_id(container_id)
        if isinstance(pid, bool) or not isinstance(pid, int) or not os.path.exists(f"/proc/{pid}/ns/net"):
            raise NetworkError(f"there is no process {pid!r} to attach",
                               "give the pid of a process in the container's network namespace")
        inside_path = f"/proc/{pid}/ns/net"
        host_path = self.host_path or "/proc/self/ns/net"
        if self.host_netns and not os.path.exists(host_path):
            raise NetworkError(f"there is no network namespace named {self.host_netns}",
                               f"create it first: ip netns add {self.host_netns} (or use test_host())")
        if _netns_inode(inside_path) == _netns_inode(host_path):
            raise NetworkError(f"process {pid} is in the host's network namespace: nothing to attach",
                               "start the container with its own network namespace (unshare --net)")
        # Pin the container's namespace: if the process dies halfway, the steps fail cleanly instead of
        # landing in a namespace of another process that got the same pid.
        inside_fd = os.open(inside_path, os.O_RDONLY | os.O_CLOEXEC)
        inside_pinned = f"/proc/{os.getpid()}/fd/{inside_fd}"
        veth = veth_name(container_id)
        try:
            with self._locked() as state, contextlib.ExitStack() as undo, _rtnetlink(self.host_path) as host:
                entry = state["containers"].get(container_id)
                if entry is not None and entry["veth_host"] is not None:
                    raise NetworkError(f"container {container_id} is attached already, as {entry['address']}",
                                       "detach it first")
                self._ensure_bridge(state, undo, host)
                address = self._allocate(state, container_id)
                undo.callback(state["containers"].pop, container_id, None)
                entry = state["containers"][container_id]
                entry.update(pid=pid, veth_host=veth)
                # Written down before the veth exists: a runtime killed from here on leaves an entry that
                # prune() finds, never a device nobody knows about.
                self._save(state)
                undo.callback(self._delete_host_link, veth)
                with self._step(self._ip("link", "add", veth, "type", "veth", "peer", "name", INSIDE_NAME,
                                         "netns", str(pid)),
                                "a veth pair, one end born inside the container's network namespace"):
                    host.link("add", ifname=veth, kind="veth",
                              peer={"ifname": INSIDE_NAME, "net_ns_fd": inside_fd})
                index = host.link_lookup(ifname=veth)[0]
                bridge_index = host.link_lookup(ifname=self.bridge)[0]
                with self._step(self._ip("link", "set", veth, "master", self.bridge),
                                "plug the host end into the bridge"):
                    host.link("set", index=index, master=bridge_index)
                with self._step(self._ip("link", "set", veth, "up"), "host end up"):
                    host.link("set", index=index, state="up")
                self._configure_inside(pid, inside_pinned, address)
                undo.pop_all()
                return self._attachment(container_id, entry)
        finally:
            os.close(inside_fd)

    def _configure_inside(self, pid: int, inside_path: str, address: ipaddress.IPv4Interface) -> None:
        def inside(*words: str) -> str:
            return shlex.join(["nsenter", "--target", str(pid), "--net", "ip", *words])

        with _rtnetlink(inside_path) as ipr:
            loopback = ipr.link_lookup(ifname="lo")[0]
            eth0 = ipr.link_lookup(ifname=INSIDE_NAME)[0]
            with self._step(inside("link", "set", "lo", "up"),
                            "loopback up (every new namespace has it down)", where="inside"):
                ipr.link("set", index=loopback, state="up")
            with self._step(inside("addr", "add", str(address), "dev", INSIDE_NAME),
                            "the container's address", where="inside"):
                ipr.addr("add", index=eth0, address=str(address.ip), prefixlen=address.network.prefixlen)
            with self._step(inside("link", "set", INSIDE_NAME, "up"), "eth0 up", where="inside"):
                ipr.link("set", index=eth0, state="up")
            with self._step(inside("route", "add", "default", "via", str(self.gateway.ip)),
                            "everything else goes via the bridge", where="inside"):
                ipr.route("add", dst="0.0.0.0/0", gateway=str(self.gateway.ip), oif=eth0)

    def _delete_host_link(self, device: str) -> bool:
        with _rtnetlink(self.host_path) as ipr:
            return self._delete_link(ipr, device)

    def _delete_link(self, ipr: Any, device: str) -> bool:
        """Delete ``device`` if it is there (deleting one end of a veth deletes both); tolerant."""
        indexes = ipr.link_lookup(ifname=device)
        if not indexes:
            return False  # gone already: a veth goes with the namespace of its other end
        with self._step(self._ip("link", "del", device), f"remove {device}"):
            try:
                ipr.link("del", index=indexes[0])
            except Exception as error:  # NetlinkError ENODEV: it went meanwhile
                if getattr(error, "code", None) != errno.ENODEV:
                    raise
        return True

    # -- the bridge, forwarding and outbound NAT -------------------------------------------------
    def _ensure_bridge(self, state: dict, undo: contextlib.ExitStack, ipr: Any) -> None:
        """Create the bridge with its address, forwarding and NAT, unless they are there already."""
        known = state["bridges"].get(self.bridge)
        exists = bool(ipr.link_lookup(ifname=self.bridge))
        if known is not None and exists:
            existing = known["subnet"]
            if existing != str(self.subnet):
                raise NetworkError(f"bridge {self.bridge} has subnet {existing}, not {self.subnet}",
                                   f"use subnet={existing!r}, or another bridge name")
            return
        if exists and known is None:
            raise NetworkError(f"a device named {self.bridge} exists already, and stages did not make it",
                               "choose another bridge name, or remove it: "
                               + self._ip("link", "del", self.bridge))
        for other, info in state["bridges"].items():
            if other != self.bridge and ipaddress.IPv4Network(info["subnet"]).overlaps(self.subnet):
                raise NetworkError(f"subnet {self.subnet} overlaps bridge {other}'s ({info['subnet']})",
                                   "choose another subnet")
        state["bridges"][self.bridge] = {"subnet": str(self.subnet), "gateway": str(self.gateway),
                                         "firewall": self.firewall}
        self._save(state)  # before the bridge exists, as for the veth in attach()
        undo.callback(self._remove_bridge_if_unused, state, self.bridge)
        with self._step(self._ip("link", "add", self.bridge, "type", "bridge"),
                        "a bridge: the switch every container's veth plugs into"):
            ipr.link("add", ifname=self.bridge, kind="bridge")
        index = ipr.link_lookup(ifname=self.bridge)[0]
        with self._step(self._ip("addr", "add", str(self.gateway), "dev", self.bridge),
                        "the bridge's address: the containers' gateway"):
            ipr.addr("add", index=index, address=str(self.gateway.ip), prefixlen=self.subnet.prefixlen)
        with self._step(self._ip("link", "set", self.bridge, "up"), "bridge up"):
            ipr.link("set", index=index, state="up")
        old = self._sysctl(FORWARD)
        if self.host_netns is None and "ip_forward_was" not in state:
            state["ip_forward_was"] = old  # the real host's: put back when the last bridge goes
            self._save(state)
        if old != "1":
            self._sysctl(FORWARD, "1", "let the host route between the bridge and its other devices")
        # route_localnet lets packets from 127.0.0.1 be routed out of this bridge (ip-sysctl docs), which
        # a published port needs for the host's own connections to localhost; it goes with the bridge.
        self._sysctl(f"net.ipv4.conf.{self.bridge}.route_localnet", "1",
                     "let connections to 127.0.0.1 be routed to a container (published ports)")
        self._add_bridge_rules()
        self._allow_forwarding()

    def _tag_bridge(self, bridge: str) -> str:
        return f"{TAG}bridge:{bridge}"

    def _add_bridge_rules(self) -> None:
        tag = self._tag_bridge(self.bridge)
        subnet, bridge = str(self.subnet), self.bridge
        if self.firewall == "nft":
            chains = {"prerouting": "type nat hook prerouting priority dstnat;",
                      "output": "type nat hook output priority -100;",
                      "postrouting": "type nat hook postrouting priority srcnat;"}
            lines = [f"add table ip {NFT_TABLE}"]
            lines += [f"add chain ip {NFT_TABLE} {bridge}_{chain} {{ {spec} }}"
                      for chain, spec in chains.items()]
            lines.append(f"flush chain ip {NFT_TABLE} {bridge}_postrouting")
            post = f"add rule ip {NFT_TABLE} {bridge}_postrouting"
            lines += [
                f'{post} ip saddr {subnet} oifname != "{bridge}" masquerade comment "{tag}"',
                f'{post} ip saddr 127.0.0.0/8 oifname "{bridge}" masquerade comment "{tag}"',
                f'{post} ip saddr {subnet} oifname "{bridge}" ct status dnat masquerade comment "{tag}"',
            ]
            self._nft(lines, f"outbound NAT for {subnet}: the containers' packets leave with the host's "
                             "address; chains for published ports")
        else:
            for rule, what in (
                (["-s", subnet, "!", "-o", bridge], "outbound NAT: packets leave with the host's address"),
                (["-s", "127.0.0.0/8", "-o", bridge], "connections from 127.0.0.1 get the bridge's address"),
                (["-s", subnet, "-o", bridge, "-m", "conntrack", "--ctstate", "DNAT"],
                 "a container reaching another through a published port"),
            ):
                self._iptables("-A", "POSTROUTING",
                               [*rule, "-m", "comment", "--comment", tag, "-j", "MASQUERADE"], what)

    def _nft(self, lines: list[str], what: str) -> str:
        script = "\n".join(lines) + "\n"
        shell = self._exec("nft", "-f", "-") + " <<'EOF'\n" + script + "EOF"
        return self._run(["nft", "-f", "-"], shell, what, input=script)

    def _iptables(self, verb: str, chain: str, words: list[str], what: str, table: str = "nat") -> None:
        argv = ["iptables", "-w", "-t", table, verb, chain, *words]
        self._run(argv, self._exec(*argv), what)

    def _allow_forwarding(self) -> None:
        """A host whose iptables FORWARD policy is DROP (any host with Docker on it) drops what the bridge
        sends out even with forwarding on, and an nft accept elsewhere cannot overrule a drop; so, there
        only, two ACCEPT rules go first in that chain, as Docker's own do (iptables-extensions(8))."""
        if shutil.which("iptables") is None:
            return
        policy = in_netns(self.host_path, lambda: subprocess.run(
            ["iptables", "-w", "-t", "filter", "-S", "FORWARD"], capture_output=True, text=True,
            timeout=_TIMEOUT)).stdout.splitlines()
        if not policy or policy[0].split() != ["-P", "FORWARD", "DROP"]:
            return
        tag = self._tag_bridge(self.bridge)
        for direction, what in (("-i", "let the containers' packets through the FORWARD chain"),
                                ("-o", "and the answers to them")):
            self._iptables("-I", "FORWARD", [direction, self.bridge, "-m", "comment", "--comment", tag,
                                             "-j", "ACCEPT"], what, table="filter")

    def _remove_bridge_if_unused(self, state: dict, bridge: str) -> bool:
        """Remove ``bridge``, its NAT and (with the last bridge) the nft table and the forwarding this
        host had before, once no container is on it."""
        if bridge not in state["bridges"] or any(entry["bridge"] == bridge
                                                 for entry in state["containers"].values()):
            return False
        if self.host_netns and not os.path.exists(self.host_path):
            state["bridges"].pop(bridge)  # the stand-in host is gone, and everything in it
            return True
        self._delete_rules(self._tag_bridge(bridge), self._firewall_of(state, bridge), bridge=bridge)
        self._delete_host_link(bridge)
        state["bridges"].pop(bridge)
        if not state["bridges"] and "ip_forward_was" in state:
            old = state.pop("ip_forward_was")
            if self._sysctl(FORWARD) != old:
                self._sysctl(FORWARD, old, "put IPv4 forwarding back as it was before stages")
        return True

    def _firewall_of(self, state: dict, bridge: str) -> str:
        """The firewall the rules of ``bridge`` went to (the one a later manager would pick may differ)."""
        return state["bridges"].get(bridge, {}).get("firewall") or self.firewall

    def _delete_rules(self, tag: str, firewall: str, bridge: str | None = None) -> None:
        """Delete every firewall rule whose comment is ``tag`` (with ``bridge``: also its nft chains,
        and the table once it has no chains left)."""
        if firewall == "nft":
            listing = in_netns(self.host_path, lambda: subprocess.run(
                ["nft", "-j", "-a", "list", "table", "ip", NFT_TABLE], capture_output=True, text=True,
                timeout=_TIMEOUT))
            # No table (returncode 1): nothing of ours is there.
            items = json.loads(listing.stdout or "{}").get("nftables", []) if listing.returncode == 0 else []
            chains = [item["chain"]["name"] for item in items if "chain" in item]
            lines = [f"delete rule ip {NFT_TABLE} {item['rule']['chain']} handle {item['rule']['handle']}"
                     for item in items if "rule" in item and item["rule"].get("comment") == tag]
            if bridge is not None:
                mine = [chain for chain in chains if chain.startswith(f"{bridge}_")]
                lines += [f"flush chain ip {NFT_TABLE} {chain}" for chain in mine]
                lines += [f"delete chain ip {NFT_TABLE} {chain}" for chain in mine]
                if mine and len(mine) == len(chains):
                    lines = [f"delete table ip {NFT_TABLE}"]  # ours only: the table goes with them
            if lines:
                self._nft(lines, f"remove the firewall rules tagged {tag}")
        tables = ["nat", "filter"] if firewall == "iptables" else ["filter"] if bridge is not None else []
        if tables and shutil.which("iptables"):
            # iptables for NAT, or (with nft too) the FORWARD rules of _allow_forwarding.
            for table in tables:
                listing = in_netns(self.host_path, lambda table=table: subprocess.run(
                    ["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True, timeout=_TIMEOUT))
                for line in listing.stdout.splitlines():
                    words = shlex.split(line)
                    if words[:1] == ["-A"] and tag in words:
                        self._iptables("-D", words[1], words[2:], f"remove a rule tagged {tag}", table=table)

    # -- published ports ---------------------------------------------------------------------------
    def publish(self, container_id: str, host_port: int, container_port: int, proto: str = "tcp") -> str:
        """Publish ``container_port`` of the container as ``host_port`` of the host: DNAT in PREROUTING
        (connections from other hosts and namespaces) and in OUTPUT (the host's own, 127.0.0.1 too).
        Returns ``"HOST_PORT -> ADDRESS:PORT"``. A host port published already, by any container, is
        refused."""
        check_container_id(container_id)
        _check_port(host_port)
        _check_port(container_port)
        if proto not in ("tcp", "udp"):
            raise NetworkError(f"{proto!r} is not a protocol that has ports", "use 'tcp' or 'udp'")
        with self._locked() as state:
            entry = state["containers"].get(container_id)
            if entry is None or entry["veth_host"] is None:
                raise NetworkError(f"container {container_id} is not attached to the network",
                                   "attach it first (publish needs its address)")
            for owner, other in state["containers"].items():
                for published, _, other_proto in other["ports"]:
                    if published == host_port and other_proto == proto:
                        raise NetworkError(f"port {host_port}/{proto} is published already, by {owner}",
                                           "choose another host port, or stop that container first")
            destination = f"{ipaddress.IPv4Interface(entry['address']).ip}:{container_port}"
            tag = f"{TAG}container:{container_id}"
            bridge = entry["bridge"]
            what = f"publish port {host_port}/{proto}: connections to it go to {destination}"
            port = [host_port, container_port, proto]
            entry["ports"].append(port)
            self._save(state)  # written down first: a runtime killed halfway leaves rules prune() finds
            try:
                self._add_port_rules(state, bridge, tag, proto, host_port, destination, what)
            except BaseException:
                entry["ports"].remove(port)
                raise
            return f"{host_port} -> {destination}"

    def _add_port_rules(self, state: dict, bridge: str, tag: str, proto: str, host_port: int,
                        destination: str, what: str) -> None:
        """DNAT in PREROUTING and OUTPUT, tagged with ``tag``."""
        if self._firewall_of(state, bridge) == "nft":
            rule = f'fib daddr type local {proto} dport {host_port} dnat to {destination} comment "{tag}"'
            self._nft([f"add rule ip {NFT_TABLE} {bridge}_prerouting {rule}",
                       f"add rule ip {NFT_TABLE} {bridge}_output {rule}"], what)
        else:
            words = ["-p", proto, "--dport", str(host_port), "-m", "addrtype", "--dst-type", "LOCAL",
                     "-m", "comment", "--comment", tag, "-j", "DNAT", "--to-destination", destination]
            self._iptables("-A", "PREROUTING", words, what)
            try:
                self._iptables("-A", "OUTPUT", words, "the host's own connections to it too")
            except BaseException:
                with contextlib.suppress(StagesError):
                    self._iptables("-D", "PREROUTING", words, "undo the half-published port")
                raise

    # -- detach and prune --------------------------------------------------------------------------
    def detach(self, container_id: str) -> bool:
        """Remove the container's veth (deleting the host end removes the pair), its published ports and
        its address; the bridge and its NAT go with the last container. Returns whether it was attached.
        Safe after the container died."""
        check_container_id(container_id)
        with self._locked() as state:
            return self._detach(state, container_id)

    def _detach(self, state: dict, container_id: str) -> bool:
        entry = state["containers"].get(container_id)
        if entry is None:
            return False
        host_there = self.host_netns is None or os.path.exists(self.host_path)
        if host_there:
            if entry["ports"]:
                firewall = self._firewall_of(state, entry["bridge"])
                self._delete_rules(f"{TAG}container:{container_id}", firewall)
            if entry["veth_host"]:
                self._delete_host_link(entry["veth_host"])
        state["containers"].pop(container_id)
        self._remove_bridge_if_unused(state, entry["bridge"])
        return True

    def prune(self, live_ids: Iterable[str]) -> list[str]:
        """Remove everything of the containers not in ``live_ids`` (after the runtime was killed, say):
        their veths, rules and addresses, then bridges nobody is on. Returns the ids removed.

        ``live_ids`` must name every container that exists, including one being created right now:
        prune cannot tell a container that is starting from one that is gone."""
        live = set(live_ids)
        try:
            with self._locked() as state:
                gone = sorted(cid for cid in state["containers"] if cid not in live)
                for container_id in gone:
                    self._detach(state, container_id)
                for bridge in list(state["bridges"]):
                    self._remove_bridge_if_unused(state, bridge)
        except _DamagedStateError:
            self._prune_by_names(live)
            return []
        return gone

    def _prune_by_names(self, live: set[str]) -> None:
        """prune() when the state file is damaged: find what it described by name. The veths on our
        bridge (if none of them is a living container's), then the bridge, its nft chains (the table
        with the last of them) and its tagged iptables rules. The damaged file is kept beside, renamed:
        what it said about the host's forwarding before stages (``ip_forward_was``) is lost with it."""
        if self.host_netns and not os.path.exists(self.host_path):
            return  # the stand-in host is gone, and everything in it
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.state_file.exists():
                return  # another prune did it meanwhile
            with _rtnetlink(self.host_path) as ipr:
                bridges = ipr.link_lookup(ifname=self.bridge)
                on_bridge = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                             if bridges and link.get_attr("IFLA_MASTER") == bridges[0]]
                living = sorted({veth_name(cid) for cid in live if _CONTAINER_ID.match(cid)} & set(on_bridge))
                if living:
                    raise NetworkError(f"{self.state_file} is damaged, and containers are still on the "
                                       f"bridge {self.bridge} ({', '.join(living)})",
                                       "remove them (stages rm -f), then prune again")
                for name in on_bridge:
                    self._delete_link(ipr, name)
            self._delete_rules(self._tag_bridge(self.bridge), self.firewall, bridge=self.bridge)
            if bridges:
                self._delete_host_link(self.bridge)
            kept = self.state_file.with_name(self.state_file.name + ".damaged")
            os.replace(self.state_file, kept)
            self.notes.append(f"{self.state_file} was damaged: removed by name the bridge {self.bridge}, "
                              f"{len(on_bridge)} veth(s) on it and its firewall rules; the file is kept as "
                              f"{kept.name}")


def _hint(code: int) -> str:
    if code in (errno.EPERM, errno.EACCES):
        return "network changes need root (CAP_NET_ADMIN): run it as root inside the workshop VM"
    if code == errno.EEXIST:
        return "something with that name or address exists already: detach the old container, or prune"
    if code in (errno.ENODEV, errno.ESRCH, errno.ENOENT):
        return "the device or the container's process is gone: start the container again"
    return "see ip-link(8) and rtnetlink(7)"
