"""LocalReads' bookkeeping (cairn.fuse.extents) with pyfuse3's real ReadExtents: which
extents are registered for which handle, and that every block file it opens is closed."""

from __future__ import annotations

import time

import pytest

from cairn.fuse import extents
from cairn.fuse.extents import LocalReads
from cairn.vfs.vfs import LocalExtents

pytestmark = pytest.mark.skipif(not extents.available(), reason="pyfuse3 without extents.patch")


class FakeVFS:
    """Answers local_extents from a table: fh -> (inode, LocalExtents per chunk index)."""

    def __init__(self) -> None:
        self.on_data_changed = None
        self.files: dict[int, tuple[int, dict[int, LocalExtents]]] = {}
        self.asked = 0

    def local_extents(self, fh: int, offset: int) -> LocalExtents | None:
        self.asked += 1
        inode, chunks = self.files.get(fh, (0, {}))
        return chunks.get(offset // 1000)


def chunk(inode, index, paths, size=3000, expires=None) -> LocalExtents:
    base = index * 1000
    width = 1000 // len(paths)
    found = [(base + i * width, base + (i + 1) * width, str(p), 0) for i, p in enumerate(paths)]
    return LocalExtents(inode, index, size, expires or time.monotonic() + 60, found)


@pytest.fixture
def blocks(tmp_path):
    paths = []
    for i in range(4):
        p = tmp_path / f"block{i}"
        p.write_bytes(bytes([i]) * 1000)
        paths.append(p)
    return paths


def test_learn_registers_a_chunk_once_and_shares_it_between_handles(blocks):
    vfs = FakeVFS()
    reads = LocalReads(vfs)
    assert vfs.on_data_changed == reads.drop
    chunks = {0: chunk(7, 0, blocks[:2]), 1: chunk(7, 1, blocks[2:])}
    vfs.files = {1: (7, chunks), 2: (7, chunks)}
    reads.learn(1, 10, 4096)
    assert reads.files_held == 2
    assert reads._by_handle[1].extents.covers(10)
    assert not reads._by_handle[1].extents.covers(1500)  # chunk 1 is not learned yet
    asked = vfs.asked
    reads.learn(1, 20, 4096)  # covered: nothing to ask
    assert vfs.asked == asked
    reads.learn(2, 1500, 4096)  # the second handle, another chunk of the same inode
    assert reads._by_handle[1] is reads._by_handle[2]
    assert reads._by_handle[1].extents.covers(1500)
    assert reads.files_held == 4
    reads.learn(1, 10, 1 << 20)  # too large a read to matter: ignored
    reads.forget(1)
    assert reads.files_held == 4  # handle 2 still reads
    reads.forget(2)
    assert reads.files_held == 0 and not reads._tables


def test_a_change_drops_the_inode_and_closes_its_files(blocks):
    vfs = FakeVFS()
    reads = LocalReads(vfs)
    vfs.files = {1: (7, {0: chunk(7, 0, blocks[:2])}), 2: (8, {0: chunk(8, 0, blocks[2:])})}
    reads.learn(1, 0, 4096)
    reads.learn(2, 0, 4096)
    table = reads._by_handle[1].extents
    vfs.on_data_changed(7)
    assert not table.valid and 1 not in reads._by_handle
    assert reads.files_held == 2  # inode 8's
    vfs.on_data_changed(None)
    assert reads.files_held == 0 and not reads._by_handle
    reads.learn(1, 0, 4096)  # learned again afterwards
    assert reads.files_held == 2
    reads.close()
    assert reads.files_held == 0 and vfs.on_data_changed is None


def test_expired_extents_are_made_again_and_a_budget_holds(blocks):
    vfs = FakeVFS()
    reads = LocalReads(vfs, fd_budget=3)
    vfs.files = {1: (7, {0: chunk(7, 0, blocks[:2], expires=time.monotonic() - 1)})}
    reads.learn(1, 0, 4096)
    old = reads._by_handle[1].extents
    vfs.files = {1: (7, {0: chunk(7, 0, blocks[:2])})}
    reads.learn(1, 0, 4096)
    assert not old.valid and reads._by_handle[1].extents is not old
    assert reads.files_held == 2
    vfs.files[2] = (8, {0: chunk(8, 0, blocks[2:])})  # two more files: over the budget
    reads.learn(2, 0, 4096)
    assert 2 not in reads._by_handle and reads.files_held == 2


def test_a_missing_block_file_leaves_the_inode_to_python(blocks, tmp_path):
    vfs = FakeVFS()
    reads = LocalReads(vfs)
    vfs.files = {1: (7, {0: chunk(7, 0, [blocks[0], tmp_path / "gone"])})}
    reads.learn(1, 0, 4096)
    assert 1 not in reads._by_handle and reads.files_held == 0
