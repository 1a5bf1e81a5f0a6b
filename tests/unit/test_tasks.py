"""cancel_all ends tasks even when one swallows its cancellation."""

from __future__ import annotations

import asyncio

import pytest

from cairn.tasks import cancel_all

pytestmark = pytest.mark.unit


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again():
    swallowed = 0

    async def stubborn():
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as asyncio.wait_for of Python 3.11 sometimes does

    async def failing():
        raise ValueError("already ended badly")

    tasks = [asyncio.create_task(stubborn()), asyncio.create_task(failing())]
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_all(tasks, again_after=0.05), 5)
    assert swallowed == 1 and all(t.done() for t in tasks)
