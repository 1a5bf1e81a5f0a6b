"""The envelope every event travels in, and the subject it is published on.

An envelope carries what any reader needs without knowing the event's class: who it is
about (aggregate, aggregate_id), where it sits in that aggregate's history (version,
1-based), when it happened, the trace it belongs to (W3C traceparent/tracestate), and the
event's own fields (payload).
"""

from __future__ import annotations

import functools
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate
from opentelemetry.context import Context

from cairn.errors import InvalidArgument
from cairn.events.bus import SUBJECT_PREFIX

if TYPE_CHECKING:
    from cairn.events.types import Event

_AGGREGATE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Characters kept as they are in a subject token; anything else is %XX-escaped (and so is
# '%' itself), which keeps the mapping one-to-one: two ids never share a subject.
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_ALL_SAFE = re.compile(r"[A-Za-z0-9_-]+")


@functools.lru_cache(maxsize=256)
def _valid_aggregate(aggregate: str) -> bool:
    return bool(_AGGREGATE.fullmatch(aggregate))


def check_aggregate(aggregate: str) -> str:
    if not isinstance(aggregate, str) or not _valid_aggregate(aggregate):
        raise InvalidArgument(
            f"aggregate name {aggregate!r} must be lowercase letters, digits or '_'"
        )
    return aggregate


def subject_token(aggregate_id: str) -> str:
    """The aggregate id as one NATS subject token (no '.', '*', '>' or spaces)."""
    if not isinstance(aggregate_id, str) or not aggregate_id:
        raise InvalidArgument("an aggregate id must be a non-empty string")
    if _ALL_SAFE.fullmatch(aggregate_id):
        return aggregate_id
    out = []
    for c in aggregate_id:
        if c in _SAFE:
            out.append(c)
        else:
            out.extend(f"%{b:02X}" for b in c.encode())
    return "".join(out)


def subject_for(aggregate: str, aggregate_id: str) -> str:
    """`cairn.events.<aggregate>.<aggregate id as a token>`."""
    return f"{SUBJECT_PREFIX}.{check_aggregate(aggregate)}.{subject_token(aggregate_id)}"


def aggregate_subjects(aggregate: str) -> str:
    """The wildcard subject of every instance of one aggregate."""
    return f"{SUBJECT_PREFIX}.{check_aggregate(aggregate)}.*"


def current_trace() -> dict[str, str]:
    """The active trace context as W3C headers (empty when no span is active)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@dataclass(frozen=True, slots=True)
class Envelope:
    event_id: str
    type: str
    aggregate: str
    aggregate_id: str
    version: int
    occurred_at: float
    trace: dict[str, str] = field(default_factory=dict)
    payload: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def wrap(
        cls,
        event: Event,
        aggregate_id: str,
        version: int,
        *,
        trace: dict[str, str] | None = None,
        event_id: str | None = None,
        occurred_at: float | None = None,
    ) -> Envelope:
        """An envelope for `event`, stamped with a new id, the time and the current trace."""
        return cls(
            event_id=event_id or str(uuid.uuid4()),
            type=event.type_name(),
            aggregate=check_aggregate(event.aggregate),
            aggregate_id=aggregate_id,
            version=version,
            occurred_at=time.time() if occurred_at is None else occurred_at,
            trace=current_trace() if trace is None else dict(trace),
            payload=event.to_payload(),
        )

    def with_version(self, version: int) -> Envelope:
        return replace(self, version=version)

    def event(self) -> Event:
        """The typed event (an UnknownEvent for a type this process does not know)."""
        from cairn.events.types import event_from

        return event_from(self)

    def trace_context(self) -> Context:
        """The context of the trace the event was appended in, to parent follow-up spans."""
        return propagate.extract(self.trace)
