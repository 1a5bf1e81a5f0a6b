"""Log lines that say which service wrote them and which trace they belong to.

`configure` puts one handler on the root logger: one line per record on stderr, each with the
service name and the current trace id and span id, so a line found in any process's log leads
to the whole trace in Jaeger or Tempo (and a trace id found there leads back to the lines).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from opentelemetry import trace

from cairn.errors import ConfigError

__all__ = ["LINE_FORMAT", "OneLineFormatter", "TraceContextFilter", "configure"]

LINE_FORMAT = (
    "%(asctime)s %(levelname)s %(service)s %(name)s "
    "trace_id=%(trace_id)s span_id=%(span_id)s %(message)s"
)
NO_TRACE = "-"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_handler: logging.Handler | None = None


class TraceContextFilter(logging.Filter):
    """Adds `service`, `trace_id` and `span_id` to every record it sees (and drops none)."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.service = self.service
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        else:
            record.trace_id = record.span_id = NO_TRACE
        return True


class OneLineFormatter(logging.Formatter):
    """Keeps a record on one line: tracebacks and multi-line messages have their breaks escaped,
    so log shippers never split a record in two."""

    def format(self, record: logging.LogRecord) -> str:
        for attr, default in (("service", "-"), ("trace_id", NO_TRACE), ("span_id", NO_TRACE)):
            if not hasattr(record, attr):  # a record that bypassed the filter
                setattr(record, attr, default)
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (test runners swap it), not at setup."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    name = str(level).strip().upper()
    if name not in LEVELS:
        raise ConfigError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    return logging.getLevelName(name)


def configure(
    service: str, level: str | int = "INFO", stream: TextIO | None = None
) -> logging.Handler:
    """Routes the root logger to one trace-aware handler; calling it again replaces that
    handler rather than adding a second. Returns the handler."""
    global _handler
    numeric = parse_level(level)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.addFilter(TraceContextFilter(service))
    handler.setFormatter(OneLineFormatter(LINE_FORMAT))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(numeric)
    _handler = handler
    return handler
