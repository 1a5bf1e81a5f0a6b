"""Block compression codecs: "none", "zstd" and "lz4", chosen once when a volume is formatted.

The codec's name is kept in the volume's settings, not in each object, so every block of a
volume is written and read with the same codec. Both real codecs write self-describing
frames (content size and a checksum), so a damaged or mis-decoded block is detected here
and reported as CorruptData instead of being handed to a reader.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import ClassVar

import lz4.frame
import zstandard

from cairn.errors import ConfigError, PermanentError


class CorruptData(PermanentError):
    """A stored block could not be decoded: it is damaged or was written by another codec."""


class Codec(ABC):
    """Turns a block into its stored form and back. Instances are safe to share by threads."""

    name: ClassVar[str]

    @abstractmethod
    def compress(self, data: bytes) -> bytes: ...

    @abstractmethod
    def decompress(self, data: bytes) -> bytes: ...

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


class NoCompression(Codec):
    name = "none"

    def compress(self, data: bytes) -> bytes:
        return bytes(data)

    def decompress(self, data: bytes) -> bytes:
        return bytes(data)


class Zstd(Codec):
    """Zstandard frames with the content size and a content checksum."""

    name = "zstd"

    def __init__(self, level: int = 3) -> None:
        self.level = level
        # zstandard's (de)compressor objects must not be used by two threads at once, and
        # blocks are (de)compressed in thread pools: one pair per thread.
        self._local = threading.local()

    def _pair(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        pair = getattr(self._local, "pair", None)
        if pair is None:
            pair = (
                zstandard.ZstdCompressor(
                    level=self.level, write_checksum=True, write_content_size=True
                ),
                zstandard.ZstdDecompressor(),
            )
            self._local.pair = pair
        return pair

    def compress(self, data: bytes) -> bytes:
        return self._pair()[0].compress(data)

    def decompress(self, data: bytes) -> bytes:
        try:
            return self._pair()[1].decompress(data)
        except zstandard.ZstdError as error:
            raise CorruptData(f"cannot decompress a zstd block: {error}") from error


class LZ4(Codec):
    """LZ4 frames with the content size and a content checksum."""

    name = "lz4"

    def compress(self, data: bytes) -> bytes:
        return lz4.frame.compress(data, store_size=True, content_checksum=True)

    def decompress(self, data: bytes) -> bytes:
        try:
            return lz4.frame.decompress(data)
        except RuntimeError as error:  # what lz4.frame raises for a malformed frame
            raise CorruptData(f"cannot decompress an lz4 block: {error}") from error


CODECS: dict[str, type[Codec]] = {c.name: c for c in (NoCompression, Zstd, LZ4)}


def get_codec(name: str | None) -> Codec:
    """The codec called `name` (None or "" mean "none"); ConfigError for an unknown name."""
    key = (name or "none").strip().lower()
    try:
        return CODECS[key]()
    except KeyError:
        raise ConfigError(f"unknown compression {name!r}: use one of {', '.join(CODECS)}") from None
