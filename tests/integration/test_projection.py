"""Projections against real nats-server and redis-server: exactly-once state across crashes."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from cairn.errors import ConflictError
from cairn.events import (
    EventStore,
    JetStreamBus,
    NodeCapacityReported,
    VolumeAttached,
    VolumeDeleted,
    VolumeProvisioned,
    VolumePublished,
    VolumeRequested,
    VolumeStaged,
    VolumeStatusProjection,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def bus(nats_url):
    bus = await JetStreamBus.connect(nats_url)
    yield bus
    await bus.close()


@pytest.fixture
async def store(bus, stream_name):
    return EventStore(bus, stream_name, subject_prefix=f"t.{stream_name.lower()}")


@pytest.fixture
async def redis(redis_url):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


LIFECYCLE = [
    lambda v: VolumeRequested(name=f"pvc-{v}", capacity_bytes=1 << 30),
    lambda v: VolumeProvisioned(capacity_bytes=1 << 30, path=f"/vols/{v}"),
    lambda v: VolumeAttached(node=f"node-{v % 3}"),
    lambda v: VolumeStaged(node=f"node-{v % 3}", staging_path=f"/staging/{v}"),
    lambda v: VolumePublished(node=f"node-{v % 3}", target_path=f"/pods/{v}"),
    lambda v: VolumeDeleted(),
]


async def fill(store: EventStore, volumes: int = 25, seed: int = 7) -> int:
    """Interleaved lifecycles of many volumes plus node events the projection ignores."""
    rng = random.Random(seed)
    progress = dict.fromkeys(range(volumes), 0)
    appended = 0
    while progress:
        v = rng.choice(list(progress))
        step = progress[v]
        await store.append("volume", f"vol-{v}", [LIFECYCLE[step](v)], step)
        appended += 1
        if rng.random() < 0.2:
            await store.append(
                "node",
                f"node-{v % 3}",
                [NodeCapacityReported(node=f"node-{v % 3}", capacity_bytes=100, available_bytes=v)],
                None,
            )
        progress[v] = step + 1
        if progress[v] == len(LIFECYCLE) or (step >= 3 and rng.random() < 0.3):
            del progress[v]
    return appended


async def reaches(projection, position: int, deadline: float = 5.0) -> None:
    """Waits until the projection's stored position is at least `position`."""
    end = time.monotonic() + deadline
    while (now := await projection.position()) < position:
        assert time.monotonic() < end, f"projection stuck at {now}, waiting for {position}"
        await asyncio.sleep(0.01)


def expected_counts(snapshot: dict) -> int:
    return sum(int(v["events"]) for v in snapshot["volumes"].values())


class Crash(Exception):
    """Stands for the process dying in the middle of a batch."""


class CrashingProjection(VolumeStatusProjection):
    crash_at = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.applied = 0

    def apply(self, tx, event, envelope):
        self.applied += 1
        if self.applied == self.crash_at:
            raise Crash(f"died while applying event {self.applied}")
        super().apply(tx, event, envelope)


async def test_projection_builds_volume_status(store, redis):
    total = await fill(store)
    projection = VolumeStatusProjection(redis, store, batch=16)
    position = await projection.catch_up()
    assert position == await store.last_sequence()
    snapshot = await projection.snapshot()
    assert expected_counts(snapshot) == total
    assert len(snapshot["volumes"]) == 25
    vol = await projection.volume("vol-0")
    assert vol["events"] == vol["version"]
    assert vol["status"] in VolumeStatusProjection.STATUS.values()
    assert await projection.catch_up() == position  # nothing new: nothing applied twice
    assert await projection.snapshot() == snapshot


async def test_crash_midway_resumes_to_the_same_state_and_rebuild_agrees(store, redis):
    await fill(store)
    reference = VolumeStatusProjection(redis, store, namespace="reference")
    await reference.catch_up()
    expected = await reference.snapshot()

    crashing = CrashingProjection(redis, store, batch=10)
    crashing.crash_at = 57  # in the middle of the sixth batch
    with pytest.raises(Crash):
        await crashing.catch_up()
    stopped_at = await crashing.position()
    half = await crashing.snapshot()
    assert 0 < stopped_at < await store.last_sequence()
    # What was committed is exactly the events up to the stored position, each once.
    volume_events = store.read_all(filter_subject=store.aggregate_subjects("volume"))
    applied_before = len([r async for r in volume_events if r.sequence <= stopped_at])
    assert expected_counts(half) == applied_before

    restarted = VolumeStatusProjection(redis, store, batch=10)
    await restarted.catch_up()
    assert await restarted.snapshot() == expected

    generation_before = (await restarted.state())[0]
    assert await restarted.rebuild() == await store.last_sequence()
    assert (await restarted.state())[0] == generation_before + 1
    assert await restarted.snapshot() == expected
    old_keys = [
        k async for k in redis.scan_iter(match=f"{restarted.meta_key}:{generation_before}:*")
    ]
    assert old_keys == []


async def test_cancelled_at_random_moments_never_double_applies(store, redis):
    await fill(store, volumes=40)
    reference = VolumeStatusProjection(redis, store, namespace="reference")
    await reference.catch_up()
    expected = await reference.snapshot()
    last = await store.last_sequence()

    rng = random.Random(3)
    cancels = 0
    for _ in range(40):
        projection = VolumeStatusProjection(redis, store, batch=1)
        task = asyncio.create_task(projection.catch_up())
        for _ in range(rng.randint(0, 60)):  # let it run a random number of loop steps
            await asyncio.sleep(0)
        if task.cancel():  # anywhere: reading, inside MULTI, waiting for EXEC's reply
            cancels += 1
        await asyncio.gather(task, return_exceptions=True)
        if await projection.position() == last:
            break
    assert cancels >= 3
    await VolumeStatusProjection(redis, store).catch_up()
    assert await VolumeStatusProjection(redis, store).snapshot() == expected


async def test_killed_process_restarts_to_the_same_state(store, redis, nats_url, redis_url):
    await fill(store, volumes=30)
    reference = VolumeStatusProjection(redis, store, namespace="reference")
    await reference.catch_up()
    expected = await reference.snapshot()
    last = await store.last_sequence()

    child = textwrap.dedent(f"""
        import asyncio
        import redis.asyncio as aioredis
        from cairn.events import EventStore, JetStreamBus, VolumeStatusProjection

        class Slow(VolumeStatusProjection):
            async def _commit(self, *args):
                await asyncio.sleep(0.01)
                return await super()._commit(*args)

        async def main():
            bus = await JetStreamBus.connect({nats_url!r})
            store = EventStore(bus, {store.stream!r}, subject_prefix={store.prefix!r})
            await Slow(aioredis.from_url({redis_url!r}), store, batch=2).catch_up()

        asyncio.run(main())
    """)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", child, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    watcher = VolumeStatusProjection(redis, store)
    try:
        await reaches(watcher, last // 3, deadline=20)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # our own child, by its PID
        await proc.wait()
    stopped_at = await watcher.position()
    assert 0 < stopped_at < last

    await VolumeStatusProjection(redis, store).catch_up()
    assert await watcher.snapshot() == expected


async def test_two_runners_of_one_projection_apply_each_event_once(store, redis):
    await fill(store)
    reference = VolumeStatusProjection(redis, store, namespace="reference")
    await reference.catch_up()
    a = VolumeStatusProjection(redis, store, batch=4)
    b = VolumeStatusProjection(redis, store, batch=4)
    await asyncio.gather(a.catch_up(), b.catch_up())
    assert await a.snapshot() == await reference.snapshot()


async def test_run_follows_new_events_until_stopped(store, redis):
    await store.append("volume", "v1", [LIFECYCLE[0](1)], 0)
    projection = VolumeStatusProjection(redis, store)
    stop = asyncio.Event()
    runner = asyncio.create_task(projection.run(stop))
    await store.append("volume", "v1", [LIFECYCLE[1](1)], 1)
    await store.append("volume", "v2", [LIFECYCLE[0](2)], 0)
    await reaches(projection, 3)
    stop.set()
    await asyncio.wait_for(runner, 5)
    assert (await projection.volume("v1"))["status"] == "provisioned"
    assert (await projection.volume("v2"))["status"] == "requested"


async def test_commit_refuses_a_stale_position(store, redis):
    await store.append("volume", "v1", [LIFECYCLE[0](1)], 0)
    projection = VolumeStatusProjection(redis, store)
    records = [r async for r in store.read_all()]
    with pytest.raises(ConflictError):
        await projection._commit(0, 5, records)  # noqa: SLF001 - the guard itself
