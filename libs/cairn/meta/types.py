"""Value types of the metadata engine: settings, contexts, attributes, entries, slices.

Attributes are stored packed (one fixed-size struct per inode) because a volume holds
millions of them; everything here is pure Python with no Redis in sight.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

ROOT_INODE = 1
TRASH_INODE = 2  # hidden ".trash" under the root: unlinked files wait here for trash_days
TRASH_NAME = b".trash"
CHUNK_SIZE = 64 << 20
MAX_NAME = 255
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 64 << 10
MAX_NLINK = (1 << 31) - 1
MAX_FILE_SIZE = CHUNK_SIZE << 31  # chunk indexes stay within 31 bits

# utimensat(2) magic values, usable as atime/mtime in setattr.
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

# fcntl lock types (Linux values), as FUSE hands them over.
F_RDLCK = 0
F_WRLCK = 1
F_UNLCK = 2

# access(2) mask bits.
R_OK, W_OK, X_OK = 4, 2, 1


@dataclass
class Format:
    """A file system's settings, stored once at format time."""

    name: str
    uuid: str = ""
    storage: str = ""
    block_size: int = 4 << 20
    compress: str = "none"
    trash_days: int = 1
    capacity: int = 0  # bytes; 0 = unlimited
    inodes: int = 0  # 0 = unlimited
    chunk_size: int = CHUNK_SIZE  # fixed

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict) -> Format:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class Ctx:
    """Who asks: the caller's credentials as FUSE reports them."""

    uid: int = 0
    gid: int = 0
    gids: tuple[int, ...] = ()
    pid: int = 0
    umask: int = 0o022

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.gids


ROOT_CTX = Ctx(0, 0, umask=0)

_ATTR = struct.Struct("<BBIIIqqqIQIQ")
_ATTR_VERSION = 1


@dataclass(slots=True)
class Attr:
    """An inode's attributes; times are integer nanoseconds since the epoch.

    `parent` is the directory holding the inode (for a file with hard links, the first
    one still linked; every parent is in the p<ino> hash); 0 for an unlinked open file.
    """

    inode: int = 0
    mode: int = 0  # type bits included
    uid: int = 0
    gid: int = 0
    size: int = 0
    nlink: int = 1
    rdev: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    parent: int = 0
    flags: int = 0

    @property
    def type(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def blocks(self) -> int:
        """512-byte blocks, counted as the 4 KiB pages the data takes."""
        return space_of(self) // 512

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    def pack(self) -> bytes:
        return _ATTR.pack(
            _ATTR_VERSION, self.flags, self.mode, self.uid, self.gid, self.atime,
            self.mtime, self.ctime, self.nlink, self.size, self.rdev, self.parent,
        )  # fmt: skip

    @classmethod
    def unpack(cls, inode: int, data: bytes) -> Attr:
        (_, flags, mode, uid, gid, atime, mtime, ctime, nlink, size, rdev,
         parent) = _ATTR.unpack(data)  # fmt: skip
        return cls(inode, mode, uid, gid, size, nlink, rdev, atime, mtime, ctime, parent, flags)

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__slots__}

    @classmethod
    def from_dict(cls, data: dict) -> Attr:
        return cls(**{k: data[k] for k in cls.__slots__ if k in data})


def align4k(n: int) -> int:
    return (n + 4095) & ~4095


def space_of(attr: Attr) -> int:
    """Bytes an inode counts against capacity and quotas: its size in 4 KiB pages."""
    return align4k(attr.size)


_ENTRY = struct.Struct("<BQ")


def pack_entry(mode: int, inode: int) -> bytes:
    return _ENTRY.pack(stat.S_IFMT(mode) >> 12, inode)


def unpack_entry(data: bytes) -> tuple[int, int]:
    """(type bits, inode) of a packed directory entry."""
    kind, inode = _ENTRY.unpack(data)
    return kind << 12, inode


@dataclass(slots=True)
class Entry:
    name: bytes
    inode: int
    type: int  # stat.S_IFREG, S_IFDIR...
    attr: Attr | None = None


class SliceView(NamedTuple):
    """Bytes [off, off+len) of slice `id` (whose objects hold `size` bytes); id 0 is a hole."""

    id: int
    size: int
    off: int
    len: int


@dataclass(frozen=True)
class StatFs:
    total_space: int
    avail_space: int
    used_inodes: int
    avail_inodes: int


@dataclass(frozen=True)
class Quota:
    space: int  # 0 = unlimited
    inodes: int
    used_space: int = 0
    used_inodes: int = 0


@dataclass
class Stats:
    """Counters the mount shows (transactions, their restarts on conflict)."""

    txn: int = 0
    txn_restarts: int = 0
    outage_retries: int = 0  # operations run again while Redis was unreachable
    extra: dict = field(default_factory=dict)
