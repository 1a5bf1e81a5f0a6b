"""File locks kept in Redis so every client sees them: BSD flock and POSIX record locks.

A lock's owner is (session, lock owner) so a dead session's locks can be found and released.
Blocking requests poll: a waiter retries with growing pauses until the lock is free (or the
caller cancels, as FUSE does on an interrupt).
"""

from __future__ import annotations

import asyncio
import errno
import struct
from collections.abc import Awaitable, Callable

from cairn.errors import FSError
from cairn.meta import keys
from cairn.meta.base import Tx
from cairn.meta.types import F_RDLCK, F_UNLCK, F_WRLCK

_RANGE = struct.Struct("<BQQI")
Range = tuple[int, int, int, int]  # (type, start, end inclusive, pid)


def pack_ranges(ranges: list[Range]) -> bytes:
    return b"".join(_RANGE.pack(*r) for r in ranges)


def unpack_ranges(data: bytes) -> list[Range]:
    return [_RANGE.unpack_from(data, i) for i in range(0, len(data), _RANGE.size)]


def set_range(ranges: list[Range], kind: int, start: int, end: int, pid: int) -> list[Range]:
    """One owner's ranges after locking (or unlocking, F_UNLCK) [start, end]."""
    out: list[Range] = []
    for t, s, e, p in ranges:
        if e < start or s > end:
            out.append((t, s, e, p))
            continue
        if s < start:
            out.append((t, s, start - 1, p))
        if e > end:
            out.append((t, end + 1, e, p))
    if kind != F_UNLCK:
        out.append((kind, start, end, pid))
    out.sort(key=lambda r: r[1])
    merged: list[Range] = []
    for r in out:
        if merged and merged[-1][0] == r[0] and merged[-1][2] + 1 >= r[1]:
            last = merged[-1]
            merged[-1] = (last[0], last[1], max(last[2], r[2]), r[3])
        else:
            merged.append(r)
    return merged


def conflict(others: dict[bytes, bytes], kind: int, start: int, end: int) -> Range | None:
    for data in others.values():
        for t, s, e, p in unpack_ranges(data):
            if e >= start and s <= end and (kind == F_WRLCK or t == F_WRLCK):
                return (t, s, e, p)
    return None


class LockMixin:
    def _lock_field(self, owner: int) -> str:
        return f"{self.sid or 0}:{owner}"

    async def _wait(self, attempt: Callable[[], Awaitable[bool]], block: bool) -> None:
        pause = 0.005
        while not await attempt():
            if not block:
                raise FSError(errno.EAGAIN, "lock held by another owner")
            await asyncio.sleep(pause)
            pause = min(0.2, pause * 2)

    async def flock(self, inode: int, owner: int, type: int, block: bool = False) -> None:
        key = keys.flocks(inode)
        field = self._lock_field(owner)
        if type == F_UNLCK:
            await self.r.hdel(key, field)
            return
        if type not in (F_RDLCK, F_WRLCK):
            raise FSError(errno.EINVAL, f"bad lock type {type}")
        await self.getattr(inode)
        mine = b"W" if type == F_WRLCK else b"R"

        async def body(tx: Tx) -> bool:
            held = await tx.p.hgetall(key)
            others = [v for k, v in held.items() if k.decode() != field]
            if (type == F_WRLCK and others) or b"W" in others:
                return False
            p = tx.multi()
            p.hset(key, field, mine)
            p.sadd(keys.session_locks(self.sid or 0), key)
            return True

        await self._wait(lambda: self._txn(body, key), block)

    async def getlk(
        self, inode: int, owner: int, type: int, start: int, end: int, pid: int
    ) -> tuple[int, int, int, int]:
        """The first lock that would block the request, or (F_UNLCK, 0, 0, 0)."""
        if type == F_UNLCK:
            return (F_UNLCK, 0, 0, 0)
        field = self._lock_field(owner).encode()
        held = await self.r.hgetall(keys.plocks(inode))
        held.pop(field, None)
        found = conflict(held, type, start, end)
        return found if found else (F_UNLCK, 0, 0, 0)

    async def setlk(
        self,
        inode: int,
        owner: int,
        block: bool,
        type: int,
        start: int,
        end: int,
        pid: int,
    ) -> None:
        if type not in (F_RDLCK, F_WRLCK, F_UNLCK):
            raise FSError(errno.EINVAL, f"bad lock type {type}")
        if start < 0 or end < start:
            raise FSError(errno.EINVAL, "bad lock range")
        key = keys.plocks(inode)
        field = self._lock_field(owner).encode()
        if type != F_UNLCK:
            await self.getattr(inode)

        async def body(tx: Tx) -> bool:
            held = await tx.p.hgetall(key)
            mine = unpack_ranges(held.pop(field, b""))
            if type != F_UNLCK and conflict(held, type, start, end):
                return False
            ranges = set_range(mine, type, start, end, pid)
            p = tx.multi()
            if ranges:
                p.hset(key, field, pack_ranges(ranges))
                p.sadd(keys.session_locks(self.sid or 0), key)
            else:
                p.hdel(key, field)
            return True

        await self._wait(lambda: self._txn(body, key), block)

    async def _release_locks(self, sid: int) -> None:
        """Drops every lock a session holds."""
        prefix = f"{sid}:".encode()
        for key in await self.r.smembers(keys.session_locks(sid)):
            fields = [f for f in await self.r.hkeys(key) if f.startswith(prefix)]
            if fields:
                await self.r.hdel(key, *fields)
        await self.r.delete(keys.session_locks(sid))

    async def release_owner_locks(self, inode: int, owner: int) -> None:
        """Drops the flock and record locks of one owner on an inode (FUSE release/flush)."""
        field = self._lock_field(owner)
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(keys.flocks(inode), field)
        pipe.hdel(keys.plocks(inode), field)
        await pipe.execute()
