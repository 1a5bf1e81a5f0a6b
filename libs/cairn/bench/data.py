"""What the file benchmarks share: a deterministic data pool (so every byte read can be
checked) and dropping files from the page cache (so reads are cold)."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

MiB = 1 << 20
POOL = 16 * MiB  # distinct random bytes a written file is made of


def pool() -> bytes:
    return random.Random(1).randbytes(POOL)


def expected(data: bytes, offset: int, length: int) -> bytes:
    """The bytes at `offset` of a file that is `data` (the pool) repeated."""
    start = offset % POOL
    if start + length <= POOL:
        return data[start : start + length]
    return data[start:] + data[: length - (POOL - start)]


def drop_cache(path: str | Path) -> None:
    """Evict a file's clean (already fsync'd) pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_tree_cache(root: Path) -> None:
    for dirpath, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):  # a file replaced or removed meanwhile
                drop_cache(os.path.join(dirpath, name))
