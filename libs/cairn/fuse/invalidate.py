"""Telling the kernel to forget what other mounts changed.

The VFS hears other mounts' change notes (cairn.vfs.changes) and hands them here in the
kernel's inode numbers: names to forget (FUSE_NOTIFY_INVAL_ENTRY) and inodes whose
attributes, and for changed contents whose cached pages, are stale
(FUSE_NOTIFY_INVAL_INODE).

The notifications are written from a thread of their own, in order: the kernel may have to
wait for a request this process is answering (an entry invalidation takes the directory's
lock, a page invalidation waits for writeback), and the asyncio loop that answers requests
must never be the one waiting. `close()` stops the thread before the FUSE session goes.
"""

from __future__ import annotations

import logging
import queue
import threading

import pyfuse3

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0


class KernelInvalidator:
    """Call it with ({inode: data_changed}, [(parent, name)]); it returns at once."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.sent = 0

    def __call__(self, inodes: dict[int, bool], entries: list[tuple[int, bytes]]) -> None:
        if self._closed:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cairn-invalidate", daemon=True)
            self._thread.start()
        self._queue.put((inodes, entries))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            inodes, entries = item
            for parent, name in entries:
                self._tell(pyfuse3.invalidate_entry, parent, name)
            for ino, data in inodes.items():
                self._tell(pyfuse3.invalidate_inode, ino, not data)

    def _tell(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
            self.sent += 1
        except OSError as error:  # ENOENT: the kernel holds nothing of it (the usual case)
            log.debug("%s%r: %s", fn.__name__, args, error)

    def close(self) -> None:
        """Stops the thread (after what is queued); later calls are ignored."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(STOP_TIMEOUT)
            self._thread = None
