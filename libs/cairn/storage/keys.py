"""The object key layout of data blocks: the only place block keys are spelled or parsed.

A slice is stored as immutable blocks of at most the block size. Block `index` of slice `id`
holding `size` bytes (uncompressed) lives at

    <volume uuid>/chunks/<id // 1_000_000>/<id // 1_000>/<id>_<index>_<size>

The two directory levels keep any one listing page or directory small, and keep a
slice's blocks next to each other. gc and fsck list `<volume uuid>/chunks/` and parse the
names back with `parse_block_key`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cairn.errors import InvalidArgument

CHUNKS = "chunks"

_NAME = re.compile(r"(0|[1-9][0-9]*)_(0|[1-9][0-9]*)_(0|[1-9][0-9]*)")


@dataclass(frozen=True, order=True)
class BlockKey:
    """One block of one slice, as named in the object store."""

    volume: str
    slice_id: int
    index: int
    size: int

    def __post_init__(self) -> None:
        _check_volume(self.volume)
        for field, value in (
            ("slice id", self.slice_id),
            ("block index", self.index),
            ("block size", self.size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgument(f"{field} must be a non-negative integer, not {value!r}")

    @property
    def key(self) -> str:
        sid = self.slice_id
        return (
            f"{self.volume}/{CHUNKS}/{sid // 1_000_000}/{sid // 1_000}/"
            f"{sid}_{self.index}_{self.size}"
        )

    def __str__(self) -> str:
        return self.key


def block_key(volume: str, slice_id: int, index: int, size: int) -> str:
    """The object key of block `index` (of `size` bytes) of slice `slice_id`."""
    # Every read names its blocks: plain ints and a volume seen before skip the checks.
    if (type(slice_id) is int and type(index) is int and type(size) is int
            and slice_id >= 0 and index >= 0 and size >= 0 and volume in _VOLUMES):  # fmt: skip
        return f"{volume}/{CHUNKS}/{slice_id // 1_000_000}/{slice_id // 1_000}/{slice_id}_{index}_{size}"  # fmt: skip
    key = BlockKey(volume, slice_id, index, size).key
    if len(_VOLUMES) < 1024:
        _VOLUMES.add(volume)
    return key


_VOLUMES: set[str] = set()  # volume names that passed _check_volume


def chunks_prefix(volume: str) -> str:
    """The prefix under which every block of a volume lives (for listing)."""
    _check_volume(volume)
    return f"{volume}/{CHUNKS}/"


def slice_prefix(volume: str, slice_id: int) -> str:
    """The prefix shared by every block of one slice (and of no other slice)."""
    return block_key(volume, slice_id, 0, 0).rsplit("_", 2)[0] + "_"


def parse_block_key(key: str) -> BlockKey:
    """The BlockKey named by an object key; InvalidArgument if it is not a block key.

    The two directory levels must match the slice id, so a misplaced object (copied by
    hand, or written by a buggy client) is reported rather than silently accepted.
    """
    parts = key.split("/")
    if len(parts) != 5 or parts[1] != CHUNKS:
        raise InvalidArgument(f"not a block key: {key!r}")
    volume, _, high, low, name = parts
    match = _NAME.fullmatch(name)
    if match is None:
        raise InvalidArgument(f"not a block key (bad name {name!r}): {key!r}")
    slice_id, index, size = (int(g) for g in match.groups())
    parsed = BlockKey(volume, slice_id, index, size)
    if parsed.key != key:
        raise InvalidArgument(
            f"block key in the wrong directory (slice {slice_id} belongs "
            f"under {slice_id // 1_000_000}/{slice_id // 1_000}): {key!r}"
        )
    return parsed


def _check_volume(volume: str) -> None:
    if not isinstance(volume, str) or not volume or "/" in volume or volume in (".", ".."):
        raise InvalidArgument(f"volume id must be a non-empty name without '/': {volume!r}")
