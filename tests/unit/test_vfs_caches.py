"""The VFS's in-process pieces: TTL caches, the chunk cache in front of the reader, handles,
stats and the errno mapping."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from cairn.errors import (
    DeadlineExceeded,
    FSError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    UnavailableError,
)
from cairn.meta.types import CHUNK_SIZE, Ctx, SliceView
from cairn.vfs import HandleTable, VFSStats, to_errno
from cairn.vfs.caches import ChunkCache, Listings, TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ttl_cache_expires_and_evicts():
    clock = Clock()
    cache: TTLCache[str, int] = TTLCache(1.0, max_items=2, clock=clock)
    cache.put("a", 1)
    cache.put("b", 2, ttl=5.0)
    assert cache.get("a") == 1
    clock.now += 1.5
    assert cache.get("a") is None
    assert cache.get("b") == 2
    cache.put("c", 3)
    cache.put("d", 4)  # over max_items: the least recently used goes
    assert "b" not in cache and cache.get("c") == 3 and len(cache) == 2
    cache.pop("c")
    assert cache.get("c") is None
    cache.clear()
    assert len(cache) == 0


def test_ttl_zero_keeps_nothing():
    cache: TTLCache[str, int] = TTLCache(0)
    cache.put("a", 1)
    assert cache.get("a") is None


class FakeMeta:
    fmt = "the format"

    def __init__(self) -> None:
        self.calls = 0
        self.views = [SliceView(7, 100, 0, 100)]
        self.gate: asyncio.Event | None = None

    async def read(self, inode: int, index: int):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return list(self.views)


async def test_chunk_cache_hits_and_invalidation():
    meta = FakeMeta()
    cache = ChunkCache(meta, ttl=60)
    assert cache.fmt == "the format"
    cache.expect(1, 100)
    assert await cache.read(1, 0) == meta.views
    assert await cache.read(1, 0) == meta.views
    assert meta.calls == 1 and cache.hits == 1
    cache.invalidate(1, 0)
    await cache.read(1, 0)
    assert meta.calls == 2
    cache.invalidate(1)
    await cache.read(1, 0)
    assert meta.calls == 3


async def test_chunk_cache_refetches_when_the_file_grew():
    meta = FakeMeta()
    cache = ChunkCache(meta, ttl=60)
    cache.expect(1, 100)
    await cache.read(1, 0)
    cache.expect(1, 150)  # fresh attributes say the file is longer than the cached slices
    meta.views = [SliceView(7, 100, 0, 100), SliceView(8, 50, 0, 50)]
    assert await cache.read(1, 0) == meta.views
    assert meta.calls == 2
    cache.expect(1, CHUNK_SIZE + 10)  # chunk 0 full length now expected
    await cache.read(1, 0)
    assert meta.calls == 3


async def test_chunk_cache_does_not_store_answers_older_than_an_invalidation():
    meta = FakeMeta()
    meta.gate = asyncio.Event()
    cache = ChunkCache(meta, ttl=60)
    reading = asyncio.create_task(cache.read(1, 0))
    await asyncio.sleep(0)
    cache.invalidate(1, 0)  # a commit lands while the lookup is in flight
    meta.gate.set()
    await reading
    await cache.read(1, 0)
    assert meta.calls == 2


def test_handles():
    table = HandleTable()
    ctx = Ctx(1, 1)
    rw = table.add_file(10, os.O_RDWR | os.O_APPEND, ctx)
    ro = table.add_file(10, os.O_RDONLY, ctx)
    d = table.add_dir(1, ctx)
    assert len({rw.fh, ro.fh, d.fh}) == 3
    assert rw.readable and rw.writable and rw.append
    assert ro.readable and not ro.writable
    assert table.of_inode(10) == [rw, ro]
    assert table.pop_file(rw.fh) is rw
    for call in (lambda: table.file(rw.fh), lambda: table.dir(ro.fh)):
        with pytest.raises(FSError) as caught:
            call()
        assert caught.value.errno == errno.EBADF
    assert table.pop_dir(d.fh) is d


def test_stats_snapshot():
    stats = VFSStats()
    stats.record("read", 0.5)
    stats.record("read", 1.5, failed=True)
    stats.bytes_read = 10
    snap = stats.snapshot({"extra": 1})
    assert snap["ops"]["read"] == {
        "count": 2,
        "errors": 1,
        "seconds": 2.0,
        "mean_seconds": 1.0,
        "max_seconds": 1.5,
    }
    assert snap["bytes_read"] == 10 and snap["extra"] == 1
    assert stats.count("read") == 2 and stats.count("write") == 0


def test_to_errno():
    assert to_errno(FSError(errno.EDQUOT)) == errno.EDQUOT
    assert to_errno(InvalidArgument("x")) == errno.EINVAL
    assert to_errno(ResourceExhausted("x")) == errno.ENOSPC
    assert to_errno(DeadlineExceeded("x")) == errno.ETIMEDOUT
    assert to_errno(NotFound("block")) == errno.EIO
    assert to_errno(UnavailableError("down")) == errno.EIO
    assert to_errno(ValueError("bug")) == errno.EIO


def test_listings_answer_absent_names_until_they_expire_or_drop():
    clock = Clock()
    listings = Listings(10.0, max_dirs=2, max_names=3, clock=clock)
    assert not listings.absent(5, b"x")  # nothing known of directory 5
    listings.start(5)
    assert listings.absent(5, b"x")
    listings.add(5, b"x")
    assert not listings.absent(5, b"x")
    listings.discard(5, b"x")
    assert listings.absent(5, b"x")
    clock.now += 10.5  # expired: a lookup has to ask again
    assert not listings.absent(5, b"x")

    listings.start(6)
    for name in (b"a", b"b", b"c", b"d"):  # past max_names: the listing is given up
        listings.add(6, name)
    assert not listings.absent(6, b"zzz")

    listings.start(7)
    listings.start(8)
    listings.start(9)  # past max_dirs: the oldest goes
    assert not listings.absent(7, b"q")
    assert listings.absent(9, b"q")
    listings.drop(9)
    assert not listings.absent(9, b"q")
    listings.clear()
    assert len(listings) == 0
    assert not Listings(0).absent(1, b"x")  # a TTL of 0 keeps nothing
    zero = Listings(0)
    zero.start(1)
    assert len(zero) == 0
