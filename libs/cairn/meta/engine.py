"""The metadata engine's entry points: format a volume, open it as a Meta, purge the trash.

`Meta` gathers the operations of the mixins beside this module (namespace, data, xattrs,
quotas, locks, sessions, dump) over one Redis connection pool. Import from here:

    from cairn.meta.engine import Meta, Format, Ctx, format_volume
"""

from __future__ import annotations

import asyncio
import calendar
import contextvars
import errno
import functools
import inspect
import json
import logging
import stat
import time
import uuid as uuidlib

from cairn.errors import ConfigError, FSError, UnavailableError
from cairn.meta import keys
from cairn.meta.base import (
    REDIS_ERRORS,
    MetaBase,
    Tx,
    connect,
    now_ns,
    read_format,
    safe_url,
    unavailable,
)
from cairn.meta.data import DataMixin
from cairn.meta.dump import DumpMixin, load
from cairn.meta.locks import LockMixin
from cairn.meta.namespace import NamespaceMixin
from cairn.meta.quota import QuotaMixin
from cairn.meta.sessions import SessionMixin
from cairn.meta.slices import SliceRecord, resolve
from cairn.meta.types import (
    CHUNK_SIZE,
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    MAX_NLINK,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_CTX,
    ROOT_INODE,
    TRASH_INODE,
    TRASH_NAME,
    UTIME_NOW,
    UTIME_OMIT,
    XATTR_CREATE,
    XATTR_REPLACE,
    Attr,
    Ctx,
    Entry,
    Format,
    Quota,
    SliceView,
    StatFs,
    unpack_entry,
)
from cairn.meta.xattrs import XattrMixin
from cairn.retry import Backoff

log = logging.getLogger(__name__)

__all__ = [
    "CHUNK_SIZE", "F_RDLCK", "F_UNLCK", "F_WRLCK", "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE", "FALLOC_FL_ZERO_RANGE", "MAX_NLINK", "RENAME_EXCHANGE",
    "RENAME_NOREPLACE", "ROOT_CTX", "ROOT_INODE", "TRASH_INODE", "TRASH_NAME", "UTIME_NOW",
    "UTIME_OMIT", "XATTR_CREATE", "XATTR_REPLACE", "Attr", "Ctx", "Entry", "Format", "Meta",
    "Quota", "SliceRecord", "SliceView", "StatFs", "format_volume", "load", "resolve",
]  # fmt: skip

# Settings a second format may not change (uuid is generated once and kept).
_COMPARED = ("name", "storage", "block_size", "compress", "trash_days", "capacity", "inodes",
             "chunk_size")  # fmt: skip


_WAITING: contextvars.ContextVar[bool] = contextvars.ContextVar("cairn_meta_waiting", default=False)
OUTAGE_BACKOFF = Backoff(initial=0.05, maximum=1.0)


def _map_redis_errors(cls):
    """Every public coroutine (and async generator) of cls turns Redis outages into
    UnavailableError naming the URL.

    With `outage_wait` > 0 (a mount sets it), a coroutine that meets an outage runs again,
    with backoff, until it succeeds or outage_wait seconds have passed: a Redis restart or
    a short network loss makes operations wait, not fail. Only the outermost call waits
    (one public method calling another does not wait twice). A command whose connection
    broke after Redis ran it is run again: the scripts and transactions then find their
    work done and answer accordingly (an O_EXCL create can so answer EEXIST for the file
    it made), the price of not failing every operation in flight at a restart."""

    def wrap(fn):
        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def agen(self, *args, **kwargs):
                try:
                    async for item in fn(self, *args, **kwargs):
                        yield item
                except REDIS_ERRORS as error:
                    raise unavailable(self.url, error) from None

            return agen

        @functools.wraps(fn)
        async def coro(self, *args, **kwargs):
            if self.outage_wait <= 0 or _WAITING.get():
                try:
                    return await fn(self, *args, **kwargs)
                except REDIS_ERRORS as error:
                    raise unavailable(self.url, error) from None
            token = _WAITING.set(True)
            try:
                return await _waiting_out_outages(self, fn, args, kwargs)
            finally:
                _WAITING.reset(token)

        return coro

    for name in dir(cls):
        if name.startswith("_") or name == "open":
            continue
        fn = getattr(cls, name)
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            setattr(cls, name, wrap(fn))
    return cls


async def _waiting_out_outages(meta, fn, args, kwargs):
    deadline = None
    attempt = 0
    while True:
        try:
            result = await fn(meta, *args, **kwargs)
            if attempt:
                log.info("metadata engine %s answers again", safe_url(meta.url))
            return result
        except (*REDIS_ERRORS, UnavailableError) as error:
            failure = error if isinstance(error, UnavailableError) else unavailable(meta.url, error)
            now = time.monotonic()
            if deadline is None:
                deadline = now + meta.outage_wait
                log.warning("%s; waiting up to %.0f s for it", failure, meta.outage_wait)
            if now >= deadline:
                raise failure from None
            meta.stats.outage_retries += 1
            await asyncio.sleep(min(OUTAGE_BACKOFF.delay(attempt), deadline - now))
            attempt += 1


class _OpenDescriptor:
    """`Meta.open(url)` connects; `meta.open(ctx, inode, flags)` opens a file (open_file)."""

    def __get__(self, obj, owner):
        if obj is None:
            return functools.partial(owner._connect, owner)
        return obj.open_file


@_map_redis_errors
class Meta(
    NamespaceMixin,
    DataMixin,
    XattrMixin,
    QuotaMixin,
    LockMixin,
    SessionMixin,
    DumpMixin,
    MetaBase,
):
    """A client of one volume's metadata in Redis. Safe with many clients on one Redis."""

    open = _OpenDescriptor()

    @staticmethod
    async def _connect(cls: type[Meta], url: str) -> Meta:
        """Connects to the volume at url: UnavailableError if Redis cannot be reached,
        ConfigError if it holds no formatted volume."""
        r = connect(url)
        try:
            await r.ping()
        except REDIS_ERRORS as error:
            await r.aclose()
            raise unavailable(url, error) from None
        fmt = await read_format(r, url)
        if fmt is None:
            await r.aclose()
            raise ConfigError(f"{safe_url(url)} holds no Cairn volume: run cairn format first")
        return cls(url, r, fmt)

    async def close(self, inode: int | None = None) -> None:
        """close(inode) ends one open of a file (close_file); close() ends the client."""
        if inode is not None:
            await self.close_file(inode)
            return
        if self._lua is not None:
            await self._lua.close()
        await self.r.aclose()

    async def reload_format(self) -> Format:
        fmt = await read_format(self.r, self.url)
        if fmt is not None:
            self.fmt = fmt
        return self.fmt

    # -- trash --------------------------------------------------------------------------

    async def purge_trash(self, now: float | None = None) -> int:
        """Deletes files that have been in the trash for trash_days; returns how many."""
        now = time.time() if now is None else now
        keep = self.fmt.trash_days * 86400
        purged = 0
        async for hours in self._scan_names(TRASH_INODE):
            for hour in hours:
                try:
                    start = calendar.timegm(time.strptime(hour.decode(), "%Y-%m-%d-%H"))
                except ValueError:
                    continue
                if start + 3600 + keep > now:
                    continue
                sub, _ = await self.lookup(ROOT_CTX, TRASH_INODE, hour)
                while entries := await self.readdir(ROOT_CTX, sub, limit=1000):
                    for e in entries:
                        try:
                            if e.type == stat.S_IFDIR:
                                await self.rmdir(ROOT_CTX, sub, e.name)
                            else:
                                await self._unlink(ROOT_CTX, sub, e.name, keep=True)
                            purged += 1
                        except FSError as error:
                            if error.errno != errno.ENOENT:
                                raise
                try:
                    await self.rmdir(ROOT_CTX, TRASH_INODE, hour)
                except FSError as error:
                    if error.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                        raise
                self._trash_dirs.pop(hour, None)
        return purged

    # -- maintenance ----------------------------------------------------------------------

    async def status(self) -> dict:
        r = self.r
        pipe = r.pipeline(transaction=False)
        for k in (keys.USED_SPACE, keys.USED_INODES, keys.NEXT_INODE, keys.NEXT_SLICE):
            pipe.get(k)
        pipe.zcard(keys.SESSIONS)
        pipe.hlen(keys.SLICE_REFS)
        pipe.zcard(keys.DELETED_SLICES)
        pipe.zcard(keys.DELETED_FILES)
        pipe.hlen(keys.QUOTA)
        (
            used_space,
            used_inodes,
            next_inode,
            next_slice,
            sessions,
            slices,
            pending,
            deleting,
            q,
        ) = await pipe.execute()
        trash = 0
        async for hours in self._scan_names(TRASH_INODE):
            for hour in hours:
                value = await r.hget(keys.entries(TRASH_INODE), hour)
                if value is not None:
                    trash += await r.hlen(keys.entries(unpack_entry(value)[1]))
        return {
            "format": self.fmt.to_dict(),
            "session": self.sid,
            "sessions": sessions,
            "used_space": int(used_space or 0),
            "used_inodes": int(used_inodes or 0),
            "next_inode": int(next_inode or 0),
            "next_slice": int(next_slice or 0),
            "slices": slices,
            "pending_slice_deletes": pending,
            "files_being_freed": deleting,
            "quotas": q,
            "trash_files": trash,
            "txn": self.stats.txn,
            "txn_restarts": self.stats.txn_restarts,
        }


async def format_volume(url: str, fmt: Format) -> Format:
    """Formats a volume, or checks that the stored one has these settings.

    Formatting again with the same settings is a no-op returning what is stored; different
    settings (other than uuid) raise ConfigError naming the fields that differ."""
    if fmt.chunk_size != CHUNK_SIZE:
        raise ConfigError(f"chunk_size is fixed at {CHUNK_SIZE}")
    if fmt.block_size <= 0 or fmt.block_size > CHUNK_SIZE or fmt.trash_days < 0:
        raise ConfigError("block_size must be in (0, 64 MiB] and trash_days >= 0")
    r = connect(url)
    try:
        try:
            return await _format(r, url, fmt)
        except REDIS_ERRORS as error:
            raise unavailable(url, error) from None
    finally:
        await r.aclose()


async def _format(r, url: str, fmt: Format) -> Format:
    stored = await read_format(r, url)
    if stored is not None:
        return _same(stored, fmt)
    fresh = Format.from_dict({**fmt.to_dict(), "uuid": fmt.uuid or str(uuidlib.uuid4())})
    now = now_ns()
    root = Attr(ROOT_INODE, stat.S_IFDIR | 0o777, 0, 0, 4096, 2, 0, now, now, now, ROOT_INODE)
    trash = Attr(TRASH_INODE, stat.S_IFDIR | 0o700, 0, 0, 4096, 2, 0, now, now, now, ROOT_INODE)

    async def body(tx: Tx) -> Format | None:
        if await tx.p.exists(keys.SETTING):
            return None
        p = tx.multi()
        p.set(keys.attr(ROOT_INODE), root.pack())
        p.set(keys.attr(TRASH_INODE), trash.pack())
        p.set(keys.NEXT_INODE, TRASH_INODE)
        p.set(keys.NEXT_SLICE, 0)
        p.set(keys.USED_SPACE, 0)
        p.set(keys.USED_INODES, 0)
        p.set(keys.SETTING, json.dumps(fresh.to_dict()))
        return fresh

    tmp = MetaBase(url, r, fresh)
    done = await tmp._txn(body, keys.SETTING)
    if done is None:  # someone formatted it meanwhile
        return _same(await read_format(r, url), fmt)
    return done


def _same(stored: Format, wanted: Format) -> Format:
    differ = [f for f in _COMPARED if getattr(stored, f) != getattr(wanted, f)]
    if differ:
        shown = ", ".join(f"{f} ({getattr(stored, f)!r} != {getattr(wanted, f)!r})" for f in differ)
        raise ConfigError(
            f"volume {stored.name!r} is already formatted with other settings: {shown}"
        )
    return stored
