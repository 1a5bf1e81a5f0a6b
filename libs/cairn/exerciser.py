"""A seeded random-operations exerciser: the same random file system operations on two
targets, compared step by step.

    result = await run(3000, seed=7, target_a=LocalDirTarget(tmp), target_b=VFSTarget(vfs))

Each step picks an operation (create, writes at random offsets through paths and through
open handles, reads, truncate, rename, link, symlink, unlink, mkdir, rmdir, chmod, utime,
xattrs, listdir, stat...) from what target A's tree holds, runs it on both targets, and
compares the answers: the value, or the errno. Every `check_every` steps, and at the end
(after closing every handle), the whole trees are compared: names, types, modes, sizes,
link counts, contents, symlink targets and user xattrs. The first difference raises
`Divergence`, naming the seed and the step, so `run(step + 1, seed, ...)` replays it.

Targets share one small async API (paths are relative to the target's root, '/'-joined):
`LocalDirTarget` does plain os calls on a directory (a FUSE mountpoint included), and
`VFSTarget` drives a cairn VFS directly, walking paths with lookups as the kernel does.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import functools
import os
import random
import stat
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from cairn.errors import FSError

KiB = 1024
MiB = 1024 * KiB
MAX_FILE = 4 * MiB  # writes stay below this offset: files of a few MiB at most
MAX_HANDLES = 4
MAX_SYMLINK_HOPS = 40
NAMES = ("a", "b", "c", "d", "e", "f", "g", "h")
XATTR_NAMES = ("user.one", "user.two", "user.three")
READ_PIECE = 1 * MiB
# fallocate(2) modes: allocate, keep size, punch a hole, zero a range
FALLOCATE_MODES = (0, 0x01, 0x02 | 0x01, 0x10, 0x10 | 0x01)


class Divergence(AssertionError):
    """The two targets answered differently."""

    def __init__(self, seed: int, step: int, op: str, detail: str, history: list[str]):
        self.seed = seed
        self.step = step
        self.op = op
        self.detail = detail
        self.history = history
        recent = "\n  ".join(history[-15:])
        super().__init__(
            f"seed {seed} step {step}: {op}: {detail}\n"
            f"replay with run({step + 1}, seed={seed}, ...); last steps:\n  {recent}"
        )


class Stat(NamedTuple):
    """What the exerciser compares of a stat result."""

    mode: int  # type and permission bits
    size: int
    nlink: int
    atime_ns: int
    mtime_ns: int


class Target(Protocol):
    """The operations the exerciser runs; failures raise OSError with an errno."""

    name: str

    async def create(self, path: str, mode: int) -> None: ...
    async def open(self, hid: int, path: str, flags: int) -> None: ...
    async def close(self, hid: int) -> None: ...
    async def pread(self, hid: int, offset: int, size: int) -> bytes: ...
    async def pwrite(self, hid: int, offset: int, data: bytes) -> int: ...
    async def ftruncate(self, hid: int, size: int) -> None: ...
    async def fsync(self, hid: int) -> None: ...
    async def fallocate(self, hid: int, mode: int, offset: int, length: int) -> None: ...
    async def copy_range(
        self, hid_in: int, off_in: int, hid_out: int, off_out: int, n: int
    ) -> int: ...
    async def read(self, path: str, offset: int, size: int) -> bytes: ...
    async def write(self, path: str, offset: int, data: bytes) -> int: ...
    async def truncate(self, path: str, size: int) -> None: ...
    async def rename(self, src: str, dst: str) -> None: ...
    async def link(self, src: str, dst: str) -> None: ...
    async def symlink(self, target: str, path: str) -> None: ...
    async def readlink(self, path: str) -> str: ...
    async def unlink(self, path: str) -> None: ...
    async def mkdir(self, path: str, mode: int) -> None: ...
    async def rmdir(self, path: str) -> None: ...
    async def chmod(self, path: str, mode: int) -> None: ...
    async def utime(self, path: str, atime_ns: int, mtime_ns: int) -> None: ...
    async def setxattr(self, path: str, name: str, value: bytes) -> None: ...
    async def getxattr(self, path: str, name: str) -> bytes: ...
    async def listxattr(self, path: str) -> list[str]: ...
    async def removexattr(self, path: str, name: str) -> None: ...
    async def listdir(self, path: str) -> list[str]: ...
    async def stat(self, path: str, follow: bool = True) -> Stat: ...
    async def close_all(self) -> None: ...


# -- a directory through the operating system ----------------------------------------------


class LocalDirTarget:
    """Plain os calls under a directory. With threaded=True each call runs in a thread, so
    a FUSE server in this process's event loop can answer it."""

    def __init__(self, root: str | os.PathLike, *, threaded: bool = False, name: str = "local"):
        self.root = os.fspath(root)
        self.threaded = threaded
        self.name = name
        self.fds: dict[int, int] = {}

    def _p(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.threaded:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def _fd(self, hid: int) -> int:
        fd = self.fds.get(hid)
        if fd is None:
            raise OSError(errno.EBADF, f"no handle {hid}")
        return fd

    async def create(self, path: str, mode: int) -> None:
        fd = await self._run(os.open, self._p(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
        os.close(fd)

    async def open(self, hid: int, path: str, flags: int) -> None:
        self.fds[hid] = await self._run(os.open, self._p(path), flags)

    async def close(self, hid: int) -> None:
        os.close(self.fds.pop(hid))

    async def pread(self, hid: int, offset: int, size: int) -> bytes:
        return await self._run(os.pread, self._fd(hid), size, offset)

    async def pwrite(self, hid: int, offset: int, data: bytes) -> int:
        return await self._run(os.pwrite, self._fd(hid), data, offset)

    async def ftruncate(self, hid: int, size: int) -> None:
        await self._run(os.ftruncate, self._fd(hid), size)

    async def fsync(self, hid: int) -> None:
        await self._run(os.fsync, self._fd(hid))

    async def fallocate(self, hid: int, mode: int, offset: int, length: int) -> None:
        await self._run(_fallocate, self._fd(hid), mode, offset, length)

    async def copy_range(self, hid_in: int, off_in: int, hid_out: int, off_out: int, n: int) -> int:
        fd_in, fd_out = self._fd(hid_in), self._fd(hid_out)
        return await self._run(os.copy_file_range, fd_in, fd_out, n, off_in, off_out)

    async def read(self, path: str, offset: int, size: int) -> bytes:
        def work() -> bytes:
            fd = os.open(self._p(path), os.O_RDONLY)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)

        return await self._run(work)

    async def write(self, path: str, offset: int, data: bytes) -> int:
        def work() -> int:
            fd = os.open(self._p(path), os.O_WRONLY)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

        return await self._run(work)

    async def truncate(self, path: str, size: int) -> None:
        await self._run(os.truncate, self._p(path), size)

    async def rename(self, src: str, dst: str) -> None:
        await self._run(os.rename, self._p(src), self._p(dst))

    async def link(self, src: str, dst: str) -> None:
        await self._run(os.link, self._p(src), self._p(dst))

    async def symlink(self, target: str, path: str) -> None:
        await self._run(os.symlink, target, self._p(path))

    async def readlink(self, path: str) -> str:
        return await self._run(os.readlink, self._p(path))

    async def unlink(self, path: str) -> None:
        await self._run(os.unlink, self._p(path))

    async def mkdir(self, path: str, mode: int) -> None:
        await self._run(os.mkdir, self._p(path), mode)

    async def rmdir(self, path: str) -> None:
        await self._run(os.rmdir, self._p(path))

    async def chmod(self, path: str, mode: int) -> None:
        await self._run(os.chmod, self._p(path), mode)

    async def utime(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        await self._run(functools.partial(os.utime, self._p(path), ns=(atime_ns, mtime_ns)))

    async def setxattr(self, path: str, name: str, value: bytes) -> None:
        await self._run(os.setxattr, self._p(path), name, value)

    async def getxattr(self, path: str, name: str) -> bytes:
        return await self._run(os.getxattr, self._p(path), name)

    async def listxattr(self, path: str) -> list[str]:
        names = await self._run(os.listxattr, self._p(path))
        return sorted(n for n in names if n.startswith("user."))

    async def removexattr(self, path: str, name: str) -> None:
        await self._run(os.removexattr, self._p(path), name)

    async def listdir(self, path: str) -> list[str]:
        return sorted(await self._run(os.listdir, self._p(path)))

    async def stat(self, path: str, follow: bool = True) -> Stat:
        st = await self._run(os.stat if follow else os.lstat, self._p(path))
        return Stat(st.st_mode, st.st_size, st.st_nlink, st.st_atime_ns, st.st_mtime_ns)

    async def close_all(self) -> None:
        for hid in list(self.fds):
            await self.close(hid)


_libc: Any = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode (os.posix_fallocate only does mode 0)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# -- a cairn VFS, driven the way the kernel drives it ----------------------------------------


class VFSTarget:
    """A cairn VFS: paths are walked with lookup (following symlinks as the kernel does),
    and what the kernel itself checks (EBADF/EINVAL on handles) is checked here."""

    def __init__(self, vfs: Any, ctx: Any = None, name: str = "vfs"):
        from cairn.meta.types import Ctx

        if ctx is None:
            umask = os.umask(0)
            os.umask(umask)
            ctx = Ctx(os.getuid(), os.getgid(), tuple(os.getgroups()), os.getpid(), umask)
        self.vfs = vfs
        self.ctx = ctx
        self.name = name
        self.handles: dict[int, tuple[int, int, int]] = {}  # hid -> (fh, inode, flags)

    async def _call(self, work: Awaitable[Any]) -> Any:
        from cairn.vfs import to_errno

        try:
            return await work
        except FSError as error:
            raise OSError(error.errno, str(error)) from None
        except OSError:
            raise
        except Exception as error:
            raise OSError(to_errno(error), f"{type(error).__name__}: {error}") from None

    async def _walk(self, path: str, follow: bool = True) -> int:
        """The inode at path (the last component's symlink followed if follow)."""
        parts = [p for p in path.split("/") if p]
        ino = 1
        hops = 0
        while parts:
            name = parts.pop(0)
            parent = ino
            attr = await self.vfs.lookup(self.ctx, ino, name.encode())
            ino = attr.inode
            if stat.S_ISLNK(attr.mode) and (parts or follow):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise OSError(errno.ELOOP, f"too many symlinks in {path}")
                target = (await self.vfs.readlink(self.ctx, ino)).decode()
                ino = 1 if target.startswith("/") else parent
                parts = [p for p in target.split("/") if p] + parts
        return ino

    async def _parent(self, path: str) -> tuple[int, bytes]:
        head, _, name = path.rpartition("/")
        return await self._walk(head), name.encode()

    def _h(self, hid: int) -> tuple[int, int, int]:
        h = self.handles.get(hid)
        if h is None:
            raise OSError(errno.EBADF, f"no handle {hid}")
        return h

    async def create(self, path: str, mode: int) -> None:
        async def work() -> None:
            parent, name = await self._parent(path)
            fh, _ = await self.vfs.create(
                self.ctx, parent, name, mode, os.O_CREAT | os.O_EXCL | os.O_WRONLY
            )
            await self.vfs.release(fh)

        await self._call(work())

    async def _open(self, path: str, flags: int) -> tuple[int, int]:
        ino = await self._walk(path)
        attr = await self.vfs.getattr(self.ctx, ino)
        if stat.S_ISDIR(attr.mode) and flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EISDIR, path)
        return await self.vfs.open(self.ctx, ino, flags), ino

    async def open(self, hid: int, path: str, flags: int) -> None:
        async def work() -> None:
            fh, ino = await self._open(path, flags)
            self.handles[hid] = (fh, ino, flags)

        await self._call(work())

    async def close(self, hid: int) -> None:
        fh, _, _ = self.handles.pop(hid)
        await self._call(self.vfs.release(fh))

    async def pread(self, hid: int, offset: int, size: int) -> bytes:
        fh, _, flags = self._h(hid)
        if flags & os.O_ACCMODE == os.O_WRONLY:
            raise OSError(errno.EBADF, "not open for reading")
        return await self._call(self.vfs.read(fh, offset, size))

    async def pwrite(self, hid: int, offset: int, data: bytes) -> int:
        fh, _, flags = self._h(hid)
        if flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "not open for writing")
        return await self._call(self.vfs.write(fh, offset, data))

    async def ftruncate(self, hid: int, size: int) -> None:
        fh, ino, flags = self._h(hid)
        if flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EINVAL, "not open for writing")
        await self._call(self.vfs.setattr(self.ctx, ino, size=size, fh=fh))

    async def fsync(self, hid: int) -> None:
        fh, _, _ = self._h(hid)
        await self._call(self.vfs.fsync(fh))

    async def fallocate(self, hid: int, mode: int, offset: int, length: int) -> None:
        fh, _, flags = self._h(hid)
        if flags & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "not open for writing")
        await self._call(self.vfs.fallocate(fh, mode, offset, length))

    async def copy_range(self, hid_in: int, off_in: int, hid_out: int, off_out: int, n: int) -> int:
        fh_in, ino_in, flags_in = self._h(hid_in)
        fh_out, ino_out, flags_out = self._h(hid_out)
        for ino in (ino_in, ino_out):
            attr = await self._call(self.vfs.getattr(self.ctx, ino))
            if stat.S_ISDIR(attr.mode):
                raise OSError(errno.EISDIR, "copy_file_range of a directory")
        if (
            flags_in & os.O_ACCMODE == os.O_WRONLY
            or flags_out & os.O_ACCMODE == os.O_RDONLY
            or flags_out & os.O_APPEND
        ):
            raise OSError(errno.EBADF, "handles not open for reading / writing (no append)")
        return await self._call(self.vfs.copy_file_range(fh_in, off_in, fh_out, off_out, n))

    async def read(self, path: str, offset: int, size: int) -> bytes:
        async def work() -> bytes:
            fh, _ = await self._open(path, os.O_RDONLY)
            try:
                return await self.vfs.read(fh, offset, size)
            finally:
                await self.vfs.release(fh)

        return await self._call(work())

    async def write(self, path: str, offset: int, data: bytes) -> int:
        async def work() -> int:
            fh, _ = await self._open(path, os.O_WRONLY)
            try:
                n = await self.vfs.write(fh, offset, data)
                await self.vfs.flush(fh)
                return n
            finally:
                await self.vfs.release(fh)

        return await self._call(work())

    async def truncate(self, path: str, size: int) -> None:
        async def work() -> None:
            ino = await self._walk(path)
            await self.vfs.setattr(self.ctx, ino, size=size)

        await self._call(work())

    async def rename(self, src: str, dst: str) -> None:
        async def work() -> None:
            sp, sname = await self._parent(src)
            dp, dname = await self._parent(dst)
            await self._rename_traps(sp, sname, dp, dname)
            await self.vfs.rename(self.ctx, sp, sname, dp, dname)

        await self._call(work())

    async def _ancestors(self, ino: int) -> list[int]:
        chain = [ino]
        while ino != 1:
            ino = (await self.vfs.lookup(self.ctx, ino, b"..")).inode
            chain.append(ino)
        return chain

    async def _rename_traps(self, sp: int, sname: bytes, dp: int, dname: bytes) -> None:
        """What Linux checks itself before a rename reaches the file system: the source
        exists, is not an ancestor of the target's directory (EINVAL), and the target is
        not an ancestor of the source's directory (ENOTEMPTY)."""
        if sp == dp:
            return
        source = (await self.vfs.lookup(self.ctx, sp, sname)).inode
        if source in await self._ancestors(dp):
            raise OSError(errno.EINVAL, "source is an ancestor of the target")
        try:
            target = (await self.vfs.lookup(self.ctx, dp, dname)).inode
        except FSError:
            return
        if target in await self._ancestors(sp):
            raise OSError(errno.ENOTEMPTY, "target is an ancestor of the source")

    async def link(self, src: str, dst: str) -> None:
        async def work() -> None:
            ino = await self._walk(src, follow=False)
            dp, dname = await self._parent(dst)
            await self.vfs.link(self.ctx, ino, dp, dname)

        await self._call(work())

    async def symlink(self, target: str, path: str) -> None:
        async def work() -> None:
            parent, name = await self._parent(path)
            await self.vfs.symlink(self.ctx, parent, name, target.encode())

        await self._call(work())

    async def readlink(self, path: str) -> str:
        async def work() -> str:
            ino = await self._walk(path, follow=False)
            return (await self.vfs.readlink(self.ctx, ino)).decode()

        return await self._call(work())

    async def unlink(self, path: str) -> None:
        async def work() -> None:
            parent, name = await self._parent(path)
            await self.vfs.unlink(self.ctx, parent, name)

        await self._call(work())

    async def mkdir(self, path: str, mode: int) -> None:
        async def work() -> None:
            parent, name = await self._parent(path)
            await self.vfs.mkdir(self.ctx, parent, name, mode)

        await self._call(work())

    async def rmdir(self, path: str) -> None:
        async def work() -> None:
            parent, name = await self._parent(path)
            await self.vfs.rmdir(self.ctx, parent, name)

        await self._call(work())

    async def chmod(self, path: str, mode: int) -> None:
        async def work() -> None:
            await self.vfs.setattr(self.ctx, await self._walk(path), mode=mode)

        await self._call(work())

    async def utime(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        async def work() -> None:
            ino = await self._walk(path)
            await self.vfs.setattr(self.ctx, ino, atime=atime_ns, mtime=mtime_ns)

        await self._call(work())

    async def setxattr(self, path: str, name: str, value: bytes) -> None:
        async def work() -> None:
            await self.vfs.setxattr(self.ctx, await self._walk(path), name.encode(), value)

        await self._call(work())

    async def getxattr(self, path: str, name: str) -> bytes:
        async def work() -> bytes:
            return await self.vfs.getxattr(self.ctx, await self._walk(path), name.encode())

        return await self._call(work())

    async def listxattr(self, path: str) -> list[str]:
        async def work() -> list[str]:
            names = await self.vfs.listxattr(self.ctx, await self._walk(path))
            return sorted(n.decode() for n in names if n.startswith(b"user."))

        return await self._call(work())

    async def removexattr(self, path: str, name: str) -> None:
        async def work() -> None:
            await self.vfs.removexattr(self.ctx, await self._walk(path), name.encode())

        await self._call(work())

    async def listdir(self, path: str) -> list[str]:
        async def work() -> list[str]:
            dh = await self.vfs.opendir(self.ctx, await self._walk(path))
            names: list[str] = []
            try:
                offset = 0
                while entries := await self.vfs.readdir(dh, offset):
                    names.extend(e.name.decode() for e in entries if e.name not in (b".", b".."))
                    offset = entries[-1].next_offset
            finally:
                await self.vfs.releasedir(dh)
            return sorted(names)

        return await self._call(work())

    async def stat(self, path: str, follow: bool = True) -> Stat:
        async def work() -> Stat:
            attr = await self.vfs.getattr(self.ctx, await self._walk(path, follow))
            return Stat(attr.mode, attr.size, attr.nlink, attr.atime, attr.mtime)

        return await self._call(work())

    async def close_all(self) -> None:
        for hid in list(self.handles):
            await self.close(hid)


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Result:
    steps: int
    seed: int
    ops: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # errno answers both targets agreed on
    checks: int = 0


@dataclass
class _Tree:
    """Target A's namespace at the start of a step (lstat types)."""

    dirs: list[str]
    files: list[str]
    links: list[str]

    @property
    def all(self) -> list[str]:
        return self.dirs[1:] + self.files + self.links


async def _scan(target: Target) -> _Tree:
    dirs, files, links = [""], [], []
    todo = [""]
    while todo:
        d = todo.pop()
        try:
            names = await target.listdir(d)
        except OSError:
            continue
        for n in names:
            path = f"{d}/{n}" if d else n
            try:
                st = await target.stat(path, follow=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.mode):
                dirs.append(path)
                todo.append(path)
            elif stat.S_ISLNK(st.mode):
                links.append(path)
            else:
                files.append(path)
    return _Tree(sorted(dirs), sorted(files), sorted(links))


def _norm_stat(st: Stat, times: bool = False) -> tuple:
    """What must match: type and permissions, size (not of directories), link count; the
    times only right after they were set explicitly."""
    kind = stat.S_IFMT(st.mode)
    size = None if kind == stat.S_IFDIR else st.size
    out: tuple = (oct(st.mode), size, st.nlink)
    if times:
        out += (st.atime_ns, st.mtime_ns)
    return out


class _Runner:
    def __init__(
        self, seed: int, a: Target, b: Target, check_every: int, xattrs: bool, symlinks: bool
    ):
        self.rng = random.Random(seed)
        self.seed = seed
        self.a = a
        self.b = b
        self.check_every = check_every
        self.xattrs = xattrs
        self.symlinks = symlinks
        self.result = Result(0, seed)
        self.history: list[str] = []
        self.handles: dict[int, str] = {}  # open handle id -> path it was opened by
        self.next_hid = 1
        self.step = 0

    # -- picking ------------------------------------------------------------------------

    def _new_path(self, tree: _Tree) -> str:
        d = self.rng.choice(tree.dirs)
        n = self.rng.choice(NAMES)
        return f"{d}/{n}" if d else n

    def _any_path(self, tree: _Tree, pool: list[str] | None = None) -> str:
        pool = tree.all if pool is None else pool
        if pool and self.rng.random() < 0.85:
            return self.rng.choice(pool)
        return self._new_path(tree)

    def _file(self, tree: _Tree) -> str:
        return self._any_path(tree, tree.files or tree.links)

    def _data(self) -> bytes:
        r = self.rng.random()
        if r < 0.55:
            n = self.rng.randint(1, 4 * KiB)
        elif r < 0.9:
            n = self.rng.randint(1, 64 * KiB)
        else:
            n = self.rng.randint(64 * KiB, 256 * KiB)
        return self.rng.randbytes(n)

    def _offset(self, size_hint: int, n: int) -> int:
        r = self.rng.random()
        if r < 0.45:
            off = self.rng.randint(0, max(0, size_hint))
        elif r < 0.75:
            off = size_hint
        else:
            off = self.rng.randint(0, MAX_FILE - n)
        return max(0, min(off, MAX_FILE - n))

    async def _size_hint(self, path: str) -> int:
        try:
            return (await self.a.stat(path)).size
        except OSError:
            return 0

    # -- running ------------------------------------------------------------------------

    async def both(self, label: str, fa: Awaitable[Any], fb: Awaitable[Any]) -> Any:
        """Runs one operation on A then B and compares the answers."""
        ra = await _outcome(fa)
        rb = await _outcome(fb)
        self.history.append(f"{self.step}: {label} -> {_short(ra)}")
        if ra != rb:
            raise Divergence(
                self.seed,
                self.step,
                label,
                f"{self.a.name} answered {_short(ra)}, {self.b.name} answered {_short(rb)}",
                self.history,
            )
        if ra[0] == "err":
            self.result.errors[errno.errorcode.get(ra[1], str(ra[1]))] += 1
        return ra

    def _call(self, method: str, *args: Any) -> tuple[Awaitable[Any], Awaitable[Any]]:
        return getattr(self.a, method)(*args), getattr(self.b, method)(*args)

    async def _plain(self, label: str, method: str, *args: Any) -> Any:
        return await self.both(label, *self._call(method, *args))

    async def one_step(self) -> None:
        tree = await _scan(self.a)
        ops = self._ops()
        name = self.rng.choices([o[0] for o in ops], [o[1] for o in ops])[0]
        self.result.ops[name] += 1
        await getattr(self, f"op_{name}")(tree)

    def _ops(self) -> list[tuple[str, int]]:
        ops = [
            ("create", 8), ("write", 10), ("read", 8), ("truncate", 4), ("rename", 5),
            ("link", 3), ("unlink", 4), ("mkdir", 3), ("rmdir", 2), ("chmod", 3),
            ("utime", 2), ("listdir", 3), ("stat", 4), ("open", 5),
        ]  # fmt: skip
        if self.symlinks:
            ops += [("symlink", 2), ("readlink", 1)]
        if self.xattrs:
            ops += [("setxattr", 2), ("getxattr", 2), ("listxattr", 1), ("removexattr", 1)]
        if self.handles:
            ops += [("hwrite", 14), ("hread", 8), ("hclose", 4), ("hftruncate", 2), ("hfsync", 1),
                    ("hfallocate", 2), ("hcopy", 2)]  # fmt: skip
        return ops

    async def op_create(self, tree: _Tree) -> None:
        path = self._new_path(tree) if self.rng.random() < 0.8 else self._any_path(tree)
        mode = self.rng.choice((0o644, 0o600, 0o755, 0o444))
        await self._plain(f"create {path} {mode:o}", "create", path, mode)

    async def op_write(self, tree: _Tree) -> None:
        path = self._file(tree)
        data = self._data()
        off = self._offset(await self._size_hint(path), len(data))
        await self._plain(f"write {path} @{off} +{len(data)}", "write", path, off, data)

    async def op_read(self, tree: _Tree) -> None:
        path = self._file(tree) if self.rng.random() < 0.9 else self._any_path(tree)
        size = await self._size_hint(path)
        off = self.rng.randint(0, size + 10)
        n = self.rng.randint(0, 300 * KiB)
        await self._plain(f"read {path} @{off} +{n}", "read", path, off, n)

    async def op_truncate(self, tree: _Tree) -> None:
        path = self._file(tree)
        size = self.rng.choice((0, self.rng.randint(0, 300 * KiB), self.rng.randint(0, MAX_FILE)))
        await self._plain(f"truncate {path} {size}", "truncate", path, size)

    async def op_rename(self, tree: _Tree) -> None:
        src = self._any_path(tree)
        dst = self._any_path(tree) if self.rng.random() < 0.4 else self._new_path(tree)
        await self._plain(f"rename {src} {dst}", "rename", src, dst)

    async def op_link(self, tree: _Tree) -> None:
        src = self._any_path(tree, tree.files)
        dst = self._new_path(tree)
        await self._plain(f"link {src} {dst}", "link", src, dst)

    async def op_symlink(self, tree: _Tree) -> None:
        # Relative targets that never climb out of the root: a sibling name or a path down.
        target = self.rng.choice(NAMES)
        if self.rng.random() < 0.3 and tree.dirs[1:]:
            target = f"{self.rng.choice(NAMES)}/{target}"
        path = self._new_path(tree)
        await self._plain(f"symlink {target} {path}", "symlink", target, path)

    async def op_readlink(self, tree: _Tree) -> None:
        path = self._any_path(tree, tree.links)
        await self._plain(f"readlink {path}", "readlink", path)

    async def op_unlink(self, tree: _Tree) -> None:
        path = self._any_path(tree, tree.files + tree.links)
        await self._plain(f"unlink {path}", "unlink", path)

    async def op_mkdir(self, tree: _Tree) -> None:
        path = self._new_path(tree)
        mode = self.rng.choice((0o755, 0o700, 0o777, 0o2755))
        await self._plain(f"mkdir {path} {mode:o}", "mkdir", path, mode)

    async def op_rmdir(self, tree: _Tree) -> None:
        path = self._any_path(tree, tree.dirs[1:])
        await self._plain(f"rmdir {path}", "rmdir", path)

    async def op_chmod(self, tree: _Tree) -> None:
        path = self._any_path(tree)
        mode = self.rng.choice((0o644, 0o600, 0o755, 0o444, 0o4755, 0o2755, 0o6775, 0o1777, 0o700))
        await self._plain(f"chmod {path} {mode:o}", "chmod", path, mode)
        await self._stat(path, follow=True)

    async def op_utime(self, tree: _Tree) -> None:
        path = self._any_path(tree)
        atime = self.rng.randint(10**18, 17 * 10**17 + 10**18 // 2)
        mtime = self.rng.randint(10**18, 17 * 10**17 + 10**18 // 2)
        await self._plain(f"utime {path}", "utime", path, atime, mtime)
        await self._stat(path, follow=True, times=True)

    async def op_setxattr(self, tree: _Tree) -> None:
        path = self._any_path(tree, tree.files + tree.dirs[1:])
        name = self.rng.choice(XATTR_NAMES)
        value = self.rng.randbytes(self.rng.randint(0, 64))
        await self._plain(f"setxattr {path} {name}", "setxattr", path, name, value)

    async def op_getxattr(self, tree: _Tree) -> None:
        path = self._any_path(tree, tree.files + tree.dirs[1:])
        name = self.rng.choice(XATTR_NAMES)
        await self._plain(f"getxattr {path} {name}", "getxattr", path, name)

    async def op_listxattr(self, tree: _Tree) -> None:
        path = self._any_path(tree)
        await self._plain(f"listxattr {path}", "listxattr", path)

    async def op_removexattr(self, tree: _Tree) -> None:
        path = self._any_path(tree, tree.files + tree.dirs[1:])
        name = self.rng.choice(XATTR_NAMES)
        await self._plain(f"removexattr {path} {name}", "removexattr", path, name)

    async def op_listdir(self, tree: _Tree) -> None:
        path = self._any_path(tree, tree.dirs) if self.rng.random() < 0.9 else self._file(tree)
        await self._plain(f"listdir {path!r}", "listdir", path)

    async def op_stat(self, tree: _Tree) -> None:
        await self._stat(self._any_path(tree), follow=self.rng.random() < 0.5)

    async def _stat(self, path: str, follow: bool, times: bool = False) -> None:
        ra = await _outcome(self.a.stat(path, follow))
        rb = await _outcome(self.b.stat(path, follow))
        na = ("ok", _norm_stat(ra[1], times)) if ra[0] == "ok" else ra
        nb = ("ok", _norm_stat(rb[1], times)) if rb[0] == "ok" else rb
        await self.both(f"stat {path} follow={follow}", _const(na), _const(nb))

    async def op_open(self, tree: _Tree) -> None:
        if len(self.handles) >= MAX_HANDLES:
            await self.op_hclose(tree)
            return
        path = self._file(tree) if self.rng.random() < 0.9 else self._any_path(tree)
        flags = self.rng.choice((os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR, os.O_RDWR))
        if flags != os.O_RDONLY and self.rng.random() < 0.2:
            flags |= os.O_APPEND
        if flags != os.O_RDONLY and self.rng.random() < 0.08:
            flags |= os.O_TRUNC
        hid = self.next_hid
        self.next_hid += 1
        r = await self._plain(f"open #{hid} {path} {flags:#o}", "open", hid, path, flags)
        if r[0] == "ok":
            self.handles[hid] = path

    def _hid(self) -> int:
        return self.rng.choice(sorted(self.handles))

    async def op_hclose(self, tree: _Tree) -> None:
        hid = self._hid()
        del self.handles[hid]
        await self._plain(f"close #{hid}", "close", hid)

    async def op_hwrite(self, tree: _Tree) -> None:
        hid = self._hid()
        data = self._data()
        off = self._offset(await self._size_hint(self.handles[hid]), len(data))
        await self._plain(f"pwrite #{hid} @{off} +{len(data)}", "pwrite", hid, off, data)

    async def op_hread(self, tree: _Tree) -> None:
        hid = self._hid()
        size = await self._size_hint(self.handles[hid])
        off = self.rng.randint(0, size + 10)
        n = self.rng.randint(0, 300 * KiB)
        await self._plain(f"pread #{hid} @{off} +{n}", "pread", hid, off, n)

    async def op_hftruncate(self, tree: _Tree) -> None:
        hid = self._hid()
        size = self.rng.choice((0, self.rng.randint(0, 300 * KiB), self.rng.randint(0, MAX_FILE)))
        await self._plain(f"ftruncate #{hid} {size}", "ftruncate", hid, size)

    async def op_hfallocate(self, tree: _Tree) -> None:
        hid = self._hid()
        mode = self.rng.choice(FALLOCATE_MODES)
        size = await self._size_hint(self.handles[hid])
        offset = self.rng.randint(0, size + 100 * KiB)
        length = self.rng.randint(1, 200 * KiB)
        await self._plain(
            f"fallocate #{hid} {mode:#x} @{offset} +{length}",
            "fallocate",
            hid,
            mode,
            offset,
            length,
        )

    async def op_hcopy(self, tree: _Tree) -> None:
        hin, hout = self._hid(), self._hid()
        size = await self._size_hint(self.handles[hin])
        off_in = self.rng.randint(0, size + 10)
        n = self.rng.randint(1, 300 * KiB)
        off_out = self._offset(await self._size_hint(self.handles[hout]), n)
        await self._plain(
            f"copy_file_range #{hin} @{off_in} -> #{hout} @{off_out} +{n}",
            "copy_range", hin, off_in, hout, off_out, n,
        )  # fmt: skip

    async def op_hfsync(self, tree: _Tree) -> None:
        hid = self._hid()
        await self._plain(f"fsync #{hid}", "fsync", hid)

    # -- whole-tree comparison --------------------------------------------------------------

    async def check_trees(self, label: str) -> None:
        self.result.checks += 1
        ta, tb = await _scan(self.a), await _scan(self.b)
        if (ta.dirs, ta.files, ta.links) != (tb.dirs, tb.files, tb.links):
            raise Divergence(
                self.seed, self.step, label,
                f"trees differ: {self.a.name} {ta} / {self.b.name} {tb}", self.history,
            )  # fmt: skip
        for path in ta.all:
            await self._stat(path, follow=False)
        for path in ta.links:
            await self._plain(f"{label}: readlink {path}", "readlink", path)
        for path in ta.files:
            await self._compare_content(label, path)
        if self.xattrs:
            for path in ta.files + ta.dirs[1:]:
                r = await self._plain(f"{label}: listxattr {path}", "listxattr", path)
                for name in r[1] if r[0] == "ok" else []:
                    await self._plain(f"{label}: getxattr {path} {name}", "getxattr", path, name)

    async def _compare_content(self, label: str, path: str) -> None:
        st = await _outcome(self.a.stat(path, follow=False))
        size = st[1].size if st[0] == "ok" else 0
        offset = 0
        while True:
            r = await self._plain(
                f"{label}: read {path} @{offset}", "read", path, offset, READ_PIECE
            )
            if r[0] != "ok" or len(r[1]) < READ_PIECE or offset >= size:
                return
            offset += READ_PIECE


async def _outcome(work: Awaitable[Any]) -> tuple[str, Any]:
    try:
        return ("ok", await work)
    except OSError as error:
        return ("err", error.errno)


async def _const(value: Any) -> Any:
    if value[0] == "err":
        raise OSError(value[1], os.strerror(value[1]))
    return value[1]


def _short(r: tuple[str, Any]) -> str:
    kind, value = r
    if kind == "err":
        return errno.errorcode.get(value, str(value))
    if isinstance(value, bytes | bytearray):
        return f"{len(value)} bytes" + (f" {bytes(value[:16]).hex()}..." if value else "")
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


async def run(
    steps: int,
    seed: int,
    target_a: Target,
    target_b: Target,
    *,
    check_every: int = 100,
    xattrs: bool = True,
    symlinks: bool = True,
) -> Result:
    """Runs `steps` random operations on both targets (which start empty); raises
    Divergence at the first difference. Target A drives the choices (keep the reference,
    e.g. a local directory, as A). Handles are closed and the trees compared at the end."""
    runner = _Runner(seed, target_a, target_b, check_every, xattrs, symlinks)
    for step in range(steps):
        runner.step = step
        await runner.one_step()
        runner.result.steps = step + 1
        if check_every and (step + 1) % check_every == 0:
            await runner.check_trees(f"check after step {step}")
    runner.step = steps
    for hid in sorted(runner.handles):
        await runner._plain(f"close #{hid}", "close", hid)
    runner.handles.clear()
    await runner.check_trees("final check")
    return runner.result


def main(argv: list[str] | None = None) -> int:
    """`python -m cairn.exerciser DIR_A DIR_B`: compare two directories (e.g. a local one
    and a Cairn mountpoint), both empty at the start."""
    parser = argparse.ArgumentParser(prog="python -m cairn.exerciser", description=main.__doc__)
    parser.add_argument("dir_a")
    parser.add_argument("dir_b")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--check-every", type=int, default=100)
    parser.add_argument("--no-xattrs", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(
            run(
                args.steps,
                args.seed,
                LocalDirTarget(args.dir_a, threaded=True, name=args.dir_a),
                LocalDirTarget(args.dir_b, threaded=True, name=args.dir_b),
                check_every=args.check_every,
                xattrs=not args.no_xattrs,
            )
        )
    except Divergence as error:
        print(error, file=sys.stderr)
        return 1
    print(f"{result.steps} steps, seed {result.seed}: no difference ({dict(result.ops)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
