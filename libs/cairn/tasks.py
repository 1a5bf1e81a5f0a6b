"""Stopping asyncio tasks for sure.

A cancelled task can swallow its cancellation: in Python 3.11, `asyncio.wait_for` returns
the result instead of raising CancelledError when the awaited future finishes at the same
moment the cancellation arrives (fixed in 3.12), and nats-py and our own code use it. Such a
task runs on, and `gather` after `cancel` waits for it forever. `cancel_all` cancels again
until every task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_all(tasks: Iterable[asyncio.Task], again_after: float = 0.5) -> None:
    """Cancels the tasks and returns once all have ended (whatever they raised)."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_after)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" noise
