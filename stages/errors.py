"""One error hierarchy for the whole package.

Every error a learner can meet says, in one sentence, what is wrong, and carries a hint: what to do about
it. The command line prints both and never a traceback; Python users catch :class:`StagesError`.
"""

from __future__ import annotations

import errno


class StagesError(Exception):
    """Something the learner can fix: ``message`` says what is wrong, ``hint`` how to fix it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class NotRootError(StagesError):
    """The action needs root (or CAP_SYS_ADMIN) and we do not have it."""

    def __init__(self, what: str = "this"):
        super().__init__(
            f"{what} needs root: namespaces, mounts and chroot are privileged operations",
            "run it again with sudo, or as root inside the workshop VM",
        )


class RootfsError(StagesError):
    """A root filesystem is missing, broken, or not ours to touch."""


class UnsafeArchiveError(RootfsError):
    """A tarball holds an entry that would escape the directory it is extracted into."""


class CommandNotFoundError(StagesError):
    """The command to run does not exist inside the root filesystem."""

    exit_code = 127


class CommandNotRunnableError(StagesError):
    """The command exists inside the root filesystem but cannot be executed (execve(2)'s EACCES)."""

    exit_code = 126


class StepOrderError(StagesError):
    """A stage-2 step was called before a step it depends on: the error is the lesson."""


class CgroupError(StagesError):
    """A cgroup could not be created, limited or removed."""


class NetworkError(StagesError):
    """A veth, bridge, address or firewall rule could not be set up or removed."""


class LimitError(StagesError):
    """A resource limit given by the learner cannot be understood or is absurd."""


def error_reply(error: BaseException) -> dict:
    """An exception as plain data (JSON), so that a parent process can raise the same kind of error: the
    message and hint of a :class:`StagesError`, the errno of an :class:`OSError`, else type and message."""
    reply = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, StagesError):
        reply.update(message=error.message, hint=error.hint, stages=True)
    elif isinstance(error, OSError):
        reply.update(errno=error.errno or errno.EIO, message=error.strerror or str(error))
    return reply
