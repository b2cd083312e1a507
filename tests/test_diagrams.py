"""stages.diagrams draws what the kernel reports: each test builds the real thing (an isolate, a pivot_root,
an overlay mount, a veth pair and a bridge with NAT) and checks the drawing's nodes and edges against what
/proc and `ip -j` say at that moment, not against a template."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from stages import diagrams, kernel, observe
from stages.errors import StagesError
from stages.isolate import Isolate, network

pytestmark = pytest.mark.root


def ns_inode(pid, proc_name):
    return os.stat(f"/proc/{pid}/ns/{proc_name}").st_ino


def test_namespaces_drawn_by_inode(busybox_rootfs):
    with Isolate(busybox_rootfs) as iso:
        iso.unshare("uts", "net")
        picture = diagrams.namespaces(iso.pid)
        # the facts are the inodes in /proc/PID/ns, read again here
        for name, (_, proc_name, _) in kernel.NAMESPACES.items():
            if os.path.exists(f"/proc/self/ns/{proc_name}"):
                assert picture.facts["isolate"][name] == ns_inode(iso.pid, proc_name)
                assert picture.facts["host"][name] == ns_inode(os.getpid(), proc_name)
        assert sorted(picture.facts["own"]) == ["net", "uts"]
        assert "mount" in picture.facts["shared"] and "pid" in picture.facts["shared"]
        # a namespace of its own is a node of its own, labelled with the isolate's inode, different from the
        # host's node; a shared one is one node with an edge from each side
        net_inside = ns_inode(iso.pid, "net")
        assert picture.nodes["own-net"] == f"net\n{net_inside}"
        assert picture.nodes["host-net"] == f"net\n{ns_inode(os.getpid(), 'net')}" != picture.nodes["own-net"]
        assert ("right", "own-net", "") in picture.edges and ("left", "host-net", "") in picture.edges
        assert {("left", "shared-mount", ""), ("right", "shared-mount", "")} <= set(picture.edges)
        assert str(net_inside) in picture.source


def test_mount_tree_before_and_after_pivot_root(busybox_rootfs):
    with Isolate(busybox_rootfs) as iso:
        iso.unshare("mount")
        before = diagrams.mount_tree(iso.pid, under=str(busybox_rootfs))
        table = observe.mounts(iso.pid)
        assert before.facts["mounts"] == len(table) > 1
        assert "/" in before.facts["drawn"] and before.facts["root"] != "overlay"
        iso.mount_proc()
        iso.pivot_root()
        after = diagrams.mount_tree(iso.pid)
        table = observe.mounts(iso.pid)
        # after pivot_root the whole table is the rootfs's few mounts: every one drawn, each edge a real
        # parent -> child pair of /proc/PID/mountinfo
        assert after.facts["left out"] == 0
        assert sorted(after.facts["drawn"]) == sorted(m.target for m in table)
        assert not any(target.startswith(str(busybox_rootfs)) for target in after.facts["drawn"])
        assert "/proc" in after.facts["drawn"]
        ids = {m.mount_id for m in table}
        pairs = {(f"m{m.parent_id}", f"m{m.mount_id}") for m in table if m.parent_id in ids}
        assert {(tail, head) for tail, head, _ in after.edges} == pairs
        assert len(after.facts["drawn"]) < before.facts["mounts"]


def test_overlay_layers_from_mountinfo(tmp_path):
    from stages.runtime import overlay

    layers = []
    for number in (1, 2):
        layer = tmp_path / f"layer{number}"
        layer.mkdir()
        (layer / f"from-{number}").write_text(str(number))
        layers.append(str(layer))
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for directory in (upper, work, merged):
        directory.mkdir()
    overlay.mount(layers, upper, work, merged)
    try:
        picture = diagrams.overlay("self", str(merged))
        line = next(m for m in observe.mounts() if m.target == str(merged))
        assert "lowerdir=" in line.super_options
        # lowerdir as the kernel lists it (topmost first), upperdir as mounted
        assert set(picture.facts["lowerdir"]) == set(layers)
        assert picture.facts["upperdir"] == str(upper)
        assert picture.facts["lowerdir"] == line.super_options.split("lowerdir=")[1].split(",")[0].split(":")
        assert ("upper", "merged", "writes") in picture.edges
        assert ("lower0", "upper", "") in picture.edges and ("lower1", "lower0", "") in picture.edges
        assert str(upper) in picture.source
    finally:
        kernel.umount(str(merged))
    with pytest.raises(StagesError) as error:
        diagrams.overlay("self", str(merged))
    assert "no overlay" in str(error.value)


@pytest.mark.net
def test_network_drawn_from_ip_json(busybox_rootfs, tmp_path, monkeypatch):
    monkeypatch.setenv("STAGES_RUN", str(tmp_path / "run"))
    with network.test_host() as host, Isolate(busybox_rootfs, name="dgm") as iso:
        iso.unshare("net")
        wiring = network.wire(iso.pid, name="dgm", host_netns=host)
        try:
            picture = diagrams.network({"isolate": iso.pid}, host_netns=host)
            host_label = f"host (netns {host})"
            links = json.loads(subprocess.run(["ip", "-n", host, "-j", "-d", "link"], capture_output=True,
                                              text=True, check=True).stdout)
            inside = json.loads(subprocess.run(["nsenter", f"--target={iso.pid}", "--net", "ip", "-j", "-d",
                                                "link"], capture_output=True, text=True, check=True).stdout)
            index = {link["ifname"]: link["ifindex"] for link in links}
            eth0 = next(link for link in inside if link["ifname"] == "eth0")
            # the veth edge joins the host end whose ifindex is eth0's link_index
            assert eth0["link_index"] == index[wiring.devices.host_veth]
            host_end, bridge = (f"{host_label}/{index[wiring.devices.host_veth]}",
                                f"{host_label}/{index[wiring.devices.bridge]}")
            assert (host_end, f"isolate/{eth0['ifindex']}", "veth pair") in picture.edges
            assert (host_end, bridge, "port of") in picture.edges
            addresses = picture.facts["addresses"]
            assert addresses["isolate/eth0"] == [str(wiring.address)]
            assert addresses[f"{host_label}/{wiring.devices.bridge}"] == [str(wiring.gateway)]
            assert any(str(wiring.subnet) in rule and "MASQUERADE" in rule.upper()
                       for rule in picture.facts["nat"])
            assert sorted(picture.facts["devices"]["isolate"]) == sorted(link["ifname"] for link in inside)
        finally:
            wiring.teardown()
    after = diagrams.namespaces("self")  # the caller against itself: everything shared, nothing its own
    assert after.facts["own"] == []


def test_svg_and_text_fallback(busybox_rootfs, monkeypatch):
    with Isolate(busybox_rootfs) as iso:
        iso.unshare("uts")
        picture = diagrams.namespaces(iso.pid)
    if shutil.which("dot"):
        svg = picture._repr_svg_()
        assert svg.lstrip().startswith("<?xml") or "<svg" in svg
        assert str(picture.facts["isolate"]["uts"]) in svg
    # without dot: no SVG (Jupyter and myst-nb fall back to text/plain), and the text says why
    monkeypatch.setenv("PATH", "/nonexistent")
    assert picture._repr_svg_() is None

    class Printer:
        out = ""

        def text(self, value):
            Printer.out += value

    picture._repr_pretty_(Printer(), False)
    assert diagrams.NO_DOT in Printer.out and str(picture.facts["isolate"]["uts"]) in Printer.out
