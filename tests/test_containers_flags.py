"""`stages run`'s flags as config.json (the OCI runtime spec): what the engine hands the runtime.

The effects are tested in real containers in test_containers.py; here, that the bundle says what Docker's
defaults say (every namespace but user, /proc and /dev, Docker's capability set, no_new_privs) and that a
bad flag is refused before anything is made, in one sentence with a fix.
"""

from __future__ import annotations

import pytest

from stages.errors import LimitError, StagesError
from stages.runtime import flags
from stages.runtime.flags import Options

IMAGE = {"Env": ["PATH=/bin", "LANG=C"], "WorkingDir": "/srv", "User": ""}


def config_for(tmp_path, **given) -> dict:
    options = Options(image="busybox", **given)
    limits = flags.check(options)
    return flags.build_config(options, IMAGE, str(tmp_path), ["sh"], "/opt/init", limits)


def test_defaults_are_dockers(tmp_path):
    config = config_for(tmp_path)
    kinds = {item["type"] for item in config["linux"]["namespaces"]}
    assert kinds == {"pid", "ipc", "uts", "mount", "cgroup", "network"}
    destinations = [item["destination"] for item in config["mounts"]]
    assert "/proc" in destinations and "/dev" in destinations
    process = config["process"]
    assert process["noNewPrivileges"] is True
    assert "CAP_SYS_ADMIN" not in process["capabilities"]["bounding"]
    assert "CAP_NET_BIND_SERVICE" in process["capabilities"]["effective"]
    assert process["args"] == [flags.INIT_PATH, "--", "sh"]
    assert {"destination": flags.INIT_PATH, "type": "bind", "source": "/opt/init",
            "options": ["bind", "ro", "nosuid", "nodev"]} in config["mounts"]
    assert process["cwd"] == "/srv" and "LANG=C" in process["env"]
    assert config["root"]["readonly"] is False
    # Docker's device allowlist: nothing but the devices every container needs may be opened
    devices = config["linux"]["resources"]["devices"]
    assert devices[0] == {"allow": False, "access": "rwm"}
    assert {"allow": True, "type": "b", "access": "m"} in devices  # mknod, harmless without r or w
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"} in devices  # /dev/null
    assert not [rule for rule in devices if rule.get("type") == "b" and "r" in rule["access"]]
    # Docker's seccomp profile, resolved for this container's capabilities and this machine
    seccomp = config["linux"]["seccomp"]
    assert seccomp["defaultAction"] == "SCMP_ACT_ERRNO" and seccomp["architectures"]
    allowed = {name for rule in seccomp["syscalls"] if not rule.get("args") for name in rule["names"]}
    assert "read" in allowed and "unshare" not in allowed and "mount" not in allowed
    assert "/proc/kcore" in config["linux"]["maskedPaths"]
    assert "/proc/sys" in config["linux"]["readonlyPaths"]


def test_privileged_and_security_opt_take_the_defaults_away(tmp_path):
    from stages import kernel

    privileged = config_for(tmp_path, privileged=True)
    linux = privileged["linux"]
    assert "seccomp" not in linux and "resources" not in linux
    assert linux["maskedPaths"] == [] and linux["readonlyPaths"] == []
    sys_mount = next(item for item in privileged["mounts"] if item["destination"] == "/sys")
    assert "ro" not in sys_mount["options"]
    assert len(privileged["process"]["capabilities"]["bounding"]) > 14
    assert set(privileged["process"]["capabilities"]["bounding"]) <= {
        f"CAP_{name.upper()}" for name in kernel.CAPABILITIES}
    unconfined = config_for(tmp_path, security_opt=["seccomp=unconfined"])
    assert "seccomp" not in unconfined["linux"] and unconfined["linux"]["resources"]["devices"]


def test_each_flag_lands_in_its_field(tmp_path):
    volume = tmp_path / "data"
    volume.mkdir()
    config = config_for(tmp_path, env=["LANG=fr", "X=1"], workdir="/tmp", user="1000:100", hostname="h",
                        memory="64M", cpus="0.5", pids_limit=20, network="host", read_only=True,
                        volumes=[f"{volume}:/data:ro"])
    process = config["process"]
    assert "LANG=fr" in process["env"] and "LANG=C" not in process["env"] and "X=1" in process["env"]
    assert process["cwd"] == "/tmp" and process["user"] == {"uid": 1000, "gid": 100}
    assert process["capabilities"]["effective"] == []  # a non-root user holds none in effect
    assert config["hostname"] == "h" and config["root"]["readonly"] is True
    assert "network" not in {item["type"] for item in config["linux"]["namespaces"]}
    resources = config["linux"]["resources"]
    assert resources["memory"]["limit"] == 64 << 20
    assert resources["cpu"] == {"quota": 50_000, "period": 100_000}
    assert resources["pids"] == {"limit": 20}
    assert {"destination": "/data", "type": "bind", "source": str(volume),
            "options": ["rbind", "rprivate", "ro"]} in config["mounts"]


@pytest.mark.parametrize(("given", "error", "words"), [
    ({"memory": "lots"}, LimitError, "'lots' is not a memory size"),
    ({"cpus": "half"}, LimitError, "is not a number of CPUs"),
    ({"pids_limit": 0}, LimitError, "--pids-limit 0"),
    ({"network": "wifi"}, StagesError, "is not a network mode"),
    ({"publish": ["80"]}, StagesError, "is not HOSTPORT:CONTAINERPORT"),
    ({"publish": ["8080:80"], "network": "none"}, StagesError, "-p needs --network bridge"),
    ({"volumes": ["relative:/data"]}, StagesError, "both paths must be absolute"),
    ({"volumes": ["/no/such/dir/here:/data"]}, StagesError, "does not exist on the host"),
    ({"volumes": ["/tmp:/data:rx"]}, StagesError, "is not ro or rw"),
    ({"workdir": "tmp"}, StagesError, "is not an absolute path"),
    ({"env": ["=x"]}, StagesError, "does not name a variable"),
    ({"pids_limit": 1}, LimitError, "the container's init (PID 1) and the command are two processes"),
    ({"pids_limit": 0, "init": False}, LimitError, "the command is one process"),
    ({"hostname": "x" * 65}, StagesError, "the kernel keeps at most 64"),
    ({"hostname": "a b"}, StagesError, "is not a host name"),
    ({"volumes": ["/tmp:/"]}, StagesError, "a volume cannot be mounted on /"),
    ({"publish": ["8080:80", "8080:81"]}, StagesError, "host port 8080 is given twice"),
    ({"security_opt": ["label=disable"]}, StagesError, "is not an option this runtime knows"),
    ({"security_opt": ["seccomp=/no/such/profile.json"]}, StagesError, "the profile does not exist"),
])
def test_bad_flags_are_refused_in_one_sentence_with_a_fix(given, error, words):
    with pytest.raises(error) as raised:
        flags.check(Options(image="busybox", **given))
    assert words in raised.value.message and raised.value.hint


def test_user_names_are_looked_up_in_the_image(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nwww:x:33:33::/var/www:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\n")
    assert flags.parse_user("www", str(tmp_path)) == (33, 33)
    assert flags.parse_user("www:staff", str(tmp_path)) == (33, 50)
    with pytest.raises(StagesError, match="the image has no user 'nobody-here'"):
        flags.parse_user("nobody-here", str(tmp_path))


@pytest.mark.parametrize("text", ["4294967295", "1000:4294967295", "4294967296", "99999999999999999999"])
def test_an_id_the_kernel_reads_as_no_change_is_refused(text):
    """(uid_t) -1 tells setresuid(2) to leave the ID as it is: the command would stay root."""
    with pytest.raises(StagesError, match="IDs run from 0 to 4294967294"):
        flags.parse_user(text)
    assert flags.parse_user("4294967294:4294967294") == (4294967294, 4294967294)


def test_the_container_commands_are_listed():
    from stages.cli import COMMANDS

    for name in ("run", "ps", "logs", "exec", "stop", "start", "restart", "kill", "rm", "inspect", "prune"):
        module = __import__(COMMANDS[name][0], fromlist=["configure", "run"])
        assert callable(module.configure) and callable(module.run)
