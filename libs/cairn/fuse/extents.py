"""Small reads answered in C: registered extents of local object files (pyfuse3 patch).

A mount on a file:// store knows where the bytes of a file it has read lie on its own
disk: a block file and an offset in it. After a small read of a chunk went the Python way
(Operations.read -> VFS -> reader -> store), `LocalReads.learn` asks the VFS where that
chunk's bytes are (`VFS.local_extents`: only from the caches, only when nothing is
buffered for the file) and registers the extents for the file handle with pyfuse3
(`pyfuse3.ReadExtents`, from third_party/pyfuse3/extents.patch). pyfuse3's C read
callback then answers a read that falls inside one extent with a pread of the block file:
no coroutine, no event loop pass, no Python. Everything else still comes to Python.

What keeps the answers right: an inode's extents are dropped (and their descriptors
closed) whenever the VFS says its data may have changed (`on_data_changed`: a write here,
a commit, a truncate, a copy, a change note from another mount, an open that found new
attributes, the caches cleared), when their caches would have expired (`expires`, checked
in C on every read), and with the last handle. The descriptors are the mount's own, so a
block file deleted meanwhile (compaction, gc) still reads as it was until the drop.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import pyfuse3

from cairn.storage.file import open_for_reads

log = logging.getLogger(__name__)

MAX_READ = 1 << 20  # larger reads stay in Python (the kernel asks for at most 1 MiB)
FD_BUDGET = 1024  # block files held open for all registered extents together (at most)


def fd_budget_default() -> int:
    """FD_BUDGET, or a quarter of what this process may open if that is less."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return FD_BUDGET if soft == resource.RLIM_INFINITY else min(FD_BUDGET, soft // 4)


def available() -> bool:
    """Does the installed pyfuse3 answer registered extents in C?"""
    return hasattr(pyfuse3, "ReadExtents") and hasattr(pyfuse3, "set_read_extents")


@dataclass
class _Table:
    inode: int
    extents: Any  # pyfuse3.ReadExtents
    fds: dict[str, int] = field(default_factory=dict)  # block file -> descriptor
    chunks: set[int] = field(default_factory=set)
    handles: set[int] = field(default_factory=set)


class LocalReads:
    """The registered extents of one mount: per inode, shared by its open handles."""

    def __init__(self, vfs: Any, *, max_read: int = MAX_READ, fd_budget: int | None = None) -> None:
        self.vfs = vfs
        self.max_read = max_read
        self.fd_budget = fd_budget  # None: fd_budget_default() when it is needed
        self._tables: dict[int, _Table] = {}
        self._by_handle: dict[int, _Table] = {}
        self._open_fds = 0
        self._done_reads = 0  # counters of tables already dropped
        self._done_bytes = 0
        vfs.on_data_changed = self.drop

    # -- what Operations calls ------------------------------------------------------------

    def learn(self, fh: int, offset: int, size: int) -> None:
        """After a read of fh went the Python way: register its chunk's extents, if the
        VFS can tell them, so the next reads there are answered in C."""
        if size > self.max_read:
            return
        table = self._by_handle.get(fh)
        if table is not None and table.extents.valid and table.extents.covers(offset):
            if time.monotonic() < table.extents.expires:
                return  # registered: this read was one C left to Python (a short read...)
            self.drop(table.inode)  # expired: made again from the caches as they are now
        found = self.vfs.local_extents(fh, offset)
        if found is None:
            return
        table = self._tables.get(found.inode)
        if table is not None and (not table.extents.valid or table.extents.size != found.size
                                  or time.monotonic() >= table.extents.expires):  # fmt: skip
            self.drop(found.inode)
            table = None
        if table is None:
            table = _Table(found.inode, pyfuse3.ReadExtents(found.size, found.expires,
                                                            self.max_read))  # fmt: skip
            self._tables[found.inode] = table
        if found.index not in table.chunks and not self._add(table, found):
            if not table.handles:
                self.drop(found.inode)
            return
        table.extents.expires = min(table.extents.expires, found.expires)
        if fh not in table.handles:
            old = self._by_handle.get(fh)
            if old is not None and old is not table:
                self.forget(fh)
            table.handles.add(fh)
            self._by_handle[fh] = table
            pyfuse3.set_read_extents(fh, table.extents)

    def forget(self, fh: int) -> None:
        """The handle is released: it answers nothing more, and an inode with no handle
        left drops its extents."""
        table = self._by_handle.pop(fh, None)
        pyfuse3.set_read_extents(fh, None)
        if table is None:
            return
        table.handles.discard(fh)
        if not table.handles:
            self.drop(table.inode)

    def drop(self, inode: int | None) -> None:
        """The inode's data (None: any inode's) may have changed: stop answering for it."""
        inodes = list(self._tables) if inode is None else [inode]
        for ino in inodes:
            table = self._tables.pop(ino, None)
            if table is None:
                continue
            table.extents.valid = False  # before anything else: C checks it first
            for fh in table.handles:
                pyfuse3.set_read_extents(fh, None)
                self._by_handle.pop(fh, None)
            self._done_reads += table.extents.reads
            self._done_bytes += table.extents.nbytes
            self._close(table)

    def close(self) -> None:
        self.drop(None)
        if self.vfs.on_data_changed == self.drop:
            self.vfs.on_data_changed = None

    @property
    def files_held(self) -> int:
        """Block files held open for registered extents."""
        return self._open_fds

    def counts(self) -> tuple[int, int]:
        """(reads, bytes) answered in C since the mount started."""
        live = list(self._tables.values())
        return (self._done_reads + sum(t.extents.reads for t in live),
                self._done_bytes + sum(t.extents.nbytes for t in live))  # fmt: skip

    # -- internals ----------------------------------------------------------------------------

    def _add(self, table: _Table, found: Any) -> bool:
        paths = {path for _, _, path, _ in found.extents if path not in table.fds}
        budget = fd_budget_default() if self.fd_budget is None else self.fd_budget
        if self._open_fds + len(paths) > budget:
            return False  # enough held open: these reads stay in Python
        try:
            for path in paths:
                fd = open_for_reads(path)
                table.fds[path] = fd
                self._open_fds += 1
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # small reads: no read-ahead
            for start, end, path, offset in found.extents:
                table.extents.add(start, end, table.fds[path], offset)
        except (OSError, ValueError) as error:
            # A block file gone (compacted) or extents that disagree with ones registered:
            # this inode is answered in Python until its caches are made again.
            log.debug("no C reads for inode %d: %s", table.inode, error)
            self.drop(table.inode)
            return False
        table.chunks.add(found.index)
        return True

    def _close(self, table: _Table) -> None:
        for fd in table.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._open_fds -= len(table.fds)
        table.fds.clear()
