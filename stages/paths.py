"""Where stages keeps what lasts: one rule, for every stage.

A module of its own, importing nothing of stages, so that the hot path of ``stages run`` can ask
without importing the rootfs builder (stages.rootfs pulls in observe, kernel and ctypes).
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """Where stages keeps its state (rootfs, images, containers): ``$STAGES_HOME``, else
    ``/var/lib/stages`` as root, else ``$XDG_DATA_HOME/stages`` (``~/.local/share/stages``)."""
    if os.environ.get("STAGES_HOME"):
        return Path(os.environ["STAGES_HOME"])
    if os.geteuid() == 0:
        return Path("/var/lib/stages")
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data, "stages")
