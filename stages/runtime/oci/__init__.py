"""Our low-level container runtime: it executes an OCI runtime bundle, as runc, crun and youki do.

An engine (images, builds, networks) writes a *bundle* — a rootfs directory and a ``config.json`` per the
OCI runtime spec — and this runtime executes it, with the operations the spec names (runtime.md)::

    from stages.runtime import oci

    bundle = oci.write_bundle("/tmp/demo", oci.default_spec(["hostname"]))   # + a rootfs in /tmp/demo/rootfs
    oci.create("demo", bundle)      # the init sets itself up and waits
    oci.state("demo")["status"]     # "created"
    oci.start("demo")               # it execs `hostname`
    oci.wait("demo")                # 0
    oci.delete("demo")

It is built from stage 2's primitives (:mod:`stages.kernel`, :mod:`stages.isolate.filesystem`,
:mod:`stages.isolate.cgroups`), so its step record reads like the steps a person typed in stage 2.
"""

from __future__ import annotations

import importlib

# Where each name lives. They are imported on first use (PEP 562's module __getattr__), so that
# `stages-oci state` (stages.runtime.oci.cli), which a supervisor calls several times per container,
# does not pay for the import of everything below at each start.
_EXPORTS = {
    "container": ("cleanup", "create", "delete", "exec_process", "kill", "list_containers", "pause",
                  "resume", "run", "signal_number", "start", "state", "wait"),
    "spec": ("SpecError", "default_spec", "load", "parse_mount_options", "write_bundle"),
    "statefile": ("ContainerNotFoundError",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "ContainerNotFoundError", "SpecError", "cleanup", "create", "default_spec", "delete", "exec_process",
    "kill", "list_containers", "load", "parse_mount_options", "pause", "resume", "run", "signal_number",
    "start", "state", "wait", "write_bundle",
]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next use is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
