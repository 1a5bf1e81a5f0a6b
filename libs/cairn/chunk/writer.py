"""The write half of the data path: buffered file writes become slices, blocks, then metadata.

`ChunkWriter` is one per mount. It hands out one `FileWriter` per open inode; a FileWriter
keeps, per chunk, the slices being built (`SliceWriter`). A write that continues a slice
(sequential I/O, or a rewrite of its still-buffered tail) goes into that slice, so a file
written front to back becomes one slice per chunk; anything else starts a new slice.

Ordering is what keeps the file system consistent:
- blocks are uploaded as soon as they are full (a slice's memory is its unfilled tail plus
  the blocks in flight, never its whole length), with bounded concurrency and the volume's
  codec;
- `flush()` uploads the tails, waits for every block, and only then commits each slice
  with `meta.write`, in the order the slices were created, so a newer slice always wins
  over an older one and a crash never leaves metadata pointing at missing objects;
- a block that is (or may be) uploading is frozen: later writes to its range go into a
  new slice instead of changing bytes already on their way to the store.

Back-pressure: when the buffered bytes of all files pass `buffer_limit`, the writing file
is flushed (and then the fullest other file), so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cairn.chunk import layout
from cairn.errors import ConflictError, FSError
from cairn.meta.types import ROOT_CTX, SliceView
from cairn.retry import retry
from cairn.storage.compress import Codec, get_codec
from cairn.storage.keys import block_key

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOADS = 16
DEFAULT_BUFFER_LIMIT = 256 * layout.MiB
# More open slices than this in one file forces a flush: each is a metadata record to be,
# and a file with many tiny slices is better committed (and later compacted) early.
MAX_OPEN_SLICES = 64
# An open slice older than this is committed at the next write to its file: blocks uploaded
# early must be named by metadata well within gc's grace period for unreferenced objects.
MAX_SLICE_AGE = 300.0
# The background flusher (start()) commits a file none of whose slices changed for this long.
IDLE_FLUSH = 5.0
# Objects are put with retries on temporary errors for this long before a flush fails.
UPLOAD_DEADLINE = 120.0

_sequence = itertools.count()


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _block_bounds(length: int, block_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + block_size, length)) for i in range(0, length, block_size)]


class SliceWriter:
    """One slice being built inside one chunk: bytes [pos, pos + length) of the chunk.

    Bytes before `frozen` are whole blocks handed to uploads; only the tail
    [frozen, length) is still in memory and can be rewritten.
    """

    def __init__(self, index: int, pos: int) -> None:
        self.index = index
        self.pos = pos
        self.length = 0
        self.frozen = 0
        self.mtime_ns = time.time_ns()
        self.created = self.touched = time.monotonic()
        self.seq = next(_sequence)
        self.tail = bytearray()
        self.uploads: list[asyncio.Task[None]] = []
        self.id_task: asyncio.Future[int] | None = None
        self.sealed = False  # no more writes: the slice is being flushed

    @property
    def end(self) -> int:
        return self.pos + self.length

    def can_take(self, pos: int) -> bool:
        """Can a write at chunk position `pos` go into this slice?"""
        return not self.sealed and self.pos + self.frozen <= pos <= self.end

    def overlaps(self, pos: int, length: int) -> bool:
        return pos < self.end and self.pos < pos + length

    def put(self, pos: int, data: bytes | memoryview) -> int:
        """Copy `data` in at chunk position `pos`; return how many bytes the slice grew."""
        rel = pos - self.pos - self.frozen
        end = rel + len(data)
        grown = max(0, end - len(self.tail))
        if grown:
            self.tail.extend(bytes(grown))
        self.tail[rel:end] = data
        self.length += grown
        self.mtime_ns = time.time_ns()
        self.touched = time.monotonic()
        return grown

    def take_full_blocks(self, block_size: int) -> list[tuple[int, bytes]]:
        """Detach the whole blocks of the tail, as (block index, bytes), freezing them."""
        count = len(self.tail) // block_size
        if not count:
            return []
        blocks = []
        # one copy per block (straight out of the buffer), and one move of the rest
        with memoryview(self.tail) as view:
            for i in range(count):
                with view[i * block_size : (i + 1) * block_size] as piece:
                    blocks.append((self.frozen // block_size + i, bytes(piece)))
        del self.tail[: count * block_size]
        self.frozen += count * block_size
        return blocks

    def take_rest(self, block_size: int) -> tuple[int, bytes] | None:
        """Detach the last, partial block (at flush), freezing the whole slice."""
        if not self.tail:
            return None
        block = (self.frozen // block_size, bytes(self.tail))
        self.frozen += len(self.tail)
        self.tail = bytearray()
        return block


class FileWriter:
    """The buffered writes of one inode, shared by all its open handles."""

    def __init__(self, owner: ChunkWriter, inode: int, ctx: Any = None) -> None:
        self.owner = owner
        self.inode = inode
        self.ctx = ctx
        self.refs = 0
        self.chunks: dict[int, list[SliceWriter]] = {}
        self.end = 0  # the highest file offset written and not yet committed
        self._flush_lock = asyncio.Lock()

    @property
    def open_slices(self) -> int:
        return sum(len(s) for s in self.chunks.values())

    @property
    def buffered(self) -> int:
        """Bytes of this file waiting in memory (tails not yet handed to uploads)."""
        return sum(len(s.tail) for slices in self.chunks.values() for s in slices)

    def pending(self) -> bool:
        """Are there writes that `flush()` has not committed yet?"""
        return bool(self.chunks)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        """Buffer `data` at file `offset`; full blocks start uploading right away."""
        view = memoryview(data).cast("B")
        for span in layout.chunk_spans(offset, len(view), self.owner.chunk_size):
            piece = view[span.buf_off : span.buf_off + span.length]
            self._write_chunk(span.index, span.pos, piece)
        if len(view):
            self.end = max(self.end, offset + len(view))
        if self.owner.uploading:
            await asyncio.sleep(0)  # let the uploads just started begin
        if self.open_slices > MAX_OPEN_SLICES or self._oldest_age() > MAX_SLICE_AGE:
            await self.flush()
        await self.owner._relieve(self)

    def _write_chunk(self, index: int, pos: int, data: memoryview) -> None:
        slices = self.chunks.setdefault(index, [])
        target = self._find_slice(slices, pos, len(data))
        if target is None:
            target = SliceWriter(index, pos)
            slices.append(target)
        self.owner.buffered += target.put(pos, data)
        for block_index, block in target.take_full_blocks(self.owner.block_size):
            self.owner._start_upload(target, block_index, block)

    @staticmethod
    def _find_slice(slices: list[SliceWriter], pos: int, length: int) -> SliceWriter | None:
        """The slice a write may go into without reordering anything.

        Newest first: a write may join an older slice only if no newer slice overlaps it,
        since the older slice is committed first and would lose to the newer one.
        """
        for candidate in reversed(slices):
            if candidate.can_take(pos):
                return candidate
            if candidate.overlaps(pos, length):
                return None
        return None

    def _oldest_age(self) -> float:
        created = [s.created for chunk in self.chunks.values() for s in chunk]
        return time.monotonic() - min(created) if created else 0.0

    async def flush(self) -> None:
        """Upload every buffered byte of this file, then commit its slices in write order."""
        async with self._flush_lock:
            slices = sorted(
                (s for chunk in self.chunks.values() for s in chunk), key=lambda s: s.seq
            )
            self.chunks = {}
            self.end = 0
            if slices:
                await self._commit(slices)

    async def _commit(self, slices: list[SliceWriter]) -> None:
        owner = self.owner
        for s in slices:
            s.sealed = True
            rest = s.take_rest(owner.block_size)
            if rest is not None:
                owner._start_upload(s, *rest)
        for i, s in enumerate(slices):
            if s.length == 0:
                continue
            try:
                await asyncio.gather(*s.uploads)
                slice_id = await s.id_task
            except BaseException:
                # Nothing of these slices is in metadata: their objects would only leak.
                await owner._discard(slices[i:])
                raise
            try:
                attr = await owner._call_write(self.ctx, self.inode, s, slice_id)
            except (FSError, ConflictError):  # refused: the slice is certainly not committed
                await owner._discard(slices[i:])
                raise
            except BaseException:
                # The commit may have happened with its answer lost: this slice's objects
                # are left for gc, which deletes them only if nothing names them.
                await owner._discard(slices[i + 1 :])
                raise
            s.uploads.clear()
            await owner._committed(self.inode, s.index, attr)

    async def close(self) -> None:
        """Flush and drop one reference (fsync/close = flush)."""
        try:
            await self.flush()
        finally:
            self.owner._release(self)


class ChunkWriter:
    """The mount-wide writer: shared upload slots, buffer accounting and FileWriters."""

    def __init__(
        self,
        meta: Any,
        store: Any,
        *,
        volume: str | None = None,
        block_size: int | None = None,
        chunk_size: int | None = None,
        compress: str | Codec | None = None,
        max_uploads: int = DEFAULT_MAX_UPLOADS,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
        on_commit: Callable[[int, int, Any], Awaitable[None] | None] | None = None,
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
        self.buffer_limit = buffer_limit
        self.buffered = 0  # bytes in tails plus blocks not yet stored
        self.uploading = 0  # of those, bytes of blocks handed to uploads
        self._landed = asyncio.Event()
        self.on_commit = on_commit
        self._slots = asyncio.Semaphore(max_uploads)
        self.deadline = UPLOAD_DEADLINE  # seconds an upload retries a store that fails
        self._files: dict[int, FileWriter] = {}
        self._background: asyncio.Task[None] | None = None

    # -- files ---------------------------------------------------------------

    def open(self, inode: int, ctx: Any = None) -> FileWriter:
        """The FileWriter of `inode` (shared by its handles); close() it once per open()."""
        writer = self._files.get(inode)
        if writer is None:
            writer = self._files[inode] = FileWriter(self, inode, ctx)
        elif ctx is not None:
            writer.ctx = ctx
        writer.refs += 1
        return writer

    def get(self, inode: int) -> FileWriter | None:
        return self._files.get(inode)

    async def write(self, inode: int, offset: int, data: bytes, ctx: Any = None) -> None:
        """Write through the inode's FileWriter, opening a transient one if none is open."""
        writer = self._files.get(inode)
        if writer is not None:
            if ctx is not None:
                writer.ctx = ctx
            await writer.write(offset, data)
            return
        writer = self.open(inode, ctx)
        try:
            await writer.write(offset, data)
        finally:
            writer.refs -= 1  # stays registered until flushed, like an unflushed handle

    async def flush(self, inode: int) -> None:
        writer = self._files.get(inode)
        if writer is not None:
            await writer.flush()
            if writer.refs <= 0 and not writer.pending():
                self._files.pop(inode, None)

    async def flush_all(self) -> None:
        """Flush every file (unmount, sync); raise the first failure after trying all."""
        errors = []
        for inode in list(self._files):
            try:
                await self.flush(inode)
            except Exception as error:  # noqa: PERF203 - one bad file must not stop the rest
                errors.append(error)
        if errors:
            raise errors[0]

    async def flush_idle(self, idle_seconds: float) -> None:
        """Flush files none of whose slices was written in the last `idle_seconds`."""
        now = time.monotonic()
        for inode, writer in list(self._files.items()):
            slices = [s for chunk in writer.chunks.values() for s in chunk]
            if slices and all(now - s.touched >= idle_seconds for s in slices):
                try:
                    await self.flush(inode)
                except Exception:
                    log.exception("background flush of inode %d failed", inode)

    def start(self, idle_seconds: float = IDLE_FLUSH, interval: float = 1.0) -> None:
        """Flush idle files in the background, as a mount does, until close()."""
        if self._background is None:
            self._background = asyncio.create_task(self._flush_loop(idle_seconds, interval))

    async def _flush_loop(self, idle_seconds: float, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.flush_idle(idle_seconds)

    async def close(self) -> None:
        """Stop the background flusher and flush every file (unmount)."""
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)
            self._background = None
        await self.flush_all()

    def _release(self, writer: FileWriter) -> None:
        writer.refs -= 1
        if writer.refs <= 0 and not writer.pending() and self._files.get(writer.inode) is writer:
            del self._files[writer.inode]

    async def _relieve(self, writing: FileWriter) -> None:
        """Back-pressure: wait until the buffered bytes are under the limit again.

        Blocks in flight free their memory as they land, so those are waited for first;
        if unflushed tails still hold too much, the writing file (then the fullest other
        file) is flushed.
        """
        while self.buffered > self.buffer_limit and self.uploading:
            self._landed.clear()
            await self._landed.wait()
        if self.buffered <= self.buffer_limit:
            return
        await writing.flush()
        while self.buffered > self.buffer_limit:
            others = [w for w in self._files.values() if w is not writing and w.buffered]
            if not others:
                break  # what is left is in flight; flushing waited for our own share
            await max(others, key=lambda w: w.buffered).flush()

    # -- blocks and commits ----------------------------------------------------

    async def upload_slice(self, data: bytes | memoryview) -> int:
        """Store `data` as the blocks of a new slice and return its id (nothing is committed).

        For compaction and copies that build a slice whole; the caller commits it, or the
        objects are left to gc.
        """
        s = SliceWriter(0, 0)
        view = memoryview(data).cast("B")
        self.buffered += len(view)
        for block_index, (start, end) in enumerate(_block_bounds(len(view), self.block_size)):
            self._start_upload(s, block_index, bytes(view[start:end]))
        try:
            await asyncio.gather(*s.uploads)
        except BaseException:
            s.length = len(view)
            await self._discard([s])
            raise
        return await s.id_task if s.id_task is not None else 0

    def _start_upload(self, s: SliceWriter, block_index: int, data: bytes) -> None:
        if s.id_task is None:
            s.id_task = asyncio.ensure_future(_maybe_await(self.meta.new_slice_id()))
        self.uploading += len(data)
        s.uploads.append(asyncio.create_task(self._upload(s.id_task, block_index, data)))

    async def _upload(self, id_task: asyncio.Future[int], block_index: int, data: bytes) -> None:
        try:
            slice_id = await asyncio.shield(id_task)
            key = block_key(self.volume, slice_id, block_index, len(data))
            async with self._slots:
                if self.codec.name == "none":
                    stored = data
                else:
                    stored = await asyncio.to_thread(self.codec.compress, data)
                await retry(lambda: self.store.put(key, stored), deadline=self.deadline)
        finally:
            self.buffered -= len(data)
            self.uploading -= len(data)
            self._landed.set()

    async def _call_write(self, ctx: Any, inode: int, s: SliceWriter, slice_id: int) -> Any:
        view = SliceView(slice_id, s.length, 0, s.length)
        return await _maybe_await(
            self.meta.write(ctx or ROOT_CTX, inode, s.index, s.pos, view, mtime_ns=s.mtime_ns)
        )

    async def _committed(self, inode: int, index: int, attr: Any) -> None:
        if self.on_commit is None:
            return
        try:
            await _maybe_await(self.on_commit(inode, index, attr))
        except Exception:  # a hook (compaction scheduling) must not fail a flush
            log.exception("on_commit hook failed for inode %d chunk %d", inode, index)

    async def _discard(self, slices: list[SliceWriter]) -> None:
        """Best effort: delete the stored blocks of slices that will never be committed."""
        for s in slices:
            results = await asyncio.gather(*s.uploads, return_exceptions=True)
            s.uploads.clear()
            if s.id_task is None or not s.id_task.done() or s.id_task.exception():
                continue
            slice_id = s.id_task.result()
            for (block_index, size), result in zip(
                layout.slice_blocks(s.length, self.block_size), results, strict=False
            ):
                if isinstance(result, BaseException):
                    continue
                try:
                    await self.store.delete(block_key(self.volume, slice_id, block_index, size))
                except Exception as error:
                    log.warning("cannot delete uncommitted block of slice %d: %s", slice_id, error)
