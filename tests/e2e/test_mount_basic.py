"""System calls through a real FUSE mount: what they return, and the errno when they fail."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pyfuse3
import pytest

from cairn.errors import (
    ConflictError,
    DeadlineExceeded,
    FSError,
    InvalidArgument,
    UnavailableError,
)
from cairn.fuse.operations import Operations

CHUNK = 64 << 20


def err(fn, *args) -> int:
    """The errno fn(*args) fails with (the test fails if it succeeds)."""
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def test_mount_table_names_the_volume(mount):
    with open("/proc/self/mounts") as f:
        line = next(entry for entry in f if f" {mount.path} " in entry)
    source, _, kind, options = line.split()[:4]
    assert source == "cairn:vol"
    assert kind == "fuse.cairn"
    assert "default_permissions" in options


def test_the_mount_runs_cairns_pyfuse3_loop(mount):
    """third_party/pyfuse3/loop.patch is in the build: the mount reads its FUSE device
    non-blocking (and answers requests through it, as every other test shows)."""
    flags = None
    for fd in os.listdir(f"/proc/{mount.pid}/fd"):
        if os.readlink(f"/proc/{mount.pid}/fd/{fd}") == "/dev/fuse":
            with open(f"/proc/{mount.pid}/fdinfo/{fd}") as info:
                flags = int(next(x for x in info if x.startswith("flags:")).split()[1], 8)
    assert flags is not None, "no /dev/fuse descriptor in the mount process"
    assert flags & os.O_NONBLOCK


def test_files_read_write_and_stat(mnt):
    p = mnt / "a.txt"
    write_file(p, b"hello world")
    assert p.read_bytes() == b"hello world"
    st = os.stat(p)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert st.st_size == 11 and st.st_nlink == 1 and st.st_uid == os.getuid()
    assert st.st_blocks == 8  # one 4 KiB page

    fd = os.open(p, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"WORLD", 6) == 5
        assert os.pread(fd, 100, 0) == b"hello WORLD"
        assert os.pread(fd, 100, 50) == b""  # past the end
        os.ftruncate(fd, 5)
        assert os.fstat(fd).st_size == 5
    finally:
        os.close(fd)
    assert p.read_bytes() == b"hello"

    with open(p, "ab") as f:  # O_APPEND
        f.write(b"+tail")
    assert p.read_bytes() == b"hello+tail"

    os.truncate(p, 0)
    assert p.read_bytes() == b""


def test_sparse_files_and_chunk_boundaries(mnt):
    p = mnt / "sparse"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"end", 10 << 20)
        os.pwrite(fd, b"across", CHUNK - 3)  # straddles the first chunk's end
        os.fsync(fd)
        assert os.fstat(fd).st_size == CHUNK + 3
        assert os.pread(fd, 4, 0) == b"\0" * 4  # a hole reads as zeros
        assert os.pread(fd, 5, (10 << 20) - 1) == b"\0end\0"
        assert os.pread(fd, 6, CHUNK - 3) == b"across"
    finally:
        os.close(fd)
    assert os.stat(p).st_size == CHUNK + 3


def test_create_exclusive_and_type_errors(mnt):
    p = mnt / "f"
    write_file(p, b"x")
    assert err(os.open, p, os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    assert err(os.open, mnt / "missing", os.O_RDONLY) == errno.ENOENT
    assert err(os.mkdir, p / "sub") == errno.ENOTDIR
    assert err(os.open, p / "x", os.O_RDONLY) == errno.ENOTDIR
    os.mkdir(mnt / "d")
    assert err(os.open, mnt / "d", os.O_WRONLY) == errno.EISDIR
    assert err(os.unlink, mnt / "d") == errno.EISDIR
    assert err(os.rmdir, p) == errno.ENOTDIR
    assert err(os.mkdir, mnt / "d") == errno.EEXIST
    assert err(os.open, mnt / ("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    assert err(os.unlink, mnt / "missing") == errno.ENOENT


def test_directories(mnt):
    os.makedirs(mnt / "a" / "b" / "c")
    (mnt / "a" / "b" / "c" / "f").write_bytes(b"1")
    assert os.stat(mnt / "a").st_nlink == 3  # ".", "a" in the root, "b"'s ".."
    assert err(os.rmdir, mnt / "a" / "b") == errno.ENOTEMPTY
    os.unlink(mnt / "a" / "b" / "c" / "f")
    os.rmdir(mnt / "a" / "b" / "c")
    os.rmdir(mnt / "a" / "b")
    assert os.listdir(mnt / "a") == []
    assert err(os.rmdir, mnt / "a" / "b") == errno.ENOENT


def test_readdir_of_a_big_directory(mnt):
    d = mnt / "big"
    d.mkdir()
    names = {f"file-{i:05d}-{'x' * 40}" for i in range(2500)}  # > one engine page, many replies
    for name in names:
        os.close(os.open(d / name, os.O_CREAT | os.O_WRONLY, 0o644))
    assert set(os.listdir(d)) == names
    with os.scandir(d) as it:
        entries = {e.name: e for e in it}
    assert set(entries) == names
    assert all(e.is_file() for e in entries.values())
    out = subprocess.run(["ls", "-a", str(d)], capture_output=True, text=True, check=True)
    assert out.stdout.split()[:2] == [".", ".."]


def test_rename(mnt):
    write_file(mnt / "a", b"A")
    write_file(mnt / "b", b"B")
    os.rename(mnt / "a", mnt / "b")  # replaces b
    assert not (mnt / "a").exists()
    assert (mnt / "b").read_bytes() == b"A"
    os.mkdir(mnt / "d1")
    os.mkdir(mnt / "d2")
    write_file(mnt / "d2" / "x", b"x")
    assert err(os.rename, mnt / "d1", mnt / "d2") == errno.ENOTEMPTY
    assert err(os.rename, mnt / "d1", mnt / "d1" / "inside") == errno.EINVAL
    assert err(os.rename, mnt / "b", mnt / "d1") == errno.EISDIR
    os.rename(mnt / "b", mnt / "d1" / "b")
    assert (mnt / "d1" / "b").read_bytes() == b"A"
    os.rename(mnt / "d1", mnt / "d3")
    assert (mnt / "d3" / "b").read_bytes() == b"A"


def _renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, bytes(old), at_fdcwd, bytes(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_rename_noreplace_and_exchange(mnt):
    write_file(mnt / "a", b"A")
    write_file(mnt / "b", b"B")
    assert err(_renameat2, mnt / "a", mnt / "b", 1) == errno.EEXIST  # RENAME_NOREPLACE
    _renameat2(mnt / "a", mnt / "b", 2)  # RENAME_EXCHANGE
    assert (mnt / "a").read_bytes() == b"B"
    assert (mnt / "b").read_bytes() == b"A"


def test_links(mnt):
    write_file(mnt / "f", b"data")
    os.link(mnt / "f", mnt / "g")
    assert os.stat(mnt / "f").st_nlink == 2
    assert os.stat(mnt / "f").st_ino == os.stat(mnt / "g").st_ino
    os.unlink(mnt / "f")
    assert (mnt / "g").read_bytes() == b"data"
    assert os.stat(mnt / "g").st_nlink == 1
    os.symlink("g", mnt / "s")
    assert os.readlink(mnt / "s") == "g"
    assert os.lstat(mnt / "s").st_size == 1
    assert (mnt / "s").read_bytes() == b"data"
    os.symlink("nowhere", mnt / "dangling")
    assert err(os.stat, mnt / "dangling") == errno.ENOENT
    assert err(os.symlink, "g", mnt / "s") == errno.EEXIST
    assert err(os.link, mnt / "missing", mnt / "h") == errno.ENOENT


def test_unlinked_open_file_stays_readable(mnt):
    p = mnt / "tmp"
    write_file(p, b"still here")
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert not p.exists()
        assert os.pread(fd, 100, 0) == b"still here"
        os.pwrite(fd, b"STILL", 0)
        assert os.pread(fd, 100, 0) == b"STILL here"
    finally:
        os.close(fd)


def test_attributes(mnt):
    p = mnt / "f"
    write_file(p, b"x")
    os.chmod(p, 0o4751)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4751
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(p, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(p)
    assert st.st_atime_ns == 1_000_000_123 and st.st_mtime_ns == 2_000_000_456
    before = os.stat(p).st_mtime_ns
    time.sleep(0.01)
    with open(p, "r+b") as f:
        f.write(b"y")
    assert os.stat(p).st_mtime_ns > before
    os.utime(p)  # "now"
    assert abs(os.stat(p).st_mtime - time.time()) < 5


def test_xattrs(mnt):
    p = mnt / "f"
    write_file(p, b"x")
    os.setxattr(p, "user.color", b"blue")
    assert os.getxattr(p, "user.color") == b"blue"
    assert "user.color" in os.listxattr(p)
    assert err(os.setxattr, p, "user.color", b"red", os.XATTR_CREATE) == errno.EEXIST
    assert err(os.setxattr, p, "user.size", b"1", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(p, "user.color", b"red", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.color") == b"red"
    os.removexattr(p, "user.color")
    assert err(os.getxattr, p, "user.color") == errno.ENODATA
    assert err(os.removexattr, p, "user.color") == errno.ENODATA
    assert os.listxattr(p) == []
    # POSIX ACLs are not supported (tools fall back to the mode bits).
    acl = b"\2\0\0\0\1\0\6\0\377\377\377\377\4\0\4\0\377\377\377\377 \0\4\0\377\377\377\377"
    assert err(os.setxattr, p, "system.posix_acl_access", acl) == errno.EOPNOTSUPP
    # ...nor file capabilities (the kernel asks for them before every write).
    assert err(os.getxattr, p, "security.capability") == errno.ENODATA
    cap = b"\0\0\0\2" + b"\0" * 16  # a valid (empty) v2 capability set
    assert err(os.setxattr, p, "security.capability", cap) == errno.EOPNOTSUPP


def test_statfs(mnt):
    write_file(mnt / "f", b"x" * 10000)
    st = os.statvfs(mnt)
    assert st.f_namemax == 255
    assert st.f_blocks > 0 and st.f_bavail <= st.f_blocks
    assert st.f_files >= 2


def test_permissions_are_enforced_for_other_users(volume, mounts):
    mnt = mounts(volume, "--allow-other").path  # without it FUSE turns every other user away
    secret = mnt / "secret"
    write_file(secret, b"top", mode=0o600)
    os.chmod(mnt, 0o777)
    shared = mnt / "shared"
    write_file(shared, b"open", mode=0o644)

    # Relative paths from a working directory inside the mount: the directories above
    # the mountpoint (pytest's tmp dirs) are root's alone.
    probe = (
        "import os\n"
        "def code(fn, *a):\n"
        "    try:\n        fn(*a)\n        return 0\n"
        "    except OSError as e:\n        return e.errno\n"
        "print(code(lambda: open('secret', 'rb').read()),"
        " code(lambda: open('shared', 'rb').read()),"
        " code(lambda: open('shared', 'ab')),"
        " code(os.chmod, 'shared', 0o777),"
        " code(lambda: open('mine', 'wb').close()))"
    )
    result = subprocess.run(
        ["python3", "-c", probe], capture_output=True, text=True, timeout=30, cwd=mnt,
        user=65534, group=65534, extra_groups=[], check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(errno.EACCES), "0", str(errno.EACCES),
                                     str(errno.EPERM), "0"]  # fmt: skip
    assert os.stat(mnt / "mine").st_uid == 65534


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_fallocate_is_not_supported(mnt):
    # pyfuse3 has no fallocate handler: the kernel answers EOPNOTSUPP itself (glibc's
    # posix_fallocate then falls back to writing zeros).
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert err(_fallocate, fd, 0, 0, 4096) == errno.EOPNOTSUPP
        os.posix_fallocate(fd, 0, 4096)
        assert os.fstat(fd).st_size == 4096
    finally:
        os.close(fd)


def test_many_small_files_survive_a_remount(volume, mounts):
    first = mounts(volume, name="first")
    for i in range(200):
        write_file(first.path / f"f{i}", f"content {i}".encode())
    out = subprocess.run(["fusermount3", "-u", str(first.path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    second = mounts(volume, name="second")
    for i in range(200):
        assert (second.path / f"f{i}").read_bytes() == f"content {i}".encode()


# -- the error mapping of the handlers, in-process (a VFS that fails on purpose) -----------


class _FailingVFS:
    attr_ttl = 1.0

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def entry_ttl_for(self, attr) -> float:
        return 1.0

    async def getattr(self, ctx, inode, fh=None):
        raise self.error

    async def forget(self, inodes) -> None:
        raise self.error


class _Request:
    uid, gid, pid, umask = 0, 0, 0, 0o022


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (FSError(errno.ENOENT), errno.ENOENT),
        (FSError(errno.EDQUOT), errno.EDQUOT),
        (UnavailableError("redis down"), errno.EIO),
        (DeadlineExceeded("gave up"), errno.EIO),
        (ConflictError("kept conflicting"), errno.EIO),
        (InvalidArgument("bad"), errno.EINVAL),
        (RuntimeError("a bug"), errno.EIO),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
async def test_handlers_raise_only_fuse_errors(error, expected, caplog):
    ops = Operations(_FailingVFS(error))
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getattr(1, _Request())
    assert info.value.errno == expected
    if isinstance(error, RuntimeError):
        assert "Traceback" in caplog.text and "a bug" in caplog.text
    await ops.forget([(5, 1)])  # no reply to carry an error: it is logged, never raised
