"""Adapter: opens connections to NATS and Redis, turning failures into one-line errors.

A process validates its URLs at start by connecting through here; an unreachable server
raises UnavailableError naming the URL (password redacted) and the flag that sets it.
"""

from __future__ import annotations

import asyncio
import contextlib

from cairn.config import META_URL, NATS_URL, Setting, check_url, redact
from cairn.errors import ConfigError, UnavailableError


def _unreachable(setting: Setting, url: str, why: object, hint: str) -> UnavailableError:
    return UnavailableError(f"cannot reach {redact(url)} ({why}): {hint}, "
                            f"or set {setting.flag} / {setting.env}")


async def nats(url: str, name: str = "cairn", timeout: float = 3.0, **options):
    """A connected nats.aio.client.Client; raises UnavailableError if nats-server is down."""
    import nats as nats_py
    from nats.errors import NoServersError

    check_url(NATS_URL, url)
    errors: list[BaseException] = []

    async def on_error(error: BaseException) -> None:
        errors.append(error)

    try:
        return await nats_py.connect(url, name=name, connect_timeout=timeout,
                                     allow_reconnect=options.pop("allow_reconnect", True),
                                     max_reconnect_attempts=options.pop("max_reconnect_attempts", -1),
                                     error_cb=on_error, **options)
    except (NoServersError, OSError, asyncio.TimeoutError) as error:
        why = errors[-1] if errors else error
        raise _unreachable(NATS_URL, url, _short(why), "start nats-server with -js") from None


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
