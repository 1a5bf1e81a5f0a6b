"""The VFS's small metadata caches: attributes, directory entries, symlink targets and the
resolved slices of chunks.

Every cache here is an optimisation with a time to live: a value older than its TTL is
never served, and the VFS drops values itself whenever a local operation changes them, so
one client always sees its own changes at once while other clients' changes show up within
the TTL (or at the next open(), which refetches: close-to-open consistency).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from cairn.meta.types import CHUNK_SIZE

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

DEFAULT_MAX_ITEMS = 100_000


class TTLCache(Generic[K, V]):
    """A bounded LRU map whose values expire `ttl` seconds after they were put.

    A TTL of zero (or less) disables the cache: put() keeps nothing."""

    def __init__(
        self,
        ttl: float,
        max_items: int = DEFAULT_MAX_ITEMS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_items = max_items
        self.clock = clock
        self._items: OrderedDict[K, tuple[V, float]] = OrderedDict()

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        value, expires = item
        if expires <= self.clock():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V, ttl: float | None = None) -> None:
        ttl = self.ttl if ttl is None else ttl
        if ttl <= 0:
            self._items.pop(key, None)
            return
        self._items[key] = (value, self.clock() + ttl)
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        self._items.pop(key, None)

    def peek(self, key: K) -> tuple[V, float] | None:
        """(value, when it expires on the cache's clock) if fresh; the LRU order stays."""
        item = self._items.get(key)
        if item is None or item[1] <= self.clock():
            return None
        return item

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]


class Listings:
    """Complete listings of directories this mount made, each valid for `ttl` seconds.

    A directory made here starts empty and this mount's own changes keep its listing
    current; whoever sees a change note about the directory drops the listing. A name not
    in a fresh listing does not exist, so a lookup of a new name (the one before every
    create) needs no round trip."""

    def __init__(
        self,
        ttl: float,
        max_dirs: int = 1000,
        max_names: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_dirs = max_dirs
        self.max_names = max_names
        self.clock = clock
        self._items: OrderedDict[int, tuple[set[bytes], float]] = OrderedDict()

    def start(self, ino: int) -> None:
        """ino is a directory this mount just made: empty."""
        if self.ttl <= 0:
            return
        self._items[ino] = (set(), self.clock() + self.ttl)
        while len(self._items) > self.max_dirs:
            self._items.popitem(last=False)

    def absent(self, ino: int, name: bytes) -> bool:
        """Is the name certainly not in directory ino?"""
        item = self._items.get(ino)
        if item is None:
            return False
        names, expires = item
        if expires <= self.clock():
            del self._items[ino]
            return False
        return name not in names

    def add(self, ino: int, name: bytes) -> None:
        item = self._items.get(ino)
        if item is not None:
            item[0].add(name)
            if len(item[0]) > self.max_names:
                del self._items[ino]

    def discard(self, ino: int, name: bytes) -> None:
        item = self._items.get(ino)
        if item is not None:
            item[0].discard(name)

    def drop(self, ino: int) -> None:
        self._items.pop(ino, None)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class ChunkCache:
    """Stands in for the Meta in front of the ChunkReader: `read(inode, index)` answers the
    resolved slices of a chunk from a short-lived cache.

    A sequential reader asks for the same chunk hundreds of times (once per FUSE read);
    this saves those Redis round trips. Three rules keep it from serving stale data:
    - the VFS invalidates a chunk when this client commits a slice to it and a whole inode
      on truncate, fallocate, copies and open();
    - a lookup that was in flight while anything was invalidated is not stored (an epoch
      counter), so a pre-commit answer never lands in the cache after the commit;
    - a cached answer shorter than the file length the VFS expects (the file grew, as the
      fresh attributes say) is a miss, so growth never reads as zeros.
    """

    def __init__(self, meta: Any, ttl: float, max_items: int = 10_000) -> None:
        self.meta = meta
        self._cache: TTLCache[tuple[int, int], tuple[list[Any], int]] = TTLCache(ttl, max_items)
        self._by_inode: dict[int, set[int]] = {}
        self._expected: dict[int, int] = {}
        self._epoch = 0
        self.hits = 0
        self.misses = 0
        # Told the inode (None: every inode) whenever cached slices are dropped.
        self.on_drop: Callable[[int | None], None] | None = None

    @property
    def fmt(self) -> Any:
        return self.meta.fmt

    def expect(self, inode: int, length: int) -> None:
        """The file length the next reads of inode assume (from its current attributes)."""
        if len(self._expected) > DEFAULT_MAX_ITEMS:
            self._expected.clear()
        self._expected[inode] = length

    def _wanted(self, inode: int, index: int) -> int:
        """How much of the chunk cached slices must cover, by the file length expected."""
        return max(0, min(CHUNK_SIZE, self._expected.get(inode, 0) - index * CHUNK_SIZE))

    async def read(self, inode: int, index: int) -> list[Any]:
        cached = self._cache.get((inode, index))
        if cached is not None and cached[1] >= self._wanted(inode, index):
            self.hits += 1
            return cached[0]
        self.misses += 1
        epoch = self._epoch
        views = await self.meta.read(inode, index)
        if epoch == self._epoch and self._cache.ttl > 0:
            covered = sum(v.len for v in views)
            self._cache.put((inode, index), (views, covered))
            if len(self._by_inode) > DEFAULT_MAX_ITEMS:
                self._by_inode.clear()
            self._by_inode.setdefault(inode, set()).add(index)
        return views

    def peek(self, inode: int, index: int) -> tuple[list[Any], float] | None:
        """(slices, when they expire) of a chunk, if cached and long enough for the length
        expected; no Redis, no counting."""
        item = self._cache.peek((inode, index))
        if item is None:
            return None
        (views, covered), expires = item
        return (views, expires) if covered >= self._wanted(inode, index) else None

    def invalidate(self, inode: int, index: int | None = None) -> None:
        """Forget one chunk of inode, or all of them."""
        self._epoch += 1
        if self.on_drop is not None:
            self.on_drop(inode)
        indexes = self._by_inode.get(inode)
        if not indexes:
            return
        if index is None:
            for i in indexes:
                self._cache.pop((inode, i))
            del self._by_inode[inode]
        else:
            self._cache.pop((inode, index))
            indexes.discard(index)

    def clear(self) -> None:
        self._epoch += 1
        if self.on_drop is not None:
            self.on_drop(None)
        self._cache.clear()
        self._by_inode.clear()
        self._expected.clear()
