"""The block cache: LRU quotas per tier, restart from disk, damaged blocks, a failing cache
disk (which must never surface as an error), and CachedStore reading and writing through it."""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import shutil

import pytest

from cairn.errors import NotFound
from cairn.storage import BlockCache, CachedStore, block_key, open_store
from cairn.storage.cache import PIECE, TEMP_PREFIX, trailer_size
from cairn.storage.file import FileStore

TRAILER = trailer_size(100)  # bytes each disk file carries besides a 100-byte block
VOL = "vol"


def key(n: int, size: int = 100) -> str:
    return block_key(VOL, n, 0, size)


def blob(n: int, size: int = 100) -> bytes:
    return bytes([n % 256]) * size


def cache_files(root) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
    )


# -- memory tier ------------------------------------------------------------------------


async def test_memory_tier_keeps_recently_used_blocks_within_its_quota():
    cache = BlockCache(memory_bytes=300)
    for n in range(3):
        await cache.put(key(n), blob(n))
    assert await cache.get(key(0)) == blob(0)  # 0 is now the most recently used
    await cache.put(key(3), blob(3))
    assert not cache.contains(key(1))  # the least recently used went
    assert all(cache.contains(key(n)) for n in (0, 2, 3))
    stats = cache.stats()
    assert (stats.memory_bytes, stats.memory_items) == (300, 3)
    assert (stats.disk_bytes, stats.disk_items, stats.disk_enabled) == (0, 0, False)
    await cache.close()


async def test_hits_and_misses_are_counted():
    cache = BlockCache(memory_bytes=1000)
    await cache.put(key(1), blob(1))
    assert await cache.get(key(1)) == blob(1)
    assert await cache.get(key(2)) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.memory_hits, stats.disk_hits) == (1, 1, 1, 0)
    await cache.close()


async def test_blocks_bigger_than_a_tier_skip_it(tmp_path):
    cache = BlockCache(memory_bytes=50, disk_dir=tmp_path / "c", disk_bytes=1000)
    await cache.put(key(1), blob(1, 100))
    stats = cache.stats()
    assert stats.memory_items == 0 and stats.disk_items == 1
    await cache.put(key(2), blob(2, 2000))
    assert not cache.contains(key(2))
    await cache.close()


async def test_evict_and_replace():
    cache = BlockCache(memory_bytes=1000)
    await cache.put(key(1), blob(1))
    await cache.put(key(1), blob(9))
    assert cache.stats().memory_bytes == 100
    assert await cache.get(key(1)) == blob(9)
    await cache.evict(key(1))
    await cache.evict(key(1))
    assert not cache.contains(key(1)) and cache.stats().memory_bytes == 0
    await cache.close()


# -- disk tier --------------------------------------------------------------------------


async def test_disk_tier_quota_evicts_least_recently_used_files(tmp_path):
    root = tmp_path / "cache"
    cache = BlockCache(memory_bytes=0, disk_dir=root, disk_bytes=3 * (100 + TRAILER))
    for n in range(3):
        await cache.put(key(n), blob(n))
    assert await cache.get(key(0)) == blob(0)
    await cache.put(key(3), blob(3))
    assert not cache.contains(key(1))
    assert len(cache_files(root)) == 3
    assert not (root / key(1)).exists() and (root / key(0)).exists()
    assert cache.stats().disk_bytes == 3 * (100 + TRAILER)
    assert cache.stats().disk_hits == 1
    await cache.close()


async def test_disk_tier_survives_a_restart(tmp_path):
    root = tmp_path / "cache"
    first = BlockCache(memory_bytes=1 << 20, disk_dir=root, disk_bytes=1 << 20)
    for n in range(5):
        await first.put(key(n), blob(n))
    await first.close()

    second = BlockCache(memory_bytes=1 << 20, disk_dir=root, disk_bytes=1 << 20)
    await second.start()
    assert all(second.contains(key(n)) for n in range(5))
    assert second.stats().disk_bytes == 5 * (100 + TRAILER)
    assert await second.get(key(3)) == blob(3)
    stats = second.stats()
    assert (stats.disk_hits, stats.memory_hits) == (1, 0)
    assert await second.get(key(3)) == blob(3)  # promoted to memory on the first hit
    assert second.stats().memory_hits == 1
    await second.close()


async def test_restart_keeps_lru_order_and_applies_a_smaller_quota(tmp_path):
    root = tmp_path / "cache"
    first = BlockCache(memory_bytes=0, disk_dir=root, disk_bytes=1 << 20)
    for n in range(4):
        await first.put(key(n), blob(n))
    await first.close()
    # last use, oldest first: 2, 0, 3, 1
    for age, n in enumerate((2, 0, 3, 1)):
        t = 1_700_000_000 + age * 100
        os.utime(root / key(n), (t, t))

    second = BlockCache(memory_bytes=0, disk_dir=root, disk_bytes=2 * (100 + TRAILER))
    await second.start()
    assert [n for n in range(4) if second.contains(key(n))] == [1, 3]
    assert sorted(cache_files(root)) == sorted([key(1), key(3)])
    await second.close()


async def test_start_removes_half_written_files_and_ignores_strangers(tmp_path):
    root = tmp_path / "cache"
    (root / VOL).mkdir(parents=True)
    (root / VOL / f"{TEMP_PREFIX}crashed-1234").write_bytes(b"half a block")
    cache = BlockCache(memory_bytes=0, disk_dir=root, disk_bytes=1 << 20)
    await cache.start()
    assert cache_files(root) == []
    assert cache.stats().disk_items == 0
    await cache.close()


async def test_a_damaged_block_is_dropped_not_served(tmp_path, caplog):
    root = tmp_path / "cache"
    cache = BlockCache(memory_bytes=0, disk_dir=root, disk_bytes=1 << 20)
    await cache.put(key(1), blob(1))
    await cache.put(key(2), blob(2))
    raw = bytearray((root / key(1)).read_bytes())
    raw[10] ^= 0x01
    (root / key(1)).write_bytes(bytes(raw))
    (root / key(2)).write_bytes(b"torn")
    with caplog.at_level(logging.WARNING, logger="cairn.storage.cache"):
        assert await cache.get(key(1)) is None
        assert await cache.get(key(2)) is None
    assert "damaged" in caplog.text
    assert not cache.contains(key(1)) and not (root / key(1)).exists()
    assert cache.disk_enabled  # a bad block is not a bad disk
    await cache.close()


async def test_a_block_removed_behind_the_caches_back_is_a_miss(tmp_path):
    root = tmp_path / "cache"
    cache = BlockCache(memory_bytes=0, disk_dir=root, disk_bytes=1 << 20)
    await cache.put(key(1), blob(1))
    os.unlink(root / key(1))
    assert await cache.get(key(1)) is None
    assert cache.disk_enabled and not cache.contains(key(1))
    await cache.close()


# -- a failing cache disk ---------------------------------------------------------------


def warnings_from_cache(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "cairn.storage.cache" and r.levelno == logging.WARNING
    ]


async def test_cache_dir_replaced_by_a_file_disables_the_disk_tier(tmp_path, caplog):
    root = tmp_path / "cache"
    cache = BlockCache(memory_bytes=0, disk_dir=root, disk_bytes=1 << 20)
    await cache.put(key(1), blob(1))
    shutil.rmtree(root)
    root.write_bytes(b"the disk went away and something else took its place")
    with caplog.at_level(logging.WARNING, logger="cairn.storage.cache"):
        assert await cache.get(key(1)) is None
        await cache.put(key(2), blob(2))
        assert await cache.get(key(2)) is None
        await cache.evict(key(2))
    assert not cache.disk_enabled and cache.stats().disk_enabled is False
    assert cache.stats().disk_items == 0
    logged = warnings_from_cache(caplog)
    assert len(logged) == 1 and str(root) in logged[0] and "disabled" in logged[0]
    await cache.close()


async def test_removed_cache_dir_disables_and_is_not_recreated(tmp_path, caplog):
    root = tmp_path / "cache"
    cache = BlockCache(memory_bytes=0, disk_dir=root, disk_bytes=1 << 20)
    await cache.put(key(1), blob(1))
    shutil.rmtree(root)
    with caplog.at_level(logging.WARNING, logger="cairn.storage.cache"):
        await cache.put(key(2), blob(2))  # the first write notices
        assert await cache.get(key(1)) is None
    assert not cache.disk_enabled and not root.exists()
    assert len(warnings_from_cache(caplog)) == 1
    await cache.close()


async def test_io_errors_on_write_and_read_disable_the_disk_tier(tmp_path, monkeypatch, caplog):
    root = tmp_path / "cache"
    cache = BlockCache(memory_bytes=0, disk_dir=root, disk_bytes=1 << 20)
    await cache.put(key(1), blob(1))
    real_open = builtins.open

    def failing_open(file, *args, **kwargs):
        if str(file).startswith(str(root)):
            raise OSError(5, "Input/output error", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    with caplog.at_level(logging.WARNING, logger="cairn.storage.cache"):
        assert await cache.get(key(1)) is None  # read fails: miss, tier off
        await cache.put(key(2), blob(2))
    assert not cache.disk_enabled
    assert len(warnings_from_cache(caplog)) == 1
    assert "Input/output error" in warnings_from_cache(caplog)[0]
    await cache.close()


async def test_an_unusable_cache_dir_at_start_leaves_memory_working(tmp_path, caplog):
    root = tmp_path / "cache"
    root.write_bytes(b"a file, not a directory")
    cache = BlockCache(memory_bytes=1000, disk_dir=root, disk_bytes=1 << 20)
    with caplog.at_level(logging.WARNING, logger="cairn.storage.cache"):
        await cache.put(key(1), blob(1))
    assert await cache.get(key(1)) == blob(1)
    assert not cache.disk_enabled and len(warnings_from_cache(caplog)) == 1
    await cache.close()


# -- CachedStore ------------------------------------------------------------------------


class CountingStore(FileStore):
    """A file store that counts the reads that reach it."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gets: list[tuple[str, int, int]] = []

    async def _get(self, key: str, offset: int, length: int) -> bytes:
        self.gets.append((key, offset, length))
        await asyncio.sleep(0.01)  # long enough for concurrent misses to overlap
        return await super()._get(key, offset, length)


@pytest.fixture
async def backing(tmp_path):
    store = CountingStore(f"file://{tmp_path}/objects")
    await store.check()
    return store


async def test_whole_block_reads_are_cached(backing, tmp_path):
    await backing.put(key(1), blob(1))
    store = CachedStore(backing, BlockCache(1 << 20, tmp_path / "cache", 1 << 20))
    assert await store.get(key(1)) == blob(1)
    assert await store.get(key(1)) == blob(1)
    assert len(backing.gets) == 1
    stats = store.cache.stats()
    assert (stats.hits, stats.misses) == (1, 1)
    await store.close()


async def test_ranged_reads_use_a_cached_block_or_go_to_the_store(backing):
    await backing.put(key(1), b"0123456789")
    await backing.put(key(2), b"abcdefghij")
    store = CachedStore(backing, BlockCache(1 << 20))
    await store.get(key(1))
    backing.gets.clear()
    assert await store.get(key(1), 2, 3) == b"234"
    assert await store.get(key(1), 8, -1) == b"89"
    assert await store.get(key(1), 20, 5) == b""
    assert backing.gets == []
    assert await store.get(key(2), 1, 2) == b"bc"  # not cached: a ranged read of the store
    assert backing.gets == [(key(2), 1, 2)]
    assert not store.cache.contains(key(2))  # a part of a block is not cached
    await store.close()


async def test_writes_go_through_the_cache(backing):
    store = CachedStore(backing, BlockCache(1 << 20))
    await store.put(key(1), blob(1))
    assert await backing.get(key(1)) == blob(1)
    backing.gets.clear()
    assert await store.get(key(1)) == blob(1)
    assert backing.gets == []
    await store.delete(key(1))
    assert not store.cache.contains(key(1))
    with pytest.raises(NotFound):
        await store.get(key(1))
    await store.close()


async def test_write_through_can_be_turned_off(backing):
    store = CachedStore(backing, BlockCache(1 << 20), write_through=False)
    await store.put(key(1), blob(1))
    assert not store.cache.contains(key(1))
    assert await store.get(key(1)) == blob(1)
    assert store.cache.contains(key(1))
    await store.close()


async def test_concurrent_misses_share_one_download(backing):
    await backing.put(key(1), blob(1))
    store = CachedStore(backing, BlockCache(1 << 20))
    results = await asyncio.gather(*(store.get(key(1)) for _ in range(10)))
    assert results == [blob(1)] * 10
    assert len(backing.gets) == 1
    await store.close()


async def test_a_cancelled_reader_does_not_fail_the_others(backing):
    await backing.put(key(1), blob(1))
    store = CachedStore(backing, BlockCache(1 << 20))
    first = asyncio.ensure_future(store.get(key(1)))
    second = asyncio.ensure_future(store.get(key(1)))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == blob(1)
    with pytest.raises(asyncio.CancelledError):
        await first
    await store.close()


async def test_missing_objects_stay_not_found_and_are_not_cached(backing):
    store = CachedStore(backing, BlockCache(1 << 20))
    for _ in range(2):
        with pytest.raises(NotFound):
            await store.get(key(7))
    assert not store.cache.contains(key(7))
    await store.close()


async def test_a_failing_cache_disk_falls_back_to_the_store(backing, tmp_path, caplog):
    root = tmp_path / "cache"
    await backing.put(key(1), blob(1))
    await backing.put(key(2), blob(2))
    store = CachedStore(backing, BlockCache(0, root, 1 << 20))
    assert await store.get(key(1)) == blob(1)
    await store.cache.flush()  # the disk copy is written in the background
    shutil.rmtree(root)
    root.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="cairn.storage.cache"):
        assert await store.get(key(1)) == blob(1)
        assert await store.get(key(2)) == blob(2)
        await store.put(key(3), blob(3))
        assert await store.get(key(3)) == blob(3)
    assert not store.cache.disk_enabled
    assert len(warnings_from_cache(caplog)) == 1
    await store.close()


async def test_list_head_and_check_pass_through(backing):
    store = CachedStore(backing, BlockCache(1 << 20))
    await store.put(key(1), blob(1))
    await store.check()
    assert (await store.head(key(1))).size == 100
    assert [i.key async for i in store.list(f"{VOL}/")] == [key(1)]
    assert repr(store) == f"<CachedStore {backing.url}>"
    await store.close()


async def test_open_store_result_can_be_wrapped(tmp_path):
    async with CachedStore(open_store(f"file://{tmp_path}/o"), BlockCache(1 << 20)) as store:
        await store.check()
        await store.put("a", b"b")
        assert await store.get("a") == b"b"


async def test_a_miss_does_not_wait_for_the_cache_disk(backing, tmp_path):
    await backing.put(key(1), blob(1))
    cache = BlockCache(1 << 20, tmp_path / "cache", 1 << 20)
    store = CachedStore(backing, cache)
    written = asyncio.Event()
    real_put = cache._disk.put

    async def slow_put(k, data):
        await written.wait()
        await real_put(k, data)

    cache._disk.put = slow_put
    assert await store.get(key(1)) == blob(1)  # answered while the disk write waits
    assert cache.contains(key(1)) and cache.stats().disk_items == 0
    written.set()
    await cache.flush()
    assert cache.stats().disk_items == 1
    await store.close()


async def test_background_disk_writes_are_bounded_and_flushed_at_close(tmp_path):
    root = tmp_path / "cache"
    cache = BlockCache(0, root, 1 << 20, pending_bytes=250)
    for n in range(4):
        cache.put_later(key(n), blob(n))  # 100 bytes each: the third and fourth are dropped
    assert cache.dropped_writes == 2
    await cache.close()
    again = BlockCache(0, root, 1 << 20)
    assert await again.get(key(0)) == blob(0)
    assert await again.get(key(1)) == blob(1)
    assert await again.get(key(2)) is None
    await again.close()


async def test_evicting_a_queued_block_drops_its_disk_write(tmp_path):
    cache = BlockCache(0, tmp_path / "cache", 1 << 20)
    cache.put_later(key(1), blob(1))
    cache.put_later(key(2), blob(2))
    await cache.evict(key(1))
    await cache.evict(key(2))
    await cache.flush()
    assert not cache.contains(key(1)) and not cache.contains(key(2))
    assert cache.stats().disk_items == 0
    await cache.close()


# -- ranged reads of the disk tier -------------------------------------------------------


def big(n: int, size: int) -> bytes:
    return bytes((n + i * 7) % 251 for i in range(size))


async def test_ranged_disk_reads_read_and_check_only_their_pieces(tmp_path):
    root = tmp_path / "cache"
    size = 5 * PIECE + 123
    data = big(1, size)
    cache = BlockCache(0, root, 1 << 20)
    await cache.put(key(1, size), data)
    assert cache.stats().disk_bytes == size + trailer_size(size)
    for offset, length in [(0, 10), (PIECE - 3, 6), (2 * PIECE, PIECE), (size - 5, 100),
                           (3 * PIECE + 1, -1), (size, 4), (size + 10, 4), (0, -1)]:  # fmt: skip
        want = data[offset:] if length < 0 else data[offset : offset + length]
        assert await cache.get_range(key(1, size), offset, length) == want
    # damage the last piece: reads of the first pieces still pass, its own read drops it
    path = next(p for p in root.rglob("*") if p.is_file())
    raw = bytearray(path.read_bytes())
    raw[5 * PIECE + 1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert await cache.get_range(key(1, size), 10, 20) == data[10:30]
    assert await cache.get_range(key(1, size), 5 * PIECE, 10) is None
    assert not cache.contains(key(1, size))
    await cache.close()


async def test_blocks_in_the_older_single_crc_format_are_still_read(tmp_path):
    import struct
    import zlib

    root = tmp_path / "cache"
    first = BlockCache(0, root, 1 << 20)
    await first.put(key(1), blob(1))
    await first.close()
    path = next(p for p in root.rglob("*") if p.is_file())
    path.write_bytes(blob(1) + struct.pack(">I4s", zlib.crc32(blob(1)), b"CRC1"))
    second = BlockCache(0, root, 1 << 20)
    assert await second.get(key(1)) == blob(1)
    assert await second.get_range(key(1), 10, 5) == blob(1)[10:15]
    await second.close()


async def test_ranged_store_reads_use_the_disk_tier(backing, tmp_path):
    size = 3 * PIECE
    data = big(2, size)
    await backing.put(key(2, size), data)
    store = CachedStore(backing, BlockCache(0, tmp_path / "cache", 1 << 20))
    assert await store.get(key(2, size)) == data
    await store.cache.flush()
    backing.gets.clear()
    assert await store.get(key(2, size), PIECE + 5, 4096) == data[PIECE + 5 : PIECE + 5 + 4096]
    assert backing.gets == []
    assert store.cache.stats().disk_hits == 1
    await store.close()
