"""Blocking calls that may hang in the kernel (a dead FUSE mount), run off the event loop.

A daemon thread, never joined: a syscall stuck in the kernel must hold neither the loop
nor the process's exit (asyncio.to_thread's pool threads are joined at exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from cairn.errors import DeadlineExceeded


def in_daemon_thread(fn: Callable[[], Any], name: str = "cairn-blocking") -> asyncio.Future:
    """A future for fn() run in a new daemon thread."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def run() -> None:
        try:
            value, error = fn(), None
        except BaseException as exc:  # handed to the loop, which re-raises it
            value, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop may be closed by then
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


async def call_with_deadline(fn: Callable[[], Any], seconds: float,
                             name: str = "cairn-blocking") -> Any:
    """fn() in a daemon thread; DeadlineExceeded when it has not returned after `seconds`."""
    try:
        return await asyncio.wait_for(in_daemon_thread(fn, name), seconds)
    except TimeoutError:
        raise DeadlineExceeded(f"no answer within {seconds:g}s") from None
