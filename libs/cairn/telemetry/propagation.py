"""Carries trace context across NATS messages and event envelopes.

W3C tracecontext (`traceparent`, `tracestate`) and W3C baggage, written into a plain
str -> str dict: a NATS message's headers, or the `trace` field of an event envelope. The
propagator is fixed here rather than read from OTEL_PROPAGATORS, so every Cairn process speaks
the same format whatever its environment says. (gRPC metadata is handled by grpc_otel.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["PROPAGATOR", "extract", "inject", "span_from_headers"]

PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """Reads headers whatever their case, and bytes values as from a msgpack envelope."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            wanted = key.lower()
            value = next((v for k, v in carrier.items() if str(k).lower() == wanted), None)
        if value is None:
            return None
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if isinstance(value, list | tuple):
            return [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in value]
        return [str(value)]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [str(k) for k in carrier]


_GETTER = _HeaderGetter()


def inject(carrier: dict[str, str] | None = None, context: Context | None = None) -> dict[str, str]:
    """Writes the current (or given) trace context and baggage into carrier; returns it.

    With no active span nothing is written, so `inject()` is safe to call anywhere.
    """
    carrier = {} if carrier is None else carrier
    PROPAGATOR.inject(carrier, context=context)
    return carrier


def extract(carrier: Mapping[str, Any] | None) -> Context:
    """The context carried by headers or an envelope's trace field (empty if none is there)."""
    return PROPAGATOR.extract(carrier or {}, getter=_GETTER)


@contextmanager
def span_from_headers(
    tracer: trace.Tracer | str,
    name: str,
    headers: Mapping[str, Any] | None,
    kind: trace.SpanKind = trace.SpanKind.CONSUMER,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[trace.Span]:
    """Continues the trace of a received message: a current span whose parent is the sender's.

    The sender's baggage is current inside the block too. A message without trace headers
    starts a new trace instead. `tracer` may be a tracer or
    the name to get one by.
    """
    if isinstance(tracer, str):
        tracer = trace.get_tracer(tracer)
    # Attached, not only passed as the parent, so the sender's baggage is current too.
    token = otel_context.attach(extract(headers))
    try:
        with tracer.start_as_current_span(
            name, kind=kind, attributes=dict(attributes or {})
        ) as span:
            yield span
    finally:
        otel_context.detach(token)
