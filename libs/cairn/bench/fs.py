"""`cairn bench fs`: a Cairn mount against a plain local directory, through system calls.

Unlike `cairn bench core` (which calls the VFS in-process), this goes through the kernel and
FUSE exactly as applications do. The same work runs in a directory on a Cairn mount (DIR, or
a mount the benchmark makes itself) and in a local directory, in the same run:

- sequential write of one file in 1 MiB requests, ending with fsync;
- sequential read of it in 1 MiB requests with cold caches: the page cache of the file is
  dropped (posix_fadvise DONTNEED) on both sides, and the mount's caches are emptied
  through its control channel (block cache tiers, the reader's memory, the kernel's pages),
  so Cairn reads come from the object store; the report says which tier actually served
  them, from the mount's own counters;
- 4 KiB reads at random aligned offsets, one at a time (POSIX_FADV_RANDOM), cold the same
  way;
- create (open O_CREAT|O_EXCL + close), stat and unlink of many empty files in one directory.

Without DIR the benchmark starts a private redis-server (cairn.localstack), formats a
volume on a file:// store in a temporary directory, mounts it in the background with
`cairn mount`'s defaults, and takes all of it down afterwards, by PID; the store's files are
dropped from the page cache too before cold reads, as the local file is. Every read is
checked against the bytes written.

Targets (ratios to the local directory measured in the same run): sequential write and read
>= 0.5, random 4 KiB reads >= 0.3; create >= 2,000 files/s; stat of the just-created files
>= 20,000/s.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cairn.bench.data import POOL, drop_cache, drop_tree_cache, expected
from cairn.bench.data import pool as data_pool
from cairn.errors import ConfigError
from cairn.progress import Progress, human_bytes

MiB = 1 << 20
REQUEST = MiB  # sequential requests
SMALL = 4096  # random reads
# name -> (kind, threshold): "ratio" to the local directory, or an absolute rate.
TARGETS: dict[str, tuple[str, float]] = {
    "seq_write": ("ratio", 0.5),
    "seq_read": ("ratio", 0.5),
    "rand_read": ("ratio", 0.3),
    "create": ("rate", 2000.0),
    "stat": ("rate", 20000.0),
}

Row = dict[str, Any]


# -- the targets ---------------------------------------------------------------------------


@dataclass
class Target:
    """A directory to measure in. `socket` is the control socket of the Cairn mount it is
    on (None for the local directory); `store_root` a file:// store to drop from the page
    cache before cold reads (the benchmark's own volume)."""

    name: str
    root: Path
    socket: str | None = None
    store_root: Path | None = None

    @property
    def big(self) -> Path:
        return self.root / "big"

    @property
    def files(self) -> Path:
        return self.root / "files"

    async def stats(self) -> dict | None:
        if self.socket is None:
            return None
        from cairn.fuse.control import ControlClient

        async with ControlClient.connect(self.socket) as client:
            return await client.call("stats")

    async def drop_caches(self) -> None:
        """Page cache of the file (clean: it was fsync'd); for Cairn every cache of the
        mount too."""
        drop_cache(self.big)
        if self.socket is not None:
            from cairn.fuse.control import ControlClient

            async with ControlClient.connect(self.socket) as client:
                await client.call("warmup", inodes=[os.stat(self.big).st_ino], action="evict")
        if self.store_root is not None:
            drop_tree_cache(self.store_root)


def write_file(path: Path, size: int, pool: bytes, progress: Progress) -> None:
    view = memoryview(pool)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, size, REQUEST):
            length = min(REQUEST, size - offset)
            start = offset % POOL
            data = view[start : start + length] if start + length <= POOL else expected(
                pool, offset, length)  # fmt: skip
            done = 0
            while done < length:
                done += os.write(fd, data[done:])
            progress.advance(length)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path, size: int, pool: bytes, who: str, progress: Progress) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            data = os.read(fd, min(REQUEST, size - offset))
            if not data:
                raise AssertionError(f"{who}: {path} ends at {offset}, not {size}")
            _check(data, pool, offset, who)
            offset += len(data)
            progress.advance(len(data))
    finally:
        os.close(fd)


def random_reads(path: Path, offsets: list[int], pool: bytes, who: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for offset in offsets:
            _check(os.pread(fd, SMALL, offset), pool, offset, who)
    finally:
        os.close(fd)


def _check(data: bytes, pool: bytes, offset: int, who: str) -> None:
    if data != expected(pool, offset, len(data)):
        raise AssertionError(f"{who}: wrong bytes read at offset {offset} (+{len(data)})")


# -- which tier served the reads ------------------------------------------------------------------


def served_by(before: dict, after: dict, requested: int) -> dict[str, Any]:
    """Where a read phase's bytes came from, by the mount's counters."""
    fuse = after["bytes_read"] - before["bytes_read"]
    get_b, get_a = before["object_store"]["get"], after["object_store"]["get"]
    c_b, c_a = before.get("block_cache") or {}, after.get("block_cache") or {}
    return {
        "requested": requested,
        "page_cache_bytes": max(0, requested - fuse),
        "fuse_bytes": fuse,
        "store_gets": get_a["count"] - get_b["count"],
        "store_bytes": get_a["bytes"] - get_b["bytes"],
        "memory_hits": c_a.get("memory_hits", 0) - c_b.get("memory_hits", 0),
        "disk_hits": c_a.get("disk_hits", 0) - c_b.get("disk_hits", 0),
        "misses": c_a.get("misses", 0) - c_b.get("misses", 0),
    }


def describe_tiers(t: dict[str, Any]) -> str:
    parts = []
    if t["requested"] and t["page_cache_bytes"] > t["requested"] // 100:
        parts.append(f"page cache {100 * t['page_cache_bytes'] / t['requested']:.0f}%")
    if t["store_gets"]:
        parts.append(f"object store ({human_bytes(t['store_bytes'])} in {t['store_gets']:,} GETs)")  # fmt: skip
    hits = t["memory_hits"] + t["disk_hits"]
    if hits:
        parts.append(f"block cache ({t['memory_hits']:,} memory + {t['disk_hits']:,} disk hits)")
    return "; ".join(parts) or "nothing read"


# -- the run -----------------------------------------------------------------------------------


async def run(
    directory: str | None = None,
    size: int = 1 << 30,
    files: int = 10_000,
    random_reads_count: int = 5000,
    local_dir: str | None = None,
    mount_args: list[str] | None = None,
) -> dict[str, Any]:
    """Measure; returns the settings and one row per figure (cairn, local, ratio, target).

    `directory` is a directory on a running Cairn mount; None makes a private mount (with
    `mount_args` added to `cairn mount`)."""
    base, work = _workdir(local_dir)
    try:
        local = Target("local", work / "local")
        async with _cairn_target(directory, work, mount_args or []) as (cairn, where):
            for t in (cairn, local):
                t.root.mkdir(parents=True, exist_ok=True)
                t.files.mkdir(exist_ok=True)
            try:
                rows = await _measure(cairn, local, size, files, random_reads_count)
            finally:
                shutil.rmtree(cairn.root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "size": size,
        "files": files,
        "random_reads": random_reads_count,
        "cairn": where,
        "local": str(base),
        "rows": rows,
    }


def _workdir(local_dir: str | None) -> tuple[Path, Path]:
    """(the local directory asked for, a fresh directory inside it for this run)."""
    base = Path(local_dir or tempfile.gettempdir())
    if not base.is_dir():
        raise ConfigError(f"--local-dir {base}: not a directory")
    return base, Path(tempfile.mkdtemp(prefix="cairn-bench-fs-", dir=base))


def _directory(directory: str) -> Path:
    path = Path(directory).absolute()
    if not path.is_dir():
        raise ConfigError(f"{directory}: not a directory")
    return path


@contextlib.asynccontextmanager
async def _cairn_target(
    directory: str | None, work: Path, mount_args: list[str]
) -> AsyncIterator[tuple[Target, str]]:
    from cairn.fuse.control import find_socket

    if directory is not None:
        path = _directory(directory)
        socket = find_socket(str(path))
        root = Path(tempfile.mkdtemp(prefix="cairn-bench-fs-", dir=path))
        yield Target("cairn", root, socket), f"{path} (a running mount)"
        return
    async with _private_mount(work, mount_args) as (mnt, store_root, pid):
        target = Target("cairn", mnt / "bench", find_socket(str(mnt)), store_root)
        yield target, (f"a private mount at {mnt} (pid {pid}): redis-server + file:// store "
                       f"under {work}, `cairn mount` defaults")  # fmt: skip


@contextlib.asynccontextmanager
async def _private_mount(work: Path, extra: list[str]) -> AsyncIterator[tuple[Path, Path, int]]:
    """redis-server, a formatted volume on file://<work>/objects and a background mount of
    it; all stopped (by PID) and unmounted on the way out, also after a failure."""
    from cairn import localstack
    from cairn.fuse import mount
    from cairn.meta.engine import Format, format_volume

    redis = localstack.start_tcp(localstack.redis_server(work / "redis"))
    try:
        store_root = work / "objects"
        store_root.mkdir()
        await format_volume(redis.url, Format(name="bench", storage=f"file://{store_root}",
                                              trash_days=0))  # fmt: skip
        mnt = work / "mnt"
        mnt.mkdir()
        log = work / "mount.log"
        # `cairn mount` defaults: for this file:// store, a memory cache and no disk tier
        argv = ["mount", redis.url, str(mnt), "--log", str(log), *extra]
        pid = mount.start_background(argv, str(mnt), log)
        try:
            yield mnt, store_root, pid
        finally:
            _unmount(mount, mnt, pid)
    finally:
        redis.stop()


def _unmount(mount: Any, mnt: Path, pid: int) -> None:
    from cairn import localstack

    try:
        mount.unmount(str(mnt), timeout=120)
    except Exception:
        if mount.is_mounted(str(mnt)):
            mount.fusermount_unmount(str(mnt), lazy=True)
    finally:
        if mount._alive(pid):
            localstack.stop_pid(pid, timeout=30)


async def _measure(cairn: Target, local: Target, size: int, files: int, nreads: int) -> list[Row]:
    pool = data_pool()
    rows: list[Row] = []

    async def pair(key: str, name: str, unit: str, work: Callable[[Target], Awaitable[float]],
                   requested: int = 0) -> None:  # fmt: skip
        figures: dict[str, float] = {}
        tiers = None
        for t in (cairn, local):
            before = await t.stats()
            figures[t.name] = await work(t)
            after = await t.stats()
            if before is not None and after is not None and requested:
                tiers = served_by(before, after, requested)
        ratio = figures["cairn"] / figures["local"] if figures["local"] else 0.0
        kind, threshold = TARGETS.get(key, ("", 0.0))
        value = ratio if kind == "ratio" else figures["cairn"]
        rows.append({
            "key": key, "name": name, "unit": unit, "cairn": figures["cairn"],
            "local": figures["local"], "ratio": ratio,
            "target": f">= {threshold:g}" + ("x local" if kind == "ratio" else f" {unit}") if kind else "",
            "met": (value >= threshold) if kind else None,
            "tiers": tiers, "served_by": describe_tiers(tiers) if tiers else "",
        })  # fmt: skip

    async def seq_write(t: Target) -> float:
        with Progress(f"{t.name} write", size, unit="B") as progress:
            started = time.perf_counter()
            write_file(t.big, size, pool, progress)
            return size / MiB / (time.perf_counter() - started)

    async def seq_read(t: Target) -> float:
        await t.drop_caches()
        with Progress(f"{t.name} read", size, unit="B") as progress:
            started = time.perf_counter()
            read_file(t.big, size, pool, t.name, progress)
            return size / MiB / (time.perf_counter() - started)

    last = max(0, size - SMALL) // SMALL
    rng = random.Random(2)
    offsets = [rng.randint(0, last) * SMALL for _ in range(nreads)]

    async def rand_read(t: Target) -> float:
        await t.drop_caches()
        started = time.perf_counter()
        random_reads(t.big, offsets, pool, t.name)
        return len(offsets) / (time.perf_counter() - started)

    names = [f"f{i:07d}" for i in range(files)]

    def meta_op(op: str) -> Callable[[Target], Awaitable[float]]:
        calls: dict[str, Callable[[str], Any]] = {
            "create": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)),
            "stat": os.stat,
            "unlink": os.unlink,
        }
        call = calls[op]

        async def work(t: Target) -> float:
            paths = [os.path.join(t.files, n) for n in names]
            with Progress(f"{t.name} {op}", files) as progress:
                started = time.perf_counter()
                for i, path in enumerate(paths):
                    call(path)
                    if i % 64 == 63:
                        progress.advance(64)
                return files / (time.perf_counter() - started)

        return work

    request = human_bytes(REQUEST)
    await pair("seq_write", f"sequential write, {request} requests", "MiB/s", seq_write)
    await pair("seq_read", f"sequential read (cold), {request} requests", "MiB/s", seq_read, size)  # fmt: skip
    await pair("rand_read", "random read 4 KiB (cold, one at a time)", "IOPS", rand_read,
               nreads * SMALL)  # fmt: skip
    await pair("create", "create (one at a time)", "files/s", meta_op("create"))
    await pair("stat", "stat of just-created files", "ops/s", meta_op("stat"))
    await pair("unlink", "unlink (one at a time)", "ops/s", meta_op("unlink"))
    return rows


# -- the report --------------------------------------------------------------------------------

TABLE_HEAD = (f"{'test':<42} {'cairn':>11} {'local':>11} {'unit':<8} {'ratio':>6}  "
              f"{'target':<16} served by (cairn)")  # fmt: skip


def format_row(row: Row) -> str:
    mark = "" if row["met"] is None else (" ok" if row["met"] else " MISS")
    target = (row["target"] + mark).strip()
    return (f"{row['name']:<42} {row['cairn']:>11,.1f} {row['local']:>11,.1f} "
            f"{row['unit']:<8} {row['ratio']:>6.2f}  {target:<16} {row['served_by']}").rstrip()  # fmt: skip


def print_report(result: dict[str, Any]) -> None:
    print(f"cairn bench fs: {human_bytes(result['size'])} file, {result['files']:,} files, "
          f"{result['random_reads']:,} random reads, through the kernel (FUSE)")  # fmt: skip
    print(f"  cairn: {result['cairn']}")
    print(f"  local: a directory under {result['local']}")
    print(TABLE_HEAD)
    for row in result["rows"]:
        print(format_row(row))
