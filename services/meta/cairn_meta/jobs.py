"""cairn-meta's background jobs: housekeeping passes over the file system it serves.

Every `interval` seconds: expired sessions, trash expiry, interrupted deletions, compaction;
every `gc_every` passes also a full object-store GC. A Redis without a formatted volume is
skipped until one is formatted. A failing pass is logged and retried at the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cairn.errors import CairnError
from cairn.housekeeping import run_pass

log = logging.getLogger(__name__)


async def run_jobs(meta_url: str, stop: asyncio.Event, interval: float = 60.0,
                   gc_every: int = 60) -> None:
    """Runs passes until `stop` is set. (A stop event rather than task cancellation: some
    Python 3.11 patch releases lose a cancellation that lands inside redis-py's timeouts.)"""
    from cairn.meta.engine import Meta
    from cairn.storage import open_store

    tick = 0
    meta = store = None
    try:
        while not stop.is_set():
            try:
                if meta is None:
                    meta = await Meta.open(meta_url)
                    store = open_store(meta.fmt.storage)
                    log.info("housekeeping volume %r every %.0fs", meta.fmt.name, interval)
                done = await run_pass(meta, store, gc_objects=tick % gc_every == gc_every - 1)
                if any((done.sessions, done.trash, done.deletions, done.compacted,
                        done.freed_slices, done.leaked_deleted)):
                    log.info("housekeeping: %s", done.summary())
            except CairnError as error:
                if meta is not None:
                    log.warning("housekeeping pass failed: %s", error)
                else:
                    log.debug("no volume to look after yet: %s", error)
            tick += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    finally:
        if store is not None:
            await store.close()
        if meta is not None:
            await meta.close()
