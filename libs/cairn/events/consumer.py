"""Durable consumers: at-least-once handling of events, with bounded, delayed redelivery.

A Consumer pulls batches from a durable JetStream consumer (explicit acks) and calls its
handler once per event, in stream order. The verdict follows Cairn's error vocabulary:

- the handler returns: ack.
- it raises a TemporaryError (or an unexpected exception): nak with a growing delay
  (`retry_delays`), so the event comes back later; after `max_deliver` deliveries the
  event is terminated and logged instead of retried forever.
- it raises a PermanentError, or the message cannot be decoded (poison): term at once and
  log; retrying would fail the same way.

A handler that is still working when half of `ack_wait` has passed tells JetStream so
(in-progress acks), so slow work is not redelivered behind its back; a handler that dies
with its process is redelivered after `ack_wait`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from opentelemetry import trace

from cairn.errors import PermanentError, TemporaryError, UnavailableError
from cairn.events import codec
from cairn.events.bus import ConsumerSpec, Delivery, PullConsumer
from cairn.events.envelope import Envelope
from cairn.events.store import EventStore
from cairn.events.types import Event, UnknownEvent

log = logging.getLogger(__name__)
tracer = trace.get_tracer("cairn.events")

Handler = Callable[[Event | UnknownEvent, Envelope], Awaitable[None]]


@dataclass
class ConsumerStats:
    acked: int = 0
    naked: int = 0
    terminated: int = 0

    @property
    def handled(self) -> int:
        return self.acked + self.naked + self.terminated


class Consumer:
    """Runs `handler` for every event on `filter_subject` through the durable `durable`."""

    def __init__(
        self,
        store: EventStore,
        durable: str,
        handler: Handler,
        *,
        filter_subject: str | None = None,
        ack_wait: float = 30.0,
        max_deliver: int = 5,
        retry_delays: Sequence[float] = (1.0, 5.0, 30.0),
        ack_backoff: Sequence[float] = (),
        batch: int = 64,
        max_ack_pending: int = 1000,
        start_sequence: int = 1,
    ) -> None:
        if max_deliver < 1:
            raise ValueError("max_deliver must be at least 1")
        self.store = store
        self.handler = handler
        self.spec = ConsumerSpec(
            durable=durable,
            filter_subject=filter_subject or store.all_subjects,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            backoff=tuple(ack_backoff),
            max_ack_pending=max_ack_pending,
            start_sequence=start_sequence,
        )
        self.retry_delays = tuple(retry_delays) or (0.0,)
        self.batch = batch
        self.stats = ConsumerStats()
        self._pull: PullConsumer | None = None

    async def start(self) -> None:
        """Creates the durable consumer (or binds to the existing one)."""
        if self._pull is None:
            await self.store.ensure_stream()
            self._pull = await self.store.bus.pull_consumer(self.store.stream, self.spec)

    async def close(self) -> None:
        pull, self._pull = self._pull, None
        if pull is not None:
            await pull.close()

    async def run(self, stop: asyncio.Event | None = None, *, poll: float = 1.0) -> None:
        """Handles events until `stop` is set or the task is cancelled; waits out outages."""
        stop = stop or asyncio.Event()
        try:
            while not stop.is_set():
                try:
                    await self.process_batch(wait=poll)
                except UnavailableError as error:
                    log.warning("consumer %s: %s; waiting for the bus", self.spec.durable, error)
                    await self.store.bus.wait_connected(deadline=poll)
        finally:
            await self.close()

    async def process_batch(self, wait: float = 1.0) -> int:
        """Fetches and handles one batch; the number of deliveries handled (0 if idle)."""
        await self.start()
        assert self._pull is not None
        deliveries = await self._pull.fetch(self.batch, wait)
        for delivery in deliveries:
            await self.handle(delivery)
        return len(deliveries)

    async def handle(self, delivery: Delivery) -> None:
        raw = delivery.message
        try:
            envelope = codec.decode(raw.data)
            event = envelope.event()
        except codec.CodecError as error:
            log.error(
                "consumer %s: terminating poison message #%d on %s: %s",
                self.spec.durable,
                raw.sequence,
                raw.subject,
                error,
            )
            await self._term(delivery)
            return
        try:
            with tracer.start_as_current_span(
                f"{envelope.type} process",
                context=envelope.trace_context(),
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "nats",
                    "cairn.event.type": envelope.type,
                    "cairn.aggregate": envelope.aggregate,
                    "cairn.aggregate_id": envelope.aggregate_id,
                    "messaging.message.id": envelope.event_id,
                },
            ):
                await self._call(event, envelope, delivery)
        except PermanentError as error:
            log.error(
                "consumer %s: %s #%d failed for good, terminated: %s",
                self.spec.durable,
                envelope.type,
                raw.sequence,
                error,
            )
            await self._term(delivery)
        except Exception as error:  # temporary, or a bug that a later delivery may not hit
            if not isinstance(error, TemporaryError):
                log.exception(
                    "consumer %s: %s #%d raised", self.spec.durable, envelope.type, raw.sequence
                )
            await self._retry_later(delivery, envelope, error)
        else:
            await delivery.ack()
            self.stats.acked += 1

    async def _call(
        self, event: Event | UnknownEvent, envelope: Envelope, delivery: Delivery
    ) -> None:
        keepalive = _KeepAlive(delivery, self.spec.ack_wait / 2)
        try:
            await self.handler(event, envelope)
        finally:
            keepalive.stop()

    async def _retry_later(
        self, delivery: Delivery, envelope: Envelope, error: BaseException
    ) -> None:
        attempt = delivery.num_delivered
        if attempt >= self.spec.max_deliver:
            log.error(
                "consumer %s: giving up on %s #%d (%s %s) after %d deliveries: %s",
                self.spec.durable,
                envelope.type,
                delivery.message.sequence,
                envelope.aggregate,
                envelope.aggregate_id,
                attempt,
                error,
            )
            await self._term(delivery)
            return
        delay = self.retry_delays[min(attempt - 1, len(self.retry_delays) - 1)]
        log.warning(
            "consumer %s: %s #%d failed (delivery %d of %d), retrying in %gs: %s",
            self.spec.durable,
            envelope.type,
            delivery.message.sequence,
            attempt,
            self.spec.max_deliver,
            delay,
            error,
        )
        await delivery.nak(delay=delay or None)
        self.stats.naked += 1

    async def _term(self, delivery: Delivery) -> None:
        await delivery.term()
        self.stats.terminated += 1


class _KeepAlive:
    """Sends in-progress acks every `every` seconds while a handler runs.

    A timer rather than a task per message: most handlers finish long before the first
    tick, and a cancelled timer costs next to nothing.
    """

    def __init__(self, delivery: Delivery, every: float) -> None:
        self._delivery = delivery
        self._every = every
        self._loop = asyncio.get_running_loop()
        self._sending: asyncio.Task | None = None
        self._timer = self._loop.call_later(every, self._tick)

    def _tick(self) -> None:
        self._sending = self._loop.create_task(self._send())
        self._timer = self._loop.call_later(self._every, self._tick)

    async def _send(self) -> None:
        with contextlib.suppress(UnavailableError):
            await self._delivery.in_progress()

    def stop(self) -> None:
        self._timer.cancel()
        if self._sending is not None and not self._sending.done():
            self._sending.cancel()
