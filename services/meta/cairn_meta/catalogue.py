"""The CSI catalogue: what the Controller has provisioned, kept in cairn-meta's Redis.

Two hashes from the key map, each id -> one msgpack record: `csi:volumes` (also read by the
admin API and `cairn volume` tools: name, kind, capacity, used_bytes, used_inodes, path,
node, created_at, parameters) and `csi:snapshots`. A record is always written whole, so a
reader never sees half of one; `add` stores a record only while its id is free (HSETNX),
which is how two racing calls for one name end up with one volume, and `update` changes a
record in a WATCH/MULTI/EXEC so concurrent updates do not overwrite each other.

Records carry no secrets: a volume on a file system named by the request's secrets says so
(`meta: "secret"`) and names the file system by its uuid, never by its URL.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgpack
from redis.exceptions import WatchError

from cairn.errors import ConflictError
from cairn.meta import keys

CREATING, READY, DELETING = "creating", "ready", "deleting"

R = TypeVar("R", bound="_Record")


class _Record:
    """Plain dataclass records, packed as a dict of their fields (unknown fields ignored,
    so an older reader survives a newer writer)."""

    def pack(self) -> bytes:
        return msgpack.packb(dataclasses.asdict(self), use_bin_type=True)

    @classmethod
    def unpack(cls: type[R], raw: bytes) -> R:
        data = msgpack.unpackb(raw, raw=False)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class VolumeRecord(_Record):
    name: str
    kind: str = "shared"  # "shared" | "local"
    capacity: int = 0
    used_bytes: int = 0
    used_inodes: int = 0
    path: str = ""  # shared: the directory in the file system; local: on the node's disk
    node: str = ""  # local: the node holding the data
    created_at: float = 0.0
    parameters: dict = field(default_factory=dict)
    state: str = CREATING
    fs_uuid: str = ""  # shared: the file system holding the directory
    fs_name: str = ""
    meta: str = "default"  # "default": cairn-meta's own file system; "secret": the request's
    source_kind: str = ""  # "snapshot" | "volume" when created from a content source
    source_id: str = ""


@dataclass
class SnapshotRecord(_Record):
    name: str
    source_volume_id: str
    size_bytes: int = 0
    path: str = ""
    created_at: float = 0.0
    state: str = CREATING
    fs_uuid: str = ""
    meta: str = "default"


class Table(Generic[R]):
    """One hash of records keyed by id."""

    def __init__(self, redis: Any, key: str, record: type[R]):
        self.redis, self.key, self.record = redis, key, record

    async def get(self, record_id: str) -> R | None:
        raw = await self.redis.hget(self.key, record_id)
        return None if raw is None else self.record.unpack(raw)

    async def add(self, record_id: str, record: R) -> tuple[R, bool]:
        """Stores `record` unless the id is taken: (the stored record, whether it is ours)."""
        if await self.redis.hsetnx(self.key, record_id, record.pack()):
            return record, True
        existing = await self.get(record_id)
        if existing is None:  # deleted between the two calls: try once more
            return await self.add(record_id, record)
        return existing, False

    async def put(self, record_id: str, record: R) -> None:
        await self.redis.hset(self.key, record_id, record.pack())

    async def update(self, record_id: str, change: Callable[[R], R | None]) -> R | None:
        """Applies `change` to the stored record atomically; None if there is none.
        `change` returns the new record, or None to leave it as it is."""
        for _ in range(50):
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(self.key)
                    raw = await pipe.hget(self.key, record_id)
                    if raw is None:
                        return None
                    current = self.record.unpack(raw)
                    new = change(current)
                    if new is None:
                        return current
                    pipe.multi()
                    pipe.hset(self.key, record_id, new.pack())
                    await pipe.execute()
                    return new
            except WatchError:
                continue
        raise ConflictError(f"{self.key} {record_id} keeps changing: retry")

    async def delete(self, record_id: str) -> bool:
        return bool(await self.redis.hdel(self.key, record_id))

    async def ids(self) -> list[str]:
        return sorted(k.decode() if isinstance(k, bytes) else k for k in
                      await self.redis.hkeys(self.key))  # fmt: skip

    async def many(self, ids: list[str]) -> list[tuple[str, R]]:
        """The records of `ids` that exist, in the order given."""
        if not ids:
            return []
        raws = await self.redis.hmget(self.key, ids)
        return [(i, self.record.unpack(r)) for i, r in zip(ids, raws, strict=True) if r]

    async def all(self) -> list[tuple[str, R]]:
        return await self.many(await self.ids())


class Catalogue:
    """The volumes and snapshots the Controller keeps."""

    def __init__(self, redis: Any):
        self.redis = redis
        self.volumes: Table[VolumeRecord] = Table(redis, keys.CSI_VOLUMES, VolumeRecord)
        self.snapshots: Table[SnapshotRecord] = Table(redis, keys.CSI_SNAPSHOTS, SnapshotRecord)

    async def reserved(self) -> dict[str, int]:
        """node -> bytes the local volumes placed on it claim."""
        claimed: dict[str, int] = {}
        for _, r in await self.volumes.all():
            if r.kind == "local" and r.node:
                claimed[r.node] = claimed.get(r.node, 0) + r.capacity
        return claimed

    async def path_owner(self, path: str, fs_uuid: str) -> str | None:
        """The id of the shared volume using directory `path` of a file system, if any."""
        for vid, r in await self.volumes.all():
            if r.kind == "shared" and r.path == path and r.fs_uuid == fs_uuid:
                return vid
        return None


# -- pages ------------------------------------------------------------------------------------


def page(
    ids: list[str], starting_token: str, max_entries: int, valid: re.Pattern
) -> tuple[list[str], str]:
    """A page of sorted `ids` and the token of the next one ("" at the end).

    The token is the id the next page starts at, so a page stays right when entries are
    added or removed between calls. A token that is no id of the right form (`valid`)
    raises ConflictError, which CSI answers ABORTED (the caller restarts the listing)."""
    if starting_token and not valid.fullmatch(starting_token):
        raise ConflictError(f"starting_token {starting_token[:64]!r} is not one of ours")
    start = 0
    if starting_token:
        start = next((i for i, v in enumerate(ids) if v >= starting_token), len(ids))
    end = len(ids) if max_entries <= 0 else start + max_entries
    return ids[start:end], (ids[end] if end < len(ids) else "")
