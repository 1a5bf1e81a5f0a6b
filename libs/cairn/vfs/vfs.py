"""The VFS: file system operations named after the FUSE ops, on inodes, for one mount.

The FUSE `Operations` class is a thin layer over this: each FUSE op calls the VFS method of
the same name and turns an error into an errno with `to_errno`. The VFS joins the three
libraries underneath: the metadata engine (cairn.meta) for the namespace, the ChunkWriter
for buffered writes and the ChunkReader for reads, and keeps what a mount needs between
calls: open handles, short-lived caches and counters.

Consistency, as JuiceFS gives it:
- a client always sees its own changes: every local change drops or refreshes what it
  cached, a file's size and mtime include its writes still in the buffer, and a read of a
  file with pending writes commits them first;
- close-to-open between clients: release() (and flush/fsync) commit a file's writes, and
  open() refetches the attributes and forgets the file's cached slices, so what one client
  wrote and closed, another reads after opening;
- other clients' changes show when their change notes arrive (cairn.vfs.changes:
  milliseconds), which drop what this mount (and, through the FUSE layer, the kernel)
  cached; the cache TTLs (attr_ttl, entry_ttl) bound staleness when a note is lost;
- a directory this mount made starts with a known, empty listing, kept up to date by its
  own changes and dropped on any note about it: a lookup of a name not in it is answered
  here (ENOENT) without a round trip, as the kernel would from a negative dentry.

Inodes: with a `subdir` the mount's root is a directory below the volume's root. The VFS
speaks the kernel's numbers (the root is always 1) and swaps that directory's inode with 1
on the way in and out, so the FUSE layer never translates anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cairn.chunk import layout
from cairn.chunk.reader import ChunkReader, local_file_store
from cairn.chunk.writer import IDLE_FLUSH, ChunkWriter
from cairn.errors import (
    ConfigError,
    DeadlineExceeded,
    FSError,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from cairn.meta import perms
from cairn.meta.types import (
    F_UNLCK,
    MAX_FILE_SIZE,
    MAX_NAME,
    RENAME_EXCHANGE,
    ROOT_CTX,
    ROOT_INODE,
    W_OK,
    X_OK,
    Attr,
    Ctx,
    StatFs,
)
from cairn.vfs.caches import ChunkCache, Listings, TTLCache
from cairn.vfs.changes import ChangeFeed
from cairn.vfs.handles import DirEntry, DirHandle, FileHandle, HandleTable
from cairn.vfs.stats import VFSStats

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1 << 20
DEFAULT_BUFFER_SIZE = 300 * MiB
DEFAULT_HEARTBEAT = 12.0
READDIR_PAGE = 1000
MAX_LOCK_END = (1 << 63) - 1


@dataclass(frozen=True)
class LocalExtents:
    """What VFS.local_extents answers: bytes [start, end) of the file are bytes from `offset`
    of the local file `path`, for chunk `index`; holes are not listed."""

    inode: int
    index: int
    size: int  # the file's length they were made for
    expires: float  # time.monotonic() after which they may be stale
    extents: list[tuple[int, int, str, int]]  # (start, end, path, offset)


@dataclass
class VFSOptions:
    """How a mount behaves; every field has a command-line flag in `cairn mount`."""

    attr_ttl: float = 1.0  # seconds attributes are cached (here and by the kernel)
    entry_ttl: float = 1.0  # seconds a name -> file is cached
    dir_entry_ttl: float = 1.0  # seconds a name -> directory is cached
    notes: bool = True  # send and hear change notes (cairn.vfs.changes)
    close_delay: float = 0.02  # seconds last closes wait to be released in one batch
    # seconds an operation waits for Redis or the object store to come back (then EIO)
    outage_wait: float = 60.0
    buffer_size: int = DEFAULT_BUFFER_SIZE  # bytes of writes buffered before back-pressure
    readahead: int | None = None  # bytes read ahead of a sequential reader (None: 8 blocks)
    read_only: bool = False
    subdir: str = ""  # mount this directory of the volume as the root
    max_uploads: int = 16
    heartbeat: float = DEFAULT_HEARTBEAT  # seconds between session heartbeats
    flush_idle: float = IDLE_FLUSH  # seconds after which an untouched file is committed
    readdir_page: int = READDIR_PAGE


def to_errno(error: BaseException) -> int:
    """The errno a FUSE reply carries for an error raised by a VFS method."""
    if isinstance(error, FSError):
        return error.errno
    if isinstance(error, InvalidArgument):
        return errno.EINVAL
    if isinstance(error, OutOfRange):
        return errno.EFBIG
    if isinstance(error, ResourceExhausted):
        return errno.ENOSPC
    if isinstance(error, DeadlineExceeded):
        return errno.ETIMEDOUT
    # Servers down, blocks missing (NotFound is data loss, not ENOENT) or damaged, bugs.
    return errno.EIO


def _op(name: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Counts the operation, its failures and its latency in self.stats."""

    def wrap(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def run(self: VFS, *args: Any, **kwargs: Any) -> T:
            start = time.perf_counter()
            failed = True
            try:
                result = await fn(self, *args, **kwargs)
                failed = False
                return result
            finally:
                self.stats.record(name, time.perf_counter() - start, failed)

        return run

    return wrap


class VFS:
    """One mount's file system operations over a volume's Meta and object store."""

    def __init__(
        self,
        meta: Any,
        store: Any,
        options: VFSOptions | None = None,
        *,
        on_commit: Callable[[int, int, Attr], Any] | None = None,
        **overrides: Any,
    ) -> None:
        """`options` (or keyword overrides of its fields) say how to behave; `on_commit`
        is called after each slice this client commits (compaction scheduling)."""
        opts = dataclasses.replace(options or VFSOptions(), **overrides)
        self.options = opts
        self.meta = meta
        self.store = store
        meta.close_delay = opts.close_delay
        meta.outage_wait = opts.outage_wait
        self.root = ROOT_INODE
        self.stats = VFSStats()
        self.handles = HandleTable()
        self.on_commit = on_commit
        self._attrs: TTLCache[int, Attr] = TTLCache(opts.attr_ttl)
        self._entries: TTLCache[tuple[int, bytes], int] = TTLCache(opts.entry_ttl)
        self._symlinks: TTLCache[int, bytes] = TTLCache(float("inf"), 10_000)  # immutable
        self._chunks = ChunkCache(meta, opts.attr_ttl)
        self._listings = Listings(opts.entry_ttl)
        self.changes: ChangeFeed | None = None
        # Set by the FUSE layer: on_invalidate({inode: data_changed}, [(parent, name)]) in
        # the kernel's numbers, for what other mounts changed.
        self.on_invalidate: Callable[[dict[int, bool], list[tuple[int, bytes]]], Any] | None = None
        # Set by the FUSE layer: on_data_changed(inode, or None for every inode) whenever
        # what local_extents() answered for a file may no longer hold.
        self.on_data_changed: Callable[[int | None], None] | None = None
        self._chunks.on_drop = self._data_changed
        # inode -> (end, mtime_ns) of writes that may not be committed yet
        self._dirty: dict[int, tuple[int, int]] = {}
        self.writer = ChunkWriter(
            meta,
            store,
            max_uploads=opts.max_uploads,
            buffer_limit=opts.buffer_size,
            on_commit=self._committed,
        )
        self.reader = ChunkReader(self._chunks, store, readahead_max=opts.readahead)
        self.reader.deadline = self.writer.deadline = opts.outage_wait
        self._heartbeat: asyncio.Task[None] | None = None
        self._own_session = False
        self._owned = False  # close() closes meta and store (open_volume made them)
        self._closed = False

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    async def open_volume(
        cls,
        meta_url: str,
        *,
        cache_dir: str | os.PathLike | None = None,
        cache_size: int = 10 << 30,
        cache_memory: int = 256 * MiB,
        session_info: dict | None = None,
        store_options: dict | None = None,
        local_disk_cache: bool = False,
        **options: Any,
    ) -> VFS:
        """Connects to the volume at meta_url and its object store, puts a block cache in
        front (memory `cache_memory`, disk `cache_size` under `cache_dir`; none when both
        are off; no disk tier for a file:// store unless `local_disk_cache`), starts a
        session with heartbeats and the idle flusher. close() it."""
        from cairn.meta.engine import Meta
        from cairn.storage import BlockCache, CachedStore, open_store

        meta = await Meta.open(meta_url)
        store = None
        try:
            store = open_store(meta.fmt.storage, **(store_options or {}))
            await store.check()
            if store.scheme == "file" and not local_disk_cache:
                # The store is a local disk already: a disk cache in front of it would
                # only write every block read a second time.
                cache_dir = None
            if cache_memory > 0 or cache_dir is not None:
                cache = BlockCache(cache_memory, cache_dir, cache_size)
                store = CachedStore(store, cache)
            vfs = cls(meta, store, **options)
            vfs._owned = True
            await vfs.start(info=session_info)
        except BaseException:
            if store is not None:
                await store.close()
            await meta.close()
            raise
        return vfs

    async def start(
        self, *, session: bool = True, info: dict | None = None, flush_idle: bool = True
    ) -> None:
        """Resolves the subdir, starts a session (unless the Meta has one) with a heartbeat
        task, and the writer's background flush of idle files."""
        if self.options.subdir:
            await self._resolve_subdir(self.options.subdir)
        if session and self.meta.sid is None:
            record = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "subdir": self.options.subdir,
                "read_only": self.options.read_only,
                **(info or {}),
            }
            await self.meta.new_session(record)
            self._own_session = True
            if self.options.heartbeat > 0:
                self._heartbeat = asyncio.create_task(self._beat(self.options.heartbeat))
        if flush_idle and not self.options.read_only:
            self.writer.start(idle_seconds=self.options.flush_idle)
        if self.options.notes and self.meta.sid is not None and self.changes is None:
            self.changes = ChangeFeed(
                self.meta.r,
                self.meta.fmt.uuid,
                self.meta.sid,
                self._heard,
                self._reset,
                publish=self.meta.publish,
            )
            await self.changes.start()

    async def _resolve_subdir(self, subdir: str) -> None:
        try:
            ino, attr = await self.meta.resolve(ROOT_CTX, subdir.encode())
        except FSError as error:
            raise ConfigError(f"subdir {subdir!r} of the volume: {error}") from None
        if not attr.is_dir():
            raise ConfigError(f"subdir {subdir!r} of the volume is not a directory")
        self.root = ino

    async def _beat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.meta.heartbeat()
            except Exception as error:  # the next beat tries again; the mount goes on
                log.warning("session heartbeat failed: %s", error)

    async def close(self) -> None:
        """Releases every open handle (committing their writes), flushes everything else,
        ends the session, and closes the Meta and store when open_volume made them.
        Raises the first failure after doing all of it."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for fh in list(self.handles.files):
            await _collect(errors, self.release(fh))
        self.handles.dirs.clear()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        await _collect(errors, self.writer.close())
        await _collect(errors, self.reader.close())
        if self.changes is not None:
            await _collect(errors, self.changes.close())
        if self._own_session:
            await _collect(errors, self.meta.close_session())
        if self._owned:
            await _collect(errors, self.store.close())
            await _collect(errors, self.meta.close())
        if errors:
            raise errors[0]

    async def __aenter__(self) -> VFS:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def sync(self) -> None:
        """Commits every file's pending writes (sync(2), unmount)."""
        await self.writer.flush_all()

    # -- what the FUSE layer tells the kernel ---------------------------------------------

    @property
    def attr_ttl(self) -> float:
        return self.options.attr_ttl

    def entry_ttl_for(self, attr: Attr) -> float:
        """How long the kernel may keep a name -> attr lookup."""
        return self.options.dir_entry_ttl if attr.is_dir() else self.options.entry_ttl

    def stats_snapshot(self) -> dict:
        """The counters, plus the chunk cache's and the block cache's when there is one."""
        extra: dict = {
            "chunk_cache": {"hits": self._chunks.hits, "misses": self._chunks.misses},
            "buffered_bytes": self.writer.buffered,
        }
        cache = getattr(self.store, "cache", None)
        if cache is not None:
            extra["block_cache"] = dataclasses.asdict(cache.stats())
        self.stats.open_files = len(self.handles.files)
        self.stats.open_dirs = len(self.handles.dirs)
        return self.stats.snapshot(extra)

    # -- inode numbers, attributes and caches ---------------------------------------------

    def _swap(self, ino: int) -> int:
        """Kernel <-> engine inode numbers: the mount's root and 1 trade places."""
        if self.root == ROOT_INODE:
            return ino
        if ino == ROOT_INODE:
            return self.root
        if ino == self.root:
            return ROOT_INODE
        return ino

    _in = _swap
    _out = _swap

    async def _attr(self, ino: int, fresh: bool = False) -> Attr:
        """The engine's attributes of ino, from the cache unless fresh."""
        if not fresh:
            attr = self._attrs.get(ino)
            if attr is not None:
                self.stats.attr_hits += 1
                return attr
        self.stats.attr_misses += 1
        attr = await self.meta.getattr(ino)
        self._attrs.put(ino, attr)
        return attr

    def _writer_busy(self, ino: int) -> bool:
        """Has ino writes that are buffered or being committed right now?"""
        w = self.writer.get(ino)
        if w is None:
            return False
        # A flush empties the buffer before its commits land; until they have, the sizes
        # in the engine may still be behind what was written.
        return w.pending() or w._flush_lock.locked()

    def _local_size(self, attr: Attr) -> tuple[int, int, int]:
        """(size, mtime, ctime) of a file, counting its writes not committed yet."""
        size, mtime, ctime = attr.size, attr.mtime, attr.ctime
        dirty = self._dirty.get(attr.inode)
        if dirty is not None:
            if self._writer_busy(attr.inode):
                size = max(size, dirty[0])
                mtime = max(mtime, dirty[1])
                ctime = max(ctime, dirty[1])
            else:
                del self._dirty[attr.inode]
        return size, mtime, ctime

    def _export(self, attr: Attr) -> Attr:
        """The engine's attr as the kernel sees it: local sizes, the kernel's numbers (a
        copy when they differ; callers only read it)."""
        if self.root == ROOT_INODE and (not attr.is_file() or attr.inode not in self._dirty):
            return attr
        out = dataclasses.replace(attr)
        if attr.is_file():
            out.size, out.mtime, out.ctime = self._local_size(attr)
        out.inode = self._out(attr.inode)
        out.parent = self._out(attr.parent) if attr.parent else 0
        return out

    def _remember(self, parent: int, name: bytes, attr: Attr) -> None:
        self._attrs.put(attr.inode, attr)
        if name not in (b".", b".."):
            ttl = self.options.dir_entry_ttl if attr.is_dir() else self.options.entry_ttl
            self._entries.put((parent, name), attr.inode, ttl)

    def _created(self, parent: int, name: bytes, attr: Attr, made: bool = True) -> None:
        """parent/name now names attr; made: by the engine's create (which leaves the
        parent's new attributes in meta.known_dir_attr), not by a link."""
        self._remember(parent, name, attr)
        pattr = self.meta.known_dir_attr(parent) if made else None
        if pattr is not None:
            self._attrs.put(parent, pattr)
        else:
            self._attrs.pop(parent)  # its mtime (and nlink for a directory) changed
        self._listings.add(parent, name)
        if made and attr.is_dir():
            self._listings.start(attr.inode)
        self._note_entry(parent, name)

    async def _victim(self, parent: int, name: bytes) -> int | None:
        """The inode an unlink/rename is about to change, to drop its cached attributes."""
        ino = self._entries.get((parent, name))
        if ino is not None:
            return ino
        try:
            ino, _ = await self.meta.lookup(ROOT_CTX, parent, name)
        except FSError:
            return None
        return ino

    def _forget(self, *inodes: int | None) -> None:
        for ino in inodes:
            if ino is not None:
                self._attrs.pop(ino)

    # -- change notes ---------------------------------------------------------------------

    def _note(self, ino: int | None, data: bool = False) -> None:
        if self.changes is not None and ino is not None:
            self.changes.inode(ino, data)

    def _note_entry(self, parent: int, name: bytes) -> None:
        if self.changes is not None:
            self.changes.entry(parent, name)

    def _heard(self, inodes: dict[int, bool], entries: list[tuple[int, bytes]]) -> None:
        """Another mount changed these: drop what is cached of them, here and (through
        on_invalidate) in the kernel."""
        for ino, data in inodes.items():
            self._attrs.pop(ino)
            if data:
                self._chunks.invalidate(ino)
        for parent, name in entries:
            self._entries.pop((parent, name))
            self._listings.drop(parent)
        if self.on_invalidate is not None:
            out = {self._out(ino): data for ino, data in inodes.items()}
            self.on_invalidate(out, [(self._out(p), n) for p, n in entries])

    def _reset(self) -> None:
        """Notes may have been missed: forget every cached name, attribute and slice."""
        self._attrs.clear()
        self._entries.clear()
        self._listings.clear()
        self._chunks.clear()

    def _check_rw(self) -> None:
        if self.options.read_only:
            raise FSError(errno.EROFS, "the file system is mounted read-only")

    async def _committed(self, inode: int, index: int, attr: Attr) -> None:
        """The writer committed a slice of inode's chunk index: attr is the new state."""
        self._chunks.invalidate(inode, index)
        if attr is not None:
            self._attrs.put(inode, attr)
        self._note(inode, data=True)
        if self.on_commit is not None:
            result = self.on_commit(inode, index, attr)
            if asyncio.iscoroutine(result):
                await result

    async def _flush_inode(self, ino: int) -> None:
        """Commits ino's pending writes (before a read, truncate or setattr)."""
        if self._writer_busy(ino):
            await self.writer.flush(ino)
        self._settle(ino)

    def _settle(self, ino: int) -> None:
        """Forgets the local size of ino's writes once they are all committed."""
        if ino in self._dirty and not self._writer_busy(ino):
            del self._dirty[ino]

    async def _truncate(self, ctx: Ctx, ino: int, size: int) -> Attr:
        await self._flush_inode(ino)
        attr = await self.meta.truncate(ctx, ino, size)
        self._chunks.invalidate(ino)
        self._dirty.pop(ino, None)
        self._attrs.put(ino, attr)
        self._note(ino, data=True)
        return attr

    # -- namespace ----------------------------------------------------------------------------

    @_op("lookup")
    async def lookup(self, ctx: Ctx, parent: int, name: bytes) -> Attr:
        p = self._in(parent)
        if name == b".." and p == self.root:
            attr = await self._attr(p)
            perms.check(ctx, attr, X_OK)
            return self._export(attr)
        ino = self._entries.get((p, name))
        if ino is not None:
            pattr = await self._attr(p)
            perms.check(ctx, pattr, X_OK)
            try:
                attr = await self._attr(ino)
            except FSError as error:
                if error.errno != errno.ENOENT:
                    raise
                self._entries.pop((p, name))
            else:
                self.stats.entry_hits += 1
                return self._export(attr)
        if name not in (b".", b"..") and self._listings.absent(p, name):
            perms.check(ctx, await self._attr(p), X_OK)
            if len(name) > MAX_NAME:
                raise FSError(errno.ENAMETOOLONG, "name too long")
            self.stats.entry_hits += 1
            raise FSError(errno.ENOENT, f"no entry {name!r} in {p}")
        self.stats.entry_misses += 1
        ino, attr = await self.meta.lookup(ctx, p, name)
        self._remember(p, name, attr)
        return self._export(attr)

    async def forget(self, inodes: list[tuple[int, int]]) -> None:
        """The kernel dropped these inodes: nothing is kept per lookup count."""

    @_op("getattr")
    async def getattr(self, ctx: Ctx | None, inode: int, fh: int | None = None) -> Attr:
        return self._export(await self._attr(self._in(inode)))

    @_op("setattr")
    async def setattr(
        self,
        ctx: Ctx,
        inode: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime: int | None = None,
        mtime: int | None = None,
        fh: int | None = None,
    ) -> Attr:
        """Changes what is not None. Times are nanoseconds, or UTIME_NOW / UTIME_OMIT.

        Pending writes are committed first: they were made before this call, so a later
        commit must not override the new size, times or mode."""
        self._check_rw()
        ino = self._in(inode)
        await self._flush_inode(ino)
        attr = None
        if size is not None:
            tctx = ctx
            if fh is not None:
                if not self.handles.file(fh).writable:
                    raise FSError(errno.EBADF, "handle not open for writing")
                tctx = ROOT_CTX  # ftruncate: the open checked write access already
            attr = await self._truncate(tctx, ino, size)
        if any(v is not None for v in (mode, uid, gid, atime, mtime)):
            attr = await self.meta.setattr(
                ctx, ino, mode=mode, uid=uid, gid=gid, atime=atime, mtime=mtime
            )
            self._attrs.put(ino, attr)
        if attr is None:
            attr = await self._attr(ino)
        else:
            self._note(ino, data=size is not None)
        return self._export(attr)

    @_op("readlink")
    async def readlink(self, ctx: Ctx | None, inode: int) -> bytes:
        ino = self._in(inode)
        target = self._symlinks.get(ino)
        if target is None:
            target = await self.meta.readlink(ino)
            self._symlinks.put(ino, target)
        return target

    @_op("mknod")
    async def mknod(self, ctx: Ctx, parent: int, name: bytes, mode: int, rdev: int = 0) -> Attr:
        """mode carries the type bits (S_IFREG when none) and the permissions."""
        self._check_rw()
        p = self._in(parent)
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        _, attr = await self.meta.mknod(ctx, p, name, kind, mode & 0o7777, rdev)
        self._created(p, name, attr)
        return self._export(attr)

    @_op("mkdir")
    async def mkdir(self, ctx: Ctx, parent: int, name: bytes, mode: int) -> Attr:
        """Like Linux, mkdir takes no set-user/group-ID bits from mode (a directory gets
        set-group-ID from its parent only)."""
        self._check_rw()
        p = self._in(parent)
        _, attr = await self.meta.mkdir(ctx, p, name, mode & (0o777 | stat.S_ISVTX))
        self._created(p, name, attr)
        return self._export(attr)

    @_op("symlink")
    async def symlink(self, ctx: Ctx, parent: int, name: bytes, target: bytes) -> Attr:
        self._check_rw()
        p = self._in(parent)
        _, attr = await self.meta.symlink(ctx, p, name, target)
        self._created(p, name, attr)
        self._symlinks.put(attr.inode, target)
        return self._export(attr)

    @_op("link")
    async def link(self, ctx: Ctx, inode: int, newparent: int, newname: bytes) -> Attr:
        self._check_rw()
        ino, np = self._in(inode), self._in(newparent)
        attr = await self.meta.link(ctx, ino, np, newname)
        self._created(np, newname, attr, made=False)
        self._note(ino)
        return self._export(attr)

    @_op("unlink")
    async def unlink(self, ctx: Ctx, parent: int, name: bytes) -> None:
        self._check_rw()
        p = self._in(parent)
        victim = await self._victim(p, name)
        try:
            await self.meta.unlink(ctx, p, name)
        finally:
            self._entries.pop((p, name))
            self._forget(victim, p)
        pattr = self.meta.known_dir_attr(p)  # what the unlink wrote
        if pattr is not None:
            self._attrs.put(p, pattr)
        self._listings.discard(p, name)
        self._note_entry(p, name)
        self._note(victim)

    @_op("rmdir")
    async def rmdir(self, ctx: Ctx, parent: int, name: bytes) -> None:
        self._check_rw()
        p = self._in(parent)
        victim = await self._victim(p, name)
        try:
            await self.meta.rmdir(ctx, p, name)
        finally:
            self._entries.pop((p, name))
            self._forget(victim, p)
        self._listings.discard(p, name)
        if victim is not None:
            self._listings.drop(victim)
        self._note_entry(p, name)

    @_op("rename")
    async def rename(
        self,
        ctx: Ctx,
        parent: int,
        name: bytes,
        newparent: int,
        newname: bytes,
        flags: int = 0,
    ) -> None:
        """flags: RENAME_NOREPLACE or RENAME_EXCHANGE (Linux renameat2 values)."""
        self._check_rw()
        p, np = self._in(parent), self._in(newparent)
        moved = await self._victim(p, name)
        replaced = await self._victim(np, newname)
        try:
            await self.meta.rename(ctx, p, name, np, newname, flags)
        finally:
            self._entries.pop((p, name))
            self._entries.pop((np, newname))
            self._forget(moved, replaced, p, np)
        if not flags & RENAME_EXCHANGE:
            self._listings.discard(p, name)
            self._listings.add(np, newname)
        self._note_entry(p, name)
        self._note_entry(np, newname)
        self._note(moved)
        self._note(replaced)

    # -- files --------------------------------------------------------------------------------

    @_op("open")
    async def open(self, ctx: Ctx, inode: int, flags: int) -> int:
        """Opens an inode; the answer is the handle for read/write/flush/release.

        Close-to-open: the attributes are fetched afresh and the file's cached slices
        dropped, so this open sees everything other clients committed before it."""
        ino = self._in(inode)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing or flags & os.O_TRUNC:
            self._check_rw()
        attr = await self.meta.open(ctx, ino, flags)
        try:
            self._attrs.put(ino, attr)
            self._chunks.invalidate(ino)
            if attr.is_file() and flags & os.O_TRUNC:
                await self._truncate(ROOT_CTX, ino, 0)  # meta.open checked write access
            writer = self.writer.open(ino, ctx) if writing and attr.is_file() else None
        except BaseException:
            await self.meta.close(ino)
            raise
        return self.handles.add_file(ino, flags, ctx, writer).fh

    @_op("create")
    async def create(
        self, ctx: Ctx, parent: int, name: bytes, mode: int, flags: int
    ) -> tuple[int, Attr]:
        """Makes a regular file and opens it. Without O_EXCL an existing file is opened
        instead, as open(2) with O_CREAT does."""
        self._check_rw()
        p = self._in(parent)
        try:
            ino, attr = await self.meta.create(ctx, p, name, mode & 0o7777, flags)
        except FSError as error:
            if error.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            existing = await self.lookup(ctx, parent, name)
            fh = await self.open(ctx, existing.inode, flags & ~(os.O_CREAT | os.O_EXCL))
            return fh, self._export(await self._attr(self._in(existing.inode)))
        self._created(p, name, attr)
        writer = None
        if flags & os.O_ACCMODE != os.O_RDONLY:
            writer = self.writer.open(ino, ctx)
        return self.handles.add_file(ino, flags, ctx, writer).fh, self._export(attr)

    @_op("read")
    async def read(self, fh: int, offset: int, size: int, view: bool = False) -> bytes | memoryview:
        """view=True: the answer may be a read-only view of a cached block (no copy)."""
        h = self.handles.file(fh)
        if not h.readable:
            raise FSError(errno.EBADF, "handle not open for reading")
        if offset < 0 or size < 0:
            raise FSError(errno.EINVAL, "negative offset or size")
        ino = h.inode
        if self._writer_busy(ino):
            self.stats.flushes_for_read += 1
            await self._flush_inode(ino)
        attr = await self._attr(ino)
        if not attr.is_file():
            raise FSError(errno.EISDIR if attr.is_dir() else errno.EINVAL, "not a regular file")
        if offset >= attr.size or size == 0:
            return b""
        self._chunks.expect(ino, attr.size)
        try:
            data = await self.reader.read(ino, offset, size, attr.size, fh, view)
        except NotFound:
            # Cached slices named objects compaction has since replaced: read them afresh.
            self._chunks.invalidate(ino)
            attr = await self._attr(ino, fresh=True)
            self._chunks.expect(ino, attr.size)
            data = await self.reader.read(ino, offset, size, attr.size, fh, view)
        self.stats.bytes_read += len(data)
        return data

    @_op("write")
    async def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        """Buffers data at offset (at the end of the file for O_APPEND); the bytes are
        committed by flush/fsync/release, by back-pressure, or when the file goes idle."""
        h = self.handles.file(fh)
        if not h.writable or h.writer is None:
            raise FSError(errno.EBADF, "handle not open for writing")
        self._check_rw()
        ino = h.inode
        n = len(data)
        if h.append:
            offset = self._local_size(await self._attr(ino))[0]
        if offset < 0:
            raise FSError(errno.EINVAL, "negative offset")
        if n == 0:
            return 0
        if offset + n > MAX_FILE_SIZE:
            raise FSError(errno.EFBIG, "file too large")
        await self._kill_priv(h)
        self._data_changed(ino)
        await h.writer.write(offset, data)
        end, _ = self._dirty.get(ino, (0, 0))
        self._dirty[ino] = (max(end, offset + n), time.time_ns())
        self.stats.bytes_written += n
        return n

    def _data_changed(self, ino: int | None) -> None:
        if self.on_data_changed is not None:
            self.on_data_changed(ino)

    def local_extents(self, fh: int, offset: int) -> LocalExtents | None:
        """Where the bytes of the chunk around `offset` of fh's file lie on local disk, for
        a FUSE layer that answers reads of them itself: only for a file:// store with
        uncompressed blocks, a handle open for reading, nothing buffered for the file, and
        its attributes and slices in the caches (no Redis here). None otherwise: reads keep
        coming to read(). What it answers holds until on_data_changed(inode) or `expires`
        (time.monotonic()): the caches it came from end then."""
        store = local_file_store(self.store)
        if store is None or self.reader.codec.name != "none":
            return None
        cache = getattr(self.store, "cache", None)
        if cache is not None and cache.disk_enabled:
            return None  # a disk cache asked for by name (--cache-dir): reads go through it
        h = self.handles.files.get(fh)
        if h is None or not h.readable:
            return None
        ino = h.inode
        if ino in self._dirty or self._writer_busy(ino):
            return None
        cached_attr = self._attrs.peek(ino)
        if cached_attr is None or not cached_attr[0].is_file():
            return None
        attr, attr_expires = cached_attr
        if offset >= attr.size:
            return None
        chunk_size = self.reader.chunk_size
        index = offset // chunk_size
        self._chunks.expect(ino, attr.size)
        cached_chunk = self._chunks.peek(ino, index)
        if cached_chunk is None:
            return None
        segments, chunk_expires = cached_chunk
        base = index * chunk_size
        span = layout.ChunkSpan(index, 0, min(chunk_size, attr.size - base), 0)
        extents = [
            (base + p.dest, base + p.dest + p.length, str(store._path(p.key)), p.start)
            for p in self.reader._chunk_pieces(span, segments)
        ]
        return LocalExtents(ino, index, attr.size, min(attr_expires, chunk_expires), extents)

    async def _kill_priv(self, h: FileHandle) -> None:
        """A write by anyone but root clears set-user-ID (and set-group-ID with group
        execute) at once, not only when the slice is committed."""
        if h.ctx.uid == 0:
            return
        attr = await self._attr(h.inode)
        if perms.killpriv(attr.mode) != attr.mode:
            self._attrs.put(h.inode, await self.meta.clear_suid_on_write(h.ctx, h.inode))

    @_op("flush")
    async def flush(self, fh: int, lock_owner: int | None = None) -> None:
        """close(2) of one descriptor: commits the writes, drops lock_owner's record locks."""
        h = self.handles.file(fh)
        try:
            if h.writer is not None:
                await h.writer.flush()
                self._settle(h.inode)
        finally:
            # POSIX: any close drops the process's locks on the file, whichever open took them.
            if lock_owner is not None:
                held = [o for o in self.handles.of_inode(h.inode) if lock_owner in o.posix_owners]
                for o in held:
                    o.posix_owners.discard(lock_owner)
                if held:
                    await self.meta.setlk(h.inode, lock_owner, False, F_UNLCK, 0, MAX_LOCK_END, 0)

    @_op("fsync")
    async def fsync(self, fh: int, datasync: bool = False) -> None:
        h = self.handles.file(fh)
        if h.writer is not None:
            await h.writer.flush()
            self._settle(h.inode)
        else:
            await self._flush_inode(h.inode)

    @_op("release")
    async def release(self, fh: int) -> None:
        """The last close of an open: commits the writes, drops the handle's locks and the
        open (the last close of an unlinked file deletes it). Raises the first failure
        after doing everything."""
        h = self.handles.pop_file(fh)
        errors: list[BaseException] = []
        if h.writer is not None:
            await _collect(errors, h.writer.close())
            self._settle(h.inode)
        self.reader.forget(fh)
        if h.flock_owner is not None:
            await _collect(errors, self.meta.flock(h.inode, h.flock_owner, F_UNLCK))
        for owner in h.posix_owners:
            await _collect(
                errors, self.meta.setlk(h.inode, owner, False, F_UNLCK, 0, MAX_LOCK_END, 0)
            )
        await _collect(errors, self.meta.close(h.inode))
        cached = self._attrs.get(h.inode)
        if cached is not None and cached.nlink == 0:  # the last close may have deleted it
            self._attrs.pop(h.inode)
            self._chunks.invalidate(h.inode)
        if errors:
            raise errors[0]

    @_op("fallocate")
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        h = self.handles.file(fh)
        if not h.writable:
            raise FSError(errno.EBADF, "handle not open for writing")
        self._check_rw()
        await self._flush_inode(h.inode)
        attr = await self.meta.fallocate(h.ctx, h.inode, mode, offset, length)
        self._chunks.invalidate(h.inode)
        self._dirty.pop(h.inode, None)
        self._attrs.put(h.inode, attr)
        self._note(h.inode, data=True)

    @_op("copy_file_range")
    async def copy_file_range(
        self, fh_in: int, off_in: int, fh_out: int, off_out: int, size: int, flags: int = 0
    ) -> int:
        """Copies by reference: the destination names the source's slices, no data moves."""
        hin, hout = self.handles.file(fh_in), self.handles.file(fh_out)
        if not hin.readable or not hout.writable:
            raise FSError(errno.EBADF, "handles not open for reading and writing")
        self._check_rw()
        await self._flush_inode(hin.inode)
        await self._flush_inode(hout.inode)
        n = await self.meta.copy_file_range(
            hout.ctx, hin.inode, off_in, hout.inode, off_out, size, flags
        )
        self._chunks.invalidate(hout.inode)
        self._dirty.pop(hout.inode, None)
        self._attrs.pop(hout.inode)
        self._note(hout.inode, data=True)
        return n

    # -- directories --------------------------------------------------------------------------

    @_op("opendir")
    async def opendir(self, ctx: Ctx, inode: int) -> int:
        ino = self._in(inode)
        attr = await self.meta.open(ctx, ino, os.O_RDONLY)
        if not attr.is_dir():
            raise FSError(errno.ENOTDIR, f"inode {inode} is not a directory")
        self._attrs.put(ino, attr)
        return self.handles.add_dir(ino, ctx).fh

    @_op("readdir")
    async def readdir(self, dh: int, offset: int = 0, limit: int = READDIR_PAGE) -> list[DirEntry]:
        """Up to `limit` entries from `offset` ("." and ".." first); [] at the end.

        Offset 0 reads the directory afresh (rewinddir); any other offset continues the
        listing this handle has read so far, so offsets stay stable while it is open."""
        d = self.handles.dir(dh)
        if offset < 0:
            raise FSError(errno.EINVAL, "negative offset")
        if offset == 0 or not d.entries:
            await self._start_listing(d)
        while offset + limit > len(d.entries) and not d.done:
            await self._load_page(d)
        return d.entries[offset : offset + limit]

    async def _start_listing(self, d: DirHandle) -> None:
        attr = await self._attr(d.inode, fresh=True)
        pattr = attr
        if d.inode != self.root and attr.parent:
            try:
                pattr = await self._attr(attr.parent)
            except FSError:
                pattr = attr
        d.entries = [DirEntry(b".", self._export(attr), 1), DirEntry(b"..", self._export(pattr), 2)]
        d.cursor = b""
        d.done = False

    async def _load_page(self, d: DirHandle) -> None:
        page = await self.meta.readdir(
            d.ctx, d.inode, start_after=d.cursor, limit=self.options.readdir_page, plus=True
        )
        if not page:
            d.done = True
            return
        for e in page:
            self._attrs.put(e.inode, e.attr)
            d.entries.append(DirEntry(e.name, self._export(e.attr), len(d.entries) + 1))
        d.cursor = page[-1].name

    @_op("releasedir")
    async def releasedir(self, dh: int) -> None:
        self.handles.pop_dir(dh)

    async def fsyncdir(self, dh: int, datasync: bool = False) -> None:
        """Directory changes are committed when they happen: nothing to do."""
        self.handles.dir(dh)

    # -- the rest -------------------------------------------------------------------------------

    @_op("statfs")
    async def statfs(self, ctx: Ctx | None = None) -> StatFs:
        """Space and inodes of the volume, or of the subdir's quota when it has one."""
        return await self.meta.statfs(self.root)

    @_op("access")
    async def access(self, ctx: Ctx, inode: int, mask: int) -> None:
        if mask & W_OK and self.options.read_only:
            raise FSError(errno.EROFS, "the file system is mounted read-only")
        await self.meta.access(ctx, self._in(inode), mask)

    @_op("getxattr")
    async def getxattr(self, ctx: Ctx, inode: int, name: bytes) -> bytes:
        return await self.meta.getxattr(ctx, self._in(inode), name)

    @_op("listxattr")
    async def listxattr(self, ctx: Ctx, inode: int) -> list[bytes]:
        return await self.meta.listxattr(ctx, self._in(inode))

    @_op("setxattr")
    async def setxattr(
        self, ctx: Ctx, inode: int, name: bytes, value: bytes, flags: int = 0
    ) -> None:
        """flags: XATTR_CREATE or XATTR_REPLACE."""
        self._check_rw()
        ino = self._in(inode)
        try:
            await self.meta.setxattr(ctx, ino, name, value, flags)
        finally:
            self._attrs.pop(ino)  # ctime
        self._note(ino)

    @_op("removexattr")
    async def removexattr(self, ctx: Ctx, inode: int, name: bytes) -> None:
        self._check_rw()
        ino = self._in(inode)
        try:
            await self.meta.removexattr(ctx, ino, name)
        finally:
            self._attrs.pop(ino)
        self._note(ino)

    @_op("flock")
    async def flock(self, fh: int, owner: int, type: int, block: bool = False) -> None:
        """BSD lock of the whole file: F_RDLCK (shared), F_WRLCK, F_UNLCK."""
        h = self.handles.file(fh)
        h.flock_owner = owner
        await self.meta.flock(h.inode, owner, type, block)

    @_op("getlk")
    async def getlk(
        self, fh: int, owner: int, type: int, start: int, end: int, pid: int
    ) -> tuple[int, int, int, int]:
        """(type, start, end, pid) of the first lock in the way, or (F_UNLCK, 0, 0, 0)."""
        h = self.handles.file(fh)
        return await self.meta.getlk(h.inode, owner, type, start, end, pid)

    @_op("setlk")
    async def setlk(
        self,
        fh: int,
        owner: int,
        type: int,
        start: int,
        end: int,
        pid: int,
        block: bool = False,
    ) -> None:
        """A POSIX record lock of [start, end] (inclusive); blocking waits until granted."""
        h = self.handles.file(fh)
        if type != F_UNLCK:
            h.posix_owners.add(owner)
        await self.meta.setlk(h.inode, owner, block, type, start, end, pid)


async def _collect(errors: list[BaseException], work: Awaitable[Any]) -> None:
    """Awaits work, adding its failure (not cancellation) to errors instead of raising."""
    try:
        await work
    except Exception as error:
        errors.append(error)
