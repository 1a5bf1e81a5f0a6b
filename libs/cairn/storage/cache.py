"""The client's local block cache, and CachedStore that reads and writes through it.

Two tiers, both keyed by object key and both least-recently-used within a byte quota:

- memory: an ordered dict of bytes;
- disk: one file per block under a directory, mirroring the key layout, so it survives a
  restart: at start the directory is scanned and the index rebuilt, oldest access first
  (a hit touches the file's times, which is what the scan orders by).

A cache is an optimisation, never a source of failures. Each disk file carries a trailer
of CRC32s, one per 64 KiB piece of the block, then the block's length and a magic, so a
block torn by a crash or damaged on disk is dropped instead of served, and a ranged read
reads (pread) and checks only the pieces it needs (files of the older format, one CRC over
the whole block, are still read, whole); and if
the disk itself fails (a read or write raises OSError: directory removed or replaced,
read-only, full), the disk tier logs once and switches itself off, and callers simply miss
and go to the object store. No OSError ever reaches a caller.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import struct
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cairn.errors import InvalidArgument
from cairn.storage.base import RESERVED_PREFIX, ObjectInfo, ObjectStore, validate_key

log = logging.getLogger(__name__)

T = TypeVar("T")
TEMP_PREFIX = RESERVED_PREFIX + "tmp-"
_MAGIC_V1 = b"CRC1"
_TRAILER_V1 = struct.Struct(">I4s")  # crc32 of the whole block, then the magic
_MAGIC = b"CRC2"
_FOOTER = struct.Struct(">Q4s")  # after the piece CRCs: the block's length, the magic
_CRC = struct.Struct(">I")
PIECE = 64 * 1024  # bytes covered by one CRC


def trailer_size(length: int) -> int:
    """Bytes a disk file carries besides a block of `length` bytes."""
    return _CRC.size * -(-length // PIECE) + _FOOTER.size


def _piece_crcs(data: bytes | memoryview) -> bytes:
    with memoryview(data) as view:
        return b"".join(
            _CRC.pack(zlib.crc32(view[i : i + PIECE])) for i in range(0, len(view), PIECE)
        )


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    memory_hits: int
    disk_hits: int
    memory_bytes: int
    memory_items: int
    disk_bytes: int  # on disk, trailers included
    disk_items: int
    disk_enabled: bool


class _MemoryTier:
    def __init__(self, quota: int) -> None:
        self.quota = quota
        self.used = 0
        self.items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        data = self.items.get(key)
        if data is not None:
            self.items.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        self.pop(key)
        if len(data) > self.quota:
            return
        self.items[key] = data
        self.used += len(data)
        while self.used > self.quota:
            _, old = self.items.popitem(last=False)
            self.used -= len(old)

    def pop(self, key: str) -> None:
        old = self.items.pop(key, None)
        if old is not None:
            self.used -= len(old)


class _DiskTier:
    """Blocks as files under `root`; the index lives in memory and is touched only on the
    event loop, while file I/O runs in the cache's thread pool."""

    def __init__(self, root: Path, quota: int, pool: ThreadPoolExecutor) -> None:
        self.root = root
        self.quota = quota
        self.pool = pool
        self.used = 0
        self.index: OrderedDict[str, int] = OrderedDict()  # key -> bytes on disk, LRU first
        self.enabled = True

    # -- on the event loop ------------------------------------------------------------

    async def start(self) -> None:
        try:
            entries = await self._io(self._scan)
        except OSError as error:
            self._fail(error, "scan")
            return
        for _, key, size in sorted(entries):
            self.index[key] = size
            self.used += size
        await self._evict_over_quota()
        log.debug("disk cache %s: %d blocks, %d bytes", self.root, len(self.index), self.used)

    def __contains__(self, key: str) -> bool:
        return self.enabled and key in self.index

    async def get(self, key: str, offset: int = 0, length: int = -1) -> bytes | None:
        """The block, or bytes [offset, offset + length) of it (length -1: to the end)."""
        if key not in self:
            return None
        try:
            data = await self._io(self._read, key, offset, length)
        except OSError as error:
            self._fail(error, "read")
            return None
        if data is None:  # vanished or damaged: forget it
            self._forget(key)
        elif key in self.index:
            self.index.move_to_end(key)
        return data

    async def put(self, key: str, data: bytes) -> None:
        size = len(data) + trailer_size(len(data))
        if not self.enabled or size > self.quota:
            return
        try:
            await self._io(self._write, key, data)
        except OSError as error:
            self._fail(error, "write")
            return
        self._forget(key)
        self.index[key] = size
        self.used += size
        await self._evict_over_quota()

    async def evict(self, key: str) -> None:
        if key in self:
            self._forget(key)
            await self._delete([key])

    async def _evict_over_quota(self) -> None:
        victims = []
        while self.used > self.quota and self.index:
            key, size = self.index.popitem(last=False)
            self.used -= size
            victims.append(key)
        if victims:
            await self._delete(victims)

    async def _delete(self, keys: list[str]) -> None:
        if not self.enabled:
            return
        try:
            await self._io(self._unlink, keys)
        except OSError as error:
            self._fail(error, "delete")

    def _forget(self, key: str) -> None:
        size = self.index.pop(key, None)
        if size is not None:
            self.used -= size

    def _fail(self, error: OSError, action: str) -> None:
        if self.enabled:
            log.warning(
                "block cache disk %s failed to %s (%s); disk tier disabled, reads go "
                "to the object store",
                self.root,
                action,
                error,
            )
        self.enabled = False
        self.index.clear()
        self.used = 0

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -- in the pool ------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _scan(self) -> list[tuple[float, str, int]]:
        """(last use, key, size) of every cached block; stale temp files are removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
            rel = os.path.relpath(dirpath, self.root)
            for name in filenames:
                path = os.path.join(dirpath, name)
                if name.startswith(TEMP_PREFIX):  # a write cut short by a crash
                    _unlink_quietly(path)
                    continue
                key = name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}"
                try:
                    validate_key(key)
                    st = os.stat(path)
                except (InvalidArgument, FileNotFoundError):
                    continue
                found.append((max(st.st_atime, st.st_mtime), key, st.st_size))
        return found

    def _read(self, key: str, offset: int = 0, length: int = -1) -> bytes | None:
        path = self._path(key)
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed just below)
        except FileNotFoundError:
            if not self.root.is_dir():
                raise  # the whole cache directory is gone: a disk failure
            return None  # just this block was removed behind our back
        with f:
            data = self._read_fd(f.fileno(), offset, length)
        if data is None:
            return self._damaged(path, key)
        os.utime(path)  # persist the LRU order for the scan after a restart
        return data

    @staticmethod
    def _read_fd(fd: int, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset + length) of the block in the open file, None if damaged."""
        size = os.fstat(fd).st_size
        tail = os.pread(fd, min(size, _FOOTER.size), max(0, size - _FOOTER.size))
        if tail[-4:] == _MAGIC and len(tail) == _FOOTER.size:
            data_len = _FOOTER.unpack(tail)[0]
            if size != data_len + trailer_size(data_len):
                return None
            end = data_len if length < 0 else min(data_len, offset + length)
            if offset >= end:
                return b""
            first, last = offset // PIECE, (end - 1) // PIECE
            lo, hi = first * PIECE, min(data_len, (last + 1) * PIECE)
            raw = os.pread(fd, hi - lo, lo)
            crcs = os.pread(fd, _CRC.size * (last - first + 1), data_len + _CRC.size * first)
            if len(raw) != hi - lo or crcs != _piece_crcs(raw):
                return None
            return raw if (lo, hi) == (offset, end) else raw[offset - lo : end - lo]
        if tail[-4:] == _MAGIC_V1 and size >= _TRAILER_V1.size:  # the older format
            raw = os.pread(fd, size, 0)
            data, trailer = raw[: -_TRAILER_V1.size], raw[-_TRAILER_V1.size :]
            if len(raw) != size or _TRAILER_V1.unpack(trailer)[0] != zlib.crc32(data):
                return None
            return data[offset:] if length < 0 else data[offset : offset + length]
        return None

    def _damaged(self, path: Path, key: str) -> None:
        log.warning("block cache %s: dropping damaged block %s", self.root, key)
        _unlink_quietly(path)
        return None

    def _write(self, key: str, data: bytes) -> None:
        if not self.root.is_dir():  # never quietly recreate a vanished cache disk
            raise FileNotFoundError(errno.ENOENT, "cache directory is gone", str(self.root))
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.parent / f"{TEMP_PREFIX}{path.name}-{secrets.token_hex(6)}"
        try:
            with open(temp, "wb") as f:
                f.write(data)
                f.write(_piece_crcs(data))
                f.write(_FOOTER.pack(len(data), _MAGIC))
            os.replace(temp, path)  # readers never see a half-written block
        except BaseException:
            _unlink_quietly(temp)
            raise

    def _unlink(self, keys: list[str]) -> None:
        for key in keys:
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                pass


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class BlockCache:
    """A memory tier and an optional disk tier of blocks, keyed by object key.

    `memory_bytes` and `disk_bytes` are the quotas; a block bigger than a tier's quota is
    not kept in that tier. Disk I/O runs in a small thread pool owned by the cache.
    `put_later` keeps a block in memory at once and writes it to disk in the background
    (at most `pending_bytes` queued; beyond that the disk copy is skipped); `close` waits
    for the queued writes.
    """

    def __init__(
        self,
        memory_bytes: int = 256 << 20,
        disk_dir: str | os.PathLike | None = None,
        disk_bytes: int = 10 << 30,
        *,
        max_workers: int = 4,
        pending_bytes: int = 64 << 20,
    ) -> None:
        self._memory = _MemoryTier(max(0, memory_bytes))
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="cairn-cache")
        self._disk = (
            _DiskTier(Path(disk_dir), max(0, disk_bytes), self._pool)
            if disk_dir is not None and disk_bytes > 0
            else None
        )
        self._started = self._disk is None
        self._start_lock = asyncio.Lock()
        self._hits = self._misses = self._memory_hits = self._disk_hits = 0
        # Disk writes queued by put_later, oldest first, written one at a time by _writer.
        self._pending: OrderedDict[str, bytes] = OrderedDict()
        self._pending_bytes = 0
        self._pending_limit = max(0, pending_bytes)
        self._writer: asyncio.Task[None] | None = None
        self._writing: str | None = None
        self._evicted_while_writing = False
        self.dropped_writes = 0

    async def start(self) -> None:
        """Rebuilds the disk index from the directory; done on first use if not called."""
        if self._started:
            return
        async with self._start_lock:
            if not self._started:
                await self._disk.start()
                self._started = True

    async def get(self, key: str) -> bytes | None:
        """The cached block, or None on a miss."""
        validate_key(key)
        data = self._memory.get(key)
        if data is not None:
            self._hits += 1
            self._memory_hits += 1
            return data
        data = self._pending.get(key)
        if data is not None:
            self._hits += 1
            self._memory_hits += 1
            self._memory.put(key, data)
            return data
        await self.start()
        if self._disk is not None:
            data = await self._disk.get(key)
            if data is not None:
                self._hits += 1
                self._disk_hits += 1
                self._memory.put(key, data)
                return data
        self._misses += 1
        return None

    async def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset + length) (length -1: to the end) of the cached block, or
        None on a miss; from the disk tier only the pieces holding them are read."""
        validate_key(key)
        data = self._memory.get(key)
        if data is None:
            data = self._pending.get(key)
        if data is not None:
            self._hits += 1
            self._memory_hits += 1
            return data[offset:] if length < 0 else data[offset : offset + length]
        await self.start()
        if self._disk is not None:
            data = await self._disk.get(key, offset, length)
            if data is not None:
                self._hits += 1
                self._disk_hits += 1
                return data
        self._misses += 1
        return None

    async def put(self, key: str, data: bytes) -> None:
        """Keeps `data` in both tiers (each within its quota)."""
        validate_key(key)
        data = bytes(data)
        self._memory.put(key, data)
        await self.start()
        if self._disk is not None:
            await self._disk.put(key, data)

    def put_later(self, key: str, data: bytes) -> None:
        """Keeps `data` in memory now and queues its disk copy (dropped when the queue is
        full): for read paths, which must not wait for the cache disk."""
        validate_key(key)
        data = bytes(data)
        self._memory.put(key, data)
        disk = self._disk
        if disk is None or not disk.enabled or key in self._pending:
            return
        if len(data) > disk.quota:
            return
        if self._pending_bytes + len(data) > self._pending_limit:
            self.dropped_writes += 1
            return
        self._pending[key] = data
        self._pending_bytes += len(data)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())

    async def _write_pending(self) -> None:
        while self._pending:
            key, data = next(iter(self._pending.items()))
            self._writing, self._evicted_while_writing = key, False
            try:
                await self.start()
                await self._disk.put(key, data)
                if self._evicted_while_writing:
                    await self._disk.evict(key)
            except Exception as error:  # a cache never fails its callers
                log.warning("block cache: background write of %s failed: %s", key, error)
            finally:
                self._writing = None
                if self._pending.pop(key, None) is not None:
                    self._pending_bytes -= len(data)

    async def flush(self) -> None:
        """Waits until the disk writes queued by put_later are done."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def evict(self, key: str) -> None:
        """Drops the block from both tiers."""
        validate_key(key)
        self._memory.pop(key)
        if key == self._writing:
            self._evicted_while_writing = True
        elif (data := self._pending.pop(key, None)) is not None:
            self._pending_bytes -= len(data)
        await self.start()
        if self._disk is not None:
            await self._disk.evict(key)

    def contains(self, key: str) -> bool:
        return (
            key in self._memory.items
            or key in self._pending
            or (self._disk is not None and key in self._disk)
        )

    __contains__ = contains

    @property
    def disk_enabled(self) -> bool:
        return self._disk is not None and self._disk.enabled

    def stats(self) -> CacheStats:
        disk = self._disk
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            memory_hits=self._memory_hits,
            disk_hits=self._disk_hits,
            memory_bytes=self._memory.used,
            memory_items=len(self._memory.items),
            disk_bytes=disk.used if disk else 0,
            disk_items=len(disk.index) if disk else 0,
            disk_enabled=self.disk_enabled,
        )

    async def close(self) -> None:
        try:
            await self.flush()
        finally:
            writer = self._writer
            if writer is not None and not writer.done():  # close itself was cancelled
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            await asyncio.to_thread(self._pool.shutdown, wait=True)


class CachedStore(ObjectStore):
    """An object store read through and (optionally) written through a BlockCache.

    Whole-object reads are cached; a ranged read is cut from a cached whole block when
    there is one (reading only its pieces from the disk tier) and otherwise goes to the
    store uncached. Concurrent misses of one key
    share a single download.
    """

    def __init__(
        self, store: ObjectStore, cache: BlockCache, *, write_through: bool = True
    ) -> None:
        super().__init__(store.url)
        self.store = store
        self.cache = cache
        self.write_through = write_through
        self._loading: dict[str, asyncio.Task[bytes]] = {}

    async def _get(self, key: str, offset: int, length: int) -> bytes:
        if offset == 0 and length == -1:
            data = await self.cache.get(key)
            return data if data is not None else await self._load(key)
        data = await self.cache.get_range(key, offset, length)
        if data is not None:
            return data
        return await self.store.get(key, offset, length)

    def read_now(self, key: str, offset: int, length: int) -> bytes | None:
        # Only a store on local disk answers at once; objects never change, so its answer
        # is the cache's.
        return self.store.read_now(key, offset, length)

    async def _load(self, key: str) -> bytes:
        # The download is a task of its own, shielded from its callers: one caller being
        # cancelled must not fail the others waiting for the same block.
        task = self._loading.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch(key))
            self._loading[key] = task
            task.add_done_callback(lambda t: self._loaded(key, t))
        return await asyncio.shield(task)

    async def _fetch(self, key: str) -> bytes:
        data = await self.store.get(key)
        self.cache.put_later(key, data)  # the reader does not wait for the cache disk
        return data

    def _loaded(self, key: str, task: asyncio.Task[bytes]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        if not task.cancelled():
            task.exception()  # retrieved, so a download nobody awaits any more logs nothing

    async def _put(self, key: str, data: bytes) -> None:
        await self.store.put(key, data)
        if self.write_through:
            await self.cache.put(key, data)
        else:
            await self.cache.evict(key)

    async def _delete(self, key: str) -> None:
        await self.cache.evict(key)
        await self.store.delete(key)

    async def _head(self, key: str) -> ObjectInfo:
        return await self.store.head(key)

    async def _list(
        self, prefix: str, start_after: str, page_size: int
    ) -> AsyncIterator[ObjectInfo]:
        async for info in self.store.list(prefix, start_after, page_size):
            yield info

    async def _check(self) -> None:
        await self.store.check()

    async def close(self) -> None:
        await self.store.close()
        await self.cache.close()
