"""Extended attributes: one hash per inode, with the Linux namespaces' access rules."""

from __future__ import annotations

import errno

from cairn.errors import FSError
from cairn.meta import keys, perms
from cairn.meta.base import Tx, now_ns
from cairn.meta.types import (
    MAX_XATTR_NAME,
    MAX_XATTR_VALUE,
    R_OK,
    W_OK,
    XATTR_CREATE,
    XATTR_REPLACE,
    Attr,
    Ctx,
)


def _check_name(name: bytes) -> None:
    if not name:
        raise FSError(errno.EINVAL, "empty xattr name")
    if len(name) > MAX_XATTR_NAME:
        raise FSError(errno.ERANGE, f"xattr name longer than {MAX_XATTR_NAME} bytes")


def _check_access(ctx: Ctx, attr: Attr, name: bytes, mask: int) -> None:
    """user.* follows the file's mode (regular files and dirs only); trusted.* is root's."""
    if name.startswith(b"trusted."):
        if ctx.uid != 0:
            raise FSError(errno.EPERM, "trusted xattrs are root's")
    elif name.startswith(b"user."):
        if not (attr.is_file() or attr.is_dir()):
            raise FSError(errno.EPERM, "user xattrs only on files and directories")
        perms.check(ctx, attr, mask)


class XattrMixin:
    async def getxattr(self, ctx: Ctx, inode: int, name: bytes) -> bytes:
        _check_name(name)
        pipe = self.r.pipeline(transaction=False)
        pipe.get(keys.attr(inode))
        pipe.hget(keys.xattrs(inode), name)
        raw, value = await pipe.execute()
        if raw is None:
            raise FSError(errno.ENOENT, f"no inode {inode}")
        _check_access(ctx, Attr.unpack(inode, raw), name, R_OK)
        if value is None:
            raise FSError(errno.ENODATA, f"no xattr {name!r}")
        return value

    async def listxattr(self, ctx: Ctx, inode: int) -> list[bytes]:
        await self.getattr(inode)
        return sorted(await self.r.hkeys(keys.xattrs(inode)))

    async def setxattr(
        self, ctx: Ctx, inode: int, name: bytes, value: bytes, flags: int = 0
    ) -> None:
        _check_name(name)
        if len(value) > MAX_XATTR_VALUE:
            raise FSError(errno.E2BIG, f"xattr value larger than {MAX_XATTR_VALUE} bytes")
        if flags & ~(XATTR_CREATE | XATTR_REPLACE) or flags == XATTR_CREATE | XATTR_REPLACE:
            raise FSError(errno.EINVAL, f"bad xattr flags {flags}")

        async def body(tx: Tx) -> None:
            attr = await self._get_attr(tx.p, inode)
            _check_access(ctx, attr, name, W_OK)
            exists = await tx.p.hexists(keys.xattrs(inode), name)
            if flags & XATTR_CREATE and exists:
                raise FSError(errno.EEXIST, f"xattr {name!r} exists")
            if flags & XATTR_REPLACE and not exists:
                raise FSError(errno.ENODATA, f"no xattr {name!r}")
            attr.ctime = now_ns()
            p = tx.multi()
            p.hset(keys.xattrs(inode), name, value)
            p.set(keys.attr(inode), attr.pack())

        await self._txn(body, keys.attr(inode), keys.xattrs(inode), lock=[inode])

    async def removexattr(self, ctx: Ctx, inode: int, name: bytes) -> None:
        _check_name(name)

        async def body(tx: Tx) -> None:
            attr = await self._get_attr(tx.p, inode)
            _check_access(ctx, attr, name, W_OK)
            if not await tx.p.hexists(keys.xattrs(inode), name):
                raise FSError(errno.ENODATA, f"no xattr {name!r}")
            attr.ctime = now_ns()
            p = tx.multi()
            p.hdel(keys.xattrs(inode), name)
            p.set(keys.attr(inode), attr.pack())

        await self._txn(body, keys.attr(inode), keys.xattrs(inode), lock=[inode])
