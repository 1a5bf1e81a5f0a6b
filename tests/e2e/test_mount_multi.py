"""Two mounts of one volume (two processes, as on two nodes): close-to-open consistency,
namespace changes, and flock within one mount and across two (test_mount_locks.py has the
rest of the file locks)."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import time

import pytest
from _mount_helpers import wait_for

# As `cairn mount` runs on a file:// volume: no disk cache, small reads answered in C.
pytestmark = pytest.mark.no_disk_cache


def read_when(path, expected: bytes, timeout: float = 5) -> None:
    """Wait until path (opened afresh each time) reads as expected."""

    def matches() -> bool:
        try:
            with open(path, "rb") as f:
                return f.read() == expected
        except FileNotFoundError:
            return False

    wait_for(matches, timeout, f"{path} reading {expected[:20]!r}...")


def test_closed_files_are_seen_by_the_other_mount(volume, mounts):
    a = mounts(volume, name="a").path
    b = mounts(volume, name="b").path
    (a / "hello.txt").write_bytes(b"from a")
    read_when(b / "hello.txt", b"from a")

    # Close-to-open: a rewrite (longer, then shorter) shows at the next open in b, at once.
    for i in range(6):
        content = b"short" if i % 2 else b"rewritten by a, %d: longer than before" % i
        assert os.stat(b / "hello.txt").st_size >= 0  # b's kernel caches the attributes
        with open(a / "hello.txt", "wb") as f:
            f.write(content)
        with open(b / "hello.txt", "rb") as f:
            assert f.read() == content

    (b / "dir").mkdir()
    (b / "dir" / "from-b").write_bytes(b"x" * 100_000)
    wait_for(lambda: (a / "dir" / "from-b").exists(), 5, "b's new file in a")
    assert (a / "dir" / "from-b").read_bytes() == b"x" * 100_000

    os.rename(a / "dir" / "from-b", a / "dir" / "renamed")
    wait_for(lambda: not (b / "dir" / "from-b").exists(), 5, "the rename in b")
    assert (b / "dir" / "renamed").read_bytes() == b"x" * 100_000
    os.unlink(b / "dir" / "renamed")
    wait_for(lambda: os.listdir(a / "dir") == [], 5, "the unlink in a")


def test_appends_from_both_mounts(volume, mounts):
    a = mounts(volume, name="a").path
    b = mounts(volume, name="b").path
    (a / "log").write_bytes(b"")
    read_when(b / "log", b"")
    for i in range(5):
        for side in (a, b):
            with open(side / "log", "ab") as f:
                f.write(f"{side.name}{i}\n".encode())
    expected = b"".join(f"a{i}\nb{i}\n".encode() for i in range(5))
    with open(a / "log", "rb") as f:
        assert f.read() == expected


LOCKER = """
import fcntl, sys, time
with open(sys.argv[1], "rb") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()
"""


def _hold_lock(path):
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _release(proc) -> None:
    proc.stdin.close()
    proc.wait(timeout=10)
    proc.stdout.close()


def test_flock_excludes_within_one_mount(mnt):
    (mnt / "lockfile").write_bytes(b"")
    holder = _hold_lock(mnt / "lockfile")
    try:
        with open(mnt / "lockfile", "rb") as f:
            with pytest.raises(OSError) as info:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert info.value.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    finally:
        _release(holder)
    with open(mnt / "lockfile", "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_flock_in_one_mount_blocks_the_other(volume, mounts):
    a = mounts(volume, name="a").path
    b = mounts(volume, name="b").path
    (a / "lockfile").write_bytes(b"")
    read_when(b / "lockfile", b"")
    holder = _hold_lock(a / "lockfile")
    try:
        with open(b / "lockfile", "rb") as f:
            started = time.monotonic()
            with pytest.raises(OSError) as info:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert info.value.errno == errno.EWOULDBLOCK, time.monotonic() - started
    finally:
        _release(holder)
