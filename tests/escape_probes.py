"""Escape probes: the doors from a container to the host, each tried from inside, none of them harmful.

Each :class:`Probe` is a busybox shell snippet that runs inside a jail, an isolate or a container and prints
one line, ``PROBE <name> OPEN|BLOCKED|ABSENT <what it saw>``: OPEN means the door to the host is open (it
read the host's disk, could write the host's kernel settings ...), BLOCKED that the kernel refused, ABSENT
that this kernel has no such door at all (no /proc/sysrq-trigger, no module support), so nothing was
proved either way. :func:`script` joins them into one ``sh -c`` script, :func:`results` reads its output.

They are written never to change the host: the raw-disk probe reads a loop device over a scratch file the
test made (:func:`host_targets`), core_pattern gets its own value written back, /sys and
/proc/sysrq-trigger and the host's tty1 are only *opened* for writing (a write(2) would be needed to act;
an open is what the kernel checks), the module probe offers the kernel a file that is no module, the
ptrace probe opens /proc/PID/mem of a sleeping process the test started (the kernel's ptrace access check,
PTRACE_MODE_ATTACH, proc(5)), and every node or directory a probe makes is removed again.

The stage-1 jail must run them with its own mount namespace (``stages jail --proc``): the mount probes
would otherwise mount on the host.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Directories a probe tries for a device node: /tmp may be nodev (stage 2's tmpfs), /dev or / may not.
_NODE_DIRECTORIES = "/tmp /dev /run /root /"


@dataclass(frozen=True)
class Targets:
    """What the test made on the host for the probes to find: a loop device over a file that starts with
    ``marker``, a sleeping process whose command line has ``marker``, a network device (a veth's end)."""

    marker: str
    loop_major: int
    loop_minor: int
    pid: int
    net_device: str


@dataclass(frozen=True)
class Probe:
    name: str
    door: str  # what an open door gives root inside
    body: str  # busybox sh; may use {marker} {loop_major} {loop_minor} {pid} {net_device}; calls say


PROBES = [
    Probe("raw_disk", "the host's disks: mknod of a block device, then read it", r"""
why="mknod refused everywhere"
for d in __NODE_DIRECTORIES__; do
  n="${d%/}/.probe-disk-$$"
  if mknod "$n" b {loop_major} {loop_minor} 2>/dev/null; then
    if head -c 64 "$n" 2>/dev/null | grep -q {marker}; then
      rm -f "$n"; say OPEN read the host file through "$n"; exit
    fi
    why=$(head -c 1 "$n" 2>&1 >/dev/null); rm -f "$n"
  fi
done
say BLOCKED "$why"
"""),
    Probe("host_tty", "the host's terminals: mknod c 4 1 (tty1), then open it for writing", r"""
why="mknod refused everywhere"
for d in __NODE_DIRECTORIES__; do
  n="${d%/}/.probe-tty-$$"
  if mknod "$n" c 4 1 2>/dev/null; then
    if why=$( (exec 3>>"$n") 2>&1 ); then rm -f "$n"; say OPEN opened the host\'s tty1 for writing; exit; fi
    rm -f "$n"
  fi
done
case "$why" in *"No such device"*) say ABSENT this kernel has no tty1: "$why";; *) say BLOCKED "$why";; esac
"""),
    Probe("core_pattern", "the host's kernel settings: /proc/sys/kernel/core_pattern runs a program as the "
          "host's root", r"""
v=$(cat /proc/sys/kernel/core_pattern) || { say BLOCKED cannot even read it; exit; }
if why=$( (printf '%s\n' "$v" > /proc/sys/kernel/core_pattern) 2>&1 ); then say OPEN wrote its own value back
else say BLOCKED "$why"; fi
"""),
    Probe("sys_write", "the host's devices and kernel through /sys", r"""
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys 2>/dev/null
f=
for c in /sys/kernel/profiling /sys/kernel/rcu_expedited /sys/kernel/uevent_helper /sys/power/state; do
  [ -e "$c" ] && { f=$c; break; }
done
[ -n "$f" ] || { say BLOCKED no /sys to write; exit; }
if why=$( (exec 3>>"$f") 2>&1 ); then say OPEN "$f" opened for writing; else say BLOCKED "$why"; fi
"""),
    Probe("sysrq", "/proc/sysrq-trigger: one letter reboots or crashes the host", r"""
f=/proc/sysrq-trigger
[ -e $f ] || { say ABSENT this kernel has no $f; exit; }
if why=$( (exec 3>>$f) 2>&1 ); then say OPEN $f opened for writing; else say BLOCKED "$why"; fi
"""),
    Probe("mount", "mount(2): a file system of one's own choosing, anywhere in the tree", r"""
d=/tmp/.probe-mount-$$
mkdir "$d" 2>/dev/null || d=/mnt
if why=$(mount -t tmpfs probe "$d" 2>&1); then umount "$d"; rmdir "$d" 2>/dev/null; say OPEN mounted a tmpfs
else rmdir "$d" 2>/dev/null; say BLOCKED "$why"; fi
"""),
    Probe("nested_userns", "a user namespace of one's own, whose root holds every capability again", r"""
if out=$(unshare -U -r sh -c 'grep ^CapEff: /proc/self/status' 2>&1); then
  case "$out" in *0000000000000000*) say BLOCKED no capability in it: "$out";; *) say OPEN "$out";; esac
else say BLOCKED "$out"; fi
"""),
    Probe("host_pids", "the host's processes: seen, signalled", r"""
if [ -r /proc/{pid}/cmdline ] && tr '\0' ' ' < /proc/{pid}/cmdline | grep -q {marker}; then
  say OPEN sees the host\'s process {pid}
else say BLOCKED no host process {pid} here; fi
"""),
    Probe("ptrace", "ptrace of a host process: its memory, its registers, its privileges", r"""
if [ -r /proc/{pid}/cmdline ] && tr '\0' ' ' < /proc/{pid}/cmdline | grep -q {marker}; then
  if why=$( (exec 3</proc/{pid}/mem) 2>&1 ); then say OPEN may attach to host process {pid}
  else say BLOCKED "$why"; fi
else say BLOCKED the host process {pid} is not visible; fi
"""),
    Probe("host_net", "the host's network devices", r"""
if grep -q '{net_device}:' /proc/net/dev; then say OPEN sees the host\'s {net_device}; else say BLOCKED; fi
"""),
    Probe("kernel_module", "init_module(2): code of one's own choosing in the host's kernel", r"""
[ -e /proc/modules ] || { say ABSENT this kernel loads no modules; exit; }
f=/tmp/.probe-module-$$.ko
printf 'this is not a kernel module' > "$f" 2>/dev/null || { f=/.probe-module-$$.ko; printf x > "$f"; }
out=$(insmod "$f" 2>&1); rm -f "$f"
case "$out" in
  *"not permitted"*|*"ermission denied"*) say BLOCKED "$out";;
  *) say OPEN the kernel read the file, past its permission check: "$out";;
esac
"""),
]

NAMES = [probe.name for probe in PROBES]
_LINE = re.compile(r"^PROBE (\S+) (OPEN|BLOCKED|ABSENT)\b ?(.*)$")


def script(targets: Targets, names: list[str] | None = None) -> str:
    """One ``sh -c`` script running the probes named (all by default), each in a subshell of its own."""
    parts = []
    for probe in PROBES:
        if names is not None and probe.name not in names:
            continue
        body = probe.body.replace("__NODE_DIRECTORIES__", _NODE_DIRECTORIES)
        for key in ("marker", "loop_major", "loop_minor", "pid", "net_device"):
            body = body.replace("{" + key + "}", str(getattr(targets, key)))  # not str.format: sh has braces
        parts.append(f"( say() {{ echo \"PROBE {probe.name} $*\"; }}\n{body.strip()}\n)")
    return "\n".join(parts) + "\n"


def results(output: str) -> dict[str, tuple[str, str]]:
    """``name -> (OPEN|BLOCKED|ABSENT, what it saw)`` from a script's output."""
    found = {}
    for line in output.splitlines():
        match = _LINE.match(line)
        if match:
            found[match.group(1)] = (match.group(2), match.group(3))
    return found


def verdicts(output: str) -> dict[str, str]:
    """``name -> OPEN|BLOCKED|ABSENT``, one for every probe (a probe that printed nothing is ``MISSING``)."""
    found = results(output)
    return {name: found.get(name, ("MISSING", ""))[0] for name in NAMES}


def host_lacks() -> dict[str, str]:
    """The probes whose door this kernel does not have at all, with why (they say ABSENT everywhere)."""
    lacks = {}
    if not os.path.exists("/proc/sysrq-trigger"):
        lacks["sysrq"] = "no /proc/sysrq-trigger (CONFIG_MAGIC_SYSRQ)"
    if not os.path.exists("/proc/modules"):
        lacks["kernel_module"] = "no module support (CONFIG_MODULES)"
    if not os.path.exists("/sys/class/tty/tty1"):
        lacks["host_tty"] = "no virtual console tty1 (CONFIG_VT)"
    return lacks


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout.strip()


@contextlib.contextmanager
def host_targets(directory: str | os.PathLike, netns: str | None = None) -> Iterator[Targets]:
    """Make what the probes look for, and remove it all afterwards: a scratch file behind a loop device
    (losetup(8)), a sleeping marker process, and a network device (a veth pair) in ``netns`` (a network
    namespace the test made, ``ip netns add``) or, without one, in the caller's own."""
    marker = f"stages-probe-{secrets.token_hex(4)}"
    disk = Path(directory) / "probe-disk.img"
    disk.write_bytes(marker.encode() + b"\n" + bytes(1 << 20))
    device = f"prb{secrets.token_hex(3)}"
    ip = ["ip"] + (["-n", netns] if netns else [])
    with contextlib.ExitStack() as undo:
        loop = _run(["losetup", "--find", "--show", str(disk)])
        undo.callback(subprocess.run, ["losetup", "--detach", loop], capture_output=True, timeout=30)
        number = os.stat(loop).st_rdev
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker])
        undo.callback(process.wait)
        undo.callback(process.kill)
        # a veth pair, both ends here (a dummy device would do, but not every kernel has the dummy driver)
        _run([*ip, "link", "add", device, "type", "veth", "peer", "name", device + "p"])
        undo.callback(subprocess.run, [*ip, "link", "del", device], capture_output=True, timeout=30)
        yield Targets(marker, os.major(number), os.minor(number), process.pid, device)
