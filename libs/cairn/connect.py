"""Adapter: opens connections to NATS and Redis, turning failures into one-line errors.

A process validates its URLs at start by connecting through here; an unreachable server
raises UnavailableError naming the URL (password redacted) and the flag that sets it.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

from cairn.config import META_URL, NATS_URL, Setting, check_url, redact
from cairn.errors import ConfigError, UnavailableError


def _unreachable(setting: Setting, url: str, why: object, hint: str) -> UnavailableError:
    return UnavailableError(f"cannot reach {redact(url)} ({why}): {hint}, "
                            f"or set {setting.flag} / {setting.env}")


async def nats(url: str, name: str = "cairn", timeout: float = 3.0, **options):
    """A connected nats.aio.client.Client without reconnects (for start-up checks and
    short-lived tools); raises UnavailableError naming the URL if nats-server is down."""
    import nats as nats_py
    from nats.errors import NoServersError

    check_url(NATS_URL, url)
    parts = urlsplit(url)
    try:  # nats-py retries a refused first connect for a long time: check TCP first
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port or 4222), timeout)
        writer.close()
        await writer.wait_closed()
    except (OSError, TimeoutError) as error:
        raise _unreachable(NATS_URL, url, _short(error), "start nats-server with -js") from None
    try:
        return await nats_py.connect(url, name=name, connect_timeout=timeout,
                                     allow_reconnect=False, max_reconnect_attempts=0,
                                     **options)
    except (TimeoutError, NoServersError, OSError) as error:
        raise _unreachable(NATS_URL, url, _short(error), "start nats-server with -js") from None


async def redis(url: str, timeout: float = 3.0):
    """A redis.asyncio.Redis client that answered PING; UnavailableError otherwise."""
    import redis.asyncio as aioredis
    from redis.exceptions import AuthenticationError, RedisError, ResponseError

    check_url(META_URL, url)
    try:
        client = aioredis.from_url(url, socket_connect_timeout=timeout)
    except ValueError as error:
        raise ConfigError(f"{META_URL.flag} / {META_URL.env}: '{redact(url)}': {error}") from None
    try:
        await client.ping()
    except AuthenticationError:
        await client.aclose()
        raise ConfigError(f"{redact(url)}: Redis refused the password: fix the password in "
                          f"{META_URL.flag} / {META_URL.env}") from None
    except ResponseError as error:
        await client.aclose()
        raise ConfigError(f"{redact(url)}: {_short(error)}") from None
    except (RedisError, OSError) as error:
        with contextlib.suppress(Exception):
            await client.aclose()
        raise _unreachable(META_URL, url, _short(error), "start redis-server") from None
    return client


def _short(error: object) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:160]


async def ping_redis(client, url: str, timeout: float = 2.0) -> None:
    """Raises UnavailableError (one line) unless the Redis behind `client` answers."""
    from redis.exceptions import RedisError

    try:
        await asyncio.wait_for(client.ping(), timeout)
    except (RedisError, OSError, TimeoutError) as error:
        raise _unreachable(META_URL, url, _short(error), "start redis-server") from None
