"""Object garbage collection: delete block objects that no slice owns any more.

Two sources of garbage:

- the pending-delete queue: slices whose last reference went away (deleted files,
  overwritten data, compaction) are queued by the metadata engine with the time after which
  their objects may go (now, or after the trash days). gc deletes the blocks of the due
  ones and takes them off the queue;
- leaked objects: blocks no referenced or queued slice owns, left by a client that died
  between upload and commit, or by a delete that was cut short. They are found by listing
  the volume's chunks/ prefix and comparing with the slices metadata names.

An upload in flight looks exactly like a leak (its slice is committed only after all its
blocks are stored), so objects younger than `grace` seconds are never called leaked. The
writer commits slices well within that time (MAX_SLICE_AGE).

Nothing is deleted unless `delete=True`; without it gc only reports.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cairn.chunk import layout
from cairn.errors import InvalidArgument
from cairn.storage.keys import block_key, chunks_prefix, parse_block_key

log = logging.getLogger(__name__)

DEFAULT_GRACE = 3600.0  # seconds an unreferenced object is presumed to be an upload in flight
PENDING_BATCH = 1000
DELETE_CONCURRENCY = 16
LISTED_EVERY = 1000  # progress is reported every so many objects

Progress = Callable[[str, int], None]


@dataclass
class GCReport:
    """What gc found (and, with delete=True, removed)."""

    objects: int = 0  # block objects listed
    bytes: int = 0
    valid: int = 0  # owned by a referenced slice
    queued: int = 0  # owned by a slice waiting in the delete queue (trash not expired)
    recent: int = 0  # unowned but younger than the grace period: maybe uploads in flight
    leaked: list[str] = field(default_factory=list)  # unowned and old
    leaked_bytes: int = 0
    foreign: list[str] = field(default_factory=list)  # under chunks/ but not block keys
    deleted: int = 0  # leaked objects deleted
    pending_due: int = 0  # queued slices whose time has come
    pending_freed: int = 0  # of those, slices whose objects were deleted and dequeued
    pending_objects: int = 0  # objects deleted for them
    errors: list[str] = field(default_factory=list)


class _Owners:
    """Which (slice id, size) pairs own objects; a block key is owned if it is one of the
    blocks such a slice is stored as."""

    def __init__(self) -> None:
        self.sizes: dict[int, set[int]] = defaultdict(set)

    def add(self, slice_id: int, size: int) -> None:
        self.sizes[slice_id].add(size)

    def owns(self, slice_id: int, index: int, block_len: int, block_size: int) -> bool:
        for size in self.sizes.get(slice_id, ()):
            if index < layout.block_count(size, block_size) and block_len == layout.block_len(
                size, index, block_size
            ):
                return True
        return False


async def gc(
    meta: Any,
    store: Any,
    delete: bool = False,
    progress: Progress | None = None,
    *,
    grace: float = DEFAULT_GRACE,
    now: float | None = None,
) -> GCReport:
    """Find (and with delete=True remove) objects no slice owns; drain the delete queue."""
    report = GCReport()
    volume, block_size = meta.fmt.uuid, meta.fmt.block_size
    await _drain_pending(meta, store, volume, block_size, delete, report, progress)
    referenced, queued = _Owners(), _Owners()
    async for slice_id, size in meta.list_slices():
        referenced.add(slice_id, size)
    # Not yet due (in the trash): still owned, not leaked.
    for slice_id, size in await meta.pending_slice_deletes(now=math.inf, limit=1 << 62):
        queued.add(slice_id, size)
    # Listed after reading the references: an object committed meanwhile is young.
    cutoff = (time.time() if now is None else now) - grace
    slots = asyncio.Semaphore(DELETE_CONCURRENCY)
    deletions: list[asyncio.Task[None]] = []
    async for info in store.list(chunks_prefix(volume)):
        report.objects += 1
        report.bytes += info.size
        if progress is not None and report.objects % LISTED_EVERY == 0:
            progress("objects", report.objects)
        try:
            key = parse_block_key(info.key)
        except InvalidArgument:
            report.foreign.append(info.key)
            continue
        if referenced.owns(key.slice_id, key.index, key.size, block_size):
            report.valid += 1
        elif queued.owns(key.slice_id, key.index, key.size, block_size):
            report.queued += 1
        elif info.mtime > cutoff:
            report.recent += 1
        else:
            report.leaked.append(info.key)
            report.leaked_bytes += info.size
            if delete:
                deletions.append(asyncio.create_task(_delete(store, info.key, slots, report)))
    await asyncio.gather(*deletions)
    if progress is not None:
        progress("objects", report.objects)
    return report


async def _delete(store: Any, key: str, slots: asyncio.Semaphore, report: GCReport) -> None:
    async with slots:
        try:
            await store.delete(key)
        except Exception as error:
            report.errors.append(f"delete {key}: {error}")
            return
    report.deleted += 1


async def _drain_pending(
    meta: Any,
    store: Any,
    volume: str,
    block_size: int,
    delete: bool,
    report: GCReport,
    progress: Progress | None,
) -> None:
    """Delete the objects of queued slices whose time has come, then dequeue them."""
    if not delete:
        report.pending_due = len(await meta.pending_slice_deletes(limit=1 << 62))
        return
    failed: set[tuple[int, int]] = set()
    while True:
        batch = [
            s
            for s in await meta.pending_slice_deletes(limit=PENDING_BATCH + len(failed))
            if s not in failed
        ]
        if not batch:
            return
        report.pending_due += len(batch)
        done = []
        for slice_id, size in batch:
            if await meta.slice_refs(slice_id, size) > 0:  # named again: keep the objects
                done.append((slice_id, size))
                continue
            try:
                report.pending_objects += await delete_slice(
                    store, volume, slice_id, size, block_size
                )
            except Exception as error:
                failed.add((slice_id, size))
                report.errors.append(f"delete slice {slice_id}: {error}")
                continue
            done.append((slice_id, size))
            report.pending_freed += 1
        await meta.forget_slice_deletes(done)
        if progress is not None:
            progress("pending", report.pending_freed)


async def delete_slice(store: Any, volume: str, slice_id: int, size: int, block_size: int) -> int:
    """Delete every block object of one slice (missing ones are fine); how many blocks."""
    blocks = layout.slice_blocks(size, block_size)
    await asyncio.gather(*(store.delete(block_key(volume, slice_id, i, n)) for i, n in blocks))
    return len(blocks)
