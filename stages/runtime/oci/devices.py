"""linux.resources.devices: config.json's device allowlist (config-linux.md "Device allowlist"), read and
checked here; the allowlist itself (the rules, cgroup v1's files and cgroup v2's BPF program) is stage 2's,
:mod:`stages.isolate.devices`, since a learner wires the same one by hand (``Isolate.limit_devices``).
"""

from __future__ import annotations

from stages.isolate.devices import (  # noqa: F401 - the runtime's users find them here too
    ALL,
    DEFAULT_RULES,
    Rule,
    allowlist,
    apply,
    assemble,
    attach_program,
    listing,
    load_program,
    reduce,
    write_v1,
)


# -- reading config.json ------------------------------------------------------------------------------------
def parse(resources_devices, linux_devices=None) -> list[list] | None:
    """``linux.resources.devices`` (and the nodes of ``linux.devices``, each allowed) checked and followed by
    :data:`DEFAULT_RULES`: the rules in order, as plain lists. None when config.json sets no rule (the
    container's cgroup is then not restricted, as with runc)."""
    from stages.runtime.oci.spec import _typed, refuse

    items = _typed(resources_devices, list, "linux.resources.devices", [])
    if not items:
        return None
    rules = []
    for index, item in enumerate(items):
        where = f"linux.resources.devices[{index}]"
        _typed(item, dict, where)
        allow = _typed(item.get("allow"), bool, f"{where}.allow")
        if allow is None:
            raise refuse(f"{where}.allow", "is missing", 'say "allow": true or false')
        kind = _typed(item.get("type"), str, f"{where}.type", "a")
        if kind not in ("a", "b", "c"):
            raise refuse(f"{where}.type", f"{kind!r} is not a device type", 'use "c", "b" or "a" (all)')
        numbers = []
        for name in ("major", "minor"):
            value = _typed(item.get(name), int, f"{where}.{name}", ALL)
            if value < ALL:
                raise refuse(f"{where}.{name}", f"{value} is not a device number", "leave it out for any")
            numbers.append(value)
        access = _typed(item.get("access"), str, f"{where}.access", "rwm")
        if not access or set(access) - set("rwm"):
            raise refuse(f"{where}.access", f"{access!r} is not a set of the letters r, w and m")
        access = "".join(letter for letter in "rwm" if letter in access)
        rules.append(Rule(allow, kind, numbers[0], numbers[1], access))
    for node in _typed(linux_devices, list, "linux.devices", []):
        if isinstance(node, dict) and node.get("type") in ("b", "c", "u") and isinstance(node.get("major"),
                                                                                         int):
            kind = "c" if node["type"] == "u" else node["type"]
            rules.append(Rule(True, kind, node["major"], node.get("minor") or 0, "rwm"))
    rules += [Rule(True, kind, major, minor, access) for kind, major, minor, access, _ in DEFAULT_RULES]
    return [rule.to_list() for rule in rules]
