"""Open file and directory handles: what the kernel's `fh` numbers stand for.

A FileHandle remembers who opened which inode how (flags, credentials), the inode's shared
FileWriter when it was opened for writing, and the lock owners that used it (their locks go
at flush/release). A DirHandle holds the listing read so far: entries are appended page by
page and never reordered, so an offset handed to the kernel keeps naming the same entry
until the directory is read again from offset 0.
"""

from __future__ import annotations

import errno
import itertools
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cairn.errors import FSError
from cairn.meta.types import Attr, Ctx


class DirEntry(NamedTuple):
    """One readdir answer: `next_offset` is what to pass to readdir to continue after it."""

    name: bytes
    attr: Attr
    next_offset: int


@dataclass
class FileHandle:
    fh: int
    inode: int  # the metadata engine's inode (the VFS translates for a subdir mount)
    flags: int
    ctx: Ctx
    writer: Any = None  # the inode's FileWriter when opened for writing
    flock_owner: int | None = None
    posix_owners: set[int] = field(default_factory=set)

    @property
    def readable(self) -> bool:
        return self.flags & os.O_ACCMODE in (os.O_RDONLY, os.O_RDWR)

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)

    @property
    def append(self) -> bool:
        return bool(self.flags & os.O_APPEND)


@dataclass
class DirHandle:
    fh: int
    inode: int
    ctx: Ctx
    entries: list[DirEntry] = field(default_factory=list)
    cursor: bytes = b""  # the last name loaded from the engine
    done: bool = False


class HandleTable:
    """fh -> handle, for files and directories in one number space (never reused)."""

    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        self.files: dict[int, FileHandle] = {}
        self.dirs: dict[int, DirHandle] = {}

    def add_file(self, inode: int, flags: int, ctx: Ctx, writer: Any = None) -> FileHandle:
        h = FileHandle(next(self._numbers), inode, flags, ctx, writer)
        self.files[h.fh] = h
        return h

    def add_dir(self, inode: int, ctx: Ctx) -> DirHandle:
        h = DirHandle(next(self._numbers), inode, ctx)
        self.dirs[h.fh] = h
        return h

    def file(self, fh: int) -> FileHandle:
        h = self.files.get(fh)
        if h is None:
            raise FSError(errno.EBADF, f"no open file handle {fh}")
        return h

    def dir(self, fh: int) -> DirHandle:
        h = self.dirs.get(fh)
        if h is None:
            raise FSError(errno.EBADF, f"no open directory handle {fh}")
        return h

    def pop_file(self, fh: int) -> FileHandle:
        h = self.file(fh)
        del self.files[fh]
        return h

    def pop_dir(self, fh: int) -> DirHandle:
        h = self.dir(fh)
        del self.dirs[fh]
        return h

    def of_inode(self, inode: int) -> list[FileHandle]:
        return [h for h in self.files.values() if h.inode == inode]
