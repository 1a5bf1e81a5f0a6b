"""The metadata engine: inodes, directories, chunks and slices, sessions, quotas, in Redis.

Import the API from cairn.meta.engine (Meta, format_volume, load, and the value types:
Format, Ctx, Attr, Entry, SliceView, StatFs, Quota and the constants). The key map is
cairn.meta.keys; the pure slice resolution is cairn.meta.slices.
"""
