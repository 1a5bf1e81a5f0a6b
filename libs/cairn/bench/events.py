"""`cairn bench events`: how fast the event store appends and a durable consumer reads.

The append phase is what services do, at volume: many aggregates (volumes), each with its
own optimistic chain (expected last subject sequence, message id), their publishes
pipelined with asynchronous acks (EventStore.append_many). The consume phase reads them
all back through a durable pull consumer with explicit acks, decoding every envelope and
event, as a service's consumer would. The benchmark uses a stream of its own and deletes
it afterwards.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from cairn.errors import CairnError, FailedPrecondition
from cairn.events.consumer import Consumer
from cairn.events.jetstream import JetStreamBus
from cairn.events.store import AppendRequest, EventStore
from cairn.events.types import (
    Event,
    VolumeAttached,
    VolumePublished,
    VolumeStaged,
    VolumeUnpublished,
)


def _event(i: int) -> Event:
    """Realistic node-plugin traffic: the stage/publish/unpublish cycle of a volume."""
    node = f"node-{i % 16}"
    match i % 4:
        case 0:
            return VolumeAttached(node=node)
        case 1:
            return VolumeStaged(
                node=node, staging_path=f"/var/lib/kubelet/staging/{i}", mount_pid=10_000 + i
            )
        case 2:
            return VolumePublished(node=node, target_path=f"/var/lib/kubelet/pods/{i}/mount")
        case _:
            return VolumeUnpublished(node=node, target_path=f"/var/lib/kubelet/pods/{i}/mount")


async def run(
    nats_url: str,
    count: int = 100_000,
    *,
    aggregates: int = 1000,
    events_per_append: int = 1,
    consume_batch: int = 500,
    stream: str | None = None,
    keep: bool = False,
    memory: bool = False,
) -> dict[str, Any]:
    """Appends `count` events over `aggregates` volumes, then consumes them all.

    Returns the counts, the seconds each phase took and the events per second.
    """
    if count < 1 or aggregates < 1 or events_per_append < 1:
        raise FailedPrecondition("count, aggregates and events_per_append must be positive")
    stream = stream or f"CAIRN_BENCH_{uuid.uuid4().hex[:8].upper()}"
    bus = await JetStreamBus.connect(
        nats_url,
        name="cairn-bench",
        timeout=30.0,
        max_pending_acks=max(4000, aggregates * events_per_append),
    )
    store = EventStore(bus, stream, subject_prefix=f"bench.{stream.lower()}", memory=memory)
    try:
        await store.ensure_stream()
        append_s = await _append(store, count, aggregates, events_per_append)
        consume_s = await _consume(store, count, consume_batch)
    finally:
        if not keep:
            try:
                await bus.delete_stream(stream)
            except CairnError:
                pass
        await bus.close()
    return {
        "stream": stream,
        "storage": "memory" if memory else "file",
        "aggregates": aggregates,
        "events_per_append": events_per_append,
        "appended": count,
        "append_s": append_s,
        "append_per_s": count / append_s,
        "consumed": count,
        "consume_s": consume_s,
        "consume_per_s": count / consume_s,
    }


async def _append(store: EventStore, count: int, aggregates: int, per_append: int) -> float:
    versions = [0] * aggregates
    sequences = [0] * aggregates
    written = 0
    started = time.perf_counter()
    while written < count:
        requests, owners = [], []
        for a in range(aggregates):
            n = min(per_append, count - written)
            if n <= 0:
                break
            requests.append(
                AppendRequest(
                    "volume",
                    f"bench-vol-{a}",
                    [_event(versions[a] + k) for k in range(n)],
                    expected_version=versions[a],
                    expected_sequence=sequences[a],
                )
            )
            owners.append(a)
            written += n
        for a, result in zip(owners, await store.append_many(requests), strict=True):
            if isinstance(result, CairnError):
                raise result
            versions[a], sequences[a] = result.version, result.sequence
    return time.perf_counter() - started


async def _consume(store: EventStore, count: int, batch: int) -> float:
    seen = 0

    async def handler(event: Event, envelope: Any) -> None:
        nonlocal seen
        seen += 1

    consumer = Consumer(
        store, "bench", handler, batch=batch, max_ack_pending=batch * 4, ack_wait=60.0
    )
    started = time.perf_counter()
    try:
        idle_since = None
        while seen < count:
            if await consumer.process_batch(wait=1.0):
                idle_since = None
            elif idle_since is None:
                idle_since = time.perf_counter()
            elif time.perf_counter() - idle_since > 10:
                raise FailedPrecondition(f"consumer stalled after {seen} of {count} events")
        elapsed = time.perf_counter() - started
    finally:
        await consumer.close()
    return elapsed


def print_report(result: dict[str, Any]) -> None:
    print(
        f"event store benchmark: {result['appended']:,} events over "
        f"{result['aggregates']:,} aggregates ({result['storage']} stream "
        f"{result['stream']})"
    )
    print(
        f"  append   {result['append_per_s']:>10,.0f} events/s   "
        f"({result['append_s']:.2f}s, optimistic, pipelined acks)"
    )
    print(
        f"  consume  {result['consume_per_s']:>10,.0f} events/s   "
        f"({result['consume_s']:.2f}s, durable pull consumer, explicit acks)"
    )
