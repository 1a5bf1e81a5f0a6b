"""The file:///dir backend: one file per object, for a single node, tests and local work.

An object `a/b/c` is the file `<dir>/a/b/c`. A put writes a temporary file next to the
target, fsyncs it and renames it over the target, then fsyncs the directory, so a reader or
a crash sees the old object or the new one, never a torn one. Blocking file calls run in a
bounded thread pool owned by the store, so many concurrent reads cannot starve the event
loop's default executor.

Except small ranged reads (up to `inline_read` bytes, 64 KiB by default; 0 turns it off):
a local disk answers a pread of a few KiB in tens of microseconds, less than handing it to
a thread and back costs, so those run on the caller's thread, through descriptors kept open
for the last objects read (objects never change, so a kept descriptor cannot read stale
bytes; a delete through this store closes it).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import os
import secrets
import stat
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from cairn.errors import (
    CairnError,
    ConfigError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    UnavailableError,
)
from cairn.storage.base import (
    RESERVED_PREFIX,
    ObjectInfo,
    ObjectStore,
    as_bool,
    as_number,
    url_options,
    validate_key,
)

T = TypeVar("T")
_NOATIME = getattr(os, "O_NOATIME", 0)


def open_for_reads(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor that does not update the file's access time (objects are
    read often and their atime says nothing), where the process may ask for that (it
    owns the file or is root); a plain one otherwise."""
    global _NOATIME
    flags = os.O_RDONLY | os.O_CLOEXEC
    if _NOATIME:
        try:
            return os.open(path, flags | _NOATIME)
        except PermissionError:  # not the owner: remember, and open without it
            _NOATIME = 0
    return os.open(path, flags)
TEMP_PREFIX = RESERVED_PREFIX + "tmp-"
_OPTIONS = {"max_workers", "fsync", "inline_read"}
OPEN_OBJECTS = 256  # descriptors kept for inline reads


class FileStore(ObjectStore):
    """Objects as files under one local directory."""

    scheme = "file"

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ConfigError(
                f"bad object store URL {self.url!r}: use file:///absolute/dir (three slashes)"
            )
        opts = url_options(url, options, _OPTIONS)
        self.root = Path(path)
        self.fsync = as_bool("fsync", opts.get("fsync", True))
        workers = as_number("max_workers", opts.get("max_workers", 16), int, minimum=1)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cairn-file")
        self.inline_read = as_number("inline_read", opts.get("inline_read", 64 << 10), int,
                                     minimum=0)  # fmt: skip
        self._fds: OrderedDict[str, int] = OrderedDict()

    # -- the contract ---------------------------------------------------------------

    async def _put(self, key: str, data: bytes) -> None:
        await self._run(self._put_sync, key, data, action="write")
        self._forget_fd(key)  # a kept descriptor would read the object replaced

    async def _get(self, key: str, offset: int, length: int) -> bytes:
        if 0 < length <= self.inline_read:
            return self._read_inline(key, offset, length)
        return await self._run(self._get_sync, key, offset, length, action="read")

    def read_now(self, key: str, offset: int, length: int) -> bytes | None:
        if not 0 < length <= self.inline_read or offset < 0:
            return None
        return self._read_inline(validate_key(key), offset, length)

    def _read_inline(self, key: str, offset: int, length: int) -> bytes:
        try:
            return self._pread(key, offset, length)
        except OSError as error:
            raise self._os_error(error, "read") from error

    def _pread(self, key: str, offset: int, length: int) -> bytes:
        fd = self._fds.get(key)
        if fd is None:
            try:
                fd = open_for_reads(self._path(key))
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise NotFound(f"no object {key} in {self.url}") from None
            # These descriptors serve small random reads: no read-ahead around them.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._fds[key] = fd
            while len(self._fds) > OPEN_OBJECTS:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(key)
        return os.pread(fd, length, offset)

    def will_need(self, key: str) -> None:
        """A hint that the whole object is read soon: the kernel starts reading it from disk
        now, in the background (posix_fadvise WILLNEED), so that reads of several objects
        ahead of a sequential reader overlap instead of waiting for each other."""
        try:
            fd = open_for_reads(self._path(key))
        except OSError:
            return  # a hint: the read itself reports a missing object
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _forget_fd(self, key: str) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    async def _delete(self, key: str) -> None:
        self._forget_fd(key)
        await self._run(self._delete_sync, key, action="delete")

    async def _head(self, key: str) -> ObjectInfo:
        return await self._run(self._head_sync, key, action="stat")

    async def _list(
        self, prefix: str, start_after: str, page_size: int
    ) -> AsyncIterator[ObjectInfo]:
        walk = self._walk(prefix, start_after)
        while True:
            page = await self._run(lambda: list(itertools.islice(walk, page_size)), action="list")
            for info in page:
                yield info
            if len(page) < page_size:
                return

    async def _check(self) -> None:
        await self._run(self._check_sync, action=f"create or write to {self.root}")

    async def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])
        await asyncio.to_thread(self._pool.shutdown, wait=True)

    # -- blocking parts, run in the pool --------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _put_sync(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InvalidArgument(
                f"cannot store {key} in {self.url}: a parent of it is an object"
            ) from None
        temp = path.parent / f"{TEMP_PREFIX}{path.name}-{secrets.token_hex(6)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(temp, path)
        except BaseException as error:
            with suppress(FileNotFoundError):
                os.unlink(temp)
            if isinstance(error, IsADirectoryError):
                raise InvalidArgument(
                    f"cannot store {key} in {self.url}: objects exist under {key}/"
                ) from None
            raise
        if self.fsync:  # make the rename itself durable
            _fsync_dir(path.parent)

    def _get_sync(self, key: str, offset: int, length: int) -> bytes:
        try:
            with open(open_for_reads(self._path(key)), "rb") as f:
                f.seek(offset)
                return f.read(length)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"no object {key} in {self.url}") from None

    def _delete_sync(self, key: str) -> None:
        with suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
            os.unlink(self._path(key))

    def _head_sync(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise NotFound(f"no object {key} in {self.url}")
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def _check_sync(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(
                f"object store {self.url}: {self.root} is not a directory; "
                f"point the URL at a directory"
            ) from None
        probe = self.root / f"{TEMP_PREFIX}probe-{secrets.token_hex(6)}"
        probe.write_bytes(b"")
        probe.unlink()

    def _walk(self, prefix: str, start_after: str) -> Iterator[ObjectInfo]:
        """Objects under `prefix` after `start_after`, in key order, lazily.

        Entries of a directory are visited sorted by name, a subdirectory sorting as
        "name/": every key below it starts with that, so the walk yields keys in the same
        byte-wise order an S3 listing has. Subtrees wholly outside the range are skipped.
        """
        base, _, _ = prefix.rpartition("/")
        if base and any(p in ("", ".", "..") for p in base.split("/")):
            return  # no valid key has such a prefix (and it must not leave the root)
        start = self.root.joinpath(*base.split("/")) if base else self.root
        yield from self._walk_dir(start, base + "/" if base else "", prefix, start_after)

    def _walk_dir(
        self, path: Path, rel: str, prefix: str, start_after: str
    ) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(path) as it:
                entries = [e for e in it if not e.name.startswith(RESERVED_PREFIX)]
        except (FileNotFoundError, NotADirectoryError):
            return
        named = []
        for entry in entries:
            with suppress(FileNotFoundError):
                is_dir = entry.is_dir(follow_symlinks=False)
                named.append((rel + entry.name + ("/" if is_dir else ""), is_dir, entry))
        named.sort(key=lambda item: item[0])
        for key, is_dir, entry in named:
            if is_dir:
                inside = key.startswith(prefix) or prefix.startswith(key)
                before = key < start_after and not start_after.startswith(key)
                if inside and not before:
                    yield from self._walk_dir(Path(entry.path), key, prefix, start_after)
            elif key.startswith(prefix) and key > start_after:
                with suppress(FileNotFoundError):  # deleted since the scan
                    st = entry.stat()
                    if stat.S_ISREG(st.st_mode):
                        yield ObjectInfo(key, st.st_size, st.st_mtime)

    # -- plumbing -------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any, action: str) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        except CairnError:
            raise
        except OSError as error:
            raise self._os_error(error, action) from error

    def _os_error(self, error: OSError, action: str) -> CairnError:
        where = f"object store {self.url}: cannot {action}"
        reason = error.strerror or str(error)
        if error.errno in (errno.ENOENT, errno.ENOTDIR):  # the directory itself is gone
            return ConfigError(f"{where}: {reason}; check that {self.root} exists")
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return ConfigError(
                f"{where}: {reason}; check the directory's owner, mode and mount options"
            )
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return ResourceExhausted(f"{where}: {reason}; free space on {self.root}")
        return UnavailableError(f"{where}: {reason}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
