"""The JetStream adapter: the one module in Cairn that imports `nats`.

It implements cairn.events.bus.EventBus with nats-py and turns every nats error into the
cairn vocabulary at this edge: a server that is down or slow is UnavailableError, a broken
optimistic check (JetStream error 10071, wrong last sequence) is ConflictError.

The connection reconnects forever: an outage of the bus is waited out, never fatal. While
it is disconnected, operations fail fast with UnavailableError instead of queueing in the
client's reconnect buffer, so callers (the outbox) know at once where their event went.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from cairn.config import redact
from cairn.errors import (
    CairnError,
    ConfigError,
    ConflictError,
    FailedPrecondition,
    NotFound,
    UnavailableError,
)
from cairn.events.bus import ConsumerSpec, Delivery, Outgoing, PublishAck, RawMessage, StreamSpec

log = logging.getLogger(__name__)

WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-sequence check
STREAM_NAME_IN_USE = 10058


class JetStreamBus:
    """An EventBus over one NATS connection with JetStream."""

    def __init__(
        self,
        url: str,
        *,
        name: str = "cairn",
        timeout: float = 5.0,
        reconnect_wait: float = 0.5,
        max_pending_acks: int = 4000,
    ) -> None:
        self.url = url
        self.name = name
        self.timeout = timeout
        self._reconnect_wait = reconnect_wait
        self._nc = nats.NATS()
        self._js = self._nc.jetstream(timeout=timeout, publish_async_max_pending=max_pending_acks)
        self._up = asyncio.Event()
        self._connect_task: asyncio.Task | None = None
        self._direct: dict[str, bool] = {}  # stream -> allows direct gets
        self._outage_logged = False

    @classmethod
    async def connect(cls, url: str, *, wait: bool = True, **options: Any) -> JetStreamBus:
        """A connected bus. With wait=False it returns at once and keeps connecting in the
        background (callers see UnavailableError, or an outbox absorbs appends, until then)."""
        bus = cls(url, **options)
        await bus.start(wait=wait)
        return bus

    async def start(self, *, wait: bool = True) -> None:
        options = dict(
            servers=[self.url],
            name=self.name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=self._reconnect_wait,
            connect_timeout=max(1, int(min(self.timeout, 2))),
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_connected,
            closed_cb=self._on_closed,
        )
        try:
            self._connect_task = asyncio.create_task(self._nc.connect(**options))
        except (ValueError, nats.errors.Error) as error:
            raise ConfigError(f"NATS URL {redact(self.url)}: {error}") from None
        if not wait:
            self._connect_task.add_done_callback(self._connected_in_background)
            return
        done, _ = await asyncio.wait({self._connect_task}, timeout=self.timeout)
        if not done:
            await self.close()
            raise UnavailableError(
                f"cannot reach NATS at {redact(self.url)} within {self.timeout:g}s: "
                "is nats-server running (with -js)?"
            )
        try:
            self._connect_task.result()
        except Exception as error:
            await self.close()
            raise _translate(error, f"connecting to {redact(self.url)}") from error
        self._up.set()

    def _connected_in_background(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        if task.exception() is None:
            self._up.set()
            log.info("connected to NATS at %s", redact(self.url))
        else:
            log.error("cannot connect to NATS at %s: %s", redact(self.url), task.exception())

    # -- connection state ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._nc.is_connected and self._up.is_set()

    async def wait_connected(self, deadline: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._up.wait(), deadline)
        except TimeoutError:
            return False
        return self._nc.is_connected

    async def _on_error(self, error: Exception) -> None:
        # The client reports every failed reconnect attempt; one line per outage is enough.
        if not self._outage_logged:
            log.warning("NATS at %s: %s", redact(self.url), error or type(error).__name__)
            self._outage_logged = True
        else:
            log.debug("NATS at %s: %s", redact(self.url), error)

    async def _on_disconnected(self) -> None:
        if self._up.is_set():
            log.warning("disconnected from NATS at %s; reconnecting", redact(self.url))
        self._up.clear()

    async def _on_connected(self) -> None:
        self._outage_logged = False
        self._up.set()
        log.info("reconnected to NATS at %s", redact(self.url))

    async def _on_closed(self) -> None:
        self._up.clear()

    def _require(self, what: str) -> None:
        if not self.connected:
            raise UnavailableError(f"NATS at {redact(self.url)} is not connected ({what})")

    async def close(self) -> None:
        self._up.clear()
        task, self._connect_task = self._connect_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not self._nc.is_closed:
            try:
                await self._nc.close()
            except Exception as error:  # closing a half-open client must not mask the cause
                log.debug("closing NATS connection: %s", error)

    # -- streams -----------------------------------------------------------------------

    async def ensure_stream(self, spec: StreamSpec) -> None:
        self._require(f"stream {spec.name}")
        jsm = self._js._jsm
        try:
            info = await jsm.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            info = None
        except Exception as error:
            raise _translate(error, f"looking up stream {spec.name}") from error
        if info is None:
            try:
                info = await jsm.add_stream(_stream_config(spec))
                log.info("created stream %s for %s", spec.name, ", ".join(spec.subjects))
            except nats.js.errors.BadRequestError as error:
                if error.err_code != STREAM_NAME_IN_USE:  # else another process won the race
                    raise _translate(error, f"creating stream {spec.name}") from error
                info = await jsm.stream_info(spec.name)
            except Exception as error:
                raise _translate(error, f"creating stream {spec.name}") from error
        self._direct[spec.name] = bool(info.config.allow_direct)

    async def last_sequence(self, stream: str) -> int:
        self._require(f"stream {stream}")
        try:
            info = await self._js._jsm.stream_info(stream)
        except Exception as error:
            raise _translate(error, f"stream {stream}") from error
        return info.state.last_seq

    async def delete_stream(self, stream: str) -> None:
        """Deletes a stream and every event in it (benchmarks and tests only)."""
        self._require(f"stream {stream}")
        try:
            await self._js._jsm.delete_stream(stream)
        except nats.js.errors.NotFoundError:
            pass
        except Exception as error:
            raise _translate(error, f"deleting stream {stream}") from error
        self._direct.pop(stream, None)

    # -- publishing ------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        data: bytes,
        headers: Mapping[str, str],
        publish_timeout: float | None = None,
    ) -> PublishAck:
        self._require(f"publish to {subject}")
        limit = publish_timeout or self.timeout
        try:
            ack = await self._js.publish(subject, data, timeout=limit, headers=dict(headers))
        except Exception as error:
            raise _translate(error, f"publish to {subject}", limit) from error
        return PublishAck(ack.seq, bool(ack.duplicate))

    async def publish_many(
        self,
        messages: Sequence[Outgoing],
        publish_timeout: float | None = None,
    ) -> list[PublishAck | CairnError]:
        """Publishes all messages without waiting between them, then collects the acks."""
        timeout = publish_timeout or self.timeout
        self._require("publish")
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        futures: list[asyncio.Future | CairnError] = []
        try:
            # One deadline for the whole loop: a per-publish timeout (wait_stall) would cost a
            # task per message, and the loop would yield, flushing one message per write.
            async with asyncio.timeout_at(end):
                for m in messages:
                    try:
                        futures.append(
                            await self._js.publish_async(m.subject, m.data, headers=dict(m.headers))
                        )
                    except Exception as error:
                        futures.append(_translate(error, f"publish to {m.subject}", timeout))
        except TimeoutError:
            stalled = UnavailableError(
                f"NATS stalled: too many publishes unacknowledged for {timeout:g}s"
            )
            futures.extend([stalled] * (len(messages) - len(futures)))
        waiting = [f for f in futures if isinstance(f, asyncio.Future)]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=max(0.0, end - loop.time()))
            for f in late:
                f.cancel()
        results: list[PublishAck | CairnError] = []
        for m, f in zip(messages, futures, strict=True):
            if isinstance(f, CairnError):
                results.append(f)
            elif f.cancelled():
                results.append(
                    UnavailableError(
                        f"NATS did not acknowledge a publish to {m.subject} within {timeout:g}s"
                    )
                )
            elif f.exception() is not None:
                results.append(_translate(f.exception(), f"publish to {m.subject}", timeout))
            else:
                ack = f.result()
                results.append(PublishAck(ack.seq, bool(ack.duplicate)))
        return results

    # -- reading -----------------------------------------------------------------------------

    async def _allows_direct(self, stream: str) -> bool:
        if stream not in self._direct:
            try:
                info = await self._js._jsm.stream_info(stream)
            except Exception as error:
                raise _translate(error, f"stream {stream}") from error
            self._direct[stream] = bool(info.config.allow_direct)
        return self._direct[stream]

    async def last_message(self, stream: str, subject: str) -> RawMessage | None:
        self._require(f"read {subject}")
        return await self._get(stream, subject=subject)

    async def message(self, stream: str, sequence: int) -> RawMessage | None:
        self._require(f"read {stream} #{sequence}")
        return await self._get(stream, seq=sequence)

    async def _get(
        self, stream: str, *, seq: int | None = None, subject: str | None = None
    ) -> RawMessage | None:
        direct = await self._allows_direct(stream)
        try:
            raw = await self._js._jsm.get_msg(stream, seq=seq, subject=subject, direct=direct)
        except nats.js.errors.NotFoundError:
            return None
        except Exception as error:
            raise _translate(error, f"reading {subject or seq} from {stream}") from error
        headers = {
            k: v
            for k, v in (raw.headers or {}).items()
            if not k.startswith("Nats-") or k == "Nats-Msg-Id"
        }
        return RawMessage(raw.seq or 0, raw.subject or "", raw.data or b"", headers)

    async def replay(
        self,
        stream: str,
        filter_subject: str,
        start_sequence: int = 1,
        *,
        batch: int = 256,
        follow: bool = False,
        idle: float = 1.0,
        until: int | None = None,
    ) -> AsyncIterator[list[RawMessage]]:
        """Batches of stored messages from `start_sequence` on, in stream order.

        An ephemeral, unacknowledged pull consumer reads them. Without `follow` the
        iteration ends at the last message on `filter_subject` when it starts (or at
        sequence `until`); with it, it waits for more.

        The end is a sequence looked up first, not the consumer's pending count: nats-server
        2.9 miscounts that for filtered consumers, and then answers a no-wait pull with
        "no messages" while some are left. So a short no-wait pull before the end is
        followed by a waiting pull, which does find them.
        """
        self._require(f"replay {filter_subject}")
        if not follow and until is None:
            last = await self._get(stream, subject=filter_subject)
            until = last.sequence if last else 0
        if not follow and until < start_sequence:
            return
        name = "replay_" + self._nc._nuid.next().decode()
        config = api.ConsumerConfig(
            name=name,
            ack_policy=api.AckPolicy.NONE,
            filter_subject=filter_subject,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, start_sequence),
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=max(30.0, 4 * idle),
            max_waiting=16,
        )
        try:
            await self._js._jsm.add_consumer(stream, config)
        except Exception as error:
            raise _translate(error, f"replaying {filter_subject}") from error
        puller = await _Puller.open(self, stream, name)
        try:
            seen = start_sequence - 1
            while follow or seen < until:
                msgs = await puller.pull(batch)
                if not msgs:  # the end, or the server's miscount: a waiting pull tells
                    msgs = await puller.pull(1, wait=idle if follow else self.timeout)
                if not msgs:
                    if follow:
                        continue
                    log.debug(
                        "replay of %s ended at #%d before #%d (messages removed?)",
                        filter_subject,
                        seen,
                        until,
                    )
                    return
                seen = msgs[-1].metadata.sequence.stream
                yield [_raw(m) for m in msgs]
        finally:
            await puller.close()
            if self._nc.is_connected:  # fire and forget; inactive_threshold covers a miss
                try:
                    await self._nc.publish(f"$JS.API.CONSUMER.DELETE.{stream}.{name}")
                except Exception as error:
                    log.debug("removing consumer %s: %s", name, error)

    # -- durable consumers -------------------------------------------------------------

    async def pull_consumer(self, stream: str, spec: ConsumerSpec) -> _PullConsumer:
        self._require(f"consumer {spec.durable}")
        config = api.ConsumerConfig(
            name=spec.durable,
            durable_name=spec.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait,
            max_deliver=spec.max_deliver,
            backoff=list(spec.backoff) or None,
            filter_subject=spec.filter_subject,
            max_ack_pending=spec.max_ack_pending,
        )
        if spec.start_sequence > 1:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = spec.start_sequence
        jsm = self._js._jsm
        try:
            await jsm.add_consumer(stream, config)
        except nats.js.errors.BadRequestError as error:
            # An existing durable with another configuration keeps it (and its position).
            log.warning(
                "consumer %s exists with another configuration (%s); using it as it is",
                spec.durable,
                error.description,
            )
            try:
                await jsm.consumer_info(stream, spec.durable)
            except Exception as inner:
                raise _translate(inner, f"consumer {spec.durable}") from inner
        except Exception as error:
            raise _translate(error, f"creating consumer {spec.durable}") from error
        return _PullConsumer(await _Puller.open(self, stream, spec.durable))

    async def delete_consumer(self, stream: str, durable: str) -> None:
        self._require(f"consumer {durable}")
        try:
            await self._js._jsm.delete_consumer(stream, durable)
        except nats.js.errors.NotFoundError:
            return
        except Exception as error:
            raise _translate(error, f"deleting consumer {durable}") from error


class _Puller:
    """Pull requests to one consumer, read from an inbox of our own.

    JetStream answers a pull with up to `batch` messages, then (if it had fewer) a
    status: 404 no messages, 408 request expired. A no-wait pull therefore never waits
    for messages that are not there, which nats-py's fetch() may do.
    """

    def __init__(self, bus: JetStreamBus, stream: str, consumer: str) -> None:
        self._bus = bus
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = bus._nc.new_inbox()
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Any = None
        self.consumer = consumer

    @classmethod
    async def open(cls, bus: JetStreamBus, stream: str, consumer: str) -> _Puller:
        puller = cls(bus, stream, consumer)
        try:
            puller._sub = await bus._nc.subscribe(puller._inbox, cb=puller._received)
        except Exception as error:
            raise _translate(error, f"consumer {consumer}") from error
        return puller

    async def _received(self, msg: Msg) -> None:
        self._queue.put_nowait(msg)

    async def pull(self, batch: int, wait: float = 0.0) -> list[Msg]:
        """Up to `batch` messages: those there now, or (wait > 0) the first to come."""
        self._bus._require(f"consumer {self.consumer}")
        request: dict[str, Any] = {"batch": batch}
        if wait > 0:
            request["expires"] = int(wait * 1e9)
        else:
            request["no_wait"] = True
        msgs: list[Msg] = []
        # A waiting pull ends with a 408 from the server when it expires; should that not
        # come, a second after the expiry is long enough to give up on it (what comes later
        # is queued for the next pull). A no-wait pull is answered at once, or NATS is down.
        limit = wait + min(1.0, self._bus.timeout) if wait > 0 else self._bus.timeout
        try:
            await self._bus._nc.publish(
                self._subject, json.dumps(request).encode(), reply=self._inbox
            )
            async with asyncio.timeout(limit):
                while len(msgs) < batch:
                    msg = await self._queue.get()
                    status = msg.headers.get("Status") if msg.headers else None
                    if status is None:
                        msgs.append(msg)
                    elif status in ("404", "408"):  # nothing (more) for this request
                        break
                    elif status != "100":  # 100 is a heartbeat
                        desc = msg.headers.get("Description", "")
                        raise UnavailableError(f"consumer {self.consumer}: {status} {desc}")
        except TimeoutError:
            if wait > 0 and self._bus.connected:
                # The server may not send the 408 for an expired pull (seen with
                # nats-server 2.9 under load); what came is kept, late arrivals queue
                # for the next pull, and the caller simply pulls again.
                log.debug("consumer %s: pull expired without a status", self.consumer)
                return msgs
            raise UnavailableError(
                f"consumer {self.consumer}: NATS did not answer a pull within {limit:g}s"
            ) from None
        except CairnError:
            raise
        except Exception as error:
            raise _translate(error, f"pulling from {self.consumer}") from error
        return msgs

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as error:
                log.debug("closing consumer %s: %s", self.consumer, error)


class _PullConsumer:
    def __init__(self, puller: _Puller) -> None:
        self._puller = puller
        self.durable = puller.consumer

    async def fetch(self, batch: int, wait: float) -> list[Delivery]:
        msgs = await self._puller.pull(batch)
        if not msgs and wait > 0:
            msgs = await self._puller.pull(1, wait=wait)
        return [_Delivery(m) for m in msgs]

    async def close(self) -> None:
        await self._puller.close()


class _Delivery:
    __slots__ = ("_msg", "message", "num_delivered", "num_pending")

    def __init__(self, msg: Msg) -> None:
        meta = msg.metadata
        self._msg = msg
        self.message = _raw(msg)
        self.num_delivered = meta.num_delivered
        self.num_pending = meta.num_pending

    async def ack(self) -> None:
        await self._verdict(self._msg.ack())

    async def nak(self, delay: float | None = None) -> None:
        await self._verdict(self._msg.nak(delay=delay))

    async def term(self) -> None:
        await self._verdict(self._msg.term())

    async def in_progress(self) -> None:
        await self._verdict(self._msg.in_progress())

    async def _verdict(self, call: Any) -> None:
        try:
            await call
        except Exception as error:
            raise _translate(error, f"acknowledging #{self.message.sequence}") from error


def _raw(msg: Msg) -> RawMessage:
    return RawMessage(msg.metadata.sequence.stream, msg.subject, msg.data, msg.headers or {})


def _stream_config(spec: StreamSpec) -> api.StreamConfig:
    window = spec.duplicate_window
    if spec.max_age:
        window = min(window, spec.max_age)  # JetStream refuses a window longer than max_age
    return api.StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        storage=api.StorageType.MEMORY if spec.memory else api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=spec.max_age or None,
        num_replicas=spec.num_replicas,
        duplicate_window=window,
        allow_direct=True,
    )


def _translate(error: BaseException, what: str, timeout: float | None = None) -> CairnError:
    """The cairn error for a nats error met while doing `what`."""
    if isinstance(error, CairnError):
        return error
    if isinstance(error, nats.js.errors.APIError):
        desc = error.description or type(error).__name__
        if error.err_code == WRONG_LAST_SEQUENCE:
            return ConflictError(f"{what}: {desc}")
        if error.code == 503 or isinstance(error, nats.js.errors.ServiceUnavailableError):
            return UnavailableError(f"{what}: JetStream is not available ({desc})")
        if isinstance(error, nats.js.errors.NotFoundError):
            return NotFound(f"{what}: {desc}")
        return FailedPrecondition(f"{what}: JetStream refused: {desc}")
    if isinstance(error, TimeoutError):  # nats.errors.TimeoutError derives from it
        limit = f" within {timeout:g}s" if timeout else ""
        return UnavailableError(f"{what}: NATS did not answer{limit}")
    if isinstance(error, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return UnavailableError(f"{what}: no JetStream stream answered (is -js on?)")
    if isinstance(error, nats.errors.AuthorizationError):
        return ConfigError(f"{what}: NATS refused the credentials: {error}")
    if isinstance(error, nats.errors.Error | OSError):
        return UnavailableError(f"{what}: {type(error).__name__}: {error}")
    return UnavailableError(f"{what}: unexpected {type(error).__name__}: {error}")
