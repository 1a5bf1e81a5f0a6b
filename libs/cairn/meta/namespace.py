"""The namespace: lookups, attributes, creating and removing entries, rename, links, readdir,
open and close.

A directory is two keys: a hash name -> (type, inode) for lookups and a zset of the same
names (all scored 0, so ordered by bytes) for paging through huge directories. Each change
rewrites the parent's attributes (mtime), so transactions WATCH the parent's attr key.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any

from cairn.errors import ConflictError, FSError
from cairn.meta import keys, perms
from cairn.meta.base import REDIS_ERRORS, Tx, now_ns, unavailable
from cairn.meta.types import (
    MAX_NAME,
    R_OK,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INODE,
    TRASH_INODE,
    TRASH_NAME,
    UTIME_NOW,
    UTIME_OMIT,
    W_OK,
    X_OK,
    Attr,
    Ctx,
    Entry,
    align4k,
    pack_entry,
    space_of,
    unpack_entry,
)

MAX_SYMLINK = 4095
MAX_SYMLINK_HOPS = 40
_NO_ID = (None, -1, 0xFFFFFFFF)
log = logging.getLogger(__name__)

CLOSE_BATCH = 1000  # deferred closes released per round trip
CREATE_ATTEMPTS = 1000  # a create meeting a parent that keeps changing gives up after this

Queue = Callable[[Any], None]


def check_name(name: bytes) -> None:
    if len(name) > MAX_NAME:
        raise FSError(errno.ENAMETOOLONG, f"name longer than {MAX_NAME} bytes")
    if not name or b"/" in name or b"\0" in name:
        raise FSError(errno.EINVAL, f"invalid name {name!r}")


def _hidden(parent: int, name: bytes) -> bool:
    return parent == ROOT_INODE and name == TRASH_NAME


def _create_refusals(ctx: Ctx, pattr: Attr, is_dir: bool, max_nlink: int) -> tuple[str, str]:
    """The errno names a create in `pattr` fails with before and after the existence check."""
    if not pattr.is_dir():
        return "ENOTDIR", ""
    if not perms.allowed(ctx, pattr, X_OK):
        return "EACCES", ""
    if not perms.allowed(ctx, pattr, W_OK):
        return "", "EACCES"
    if pattr.nlink == 0:
        return "", "ENOENT"
    if is_dir and pattr.nlink >= max_nlink:
        return "", "EMLINK"
    return "", ""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NamespaceMixin:
    """Namespace operations of cairn.meta.engine.Meta."""

    # -- reading ------------------------------------------------------------------------------

    async def getattr(self, inode: int) -> Attr:
        return await self._get_attr(self.r, inode)

    async def lookup(self, ctx: Ctx, parent: int, name: bytes) -> tuple[int, Attr]:
        if len(name) > MAX_NAME:
            raise FSError(errno.ENAMETOOLONG, f"name longer than {MAX_NAME} bytes")
        raw_parent, value, raw_child = await self._eval(
            "lookup", [keys.attr(parent), keys.entries(parent)], [name, keys.attr("%s")]
        )
        if not raw_parent:
            raise FSError(errno.ENOENT, f"no inode {parent}")
        pattr = Attr.unpack(parent, raw_parent)
        if not pattr.is_dir():
            raise FSError(errno.ENOTDIR, f"inode {parent} is not a directory")
        perms.check(ctx, pattr, X_OK)
        if name == b".":
            return parent, pattr
        if name == b"..":
            up = pattr.parent or ROOT_INODE
            return up, await self.getattr(up)
        if _hidden(parent, name):
            return TRASH_INODE, await self.getattr(TRASH_INODE)
        if not value:
            raise FSError(errno.ENOENT, f"no entry {name!r} in {parent}")
        _, ino = unpack_entry(value)
        if not raw_child:  # removed in between: as the lookup would have found it
            raise FSError(errno.ENOENT, f"no inode {ino}")
        return ino, Attr.unpack(ino, raw_child)

    async def readlink(self, inode: int) -> bytes:
        target = await self.r.get(keys.symlink(inode))
        if target is None:
            attr = await self.getattr(inode)
            raise FSError(errno.EINVAL, f"inode {attr.inode} is not a symlink")
        return target

    async def access(self, ctx: Ctx, inode: int, mask: int) -> None:
        attr = await self.getattr(inode)
        if mask:
            perms.check(ctx, attr, mask)

    async def readdir(
        self,
        ctx: Ctx,
        inode: int,
        start_after: bytes = b"",
        limit: int = 1000,
        plus: bool = False,
    ) -> list[Entry]:
        """Up to `limit` entries named after `start_after`, in byte order ("." and ".." are
        the caller's to add)."""
        attr = await self._get_dir(self.r, inode)
        perms.check(ctx, attr, R_OK)
        low = b"(" + start_after if start_after else b"-"
        names = await self.r.zrangebylex(keys.names(inode), low, b"+", start=0, num=limit)
        if not names:
            return []
        values = await self.r.hmget(keys.entries(inode), names)
        out = [
            Entry(n, ino, kind)
            for n, v in zip(names, values, strict=True)
            if v is not None
            for kind, ino in [unpack_entry(v)]
        ]
        if plus:
            attrs = await self._get_attrs([e.inode for e in out])
            for e, a in zip(out, attrs, strict=True):
                e.attr = a
            out = [e for e in out if e.attr is not None]
        return out

    async def resolve(self, ctx: Ctx, path: bytes, follow: bool = True) -> tuple[int, Attr]:
        """Walks an absolute path from the root, following symlinks (ELOOP after 40)."""
        hops = 0
        todo = [p for p in path.split(b"/") if p]
        ino, attr = ROOT_INODE, await self.getattr(ROOT_INODE)
        stack: list[int] = []
        while todo:
            name = todo.pop(0)
            parent = ino
            ino, attr = await self.lookup(ctx, ino, name)
            if stat.S_ISLNK(attr.mode) and (todo or follow):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise FSError(errno.ELOOP, f"too many symlinks in {path!r}")
                target = await self.readlink(ino)
                todo = [p for p in target.split(b"/") if p] + todo
                ino = ROOT_INODE if target.startswith(b"/") else parent
                attr = await self.getattr(ino)
            stack.append(ino)
        return ino, attr

    # -- creating -------------------------------------------------------------------------------

    async def mknod(
        self, ctx: Ctx, parent: int, name: bytes, type: int, mode: int, rdev: int = 0
    ) -> tuple[int, Attr]:
        if type not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFIFO, stat.S_IFSOCK,
                        stat.S_IFCHR, stat.S_IFBLK):  # fmt: skip
            raise FSError(errno.EINVAL, f"cannot make a node of type {type:o}")
        attr = await self._create(ctx, parent, name, type, mode, rdev)
        return attr.inode, attr

    async def mkdir(self, ctx: Ctx, parent: int, name: bytes, mode: int) -> tuple[int, Attr]:
        attr = await self._create(ctx, parent, name, stat.S_IFDIR, mode)
        return attr.inode, attr

    async def create(
        self, ctx: Ctx, parent: int, name: bytes, mode: int, flags: int = os.O_RDWR
    ) -> tuple[int, Attr]:
        """Makes a regular file and opens it (close() it later)."""
        attr = await self._create(ctx, parent, name, stat.S_IFREG, mode, opening=True)
        return attr.inode, attr

    async def symlink(self, ctx: Ctx, parent: int, name: bytes, target: bytes) -> tuple[int, Attr]:
        if not target or len(target) > MAX_SYMLINK:
            raise FSError(errno.ENAMETOOLONG if target else errno.ENOENT, "bad symlink target")
        attr = await self._create(ctx, parent, name, stat.S_IFLNK, 0o777, target=target)
        return attr.inode, attr

    async def _create(
        self,
        ctx: Ctx,
        parent: int,
        name: bytes,
        kind: int,
        mode: int,
        rdev: int = 0,
        target: bytes | None = None,
        opening: bool = False,
    ) -> Attr:
        """Makes the entry in one round trip (create.lua) when this client's copy of the
        parent's attributes is current, and registers the open too if `opening`."""
        check_name(name)
        if name in (b".", b"..") or _hidden(parent, name):
            raise FSError(errno.EEXIST, f"{name!r} exists")
        if parent == TRASH_INODE:
            raise FSError(errno.EPERM, "the trash takes no new entries")
        ino = await self._new_inode()
        is_dir = kind == stat.S_IFDIR
        size = 4096 if is_dir else len(target) if target else 0
        space = align4k(size)
        dirs = await self._quota_chain(parent)
        fmt = self.fmt
        sid = self.sid if opening else None
        script_keys = [
            keys.attr(parent), keys.entries(parent), keys.names(parent), keys.attr(ino),
            keys.symlink(ino), keys.USED_SPACE, keys.USED_INODES, keys.QUOTA,
            keys.QUOTA_SPACE, keys.QUOTA_INODES, keys.opened(ino),
            keys.session_open(sid if sid is not None else 0),
        ]  # fmt: skip
        self.stats.txn += 1
        async with self._inode_locks([parent]):
            raw = self._dir_raw.get(parent)
            if raw is None:
                raw = await self._eval_get(keys.attr(parent))
            for _ in range(CREATE_ATTEMPTS):
                if raw is None:
                    self._remember_dir(parent, None)
                    raise FSError(errno.ENOENT, f"no inode {parent}")
                pattr = Attr.unpack(parent, raw)
                before, after = _create_refusals(ctx, pattr, is_dir, self.max_nlink)
                bits = 0o777 if target else mode & 0o7777 & ~ctx.umask
                gid = ctx.gid
                if pattr.mode & stat.S_ISGID:
                    gid = pattr.gid
                    if is_dir:
                        bits |= stat.S_ISGID
                if not is_dir and bits & stat.S_ISGID and ctx.uid != 0 and not ctx.in_group(gid):
                    bits &= ~stat.S_ISGID
                now = now_ns()
                attr = Attr(ino, kind | bits, ctx.uid, gid, size, 2 if is_dir else 1, rdev,
                            now, now, now, parent)  # fmt: skip
                pattr.mtime = pattr.ctime = now
                if is_dir:
                    pattr.nlink += 1
                new_raw = pattr.pack()
                args = [
                    raw, new_raw, name, pack_entry(kind, ino), attr.pack(), target or b"",
                    space, fmt.capacity or 0, fmt.inodes or 0, before, after,
                    "" if sid is None else sid, ino, *dirs,
                ]  # fmt: skip
                answer = await self._eval("create", script_keys, args)
                outcome = int(answer[0])
                if outcome == 0:
                    self._remember_dir(parent, new_raw)
                    if opening:
                        self._opens[ino] = self._opens.get(ino, 0) + 1
                    return attr
                if outcome == 1:  # the parent changed: decide again on what it is now
                    self.stats.txn_restarts += 1
                    raw = answer[1] if len(answer) > 1 else None
                    self._remember_dir(parent, raw)
                    continue
                self._remember_dir(parent, raw)
                code, message = (_text(x) for x in answer[1:3])
                raise FSError(getattr(errno, code), f"{name!r} in {parent}: {message}")
        raise ConflictError(f"creating {name!r} in {parent} kept conflicting")

    async def _eval_get(self, key: str) -> bytes | None:
        try:
            return await self.r.get(key)
        except REDIS_ERRORS as error:
            raise unavailable(self.url, error) from None

    async def link(self, ctx: Ctx, inode: int, newparent: int, newname: bytes) -> Attr:
        check_name(newname)
        if newname in (b".", b"..") or _hidden(newparent, newname):
            raise FSError(errno.EEXIST, f"{newname!r} exists")

        async def body(tx: Tx) -> Attr:
            npattr = await self._get_dir(tx.p, newparent)
            if newparent == TRASH_INODE or npattr.parent == TRASH_INODE:
                raise FSError(errno.EPERM, "the trash takes no links")
            perms.check(ctx, npattr, X_OK)
            if await tx.p.hexists(keys.entries(newparent), newname):
                raise FSError(errno.EEXIST, f"{newname!r} exists in {newparent}")
            perms.check(ctx, npattr, W_OK)
            await tx.watch(keys.attr(inode), keys.parents(inode))
            attr = await self._get_attr(tx.p, inode)
            if attr.is_dir():
                raise FSError(errno.EPERM, "cannot hard-link a directory")
            if attr.nlink == 0:
                raise FSError(errno.ENOENT, f"inode {inode} was unlinked")
            if attr.nlink >= self.max_nlink:
                raise FSError(errno.EMLINK, f"inode {inode} has too many links")
            counts = await self._parent_counts(tx, attr)
            counts[newparent] = counts.get(newparent, 0) + 1
            now = now_ns()
            attr.nlink += 1
            attr.ctime = now
            npattr.mtime = npattr.ctime = now
            p = tx.multi()
            p.set(keys.attr(inode), attr.pack())
            p.set(keys.attr(newparent), npattr.pack())
            p.hset(keys.entries(newparent), newname, pack_entry(attr.mode, inode))
            p.zadd(keys.names(newparent), {newname: 0})
            p.hset(keys.parents(inode), mapping={str(k): v for k, v in counts.items()})
            return attr

        return await self._txn(
            body, keys.attr(newparent), keys.entries(newparent), lock=[newparent]
        )

    async def get_parents(self, inode: int) -> dict[int, int]:
        """Every directory linking the inode -> how many links it holds there."""
        attr = await self.getattr(inode)
        raw = await self.r.hgetall(keys.parents(inode))
        counts = {int(k): int(v) for k, v in raw.items()}
        return counts or ({attr.parent: 1} if attr.parent else {})

    async def _parent_counts(self, tx: Tx, attr: Attr) -> dict[int, int]:
        raw = await tx.p.hgetall(keys.parents(attr.inode))
        counts = {int(k): int(v) for k, v in raw.items()}
        if not counts and attr.parent:
            counts = {attr.parent: 1}
        return counts

    # -- removing -----------------------------------------------------------------------------

    async def unlink(self, ctx: Ctx, parent: int, name: bytes) -> None:
        await self._unlink(ctx, parent, name)

    async def _unlink(self, ctx: Ctx, parent: int, name: bytes, keep: bool = False) -> None:
        """Removes a non-directory entry; keep=True deletes for good instead of to the trash."""
        check_name(name)
        if name in (b".", b".."):
            raise FSError(errno.EISDIR, f"cannot unlink {name!r}")
        if _hidden(parent, name):
            raise FSError(errno.EPERM, "the trash cannot be removed")
        dirs = await self._quota_chain(parent)

        async def body(tx: Tx) -> tuple[int, int] | None:
            pattr = await self._get_dir(tx.p, parent)
            perms.check(ctx, pattr, X_OK)
            value = await tx.p.hget(keys.entries(parent), name)
            if value is None:
                raise FSError(errno.ENOENT, f"no entry {name!r} in {parent}")
            kind, ino = unpack_entry(value)
            if kind == stat.S_IFDIR:
                raise FSError(errno.EISDIR, f"{name!r} is a directory")
            perms.check(ctx, pattr, W_OK)
            await tx.watch(keys.attr(ino), keys.opened(ino), keys.parents(ino))
            attr = await self._get_attr(tx.p, ino)
            perms.check_sticky(ctx, pattr, attr)
            now = now_ns()
            queue, freed = await self._plan_drop(tx, parent, name, attr, dirs, now, keep)
            pattr.mtime = pattr.ctime = now
            p = tx.multi()
            queue(p)
            p.hdel(keys.entries(parent), name)
            p.zrem(keys.names(parent), name)
            written[0] = pattr.pack()
            p.set(keys.attr(parent), written[0])
            return freed

        written: list[bytes | None] = [None]
        freed = await self._txn(body, keys.attr(parent), keys.entries(parent), lock=[parent])
        self._remember_dir(parent, written[0])
        if freed:
            await self._free_file(*freed)

    async def _plan_drop(
        self,
        tx: Tx,
        parent: int,
        name: bytes,
        attr: Attr,
        dirs: list[int],
        now: int,
        keep: bool = False,
    ) -> tuple[Queue, tuple[int, int] | None]:
        """What removing the link parent/name of a non-directory does, decided from reads in
        tx: one link fewer, a move into the trash, an open orphan, or a deleted inode. Returns
        the writes to queue and, for a deleted file, (inode, size) whose chunks to free."""
        ino = attr.inode
        attr.ctime = now
        space = space_of(attr)
        if attr.nlink > 1:
            counts = await self._parent_counts(tx, attr)
            counts[parent] = counts.get(parent, 1) - 1
            counts = {k: v for k, v in counts.items() if v > 0}
            attr.nlink -= 1
            moved_to = None
            if attr.parent == parent and parent not in counts and counts:
                moved_to = min(counts)
                attr.parent = moved_to
            new_dirs = await self._quota_chain(moved_to) if moved_to else []

            def queue(p: Any) -> None:
                p.set(keys.attr(ino), attr.pack())
                p.delete(keys.parents(ino))
                if attr.nlink > 1 or len(counts) > 1:
                    p.hset(keys.parents(ino), mapping={str(k): v for k, v in counts.items()})
                if moved_to:
                    self._queue_usage(p, dirs, -space, -1, volume=False)
                    self._queue_usage(p, new_dirs, space, 1, volume=False)

            return queue, None
        in_trash = parent == TRASH_INODE or await self._parent_of_dir(parent) == TRASH_INODE
        if self.fmt.trash_days > 0 and not keep and not in_trash:
            trash = await self._trash_dir(tx)
            trash_name = f"{parent}-{ino}-".encode() + name
            trash_name = trash_name[:MAX_NAME]
            attr.parent = trash

            def queue(p: Any) -> None:
                p.set(keys.attr(ino), attr.pack())
                p.delete(keys.parents(ino))
                p.hset(keys.entries(trash), trash_name, pack_entry(attr.mode, ino))
                p.zadd(keys.names(trash), {trash_name: 0})
                self._queue_usage(p, dirs, -space, -1, volume=False)

            return queue, None
        if await self._held_open(tx, ino):
            attr.nlink = 0
            attr.parent = 0

            def queue(p: Any) -> None:
                self._orphans.add(ino)  # its last close here is not deferred
                p.set(keys.attr(ino), attr.pack())
                p.delete(keys.parents(ino))
                self._queue_usage(p, dirs, -space, -1, volume=False)

            return queue, None

        sid = self.sid if ino in self._closing else None

        def queue(p: Any) -> None:
            self._queue_remove_inode(p, attr)
            self._queue_usage(p, dirs, -space, -1, volume=False)
            if sid is not None:  # the record of a close not yet released goes with it
                p.srem(keys.session_open(sid), ino)

        return queue, (ino, attr.size) if attr.is_file() and attr.size > 0 else None

    async def _held_open(self, tx: Tx, ino: int) -> bool:
        """Does any session hold ino open? This client's closes not yet released (see
        close_file) do not count: the file is closed, only its record lingers."""
        if ino in self._opens:
            return True
        if ino not in self._closing:
            return bool(await tx.p.scard(keys.opened(ino)))
        holders = {int(s) for s in await tx.p.smembers(keys.opened(ino))}
        holders.discard(self.sid)
        return bool(holders)

    async def rmdir(self, ctx: Ctx, parent: int, name: bytes) -> None:
        check_name(name)
        if name == b".":
            raise FSError(errno.EINVAL, "cannot remove '.'")
        if name == b"..":
            raise FSError(errno.ENOTEMPTY, "cannot remove '..'")
        if _hidden(parent, name):
            raise FSError(errno.EPERM, "the trash cannot be removed")
        dirs = await self._quota_chain(parent)

        async def body(tx: Tx) -> None:
            pattr = await self._get_dir(tx.p, parent)
            perms.check(ctx, pattr, X_OK)
            value = await tx.p.hget(keys.entries(parent), name)
            if value is None:
                raise FSError(errno.ENOENT, f"no entry {name!r} in {parent}")
            kind, ino = unpack_entry(value)
            if kind != stat.S_IFDIR:
                raise FSError(errno.ENOTDIR, f"{name!r} is not a directory")
            perms.check(ctx, pattr, W_OK)
            await tx.watch(keys.attr(ino), keys.entries(ino))
            attr = await self._get_attr(tx.p, ino)
            perms.check_sticky(ctx, pattr, attr)
            if await tx.p.hlen(keys.entries(ino)):
                raise FSError(errno.ENOTEMPTY, f"directory {name!r} is not empty")
            now = now_ns()
            pattr.mtime = pattr.ctime = now
            pattr.nlink = max(2, pattr.nlink - 1)
            p = tx.multi()
            self._queue_remove_inode(p, attr)
            self._queue_usage(p, dirs, -space_of(attr), -1, volume=False)
            p.hdel(keys.QUOTA, str(ino))
            p.hdel(keys.QUOTA_SPACE, str(ino))
            p.hdel(keys.QUOTA_INODES, str(ino))
            p.hdel(keys.entries(parent), name)
            p.zrem(keys.names(parent), name)
            p.set(keys.attr(parent), pattr.pack())

        await self._txn(body, keys.attr(parent), keys.entries(parent), lock=[parent])
        self._parents.pop(parent, None)

    # -- rename -----------------------------------------------------------------------------------

    async def rename(
        self,
        ctx: Ctx,
        parent: int,
        name: bytes,
        newparent: int,
        newname: bytes,
        flags: int = 0,
    ) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise FSError(errno.EINVAL, f"bad rename flags {flags}")
        check_name(name)
        check_name(newname)
        if name in (b".", b"..") or newname in (b".", b".."):
            raise FSError(errno.EINVAL, "cannot rename '.' or '..'")
        if (
            _hidden(parent, name)
            or _hidden(newparent, newname)
            or TRASH_INODE
            in (
                parent,
                newparent,
            )
        ):
            raise FSError(errno.EPERM, "the trash cannot be renamed")
        exchange = bool(flags & RENAME_EXCHANGE)
        src_dirs = await self._quota_chain(parent)
        dst_dirs = await self._quota_chain(newparent)

        async def body(tx: Tx) -> Any:
            await tx.watch(keys.attr(newparent), keys.entries(newparent))
            pattr = await self._get_dir(tx.p, parent)
            npattr = pattr if newparent == parent else await self._get_dir(tx.p, newparent)
            if npattr.parent == TRASH_INODE:
                raise FSError(errno.EPERM, "the trash takes no renamed entries")
            perms.check(ctx, pattr, X_OK)
            perms.check(ctx, npattr, X_OK)
            sval = await tx.p.hget(keys.entries(parent), name)
            if sval is None:
                raise FSError(errno.ENOENT, f"no entry {name!r} in {parent}")
            _, sino = unpack_entry(sval)
            dval = await tx.p.hget(keys.entries(newparent), newname)
            dino = unpack_entry(dval)[1] if dval else None
            perms.check(ctx, pattr, W_OK)
            perms.check(ctx, npattr, W_OK)
            await tx.watch(keys.attr(sino), keys.parents(sino), keys.entries(sino))
            sattr = await self._get_attr(tx.p, sino)
            dattr = None
            if dino is not None:
                await tx.watch(keys.attr(dino), keys.opened(dino), keys.entries(dino),
                               keys.parents(dino))  # fmt: skip
                dattr = await self._get_attr(tx.p, dino)
            if dino == sino:
                return None  # two links of one inode: POSIX says do nothing
            if flags & RENAME_NOREPLACE and dattr:
                raise FSError(errno.EEXIST, f"{newname!r} exists in {newparent}")
            if exchange and not dattr:
                raise FSError(errno.ENOENT, f"no entry {newname!r} in {newparent}")
            perms.check_sticky(ctx, pattr, sattr)
            if dattr:
                perms.check_sticky(ctx, npattr, dattr)
            if dattr and not exchange:
                if sattr.is_dir() and not dattr.is_dir():
                    raise FSError(errno.ENOTDIR, f"{newname!r} is not a directory")
                if not sattr.is_dir() and dattr.is_dir():
                    raise FSError(errno.EISDIR, f"{newname!r} is a directory")
                if dattr.is_dir() and await tx.p.hlen(keys.entries(dino)):
                    raise FSError(errno.ENOTEMPTY, f"{newname!r} is not empty")
            moving = [(sattr, parent, newparent, src_dirs, dst_dirs)]
            if exchange:
                moving.append((dattr, newparent, parent, dst_dirs, src_dirs))
            if parent != newparent:
                for a, _, to, _, _ in moving:
                    if a.is_dir():
                        await self._check_not_inside(tx, to, a.inode)
                        perms.check(ctx, a, W_OK)
                for a, _, _, frm, to in moving:
                    if a.is_dir() and frm != to:
                        raise FSError(errno.EXDEV, "cannot move a directory across quotas")
                for a, _, _, frm, to in moving:
                    if frm != to:
                        gained = [d for d in to if d not in frm]
                        await self._check_usage(gained, space_of(a), 1, volume=False)
            if (
                not exchange
                and sattr.is_dir()
                and parent != newparent
                and not (dattr and dattr.is_dir())
                and npattr.nlink >= self.max_nlink
            ):
                raise FSError(errno.EMLINK, f"directory {newparent} has too many links")
            now = now_ns()
            queues: list[Queue] = []
            freed: Any = None
            if dattr and not exchange:
                if dattr.is_dir():
                    queues.append(self._plan_rmdir(dattr, dst_dirs))
                    npattr.nlink -= 1
                else:
                    q, freed = await self._plan_drop(tx, newparent, newname, dattr, dst_dirs, now)
                    queues.append(q)
            for a, frm_parent, to_parent, frm, to in moving:
                queues.append(await self._plan_move(tx, a, frm_parent, to_parent, frm, to, now))
                if a.is_dir() and frm_parent != to_parent:
                    (pattr if frm_parent == parent else npattr).nlink -= 1
                    (npattr if to_parent == newparent else pattr).nlink += 1
            pattr.mtime = pattr.ctime = now
            npattr.mtime = npattr.ctime = now
            p = tx.multi()
            for q in queues:
                q(p)
            if exchange:
                p.hset(keys.entries(parent), name, dval)
                p.hset(keys.entries(newparent), newname, sval)
            else:
                p.hdel(keys.entries(parent), name)
                p.zrem(keys.names(parent), name)
                p.hset(keys.entries(newparent), newname, sval)
                p.zadd(keys.names(newparent), {newname: 0})
            p.set(keys.attr(parent), pattr.pack())
            p.set(keys.attr(newparent), npattr.pack())
            return freed

        freed = await self._txn(
            body, keys.attr(parent), keys.entries(parent), lock=[parent, newparent]
        )
        self._parents.clear()
        if freed:
            await self._free_file(*freed)

    async def _check_not_inside(self, tx: Tx, start: int, ino: int) -> None:
        """EINVAL if directory `start` is `ino` or below it (a dir moved into itself)."""
        d = start
        seen: set[int] = set()
        while d and d != ROOT_INODE and d not in seen:
            if d == ino:
                raise FSError(errno.EINVAL, "cannot move a directory into itself")
            seen.add(d)
            await tx.watch(keys.attr(d))
            d = (await self._get_attr(tx.p, d)).parent

    def _plan_rmdir(self, attr: Attr, dirs: list[int]) -> Queue:
        def queue(p: Any) -> None:
            self._queue_remove_inode(p, attr)
            self._queue_usage(p, dirs, -space_of(attr), -1, volume=False)
            for k in (keys.QUOTA, keys.QUOTA_SPACE, keys.QUOTA_INODES):
                p.hdel(k, str(attr.inode))

        return queue

    async def _plan_move(
        self,
        tx: Tx,
        attr: Attr,
        frm_parent: int,
        to_parent: int,
        frm: list[int],
        to: list[int],
        now: int,
    ) -> Queue:
        """Writes that move one inode from frm_parent to to_parent (attr, parents, quotas)."""
        attr.ctime = now
        counts = None
        if attr.nlink > 1 and not attr.is_dir():
            counts = await self._parent_counts(tx, attr)
            counts[frm_parent] = counts.get(frm_parent, 1) - 1
            counts[to_parent] = counts.get(to_parent, 0) + 1
            counts = {k: v for k, v in counts.items() if v > 0}
        moved = attr.parent == frm_parent  # usage follows the parent the attr names
        if moved:
            attr.parent = to_parent
        space = space_of(attr)

        def queue(p: Any) -> None:
            p.set(keys.attr(attr.inode), attr.pack())
            if counts is not None:
                p.delete(keys.parents(attr.inode))
                p.hset(keys.parents(attr.inode), mapping={str(k): v for k, v in counts.items()})
            if moved and frm != to:
                self._queue_usage(p, frm, -space, -1, volume=False)
                self._queue_usage(p, to, space, 1, volume=False)

        return queue

    # -- attributes ---------------------------------------------------------------------------

    async def setattr(
        self,
        ctx: Ctx,
        inode: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime: int | None = None,
        mtime: int | None = None,
        ctime: int | None = None,
    ) -> Attr:
        attr = None
        if size is not None:
            attr = await self.truncate(ctx, inode, size)
        uid = None if uid in _NO_ID else uid
        gid = None if gid in _NO_ID else gid
        atime = None if atime == UTIME_OMIT else atime
        mtime = None if mtime == UTIME_OMIT else mtime
        if mode is None and uid is None and gid is None and atime is None and mtime is None:
            if ctime is None:
                return attr or await self.getattr(inode)

        async def body(tx: Tx) -> Attr:
            a = await self._get_attr(tx.p, inode)
            now = now_ns()
            if uid is not None or gid is not None:
                if ctx.uid != 0:
                    if ctx.uid != a.uid or (uid is not None and uid != a.uid):
                        raise FSError(errno.EPERM, "only root changes a file's owner")
                    if gid is not None and gid != a.gid and not ctx.in_group(gid):
                        raise FSError(errno.EPERM, f"not a member of group {gid}")
                if uid is not None:
                    a.uid = uid
                if gid is not None:
                    a.gid = gid
                if ctx.uid != 0 and not a.is_dir():
                    a.mode = a.type | perms.killpriv(a.mode & 0o7777)
            if mode is not None:
                if not perms.is_owner(ctx, a):
                    raise FSError(errno.EPERM, "only the owner changes the mode")
                bits = mode & 0o7777
                if ctx.uid != 0 and bits & stat.S_ISGID and not ctx.in_group(a.gid):
                    bits &= ~stat.S_ISGID
                a.mode = a.type | bits
            for field, value in (("atime", atime), ("mtime", mtime)):
                if value is None:
                    continue
                if value == UTIME_NOW:
                    if not perms.is_owner(ctx, a) and not perms.allowed(ctx, a, W_OK):
                        raise FSError(errno.EACCES, "no permission to touch the times")
                    value = now
                elif not perms.is_owner(ctx, a):
                    raise FSError(errno.EPERM, "only the owner sets explicit times")
                setattr(a, field, value)
            a.ctime = now if ctime is None else ctime
            tx.multi().set(keys.attr(inode), a.pack())
            return a

        return await self._txn(body, keys.attr(inode), lock=[inode])

    async def clear_suid_on_write(self, ctx: Ctx, inode: int) -> Attr:
        """Clears set-user-ID (and set-group-ID with group execute) when a non-root writes."""
        attr = await self.getattr(inode)
        if ctx.uid == 0 or perms.killpriv(attr.mode) == attr.mode:
            return attr

        async def body(tx: Tx) -> Attr:
            a = await self._get_attr(tx.p, inode)
            a.mode = perms.killpriv(a.mode)
            a.ctime = now_ns()
            tx.multi().set(keys.attr(inode), a.pack())
            return a

        return await self._txn(body, keys.attr(inode), lock=[inode])

    # -- open and close -------------------------------------------------------------------

    async def open_file(self, ctx: Ctx, inode: int, flags: int) -> Attr:
        """Checks access for the open mode and records the inode as open in this session.

        Also reachable as meta.open(ctx, inode, flags) on an instance (Meta.open(url) on the
        class connects)."""
        attr = await self.getattr(inode)
        acc = flags & os.O_ACCMODE
        mask = {os.O_RDONLY: R_OK, os.O_WRONLY: W_OK}.get(acc, R_OK | W_OK)
        if flags & os.O_TRUNC:
            mask |= W_OK
        if stat.S_ISLNK(attr.mode):
            raise FSError(errno.ELOOP, f"inode {inode} is a symlink")
        if attr.is_dir() and mask & W_OK:
            raise FSError(errno.EISDIR, f"inode {inode} is a directory")
        perms.check(ctx, attr, mask)
        if attr.is_file():
            await self._register_open(inode)
        return attr

    async def _register_open(self, inode: int) -> None:
        count = self._opens.get(inode, 0)
        self._opens[inode] = count + 1
        if count or self.sid is None:
            return
        if inode in self._closing:  # closed a moment ago and still registered: keep that
            self._closing.discard(inode)
            return
        if inode in self._releasing:  # its release is on the wire: register after it
            async with self._close_lock:
                pass
        sid = self.sid

        async def body(tx: Tx) -> None:
            await self._get_attr(tx.p, inode)
            p = tx.multi()
            p.sadd(keys.opened(inode), sid)
            p.sadd(keys.session_open(sid), inode)

        try:
            await self._txn(body, keys.attr(inode), lock=[inode])
        except BaseException:
            self._opens.pop(inode, None)
            raise

    async def close_file(self, inode: int) -> None:
        """Forgets one open of inode; the last close of an unlinked file deletes it.

        With `close_delay` > 0 the last close is not waited for: the inode's open record
        goes (and an unlinked file is deleted) in a batch with the other closes of the
        next close_delay seconds, one round trip for all; an open in between keeps the
        record instead. flush_closes() sends the batch at once."""
        count = self._opens.get(inode, 0)
        if count > 1:
            self._opens[inode] = count - 1
            return
        if not count:
            return
        del self._opens[inode]
        if self.close_delay > 0 and self.sid is not None and inode not in self._orphans:
            self._closing.add(inode)
            if self._closer is None or self._closer.done():
                self._closer = asyncio.get_running_loop().create_task(self._close_soon())
            return
        await self._release_open(inode, self.sid)

    async def _close_soon(self) -> None:
        await asyncio.sleep(self.close_delay)
        try:
            await self.flush_closes()
        except Exception as error:  # the session's cleanup releases them in the end
            log.warning("releasing closed files failed: %s", error)

    async def flush_closes(self) -> None:
        """Releases the opens closed but not yet released (see close_file)."""
        async with self._close_lock:
            while self._closing and self.sid is not None:
                sid = self.sid
                batch = list(self._closing)[:CLOSE_BATCH]
                self._closing.difference_update(batch)
                self._releasing.update(batch)
                try:
                    calls = [
                        ([keys.attr(i), keys.opened(i), keys.session_open(sid)], [sid, i])
                        for i in batch
                    ]
                    unlinked = await self._eval_many("release", calls)
                    for ino, gone in zip(batch, unlinked, strict=True):
                        if int(gone) and ino not in self._opens:
                            await self._release_open(ino, sid, recorded=False)
                finally:
                    self._releasing.difference_update(batch)

    async def _release_open(self, inode: int, sid: int | None, recorded: bool = True) -> None:
        """Drops sid's open record of inode (recorded=False: release.lua already did) and
        deletes the inode if that was the last open of an unlinked file."""
        self._orphans.discard(inode)
        if sid is not None and recorded and inode not in self._opens:
            # the common case (the file is still linked) in one round trip
            args = [sid, inode]
            script_keys = [keys.attr(inode), keys.opened(inode), keys.session_open(sid)]
            if not int(await self._eval("release", script_keys, args)):
                return

        async def body(tx: Tx) -> tuple[int, int] | None:
            raw = await tx.p.get(keys.attr(inode))
            holders = {int(s) for s in await tx.p.smembers(keys.opened(inode))}
            holders.discard(sid)
            p = None
            if sid is not None:
                p = tx.multi()
                p.srem(keys.opened(inode), sid)
                p.srem(keys.session_open(sid), inode)
            if raw is None:
                return None
            attr = Attr.unpack(inode, raw)
            if attr.nlink > 0 or holders or inode in self._opens:
                return None
            p = tx.multi()
            return (inode, attr.size) if self._queue_remove_inode(p, attr) else None

        freed = await self._txn(body, keys.attr(inode), keys.opened(inode), lock=[inode])
        if freed:
            await self._free_file(*freed)

    # -- trash ------------------------------------------------------------------------------------

    async def _trash_dir(self, tx: Tx | None = None) -> int:
        """The trash subdirectory of this hour (made on first use), watched in tx if given."""
        hour = time.strftime("%Y-%m-%d-%H", time.gmtime()).encode()
        ino = self._trash_dirs.get(hour)
        if ino is None:
            ino = await self._make_trash_dir(hour)
            self._trash_dirs = {hour: ino}
        if tx is not None:
            await tx.watch(keys.attr(ino))
            if not await tx.p.exists(keys.attr(ino)):  # purged meanwhile: make it again
                self._trash_dirs.clear()
                ino = await self._make_trash_dir(hour)
                self._trash_dirs = {hour: ino}
                await tx.watch(keys.attr(ino))
        return ino

    async def _make_trash_dir(self, hour: bytes) -> int:
        value = await self.r.hget(keys.entries(TRASH_INODE), hour)
        if value is not None:
            return unpack_entry(value)[1]
        ino = await self._new_inode()

        async def body(tx: Tx) -> int:
            value = await tx.p.hget(keys.entries(TRASH_INODE), hour)
            if value is not None:
                return unpack_entry(value)[1]
            tattr = await self._get_attr(tx.p, TRASH_INODE)
            now = now_ns()
            attr = Attr(ino, stat.S_IFDIR | 0o555, 0, 0, 4096, 2, 0, now, now, now, TRASH_INODE)
            tattr.nlink += 1
            tattr.mtime = tattr.ctime = now
            p = tx.multi()
            p.set(keys.attr(ino), attr.pack())
            p.set(keys.attr(TRASH_INODE), tattr.pack())
            p.hset(keys.entries(TRASH_INODE), hour, pack_entry(attr.mode, ino))
            p.zadd(keys.names(TRASH_INODE), {hour: 0})
            self._queue_usage(p, [], space_of(attr), 1)
            return ino

        # no local lock: this runs inside other transactions that may hold the same stripe
        return await self._txn(body, keys.attr(TRASH_INODE), keys.entries(TRASH_INODE))
