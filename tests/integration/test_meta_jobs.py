"""cairn-meta's housekeeping: a stale session is cleaned and expired trash purged by the jobs."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from cairn.housekeeping import run_pass
from cairn.meta import keys
from cairn.meta.engine import ROOT_CTX, ROOT_INODE, Format, Meta, format_volume
from cairn.storage import open_store
from cairn_meta.jobs import run_jobs


async def test_jobs_clean_a_dead_session(redis_url, tmp_path):
    await format_volume(redis_url, Format(name="jobs", storage=f"file://{tmp_path}/objects"))
    dead = await Meta.open(redis_url)
    sid = await dead.new_session({"hostname": "gone", "pid": 1})
    raw = aioredis.from_url(redis_url)
    await raw.zadd(keys.SESSIONS, {str(sid): 1.0})  # last heartbeat long ago
    stop = asyncio.Event()
    task = asyncio.create_task(run_jobs(redis_url, stop, interval=0.05))
    try:
        for _ in range(100):
            if await raw.zscore(keys.SESSIONS, str(sid)) is None:
                break
            await asyncio.sleep(0.05)
        assert await raw.zscore(keys.SESSIONS, str(sid)) is None
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await raw.aclose()
        await dead.close()


async def test_pass_purges_expired_trash(redis_url, tmp_path):
    await format_volume(redis_url, Format(name="trash", storage=f"file://{tmp_path}/o",
                                          trash_days=1))
    meta = await Meta.open(redis_url)
    store = open_store(f"file://{tmp_path}/o")
    try:
        inode, _ = await meta.create(ROOT_CTX, ROOT_INODE, b"doomed", 0o644, 0)
        await meta.close(inode)
        await meta.unlink(ROOT_CTX, ROOT_INODE, b"doomed")
        assert (await run_pass(meta, store)).trash == 0  # still inside trash-days
        later = time.time() + 2 * 86400  # past trash-days
        done = await run_pass(meta, store, gc_objects=True, grace=0, now=later)
        assert done.trash == 1 and not done.errors
    finally:
        await store.close()
        await meta.close()
