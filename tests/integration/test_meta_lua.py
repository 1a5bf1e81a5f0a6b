"""The engine's lean connection for its Lua scripts (cairn.meta.lua) against a real
redis-server: results as redis-py gives them, scripts reloaded after SCRIPT FLUSH, replies
in order under concurrency, password and database, unix sockets, and a server that goes
away (the calls fail as any Redis outage does, and work again once it is back)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from cairn import localstack
from cairn.errors import FSError, UnavailableError
from cairn.meta.engine import Ctx, Format, Meta, format_volume
from cairn.meta.lua import LuaChannel

ECHO = "return {ARGV[1], tonumber(ARGV[2]) + 1, redis.call('GET', KEYS[1]), false}"
ROOT_CTX = Ctx(0, 0)


def sha_of(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()


async def test_replies_match_redis_py_and_scripts_come_back_after_a_flush(redis_url):
    r = aioredis.from_url(redis_url)
    await r.set("k", b"v")
    lua = LuaChannel.for_url(redis_url)
    try:
        expected = await r.eval(ECHO, 1, "k", b"a\x00b", 41)
        got = await lua.eval(sha_of(ECHO), ECHO, ["k"], [b"a\x00b", 41])
        assert got == expected == [b"a\x00b", 42, b"v", None]
        await r.script_flush()
        assert await lua.eval(sha_of(ECHO), ECHO, ["k"], ["x", 1]) == [b"x", 2, b"v", None]
        with pytest.raises(ResponseError):
            await lua.eval(sha_of("error"), "return redis.error_reply('nope')", [], [])
        # Batches: one write, replies in order, a flushed script loaded again.
        await r.script_flush()
        for n in (1, 3):
            calls = [(["k"], [str(i), i]) for i in range(n)]
            got = await lua.eval_many(sha_of(ECHO), ECHO, calls)
            assert got == [[str(i).encode(), i + 1, b"v", None] for i in range(n)]
        assert await lua.eval_many(sha_of(ECHO), ECHO, []) == []
        assert await lua.command("PUBLISH", "nobody-listens", b"x") == 0
        with pytest.raises(ResponseError):
            await lua.command("NOSUCHCOMMAND")
        # Concurrent calls share the connection; each gets its own reply.
        answers = await asyncio.gather(
            *(lua.eval(sha_of(ECHO), ECHO, ["k"], [str(i), i]) for i in range(200))
        )
        assert [a[1] for a in answers] == [i + 1 for i in range(200)]
    finally:
        await lua.close()
        await r.aclose()


def test_urls_it_does_not_speak_fall_back_to_redis_py():
    assert LuaChannel.for_url("rediss://example:6380/0") is None
    assert LuaChannel.for_url("redis://127.0.0.1:1/0") is not None
    assert LuaChannel.for_url("unix:///run/redis.sock?db=2") is not None


async def test_password_database_and_unix_socket(tmp_path):
    sock = tmp_path / "r.sock"
    server = localstack.redis_server(tmp_path / "data")
    server.argv += ["--requirepass", "s3cret", "--unixsocket", str(sock), "--unixsocketperm", "700"]
    localstack.start_tcp(server)
    try:
        for url in (f"redis://:s3cret@127.0.0.1:{server.port}/3", f"unix://:s3cret@{sock}?db=3"):
            lua = LuaChannel.for_url(url)
            try:
                await lua.eval(sha_of("return redis.call('SET', KEYS[1], ARGV[1])"),
                               "return redis.call('SET', KEYS[1], ARGV[1])", ["k"], [url])  # fmt: skip
            finally:
                await lua.close()
            r = aioredis.Redis(port=server.port, password="s3cret", db=3)
            assert await r.get("k") == url.encode()
            await r.aclose()
        wrong = LuaChannel.for_url(f"redis://:wrong@127.0.0.1:{server.port}/0")
        with pytest.raises(RedisConnectionError, match="AUTH"):
            await wrong.eval(sha_of("return 1"), "return 1", [], [])
        await wrong.close()
    finally:
        server.stop()


async def test_a_redis_outage_is_unavailable_and_then_over(tmp_path):
    server = localstack.start_tcp(localstack.redis_server(tmp_path / "data"))
    url = server.url
    try:
        await format_volume(url, Format(name="lua", storage=f"file://{tmp_path}/o", trash_days=0))
        meta = await Meta.open(url)
        assert meta._lua is not None
        await meta.create(ROOT_CTX, 1, b"before", 0o644)
        server.stop()
        with pytest.raises(UnavailableError):
            await meta.lookup(ROOT_CTX, 1, b"before")
        server = localstack.start_tcp(localstack.redis_server(tmp_path / "data", port=server.port))
        ino, _ = await meta.lookup(ROOT_CTX, 1, b"before")  # appendonly: it is still there
        assert ino > 1
        with pytest.raises(FSError):
            await meta.lookup(ROOT_CTX, 1, b"never")
        await meta.close()
    finally:
        server.stop()
