"""File data in metadata: chunks of slice records, writes, truncate, fallocate, copies,
compaction, and the reference counts and delete queue of slices.

A write appends one record to its chunk's list (RPUSH) in the same transaction that updates
the file's length and the usage counters; the list itself is not watched, so writers of
one file never conflict over it. Every slice named by a record has a count in slicerefs;
when the count falls to zero the slice goes to the delslices queue with the time after
which the data path may delete its objects.
"""

from __future__ import annotations

import errno
import time
from collections.abc import AsyncIterator
from typing import Any

from cairn.errors import FSError
from cairn.meta import keys, perms
from cairn.meta.base import Tx, _released, now_ns
from cairn.meta.slices import SliceRecord, hole, resolve, unpack_records
from cairn.meta.types import (
    CHUNK_SIZE,
    FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    MAX_FILE_SIZE,
    ROOT_CTX,
    W_OK,
    Attr,
    Ctx,
    SliceView,
    align4k,
)


def _chunk_len(size: int, index: int) -> int:
    return max(0, min(CHUNK_SIZE, size - index * CHUNK_SIZE))


def _split(offset: int, length: int) -> list[tuple[int, int, int]]:
    """(chunk index, position in chunk, length) pieces of a file range."""
    out = []
    end = offset + length
    while offset < end:
        index, pos = divmod(offset, CHUNK_SIZE)
        n = min(CHUNK_SIZE - pos, end - offset)
        out.append((index, pos, n))
        offset += n
    return out


def _file_attr(attr: Attr) -> None:
    if attr.is_dir():
        raise FSError(errno.EISDIR, f"inode {attr.inode} is a directory")
    if not attr.is_file():
        raise FSError(errno.EINVAL, f"inode {attr.inode} is not a regular file")


class DataMixin:
    """Chunk and slice operations of cairn.meta.engine.Meta."""

    async def read(self, inode: int, index: int) -> list[SliceView]:
        """The chunk's bytes as ordered segments covering [0, chunk length); id 0 = zeros."""
        pipe = self.r.pipeline(transaction=False)
        pipe.get(keys.attr(inode))
        pipe.lrange(keys.chunk(inode, index), 0, -1)
        raw, records = await pipe.execute()
        if raw is None:
            raise FSError(errno.ENOENT, f"no inode {inode}")
        attr = Attr.unpack(inode, raw)
        _file_attr(attr)
        length = _chunk_len(attr.size, index)
        if length == 0:
            return []
        return resolve(unpack_records(records), length)

    async def chunk_records(self, inode: int, index: int) -> list[SliceRecord]:
        """The raw records of a chunk, oldest first (for compaction)."""
        return unpack_records(await self.r.lrange(keys.chunk(inode, index), 0, -1))

    async def write(
        self,
        ctx: Ctx,
        inode: int,
        index: int,
        pos: int,
        slice: SliceView,
        mtime_ns: int | None = None,
    ) -> Attr:
        """Commits a slice (whose blocks are already stored) at pos of chunk `index`.

        A write by a non-root ctx clears set-user-ID (and set-group-ID with group execute);
        ctx None counts as root."""
        ctx = ctx or ROOT_CTX
        if index < 0 or pos < 0 or slice.len <= 0 or pos + slice.len > CHUNK_SIZE:
            raise FSError(errno.EINVAL, f"slice [{pos}, +{slice.len}) does not fit a chunk")
        if slice.id and slice.off + slice.len > slice.size:
            raise FSError(errno.EINVAL, "slice range beyond its size")
        end = index * CHUNK_SIZE + pos + slice.len
        if end > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG, "file too large")
        record = SliceRecord(pos, slice.id, slice.size, slice.off, slice.len)
        dirs = await self._quota_chain_of(inode)

        async def body(tx: Tx) -> Attr:
            nonlocal dirs
            attr = await self._get_attr(tx.p, inode)
            _file_attr(attr)
            delta = align4k(max(attr.size, end)) - align4k(attr.size)
            if delta > 0:
                await self._check_usage(dirs, delta, 0)
            now = now_ns()
            attr.size = max(attr.size, end)
            attr.mtime = now if mtime_ns is None else mtime_ns
            attr.ctime = now
            if ctx.uid != 0:
                attr.mode = attr.type | perms.killpriv(attr.mode & 0o7777)
            p = tx.multi()
            p.rpush(keys.chunk(inode, index), record.pack())
            if slice.id:
                p.hincrby(keys.SLICE_REFS, keys.slice_key(slice.id, slice.size), 1)
            p.set(keys.attr(inode), attr.pack())
            self._queue_usage(p, dirs, delta, 0)
            return attr

        return await self._txn(body, keys.attr(inode), lock=[inode])

    async def truncate(self, ctx: Ctx, inode: int, length: int) -> Attr:
        ctx = ctx or ROOT_CTX
        if length < 0:
            raise FSError(errno.EINVAL, "negative length")
        if length > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG, "file too large")
        dirs = await self._quota_chain_of(inode)

        async def body(tx: Tx) -> Any:
            attr = await self._get_attr(tx.p, inode)
            _file_attr(attr)
            perms.check(ctx, attr, W_OK)
            old = attr.size
            delta = align4k(length) - align4k(old)
            if delta > 0:
                await self._check_usage(dirs, delta, 0)
            names: list[str] = []
            lists: list[list[bytes]] = []
            partial = None
            if length < old:
                first_gone = (length + CHUNK_SIZE - 1) // CHUNK_SIZE
                last = (old + CHUNK_SIZE - 1) // CHUNK_SIZE
                names = [keys.chunk(inode, i) for i in range(first_gone, last)]
                if names:
                    await tx.watch(*names)
                    pipe = self.r.pipeline(transaction=False)
                    for n in names:
                        pipe.lrange(n, 0, -1)
                    lists = await pipe.execute()
                index, off = divmod(length, CHUNK_SIZE)
                if off:
                    partial = (index, hole(off, _chunk_len(old, index) - off))
            members = [
                keys.slice_key(r.id, r.size) for raw in lists for r in unpack_records(raw) if r.id
            ]
            now = now_ns()
            attr.size = length
            attr.mtime = attr.ctime = now
            p = tx.multi()
            p.set(keys.attr(inode), attr.pack())
            self._queue_usage(p, dirs, delta, 0)
            if partial:
                p.rpush(keys.chunk(inode, partial[0]), partial[1].pack())
            if names:
                p.delete(*names)
            for m in members:
                p.hincrby(keys.SLICE_REFS, m, -1)
            tx.after = lambda results: (
                attr,
                _released(members, results[len(results) - len(members) :]) if members else [],
            )
            return attr, []

        attr, released = await self._txn(body, keys.attr(inode), lock=[inode])
        await self._release_slices(released)
        return attr

    async def fallocate(self, ctx: Ctx, inode: int, mode: int, offset: int, length: int) -> Attr:
        if offset < 0 or length <= 0:
            raise FSError(errno.EINVAL, "bad fallocate range")
        if mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE) or mode & ~(
            FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
        ):
            raise FSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} not supported")
        if mode & FALLOC_FL_PUNCH_HOLE and mode & FALLOC_FL_ZERO_RANGE:
            raise FSError(errno.EINVAL, "punch hole and zero range together")
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise FSError(errno.EOPNOTSUPP, "punch hole needs keep size")
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG, "file too large")
        zeroing = bool(mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))
        dirs = await self._quota_chain_of(inode)

        async def body(tx: Tx) -> Attr:
            attr = await self._get_attr(tx.p, inode)
            if attr.is_dir():
                raise FSError(errno.EISDIR, f"inode {inode} is a directory")
            if not attr.is_file():
                raise FSError(errno.ENODEV, f"inode {inode} is not a regular file")
            size = attr.size if mode & FALLOC_FL_KEEP_SIZE else max(attr.size, end)
            delta = align4k(size) - align4k(attr.size)
            if delta > 0:
                await self._check_usage(dirs, delta, 0)
            zero_end = min(end, size)
            now = now_ns()
            changed = size != attr.size or (zeroing and zero_end > offset)
            attr.size = size
            if changed:
                attr.mtime = attr.ctime = now
            p = tx.multi()
            if zeroing and zero_end > offset:
                for index, pos, n in _split(offset, zero_end - offset):
                    p.rpush(keys.chunk(inode, index), hole(pos, n).pack())
            p.set(keys.attr(inode), attr.pack())
            self._queue_usage(p, dirs, delta, 0)
            return attr

        return await self._txn(body, keys.attr(inode), lock=[inode])

    async def copy_file_range(
        self,
        ctx: Ctx,
        fin: int,
        off_in: int,
        fout: int,
        off_out: int,
        size: int,
        flags: int = 0,
    ) -> int:
        """Copies by reference (no data moves): the destination names the same slices."""
        if flags or off_in < 0 or off_out < 0 or size < 0:
            raise FSError(errno.EINVAL, "bad copy_file_range arguments")
        dirs = await self._quota_chain_of(fout)

        async def body(tx: Tx) -> int:
            await tx.watch(keys.attr(fout))
            ain = await self._get_attr(tx.p, fin)
            aout = ain if fin == fout else await self._get_attr(tx.p, fout)
            _file_attr(ain)
            _file_attr(aout)
            n = min(size, max(0, ain.size - off_in))
            if n == 0:
                return 0
            if fin == fout and off_in < off_out + n and off_out < off_in + n:
                raise FSError(errno.EINVAL, "overlapping copy within one file")
            if off_out + n > MAX_FILE_SIZE:
                raise FSError(errno.EFBIG, "file too large")
            pieces = _split(off_in, n)
            names = [keys.chunk(fin, i) for i, _, _ in pieces]
            await tx.watch(*names)
            pipe = self.r.pipeline(transaction=False)
            for name in names:
                pipe.lrange(name, 0, -1)
            lists = await pipe.execute()
            out: list[tuple[int, SliceRecord]] = []
            dst = off_out
            for (index, pos, length), raw in zip(pieces, lists, strict=True):
                views = resolve(unpack_records(raw), _chunk_len(ain.size, index))
                at = 0
                for v in views:
                    lo, hi = max(at, pos), min(at + v.len, pos + length)
                    if lo < hi:
                        skip = lo - at
                        for di, dpos, dn in _split(dst, hi - lo):
                            rec = (
                                SliceRecord(dpos, v.id, v.size, v.off + skip, dn)
                                if v.id
                                else hole(dpos, dn)
                            )
                            out.append((di, rec))
                            skip += dn
                            dst += dn
                    at += v.len
            new_size = max(aout.size, off_out + n)
            delta = align4k(new_size) - align4k(aout.size)
            if delta > 0:
                await self._check_usage(dirs, delta, 0)
            now = now_ns()
            aout.size = new_size
            aout.mtime = aout.ctime = now
            p = tx.multi()
            for di, rec in out:
                p.rpush(keys.chunk(fout, di), rec.pack())
                if rec.id:
                    p.hincrby(keys.SLICE_REFS, keys.slice_key(rec.id, rec.size), 1)
            p.set(keys.attr(fout), aout.pack())
            self._queue_usage(p, dirs, delta, 0)
            return n

        return await self._txn(body, keys.attr(fin), lock=[fin, fout])

    # -- compaction and slice bookkeeping ---------------------------------------------------

    async def compact_chunk(
        self,
        inode: int,
        index: int,
        old_records: list[SliceRecord],
        new_slice: SliceView,
        pos: int = 0,
    ) -> bool:
        """Replaces the first len(old_records) records of the chunk by one record of new_slice
        at pos, if they are still those records (records appended since stay after it).
        The replaced slices lose a reference (kept in the trash for trash_days when that was
        their last). False if the chunk changed: then new_slice is queued for deletion."""
        name = keys.chunk(inode, index)
        packed = [r.pack() for r in old_records]
        record = SliceRecord(pos, new_slice.id, new_slice.size, new_slice.off, new_slice.len)
        members = [keys.slice_key(r.id, r.size) for r in old_records if r.id]

        async def body(tx: Tx) -> Any:
            current = await tx.p.lrange(name, 0, len(packed) - 1)
            if not packed or current != packed:
                return False, []
            p = tx.multi()
            p.ltrim(name, len(packed), -1)
            p.lpush(name, record.pack())
            if new_slice.id:
                p.hincrby(keys.SLICE_REFS, keys.slice_key(new_slice.id, new_slice.size), 1)
            for m in members:
                p.hincrby(keys.SLICE_REFS, m, -1)
            tx.after = lambda results: (
                True,
                _released(members, results[len(results) - len(members) :]) if members else [],
            )
            return True, []

        done, released = await self._txn(body, name, lock=[inode])
        if done:
            await self._release_slices(released, trash=True)
        elif new_slice.id:
            await self._release_slices([keys.slice_key(new_slice.id, new_slice.size)])
        return done

    async def fragmented_chunks(self, min_records: int = 5) -> AsyncIterator[tuple[int, int]]:
        """(inode, index) of chunks with at least min_records records: compaction's work."""
        async for name in self.r.scan_iter(keys.CHUNK_PATTERN, 1000):
            if await self.r.llen(name) >= min_records:
                yield keys.parse_chunk_key(name)

    async def list_slices(self) -> AsyncIterator[tuple[int, int]]:
        """Every slice (id, size) some chunk record names (for gc and fsck)."""
        async for member, _ in self.r.hscan_iter(keys.SLICE_REFS, count=1000):
            yield keys.parse_slice_key(member)

    async def slice_refs(self, slice_id: int, size: int) -> int:
        return int(await self.r.hget(keys.SLICE_REFS, keys.slice_key(slice_id, size)) or 0)

    async def deref_slice(self, slice_id: int, size: int) -> int:
        """Drops one reference; at zero the slice is queued for deletion. The new count."""
        member = keys.slice_key(slice_id, size)
        count = await self.r.hincrby(keys.SLICE_REFS, member, -1)
        if count <= 0:
            await self._release_slices([member])
        return max(0, count)

    async def pending_slice_deletes(
        self, now: float | None = None, limit: int = 1000
    ) -> list[tuple[int, int]]:
        """Slices (id, size) whose objects may be deleted now (their trash time passed)."""
        now = time.time() if now is None else now
        members = await self.r.zrangebyscore(keys.DELETED_SLICES, "-inf", now, start=0, num=limit)
        return [keys.parse_slice_key(m) for m in members]

    async def forget_slice_deletes(self, slices: list[tuple[int, int]]) -> None:
        """The data path deleted these slices' objects: drop them from the queue."""
        if slices:
            await self.r.zrem(keys.DELETED_SLICES, *[keys.slice_key(i, s) for i, s in slices])

    async def cleanup_deleted_files(self, grace: float = 3600.0) -> int:
        """Finishes freeing files whose deleter stopped midway (older than grace seconds)."""
        done = 0
        stale = await self.r.zrangebyscore(keys.DELETED_FILES, "-inf", time.time() - grace)
        for member in stale:
            ino, size = (int(x) for x in member.decode().split(":"))
            if await self.r.exists(keys.attr(ino)):
                await self.r.zrem(keys.DELETED_FILES, member)
                continue
            await self._free_file(ino, size)
            done += 1
        return done
