"""The engine's hottest commands over one lean, pipelined connection: its Lua scripts
(create, lookup, release, also batched), and PUBLISH of change notes.

These scripts carry the hottest metadata operations: every lookup and every create is one
of them. redis-py's asyncio client spends more time in Python per command (a pooled
connection taken and given back, timeouts, its own packing and reply plumbing) than the
round trip to a local Redis takes. Here a call is: the command packed by hiredis, written
on one connection, a future resolved when hiredis has parsed its reply. Calls from
concurrent tasks share the connection and their replies come back in order.

What it does not do, and redis-py still does for everything else: TLS (`rediss://` volumes
run their scripts through redis-py), reconnect backoff (a lost connection fails the calls in
flight with ConnectionError, which the engine maps like any Redis outage, and the next call
connects again), RESP3.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

CONNECT_TIMEOUT = 5.0


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(self.lost)

    def call(self, packed: bytes) -> asyncio.Future[Any]:
        """Sends one packed command; the future of its reply."""
        return self.call_many(packed, 1)[0]

    def call_many(self, packed: bytes, replies: int) -> list[asyncio.Future[Any]]:
        """Sends `replies` packed commands in one write; the futures of their replies."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(replies)]
        if self.lost is not None or self.transport is None:
            for future in futures:
                future.set_exception(self.lost or RedisConnectionError("not connected"))
        else:
            self.waiting.extend(futures)
            self.transport.write(packed)
        return futures


class LuaChannel:
    """EVALSHA of named scripts on one connection; `None` from `for_url` means: use
    redis-py (a URL this channel does not speak)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    @classmethod
    def for_url(cls, url: str) -> LuaChannel | None:
        try:
            options = parse_url(url)
        except ValueError:
            return None
        connection_class = options.get("connection_class")
        if connection_class is not None and "path" not in options:  # rediss://: TLS
            return None
        return cls(options)

    async def eval(self, sha: str, script: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA sha; the script (whose SHA1 it is) is loaded when Redis lacks it."""
        proto = await self._connected()
        reply = await proto.call(hiredis.pack_command(("EVALSHA", sha, len(keys), *keys, *args)))
        if isinstance(reply, hiredis.ReplyError):
            if str(reply).startswith("NOSCRIPT"):
                loaded = await proto.call(hiredis.pack_command(("SCRIPT", "LOAD", script)))
                if isinstance(loaded, hiredis.ReplyError):
                    raise ResponseError(str(loaded))
                reply = await proto.call(
                    hiredis.pack_command(("EVALSHA", sha, len(keys), *keys, *args))
                )
            if isinstance(reply, hiredis.ReplyError):
                if str(reply).startswith("NOSCRIPT"):
                    raise NoScriptError(str(reply))
                raise ResponseError(str(reply))
        return reply

    async def eval_many(
        self, sha: str, script: str, calls: list[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """EVALSHA sha once per (keys, args), all in one write; the replies in order."""
        if not calls:
            return []
        proto = await self._connected()
        packed = b"".join(
            hiredis.pack_command(("EVALSHA", sha, len(keys), *keys, *args)) for keys, args in calls
        )
        replies = list(await asyncio.gather(*proto.call_many(packed, len(calls))))
        for i, reply in enumerate(replies):
            if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
                replies[i] = await self.eval(sha, script, *calls[i])  # loads it
            elif isinstance(reply, hiredis.ReplyError):
                raise ResponseError(str(reply))
        return replies

    async def command(self, *args: Any) -> Any:
        """One plain command (PUBLISH...); an error reply raises ResponseError."""
        proto = await self._connected()
        reply = await proto.call(hiredis.pack_command(args))
        if isinstance(reply, hiredis.ReplyError):
            raise ResponseError(str(reply))
        return reply

    async def _connected(self) -> _Protocol:
        proto = self._proto
        if proto is not None and proto.lost is None:
            return proto
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is not None and self._proto.lost is None:
                return self._proto
            self._proto = await self._connect()
            return self._proto

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        o = self.options
        try:
            if "path" in o:
                connecting = loop.create_unix_connection(_Protocol, o["path"])
            else:
                connecting = loop.create_connection(
                    _Protocol, o.get("host", "localhost"), o.get("port", 6379)
                )
            _, proto = await asyncio.wait_for(connecting, CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as error:
            raise RedisConnectionError(f"cannot connect to Redis: {error}") from None
        hello = []
        if o.get("password"):
            user = o.get("username")
            hello.append(("AUTH", user, o["password"]) if user else ("AUTH", o["password"]))
        if o.get("db"):
            hello.append(("SELECT", int(o["db"])))
        for command in hello:
            reply = await proto.call(hiredis.pack_command(command))
            if isinstance(reply, hiredis.ReplyError):
                proto.transport.close()
                raise RedisConnectionError(f"Redis refused {command[0]}: {reply}")
        return proto

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
