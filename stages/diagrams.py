"""Pictures drawn from what the kernel reports now: namespaces, mount trees, the network, overlay layers.

Each function reads live state (``/proc/PID/ns``, ``/proc/PID/mountinfo``, ``ip -j``, the nat table)
and returns a :class:`Diagram`: its ``nodes``, ``edges`` and ``facts`` are what was read, and it shows
itself as an SVG drawn by graphviz's ``dot`` in JupyterLab (``_repr_svg_``) and in the Sphinx docs
(myst-nb embeds SVG outputs). Without ``dot`` (Debian's ``graphviz`` package) it shows itself as text,
saying so: the facts are the same either way. Nothing here changes anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from stages import observe

NO_DOT = "(graphviz's dot is not installed, so this picture is text: apt-get install graphviz)"


@dataclass
class Diagram:
    """A graph read from the kernel: ``nodes`` (id -> label), ``edges`` (from, to, label), ``groups``
    (a cluster's label -> the ids in it) and ``facts`` (what it was drawn from, for a reader or a check)."""

    title: str
    nodes: dict[str, str] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    styles: dict[str, str] = field(default_factory=dict)  # node id -> extra dot attributes
    facts: dict = field(default_factory=dict)
    direction: str = "LR"

    def node(self, node_id: str, label: str, group: str | None = None, style: str = "") -> str:
        self.nodes[node_id] = label
        if group is not None:
            self.groups.setdefault(group, []).append(node_id)
        if style:
            self.styles[node_id] = style
        return node_id

    def edge(self, tail: str, head: str, label: str = "") -> None:
        self.edges.append((tail, head, label))

    @property
    def source(self) -> str:
        """The graph in graphviz's DOT language."""
        lines = [f"digraph {_quote(self.title)} {{", f"  rankdir={self.direction};",
                 f"  label={_quote(self.title)}; labelloc=t; fontname=Helvetica;",
                 "  node [shape=box, style=rounded, fontname=Helvetica, fontsize=10];",
                 "  edge [fontname=Helvetica, fontsize=9];"]
        grouped = set()
        for number, (group, ids) in enumerate(self.groups.items()):
            lines.append(f"  subgraph cluster_{number} {{ label={_quote(group)}; style=dashed;")
            for node_id in ids:
                lines.append(f"    {self._node_line(node_id)}")
                grouped.add(node_id)
            lines.append("  }")
        for node_id in self.nodes:
            if node_id not in grouped:
                lines.append(f"  {self._node_line(node_id)}")
        for tail, head, label in self.edges:
            attributes = f" [label={_quote(label)}]" if label else ""
            lines.append(f"  {_quote(tail)} -> {_quote(head)}{attributes};")
        lines.append("}")
        return "\n".join(lines)

    def _node_line(self, node_id: str) -> str:
        extra = f", {self.styles[node_id]}" if node_id in self.styles else ""
        return f"{_quote(node_id)} [label={_quote(self.nodes[node_id])}{extra}];"

    def svg(self) -> str | None:
        """The picture as SVG text, or None when graphviz's ``dot`` is not installed."""
        if shutil.which("dot") is None:
            return None
        try:
            import graphviz
        except ImportError:  # the Python package is optional: dot itself is enough
            result = subprocess.run(["dot", "-Tsvg"], input=self.source, capture_output=True, text=True,
                                    timeout=30)
            return result.stdout if result.returncode == 0 else None
        try:
            return graphviz.Source(self.source).pipe(format="svg", encoding="utf-8")
        except (graphviz.ExecutableNotFound, graphviz.CalledProcessError):
            return None

    def _repr_svg_(self) -> str | None:
        # Jupyter and myst-nb call this; None makes them fall back to the text below
        return self.svg()

    def text(self) -> str:
        """The same graph as text: each group's nodes, then the edges."""
        lines = [self.title]
        grouped = {node_id for ids in self.groups.values() for node_id in ids}
        for group, ids in self.groups.items():
            lines.append(f"  [{group}]")
            lines += [f"    {self.nodes[node_id]}".replace("\n", " ") for node_id in ids]
        lines += [f"  {self.nodes[n]}".replace("\n", " ") for n in self.nodes if n not in grouped]
        for tail, head, label in self.edges:
            arrow = f" -{label}->" if label else " ->"
            lines.append(f"  {self.nodes[tail].splitlines()[0]}{arrow} {self.nodes[head].splitlines()[0]}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def _repr_pretty_(self, printer, cycle) -> None:
        # the text/plain output beside the SVG; it says why when there is no SVG
        printer.text(self.text() if shutil.which("dot") else NO_DOT + "\n" + self.text())


def _quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# == namespaces ====================================================================================
def namespaces(pid: int | str, other: int | str = "self", *, names: tuple[str, str] | None = None) -> Diagram:
    """The namespaces of two processes (the isolate ``pid`` and ``other``, by default the caller, the
    host): one node per namespace, by its inode in ``/proc/PID/ns`` (namespaces(7)). A namespace both
    share is one node with two edges; one of its own is a node of its own, drawn filled."""
    left, right = names or (f"host (pid {os.getpid() if other == 'self' else other})", f"isolate (pid {pid})")
    host, inside = observe.namespace_inodes(other), observe.namespace_inodes(pid)
    diagram = Diagram(f"namespaces: {left} and {right}", direction="TB")  # wide, not tall: one row
    diagram.node("left", left, style="shape=ellipse")
    diagram.node("right", right, style="shape=ellipse")
    shared, own = [], []
    for name in host:
        if name not in inside:
            continue
        if host[name] == inside[name]:
            node = diagram.node(f"shared-{name}", f"{name}\n{host[name]}", group="shared")
            diagram.edge("left", node)
            diagram.edge("right", node)
            shared.append(name)
        else:
            diagram.edge("left", diagram.node(f"host-{name}", f"{name}\n{host[name]}", group=left))
            diagram.edge("right", diagram.node(f"own-{name}", f"{name}\n{inside[name]}", group="its own",
                                               style="style=\"rounded,filled\", fillcolor=lightblue"))
            own.append(name)
    diagram.facts = {"host": host, "isolate": inside, "shared": shared, "own": own}
    return diagram


# == mounts ========================================================================================
def mount_tree(pid: int | str = "self", *, under: str | None = None, limit: int = 40) -> Diagram:
    """The mount tree of ``pid``'s mount namespace, from ``/proc/PID/mountinfo`` (proc(5)): one node per
    mount (its mount point, type and propagation), an edge from each parent mount to its children.

    ``under`` keeps the mount that holds that path and the mounts below it, with the mounts above them
    (the host's table is long); mounts left out are counted in one node; at most ``limit`` are drawn."""
    table = observe.mounts(pid)
    by_id = {mount.mount_id: mount for mount in table}
    keep: dict[int, observe.Mount] = {}
    def inside(target: str, top: str) -> bool:
        return target == top or target.startswith(top.rstrip("/") + "/")

    # the path's own filesystem too: the last-mounted of the mounts whose mount point holds it
    holding = max((m for m in table if under is not None and inside(under, m.target)),
                  key=lambda m: (len(m.target), table.index(m)), default=None)
    for mount in table:
        if under is None or inside(mount.target, under) or mount is holding:
            parent = mount
            while parent is not None and parent.mount_id not in keep:  # with every mount above it
                keep[parent.mount_id] = parent
                parent = by_id.get(parent.parent_id) if parent.parent_id != parent.mount_id else None
    chosen = [mount for mount in table if mount.mount_id in keep][:limit]
    diagram = Diagram(f"mount tree of pid {pid}" + (f" (at and below {under})" if under else ""),
                      direction="TB")
    for mount in chosen:
        propagation = mount.propagation or "private"
        diagram.node(f"m{mount.mount_id}", f"{mount.target}\n{mount.fstype}  {propagation}",
                     style="style=\"rounded,filled\", fillcolor=lightyellow" if mount.target == "/" else "")
    ids = {mount.mount_id for mount in chosen}
    for mount in chosen:
        if mount.parent_id in ids and mount.parent_id != mount.mount_id:
            diagram.edge(f"m{mount.parent_id}", f"m{mount.mount_id}")
    left_out = len(table) - len(chosen)
    if left_out:
        diagram.node("others", f"{left_out} more mounts\nnot drawn", style="style=dashed")
    diagram.facts = {"mounts": len(table), "drawn": [mount.target for mount in chosen], "left out": left_out,
                     "root": next((m.fstype for m in table if m.target == "/"), None)}
    return diagram


# == overlay =======================================================================================
def overlay(pid: int | str, target: str = "/") -> Diagram:
    """The layers of the overlay mounted on ``target`` in ``pid``'s mount namespace, from the mount's
    options in ``/proc/PID/mountinfo``: ``lowerdir=`` (the image's layers, topmost first, read-only),
    ``upperdir=`` (the container's writes) and the merged view (overlay(5))."""
    mount = next((m for m in reversed(observe.mounts(pid)) if m.target == target and m.fstype == "overlay"),
                 None)
    if mount is None:
        from stages.errors import StagesError

        raise StagesError(f"there is no overlay mounted on {target} in process {pid}'s mount namespace",
                          "look at /proc/PID/mountinfo: which filesystem is there?")
    options = dict(option.split("=", 1) for option in mount.super_options.split(",") if "=" in option)
    lower = [layer for layer in options.get("lowerdir", "").split(":") if layer]
    diagram = Diagram(f"overlay on {target} of pid {pid}", direction="BT")
    merged = diagram.node("merged", f"merged: {target}\n(what the process sees)",
                          style="style=\"rounded,filled\", fillcolor=lightyellow")
    if "upperdir" in options:
        diagram.edge(diagram.node("upper", f"upperdir (read-write)\n{options['upperdir']}",
                                  style="style=\"rounded,filled\", fillcolor=lightblue"), merged, "writes")
    previous = "upper" if "upperdir" in options else merged
    for number, layer in enumerate(lower):
        node = diagram.node(f"lower{number}", f"lowerdir {number + 1} (read-only)\n{layer}", group="image")
        diagram.edge(node, previous)
        previous = node
    diagram.facts = {"lowerdir": lower, "upperdir": options.get("upperdir"),
                     "workdir": options.get("workdir"), "mount_id": mount.mount_id}
    return diagram


# == network =======================================================================================
def _ip_json(prefix: list[str], *args: str) -> list[dict]:
    result = subprocess.run([*prefix, "ip", "-j", "-d", *args], capture_output=True, text=True, timeout=15)
    return json.loads(result.stdout or "[]") if result.returncode == 0 else []


def _nat_rules(prefix: list[str]) -> list[str]:
    """The nat table's rules that rewrite addresses (MASQUERADE, DNAT), as iptables-save or nft print them."""
    if shutil.which("iptables-save"):
        result = subprocess.run([*prefix, "iptables-save", "-t", "nat"], capture_output=True, text=True,
                                timeout=15)
        rules = [line for line in result.stdout.splitlines()
                 if line.startswith("-A") and ("MASQUERADE" in line or "DNAT" in line)]
        if rules:
            return rules
    if shutil.which("nft"):
        result = subprocess.run([*prefix, "nft", "list", "ruleset"], capture_output=True, text=True,
                                timeout=15)
        return [line.strip() for line in result.stdout.splitlines() if "masquerade" in line or "dnat" in line]
    return []


def _nat_label(rule: str) -> str:
    """An iptables-save rule shortened for a picture: its chain, its target and what it matches, without
    the match modules' names and the comment (``POSTROUTING: MASQUERADE -s 10.200.1.0/24 ! -o stgbr...``)."""
    import shlex

    try:
        words = shlex.split(rule)
    except ValueError:
        return rule[:60]
    if not words or words[0] != "-A":
        return rule[:60]  # nft's own syntax: as it is
    chain, kept, target = words[1], [], ""
    index = 2
    while index < len(words):
        word = words[index]
        if word in ("-m", "--comment") and index + 1 < len(words):
            index += 2
            continue
        if word == "-j" and index + 1 < len(words):
            target = words[index + 1]
            index += 2
            continue
        kept.append(word)
        index += 1
    text, lines = f"NAT {chain}: {target}", []
    for word in kept:
        if len(text) + len(word) > 40:
            lines.append(text)
            text = " "
        text += " " + word
    return "\n".join([*lines, text])


def network(pids: dict[str, int], *, host_netns: str | None = None) -> Diagram:
    """The network as the kernel has it: the devices of the host (or of the network namespace
    ``host_netns`` standing in for it) and of each isolate in ``pids`` (a label -> a pid in it), their
    addresses, which bridge each port is plugged into, which veth end is whose peer, and the NAT rules.

    Read with ``ip -j -d addr`` in each namespace (inside through ``nsenter --net``) and the nat table.
    """
    host_prefix = ["ip", "netns", "exec", host_netns] if host_netns else []
    host_label = f"host (netns {host_netns})" if host_netns else "host"
    spaces = {host_label: host_prefix}
    for label, pid in pids.items():
        spaces[label] = ["nsenter", f"--target={pid}", "--net", "--"]
    diagram = Diagram("network: devices, bridge, veth pairs, NAT")
    links: dict[str, list[dict]] = {}
    for label, prefix in spaces.items():
        links[label] = _ip_json(prefix, "addr")
        for link in links[label]:
            kind = link.get("linkinfo", {}).get("info_kind", "")
            addresses = [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                         if a.get("family") == "inet"]
            state = link.get("operstate", "")
            text = f"{link['ifname']}" + (f" ({kind})" if kind else "") + f"\n{state}"
            text += "".join(f"\n{address}" for address in addresses)
            style = "style=\"rounded,filled\", fillcolor=lightblue" if kind == "bridge" else ""
            diagram.node(f"{label}/{link['ifindex']}", text, group=label, style=style)
    host_links = links[host_label]
    by_name = {link["ifname"]: link for link in host_links}
    facts: dict = {"devices": {label: sorted(link["ifname"] for link in items)
                               for label, items in links.items()},
                   "addresses": {}, "veth pairs": [], "bridge ports": {}, "nat": _nat_rules(host_prefix)}
    for label, items in links.items():
        for link in items:
            facts["addresses"][f"{label}/{link['ifname']}"] = [
                f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                if a.get("family") == "inet"]
            master = link.get("master")
            if label == host_label and master in by_name:
                diagram.edge(f"{label}/{link['ifindex']}", f"{label}/{by_name[master]['ifindex']}", "port of")
                facts["bridge ports"].setdefault(master, []).append(link["ifname"])
            # an isolate's veth end names its peer by the peer's index in the other namespace (ip-link(8):
            # link_index, with link_netnsid saying the peer lives elsewhere)
            is_veth = link.get("linkinfo", {}).get("info_kind") == "veth"
            if label != host_label and is_veth and "link_index" in link:
                peer = next((h for h in host_links if h["ifindex"] == link["link_index"]), None)
                if peer is not None:
                    diagram.edge(f"{host_label}/{peer['ifindex']}", f"{label}/{link['ifindex']}", "veth pair")
                    facts["veth pairs"].append((peer["ifname"], f"{label}/{link['ifname']}"))
    for number, rule in enumerate(facts["nat"]):
        diagram.node(f"nat{number}", _nat_label(rule), group=host_label, style="shape=note")
    diagram.facts = facts
    return diagram
