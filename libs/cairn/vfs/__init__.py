"""The VFS: the file system operations of one mount, named after the FUSE ops.

  vfs = await VFS.open_volume("redis://127.0.0.1:6379/1", cache_dir="/var/cache/cairn")
  attr = await vfs.lookup(ctx, 1, b"hello.txt")
  fh = await vfs.open(ctx, attr.inode, os.O_RDONLY)
  data = await vfs.read(fh, 0, 4096)
  await vfs.release(fh)
  await vfs.close()

vfs      VFS, VFSOptions, to_errno (error -> the errno a FUSE reply carries)
handles  FileHandle, DirHandle, DirEntry (readdir answers), HandleTable
caches   TTLCache, ChunkCache (resolved slices in front of the ChunkReader)
stats    VFSStats, OpStats (counters the mount exposes)
"""

from cairn.vfs.handles import DirEntry, DirHandle, FileHandle, HandleTable
from cairn.vfs.stats import OpStats, VFSStats
from cairn.vfs.vfs import VFS, VFSOptions, to_errno

__all__ = [
    "VFS",
    "DirEntry",
    "DirHandle",
    "FileHandle",
    "HandleTable",
    "OpStats",
    "VFSOptions",
    "VFSStats",
    "to_errno",
]
