"""Object storage for data blocks: backends by URL scheme, compression, key layout, cache.

    store = open_store("s3://bucket/prefix?endpoint=http://127.0.0.1:9000")
    await store.check()
    await store.put(block_key(volume, slice_id, 0, len(data)), codec.compress(data))

Backends (file://, s3://) live in their own modules and are imported on demand.
"""

from cairn.storage.base import ObjectInfo, ObjectStore, open_store, redact_url, validate_key
from cairn.storage.cache import BlockCache, CachedStore, CacheStats
from cairn.storage.compress import CODECS, Codec, CorruptData, get_codec
from cairn.storage.keys import BlockKey, block_key, chunks_prefix, parse_block_key, slice_prefix

__all__ = [
    "CODECS",
    "BlockCache",
    "BlockKey",
    "CacheStats",
    "CachedStore",
    "Codec",
    "CorruptData",
    "ObjectInfo",
    "ObjectStore",
    "block_key",
    "chunks_prefix",
    "get_codec",
    "open_store",
    "parse_block_key",
    "redact_url",
    "slice_prefix",
    "validate_key",
]
