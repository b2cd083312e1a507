"""The device allowlist: which device nodes the processes of a cgroup may open or create, enforced by the
kernel. Stage 2's :meth:`stages.isolate.Isolate.limit_devices` writes it by hand, and stage 3's runtime
(``linux.resources.devices`` in config.json, config-linux.md "Device allowlist", read by
:mod:`stages.runtime.oci.devices`) calls the very same functions.

A device node is only a name for a (type, major, minor) number: whoever may ``mknod /dev/sda b 8 0`` (root
with CAP_MKNOD, in a container too) could read the host's disk through it, whatever is or is not in the
container's /dev. So the kernel asks the cgroup, on every open(2) and mknod(2) of a device node, whether
this process may read (``r``), write (``w``) or create (``m``) that device. Two ways to answer:

- **cgroup v1**: the devices controller keeps a list per cgroup. ``echo a > devices.deny`` forbids
  everything; each ``echo 'c 1:3 rwm' > devices.allow`` lets one device back in (the kernel's
  admin-guide/cgroup-v1/devices.rst).
- **cgroup v2** has no such files: a small BPF program of type BPF_PROG_TYPE_CGROUP_DEVICE, attached to
  the cgroup's directory, gets (type, major, minor, access) and returns 1 to allow or 0 to deny (the
  kernel's admin-guide/cgroup-v2.rst, "Device controller"). :func:`assemble` writes that program by
  hand, one readable instruction at a time, and :func:`attach_program` loads and attaches it with
  bpf(2) (BPF_PROG_LOAD, then BPF_PROG_ATTACH with the directory's file descriptor).

The rules are read in order, later ones over earlier ones, as runc does: podman sends ``[{"allow": false,
"access": "rwm"}]`` (deny everything) and the runtime appends the devices every container needs
(:data:`DEFAULT_RULES`: null, zero, full, random, urandom, tty, ptmx, the terminals in /dev/pts,
/dev/net/tun, and ``mknod`` of any node, which is harmless while opening it is not allowed).
:func:`reduce` turns the list into what both kernels keep: a default (allow or deny) and the exceptions
to it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from stages import kernel, steps
from stages.errors import StagesError

ALL = -1  # a wildcard major or minor ("*")
ACCESS_BITS = {"m": 1, "r": 2, "w": 4}  # BPF_DEVCG_ACC_MKNOD, _READ, _WRITE (linux/bpf.h)
TYPE_NUMBERS = {"b": 1, "c": 2}  # BPF_DEVCG_DEV_BLOCK, _CHAR

#: The devices every container may use, appended after config.json's rules (as runc's AllowedDevices):
#: (type, major, minor, access, what it is)
DEFAULT_RULES = [
    ("c", ALL, ALL, "m", "mknod of any character device (opening it is another matter)"),
    ("b", ALL, ALL, "m", "mknod of any block device"),
    ("c", 1, 3, "rwm", "/dev/null"),
    ("c", 1, 5, "rwm", "/dev/zero"),
    ("c", 1, 7, "rwm", "/dev/full"),
    ("c", 1, 8, "rwm", "/dev/random"),
    ("c", 1, 9, "rwm", "/dev/urandom"),
    ("c", 5, 0, "rwm", "/dev/tty"),
    ("c", 5, 2, "rwm", "/dev/ptmx"),
    ("c", 136, ALL, "rwm", "/dev/pts/*, the container's terminals"),
    ("c", 10, 200, "rwm", "/dev/net/tun, for a VPN inside (its devices belong to the container's network)"),
]
# Not /dev/console (c 5:1): it is the host's console, not namespaced (runc left it out too; a container
# with a terminal gets its own pseudo-terminal bound there instead).


def allowlist() -> list[dict]:
    """Docker's device allowlist as config.json's ``linux.resources.devices``: nothing may be opened or
    created (``{"allow": false, "access": "rwm"}``), then :data:`DEFAULT_RULES`, each allowed."""
    rules: list[dict] = [{"allow": False, "access": "rwm"}]
    for kind, major, minor, access, _ in DEFAULT_RULES:
        rule = {"allow": True, "type": kind, "access": access}
        rule.update({name: value for name, value in (("major", major), ("minor", minor)) if value != ALL})
        rules.append(rule)
    return rules


@dataclass(frozen=True)
class Rule:
    """One line of the allowlist: ``allow`` or deny ``access`` (letters of "rwm") to devices of ``type``
    ("a" all, "c" character, "b" block) with this ``major`` and ``minor`` (:data:`ALL`: any)."""

    allow: bool
    type: str
    major: int
    minor: int
    access: str

    def line(self) -> str:
        """As cgroup v1's devices.allow/devices.deny read it: ``c 1:3 rwm``, ``a`` for everything."""
        if self.type == "a" and self.major == ALL and self.minor == ALL and self.access == "rwm":
            return "a"
        number = lambda n: "*" if n == ALL else str(n)  # noqa: E731
        return f"{self.type} {number(self.major)}:{number(self.minor)} {self.access}"

    def covers(self, other: Rule) -> bool:
        """Whether every device ``other`` names is one of ours (wildcards included)."""
        return ((self.type == "a" or self.type == other.type)
                and (self.major == ALL or self.major == other.major)
                and (self.minor == ALL or self.minor == other.minor))

    def to_list(self) -> list:
        return [self.allow, self.type, self.major, self.minor, self.access]


def reduce(rules: list[list]) -> tuple[bool, list[Rule]]:
    """The rules, later over earlier, as what the kernel keeps: (allow by default?, the exceptions).

    A rule for everything (``a``) starts over; a rule that agrees with the default takes its access out of
    the exceptions it covers; one that disagrees becomes an exception (admin-guide/cgroup-v1/devices.rst).
    """
    default_allow = True  # a new cgroup's devices list is its parent's; ours allow everything
    exceptions: list[Rule] = []
    for allow, kind, major, minor, access in rules:
        rule = Rule(allow, kind, major, minor, access)
        if kind == "a" and major == ALL and minor == ALL:
            default_allow, exceptions = allow, []
        elif allow == default_allow:
            kept = []
            for exception in exceptions:
                if rule.covers(exception):
                    left = "".join(c for c in exception.access if c not in access)
                    if left:
                        kept.append(Rule(exception.allow, exception.type, exception.major, exception.minor,
                                         left))
                else:
                    kept.append(exception)
            exceptions = kept
        else:
            same = next((e for e in exceptions if (e.type, e.major, e.minor) == (kind, major, minor)), None)
            if same is not None:
                merged = "".join(c for c in "rwm" if c in same.access or c in access)
                exceptions[exceptions.index(same)] = Rule(allow, kind, major, minor, merged)
            else:
                exceptions.append(rule)
    return default_allow, exceptions


# -- cgroup v1: devices.deny and devices.allow ---------------------------------------------------------------
def write_v1(cgroup, rules: list[list]) -> None:
    """The devices controller's files of ``cgroup`` (a :class:`stages.isolate.cgroups.Cgroup` with the
    ``devices`` controller on v1): the default first, then each exception, each one write(2)."""
    default_allow, exceptions = reduce(rules)
    directory = cgroup.directory("devices")
    cgroup._write(os.path.join(directory, "devices.allow" if default_allow else "devices.deny"), "a",
                  what="every device allowed by default" if default_allow else
                  "no device may be opened or created, except what follows")
    for exception in exceptions:
        name = "devices.allow" if exception.allow else "devices.deny"
        cgroup._write(os.path.join(directory, name), exception.line(),
                      what=_describe(exception))


def _describe(rule: Rule) -> str:
    for kind, major, minor, access, what in DEFAULT_RULES:
        if (kind, major, minor, access) == (rule.type, rule.major, rule.minor, rule.access):
            return what
    return f"{'allow' if rule.allow else 'deny'} {rule.line()} (config.json)"


# -- cgroup v2: a BPF program, by hand -----------------------------------------------------------------------
# One eBPF instruction is 8 bytes, struct bpf_insn (linux/bpf.h): an opcode, the destination and source
# registers (4 bits each), a 16-bit jump offset and a 32-bit immediate. These are the few opcodes we use.
_LDX_MEM_W = 0x61   # BPF_LDX | BPF_MEM | BPF_W:    dst = *(u32 *)(src + off)
_ALU32_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K:    dst &= imm       (32 bits)
_ALU32_RSH_K = 0x74  # BPF_ALU | BPF_RSH | BPF_K:    dst >>= imm
_ALU32_MOV_X = 0xBC  # BPF_ALU | BPF_MOV | BPF_X:    dst = src
_ALU64_MOV_K = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K:  dst = imm
_JMP_JNE_K = 0x55   # BPF_JMP | BPF_JNE | BPF_K:    if dst != imm: skip off instructions
_JMP_JEQ_K = 0x15   # BPF_JMP | BPF_JEQ | BPF_K:    if dst == imm: skip off instructions
_EXIT = 0x95        # BPF_JMP | BPF_EXIT:           return r0

# The registers: r1 points at the context the kernel passes, struct bpf_cgroup_dev_ctx { u32 access_type
# (access << 16 | type); u32 major; u32 minor; }; r0 is the answer, 1 allow and 0 deny.
R0, R1, R2, R3, R4, R5 = range(6)


@dataclass(frozen=True)
class Instruction:
    """One eBPF instruction, with the line a person would read."""

    code: int
    dst: int = 0
    src: int = 0
    offset: int = 0
    immediate: int = 0
    text: str = ""

    def encode(self) -> bytes:
        return struct.pack("<BBhi", self.code, (self.src << 4) | self.dst, self.offset, self.immediate)


def assemble(rules: list[list]) -> list[Instruction]:
    """The device program for ``rules``: read the request into registers, then one block per exception
    (does it match? then answer), then the default answer."""
    default_allow, exceptions = reduce(rules)
    program = [
        Instruction(_LDX_MEM_W, R2, R1, 0, 0, "r2 = ctx->access_type"),
        Instruction(_ALU32_AND_K, R2, 0, 0, 0xFFFF, "r2 &= 0xffff        # the type: 1 block, 2 char"),
        Instruction(_LDX_MEM_W, R3, R1, 0, 0, "r3 = ctx->access_type"),
        Instruction(_ALU32_RSH_K, R3, 0, 0, 16, "r3 >>= 16           # the access: 1 mknod, 2 read, 4 write"),
        Instruction(_LDX_MEM_W, R4, R1, 4, 0, "r4 = ctx->major"),
        Instruction(_LDX_MEM_W, R5, R1, 8, 0, "r5 = ctx->minor"),
    ]
    for exception in exceptions:
        block: list[tuple[int, int, int, str]] = []  # (code, register, immediate, text) of each test
        if exception.type != "a":
            block.append((_JMP_JNE_K, R2, TYPE_NUMBERS[exception.type], f"type is not {exception.type!r}"))
        wanted = sum(ACCESS_BITS[c] for c in exception.access)
        if wanted != 7:
            block.append(("access", R3, wanted, ""))
        if exception.major != ALL:
            block.append((_JMP_JNE_K, R4, exception.major, f"major is not {exception.major}"))
        if exception.minor != ALL:
            block.append((_JMP_JNE_K, R5, exception.minor, f"minor is not {exception.minor}"))
        instructions = []
        for code, register, immediate, text in block:
            if code == "access":
                # An allowed exception must grant *every* access asked for (a read-write open needs both);
                # a denied one refuses if it names *any* of them (the v1 kernel's rules, devices.rst).
                mask = (~immediate & 7) if exception.allow else immediate
                instructions.append([_ALU32_MOV_X, R1, register, None, 0, "r1 = r3"])
                instructions.append([_ALU32_AND_K, R1, 0, None, mask, f"r1 &= {mask}"])
                jump, why = ((_JMP_JNE_K, f"asks for more than {exception.access!r}") if exception.allow
                             else (_JMP_JEQ_K, f"asks for none of {exception.access!r}"))
                instructions.append([jump, R1, 0, "skip", 0, f"if ({why}) next rule"])
            else:
                instructions.append([code, register, 0, "skip", immediate, f"if ({text}) next rule"])
        answer = 1 if exception.allow else 0
        instructions.append([_ALU64_MOV_K, R0, 0, None, answer,
                             f"r0 = {answer}              # {'allow' if answer else 'deny'} "
                             f"{exception.line()}"])
        instructions.append([_EXIT, 0, 0, None, 0, "exit"])
        for position, item in enumerate(instructions):
            if item[3] == "skip":  # jump past the rest of this block
                item[3] = len(instructions) - position - 1
        program += [Instruction(code, dst, src, offset or 0, immediate, text)
                    for code, dst, src, offset, immediate, text in instructions]
    program += [Instruction(_ALU64_MOV_K, R0, 0, 0, int(default_allow),
                            f"r0 = {int(default_allow)}              # otherwise: "
                            f"{'allow' if default_allow else 'deny'}"),
                Instruction(_EXIT, text="exit")]
    return program


def listing(program: list[Instruction]) -> str:
    """The program as a person reads it, one instruction a line."""
    return "\n".join(f"{number:3}: {item.text}" for number, item in enumerate(program))


_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6  # the attach type
_BPF_F_ALLOW_MULTI = 2  # several programs on the path all have their say, as runc attaches them
#: bpf(2)'s number on each architecture (it has no glibc wrapper)
_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351, "i686": 357,
                "armv7l": 386}


class _LoadAttributes(ctypes.Structure):
    """The BPF_PROG_LOAD part of union bpf_attr (linux/bpf.h)."""

    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32)]


class _AttachAttributes(ctypes.Structure):
    """The BPF_PROG_ATTACH part of union bpf_attr."""

    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32)]


def _bpf(command: int, attributes: ctypes.Structure, what: str) -> int:
    number = _BPF_SYSCALL.get(os.uname().machine)  # platform.machine(), without importing platform
    if number is None:
        raise StagesError(f"this runtime does not know bpf(2)'s number on {os.uname().machine}",
                          "add it to stages.isolate.devices._BPF_SYSCALL (the kernel's syscall table)")
    return kernel.syscall(number, ctypes.c_int(command), ctypes.byref(attributes),
                          ctypes.c_uint(ctypes.sizeof(attributes)), call="bpf", arguments=what)


def load_program(program: list[Instruction]) -> int:
    """bpf(BPF_PROG_LOAD): the kernel's verifier checks the program and returns a file descriptor for it.
    On refusal, the verifier's own words are in the error."""
    code = b"".join(item.encode() for item in program)
    instructions = ctypes.create_string_buffer(code, len(code))
    license_text = ctypes.create_string_buffer(b"Apache-2.0")
    log = ctypes.create_string_buffer(1 << 16)
    attributes = _LoadAttributes(prog_type=_BPF_PROG_TYPE_CGROUP_DEVICE, insn_cnt=len(program),
                                 insns=ctypes.addressof(instructions), license=ctypes.addressof(license_text),
                                 prog_name=b"stages_devices")
    try:
        return _bpf(_BPF_PROG_LOAD, attributes, "BPF_PROG_LOAD, BPF_PROG_TYPE_CGROUP_DEVICE")
    except OSError as error:
        if error.errno != errno.EACCES and error.errno != errno.EINVAL:
            raise
    attributes.log_level, attributes.log_size, attributes.log_buf = 1, len(log), ctypes.addressof(log)
    try:
        return _bpf(_BPF_PROG_LOAD, attributes, "BPF_PROG_LOAD (again, with the verifier's log)")
    except OSError as error:
        raise StagesError(f"the kernel's verifier refused the device program: {error.strerror}: "
                          f"{log.value.decode(errors='replace').strip()[-400:]}",
                          "this is a bug in stages: please report it with the program's listing") from None


def attach_program(directory: str, rules: list[list]) -> list[Instruction]:
    """Assemble the program for ``rules``, load it, and attach it to the cgroup v2 ``directory``
    (bpf(BPF_PROG_ATTACH, BPF_CGROUP_DEVICE) with the directory's file descriptor). From then on every
    open(2) and mknod(2) of a device node by a process in that cgroup (or below) asks it. The program
    stays attached, with no file descriptor of ours, until the cgroup is removed. Returns the program."""
    program = assemble(rules)
    default_allow, exceptions = reduce(rules)
    shell = (f"# bpf(BPF_PROG_LOAD) a {len(program)}-instruction device program; "
             f"bpf(BPF_PROG_ATTACH) to {directory}")
    with steps.record(shell, what=f"{'allow' if default_allow else 'deny'} by default, {len(exceptions)} "
                      "exceptions (cgroup v2 has no devices.allow: a BPF program answers)"):
        program_fd = load_program(program)
        try:
            cgroup_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _bpf(_BPF_PROG_ATTACH, _AttachAttributes(target_fd=cgroup_fd, attach_bpf_fd=program_fd,
                                                         attach_type=_BPF_CGROUP_DEVICE,
                                                         attach_flags=_BPF_F_ALLOW_MULTI),
                     f"BPF_PROG_ATTACH, {directory}, BPF_CGROUP_DEVICE")
            finally:
                os.close(cgroup_fd)
        finally:
            os.close(program_fd)
    return program


def apply(cgroup, rules: list[list]) -> None:
    """Enforce ``rules`` on ``cgroup`` (a :class:`stages.isolate.cgroups.Cgroup` made with the ``devices``
    controller): the v1 files, or the v2 program (recorded into the active step record)."""
    if cgroup.versions.get("devices") == 2:
        attach_program(cgroup.directory("devices"), rules)
    else:
        write_v1(cgroup, rules)
