"""Cairn's observability: OpenTelemetry traces, trace-aware logs, Prometheus metrics.

One trace follows a volume from provisioning to the mount across processes: gRPC metadata
carries it (`cairn.telemetry.grpc_otel`), NATS headers and event envelopes carry it
(`inject`, `extract`, `span_from_headers`). A process calls `setup` once at start and
`shutdown` at exit (cairn.service does both). Metrics live in `cairn.telemetry.metrics`;
grpc_otel and metrics are imported on their own so processes that need neither stay light.
"""

from cairn.telemetry.logs import TraceContextFilter
from cairn.telemetry.logs import configure as configure_logging
from cairn.telemetry.propagation import extract, inject, span_from_headers
from cairn.telemetry.tracing import configured, setup, shutdown, tracer

__all__ = [
    "TraceContextFilter",
    "configure_logging",
    "configured",
    "extract",
    "inject",
    "setup",
    "shutdown",
    "span_from_headers",
    "tracer",
]
