"""Trace context through gRPC metadata, for grpc.aio servers and channels.

Thin wrappers over opentelemetry-instrumentation-grpc's asyncio interceptors: the client
side starts a CLIENT span per call and writes `traceparent` into the call's metadata, the
server side continues it in a SERVER span around the handler. They work over unix sockets
(the CSI endpoint) as over TCP. Importing them emits no warnings with the versions pinned in
pyproject.toml, so no warning filter is needed here.

    server = grpc.aio.server(interceptors=server_interceptors())
    channel = grpc.aio.insecure_channel(target, interceptors=client_interceptors())
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.trace import TracerProvider

__all__ = ["client_interceptors", "server_interceptors"]


def server_interceptors(
    tracer_provider: TracerProvider | None = None, filter_: Callable[[object], bool] | None = None
) -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for `grpc.aio.server(interceptors=...)`; global provider by default.

    `filter_` (see opentelemetry.instrumentation.grpc.filters) picks the methods to trace,
    e.g. to leave out health checks.
    """
    return [aio_server_interceptor(tracer_provider=tracer_provider, filter_=filter_)]


def client_interceptors(
    tracer_provider: TracerProvider | None = None, filter_: Callable[[object], bool] | None = None
) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for `grpc.aio.insecure_channel(..., interceptors=...)`, one per call
    shape (unary/stream in, unary/stream out)."""
    return list(aio_client_interceptors(tracer_provider=tracer_provider, filter_=filter_))
