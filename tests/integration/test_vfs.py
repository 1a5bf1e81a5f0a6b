"""The VFS against a real redis-server and a file:// object store (and moto's S3): the FUSE
ops on inodes, handles and their buffered writes, caches, two clients on one volume."""

from __future__ import annotations

import asyncio
import errno
import os
import stat

import pytest
import s3server

from cairn.errors import ConfigError, FSError, UnavailableError
from cairn.meta.engine import (
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    UTIME_NOW,
    UTIME_OMIT,
    XATTR_CREATE,
    Ctx,
    Format,
    Meta,
    format_volume,
)
from cairn.storage import open_store
from cairn.vfs import VFS

# moto's S3 server fixtures (tests/s3server.py), bound so pytest finds them here.
s3_server = s3server.s3_server
s3_url = s3server.s3_url

KiB = 1024
BLOCK = 64 * KiB
ROOT = 1
CTX = Ctx(0, 0, umask=0o022)
USER = Ctx(1000, 1000, umask=0o022)


async def make_volume(redis_url: str, storage: str, trash_days: int = 0) -> str:
    fmt = Format(name="vfs", storage=storage, block_size=BLOCK, trash_days=trash_days)
    await format_volume(redis_url, fmt)
    return redis_url


@pytest.fixture
async def volume(redis_url, tmp_path) -> str:
    return await make_volume(redis_url, f"file://{tmp_path}/objects?fsync=false")


@pytest.fixture
async def vfs(volume):
    v = await VFS.open_volume(volume, cache_memory=16 << 20)
    yield v
    await v.close()


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


async def new_file(vfs: VFS, name: bytes, data: bytes = b"", parent: int = ROOT) -> int:
    fh, attr = await vfs.create(CTX, parent, name, 0o644, os.O_RDWR | os.O_CREAT)
    if data:
        await vfs.write(fh, 0, data)
    await vfs.release(fh)
    return attr.inode


async def read_all(vfs: VFS, inode: int, ctx: Ctx = CTX) -> bytes:
    fh = await vfs.open(ctx, inode, os.O_RDONLY)
    try:
        size = (await vfs.getattr(ctx, inode)).size
        return await vfs.read(fh, 0, size + 100)
    finally:
        await vfs.release(fh)


async def listing(vfs: VFS, inode: int = ROOT) -> list[bytes]:
    dh = await vfs.opendir(CTX, inode)
    names = []
    offset = 0
    while entries := await vfs.readdir(dh, offset):
        names += [e.name for e in entries]
        offset = entries[-1].next_offset
    await vfs.releasedir(dh)
    return names


# -- namespace ----------------------------------------------------------------------------------


async def test_create_lookup_getattr_and_listing(vfs):
    d = await vfs.mkdir(CTX, ROOT, b"dir", 0o755)
    assert stat.S_ISDIR(d.mode) and d.mode & 0o777 == 0o755
    ino = await new_file(vfs, b"f", b"hello", parent=d.inode)
    found = await vfs.lookup(CTX, d.inode, b"f")
    assert found.inode == ino and found.size == 5 and found.nlink == 1
    assert (await vfs.lookup(CTX, d.inode, b"..")).inode == ROOT
    assert (await vfs.lookup(CTX, d.inode, b".")).inode == d.inode
    assert (await vfs.getattr(CTX, ino)).size == 5
    assert await listing(vfs, d.inode) == [b".", b"..", b"f"]
    assert await listing(vfs) == [b".", b"..", b"dir"]
    with pytest.raises(FSError) as caught:
        await vfs.lookup(CTX, d.inode, b"missing")
    assert caught.value.errno == errno.ENOENT
    with pytest.raises(FSError) as caught:
        await vfs.mkdir(CTX, ROOT, b"dir", 0o755)
    assert caught.value.errno == errno.EEXIST


async def test_mkdir_ignores_setgid_from_mode_but_inherits_it(vfs):
    d = await vfs.mkdir(CTX, ROOT, b"d", 0o2755)
    assert d.mode & 0o7777 == 0o755
    await vfs.setattr(CTX, d.inode, mode=0o2755)
    sub = await vfs.mkdir(CTX, d.inode, b"sub", 0o755)
    assert sub.mode & stat.S_ISGID


async def test_readdir_offsets_are_stable_across_pages(volume):
    v = await VFS.open_volume(volume, readdir_page=7)
    try:
        for i in range(40):
            await new_file(v, b"f%02d" % i)
        dh = await v.opendir(CTX, ROOT)
        first = await v.readdir(dh, 0, limit=10)
        assert [e.name for e in first[:3]] == [b".", b"..", b"f00"]
        assert [e.next_offset for e in first] == list(range(1, 11))
        # entries removed and added meanwhile do not shift what the offsets name
        await v.unlink(CTX, ROOT, b"f00")
        await v.unlink(CTX, ROOT, b"f20")
        await new_file(v, b"zz")
        again = await v.readdir(dh, 5, limit=3)
        assert again == first[5:8]
        rest = []
        offset = first[-1].next_offset
        while entries := await v.readdir(dh, offset, limit=9):
            rest += entries
            offset = entries[-1].next_offset
        names = [e.name for e in first + rest]
        assert names[-1] == b"zz"
        assert b"f20" not in names and b"f39" in names
        assert len(names) == len(set(names))
        # offset 0 starts over and sees the directory as it is now
        fresh = [e.name for e in await v.readdir(dh, 0, limit=100)]
        assert b"f00" not in fresh and b"zz" in fresh
        await v.releasedir(dh)
        with pytest.raises(FSError) as caught:
            await v.readdir(dh, 0)
        assert caught.value.errno == errno.EBADF
    finally:
        await v.close()


async def test_readdir_entries_carry_attributes(vfs):
    await new_file(vfs, b"a", b"12345")
    await vfs.mkdir(CTX, ROOT, b"d", 0o700)
    dh = await vfs.opendir(CTX, ROOT)
    entries = {e.name: e.attr for e in await vfs.readdir(dh, 0)}
    await vfs.releasedir(dh)
    assert entries[b"a"].size == 5
    assert stat.S_ISDIR(entries[b"d"].mode)
    assert entries[b"."].inode == ROOT and entries[b".."].inode == ROOT
    with pytest.raises(FSError) as caught:
        await vfs.opendir(CTX, entries[b"a"].inode)
    assert caught.value.errno == errno.ENOTDIR


async def test_symlink_link_unlink_rmdir_rename(vfs):
    ino = await new_file(vfs, b"f", b"data")
    link = await vfs.symlink(CTX, ROOT, b"l", b"f")
    assert stat.S_ISLNK(link.mode) and link.size == 1
    assert await vfs.readlink(CTX, link.inode) == b"f"
    hard = await vfs.link(CTX, ino, ROOT, b"g")
    assert hard.nlink == 2
    assert (await vfs.getattr(CTX, ino)).nlink == 2
    await vfs.unlink(CTX, ROOT, b"f")
    assert (await vfs.getattr(CTX, ino)).nlink == 1
    assert await read_all(vfs, ino) == b"data"

    d = await vfs.mkdir(CTX, ROOT, b"d", 0o755)
    await new_file(vfs, b"x", parent=d.inode)
    with pytest.raises(FSError) as caught:
        await vfs.rmdir(CTX, ROOT, b"d")
    assert caught.value.errno == errno.ENOTEMPTY
    await vfs.rename(CTX, d.inode, b"x", ROOT, b"x")
    assert (await vfs.getattr(CTX, ROOT)).nlink == 3
    await vfs.rmdir(CTX, ROOT, b"d")
    assert (await vfs.getattr(CTX, ROOT)).nlink == 2

    # rename over an existing file replaces it; NOREPLACE refuses; EXCHANGE swaps
    x = await vfs.lookup(CTX, ROOT, b"x")
    await vfs.rename(CTX, ROOT, b"g", ROOT, b"x")
    assert (await vfs.lookup(CTX, ROOT, b"x")).inode == ino
    with pytest.raises(FSError):
        await vfs.getattr(CTX, x.inode)
    await new_file(vfs, b"y", b"yy")
    with pytest.raises(FSError) as caught:
        await vfs.rename(CTX, ROOT, b"x", ROOT, b"y", RENAME_NOREPLACE)
    assert caught.value.errno == errno.EEXIST
    await vfs.rename(CTX, ROOT, b"x", ROOT, b"y", RENAME_EXCHANGE)
    assert (await vfs.lookup(CTX, ROOT, b"y")).inode == ino
    assert await read_all(vfs, (await vfs.lookup(CTX, ROOT, b"x")).inode) == b"yy"


async def test_mknod_makes_fifos_and_plain_files(vfs):
    fifo = await vfs.mknod(CTX, ROOT, b"p", stat.S_IFIFO | 0o644)
    assert stat.S_ISFIFO(fifo.mode)
    plain = await vfs.mknod(CTX, ROOT, b"r", 0o600)
    assert stat.S_ISREG(plain.mode)


# -- setattr --------------------------------------------------------------------------------


async def test_setattr_mode_owner_times(vfs):
    ino = await new_file(vfs, b"f", b"abc")
    attr = await vfs.setattr(CTX, ino, mode=0o4711)
    assert attr.mode & 0o7777 == 0o4711
    attr = await vfs.setattr(CTX, ino, uid=1000, gid=1000)
    assert (attr.uid, attr.gid) == (1000, 1000)
    attr = await vfs.setattr(CTX, ino, atime=1_000_000_000_123, mtime=2_000_000_000_456)
    assert (attr.atime, attr.mtime) == (1_000_000_000_123, 2_000_000_000_456)
    attr = await vfs.setattr(CTX, ino, atime=UTIME_OMIT, mtime=UTIME_NOW)
    assert attr.atime == 1_000_000_000_123
    assert attr.mtime > 1_600_000_000 * 10**9
    assert (await vfs.getattr(CTX, ino)).mtime == attr.mtime
    # a user may not chmod someone else's file
    other = await new_file(vfs, b"g")
    with pytest.raises(FSError) as caught:
        await vfs.setattr(USER, other, mode=0o777)
    assert caught.value.errno == errno.EPERM


async def test_truncate_extends_with_zeros_and_shrinks(vfs):
    ino = await new_file(vfs, b"f", pattern(100_000))
    attr = await vfs.setattr(CTX, ino, size=200_000)
    assert attr.size == 200_000
    data = await read_all(vfs, ino)
    assert data == pattern(100_000) + bytes(100_000)
    await vfs.setattr(CTX, ino, size=10)
    assert await read_all(vfs, ino) == pattern(10)


async def test_truncate_with_pending_writes(vfs):
    ino = await new_file(vfs, b"f")
    fh = await vfs.open(CTX, ino, os.O_RDWR)
    await vfs.write(fh, 0, pattern(3 * BLOCK + 5))
    assert vfs.writer.get(ino).pending()
    # the writes were made before the truncate: they must not come back after it
    attr = await vfs.setattr(CTX, ino, size=BLOCK + 1, fh=fh)
    assert attr.size == BLOCK + 1
    assert not vfs.writer.get(ino).pending()
    await vfs.write(fh, 2 * BLOCK, b"tail")
    assert (await vfs.getattr(CTX, ino)).size == 2 * BLOCK + 4
    await vfs.release(fh)
    assert await read_all(vfs, ino) == pattern(BLOCK + 1) + bytes(BLOCK - 1) + b"tail"


async def test_ftruncate_needs_a_writable_handle_not_write_permission(vfs):
    ino = await new_file(vfs, b"f", b"x" * 10)
    await vfs.setattr(CTX, ino, uid=1000, gid=1000, mode=0o600)
    fh = await vfs.open(USER, ino, os.O_RDWR)
    await vfs.setattr(CTX, ino, mode=0o400)
    await vfs.setattr(USER, ino, size=4, fh=fh)
    with pytest.raises(FSError) as caught:
        await vfs.setattr(USER, ino, size=2)
    assert caught.value.errno == errno.EACCES
    await vfs.release(fh)
    ro = await vfs.open(USER, ino, os.O_RDONLY)
    with pytest.raises(FSError) as caught:
        await vfs.setattr(USER, ino, size=1, fh=ro)
    assert caught.value.errno == errno.EBADF
    await vfs.release(ro)


async def test_setattr_times_after_pending_writes_stick(vfs):
    ino = await new_file(vfs, b"f")
    fh = await vfs.open(CTX, ino, os.O_WRONLY)
    await vfs.write(fh, 0, b"abc")
    await vfs.setattr(CTX, ino, mtime=1_234_000_000_000)
    await vfs.release(fh)
    attr = await vfs.getattr(CTX, ino)
    assert attr.mtime == 1_234_000_000_000 and attr.size == 3


# -- reads and writes ----------------------------------------------------------------------------


async def test_write_read_across_blocks_and_holes(vfs):
    ino = await new_file(vfs, b"f")
    fh = await vfs.open(CTX, ino, os.O_RDWR)
    big = pattern(5 * BLOCK + 123)
    assert await vfs.write(fh, 0, big) == len(big)
    assert await vfs.write(fh, 10 * BLOCK, b"far") == 3
    await vfs.fsync(fh)
    assert await vfs.read(fh, 0, len(big)) == big
    assert await vfs.read(fh, BLOCK - 2, 4) == big[BLOCK - 2 : BLOCK + 2]
    assert await vfs.read(fh, 8 * BLOCK, 10) == bytes(10)
    assert await vfs.read(fh, 10 * BLOCK, 100) == b"far"
    assert await vfs.read(fh, 20 * BLOCK, 100) == b""
    await vfs.release(fh)
    assert vfs.stats.bytes_written == len(big) + 3


async def test_read_your_own_unflushed_writes(vfs):
    ino = await new_file(vfs, b"f", b"0123456789")
    w = await vfs.open(CTX, ino, os.O_WRONLY)
    r = await vfs.open(CTX, ino, os.O_RDONLY)
    await vfs.write(w, 5, b"abcdefghij")
    # size and mtime count the buffered bytes before anything is committed
    assert vfs.writer.get(ino).pending()
    assert (await vfs.getattr(CTX, ino)).size == 15
    assert (await vfs.lookup(CTX, ROOT, b"f")).size == 15
    # another handle of the same client reads them (the VFS commits first)
    assert await vfs.read(r, 0, 100) == b"01234abcdefghij"
    assert vfs.stats.flushes_for_read == 1
    await vfs.write(w, 0, b"X")
    assert await vfs.read(r, 0, 3) == b"X12"
    await vfs.release(w)
    await vfs.release(r)


async def test_o_append_writes_at_the_end(vfs):
    ino = await new_file(vfs, b"log", b"start;")
    a = await vfs.open(CTX, ino, os.O_WRONLY | os.O_APPEND)
    b = await vfs.open(CTX, ino, os.O_RDWR)
    await vfs.write(a, 0, b"one;")
    await vfs.write(b, 2, b"##")  # a plain handle writes where it is told
    await vfs.write(a, 0, b"two;")
    await vfs.write(b, 20, b"end")
    await vfs.write(a, 3, b"three;")  # after the end at 23, wherever the offset says
    await vfs.release(a)
    await vfs.release(b)
    assert await read_all(vfs, ino) == b"st##t;one;two;\0\0\0\0\0\0endthree;"


async def test_open_truncate_and_create_without_excl(vfs):
    ino = await new_file(vfs, b"f", b"old contents")
    fh = await vfs.open(CTX, ino, os.O_WRONLY | os.O_TRUNC)
    assert (await vfs.getattr(CTX, ino)).size == 0
    await vfs.write(fh, 0, b"new")
    await vfs.release(fh)
    assert await read_all(vfs, ino) == b"new"
    fh, attr = await vfs.create(CTX, ROOT, b"f", 0o644, os.O_RDWR | os.O_CREAT)
    assert attr.inode == ino and attr.size == 3
    await vfs.release(fh)
    with pytest.raises(FSError) as caught:
        await vfs.create(CTX, ROOT, b"f", 0o644, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    assert caught.value.errno == errno.EEXIST


async def test_handles_check_their_access_mode(vfs):
    ino = await new_file(vfs, b"f", b"abc")
    ro = await vfs.open(CTX, ino, os.O_RDONLY)
    wo = await vfs.open(CTX, ino, os.O_WRONLY)
    for call in (vfs.write(ro, 0, b"x"), vfs.read(wo, 0, 1), vfs.read(12345, 0, 1)):
        with pytest.raises(FSError) as caught:
            await call
        assert caught.value.errno == errno.EBADF
    d = await vfs.mkdir(CTX, ROOT, b"d", 0o755)
    dfh = await vfs.open(CTX, d.inode, os.O_RDONLY)
    with pytest.raises(FSError) as caught:
        await vfs.read(dfh, 0, 1)
    assert caught.value.errno == errno.EISDIR
    for fh in (ro, wo, dfh):
        await vfs.release(fh)


async def test_unlinked_open_file_lives_until_release(vfs):
    ino = await new_file(vfs, b"f", b"still here")
    fh = await vfs.open(CTX, ino, os.O_RDWR)
    await vfs.unlink(CTX, ROOT, b"f")
    await vfs.write(fh, 10, b"!")
    assert await vfs.read(fh, 0, 100) == b"still here!"
    await vfs.release(fh)
    with pytest.raises(FSError) as caught:
        await vfs.getattr(CTX, ino)
    assert caught.value.errno == errno.ENOENT


async def test_write_by_user_clears_setuid_at_once(vfs):
    ino = await new_file(vfs, b"f", b"abc")
    await vfs.setattr(CTX, ino, uid=1000, gid=1000, mode=0o6755)
    fh = await vfs.open(USER, ino, os.O_WRONLY)
    await vfs.write(fh, 0, b"x")
    assert (await vfs.getattr(CTX, ino)).mode & 0o7777 == 0o755
    await vfs.release(fh)
    assert (await vfs.getattr(CTX, ino)).mode & 0o7777 == 0o755
    # root writing keeps the bits, as Linux does with CAP_FSETID
    await vfs.setattr(CTX, ino, mode=0o4755)
    fh = await vfs.open(CTX, ino, os.O_WRONLY)
    await vfs.write(fh, 0, b"y")
    await vfs.release(fh)
    assert (await vfs.getattr(CTX, ino)).mode & 0o7777 == 0o4755


async def test_permissions_come_from_the_engine(vfs):
    ino = await new_file(vfs, b"secret", b"s")
    await vfs.setattr(CTX, ino, mode=0o600)
    with pytest.raises(FSError) as caught:
        await vfs.open(USER, ino, os.O_RDONLY)
    assert caught.value.errno == errno.EACCES
    with pytest.raises(FSError) as caught:
        await vfs.access(USER, ino, os.R_OK)
    assert caught.value.errno == errno.EACCES
    await vfs.access(CTX, ino, os.R_OK | os.W_OK)
    d = await vfs.mkdir(CTX, ROOT, b"closed", 0o700)
    await new_file(vfs, b"inner", parent=d.inode)
    await vfs.lookup(CTX, d.inode, b"inner")  # cached now; a user still may not look
    with pytest.raises(FSError) as caught:
        await vfs.lookup(USER, d.inode, b"inner")
    assert caught.value.errno == errno.EACCES


async def test_fallocate_and_copy_file_range(vfs):
    src = await new_file(vfs, b"src", pattern(3 * BLOCK))
    dst = await new_file(vfs, b"dst")
    fin = await vfs.open(CTX, src, os.O_RDONLY)
    fout = await vfs.open(CTX, dst, os.O_RDWR)
    await vfs.write(fout, 0, b"pending")
    n = await vfs.copy_file_range(fin, BLOCK, fout, 4, BLOCK)
    assert n == BLOCK
    assert await vfs.read(fout, 0, BLOCK + 10) == b"pend" + pattern(3 * BLOCK)[BLOCK : 2 * BLOCK]
    await vfs.fallocate(fout, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10, 20)
    data = await vfs.read(fout, 0, 40)
    assert data[10:30] == bytes(20)
    await vfs.fallocate(fout, 0, 0, 5 * BLOCK)
    assert (await vfs.getattr(CTX, dst)).size == 5 * BLOCK
    with pytest.raises(FSError) as caught:
        await vfs.fallocate(fin, 0, 0, 10)
    assert caught.value.errno == errno.EBADF
    await vfs.release(fin)
    await vfs.release(fout)


class GatedStore:
    """A store whose puts wait at a gate: a flush can be caught halfway."""

    def __init__(self, inner):
        self.inner = inner
        self.gate = asyncio.Event()
        self.gate.set()

    async def put(self, key, data):
        await self.gate.wait()
        await self.inner.put(key, data)

    async def get(self, key, offset=0, length=-1):
        return await self.inner.get(key, offset, length)

    async def delete(self, key):
        await self.inner.delete(key)

    async def close(self):
        await self.inner.close()


@pytest.fixture
async def gated(volume, tmp_path):
    """A VFS built by hand (not open_volume) over a gated store."""
    meta = await Meta.open(volume)
    store = GatedStore(open_store(f"file://{tmp_path}/objects?fsync=false"))
    vfs = VFS(meta, store, buffer_size=4 * BLOCK)
    await vfs.start()
    yield vfs, store
    store.gate.set()
    await vfs.close()
    await store.close()
    await meta.close()


async def test_size_and_reads_while_a_flush_is_in_flight(gated):
    vfs, store = gated
    ino = await new_file(vfs, b"f")
    fh = await vfs.open(CTX, ino, os.O_RDWR)
    store.gate.clear()
    data = pattern(2 * BLOCK + 10)
    await vfs.write(fh, 0, data)
    flushing = asyncio.create_task(vfs.fsync(fh))
    await asyncio.sleep(0.05)
    assert not flushing.done()
    assert not vfs.writer.get(ino).pending()  # the buffer went to the flush...
    assert (await vfs.getattr(CTX, ino)).size == len(data)  # ...and the size counts it
    reading = asyncio.create_task(vfs.read(fh, BLOCK - 5, 10))
    await asyncio.sleep(0.05)
    assert not reading.done()  # a read waits for the commit
    store.gate.set()
    await flushing
    assert await reading == data[BLOCK - 5 : BLOCK + 5]
    await vfs.release(fh)
    assert (await vfs.meta.getattr(ino)).size == len(data)


async def test_back_pressure_keeps_data_right(gated):
    vfs, _ = gated  # buffer_size is 4 blocks
    ino = await new_file(vfs, b"f")
    fh = await vfs.open(CTX, ino, os.O_RDWR)
    data = pattern(20 * BLOCK, seed=5)
    for off in range(0, len(data), 10_000):
        await vfs.write(fh, off, data[off : off + 10_000])
    assert vfs.writer.buffered <= 4 * BLOCK + 10_000
    await vfs.release(fh)
    assert await read_all(vfs, ino) == data


async def test_concurrent_handles_and_creates(vfs):
    ino = await new_file(vfs, b"f")
    piece = 3 * BLOCK // 2

    async def writer(i: int) -> None:
        fh = await vfs.open(CTX, ino, os.O_WRONLY)
        await vfs.write(fh, i * piece, pattern(piece, seed=i))
        await vfs.release(fh)

    async def creator(i: int) -> None:
        await new_file(vfs, b"c%d" % i, b"%d" % i)

    await asyncio.gather(*(writer(i) for i in range(8)), *(creator(i) for i in range(20)))
    assert await read_all(vfs, ino) == b"".join(pattern(piece, seed=i) for i in range(8))
    names = await listing(vfs)
    assert len(names) == 2 + 1 + 20


# -- xattrs, statfs, locks ----------------------------------------------------------------------


async def test_xattrs(vfs):
    ino = await new_file(vfs, b"f")
    await vfs.setxattr(CTX, ino, b"user.a", b"1")
    await vfs.setxattr(CTX, ino, b"user.b", b"")
    assert await vfs.getxattr(CTX, ino, b"user.a") == b"1"
    assert await vfs.listxattr(CTX, ino) == [b"user.a", b"user.b"]
    with pytest.raises(FSError) as caught:
        await vfs.setxattr(CTX, ino, b"user.a", b"2", XATTR_CREATE)
    assert caught.value.errno == errno.EEXIST
    await vfs.removexattr(CTX, ino, b"user.a")
    with pytest.raises(FSError) as caught:
        await vfs.getxattr(CTX, ino, b"user.a")
    assert caught.value.errno == errno.ENODATA


async def test_statfs_counts_usage(vfs):
    before = await vfs.statfs(CTX)
    await new_file(vfs, b"f", pattern(10_000))
    after = await vfs.statfs(CTX)
    assert after.used_inodes == before.used_inodes + 1
    assert after.avail_space == before.avail_space - 12 * KiB


async def test_locks_delegate_and_go_with_the_handle(vfs):
    ino = await new_file(vfs, b"f")
    a = await vfs.open(CTX, ino, os.O_RDWR)
    b = await vfs.open(CTX, ino, os.O_RDWR)
    await vfs.flock(a, 1, F_WRLCK)
    with pytest.raises(FSError) as caught:
        await vfs.flock(b, 2, F_RDLCK)
    assert caught.value.errno == errno.EAGAIN
    await vfs.setlk(a, 1, F_WRLCK, 0, 99, pid=10)
    assert await vfs.getlk(b, 2, F_RDLCK, 50, 60, 11) == (F_WRLCK, 0, 99, 10)
    await vfs.flush(a, lock_owner=1)  # close(2) of the owner's descriptor: record locks go
    assert (await vfs.getlk(b, 2, F_WRLCK, 0, 10, 11))[0] == F_UNLCK
    with pytest.raises(FSError):
        await vfs.flock(b, 2, F_RDLCK)  # the BSD lock stays until release
    await vfs.release(a)
    await vfs.flock(b, 2, F_WRLCK)
    await vfs.flock(b, 2, F_UNLCK)
    await vfs.release(b)


async def test_any_close_drops_the_owner_record_locks(vfs):
    ino = await new_file(vfs, b"f")
    a = await vfs.open(CTX, ino, os.O_RDWR)
    b = await vfs.open(CTX, ino, os.O_RDWR)  # the same process opened the file twice
    other = await vfs.open(CTX, ino, os.O_RDWR)
    await vfs.setlk(a, 1, F_WRLCK, 0, 99, pid=10)
    await vfs.flush(other, lock_owner=2)  # another owner's close changes nothing
    assert await vfs.getlk(other, 2, F_RDLCK, 0, 0, 11) == (F_WRLCK, 0, 99, 10)
    await vfs.flush(b, lock_owner=1)  # POSIX: a close through b drops what a took
    assert (await vfs.getlk(other, 2, F_WRLCK, 0, 99, 11))[0] == F_UNLCK
    for fh in (a, b, other):
        await vfs.release(fh)


# -- caches, consistency, two clients ------------------------------------------------------------


async def test_close_to_open_between_two_clients(volume):
    one = await VFS.open_volume(volume, attr_ttl=60, entry_ttl=60)
    two = await VFS.open_volume(volume, attr_ttl=60, entry_ttl=60)
    try:
        assert one.meta.sid != two.meta.sid
        ino = await new_file(one, b"shared", b"version 1")
        assert (await two.lookup(CTX, ROOT, b"shared")).inode == ino
        assert await read_all(two, ino) == b"version 1"
        # client one rewrites and closes; client two's caches are long-lived but open()
        # refetches: it sees the new length and contents
        fh = await one.open(CTX, ino, os.O_WRONLY)
        await one.write(fh, 0, b"VERSION 2 is longer")
        assert await read_all(two, ino) == b"version 1"  # not committed yet
        await one.release(fh)
        assert await read_all(two, ino) == b"VERSION 2 is longer"
        # and the other way round, across many blocks
        big = pattern(4 * BLOCK + 7, seed=3)
        fh = await two.open(CTX, ino, os.O_RDWR | os.O_TRUNC)
        await two.write(fh, 0, big)
        await two.release(fh)
        assert await read_all(one, ino) == big
        # the caches made the second reads cheap
        assert two.stats.attr_hits > 0
    finally:
        await one.close()
        await two.close()


async def test_attr_cache_expires(volume):
    one = await VFS.open_volume(volume, attr_ttl=0.2, entry_ttl=0.2)
    two = await VFS.open_volume(volume, attr_ttl=0.2, entry_ttl=0.2)
    try:
        ino = await new_file(one, b"f")
        assert (await two.getattr(CTX, ino)).mode & 0o777 == 0o644
        await one.setattr(CTX, ino, mode=0o600)
        assert (await two.getattr(CTX, ino)).mode & 0o777 == 0o644  # cached
        await asyncio.sleep(0.25)
        assert (await two.getattr(CTX, ino)).mode & 0o777 == 0o600
        await one.unlink(CTX, ROOT, b"f")
        await asyncio.sleep(0.25)
        with pytest.raises(FSError):
            await two.lookup(CTX, ROOT, b"f")
    finally:
        await one.close()
        await two.close()


async def test_unlink_elsewhere_deletes_after_the_last_close(volume):
    one = await VFS.open_volume(volume)
    two = await VFS.open_volume(volume)
    try:
        ino = await new_file(one, b"f", b"data")
        fh = await two.open(CTX, ino, os.O_RDONLY)
        await one.unlink(CTX, ROOT, b"f")
        assert await two.read(fh, 0, 10) == b"data"
        await two.release(fh)
        # two's last close is released in a batch a moment later (close_delay)
        for _ in range(100):
            try:
                await one.meta.getattr(ino)
            except FSError:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail(f"inode {ino} outlived its last close")
    finally:
        await one.close()
        await two.close()


async def test_stats_count_ops_and_bytes(vfs):
    ino = await new_file(vfs, b"f", b"12345")
    await read_all(vfs, ino)
    with pytest.raises(FSError):
        await vfs.lookup(CTX, ROOT, b"nope")
    snap = vfs.stats_snapshot()
    assert snap["ops"]["create"]["count"] == 1
    assert snap["ops"]["lookup"]["errors"] == 1
    assert snap["ops"]["read"]["count"] == 1 and snap["ops"]["read"]["seconds"] >= 0
    assert snap["bytes_read"] == 5 and snap["bytes_written"] == 5
    assert snap["block_cache"]["memory_items"] >= 1
    assert snap["open_files"] == 0
    assert set(snap) >= {"attr_cache", "entry_cache", "chunk_cache"}


# -- mounts: read-only, subdir, sessions ---------------------------------------------------------


async def test_read_only_mount_refuses_changes(volume):
    rw = await VFS.open_volume(volume)
    ino = await new_file(rw, b"f", b"abc")
    await rw.close()
    ro = await VFS.open_volume(volume, read_only=True)
    try:
        assert await read_all(ro, ino) == b"abc"
        calls = [
            ro.mkdir(CTX, ROOT, b"d", 0o755),
            ro.create(CTX, ROOT, b"g", 0o644, os.O_WRONLY | os.O_CREAT),
            ro.open(CTX, ino, os.O_WRONLY),
            ro.open(CTX, ino, os.O_RDONLY | os.O_TRUNC),
            ro.unlink(CTX, ROOT, b"f"),
            ro.setattr(CTX, ino, mode=0o600),
            ro.setxattr(CTX, ino, b"user.x", b"1"),
            ro.access(CTX, ino, os.W_OK),
        ]
        for call in calls:
            with pytest.raises(FSError) as caught:
                await call
            assert caught.value.errno == errno.EROFS
    finally:
        await ro.close()


async def test_subdir_mount_sees_only_its_directory(volume):
    setup = await VFS.open_volume(volume)
    vol = await setup.mkdir(CTX, ROOT, b"volumes", 0o755)
    pvc = await setup.mkdir(CTX, vol.inode, b"pvc-1", 0o755)
    await new_file(setup, b"outside", b"no")
    await setup.close()
    sub = await VFS.open_volume(volume, subdir="volumes/pvc-1")
    try:
        root = await sub.getattr(CTX, ROOT)
        assert root.inode == ROOT and stat.S_ISDIR(root.mode)
        assert (await sub.lookup(CTX, ROOT, b"..")).inode == ROOT
        ino = await new_file(sub, b"inside", b"yes")
        assert ino not in (ROOT, pvc.inode)
        assert await listing(sub) == [b".", b"..", b"inside"]
        with pytest.raises(FSError):
            await sub.lookup(CTX, ROOT, b"outside")
        d = await sub.mkdir(CTX, ROOT, b"d", 0o755)
        assert (await sub.lookup(CTX, d.inode, b"..")).inode == ROOT
        assert (await sub.statfs(CTX)).used_inodes >= 1
    finally:
        await sub.close()
    check = await Meta.open(volume)
    try:
        found, _ = await check.resolve(CTX, b"/volumes/pvc-1/inside")
        assert found == ino
    finally:
        await check.close()
    with pytest.raises(ConfigError):
        await VFS.open_volume(volume, subdir="volumes/missing")
    with pytest.raises(ConfigError):
        await VFS.open_volume(volume, subdir="outside")


async def test_session_heartbeats_and_ends_at_close(volume):
    vfs = await VFS.open_volume(volume, heartbeat=0.05, session_info={"mountpoint": "/mnt/x"})
    try:
        sessions = await vfs.meta.list_sessions()
        assert [s["sid"] for s in sessions] == [vfs.meta.sid]
        assert sessions[0]["mountpoint"] == "/mnt/x"
        first = sessions[0]["heartbeat"]
        await asyncio.sleep(0.2)
        assert (await vfs.meta.list_sessions())[0]["heartbeat"] > first
        ino = await new_file(vfs, b"f")
        fh = await vfs.open(CTX, ino, os.O_WRONLY)
        await vfs.write(fh, 0, b"unflushed at close")
    finally:
        await vfs.close()
    await vfs.close()  # twice is fine
    check = await Meta.open(volume)
    try:
        assert await check.list_sessions() == []
        assert (await check.getattr(ino)).size == 18
    finally:
        await check.close()


async def test_idle_files_are_committed_in_the_background(volume):
    vfs = await VFS.open_volume(volume, flush_idle=0.1)
    try:
        ino = await new_file(vfs, b"f")
        fh = await vfs.open(CTX, ino, os.O_WRONLY)
        await vfs.write(fh, 0, b"idle")
        for _ in range(50):
            if (await vfs.meta.getattr(ino)).size == 4:
                break
            await asyncio.sleep(0.1)
        assert (await vfs.meta.getattr(ino)).size == 4
        assert (await vfs.getattr(CTX, ino)).size == 4
        await vfs.release(fh)
    finally:
        await vfs.close()


async def test_open_volume_fails_in_one_line(redis_url, tmp_path):
    with pytest.raises(ConfigError):
        await VFS.open_volume(redis_url)  # not formatted
    with pytest.raises(UnavailableError):
        await VFS.open_volume("redis://127.0.0.1:1/0")


# -- S3 ------------------------------------------------------------------------------------------


async def test_s3_round_trip_and_two_clients(redis_url, s3_url):
    await make_volume(redis_url, s3_url)
    one = await VFS.open_volume(redis_url, cache_memory=0)
    two = await VFS.open_volume(redis_url)
    try:
        big = pattern(3 * BLOCK + 1000, seed=9)
        ino = await new_file(one, b"f", big)
        assert await read_all(one, ino) == big
        assert await read_all(two, ino) == big
        fh = await two.open(CTX, ino, os.O_RDWR)
        await two.write(fh, BLOCK, b"patch")
        assert (
            await two.read(fh, BLOCK - 1, 7)
            == big[BLOCK - 1 : BLOCK] + b"patch" + big[BLOCK + 5 : BLOCK + 6]
        )
        await two.release(fh)
        expected = big[:BLOCK] + b"patch" + big[BLOCK + 5 :]
        assert await read_all(one, ino) == expected
    finally:
        await one.close()
        await two.close()
