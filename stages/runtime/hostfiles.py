"""A container's /etc/hosts, /etc/hostname and /etc/resolv.conf, written per container.

An image cannot know the name and the address its container will have, nor which name servers the host
uses today; so Docker and podman write these three files for every container, in the container's own
directory, and bind-mount each over the image's file (``docker inspect`` shows them as HostsPath,
HostnamePath, ResolvConfPath). The image is never changed, and every container gets its own copy::

    containers/ID/hosts        127.0.0.1 localhost ... and the container's own address and name
    containers/ID/hostname     its hostname (what hostname(1) says inside, as a file)
    containers/ID/resolv.conf  the host's name servers, unless they only answer on the host (127.x)

A bind mount of a file follows the file's inode (mount(2), MS_BIND): :func:`add_address` rewrites the
hosts file in place, once the bridge has given the container its address, and the container sees it.

The files are written here, in the container's directory, never into the image; the image's
``/etc/hosts`` (or ``/etc`` itself) is only the *target* of a bind mount, and a target is looked up
inside the rootfs by the OCI init (:class:`stages.rootfs.Root`). So an image whose ``/etc/resolv.conf``
is ``../run/resolv.conf`` (Debian's kind of link) gets the container's file at its own /run/resolv.conf,
and one whose ``/etc/hosts`` is a link to a host file (``/etc/hosts -> /tmp/victim``) is refused with a
sentence naming the link, before anything is bound over the host's file.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Where each file goes inside the container -> its name in the container's directory.
FILES = {"/etc/hosts": "hosts", "/etc/hostname": "hostname", "/etc/resolv.conf": "resolv.conf"}

LOCALHOST = ("127.0.0.1\tlocalhost\n"
             "::1\tlocalhost ip6-localhost ip6-loopback\n"
             "fe00::0\tip6-localnet\n"
             "ff00::0\tip6-mcastprefix\n"
             "ff02::1\tip6-allnodes\n"
             "ff02::2\tip6-allrouters\n")

#: The host's resolver configuration (resolv.conf(5)).
HOST_RESOLV_CONF = "/etc/resolv.conf"


def hosts_text(hostname: str, address: str | None = None) -> str:
    """hosts(5) for a container: localhost, and its own name on its address (127.0.1.1 without one, as
    Debian does for a machine with no fixed address)."""
    return LOCALHOST + f"{address or '127.0.1.1'}\t{hostname}\n"


def resolv_conf_text(network: str, host_file: str = HOST_RESOLV_CONF) -> str:
    """resolv.conf(5) for a container on ``network`` (none, bridge or host), from the host's file.

    A name server on 127.x (systemd-resolved's 127.0.0.53, dnsmasq) listens in the host's network
    namespace only: from a container's own namespace that address is the container's own loopback,
    where nobody answers. Such servers are left out, with a comment that says why; we run no DNS server
    on the bridge. With ``--network host`` the container shares the host's loopback, so they stay.
    """
    try:
        with open(host_file) as handle:
            lines = handle.read().splitlines()
    except OSError:
        lines = []
    kept, dropped = [], []
    for line in lines:
        words = line.split()
        if not words or words[0].startswith(("#", ";")):
            continue
        if words[0] == "nameserver" and len(words) > 1:
            local = words[1].startswith("127.") or words[1] == "::1"
            (dropped if local and network != "host" else kept).append(line)
        elif words[0] in ("search", "domain", "options"):
            kept.append(line)
    text = f"# written by stages for this container, from the host's {host_file}\n"
    if dropped:
        text += ("# left out: name servers on the host's own loopback, which a container's network\n"
                 "# namespace cannot reach: " + ", ".join(line.split()[1] for line in dropped) + "\n")
    if not any(line.split()[0] == "nameserver" for line in kept):
        text += "# no name server: names other than those in /etc/hosts do not resolve\n"
    return text + "".join(line + "\n" for line in kept)


def write(directory: str | os.PathLike, hostname: str, network: str) -> dict[str, str]:
    """Write the three files into ``directory``; returns inside path -> file on the host."""
    directory = Path(directory)
    texts = {"hosts": hosts_text(hostname), "hostname": hostname + "\n",
             "resolv.conf": resolv_conf_text(network)}
    if network == "host":
        # sharing the host's network means sharing its idea of who is where (as docker --network host)
        try:
            texts["hosts"] = Path("/etc/hosts").read_text() + f"127.0.1.1\t{hostname}\n"
        except OSError:
            pass
    paths = {}
    for inside, name in FILES.items():
        path = directory / name
        path.write_text(texts[name])
        path.chmod(0o644)
        paths[inside] = str(path)
    return paths


def add_address(directory: str | os.PathLike, hostname: str, address: str) -> None:
    """Put the container's own address in its hosts file, in place (same inode: the bind mount shows it)."""
    with open(Path(directory) / FILES["/etc/hosts"], "r+") as handle:
        handle.truncate(0)
        handle.write(hosts_text(hostname, address))


def mounts(paths: dict[str, str], volumes: list[dict]) -> list[dict]:
    """config.json bind mounts for the files; a volume the user put on one of them (or on /etc) wins."""
    taken = {volume["destination"].rstrip("/") for volume in volumes}
    return [{"destination": inside, "type": "bind", "source": source, "options": ["bind", "rprivate"]}
            for inside, source in paths.items() if inside not in taken and "/etc" not in taken]
