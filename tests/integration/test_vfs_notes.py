"""Change notes between mounts (cairn.vfs.changes), the listings of directories a mount made,
and last closes released in batches: two VFS instances on a real redis-server."""

from __future__ import annotations

import asyncio
import errno
import os
import stat

import pytest

from cairn.errors import FSError
from cairn.meta import keys
from cairn.meta.engine import Ctx, Format, Meta, format_volume
from cairn.vfs import VFS
from cairn.vfs import changes as changes_module

ROOT = 1
CTX = Ctx(0, 0, umask=0o022)
LONG = 60.0  # caches that would hide other mounts' changes for a minute without notes


@pytest.fixture
async def volume(redis_url, tmp_path) -> str:
    fmt = Format(name="notes", storage=f"file://{tmp_path}/objects?fsync=false", trash_days=0)
    await format_volume(redis_url, fmt)
    return redis_url


@pytest.fixture
async def pair(volume):
    """Two mounts' VFS with minute-long caches; `told` gathers what `two` would tell the
    kernel to forget."""
    opts = dict(attr_ttl=LONG, entry_ttl=LONG, dir_entry_ttl=LONG, cache_memory=1 << 20)
    one = await VFS.open_volume(volume, **opts)
    two = await VFS.open_volume(volume, **opts)
    told: list[tuple[dict, list]] = []
    two.on_invalidate = lambda inodes, entries: told.append((inodes, entries))
    try:
        yield one, two, told
    finally:
        await one.close()
        await two.close()


async def eventually(check, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            if await check():
                return
        except FSError:
            pass
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"not within {timeout} s: {check.__name__}")
        await asyncio.sleep(0.01)


async def new_file(vfs: VFS, name: bytes, data: bytes = b"", parent: int = ROOT) -> int:
    fh, attr = await vfs.create(CTX, parent, name, 0o644, os.O_RDWR | os.O_CREAT)
    if data:
        await vfs.write(fh, 0, data)
    await vfs.release(fh)
    return attr.inode


async def test_other_mounts_changes_show_long_before_the_ttl(pair):
    one, two, told = pair
    ino = await new_file(one, b"f", b"first")
    assert (await two.lookup(CTX, ROOT, b"f")).mode & 0o777 == 0o644  # two caches it
    await asyncio.sleep(5 * changes_module.DEFAULT_DELAY)  # the create's notes are out
    told.clear()
    assert (await two.getattr(CTX, ino)).mode & 0o777 == 0o644  # cached again, for a minute

    await one.setattr(CTX, ino, mode=0o600)

    async def mode_changed() -> bool:
        return (await two.getattr(CTX, ino)).mode & 0o777 == 0o600

    await eventually(mode_changed)
    assert any(ino in inodes and not inodes[ino] for inodes, _ in told)  # attributes only

    fh = await one.open(CTX, ino, os.O_WRONLY)
    await one.write(fh, 0, b"second, longer")
    await one.release(fh)

    async def size_changed() -> bool:
        return (await two.getattr(CTX, ino)).size == len(b"second, longer")

    await eventually(size_changed)
    assert any(inodes.get(ino) for inodes, _ in told)  # contents too: the pages must go

    await two.lookup(CTX, ROOT, b"f")  # the name cached again
    await one.rename(CTX, ROOT, b"f", ROOT, b"g")

    async def renamed() -> bool:
        try:
            await two.lookup(CTX, ROOT, b"f")
        except FSError as error:
            return error.errno == errno.ENOENT
        return False

    await eventually(renamed)
    assert (await two.lookup(CTX, ROOT, b"g")).inode == ino
    assert any((ROOT, b"f") in entries for _, entries in told)

    await two.lookup(CTX, ROOT, b"g")
    await one.unlink(CTX, ROOT, b"g")

    async def unlinked() -> bool:
        try:
            await two.lookup(CTX, ROOT, b"g")
        except FSError as error:
            return error.errno == errno.ENOENT
        return False

    await eventually(unlinked)


async def test_a_mount_does_not_hear_its_own_notes(pair):
    one, two, told = pair
    await new_file(two, b"mine", b"x")
    await two.mkdir(CTX, ROOT, b"d", 0o755)
    await asyncio.sleep(0.2)
    assert told == []
    assert two.changes is not None and two.changes.sent >= 1
    await new_file(one, b"theirs")
    await eventually(lambda: _true_if(told))


async def _true_if(value) -> bool:
    return bool(value)


async def test_a_directory_made_here_answers_new_names_without_asking(pair):
    one, two, _ = pair
    d = (await one.mkdir(CTX, ROOT, b"d", 0o755)).inode
    asked = 0
    lookup = one.meta.lookup

    async def counting_lookup(*args):
        nonlocal asked
        asked += 1
        return await lookup(*args)

    one.meta.lookup = counting_lookup
    for i in range(50):
        name = b"f%d" % i
        with pytest.raises(FSError) as caught:
            await one.lookup(CTX, d, name)
        assert caught.value.errno == errno.ENOENT
        await new_file(one, name, parent=d)
        assert (await one.lookup(CTX, d, name)).size == 0
    assert asked == 0
    with pytest.raises(FSError) as caught:
        await one.lookup(CTX, d, b"n" * 256)
    assert caught.value.errno == errno.ENAMETOOLONG
    # Permissions still apply to an answer made here.
    await one.setattr(CTX, d, mode=0o700)
    with pytest.raises(FSError) as caught:
        await one.lookup(Ctx(1000, 1000), d, b"nothing")
    assert caught.value.errno == errno.EACCES

    # Another mount adds a name: its note drops the listing, and the name is found.
    await two.lookup(CTX, ROOT, b"d")
    await new_file(two, b"from-two", parent=d)

    async def found() -> bool:
        return (await one.lookup(CTX, d, b"from-two")).size == 0

    await eventually(found)
    assert asked >= 1


async def test_an_oversized_batch_makes_the_others_forget_everything(pair, monkeypatch):
    one, two, _ = pair
    ino = await new_file(one, b"f")
    assert (await two.lookup(CTX, ROOT, b"f")).inode == ino
    assert len(two._attrs) > 0
    monkeypatch.setattr(changes_module, "MAX_BATCH", 1)
    await one.mkdir(CTX, ROOT, b"d", 0o755)  # two notes: over the limit

    async def forgotten() -> bool:
        return len(two._attrs) == 0 and len(two._entries) == 0

    await eventually(forgotten)


async def test_last_closes_are_released_together_a_moment_later(volume):
    meta = await Meta.open(volume)
    try:
        await meta.new_session({"test": "closes"})
        meta.close_delay = 0.2
        inodes = []
        for i in range(20):
            ino, _ = await meta.create(CTX, ROOT, b"f%d" % i, 0o644)
            inodes.append(ino)
        for ino in inodes:
            await meta.close(ino)
        # Still recorded as open right after the closes...
        assert all([await meta.r.scard(keys.opened(ino)) for ino in inodes])
        # ...and an open in between keeps its record, with no round trip to make one.
        await meta.open(CTX, inodes[0], os.O_RDONLY)

        async def released() -> bool:
            counts = [await meta.r.scard(keys.opened(ino)) for ino in inodes]
            return counts[0] == 1 and not any(counts[1:])

        await eventually(released)
        # An unlinked file whose record lingers is deleted at once: it is closed here.
        await meta.close(inodes[0])
        await meta.unlink(CTX, ROOT, b"f0")
        with pytest.raises(FSError):
            await meta.getattr(inodes[0])
        # A file unlinked while open here is deleted at its last close, not later.
        ino, _ = await meta.create(CTX, ROOT, b"open", 0o644)
        await meta.unlink(CTX, ROOT, b"open")
        assert stat.S_ISREG((await meta.getattr(ino)).mode)
        await meta.close(ino)
        with pytest.raises(FSError):
            await meta.getattr(ino)
    finally:
        await meta.close_session()
        await meta.close()


async def test_the_listener_comes_back_after_a_redis_restart_and_forgets_its_caches(tmp_path):
    from cairn import localstack

    server = localstack.start_tcp(localstack.redis_server(tmp_path / "redis"))
    try:
        url = server.url
        fmt = Format(name="restart", storage=f"file://{tmp_path}/objects", trash_days=0)
        await format_volume(url, fmt)
        opts = dict(attr_ttl=LONG, entry_ttl=LONG, dir_entry_ttl=LONG, cache_memory=1 << 20)
        one = await VFS.open_volume(url, **opts)
        two = await VFS.open_volume(url, **opts)
        try:
            ino = await new_file(one, b"f")
            await two.lookup(CTX, ROOT, b"f")
            assert len(two._attrs) > 0
            server.stop()
            await asyncio.sleep(0.2)
            server = localstack.start_tcp(localstack.redis_server(tmp_path / "redis", port=server.port))

            async def reset() -> bool:  # notes may have been missed: everything cached goes
                return len(two._attrs) == 0

            await eventually(reset, timeout=10)
            await two.getattr(CTX, ino)  # cached again
            await one.setattr(CTX, ino, mode=0o600)

            async def heard() -> bool:
                return (await two.getattr(CTX, ino)).mode & 0o777 == 0o600

            await eventually(heard, timeout=10)
        finally:
            await one.close()
            await two.close()
    finally:
        server.stop()
