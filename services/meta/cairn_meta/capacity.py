"""What each node's disk can take for local volumes: a projection of NodeCapacityReported.

Node plugins report their local disk (capacity, available bytes, the directory local volumes
go under) as events on the `node` aggregate. This projection keeps the newest report of
each node in Redis, with the stream position, through cairn.events.Projection, so it is
rebuilt by replay and survives restarts. The Controller reads it to place a local volume
and to answer GetCapacity.

What a node can still take is the smaller of what its disk has free and its capacity less
what the local volumes already placed on it claim: volumes are placed long before they
fill, so the disk's free space alone would let many volumes promise the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from cairn.errors import UnavailableError
from cairn.events.envelope import Envelope
from cairn.events.projection import Projection, Tx
from cairn.events.store import EventStore
from cairn.events.types import Event, UnknownEvent

log = logging.getLogger(__name__)

REFRESH_TIMEOUT = 2.0  # seconds a placement waits for the newest reports before using what it has


@dataclass(frozen=True)
class NodeCapacity:
    node: str
    capacity_bytes: int
    available_bytes: int
    local_path: str = ""
    reported_at: float = 0.0

    def room(self, reserved: int) -> int:
        """Bytes a new local volume may claim, given what volumes on the node claim."""
        return max(0, min(self.available_bytes, self.capacity_bytes - reserved))


class NodeCapacityProjection(Projection):
    """node name -> its newest capacity report."""

    name = "node_capacity"
    types = frozenset({"NodeCapacityReported"})

    def default_filter(self, store: EventStore) -> str:
        return store.aggregate_subjects("node")

    def apply(self, tx: Tx, event: Event | UnknownEvent, envelope: Envelope) -> None:
        node = event.node
        tx.pipe.sadd(tx.key("nodes"), node)
        tx.pipe.hset(
            tx.key("node", node),
            mapping={
                "capacity": event.capacity_bytes,
                "available": event.available_bytes,
                "local_path": event.local_path,
                "reported_at": envelope.occurred_at,
            },
        )

    async def refresh(self) -> None:
        """Catches up with the stream if it answers within REFRESH_TIMEOUT; otherwise the
        stored state stands (a bus outage makes placements use older reports, never fail)."""
        with contextlib.suppress(UnavailableError, TimeoutError):
            async with asyncio.timeout(REFRESH_TIMEOUT):
                await self.catch_up()

    async def nodes(self) -> dict[str, NodeCapacity]:
        prefix = await self.current_prefix()
        names = sorted(_str(n) for n in await self.redis.smembers(f"{prefix}:nodes"))
        if not names:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in names:
                pipe.hgetall(f"{prefix}:node:{n}")
            rows = await pipe.execute()
        return {n: _capacity(n, row) for n, row in zip(names, rows, strict=True) if row}

    async def node(self, name: str) -> NodeCapacity | None:
        prefix = await self.current_prefix()
        row = await self.redis.hgetall(f"{prefix}:node:{name}")
        return _capacity(name, row) if row else None


def _capacity(node: str, row: dict[Any, Any]) -> NodeCapacity:
    data = {_str(k): _str(v) for k, v in row.items()}
    return NodeCapacity(
        node=node,
        capacity_bytes=int(data.get("capacity", 0)),
        available_bytes=int(data.get("available", 0)),
        local_path=data.get("local_path", ""),
        reported_at=float(data.get("reported_at", 0.0)),
    )


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
