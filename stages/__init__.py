"""stages: from a chroot jail, through an isolate wired by hand, to a container runtime.

The layers depend only downward: :mod:`stages.kernel` (system calls), :mod:`stages.rootfs` (root
filesystems), :mod:`stages.jail` (stage 1), :mod:`stages.isolate` (stage 2), :mod:`stages.runtime`
(stage 3). :mod:`stages.steps` records what each stage does as shell commands; :mod:`stages.observe`
reads the kernel's state for notebooks and tests; :mod:`stages.errors` holds the learner-facing errors.
"""

from stages.errors import StagesError

__version__ = "0.1.0"
__all__ = ["StagesError", "__version__"]
