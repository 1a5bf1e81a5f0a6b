"""Cairn's one error vocabulary.

Every failure is either temporary (retrying later may succeed: a server is down, a
transaction conflicted) or permanent (retrying the same request fails the same way). Each
edge maps this vocabulary once: gRPC status codes (cairn.rpc.status), FUSE errno (the VFS),
CLI exit codes with a one-line message (`exit_code` and cairn.service).
"""

from __future__ import annotations


class CairnError(Exception):
    """Base of every error Cairn raises on purpose; its message is one user-facing line."""

    temporary = False


class TemporaryError(CairnError):
    """Retrying later may succeed."""

    temporary = True


class PermanentError(CairnError):
    """Retrying the same request fails the same way."""


class UnavailableError(TemporaryError):
    """A server (NATS, Redis, object store, a CSI socket) cannot be reached."""


class ConflictError(TemporaryError):
    """An optimistic write lost a race; reload and retry."""


class DeadlineExceeded(TemporaryError):
    """A retried operation ran out of time."""


class ConfigError(PermanentError):
    """A flag, environment variable or URL is wrong: the message says what to fix."""


class InvalidArgument(PermanentError):
    """A request is malformed or misses a required field."""


class NotFound(PermanentError):
    """The named thing does not exist."""


class AlreadyExists(PermanentError):
    """Something of that name exists and is incompatible with the request."""


class FailedPrecondition(PermanentError):
    """The system is not in a state that allows the request."""


class OutOfRange(PermanentError):
    """A requested size or range cannot be satisfied."""


class ResourceExhausted(PermanentError):
    """No capacity left (space, inodes, nodes with room)."""


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # sysexits.h EX_UNAVAILABLE
EXIT_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL


def exit_code(error: BaseException) -> int:
    """The process exit code for an error that ends a command."""
    if isinstance(error, ConfigError | InvalidArgument):
        return EXIT_USAGE
    if isinstance(error, UnavailableError):
        return EXIT_UNAVAILABLE
    if isinstance(error, TemporaryError):
        return EXIT_TEMPFAIL
    return EXIT_FAILURE


class FSError(PermanentError):
    """A POSIX file system error: `errno` is what FUSE answers (ENOENT, EEXIST, EDQUOT...)."""

    def __init__(self, errno: int, message: str = ""):
        import os

        super().__init__(message or os.strerror(errno))
        self.errno = errno
