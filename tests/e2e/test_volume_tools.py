"""The volume tools as a user runs them: `cairn format|status|fsck|gc|compact|dump|load|bench`
from .venv/bin against a real redis-server and a file:// object store.

File contents are written and read back in-process through the chunk layer (the layers the
FUSE mount is built on); everything a user would type goes through the CLI.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from argparse import ArgumentTypeError
from pathlib import Path

import pytest

from cairn.chunk.reader import ChunkReader
from cairn.chunk.writer import ChunkWriter
from cairn.localstack import free_port
from cairn.meta import keys
from cairn.meta.engine import CHUNK_SIZE, ROOT_CTX, ROOT_INODE, Meta
from cairn.storage import chunks_prefix, open_store

BIN = Path(sys.executable).parent
HERE = Path(__file__).parent
BLOCK = 64 * 1024


def cairn(*argv: str, stdin: str | None = None, timeout: float = 60, cwd: Path | None = None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return subprocess.run(
        [str(BIN / "cairn"), *argv],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
        env=clean,
        cwd=cwd or "/tmp",
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


def one_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cairn: ")
    return lines[0]


def db(url: str, number: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{number}"


@pytest.fixture
def objects(tmp_path) -> Path:
    return tmp_path / "objects"


@pytest.fixture
def volume(redis_url, objects) -> str:
    """A formatted volume (64 KiB blocks) in DB 0 of the shared redis-server."""
    options = ["--storage", f"file://{objects}", "--block-size=64K", "--trash-days=0"]
    ok(cairn("format", redis_url, "vol", *options))
    return redis_url


# -- in-process helpers: write and read files as a mount does ---------------------------------


async def write_file(meta, store, parent: int, name: bytes, pieces: list[tuple[int, bytes]]):
    inode, _ = await meta.create(ROOT_CTX, parent, name, 0o640)
    writer = ChunkWriter(meta, store)
    handle = writer.open(inode)
    for offset, data in pieces:
        await handle.write(offset, data)
        await handle.flush()  # one slice per piece: overwrites make several records
    await handle.close()
    await writer.close()
    await meta.close(inode)
    return inode


async def read_file(meta, store, inode: int) -> bytes:
    size = (await meta.getattr(inode)).size
    reader = ChunkReader(meta, store)
    try:
        return await reader.read(inode, 0, size, size)
    finally:
        await reader.close()


async def populate(meta, store) -> None:
    """Directories, empty/small/multi-block/overwritten/sparse files, links and xattrs."""
    a, _ = await meta.mkdir(ROOT_CTX, ROOT_INODE, b"a", 0o755)
    b, _ = await meta.mkdir(ROOT_CTX, a, b"b", 0o700)
    await write_file(meta, store, ROOT_INODE, b"empty", [])
    small = await write_file(meta, store, ROOT_INODE, b"small", [(0, b"hello cairn\n")])
    await write_file(meta, store, a, b"multi", [(0, os.urandom(3 * BLOCK + 17))])
    await write_file(
        meta,
        store,
        a,
        b"overwritten",
        [(0, os.urandom(50_000)), (10_000, os.urandom(5_000)), (45_000, os.urandom(20_000))],
    )
    await write_file(
        meta, store, b, b"sparse", [(100, os.urandom(1000)), (CHUNK_SIZE - 300, os.urandom(5000))]
    )
    await write_file(meta, store, b, b"odd \xff name", [(0, b"\x00\x01\x02")])
    await meta.symlink(ROOT_CTX, ROOT_INODE, b"link", b"a/multi")
    await meta.link(ROOT_CTX, small, a, b"hard")
    await meta.setxattr(ROOT_CTX, small, b"user.colour", b"\xffblue", 0)


async def tree(meta, store) -> dict[bytes, tuple]:
    """Every path -> (type, mode, size, nlink, mtime, content or target, xattrs)."""
    out: dict[bytes, tuple] = {}
    todo = [(b"", ROOT_INODE)]
    while todo:
        path, d = todo.pop()
        for e in await meta.readdir(ROOT_CTX, d, limit=10_000, plus=True):
            full = path + b"/" + e.name
            attr = e.attr
            if attr.is_dir():
                todo.append((full, e.inode))
                body = b""
            elif attr.is_file():
                body = hashlib.sha256(await read_file(meta, store, e.inode)).digest()
            else:
                body = await meta.readlink(e.inode)
            names = sorted(await meta.listxattr(ROOT_CTX, e.inode))
            xattrs = [(n, await meta.getxattr(ROOT_CTX, e.inode, n)) for n in names]
            out[full] = (
                attr.type,
                attr.mode,
                attr.size,
                attr.nlink,
                attr.mtime,
                e.inode,
                body,
                xattrs,
            )
    return out


# -- format, status, bad URLs -------------------------------------------------------------------


def test_format_again_is_a_noop_and_other_settings_fail_naming_fields(redis_url, objects):
    args = ["format", redis_url, "vol", "--storage", f"file://{objects}", "--block-size", "1M"]
    first = ok(cairn(*args))
    assert "formatted volume 'vol'" in first and "1.0 MiB" in first
    again = ok(cairn(*args))
    assert "already formatted with these settings" in again and "nothing to do" in again

    other = cairn(
        "format",
        redis_url,
        "vol",
        "--storage",
        "s3://AKID:s3cret@bucket/p",
        "--block-size",
        "4M",
        "--compress",
        "zstd",
    )
    assert other.returncode == 2
    line = one_line(other)
    assert "block_size" in line and "compress" in line and "storage" in line
    differing = line.split("other settings:")[1]
    assert "trash_days" not in differing and "name (" not in differing
    assert "s3cret" not in other.stderr + other.stdout


def test_format_checks_the_storage_first(redis_url, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = cairn("format", redis_url, "vol", "--storage", f"file://{blocker}/objects")
    assert result.returncode != 0
    assert "object store" in one_line(result)
    # nothing was formatted: status still says so
    assert "cairn format first" in one_line(cairn("status", redis_url))


def test_format_refuses_bad_sizes_with_usage(redis_url, objects):
    result = cairn("format", redis_url, "v", "--storage", f"file://{objects}", "--block-size", "4Q")
    assert result.returncode == 2
    assert "not a size" in result.stderr and "Traceback" not in result.stderr


async def test_status_shows_settings_sessions_and_usage(volume, objects):
    meta = await Meta.open(volume)
    store = open_store(meta.fmt.storage)
    try:
        await meta.new_session({"hostname": "node-1", "mountpoint": "/mnt/vol"})
        await write_file(meta, store, ROOT_INODE, b"f", [(0, os.urandom(100_000))])
        text = ok(cairn("status", volume))
        assert re.search(r"^volume\s+vol \(uuid [0-9a-f-]{36}\)", text, re.M)
        assert f"file://{objects}" in text
        assert "64.0 KiB" in text and "unlimited" in text
        assert re.search(r"^inodes\s+1 used", text, re.M)
        assert re.search(r"^sessions\s+1$", text, re.M)
        assert "mountpoint=/mnt/vol" in text

        doc = json.loads(ok(cairn("status", volume, "--json")))
        assert doc["format"]["name"] == "vol" and doc["format"]["block_size"] == BLOCK
        assert doc["usage"]["used_inodes"] == 1
        assert doc["usage"]["used_space"] == 100_000 + (-100_000 % 4096)
        [session] = doc["sessions"]
        assert session["hostname"] == "node-1"
    finally:
        await meta.close_session()
        await meta.close()
        await store.close()


@pytest.mark.parametrize("command", ["status", "fsck", "gc", "dump"])
def test_bad_meta_urls_end_with_one_line(command, redis_url):
    port = free_port()
    cases = [
        ("http://127.0.0.1:6379/0", 2, "not a metadata URL"),
        ("redis://127.0.0.1:notaport/0", 2, "bad port"),
        (f"redis://:hunter2@127.0.0.1:{port}/0", 69, "unreachable"),
        (db(redis_url, 7), 2, "cairn format first"),  # reachable but empty
    ]
    for url, code, words in cases:
        result = cairn(command, url)
        assert result.returncode == code, (url, result.stderr)
        line = one_line(result)
        assert words in line
        assert "hunter2" not in result.stderr + result.stdout


# -- dump and load ------------------------------------------------------------------------------


async def test_dump_then_load_into_an_empty_db_gives_the_same_volume(volume, tmp_path):
    meta = await Meta.open(volume)
    store = open_store(meta.fmt.storage)
    try:
        await populate(meta, store)
        before = await tree(meta, store)
    finally:
        await meta.close()

    dump = tmp_path / "volume.json"
    ok(cairn("dump", volume, str(dump)))
    assert not list(tmp_path.glob("volume.json.tmp-*"))
    other = db(volume, 1)
    loaded = cairn("load", other, "-", stdin=dump.read_text())
    ok(loaded)
    assert "loaded into" in loaded.stderr

    # exact: dumping the loaded volume gives the same bytes
    redumped = cairn("dump", other)
    assert ok(redumped) == dump.read_text()

    copy = await Meta.open(other)
    try:
        after = await tree(copy, store)
    finally:
        await copy.close()
        await store.close()
    assert set(after) == set(before)
    assert after == before
    assert b"/a/b/odd \xff name" in after and after[b"/link"][6] == b"a/multi"

    # loading into a database that is not empty is refused
    again = cairn("load", other, str(dump))
    assert again.returncode == 2
    assert "not empty" in one_line(again)
    garbage = cairn("load", db(volume, 2), "-", stdin="{not json")
    assert garbage.returncode == 2 and "not a Cairn dump" in one_line(garbage)


# -- a writer killed mid-write ----------------------------------------------------------------------


async def test_sigkilled_writer_leaves_fsynced_data_and_orphans_for_gc(volume, objects):
    # started and killed from this thread on purpose: the test waits for nothing else
    proc = subprocess.Popen(  # noqa: ASYNC220
        [
            sys.executable,
            str(HERE / "_crash_writer.py"),
            volume,
            "crash",
            str(3 * BLOCK + 999),
            "4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    fsynced = []
    try:
        while True:
            line = proc.stdout.readline()
            assert line, f"writer ended early: {proc.stderr.read()}"
            record = json.loads(line)
            if "pending" in record:
                break
            fsynced.append(record["fsynced"])
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(fsynced) == 4

    # no slice points at a missing object; the orphans are young, so not yet "leaked"
    check = cairn("fsck", volume)
    assert ok(check).strip().endswith("clean")
    strict = cairn("fsck", volume, "--grace", "0")
    assert strict.returncode == 1
    assert "leaked" in strict.stdout and "missing" not in strict.stdout
    await _check_fsynced(volume, fsynced)

    store = open_store(f"file://{objects}")
    try:
        uuid = json.loads(ok(cairn("status", volume, "--json")))["format"]["uuid"]
        count = len([o async for o in store.list(chunks_prefix(uuid))])
        report = ok(cairn("gc", volume))
        assert "leaked" in report
        assert len([o async for o in store.list(chunks_prefix(uuid))]) == count  # report only

        deleted = ok(cairn("gc", volume, "--delete", "--grace", "0"))
        removed = int(re.search(r"deleted (\d+) leaked object", deleted).group(1))
        assert removed > 0
        assert len([o async for o in store.list(chunks_prefix(uuid))]) == count - removed
    finally:
        await store.close()
    assert ok(cairn("fsck", volume, "--grace", "0")).strip().endswith("clean")
    await _check_fsynced(volume, fsynced)


async def _check_fsynced(url: str, fsynced: list[dict]) -> None:
    meta = await Meta.open(url)
    store = open_store(meta.fmt.storage)
    try:
        inode, attr = await meta.lookup(ROOT_CTX, ROOT_INODE, b"crash")
        end = fsynced[-1]["offset"] + fsynced[-1]["length"]
        assert attr.size >= end
        data = (await read_file(meta, store, inode))[:end]
        for rec in fsynced:
            piece = data[rec["offset"] : rec["offset"] + rec["length"]]
            assert hashlib.sha256(piece).hexdigest() == rec["sha256"], rec["round"]
    finally:
        await meta.close()
        await store.close()


# -- compact ---------------------------------------------------------------------------------------


async def test_fsck_reports_missing_objects_and_repairs_counters(volume, objects):
    meta = await Meta.open(volume)
    store = open_store(meta.fmt.storage)
    try:
        inode = await write_file(meta, store, ROOT_INODE, b"f", [(0, os.urandom(2 * BLOCK))])
        await meta.r.set(keys.USED_SPACE, 12345)
        wrong = cairn("fsck", volume)
        assert wrong.returncode == 1
        assert "counter space: stored 12345" in wrong.stdout and "--repair" in wrong.stdout
        repaired = cairn("fsck", volume, "--repair")
        assert "repaired" in ok(repaired) and ok(repaired).strip().endswith("clean")
        assert ok(cairn("fsck", volume)).strip().endswith("clean")

        [first, *_] = [o.key async for o in store.list(chunks_prefix(meta.fmt.uuid))]
        await store.delete(first)
        lost = cairn("fsck", volume)
        assert lost.returncode == 1
        assert f"files (inodes) {inode} have lost data" in lost.stdout
        assert first in lost.stdout and "1 problem(s) remain" in lost.stdout
    finally:
        await meta.close()
        await store.close()


async def test_compact_makes_one_slice_and_keeps_the_bytes(volume):
    meta = await Meta.open(volume)
    store = open_store(meta.fmt.storage)
    try:
        pieces = [(i * 3000, os.urandom(5000)) for i in range(20)]
        inode = await write_file(meta, store, ROOT_INODE, b"frag", pieces)
        before = await read_file(meta, store, inode)
        assert len(await meta.chunk_records(inode, 0)) == 20

        out = cairn("compact", volume, "/frag")
        ok(out)
        assert "1 chunk(s) compacted: 20 slice records became 1" in out.stderr
        assert len(await meta.chunk_records(inode, 0)) == 1
        assert await read_file(meta, store, inode) == before
        by_inode = cairn("compact", volume, str(inode))
        assert "no chunk needed compacting" in ok(by_inode) + by_inode.stderr
        missing = cairn("compact", volume, "/nope")
        assert missing.returncode == 2 and "No such file" in one_line(missing)
    finally:
        await meta.close()
        await store.close()
    assert ok(cairn("fsck", volume)).strip().endswith("clean")


# -- benchmarks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["auto", "chunk"])
def test_bench_core_prints_figures_and_ratios(tmp_path, via):
    argv = ["--size", "16M", "--files", "300", "--random-reads", "500", "--via", via]
    result = cairn("bench", "core", *argv, "--dir", str(tmp_path), timeout=120)
    text = ok(result)
    rows = [line for line in text.splitlines() if re.search(r"(MiB/s|IOPS|ops/s)\s+[\d.]+$", line)]
    names = " ".join(rows)
    for what in (
        "sequential write",
        "sequential read",
        "random read 4 KiB",
        "create",
        "stat",
        "unlink",
    ):
        assert what in names, text
    for row in rows:
        cairn_figure, local_figure, _unit, ratio = row.split()[-4:]
        assert float(cairn_figure.replace(",", "")) > 0
        assert float(local_figure.replace(",", "")) > 0
        assert float(ratio) > 0
    if via == "chunk":
        assert "the layers under the VFS" in text
    assert list(tmp_path.iterdir()) == []  # its redis-server, store and files are gone


def test_bench_events_prints_events_per_second():
    result = cairn("bench", "events", "--count", "2000", timeout=120)
    text = ok(result)
    assert re.search(r"append\s+[\d,]+ events/s", text), text
    assert re.search(r"consume\s+[\d,]+ events/s", text), text


def test_help_of_every_volume_tool():
    for command in ("format", "status", "fsck", "gc", "compact", "dump", "load"):
        text = ok(cairn(command, "--help"))
        assert "META_URL" in text
    assert "--count" in ok(cairn("bench", "events", "--help"))
    assert "--files" in ok(cairn("bench", "core", "--help"))


def test_sizes_and_progress_lines():
    from cairn.cli.fs import parse_size
    from cairn.progress import Progress

    assert parse_size("4M") == 4 << 20 and parse_size("1GiB") == 1 << 30
    assert parse_size("512k") == 512 << 10 and parse_size("10") == 10
    assert parse_size("1.5K") == 1536
    with pytest.raises(ArgumentTypeError):
        parse_size("4Q")

    quiet, live = io.StringIO(), io.StringIO()
    for stream, is_live in ((quiet, False), (live, True)):
        with Progress("gc", stream=stream, live=is_live) as progress:
            progress("objects", 1000)
            progress.done("1,000 objects listed")
    assert quiet.getvalue().startswith("gc: 1,000 objects listed (")  # summary only
    assert quiet.getvalue().count("\n") == 1 and "\r" not in quiet.getvalue()
    assert "\rgc: 1,000 objects" in live.getvalue()
    assert live.getvalue().splitlines()[-1].endswith("gc: 1,000 objects listed (0.0s)")
