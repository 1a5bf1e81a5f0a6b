"""Cairn's admin API (cairn.admin.v1.Admin): status, volume catalogue, sessions, usage.

Reads the metadata engine's Redis through the key map; the one write is GetDirUsage's
first look at a directory, which gives it usage counters (an unlimited quota).
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from cairn import __version__
from cairn.errors import CairnError, FailedPrecondition, FSError, InvalidArgument, NotFound
from cairn.meta import keys
from cairn.meta.types import ROOT_CTX, ROOT_INODE
from cairn.rpc.gen import admin_pb2, admin_pb2_grpc
from cairn.rpc.status import handle_servicer_errors

Check = tuple[str, str, Callable[[], Awaitable[None]]]  # (name, redacted url, check)
DEFAULT_PAGE = 100


@handle_servicer_errors
class Admin(admin_pb2_grpc.AdminServicer):
    def __init__(self, service: str, redis, checks: list[Check], node: str = "",
                 filesystem: Callable[[], Awaitable[Any]] | None = None):  # fmt: skip
        self.service, self.redis, self.checks = service, redis, checks
        self.filesystem = filesystem  # opens (once) the metadata engine of cairn-meta's file system
        self.node = node or os.uname().nodename
        self.started = time.monotonic()

    async def GetStatus(self, request, context):
        deps = []
        for name, url, check in self.checks:
            began = time.monotonic()
            try:
                await check()
                ok, detail = True, f"{(time.monotonic() - began) * 1000:.1f} ms"
            except CairnError as error:
                ok, detail = False, str(error)
            deps.append(admin_pb2.Dependency(name=name, url=url, ok=ok, detail=detail))
        return admin_pb2.GetStatusResponse(
            service=self.service,
            version=__version__,
            node=self.node,
            uptime_seconds=time.monotonic() - self.started,
            dependencies=deps,
        )

    async def ListVolumes(self, request, context):
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        limit = request.max_entries or DEFAULT_PAGE
        ids = sorted(k.decode() for k in await self.redis.hkeys(keys.CSI_VOLUMES))
        start = 0
        if request.starting_token:
            if request.starting_token not in ids:
                raise InvalidArgument(f"unknown starting_token '{request.starting_token}'")
            start = ids.index(request.starting_token)
        page = ids[start : start + limit]
        records = await self.redis.hmget(keys.CSI_VOLUMES, page) if page else []
        volumes = [_volume(vid, rec) for vid, rec in zip(page, records, strict=True) if rec]
        following = ids[start + limit] if start + limit < len(ids) else ""
        return admin_pb2.ListVolumesResponse(volumes=volumes, next_token=following)

    async def ListSessions(self, request, context):
        sessions = []
        for sid, beat in await self.redis.zrange(keys.SESSIONS, 0, -1, withscores=True):
            info = {
                k.decode(): v.decode()
                for k, v in (await self.redis.hgetall(keys.session(sid.decode()))).items()
            }
            sessions.append(
                admin_pb2.Session(
                    session_id=int(sid),
                    hostname=info.get("hostname", ""),
                    pid=int(info.get("pid", 0) or 0),
                    mountpoint=info.get("mountpoint", ""),
                    version=info.get("version", ""),
                    started_at=float(info.get("started", 0) or 0),
                    heartbeat_at=beat,
                )
            )
        return admin_pb2.ListSessionsResponse(sessions=sessions)

    async def GetUsage(self, request, context):
        space, inodes, setting = await self.redis.mget(
            keys.USED_SPACE, keys.USED_INODES, keys.SETTING
        )
        fmt = json.loads(setting) if setting else {}
        return admin_pb2.GetUsageResponse(
            used_bytes=int(space or 0),
            used_inodes=int(inodes or 0),
            capacity_bytes=int(fmt.get("capacity", 0)),
            inode_limit=int(fmt.get("inodes", 0)),
            volumes=await self.redis.hlen(keys.CSI_VOLUMES),
        )

    async def GetDirUsage(self, request, context):
        path = request.path or "/"
        if not path.startswith("/") or any(p in (".", "..") for p in path.split("/")):
            raise InvalidArgument(f"path {path!r} must be absolute, without '.' or '..'")
        if self.filesystem is None:
            raise FailedPrecondition("this cairn-meta serves no file system (no --meta-url)")
        meta = await self.filesystem()
        ino = ROOT_INODE
        for part in filter(None, path.split("/")):
            try:
                ino, attr = await meta.lookup(ROOT_CTX, ino, part.encode())
            except FSError as error:
                if error.errno in (errno.ENOENT, errno.ENOTDIR):
                    raise NotFound(f"{path} does not exist") from None
                raise
            if not attr.is_dir():
                raise InvalidArgument(f"{path}: {part} is not a directory")
        try:
            quota = await meta.get_quota(ino)
        except FSError as error:
            if error.errno != errno.ENODATA:
                raise
            quota = await meta.set_quota(ROOT_CTX, ino, 0, 0)  # no limit: counters only
        return admin_pb2.GetDirUsageResponse(used_bytes=quota.used_space,
                                             used_inodes=quota.used_inodes)  # fmt: skip


def _volume(volume_id: str, record: bytes) -> admin_pb2.Volume:
    rec = msgpack.unpackb(record)
    return admin_pb2.Volume(
        volume_id=volume_id,
        name=rec.get("name", ""),
        kind=rec.get("kind", "shared"),
        capacity_bytes=rec.get("capacity", 0),
        used_bytes=rec.get("used_bytes", 0),
        used_inodes=rec.get("used_inodes", 0),
        path=rec.get("path", ""),
        node=rec.get("node", ""),
        created_at=rec.get("created_at", 0.0),
        parameters={str(k): str(v) for k, v in rec.get("parameters", {}).items()},
    )
