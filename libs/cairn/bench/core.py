"""`cairn bench core`: Cairn's data and metadata paths against a local directory, same run.

A private redis-server and a file:// object store (both under the benchmark's temporary
directory) hold a freshly formatted volume. The same work is then timed on Cairn and on a
plain directory of the same disk:

- sequential write of one file in 1 MiB requests, ending with fsync (Cairn: every block
  stored and fsync'd by the file store, every slice committed);
- sequential read of it in 1 MiB requests with cold caches: the page cache of the local
  file and of every stored object is dropped (posix_fadvise DONTNEED after fsync) and
  Cairn reads through a fresh reader (empty block memory), so both come from the disk;
- 4 KiB reads at random aligned offsets, one at a time, cold the same way;
- create (open O_CREAT + close), stat and unlink of many empty files in one directory.

Cairn is driven through the VFS when cairn.vfs offers one, otherwise through the layers the
VFS is built on (cairn.meta.engine.Meta with cairn.chunk's ChunkWriter and ChunkReader),
which is what a FUSE request reaches after the kernel. The volume is formatted with no
compression and trash_days=0, so unlink frees at once, as on the local disk. Every read
is checked against the bytes written.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cairn.bench.data import POOL, drop_cache, drop_tree_cache, expected
from cairn.bench.data import pool as data_pool
from cairn.progress import Progress, human_bytes

MiB = 1 << 20
REQUEST = MiB  # sequential requests
SMALL = 4096  # random reads
CACHE_MEMORY = 256 * MiB  # the VFS's block cache, as `cairn mount` has it by default
CACHE_DISK = 1 << 30

Row = dict[str, Any]


# -- the two targets -----------------------------------------------------------------------


class LocalTarget:
    """Plain system calls on a directory."""

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "big"
        self.dir = root / "files"
        self.dir.mkdir(exist_ok=True)

    async def write_file(self, size: int, pool: bytes, progress: Progress) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for offset in range(0, size, REQUEST):
                length = min(REQUEST, size - offset)
                os.write(fd, expected(pool, offset, length))
                progress.advance(length)
            os.fsync(fd)
        finally:
            os.close(fd)

    def drop_caches(self) -> None:
        drop_cache(self.path)

    async def read_file(self, size: int, pool: bytes, progress: Progress) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for offset in range(0, size, REQUEST):
                length = min(REQUEST, size - offset)
                _check(os.read(fd, length), pool, offset, length, self.name)
                progress.advance(length)
        finally:
            os.close(fd)

    async def random_reads(self, size: int, offsets: list[int], pool: bytes) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for offset in offsets:
                _check(os.pread(fd, SMALL, offset), pool, offset, SMALL, self.name)
        finally:
            os.close(fd)

    async def create(self, name: str) -> None:
        os.close(os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

    async def stat(self, name: str) -> None:
        os.stat(self.dir / name)

    async def unlink(self, name: str) -> None:
        os.unlink(self.dir / name)

    async def begin(self) -> None:
        return None  # the kernel's caches are what they are; reads drop the page cache

    async def close(self) -> None:
        return None


class ChunkTarget:
    """Cairn through the metadata engine and the chunk writer/reader (the VFS's layers)."""

    name = "cairn"
    via = "metadata engine + chunk writer/reader (the layers under the VFS)"

    def __init__(self, meta: Any, store: Any, store_root: Path) -> None:
        self.meta = meta
        self.store = store
        self.store_root = store_root
        self.inode = 0
        self.dir = 0

    async def begin(self) -> None:
        return None  # every read phase makes a fresh ChunkReader (empty block memory)

    async def setup(self) -> None:
        from cairn.meta.engine import ROOT_CTX, ROOT_INODE

        await self.meta.new_session(
            {
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "mountpoint": "(cairn bench core)",
            }
        )
        self.inode, _ = await self.meta.create(ROOT_CTX, ROOT_INODE, b"big", 0o644)
        self.dir, _ = await self.meta.mkdir(ROOT_CTX, ROOT_INODE, b"files", 0o755)

    async def write_file(self, size: int, pool: bytes, progress: Progress) -> None:
        from cairn.chunk.writer import ChunkWriter

        writer = ChunkWriter(self.meta, self.store)
        handle = writer.open(self.inode)
        view = memoryview(pool)
        for offset in range(0, size, REQUEST):
            length = min(REQUEST, size - offset)
            start = offset % POOL
            if start + length <= POOL:
                await handle.write(offset, view[start : start + length])
            else:
                await handle.write(offset, expected(pool, offset, length))
            progress.advance(length)
        await handle.close()  # fsync + close: every block stored, every slice committed
        await writer.close()
        await self.meta.close(self.inode)

    def drop_caches(self) -> None:
        drop_tree_cache(self.store_root)

    async def read_file(self, size: int, pool: bytes, progress: Progress) -> None:
        from cairn.chunk.reader import ChunkReader

        reader = ChunkReader(self.meta, self.store)
        try:
            for offset in range(0, size, REQUEST):
                length = min(REQUEST, size - offset)
                data = await reader.read(self.inode, offset, length, size, handle=1)
                _check(data, pool, offset, length, self.name)
                progress.advance(length)
        finally:
            await reader.close()

    async def random_reads(self, size: int, offsets: list[int], pool: bytes) -> None:
        from cairn.chunk.reader import ChunkReader

        reader = ChunkReader(self.meta, self.store)
        try:
            for offset in offsets:
                data = await reader.read(self.inode, offset, SMALL, size, handle=2)
                _check(data, pool, offset, SMALL, self.name)
        finally:
            await reader.close()

    async def create(self, name: str) -> None:
        from cairn.meta.engine import ROOT_CTX

        inode, _ = await self.meta.create(ROOT_CTX, self.dir, name.encode(), 0o644)
        await self.meta.close(inode)

    async def stat(self, name: str) -> None:
        from cairn.meta.engine import ROOT_CTX

        await self.meta.lookup(ROOT_CTX, self.dir, name.encode())

    async def unlink(self, name: str) -> None:
        from cairn.meta.engine import ROOT_CTX

        await self.meta.unlink(ROOT_CTX, self.dir, name.encode())

    async def close(self) -> None:
        try:
            await self.meta.close_session()
        finally:
            await self.meta.close()
            await self.store.close()


class VfsTarget:
    """Cairn through cairn.vfs.VFS, as `cairn mount` serves the kernel's FUSE requests:
    a session, attribute and entry caches, and a block cache (memory and disk) in front of
    the store. Every phase runs on a fresh client with an empty block cache, as a new
    mount would, so nothing one phase cached flatters the next."""

    name = "cairn"

    def __init__(self, vfs_class: Any, meta_url: str, store_root: Path, cache_dir: Path) -> None:
        self.vfs_class = vfs_class
        self.meta_url = meta_url
        self.store_root = store_root
        self.cache_dir = cache_dir
        self.vfs: Any = None
        self.inode = 0
        self.dir = 0
        self.via = (
            f"VFS, as `cairn mount` runs it ({human_bytes(CACHE_MEMORY)} memory + "
            f"{human_bytes(CACHE_DISK)} disk block cache, emptied before each test)"
        )

    async def setup(self) -> None:
        from cairn.meta.engine import ROOT_CTX, ROOT_INODE

        await self.begin()
        self.dir = (await self.vfs.mkdir(ROOT_CTX, ROOT_INODE, b"files", 0o755)).inode

    async def begin(self) -> None:
        """A new client with empty caches."""
        if self.vfs is not None:
            vfs, self.vfs = self.vfs, None
            await vfs.close()
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.vfs = await self.vfs_class.open_volume(
            self.meta_url,
            cache_dir=str(self.cache_dir),
            cache_size=CACHE_DISK,
            cache_memory=CACHE_MEMORY,
            session_info={"mountpoint": "(cairn bench core)"},
        )

    def drop_caches(self) -> None:
        drop_tree_cache(self.store_root)

    async def write_file(self, size: int, pool: bytes, progress: Progress) -> None:
        from cairn.meta.engine import ROOT_CTX, ROOT_INODE

        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fh, attr = await self.vfs.create(ROOT_CTX, ROOT_INODE, b"big", 0o644, flags)
        self.inode = attr.inode
        view = memoryview(pool)
        try:
            for offset in range(0, size, REQUEST):
                length = min(REQUEST, size - offset)
                start = offset % POOL
                if start + length <= POOL:
                    await self.vfs.write(fh, offset, view[start : start + length])
                else:
                    await self.vfs.write(fh, offset, expected(pool, offset, length))
                progress.advance(length)
            await self.vfs.fsync(fh)
            await self.vfs.flush(fh)
        finally:
            await self.vfs.release(fh)

    async def read_file(self, size: int, pool: bytes, progress: Progress) -> None:
        from cairn.meta.engine import ROOT_CTX

        fh = await self.vfs.open(ROOT_CTX, self.inode, os.O_RDONLY)
        try:
            for offset in range(0, size, REQUEST):
                length = min(REQUEST, size - offset)
                _check(await self.vfs.read(fh, offset, length), pool, offset, length, self.name)
                progress.advance(length)
        finally:
            await self.vfs.release(fh)

    async def random_reads(self, size: int, offsets: list[int], pool: bytes) -> None:
        from cairn.meta.engine import ROOT_CTX

        fh = await self.vfs.open(ROOT_CTX, self.inode, os.O_RDONLY)
        try:
            for offset in offsets:
                _check(await self.vfs.read(fh, offset, SMALL), pool, offset, SMALL, self.name)
        finally:
            await self.vfs.release(fh)

    async def create(self, name: str) -> None:
        from cairn.meta.engine import ROOT_CTX

        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        fh, _ = await self.vfs.create(ROOT_CTX, self.dir, name.encode(), 0o644, flags)
        await self.vfs.flush(fh)  # close(2): flush, then release
        await self.vfs.release(fh)

    async def stat(self, name: str) -> None:
        from cairn.meta.engine import ROOT_CTX

        await self.vfs.lookup(ROOT_CTX, self.dir, name.encode())

    async def unlink(self, name: str) -> None:
        from cairn.meta.engine import ROOT_CTX

        await self.vfs.unlink(ROOT_CTX, self.dir, name.encode())

    async def close(self) -> None:
        if self.vfs is not None:
            vfs, self.vfs = self.vfs, None
            await vfs.close()
        shutil.rmtree(self.cache_dir, ignore_errors=True)


def vfs_class() -> Any:
    """cairn.vfs.VFS when the VFS is there (it is built beside this benchmark)."""
    try:
        from cairn.vfs import VFS
    except ImportError:
        return None
    return VFS if hasattr(VFS, "open_volume") else None


def _check(data: bytes, pool: bytes, offset: int, length: int, who: str) -> None:
    if data != expected(pool, offset, length):
        raise AssertionError(f"{who}: wrong bytes read at offset {offset} (+{length})")


# -- the run ---------------------------------------------------------------------------------


async def run(
    size: int = 1 << 30,
    files: int = 10_000,
    random_reads: int = 5000,
    local_dir: str | None = None,
    block_size: int = 4 * MiB,
    via: str = "auto",
) -> dict[str, Any]:
    """Measure; returns the settings and one row per figure (cairn, local, ratio).

    `via`: "vfs", "chunk" (the layers under the VFS), or "auto" (the VFS when there is one).
    """
    from cairn import localstack

    base, work = _workdir(local_dir)
    redis = None
    try:
        redis = localstack.start_tcp(localstack.redis_server(work / "redis"))
        cairn = await _open_cairn(redis.url, work, block_size, via)
        local = LocalTarget(work / "local")
        try:
            rows = await _measure(cairn, local, size, files, random_reads)
        finally:
            await cairn.close()
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "size": size,
        "files": files,
        "random_reads": random_reads,
        "block_size": block_size,
        "dir": str(base),
        "via": cairn.via,
        "rows": rows,
    }


def _workdir(local_dir: str | None) -> tuple[Path, Path]:
    """(the directory asked for, a fresh directory inside it for this run)."""
    from cairn.errors import ConfigError

    base = Path(local_dir or tempfile.gettempdir())
    if not base.is_dir():
        raise ConfigError(f"--dir {base}: not a directory")
    try:
        return base, Path(tempfile.mkdtemp(prefix="cairn-bench-core-", dir=base))
    except OSError as error:
        raise ConfigError(
            f"--dir {base}: cannot create a directory in it: {error.strerror}"
        ) from None


async def _open_cairn(meta_url: str, work: Path, block_size: int, via: str) -> Any:
    from cairn.errors import ConfigError
    from cairn.meta.engine import Format, Meta, format_volume
    from cairn.storage import open_store

    store_root = work / "objects"
    storage = f"file://{store_root}"
    fmt = Format(name="bench", storage=storage, block_size=block_size, trash_days=0)
    await format_volume(meta_url, fmt)
    cls = vfs_class()
    if via == "vfs" and cls is None:
        raise ConfigError("--via vfs: this installation has no cairn.vfs")
    if cls is not None and via in ("auto", "vfs"):
        target: Any = VfsTarget(cls, meta_url, store_root, work / "cache")
    else:
        target = ChunkTarget(await Meta.open(meta_url), open_store(storage), store_root)
    try:
        if isinstance(target, ChunkTarget):
            await target.store.check()
        await target.setup()
    except BaseException:
        await target.close()
        raise
    return target


async def _measure(
    cairn: Any,
    local: LocalTarget,
    size: int,
    files: int,
    random_reads: int,
) -> list[Row]:
    pool = data_pool()
    rows: list[Row] = []

    async def pair(name: str, unit: str, work: Callable[[Any], Awaitable[float]]) -> None:
        figures = {}
        for target in (cairn, local):
            await target.begin()
            figures[target.name] = await work(target)
        row = {
            "name": name,
            "unit": unit,
            "cairn": figures["cairn"],
            "local": figures["local"],
            "ratio": figures["cairn"] / figures["local"] if figures["local"] else 0.0,
        }
        rows.append(row)

    async def seq_write(target: Any) -> float:
        with Progress(f"{target.name} write", size, unit="B") as progress:
            started = time.perf_counter()
            await target.write_file(size, pool, progress)
            return size / MiB / (time.perf_counter() - started)

    async def seq_read(target: Any) -> float:
        target.drop_caches()
        with Progress(f"{target.name} read", size, unit="B") as progress:
            started = time.perf_counter()
            await target.read_file(size, pool, progress)
            return size / MiB / (time.perf_counter() - started)

    last = max(0, size - SMALL) // SMALL
    rng = random.Random(2)
    offsets = [rng.randint(0, last) * SMALL for _ in range(random_reads)]

    async def rand_read(target: Any) -> float:
        target.drop_caches()
        started = time.perf_counter()
        await target.random_reads(size, offsets, pool)
        return len(offsets) / (time.perf_counter() - started)

    names = [f"f{i:07d}" for i in range(files)]

    def meta_op(op: str) -> Callable[[Any], Awaitable[float]]:
        async def work(target: Any) -> float:
            call = getattr(target, op)
            with Progress(f"{target.name} {op}", files) as progress:
                started = time.perf_counter()
                for name in names:
                    await call(name)
                    progress.advance()
                return files / (time.perf_counter() - started)

        return work

    await pair(f"sequential write, {human_bytes(REQUEST)} requests", "MiB/s", seq_write)
    await pair(f"sequential read (cold), {human_bytes(REQUEST)} requests", "MiB/s", seq_read)
    await pair("random read 4 KiB (cold, one at a time)", "IOPS", rand_read)
    for op in ("create", "stat", "unlink"):
        await pair(f"{op} (one at a time)", "ops/s", meta_op(op))
    return rows


# -- the report --------------------------------------------------------------------------------


def header(result: dict[str, Any]) -> str:
    return (
        f"cairn bench core: {human_bytes(result['size'])} file, {result['files']:,} files, "
        f"{result['random_reads']:,} random reads; block size "
        f"{human_bytes(result['block_size'])}, no compression\n"
        f"  cairn: private redis-server + file:// store under {result['dir']}, through the "
        f"{result['via']}\n"
        f"  local: a directory under {result['dir']}"
    )


def format_row(row: Row) -> str:
    return (
        f"{row['name']:<42} {row['cairn']:>12,.1f} {row['local']:>12,.1f} "
        f"{row['unit']:<6} {row['ratio']:>8.2f}"
    )


TABLE_HEAD = f"{'test':<42} {'cairn':>12} {'local':>12} {'unit':<6} {'cairn/local':>8}"


def print_report(result: dict[str, Any]) -> None:
    print(header(result))
    print(TABLE_HEAD)
    for row in result["rows"]:
        print(format_row(row))
