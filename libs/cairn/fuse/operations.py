"""The pyfuse3 request handlers: one `Operations` method per FUSE op, each a thin translation
onto the VFS method of the same name.

What this layer does, and only this:
- credentials: pyfuse3's RequestContext becomes a cairn Ctx, with the caller's supplementary
  groups read from /proc/<pid>/status (cached for a second: a `cp -r` asks thousands of
  times per second, group changes are rare);
- attributes: a cairn Attr becomes EntryAttributes with the mount's attribute and entry
  timeouts (how long the kernel may trust them without asking again);
- errors: nothing escapes a handler but FUSEError, since pyfuse3 ends the whole FUSE loop
  on any other exception. FSError carries its errno; temporary trouble (Redis or the object
  store unreachable, a transaction conflicting, a deadline passed) is EIO, after the
  bounded retries the engine and data path already did; other Cairn errors map as
  cairn.vfs.to_errno says; anything unexpected is EIO and a logged traceback.

Permissions: the mount uses the kernel's `default_permissions`, so the kernel checks mode
bits against the attributes it caches and `access` is never called (it is implemented for
mounts without that option). The VFS checks again where the kernel cannot (sticky
directories, owners changing modes, the engine's view being newer than the kernel's).

POSIX ACLs and file capabilities are not supported: their xattrs (system.posix_acl_*,
security.capability) are refused with EOPNOTSUPP rather than stored with no effect.

File locks: flock(2) and POSIX record locks (fcntl F_SETLK/F_SETLKW/F_GETLK, lockf) go to
the engine's locks, so they exclude processes of all mounts. pyfuse3 3.5.0 has no lock
handlers: third_party/pyfuse3 patches them in (with the lock owner that flush needs to drop
a process's POSIX locks at any close, and a way to see a waiter interrupted), and
./run.sh setup builds it. Under an unpatched pyfuse3 the lock handlers are never called and
the kernel keeps locks local to the mount (init() warns).

Not here because pyfuse3 does not expose them: fallocate (EOPNOTSUPP) and copy_file_range
(the kernel copies through read and write).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from cairn.errors import CairnError, FSError, TemporaryError
from cairn.fuse import extents
from cairn.fuse.extents import LocalReads
from cairn.fuse.invalidate import KernelInvalidator
from cairn.meta.types import F_RDLCK, F_UNLCK, F_WRLCK, Attr, Ctx
from cairn.vfs import to_errno

log = logging.getLogger(__name__)

T = TypeVar("T")

BLOCK_SIZE = 128 << 10  # st_blksize: the I/O size stdio and cp use for buffers
STATFS_BLOCK = 4096
NAME_MAX = 255
GROUPS_TTL = 1.0
GROUPS_CACHE_MAX = 4096
TOLD_MAX = 200_000
INTERRUPT_POLL = 0.05  # how often a blocked lock request checks whether it was interrupted
FLOCK_TYPES = {fcntl.LOCK_SH: F_RDLCK, fcntl.LOCK_EX: F_WRLCK, fcntl.LOCK_UN: F_UNLCK}
# POSIX ACLs travel as these xattrs. Cairn does not implement ACLs (the kernel would leave
# applying them to the mode bits to us), so they are refused as unsupported: cp -a, tar
# and rsync then fall back to chmod, instead of storing an ACL nothing enforces.
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")
# File capabilities are not supported either. The kernel asks for this xattr before every
# write (to clear it, as it clears set-user-ID): answering "none" here saves a metadata
# round trip per write.
CAPABILITY_XATTR = b"security.capability"
# Answered on every inode with the path of the mount's control socket, so `cairn stats`
# finds it from any path inside the mount (cairn.fuse.control); never listed nor settable.
CONTROL_XATTR = b"user.cairn.control"


def fuse_errno(error: BaseException) -> int:
    """The errno FUSE answers for an error a VFS call raised."""
    if isinstance(error, FSError):
        return error.errno
    if isinstance(error, TemporaryError):
        return errno.EIO
    if isinstance(error, CairnError):
        return to_errno(error)
    return errno.EIO


def _handler(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turns every failure of a request handler into FUSEError (logged as it deserves)."""
    op = fn.__name__

    @functools.wraps(fn)
    async def run(self: Operations, *args: Any) -> T:
        started = time.perf_counter()
        failed = False  # ordinary answers (ENOENT, EEXIST...) are not failures
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except FSError as error:
            # The ordinary answers of a file system (ENOENT, EEXIST, EACCES...).
            log.debug("%s%r: %s", op, args[:2], error)
            raise FUSEError(error.errno) from None
        except TemporaryError as error:
            failed = True
            log.warning("%s failed (EIO): %s", op, error)
            raise FUSEError(errno.EIO) from None
        except CairnError as error:
            failed = True
            code = fuse_errno(error)
            log.warning("%s failed (%s): %s", op, errno.errorcode.get(code, code), error)
            raise FUSEError(code) from None
        except Exception:
            failed = True
            log.exception("%s%r: unexpected error (EIO)", op, args[:2])
            raise FUSEError(errno.EIO) from None
        finally:
            if self.observe is not None:
                self.observe(op, time.perf_counter() - started, failed)

    return run


class Operations(pyfuse3.Operations):
    """The FUSE side of one mount: every op delegates to the VFS (`vfs`).

    `attr_timeout` / `entry_timeout` default to the VFS's own TTLs; `writeback_cache` asks
    the kernel to buffer writes (pyfuse3 reads `enable_writeback_cache` at FUSE init)."""

    supports_dot_lookup = True
    enable_acl = False
    pass_lock_owner = True  # (patched pyfuse3) flush(fh, lock_owner), release(fh, flock_owner)
    # Set by cairn.fuse.control: observe(op, seconds, failed) after every request, and
    # the control socket's path.
    observe: Callable[[str, float, bool], None] | None = None
    control_path: bytes = b""

    def __init__(
        self,
        vfs: Any,
        *,
        attr_timeout: float | None = None,
        entry_timeout: float | None = None,
        writeback_cache: bool = False,
    ) -> None:
        super().__init__()
        self.vfs = vfs
        self.attr_timeout = vfs.attr_ttl if attr_timeout is None else attr_timeout
        self.entry_timeout = entry_timeout
        self.enable_writeback_cache = writeback_cache
        self._groups: dict[int, tuple[tuple[int, ...], float]] = {}
        # (mtime, size) of each regular file as last told to the kernel: what its cached
        # attributes (and pages) reflect. See open().
        self._told: dict[int, tuple[int, int]] = {}
        # What other mounts changed, the kernel forgets (vfs.on_invalidate; close() stops it).
        self.invalidator = KernelInvalidator()
        vfs.on_invalidate = self._invalidate
        # Small reads of a file:// store answered in C once learned (fuse/extents.py).
        self.local_reads = LocalReads(vfs) if extents.available() else None

    def _invalidate(self, inodes: dict[int, bool], entries: list[tuple[int, bytes]]) -> None:
        for ino in inodes:
            self._told.pop(ino, None)
        self.invalidator(inodes, entries)

    def close(self) -> None:
        """Stops telling the kernel anything (before the FUSE session ends)."""
        self.vfs.on_invalidate = None
        self.invalidator.close()
        if self.local_reads is not None:
            self.local_reads.close()

    # -- credentials and attributes -------------------------------------------------------

    def _ctx(self, rc: Any) -> Ctx:
        return Ctx(rc.uid, rc.gid, self._sup_groups(rc.pid), rc.pid, rc.umask)

    def _sup_groups(self, pid: int) -> tuple[int, ...]:
        if pid <= 0:
            return ()
        now = time.monotonic()
        hit = self._groups.get(pid)
        if hit is not None and hit[1] > now:
            return hit[0]
        groups: tuple[int, ...] = ()
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Groups:"):
                        groups = tuple(int(g) for g in line.split()[1:])
                        break
        except (OSError, ValueError):
            pass  # the caller is gone (or in another PID namespace): its primary gid only
        if len(self._groups) >= GROUPS_CACHE_MAX:
            self._groups.clear()
        self._groups[pid] = (groups, now + GROUPS_TTL)
        return groups

    def _entry(self, attr: Attr, told: bool = True) -> pyfuse3.EntryAttributes:
        """The kernel's view of attr; told=False when it may not reach the kernel (call
        _tell once it did)."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.inode
        e.generation = 0
        e.attr_timeout = self.attr_timeout
        e.entry_timeout = (
            self.vfs.entry_ttl_for(attr) if self.entry_timeout is None else self.entry_timeout
        )
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = BLOCK_SIZE
        e.st_blocks = attr.blocks
        e.st_atime_ns = attr.atime
        e.st_mtime_ns = attr.mtime
        e.st_ctime_ns = attr.ctime
        if told:
            self._tell(attr)
        return e

    def _tell(self, attr: Attr) -> None:
        if attr.is_file():
            if len(self._told) >= TOLD_MAX:
                self._told.clear()
            self._told[attr.inode] = (attr.mtime, attr.size)

    # -- namespace ----------------------------------------------------------------------------

    @_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.lookup(self._ctx(ctx), parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # forget has no reply, so pyfuse3 does not catch even FUSEError here: anything
        # raised would end the FUSE loop.
        try:
            await self.vfs.forget(list(inode_list))
        except Exception:
            log.exception("forget of %d inode(s) failed", len(inode_list))

    @_handler
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.getattr(self._ctx(ctx), inode))

    @_handler
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        changes: dict[str, Any] = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_size:
            changes["size"] = attr.st_size
        # pyfuse3 has already turned UTIME_NOW into the current time.
        if fields.update_atime:
            changes["atime"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime"] = attr.st_mtime_ns
        result = await self.vfs.setattr(self._ctx(ctx), inode, fh=fh, **changes)
        return self._entry(result)

    @_handler
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.vfs.readlink(self._ctx(ctx), inode)

    @_handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.mknod(self._ctx(ctx), parent_inode, name, mode, rdev))

    @_handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.mkdir(self._ctx(ctx), parent_inode, name, mode))

    @_handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.vfs.unlink(self._ctx(ctx), parent_inode, name)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.vfs.rmdir(self._ctx(ctx), parent_inode, name)

    @_handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.symlink(self._ctx(ctx), parent_inode, name, target))

    @_handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        await self.vfs.rename(
            self._ctx(ctx), parent_inode_old, name_old, parent_inode_new, name_new, flags
        )

    @_handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.vfs.link(self._ctx(ctx), inode, new_parent_inode, new_name))

    # -- files --------------------------------------------------------------------------------

    @_handler
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        fh = await self.vfs.open(self._ctx(ctx), inode, flags)
        self._writeback_handle(fh)
        return pyfuse3.FileInfo(
            fh=fh, keep_cache=self._fresh_open(inode, await self.vfs.getattr(None, inode))
        )

    @_handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attr = await self.vfs.create(self._ctx(ctx), parent_inode, name, mode, flags)
        self._writeback_handle(fh)
        return pyfuse3.FileInfo(fh=fh), self._entry(attr)

    def _fresh_open(self, inode: int, attr: Attr) -> bool:
        """Close-to-open for the kernel's caches; True when it may keep the cached pages.

        The VFS open just refetched the attributes. If they are what the kernel was last
        told, its cached attributes and pages are current (a change it heard of would have
        dropped the pages: libfuse's auto_inval_data). Otherwise another client changed the
        file: the kernel's attributes are marked stale, so the reads after this open ask
        for the new size instead of cutting the file at the old one, and the pages go."""
        if not attr.is_file():
            return False
        if self._told.get(inode) == (attr.mtime, attr.size):
            return True
        try:
            pyfuse3.invalidate_inode(inode, attr_only=True)
        except OSError as error:  # the kernel no longer knows the inode: nothing is stale
            log.debug("invalidating inode %d: %s", inode, error)
        return False

    def _writeback_handle(self, fh: int) -> None:
        """With the writeback cache the kernel reads pages of files opened write-only and
        keeps appends' offsets itself: the handle must allow reads and must not append."""
        if not self.enable_writeback_cache:
            return
        h = self.vfs.handles.file(fh)
        if h.flags & os.O_ACCMODE == os.O_WRONLY:
            h.flags = (h.flags & ~os.O_ACCMODE) | os.O_RDWR
        h.flags &= ~os.O_APPEND

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        data = await self.vfs.read(fh, off, size, view=True)  # pyfuse3 takes any buffer
        if self.local_reads is not None:
            try:
                self.local_reads.learn(fh, off, size)
            except Exception:  # only ever a missed shortcut: the read itself succeeded
                log.exception("registering local extents of handle %d failed", fh)
        return data

    @_handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.vfs.write(fh, off, buf)

    @_handler
    async def flush(self, fh: int, lock_owner: int | None = None) -> None:
        await self.vfs.flush(fh, lock_owner)

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.vfs.fsync(fh, datasync)

    @_handler
    async def release(self, fh: int, flock_owner: int | None = None) -> None:
        if self.local_reads is not None:
            self.local_reads.forget(fh)
        await self.vfs.release(fh)  # drops the handle's locks, flock_owner's among them

    # -- directories --------------------------------------------------------------------------

    @_handler
    async def opendir(self, inode: int, ctx: Any) -> int:
        return await self.vfs.opendir(self._ctx(ctx), inode)

    @_handler
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        offset = start_id
        while True:
            entries = await self.vfs.readdir(fh, offset)
            if not entries:
                return
            for e in entries:
                # False: the kernel's buffer is full; it asks again from `offset`.
                entry = self._entry(e.attr, told=False)
                if not pyfuse3.readdir_reply(token, e.name, entry, e.next_offset):
                    return
                self._tell(e.attr)
                offset = e.next_offset

    @_handler
    async def releasedir(self, fh: int) -> None:
        await self.vfs.releasedir(fh)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.vfs.fsyncdir(fh, datasync)

    # -- the rest -------------------------------------------------------------------------------

    @_handler
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        fs = await self.vfs.statfs(self._ctx(ctx))
        s = pyfuse3.StatvfsData()
        s.f_bsize = STATFS_BLOCK
        s.f_frsize = STATFS_BLOCK
        s.f_blocks = fs.total_space // STATFS_BLOCK
        s.f_bfree = s.f_bavail = fs.avail_space // STATFS_BLOCK
        s.f_files = fs.used_inodes + fs.avail_inodes
        s.f_ffree = s.f_favail = fs.avail_inodes
        s.f_namemax = NAME_MAX
        return s

    @_handler
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        try:
            await self.vfs.access(self._ctx(ctx), inode, mode)
        except FSError as error:
            if error.errno == errno.EACCES:
                return False
            raise
        return True

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if name == CONTROL_XATTR and self.control_path:
            return self.control_path
        if name in ACL_XATTRS:
            raise FUSEError(errno.EOPNOTSUPP)
        if name == CAPABILITY_XATTR:
            raise FUSEError(errno.ENODATA)
        return await self.vfs.getxattr(self._ctx(ctx), inode, name)

    @_handler
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return await self.vfs.listxattr(self._ctx(ctx), inode)

    @_handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        # pyfuse3 hands XATTR_CREATE / XATTR_REPLACE to getxattr first and drops the flags.
        if name in ACL_XATTRS or name == CAPABILITY_XATTR:
            raise FUSEError(errno.EOPNOTSUPP)
        if name == CONTROL_XATTR:
            raise FUSEError(errno.EPERM)
        await self.vfs.setxattr(self._ctx(ctx), inode, name, value)

    @_handler
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        if name in ACL_XATTRS:
            raise FUSEError(errno.EOPNOTSUPP)
        await self.vfs.removexattr(self._ctx(ctx), inode, name)

    # -- file locks ---------------------------------------------------------------------------
    # Called only by the patched pyfuse3 (third_party/pyfuse3); lock types are Linux's
    # F_RDLCK/F_WRLCK/F_UNLCK, as the engine's; ranges are [start, end], end inclusive.

    def init(self) -> None:
        if not getattr(pyfuse3, "CAIRN_LOCKS", 0):
            log.warning(
                "pyfuse3 %s lacks the lock handlers of third_party/pyfuse3 (./run.sh setup "
                "builds them): file locks will exclude processes of this mount only",
                pyfuse3.__version__,
            )

    @_handler
    async def flock(self, fh: int, owner: int, op: int, interrupted: Callable[[], bool]) -> None:
        type = FLOCK_TYPES.get(op & ~fcntl.LOCK_NB)
        if type is None:
            raise FUSEError(errno.EINVAL)
        if op & fcntl.LOCK_NB or type == F_UNLCK:
            await self.vfs.flock(fh, owner, type, False)
        else:
            await self._unless_interrupted(self.vfs.flock(fh, owner, type, True), interrupted)

    @_handler
    async def getlk(
        self, fh: int, owner: int, type: int, start: int, end: int, pid: int
    ) -> tuple[int, int, int, int]:
        return await self.vfs.getlk(fh, owner, type, start, end, pid)

    @_handler
    async def setlk(
        self,
        fh: int,
        owner: int,
        type: int,
        start: int,
        end: int,
        pid: int,
        sleep: bool,
        interrupted: Callable[[], bool],
    ) -> None:
        if not sleep or type == F_UNLCK:
            await self.vfs.setlk(fh, owner, type, start, end, pid, False)
        else:
            work = self.vfs.setlk(fh, owner, type, start, end, pid, True)
            await self._unless_interrupted(work, interrupted)

    async def _unless_interrupted(
        self, wait: Awaitable[None], interrupted: Callable[[], bool]
    ) -> None:
        """Awaits a blocking lock request until it is granted or the kernel interrupts it (the
        waiter got a signal, or was killed: the kernel lets it go only once answered). The
        engine's wait is then cancelled and the answer is EINTR."""
        task = asyncio.ensure_future(wait)
        try:
            while not task.done():
                await asyncio.wait((task,), timeout=INTERRUPT_POLL)
                if not task.done() and interrupted():
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        raise FUSEError(errno.EINTR) from None
            task.result()
        finally:
            task.cancel()  # when this request itself is cancelled

    def stacktrace(self) -> None:
        """pyfuse3's deadlock helper (setxattr fuse_stacktrace on the root): logs stacks."""
        super().stacktrace()
