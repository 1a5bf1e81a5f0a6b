"""Small reads of a file:// volume answered in C (cairn.fuse.extents, pyfuse3 extents patch):
right bytes, and never stale after anything changes the file, here or in another mount."""

from __future__ import annotations

import json
import os
import random

import pytest
from _mount_helpers import cairn, ok, wait_for

from cairn.fuse import extents

pytestmark = [
    pytest.mark.skipif(not extents.available(), reason="pyfuse3 without extents.patch"),
    pytest.mark.no_disk_cache,  # as `cairn mount` runs on a file:// volume
]

MiB = 1 << 20


def stats(mount) -> dict:
    return json.loads(ok(cairn("stats", str(mount.path), "--once", "--json")))


def reads_in_c(mount) -> int:
    return stats(mount)["reads_in_c"]["count"]


def pread_all(path, offsets, size=4096) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return [os.pread(fd, size, off) for off in offsets]
    finally:
        os.close(fd)


def drop_pages(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_random_reads_are_answered_in_c_with_the_right_bytes(mount):
    data = random.randbytes(9 * MiB + 12345)  # blocks of 4 MiB, a short last one
    (mount.path / "f").write_bytes(data)
    drop_pages(mount.path / "f")
    offsets = [random.randrange(0, len(data) - 1) for _ in range(400)]
    offsets += [len(data) - 100, 4 * MiB - 2048, 8 * MiB - 1]  # the end; across blocks
    got = pread_all(mount.path / "f", offsets)
    for off, chunk in zip(offsets, got, strict=True):
        assert chunk == data[off : off + 4096], off
    served = reads_in_c(mount)
    assert served > 300, served  # all but the first read of each block went to C
    snap = stats(mount)
    assert snap["fuse"]["read"]["count"] >= served  # counted as FUSE reads and store gets
    assert snap["object_store"]["get"]["count"] >= served


def test_writes_here_are_read_back_not_the_old_extents(mount):
    path = mount.path / "f"
    old = random.randbytes(6 * MiB)
    path.write_bytes(old)
    drop_pages(path)
    reader = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_RANDOM)
        for off in range(0, 6 * MiB, 256 * 1024):
            assert os.pread(reader, 4096, off) == old[off : off + 4096]
        assert reads_in_c(mount) > 0
        # Another handle of this mount overwrites the middle and grows the file.
        new = random.randbytes(MiB)
        writer = os.open(path, os.O_WRONLY)
        try:
            before = reads_in_c(mount)
            os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_DONTNEED)
            for off in (2 * MiB, 2 * MiB + 4096, 2 * MiB + 8192):  # learned again, then C
                assert os.pread(reader, 4096, off) == old[off : off + 4096]
            assert reads_in_c(mount) > before
            os.pwrite(writer, new, 2 * MiB)
            # Still open, the write only buffered: a read must see it all the same.
            os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(reader, 4096, 2 * MiB + 4096) == new[4096:8192]
            os.pwrite(writer, b"tail", 6 * MiB)
        finally:
            os.close(writer)
        os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_DONTNEED)
        for off in (2 * MiB, 2 * MiB + 8192, 3 * MiB - 4096):
            assert os.pread(reader, 4096, off) == new[off - 2 * MiB : off - 2 * MiB + 4096]
        assert os.pread(reader, 4096, MiB) == old[MiB : MiB + 4096]
        assert os.pread(reader, 4096, 6 * MiB) == b"tail"
        # Truncated shorter: nothing past the new end.
        os.truncate(path, MiB + 10)
        os.posix_fadvise(reader, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(reader, 4096, MiB) == old[MiB : MiB + 10]
        assert os.pread(reader, 4096, 2 * MiB) == b""
    finally:
        os.close(reader)


def test_another_mounts_changes_are_read_after_reopening(volume, mounts):
    a, b = mounts(volume), mounts(volume)
    old = random.randbytes(5 * MiB)
    (a.path / "f").write_bytes(old)
    offsets = list(range(0, 5 * MiB - 4096, 128 * 1024))
    assert pread_all(b.path / "f", offsets) == [old[o : o + 4096] for o in offsets]
    assert reads_in_c(b) > 0
    new = random.randbytes(5 * MiB)
    (a.path / "f").write_bytes(new)  # closed: close-to-open says b's next open sees it
    drop_pages(b.path / "f")
    assert pread_all(b.path / "f", offsets) == [new[o : o + 4096] for o in offsets]


def test_a_disk_cache_asked_for_keeps_reads_going_through_it(volume, mounts):
    m = mounts(volume, "--cache-size", "1G")  # the --cache-dir tier asked for
    data = random.randbytes(5 * MiB)
    (m.path / "f").write_bytes(data)
    offsets = list(range(0, 5 * MiB - 4096, 256 * 1024))
    assert pread_all(m.path / "f", offsets) == [data[o : o + 4096] for o in offsets]
    assert reads_in_c(m) == 0


def test_holes_read_as_zeros_and_descriptors_are_let_go(mount):
    path = mount.path / "sparse"
    with open(path, "wb") as f:
        f.write(b"a" * 4096)
        f.seek(5 * MiB)
        f.write(b"b" * 4096)
    drop_pages(path)
    offsets = [0, 4096, MiB, 5 * MiB - 4096, 5 * MiB, 0, 5 * MiB]
    got = pread_all(path, offsets)
    assert got[0] == got[5] == b"a" * 4096
    assert got[1] == got[2] == got[3] == bytes(4096)
    assert got[4] == got[6] == b"b" * 4096
    assert reads_in_c(mount) > 0
    # Closed: the block files the extents held open are closed with the last handle.
    wait_for(lambda: stats(mount)["reads_in_c"]["files_held"] == 0, 5,
             "the mount closing the block files it held for reads")  # fmt: skip
