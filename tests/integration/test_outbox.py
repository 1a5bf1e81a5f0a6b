"""The outbox against a nats-server that goes away: events wait on disk, then arrive once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import pytest

from cairn import localstack
from cairn.errors import ConflictError
from cairn.events import (
    EventStore,
    JetStreamBus,
    NodeCapacityReported,
    OutboxedStore,
    VolumeAttached,
    VolumeRequested,
)
from cairn.events.outbox import OutboxFile


class Crash(BaseException):
    """The process dying: nothing in the drainer catches it."""


class CrashingAfterPublish(OutboxedStore):
    """Dies after publishing its `crash_on`-th event, before marking it done."""

    crash_on = 3

    async def _done(self, entry):
        if self.published + 1 == self.crash_on:
            raise Crash()
        await super()._done(entry)


async def wait_until(predicate, deadline=10.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {predicate}")


async def stop(server):
    await asyncio.to_thread(server.stop)


async def restart(server):
    await asyncio.to_thread(localstack.start_tcp, server)


def requested(name="pvc"):
    return VolumeRequested(name=name, capacity_bytes=1 << 20)


def capacity(free):
    return NodeCapacityReported(node="n1", capacity_bytes=100, available_bytes=free)


async def stored_events(store):
    return [r.envelope async for r in store.read_all()]


def assert_contiguous_versions(envelopes):
    by_aggregate = {}
    for e in envelopes:
        by_aggregate.setdefault((e.aggregate, e.aggregate_id), []).append(e.version)
    for versions in by_aggregate.values():
        assert versions == list(range(1, len(versions) + 1))


async def test_outage_appends_wait_in_the_outbox_then_arrive_in_order_once(own_nats, tmp_path):
    bus = await JetStreamBus.connect(own_nats.url, reconnect_wait=0.2)
    store = EventStore(bus, "OUTAGE")
    outbox = OutboxedStore(store, tmp_path / "data", publish_timeout=1.0)
    await outbox.start()
    try:
        first = await outbox.append("volume", "v0", [requested()], 0)
        assert not first.outboxed and first.sequence == 1
        expected = [first.envelopes[0].event_id]

        await stop(own_nats)
        await wait_until(lambda: not bus.connected)
        started = time.monotonic()
        for i in range(12):
            result = await outbox.append("volume", f"v{i % 3}", [VolumeAttached(node=f"n{i}")])
            assert result.outboxed
            expected += [e.event_id for e in result.envelopes]
        several = await outbox.append("node", "n1", [capacity(5), capacity(4)])
        expected += [e.event_id for e in several.envelopes]
        assert time.monotonic() - started < 2.0  # nobody waited for the bus
        assert outbox.pending == 14
        assert (tmp_path / "data" / "events.outbox").stat().st_size > 0

        await restart(own_nats)
        assert await outbox.flush(deadline=20)
        envelopes = await stored_events(store)
        assert [e.event_id for e in envelopes] == expected  # in order, each exactly once
        assert_contiguous_versions(envelopes)
        assert (tmp_path / "data" / "events.outbox").stat().st_size == 0

        after = await outbox.append("volume", "v0", [VolumeAttached(node="x")])
        assert not after.outboxed and after.version == 6  # direct again once drained
    finally:
        await outbox.close()
        await bus.close()


async def test_outbox_survives_a_process_restart(own_nats, tmp_path):
    data = tmp_path / "data"
    await stop(own_nats)

    # A process that starts while the bus is down, appends, and exits.
    bus = await JetStreamBus.connect(own_nats.url, wait=False, reconnect_wait=0.2)
    outbox = OutboxedStore(EventStore(bus, "RESTART"), data)
    await outbox.start()
    expected = []
    for i in range(5):
        result = await outbox.append("volume", "v1", [VolumeAttached(node=f"n{i}")])
        assert result.outboxed
        expected += [e.event_id for e in result.envelopes]
    await outbox.close()
    await bus.close()

    # The next process finds the outbox and delivers it once the bus is back.
    bus = await JetStreamBus.connect(own_nats.url, wait=False, reconnect_wait=0.2)
    store = EventStore(bus, "RESTART")
    outbox = OutboxedStore(store, data)
    await outbox.start()
    try:
        assert outbox.pending == 5
        await restart(own_nats)
        assert await outbox.flush(deadline=20)
        envelopes = await stored_events(store)
        assert [e.event_id for e in envelopes] == expected
        assert [e.version for e in envelopes] == [1, 2, 3, 4, 5]
    finally:
        await outbox.close()
        await bus.close()


@pytest.mark.parametrize("duplicate_window", [900.0, 0.3], ids=["in-window", "past-window"])
async def test_crash_between_publish_and_done_makes_no_duplicate(
    own_nats, tmp_path, caplog, duplicate_window
):
    caplog.set_level(logging.INFO, logger="cairn.events")
    bus = await JetStreamBus.connect(own_nats.url, reconnect_wait=0.2)
    store = EventStore(bus, "CRASH", duplicate_window=duplicate_window)
    data = tmp_path / "data"
    crashing = CrashingAfterPublish(store, data)
    await crashing.start()
    try:
        expected = [
            e.event_id for e in (await crashing.append("volume", "v1", [requested()], 0)).envelopes
        ]
        await stop(own_nats)
        await wait_until(lambda: not bus.connected)
        for i in range(6):
            result = await crashing.append("volume", f"v{1 + i % 2}", [VolumeAttached(node="n")])
            expected += [e.event_id for e in result.envelopes]
        await restart(own_nats)
        # The drainer publishes two events, then the third, and dies before marking it done.
        await wait_until(lambda: crashing._drainer.done())  # noqa: SLF001
        assert await store.last_sequence() == 1 + 3
    finally:
        await crashing.close()
    if duplicate_window < 1:
        await asyncio.sleep(duplicate_window + 0.2)  # JetStream has forgotten the message id

    outbox = OutboxedStore(store, data)  # the restarted process
    await outbox.start()
    try:
        assert outbox.pending == 4  # the published-but-not-done one is still there
        assert await outbox.flush(deadline=20)
        envelopes = await stored_events(store)
        assert [e.event_id for e in envelopes] == expected
        assert_contiguous_versions(envelopes)
        # The re-sent event was recognised: by its message id inside the duplicate
        # window, by a scan of its aggregate after it.
        recognised = "was already stored" if duplicate_window > 1 else "already in the stream"
        assert any(recognised in r.getMessage() for r in caplog.records)
    finally:
        await outbox.close()
        await bus.close()


async def test_publish_timeout_goes_to_the_outbox_without_duplicates(own_nats, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cairn.events")
    bus = await JetStreamBus.connect(own_nats.url, timeout=1.0, reconnect_wait=0.2)
    store = EventStore(bus, "FROZEN")
    outbox = OutboxedStore(store, tmp_path / "data", publish_timeout=0.5)
    await outbox.start()
    try:
        first = await outbox.append("volume", "v1", [requested()], 0)
        os.kill(own_nats.pid, signal.SIGSTOP)  # our own nats-server hangs: publishes time out
        try:
            frozen = await outbox.append(
                "volume", "v1", [VolumeAttached(node="a")], 1, expected_sequence=first.sequence
            )
            queued = await outbox.append("volume", "v1", [VolumeAttached(node="b")])
            assert frozen.outboxed and queued.outboxed
        finally:
            os.kill(own_nats.pid, signal.SIGCONT)
        # The frozen publish may well be stored once the server runs again: it is not
        # stored twice.
        assert await outbox.flush(deadline=20)
        envelopes = await stored_events(store)
        assert [e.payload.get("node") for e in envelopes] == [None, "a", "b"]
        assert [e.version for e in envelopes] == [1, 2, 3]
        assert any("was already stored" in r.getMessage() for r in caplog.records)
    finally:
        await outbox.close()
        await bus.close()


async def test_conflicts_still_reach_the_caller_while_the_bus_is_up(own_nats, tmp_path):
    bus = await JetStreamBus.connect(own_nats.url)
    outbox = OutboxedStore(EventStore(bus, "UP"), tmp_path / "data")
    await outbox.start()
    try:
        await outbox.append("volume", "v1", [requested()], 0)
        with pytest.raises(ConflictError):
            await outbox.append("volume", "v1", [requested()], 0)
        assert outbox.pending == 0
    finally:
        await outbox.close()
        await bus.close()


def test_a_torn_last_record_is_cut_off_and_the_rest_kept(tmp_path):
    from cairn.events import Envelope, codec

    path = tmp_path / "events.outbox"
    file = OutboxFile(path)
    assert file.open() == []
    envelopes = [Envelope.wrap(requested(f"p{i}"), "v1", 0) for i in range(3)]
    file.write(
        [
            {"op": "put", "no": i + 1, "env": codec.encode(e), "after": None}
            for i, e in enumerate(envelopes)
        ]
    )
    file.write([{"op": "done", "no": 1}])
    file.close()
    good_size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x00\x40\x12\x34")  # a crash in the middle of a frame

    file = OutboxFile(path)
    entries = file.open()
    assert [e.envelope.event_id for e in entries] == [e.event_id for e in envelopes[1:]]
    assert path.stat().st_size == good_size
    with pytest.raises(Exception, match="in use"):
        OutboxFile(path).open()  # one process per outbox
    file.close()
