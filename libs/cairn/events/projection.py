"""Projections: read models built from the event stream, kept in Redis.

A projection's state and its stream position move together: each batch of events is
applied in one MULTI/EXEC that also writes the position of the batch's last event. A crash
(or a cancelled task) before EXEC leaves state and position as they were; after EXEC both
moved. So a restart resumes from the stored position and never applies an event twice or
skips one. WATCH on the position keeps a second runner of the same projection from
writing over the first.

State lives under a generation: `<ns>:<name>:<generation>:...`, with the generation and
position in `<ns>:<name>`. `rebuild()` bumps the generation and zeroes the position in one
write, replays the stream from its start, and only then deletes the old generation's keys:
a crash in the middle of a rebuild leaves a consistent projection, never a half-wiped one.

Subclasses implement `apply(tx, event, envelope)`, which queues Redis writes on
`tx.pipe` under keys from `tx.key(...)`. It runs inside MULTI, so it must not read; state
that needs reads belongs in a Lua script or in fields the events carry.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, ClassVar

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from cairn.errors import ConflictError, UnavailableError
from cairn.events import codec
from cairn.events.envelope import Envelope
from cairn.events.store import EventStore, Recorded
from cairn.events.types import Event, UnknownEvent

log = logging.getLogger(__name__)

NAMESPACE = "cairn:projection"


@dataclass(frozen=True, slots=True)
class Tx:
    """What `apply` writes through: a pipeline in MULTI and the current key space."""

    pipe: Pipeline
    prefix: str

    def key(self, *parts: str | int) -> str:
        return ":".join((self.prefix, *map(str, parts)))


class Projection:
    """Base class: subclasses set `name` and implement `apply`."""

    name: ClassVar[str]
    # Only events of these types reach `apply` (None: all of them).
    types: ClassVar[frozenset[str] | None] = None

    def __init__(
        self,
        redis: Redis,
        store: EventStore,
        *,
        batch: int = 256,
        namespace: str = NAMESPACE,
        filter_subject: str | None = None,
    ) -> None:
        self.redis = redis
        self.store = store
        self.batch = batch
        self.meta_key = f"{namespace}:{self.name}"
        self.filter_subject = filter_subject or self.default_filter(store)

    def default_filter(self, store: EventStore) -> str:
        """The subjects this projection reads; override to narrow (e.g. one aggregate)."""
        return store.all_subjects

    def apply(self, tx: Tx, event: Event | UnknownEvent, envelope: Envelope) -> None:
        raise NotImplementedError

    def prefix(self, generation: int) -> str:
        return f"{self.meta_key}:{generation}"

    # -- position -----------------------------------------------------------------------

    async def state(self) -> tuple[int, int]:
        """(generation, position): the key space in use and the last applied sequence."""
        try:
            gen, pos = await self.redis.hmget(self.meta_key, ["generation", "position"])
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise UnavailableError(f"projection {self.name}: Redis: {error}") from error
        return int(gen or 0), int(pos or 0)

    async def position(self) -> int:
        return (await self.state())[1]

    async def current_prefix(self) -> str:
        return self.prefix((await self.state())[0])

    # -- running -----------------------------------------------------------------------

    async def catch_up(self) -> int:
        """Applies every event stored now that is not applied yet; the new position."""
        while True:
            try:
                return await self._consume(follow=False)
            except ConflictError as error:  # another runner or a rebuild moved it: reread
                log.info("projection %s: %s; resuming from the stored position", self.name, error)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Follows the stream until `stop` is set or the task is cancelled."""
        stop = stop or asyncio.Event()
        follower = asyncio.create_task(self._follow_forever())
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({follower, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (follower, stopper):
                task.cancel()
            results = await asyncio.gather(follower, stopper, return_exceptions=True)
        error = results[0]
        if isinstance(error, BaseException) and not isinstance(error, asyncio.CancelledError):
            raise error

    async def _follow_forever(self) -> None:
        while True:
            try:
                await self._consume(follow=True)
            except ConflictError as error:
                log.info("projection %s: %s; resuming from the stored position", self.name, error)
            except UnavailableError as error:
                log.warning("projection %s: %s; retrying", self.name, error)
                await asyncio.sleep(1.0)

    async def _consume(self, *, follow: bool) -> int:
        generation, position = await self.state()
        batches = self.store.read_batches(
            position + 1, follow=follow, batch=self.batch, filter_subject=self.filter_subject
        )
        async with aclosing(batches) as it:
            async for records in it:
                position = await self._commit(generation, position, records)
        return position

    async def _commit(self, generation: int, position: int, records: list[Recorded]) -> int:
        """Applies one batch and moves the position to its end, in one transaction."""
        decoded = [(rec.envelope, self._event(rec)) for rec in records]
        new_position = records[-1].sequence
        tx_prefix = self.prefix(generation)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                await pipe.watch(self.meta_key)
                stored = await pipe.hmget(self.meta_key, ["generation", "position"])
                if (int(stored[0] or 0), int(stored[1] or 0)) != (generation, position):
                    raise ConflictError(
                        f"projection {self.name} moved to {stored[1]} "
                        f"(generation {stored[0]}) under us"
                    )
                pipe.multi()
                tx = Tx(pipe, tx_prefix)
                for envelope, event in decoded:
                    if event is not None:
                        self.apply(tx, event, envelope)
                pipe.hset(
                    self.meta_key, mapping={"generation": generation, "position": new_position}
                )
                await pipe.execute()
        except WatchError:
            raise ConflictError(f"projection {self.name} was changed by someone else") from None
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise UnavailableError(f"projection {self.name}: Redis: {error}") from error
        return new_position

    def _event(self, rec: Recorded) -> Event | UnknownEvent | None:
        if rec.envelope is None:
            log.error(
                "projection %s: skipping undecodable event #%d: %s",
                self.name,
                rec.sequence,
                rec.error,
            )
            return None
        if self.types is not None and rec.envelope.type not in self.types:
            return None
        try:
            return rec.envelope.event()
        except codec.CodecError as error:
            log.error("projection %s: skipping event #%d: %s", self.name, rec.sequence, error)
            return None

    # -- rebuilding ----------------------------------------------------------------------

    async def rebuild(self) -> int:
        """Starts a new generation at position 0, replays everything, drops the old keys."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                await pipe.watch(self.meta_key)
                generation = int(await pipe.hget(self.meta_key, "generation") or 0) + 1
                pipe.multi()
                pipe.hset(self.meta_key, mapping={"generation": generation, "position": 0})
                await pipe.execute()
        except WatchError:
            raise ConflictError(f"projection {self.name} moved while starting a rebuild") from None
        except (RedisConnectionError, RedisTimeoutError) as error:
            raise UnavailableError(f"projection {self.name}: Redis: {error}") from error
        position = await self.catch_up()
        await self.drop_old_generations()
        return position

    async def drop_old_generations(self) -> int:
        """Deletes keys of generations other than the current one; how many."""
        current = await self.current_prefix() + ":"
        removed = 0
        async for key in self.redis.scan_iter(match=f"{self.meta_key}:*", count=500):
            name = key.decode() if isinstance(key, bytes) else key
            if not name.startswith(current):
                removed += await self.redis.unlink(name)
        return removed


class VolumeStatusProjection(Projection):
    """Each volume's status, node and event count, from the volume aggregate's events."""

    name = "volume_status"
    STATUS: ClassVar[dict[str, str]] = {
        "VolumeRequested": "requested",
        "VolumeProvisioned": "provisioned",
        "ProvisioningFailed": "failed",
        "VolumeAttached": "attached",
        "VolumeStaged": "staged",
        "VolumePublished": "published",
        "VolumeUnpublished": "staged",
        "VolumeUnstaged": "attached",
        "VolumeDetached": "provisioned",
        "MountRecovered": "published",
        "VolumeDeleted": "deleted",
    }
    types = frozenset(STATUS)

    def default_filter(self, store: EventStore) -> str:
        return store.aggregate_subjects("volume")

    def apply(self, tx: Tx, event: Event | UnknownEvent, envelope: Envelope) -> None:
        volume = envelope.aggregate_id
        key = tx.key("volume", volume)
        fields: dict[str, Any] = {
            "status": self.STATUS[envelope.type],
            "version": envelope.version,
            "last_event": envelope.type,
        }
        node = getattr(event, "node", None)
        if node:
            fields["node"] = node
        tx.pipe.sadd(tx.key("volumes"), volume)
        tx.pipe.hset(key, mapping=fields)
        tx.pipe.hincrby(key, "events", 1)
        tx.pipe.hincrby(tx.key("by_type"), envelope.type, 1)

    async def volume(self, volume_id: str) -> dict[str, str] | None:
        prefix = await self.current_prefix()
        data = await self.redis.hgetall(f"{prefix}:volume:{volume_id}")
        return _text(data) or None

    async def snapshot(self) -> dict[str, Any]:
        """Everything the projection holds, as plain strings (for comparisons and CLIs)."""
        prefix = await self.current_prefix()
        volumes = sorted(_str(v) for v in await self.redis.smembers(f"{prefix}:volumes"))
        async with self.redis.pipeline(transaction=False) as pipe:
            for v in volumes:
                pipe.hgetall(f"{prefix}:volume:{v}")
            pipe.hgetall(f"{prefix}:by_type")
            rows = await pipe.execute()
        return {
            "volumes": {v: _text(r) for v, r in zip(volumes, rows, strict=False)},
            "by_type": _text(rows[-1]),
        }


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _text(data: dict) -> dict[str, str]:
    return {_str(k): _str(v) for k, v in data.items()}
