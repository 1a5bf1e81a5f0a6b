"""The event store: appends and reads aggregates' histories in one JetStream stream.

Each aggregate instance has its own subject, `cairn.events.<aggregate>.<id>`, so JetStream
itself keeps the two guarantees an event store needs:

- idempotence: every message carries `Nats-Msg-Id` = `<aggregate>.<id>:<version>`; a
  re-sent append (a retry after a timeout, an outbox replayed after a crash) is dropped by
  the stream's duplicate window instead of stored twice. The aggregate name is part of the
  id because the duplicate window is stream-wide: volume `x` and node `x` must not collide.
- optimistic concurrency: every message carries `Nats-Expected-Last-Subject-Sequence`, the
  stream sequence of the aggregate's last event as the writer saw it (0 for a new one);
  JetStream refuses the message when someone appended in between, and the writer gets
  ConflictError: reload, decide again, append again (`append_with_retry`).

A duplicate acknowledgement is checked against the stored event's id, so a writer whose
version was taken by another writer (same message id, different event) gets ConflictError,
never a silent success.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from cairn.errors import CairnError, ConflictError, InvalidArgument, UnavailableError
from cairn.events import codec
from cairn.events.bus import (
    DEFAULT_STREAM,
    EXPECTED_LAST_SUBJECT_SEQUENCE,
    MSG_ID,
    SUBJECT_PREFIX,
    EventBus,
    Outgoing,
    RawMessage,
    StreamSpec,
)
from cairn.events.envelope import Envelope, check_aggregate, subject_token
from cairn.events.types import Event, UnknownEvent
from cairn.retry import Backoff, retry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class History:
    """An aggregate's events in order, and the stream sequence of the last one (0: none)."""

    aggregate: str
    aggregate_id: str
    envelopes: list[Envelope]
    sequence: int

    @property
    def version(self) -> int:
        return self.envelopes[-1].version if self.envelopes else 0

    def events(self) -> list[Event | UnknownEvent]:
        return [e.event() for e in self.envelopes]

    def __iter__(self):
        return iter(self.envelopes)

    def __len__(self) -> int:
        return len(self.envelopes)


@dataclass(frozen=True)
class Appended:
    """What an append wrote: the envelopes (versions set) and where the last one landed.

    `outboxed` appends are durable on local disk but not in the stream yet: their
    `sequence` is 0 and their versions are final only once the outbox drains.
    """

    aggregate: str
    aggregate_id: str
    envelopes: list[Envelope]
    version: int
    sequence: int
    outboxed: bool = False


@dataclass(frozen=True)
class AppendRequest:
    """One aggregate's share of an `append_many`."""

    aggregate: str
    aggregate_id: str
    events: Sequence[Event]
    expected_version: int | None = None
    expected_sequence: int | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    """A stored message read back: its stream sequence and envelope (None if undecodable)."""

    sequence: int
    subject: str
    envelope: Envelope | None
    error: str = ""


class AppendInterrupted(UnavailableError):
    """The bus went away in the middle of an append.

    `published` made it into the stream; the first of `unpublished` may or may not have
    (its publish was not acknowledged), published after the message at `after_sequence`.
    """

    def __init__(
        self,
        message: str,
        *,
        published: list[Envelope],
        unpublished: list[Envelope],
        after_sequence: int,
    ) -> None:
        super().__init__(message)
        self.published = published
        self.unpublished = unpublished
        self.after_sequence = after_sequence


@dataclass
class _Last:
    version: int = 0
    sequence: int = 0
    event_id: str = ""


@dataclass
class _Pending:
    subject: str
    envelopes: list[Envelope]
    after: int
    published: int = 0
    error: CairnError | None = field(default=None)


class EventStore:
    """Appends to and reads from Cairn's event stream through an EventBus."""

    def __init__(
        self,
        bus: EventBus,
        stream: str = DEFAULT_STREAM,
        *,
        subject_prefix: str = SUBJECT_PREFIX,
        max_age: float = 0.0,
        num_replicas: int = 1,
        duplicate_window: float = 900.0,
        memory: bool = False,
        publish_timeout: float | None = None,
    ) -> None:
        self.bus = bus
        self.prefix = subject_prefix
        self.spec = StreamSpec(
            name=stream,
            subjects=(f"{subject_prefix}.>",),
            max_age=max_age,
            num_replicas=num_replicas,
            duplicate_window=duplicate_window,
            memory=memory,
        )
        self.publish_timeout = publish_timeout
        self._ready = False
        self._ready_lock = asyncio.Lock()

    @property
    def stream(self) -> str:
        return self.spec.name

    @property
    def all_subjects(self) -> str:
        return f"{self.prefix}.>"

    def subject(self, aggregate: str, aggregate_id: str) -> str:
        return f"{self.prefix}.{check_aggregate(aggregate)}.{subject_token(aggregate_id)}"

    def aggregate_subjects(self, aggregate: str) -> str:
        """The wildcard subject of every instance of one aggregate (for consumers)."""
        return f"{self.prefix}.{check_aggregate(aggregate)}.*"

    async def ensure_stream(self) -> None:
        """Creates the stream on first use (file storage), or adopts the existing one."""
        if self._ready:
            return
        async with self._ready_lock:
            if not self._ready:
                await self.bus.ensure_stream(self.spec)
                self._ready = True

    # -- appending ---------------------------------------------------------------------

    async def append(
        self,
        aggregate: str,
        aggregate_id: str,
        events: Event | Sequence[Event],
        expected_version: int | None,
        *,
        expected_sequence: int | None = None,
        trace: dict[str, str] | None = None,
        publish_timeout: float | None = None,
    ) -> Appended:
        """Appends events after `expected_version` of the aggregate (None: after whatever is
        there). ConflictError when the aggregate moved on; UnavailableError when the bus is
        down (AppendInterrupted if it went down half-way through several events).

        Pass `expected_sequence` (History.sequence) to save a read when you just loaded.
        The events of one call are published one after the other, each conditional on the
        previous one; they are not atomic as a group.
        """
        batch = check_events(events, aggregate)
        await self.ensure_stream()
        subject = self.subject(aggregate, aggregate_id)
        if expected_version is None or expected_sequence is None:
            last = await self._last(subject)
            if expected_version is None:
                expected_version = last.version
            elif last.version != expected_version:
                raise ConflictError(
                    f"{aggregate} {aggregate_id} is at version {last.version}, "
                    f"not {expected_version}: reload and retry"
                )
            expected_sequence = last.sequence
        envelopes = [
            Envelope.wrap(e, aggregate_id, expected_version + i + 1, trace=trace)
            for i, e in enumerate(batch)
        ]
        after = expected_sequence
        for i, envelope in enumerate(envelopes):
            try:
                after = await self.publish_envelope(
                    envelope, after, publish_timeout=publish_timeout
                )
            except UnavailableError as error:
                self._ready = False  # the stream may be gone too: check it on the next call
                raise AppendInterrupted(
                    str(error),
                    published=envelopes[:i],
                    unpublished=envelopes[i:],
                    after_sequence=after,
                ) from error
        version = envelopes[-1].version if envelopes else expected_version
        return Appended(aggregate, aggregate_id, envelopes, version, after)

    async def publish_envelope(
        self, envelope: Envelope, after_sequence: int, *, publish_timeout: float | None = None
    ) -> int:
        """Publishes one ready envelope after the aggregate's message at `after_sequence`;
        its stream sequence. Re-publishing the same envelope is harmless (deduplicated)."""
        await self.ensure_stream()
        subject = self.subject(envelope.aggregate, envelope.aggregate_id)
        ack = await self.bus.publish(
            subject,
            codec.encode(envelope),
            self.headers(envelope, after_sequence),
            publish_timeout=publish_timeout or self.publish_timeout,
        )
        if ack.duplicate:
            await self._check_duplicate(envelope, ack.sequence)
        return ack.sequence

    def headers(self, envelope: Envelope, after_sequence: int) -> dict[str, str]:
        headers = {
            MSG_ID: self.msg_id(envelope),
            EXPECTED_LAST_SUBJECT_SEQUENCE: str(after_sequence),
        }
        # The trace also rides in NATS headers, for tools that read only those. Nothing else
        # does: every header is stored and parsed again by every consumer.
        headers.update((k, v) for k, v in envelope.trace.items() if k not in headers)
        return headers

    @staticmethod
    def msg_id(envelope: Envelope) -> str:
        return f"{envelope.aggregate}.{subject_token(envelope.aggregate_id)}:{envelope.version}"

    async def _check_duplicate(self, envelope: Envelope, sequence: int) -> None:
        """A duplicate ack is a success only if the stored message is this very event."""
        stored = await self.bus.message(self.stream, sequence)
        if stored is not None and _event_id(stored) == envelope.event_id:
            log.info(
                "%s %s version %d was already stored (#%d): not stored again",
                envelope.aggregate,
                envelope.aggregate_id,
                envelope.version,
                sequence,
            )
            return
        raise ConflictError(
            f"{envelope.aggregate} {envelope.aggregate_id} version "
            f"{envelope.version} was written by another writer: reload and retry"
        )

    async def append_with_retry(
        self,
        aggregate: str,
        aggregate_id: str,
        decide: Callable[[History], Sequence[Event] | Awaitable[Sequence[Event]]],
        *,
        deadline: float | None = 10.0,
        attempts: int | None = None,
    ) -> Appended:
        """Load, decide, append; on ConflictError reload and decide again (cairn.retry).

        `decide` gets the aggregate's History and returns the events to append (maybe none).
        """

        async def attempt() -> Appended:
            history = await self.load(aggregate, aggregate_id)
            decided = decide(history)
            if inspect.isawaitable(decided):
                decided = await decided
            events = list(decided or ())
            if not events:
                return Appended(aggregate, aggregate_id, [], history.version, history.sequence)
            return await self.append(
                aggregate, aggregate_id, events, history.version, expected_sequence=history.sequence
            )

        return await retry(
            attempt,
            deadline=deadline,
            attempts=attempts,
            retry_on=(ConflictError,),
            backoff=Backoff(initial=0.005, maximum=0.5),
        )

    async def append_many(
        self,
        requests: Sequence[AppendRequest],
        *,
        publish_timeout: float | None = None,
    ) -> list[Appended | CairnError]:
        """Appends to many aggregates at once, pipelining their publishes.

        Every aggregate keeps its own optimistic chain: the n-th events of all requests go
        out together (without waiting for each other's acks), then the (n+1)-th. One result
        per request, in order: the Appended, or the error that stopped that request.
        """
        seen = set()
        for r in requests:
            key = (r.aggregate, r.aggregate_id)
            if key in seen:
                raise InvalidArgument(f"append_many names {r.aggregate} {r.aggregate_id} twice")
            seen.add(key)
        await self.ensure_stream()
        pending = [self._prepare_known(r) for r in requests]
        unknown = [i for i, p in enumerate(pending) if p is None]
        if unknown:  # read the aggregates' last events concurrently
            found = await asyncio.gather(*(self._prepare(requests[i]) for i in unknown))
            for i, p in zip(unknown, found, strict=True):
                pending[i] = p
        wave = 0
        while True:
            live = [p for p in pending if p.error is None and wave < len(p.envelopes)]
            if not live:
                break
            outgoing = [
                Outgoing(
                    p.subject,
                    codec.encode(p.envelopes[wave]),
                    self.headers(p.envelopes[wave], p.after),
                )
                for p in live
            ]
            acks = await self.bus.publish_many(
                outgoing, publish_timeout=publish_timeout or self.publish_timeout
            )
            for p, ack in zip(live, acks, strict=True):
                if isinstance(ack, CairnError):
                    p.error = ack
                    continue
                if ack.duplicate:
                    try:
                        await self._check_duplicate(p.envelopes[wave], ack.sequence)
                    except CairnError as error:
                        p.error = error
                        continue
                p.after = ack.sequence
                p.published += 1
            wave += 1
        results: list[Appended | CairnError] = []
        for r, p in zip(requests, pending, strict=True):
            if p.error is not None:
                results.append(p.error)
            else:
                version = p.envelopes[-1].version if p.envelopes else r.expected_version or 0
                results.append(Appended(r.aggregate, r.aggregate_id, p.envelopes, version, p.after))
        return results

    def _prepare_known(self, r: AppendRequest) -> _Pending | None:
        """The request ready to publish, if it names both its version and sequence."""
        if r.expected_version is None or r.expected_sequence is None:
            return None
        envelopes = [
            Envelope.wrap(e, r.aggregate_id, r.expected_version + i + 1)
            for i, e in enumerate(check_events(r.events, r.aggregate))
        ]
        return _Pending(self.subject(r.aggregate, r.aggregate_id), envelopes, r.expected_sequence)

    async def _prepare(self, r: AppendRequest) -> _Pending:
        subject = self.subject(r.aggregate, r.aggregate_id)
        events = check_events(r.events, r.aggregate)
        version, after = r.expected_version, r.expected_sequence
        if version is None or after is None:
            try:
                last = await self._last(subject)
            except CairnError as error:
                return _Pending(subject, [], 0, error=error)
            if version is not None and last.version != version:
                return _Pending(
                    subject,
                    [],
                    0,
                    error=ConflictError(
                        f"{r.aggregate} {r.aggregate_id} is at version {last.version}, not {version}"
                    ),
                )
            version, after = last.version, last.sequence
        envelopes = [
            Envelope.wrap(e, r.aggregate_id, version + i + 1) for i, e in enumerate(events)
        ]
        return _Pending(subject, envelopes, after)

    # -- reading ------------------------------------------------------------------------

    async def _last(self, subject: str) -> _Last:
        raw = await self.bus.last_message(self.stream, subject)
        if raw is None:
            return _Last()
        envelope = codec.decode(raw.data)
        return _Last(envelope.version, raw.sequence, envelope.event_id)

    async def last_envelope(self, aggregate: str, aggregate_id: str) -> Recorded | None:
        """The aggregate's newest event, in one read."""
        await self.ensure_stream()
        raw = await self.bus.last_message(self.stream, self.subject(aggregate, aggregate_id))
        return None if raw is None else _recorded(raw)

    async def load(self, aggregate: str, aggregate_id: str) -> History:
        """The aggregate's events in order and the stream sequence of the last one."""
        await self.ensure_stream()
        subject = self.subject(aggregate, aggregate_id)
        last = await self.bus.last_message(self.stream, subject)
        if last is None:
            return History(aggregate, aggregate_id, [], 0)
        newest = codec.decode(last.data)
        if newest.version <= 1:  # a one-event history needs no replay
            return History(aggregate, aggregate_id, [newest], last.sequence)
        envelopes: list[Envelope] = []
        async with aclosing(
            self.bus.replay(
                self.stream, subject, 1, until=last.sequence, batch=min(newest.version, 1024)
            )
        ) as batches:
            async for batch in batches:
                for raw in batch:
                    if raw.sequence > last.sequence:  # appended after we looked: not ours
                        break
                    envelopes.append(codec.decode(raw.data))
                if batch[-1].sequence >= last.sequence:
                    break
        return History(aggregate, aggregate_id, envelopes, last.sequence)

    async def contains(self, envelope: Envelope, after_sequence: int = 0) -> int:
        """The stream sequence of this very event (by event id) on its aggregate's subject
        after `after_sequence`, or 0 if it is not there."""
        await self.ensure_stream()
        subject = self.subject(envelope.aggregate, envelope.aggregate_id)
        async with aclosing(self.bus.replay(self.stream, subject, after_sequence + 1)) as it:
            async for batch in it:
                for raw in batch:
                    if _event_id(raw) == envelope.event_id:
                        return raw.sequence
        return 0

    async def last_sequence(self) -> int:
        """The stream's last sequence (0 when empty): where a replay is complete."""
        await self.ensure_stream()
        return await self.bus.last_sequence(self.stream)

    async def read_batches(
        self,
        from_sequence: int = 1,
        *,
        follow: bool = False,
        filter_subject: str | None = None,
        batch: int = 256,
    ) -> AsyncIterator[list[Recorded]]:
        """Stored events from `from_sequence` on, in stream order, a batch at a time.

        Undecodable messages come as Recorded with envelope None (and `error`), so that a
        reader can step over them without losing its place.
        """
        await self.ensure_stream()
        async with aclosing(
            self.bus.replay(
                self.stream,
                filter_subject or self.all_subjects,
                from_sequence,
                batch=batch,
                follow=follow,
            )
        ) as it:
            async for raws in it:
                yield [_recorded(raw) for raw in raws]

    async def read_all(
        self, from_sequence: int = 1, *, follow: bool = False, filter_subject: str | None = None
    ) -> AsyncIterator[Recorded]:
        """Every decodable event from `from_sequence` on (poison messages are logged)."""
        async with aclosing(
            self.read_batches(from_sequence, follow=follow, filter_subject=filter_subject)
        ) as batches:
            async for batch in batches:
                for rec in batch:
                    if rec.envelope is None:
                        log.error(
                            "skipping undecodable event #%d on %s: %s",
                            rec.sequence,
                            rec.subject,
                            rec.error,
                        )
                        continue
                    yield rec


def check_events(events: Event | Iterable[Event], aggregate: str) -> list[Event]:
    batch = [events] if isinstance(events, Event) else list(events)
    check_aggregate(aggregate)
    for e in batch:
        if not isinstance(e, Event):
            raise InvalidArgument(f"{e!r} is not a Cairn event")
        if e.aggregate != aggregate:
            raise InvalidArgument(f"{e.type_name()} belongs to {e.aggregate!r}, not {aggregate!r}")
    return batch


def _event_id(raw: RawMessage) -> str | None:
    try:
        return codec.decode(raw.data).event_id
    except codec.CodecError:
        return None


def _recorded(raw: RawMessage) -> Recorded:
    try:
        return Recorded(raw.sequence, raw.subject, codec.decode(raw.data))
    except codec.CodecError as error:
        return Recorded(raw.sequence, raw.subject, None, str(error))
