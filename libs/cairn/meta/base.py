"""The engine's foundations: the Redis connection, optimistic transactions, id batches,
usage and quota accounting, and freeing the data of deleted files.

Every multi-key change runs in `_txn`: WATCH the keys it reads, read, MULTI, queue the
writes, EXEC; a conflict (another client changed a watched key) restarts it with backoff,
and the restart is counted. Transactions of this process on the same inode are also
serialised by local locks first, so a busy directory conflicts only across clients.
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from cairn.errors import ConfigError, ConflictError, FSError, UnavailableError
from cairn.meta import keys
from cairn.meta.lua import LuaChannel
from cairn.meta.slices import SliceRecord, unpack_records
from cairn.meta.types import (
    CHUNK_SIZE,
    MAX_NLINK,
    ROOT_INODE,
    TRASH_INODE,
    Attr,
    Format,
    Stats,
    space_of,
)
from cairn.retry import Backoff, retry

T = TypeVar("T")

ID_BATCH = 1000
TXN_BACKOFF = Backoff(initial=0.0005, maximum=0.05)
TXN_DEADLINE = 60.0
QUOTA_CACHE_SECONDS = 1.0
PARENT_CACHE_SECONDS = 1.0
CHUNK_BATCH = 256  # chunk keys handled per transaction when freeing a file
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


def now_ns() -> int:
    return time.time_ns()


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=user + host).geturl()


def connect(url: str) -> aioredis.Redis:
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"'{safe_url(url)}' is not a metadata URL: use redis://host:port/db")
    try:
        client = aioredis.from_url(url, decode_responses=False, socket_connect_timeout=5)
    except ValueError as error:
        raise ConfigError(f"'{safe_url(url)}' is not a valid metadata URL: {error}") from None
    pool = client.connection_pool
    pool.connection_class = _packing_in_c(pool.connection_class)
    return client


class _HiredisPacking:
    """Commands packed by hiredis (C) instead of redis-py's asyncio connection's Python
    loop, which costs tens of microseconds for a create script's 28 arguments."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str) and " " in first:  # "SCRIPT LOAD", "CLIENT SETNAME"...
            args = (*first.split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # memoryview, bytearray...: redis-py knows those
            return super().pack_command(*args)  # type: ignore[misc]


def _packing_in_c(connection_class: type) -> type:
    if issubclass(connection_class, _HiredisPacking):
        return connection_class
    return type(connection_class.__name__, (_HiredisPacking, connection_class), {})


def unavailable(url: str, error: BaseException) -> UnavailableError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return UnavailableError(f"metadata engine {safe_url(url)} unreachable: {reason}")


async def read_format(r: aioredis.Redis, url: str) -> Format | None:
    try:
        raw = await r.get(keys.SETTING)
    except REDIS_ERRORS as error:
        raise unavailable(url, error) from None
    return None if raw is None else Format.from_dict(json.loads(raw))


class _IdPool:
    def __init__(self, key: str):
        self.key = key
        self.next = 1
        self.end = 0
        self.lock = asyncio.Lock()


class Tx:
    """One attempt of a transaction: reads run at once (after WATCH), writes queue after multi()."""

    def __init__(self, pipe: Any):
        self.p = pipe
        self.queued = False
        self.after: Callable[[list], Any] | None = None  # maps EXEC results to the value

    async def watch(self, *names: str) -> None:
        if names:
            await self.p.watch(*names)

    def multi(self) -> Any:
        if not self.queued:
            self.p.multi()
            self.queued = True
        return self.p


class MetaBase:
    """Connection, transactions, ids, accounting. Mixed into cairn.meta.engine.Meta."""

    fmt: Format
    max_nlink: int = MAX_NLINK

    def __init__(self, url: str, r: aioredis.Redis, fmt: Format):
        self.url = url
        self.r = r
        self.fmt = fmt
        self.sid: int | None = None
        self.stats = Stats()
        self._inodes = _IdPool(keys.NEXT_INODE)
        self._slices = _IdPool(keys.NEXT_SLICE)
        self._locks = [asyncio.Lock() for _ in range(1024)]
        self._quota_dirs: set[int] = set()
        self._quota_loaded = 0.0
        self._parents: dict[int, tuple[int, float]] = {}
        self._opens: dict[int, int] = {}
        # Deferred last closes (cairn.meta.namespace close_file): waiting, and on the wire.
        self.close_delay = 0.0
        # Seconds an operation waits out a Redis outage before failing (cairn.meta.engine;
        # 0: fail at once, as tools and services want; a mount waits).
        self.outage_wait = 0.0
        self._closing: set[int] = set()
        self._orphans: set[int] = set()  # unlinked here while open: closes not deferred
        self._releasing: set[int] = set()
        self._close_lock = asyncio.Lock()
        self._closer: asyncio.Task[None] | None = None
        self._trash_dirs: dict[bytes, int] = {}
        self._session_info: dict[str, str] = {}
        self._scripts: dict[str, Any] = {}
        self._lua = LuaChannel.for_url(url)
        # Packed attributes of directories as this client last saw them: creates check
        # against them and the create script compares, so a stale one costs a round trip.
        self._dir_raw: dict[int, bytes] = {}

    # -- Lua scripts ------------------------------------------------------------------------

    def _script(self, name: str) -> Any:
        """redis-py's Script for `name`.lua beside this module (registered on first use)."""
        script = self._scripts.get(name)
        if script is None:
            text = (Path(__file__).parent / f"{name}.lua").read_text()
            script = self._scripts[name] = self.r.register_script(text)
        return script

    async def _eval(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Runs the script `name`.lua (EVALSHA, loaded on first use): over the lean
        connection of cairn.meta.lua when the URL allows, else through redis-py."""
        script = self._script(name)
        try:
            if self._lua is not None:
                return await self._lua.eval(script.sha, script.script, keys, args)
            return await script(keys=keys, args=args)
        except REDIS_ERRORS as error:
            raise unavailable(self.url, error) from None

    async def _eval_many(self, name: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Runs the script `name` once per (keys, args) in one pipelined round trip."""
        if not calls:
            return []
        script = self._script(name)
        try:
            if self._lua is not None:
                return await self._lua.eval_many(script.sha, script.script, calls)
            async with self.r.pipeline(transaction=False) as pipe:
                for script_keys, args in calls:
                    await script(keys=script_keys, args=args, client=pipe)
                return await pipe.execute()
        except REDIS_ERRORS as error:
            raise unavailable(self.url, error) from None

    async def publish(self, channel: str, message: bytes) -> None:
        """PUBLISH (change notes between mounts: cairn.vfs.changes)."""
        try:
            if self._lua is not None:
                await self._lua.command("PUBLISH", channel, message)
            else:
                await self.r.publish(channel, message)
        except REDIS_ERRORS as error:
            raise unavailable(self.url, error) from None

    def _remember_dir(self, ino: int, raw: bytes | None) -> None:
        if raw is None:
            self._dir_raw.pop(ino, None)
            return
        if len(self._dir_raw) >= 10_000:
            self._dir_raw.clear()
        self._dir_raw[ino] = raw

    def known_dir_attr(self, ino: int) -> Attr | None:
        """Directory ino's attributes as this client last wrote or read them (None when
        not remembered). Right after a create in it (mknod/mkdir/symlink/create) they are
        what Redis holds."""
        raw = self._dir_raw.get(ino)
        return None if raw is None else Attr.unpack(ino, raw)

    # -- transactions -------------------------------------------------------------------

    @asynccontextmanager
    async def _inode_locks(self, inodes: Iterable[int]):
        stripes = sorted({ino % len(self._locks) for ino in inodes})
        held: list[int] = []
        try:
            for s in stripes:  # a cancellation between two acquires releases the first
                await self._locks[s].acquire()
                held.append(s)
            yield
        finally:
            for s in reversed(held):
                self._locks[s].release()

    async def _txn(
        self,
        body: Callable[[Tx], Awaitable[T]],
        *watch: str,
        lock: Iterable[int] = (),
    ) -> T:
        """Runs body in WATCH/MULTI/EXEC, restarting it while other clients conflict."""

        async def attempt() -> T:
            async with self.r.pipeline(transaction=True) as pipe:
                tx = Tx(pipe)
                await tx.watch(*watch)
                value = await body(tx)
                if tx.queued:
                    results = await pipe.execute()
                    if tx.after is not None:
                        return tx.after(results)
                return value

        self.stats.txn += 1
        async with self._inode_locks(lock):
            try:
                return await retry(
                    attempt,
                    deadline=TXN_DEADLINE,
                    backoff=TXN_BACKOFF,
                    retry_on=(WatchError,),
                    on_retry=self._count_restart,
                )
            except WatchError as error:
                raise ConflictError(f"transaction kept conflicting: {error}") from None
            except REDIS_ERRORS as error:
                raise unavailable(self.url, error) from None

    def _count_restart(self, attempt: int, error: BaseException) -> None:
        self.stats.txn_restarts += 1

    # -- ids ------------------------------------------------------------------------------

    async def _next_id(self, pool: _IdPool) -> int:
        async with pool.lock:
            if pool.next > pool.end:
                end = await self.r.incrby(pool.key, ID_BATCH)
                pool.next, pool.end = end - ID_BATCH + 1, end
            value = pool.next
            pool.next += 1
            return value

    async def _new_inode(self) -> int:
        return await self._next_id(self._inodes)

    async def new_slice_id(self) -> int:
        """A fresh slice id (from a batch this client took from the counter)."""
        return await self._next_id(self._slices)

    # -- attributes -------------------------------------------------------------------------

    async def _get_attr(self, client: Any, ino: int) -> Attr:
        raw = await client.get(keys.attr(ino))
        if raw is None:
            raise FSError(errno.ENOENT, f"no inode {ino}")
        return Attr.unpack(ino, raw)

    async def _get_attrs(self, inodes: list[int]) -> list[Attr | None]:
        if not inodes:
            return []
        raws = await self.r.mget([keys.attr(i) for i in inodes])
        return [None if r is None else Attr.unpack(i, r) for i, r in zip(inodes, raws, strict=True)]

    async def _get_dir(self, client: Any, ino: int) -> Attr:
        attr = await self._get_attr(client, ino)
        if not attr.is_dir():
            raise FSError(errno.ENOTDIR, f"inode {ino} is not a directory")
        return attr

    # -- quota and usage accounting ---------------------------------------------------------

    async def _quota_set(self) -> set[int]:
        now = time.monotonic()
        if now - self._quota_loaded > QUOTA_CACHE_SECONDS:
            self._quota_dirs = {int(k) for k in await self.r.hkeys(keys.QUOTA)}
            self._quota_loaded = now
        return self._quota_dirs

    def _forget_quotas(self) -> None:
        self._quota_loaded = 0.0

    async def _parent_of_dir(self, ino: int) -> int:
        now = time.monotonic()
        hit = self._parents.get(ino)
        if hit and hit[1] > now:
            return hit[0]
        attr = await self._get_attr(self.r, ino)
        self._parents[ino] = (attr.parent, now + PARENT_CACHE_SECONDS)
        if len(self._parents) > 100_000:
            self._parents.clear()
        return attr.parent

    async def _ancestors(self, ino: int) -> list[int]:
        """ino and the directories above it up to the root."""
        chain = [ino]
        seen = {ino}
        while ino != ROOT_INODE:
            try:
                ino = await self._parent_of_dir(ino)
            except FSError:
                break
            if ino == 0 or ino in seen:
                break
            chain.append(ino)
            seen.add(ino)
        return chain

    async def _quota_chain(self, parent: int) -> list[int]:
        """The directories with a quota that contain entries of `parent` (parent included)."""
        if not parent:
            return []
        quotas = await self._quota_set()
        if not quotas:
            return []
        chain = await self._ancestors(parent)
        if TRASH_INODE in chain:  # the trash counts against no quota
            return []
        return [d for d in chain if d in quotas]

    async def _quota_chain_of(self, inode: int) -> list[int]:
        """The quota directories containing inode (a file being written)."""
        if not await self._quota_set():
            return []
        return await self._quota_chain((await self._get_attr(self.r, inode)).parent)

    async def _check_usage(
        self, dirs: list[int], space: int, inodes: int, volume: bool = True
    ) -> None:
        """ENOSPC past the volume's capacity or inode limit, EDQUOT past a directory quota."""
        if space <= 0 and inodes <= 0:
            return
        fmt = self.fmt
        if volume and ((space > 0 and fmt.capacity) or (inodes > 0 and fmt.inodes)):
            used_space, used_inodes = await self.r.mget(keys.USED_SPACE, keys.USED_INODES)
            if space > 0 and fmt.capacity and int(used_space or 0) + space > fmt.capacity:
                raise FSError(errno.ENOSPC, "volume capacity reached")
            if inodes > 0 and fmt.inodes and int(used_inodes or 0) + inodes > fmt.inodes:
                raise FSError(errno.ENOSPC, "volume inode limit reached")
        if not dirs:
            return
        names = [str(d) for d in dirs]
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(keys.QUOTA, names)
        pipe.hmget(keys.QUOTA_SPACE, names)
        pipe.hmget(keys.QUOTA_INODES, names)
        limits, used_s, used_i = await pipe.execute()
        for d, lim, us, ui in zip(dirs, limits, used_s, used_i, strict=True):
            if lim is None:
                continue
            max_space, max_inodes = (int(x) for x in lim.split(b","))
            if space > 0 and max_space and int(us or 0) + space > max_space:
                raise FSError(errno.EDQUOT, f"quota of directory {d} exceeded (space)")
            if inodes > 0 and max_inodes and int(ui or 0) + inodes > max_inodes:
                raise FSError(errno.EDQUOT, f"quota of directory {d} exceeded (inodes)")

    @staticmethod
    def _queue_usage(
        pipe: Any, dirs: list[int], space: int, inodes: int, volume: bool = True
    ) -> None:
        """Queues usage changes for the volume (unless volume=False) and each quota dir."""
        if volume:
            if space:
                pipe.incrby(keys.USED_SPACE, space)
            if inodes:
                pipe.incrby(keys.USED_INODES, inodes)
        for d in dirs:
            if space:
                pipe.hincrby(keys.QUOTA_SPACE, str(d), space)
            if inodes:
                pipe.hincrby(keys.QUOTA_INODES, str(d), inodes)

    # -- deleting inodes and freeing data -----------------------------------------------

    def _queue_remove_inode(self, pipe: Any, attr: Attr) -> bool:
        """Queues removal of an inode's keys and its volume usage; True if chunks must go too."""
        ino = attr.inode
        pipe.delete(keys.attr(ino), keys.xattrs(ino), keys.parents(ino), keys.opened(ino))
        if attr.type == 0o120000:
            pipe.delete(keys.symlink(ino))
        if attr.is_dir():
            pipe.delete(keys.entries(ino), keys.names(ino))
        self._queue_usage(pipe, [], -space_of(attr), -1)
        if attr.is_file() and attr.size > 0:
            pipe.zadd(keys.DELETED_FILES, {f"{ino}:{attr.size}": time.time()})
            return True
        return False

    async def _free_file(self, ino: int, size: int) -> None:
        """Drops every chunk of a deleted file, releasing its slices, then forgets the file."""
        last = (size + CHUNK_SIZE - 1) // CHUNK_SIZE
        for start in range(0, last, CHUNK_BATCH):
            await self._drop_chunks(ino, range(start, min(last, start + CHUNK_BATCH)))
        await self.r.zrem(keys.DELETED_FILES, f"{ino}:{size}")

    async def _drop_chunks(self, ino: int, indexes: Iterable[int], trash: bool = False) -> None:
        """Deletes chunk lists and dereferences their slices, in one transaction."""
        names = [keys.chunk(ino, i) for i in indexes]
        if not names:
            return

        async def body(tx: Tx) -> None:
            pipe = self.r.pipeline(transaction=False)
            for name in names:
                pipe.lrange(name, 0, -1)
            lists = await pipe.execute()
            members = [
                keys.slice_key(rec.id, rec.size)
                for raw in lists
                for rec in unpack_records(raw)
                if rec.id
            ]
            p = tx.multi()
            p.delete(*names)
            for m in members:
                p.hincrby(keys.SLICE_REFS, m, -1)
            tx.after = lambda results: _released(members, results[1:])

        released = await self._txn(body, *names)
        await self._release_slices(released, trash)

    async def _release_slices(self, members: list[str], trash: bool = False) -> None:
        """Slices no chunk names any more: forget their counts and queue their objects."""
        if not members:
            return
        due = time.time() + (self.fmt.trash_days * 86400 if trash else 0)
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(keys.SLICE_REFS, *members)
        pipe.zadd(keys.DELETED_SLICES, dict.fromkeys(members, due))
        await pipe.execute()

    async def _deref_records(self, records: Iterable[SliceRecord], trash: bool = False) -> None:
        members = [keys.slice_key(r.id, r.size) for r in records if r.id]
        if not members:
            return
        pipe = self.r.pipeline(transaction=True)
        for m in members:
            pipe.hincrby(keys.SLICE_REFS, m, -1)
        results = await pipe.execute()
        await self._release_slices(_released(members, results), trash)


def _released(members: list[str], counts: list[Any]) -> list[str]:
    """Members whose last count (of HINCRBY results, in order) reached zero or below."""
    final: dict[str, int] = {}
    for m, c in zip(members, counts, strict=False):
        final[m] = int(c)
    return [m for m, c in final.items() if c <= 0]
