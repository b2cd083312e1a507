"""``stages run``'s flags, turned into the config.json an OCI runtime executes.

Each flag is one field of the runtime spec (config.md, config-linux.md), as Docker's engine translates
them::

    -e K=V            process.env                       -w DIR        process.cwd
    -u UID[:GID]      process.user                      --hostname H  hostname
    -v HOST:CTR[:ro]  mounts (a bind mount, rbind/ro)   --read-only   root.readonly
    --memory 64M      linux.resources.memory.limit      --cpus 0.5    linux.resources.cpu.quota/period
    --pids-limit N    linux.resources.pids.limit        --network     linux.namespaces (network or not)

Bad values are refused here, before anything is created, with one sentence and a fix.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from stages.errors import LimitError, StagesError

#: Where the init program is bound inside the container (docker-init lives at /sbin/docker-init).
INIT_PATH = "/.stages-init"
CPU_PERIOD = 100_000  # µs: the kernel's default CFS period (cgroups(7), cpu.cfs_period_us)


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
            return int(word)
        if rootfs:
            try:
                with open(os.path.join(rootfs, "etc", file)) as handle:
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
    return uid, uid if uid else 0


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
        if int(options.pids_limit) < 1:
            raise LimitError(f"--pids-limit {options.pids_limit} leaves no room for the command",
                             "give 1 or more, for instance --pids-limit 20")
        limits["pids"] = int(options.pids_limit)
    if options.network not in ("none", "bridge", "host"):
        raise StagesError(f"--network {options.network!r} is not a network mode",
                          "use --network bridge (the default), none or host")
    if options.publish and options.network != "bridge":
        raise StagesError(f"-p needs --network bridge, not {options.network}",
                          "leave --network out, or drop -p")
    for item in options.publish:
        parse_publish(item)
    for item in options.volumes:
        parse_volume(item)
    if options.workdir is not None and not os.path.isabs(options.workdir):
        raise StagesError(f"-w {options.workdir!r} is not an absolute path", "write -w /some/dir")
    parse_env(options.env)
    return limits


def build_config(options: Options, image_config: dict, rootfs: str, args: list[str],
                 init_program: str | None, limits: dict) -> dict:
    """The config.json for one container: Docker's defaults (every namespace but user, /proc, /dev,
    Docker's capability set, no_new_privs) and the flags on top."""
    from stages.runtime.oci import default_spec

    namespaces = ["pid", "ipc", "uts", "mount", "cgroup"] + ([] if options.network == "host" else ["network"])
    config = default_spec(args, rootfs=rootfs, hostname=options.hostname or "container",
                          readonly=options.read_only, namespaces=tuple(namespaces),
                          env=merge_env(image_config.get("Env") or [], parse_env(options.env)))
    process = config["process"]
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
    if resources:
        config["linux"]["resources"] = resources
    return config
