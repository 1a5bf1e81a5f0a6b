"""POSIX permission rules, as pure functions of (ctx, attr): mode bits, groups, root, sticky."""

from __future__ import annotations

import errno
import stat

from cairn.errors import FSError
from cairn.meta.types import R_OK, W_OK, X_OK, Attr, Ctx


def allowed(ctx: Ctx, attr: Attr, mask: int) -> bool:
    """Whether ctx may access attr for mask (R_OK|W_OK|X_OK)."""
    mask &= R_OK | W_OK | X_OK
    if ctx.uid == 0:
        # root reads and writes anything, but executes only what some x bit allows
        if mask & X_OK and not attr.is_dir() and not attr.mode & 0o111:
            return False
        return True
    mode = attr.mode
    if ctx.uid == attr.uid:
        bits = (mode >> 6) & 7
    elif ctx.in_group(attr.gid):
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return mask & ~bits == 0


def check(ctx: Ctx, attr: Attr, mask: int) -> None:
    if not allowed(ctx, attr, mask):
        raise FSError(errno.EACCES, f"permission denied on inode {attr.inode}")


def check_sticky(ctx: Ctx, parent: Attr, child: Attr) -> None:
    """In a sticky directory only the owner of the entry or of the directory (or root) removes it."""
    if ctx.uid == 0 or not parent.mode & stat.S_ISVTX:
        return
    if ctx.uid not in (parent.uid, child.uid):
        raise FSError(errno.EPERM, f"sticky directory {parent.inode}: not the owner")


def is_owner(ctx: Ctx, attr: Attr) -> bool:
    return ctx.uid == 0 or ctx.uid == attr.uid


def killpriv(mode: int) -> int:
    """Mode with set-user-ID cleared, and set-group-ID when group execute makes it real."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode
