"""fsck: check that metadata and the object store agree, and that counters add up.

Checks, in this order:

1. every slice a chunk record names has all its block objects (a missing block is data
   loss: the report names the slice, the missing keys and the inodes whose files use it);
   with no compression, a block whose stored size is wrong is reported as damaged;
2. block objects no slice owns (leaks, older than the grace period; gc deletes them);
3. the reference count of every slice (slicerefs) against the records that name it;
4. the volume's usage counters (space, inodes) and every directory quota's usage, against
   a recount.

Chunks are read before the listing, so a slice committed during the run has its objects
listed; a slice reported missing is looked at again (still referenced? object really
absent?) before it is reported, so concurrent deletes do not raise false alarms.

`repair=True` rewrites counters found wrong, each in a transaction that watches what a
concurrent change would touch, so a busy volume is never "repaired" with a stale count:
if the counters keep changing, the report says they were left alone. Missing objects
cannot be repaired here; leaked ones are gc's job.

This module reads the metadata engine's Redis keys through `meta.r` and `cairn.meta.keys`
for the scans the engine has no public call for (every chunk, every inode).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cairn.chunk import layout
from cairn.chunk.compact import scan_chunks
from cairn.chunk.gc import DEFAULT_GRACE
from cairn.errors import ConflictError, InvalidArgument, NotFound
from cairn.meta import keys
from cairn.meta.slices import unpack_records
from cairn.meta.types import ROOT_INODE, TRASH_INODE, Attr, space_of
from cairn.storage.keys import block_key, chunks_prefix, parse_block_key

log = logging.getLogger(__name__)

Progress = Callable[[str, int], None]
SlicePair = tuple[int, int]  # (slice id, size)


@dataclass
class MissingSlice:
    slice_id: int
    size: int
    keys: list[str]  # block objects that are not in the store
    inodes: list[int]  # files whose chunks name the slice


@dataclass
class CounterFix:
    """A counter whose stored value differs from the recount."""

    name: str  # "space", "inodes", "quota:<dir>:space", "slice:<id>_<size>"...
    stored: int
    actual: int
    repaired: bool = False


@dataclass
class FsckReport:
    chunks: int = 0
    slices: int = 0
    objects: int = 0
    missing: list[MissingSlice] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # objects of the wrong size
    leaked: list[str] = field(default_factory=list)
    counters: list[CounterFix] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.damaged or self.leaked or self.unrepaired)

    @property
    def unrepaired(self) -> list[CounterFix]:
        return [c for c in self.counters if not c.repaired]

    @property
    def broken_inodes(self) -> list[int]:
        return sorted({i for m in self.missing for i in m.inodes})


async def fsck(
    meta: Any,
    store: Any,
    repair: bool = False,
    progress: Progress | None = None,
    *,
    grace: float = DEFAULT_GRACE,
) -> FsckReport:
    report = FsckReport()
    volume, block_size = meta.fmt.uuid, meta.fmt.block_size
    users, chunk_refs = await _scan_slices(meta, report, progress)
    listed = await _list_objects(store, volume, report, progress)
    await _check_blocks(meta, store, volume, block_size, users, listed, report)
    queued = {s for s in await meta.pending_slice_deletes(now=math.inf, limit=1 << 62)}
    _find_leaks(listed, set(users) | queued, block_size, time.time() - grace, report)
    await _check_slice_refs(meta, chunk_refs, repair, report)
    await _check_usage(meta, repair, report)
    await _check_quotas(meta, repair, report)
    return report


# -- slices and objects ------------------------------------------------------------------


async def _scan_slices(
    meta: Any, report: FsckReport, progress: Progress | None
) -> tuple[dict[SlicePair, set[int]], dict[SlicePair, set[str]]]:
    """(slice -> inodes naming it, slice -> chunk keys naming it), from every chunk."""
    users: dict[SlicePair, set[int]] = defaultdict(set)
    chunk_refs: dict[SlicePair, set[str]] = defaultdict(set)
    async for inode, index in scan_chunks(meta):
        report.chunks += 1
        for rec in await meta.chunk_records(inode, index):
            if rec.id:
                users[(rec.id, rec.size)].add(inode)
                chunk_refs[(rec.id, rec.size)].add(keys.chunk(inode, index))
        if progress is not None and report.chunks % 1000 == 0:
            progress("chunks", report.chunks)
    report.slices = len(users)
    return users, chunk_refs


async def _list_objects(
    store: Any, volume: str, report: FsckReport, progress: Progress | None
) -> dict[str, tuple[int, float]]:
    listed = {}
    async for info in store.list(chunks_prefix(volume)):
        listed[info.key] = (info.size, info.mtime)
        report.objects += 1
        if progress is not None and report.objects % 1000 == 0:
            progress("objects", report.objects)
    return listed


async def _check_blocks(
    meta: Any,
    store: Any,
    volume: str,
    block_size: int,
    users: dict[SlicePair, set[int]],
    listed: dict[str, tuple[int, float]],
    report: FsckReport,
) -> None:
    exact_sizes = getattr(meta.fmt, "compress", "none") in ("none", "", None)
    for (slice_id, size), inodes in users.items():
        missing = []
        for index, length in layout.slice_blocks(size, block_size):
            key = block_key(volume, slice_id, index, length)
            seen = listed.get(key)
            if seen is None:
                missing.append(key)
            elif exact_sizes and seen[0] != length:
                report.damaged.append(key)
        if missing:
            missing = await _confirm_missing(meta, store, slice_id, size, missing)
        if missing:
            report.missing.append(MissingSlice(slice_id, size, missing, sorted(inodes)))


async def _confirm_missing(
    meta: Any, store: Any, slice_id: int, size: int, missing: list[str]
) -> list[str]:
    """The keys still missing now, if the slice is still referenced."""
    if await meta.slice_refs(slice_id, size) <= 0:
        return []
    still = []
    for key in missing:
        try:
            await store.head(key)
        except NotFound:
            still.append(key)
    return still


def _find_leaks(
    listed: dict[str, tuple[int, float]],
    owners: set[SlicePair],
    block_size: int,
    cutoff: float,
    report: FsckReport,
) -> None:
    by_id: dict[int, list[int]] = defaultdict(list)
    for slice_id, size in owners:
        by_id[slice_id].append(size)
    for key, (_, mtime) in listed.items():
        try:
            bk = parse_block_key(key)
        except InvalidArgument:
            report.notes.append(f"not a block key: {key}")
            continue
        owned = any(
            bk.index < layout.block_count(size, block_size)
            and bk.size == layout.block_len(size, bk.index, block_size)
            for size in by_id.get(bk.slice_id, ())
        )
        if not owned and mtime <= cutoff:
            report.leaked.append(key)


# -- counters ----------------------------------------------------------------------------


async def _check_slice_refs(
    meta: Any, chunk_refs: dict[SlicePair, set[str]], repair: bool, report: FsckReport
) -> None:
    """slicerefs against a count of the records naming each slice."""
    stored: dict[SlicePair, int] = {}
    async for member, value in meta.r.hscan_iter(keys.SLICE_REFS, count=1000):
        stored[keys.parse_slice_key(member)] = int(value)
    actual = await _count_refs(meta, chunk_refs)
    wrong = sorted(s for s in set(stored) | set(actual) if stored.get(s, 0) != actual.get(s, 0))
    if not wrong:
        return
    fixes = {
        s: CounterFix(f"slice:{s[0]}_{s[1]}", stored.get(s, 0), actual.get(s, 0)) for s in wrong
    }
    report.counters.extend(fixes.values())
    if repair:
        await _repair_slice_refs(meta, chunk_refs, fixes, report)


async def _count_refs(meta: Any, chunk_refs: dict[SlicePair, set[str]]) -> Counter[SlicePair]:
    """How many records name each slice, reading the chunks known to name it."""
    counts: Counter[SlicePair] = Counter()
    names = sorted({n for ns in chunk_refs.values() for n in ns})
    for start in range(0, len(names), 500):
        pipe = meta.r.pipeline(transaction=False)
        for name in names[start : start + 500]:
            pipe.lrange(name, 0, -1)
        for raw in await pipe.execute():
            for rec in unpack_records(raw):
                if rec.id:
                    counts[(rec.id, rec.size)] += 1
    return counts


async def _repair_slice_refs(
    meta: Any,
    chunk_refs: dict[SlicePair, set[str]],
    fixes: dict[SlicePair, CounterFix],
    report: FsckReport,
) -> None:
    """Set the wrong counts, watching slicerefs: every change to any slice's records
    (write, truncate, compaction, copy, delete) changes it in the same transaction."""

    async def body(tx: Any) -> None:
        await tx.watch(keys.SLICE_REFS)
        subset = {s: chunk_refs.get(s, set()) for s in fixes}
        actual = await _count_refs(meta, subset)
        p = tx.multi()
        for s in fixes:
            member = keys.slice_key(*s)
            if actual.get(s, 0) > 0:
                p.hset(keys.SLICE_REFS, member, actual[s])
                p.zrem(keys.DELETED_SLICES, member)  # named again: its objects must stay
            else:
                # Nothing names it: free it as the engine does for a last reference.
                p.hdel(keys.SLICE_REFS, member)
                p.zadd(keys.DELETED_SLICES, {member: time.time()})
            fixes[s].actual = actual.get(s, 0)

    if await _guarded(meta, body, report, "slice reference counts"):
        for fix in fixes.values():
            fix.repaired = True


async def _recount_usage(meta: Any) -> tuple[int, int]:
    """(space, inodes) of every inode the volume counts: all but the root, the trash and
    the trash's hourly directories (which the engine creates without counting them)."""
    space = inodes = 0
    batch: list[Any] = []

    async def flush() -> None:
        nonlocal space, inodes
        names = [b.decode() if isinstance(b, bytes) else b for b in batch]
        batch.clear()
        for name, raw in zip(names, await meta.r.mget(names), strict=True):
            if raw is None:
                continue
            attr = Attr.unpack(keys.inode_of(name), raw)
            if attr.inode in (ROOT_INODE, TRASH_INODE):
                continue
            if attr.is_dir() and attr.parent == TRASH_INODE:
                continue
            space += space_of(attr)
            inodes += 1

    async for name in meta.r.scan_iter(match=keys.ATTR_PATTERN, count=1000):
        batch.append(name)
        if len(batch) >= 1000:
            await flush()
    if batch:
        await flush()
    return space, inodes


async def _check_usage(meta: Any, repair: bool, report: FsckReport) -> None:
    stored_space, stored_inodes = (
        int(v or 0) for v in await meta.r.mget(keys.USED_SPACE, keys.USED_INODES)
    )
    space, inodes = await _recount_usage(meta)
    fixes = []
    if stored_space != space:
        fixes.append(CounterFix("space", stored_space, space))
    if stored_inodes != inodes:
        fixes.append(CounterFix("inodes", stored_inodes, inodes))
    report.counters.extend(fixes)
    if not (repair and fixes):
        return

    async def body(tx: Any) -> None:
        # Every change of usage moves these counters, so watching them is enough.
        await tx.watch(keys.USED_SPACE, keys.USED_INODES)
        now_space, now_inodes = await _recount_usage(meta)
        p = tx.multi()
        p.set(keys.USED_SPACE, now_space)
        p.set(keys.USED_INODES, now_inodes)
        for fix in fixes:
            fix.actual = now_space if fix.name == "space" else now_inodes

    if await _guarded(meta, body, report, "usage counters"):
        for fix in fixes:
            fix.repaired = True


async def _check_quotas(meta: Any, repair: bool, report: FsckReport) -> None:
    for inode, quota in (await meta.list_quotas()).items():
        space, inodes = await meta.summary(inode)
        fixes = []
        if quota.used_space != space:
            fixes.append(CounterFix(f"quota:{inode}:space", quota.used_space, space))
        if quota.used_inodes != inodes:
            fixes.append(CounterFix(f"quota:{inode}:inodes", quota.used_inodes, inodes))
        report.counters.extend(fixes)
        if not (repair and fixes):
            continue

        async def body(tx: Any, inode: int = inode, fixes: list[CounterFix] = fixes) -> None:
            await tx.watch(keys.QUOTA_SPACE, keys.QUOTA_INODES)
            now_space, now_inodes = await meta.summary(inode)
            p = tx.multi()
            p.hset(keys.QUOTA_SPACE, str(inode), now_space)
            p.hset(keys.QUOTA_INODES, str(inode), now_inodes)
            for fix in fixes:
                fix.actual = now_space if fix.name.endswith("space") else now_inodes

        if await _guarded(meta, body, report, f"quota usage of directory {inode}"):
            for fix in fixes:
                fix.repaired = True


async def _guarded(meta: Any, body: Callable[[Any], Any], report: FsckReport, what: str) -> bool:
    """Run a repair in the engine's optimistic transaction; False if it kept conflicting."""
    try:
        await meta._txn(body)
    except ConflictError:
        report.notes.append(f"{what} kept changing during the repair: left as they are")
        return False
    return True
