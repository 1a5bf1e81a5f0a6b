"""The layout arithmetic: file offsets to chunks, slices to blocks, segments to block ranges."""

from __future__ import annotations

import pytest

from cairn.chunk import layout
from cairn.chunk.layout import BlockRange, ChunkSpan

KiB = 1024


def test_chunk_pos_splits_offsets_at_chunk_boundaries():
    assert layout.chunk_pos(0) == (0, 0)
    assert layout.chunk_pos(layout.DEFAULT_CHUNK_SIZE - 1) == (0, layout.DEFAULT_CHUNK_SIZE - 1)
    assert layout.chunk_pos(layout.DEFAULT_CHUNK_SIZE) == (1, 0)
    assert layout.chunk_pos(10 * KiB + 5, chunk_size=4 * KiB) == (2, 2 * KiB + 5)
    with pytest.raises(ValueError):
        layout.chunk_pos(-1)


def test_chunk_spans_cut_a_range_and_keep_buffer_offsets():
    spans = list(layout.chunk_spans(3 * KiB, 6 * KiB, chunk_size=4 * KiB))
    assert spans == [
        ChunkSpan(0, 3 * KiB, 1 * KiB, 0),
        ChunkSpan(1, 0, 4 * KiB, 1 * KiB),
        ChunkSpan(2, 0, 1 * KiB, 5 * KiB),
    ]
    assert sum(s.length for s in spans) == 6 * KiB


def test_chunk_spans_of_an_empty_range_and_exact_chunks():
    assert list(layout.chunk_spans(100, 0, chunk_size=64)) == []
    assert list(layout.chunk_spans(64, 128, chunk_size=64)) == [
        ChunkSpan(1, 0, 64, 0),
        ChunkSpan(2, 0, 64, 64),
    ]


def test_chunk_count():
    assert layout.chunk_count(0, 64) == 0
    assert layout.chunk_count(1, 64) == 1
    assert layout.chunk_count(64, 64) == 1
    assert layout.chunk_count(65, 64) == 2


def test_slice_blocks_are_full_except_the_last():
    assert layout.slice_blocks(0, 4) == []
    assert layout.slice_blocks(8, 4) == [(0, 4), (1, 4)]
    assert layout.slice_blocks(10, 4) == [(0, 4), (1, 4), (2, 2)]
    assert layout.block_count(10, 4) == 3
    assert layout.block_len(10, 2, 4) == 2
    with pytest.raises(ValueError):
        layout.block_len(10, 3, 4)


def test_block_ranges_of_a_segment_inside_one_block():
    assert layout.block_ranges(10, 5, 2, 4) == [BlockRange(1, 4, 1, 2)]


def test_block_ranges_of_a_segment_across_blocks():
    # A 10-byte slice in 4-byte blocks; bytes 3..9 touch all three blocks.
    assert layout.block_ranges(10, 3, 7, 4) == [
        BlockRange(0, 4, 3, 1),
        BlockRange(1, 4, 0, 4),
        BlockRange(2, 2, 0, 2),
    ]


def test_block_ranges_cover_exactly_the_segment():
    size, block = 1000, 64
    for off in range(0, size, 37):
        for length in (0, 1, 63, 64, 65, size - off):
            if off + length > size:
                continue
            ranges = layout.block_ranges(size, off, length, block)
            assert sum(r.length for r in ranges) == length
            pos = off
            for r in ranges:
                assert r.index * block + r.start == pos
                assert r.start + r.length <= r.block_len
                pos += r.length


def test_block_ranges_reject_a_range_outside_the_slice():
    with pytest.raises(ValueError):
        layout.block_ranges(10, 8, 3, 4)
    with pytest.raises(ValueError):
        layout.block_ranges(10, -1, 1, 4)


def test_full_blocks():
    assert layout.full_blocks(0, 4) == 0
    assert layout.full_blocks(7, 4) == 1
    assert layout.full_blocks(8, 4) == 2
