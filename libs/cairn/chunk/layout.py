"""Pure arithmetic of the data layout: files -> chunks -> slices -> blocks.

A file is cut into fixed-size chunks (64 MiB by default); a write inside one chunk becomes a
slice, and a slice is stored as consecutive immutable blocks of at most `block_size` bytes
(the last one may be shorter). Nothing here does I/O, so the writer, the reader, compaction,
GC and fsck all agree on the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

MiB = 1 << 20
DEFAULT_CHUNK_SIZE = 64 * MiB
DEFAULT_BLOCK_SIZE = 4 * MiB


class ChunkSpan(NamedTuple):
    """The part of a file range that falls inside one chunk.

    `pos` is the offset inside chunk `index`; `buf_off` is where this span starts inside the
    caller's buffer (0 for the first span of the range).
    """

    index: int
    pos: int
    length: int
    buf_off: int


class BlockRange(NamedTuple):
    """Bytes [start, start + length) of block `index` of a slice whose length is `block_len`."""

    index: int
    block_len: int
    start: int
    length: int


def chunk_pos(offset: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[int, int]:
    """A file offset -> (chunk index, position inside that chunk)."""
    if offset < 0:
        raise ValueError(f"negative file offset {offset}")
    return divmod(offset, chunk_size)


def chunk_spans(
    offset: int, length: int, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[ChunkSpan]:
    """Cut the file range [offset, offset + length) at chunk boundaries, in file order."""
    if length < 0:
        raise ValueError(f"negative length {length}")
    done = 0
    while done < length:
        index, pos = chunk_pos(offset + done, chunk_size)
        n = min(length - done, chunk_size - pos)
        yield ChunkSpan(index, pos, n, done)
        done += n


def chunk_count(file_length: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """How many chunks a file of `file_length` bytes touches."""
    return -(-file_length // chunk_size)


def block_count(slice_size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """How many blocks store a slice of `slice_size` bytes."""
    return -(-slice_size // block_size)


def block_len(slice_size: int, index: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """The stored length of block `index` of a slice (only the last one can be short)."""
    if index < 0 or index * block_size >= slice_size:
        raise ValueError(f"block {index} is outside a slice of {slice_size} bytes")
    return min(block_size, slice_size - index * block_size)


def slice_blocks(slice_size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> list[tuple[int, int]]:
    """Every block of a slice as (block index, block length), in order."""
    return [
        (i, block_len(slice_size, i, block_size))
        for i in range(block_count(slice_size, block_size))
    ]


def block_ranges(
    slice_size: int, off: int, length: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> list[BlockRange]:
    """The block ranges a read of bytes [off, off + length) of a slice needs, in order."""
    if off < 0 or length < 0 or off + length > slice_size:
        raise ValueError(f"range {off}+{length} is outside a slice of {slice_size} bytes")
    ranges = []
    end = off + length
    while off < end:
        index, start = divmod(off, block_size)
        n = min(end - off, block_size - start)
        ranges.append(BlockRange(index, block_len(slice_size, index, block_size), start, n))
        off += n
    return ranges


def full_blocks(length: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """How many whole blocks the first `length` bytes of a slice fill."""
    return length // block_size
