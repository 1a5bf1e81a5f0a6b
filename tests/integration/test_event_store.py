"""The event store against a real nats-server: appends, conflicts, loads, replays, consumers."""

from __future__ import annotations

import asyncio
import logging
import time

import nats
import pytest

from cairn.bench import events as bench
from cairn.errors import ConflictError, PermanentError, TemporaryError, UnavailableError
from cairn.events import (
    AppendRequest,
    Consumer,
    Envelope,
    EventStore,
    JetStreamBus,
    NodeCapacityReported,
    VolumeAttached,
    VolumeProvisioned,
    VolumeRequested,
    VolumeStaged,
)


@pytest.fixture
async def js(nats_url):
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


def requested(name="pvc-1"):
    return VolumeRequested(name=name, capacity_bytes=1 << 30)


async def test_append_then_load_in_order(store):
    first = await store.append("volume", "v1", [requested()], expected_version=0)
    assert (first.version, first.sequence) == (1, 1)
    more = await store.append(
        "volume",
        "v1",
        [VolumeProvisioned(capacity_bytes=1 << 30), VolumeAttached(node="n1")],
        expected_version=1,
        expected_sequence=first.sequence,
    )
    assert more.version == 3
    await store.append("volume", "other", [requested("pvc-2")], expected_version=0)

    history = await store.load("volume", "v1")
    assert [e.version for e in history] == [1, 2, 3]
    assert [e.type for e in history] == ["VolumeRequested", "VolumeProvisioned", "VolumeAttached"]
    assert history.version == 3 and history.sequence == more.sequence
    assert history.events()[2] == VolumeAttached(node="n1")
    assert (await store.load("volume", "nobody")).sequence == 0


async def test_stream_is_created_with_file_storage_and_reused(bus, store, js, stream_name):
    store = EventStore(bus, stream_name, subject_prefix=store.prefix, max_age=3600)
    await store.append("volume", "v1", [requested()], expected_version=0)
    info = await js.stream_info(stream_name)
    assert info.config.storage == "file"
    assert info.config.subjects == [f"{store.prefix}.>"]
    assert info.config.max_age == 3600
    assert info.config.duplicate_window == 900  # longer than JetStream's 2-minute default

    again = EventStore(bus, stream_name, subject_prefix=store.prefix)
    assert (await again.load("volume", "v1")).version == 1


async def test_repeated_append_with_the_same_msg_id_stores_one_event(store, js):
    envelope = Envelope.wrap(requested(), "v1", 1)
    first = await store.publish_envelope(envelope, 0)
    second = await store.publish_envelope(envelope, 0)  # a retry after a lost ack
    assert first == second == 1
    assert await store.last_sequence() == 1
    history = await store.load("volume", "v1")
    assert [e.event_id for e in history] == [envelope.event_id]
    stored = await js.get_msg(store.stream, 1)
    assert stored.headers["Nats-Msg-Id"] == "volume.v1:1"
    assert stored.headers["Nats-Expected-Last-Subject-Sequence"] == "0"


async def test_two_writers_from_the_same_version_one_conflicts_then_succeeds(store):
    await store.append("volume", "v1", [requested()], expected_version=0)
    seen_by_a = await store.load("volume", "v1")
    seen_by_b = await store.load("volume", "v1")

    results = await asyncio.gather(
        store.append(
            "volume",
            "v1",
            [VolumeAttached(node="a")],
            seen_by_a.version,
            expected_sequence=seen_by_a.sequence,
        ),
        store.append(
            "volume",
            "v1",
            [VolumeAttached(node="b")],
            seen_by_b.version,
            expected_sequence=seen_by_b.sequence,
        ),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["Appended", "ConflictError"]
    winner, loser = ("b", "a") if isinstance(results[0], ConflictError) else ("a", "b")

    reloaded = await store.load("volume", "v1")
    assert reloaded.version == 2
    retried = await store.append(
        "volume",
        "v1",
        [VolumeAttached(node=loser)],
        reloaded.version,
        expected_sequence=reloaded.sequence,
    )
    assert retried.version == 3
    nodes = [e.payload.get("node") for e in await store.load("volume", "v1")]
    assert nodes == [None, winner, loser]


async def test_stale_version_or_sequence_is_a_conflict(store):
    await store.append("volume", "v1", [requested()], expected_version=0)
    with pytest.raises(ConflictError, match="version 1, not 0"):
        await store.append("volume", "v1", [requested()], expected_version=0)
    # A fresh message id with a stale sequence: JetStream's own check (error 10071).
    stale = Envelope.wrap(VolumeAttached(node="n"), "v1", 7)
    with pytest.raises(ConflictError, match="wrong last sequence"):
        await store.publish_envelope(stale, 0)


async def test_append_with_retry_reloads_on_conflict(store):
    await store.append("volume", "v1", [requested()], expected_version=0)
    calls = []
    both_loaded = asyncio.Barrier(2)

    def decide_for(node):
        async def decide(history):
            calls.append((node, history.version))
            if len(calls) <= 2:
                await both_loaded.wait()  # both writers decide on the same version
            return [VolumeAttached(node=node)]

        return decide

    a, b = await asyncio.gather(
        store.append_with_retry("volume", "v1", decide_for("a")),
        store.append_with_retry("volume", "v1", decide_for("b")),
    )
    assert sorted([a.version, b.version]) == [2, 3]
    assert len(calls) == 3  # the loser decided again, on version 2
    assert calls[2][1] == 2
    assert (await store.load("volume", "v1")).version == 3


async def test_aggregate_ids_are_sanitized_for_subjects(store):
    await store.append(
        "node",
        "node-a.example.com",
        [NodeCapacityReported(node="node-a.example.com", capacity_bytes=10, available_bytes=5)],
        expected_version=0,
    )
    await store.append(
        "node",
        "node-a%2Eexample%2Ecom",
        [NodeCapacityReported(node="x", capacity_bytes=1, available_bytes=1)],
        expected_version=0,
    )
    history = await store.load("node", "node-a.example.com")
    assert len(history) == 1 and history.envelopes[0].aggregate_id == "node-a.example.com"
    assert len(await store.load("node", "node-a%2Eexample%2Ecom")) == 1


async def test_long_history_loads_correctly_and_fast(store):
    last = None
    for i in range(300):
        last = await store.append(
            "volume",
            "busy",
            [VolumeStaged(node="n", staging_path=f"/{i}")],
            i,
            expected_sequence=last.sequence if last else 0,
        )
        await store.append("volume", f"quiet-{i % 3}", [requested()], None)
    started = time.perf_counter()
    history = await store.load("volume", "busy")
    elapsed = time.perf_counter() - started
    assert [e.version for e in history] == list(range(1, 301))
    assert history.envelopes[-1].payload["staging_path"] == "/299"
    assert elapsed < 1.0


async def test_read_all_replays_in_stream_order(store):
    for i in range(5):
        await store.append("volume", f"v{i}", [requested(f"p{i}")], expected_version=0)
    everything = [r async for r in store.read_all()]
    assert [r.sequence for r in everything] == [1, 2, 3, 4, 5]
    assert [r.envelope.aggregate_id for r in everything] == [f"v{i}" for i in range(5)]
    tail = [r.sequence async for r in store.read_all(4)]
    assert tail == [4, 5]


async def test_append_many_pipelines_optimistic_appends(store):
    await store.append("volume", "v0", [requested()], expected_version=0)
    requests = [
        AppendRequest("volume", f"v{i}", [VolumeAttached(node="n"), VolumeAttached(node="m")])
        for i in range(1, 21)
    ]
    requests.append(
        AppendRequest("volume", "v0", [VolumeAttached(node="late")], expected_version=0)
    )  # stale
    results = await store.append_many(requests)
    assert isinstance(results[-1], ConflictError)
    assert [r.version for r in results[:-1]] == [2] * 20
    assert await store.last_sequence() == 1 + 40
    assert [e.version for e in await store.load("volume", "v7")] == [1, 2]


async def test_unreachable_bus_is_an_unavailable_error():
    with pytest.raises(UnavailableError, match="cannot reach NATS"):
        await JetStreamBus.connect("nats://127.0.0.1:1", timeout=0.5)


# -- consumers ------------------------------------------------------------------------


async def _drive(consumer: Consumer, until, deadline=5.0):
    end = time.monotonic() + deadline
    while not until() and time.monotonic() < end:
        await consumer.process_batch(wait=0.1)


async def test_consumer_handles_every_event_once(store):
    for i in range(30):
        await store.append("volume", f"v{i % 4}", [requested(f"p{i}")], None)
    seen = []

    async def handler(event, envelope):
        seen.append(envelope.event_id)

    consumer = Consumer(store, "all", handler, batch=8)
    await _drive(consumer, lambda: len(seen) >= 30)
    await consumer.process_batch(wait=0.2)  # nothing comes back: all were acked
    await consumer.close()
    assert len(seen) == len(set(seen)) == 30
    assert consumer.stats.acked == 30

    again = Consumer(store, "all", handler)  # a restart resumes after the acked events
    assert await again.process_batch(wait=0.2) == 0
    await again.close()


async def test_consumer_run_handles_new_events_until_stopped(store):
    handled = asyncio.Queue()

    async def handler(event, envelope):
        await handled.put(event)

    consumer = Consumer(store, "runner", handler)
    stop = asyncio.Event()
    runner = asyncio.create_task(consumer.run(stop, poll=0.2))
    await store.append("volume", "v1", [requested()], expected_version=0)
    assert await asyncio.wait_for(handled.get(), 5) == requested()
    stop.set()
    await asyncio.wait_for(runner, 5)


async def test_temporary_failure_is_redelivered_with_delay(store):
    await store.append("volume", "v1", [requested()], expected_version=0)
    attempts = []

    async def flaky(event, envelope):
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise UnavailableError("meta is restarting")

    consumer = Consumer(store, "flaky", flaky, max_deliver=5, retry_delays=(0.2, 0.3))
    await _drive(consumer, lambda: consumer.stats.acked == 1)
    await consumer.close()
    assert len(attempts) == 3 and consumer.stats.naked == 2
    # Each nak carried a delay (an immediate redelivery comes within milliseconds); how
    # closely nats-server keeps to it varies (a 0.3 s delay was seen served after 0.2 s).
    assert attempts[1] - attempts[0] >= 0.15
    assert attempts[2] - attempts[1] >= 0.15


async def test_redelivery_is_bounded_by_max_deliver(store, caplog):
    await store.append("volume", "v1", [requested()], expected_version=0)
    await store.append("volume", "v2", [requested()], expected_version=0)
    calls = {"v1": 0, "v2": 0}

    async def handler(event, envelope):
        calls[envelope.aggregate_id] += 1
        if envelope.aggregate_id == "v1":
            raise TemporaryError("never works")

    consumer = Consumer(store, "bounded", handler, max_deliver=3, retry_delays=(0.05,))
    with caplog.at_level(logging.ERROR, logger="cairn.events.consumer"):
        await _drive(consumer, lambda: consumer.stats.terminated == 1)
        await _drive(consumer, lambda: False, deadline=0.5)  # nothing more comes
    await consumer.close()
    assert calls == {"v1": 3, "v2": 1}
    assert consumer.stats.terminated == 1 and consumer.stats.naked == 2
    assert any("giving up" in r.message for r in caplog.records)


async def test_permanent_error_and_poison_are_terminated_at_once(store, js, caplog):
    await store.append("volume", "v1", [requested()], expected_version=0)
    await js.publish(f"{store.prefix}.volume.junk", b"\x93not msgpack")
    handled = []

    async def handler(event, envelope):
        handled.append(envelope.aggregate_id)
        raise PermanentError("volume parameters are invalid")

    consumer = Consumer(store, "strict", handler, max_deliver=5, retry_delays=(0.05,))
    with caplog.at_level(logging.ERROR, logger="cairn.events.consumer"):
        await _drive(consumer, lambda: consumer.stats.terminated == 2)
        await _drive(consumer, lambda: False, deadline=0.3)
    await consumer.close()
    assert handled == ["v1"]  # the poison message never reached the handler
    assert consumer.stats.terminated == 2 and consumer.stats.naked == 0
    assert any("poison" in r.message for r in caplog.records)


async def test_bench_reports_rates(nats_url):
    result = await bench.run(nats_url, count=2000, aggregates=50)
    assert result["appended"] == result["consumed"] == 2000
    assert result["append_per_s"] > 0 and result["consume_per_s"] > 0
    bench.print_report(result)
