"""Change notes between the mounts of one volume.

Each mount tells the others which inodes and names it changed, so that they drop what they
cached (the VFS's caches and, through the FUSE layer, the kernel's) within milliseconds
instead of when a TTL runs out. That is what lets a mount keep attributes and entries for
long (the kernel then answers stat(2) of known files itself) and still show other clients'
changes at once.

Transport: Redis pub/sub on the volume's metadata server, channel keys.changes(uuid).
A note is msgpack `[sid, {inode: data_changed}, [[parent, name], ...]]`; a mount ignores
its own. Notes are fire and forget and batched: the first change after a quiet spell
starts a short timer (`delay`), and everything noted until it fires goes out as one
PUBLISH, off the path of the operation that changed things.

What a note cannot promise: a mount that dies between its change and its note, or a
subscriber that was disconnected, misses notes. The TTLs stay the bound on how stale a
cache can be; after a reconnection the listener calls `on_reset` so the VFS drops all it
cached. Close-to-open does not depend on notes at all (open() refetches).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from cairn.errors import CairnError
from cairn.meta import keys
from cairn.meta.base import REDIS_ERRORS

log = logging.getLogger(__name__)

DEFAULT_DELAY = 0.01  # seconds a note may wait for others to share its PUBLISH
RECONNECT_PAUSE = 1.0
MAX_BATCH = 5_000  # notes per PUBLISH at most

# on_change(inodes: {inode: data_changed}, entries: [(parent, name)])
OnChange = Callable[[dict[int, bool], list[tuple[int, bytes]]], None]


class ChangeFeed:
    """Publishes this mount's change notes and hears the other mounts' notes."""

    def __init__(
        self,
        redis: Any,
        uuid: str,
        sid: int,
        on_change: OnChange,
        on_reset: Callable[[], None],
        *,
        delay: float = DEFAULT_DELAY,
        publish: Callable[[str, bytes], Awaitable[Any]] | None = None,
    ) -> None:
        """`redis` (redis-py) subscribes; `publish` (default: redis.publish) sends."""
        self.r = redis
        self._publish = publish or redis.publish
        self.channel = keys.changes(uuid)
        self.sid = sid
        self.on_change = on_change
        self.on_reset = on_reset
        self.delay = delay
        self.sent = 0  # PUBLISHes
        self.heard = 0  # notes from other mounts
        self._inodes: dict[int, bool] = {}
        self._entries: set[tuple[int, bytes]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._pubsub: Any = None

    # -- telling ------------------------------------------------------------------------

    def inode(self, ino: int, data: bool = False) -> None:
        """ino's attributes changed (and its contents, if data)."""
        self._inodes[ino] = self._inodes.get(ino, False) or data
        self._schedule()

    def entry(self, parent: int, name: bytes) -> None:
        """The name in parent now names something else, or nothing (and parent changed)."""
        self._entries.add((parent, name))
        self._inodes.setdefault(parent, False)
        self._schedule()

    def _schedule(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.delay)
        try:
            await self.flush()
        except Exception:  # notes are best effort; the TTLs cover what is lost
            log.exception("change notes: sending failed")

    async def flush(self) -> None:
        """Publishes what is noted (failures are logged: notes are best effort)."""
        while self._inodes or self._entries:
            inodes, self._inodes = self._inodes, {}
            entries, self._entries = list(self._entries), set()
            if len(inodes) + len(entries) > MAX_BATCH:  # too many to tell: drop everything
                inodes, entries = {}, []
            note = msgpack.packb([self.sid, inodes, entries])
            try:
                await self._publish(self.channel, note)
                self.sent += 1
            except (*REDIS_ERRORS, CairnError) as error:
                log.debug("change note not sent: %s", error)

    # -- hearing ------------------------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> None:
        """Subscribes (waiting until the subscription stands) and starts listening."""
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout)
        except TimeoutError:
            log.warning("change notes: not subscribed after %.0f s; caches rely on TTLs", timeout)

    async def _listen(self) -> None:
        first = True
        while True:
            pubsub = self._pubsub = self.r.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                if not first:  # notes were missed while away
                    self.on_reset()
                first = False
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None:
                        self._heard(message["data"])
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as error:
                log.warning("change notes: %s; listening again in %.0f s", error, RECONNECT_PAUSE)
            except Exception:
                log.exception("change notes: listener failed; listening again")
            finally:
                await _close_quietly(pubsub)
            await asyncio.sleep(RECONNECT_PAUSE)

    def _heard(self, data: bytes) -> None:
        try:
            sid, inodes, entries = msgpack.unpackb(data, strict_map_key=False)
        except Exception:
            log.debug("change notes: ignoring a malformed note")
            return
        if sid == self.sid:
            return
        self.heard += 1
        if not inodes and not entries:  # a batch too big to tell
            self.on_reset()
            return
        self.on_change(inodes, [(int(p), bytes(n)) for p, n in entries])

    async def close(self) -> None:
        """Sends what is noted and stops listening."""
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.flush()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            if self._pubsub is not None:  # a read that missed the cancellation ends here
                await _close_quietly(self._pubsub)
            await asyncio.wait({listener}, timeout=5)


async def _close_quietly(pubsub: Any) -> None:
    try:
        await pubsub.aclose()
    except Exception as error:  # the connection is already gone
        log.debug("closing the change-note subscription: %s", error)
