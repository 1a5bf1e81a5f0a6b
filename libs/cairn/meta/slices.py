"""Slice records of a chunk and how they resolve into what a read sees.

A chunk's metadata is the list of records appended by writes, oldest first. A record puts
bytes [off, off+len) of slice `id` at position `pos` of the chunk; id 0 is a hole (zeros).
A later record hides what an earlier one wrote under it, byte by byte, so a read resolves
the list into non-overlapping segments (`resolve`). Pure functions, no I/O.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Iterable
from typing import NamedTuple

from cairn.meta.types import CHUNK_SIZE, SliceView

_RECORD = struct.Struct("<IQIII")
RECORD_SIZE = _RECORD.size


class SliceRecord(NamedTuple):
    pos: int
    id: int
    size: int
    off: int
    len: int

    def pack(self) -> bytes:
        return _RECORD.pack(self.pos, self.id, self.size, self.off, self.len)

    @classmethod
    def unpack(cls, data: bytes) -> SliceRecord:
        return cls(*_RECORD.unpack(data))

    @property
    def view(self) -> SliceView:
        return SliceView(self.id, self.size, self.off, self.len)


def hole(pos: int, length: int) -> SliceRecord:
    return SliceRecord(pos, 0, 0, 0, length)


def resolve(records: Iterable[SliceRecord], length: int = CHUNK_SIZE) -> list[SliceView]:
    """Segments covering [0, length) in order: the newest record wins each byte, gaps are holes.

    Adjacent holes merge, and so do adjacent pieces of one slice that continue each other.
    """
    # segs: sorted, non-overlapping [start, end, id, size, off]; ends are sorted too.
    segs: list[list[int]] = []
    for rec in records:
        start, end = rec.pos, min(rec.pos + rec.len, CHUNK_SIZE)
        if end <= start:
            continue
        i = bisect_right(segs, start, key=lambda g: g[1])  # first seg ending after start
        j = i
        keep: list[list[int]] = []
        tail: list[list[int]] = []
        while j < len(segs) and segs[j][0] < end:
            s, e, sid, size, off = segs[j]
            if s < start:
                keep.append([s, start, sid, size, off])
            if e > end:
                tail.append([end, e, sid, size, off + (end - s)])
            j += 1
        segs[i:j] = [*keep, [start, end, rec.id, rec.size, rec.off], *tail]
    out: list[SliceView] = []
    pos = 0
    for s, e, sid, size, off in segs:
        if s >= length:
            break
        if s > pos:
            _append(out, SliceView(0, 0, 0, s - pos))
        e = min(e, length)
        _append(out, SliceView(sid, size, off, e - s) if sid else SliceView(0, 0, 0, e - s))
        pos = e
    if pos < length:
        _append(out, SliceView(0, 0, 0, length - pos))
    return out


def _append(out: list[SliceView], view: SliceView) -> None:
    if out:
        last = out[-1]
        if last.id == view.id and (view.id == 0 or last.off + last.len == view.off):
            out[-1] = last._replace(len=last.len + view.len)
            return
    out.append(view)


def pack_records(records: Iterable[SliceRecord]) -> list[bytes]:
    return [r.pack() for r in records]


def unpack_records(raw: Iterable[bytes]) -> list[SliceRecord]:
    return [SliceRecord.unpack(r) for r in raw]


def fragmented(records: list[SliceRecord], threshold: int = 5) -> bool:
    """Whether a chunk has enough records to be worth compacting."""
    return len(records) >= threshold
