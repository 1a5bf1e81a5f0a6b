"""Copy-on-write clones of a directory tree: new inodes naming the same slices, no data copied.

Each file of a clone gets chunk lists of its own, copied record for record from the source,
and every slice a copied record names gains one reference in slicerefs. Source and clone
then share the objects: a later write to either appends a new slice to that file only, and
the usual reference counting frees a slice once no chunk of any file names it.

A clone is built detached. Its root inode is recorded in the `detached` zset (with the time
of its last progress) and is linked into no directory until every inode below it is
written; one last transaction links it under its new name and counts its space and inodes
against the volume and the quotas above it. So a clone appears whole or not at all, and a
crash half-way leaves only a detached tree that `cleanup_detached` removes (dropping the
slice references it took) once it has made no progress for a grace period.

Each file is copied in one transaction that watches its attributes and chunk lists, so it is
copied as it was at one instant, and a compaction or a delete racing with the copy makes the
copy start over rather than reference slices that are being freed. The tree as a whole is
not a point-in-time image: quiesce writers first for that (a CSI snapshot of a volume that
pods are writing to is "crash consistent" per file only).
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cairn.errors import FSError
from cairn.meta import keys
from cairn.meta.base import Tx, now_ns
from cairn.meta.namespace import check_name
from cairn.meta.slices import unpack_records
from cairn.meta.types import (
    CHUNK_SIZE,
    ROOT_CTX,
    TRASH_INODE,
    Attr,
    Ctx,
    pack_entry,
    space_of,
    unpack_entry,
)

log = logging.getLogger(__name__)

PAGE = 1000  # directory entries read (and written) per round trip
DETACHED_GRACE = 6 * 3600.0  # seconds without progress after which a detached tree is junk


@dataclass
class _Plan:
    """What a clone has written so far: its size and the hard links it must fix up."""

    space: int = 0
    inodes: int = 0
    # source inode of a multiply-linked file -> its clone, and the clone's links per parent
    links: dict[int, int] = field(default_factory=dict)
    link_parents: dict[int, Counter] = field(default_factory=dict)


async def clone_tree(
    meta: Any,
    src: int,
    parent: int,
    name: bytes,
    *,
    ctx: Ctx = ROOT_CTX,
    root_xattrs: dict[bytes, bytes] | None = None,
) -> Attr:
    """Clones the tree at inode `src` (a directory, or a single file) as `parent`/`name`.

    Attributes (owner, mode, times), extended attributes, symlinks and hard links inside the
    tree are kept; `root_xattrs` are added to the clone's root (a mark saying who made it).
    Only root clones (the copy bypasses permissions). Raises EEXIST if the name is taken,
    EINVAL when cloning a directory into itself, EDQUOT/ENOSPC if the copy would not fit.
    Returns the attributes of the new root."""
    if ctx.uid != 0:
        raise FSError(errno.EPERM, "only root clones trees")
    check_name(name)
    if parent == TRASH_INODE:
        raise FSError(errno.EPERM, "the trash takes no new entries")
    source = await meta.getattr(src)
    await meta._get_dir(meta.r, parent)
    if source.is_dir() and src in await meta._ancestors(parent):
        raise FSError(errno.EINVAL, "cannot clone a directory into itself")
    if await meta.r.hexists(keys.entries(parent), name):
        raise FSError(errno.EEXIST, f"{name!r} exists in {parent}")
    space, inodes = await meta.summary(src) if source.is_dir() else (0, 0)
    dirs = await meta._quota_chain(parent)
    await meta._check_usage(dirs, space + space_of(source), inodes + 1)
    root = await meta._new_inode()
    await meta.r.zadd(keys.DETACHED, {str(root): time.time()})
    plan = _Plan()
    try:
        if source.is_dir():
            await _copy_dir(meta, src, root, parent, plan, root_xattrs or {})
        else:
            copied = await _copy_node(meta, src, root, parent, root_xattrs or {})
            if copied is None:
                raise FSError(errno.ENOENT, f"no inode {src}")
            plan.space, plan.inodes = space_of(copied), 1
        await _fix_links(meta, plan)
        return await _attach(meta, root, parent, name, plan)
    except BaseException:
        try:
            await remove_detached(meta, root)
        except Exception as error:  # Redis gone too: cleanup_detached finishes it later
            log.warning("clone of inode %d: could not remove the partial copy: %s", src, error)
        raise


# -- copying ------------------------------------------------------------------------------


async def _copy_dir(
    meta: Any, src: int, root: int, parent: int, plan: _Plan, root_xattrs: dict
) -> None:
    """Copies the directories one at a time (a stack, not recursion: trees may be deep);
    each directory's attributes are written after its entries, with the link count its
    subdirectories give it."""
    todo = [(src, root, parent, root_xattrs)]
    while todo:
        old, new, new_parent, extra = todo.pop()
        raw = await meta.r.get(keys.attr(old))
        if raw is None:
            # Removed after its parent listed it: the clone keeps it, empty.
            now = now_ns()
            attr = Attr(old, stat.S_IFDIR | 0o755, 0, 0, 4096, 2, 0, now, now, now)
        else:
            attr = Attr.unpack(old, raw)
        subdirs = 0
        after = b""
        while True:
            names = await meta.r.zrangebylex(
                keys.names(old), b"(" + after if after else b"-", b"+", start=0, num=PAGE
            )
            if not names:
                break
            after = names[-1]
            values = await meta.r.hmget(keys.entries(old), names)
            entries = []
            for entry_name, value in zip(names, values, strict=True):
                if value is None:
                    continue
                kind, child = unpack_entry(value)
                made = await _copy_child(meta, kind, child, new, plan, todo)
                if made is None:
                    continue
                subdirs += kind == stat.S_IFDIR
                entries.append((entry_name, pack_entry(kind, made)))
            if entries:
                pipe = meta.r.pipeline(transaction=False)
                pipe.hset(keys.entries(new), mapping=dict(entries))
                pipe.zadd(keys.names(new), {n: 0 for n, _ in entries})
                pipe.zadd(keys.DETACHED, {str(root): time.time()})  # progress
                await pipe.execute()
        copy = Attr(**{**attr.to_dict(), "inode": new, "parent": new_parent})
        copy.nlink = 2 + subdirs
        xattrs = {**await meta.r.hgetall(keys.xattrs(old)), **extra}
        pipe = meta.r.pipeline(transaction=True)
        pipe.set(keys.attr(new), copy.pack())
        if xattrs:
            pipe.hset(keys.xattrs(new), mapping=xattrs)
        await pipe.execute()
        plan.space += space_of(copy)
        plan.inodes += 1


async def _copy_child(
    meta: Any, kind: int, child: int, new_parent: int, plan: _Plan, todo: list
) -> int | None:
    """The clone's inode for one entry (None when the entry vanished meanwhile)."""
    if kind == stat.S_IFDIR:
        made = await meta._new_inode()
        todo.append((child, made, new_parent, {}))
        return made
    if child in plan.links:  # another link of a file already copied
        made = plan.links[child]
        plan.link_parents[made][new_parent] += 1
        return made
    made = await meta._new_inode()
    copied = await _copy_node(meta, child, made, new_parent, {})
    if copied is None:
        return None
    plan.space += space_of(copied)
    plan.inodes += 1
    if copied.nlink > 1:
        plan.links[child] = made
        plan.link_parents[made] = Counter({new_parent: 1})
    return made


async def _copy_node(meta: Any, old: int, new: int, new_parent: int, extra: dict) -> Attr | None:
    """Copies one non-directory inode (chunk lists, xattrs, symlink target) in one
    transaction, taking a reference on every slice it names; None if it is gone."""

    async def body(tx: Tx) -> Attr | None:
        raw = await tx.p.get(keys.attr(old))
        if raw is None:
            return None
        attr = Attr.unpack(old, raw)
        lists: list[list[bytes]] = []
        if attr.is_file() and attr.size > 0:
            names = [keys.chunk(old, i) for i in range((attr.size + CHUNK_SIZE - 1) // CHUNK_SIZE)]
            await tx.watch(*names)
            pipe = meta.r.pipeline(transaction=False)
            for chunk_name in names:
                pipe.lrange(chunk_name, 0, -1)
            lists = await pipe.execute()
        xattrs = {**await tx.p.hgetall(keys.xattrs(old)), **extra}
        target = await tx.p.get(keys.symlink(old)) if stat.S_ISLNK(attr.mode) else None
        refs: Counter = Counter()
        for records in lists:
            refs.update(keys.slice_key(r.id, r.size) for r in unpack_records(records) if r.id)
        copy = Attr(**{**attr.to_dict(), "inode": new, "parent": new_parent})
        p = tx.multi()
        p.set(keys.attr(new), copy.pack())
        for index, records in enumerate(lists):
            if records:
                p.rpush(keys.chunk(new, index), *records)
        for member, count in refs.items():
            p.hincrby(keys.SLICE_REFS, member, count)
        if xattrs:
            p.hset(keys.xattrs(new), mapping=xattrs)
        if target is not None:
            p.set(keys.symlink(new), target)
        return copy

    return await meta._txn(body, keys.attr(old))


async def _fix_links(meta: Any, plan: _Plan) -> None:
    """Gives each multiply-linked file of the clone the links it has inside the clone."""
    for made, parents in plan.link_parents.items():
        raw = await meta.r.get(keys.attr(made))
        if raw is None:
            continue
        attr = Attr.unpack(made, raw)
        attr.nlink = sum(parents.values())
        attr.parent = min(parents)
        pipe = meta.r.pipeline(transaction=True)
        pipe.set(keys.attr(made), attr.pack())
        pipe.delete(keys.parents(made))
        if attr.nlink > 1:
            pipe.hset(keys.parents(made), mapping={str(k): v for k, v in parents.items()})
        await pipe.execute()


async def _attach(meta: Any, root: int, parent: int, name: bytes, plan: _Plan) -> Attr:
    """Links the finished clone under parent/name and counts its usage, in one transaction."""
    dirs = await meta._quota_chain(parent)
    await meta._check_usage(dirs, plan.space, plan.inodes)

    async def body(tx: Tx) -> Attr:
        pattr = await meta._get_dir(tx.p, parent)
        if pattr.nlink == 0:
            raise FSError(errno.ENOENT, f"directory {parent} was removed")
        if await tx.p.hexists(keys.entries(parent), name):
            raise FSError(errno.EEXIST, f"{name!r} exists in {parent}")
        attr = await meta._get_attr(tx.p, root)
        now = now_ns()
        pattr.mtime = pattr.ctime = now
        if attr.is_dir():
            pattr.nlink += 1
        p = tx.multi()
        p.set(keys.attr(parent), pattr.pack())
        p.hset(keys.entries(parent), name, pack_entry(attr.mode, root))
        p.zadd(keys.names(parent), {name: 0})
        meta._queue_usage(p, dirs, plan.space, plan.inodes)
        p.zrem(keys.DETACHED, str(root))
        return attr

    return await meta._txn(body, keys.attr(parent), keys.entries(parent), lock=[parent])


# -- removing what a failed clone left -------------------------------------------------------


async def remove_detached(meta: Any, root: int) -> None:
    """Deletes a detached tree (never linked, so never counted in any usage) and the slice
    references its files took, then forgets it. Safe to repeat."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        ino = todo.pop()
        if ino in seen:
            continue
        seen.add(ino)
        raw = await meta.r.get(keys.attr(ino))
        children = await meta.r.hvals(keys.entries(ino))
        todo.extend(unpack_entry(v)[1] for v in children)
        if raw is not None:
            attr = Attr.unpack(ino, raw)
            if attr.is_file() and attr.size > 0:
                last = (attr.size + CHUNK_SIZE - 1) // CHUNK_SIZE
                await meta._drop_chunks(ino, range(last))
        await meta.r.delete(
            keys.attr(ino), keys.xattrs(ino), keys.parents(ino), keys.symlink(ino),
            keys.entries(ino), keys.names(ino),
        )  # fmt: skip
    await meta.r.zrem(keys.DETACHED, str(root))


async def cleanup_detached(meta: Any, grace: float = DETACHED_GRACE) -> int:
    """Removes detached trees whose clone made no progress for `grace` seconds (its process
    died); how many. Housekeeping calls this."""
    stale = await meta.r.zrangebyscore(keys.DETACHED, "-inf", time.time() - grace)
    for member in stale:
        await remove_detached(meta, int(member))
    return len(stale)
