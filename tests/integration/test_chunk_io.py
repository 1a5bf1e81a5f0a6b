"""The data path against a real redis-server and a file:// object store: writes become
slices of blocks, reads assemble them; across block and chunk boundaries, with overwrites,
holes, truncation, compression, a block cache, read-ahead, concurrency and failures."""

from __future__ import annotations

import asyncio
import errno
import os
import random

import pytest

from cairn.chunk import layout
from cairn.chunk.reader import ChunkReader
from cairn.chunk.writer import ChunkWriter
from cairn.errors import FSError, PermanentError
from cairn.meta.engine import CHUNK_SIZE, ROOT_CTX, ROOT_INODE, Format, Meta, format_volume
from cairn.storage import BlockCache, CachedStore, chunks_prefix, open_store, parse_block_key

KiB = 1024
BLOCK = 64 * KiB


async def open_volume(redis_url, compress="none", **kw) -> Meta:
    await format_volume(
        redis_url,
        Format(name="chunks", storage="file:///unused", block_size=BLOCK, compress=compress,
               trash_days=0, **kw),
    )  # fmt: skip
    return await Meta.open(redis_url)


@pytest.fixture
async def meta(redis_url):
    m = await open_volume(redis_url)
    yield m
    await m.close()


@pytest.fixture
async def store(tmp_path):
    s = open_store(f"file://{tmp_path}/objects?fsync=false")
    yield s
    await s.close()


async def new_file(meta, name=b"f") -> int:
    inode, _ = await meta.create(ROOT_CTX, ROOT_INODE, name, 0o644)
    return inode


async def written_file(meta, store, size: int) -> tuple[int, bytes]:
    """A new file of `size` random bytes, written and committed: (inode, its bytes)."""
    inode = await new_file(meta)
    data = os.urandom(size)
    writer = ChunkWriter(meta, store)
    await writer.write(inode, 0, data)
    await writer.flush(inode)
    return inode, data


async def read_sequentially(reader, inode, data, piece=16 * KiB) -> None:
    """Reads the whole file in order, `piece` at a time, leaving read-ahead room to run
    between reads as FUSE's gaps do; every piece must be right."""
    for offset in range(0, len(data), piece):
        got = await reader.read(inode, offset, piece, len(data), handle=1)
        assert got == data[offset : offset + piece]
        await asyncio.sleep(0)


async def read_all(meta, reader, inode) -> bytes:
    size = (await meta.getattr(inode)).size
    return await reader.read(inode, 0, size + 10, size)


async def wait_until(predicate, timeout=5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def object_keys(store, meta) -> list[str]:
    return [info.key async for info in store.list(chunks_prefix(meta.fmt.uuid))]


def put_model(model: bytearray, offset: int, data: bytes) -> None:
    if len(model) < offset + len(data):
        model.extend(bytes(offset + len(data) - len(model)))
    model[offset : offset + len(data)] = data


class CountingStore:
    """Wraps a store and counts calls, optionally failing puts of chosen blocks."""

    def __init__(self, store, fail_block=None):
        self.store = store  # the store it wraps, as the real wrappers name it
        self.gets: list[tuple[str, int, int]] = []
        self.puts: list[str] = []
        self.fail_block = fail_block

    async def put(self, key, data):
        if self.fail_block is not None and parse_block_key(key).index == self.fail_block:
            raise PermanentError("injected put failure")
        self.puts.append(key)
        await self.store.put(key, data)

    async def get(self, key, offset=0, length=-1):
        self.gets.append((key, offset, length))
        return await self.store.get(key, offset, length)

    def read_now(self, key, offset, length):
        data = self.store.read_now(key, offset, length)
        if data is not None:
            self.gets.append((key, offset, length))
        return data

    def __getattr__(self, name):
        return getattr(self.store, name)


@pytest.mark.parametrize("compress", ["none", "zstd", "lz4"])
async def test_sequential_write_is_one_slice_of_blocks_and_reads_back(redis_url, store, compress):
    meta = await open_volume(redis_url, compress)
    try:
        inode = await new_file(meta)
        writer, reader = ChunkWriter(meta, store), ChunkReader(meta, store)
        data = os.urandom(5 * BLOCK + 1234)
        f = writer.open(inode)
        for start in range(0, len(data), 10_000):  # uneven pieces, crossing block ends
            await f.write(start, data[start : start + 10_000])
        await f.close()

        records = await meta.chunk_records(inode, 0)
        assert len(records) == 1 and records[0].len == len(data)
        names = sorted(parse_block_key(k) for k in await object_keys(store, meta))
        assert [(k.index, k.size) for k in names] == layout.slice_blocks(len(data), BLOCK)
        assert (await meta.getattr(inode)).size == len(data)
        assert await read_all(meta, reader, inode) == data
        rnd = random.Random(7)
        for _ in range(50):
            off = rnd.randrange(len(data))
            n = rnd.randrange(1, 3 * BLOCK)
            assert await reader.read(inode, off, n, len(data)) == data[off : off + n]
        await reader.close()
    finally:
        await meta.close()


async def test_write_across_a_chunk_boundary_and_the_hole_before_it(meta, store):
    inode = await new_file(meta)
    writer, reader = ChunkWriter(meta, store), ChunkReader(meta, store)
    start = CHUNK_SIZE - 100 * KiB
    data = os.urandom(200 * KiB)
    await writer.write(inode, start, data)
    await writer.flush(inode)

    first, second = await meta.chunk_records(inode, 0), await meta.chunk_records(inode, 1)
    assert [(r.pos, r.len) for r in first] == [(CHUNK_SIZE - 100 * KiB, 100 * KiB)]
    assert [(r.pos, r.len) for r in second] == [(0, 100 * KiB)]
    size = start + len(data)
    assert await reader.read(inode, start, len(data), size) == data
    assert await reader.read(inode, start - 10, 20, size) == bytes(10) + data[:10]
    assert await reader.read(inode, 0, 4 * KiB, size) == bytes(4 * KiB)  # the hole
    assert await reader.read(inode, CHUNK_SIZE - 5, 10, size) == data[100 * KiB - 5 : 100 * KiB + 5]
    assert await reader.read(inode, size - 3, 100, size) == data[-3:]
    assert await reader.read(inode, size, 100, size) == b""


async def test_overwrites_newest_wins(meta, store):
    inode = await new_file(meta)
    writer, reader = ChunkWriter(meta, store), ChunkReader(meta, store)
    model = bytearray()
    f = writer.open(inode)
    for offset, length, flush in [
        (0, 3 * BLOCK, True),  # committed base
        (BLOCK // 2, BLOCK, False),  # over committed data
        (BLOCK // 2 + 100, 50, False),  # rewrite of a still-buffered tail
        (10, 3 * BLOCK, False),  # over an uploaded (frozen) block: a new slice
        (BLOCK, 20, False),  # older slices overlap: must not join them
        (3 * BLOCK, BLOCK, True),  # append
        (5, 7, True),
    ]:
        data = os.urandom(length)
        await f.write(offset, data)
        put_model(model, offset, data)
        if flush:
            await f.flush()
            assert await read_all(meta, reader, inode) == bytes(model)
    await f.close()
    assert await read_all(meta, reader, inode) == bytes(model)


async def test_random_writes_flushes_and_truncates_match_a_model(meta, store):
    inode = await new_file(meta)
    writer = ChunkWriter(meta, store, buffer_limit=4 * BLOCK)
    reader = ChunkReader(meta, store)
    rnd = random.Random(42)
    model = bytearray()
    f = writer.open(inode)
    for step in range(150):
        choice = rnd.random()
        if choice < 0.8:
            offset = rnd.randrange(0, 6 * BLOCK)
            data = rnd.randbytes(rnd.randrange(1, BLOCK + 100))
            await f.write(offset, data)
            put_model(model, offset, data)
        elif choice < 0.93:
            await f.flush()
        else:
            await f.flush()  # truncate works on committed data, as the VFS does
            length = rnd.randrange(0, 7 * BLOCK)
            await meta.truncate(ROOT_CTX, inode, length)
            del model[length:]
            model.extend(bytes(length - len(model)))
        if step % 25 == 0:
            await f.flush()
            assert await read_all(meta, reader, inode) == bytes(model), step
    await f.close()
    assert writer.buffered == 0
    assert await read_all(meta, reader, inode) == bytes(model)


async def test_holes_read_as_zeros(meta, store):
    inode = await new_file(meta)
    writer, reader = ChunkWriter(meta, store), ChunkReader(meta, store)
    head, tail = os.urandom(1000), os.urandom(1000)
    await writer.write(inode, 0, head)
    await writer.write(inode, 5 * BLOCK, tail)
    await writer.flush(inode)
    size = 5 * BLOCK + 1000
    assert await reader.read(inode, 0, size, size) == head + bytes(5 * BLOCK - 1000) + tail
    await meta.truncate(ROOT_CTX, inode, size + 3 * BLOCK)  # extending adds zeros
    assert await reader.read(inode, size - 10, 100, size + 3 * BLOCK) == tail[-10:] + bytes(90)


async def test_truncate_then_read_and_write_again(meta, store):
    inode = await new_file(meta)
    writer, reader = ChunkWriter(meta, store), ChunkReader(meta, store)
    data = os.urandom(4 * BLOCK)
    await writer.write(inode, 0, data)
    await writer.flush(inode)
    await meta.truncate(ROOT_CTX, inode, BLOCK + 7)
    assert await read_all(meta, reader, inode) == data[: BLOCK + 7]
    await meta.truncate(ROOT_CTX, inode, 2 * BLOCK)
    assert await read_all(meta, reader, inode) == data[: BLOCK + 7] + bytes(BLOCK - 7)
    more = os.urandom(100)
    await writer.write(inode, 2 * BLOCK, more)
    await writer.flush(inode)
    assert await read_all(meta, reader, inode) == data[: BLOCK + 7] + bytes(BLOCK - 7) + more


async def test_full_blocks_upload_before_flush_and_commit_only_at_flush(meta, store):
    inode = await new_file(meta)
    counting = CountingStore(store)
    writer = ChunkWriter(meta, counting)
    f = writer.open(inode)
    await f.write(0, os.urandom(3 * BLOCK + 100))
    for _ in range(100):  # uploads run in the background
        if len(counting.puts) == 3:
            break
        await asyncio.sleep(0.01)
    assert len(counting.puts) == 3  # the three full blocks, not the partial one
    assert writer.buffered == 100  # only the tail is held
    assert await meta.chunk_records(inode, 0) == []  # nothing committed yet
    assert (await meta.getattr(inode)).size == 0
    assert f.pending() and f.end == 3 * BLOCK + 100
    await f.close()
    assert len(counting.puts) == 4
    assert (await meta.getattr(inode)).size == 3 * BLOCK + 100


async def test_buffer_limit_flushes_under_pressure(meta, store):
    a, b = await new_file(meta, b"a"), await new_file(meta, b"b")
    writer = ChunkWriter(meta, store, buffer_limit=2 * BLOCK)
    reader = ChunkReader(meta, store)
    fa, fb = writer.open(a), writer.open(b)
    da, db = bytearray(), bytearray()
    for i in range(40):  # scattered small writes: each a partial block held in memory
        chunk = os.urandom(5000)
        if i % 2:
            await fa.write(i * 2 * BLOCK, chunk)
            put_model(da, i * 2 * BLOCK, chunk)
        else:
            await fb.write(i * 2 * BLOCK, chunk)
            put_model(db, i * 2 * BLOCK, chunk)
        assert writer.buffered <= 2 * BLOCK + 5000
    # Pressure committed slices before any close.
    assert await meta.chunk_records(a, 0) or await meta.chunk_records(b, 0)
    await fa.close()
    await fb.close()
    assert await read_all(meta, reader, a) == bytes(da)
    assert await read_all(meta, reader, b) == bytes(db)


async def test_concurrent_writers_on_many_files_and_two_mounts_on_one_file(redis_url, store):
    meta1 = await open_volume(redis_url)
    meta2 = await Meta.open(redis_url)
    try:
        w1, w2 = ChunkWriter(meta1, store, max_uploads=4), ChunkWriter(meta2, store)
        reader = ChunkReader(meta1, store)
        files = [await new_file(meta1, f"f{i}".encode()) for i in range(6)]
        contents = {ino: os.urandom(2 * BLOCK + ino) for ino in files}

        async def write_file(writer, ino):
            f = writer.open(ino)
            data = contents[ino]
            for start in range(0, len(data), 7000):
                await f.write(start, data[start : start + 7000])
                await asyncio.sleep(0)
            await f.close()

        await asyncio.gather(*(write_file(w1 if i % 2 else w2, ino) for i, ino in enumerate(files)))
        for ino in files:
            assert await read_all(meta1, reader, ino) == contents[ino]

        shared = await new_file(meta1, b"shared")
        halves = [os.urandom(3 * BLOCK), os.urandom(3 * BLOCK)]

        async def half(writer, i):
            f = writer.open(shared)
            for start in range(0, 3 * BLOCK, 10_000):
                await f.write(i * 3 * BLOCK + start, halves[i][start : start + 10_000])
            await f.close()

        await asyncio.gather(half(w1, 0), half(w2, 1))
        assert await read_all(meta1, reader, shared) == halves[0] + halves[1]
    finally:
        await meta1.close()
        await meta2.close()


async def test_failed_upload_fails_flush_commits_nothing_and_leaves_no_objects(meta, store):
    inode = await new_file(meta)
    writer = ChunkWriter(meta, CountingStore(store, fail_block=1))
    f = writer.open(inode)
    await f.write(0, os.urandom(3 * BLOCK))
    with pytest.raises(PermanentError, match="injected"):
        await f.close()
    assert await meta.chunk_records(inode, 0) == []
    assert (await meta.getattr(inode)).size == 0
    assert await object_keys(store, meta) == []
    assert writer.buffered == 0


async def test_reads_go_through_a_block_cache_in_whole_blocks(meta, store, tmp_path):
    inode, data = await written_file(meta, store, 3 * BLOCK)

    counting = CountingStore(store)
    cached = CachedStore(counting, BlockCache(memory_bytes=1 << 20, disk_dir=tmp_path / "cache"))
    reader = ChunkReader(meta, cached, memory_limit=0, local=False)  # as a remote store
    assert await reader.read(inode, 100, 10, len(data)) == data[100:110]
    key = counting.gets[0][0]
    if reader.codec.name == "none":
        # a small random miss: a ranged GET now, the whole block in the background
        await wait_until(lambda: cached.cache.contains(key))
        assert sorted(counting.gets) == [(key, 0, -1), (key, 100, 10)]
    else:  # a compressed block can only be fetched whole
        assert counting.gets == [(key, 0, -1)]
    gets = len(counting.gets)
    assert await reader.read(inode, 200, 10, len(data)) == data[200:210]
    assert len(counting.gets) == gets  # the second read was a cache hit
    await reader.close()
    await cached.close()


async def test_random_reads_use_ranged_gets_without_a_cache(meta, store):
    inode, data = await written_file(meta, store, 2 * BLOCK)
    counting = CountingStore(store)
    reader = ChunkReader(meta, counting)
    assert await reader.read(inode, BLOCK - 5, 10, len(data)) == data[BLOCK - 5 : BLOCK + 5]
    assert sorted((o, n) for _, o, n in counting.gets) == [(0, 5), (BLOCK - 5, 5)]


async def test_sequential_reads_prefetch_whole_blocks(meta, store):
    inode, data = await written_file(meta, store, 8 * BLOCK)
    counting = CountingStore(store)
    reader = ChunkReader(meta, counting, readahead_max=4 * BLOCK, local=False)  # remote
    await read_sequentially(reader, inode, data)
    whole = [g for g in counting.gets if g[2] == -1]
    ranged = [g for g in counting.gets if g[2] != -1]
    assert len(whole) >= 6  # blocks came whole, ahead of the reads
    assert len(ranged) < 8  # only the reads before the stream was seen as sequential
    assert len(counting.gets) < len(data) // (16 * KiB)
    await reader.close()


async def test_sequential_reads_of_a_local_store_only_announce_the_blocks(meta, store):
    inode, data = await written_file(meta, store, 8 * BLOCK)
    counting = CountingStore(store)
    announced = []
    store.will_need = announced.append  # what the reader tells the file store
    reader = ChunkReader(meta, counting, readahead_max=4 * BLOCK)
    assert reader.local
    await read_sequentially(reader, inode, data)
    assert not [g for g in counting.gets if g[2] == -1]  # no whole block copied in memory
    assert len(set(announced)) >= 6  # the blocks ahead were announced to the kernel
    await reader.close()


async def test_a_small_random_miss_does_not_wait_for_the_whole_block(meta, store, tmp_path):
    inode, data = await written_file(meta, store, 4 * BLOCK)
    release = asyncio.Event()

    class SlowWholeGets(CountingStore):
        async def get(self, key, offset=0, length=-1):
            if length == -1:
                await release.wait()
            return await super().get(key, offset, length)

    slow = SlowWholeGets(store)
    cached = CachedStore(slow, BlockCache(memory_bytes=1 << 20))
    reader = ChunkReader(meta, cached, local=False)  # as a remote store
    for offset in (3 * BLOCK + 7, BLOCK + 11, 2 * BLOCK + 4096):
        got = await asyncio.wait_for(reader.read(inode, offset, 4096, len(data)), 5)
        assert got == data[offset : offset + 4096]
    assert all(n == 4096 for _, _, n in slow.gets)  # every answer came from a ranged GET
    release.set()
    await wait_until(lambda: len(slow.gets) == 6)  # and the three blocks then came whole
    slow.gets.clear()
    assert await reader.read(inode, BLOCK + 100, 4096, len(data)) == data[BLOCK + 100 :][:4096]
    assert slow.gets == []
    await reader.close()
    await cached.close()


async def test_close_stops_background_block_fetches(meta, store):
    inode, data = await written_file(meta, store, 2 * BLOCK)
    never = asyncio.Event()

    class StuckWholeGets(CountingStore):
        async def get(self, key, offset=0, length=-1):
            if length == -1:
                await never.wait()
            return await super().get(key, offset, length)

    cached = CachedStore(StuckWholeGets(store), BlockCache(memory_bytes=1 << 20))
    reader = ChunkReader(meta, cached, local=False)  # as a remote store
    assert await reader.read(inode, 10, 100, len(data)) == data[10:110]
    await asyncio.wait_for(reader.close(), 5)
    await cached.close()


async def test_a_file_with_no_data_reads_empty(meta, store):
    inode = await new_file(meta)
    reader = ChunkReader(meta, store)
    assert await reader.read(inode, 0, 100, 0) == b""
    await meta.truncate(ROOT_CTX, inode, 50)
    assert await reader.read(inode, 0, 100, 50) == bytes(50)


async def test_a_refused_commit_fails_the_flush_and_leaves_no_objects(redis_url, store):
    meta = await open_volume(redis_url, capacity=2 * BLOCK)
    try:
        inode = await new_file(meta)
        writer = ChunkWriter(meta, store)
        await writer.write(inode, 0, os.urandom(BLOCK))
        await writer.flush(inode)
        kept = await object_keys(store, meta)
        await writer.write(inode, BLOCK, os.urandom(2 * BLOCK))
        with pytest.raises(FSError) as caught:
            await writer.flush(inode)
        assert caught.value.errno == errno.ENOSPC
        assert await object_keys(store, meta) == kept
        assert (await meta.getattr(inode)).size == BLOCK
    finally:
        await meta.close()


async def test_background_flusher_commits_idle_files(meta, store):
    inode = await new_file(meta)
    commits = []
    writer = ChunkWriter(meta, store, on_commit=lambda *args: commits.append(args[:2]))
    writer.start(idle_seconds=0.05, interval=0.02)
    f = writer.open(inode)
    await f.write(0, b"hello")
    for _ in range(100):
        if commits:
            break
        await asyncio.sleep(0.02)
    assert commits == [(inode, 0)]
    assert (await meta.getattr(inode)).size == 5
    await f.write(5, b" world")
    await writer.close()  # unmount flushes what is left
    assert commits == [(inode, 0), (inode, 0)]
    reader = ChunkReader(meta, store)
    assert await read_all(meta, reader, inode) == b"hello world"


async def test_concurrent_writes_and_flushes_on_one_file_match_a_model(meta, store):
    inode = await new_file(meta)
    writer = ChunkWriter(meta, store, buffer_limit=3 * BLOCK, max_uploads=3)
    reader = ChunkReader(meta, store)
    model = bytearray()
    f = writer.open(inode)

    async def worker(seed):
        rnd = random.Random(seed)
        for _ in range(40):
            if rnd.random() < 0.15:
                await f.flush()
                continue
            offset = rnd.randrange(0, 4 * BLOCK)
            data = rnd.randbytes(rnd.randrange(1, BLOCK))
            # The bytes are buffered before write() first yields: the model follows call order.
            put_model(model, offset, data)
            await f.write(offset, data)

    await asyncio.gather(*(worker(seed) for seed in range(5)))
    await f.close()
    assert await read_all(meta, reader, inode) == bytes(model)


async def test_a_long_sequential_write_stays_one_slice_within_the_buffer_limit(meta, store):
    inode = await new_file(meta)
    writer = ChunkWriter(meta, store, buffer_limit=2 * BLOCK)
    data = os.urandom(10 * BLOCK)
    f = writer.open(inode)
    peak = 0
    for start in range(0, len(data), 10_000):
        await f.write(start, data[start : start + 10_000])
        peak = max(peak, writer.buffered)
    await f.close()
    assert peak <= 2 * BLOCK + 10_000  # waited for blocks in flight, no early commit
    assert len(await meta.chunk_records(inode, 0)) == 1
    assert await read_all(meta, ChunkReader(meta, store), inode) == data


async def test_a_local_store_is_read_in_place(meta, store, tmp_path):
    """A file:// store: a small random miss reads just its bytes and pulls no whole block
    in the background (the disk is as near as a cache); a read within one cached block
    can be answered as a view of it, without a copy."""
    inode, data = await written_file(meta, store, 3 * BLOCK)

    counting = CountingStore(store)
    cached = CachedStore(counting, BlockCache(memory_bytes=1 << 20))
    reader = ChunkReader(meta, cached)
    assert reader.local
    assert await reader.read(inode, BLOCK + 100, 10, len(data)) == data[BLOCK + 100 : BLOCK + 110]
    await asyncio.sleep(0.2)
    assert [length for _, _, length in counting.gets] == [10]  # no whole block followed

    # Sequential reads take whole blocks; one inside a block comes back as a view.
    first = await reader.read(inode, 0, BLOCK // 2, len(data), handle="h")
    second = await reader.read(inode, BLOCK // 2, BLOCK // 2, len(data), handle="h", view=True)
    assert first == data[: BLOCK // 2]
    assert isinstance(second, memoryview) and second == data[BLOCK // 2 : BLOCK]
    across = await reader.read(inode, BLOCK - 5, 10, len(data), handle="h", view=True)
    assert bytes(across) == data[BLOCK - 5 : BLOCK + 5]
    plain = await reader.read(inode, BLOCK // 2, BLOCK // 2, len(data), handle="h")
    assert isinstance(plain, bytes)
    await reader.close()
