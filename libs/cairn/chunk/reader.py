"""The read half of the data path: file ranges -> chunks -> slice segments -> block ranges.

For each chunk a read touches, `meta.read` answers the resolved segments (newest slice per
byte, id 0 for holes); each segment names a byte range of one immutable slice, which
`layout.block_ranges` turns into block ranges. Blocks are fetched concurrently (bounded):

- whole blocks when a block cache is in front of the store (the cache keeps whole objects),
  when the volume compresses (a compressed block can only be decoded whole), or when the
  block is being read ahead; whole decoded blocks are kept in a small in-memory LRU;
- ranged GETs otherwise, so a random 4 KiB read does not fetch 4 MiB.

A small read that is not sequential and misses every cache does not wait for a whole
block either: it takes a ranged GET of just the bytes it needs, and the whole block is
fetched into the caches in the background (a few at a time, apart from foreground reads),
so the reads after it hit. Such a read of a block the store's cache holds is a ranged read
of the cache (which reads only the pieces it needs from its disk tier).

Block keys name immutable objects, so neither the LRU nor the cache can ever be stale.

Read-ahead: each stream (a file handle, or the inode when no handle is given) remembers
where its last read ended. A read that starts there doubles the stream's window (from one
block up to `readahead_max`), and the blocks after the read, up to the window, are fetched
in the background into the LRU (and through the cache, when there is one). A read
elsewhere resets the window.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from cairn.chunk import layout
from cairn.errors import InvalidArgument, TemporaryError
from cairn.retry import retry
from cairn.storage.compress import Codec, CorruptData, get_codec
from cairn.storage.file import FileStore
from cairn.storage.keys import block_key

log = logging.getLogger(__name__)

DEFAULT_MAX_FETCHES = 16
BACKGROUND_FETCHES = 4
SMALL_READ = 128 * 1024  # a read up to this size, not sequential, takes the ranged path
DEFAULT_MEMORY_LIMIT = 64 * layout.MiB
FETCH_DEADLINE = 60.0
MAX_STREAMS = 10_000


def local_file_store(store: Any) -> FileStore | None:
    """The FileStore under any wrappers (caches, counters: each keeps the store it wraps
    as `.store`), or None."""
    while store is not None:
        if isinstance(store, FileStore):
            return store
        store = getattr(store, "store", None)
    return None


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@dataclass
class _Stream:
    """Sequential-access state of one handle."""

    next_offset: int = -1
    window: int = 0
    ahead_end: int = 0  # read-ahead has been asked for everything before this offset


@dataclass(frozen=True)
class _Piece:
    """Bytes [start, start + length) of a block, landing at `dest` in the answer."""

    key: str
    block_len: int
    start: int
    length: int
    dest: int


class ChunkReader:
    """Reads file ranges from slices in the object store; one per mount."""

    def __init__(
        self,
        meta: Any,
        store: Any,
        *,
        volume: str | None = None,
        block_size: int | None = None,
        chunk_size: int | None = None,
        compress: str | Codec | None = None,
        cached: bool | None = None,
        max_fetches: int = DEFAULT_MAX_FETCHES,
        readahead_max: int | None = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        local: bool | None = None,
    ) -> None:
        fmt = getattr(meta, "fmt", None)
        self.meta = meta
        self.store = store
        self.volume = volume or fmt.uuid
        self.block_size = block_size or getattr(fmt, "block_size", layout.DEFAULT_BLOCK_SIZE)
        self.chunk_size = chunk_size or getattr(fmt, "chunk_size", layout.DEFAULT_CHUNK_SIZE)
        if compress is None:
            compress = getattr(fmt, "compress", None)
        self.codec = compress if isinstance(compress, Codec) else get_codec(compress)
        # A store with a block cache in front (CachedStore) is read in whole blocks.
        self.cached = hasattr(store, "cache") if cached is None else cached
        self.whole_blocks = self.cached or self.codec.name != "none"
        # A file:// store answers ranged reads from local disk about as fast as a cache:
        # a random small read of it does not pull the whole block in the background.
        self.local = local_file_store(store) is not None if local is None else local
        self.readahead_max = readahead_max if readahead_max is not None else 8 * self.block_size
        self.memory_limit = memory_limit
        self.deadline = FETCH_DEADLINE  # seconds a fetch retries a store that fails
        self._slots = asyncio.Semaphore(max_fetches)
        self._background_slots = asyncio.Semaphore(BACKGROUND_FETCHES)
        self._blocks: OrderedDict[str, bytes] = OrderedDict()  # decoded whole blocks
        self._memory = 0
        self._inflight: dict[str, asyncio.Task[bytes]] = {}
        self._streams: dict[Hashable, _Stream] = {}
        self._prefetches: set[asyncio.Task[None]] = set()

    async def read(
        self,
        inode: int,
        offset: int,
        size: int,
        file_length: int,
        handle: Hashable = None,
        view: bool = False,
    ) -> bytes | memoryview:
        """Bytes [offset, offset + size) of the file, cut at `file_length`; holes are zeros.

        view=True may answer a read-only memoryview of a cached block instead of a copy
        (when one block holds the whole range): the FUSE reply reads it as it is."""
        if offset < 0 or size < 0:
            raise InvalidArgument(f"invalid read of {size} bytes at {offset}")
        end = min(offset + size, file_length)
        if end <= offset:
            return b""
        pieces = await self._plan(inode, offset, end - offset)
        stream = self._streams.get(inode if handle is None else handle)
        small = end - offset <= SMALL_READ and (stream is None or stream.next_offset != offset)
        if len(pieces) == 1 and pieces[0].length == end - offset:
            data = await self._piece(pieces[0], small)
            self._read_ahead(inode, offset, end, file_length, handle)
            return data if view or isinstance(data, bytes) else bytes(data)
        out = bytearray(end - offset)
        buf = memoryview(out)
        await asyncio.gather(*(self._fill(buf, p, small) for p in pieces))
        self._read_ahead(inode, offset, end, file_length, handle)
        return out if view else bytes(out)

    async def read_segments(self, segments: list[Any], pos: int, length: int) -> bytes:
        """Bytes [pos, pos + length) of a chunk already resolved into `segments` (compaction)."""
        out = bytearray(length)
        view = memoryview(out)
        span = layout.ChunkSpan(0, pos, length, 0)
        await asyncio.gather(*(self._fill(view, p) for p in self._chunk_pieces(span, segments)))
        return bytes(out)

    def forget(self, handle: Hashable) -> None:
        """Drop the read-ahead state of a released handle (or inode)."""
        self._streams.pop(handle, None)

    async def close(self) -> None:
        """Stop background read-ahead and drop buffered blocks."""
        for task in list(self._prefetches):
            task.cancel()
        await asyncio.gather(*self._prefetches, return_exceptions=True)
        self._prefetches.clear()
        fetches = list(self._inflight.values())
        for task in fetches:
            task.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)
        self._blocks.clear()
        self._memory = 0

    # -- planning ------------------------------------------------------------

    async def _plan(self, inode: int, offset: int, length: int) -> list[_Piece]:
        """The block pieces that hold file range [offset, offset + length), holes left out."""
        spans = list(layout.chunk_spans(offset, length, self.chunk_size))
        if len(spans) == 1:  # most reads: no tasks to gather
            views = [await _maybe_await(self.meta.read(inode, spans[0].index))]
        else:
            views = await asyncio.gather(
                *(_maybe_await(self.meta.read(inode, s.index)) for s in spans)
            )
        pieces = []
        for span, segments in zip(spans, views, strict=True):
            pieces.extend(self._chunk_pieces(span, segments))
        return pieces

    def _chunk_pieces(self, span: layout.ChunkSpan, segments: list[Any]) -> list[_Piece]:
        pieces = []
        span_end = span.pos + span.length
        pos = 0  # where the current segment starts inside the chunk
        for seg in segments:
            seg_end = pos + seg.len
            lo, hi = max(pos, span.pos), min(seg_end, span_end)
            if seg.id and lo < hi:
                dest = span.buf_off + lo - span.pos
                slice_off = seg.off + lo - pos
                for br in layout.block_ranges(seg.size, slice_off, hi - lo, self.block_size):
                    key = block_key(self.volume, seg.id, br.index, br.block_len)
                    pieces.append(_Piece(key, br.block_len, br.start, br.length, dest))
                    dest += br.length
            pos = seg_end
            if pos >= span_end:
                break
        return pieces

    # -- fetching --------------------------------------------------------------

    async def _fill(self, out: memoryview, piece: _Piece, small: bool = False) -> None:
        out[piece.dest : piece.dest + piece.length] = await self._piece(piece, small)

    async def _piece(self, piece: _Piece, small: bool = False) -> bytes | memoryview:
        """The bytes of one piece: a view into a whole block, or a ranged read's answer."""
        block = self._blocks.get(piece.key)
        if block is not None:
            self._blocks.move_to_end(piece.key)
        elif small and self.codec.name == "none" and piece.key not in self._inflight:
            # a ranged read: of the store's cache when it has the block (only the pieces
            # needed are read from its disk), else of the store, the whole block following
            if not self._in_store_cache(piece.key):
                self._fetch_in_background(piece.key, piece.block_len)
        elif self.whole_blocks or piece.key in self._inflight:
            block = await self._whole_block(piece.key, piece.block_len)
        if block is not None:
            if piece.start == 0 and piece.length == len(block):
                return block
            return memoryview(block)[piece.start : piece.start + piece.length]
        return await self._ranged(piece)

    async def _ranged(self, piece: _Piece) -> bytes:
        # A local disk answers a small read at once (read_now); others are awaited.
        data = self.store.read_now(piece.key, piece.start, piece.length) if self.local else None
        if data is None:
            async with self._slots:
                try:  # most reads succeed at once: retry() only after a failure
                    data = await self.store.get(piece.key, piece.start, piece.length)
                except TemporaryError:
                    data = await retry(
                        lambda: self.store.get(piece.key, piece.start, piece.length),
                        deadline=self.deadline,
                    )
        if len(data) != piece.length:
            raise CorruptData(
                f"block {piece.key} is short: wanted {piece.length} bytes at {piece.start}, "
                f"got {len(data)}"
            )
        return data

    def _in_store_cache(self, key: str) -> bool:
        cache = getattr(self.store, "cache", None)
        return cache is not None and cache.contains(key)

    def _fetch_in_background(self, key: str, block_len: int) -> None:
        """Starts fetching the whole block into the caches, if nobody is already."""
        if not self.whole_blocks or self.local or key in self._inflight:
            return
        task = asyncio.create_task(self._background_block(key, block_len))
        self._prefetches.add(task)
        task.add_done_callback(self._prefetches.discard)

    async def _background_block(self, key: str, block_len: int) -> None:
        try:
            await self._whole_block(key, block_len, self._background_slots)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a cache fill is a hint: the real reads report errors
            log.debug("background fetch of %s failed: %s", key, error)

    async def _whole_block(
        self, key: str, block_len: int, slots: asyncio.Semaphore | None = None
    ) -> bytes:
        """The decoded block, fetched once however many readers want it at the same time."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch_block(key, block_len, slots or self._slots))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._fetched(key, t))
        return await asyncio.shield(task)

    def _fetched(self, key: str, task: asyncio.Task[bytes]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: a fetch whose waiters went away logs nothing

    async def _fetch_block(self, key: str, block_len: int, slots: asyncio.Semaphore) -> bytes:
        async with slots:
            stored = await retry(lambda: self.store.get(key), deadline=self.deadline)
        if self.codec.name == "none":
            data = stored
        else:
            data = await asyncio.to_thread(self.codec.decompress, stored)
        if len(data) != block_len:
            raise CorruptData(f"block {key} holds {len(data)} bytes, not {block_len}")
        self._remember(key, data)
        return data

    def _remember(self, key: str, data: bytes) -> None:
        if key in self._blocks or len(data) > self.memory_limit:
            return
        self._blocks[key] = data
        self._memory += len(data)
        while self._memory > self.memory_limit:
            _, old = self._blocks.popitem(last=False)
            self._memory -= len(old)

    # -- read-ahead --------------------------------------------------------------

    def _read_ahead(
        self, inode: int, offset: int, end: int, file_length: int, handle: Hashable
    ) -> None:
        key = inode if handle is None else handle
        if key not in self._streams and len(self._streams) >= MAX_STREAMS:
            self._streams.clear()  # handles never forgotten: start over rather than grow
        stream = self._streams.setdefault(key, _Stream())
        if offset == stream.next_offset:
            stream.window = min(self.readahead_max, max(self.block_size, stream.window * 2))
        else:
            stream.window = 0
            stream.ahead_end = 0
        stream.next_offset = end
        if not stream.window:
            return
        start = max(end, stream.ahead_end)
        stop = min(end + stream.window, file_length)
        if start >= stop:
            return
        stream.ahead_end = stop
        task = asyncio.create_task(self._prefetch(inode, start, stop - start))
        self._prefetches.add(task)
        task.add_done_callback(self._prefetches.discard)

    async def _prefetch(self, inode: int, offset: int, length: int) -> None:
        try:
            pieces = await self._plan(inode, offset, length)
            wanted = {}
            for p in pieces:
                if p.key not in self._blocks:
                    wanted.setdefault(p.key, p.block_len)
            files = local_file_store(self.store)
            if self.local and files is not None and self.codec.name == "none":
                # A local disk: the kernel reads them all at once into its page cache,
                # whence the reads take them; copying them into memory here as well only
                # costs CPU (and races a FUSE layer answering reads itself).
                for key in wanted:
                    if key not in self._inflight:
                        files.will_need(key)
                return
            await asyncio.gather(*(self._whole_block(k, n) for k, n in wanted.items()))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # read-ahead is a hint: the real read reports errors
            log.debug("read-ahead of inode %d at %d failed: %s", inode, offset, error)
