"""Sessions and locks across two clients on one redis-server: heartbeats, expiry cleanup
(locks released, open-unlinked files deleted), flock and POSIX record locks."""

from __future__ import annotations

import asyncio
import errno
import os
import stat

import pytest

from cairn.errors import FSError
from cairn.meta.engine import (
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    ROOT_CTX,
    ROOT_INODE,
    Format,
    Meta,
    SliceView,
    format_volume,
)

ROOT = ROOT_CTX
END = (1 << 63) - 1


@pytest.fixture
async def pair(redis_url):
    await format_volume(redis_url, Format(name="t", storage="file:///tmp/t", trash_days=0))
    a = await Meta.open(redis_url)
    b = await Meta.open(redis_url)
    await a.new_session({"hostname": "node-a", "mountpoint": "/mnt/a", "pid": 1})
    await b.new_session({"hostname": "node-b"})
    yield a, b
    await a.close()
    await b.close()


async def new_file(m, name=b"f"):
    ino, _ = await m.mknod(ROOT, ROOT_INODE, name, stat.S_IFREG, 0o644)
    return ino


async def test_sessions_listed_and_heartbeat(pair):
    a, b = pair
    sessions = {s["sid"]: s for s in await a.list_sessions()}
    assert set(sessions) == {a.sid, b.sid}
    assert sessions[a.sid]["hostname"] == "node-a"
    assert sessions[a.sid]["pid"] == "1"
    before = sessions[a.sid]["heartbeat"]
    await asyncio.sleep(0.01)
    await a.heartbeat()
    after = {s["sid"]: s for s in await a.list_sessions()}[a.sid]["heartbeat"]
    assert after > before
    assert await b.clean_expired_sessions(timeout=60) == 0
    await a.close_session()
    assert [s["sid"] for s in await b.list_sessions()] == [b.sid]


async def test_expired_session_cleanup_releases_locks_and_deletes_orphans(pair):
    a, b = pair
    f = await new_file(a)
    await a.open(ROOT, f, os.O_RDWR)
    sid = await a.new_slice_id()
    await a.write(ROOT, f, 0, 0, SliceView(sid, 10, 0, 10))
    await a.flock(f, 1, F_WRLCK)
    await a.setlk(f, 1, False, F_WRLCK, 0, END, 42)
    await b.unlink(ROOT, ROOT_INODE, b"f")  # a still holds it open: it stays
    assert (await b.getattr(f)).nlink == 0
    with pytest.raises(FSError) as e:
        await b.flock(f, 2, F_RDLCK)
    assert e.value.errno == errno.EAGAIN
    assert await b.clean_expired_sessions(timeout=-1) == 1  # a stopped heartbeating
    with pytest.raises(FSError) as e:
        await b.getattr(f)
    assert e.value.errno == errno.ENOENT
    assert (sid, 10) in await b.pending_slice_deletes()
    g = await new_file(b, b"g")
    await b.flock(g, 2, F_WRLCK)  # no stale lock state blocks b
    assert [s["sid"] for s in await b.list_sessions()] == [b.sid]


async def test_flock_across_clients(pair):
    a, b = pair
    f = await new_file(a)
    await a.flock(f, 1, F_RDLCK)
    await b.flock(f, 7, F_RDLCK)  # shared
    with pytest.raises(FSError) as e:
        await b.flock(f, 7, F_WRLCK)
    assert e.value.errno == errno.EAGAIN
    waiter = asyncio.create_task(b.flock(f, 7, F_WRLCK, block=True))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await a.flock(f, 1, F_UNLCK)
    await asyncio.wait_for(waiter, 5)
    with pytest.raises(FSError):
        await a.flock(f, 1, F_RDLCK)
    await b.flock(f, 7, F_UNLCK)
    await a.flock(f, 1, F_WRLCK)


async def test_posix_locks_across_clients(pair):
    a, b = pair
    f = await new_file(a)
    await a.setlk(f, 1, False, F_WRLCK, 0, 99, 100)
    assert await b.getlk(f, 2, F_RDLCK, 50, 60, 200) == (F_WRLCK, 0, 99, 100)
    assert await a.getlk(f, 1, F_WRLCK, 0, 10, 100) == (F_UNLCK, 0, 0, 0)  # own lock
    with pytest.raises(FSError) as e:
        await b.setlk(f, 2, False, F_RDLCK, 50, 60, 200)
    assert e.value.errno == errno.EAGAIN
    await b.setlk(f, 2, False, F_RDLCK, 100, 200, 200)
    # a splits its lock by unlocking the middle; b then gets the middle
    await a.setlk(f, 1, False, F_UNLCK, 40, 59, 100)
    await b.setlk(f, 2, False, F_WRLCK, 45, 55, 200)
    assert await a.getlk(f, 1, F_RDLCK, 0, END, 100) == (F_WRLCK, 45, 55, 200)
    waiter = asyncio.create_task(b.setlk(f, 2, True, F_WRLCK, 0, 10, 200))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await a.setlk(f, 1, False, F_UNLCK, 0, END, 100)
    await asyncio.wait_for(waiter, 5)
    assert await a.getlk(f, 1, F_WRLCK, 0, END, 100) == (F_WRLCK, 0, 10, 200)


async def test_close_session_deletes_open_orphans(pair):
    a, b = pair
    f, _ = await a.create(ROOT, ROOT_INODE, b"f", 0o644, os.O_RDWR)
    await a.unlink(ROOT, ROOT_INODE, b"f")
    assert (await b.getattr(f)).nlink == 0
    await a.close_session()
    with pytest.raises(FSError):
        await b.getattr(f)


async def test_heartbeat_after_cleanup_registers_again(pair):
    a, b = pair
    f = await new_file(a)
    await a.open(ROOT, f, os.O_RDONLY)
    await b.clean_expired_sessions(timeout=-1)  # a looked dead
    await a.heartbeat()
    assert {s["sid"] for s in await b.list_sessions()} == {a.sid, b.sid}
    await b.unlink(ROOT, ROOT_INODE, b"f")
    assert (await b.getattr(f)).nlink == 0  # a's open is known again
    await a.close(f)
    with pytest.raises(FSError):
        await b.getattr(f)
