"""The running mount's control channel and instruments: what `cairn stats`, `cairn warmup`,
`cairn bench fs` and Prometheus learn from (and ask of) a mount process.

Instruments (installed by `open_channel` before the mount serves anything):
- `OpMeter`: count, errors and latency of every FUSE request, by op (the `observe` hook of
  cairn.fuse.operations.Operations), also as the `cairn_fuse_op_seconds` histogram;
- `CountingStore`: wraps the object store *under* the block cache, so what it counts are
  real requests to the store (a cache hit is not a GET): requests, errors, bytes, seconds;
- `MountCollector`: mirrors counters kept elsewhere (block cache tiers, metadata
  transactions and their restarts, buffered bytes, open files) into Prometheus at scrape
  time, without touching their owners' hot paths.

The channel: a unix stream socket `<run dir>/<mount slug>.ctl`, beside the mount's PID file
(cairn.fuse.mount.run_dir), mode 0600 (the mount's owner only: it can evict the cache and
name every inode); when that path is too long for a socket address (108 bytes), a hashed
name in the private directory <temp dir>/cairn-ctl-<uid>. A mount whose socket cannot be
made still mounts (with a warning), without a channel. How clients find it: every inode of the mount answers the virtual xattr
`user.cairn.control` with the socket's path (it is not listed and cannot be set), so any
path inside the mount leads to it, also through a bind mount (a CSI publish) and whatever
run dir the mount was started with; `find_socket` falls back to the path derived from the
mountpoint when the xattr is not answered.

Protocol: JSON lines. A client writes one request per line, e.g. {"op": "stats"}; the mount
answers zero or more {"progress": {...}} lines, then one final line, {"ok": true, "result":
{...}} or {"ok": false, "error": "<one line>", "code": <exit code>}. Requests on one
connection are served in order; a client that disconnects cancels its request.

  stats                                  the counters (`Instruments.snapshot`)
  flush                                  commit every buffered write, as sync(2) would
  warmup {inodes, action, threads}       action "warm" (default) fetches the files' blocks
                                         into the block cache, "evict" drops them (and the
                                         kernel's cached pages), "check" says how much of
                                         them is cached; inodes are the kernel's (st_ino)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cairn.chunk import layout
from cairn.errors import (
    CairnError,
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    TemporaryError,
    UnavailableError,
    exit_code,
)
from cairn.retry import retry
from cairn.storage.base import ObjectInfo, ObjectStore
from cairn.storage.keys import block_key
from cairn.telemetry import metrics

log = logging.getLogger(__name__)

CONTROL_XATTR = "user.cairn.control"
SOCKET_SUFFIX = ".ctl"
MAX_SOCKET_PATH = 100  # bytes: a unix socket address holds 107 (108 with the NUL)
LINE_LIMIT = 64 << 20  # a warmup request names every inode: a million fit easily
PROGRESS_INTERVAL = 0.1  # seconds between progress lines of one request
DEFAULT_THREADS = 16
FETCH_DEADLINE = 60.0
STORE_OPS = ("get", "put", "delete", "head", "list")

FUSE_SECONDS = metrics.histogram("fuse_op_seconds", "FUSE request latency, by op", ["op"])
FUSE_ERRORS = metrics.counter("fuse_op_errors_total", "FUSE requests that failed (EIO), by op", ["op"])  # fmt: skip
STORE_REQUESTS = metrics.counter("object_requests_total", "object store requests, by op", ["op"])
STORE_ERRORS = metrics.counter("object_request_errors_total", "failed object store requests", ["op"])  # fmt: skip
STORE_BYTES = metrics.counter("object_bytes_total", "bytes moved to or from the object store", ["op"])  # fmt: skip
STORE_SECONDS = metrics.histogram("object_request_seconds", "object store request latency", ["op"])


# -- instruments -----------------------------------------------------------------------------


@dataclass
class Meter:
    """Count, errors and time of one kind of request."""

    count: int = 0
    errors: int = 0
    seconds: float = 0.0
    max_seconds: float = 0.0
    bytes: int = 0

    def as_dict(self) -> dict[str, float]:
        return {
            "count": self.count,
            "errors": self.errors,
            "seconds": round(self.seconds, 6),
            "max_seconds": round(self.max_seconds, 6),
            "bytes": self.bytes,
        }


class OpMeter:
    """FUSE requests by op; `observe` is Operations' hook and must never raise.

    Errors are requests that failed (EIO and other unexpected trouble); ordinary answers
    such as ENOENT for a lookup or ENODATA for a getxattr are not errors."""

    def __init__(self) -> None:
        self.ops: dict[str, Meter] = {}
        self._children: dict[str, tuple[Any, Any]] = {}

    def observe(self, op: str, seconds: float, failed: bool) -> None:
        try:
            m = self.ops.get(op)
            if m is None:
                m = self.ops[op] = Meter()
                # Labelled children looked up once: observing stays a few attribute reads.
                self._children[op] = (FUSE_SECONDS.labels(op), FUSE_ERRORS.labels(op))
            m.count += 1
            m.seconds += seconds
            if seconds > m.max_seconds:
                m.max_seconds = seconds
            hist, errors = self._children[op]
            hist.observe(seconds)
            if failed:
                m.errors += 1
                errors.inc()
        except Exception:  # a counter must never fail a request (or end the FUSE loop)
            log.debug("counting FUSE op %s failed", op, exc_info=True)

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {name: m.as_dict() for name, m in sorted(self.ops.items())}


class CountingStore(ObjectStore):
    """An object store that counts what goes through it to the store it wraps."""

    def __init__(self, store: ObjectStore) -> None:
        super().__init__(store.url)
        self.store = store
        self.scheme = store.scheme
        self.ops = {op: Meter() for op in STORE_OPS}
        self._children = {
            op: (STORE_REQUESTS.labels(op), STORE_ERRORS.labels(op), STORE_BYTES.labels(op),
                 STORE_SECONDS.labels(op))
            for op in STORE_OPS
        }  # fmt: skip

    def _count(self, op: str, started: float, nbytes: int, failed: bool) -> None:
        seconds = time.perf_counter() - started
        m = self.ops[op]
        m.count += 1
        m.seconds += seconds
        m.max_seconds = max(m.max_seconds, seconds)
        m.bytes += nbytes
        requests, errors, moved, latency = self._children[op]
        requests.inc()
        latency.observe(seconds)
        if nbytes:
            moved.inc(nbytes)
        if failed:
            m.errors += 1
            errors.inc()

    async def _measured(self, op: str, work: Awaitable[Any], nbytes: int = 0) -> Any:
        started = time.perf_counter()
        try:
            result = await work
        except BaseException:
            self._count(op, started, 0, True)
            raise
        if op == "get":
            nbytes = len(result)
        self._count(op, started, nbytes, False)
        return result

    def read_now(self, key: str, offset: int, length: int) -> bytes | None:
        started = time.perf_counter()
        try:
            data = self.store.read_now(key, offset, length)
        except BaseException:
            self._count("get", started, 0, True)
            raise
        if data is not None:
            self._count("get", started, len(data), False)
        return data

    async def _put(self, key: str, data: bytes) -> None:
        await self._measured("put", self.store.put(key, data), len(data))

    async def _get(self, key: str, offset: int, length: int) -> bytes:
        return await self._measured("get", self.store.get(key, offset, length))

    async def _delete(self, key: str) -> None:
        await self._measured("delete", self.store.delete(key))

    async def _head(self, key: str) -> ObjectInfo:
        return await self._measured("head", self.store.head(key))

    async def _list(
        self, prefix: str, start_after: str, page_size: int
    ) -> AsyncIterator[ObjectInfo]:
        started = time.perf_counter()
        failed = True
        try:
            async for info in self.store.list(prefix, start_after, page_size):
                yield info
            failed = False
        finally:
            self._count("list", started, 0, failed)

    async def _check(self) -> None:
        await self.store.check()

    async def close(self) -> None:
        await self.store.close()

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {op: m.as_dict() for op, m in self.ops.items()}


def _counting(vfs: Any) -> CountingStore:
    """Puts a CountingStore right above the backend: under the block cache when there is one
    (CachedStore.store), else in place of the store the VFS, its reader and writer use."""
    top = vfs.store
    if isinstance(getattr(top, "store", None), ObjectStore) and hasattr(top, "cache"):
        if not isinstance(top.store, CountingStore):
            top.store = CountingStore(top.store)
        return top.store
    if isinstance(top, CountingStore):
        return top
    counting = CountingStore(top)
    vfs.store = vfs.reader.store = vfs.writer.store = counting
    return counting


class MountCollector:
    """Prometheus families read at scrape time from the mount's own counters.

    collect() runs in the metrics server's thread: it only reads integers and the lengths
    of containers, which the GIL keeps consistent."""

    def __init__(self, vfs: Any, store: CountingStore) -> None:
        self.vfs = vfs
        self.store = store

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        p = metrics.PREFIX
        vfs = self.vfs
        cache = getattr(vfs.store, "cache", None)
        hits = CounterMetricFamily(p + "block_cache_hits", "block cache hits, by tier", labels=["tier"])  # fmt: skip
        misses = CounterMetricFamily(p + "block_cache_misses", "block cache misses")
        size = GaugeMetricFamily(p + "block_cache_bytes", "bytes held by the block cache, by tier", labels=["tier"])  # fmt: skip
        items = GaugeMetricFamily(p + "block_cache_blocks", "blocks held by the block cache, by tier", labels=["tier"])  # fmt: skip
        if cache is not None:
            s = cache.stats()
            hits.add_metric(["memory"], s.memory_hits)
            hits.add_metric(["disk"], s.disk_hits)
            misses.add_metric([], s.misses)
            size.add_metric(["memory"], s.memory_bytes)
            size.add_metric(["disk"], s.disk_bytes)
            items.add_metric(["memory"], s.memory_items)
            items.add_metric(["disk"], s.disk_items)
        yield from (hits, misses, size, items)
        stats = vfs.meta.stats
        yield CounterMetricFamily(p + "meta_transactions", "metadata transactions", stats.txn)
        yield CounterMetricFamily(
            p + "meta_txn_restarts", "metadata transactions restarted on conflict",
            stats.txn_restarts,
        )  # fmt: skip
        yield CounterMetricFamily(
            p + "meta_outage_retries", "metadata operations run again while Redis was away",
            stats.outage_retries,
        )  # fmt: skip
        vstats = vfs.stats
        yield CounterMetricFamily(p + "fuse_read_bytes", "bytes read through the mount", vstats.bytes_read)  # fmt: skip
        yield CounterMetricFamily(p + "fuse_written_bytes", "bytes written through the mount", vstats.bytes_written)  # fmt: skip
        yield GaugeMetricFamily(p + "buffered_bytes", "written bytes not yet stored", vfs.writer.buffered)  # fmt: skip
        yield GaugeMetricFamily(p + "open_files", "open file handles", len(vfs.handles.files))

    def describe(self) -> Iterable[Any]:
        return self.collect()


@dataclass
class Instruments:
    """What the channel reports: the FUSE meter, the counting store, and the VFS."""

    vfs: Any
    fuse: OpMeter
    store: CountingStore
    mountpoint: str = ""
    metrics_addr: str = ""
    started: float = field(default_factory=time.time)
    local_reads: Any = None  # cairn.fuse.extents.LocalReads of the Operations, if any

    def snapshot(self) -> dict[str, Any]:
        vfs = self.vfs
        snap = vfs.stats_snapshot()
        stats = vfs.meta.stats
        fuse, store = self.fuse.snapshot(), self.store.snapshot()
        # Reads answered in C from registered extents are FUSE reads and reads of the
        # store like any other (their latency is not measured).
        local = self.local_reads
        c_reads, c_bytes = local.counts() if local is not None else (0, 0)
        if c_reads:
            for table, op in ((fuse, "read"), (store, "get")):
                row = table.setdefault(op, Meter().as_dict())
                row["count"] += c_reads
                row["bytes"] += c_bytes
        return {
            "time": time.time(),
            "uptime": time.time() - self.started,
            "pid": os.getpid(),
            "mountpoint": self.mountpoint,
            "volume": vfs.meta.fmt.name,
            "metrics_addr": self.metrics_addr,
            "fuse": fuse,
            "object_store": store,
            "reads_in_c": {"count": c_reads, "bytes": c_bytes,
                           "files_held": local.files_held if local is not None else 0},  # fmt: skip
            "block_cache": snap.get("block_cache"),
            "reader_memory": {
                "bytes": getattr(vfs.reader, "_memory", 0),
                "blocks": len(getattr(vfs.reader, "_blocks", ())),
            },
            "attr_cache": snap["attr_cache"],
            "entry_cache": snap["entry_cache"],
            "chunk_cache": snap["chunk_cache"],
            "meta": {
                "txn": stats.txn,
                "txn_restarts": stats.txn_restarts,
                "outage_retries": stats.outage_retries,
            },
            "bytes_read": snap["bytes_read"] + c_bytes,
            "bytes_written": snap["bytes_written"],
            "flushes_for_read": snap["flushes_for_read"],
            "buffered_bytes": vfs.writer.buffered,
            "uploading_bytes": vfs.writer.uploading,
            "open_files": snap["open_files"],
            "open_dirs": snap["open_dirs"],
        }


# -- warmup ------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """The distinct blocks some files are made of: key -> stored length."""

    blocks: dict[str, int] = field(default_factory=dict)
    files: int = 0
    missing: int = 0  # inodes that are gone or are not regular files

    @property
    def bytes(self) -> int:
        return sum(self.blocks.values())


async def _plan(vfs: Any, inodes: list[int], concurrency: int) -> _Plan:
    """Resolve every file's chunks into the block keys holding its current bytes."""
    plan = _Plan()
    meta = vfs.meta
    fmt = meta.fmt
    slots = asyncio.Semaphore(max(1, concurrency))

    async def one(kernel_inode: int) -> None:
        ino = vfs._in(kernel_inode)
        async with slots:
            try:
                attr = await meta.getattr(ino)
            except CairnError as error:
                log.debug("warmup: inode %d: %s", kernel_inode, error)
                plan.missing += 1
                return
            if not attr.is_file():
                plan.missing += 1
                return
            plan.files += 1
            for index in range(layout.chunk_count(attr.size, fmt.chunk_size)):
                for seg in await meta.read(ino, index):
                    if not seg.id:
                        continue
                    for br in layout.block_ranges(seg.size, seg.off, seg.len, fmt.block_size):
                        key = block_key(fmt.uuid, seg.id, br.index, br.block_len)
                        plan.blocks[key] = br.block_len

    await asyncio.gather(*(one(i) for i in dict.fromkeys(inodes)))
    return plan


class _Ticker:
    """Sends progress at most every PROGRESS_INTERVAL seconds (and always at the end)."""

    def __init__(self, send: Callable[[dict], Awaitable[None]], total: int, blocks: int) -> None:
        self.send = send
        self.total = total
        self.blocks = blocks
        self.done = 0
        self.done_blocks = 0
        self._last = 0.0

    async def advance(self, nbytes: int, final: bool = False) -> None:
        if not final:
            self.done += nbytes
            self.done_blocks += 1
        now = time.monotonic()
        if final or now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            await self.send({"bytes": self.done, "total": self.total,
                             "blocks": self.done_blocks, "total_blocks": self.blocks})  # fmt: skip


async def warmup(
    vfs: Any,
    inodes: list[int],
    action: str = "warm",
    threads: int = DEFAULT_THREADS,
    send: Callable[[dict], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Warm, evict or check the block cache for the blocks of the given files."""
    if action not in ("warm", "evict", "check"):
        raise InvalidArgument(f"warmup action must be warm, evict or check, not {action!r}")
    started = time.monotonic()
    cache = getattr(vfs.store, "cache", None)
    if cache is None:
        raise FailedPrecondition("this mount has no block cache")
    plan = await _plan(vfs, inodes, threads)
    result: dict[str, Any] = {
        "action": action,
        "files": plan.files,
        "skipped": plan.missing,
        "blocks": len(plan.blocks),
        "bytes": plan.bytes,
        "disk_cache": cache.disk_enabled,
    }
    ticker = _Ticker(send or _ignore, plan.bytes, len(plan.blocks))
    if action == "check":
        cached = {k: n for k, n in plan.blocks.items() if cache.contains(k)}
        result.update(cached_blocks=len(cached), cached_bytes=sum(cached.values()))
    elif action == "evict":
        await _evict(vfs, cache, plan, inodes, ticker)
        result.update(evicted_blocks=len(plan.blocks), evicted_bytes=plan.bytes)
    else:
        fetched, present, failed = await _warm(vfs, cache, plan, threads, ticker)
        result.update(fetched_blocks=fetched[0], fetched_bytes=fetched[1],
                      already_blocks=present[0], already_bytes=present[1],
                      failed_blocks=len(failed), errors=failed[:5])  # fmt: skip
    await ticker.advance(0, final=True)
    result["seconds"] = time.monotonic() - started
    total = result["bytes"]
    result["percent"] = 100.0 if not total else round(100.0 * _cached_bytes(cache, plan) / total, 2)
    return result


async def _ignore(_: dict) -> None:
    return None


def _cached_bytes(cache: Any, plan: _Plan) -> int:
    return sum(n for k, n in plan.blocks.items() if cache.contains(k))


async def _warm(
    vfs: Any, cache: Any, plan: _Plan, threads: int, ticker: _Ticker
) -> tuple[tuple[int, int], tuple[int, int], list[str]]:
    """Fetches the missing blocks straight from the store under the cache (so the cache's
    hit and miss counters describe reads only) and puts them in the cache."""
    backend = vfs.store.store
    slots = asyncio.Semaphore(max(1, threads))
    fetched = [0, 0]
    present = [0, 0]
    failed: list[str] = []

    async def one(key: str, length: int) -> None:
        if cache.contains(key):
            present[0] += 1
            present[1] += length
            await ticker.advance(length)
            return
        async with slots:
            try:
                data = await retry(lambda: backend.get(key), deadline=FETCH_DEADLINE)
            except CairnError as error:
                failed.append(f"{key}: {error}")
                return
            await cache.put(key, data)
        fetched[0] += 1
        fetched[1] += length
        await ticker.advance(length)

    await asyncio.gather(*(one(k, n) for k, n in plan.blocks.items()))
    return (fetched[0], fetched[1]), (present[0], present[1]), failed


async def _evict(vfs: Any, cache: Any, plan: _Plan, inodes: list[int], ticker: _Ticker) -> None:
    """Drops the blocks from both cache tiers and the reader's memory, and the kernel's
    cached pages of the files, so the next read of them goes to the object store."""
    _drop_reader_blocks(vfs.reader, plan.blocks)
    for key, length in plan.blocks.items():
        await cache.evict(key)
        await ticker.advance(length)
    await asyncio.to_thread(_invalidate_pages, list(dict.fromkeys(inodes)))


def _drop_reader_blocks(reader: Any, keys: Iterable[str]) -> None:
    """The ChunkReader keeps recently decoded blocks in memory (an LRU it owns); evicting
    must drop those too. It has no public call for it, so this reaches in, defensively."""
    blocks = getattr(reader, "_blocks", None)
    if not isinstance(blocks, dict):
        return
    for key in keys:
        data = blocks.pop(key, None)
        if data is not None and hasattr(reader, "_memory"):
            reader._memory -= len(data)


def _invalidate_pages(inodes: list[int]) -> None:
    """The kernel's page cache of each file (in a thread: with the writeback cache the
    kernel may first send us writes, which the event loop must be free to serve)."""
    import pyfuse3

    for inode in inodes:
        try:
            pyfuse3.invalidate_inode(inode, attr_only=False)
        except OSError as error:  # the kernel does not know the inode: nothing cached
            log.debug("invalidating pages of inode %d: %s", inode, error)


# -- the server --------------------------------------------------------------------------------


def socket_path(mountpoint: str) -> Path:
    """<run dir>/<mount slug>.ctl; when that is longer than a unix socket address may be,
    <temp dir>/cairn-ctl-<uid>/<hash of it>.ctl (a private directory) instead."""
    from cairn.fuse.mount import mount_slug, run_dir

    path = run_dir() / f"{mount_slug(mountpoint)}{SOCKET_SUFFIX}"
    if len(os.fsencode(str(path))) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha1(os.fsencode(str(path))).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"cairn-ctl-{os.geteuid()}" / f"{digest}{SOCKET_SUFFIX}"


def _private_dir(path: Path) -> None:
    """Creates the socket's directory; a shared fallback one must be ours and private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.name.startswith("cairn-ctl-"):
        st = path.lstat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermissionError(errno.EACCES, "not a private directory of this user", str(path))


class ControlServer:
    """The unix socket of one mount, answering JSON-line requests on the event loop."""

    def __init__(self, path: Path, instruments: Instruments) -> None:
        self.path = path
        self.instruments = instruments
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        _private_dir(self.path.parent)
        # Only one mount serves a mountpoint (prepare_mountpoint checked): a socket
        # already there was left by a mount that died.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve_client, path=str(self.path), limit=LINE_LIMIT
            )
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:  # fmt: skip
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                await self._answer(line, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away: what it asked for is dropped
        except asyncio.CancelledError:
            pass  # the mount is closing
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes, writer: asyncio.StreamWriter) -> None:
        async def send(message: dict) -> None:
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()

        async def progress(state: dict) -> None:
            await send({"progress": state})

        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise InvalidArgument("a request is a JSON object")
            result = await self._dispatch(request, progress)
        except ConnectionError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            await send({"ok": False, "error": f"bad request: {error}", "code": 2})
        except CairnError as error:
            await send({"ok": False, "error": str(error), "code": exit_code(error)})
        except Exception as error:
            log.exception("control request failed")
            await send({"ok": False, "error": f"{type(error).__name__}: {error}", "code": 1})
        else:
            await send({"ok": True, "result": result})

    async def _dispatch(self, request: dict, progress: Callable[[dict], Awaitable[None]]) -> Any:
        op = request.get("op")
        vfs = self.instruments.vfs
        if op == "stats":
            return self.instruments.snapshot()
        if op == "flush":
            started = time.monotonic()
            await vfs.sync()
            return {"seconds": time.monotonic() - started}
        if op == "warmup":
            inodes = request.get("inodes")
            if not isinstance(inodes, list) or not all(
                isinstance(i, int) and i > 0 for i in inodes
            ):
                raise InvalidArgument("warmup wants 'inodes': a list of inode numbers")
            threads = request.get("threads", DEFAULT_THREADS)
            if not isinstance(threads, int) or threads < 1:
                raise InvalidArgument("warmup 'threads' must be a positive number")
            action = request.get("action", "warm")
            return await warmup(vfs, inodes, action, threads, progress)
        raise InvalidArgument(f"unknown control request {op!r}: stats, flush or warmup")


@dataclass
class Channel:
    """Everything `open_channel` started; close() stops it (before the VFS closes)."""

    instruments: Instruments
    server: ControlServer | None
    collector: MountCollector | None
    metrics_server: Any = None

    @property
    def path(self) -> Path | None:
        return self.server.path if self.server else None

    async def close(self) -> None:
        """Never raises: an unmount must not fail over its instruments."""
        try:
            if self.metrics_server is not None:
                server, self.metrics_server = self.metrics_server, None
                await asyncio.to_thread(server.stop)
            if self.collector is not None:
                collector, self.collector = self.collector, None
                with contextlib.suppress(KeyError):
                    metrics.REGISTRY.unregister(collector)
            if self.server is not None:
                server, self.server = self.server, None
                await server.close()
        except Exception:
            log.exception("closing the control channel failed")


def instrument(vfs: Any, ops: Any = None, mountpoint: str = "") -> Instruments:
    """Counts the VFS's object store requests and (when given) the FUSE ops of `ops`."""
    meter = OpMeter()
    instruments = Instruments(vfs, meter, _counting(vfs), mountpoint)
    if ops is not None:
        ops.observe = meter.observe
        instruments.local_reads = getattr(ops, "local_reads", None)
    return instruments


async def open_channel(
    vfs: Any, ops: Any, mountpoint: str, *, metrics_addr: str | None = None
) -> Channel:
    """Instruments the mount, starts its control socket and (with metrics_addr) its
    Prometheus endpoint. Raises ConfigError for an unusable metrics address."""
    instruments = instrument(vfs, ops, mountpoint)
    server = ControlServer(socket_path(mountpoint), instruments)
    channel = Channel(instruments, None, None)
    try:
        await server.start()
    except OSError as error:  # the mount still works; only its control channel does not
        log.warning("no control channel (cairn stats/warmup) at %s: %s", server.path,
                    error.strerror or error)  # fmt: skip
    else:
        channel.server = server
        ops.control_path = os.fsencode(str(server.path))
    try:
        if metrics_addr:
            collector = MountCollector(vfs, instruments.store)
            metrics.REGISTRY.register(collector)
            channel.collector = collector
            channel.metrics_server = metrics.start_metrics_server(metrics_addr)
            ms = channel.metrics_server
            instruments.metrics_addr = f"{ms.host}:{ms.port}"
            log.info("metrics on http://%s/metrics", instruments.metrics_addr)
    except BaseException:
        await channel.close()
        raise
    return channel


# -- the client --------------------------------------------------------------------------------


def find_socket(path: str) -> str:
    """The control socket of the Cairn mount that `path` is on (any path inside it)."""
    try:
        value = os.getxattr(path, CONTROL_XATTR)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file or directory") from None
    except OSError as error:
        if error.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise FailedPrecondition(f"{path}: {error.strerror}") from None
        derived = socket_path(path)
        if derived.exists():
            return str(derived)
        raise FailedPrecondition(f"{path} is not on a running Cairn mount") from None
    return os.fsdecode(value)


def _error_for(message: str, code: int) -> CairnError:
    if code == 2:
        return InvalidArgument(message)
    if code == 69:
        return UnavailableError(message)
    if code == 75:
        return TemporaryError(message)
    return FailedPrecondition(message)


class ControlClient:
    """One connection to a mount's control socket.

    async with ControlClient.connect(find_socket(path)) as client:
        stats = await client.call("stats")
    """

    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:  # fmt: skip
        self.path = path
        self.reader = reader
        self.writer = writer

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: str) -> AsyncIterator[ControlClient]:
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=LINE_LIMIT)
        except (FileNotFoundError, ConnectionRefusedError):
            raise UnavailableError(f"the mount's control socket {path} does not answer "
                                   "(is the mount still running?)") from None  # fmt: skip
        except PermissionError:
            raise FailedPrecondition(f"control socket {path}: permission denied (run as "
                                     "the user who mounted it)") from None  # fmt: skip
        client = cls(path, reader, writer)
        try:
            yield client
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def call(
        self,
        op: str,
        progress: Callable[[dict], None] | None = None,
        **args: Any,
    ) -> Any:
        """Sends one request and returns its result; progress(state) sees progress lines."""
        try:
            self.writer.write(json.dumps({"op": op, **args}).encode() + b"\n")
            await self.writer.drain()
            while True:
                line = await self.reader.readline()
                if not line:
                    raise UnavailableError(f"the mount closed its control socket {self.path}")
                message = json.loads(line)
                if "progress" in message:
                    if progress is not None:
                        progress(message["progress"])
                    continue
                if message.get("ok"):
                    return message.get("result")
                raise _error_for(
                    message.get("error", "request failed"), int(message.get("code", 1))
                )
        except ConnectionError as error:
            raise UnavailableError(f"control socket {self.path}: {error}") from None


async def request(path: str, op: str, **args: Any) -> Any:
    """One request to the mount that `path` is on."""
    async with ControlClient.connect(find_socket(path)) as client:
        return await client.call(op, **args)
