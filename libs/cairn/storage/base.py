"""The object store contract every backend keeps, and `open_store` that picks one by URL.

An object store holds immutable blobs under '/'-separated keys. Each backend is one class in
its own module, chosen by the URL's scheme (file://, s3://). The public methods here check
their arguments once and call the backend's `_`-methods, so every backend gets the same
semantics:

  put(key, data)                 stores the whole object; readers see the old or the new one
  get(key, offset=0, length=-1)  bytes [offset, offset+length), shorter at the end; NotFound
  delete(key)                    idempotent: deleting a missing key succeeds
  head(key)                      ObjectInfo(key, size, mtime); NotFound
  list(prefix, start_after)      ObjectInfo in key order, fetched page by page
  check()                        reachability, in one line naming the URL and what to fix
  close()

Errors use Cairn's vocabulary only: NotFound, ConfigError (fix the URL or credentials),
TemporaryError/UnavailableError (retry later), ResourceExhausted, InvalidArgument.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode

from cairn.errors import ConfigError, InvalidArgument

# Files a backend writes for itself (e.g. half-written puts) start with this; no key
# segment may, so they never show up in listings.
RESERVED_PREFIX = ".cairn-"
_SECRET_PARAMS = {"access_key", "secret_key", "secret", "password", "token", "session_token"}


class ObjectInfo(NamedTuple):
    """What head() and list() tell about an object; unpacks as (key, size, mtime)."""

    key: str
    size: int
    mtime: float  # seconds since the epoch


# Keys made of these characters, with no empty, '.', '..' or reserved segment, are fine:
# block keys always are, so most keys take this one check.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*(?:/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*")


def validate_key(key: str) -> str:
    """The key itself if every backend can store it; InvalidArgument otherwise."""
    if type(key) is str and _PLAIN_KEY.fullmatch(key) and RESERVED_PREFIX not in key:
        return key
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"object key must be a non-empty string, not {key!r}")
    for part in key.split("/"):
        if part in ("", ".", "..") or part.startswith(RESERVED_PREFIX) or "\x00" in part:
            raise InvalidArgument(
                f"invalid object key {key!r}: empty, '.', '..' or '{RESERVED_PREFIX}*' segment"
            )
    return key


def redact_url(url: str) -> str:
    """The URL without user info or secret-looking query parameters, fit for messages.

    For network URLs everything up to the last '@' before the query is user info: an
    unencoded '/' in a secret (common in AWS secrets) must not leak as a "path".
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, _, query = rest.partition("#")[0].partition("?")
    if scheme.lower() == "file":
        netloc, slash, path = rest.partition("/")
        rest = netloc.rpartition("@")[2] + slash + path
    else:
        rest = rest.rpartition("@")[2]
    pairs = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in url_query(url)]
    return f"{scheme}://{rest}" + (f"?{urlencode(pairs, safe=':/*')}" if pairs else "")


def url_query(url: str) -> list[tuple[str, str]]:
    """The URL's query parameters, in order."""
    return parse_qsl(url.partition("#")[0].partition("?")[2], keep_blank_values=True)


def url_options(url: str, options: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
    """The URL's query parameters overridden by explicit options; ConfigError if unknown."""
    merged: dict[str, Any] = dict(url_query(url))
    merged.update(options)
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for {redact_url(url)}: "
            f"known are {', '.join(sorted(known))}"
        )
    return merged


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"option {name} must be true or false, not {value!r}")


def as_number(name: str, value: Any, kind: type = float, minimum: float = 0) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {name} must be a number, not {value!r}") from None
    if number < minimum:
        raise ConfigError(f"option {name} must be at least {minimum}, not {value!r}")
    return number


class ObjectStore(ABC):
    """An asynchronous object store; see the module docstring for the contract."""

    scheme: str = ""

    def __init__(self, url: str) -> None:
        self.url = redact_url(url)  # never holds credentials: it goes into messages

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    async def __aenter__(self) -> ObjectStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def put(self, key: str, data: bytes) -> None:
        """Stores `data` under `key`, replacing any object there, atomically."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidArgument(f"object data must be bytes, not {type(data).__name__}")
        await self._put(validate_key(key), bytes(data))

    async def get(self, key: str, offset: int = 0, length: int = -1) -> bytes:
        """Bytes [offset, offset + length) of the object (to its end if length is -1).

        A range past the end is cut short (empty if it starts at or after the end).
        """
        validate_key(key)
        if offset < 0 or length < -1:
            raise InvalidArgument(f"invalid range offset={offset} length={length} for {key}")
        if length == 0:
            await self._head(key)  # still NotFound for a missing object
            return b""
        return await self._get(key, offset, length)

    def read_now(self, key: str, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset + length) of the object if this store can answer without
        waiting for anything but a local disk (a small read of a file:// object), else None:
        call get(). Errors are get()'s. Wrappers (caches, counters) pass it through."""
        return None

    async def delete(self, key: str) -> None:
        """Removes the object; succeeds when it does not exist."""
        await self._delete(validate_key(key))

    async def head(self, key: str) -> ObjectInfo:
        """Size and modification time of the object; NotFound when missing."""
        return await self._head(validate_key(key))

    async def list(
        self, prefix: str = "", start_after: str = "", page_size: int = 1000
    ) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with `prefix` and sorts after `start_after`.

        Keys come in ascending (byte-wise) order, fetched `page_size` at a time, so a long
        listing can be resumed from the last key seen.
        """
        if page_size < 1:
            raise InvalidArgument(f"page_size must be positive, not {page_size}")
        async for info in self._list(prefix, start_after, page_size):
            yield info

    async def check(self) -> None:
        """Raises UnavailableError or ConfigError, in one line, unless the store is usable."""
        await self._check()

    async def close(self) -> None:
        """Releases connections and threads; the store is not used afterwards."""
        return None  # nothing to release unless a backend says otherwise

    @abstractmethod
    async def _put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    async def _get(self, key: str, offset: int, length: int) -> bytes: ...

    @abstractmethod
    async def _delete(self, key: str) -> None: ...

    @abstractmethod
    async def _head(self, key: str) -> ObjectInfo: ...

    @abstractmethod
    def _list(self, prefix: str, start_after: str, page_size: int) -> AsyncIterator[ObjectInfo]: ...

    @abstractmethod
    async def _check(self) -> None: ...


def open_store(url: str, **options: Any) -> ObjectStore:
    """The backend for `url`'s scheme, configured from the URL's query and `options`.

    Backends are imported here, on demand, so a client that uses only file:// never loads
    boto3.
    """
    scheme = url.partition("://")[0].lower() if isinstance(url, str) else ""
    if scheme == "file":
        from cairn.storage.file import FileStore

        return FileStore(url, **options)
    if scheme == "s3":
        from cairn.storage.s3 import S3Store

        return S3Store(url, **options)
    shown = redact_url(url) if isinstance(url, str) else repr(url)
    raise ConfigError(
        f"unsupported object store URL {shown!r}: use file:///dir or s3://bucket[/prefix]"
    )
