"""``stages run``'s flags, turned into the config.json an OCI runtime executes.

Each flag is one field of the runtime spec (config.md, config-linux.md), as Docker's engine translates
them::

    -e K=V            process.env                       -w DIR        process.cwd
    -u UID[:GID]      process.user                      --hostname H  hostname
    -v HOST:CTR[:ro]  mounts (a bind mount, rbind/ro)   --read-only   root.readonly
    --memory 64M      linux.resources.memory.limit      --cpus 0.5    linux.resources.cpu.quota/period
    --pids-limit N    linux.resources.pids.limit        --network     linux.namespaces (network or not)
    --privileged      all capabilities, no seccomp, no device allowlist, /proc and /sys writable
    --security-opt seccomp=unconfined|FILE              linux.seccomp (none, or that profile)

And what no flag asks for, Docker's defaults, each closing a door (:func:`build_config`): a new namespace
of every kind but user; Docker's 14 capabilities; no_new_privs; the device allowlist
(``linux.resources.devices``: no device may be opened but null, zero, full, random, urandom, tty, ptmx,
the terminals and tun, so CAP_MKNOD cannot reach the host's disks); Docker's seccomp profile
(:mod:`stages.runtime.seccomp_profile`: no new namespaces, mount, kernel modules, keyring, clock ...);
/proc's dangerous files masked or read-only (``maskedPaths``, ``readonlyPaths``) and /sys read-only.

Bad values are refused here, before anything is created, with one sentence and a fix.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

from stages.errors import LimitError, StagesError

#: Where the init program is bound inside the container. Docker binds docker-init at /sbin/docker-init,
#: which makes an empty file there in the image's tree (or fails: /sbin may be a link, as in merged-/usr
#: images, or missing). Ours goes into the container's own /dev, the tmpfs the runtime mounts for it
#: (and which it fills with device nodes anyway): nothing is added to the user's files, a directory
#: listing of / shows nothing of it, and whatever the image holds at /dev is covered.
INIT_PATH = "/dev/.stages-init"
CPU_PERIOD = 100_000  # µs: the kernel's default CFS period (cgroups(7), cpu.cfs_period_us)
#: The largest user or group ID; 4294967295, (uid_t) -1, is setresuid(2)'s "no change" (credentials(7))
MAX_ID = 4294967294
HOST_NAME_MAX = 64  # sethostname(2) refuses a longer one (EINVAL)
# RFC 1123 host names: labels of letters, digits and '-', not starting or ending with '-', joined by '.'
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


@dataclass
class Options:
    """Everything ``stages run`` was asked for, as plain data (kept in the container's record)."""

    image: str
    command: list[str] = field(default_factory=list)
    name: str | None = None
    detach: bool = False
    remove: bool = False
    env: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    memory: str | None = None
    cpus: str | None = None
    pids_limit: int | None = None
    network: str = "bridge"
    publish: list[str] = field(default_factory=list)
    read_only: bool = False
    interactive: bool = False
    tty: bool = False
    init: bool = True
    privileged: bool = False
    security_opt: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_env(items: list[str]) -> list[str]:
    """``-e K=V`` (and ``-e K``, which takes K from our own environment, as Docker does)."""
    result = []
    for item in items:
        key, equals, value = item.partition("=")
        if not key or " " in key:
            raise StagesError(f"-e {item!r} does not name a variable", "write -e NAME=value")
        if not equals:
            if key not in os.environ:
                continue
            value = os.environ[key]
        result.append(f"{key}={value}")
    return result


def merge_env(image_env: list[str], ours: list[str]) -> list[str]:
    """The image's environment with ours on top (a later NAME= wins)."""
    merged: dict[str, str] = {}
    for item in list(image_env) + list(ours):
        key, _, value = item.partition("=")
        merged[key] = value
    merged.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return [f"{key}={value}" for key, value in merged.items()]


def parse_volume(text: str) -> dict:
    """``-v HOST:CTR[:ro|rw]`` as a config.json bind mount."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise StagesError(f"-v {text!r} is not HOST:CONTAINER[:ro]",
                          "write -v /path/on/host:/path/in/container, with :ro to make it read-only")
    host, inside = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise StagesError(f"-v {text!r}: {mode!r} is not ro or rw", "end it with :ro or :rw, or leave it off")
    if not os.path.isabs(host) or not os.path.isabs(inside):
        raise StagesError(f"-v {text!r}: both paths must be absolute", "write -v /host/dir:/container/dir")
    if os.path.normpath(inside) == "/":
        raise StagesError(f"-v {text!r}: a volume cannot be mounted on / (the container's root is its "
                          "image)", f"mount it on a directory, for instance -v {host}:/data")
    if not os.path.exists(host):
        raise StagesError(f"-v {text!r}: {host} does not exist on the host",
                          f"create it first: mkdir -p {host}")
    return {"destination": inside, "type": "bind", "source": os.path.realpath(host),
            "options": ["rbind", "rprivate", mode]}


def parse_user(text: str, rootfs: str | None = None) -> tuple[int, int]:
    """``-u UID[:GID]`` or ``-u NAME[:GROUP]`` (looked up in the rootfs' /etc/passwd and /etc/group)."""
    user, _, group = text.partition(":")

    def lookup(word: str, file: str, what: str) -> int:
        if word.isdigit():
            number = int(word)
            if number > MAX_ID:
                call = "setresuid" if what == "user" else "setresgid"
                raise StagesError(f"-u {text!r}: {word} is not a {what} ID: IDs run from 0 to {MAX_ID} "
                                  f"({MAX_ID + 1} is (uid_t) -1, which {call}(2) reads as \"no change\", "
                                  "so the command would stay root)",
                                  f"give a number from 0 to {MAX_ID}, e.g. -u 1000:1000")
            return number
        if rootfs:
            from stages.rootfs import resolve  # the image's /etc/passwd, never the host's through a link

            try:
                with open(resolve(rootfs, f"/etc/{file}")) as handle:
                    for line in handle:
                        fields = line.strip().split(":")
                        if len(fields) > 2 and fields[0] == word:
                            return int(fields[2])
            except (OSError, ValueError):
                pass
        raise StagesError(f"-u {text!r}: the image has no {what} {word!r}",
                          f"give a number instead, e.g. -u 1000:1000, or add the {what} to the image")

    uid = lookup(user, "passwd", "user")
    if group:
        return uid, lookup(group, "group", "group")
    # No group given: the user's primary group in the image's /etc/passwd, else 0 (root's group), as
    # Docker does (`docker run -u 1000` of an image without user 1000 runs as uid=1000 gid=0)
    return uid, _primary_group(uid, rootfs)


def _primary_group(uid: int, rootfs: str | None) -> int:
    """The GID field of ``uid``'s entry in the image's /etc/passwd (passwd(5)), or 0 without one."""
    if rootfs:
        from stages.rootfs import resolve

        try:
            with open(resolve(rootfs, "/etc/passwd")) as handle:
                for line in handle:
                    fields = line.strip().split(":")
                    if len(fields) > 3 and fields[2] == str(uid) and fields[3].isdigit():
                        return int(fields[3])
        except (OSError, ValueError):
            pass
    return 0


def parse_publish(text: str) -> tuple[int, int]:
    """``-p HOSTPORT:CTRPORT``."""
    host, colon, inside = text.partition(":")
    try:
        if not colon:
            raise ValueError
        ports = int(host), int(inside)
    except ValueError:
        raise StagesError(f"-p {text!r} is not HOSTPORT:CONTAINERPORT", "write -p 8080:80") from None
    if not all(0 < port < 65536 for port in ports):
        raise StagesError(f"-p {text!r}: a port is a number from 1 to 65535", "write -p 8080:80")
    return ports


def check(options: Options) -> dict:
    """Check every flag before anything is created; returns the parsed limits (bytes, CPUs, pids)."""
    from stages.isolate.cgroups import parse_cpus, parse_memory

    limits: dict = {}
    if options.memory is not None:
        limits["memory"] = parse_memory(options.memory)
    if options.cpus is not None:
        limits["cpus"] = parse_cpus(options.cpus)
    if options.pids_limit is not None:
        # pids.max counts the container's own processes only (the runtime's setup process leaves the
        # cgroup once the init is in, and the limit is set then, as runc does): the command, and before
        # it the container's init (PID 1, which reaps and forwards signals) when there is one. With
        # fewer, fork(2) fails with EAGAIN before the command runs.
        needed = 2 if options.init else 1
        if int(options.pids_limit) < needed:
            counted = ("the container's init (PID 1) and the command are two processes" if options.init
                       else "the command is one process")
            raise LimitError(f"--pids-limit {options.pids_limit} leaves no room for the command: {counted}",
                             f"give {needed} or more, for instance --pids-limit 20"
                             + (", or run the command as PID 1 itself with --no-init (then 1 will do)"
                                if options.init else ""))
        limits["pids"] = int(options.pids_limit)
    if options.hostname is not None:
        check_hostname(options.hostname)
    profile = parse_security_options(options)
    if profile is not None:
        limits["seccomp_profile"] = profile
    if options.network not in ("none", "bridge", "host"):
        raise StagesError(f"--network {options.network!r} is not a network mode",
                          "use --network bridge (the default), none or host")
    if options.publish and options.network != "bridge":
        raise StagesError(f"-p needs --network bridge, not {options.network}",
                          "leave --network out, or drop -p")
    given: dict[int, str] = {}
    for item in options.publish:
        host_port, container_port = parse_publish(item)
        if host_port in given:
            raise StagesError(f"host port {host_port} is given twice (-p {given[host_port]} -p {item}): one "
                              "host port leads to one container port",
                              f"give each -p its own host port, e.g. -p {host_port + 1}:{container_port}")
        given[host_port] = item
    for item in options.volumes:
        parse_volume(item)
    if options.workdir is not None and not os.path.isabs(options.workdir):
        raise StagesError(f"-w {options.workdir!r} is not an absolute path", "write -w /some/dir")
    parse_env(options.env)
    return limits


def check_hostname(name: str) -> str:
    """``--hostname``: at most 64 characters (HOST_NAME_MAX, sethostname(2)), an RFC 1123 host name."""
    if len(name) > HOST_NAME_MAX:
        raise StagesError(f"--hostname {name[:20]}... is {len(name)} characters long; the kernel keeps at "
                          f"most {HOST_NAME_MAX} (sethostname(2))",
                          "give a shorter name, e.g. --hostname web-1")
    if not _HOSTNAME.match(name):
        raise StagesError(f"--hostname {name!r} is not a host name: letters, digits and '-', in labels "
                          "joined by '.', each starting and ending with a letter or digit",
                          "for instance --hostname web-1 or --hostname db.example")
    return name


def parse_security_options(options: Options) -> dict | None:
    """``--security-opt seccomp=unconfined`` (no filter) or ``seccomp=FILE`` (a profile in Docker's
    format, or config.json's ``linux.seccomp``): the profile of a FILE, read and checked now (it is kept
    with the container, as Docker keeps it, so that a later change of the file changes nothing)."""
    profile = None
    for item in options.security_opt:
        key, equals, value = item.partition("=")
        if key != "seccomp" or not equals or not value:
            raise StagesError(f"--security-opt {item!r} is not an option this runtime knows",
                              "use --security-opt seccomp=unconfined, or seccomp=/path/to/profile.json")
        if value == "unconfined":
            profile = None
            continue
        from stages.runtime import seccomp_profile

        try:
            profile = seccomp_profile.load(value)
            resolved = seccomp_profile.resolve(profile, _capabilities(options)["bounding"])
        except seccomp_profile.ProfileError as error:
            raise StagesError(f"--security-opt seccomp={value}: the profile {error}",
                              "give a seccomp profile file (Docker's default.json is one), or "
                              "seccomp=unconfined") from None
        from stages.runtime.oci import seccomp

        try:
            seccomp.compile_profile(resolved)
        except StagesError as error:
            where = error.message.removeprefix("config.json: linux.seccomp").lstrip(".: ")
            raise StagesError(f"--security-opt seccomp={value}: {where}",
                              "correct the profile (its fields are config-linux.md's \"Seccomp\")") from None
    return profile


def turned_off(options: Options) -> str | None:
    """What ``--privileged`` or ``--security-opt`` took away from Docker's defaults, in a line for the
    step record (None: nothing)."""
    if options.privileged:
        return ("--privileged: every capability, no seccomp filter, no device allowlist (any device node "
                "opens), nothing of /proc masked or read-only, /sys writable")
    if _unconfined(options):
        return "--security-opt seccomp=unconfined: no seccomp filter"
    custom = [item for item in options.security_opt if item.startswith("seccomp=")]
    if custom:
        return f"--security-opt {custom[-1]}: that seccomp profile instead of Docker's"
    return None


def _unconfined(options: Options) -> bool:
    return options.privileged or any(item == "seccomp=unconfined" for item in options.security_opt)


def _capabilities(options: Options) -> dict[str, list[str]]:
    """The capability sets: Docker's 14 (:data:`stages.isolate.privileges.DEFAULT_CAPS`), or with
    ``--privileged`` every one this kernel has that we hold ourselves (a process cannot give what its
    bounding set lacks, capabilities(7); on a host's root that is all of them)."""
    from stages import kernel
    from stages.isolate.privileges import DEFAULT_CAPS

    names = DEFAULT_CAPS
    if options.privileged:
        ours = _bounding_set()
        names = [name for number, name in enumerate(kernel.CAPABILITIES[:kernel.last_capability() + 1])
                 if ours >> number & 1]
    caps = [f"CAP_{name.upper()}" for name in names]
    return {name: list(caps) for name in ("bounding", "effective", "permitted")}


def _bounding_set() -> int:
    """This process's capability bounding set, as a bit mask (CapBnd in /proc/self/status, proc(5))."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("CapBnd:"):
                return int(line.split()[1], 16)
    return 0


#: The options of Docker's default mounts where they differ from ``runc spec``'s (moby's
#: oci/defaults.go, DefaultLinuxSpec): /proc nosuid,noexec,nodev; devpts with gid=5 (the tty group, so
#: that a terminal is group tty as on a host, pts(4)); /dev/shm without runc's size (Docker sizes it by
#: --shm-size, 64 MiB by default, as here); /dev is the same as runc's: nosuid,strictatime,mode=755,
#: size=65536k (no noexec: Docker has none there either). And the container's cgroups at /sys/fs/cgroup,
#: read-only (writable with --privileged, as Docker).
DOCKER_MOUNT_OPTIONS = {
    "/proc": ["nosuid", "noexec", "nodev"],
    "/dev/pts": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
}


def docker_mounts(mounts: list[dict], cgroup_mount: dict) -> list[dict]:
    """runc spec's mounts with Docker's options, and the cgroup mount after /sys (in Docker's order)."""
    result = []
    for mount in mounts:
        mount = dict(mount)
        if mount["destination"] in DOCKER_MOUNT_OPTIONS:
            mount["options"] = list(DOCKER_MOUNT_OPTIONS[mount["destination"]])
        result.append(mount)
        if mount["destination"] == "/sys":
            result.append({**cgroup_mount, "options": list(cgroup_mount["options"])})
    return result


def build_config(options: Options, image_config: dict, rootfs: str, args: list[str],
                 init_program: str | None, limits: dict) -> dict:
    """The config.json for one container: Docker's defaults (every namespace but user, /proc, /dev,
    Docker's capability set, no_new_privs, the device allowlist, the seccomp profile, masked and
    read-only /proc paths) and the flags on top. ``--privileged`` takes the last four away."""
    from stages.runtime.oci import default_spec
    from stages.runtime.oci.spec import CGROUP_MOUNT

    namespaces = ["pid", "ipc", "uts", "mount", "cgroup"] + ([] if options.network == "host" else ["network"])
    hostname = options.hostname or "container"
    # Docker's daemon puts HOSTNAME first, under the image's and the user's variables (which win); HOME
    # it leaves to the runtime, which reads the user's home in the image's /etc/passwd (as runc does).
    config = default_spec(args, rootfs=rootfs, hostname=hostname,
                          readonly=options.read_only, namespaces=tuple(namespaces),
                          env=merge_env([f"HOSTNAME={hostname}", *(image_config.get("Env") or [])],
                                        parse_env(options.env)))
    config["mounts"] = docker_mounts(config["mounts"], CGROUP_MOUNT)
    process = config["process"]
    process["capabilities"] = _capabilities(options)
    process["cwd"] = options.workdir or image_config.get("WorkingDir") or "/"
    user = options.user or image_config.get("User") or ""
    if user:
        uid, gid = parse_user(user, rootfs)
        process["user"] = {"uid": uid, "gid": gid}
        if uid != 0:
            # Docker gives a non-root user no capability in effect; the bounding set still caps what a
            # setuid program could gain (capabilities(7)).
            for name in ("effective", "permitted"):
                process["capabilities"][name] = []
    if init_program is not None:
        config["mounts"].append({"destination": INIT_PATH, "type": "bind", "source": init_program,
                                 "options": ["bind", "ro", "nosuid", "nodev"]})
        process["args"] = [INIT_PATH, "--", *args]
    config["mounts"] += [parse_volume(item) for item in options.volumes]
    resources: dict = {}
    if "memory" in limits:
        resources["memory"] = {"limit": limits["memory"], "swap": limits["memory"]}
    if "cpus" in limits:
        resources["cpu"] = {"quota": int(limits["cpus"] * CPU_PERIOD), "period": CPU_PERIOD}
    if "pids" in limits:
        resources["pids"] = {"limit": limits["pids"]}
    linux = config["linux"]
    if options.privileged:
        # Docker's --privileged: every capability (above), no seccomp filter, no device allowlist, nothing
        # of /proc masked or read-only, /sys writable. The container can do what root on the host can.
        linux["maskedPaths"], linux["readonlyPaths"] = [], []
        for mount in config["mounts"]:
            if mount["destination"] in ("/sys", "/sys/fs/cgroup"):
                mount["options"] = [word for word in mount["options"] if word != "ro"] + ["rw"]
    else:
        from stages.runtime.oci import devices

        # no device node may be opened or created but those every container needs: with CAP_MKNOD
        # kept, `mknod /tmp/disk b 8 0` still makes a node, and opening it fails (EPERM)
        resources["devices"] = devices.allowlist()
        if not _unconfined(options):
            from stages.runtime import seccomp_profile
            from stages.runtime.oci import seccomp

            if not seccomp.available():
                raise StagesError("a container's seccomp filter is built with libseccomp, which is not "
                                  "installed", "install it (apt-get install libseccomp2), or run without "
                                  "the filter: --security-opt seccomp=unconfined")

            profile = limits.get("seccomp_profile") or seccomp_profile.DEFAULT
            linux["seccomp"] = seccomp_profile.resolve(profile, process["capabilities"]["bounding"])
    if resources:
        linux["resources"] = resources
    return config
