"""The process's OpenTelemetry tracing: one global TracerProvider and where its spans go.

`setup` picks the exporter from the configured endpoint: OTLP/gRPC (Jaeger, Tempo) for an
http(s):// or host:port address, the console for "console", a JSON-lines file for
"file:///path" or `span_file` (local work and tests), nothing otherwise. Spans are created
either way, so trace ids still reach log lines, gRPC metadata and NATS headers.

OpenTelemetry lets a process set its global provider once, so the provider (and with it the
`service.name` resource) is installed by the first `setup`. The exporters hang off one fan-out
processor of ours instead, which is why `shutdown` can flush and close them and a later
`setup` (a test running a second service in the same process) can attach fresh ones.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from cairn.errors import ConfigError
from cairn.telemetry import logs

__all__ = ["JsonLinesSpanExporter", "configured", "setup", "shutdown", "span_record", "tracer"]


def span_record(span: ReadableSpan) -> dict:
    """One span as a flat JSON-able dict: hex ids, unix-nanosecond times, resource attributes."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent else None,
        "parent_remote": bool(parent and parent.is_remote),
        "kind": span.kind.name,
        "start_time": span.start_time,
        "end_time": span.end_time,
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": e.name, "time": e.timestamp, "attributes": dict(e.attributes or {})}
            for e in span.events
        ],
        "resource": dict(span.resource.attributes) if span.resource else {},
        "scope": span.instrumentation_scope.name if span.instrumentation_scope else None,
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per span to a file.

    Each batch is a single append, so several processes may share a file without tearing lines.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        text = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._closed = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class _FanOut(SpanProcessor):
    """Hands spans to the processors of the current setup; empty between shutdown and setup."""

    def __init__(self) -> None:
        self.processors: tuple[SpanProcessor, ...] = ()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        for p in self.processors:
            p.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        for p in self.processors:
            p.on_end(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all([p.force_flush(timeout_millis) for p in self.processors])

    def shutdown(self) -> None:
        processors, self.processors = self.processors, ()
        for p in processors:
            p.shutdown()


_lock = threading.Lock()
_fanout = _FanOut()
_provider: TracerProvider | None = None
_active = False


def _processors(otlp_endpoint: str | None, span_file: str | None) -> list[SpanProcessor]:
    """The span processors an endpoint and span file ask for; ConfigError for a bad endpoint."""
    found: list[SpanProcessor] = []
    endpoint = (otlp_endpoint or "").strip()
    if endpoint.startswith("file://"):
        path = urlsplit(endpoint).path
        if not path:
            raise ConfigError(f"otlp endpoint {endpoint!r}: a file:// URL needs a path")
        found.append(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    elif endpoint == "console":
        # stderr: stdout belongs to the CLI's own output.
        found.append(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    elif endpoint:
        found.append(BatchSpanProcessor(_otlp_exporter(endpoint)))
    if span_file:
        found.append(SimpleSpanProcessor(JsonLinesSpanExporter(span_file)))
    return found


def _otlp_exporter(endpoint: str) -> SpanExporter:
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    if parts.scheme not in ("", "http", "https", "grpc") or not parts.hostname:
        raise ConfigError(
            f"otlp endpoint {endpoint!r}: expected http(s)://host:port, "
            "host:port, 'console' or file:///path"
        )
    try:
        port = parts.port
    except ValueError as error:
        raise ConfigError(f"otlp endpoint {endpoint!r}: {error}") from None
    # Imported here: it pulls in grpc, which processes without an exporter do not need.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    target = f"{host}:{port or 4317}"
    return OTLPSpanExporter(endpoint=target, insecure=parts.scheme != "https")


def _install_provider(service: str) -> TracerProvider:
    global _provider
    if _provider is None:
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            _provider = current  # someone (e.g. opentelemetry-instrument) got there first
        else:
            _provider = TracerProvider(
                resource=Resource.create({SERVICE_NAME: service}), shutdown_on_exit=False
            )
            trace.set_tracer_provider(_provider)
        _provider.add_span_processor(_fanout)
        # A process that never reaches shutdown() (an unhandled exit) still sends its spans.
        atexit.register(shutdown)
    return _provider


def setup(
    service: str,
    otlp_endpoint: str | None = None,
    log_level: str = "INFO",
    span_file: str | None = None,
) -> None:
    """Configures logging and tracing for this process; a second call changes nothing.

    After `shutdown`, a new call attaches new exporters and reconfigures logging; the
    provider's `service.name` stays the one of the first call (OpenTelemetry's rule).
    """
    global _active
    with _lock:
        if _active:
            return
        logs.parse_level(log_level)  # checked before exporters (and their threads) exist
        processors = _processors(otlp_endpoint, span_file)
        logs.configure(service, log_level)
        _install_provider(service)
        _fanout.processors = tuple(processors)
        _active = True


def shutdown() -> None:
    """Flushes pending spans and closes the exporters; safe to call more than once."""
    global _active
    with _lock:
        _fanout.force_flush()
        _fanout.shutdown()
        _active = False


def configured() -> bool:
    """True between `setup` and `shutdown`."""
    return _active


def tracer(name: str) -> trace.Tracer:
    """A tracer named after the calling module; works before setup (spans start once it runs)."""
    return trace.get_tracer(name)
