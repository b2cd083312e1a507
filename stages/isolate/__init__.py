"""Stage 2: an isolate wired by hand, one namespace, mount and limit at a time.

:class:`Isolate` is the object a learner drives (see :mod:`stages.isolate.isolate`); the process that holds
its namespaces is :mod:`stages.isolate.holder`; cgroups and network wiring live in
:mod:`stages.isolate.cgroups` and :mod:`stages.isolate.network`; :func:`cleanup` removes what isolates
killed by SIGKILL left on the host (:mod:`stages.isolate.state`).
"""

from __future__ import annotations

# Imported on first use (PEP 562): stage 3 needs only stages.isolate.cgroups and .filesystem, and must not
# pay for the holder, the state files and the rootfs builder on every `stages run`.
_LAZY = {
    "DEFAULT_CAPS": "stages.isolate.isolate", "ISOLATES": "stages.isolate.isolate",
    "HolderDiedError": "stages.isolate.isolate", "Isolate": "stages.isolate.isolate",
    "NamespaceView": "stages.isolate.isolate", "RunResult": "stages.isolate.isolate",
    "StepFailedError": "stages.isolate.isolate", "DEFAULT_DENY": "stages.isolate.privileges",
    "seccomp_available": "stages.isolate.privileges", "cleanup": "stages.isolate.state",
}

__all__ = [
    "DEFAULT_CAPS", "DEFAULT_DENY", "ISOLATES", "HolderDiedError", "Isolate", "NamespaceView", "RunResult",
    "StepFailedError", "cleanup", "seccomp_available",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stages.isolate' has no attribute {name!r}")
