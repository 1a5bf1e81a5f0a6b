"""The one mapping between Cairn's error vocabulary and gRPC status codes, both ways.

Servers: wrap servicer methods with `handle_errors` (or a whole servicer class with
`handle_servicer_errors`). A CairnError becomes `context.abort(code, message)` with the
code from `status_code`; anything else becomes INTERNAL with a one-line message, and its
traceback goes to the log, never to the caller.

Clients: `from_rpc_error` turns a failed call back into the CairnError the server meant,
and `translate_rpc_errors` does that for every call inside a `with` block.

The CSI specification gives these codes their meaning for kubelet and the sidecars
(NOT_FOUND on a missing volume, ALREADY_EXISTS on an incompatible name, ABORTED when an
operation for the same volume is in flight, RESOURCE_EXHAUSTED when out of space...), so
handlers raise the matching cairn.errors class and never pick codes themselves.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from cairn.errors import (
    AlreadyExists,
    CairnError,
    ConfigError,
    ConflictError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermanentError,
    ResourceExhausted,
    TemporaryError,
    UnavailableError,
)

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# Checked in order, so subclasses come before their bases.
_TO_CODE: tuple[tuple[type[CairnError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # The server's own set-up is wrong (not the request): retrying cannot help until an
    # operator fixes it, which is what FAILED_PRECONDITION tells a CSI caller.
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    # CSI uses ABORTED for "another operation on this volume is in flight, retry".
    (ConflictError, grpc.StatusCode.ABORTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (TemporaryError, grpc.StatusCode.UNAVAILABLE),
    (PermanentError, grpc.StatusCode.INTERNAL),
)

# Codes a peer may send, and the Cairn error a client raises for each. Codes missing here
# (UNKNOWN, INTERNAL, DATA_LOSS, UNIMPLEMENTED, PERMISSION_DENIED, UNAUTHENTICATED) are
# permanent: the same call would fail the same way.
_FROM_CODE: dict[grpc.StatusCode, type[CairnError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    # The call was cancelled (by the caller or a shutdown), not refused: try again.
    grpc.StatusCode.CANCELLED: TemporaryError,
}


def status_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code a server answers with for `error`."""
    for cls, code in _TO_CODE:
        if isinstance(error, cls):
            return code
    if isinstance(error, CairnError) and error.temporary:
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def first_line(text: str) -> str:
    """The first non-empty line of `text`, stripped ("" when there is none)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def one_line(error: BaseException) -> str:
    """An error's message as one line, or its class name when the message is empty."""
    return first_line(str(error)) or type(error).__name__


def error_from_status(code: grpc.StatusCode, message: str) -> CairnError:
    """The CairnError for a status a peer answered with."""
    cls = _FROM_CODE.get(code, PermanentError)
    return cls(message or code.name)


def from_rpc_error(error: grpc.RpcError, target: str | None = None) -> CairnError:
    """The CairnError for a failed client call (grpc.aio.AioRpcError or a sync grpc.Call).

    `target`, when given, prefixes the message so a CLI can say which server answered.
    """
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else ""
    message = first_line(details or "") or code.name
    if target:
        message = f"{target}: {message}"
    return error_from_status(code, message)


@contextlib.contextmanager
def translate_rpc_errors(target: str | None = None) -> Iterator[None]:
    """Re-raise every gRPC failure inside the block as the matching CairnError.

    Awaits inside the block are covered: `with translate_rpc_errors(): await stub.Call(req)`.
    """
    try:
        yield
    except grpc.RpcError as error:
        raise from_rpc_error(error, target) from error


async def _abort_for(error: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    """Ends the RPC with the status `error` maps to; always raises."""
    if isinstance(error, CairnError):
        code = status_code(error)
        message = one_line(error)
        log.info("%s answered %s: %s", method, code.name, message)
    else:
        code = grpc.StatusCode.INTERNAL
        message = f"unexpected {type(error).__name__}: {one_line(error)}"
        log.error("%s failed unexpectedly", method, exc_info=error)
    await context.abort(code, message)


def handle_errors(method: F) -> F:
    """Decorates an asyncio servicer method (coroutine or async generator) so it answers
    Cairn's errors with their status code and unexpected errors with INTERNAL."""
    name = method.__qualname__

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise  # the handler aborted on purpose; its status stands
            except Exception as error:
                await _abort_for(error, context, name)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort_for(error, context, name)

    return unary  # type: ignore[return-value]


def handle_servicer_errors(cls: type) -> type:
    """Class decorator: applies `handle_errors` to every public async method defined on
    the class itself (the RPC handlers of a generated *Servicer subclass)."""
    for attr, value in list(vars(cls).items()):
        if attr.startswith("_"):
            continue
        if inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value):
            setattr(cls, attr, handle_errors(value))
    return cls
