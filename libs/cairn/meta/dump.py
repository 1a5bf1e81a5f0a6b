"""Dump a volume's metadata to JSON and load it into an empty Redis, exactly.

The dump holds the settings, counters, quotas, slice bookkeeping and every inode with its
attributes, entries, chunks, xattrs, symlink target and parents. Sessions, open files and
locks are live state and are not dumped. Names and targets are bytes: they are written as
text with undecodable bytes escaped (surrogateescape), xattr values as base64.
"""

from __future__ import annotations

import base64
import io
import json
from typing import IO, Any

from cairn.errors import ConfigError
from cairn.meta import keys
from cairn.meta.slices import SliceRecord, unpack_records
from cairn.meta.types import CHUNK_SIZE, Attr, pack_entry, unpack_entry

DUMP_VERSION = 1
COUNTERS = (
    keys.NEXT_INODE,
    keys.NEXT_SLICE,
    keys.NEXT_SESSION,
    keys.USED_SPACE,
    keys.USED_INODES,
)
LOAD_BATCH = 500


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _write(stream: IO, text: str) -> None:
    if isinstance(stream, io.TextIOBase):
        stream.write(text)
    else:
        stream.write(text.encode())


class DumpMixin:
    async def dump(self, stream: IO) -> int:
        """Writes the volume as JSON to a text or binary stream; returns the inode count."""
        r = self.r
        counters = dict(zip(COUNTERS, await r.mget(COUNTERS), strict=True))
        head: dict[str, Any] = {
            "version": DUMP_VERSION,
            "format": self.fmt.to_dict(),
            "counters": {k: int(v or 0) for k, v in counters.items()},
            "quotas": {
                k.decode(): {
                    "limit": v.decode(),
                    "space": int(await r.hget(keys.QUOTA_SPACE, k) or 0),
                    "inodes": int(await r.hget(keys.QUOTA_INODES, k) or 0),
                }
                for k, v in sorted((await r.hgetall(keys.QUOTA)).items())
            },
            "slicerefs": {
                k.decode(): int(v) for k, v in sorted((await r.hgetall(keys.SLICE_REFS)).items())
            },
            "delslices": {
                k.decode(): s
                for k, s in await r.zrange(keys.DELETED_SLICES, 0, -1, withscores=True)
            },
            "delfiles": {
                k.decode(): s for k, s in await r.zrange(keys.DELETED_FILES, 0, -1, withscores=True)
            },
        }
        text = json.dumps(head, sort_keys=True)
        _write(stream, text[:-1] + ', "inodes": [\n')
        inodes = sorted([keys.inode_of(k) async for k in r.scan_iter(keys.ATTR_PATTERN, 1000)])
        sep = ""
        for ino in inodes:
            record = await self._dump_inode(ino)
            if record is not None:
                _write(stream, sep + json.dumps(record, sort_keys=True))
                sep = ",\n"
        _write(stream, "\n]}\n")
        return len(inodes)

    async def _dump_inode(self, ino: int) -> dict | None:
        r = self.r
        raw = await r.get(keys.attr(ino))
        if raw is None:
            return None
        attr = Attr.unpack(ino, raw)
        pipe = r.pipeline(transaction=False)
        pipe.hgetall(keys.xattrs(ino))
        pipe.hgetall(keys.parents(ino))
        pipe.get(keys.symlink(ino))
        xattrs, parents, target = await pipe.execute()
        record: dict[str, Any] = {"attr": attr.to_dict()}
        if xattrs:
            record["xattrs"] = {
                _text(k): base64.b64encode(v).decode() for k, v in sorted(xattrs.items())
            }
        if parents:
            record["parents"] = {k.decode(): int(v) for k, v in sorted(parents.items())}
        if target is not None:
            record["symlink"] = _text(target)
        if attr.is_dir():
            entries = {}
            async for names in self._scan_names(ino):
                values = await r.hmget(keys.entries(ino), names)
                for name, v in zip(names, values, strict=True):
                    if v is not None:
                        kind, child = unpack_entry(v)
                        entries[_text(name)] = [child, kind]
            record["entries"] = entries
        elif attr.is_file() and attr.size:
            last = (attr.size + CHUNK_SIZE - 1) // CHUNK_SIZE
            chunks = {}
            for start in range(0, last, 1000):
                pipe = r.pipeline(transaction=False)
                idx = range(start, min(last, start + 1000))
                for i in idx:
                    pipe.lrange(keys.chunk(ino, i), 0, -1)
                for i, raw_list in zip(idx, await pipe.execute(), strict=True):
                    if raw_list:
                        chunks[str(i)] = [list(rec) for rec in unpack_records(raw_list)]
            record["chunks"] = chunks
        return record


async def load(url: str, stream: IO) -> int:
    """Loads a dump into an empty Redis database; returns the number of inodes loaded."""
    from cairn.meta.base import REDIS_ERRORS, connect, safe_url, unavailable

    data = json.load(stream)
    if data.get("version") != DUMP_VERSION:
        raise ConfigError(f"unknown dump version {data.get('version')}")
    r = connect(url)
    try:
        try:
            if await r.dbsize():
                raise ConfigError(f"{safe_url(url)} is not empty: load into an empty database")
            return await _load(r, data)
        except REDIS_ERRORS as error:
            raise unavailable(url, error) from None
    finally:
        await r.aclose()


async def _load(r: Any, data: dict) -> int:
    pipe = r.pipeline(transaction=False)
    pending = 0

    async def flush(force: bool = False) -> None:
        nonlocal pipe, pending
        if pending >= LOAD_BATCH or (force and pending):
            await pipe.execute()
            pipe = r.pipeline(transaction=False)
            pending = 0

    for k, v in data["counters"].items():
        pipe.set(k, v)
    for ino, q in data["quotas"].items():
        pipe.hset(keys.QUOTA, ino, q["limit"])
        pipe.hset(keys.QUOTA_SPACE, ino, q["space"])
        pipe.hset(keys.QUOTA_INODES, ino, q["inodes"])
    if data["slicerefs"]:
        pipe.hset(keys.SLICE_REFS, mapping=data["slicerefs"])
    if data["delslices"]:
        pipe.zadd(keys.DELETED_SLICES, data["delslices"])
    if data["delfiles"]:
        pipe.zadd(keys.DELETED_FILES, data["delfiles"])
    await pipe.execute()
    pipe = r.pipeline(transaction=False)
    for record in data["inodes"]:
        attr = Attr.from_dict(record["attr"])
        ino = attr.inode
        pipe.set(keys.attr(ino), attr.pack())
        if "xattrs" in record:
            pipe.hset(keys.xattrs(ino), mapping={
                _bytes(k): base64.b64decode(v) for k, v in record["xattrs"].items()
            })  # fmt: skip
        if "parents" in record:
            pipe.hset(keys.parents(ino), mapping=record["parents"])
        if "symlink" in record:
            pipe.set(keys.symlink(ino), _bytes(record["symlink"]))
        for name, (child, kind) in record.get("entries", {}).items():
            pipe.hset(keys.entries(ino), _bytes(name), pack_entry(kind, child))
            pipe.zadd(keys.names(ino), {_bytes(name): 0})
            pending += 2
            await flush()
        for index, recs in record.get("chunks", {}).items():
            pipe.rpush(keys.chunk(ino, int(index)), *[SliceRecord(*x).pack() for x in recs])
        pending += 1
        await flush()
    await flush(force=True)
    # the setting goes last: a half-loaded database is not a formatted volume
    await r.set(keys.SETTING, json.dumps(data["format"]))
    return len(data["inodes"])
