"""File data in the metadata engine against a real redis-server: slices, truncate,
fallocate, copies, compaction, slice references, quotas, capacity, trash, dump and load."""

from __future__ import annotations

import errno
import io
import os
import stat
import time

import pytest

from cairn.errors import ConfigError, FSError
from cairn.meta.engine import (
    CHUNK_SIZE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    ROOT_CTX,
    ROOT_INODE,
    Ctx,
    Format,
    Meta,
    SliceView,
    format_volume,
    load,
)

ROOT = ROOT_CTX
ALICE = Ctx(1000, 1000, umask=0)
MiB = 1 << 20


def fmt(**kw) -> Format:
    return Format(name="test", storage="file:///tmp/cairn-test", **{"trash_days": 0, **kw})


async def open_meta(url, **kw) -> Meta:
    await format_volume(url, fmt(**kw))
    return await Meta.open(url)


@pytest.fixture
async def meta(redis_url):
    m = await open_meta(redis_url)
    yield m
    await m.close()


def H(n):
    return SliceView(0, 0, 0, n)


async def put(meta, ino, offset, length, ctx=ROOT):
    """Commits a fresh slice of `length` bytes at file offset (within one chunk)."""
    sid = await meta.new_slice_id()
    index, pos = divmod(offset, CHUNK_SIZE)
    await meta.write(ctx, ino, index, pos, SliceView(sid, length, 0, length))
    return sid


async def new_file(meta, name=b"f", parent=ROOT_INODE, ctx=ROOT):
    ino, _ = await meta.mknod(ctx, parent, name, stat.S_IFREG, 0o644)
    return ino


def code(excinfo) -> int:
    return excinfo.value.errno


async def test_slice_ids_are_unique_across_clients(meta, redis_url):
    other = await Meta.open(redis_url)
    ids = [await meta.new_slice_id() for _ in range(5)] + [
        await other.new_slice_id() for _ in range(5)
    ]
    await other.close()
    assert len(set(ids)) == 10 and 0 not in ids


async def test_write_then_read_newest_wins(meta):
    f = await new_file(meta)
    a = await put(meta, f, 0, 100)
    b = await put(meta, f, 50, 100)
    attr = await meta.getattr(f)
    assert attr.size == 150 and attr.blocks == 8
    assert await meta.read(f, 0) == [SliceView(a, 100, 0, 50), SliceView(b, 100, 0, 100)]
    assert await meta.read(f, 1) == []
    c = await put(meta, f, CHUNK_SIZE + 10, 10)  # second chunk, with a hole before
    assert await meta.read(f, 0) == [
        SliceView(a, 100, 0, 50),
        SliceView(b, 100, 0, 100),
        H(CHUNK_SIZE - 150),
    ]
    assert await meta.read(f, 1) == [H(10), SliceView(c, 10, 0, 10)]
    assert (await meta.status())["used_space"] == CHUNK_SIZE + 4096
    with pytest.raises(FSError) as e:
        await meta.write(ROOT, f, 0, CHUNK_SIZE - 5, SliceView(9, 10, 0, 10))
    assert code(e) == errno.EINVAL
    d, _ = await meta.mkdir(ROOT, ROOT_INODE, b"d", 0o755)
    with pytest.raises(FSError) as e:
        await meta.read(d, 0)
    assert code(e) == errno.EISDIR


async def test_write_by_non_root_clears_suid(meta):
    f = await new_file(meta, ctx=ALICE)
    await meta.setattr(ALICE, f, mode=0o4755)
    await put(meta, f, 0, 10, ctx=ALICE)
    assert (await meta.getattr(f)).mode & 0o7777 == 0o755


async def test_truncate_shrinks_and_grows_with_zeros(meta):
    f = await new_file(meta)
    a = await put(meta, f, 0, 1000)
    b = await put(meta, f, CHUNK_SIZE, 1000)
    attr = await meta.truncate(ROOT, f, 500)
    assert attr.size == 500
    assert await meta.read(f, 0) == [SliceView(a, 1000, 0, 500)]
    assert await meta.read(f, 1) == []
    assert await meta.slice_refs(b, 1000) == 0
    assert (b, 1000) in await meta.pending_slice_deletes()
    attr = await meta.truncate(ROOT, f, 2000)
    assert await meta.read(f, 0) == [SliceView(a, 1000, 0, 500), H(1500)]
    attr = await meta.setattr(ROOT, f, size=0)
    assert attr.size == 0 and await meta.read(f, 0) == []
    assert (a, 1000) in await meta.pending_slice_deletes()
    assert (await meta.status())["used_space"] == 0
    with pytest.raises(FSError) as e:
        await meta.truncate(ALICE, f, 10)
    assert code(e) == errno.EACCES


async def test_fallocate_modes(meta):
    f = await new_file(meta)
    a = await put(meta, f, 0, 100)
    attr = await meta.fallocate(ROOT, f, 0, 0, 200)
    assert attr.size == 200
    await meta.fallocate(ROOT, f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10, 20)
    assert await meta.read(f, 0) == [
        SliceView(a, 100, 0, 10),
        H(20),
        SliceView(a, 100, 30, 70),
        H(100),
    ]
    attr = await meta.fallocate(ROOT, f, FALLOC_FL_KEEP_SIZE, 0, 10_000)
    assert attr.size == 200
    attr = await meta.fallocate(ROOT, f, FALLOC_FL_ZERO_RANGE, 50, 300)
    assert attr.size == 350
    assert await meta.read(f, 0) == [
        SliceView(a, 100, 0, 10),
        H(20),
        SliceView(a, 100, 30, 20),
        H(300),
    ]
    for mode, want in [(FALLOC_FL_PUNCH_HOLE, errno.EOPNOTSUPP), (0x08, errno.EOPNOTSUPP),
                       (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE, errno.EINVAL)]:  # fmt: skip
        with pytest.raises(FSError) as e:
            await meta.fallocate(ROOT, f, mode, 0, 10)
        assert code(e) == want
    with pytest.raises(FSError) as e:
        await meta.fallocate(ROOT, f, 0, 0, 0)
    assert code(e) == errno.EINVAL


async def test_copy_file_range_shares_slices(meta):
    src = await new_file(meta, b"src")
    dst = await new_file(meta, b"dst")
    a = await put(meta, src, 0, 1000)
    copied = await meta.copy_file_range(ROOT, src, 100, dst, CHUNK_SIZE - 50, 200)
    assert copied == 200
    assert (await meta.getattr(dst)).size == CHUNK_SIZE + 150
    assert (await meta.read(dst, 0))[-1] == SliceView(a, 1000, 100, 50)
    assert await meta.read(dst, 1) == [SliceView(a, 1000, 150, 150)]
    assert await meta.slice_refs(a, 1000) == 3
    await meta.unlink(ROOT, ROOT_INODE, b"src")
    assert await meta.slice_refs(a, 1000) == 2
    await meta.unlink(ROOT, ROOT_INODE, b"dst")
    assert await meta.slice_refs(a, 1000) == 0
    assert (a, 1000) in await meta.pending_slice_deletes()


async def test_compaction_replaces_records_and_keeps_refs(meta):
    f = await new_file(meta)
    a = await put(meta, f, 0, 100)
    b = await put(meta, f, 50, 100)
    records = await meta.chunk_records(f, 0)
    assert len(records) == 2
    assert [c async for c in meta.fragmented_chunks(min_records=2)] == [(f, 0)]
    new = await meta.new_slice_id()
    later = await put(meta, f, 140, 20)  # appended after the compactor read the records
    assert await meta.compact_chunk(f, 0, records, SliceView(new, 150, 0, 150))
    assert await meta.read(f, 0) == [SliceView(new, 150, 0, 140), SliceView(later, 20, 0, 20)]
    assert await meta.slice_refs(a, 100) == 0 and await meta.slice_refs(new, 150) == 1
    # overwritten slices wait in the trash when trash_days > 0: here 0, so due now
    due = await meta.pending_slice_deletes()
    assert (a, 100) in due and (b, 100) in due
    await meta.forget_slice_deletes(due)
    assert await meta.pending_slice_deletes() == []
    # a stale record list is refused and the new slice queued for deletion
    other = await meta.new_slice_id()
    assert not await meta.compact_chunk(f, 0, records, SliceView(other, 150, 0, 150))
    assert (other, 150) in await meta.pending_slice_deletes()
    listed = [s async for s in meta.list_slices()]
    assert sorted(listed) == sorted([(new, 150), (later, 20)])
    assert await meta.deref_slice(later, 20) == 0


async def test_capacity_and_inode_limit(redis_url):
    meta = await open_meta(redis_url, capacity=8192 + 4096, inodes=3)
    try:
        f = await new_file(meta)
        await put(meta, f, 0, 8192)
        with pytest.raises(FSError) as e:
            await put(meta, f, 8192, 8192)
        assert code(e) == errno.ENOSPC
        with pytest.raises(FSError) as e:
            await meta.truncate(ROOT, f, 1 << 20)
        assert code(e) == errno.ENOSPC
        await meta.mknod(ROOT, ROOT_INODE, b"g", stat.S_IFREG, 0o644)
        await meta.mknod(ROOT, ROOT_INODE, b"h", stat.S_IFREG, 0o644)
        with pytest.raises(FSError) as e:
            await meta.mknod(ROOT, ROOT_INODE, b"i", stat.S_IFREG, 0o644)
        assert code(e) == errno.ENOSPC
        st = await meta.statfs()
        assert st.total_space == 8192 + 4096 and st.avail_space == 4096
        assert st.used_inodes == 3 and st.avail_inodes == 0
    finally:
        await meta.close()


async def test_directory_quotas(meta, redis_url):
    vol, _ = await meta.mkdir(ROOT, ROOT_INODE, b"vol", 0o777)
    sub, _ = await meta.mkdir(ROOT, vol, b"sub", 0o777)
    pre = await new_file(meta, b"pre", sub)
    await put(meta, pre, 0, 4096)
    with pytest.raises(FSError) as e:
        await meta.set_quota(ALICE, vol, space=1 << 20)
    assert code(e) == errno.EPERM
    q = await meta.set_quota(ROOT, vol, space=64 * 1024, inodes=4)
    assert (q.used_space, q.used_inodes) == (4096 + 4096, 2)
    other = await Meta.open(redis_url)  # another client sees the quota too
    try:
        f = await new_file(other, b"f", sub)
        await put(other, f, 0, 32 * 1024)
        with pytest.raises(FSError) as e:
            await put(other, f, 32 * 1024, 32 * 1024)
        assert code(e) == errno.EDQUOT
        await new_file(other, b"g", vol)
        with pytest.raises(FSError) as e:
            await new_file(other, b"h", sub)
        assert code(e) == errno.EDQUOT
        q = await other.get_quota(vol)
        assert q.used_inodes == 4 and q.used_space == 4096 * 2 + 32 * 1024
        st = await other.statfs(sub)
        assert st.total_space == 64 * 1024 and st.avail_space == 64 * 1024 - q.used_space
        assert st.avail_inodes == 0
        # moving a file out of the quota gives its usage back; a directory cannot leave it
        await other.rename(ROOT, sub, b"f", ROOT_INODE, b"f")
        q = await other.get_quota(vol)
        assert q.used_inodes == 3 and q.used_space == 4096 * 2
        with pytest.raises(FSError) as e:
            await other.rename(ROOT, vol, b"sub", ROOT_INODE, b"sub")
        assert code(e) == errno.EXDEV
        await other.unlink(ROOT, sub, b"pre")
        assert (await other.get_quota(vol)).used_inodes == 2
        await other.remove_quota(ROOT, vol)
        with pytest.raises(FSError) as e:
            await other.get_quota(vol)
        assert code(e) == errno.ENODATA
    finally:
        await other.close()


async def test_trash_keeps_files_until_purged(redis_url):
    meta = await open_meta(redis_url, trash_days=1)
    try:
        f = await new_file(meta)
        a = await put(meta, f, 0, 100)
        await meta.unlink(ROOT, ROOT_INODE, b"f")
        with pytest.raises(FSError):
            await meta.lookup(ROOT, ROOT_INODE, b"f")
        attr = await meta.getattr(f)  # still there, in the trash
        hours = await meta.readdir(ROOT, 2)
        assert len(hours) == 1 and attr.parent == hours[0].inode
        entries = await meta.readdir(ROOT, hours[0].inode)
        assert [e.name for e in entries] == [f"{ROOT_INODE}-{f}-f".encode()]
        assert (await meta.status())["trash_files"] == 1
        assert await meta.purge_trash() == 0
        assert await meta.purge_trash(now=time.time() + 2 * 86400) == 1
        with pytest.raises(FSError):
            await meta.getattr(f)
        assert (a, 100) in await meta.pending_slice_deletes()
        st = await meta.status()
        assert st["used_space"] == 0 and st["used_inodes"] == 0
    finally:
        await meta.close()


async def test_dump_and_load_round_trip(meta, redis_url, tmp_path):
    d, _ = await meta.mkdir(ROOT, ROOT_INODE, b"d\xff\xfe", 0o755)
    f = await new_file(meta, b"file", d)
    await put(meta, f, 0, 1000)
    await put(meta, f, CHUNK_SIZE + 5, 10)
    await meta.link(ROOT, f, ROOT_INODE, b"hard")
    await meta.symlink(ROOT, d, b"ln", b"target\x80")
    await meta.setxattr(ROOT, f, b"user.k", b"\x00\x01binary")
    await meta.set_quota(ROOT, d, space=1 << 30, inodes=100)
    await meta.mknod(ROOT, d, b"fifo", stat.S_IFIFO, 0o600)
    first = io.StringIO()
    await meta.dump(first)
    with pytest.raises(ConfigError):
        await load(redis_url, io.StringIO(first.getvalue()))
    await meta.r.flushdb()
    assert await load(redis_url, io.StringIO(first.getvalue())) > 5
    again = await Meta.open(redis_url)
    try:
        second = io.BytesIO()
        await again.dump(second)
        assert second.getvalue().decode() == first.getvalue()
        ino, _ = await again.lookup(ROOT, ROOT_INODE, b"d\xff\xfe")
        assert (await again.lookup(ROOT, ino, b"file"))[0] == f
        assert len(await again.read(f, 1)) == 2
        assert await again.getxattr(ROOT, f, b"user.k") == b"\x00\x01binary"
        assert (await again.get_quota(d)).inodes == 100
        new = await new_file(again, b"new")
        assert new > f
    finally:
        await again.close()


async def test_unlinked_open_file_lives_until_last_close(meta, redis_url):
    await meta.new_session({"hostname": "a"})
    f, _ = await meta.create(ROOT, ROOT_INODE, b"f", 0o644, os.O_RDWR)
    a = await put(meta, f, 0, 100)
    await meta.unlink(ROOT, ROOT_INODE, b"f")
    attr = await meta.getattr(f)
    assert attr.nlink == 0
    assert await meta.read(f, 0) == [SliceView(a, 100, 0, 100)]
    await meta.close(f)
    with pytest.raises(FSError):
        await meta.getattr(f)
    assert (a, 100) in await meta.pending_slice_deletes()
    assert (await meta.status())["used_inodes"] == 0


async def test_sparse_file_frees_all_chunks(meta):
    f = await new_file(meta)
    await meta.truncate(ROOT, f, 700 * CHUNK_SIZE)
    ids = [await put(meta, f, i * CHUNK_SIZE, 10) for i in (0, 299, 699)]
    await meta.unlink(ROOT, ROOT_INODE, b"f")
    due = await meta.pending_slice_deletes()
    assert all((i, 10) in due for i in ids)
    assert [s async for s in meta.list_slices()] == []
    assert await meta.r.keys("c[0-9]*") == []
    assert await meta.cleanup_deleted_files(grace=0) == 0
    st = await meta.status()
    assert st["used_space"] == 0 and st["files_being_freed"] == 0


async def test_redis_outage_is_unavailable(meta):
    from cairn.errors import UnavailableError
    from cairn.localstack import free_port
    from cairn.meta.base import connect

    dead = f"redis://:pw@127.0.0.1:{free_port('127.0.0.1')}/0"
    broken = Meta(dead, connect(dead), meta.fmt)
    try:
        with pytest.raises(UnavailableError, match="127.0.0.1") as e:
            await broken.getattr(ROOT_INODE)
        assert "pw" not in str(e.value)
        with pytest.raises(UnavailableError):
            await broken.mkdir(ROOT, ROOT_INODE, b"x", 0o755)
    finally:
        await broken.close()


async def test_statfs_unlimited(meta):
    st = await meta.statfs()
    assert st.total_space == 1 << 50 and st.avail_space == st.total_space
    assert st.used_inodes == 0 and st.avail_inodes > 0


async def test_two_clients_write_one_file(meta, redis_url):
    import asyncio

    other = await Meta.open(redis_url)
    try:
        f = await new_file(meta)
        ids = await asyncio.gather(
            *(put(m, f, i * 4096, 4096) for i, m in enumerate([meta, other] * 50))
        )
        assert (await meta.getattr(f)).size == 100 * 4096
        views = await other.read(f, 0)
        assert [v.id for v in views] == list(ids)  # each slice at its own offset
        assert sum(v.len for v in views) == 100 * 4096
        assert (await meta.status())["used_space"] == 100 * 4096
        assert len([s async for s in meta.list_slices()]) == 100
    finally:
        await other.close()


async def test_moving_a_directory_needs_write_on_it(meta):
    alice = Ctx(1000, 1000, umask=0)
    a, _ = await meta.mkdir(ROOT, ROOT_INODE, b"a", 0o777)
    b, _ = await meta.mkdir(ROOT, ROOT_INODE, b"b", 0o777)
    await meta.mkdir(ROOT, a, b"rootdir", 0o755)
    with pytest.raises(FSError) as e:
        await meta.rename(alice, a, b"rootdir", b, b"moved")
    assert code(e) == errno.EACCES
    await meta.rename(alice, a, b"rootdir", a, b"renamed")  # same parent: no '..' change
