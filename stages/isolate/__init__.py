"""Stage 2: an isolate wired by hand, one namespace, mount and limit at a time.

:class:`Isolate` is the object a learner drives (see :mod:`stages.isolate.isolate`); the process that holds
its namespaces is :mod:`stages.isolate.holder`; cgroups and network wiring live in
:mod:`stages.isolate.cgroups` and :mod:`stages.isolate.network`; :func:`cleanup` removes what isolates
killed by SIGKILL left on the host (:mod:`stages.isolate.state`).
"""

from __future__ import annotations

from stages.isolate.isolate import (
    DEFAULT_CAPS,
    ISOLATES,
    HolderDiedError,
    Isolate,
    NamespaceView,
    RunResult,
    StepFailedError,
)
from stages.isolate.privileges import DEFAULT_DENY, seccomp_available
from stages.isolate.state import cleanup

__all__ = [
    "DEFAULT_CAPS", "DEFAULT_DENY", "ISOLATES", "HolderDiedError", "Isolate", "NamespaceView", "RunResult",
    "StepFailedError", "cleanup", "seccomp_available",
]
