"""Slice compaction: a chunk fragmented into many slice records becomes one new slice.

Every write appends a record to its chunk, so a file rewritten in small pieces ends up
with long record lists: reads resolve more segments and fetch more, smaller blocks.
Compaction reads the chunk as it is now (through its current records), stores those bytes
as one new slice, and asks the metadata engine to swap the records it read for one record
of the new slice (`meta.compact_chunk`). Records appended meanwhile stay after the new
one, so they still win; if the records read are no longer the chunk's first records
(a truncate, another compaction), the swap is refused and the engine queues the new slice
for deletion. Either way nothing visible changes.

Holes before the first and after the last data byte stay implicit; holes in between
become zeros inside the new slice.

`Compactor` runs compactions in the background: the writer reports each commit
(`on_commit`), and a chunk with more than `threshold` records is compacted soon after.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from cairn.chunk.reader import ChunkReader
from cairn.chunk.writer import ChunkWriter
from cairn.meta import keys
from cairn.meta.slices import resolve
from cairn.meta.types import CHUNK_SIZE, SliceView

log = logging.getLogger(__name__)

# A chunk with more records than this is worth compacting.
COMPACT_THRESHOLD = 16


def should_compact(records: list[Any], threshold: int = COMPACT_THRESHOLD) -> bool:
    """Is a chunk with these slice records fragmented enough to compact?"""
    return len(records) > threshold


@dataclass(frozen=True)
class CompactResult:
    inode: int
    index: int
    records: int  # records replaced (0 when nothing was done)
    slice_id: int = 0  # the new slice (0: none, or the chunk held only holes)
    size: int = 0  # bytes of the new slice
    done: bool = False  # True when the metadata now names the new slice


async def compact_chunk(
    meta: Any,
    store: Any,
    inode: int,
    index: int,
    *,
    force: bool = False,
    threshold: int = COMPACT_THRESHOLD,
    reader: ChunkReader | None = None,
    writer: ChunkWriter | None = None,
) -> CompactResult:
    """Compact chunk `index` of `inode` if fragmented (or if `force` and it has 2+ records)."""
    records = await meta.chunk_records(inode, index)
    if len(records) < 2 or not (force or should_compact(records, threshold)):
        return CompactResult(inode, index, 0)
    length = min(CHUNK_SIZE, max(r.pos + r.len for r in records))
    segments = resolve(records, length)
    start, end = _data_bounds(segments)
    if start >= end:  # only holes: one hole record says the same
        new = SliceView(0, 0, 0, length)
        done = await meta.compact_chunk(inode, index, records, new, pos=0)
        return CompactResult(inode, index, len(records), 0, 0, done)
    reader = reader or ChunkReader(meta, store, readahead_max=0)
    writer = writer or ChunkWriter(meta, store)
    data = await reader.read_segments(segments, start, end - start)
    slice_id = await writer.upload_slice(data)
    new = SliceView(slice_id, len(data), 0, len(data))
    done = await meta.compact_chunk(inode, index, records, new, pos=start)
    if not done:
        log.debug("chunk %d/%d changed while compacting; slice %d dropped", inode, index, slice_id)
    return CompactResult(inode, index, len(records), slice_id, len(data), done)


def _data_bounds(segments: list[SliceView]) -> tuple[int, int]:
    """[start, end) from the first to the last byte that is not a hole."""
    pos = 0
    start = end = -1
    for seg in segments:
        if seg.id:
            if start < 0:
                start = pos
            end = pos + seg.len
        pos += seg.len
    return (start, end) if start >= 0 else (0, 0)


async def scan_chunks(meta: Any) -> AsyncIterator[tuple[int, int]]:
    """Every (inode, chunk index) that has slice records, in no particular order."""
    async for name in meta.r.scan_iter(match=keys.CHUNK_PATTERN, count=1000):
        text = name.decode() if isinstance(name, bytes) else name
        yield keys.inode_of(text), int(text.rsplit("_", 1)[1])


async def compact_all(
    meta: Any, store: Any, *, threshold: int = COMPACT_THRESHOLD, concurrency: int = 4
) -> list[CompactResult]:
    """Compact every fragmented chunk of the volume (the meta service's background job)."""
    reader = ChunkReader(meta, store, readahead_max=0)
    writer = ChunkWriter(meta, store)
    slots = asyncio.Semaphore(concurrency)
    results: list[CompactResult] = []

    async def one(inode: int, index: int) -> None:
        async with slots:
            try:
                result = await compact_chunk(
                    meta, store, inode, index, threshold=threshold, reader=reader, writer=writer
                )
            except Exception as error:
                log.warning("compaction of inode %d chunk %d failed: %s", inode, index, error)
                return
            if result.records:
                results.append(result)

    tasks = [asyncio.create_task(one(i, x)) async for i, x in scan_chunks(meta)]
    await asyncio.gather(*tasks)
    await reader.close()
    return results


class Compactor:
    """Compacts chunks in the background as writes fragment them; one per mount.

    Pass `compactor.on_commit` as the ChunkWriter's `on_commit`: every commit schedules a
    cheap check of its chunk (at most one pending per chunk), and fragmented chunks are
    compacted with bounded concurrency.
    """

    def __init__(
        self,
        meta: Any,
        store: Any,
        *,
        threshold: int = COMPACT_THRESHOLD,
        concurrency: int = 2,
        reader: ChunkReader | None = None,
        writer: ChunkWriter | None = None,
    ) -> None:
        self.meta = meta
        self.store = store
        self.threshold = threshold
        self.reader = reader or ChunkReader(meta, store, readahead_max=0)
        self.writer = writer or ChunkWriter(meta, store)
        self.results: list[CompactResult] = []
        self._slots = asyncio.Semaphore(concurrency)
        self._pending: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._commits: dict[tuple[int, int], int] = {}

    def on_commit(self, inode: int, index: int, attr: Any = None) -> None:
        """A slice was committed to this chunk: maybe compact it (every `threshold` commits
        at most one look at the chunk, so a steady writer does not re-read it each time)."""
        key = (inode, index)
        count = self._commits.get(key, 0) + 1
        if len(self._commits) > 100_000:  # forget old chunks rather than grow without end
            self._commits.clear()
        self._commits[key] = count
        if count > self.threshold:
            self._commits.pop(key, None)
            self.request(inode, index)

    def request(self, inode: int, index: int) -> None:
        """Check (and if fragmented, compact) a chunk soon, unless that is already pending."""
        key = (inode, index)
        if key in self._pending:
            return
        task = asyncio.create_task(self._run(inode, index))
        self._pending[key] = task
        task.add_done_callback(lambda _t: self._pending.pop(key, None))

    async def _run(self, inode: int, index: int) -> None:
        async with self._slots:
            try:
                result = await compact_chunk(
                    self.meta,
                    self.store,
                    inode,
                    index,
                    threshold=self.threshold,
                    reader=self.reader,
                    writer=self.writer,
                )
            except Exception as error:  # compaction is an optimisation: log and go on
                log.warning("compaction of inode %d chunk %d failed: %s", inode, index, error)
                return
            if result.records:
                self.results.append(result)

    async def drain(self) -> None:
        """Wait until every requested compaction has finished."""
        while self._pending:
            await asyncio.gather(*list(self._pending.values()), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._pending.values()):
            task.cancel()
        await asyncio.gather(*list(self._pending.values()), return_exceptions=True)
        await self.reader.close()
