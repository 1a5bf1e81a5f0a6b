"""The metadata engine's namespace against a real redis-server: format, open, create,
lookup, remove, rename, links, readdir paging, permissions, xattrs, concurrency."""

from __future__ import annotations

import asyncio
import errno
import os
import stat

import pytest

from cairn.errors import ConfigError, FSError, UnavailableError
from cairn.localstack import free_port
from cairn.meta.engine import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_CTX,
    ROOT_INODE,
    UTIME_NOW,
    XATTR_CREATE,
    XATTR_REPLACE,
    Ctx,
    Format,
    Meta,
    format_volume,
)

ROOT = ROOT_CTX
ALICE = Ctx(1000, 1000, umask=0)
BOB = Ctx(1001, 1001, umask=0)
CAROL = Ctx(1002, 2000, gids=(1000,), umask=0)


def fmt(**kw) -> Format:
    return Format(name="test", storage="file:///tmp/cairn-test", **{"trash_days": 0, **kw})


@pytest.fixture
async def meta(redis_url):
    await format_volume(redis_url, fmt())
    m = await Meta.open(redis_url)
    yield m
    await m.close()


def err(code):
    return pytest.raises(FSError, match="") if code is None else _Raises(code)


class _Raises:
    def __init__(self, code):
        self.code = code

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        assert kind is not None, f"expected {errno.errorcode[self.code]}"
        assert issubclass(kind, FSError), value
        assert value.errno == self.code, (
            f"expected {errno.errorcode[self.code]}, got {errno.errorcode[value.errno]}"
        )
        return True


# -- format and open ------------------------------------------------------------------------


async def test_format_is_idempotent_and_keeps_uuid(redis_url):
    first = await format_volume(redis_url, fmt())
    assert first.uuid
    again = await format_volume(redis_url, fmt())
    assert again.uuid == first.uuid
    assert again == first


async def test_format_conflict_names_fields(redis_url):
    await format_volume(redis_url, fmt())
    with pytest.raises(ConfigError, match="capacity.*trash_days|trash_days"):
        await format_volume(redis_url, fmt(capacity=1 << 30, trash_days=3))


async def test_open_unformatted_and_unreachable(redis_url):
    with pytest.raises(ConfigError, match="cairn format"):
        await Meta.open(redis_url)
    url = f"redis://:secret@127.0.0.1:{free_port('127.0.0.1')}/0"
    with pytest.raises(UnavailableError) as info:
        await Meta.open(url)
    assert "secret" not in str(info.value)
    assert "127.0.0.1" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        await Meta.open("http://127.0.0.1:1/0")


# -- create, lookup, remove -----------------------------------------------------------------


async def test_mkdir_create_lookup_getattr(meta):
    d, dattr = await meta.mkdir(ROOT, ROOT_INODE, b"dir", 0o755)
    assert stat.S_ISDIR(dattr.mode) and dattr.nlink == 2
    f, fattr = await meta.create(ROOT, d, b"file", 0o644, os.O_RDWR)
    assert stat.S_ISREG(fattr.mode) and fattr.parent == d
    ino, attr = await meta.lookup(ROOT, d, b"file")
    assert ino == f and attr == fattr
    assert (await meta.lookup(ROOT, d, b"."))[0] == d
    assert (await meta.lookup(ROOT, d, b".."))[0] == ROOT_INODE
    assert (await meta.getattr(ROOT_INODE)).nlink == 3
    with err(errno.EEXIST):
        await meta.mkdir(ROOT, d, b"file", 0o755)
    with err(errno.ENOENT):
        await meta.lookup(ROOT, d, b"nope")
    with err(errno.ENOTDIR):
        await meta.lookup(ROOT, f, b"x")
    with err(errno.ENAMETOOLONG):
        await meta.mknod(ROOT, d, b"x" * 256, stat.S_IFREG, 0o644)
    with err(errno.ENAMETOOLONG):
        await meta.lookup(ROOT, d, b"x" * 256)
    await meta.close(f)


async def test_mknod_kinds_and_symlink(meta):
    for kind in (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
        ino, attr = await meta.mknod(ROOT, ROOT_INODE, f"n{kind}".encode(), kind, 0o600, rdev=7)
        assert stat.S_IFMT(attr.mode) == kind and attr.rdev == 7
    ino, attr = await meta.symlink(ROOT, ROOT_INODE, b"link", b"/some/target")
    assert stat.S_ISLNK(attr.mode) and attr.size == len(b"/some/target")
    assert await meta.readlink(ino) == b"/some/target"
    f, _ = await meta.mknod(ROOT, ROOT_INODE, b"plain", stat.S_IFREG, 0o644)
    with err(errno.EINVAL):
        await meta.readlink(f)
    with err(errno.ELOOP):
        await meta.open(ROOT, ino, os.O_RDONLY)


async def test_unlink_rmdir_errors(meta):
    d, _ = await meta.mkdir(ROOT, ROOT_INODE, b"d", 0o755)
    await meta.mknod(ROOT, d, b"f", stat.S_IFREG, 0o644)
    with err(errno.ENOTEMPTY):
        await meta.rmdir(ROOT, ROOT_INODE, b"d")
    with err(errno.EISDIR):
        await meta.unlink(ROOT, ROOT_INODE, b"d")
    with err(errno.ENOTDIR):
        await meta.rmdir(ROOT, d, b"f")
    with err(errno.ENOENT):
        await meta.unlink(ROOT, d, b"missing")
    await meta.unlink(ROOT, d, b"f")
    await meta.rmdir(ROOT, ROOT_INODE, b"d")
    with err(errno.ENOENT):
        await meta.getattr(d)
    assert (await meta.getattr(ROOT_INODE)).nlink == 2
    status = await meta.status()
    assert status["used_inodes"] == 0 and status["used_space"] == 0


async def test_trash_is_hidden(meta):
    ino, attr = await meta.lookup(ROOT, ROOT_INODE, b".trash")
    assert attr.is_dir()
    assert [e.name for e in await meta.readdir(ROOT, ROOT_INODE)] == []
    with err(errno.EEXIST):
        await meta.mkdir(ROOT, ROOT_INODE, b".trash", 0o755)
    with err(errno.EPERM):
        await meta.rmdir(ROOT, ROOT_INODE, b".trash")
    with err(errno.EACCES):
        await meta.readdir(ALICE, ino)


# -- rename -----------------------------------------------------------------------------------


async def test_rename_basic_and_replace(meta):
    a, _ = await meta.mkdir(ROOT, ROOT_INODE, b"a", 0o755)
    b, _ = await meta.mkdir(ROOT, ROOT_INODE, b"b", 0o755)
    f, _ = await meta.mknod(ROOT, a, b"f", stat.S_IFREG, 0o644)
    g, _ = await meta.mknod(ROOT, b, b"g", stat.S_IFREG, 0o644)
    await meta.rename(ROOT, a, b"f", b, b"g")
    assert (await meta.lookup(ROOT, b, b"g"))[0] == f
    assert (await meta.getattr(f)).parent == b
    with err(errno.ENOENT):
        await meta.getattr(g)
    with err(errno.ENOENT):
        await meta.lookup(ROOT, a, b"f")
    # directory moves keep nlink right
    sub, _ = await meta.mkdir(ROOT, a, b"sub", 0o755)
    await meta.rename(ROOT, a, b"sub", b, b"sub2")
    assert (await meta.getattr(a)).nlink == 2
    assert (await meta.getattr(b)).nlink == 3
    assert (await meta.getattr(sub)).parent == b
    assert (await meta.lookup(ROOT, sub, b".."))[0] == b
    # same-inode rename is a no-op
    await meta.link(ROOT, f, b, b"g2")
    await meta.rename(ROOT, b, b"g", b, b"g2")
    assert (await meta.lookup(ROOT, b, b"g"))[0] == f


async def test_rename_errors_and_flags(meta):
    a, _ = await meta.mkdir(ROOT, ROOT_INODE, b"a", 0o755)
    sub, _ = await meta.mkdir(ROOT, a, b"sub", 0o755)
    f, _ = await meta.mknod(ROOT, ROOT_INODE, b"f", stat.S_IFREG, 0o644)
    await meta.mknod(ROOT, sub, b"inner", stat.S_IFREG, 0o644)
    with err(errno.EINVAL):
        await meta.rename(ROOT, ROOT_INODE, b"a", sub, b"a")  # into its own subtree
    with err(errno.EINVAL):
        await meta.rename(ROOT, ROOT_INODE, b"a", a, b"x")
    with err(errno.EINVAL):
        await meta.rename(
            ROOT, ROOT_INODE, b"f", ROOT_INODE, b"g", RENAME_EXCHANGE | RENAME_NOREPLACE
        )
    with err(errno.EEXIST):
        await meta.rename(ROOT, ROOT_INODE, b"f", ROOT_INODE, b"a", RENAME_NOREPLACE)
    with err(errno.EISDIR):
        await meta.rename(ROOT, ROOT_INODE, b"f", ROOT_INODE, b"a")
    with err(errno.ENOTDIR):
        await meta.rename(ROOT, ROOT_INODE, b"a", ROOT_INODE, b"f")
    e, _ = await meta.mkdir(ROOT, ROOT_INODE, b"e", 0o755)
    with err(errno.ENOTEMPTY):
        await meta.rename(ROOT, ROOT_INODE, b"e", a, b"sub")
    with err(errno.ENOENT):
        await meta.rename(ROOT, ROOT_INODE, b"missing", ROOT_INODE, b"x")
    with err(errno.ENOENT):
        await meta.rename(ROOT, ROOT_INODE, b"f", ROOT_INODE, b"none", RENAME_EXCHANGE)
    # replacing an empty directory
    await meta.rename(ROOT, ROOT_INODE, b"e", a, b"empty")
    await meta.mkdir(ROOT, ROOT_INODE, b"e2", 0o755)
    await meta.rename(ROOT, ROOT_INODE, b"e2", a, b"empty")
    with err(errno.ENOENT):
        await meta.getattr(e)
    assert (await meta.getattr(a)).nlink == 4
    assert (await meta.getattr(ROOT_INODE)).nlink == 3


async def test_rename_exchange(meta):
    a, _ = await meta.mkdir(ROOT, ROOT_INODE, b"a", 0o755)
    f, _ = await meta.mknod(ROOT, ROOT_INODE, b"f", stat.S_IFREG, 0o644)
    d, _ = await meta.mkdir(ROOT, a, b"d", 0o755)
    await meta.rename(ROOT, ROOT_INODE, b"f", a, b"d", RENAME_EXCHANGE)
    assert (await meta.lookup(ROOT, ROOT_INODE, b"f"))[0] == d
    assert (await meta.lookup(ROOT, a, b"d"))[0] == f
    assert (await meta.getattr(d)).parent == ROOT_INODE
    assert (await meta.getattr(f)).parent == a
    assert (await meta.getattr(a)).nlink == 2
    assert (await meta.getattr(ROOT_INODE)).nlink == 4


# -- hard links -------------------------------------------------------------------------------


async def test_hardlinks(meta):
    a, _ = await meta.mkdir(ROOT, ROOT_INODE, b"a", 0o755)
    b, _ = await meta.mkdir(ROOT, ROOT_INODE, b"b", 0o755)
    f, _ = await meta.mknod(ROOT, a, b"f", stat.S_IFREG, 0o644)
    attr = await meta.link(ROOT, f, b, b"f2")
    assert attr.nlink == 2
    await meta.link(ROOT, f, a, b"f3")
    assert await meta.get_parents(f) == {a: 2, b: 1}
    with err(errno.EEXIST):
        await meta.link(ROOT, f, b, b"f2")
    with err(errno.EPERM):
        await meta.link(ROOT, a, b, b"dirlink")
    await meta.unlink(ROOT, a, b"f")
    await meta.unlink(ROOT, a, b"f3")
    attr = await meta.getattr(f)
    assert attr.nlink == 1 and attr.parent == b
    await meta.unlink(ROOT, b, b"f2")
    with err(errno.ENOENT):
        await meta.getattr(f)
    g, _ = await meta.mknod(ROOT, a, b"g", stat.S_IFREG, 0o644)
    meta.max_nlink = 3
    await meta.link(ROOT, g, a, b"g1")
    await meta.link(ROOT, g, a, b"g2")
    with err(errno.EMLINK):
        await meta.link(ROOT, g, a, b"g3")


# -- readdir ----------------------------------------------------------------------------------


async def test_readdir_pages_through_many_entries(meta):
    d, _ = await meta.mkdir(ROOT, ROOT_INODE, b"big", 0o755)
    names = [f"f{i:05d}".encode() for i in range(5000)]
    sem = asyncio.Semaphore(64)

    async def make(n):
        async with sem:
            await meta.mknod(ROOT, d, n, stat.S_IFREG, 0o644)

    await asyncio.gather(*(make(n) for n in names))
    seen = []
    after = b""
    while page := await meta.readdir(ROOT, d, start_after=after, limit=333):
        assert len(page) <= 333
        seen += [e.name for e in page]
        after = page[-1].name
    assert seen == sorted(names)
    plus = await meta.readdir(ROOT, d, limit=3, plus=True)
    assert [e.attr.inode for e in plus] == [e.inode for e in plus]
    assert all(e.type == stat.S_IFREG for e in plus)


# -- permissions ------------------------------------------------------------------------------


async def test_permissions_non_root(meta):
    home, _ = await meta.mkdir(ROOT, ROOT_INODE, b"home", 0o755)
    await meta.setattr(ROOT, home, uid=ALICE.uid, gid=ALICE.gid)
    f, _ = await meta.mknod(ALICE, home, b"private", stat.S_IFREG, 0o600)
    with err(errno.EACCES):
        await meta.mknod(BOB, home, b"intruder", stat.S_IFREG, 0o644)
    with err(errno.EACCES):
        await meta.open(BOB, f, os.O_RDONLY)
    await meta.open(ALICE, f, os.O_RDWR)
    await meta.close(f)
    await meta.setattr(ALICE, f, mode=0o640)
    await meta.open(CAROL, f, os.O_RDONLY)  # supplementary group 1000
    await meta.close(f)
    with err(errno.EACCES):
        await meta.open(CAROL, f, os.O_WRONLY)
    with err(errno.EPERM):
        await meta.setattr(BOB, f, mode=0o777)
    with err(errno.EPERM):
        await meta.setattr(ALICE, f, uid=BOB.uid)
    with err(errno.EPERM):
        await meta.setattr(ALICE, f, gid=BOB.gid)
    await meta.access(ALICE, f, os.R_OK | os.W_OK)
    with err(errno.EACCES):
        await meta.access(BOB, f, os.R_OK)
    # root reads anything but executes only with some x bit
    await meta.access(ROOT, f, os.R_OK | os.W_OK)
    with err(errno.EACCES):
        await meta.access(ROOT, f, os.X_OK)
    await meta.setattr(ROOT, f, mode=0o610)
    await meta.access(ROOT, f, os.X_OK)
    # no search permission on the directory
    await meta.setattr(ALICE, home, mode=0o700)
    with err(errno.EACCES):
        await meta.lookup(BOB, home, b"private")


async def test_sticky_directory(meta):
    tmp, _ = await meta.mkdir(ROOT, ROOT_INODE, b"tmp", 0o1777)
    await meta.mknod(ALICE, tmp, b"alices", stat.S_IFREG, 0o644)
    with err(errno.EPERM):
        await meta.unlink(BOB, tmp, b"alices")
    with err(errno.EPERM):
        await meta.rename(BOB, tmp, b"alices", tmp, b"mine")
    await meta.rename(ALICE, tmp, b"alices", tmp, b"renamed")
    await meta.unlink(ROOT, tmp, b"renamed")


async def test_setgid_inheritance_and_suid_clearing(meta):
    shared, _ = await meta.mkdir(ROOT, ROOT_INODE, b"shared", 0o2777)
    await meta.setattr(ROOT, shared, gid=500)
    f, fattr = await meta.mknod(ALICE, shared, b"f", stat.S_IFREG, 0o644)
    assert fattr.gid == 500
    d, dattr = await meta.mkdir(ALICE, shared, b"d", 0o755)
    assert dattr.gid == 500 and dattr.mode & stat.S_ISGID
    # a non-member may not set setgid for a group it is not in
    attr = await meta.setattr(ALICE, f, mode=0o2755)
    assert not attr.mode & stat.S_ISGID
    g, _ = await meta.mknod(ALICE, ROOT_INODE, b"g", stat.S_IFREG, 0o644)
    attr = await meta.setattr(ALICE, g, mode=0o6755)
    assert attr.mode & 0o7777 == 0o6755
    attr = await meta.setattr(ALICE, g, gid=ALICE.gid)  # chown by non-root clears them
    assert attr.mode & 0o7777 == 0o755
    await meta.setattr(ALICE, g, mode=0o6755)
    attr = await meta.clear_suid_on_write(BOB, g)
    assert attr.mode & 0o7777 == 0o755


async def test_utimens_rules(meta):
    f, _ = await meta.mknod(ALICE, ROOT_INODE, b"f", stat.S_IFREG, 0o666)
    attr = await meta.setattr(BOB, f, atime=UTIME_NOW, mtime=UTIME_NOW)  # write permission
    assert attr.mtime > 0
    with err(errno.EPERM):
        await meta.setattr(BOB, f, mtime=123)
    attr = await meta.setattr(ALICE, f, atime=5, mtime=123)
    assert (attr.atime, attr.mtime) == (5, 123)
    await meta.setattr(ALICE, f, mode=0o644)
    with err(errno.EACCES):
        await meta.setattr(BOB, f, mtime=UTIME_NOW)


# -- xattrs -----------------------------------------------------------------------------------


async def test_xattrs(meta):
    f, _ = await meta.mknod(ALICE, ROOT_INODE, b"f", stat.S_IFREG, 0o644)
    await meta.setxattr(ALICE, f, b"user.a", b"1")
    assert await meta.getxattr(ALICE, f, b"user.a") == b"1"
    with err(errno.EEXIST):
        await meta.setxattr(ALICE, f, b"user.a", b"2", XATTR_CREATE)
    with err(errno.ENODATA):
        await meta.setxattr(ALICE, f, b"user.b", b"2", XATTR_REPLACE)
    await meta.setxattr(ALICE, f, b"user.a", b"2", XATTR_REPLACE)
    await meta.setxattr(ALICE, f, b"user.b", b"", XATTR_CREATE)
    assert await meta.listxattr(ALICE, f) == [b"user.a", b"user.b"]
    with err(errno.ENODATA):
        await meta.getxattr(ALICE, f, b"user.none")
    with err(errno.ERANGE):
        await meta.setxattr(ALICE, f, b"user." + b"n" * 251, b"")
    with err(errno.E2BIG):
        await meta.setxattr(ALICE, f, b"user.big", b"v" * (64 * 1024 + 1))
    await meta.setxattr(ALICE, f, b"user.max", b"v" * (64 * 1024))
    with err(errno.EACCES):
        await meta.setxattr(BOB, f, b"user.c", b"x")
    with err(errno.EPERM):
        await meta.setxattr(ALICE, f, b"trusted.t", b"x")
    await meta.removexattr(ALICE, f, b"user.a")
    with err(errno.ENODATA):
        await meta.removexattr(ALICE, f, b"user.a")


# -- concurrency ------------------------------------------------------------------------------


async def test_two_clients_race_on_one_directory(meta, redis_url):
    other = await Meta.open(redis_url)
    try:
        d, _ = await meta.mkdir(ROOT, ROOT_INODE, b"race", 0o755)

        async def run(m, prefix, n):
            return await asyncio.gather(
                *(m.mknod(ROOT, d, f"{prefix}{i}".encode(), stat.S_IFREG, 0o644) for i in range(n))
            )

        results = await asyncio.gather(run(meta, "a", 150), run(other, "b", 150),
                                       *(m.mkdir(ROOT, d, f"sub{i}".encode(), 0o755)
                                         for i, m in enumerate([meta, other] * 10)))  # fmt: skip
        inodes = [ino for ino, _ in results[0] + results[1]]
        assert len(set(inodes)) == 300
        names = []
        after = b""
        while page := await other.readdir(ROOT, d, start_after=after, limit=100):
            names += [e.name for e in page]
            after = page[-1].name
        assert len(names) == 320
        assert (await meta.getattr(d)).nlink == 22
        status = await meta.status()
        assert status["used_inodes"] == 321
        assert meta.stats.txn_restarts + other.stats.txn_restarts >= 0
        # racing creates of one name: exactly one wins
        outcomes = await asyncio.gather(
            *(m.mknod(ROOT, d, b"same", stat.S_IFREG, 0o644) for m in [meta, other] * 5),
            return_exceptions=True,
        )
        assert sum(not isinstance(o, Exception) for o in outcomes) == 1
        assert all(o.errno == errno.EEXIST for o in outcomes if isinstance(o, Exception))
    finally:
        await other.close()


async def test_create_decides_on_the_parent_as_it_is_now(meta, redis_url):
    """Creates use this client's copy of the parent's attributes and the create script
    compares it: a change by another client (a chmod, a removal) is never missed."""
    other = await Meta.open(redis_url)
    try:
        d, _ = await meta.mkdir(ROOT, ROOT_INODE, b"shared", 0o777)
        await meta.create(ALICE, d, b"a", 0o644)  # meta now holds d's attributes
        await meta.close_file((await meta.lookup(ALICE, d, b"a"))[0])
        await other.setattr(ROOT, d, mode=0o755)
        with err(errno.EACCES):
            await meta.mknod(ALICE, d, b"b", stat.S_IFREG, 0o644)
        with err(errno.EEXIST):  # EEXIST comes before the missing write permission
            await meta.mknod(ALICE, d, b"a", stat.S_IFREG, 0o644)
        await other.setattr(ROOT, d, mode=0o2777, gid=1000)
        ino, attr = await meta.mknod(BOB, d, b"c", stat.S_IFREG, 0o644)
        assert attr.gid == 1000  # the setgid bit set by the other client is honoured
        sub, _ = await meta.mkdir(ROOT, d, b"sub", 0o755)
        await meta.create(ROOT, sub, b"x", 0o644)
        await other.unlink(ROOT, sub, b"x")
        await other.rmdir(ROOT, d, b"sub")
        with err(errno.ENOENT):
            await meta.create(ROOT, sub, b"y", 0o644)
        assert (await meta.getattr(d)).nlink == 2
    finally:
        await other.close()


async def test_the_common_close_keeps_unlinked_open_files(meta, redis_url):
    ino, _ = await meta.create(ROOT, ROOT_INODE, b"f", 0o644)
    ino2, _ = await meta.create(ROOT, ROOT_INODE, b"g", 0o644)
    await meta.close_file(ino2)  # still linked: stays
    assert (await meta.getattr(ino2)).nlink == 1
    await meta.unlink(ROOT, ROOT_INODE, b"f")
    assert (await meta.getattr(ino)).nlink == 0  # open: kept until the last close
    await meta.close_file(ino)
    with err(errno.ENOENT):
        await meta.getattr(ino)


async def test_resolve_path_and_loops(meta):
    a, _ = await meta.mkdir(ROOT, ROOT_INODE, b"a", 0o755)
    f, _ = await meta.mknod(ROOT, a, b"f", stat.S_IFREG, 0o644)
    await meta.symlink(ROOT, ROOT_INODE, b"to_a", b"a")
    assert (await meta.resolve(ROOT, b"/to_a/f"))[0] == f
    await meta.symlink(ROOT, ROOT_INODE, b"loop1", b"/loop2")
    await meta.symlink(ROOT, ROOT_INODE, b"loop2", b"loop1")
    with err(errno.ELOOP):
        await meta.resolve(ROOT, b"/loop1/x")
