"""pyfuse3 on asyncio, with one change: how the FUSE loop waits for the next request.

pyfuse3.asyncio (its asyncio stand-in for trio) registers the /dev/fuse descriptor with
the event loop before every request and removes it after: two epoll_ctl calls and the
selector's bookkeeping each time, about an eighth of the mount's CPU when it serves small
requests one after another (measured with py-spy during a create loop). Here the
descriptor stays registered while requests keep coming; its reader callback wakes the task
currently waiting. Only when a request arrives and nobody waits (every worker busy) does
the callback unregister it, so the loop never spins on a descriptor no one reads, and the
next wait registers it again.

A readiness event can be stale by the time its callback runs (the request it announced was
read meanwhile, in the same loop iteration), and a task woken for nothing would block the
whole loop in a read of /dev/fuse. So the callback asks the descriptor itself (a zero
timeout poll) before it wakes anybody. pyfuse3 lets one task at a time wait and read (its
read lock), and that task reads right after it wakes, without yielding in between.

Everything else is pyfuse3's own: waiters are kept in the table its `notify_closing` uses at
unmount. `enable()` switches pyfuse3 to asyncio with this wait; `disable_reader()` removes
the registration once the FUSE loop has ended, before the session (and the descriptor) go.
"""

from __future__ import annotations

import asyncio
import select
from typing import Any

import pyfuse3.asyncio as pyfuse3_asyncio

_readers: dict[Any, _Reader] = {}


class _Reader:
    """The registration of one descriptor and the future waiting on it, if any."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: Any) -> None:
        self.loop = loop
        self.fd = fd
        self.waiter: asyncio.Future[None] | None = None
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self.watching = False

    def watch(self) -> None:
        if not self.watching:
            self.loop.add_reader(self.fd, self._ready)
            self.watching = True

    def unwatch(self) -> None:
        if self.watching:
            self.loop.remove_reader(self.fd)
            self.watching = False

    def _ready(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            self.unwatch()  # readable, nobody to read: wait for the next waiter
            return
        if not self._poll.poll(0):  # stale: what it announced has been read already
            return
        self.waiter = None
        waiter.set_result(None)


async def wait_readable(fd: Any) -> None:
    loop = asyncio.get_running_loop()
    reader = _readers.get(fd)
    if reader is None or reader.loop is not loop:
        reader = _readers[fd] = _Reader(loop, fd)
    future: asyncio.Future[None] = loop.create_future()
    reader.waiter = future
    reader.watch()
    waiting = pyfuse3_asyncio._read_futures[fd]  # where notify_closing looks at unmount
    waiting.add(future)
    try:
        await future
    finally:
        waiting.discard(future)
        if not waiting:
            pyfuse3_asyncio._read_futures.pop(fd, None)
        if reader.waiter is future:
            reader.waiter = None


def enable() -> None:
    """pyfuse3 on asyncio, waiting for requests through the registration kept here."""
    pyfuse3_asyncio.enable()
    pyfuse3_asyncio.wait_readable = wait_readable  # type: ignore[assignment]


def disable_reader() -> None:
    """Unregisters the descriptors (the FUSE loop has ended)."""
    while _readers:
        fd, reader = _readers.popitem()
        if not reader.loop.is_closed():
            reader.unwatch()
        if reader.waiter is not None and not reader.waiter.done():
            reader.waiter.cancel()
