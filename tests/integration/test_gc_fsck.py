"""Compaction, object gc and fsck against a real redis-server and a file:// object store."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from cairn.chunk.compact import Compactor, compact_all, compact_chunk, should_compact
from cairn.chunk.fsck import fsck
from cairn.chunk.gc import gc
from cairn.chunk.reader import ChunkReader
from cairn.chunk.writer import ChunkWriter
from cairn.meta import keys
from cairn.meta.engine import ROOT_CTX, ROOT_INODE, Format, Meta, format_volume
from cairn.storage import block_key, chunks_prefix, open_store, parse_block_key

KiB = 1024
BLOCK = 64 * KiB
HOUR = 3600


@pytest.fixture
async def meta(redis_url):
    await format_volume(
        redis_url,
        Format(name="gc", storage="file:///unused", block_size=BLOCK, trash_days=0),
    )
    m = await Meta.open(redis_url)
    yield m
    await m.close()


@pytest.fixture
def root(tmp_path):
    return tmp_path / "objects"


@pytest.fixture
async def store(root):
    s = open_store(f"file://{root}?fsync=false")
    yield s
    await s.close()


async def new_file(meta, name=b"f") -> int:
    inode, _ = await meta.create(ROOT_CTX, ROOT_INODE, name, 0o644)
    return inode


async def read_all(meta, store, inode) -> bytes:
    size = (await meta.getattr(inode)).size
    reader = ChunkReader(meta, store)
    try:
        return await reader.read(inode, 0, size, size)
    finally:
        await reader.close()


async def object_keys(store, meta) -> set[str]:
    return {info.key async for info in store.list(chunks_prefix(meta.fmt.uuid))}


def age(root, key, seconds):
    """Make an object look `seconds` old (what gc's grace period looks at)."""
    path = root.joinpath(*key.split("/"))
    then = time.time() - seconds
    os.utime(path, (then, then))


async def fragmented_file(meta, store, pieces=24, name=b"frag") -> tuple[int, bytes]:
    """A file written as many overlapping, separately flushed pieces, with a hole."""
    inode = await new_file(meta, name)
    writer = ChunkWriter(meta, store)
    model = bytearray(3 * BLOCK + 500)
    for i in range(pieces):
        offset = (i * 7919) % (3 * BLOCK)
        data = os.urandom(1000 + i * 37)
        data = data[: 3 * BLOCK + 500 - offset]
        if 2 * BLOCK <= offset < 2 * BLOCK + 3000:  # keep a hole in the middle
            continue
        await writer.write(inode, offset, data)
        await writer.flush(inode)
        model[offset : offset + len(data)] = data
    size = (await meta.getattr(inode)).size
    return inode, bytes(model[:size])


def test_should_compact_counts_records():
    assert not should_compact([object()] * 16)
    assert should_compact([object()] * 17)
    assert should_compact([object()] * 3, threshold=2)


async def test_compaction_keeps_contents_and_leaves_one_slice(meta, store):
    inode, content = await fragmented_file(meta, store)
    before = await meta.chunk_records(inode, 0)
    assert should_compact(before)
    assert await read_all(meta, store, inode) == content

    result = await compact_chunk(meta, store, inode, 0)
    assert result.done and result.records == len(before)
    after = await meta.chunk_records(inode, 0)
    assert len(after) == 1 and after[0].id == result.slice_id
    assert await read_all(meta, store, inode) == content

    # The old slices were released (trash_days=0: due now); gc frees their objects.
    report = await gc(meta, store, delete=True)
    assert report.pending_freed == len({(r.id, r.size) for r in before})
    left = {parse_block_key(k).slice_id for k in await object_keys(store, meta)}
    assert left == {result.slice_id}
    assert await read_all(meta, store, inode) == content
    assert (await fsck(meta, store)).ok


async def test_compaction_skips_a_tidy_chunk_and_keeps_later_writes(meta, store):
    inode = await new_file(meta)
    writer = ChunkWriter(meta, store)
    await writer.write(inode, 0, os.urandom(BLOCK))
    await writer.flush(inode)
    assert (await compact_chunk(meta, store, inode, 0)).records == 0

    inode, content = await fragmented_file(meta, store, pieces=6)
    records = await meta.chunk_records(inode, 0)
    assert not should_compact(records)
    assert (await compact_chunk(meta, store, inode, 0)).records == 0
    forced = await compact_chunk(meta, store, inode, 0, force=True)
    assert forced.done
    late = os.urandom(100)
    await writer.write(inode, 50, late)
    await writer.flush(inode)
    expected = content[:50] + late + content[150:]
    assert await read_all(meta, store, inode) == expected


async def test_background_compactor_and_compact_all(meta, store):
    compactor = Compactor(meta, store, threshold=4)
    writer = ChunkWriter(meta, store, on_commit=compactor.on_commit)
    inode = await new_file(meta)
    model = bytearray(BLOCK)
    for i in range(10):
        data = os.urandom(500)
        await writer.write(inode, i * 3000, data)
        await writer.flush(inode)
        model[i * 3000 : i * 3000 + 500] = data
    await compactor.drain()
    assert compactor.results and compactor.results[0].done
    assert len(await meta.chunk_records(inode, 0)) < 10
    size = (await meta.getattr(inode)).size
    assert await read_all(meta, store, inode) == bytes(model[:size])
    await compactor.close()

    other, content = await fragmented_file(meta, store)
    results = await compact_all(meta, store)
    assert [(r.inode, r.done) for r in results] == [(other, True)]
    assert await read_all(meta, store, other) == content


async def test_gc_finds_and_deletes_leaked_objects_but_not_uploads_in_flight(meta, store, root):
    inode = await new_file(meta)
    writer = ChunkWriter(meta, store)
    data = os.urandom(2 * BLOCK + 10)
    await writer.write(inode, 0, data)
    await writer.flush(inode)
    kept = await object_keys(store, meta)
    for key in kept:
        age(root, key, 2 * HOUR)  # old, but referenced

    volume = meta.fmt.uuid
    leaked_id, fresh_id = await meta.new_slice_id(), await meta.new_slice_id()
    leaked = [block_key(volume, leaked_id, i, BLOCK) for i in range(2)]
    fresh = block_key(volume, fresh_id, 0, 100)  # an upload whose slice is not committed yet
    for key in leaked:
        await store.put(key, os.urandom(BLOCK))
        age(root, key, 2 * HOUR)
    await store.put(fresh, os.urandom(100))

    report = await gc(meta, store)
    assert sorted(report.leaked) == sorted(leaked)
    assert report.recent == 1 and report.valid == len(kept) and report.deleted == 0
    assert await object_keys(store, meta) == kept | set(leaked) | {fresh}

    progress = []
    report = await gc(meta, store, delete=True, progress=lambda *a: progress.append(a))
    assert report.deleted == 2 and progress
    assert await object_keys(store, meta) == kept | {fresh}
    assert await read_all(meta, store, inode) == data

    # Long after, the never-committed upload is a leak too.
    report = await gc(meta, store, delete=True, now=time.time() + 2 * HOUR)
    assert report.leaked == [fresh]
    assert await object_keys(store, meta) == kept


async def test_gc_drains_the_delete_queue_of_removed_files(meta, store):
    writer = ChunkWriter(meta, store)
    gone, stays = await new_file(meta, b"gone"), await new_file(meta, b"stays")
    await writer.write(gone, 0, os.urandom(3 * BLOCK))
    await writer.write(stays, 0, os.urandom(BLOCK))
    await writer.flush_all()
    stays_keys = {
        k for k in await object_keys(store, meta) if parse_block_key(k).size == BLOCK
    }  # fmt: skip
    await meta.close_file(gone)  # create() opened it; an open file would stay
    await meta.unlink(ROOT_CTX, ROOT_INODE, b"gone")

    report = await gc(meta, store)  # report only
    assert report.pending_due == 1 and report.pending_freed == 0
    report = await gc(meta, store, delete=True)
    assert report.pending_freed == 1 and report.pending_objects == 3
    assert await meta.pending_slice_deletes() == []
    remaining = await object_keys(store, meta)
    assert len(remaining) == 1 and len(stays_keys & remaining) == 1


async def test_gc_keeps_objects_of_slices_waiting_in_the_trash(redis_url, store, root):
    await format_volume(
        redis_url, Format(name="gc", storage="file:///unused", block_size=BLOCK, trash_days=1)
    )
    meta = await Meta.open(redis_url)
    try:
        inode, content = await fragmented_file(meta, store)
        assert (await compact_chunk(meta, store, inode, 0)).done
        for key in await object_keys(store, meta):
            age(root, key, 2 * HOUR)
        report = await gc(meta, store, delete=True)
        assert report.leaked == [] and report.queued > 0 and report.pending_freed == 0
        assert await read_all(meta, store, inode) == content
    finally:
        await meta.close()


async def test_fsck_of_a_healthy_volume(meta, store):
    a, b = await new_file(meta, b"a"), await new_file(meta, b"b")
    writer = ChunkWriter(meta, store)
    await writer.write(a, 0, os.urandom(2 * BLOCK + 1))
    await writer.write(b, 10, os.urandom(100))
    await writer.flush_all()
    await meta.mkdir(ROOT_CTX, ROOT_INODE, b"dir", 0o755)
    report = await fsck(meta, store)
    assert report.ok, report
    assert report.slices == 2 and report.objects == 4 and report.chunks == 2


async def test_fsck_finds_a_deleted_object_and_the_files_using_it(meta, store):
    inode = await new_file(meta)
    writer = ChunkWriter(meta, store)
    await writer.write(inode, 0, os.urandom(3 * BLOCK))
    await writer.flush(inode)
    victim = sorted(await object_keys(store, meta))[1]
    await store.delete(victim)

    report = await fsck(meta, store)
    assert not report.ok
    [missing] = report.missing
    assert missing.keys == [victim] and missing.inodes == [inode]
    assert report.broken_inodes == [inode]


async def test_fsck_reports_leaked_and_damaged_objects(meta, store, root):
    inode = await new_file(meta)
    writer = ChunkWriter(meta, store)
    await writer.write(inode, 0, os.urandom(BLOCK))
    await writer.flush(inode)
    [good] = await object_keys(store, meta)
    await store.put(good, b"short")  # damaged: wrong size for an uncompressed block
    stray = block_key(meta.fmt.uuid, await meta.new_slice_id(), 0, 10)
    await store.put(stray, bytes(10))
    age(root, stray, 2 * HOUR)
    report = await fsck(meta, store)
    assert report.damaged == [good]
    assert report.leaked == [stray]


async def test_fsck_finds_and_repairs_wrong_counters(meta, store):
    inode = await new_file(meta)
    writer = ChunkWriter(meta, store)
    await writer.write(inode, 0, os.urandom(BLOCK + 5))
    await writer.flush(inode)
    d, _ = await meta.mkdir(ROOT_CTX, ROOT_INODE, b"q", 0o755)
    await meta.set_quota(ROOT_CTX, d, space=1 << 30)
    await meta.create(ROOT_CTX, d, b"inside", 0o644)
    [record] = await meta.chunk_records(inode, 0)

    # Corrupt the counters behind the engine's back.
    await meta.r.incrby(keys.USED_SPACE, 12345)
    await meta.r.incrby(keys.USED_INODES, -1)
    await meta.r.hincrby(keys.QUOTA_INODES, str(d), 5)
    await meta.r.hincrby(keys.SLICE_REFS, keys.slice_key(record.id, record.size), 2)

    report = await fsck(meta, store)
    wrong = {c.name: (c.stored, c.actual, c.repaired) for c in report.counters}
    space = wrong["space"]
    assert space[0] - space[1] == 12345 and not space[2]
    assert wrong["inodes"][0] == wrong["inodes"][1] - 1
    assert wrong[f"quota:{d}:inodes"] == (6, 1, False)
    assert wrong[f"slice:{record.id}_{record.size}"] == (3, 1, False)
    assert not report.ok

    repaired = await fsck(meta, store, repair=True)
    assert all(c.repaired for c in repaired.counters) and len(repaired.counters) == 4
    assert (await fsck(meta, store)).ok
    assert await meta.slice_refs(record.id, record.size) == 1
    assert (await meta.get_quota(d)).used_inodes == 1


async def test_fsck_repair_frees_a_slice_nothing_names(meta, store):
    inode = await new_file(meta)
    writer = ChunkWriter(meta, store)
    await writer.write(inode, 0, os.urandom(100))
    await writer.flush(inode)
    phantom = keys.slice_key(await meta.new_slice_id(), 100)
    await meta.r.hset(keys.SLICE_REFS, phantom, 1)  # a count with no record behind it
    report = await fsck(meta, store, repair=True)
    assert [c.name for c in report.counters] == [f"slice:{phantom}"]
    assert await meta.pending_slice_deletes() == [keys.parse_slice_key(phantom)]
    await asyncio.sleep(0)
    assert (await gc(meta, store, delete=True)).pending_freed == 1
    assert (await fsck(meta, store)).ok
