"""Copy-on-write clones of directory trees against a real redis-server and a file:// store:
same bytes, no objects written, slice references counted, usage and quotas kept right,
nothing left behind by a clone that fails or dies half-way."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from cairn.chunk.fsck import fsck
from cairn.errors import FSError
from cairn.meta import keys
from cairn.meta.clone import cleanup_detached, clone_tree, remove_detached
from cairn.meta.engine import ROOT_CTX, ROOT_INODE, Ctx, Format, format_volume
from cairn.vfs import VFS

CTX = Ctx(0, 0, umask=0o022)
KiB = 1024
BLOCK = 64 * KiB


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


@pytest.fixture
async def vfs(redis_url, tmp_path):
    await format_volume(
        redis_url,
        Format(
            name="clone",
            storage=f"file://{tmp_path}/objects?fsync=false",
            block_size=BLOCK,
            trash_days=0,
        ),
    )
    v = await VFS.open_volume(redis_url, cache_memory=8 << 20)
    yield v
    await v.close()


async def objects(vfs: VFS) -> list[str]:
    return sorted([o.key async for o in vfs.store.list("")])


async def write_file(vfs: VFS, parent: int, name: bytes, data: bytes) -> int:
    fh, attr = await vfs.create(CTX, parent, name, 0o640, os.O_RDWR | os.O_CREAT)
    if data:
        await vfs.write(fh, 0, data)
    await vfs.release(fh)
    return attr.inode


async def read_file(vfs: VFS, inode: int) -> bytes:
    fh = await vfs.open(CTX, inode, os.O_RDONLY)
    try:
        return await vfs.read(fh, 0, (await vfs.getattr(CTX, inode)).size + 10)
    finally:
        await vfs.release(fh)


async def tree(vfs: VFS, inode: int) -> dict:
    """{relative path: (type, mode, size, nlink, content or target)} of a whole tree."""
    out = {}
    todo = [(inode, b"")]
    while todo:
        d, prefix = todo.pop()
        for e in await vfs.meta.readdir(ROOT_CTX, d, plus=True):
            path = prefix + b"/" + e.name
            a = e.attr
            if a.is_dir():
                todo.append((e.inode, path))
                body = None
            elif stat.S_ISLNK(a.mode):
                body = await vfs.meta.readlink(e.inode)
            else:
                body = await read_file(vfs, e.inode)
            out[path] = (a.type, a.mode, a.size, a.nlink, a.uid, a.mtime, body)
    return out


async def sample_tree(vfs: VFS) -> int:
    src = (await vfs.mkdir(CTX, ROOT_INODE, b"src", 0o755)).inode
    sub = (await vfs.mkdir(CTX, src, b"sub", 0o700)).inode
    deep = (await vfs.mkdir(CTX, sub, b"deep", 0o755)).inode
    await write_file(vfs, src, b"big", pattern(5 * BLOCK + 123))
    await write_file(vfs, src, b"empty", b"")
    small = await write_file(vfs, sub, b"small", pattern(1000, 3))
    await write_file(vfs, deep, b"leaf", pattern(70 * KiB, 9))
    await vfs.link(CTX, small, src, b"small-link")  # two links inside the tree
    await vfs.link(CTX, small, ROOT_INODE, b"outside-link")  # and one outside
    await vfs.symlink(CTX, src, b"sym", b"sub/small")
    await vfs.setxattr(CTX, small, b"user.color", b"blue")
    fh, attr = await vfs.create(CTX, src, b"sparse", 0o644, os.O_RDWR | os.O_CREAT)
    await vfs.write(fh, 3 * BLOCK, b"tail")
    await vfs.release(fh)
    # rewrite part of a file so its chunk holds overlapping records
    fh = await vfs.open(CTX, (await vfs.lookup(CTX, src, b"big")).inode, os.O_RDWR)
    await vfs.write(fh, 100, b"X" * 5000)
    await vfs.release(fh)
    return src


async def slice_refs(vfs: VFS) -> dict[str, int]:
    raw = await vfs.meta.r.hgetall(keys.SLICE_REFS)
    return {k.decode(): int(v) for k, v in raw.items()}


async def test_clone_shares_slices_and_copies_no_data(vfs):
    src = await sample_tree(vfs)
    before_objects = await objects(vfs)
    before_refs = await slice_refs(vfs)
    before = await vfs.meta.status()
    original = await tree(vfs, src)

    attr = await clone_tree(vfs.meta, src, ROOT_INODE, b"copy")

    assert attr.is_dir() and attr.parent == ROOT_INODE
    assert attr.mode == (await vfs.meta.getattr(src)).mode
    assert await objects(vfs) == before_objects  # no object written
    copy = await tree(vfs, attr.inode)
    assert copy == original | {
        # the clone's hard-linked file has the two links inside the clone, not three
        b"/sub/small": original[b"/sub/small"][:3] + (2,) + original[b"/sub/small"][4:],
        b"/small-link": original[b"/small-link"][:3] + (2,) + original[b"/small-link"][4:],
    }
    assert original[b"/sub/small"][3] == 3
    small_copy = (await vfs.meta.resolve(ROOT_CTX, b"/copy/sub/small"))[0]
    link_copy = (await vfs.meta.resolve(ROOT_CTX, b"/copy/small-link"))[0]
    assert small_copy == link_copy
    assert await vfs.meta.getxattr(ROOT_CTX, small_copy, b"user.color") == b"blue"
    # every slice is named twice as often
    assert await slice_refs(vfs) == {k: 2 * v for k, v in before_refs.items()}
    # usage counted once per new inode: summary() counts the hard-linked file at both of
    # its names (one 4 KiB page), the clone also has its root directory (4 KiB)
    space, inodes = await vfs.meta.summary(src)
    after = await vfs.meta.status()
    assert after["used_inodes"] == before["used_inodes"] + inodes - 1 + 1
    assert after["used_space"] == before["used_space"] + space - 4096 + 4096
    assert await vfs.meta.r.zcard(keys.DETACHED) == 0
    report = await fsck(vfs.meta, vfs.store)
    assert report.ok and not report.counters, report


async def test_clone_is_copy_on_write_both_ways(vfs):
    src = await sample_tree(vfs)
    copy = (await clone_tree(vfs.meta, src, ROOT_INODE, b"copy")).inode
    original = await tree(vfs, src)
    big = (await vfs.meta.resolve(ROOT_CTX, b"/copy/big"))[0]
    fh = await vfs.open(CTX, big, os.O_RDWR)
    await vfs.write(fh, 0, b"changed")
    await vfs.release(fh)
    assert (await read_file(vfs, big))[:7] == b"changed"
    assert await tree(vfs, src) == original  # the source did not see it

    # removing the source keeps the clone readable and frees nothing it uses
    expected = await tree(vfs, copy)
    await remove_all(vfs, ROOT_INODE, b"src")
    await vfs.unlink(CTX, ROOT_INODE, b"outside-link")
    assert await tree(vfs, copy) == expected
    assert await vfs.meta.pending_slice_deletes() == []
    # removing the clone too releases every slice
    await remove_all(vfs, ROOT_INODE, b"copy")
    assert await slice_refs(vfs) == {}
    assert len(await vfs.meta.pending_slice_deletes()) > 0
    report = await fsck(vfs.meta, vfs.store)
    assert not report.counters and not report.missing, report


async def remove_all(vfs: VFS, parent: int, name: bytes) -> None:
    ino = (await vfs.lookup(CTX, parent, name)).inode
    for e in await vfs.meta.readdir(ROOT_CTX, ino, plus=True):
        if e.attr.is_dir():
            await remove_all(vfs, ino, e.name)
        else:
            await vfs.unlink(CTX, ino, e.name)
    await vfs.rmdir(CTX, parent, name)


async def test_clone_of_a_single_file(vfs):
    data = pattern(3 * BLOCK + 17, 5)
    ino = await write_file(vfs, ROOT_INODE, b"one", data)
    attr = await clone_tree(vfs.meta, ino, ROOT_INODE, b"two")
    assert attr.is_file() and attr.inode != ino
    assert await read_file(vfs, attr.inode) == data


async def test_clone_refusals_leave_nothing_behind(vfs):
    src = await sample_tree(vfs)
    refs = await slice_refs(vfs)
    status = await vfs.meta.status()
    with pytest.raises(FSError) as e:
        await clone_tree(vfs.meta, src, src, b"inside")
    assert e.value.errno == errno.EINVAL
    sub = (await vfs.lookup(CTX, src, b"sub")).inode
    with pytest.raises(FSError) as e:
        await clone_tree(vfs.meta, src, sub, b"deeper")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(FSError) as e:
        await clone_tree(vfs.meta, src, ROOT_INODE, b"src")
    assert e.value.errno == errno.EEXIST
    with pytest.raises(FSError) as e:
        await clone_tree(vfs.meta, src, ROOT_INODE, b"x", ctx=Ctx(1000, 1000))
    assert e.value.errno == errno.EPERM
    small = (await vfs.mkdir(CTX, ROOT_INODE, b"small", 0o755)).inode
    await vfs.meta.set_quota(ROOT_CTX, small, space=16 * KiB)
    with pytest.raises(FSError) as e:
        await clone_tree(vfs.meta, src, small, b"copy")
    assert e.value.errno == errno.EDQUOT
    assert await slice_refs(vfs) == refs
    after = await vfs.meta.status()
    assert (after["used_space"], after["used_inodes"]) == (
        status["used_space"] + 4096,
        status["used_inodes"] + 1,
    )  # only the "small" directory
    assert await vfs.meta.r.zcard(keys.DETACHED) == 0


async def test_a_clone_that_died_is_cleaned_up(vfs, monkeypatch):
    from cairn.meta import clone as clone_module

    src = await sample_tree(vfs)
    refs = await slice_refs(vfs)
    attrs_before = len([k async for k in vfs.meta.r.scan_iter(keys.ATTR_PATTERN)])

    async def die(*args, **kwargs):
        raise KeyboardInterrupt  # the process stops between the copy and the link

    async def no_cleanup(meta, root):
        return None

    monkeypatch.setattr(clone_module, "_attach", die)
    monkeypatch.setattr(clone_module, "remove_detached", no_cleanup)
    with pytest.raises(KeyboardInterrupt):
        await clone_tree(vfs.meta, src, ROOT_INODE, b"copy")
    monkeypatch.undo()
    assert await vfs.meta.r.zcard(keys.DETACHED) == 1
    assert await slice_refs(vfs) != refs  # the dead copy holds references
    with pytest.raises(FSError):
        await vfs.lookup(CTX, ROOT_INODE, b"copy")  # and is not visible
    assert await cleanup_detached(vfs.meta, grace=3600) == 0  # too recent to judge
    assert await cleanup_detached(vfs.meta, grace=0) == 1
    assert await slice_refs(vfs) == refs
    assert await vfs.meta.r.zcard(keys.DETACHED) == 0
    assert len([k async for k in vfs.meta.r.scan_iter(keys.ATTR_PATTERN)]) == attrs_before
    await remove_detached(vfs.meta, 999_999)  # unknown: nothing to do
    report = await fsck(vfs.meta, vfs.store)
    assert not report.counters, report


async def test_clone_root_marks(vfs):
    src = await sample_tree(vfs)
    attr = await clone_tree(
        vfs.meta, src, ROOT_INODE, b"marked", root_xattrs={b"trusted.cairn.mark": b"v1"}
    )
    assert await vfs.meta.getxattr(ROOT_CTX, attr.inode, b"trusted.cairn.mark") == b"v1"
    with pytest.raises(FSError):
        await vfs.meta.getxattr(ROOT_CTX, src, b"trusted.cairn.mark")
