"""config.json: what the OCI runtime spec says a bundle holds, what we support, and a plan to execute it.

A *bundle* is a directory with a ``config.json`` and a root filesystem (the spec's bundle.md). The
configuration says which namespaces to make or join, what to mount, which limits to set and which
program to start (config.md, config-linux.md). :func:`load` reads it, checks every field we know and turns
it into a :class:`Plan`: plain data the container's first process can follow without deciding anything.

The spec says a runtime ignores properties it does not know, and refuses values it cannot honour. So a
field we know but do not implement (AppArmor, SELinux labels, Intel RDT ...) is refused *by its name*,
with a hint, rather than silently skipped: a container that quietly runs without its seccomp filter is
worse than one that does not start.

:func:`default_spec` writes a configuration like ``runc spec`` does, and :func:`write_bundle` puts it next
to a rootfs.
"""

from __future__ import annotations

import json
import os
import re
import resource
import stat
from dataclasses import asdict, dataclass, field

from stages import kernel
from stages.errors import LimitError, StagesError
from stages.isolate import filesystem

OCI_VERSION = "1.0.2"

#: The spec's namespace types and the learner's word for each (stages.kernel.NAMESPACES).
NAMESPACE_TYPES = {"pid": "pid", "network": "net", "mount": "mount", "ipc": "ipc", "uts": "uts",
                   "user": "user", "cgroup": "cgroup", "time": "time"}

# mount(8) option words -> (flags to set, flags to clear); the spec passes them as in fstab (config.md).
_FLAG_OPTIONS = {
    "ro": (kernel.MS_RDONLY, 0), "rw": (0, kernel.MS_RDONLY),
    "nosuid": (kernel.MS_NOSUID, 0), "suid": (0, kernel.MS_NOSUID),
    "nodev": (kernel.MS_NODEV, 0), "dev": (0, kernel.MS_NODEV),
    "noexec": (kernel.MS_NOEXEC, 0), "exec": (0, kernel.MS_NOEXEC),
    "sync": (16, 0), "async": (0, 16), "dirsync": (128, 0),
    "remount": (kernel.MS_REMOUNT, 0), "mand": (64, 0), "nomand": (0, 64),
    "atime": (0, kernel.MS_NOATIME), "noatime": (kernel.MS_NOATIME, 0),
    "diratime": (0, 2048), "nodiratime": (2048, 0),
    "relatime": (kernel.MS_RELATIME, 0), "norelatime": (0, kernel.MS_RELATIME),
    "strictatime": (1 << 24, 0), "nostrictatime": (0, 1 << 24),
    "bind": (kernel.MS_BIND, 0), "rbind": (kernel.MS_BIND | kernel.MS_REC, 0),
}
_MS_UNBINDABLE = 1 << 17
_PROPAGATION_OPTIONS = {
    "private": kernel.MS_PRIVATE, "rprivate": kernel.MS_PRIVATE | kernel.MS_REC,
    "shared": kernel.MS_SHARED, "rshared": kernel.MS_SHARED | kernel.MS_REC,
    "slave": kernel.MS_SLAVE, "rslave": kernel.MS_SLAVE | kernel.MS_REC,
    "unbindable": _MS_UNBINDABLE, "runbindable": _MS_UNBINDABLE | kernel.MS_REC,
}

#: Namespaced sysctls (the prefix) and the namespace each needs of its own (runc's validation, sysctl(8)).
_SYSCTL_NAMESPACES = {"net.": "net", "kernel.msg": "ipc", "kernel.sem": "ipc", "kernel.shm": "ipc",
                      "fs.mqueue.": "ipc", "kernel.hostname": "uts", "kernel.domainname": "uts"}

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")

#: The largest user or group ID: uid_t is 32 bits, and its last value, (uid_t) -1, is not an ID but
#: setresuid(2)'s "leave this one as it is" (credentials(7)).
MAX_ID = 4294967294

# Fields of config.json we know but do not implement: refused when set to anything but "empty".
_UNSUPPORTED = {
    "process.apparmorProfile": "AppArmor profiles are not applied by this runtime",
    "process.selinuxLabel": "SELinux labels are not applied by this runtime",
    "process.ioPriority": "I/O priorities are not set by this runtime",
    "process.scheduler": "scheduling policies are not set by this runtime",
    "process.execCPUAffinity": "CPU affinity is not set by this runtime",
    "process.user.username": "user names are for Windows containers",
    "linux.mountLabel": "SELinux mount labels are not applied by this runtime",
    "linux.personality": "execution domains (personality(2)) are not set by this runtime",
    "linux.intelRdt": "Intel RDT is not configured by this runtime",
    "linux.timeOffsets": "time namespace offsets are not set by this runtime",
    "linux.resources.blockIO.leafWeight": "block I/O leaf weights are not set by this runtime (cgroup v1's "
                                          "CFQ only; Linux removed CFQ in 5.0)",
    "linux.resources.blockIO.weightDevice": "per-device block I/O weights are not set by this runtime",
    "linux.resources.blockIO.throttleReadBpsDevice": "block I/O throttling is not set by this runtime",
    "linux.resources.blockIO.throttleWriteBpsDevice": "block I/O throttling is not set by this runtime",
    "linux.resources.blockIO.throttleReadIOPSDevice": "block I/O throttling is not set by this runtime",
    "linux.resources.blockIO.throttleWriteIOPSDevice": "block I/O throttling is not set by this runtime",
    "linux.resources.hugepageLimits": "huge page limits are not set by this runtime",
    "linux.resources.network": "network class IDs and priorities are not set by this runtime",
    "linux.resources.rdma": "RDMA limits are not set by this runtime",
    "linux.resources.unified": "raw cgroup v2 files are not written by this runtime",
    "linux.resources.cpu.idle": "SCHED_IDLE cgroups are not set by this runtime",
    "linux.resources.cpu.burst": "CPU burst is not set by this runtime; quota and period are",
    "linux.memoryPolicy": "NUMA memory policies (set_mempolicy(2)) are not set by this runtime",
    "linux.netDevices": "moving network devices into the container is not done by this runtime",
    "process.commandLine": "a command line as one string is for Windows containers; give process.args",
    "windows": "Windows containers are not run by this runtime",
    "solaris": "Solaris containers are not run by this runtime",
    "vm": "virtual-machine containers are not run by this runtime",
    "zos": "z/OS containers are not run by this runtime",
}


class SpecError(StagesError):
    """config.json holds a value this runtime cannot honour; the message names the field."""


def refuse(field_name: str, why: str, hint: str | None = None) -> SpecError:
    return SpecError(f"config.json: {field_name}: {why}",
                     hint or f"remove {field_name} from config.json, or use runc for this bundle")


# -- the plan -----------------------------------------------------------------------------------------
@dataclass
class Mount:
    """One mount(2) call, decided. ``target`` is where ``destination`` is on the host now, for the
    record; the init looks ``destination`` up again inside the rootfs when it mounts, never following a
    link out of it (:class:`stages.rootfs.Root`)."""

    destination: str
    target: str
    type: str | None
    source: str | None
    flags: int
    data: str | None
    propagation: int = 0
    bind: bool = False
    #: ``tmpcopyup`` (runc's option, which podman gives --tmpfs and --read-only's tmpfs): the new tmpfs
    #: starts with a copy of what the image has in the directory it covers
    copy_up: bool = False


@dataclass
class Process:
    """What to exec, as whom, with which privileges (config.md "process")."""

    args: list[str]
    env: dict[str, str]
    cwd: str
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)
    umask: int | None = None
    capabilities: dict[str, list[str]] | None = None  # set name -> capability words, None: keep them all
    rlimits: list[tuple[int, int, int, str]] = field(default_factory=list)  # resource, soft, hard, name
    no_new_privileges: bool = False
    oom_score_adj: int | None = None
    terminal: bool = False  # a new pseudo-terminal as stdin/stdout/stderr, its master to a console socket
    console_size: tuple[int, int] | None = None  # rows, columns (process.consoleSize height, width)
    #: what config.json asked for and the runtime leaves out, each said (config.md: a capability that
    #: cannot be mapped or granted is logged as a warning, not an error); the runtime logs them
    warnings: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """Everything the container's first process will do, as plain data (JSON in and out)."""

    bundle: str
    rootfs: str
    readonly: bool
    new_namespaces: list[str]  # the learner's words: "uts", "net" ...
    join_namespaces: list[tuple[str, str]]  # (word, /proc/.../ns/... path)
    uid_mappings: list[tuple[int, int, int]]
    gid_mappings: list[tuple[int, int, int]]
    hostname: str | None
    domainname: str | None
    mounts: list[Mount]
    rootfs_propagation: int
    masked_paths: list[str]
    readonly_paths: list[str]
    sysctl: dict[str, str]
    process: Process
    memory: int | None = None
    memory_swap: int | None = None
    cpus: float | None = None
    pids: int | None = None
    cgroups_path: str = ""
    #: the other linux.resources, checked: "memory.reservation", "memory.kernel", "memory.kernelTCP",
    #: "memory.swappiness", "memory.disableOOMKiller", "cpu.shares", "cpu.quota" and "cpu.period",
    #: "cpu.realtimeRuntime", "cpu.realtimePeriod", "cpu.cpus", "cpu.mems", "blockIO.weight" -> value
    resources: dict = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    seccomp: dict | None = None  # linux.seccomp compiled (stages.runtime.oci.seccomp), None: no filter
    devices: list[list] | None = None  # the device allowlist, in order (stages.runtime.oci.devices)
    hooks: dict[str, list[dict]] = field(default_factory=dict)  # kind -> hooks (stages.runtime.oci.hooks)
    #: linux.devices, checked: path, target (below the rootfs), type (c, b or p), major, minor, mode, uid, gid
    device_nodes: list[dict] = field(default_factory=list)
    #: not from config.json but from the caller (runc's --preserve-fds N): the program inherits the
    #: runtime's descriptors 3 .. 3+N-1 as they are (conmon's socket activation, podman run --preserve-fds)
    preserve_fds: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        data = dict(data)
        data["mounts"] = [Mount(**item) for item in data["mounts"]]
        data["process"] = Process(**data["process"])
        data["join_namespaces"] = [tuple(item) for item in data["join_namespaces"]]
        return cls(**data)

    @property
    def user_namespace(self) -> bool:
        """A new user namespace (whose maps the runtime writes)."""
        return "user" in self.new_namespaces

    @property
    def in_user_namespace(self) -> bool:
        """A user namespace other than the host's, new or joined: no mknod, sysfs borrowed ..."""
        return self.user_namespace or any(word == "user" for word, _ in self.join_namespaces)


# -- reading ------------------------------------------------------------------------------------------
def check_id(container_id: str) -> str:
    """A container ID: letters, digits and ``_ . + -``, at most 64 (it names a directory and a cgroup)."""
    if not isinstance(container_id, str) or not _ID.match(container_id):
        raise StagesError(f"{container_id!r} cannot be a container ID",
                          "use letters, digits, '_', '.', '+' and '-', at most 64, starting with a letter "
                          "or digit, for instance web-1")
    return container_id


def load(bundle: str | os.PathLike, *, seccomp_cache: str | None = None) -> tuple[dict, Plan]:
    """Read ``bundle/config.json``, check it, and return it with its :class:`Plan`. ``seccomp_cache``: a
    directory of compiled seccomp profiles (:func:`stages.runtime.oci.seccomp.compile_profile`)."""
    bundle = os.path.abspath(bundle)
    path = os.path.join(bundle, "config.json")
    try:
        with open(path) as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise StagesError(f"{bundle} is not an OCI bundle: it has no config.json",
                          "write one with stages.runtime.oci.default_spec() (or `runc spec`)") from None
    except ValueError as error:
        raise StagesError(f"{path} is not valid JSON: {error}", "fix the file, or write it again") from None
    if not isinstance(config, dict):
        raise refuse("(top level)", "must be a JSON object")
    return config, plan(config, bundle, seccomp_cache=seccomp_cache)


def _get(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _typed(value, kind, name: str, default=None):
    if value is None:
        return default
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        expected = {int: "a whole number", str: "a string", bool: "true or false", list: "a list",
                    dict: "an object"}.get(kind, str(kind))
        raise refuse(name, f"must be {expected}, not {json.dumps(value)}", f"correct {name} in config.json")
    return value


def plan(config: dict, bundle: str, *, seccomp_cache: str | None = None) -> Plan:
    """Check ``config`` (a parsed config.json of the bundle directory ``bundle``) and decide every step."""
    version = _typed(config.get("ociVersion"), str, "ociVersion")
    if not version or not version.startswith("1."):
        raise refuse("ociVersion", f"{version!r} is not a version 1 of the runtime spec",
                     f'set "ociVersion": "{OCI_VERSION}"')
    for name, why in _UNSUPPORTED.items():
        value = _get(config, name)
        if value is not None and value is not False and value not in ([], {}, ""):  # false asks for nothing
            raise refuse(name, why)
    if _get(config, "linux.resources.memory.useHierarchy") is False:
        raise refuse("linux.resources.memory.useHierarchy", "cannot be false: the kernel always accounts a "
                     "cgroup's memory to its parents (cgroup v2, and v1 since Linux 5.x)",
                     "leave useHierarchy out, or set it to true")
    linux = _typed(config.get("linux"), dict, "linux", {})

    root = _typed(config.get("root"), dict, "root")
    if not root or not root.get("path"):
        raise refuse("root.path", "is missing: the container needs a root filesystem",
                     'add "root": {"path": "rootfs"} with the rootfs directory beside config.json')
    rootfs = os.path.realpath(os.path.join(bundle, _typed(root["path"], str, "root.path")))
    if rootfs == "/":
        # pivot_root(2) into the host's own / would fail (EBUSY/EINVAL), and every mount "inside" the
        # rootfs would land on the host's directories
        through = "" if root["path"].rstrip("/") in ("", "/") else f" ({root['path']} leads there)"
        raise refuse("root.path", f"is the host's own root directory /{through}, not a root filesystem "
                     "of the container's", "give the directory of the container's rootfs, for instance "
                     '"rootfs" beside config.json, and make sure no symbolic link on the way leads to /')
    if not os.path.isdir(rootfs):
        raise refuse("root.path", f"{rootfs} is not a directory",
                     "build one there, for instance with stages.rootfs.build(path)")
    if not os.access(os.path.join(rootfs, "."), os.X_OK):
        raise refuse("root.path", f"{rootfs} cannot be entered")

    new, join = _namespaces(linux)
    if "mount" not in new:
        raise refuse("linux.namespaces", "must include a new mount namespace: this runtime pivots into the "
                     "rootfs, which would change the host's root without one", 'add {"type": "mount"}')
    uid_mappings = _mappings(linux, "uidMappings")
    gid_mappings = _mappings(linux, "gidMappings")
    joins_user = any(word == "user" for word, _ in join)
    if joins_user:
        # a joined user namespace has its maps already; given ones must match (checked once joined)
        if bool(uid_mappings) != bool(gid_mappings):
            raise refuse("linux.uidMappings", "give both linux.uidMappings and linux.gidMappings, or neither",
                         "leave both out: the joined user namespace has its mappings already")
    elif ("user" in new) != bool(uid_mappings and gid_mappings):
        raise refuse("linux.uidMappings" if "user" in new else "linux.namespaces",
                     "a new user namespace needs linux.uidMappings and linux.gidMappings, and mappings "
                     "need a new user namespace",
                     'give both, for instance [{"containerID": 0, "hostID": 100000, "size": 65536}], with '
                     '{"type": "user"} in linux.namespaces')

    if "user" in new or joins_user and uid_mappings:
        _check_reachable(rootfs, uid_mappings, gid_mappings)

    hostname = _typed(config.get("hostname"), str, "hostname")
    domainname = _typed(config.get("domainname"), str, "domainname")
    for name, value in (("hostname", hostname), ("domainname", domainname)):
        if value and not _owns(new, join, "uts"):
            raise refuse(name, "needs a UTS namespace of the container's own, or the host would be renamed",
                         'add {"type": "uts"} to linux.namespaces (new, or another container\'s by path)')

    mounts = [_mount(item, index, rootfs, bundle)
              for index, item in enumerate(_typed(config.get("mounts"), list, "mounts", []))]
    # any of the words: the init makes / recursively slave or private before it mounts anything, so that
    # even "shared" propagates only inside the container's mount namespace (stages.runtime.oci.process)
    propagation = _typed(linux.get("rootfsPropagation"), str, "linux.rootfsPropagation", "rprivate")
    if propagation not in _PROPAGATION_OPTIONS:
        raise refuse("linux.rootfsPropagation", f"{propagation!r} is not a propagation type",
                     f"use one of {', '.join(_PROPAGATION_OPTIONS)} (mount_namespaces(7))")

    sysctl = {str(k): str(v) for k, v in _typed(linux.get("sysctl"), dict, "linux.sysctl", {}).items()}
    for key in sysctl:
        if "/" in key or ".." in key:
            raise refuse(f"linux.sysctl[{key!r}]", "is not a sysctl name",
                         "write names like net.ipv4.ip_forward")
        needed = next((ns for prefix, ns in _SYSCTL_NAMESPACES.items() if key.startswith(prefix)), None)
        if needed is None:
            raise refuse(f"linux.sysctl[{key!r}]", "is not namespaced: setting it would change the host",
                         "set only net.*, kernel.msg*/sem*/shm*, fs.mqueue.* or kernel.hostname")
        if not _owns(new, join, needed):
            words = {v: k for k, v in NAMESPACE_TYPES.items()}
            raise refuse(f"linux.sysctl[{key!r}]",
                         f"needs a {words[needed]} namespace of the container's own",
                         f'add {{"type": "{words[needed]}"}} to linux.namespaces')

    def paths(name: str) -> list[str]:
        items = _typed(linux.get(name), list, f"linux.{name}", [])
        for item in items:
            if not isinstance(item, str) or not item.startswith("/"):
                raise refuse(f"linux.{name}", f"{item!r} is not an absolute path")
        return items

    result = Plan(
        bundle=bundle, rootfs=rootfs,
        readonly=bool(_typed(root.get("readonly"), bool, "root.readonly", False)),
        new_namespaces=new, join_namespaces=join, uid_mappings=uid_mappings, gid_mappings=gid_mappings,
        hostname=hostname, domainname=domainname, mounts=mounts,
        rootfs_propagation=_PROPAGATION_OPTIONS[propagation],
        masked_paths=paths("maskedPaths"), readonly_paths=paths("readonlyPaths"), sysctl=sysctl,
        process=_process(config, uid_mappings, gid_mappings),
        cgroups_path=_typed(linux.get("cgroupsPath"), str, "linux.cgroupsPath", ""),
        annotations={str(k): str(v) for k, v in
                     _typed(config.get("annotations"), dict, "annotations", {}).items()},
    )
    _resources(linux, result)
    result.seccomp = _seccomp(linux, seccomp_cache)
    from stages.runtime.oci import hooks

    result.hooks = hooks.parse(config.get("hooks"))
    result.device_nodes = _device_nodes(linux, rootfs)
    return result


def _device_nodes(linux: dict, rootfs: str) -> list[dict]:
    """linux.devices: the extra device nodes to make in the container (config-linux.md, "Devices")."""
    from stages.rootfs import resolve

    nodes = []
    for index, item in enumerate(_typed(linux.get("devices"), list, "linux.devices", [])):
        where = f"linux.devices[{index}]"
        _typed(item, dict, where)
        path = _typed(item.get("path"), str, f"{where}.path")
        if not path or not path.startswith("/") or ".." in path.split("/"):
            raise refuse(f"{where}.path", f"{path!r} must be an absolute path inside the container",
                         'for instance "/dev/fuse"')
        kind = _typed(item.get("type"), str, f"{where}.type")
        if kind not in ("c", "b", "u", "p"):
            raise refuse(f"{where}.type", f"{kind!r} is not a device type",
                         'use "c" (character), "b" (block), "u" (unbuffered character) or "p" (FIFO)')
        numbers = [_typed(item.get(name), int, f"{where}.{name}") for name in ("major", "minor")]
        if kind != "p" and (None in numbers or min(numbers) < 0):
            raise refuse(where, "a character or block device needs its major and minor numbers",
                         "look them up with ls -l on the host (for instance /dev/fuse is c 10 229)")
        mode = _typed(item.get("fileMode"), int, f"{where}.fileMode", 0o666)
        # podman (and runc's own libcontainer/devices) write st_mode whole: the file-type bits beside the
        # permissions (0o20666 for a character device, inode(7)). runc takes the permissions and checks
        # nothing else; we check that the type bits, if given, say what "type" says.
        file_type = stat.S_IFMT(mode)
        if mode < 0 or mode & ~0o177777 or (
                file_type and file_type != _DEVICE_TYPES["c" if kind == "u" else kind]):
            raise refuse(f"{where}.fileMode", f"{mode} ({oct(mode)}) is not a file mode for a device of type "
                         f"{kind!r}", "for instance 438 (0o666), or 8630 (0o20666: a character device)")
        mode &= 0o7777
        nodes.append({"path": path, "target": str(resolve(rootfs, path)),
                      "type": "c" if kind == "u" else kind, "major": numbers[0] or 0,
                      "minor": numbers[1] or 0, "mode": mode,
                      "uid": _typed(item.get("uid"), int, f"{where}.uid", 0),
                      "gid": _typed(item.get("gid"), int, f"{where}.gid", 0)})
    return nodes


#: linux.devices' type -> the file-type bits of st_mode (inode(7))
_DEVICE_TYPES = {"c": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}


def _seccomp(linux: dict, cache: str | None = None) -> dict | None:
    """linux.seccomp, checked field by field and compiled to its BPF program now, so that a profile this
    runtime cannot honour is refused at create (:mod:`stages.runtime.oci.seccomp`)."""
    profile = _typed(linux.get("seccomp"), dict, "linux.seccomp")
    if not profile:
        return None
    from stages.runtime.oci import seccomp

    return seccomp.compile_profile(profile, cache)


def _namespaces(linux: dict) -> tuple[list[str], list[tuple[str, str]]]:
    new: list[str] = []
    join: list[tuple[str, str]] = []
    for index, item in enumerate(_typed(linux.get("namespaces"), list, "linux.namespaces", [])):
        name = f"linux.namespaces[{index}]"
        _typed(item, dict, name)
        kind = item.get("type")
        if kind not in NAMESPACE_TYPES:
            raise refuse(f"{name}.type", f"{kind!r} is not a namespace type",
                         f"use one of {', '.join(NAMESPACE_TYPES)}")
        word = NAMESPACE_TYPES[kind]
        if word in new or word in (w for w, _ in join):
            raise refuse(name, f"the {kind} namespace is listed twice")
        if not kernel.namespace_available(word):
            raise refuse(name, f"this kernel has no {kind} namespaces")
        path = _typed(item.get("path"), str, f"{name}.path")
        if path:
            if word == "mount":
                # runc would set the rootfs up inside the joined namespace: pivot_root(2) there changes the
                # root of every process already in it (another container's, or the host's).
                raise refuse(f"{name}.path", "joining an existing mount namespace is not supported: this "
                             "runtime pivots into the rootfs in the container's mount namespace, which in a "
                             "joined one would change the root of every process already in it",
                             "let the container have a new mount namespace (drop the path); to run a "
                             "program in another container's namespaces, use exec")
            if not os.path.exists(path):
                raise refuse(f"{name}.path", f"{path} does not exist",
                             "give a namespace file such as /proc/PID/ns/net or /run/netns/NAME")
            join.append((word, path))
        else:
            new.append(word)
    return new, join


def _owns(new: list[str], join: list[tuple[str, str]], word: str) -> bool:
    """True if the container has a ``word`` namespace other than ours and the host's: a new one, or one
    joined by path that is neither (its inode differs, namespaces(7)), so that changing a hostname or a
    sysctl there changes neither this machine's nor the caller's."""
    if word in new:
        return True
    path = next((p for w, p in join if w == word), None)
    if path is None:
        return False
    proc = kernel.NAMESPACES[word][1]  # the file's name in /proc/PID/ns: "mnt" for mount
    try:
        joined = os.stat(path)
        others = [os.stat(f"/proc/self/ns/{proc}")]
    except OSError:
        return False
    try:
        others.append(os.stat(f"/proc/1/ns/{proc}"))
    except OSError:
        pass  # PID 1 is out of our reach (ptrace access mode, proc(5)): ours is the one we would change
    return all((joined.st_dev, joined.st_ino) != (other.st_dev, other.st_ino) for other in others)


def _host_id(mappings, inside: int) -> int | None:
    for start, host, size in mappings:
        if start <= inside < start + size:
            return host + inside - start
    return None


def _check_reachable(rootfs: str, uid_mappings, gid_mappings) -> None:
    """The init, root of the new user namespace, is a nobody on the host: it must be able to reach the
    rootfs (search permission on every directory above it, path_resolution(7))."""
    uid, gid = _host_id(uid_mappings, 0), _host_id(gid_mappings, 0)
    path = rootfs
    while True:
        info = os.stat(path)
        if info.st_uid == uid:
            allowed = info.st_mode & 0o100
        elif info.st_gid == gid:
            allowed = info.st_mode & 0o010
        else:
            allowed = info.st_mode & 0o001
        if not allowed:
            raise refuse("root.path", f"{path} cannot be entered by uid {uid}, which is root of the "
                         "container's user namespace", f"let others enter it (chmod o+x {path}), or keep "
                         "the bundle somewhere every user may reach")
        if path == "/":
            return
        path = os.path.dirname(path)


def _mappings(linux: dict, name: str) -> list[tuple[int, int, int]]:
    result = []
    for index, item in enumerate(_typed(linux.get(name), list, f"linux.{name}", [])):
        where = f"linux.{name}[{index}]"
        _typed(item, dict, where)
        numbers = tuple(_typed(item.get(key), int, f"{where}.{key}")
                        for key in ("containerID", "hostID", "size"))
        if any(number is None or number < 0 for number in numbers) or numbers[2] == 0:
            raise refuse(where, "needs containerID, hostID and size, whole numbers (size at least 1)")
        result.append(numbers)
    return result


def _mapped(mappings, number: int) -> bool:
    return any(inside <= number < inside + size for inside, _, size in mappings)


def parse_mount_options(options: list[str]) -> tuple[int, int, str | None]:
    """mount(8) words as ``(flags, propagation flags, data)``: ``["nosuid", "ro", "mode=755"]`` is
    ``(MS_NOSUID | MS_RDONLY, 0, "mode=755")``; words mount(2) does not know as flags become the data."""
    flags = 0
    propagation = 0
    data = []
    for word in options:
        if word in _FLAG_OPTIONS:
            add, clear = _FLAG_OPTIONS[word]
            flags = (flags | add) & ~clear
        elif word in _PROPAGATION_OPTIONS:
            propagation |= _PROPAGATION_OPTIONS[word]
        else:
            data.append(word)
    return flags, propagation, ",".join(data) or None


def _mount(item, index: int, rootfs: str, bundle: str) -> Mount:
    from stages.rootfs import resolve

    name = f"mounts[{index}]"
    _typed(item, dict, name)
    destination = _typed(item.get("destination"), str, f"{name}.destination")
    if not destination or not destination.startswith("/"):
        raise refuse(f"{name}.destination", f"{destination!r} must be an absolute path inside the container")
    options = _typed(item.get("options"), list, f"{name}.options", [])
    for word in options:
        _typed(word, str, f"{name}.options")
    for unsupported in ("idmap", "ridmap"):
        if unsupported in options:
            raise refuse(f"{name}.options", f"{unsupported!r} is not supported by this runtime")
    copy_up = "tmpcopyup" in options
    options = [word for word in options if word != "tmpcopyup"]  # ours, not mount(2)'s
    for field_name in ("uidMappings", "gidMappings"):
        if item.get(field_name):
            raise refuse(f"{name}.{field_name}",
                         "idmapped mounts (mount_setattr(2)) are not made by this runtime",
                         f"remove {name}.{field_name}, or map the files' owners in the rootfs itself")
    flags, propagation, data = parse_mount_options(options)
    kind = _typed(item.get("type"), str, f"{name}.type")
    source = _typed(item.get("source"), str, f"{name}.source")
    bind = bool(flags & kernel.MS_BIND) or kind == "bind"
    if bind:
        flags |= kernel.MS_BIND
        if not source:
            raise refuse(f"{name}.source", "a bind mount needs a source")
        # bind mount sources may be relative to the bundle (config.md, "mounts")
        source = os.path.normpath(os.path.join(bundle, source))
        if not os.path.exists(source):
            raise refuse(f"{name}.source", f"{source} does not exist", "create it, or fix the path")
        kind = None
    elif not kind:
        raise refuse(f"{name}.type", "is missing (proc, tmpfs, sysfs, devpts, mqueue ... or bind)")
    if copy_up and kind != "tmpfs":
        raise refuse(f"{name}.options", f"'tmpcopyup' copies a directory into a new tmpfs; this mount is "
                     f"{kind or 'a bind mount'}", "leave tmpcopyup out, or make it a tmpfs mount")
    return Mount(destination=destination, target=str(resolve(rootfs, destination)), type=kind, source=source,
                 flags=flags, data=data, propagation=propagation, bind=bind, copy_up=copy_up)


def _process(config: dict, uid_mappings, gid_mappings) -> Process:
    process = _typed(config.get("process"), dict, "process")
    if not process:
        raise refuse("process", "is missing: there is nothing to run", "add process.args, e.g. [\"sh\"]")
    args = _typed(process.get("args"), list, "process.args")
    if not args or not all(isinstance(a, str) for a in args):
        raise refuse("process.args", "must be a non-empty list of strings", 'for instance ["sh", "-c", "id"]')
    env = {}
    for entry in _typed(process.get("env"), list, "process.env", []):
        if not isinstance(entry, str) or "=" not in entry:
            raise refuse("process.env", f"{entry!r} is not NAME=value")
        key, _, value = entry.partition("=")
        env[key] = value
    cwd = _typed(process.get("cwd"), str, "process.cwd", "/")
    if not cwd.startswith("/"):
        raise refuse("process.cwd", f"{cwd!r} must be an absolute path", 'for instance "/"')
    user = _typed(process.get("user"), dict, "process.user", {})
    uid = _typed(user.get("uid"), int, "process.user.uid", 0)
    gid = _typed(user.get("gid"), int, "process.user.gid", 0)
    groups = _typed(user.get("additionalGids"), list, "process.user.additionalGids", [])
    for number in groups:
        _typed(number, int, "process.user.additionalGids")
    for name, number in [("process.user.uid", uid), ("process.user.gid", gid)] + \
            [("process.user.additionalGids", number) for number in groups]:
        if not 0 <= number <= MAX_ID:
            raise refuse(name, f"{number} is not a user or group ID: they run from 0 to {MAX_ID}, and "
                         f"{MAX_ID + 1} ((uid_t) -1) tells setresuid(2) and setresgid(2) to change nothing, "
                         "which would leave the process root", f"give an ID from 0 to {MAX_ID}")
    if uid_mappings:
        for name, number, mappings in [("process.user.uid", uid, uid_mappings),
                                       ("process.user.gid", gid, gid_mappings),
                                       ("linux.uidMappings", 0, uid_mappings),
                                       ("linux.gidMappings", 0, gid_mappings)] + \
                                      [("process.user.additionalGids", g, gid_mappings) for g in groups]:
            if not _mapped(mappings, number):
                raise refuse(name, f"ID {number} is not mapped into the user namespace",
                             "map it in linux.uidMappings/gidMappings (this runtime needs ID 0 mapped)")
    capabilities = None
    warnings: list[str] = []
    if process.get("capabilities") is not None:
        sets = _typed(process.get("capabilities"), dict, "process.capabilities")
        capabilities = {}
        last = kernel.last_capability()
        for name in ("bounding", "effective", "permitted", "inheritable", "ambient"):
            words = []
            for word in _typed(sets.get(name), list, f"process.capabilities.{name}", []):
                where = f"process.capabilities.{name}"
                if not isinstance(word, str):
                    raise refuse(where, f"{word!r} is not a capability name: each is a string",
                                 'use names from capabilities(7), like "CAP_CHOWN"')
                # config.md: "Any value which cannot be mapped to a relevant kernel interface, or cannot be
                # granted otherwise MUST be logged as a warning by the runtime. Runtimes SHOULD NOT fail
                # if the container configuration requests capabilities that cannot be granted" (runc
                # warns and leaves them out too): each such value is left out of its set, and said.
                try:
                    number = kernel.capability_number(word)
                except ValueError:
                    warnings.append(f"{where}: {word!r} is not a capability (capabilities(7)): left out")
                    continue
                if number > last:
                    warnings.append(f"{where}: {word} is newer than this kernel (its last capability is "
                                    f"number {last}, /proc/sys/kernel/cap_last_cap): left out")
                    continue
                if not uid_mappings and not kernel.in_bounding_set(kernel.CAPABILITIES[number]):
                    # Without a new user namespace the container's capabilities are drawn from ours, and
                    # one outside our bounding set no process of ours can ever gain (capabilities(7)).
                    warnings.append(f"{where}: {word} is not in this runtime's own bounding set, so it "
                                    "cannot be granted: left out")
                    continue
                if kernel.CAPABILITIES[number] not in words:
                    words.append(kernel.CAPABILITIES[number])
            capabilities[name] = words
    rlimits = []
    for index, item in enumerate(_typed(process.get("rlimits"), list, "process.rlimits", [])):
        where = f"process.rlimits[{index}]"
        _typed(item, dict, where)
        kind = _typed(item.get("type"), str, f"{where}.type", "")
        number = getattr(resource, kind, None) if kind.startswith("RLIMIT_") else None
        if number is None:
            raise refuse(f"{where}.type", f"{kind!r} is not a resource limit",
                         "see getrlimit(2): RLIMIT_NOFILE ...")
        soft = _typed(item.get("soft"), int, f"{where}.soft")
        hard = _typed(item.get("hard"), int, f"{where}.hard")
        if soft is None or hard is None or soft > hard:
            raise refuse(where, "needs soft and hard, with soft <= hard")
        _, current_hard = resource.getrlimit(number)
        # Raising a hard limit takes CAP_SYS_RESOURCE in the initial user namespace (setrlimit(2)): the
        # host's root has it (the workshop VM), the init of a new user namespace never does.
        if current_hard != resource.RLIM_INFINITY and hard > current_hard and (
                uid_mappings or not _holds_sys_resource()):
            raise LimitError(
                f"config.json: {where}: the hard limit {hard} of {kind} is above this machine's "
                f"{current_hard}, and raising a hard limit needs CAP_SYS_RESOURCE, which we do not hold",
                f"lower {where}.hard to at most {current_hard}")
        rlimits.append((number, soft, hard, kind))
    umask = _typed(user.get("umask"), int, "process.user.umask")
    oom = _typed(process.get("oomScoreAdj"), int, "process.oomScoreAdj")
    size = _typed(process.get("consoleSize"), dict, "process.consoleSize")
    console_size = None
    if size:
        console_size = (_typed(size.get("height"), int, "process.consoleSize.height", 0),
                        _typed(size.get("width"), int, "process.consoleSize.width", 0))
        if not all(0 <= number < 65536 for number in console_size):
            raise refuse("process.consoleSize", "height and width must be whole numbers from 0 to 65535")
    return Process(args=args, env=env, cwd=cwd, uid=uid, gid=gid, additional_gids=groups, umask=umask,
                   capabilities=capabilities, rlimits=rlimits,
                   no_new_privileges=bool(_typed(process.get("noNewPrivileges"), bool,
                                                 "process.noNewPrivileges", False)),
                   oom_score_adj=oom, console_size=console_size,
                   terminal=bool(_typed(process.get("terminal"), bool, "process.terminal")),
                   warnings=warnings)


def _holds_sys_resource() -> bool:
    return bool(kernel.capget()["effective"] >> kernel.capability_number("sys_resource") & 1)


def _resources(linux: dict, result: Plan) -> None:
    resources = _typed(linux.get("resources"), dict, "linux.resources", {})
    memory = _typed(resources.get("memory"), dict, "linux.resources.memory", {})
    limit = _typed(memory.get("limit"), int, "linux.resources.memory.limit")
    _no_negative(limit, "linux.resources.memory.limit", "bytes")
    if limit is not None and limit > 0:
        result.memory = limit
    swap = _typed(memory.get("swap"), int, "linux.resources.memory.swap")
    _no_negative(swap, "linux.resources.memory.swap", "bytes of RAM plus swap")
    if swap is not None and swap != 0:  # RAM plus swap (config-linux.md), -1: swap without limit
        if result.memory is None:
            raise refuse("linux.resources.memory.swap", "needs linux.resources.memory.limit beside it",
                         "give a memory limit, or leave swap out")
        if swap != -1 and swap < result.memory:
            raise refuse("linux.resources.memory.swap", f"{swap} is RAM plus swap, and cannot be less than "
                         f"the memory limit {result.memory}", "set swap to at least the limit, or to -1")
        result.memory_swap = swap
    cpu = _typed(resources.get("cpu"), dict, "linux.resources.cpu", {})
    quota = _typed(cpu.get("quota"), int, "linux.resources.cpu.quota")
    _no_negative(quota, "linux.resources.cpu.quota", "microseconds per period")
    period = _typed(cpu.get("period"), int, "linux.resources.cpu.period") or 100_000
    if period < 0:
        raise refuse("linux.resources.cpu.period", f"{period} is not a period: give microseconds, at least 1",
                     "for instance 100000 (the kernel's default, 100 ms)")
    if quota is not None and quota > 0 or cpu.get("period") is not None:
        # quota and period as given, not rounded to CPUs (the kernel takes 1 ms .. 1 s periods, cpu.max)
        if not 1_000 <= period <= 1_000_000:
            raise refuse("linux.resources.cpu.period", f"{period} us is outside the kernel's 1000 .. 1000000",
                         "for instance 100000 (the kernel's default, 100 ms)")
        if quota is not None and 0 < quota < 1_000:
            raise refuse("linux.resources.cpu.quota", f"{quota} us is below the kernel's smallest, 1000",
                         "give at least 1000 microseconds per period")
        result.resources["cpu.quota"] = quota if quota and quota > 0 else -1
        result.resources["cpu.period"] = period
        if quota and quota > 0:
            result.cpus = quota / period  # for the record and `stages ps`; the cgroup gets quota and period
    for key, kind, low, high in (("shares", int, 2, 262144), ("realtimeRuntime", int, -1, None),
                                 ("realtimePeriod", int, 1, None), ("cpus", str, None, None),
                                 ("mems", str, None, None)):
        value = _typed(cpu.get(key), kind, f"linux.resources.cpu.{key}")
        if value is None or value == "" or key == "shares" and value == 0:
            continue
        if kind is int and (low is not None and value < low or high is not None and value > high):
            raise refuse(f"linux.resources.cpu.{key}", f"{value} is outside {low} .. {high or 'any'}")
        if kind is str and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", value):
            raise refuse(f"linux.resources.cpu.{key}", f"{value!r} is not a list like 0-3,5 (cpuset(7))")
        result.resources[f"cpu.{key}"] = value
    for key, kind in (("reservation", int), ("kernel", int), ("kernelTCP", int), ("swappiness", int),
                      ("disableOOMKiller", bool)):
        value = _typed(memory.get(key), kind, f"linux.resources.memory.{key}")
        if value is None or value is False:
            continue
        if kind is int and key != "swappiness":
            _no_negative(value, f"linux.resources.memory.{key}", "bytes")
        if key == "swappiness" and not 0 <= value <= 100:
            raise refuse("linux.resources.memory.swappiness", f"{value} is outside 0 .. 100 (the kernel's)")
        result.resources[f"memory.{key}"] = value
    block_io = _typed(resources.get("blockIO"), dict, "linux.resources.blockIO", {})
    weight = _typed(block_io.get("weight"), int, "linux.resources.blockIO.weight")
    if weight:
        if not 10 <= weight <= 1000:
            raise refuse("linux.resources.blockIO.weight", f"{weight} is outside 10 .. 1000")
        result.resources["blockIO.weight"] = weight
    pids = _typed(resources.get("pids"), dict, "linux.resources.pids", {})
    pids_limit = _typed(pids.get("limit"), int, "linux.resources.pids.limit")
    _no_negative(pids_limit, "linux.resources.pids.limit", "processes")
    if pids_limit is not None and pids_limit > 0:
        result.pids = pids_limit
    from stages.runtime.oci import devices

    result.devices = devices.parse(resources.get("devices"), linux.get("devices"))


def _no_negative(value: int | None, name: str, unit: str) -> None:
    """A limit is a number of ``unit``, or -1 (no limit, config-linux.md); -5 is neither."""
    if value is not None and value < -1:
        raise refuse(name, f"{value} is not a limit: give a number of {unit}, or -1 for no limit",
                     f"correct {name} in config.json")


# -- writing ------------------------------------------------------------------------------------------
#: Files below /proc and /sys a container must not read (maskedPaths), as runc spec writes them, and those
#: it may read but not change (readonlyPaths): stage 2's lists (stages.isolate.filesystem), one copy.
MASKED_PATHS = filesystem.MASKED_PATHS
READONLY_PATHS = filesystem.READONLY_PATHS


DEFAULT_NAMESPACES = ("pid", "network", "ipc", "uts", "mount")


def default_spec(args: list[str] | None = None, *, rootfs: str = "rootfs", hostname: str = "stages",
                 readonly: bool = True, namespaces: tuple[str, ...] = DEFAULT_NAMESPACES,
                 capabilities: list[str] | None = None, env: list[str] | None = None) -> dict:
    """A config.json as ``runc spec`` writes it, for ``args`` (default ``["sh"]``).

    The capabilities default to stage 2's :data:`stages.isolate.privileges.DEFAULT_CAPS` (Docker's list),
    in every set; no_new_privs is on, the root is read-only, RLIMIT_NOFILE is 1024.
    """
    from stages.isolate.privileges import DEFAULT_CAPS

    caps = [f"CAP_{name.upper()}" for name in (DEFAULT_CAPS if capabilities is None else capabilities)]
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args or ["sh"]),
            "env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm",
                           "HOME=/root"],
            "cwd": "/",
            "capabilities": {name: list(caps) for name in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": readonly},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": kind} for kind in namespaces],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


#: The cgroup mount runc spec and Docker give every container: its own cgroups, read-only
CGROUP_MOUNT = {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}


def runc_spec(args: list[str] | None = None) -> dict:
    """The config.json ``runc spec`` writes (runc 1.1), field for field but ``ociVersion``: a terminal,
    three capabilities (ambient too), no HOME (the runtime takes it from /etc/passwd), hostname "runc",
    devpts with gid=5 (the tty group), the container's cgroups at /sys/fs/cgroup, and the device rule
    that denies every device but the spec's defaults. ``stages-oci spec`` writes it."""
    config = default_spec(args, hostname="runc", capabilities=["audit_write", "kill", "net_bind_service"],
                          env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                               "TERM=xterm"])
    process = config["process"]
    process["terminal"] = True
    process["capabilities"]["ambient"] = list(process["capabilities"]["bounding"])
    for mount in config["mounts"]:
        if mount["type"] == "devpts":
            mount["options"].append("gid=5")
    config["mounts"].append(json.loads(json.dumps(CGROUP_MOUNT)))
    config["linux"]["resources"] = {"devices": [{"allow": False, "access": "rwm"}]}
    return config


def write_bundle(directory: str | os.PathLike, config: dict) -> str:
    """Write ``config`` as ``directory/config.json`` (the rootfs goes beside it); returns the bundle path."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, ".config.json.tmp")
    with open(temporary, "w") as handle:
        json.dump(config, handle, indent=2)
    os.replace(temporary, os.path.join(directory, "config.json"))
    return directory
