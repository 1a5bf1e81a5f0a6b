"""The slice resolution algorithm: newest record wins each byte, gaps are holes."""

from __future__ import annotations

import random

from cairn.meta.slices import SliceRecord, hole, resolve
from cairn.meta.types import CHUNK_SIZE, SliceView


def rec(pos, sid, length, off=0, size=None):
    return SliceRecord(pos, sid, size if size is not None else off + length, off, length)


def H(n):
    return SliceView(0, 0, 0, n)


def test_empty_chunk_is_one_hole():
    assert resolve([], 100) == [H(100)]
    assert resolve([], 0) == []


def test_single_slice_with_holes_around():
    assert resolve([rec(10, 1, 20)], 50) == [H(10), SliceView(1, 20, 0, 20), H(20)]


def test_newest_wins_in_the_middle():
    out = resolve([rec(0, 1, 100), rec(40, 2, 20)], 100)
    assert out == [SliceView(1, 100, 0, 40), SliceView(2, 20, 0, 20), SliceView(1, 100, 60, 40)]


def test_newest_covers_older_entirely():
    assert resolve([rec(10, 1, 10), rec(0, 2, 50)], 50) == [SliceView(2, 50, 0, 50)]


def test_overlaps_on_both_edges():
    out = resolve([rec(0, 1, 30), rec(50, 2, 30), rec(20, 3, 40)], 80)
    assert out == [
        SliceView(1, 30, 0, 20),
        SliceView(3, 40, 0, 40),
        SliceView(2, 30, 10, 20),
    ]


def test_hole_record_zeroes_older_data():
    out = resolve([rec(0, 1, 100), hole(20, 30)], 100)
    assert out == [SliceView(1, 100, 0, 20), H(30), SliceView(1, 100, 50, 50)]


def test_truncation_clips_to_length():
    out = resolve([rec(0, 1, 100), rec(80, 2, 50)], 90)
    assert out == [SliceView(1, 100, 0, 80), SliceView(2, 50, 0, 10)]
    assert resolve([rec(60, 1, 10)], 50) == [H(50)]


def test_offset_into_slice_is_kept():
    assert resolve([rec(0, 7, 10, off=5, size=100)], 10) == [SliceView(7, 100, 5, 10)]


def test_adjacent_pieces_of_one_slice_merge():
    out = resolve([rec(0, 1, 100), rec(40, 2, 10), rec(40, 1, 10, off=40, size=100)], 100)
    assert out == [SliceView(1, 100, 0, 100)]


def test_adjacent_holes_merge():
    assert resolve([hole(0, 10), hole(10, 10)], 30) == [H(30)]


def test_full_chunk():
    assert resolve([rec(0, 1, CHUNK_SIZE)]) == [SliceView(1, CHUNK_SIZE, 0, CHUNK_SIZE)]


def test_random_against_byte_model():
    rnd = random.Random(7)
    length = 300
    for _ in range(200):
        records = []
        model = [(0, 0)] * length  # (slice id, byte offset in slice) per byte
        for sid in range(1, rnd.randint(1, 12)):
            pos = rnd.randrange(0, length)
            n = rnd.randint(1, length - pos)
            off = rnd.randint(0, 5)
            is_hole = rnd.random() < 0.2
            r = hole(pos, n) if is_hole else rec(pos, sid, n, off=off, size=off + n + 3)
            records.append(r)
            for i in range(n):
                model[pos + i] = (0, 0) if is_hole else (sid, off + i)
        cut = rnd.randint(0, length)
        views = resolve(records, cut)
        got = []
        for v in views:
            got += [(v.id, v.off + i) if v.id else (0, 0) for i in range(v.len)]
        assert got == model[:cut]
        assert all(v.len > 0 for v in views)
