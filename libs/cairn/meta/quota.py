"""Directory quotas (what a CSI volume's size becomes) and statfs.

A quota counts everything strictly below its directory: bytes (in 4 KiB pages) and inodes.
Usage is kept up to date by every operation that adds or removes space or inodes below it
(see MetaBase._quota_chain); setting a quota counts the existing tree once.
"""

from __future__ import annotations

import errno

from cairn.errors import FSError
from cairn.meta import keys
from cairn.meta.types import ROOT_INODE, Ctx, Quota, StatFs, space_of, unpack_entry

UNLIMITED_SPACE = 1 << 50  # what statfs reports as the size of an unlimited volume (1 PiB)
UNLIMITED_INODES = 1 << 40


class QuotaMixin:
    async def set_quota(self, ctx: Ctx, inode: int, space: int = 0, inodes: int = 0) -> Quota:
        if ctx.uid != 0:
            raise FSError(errno.EPERM, "only root sets quotas")
        if space < 0 or inodes < 0:
            raise FSError(errno.EINVAL, "negative quota")
        await self._get_dir(self.r, inode)
        field = str(inode)
        pipe = self.r.pipeline(transaction=True)
        if not await self.r.hexists(keys.QUOTA, field):
            # a new quota starts from what the tree holds now
            used_space, used_inodes = await self.summary(inode)
            pipe.hset(keys.QUOTA_SPACE, field, used_space)
            pipe.hset(keys.QUOTA_INODES, field, used_inodes)
        pipe.hset(keys.QUOTA, field, f"{space},{inodes}")
        await pipe.execute()
        self._forget_quotas()
        return await self.get_quota(inode)

    async def get_quota(self, inode: int) -> Quota:
        field = str(inode)
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(keys.QUOTA, field)
        pipe.hget(keys.QUOTA_SPACE, field)
        pipe.hget(keys.QUOTA_INODES, field)
        limit, used_space, used_inodes = await pipe.execute()
        if limit is None:
            raise FSError(errno.ENODATA, f"no quota on inode {inode}")
        space, inodes = (int(x) for x in limit.split(b","))
        return Quota(space, inodes, int(used_space or 0), int(used_inodes or 0))

    async def remove_quota(self, ctx: Ctx, inode: int) -> None:
        if ctx.uid != 0:
            raise FSError(errno.EPERM, "only root removes quotas")
        field = str(inode)
        pipe = self.r.pipeline(transaction=True)
        for k in (keys.QUOTA, keys.QUOTA_SPACE, keys.QUOTA_INODES):
            pipe.hdel(k, field)
        await pipe.execute()
        self._forget_quotas()

    async def list_quotas(self) -> dict[int, Quota]:
        out = {}
        for field in await self.r.hkeys(keys.QUOTA):
            try:
                out[int(field)] = await self.get_quota(int(field))
            except FSError:
                continue
        return out

    async def summary(self, inode: int) -> tuple[int, int]:
        """(space, inodes) used strictly below a directory, by walking it."""
        space = count = 0
        todo = [inode]
        while todo:
            d = todo.pop()
            async for names in self._scan_names(d):
                values = await self.r.hmget(keys.entries(d), names)
                inos = [unpack_entry(v)[1] for v in values if v is not None]
                for a in await self._get_attrs(inos):
                    if a is None:
                        continue
                    count += 1
                    space += space_of(a)
                    if a.is_dir():
                        todo.append(a.inode)
        return space, count

    async def _scan_names(self, d: int, page: int = 1000):
        low = b"-"
        while True:
            names = await self.r.zrangebylex(keys.names(d), low, b"+", start=0, num=page)
            if not names:
                return
            yield names
            low = b"(" + names[-1]

    async def statfs(self, inode: int = ROOT_INODE) -> StatFs:
        pipe = self.r.pipeline(transaction=False)
        pipe.get(keys.USED_SPACE)
        pipe.get(keys.USED_INODES)
        used_space, used_inodes = (int(x or 0) for x in await pipe.execute())
        total = self.fmt.capacity or UNLIMITED_SPACE
        avail = max(0, total - used_space)
        total_inodes = self.fmt.inodes or UNLIMITED_INODES
        avail_inodes = max(0, total_inodes - used_inodes)
        attr = await self.getattr(inode)
        start = inode if attr.is_dir() else attr.parent
        quotas = await self._quota_set()
        if quotas and start:
            space_done = inodes_done = False
            for d in await self._ancestors(start):
                if d not in quotas or (space_done and inodes_done):
                    continue
                try:
                    q = await self.get_quota(d)
                except FSError:
                    continue
                if q.space and not space_done:
                    total = min(total, q.space)
                    avail = max(0, min(avail, q.space - q.used_space))
                    used_space = q.used_space
                    space_done = True
                if q.inodes and not inodes_done:
                    avail_inodes = max(0, min(avail_inodes, q.inodes - q.used_inodes))
                    used_inodes = q.used_inodes
                    inodes_done = True
        return StatFs(total, avail, used_inodes, avail_inodes)
