"""What the event store needs from a message bus, without naming the bus.

The event store, consumers, projections and the outbox speak to JetStream only through
this interface; cairn.events.jetstream implements it with nats-py, and nothing else in
Cairn imports `nats`. The header names are JetStream's, because the store's guarantees
(idempotent, optimistic appends) are JetStream's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cairn.errors import CairnError

# JetStream drops a message whose id it has seen within the stream's duplicate window.
MSG_ID = "Nats-Msg-Id"
# JetStream refuses a message unless the last one on its subject has this sequence (0: none).
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"

DEFAULT_STREAM = "CAIRN_EVENTS"
SUBJECT_PREFIX = "cairn.events"


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """The stream's shape; an existing stream of that name is reused as it is."""

    name: str = DEFAULT_STREAM
    subjects: tuple[str, ...] = (f"{SUBJECT_PREFIX}.>",)
    max_age: float = 0.0  # seconds; 0 keeps events forever
    num_replicas: int = 1
    # How long JetStream remembers message ids. An outboxed event may be re-sent after a
    # crash and a restart, so this is longer than JetStream's 2-minute default.
    duplicate_window: float = 900.0
    memory: bool = False  # file storage unless a test asks otherwise


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One stored message, as the stream holds it."""

    sequence: int
    subject: str
    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PublishAck:
    sequence: int
    duplicate: bool = False  # the stream already held a message with this id (at `sequence`)


@dataclass(frozen=True, slots=True)
class Outgoing:
    subject: str
    data: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """A durable pull consumer with explicit acks and bounded redelivery."""

    durable: str
    filter_subject: str = f"{SUBJECT_PREFIX}.>"
    ack_wait: float = 30.0
    max_deliver: int = 5
    # Redelivery delays after an ack timeout (JetStream's BackOff); needs fewer entries than
    # max_deliver. Naks from a handler carry their own delay.
    backoff: tuple[float, ...] = ()
    max_ack_pending: int = 1000
    start_sequence: int = 1  # where a new durable starts; an existing one keeps its place


class Delivery(Protocol):
    """A message handed out by a durable consumer, waiting for its verdict."""

    message: RawMessage
    num_delivered: int  # 1 on the first delivery
    num_pending: int  # messages after this one not yet delivered

    async def ack(self) -> None: ...

    async def nak(self, delay: float | None = None) -> None: ...

    async def term(self) -> None: ...

    async def in_progress(self) -> None: ...


class PullConsumer(Protocol):
    async def fetch(self, batch: int, wait: float) -> list[Delivery]:
        """Up to `batch` deliveries available now; if there are none, the first to come
        within `wait` seconds; an empty list if none came."""
        ...

    async def close(self) -> None: ...


class EventBus(Protocol):
    """The operations the event store makes on a JetStream-like bus.

    Every method raises cairn errors only: UnavailableError when the bus cannot be reached
    or does not answer in time, ConflictError when an expected last subject sequence does
    not hold.
    """

    @property
    def connected(self) -> bool: ...

    async def wait_connected(self, deadline: float | None = None) -> bool: ...

    async def ensure_stream(self, spec: StreamSpec) -> None: ...

    async def publish(
        self,
        subject: str,
        data: bytes,
        headers: Mapping[str, str],
        publish_timeout: float | None = None,
    ) -> PublishAck: ...

    async def publish_many(
        self, messages: Sequence[Outgoing], publish_timeout: float | None = None
    ) -> list[PublishAck | CairnError]: ...

    async def last_message(self, stream: str, subject: str) -> RawMessage | None: ...

    async def message(self, stream: str, sequence: int) -> RawMessage | None: ...

    async def last_sequence(self, stream: str) -> int: ...

    async def delete_stream(self, stream: str) -> None: ...

    def replay(
        self,
        stream: str,
        filter_subject: str,
        start_sequence: int = 1,
        *,
        batch: int = 256,
        follow: bool = False,
        until: int | None = None,
    ) -> AsyncIterator[list[RawMessage]]: ...

    async def pull_consumer(self, stream: str, spec: ConsumerSpec) -> PullConsumer: ...

    async def delete_consumer(self, stream: str, durable: str) -> None: ...

    async def close(self) -> None: ...
