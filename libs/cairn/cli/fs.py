"""The volume tools: `cairn format|status|fsck|gc|compact|dump|load META_URL ...`.

Each command works on one volume, named by its metadata URL (redis://[:password@]host:port/db);
the object store is the one the volume was formatted with. Results go to stdout, progress
and summaries to stderr (a live line only on a terminal), errors are one line with an exit
code (cairn.errors.exit_code: 2 for a wrong argument or setting, 69 for an unreachable
server, 1 for problems found). Passwords in URLs are never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import stat
import sys
import time
from collections.abc import AsyncIterator
from typing import IO, Any
from urllib.parse import urlsplit

from cairn.errors import (
    ConfigError,
    FailedPrecondition,
    FSError,
    InvalidArgument,
    ResourceExhausted,
)
from cairn.progress import Progress, human_bytes

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
META_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_GRACE = 3600.0
META_FORM = "redis://[:password@]host:port/db"
META_HELP = f"metadata engine: {META_FORM}"


# -- argument helpers ----------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'4M' -> 4194304. Binary units K, M, G, T, P (optionally 'i', 'iB' or 'B' after)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpP]?)(?:i?[bB])?\s*", str(text))
    if match is None:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size: use e.g. 4M, 1G, 512K")
    number, unit = match.groups()
    return int(float(number) * SIZE_UNITS[unit.upper()])


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must not be negative")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if value < 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"'{text}' must not be negative")
    return value


def shown_url(url: str) -> str:
    """The URL without a password, even when it is too malformed to parse."""
    from cairn.meta.base import safe_url

    try:
        return safe_url(url)
    except ValueError:
        return re.sub(r"//[^@/]*@", "//***@", url)


def check_meta_url(url: str) -> str:
    """ConfigError (one line, no password) unless url can name a metadata engine."""
    shown = shown_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"META_URL '{shown}' has a bad port: use {META_FORM}") from None
    if parts.scheme not in META_SCHEMES:
        raise ConfigError(f"META_URL '{shown}' is not a metadata URL: use {META_FORM}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"META_URL '{shown}' names no host: use {META_FORM}")
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(f"META_URL '{shown}' names no socket: use unix:///path/redis.sock")
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ConfigError(f"META_URL '{shown}': database '{db}' is not a number")
    return url


def storage_shown(url: str) -> str:
    from cairn.storage import redact_url

    return redact_url(url) if url else "(none)"


def _meta_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("meta_url", metavar="META_URL", help=META_HELP)


@contextlib.asynccontextmanager
async def open_meta(url: str) -> AsyncIterator[Any]:
    from cairn.meta.engine import Meta

    meta = await Meta.open(check_meta_url(url))
    try:
        yield meta
    finally:
        await meta.close()


@contextlib.asynccontextmanager
async def open_volume(url: str) -> AsyncIterator[tuple[Any, Any]]:
    """The volume's metadata client and its object store (checked to answer)."""
    from cairn.storage import open_store

    async with open_meta(url) as meta:
        if not meta.fmt.storage:
            raise ConfigError(f"volume {meta.fmt.name!r} names no object store")
        store = open_store(meta.fmt.storage)
        try:
            await store.check()
            yield meta, store
        finally:
            await store.close()


# -- registration --------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    _register_format(sub)
    _register_status(sub)
    _register_fsck(sub)
    _register_gc(sub)
    _register_compact(sub)
    _register_dump(sub)
    _register_load(sub)


def _register_format(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "format",
        help="create a volume (or check that it exists with these settings)",
        description="Format a Cairn volume in an empty Redis database. Formatting again with "
        "the same settings does nothing; different settings fail (exit 2) naming the fields "
        "that differ. The object store must answer first. Sizes take K, M, G, T suffixes.",
    )
    _meta_arg(p)
    p.add_argument("name", metavar="NAME", help="the volume's name")
    p.add_argument(
        "--storage",
        required=True,
        metavar="URL",
        help="object store for the data: file:///dir or s3://bucket[/prefix]",
    )
    p.add_argument(
        "--block-size",
        type=parse_size,
        default="4M",
        metavar="SIZE",
        help="largest object a slice is stored as (default 4M)",
    )
    p.add_argument(
        "--compress",
        choices=("none", "zstd", "lz4"),
        default="none",
        help="compression of stored blocks (default none)",
    )
    p.add_argument(
        "--trash-days",
        type=non_negative_int,
        default=1,
        metavar="N",
        help="days deleted files stay in .trash (0: delete at once; default 1)",
    )
    p.add_argument(
        "--capacity",
        type=parse_size,
        default=0,
        metavar="BYTES",
        help="space limit of the volume (default 0: unlimited)",
    )
    p.add_argument(
        "--inodes",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="inode limit of the volume (default 0: unlimited)",
    )
    p.set_defaults(handler=_format)


def _register_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="show a volume's settings, sessions and usage",
        description="Show a volume's settings, client sessions and usage.",
    )
    _meta_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=_status)


def _register_fsck(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fsck",
        help="check that metadata and objects agree (exit 1 on problems)",
        description="Check that every slice's objects exist, find objects nothing owns, "
        "and recount reference, usage and quota counters. Exit 0 when the volume is clean, "
        "1 when problems remain.",
    )
    _meta_arg(p)
    p.add_argument("--repair", action="store_true", help="rewrite counters found wrong")
    p.add_argument(
        "--grace",
        type=seconds,
        default=DEFAULT_GRACE,
        metavar="S",
        help="objects younger than this are uploads in flight, not leaks "
        f"(default {DEFAULT_GRACE:.0f})",
    )
    p.set_defaults(handler=_fsck)


def _register_gc(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gc",
        help="find (and with --delete remove) objects no file uses",
        description="Report objects no slice owns and slices waiting for deletion. With "
        "--delete: clean up sessions that stopped heartbeating, purge expired trash, finish "
        "interrupted file deletions, delete due slices and leaked objects.",
    )
    _meta_arg(p)
    p.add_argument("--delete", action="store_true", help="delete; without it gc only reports")
    p.add_argument(
        "--grace",
        type=seconds,
        default=DEFAULT_GRACE,
        metavar="S",
        help="objects younger than this are uploads in flight and are kept "
        f"(default {DEFAULT_GRACE:.0f})",
    )
    p.add_argument(
        "--session-timeout",
        type=seconds,
        default=300.0,
        metavar="S",
        help="with --delete, sessions silent this long are cleaned (default 300)",
    )
    p.set_defaults(handler=_gc)


def _register_compact(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compact",
        help="rewrite fragmented chunks as one slice each",
        description="Compact chunks made of many slices. With no PATH, every fragmented "
        "chunk of the volume; with PATHs (absolute inside the volume, e.g. /dir/file) or "
        "inode numbers, every chunk of those files (directories: the files below them).",
    )
    _meta_arg(p)
    p.add_argument("targets", nargs="*", metavar="PATH-or-INODE")
    p.set_defaults(handler=_compact)


def _register_dump(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dump",
        help="write a volume's metadata as JSON",
        description="Write the volume's metadata (settings, counters, every "
        "inode with its entries, chunks and xattrs) as JSON; `cairn load` "
        "restores it exactly. Sessions and locks are live state, not dumped.",
    )
    _meta_arg(p)
    p.add_argument(
        "file", nargs="?", default="-", metavar="FILE", help="where to write (default -: stdout)"
    )
    p.set_defaults(handler=_dump)


def _register_load(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "load",
        help="restore a dump into an empty Redis database",
        description="Load a `cairn dump` into an empty Redis database.",
    )
    _meta_arg(p)
    p.add_argument(
        "file", nargs="?", default="-", metavar="FILE", help="the dump to read (default -: stdin)"
    )
    p.set_defaults(handler=_load)


# -- format --------------------------------------------------------------------------------

_SHOWN_FIELDS = (
    "name",
    "storage",
    "block_size",
    "compress",
    "trash_days",
    "capacity",
    "inodes",
    "chunk_size",
)


def _show_value(field: str, value: Any) -> str:
    if field == "storage":
        return storage_shown(value)
    if field in ("block_size", "capacity", "chunk_size") and value:
        return f"{value} ({human_bytes(value)})"
    return repr(value) if isinstance(value, str) else str(value)


async def _format(args) -> int:
    from cairn.meta.base import REDIS_ERRORS, connect, read_format, unavailable
    from cairn.meta.engine import Format, format_volume
    from cairn.storage import open_store

    url = check_meta_url(args.meta_url)
    wanted = Format(
        name=args.name,
        storage=args.storage,
        block_size=args.block_size,
        compress=args.compress,
        trash_days=args.trash_days,
        capacity=args.capacity,
        inodes=args.inodes,
    )
    if not args.name or "/" in args.name:
        raise InvalidArgument(f"volume name {args.name!r} must be non-empty and have no '/'")
    r = connect(url)
    try:
        stored = await read_format(r, url)
        if stored is None and await r.dbsize():
            raise ConfigError(f"{shown_url(url)} holds other data: format an empty database")
    except REDIS_ERRORS as error:
        raise unavailable(url, error) from None
    finally:
        await r.aclose()
    if stored is not None:
        return _already(url, stored, wanted)
    store = open_store(args.storage)
    try:
        await store.check()
    finally:
        await store.close()
    fmt = await format_volume(url, wanted)
    print(
        f"formatted volume {fmt.name!r} (uuid {fmt.uuid}) in {shown_url(url)}: storage "
        f"{storage_shown(fmt.storage)}, block size {human_bytes(fmt.block_size)}, "
        f"compression {fmt.compress}, trash {fmt.trash_days} day(s)"
    )
    return 0


def _already(url: str, stored: Any, wanted: Any) -> int:
    differ = [f for f in _SHOWN_FIELDS if getattr(stored, f) != getattr(wanted, f)]
    if differ:
        shown = ", ".join(
            f"{f} ({_show_value(f, getattr(stored, f))} != {_show_value(f, getattr(wanted, f))})"
            for f in differ
        )
        raise ConfigError(
            f"volume {stored.name!r} in {shown_url(url)} is already formatted "
            f"with other settings: {shown}"
        )
    print(
        f"volume {stored.name!r} (uuid {stored.uuid}) is already formatted with these "
        f"settings in {shown_url(url)}: nothing to do"
    )
    return 0


# -- status --------------------------------------------------------------------------------


async def _status(args) -> int:
    async with open_meta(args.meta_url) as meta:
        status = await meta.status()
        sessions = await meta.list_sessions()
    status.pop("session", None)
    fmt = status.pop("format")
    fmt["storage"] = storage_shown(fmt.get("storage", ""))
    document = {
        "meta_url": shown_url(args.meta_url),
        "format": fmt,
        "sessions": sessions,
        "usage": status,
    }
    if args.json:
        print(json.dumps(document, indent=2, sort_keys=True, default=str))
        return 0
    _print_status(document)
    return 0


def _limit(value: int, bytes_: bool) -> str:
    if not value:
        return "unlimited"
    return human_bytes(value) if bytes_ else f"{value:,}"


def _print_status(doc: dict) -> None:
    fmt, usage, sessions = doc["format"], doc["usage"], doc["sessions"]
    rows = [
        ("volume", f"{fmt['name']} (uuid {fmt['uuid']})"),
        ("meta", doc["meta_url"]),
        ("storage", fmt["storage"]),
        ("block size", f"{human_bytes(fmt['block_size'])}, chunk {human_bytes(fmt['chunk_size'])}"),
        ("compression", fmt["compress"]),
        ("trash", f"{fmt['trash_days']} day(s), {usage['trash_files']:,} file(s) in it"),
        ("space", f"{human_bytes(usage['used_space'])} used of {_limit(fmt['capacity'], True)}"),
        ("inodes", f"{usage['used_inodes']:,} used of {_limit(fmt['inodes'], False)}"),
        (
            "slices",
            f"{usage['slices']:,} referenced, {usage['pending_slice_deletes']:,} "
            f"waiting for deletion, {usage['files_being_freed']:,} file(s) being freed",
        ),
        ("quotas", f"{usage['quotas']:,} directory quota(s)"),
        ("sessions", f"{len(sessions)}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    now = time.time()
    for s in sessions:
        info = " ".join(
            f"{k}={v}"
            for k, v in sorted(s.items())
            if k not in ("sid", "heartbeat", "open_files", "lock_keys", "started")
        )
        print(
            f"  session {s['sid']}: last heartbeat {now - s['heartbeat']:.0f}s ago, "
            f"{s['open_files']} open file(s), {s['lock_keys']} lock(s) {info}".rstrip()
        )


# -- fsck ----------------------------------------------------------------------------------


async def _fsck(args) -> int:
    from cairn.chunk.fsck import fsck

    async with open_volume(args.meta_url) as (meta, store):
        with Progress("fsck") as progress:
            report = await fsck(
                meta, store, repair=args.repair, progress=progress, grace=args.grace
            )
            progress.done(
                f"{report.chunks:,} chunks, {report.slices:,} slices, "
                f"{report.objects:,} objects checked"
            )
    for m in report.missing:
        inodes = ", ".join(str(i) for i in m.inodes)
        print(
            f"missing: slice {m.slice_id} ({human_bytes(m.size)}) lacks {len(m.keys)} "
            f"object(s); files (inodes) {inodes} have lost data"
        )
        for key in m.keys:
            print(f"  {key}")
    for key in report.damaged:
        print(f"damaged: {key} has the wrong size")
    if report.leaked:
        print(
            f"leaked: {len(report.leaked):,} object(s) no slice owns (older than "
            f"{args.grace:.0f}s); `cairn gc META_URL --delete` removes them"
        )
    for fix in report.counters:
        state = "repaired" if fix.repaired else "wrong (run with --repair)"
        print(f"counter {fix.name}: stored {fix.stored}, counted {fix.actual}: {state}")
    for note in report.notes:
        print(f"note: {note}")
    if report.ok:
        print("clean")
        return 0
    problems = (
        len(report.missing)
        + len(report.damaged)
        + (1 if report.leaked else 0)
        + len(report.unrepaired)
    )
    print(f"{problems} problem(s) remain")
    return 1


# -- gc ------------------------------------------------------------------------------------


async def _gc(args) -> int:
    from cairn.chunk.gc import gc

    async with open_volume(args.meta_url) as (meta, store):
        if args.delete:
            sessions = await meta.clean_expired_sessions(timeout=args.session_timeout)
            purged = await meta.purge_trash()
            freed = await meta.cleanup_deleted_files()
            print(
                f"cleaned {sessions} expired session(s), purged {purged} trash "
                f"entr{'y' if purged == 1 else 'ies'}, finished {freed} interrupted file "
                f"deletion(s)"
            )
        with Progress("gc") as progress:
            report = await gc(meta, store, delete=args.delete, progress=progress, grace=args.grace)
            progress.done(f"{report.objects:,} objects ({human_bytes(report.bytes)}) listed")
    print(
        f"objects: {report.valid:,} in use, {report.queued:,} held by the trash, "
        f"{report.recent:,} younger than {args.grace:.0f}s, {len(report.leaked):,} leaked "
        f"({human_bytes(report.leaked_bytes)})"
    )
    if args.delete:
        print(
            f"deleted {report.deleted:,} leaked object(s); freed {report.pending_freed:,} "
            f"of {report.pending_due:,} due slice(s) ({report.pending_objects:,} objects)"
        )
    else:
        print(
            f"{report.pending_due:,} slice(s) due for deletion; run with --delete to remove "
            f"them and the leaked objects"
        )
    for key in report.foreign:
        print(f"note: {key} is not a block object; left alone")
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if report.errors else 0


# -- compact -------------------------------------------------------------------------------


async def _compact(args) -> int:
    from cairn.chunk.compact import compact_all

    async with open_volume(args.meta_url) as (meta, store):
        with Progress("compact") as progress:
            if args.targets:
                results = await _compact_targets(meta, store, args.targets, progress)
            else:
                results = await compact_all(meta, store)
            done = [r for r in results if r.done]
            records = sum(r.records for r in done)
            rewritten = sum(r.size for r in done)
            if done:
                progress.done(
                    f"{len(done):,} chunk(s) compacted: {records:,} slice records "
                    f"became {len(done):,}, {human_bytes(rewritten)} "
                    f"rewritten"
                )
            else:
                progress.done("no chunk needed compacting")
    skipped = len(results) - len(done)
    if skipped:
        print(f"{skipped} chunk(s) changed while being compacted and were left as they are")
    return 0


async def _compact_targets(meta: Any, store: Any, targets: list[str], progress: Progress):
    from cairn.chunk.compact import compact_chunk
    from cairn.chunk.reader import ChunkReader
    from cairn.chunk.writer import ChunkWriter

    reader = ChunkReader(meta, store, readahead_max=0)
    writer = ChunkWriter(meta, store)
    results = []
    try:
        for inode in await _target_files(meta, targets):
            attr = await meta.getattr(inode)
            chunks = (attr.size + meta.fmt.chunk_size - 1) // meta.fmt.chunk_size
            for index in range(chunks):
                result = await compact_chunk(
                    meta, store, inode, index, force=True, reader=reader, writer=writer
                )
                if result.records:
                    results.append(result)
                progress.advance(1, "chunks")
    finally:
        await reader.close()
    return results


async def _target_files(meta: Any, targets: list[str]) -> list[int]:
    """The regular files the targets name: files, files below directories, inodes."""
    from cairn.meta.engine import ROOT_CTX

    files: list[int] = []
    for target in targets:
        try:
            if target.isdigit():
                inode, attr = int(target), await meta.getattr(int(target))
            else:
                inode, attr = await meta.resolve(ROOT_CTX, os.fsencode("/" + target.lstrip("/")))
        except FSError as error:
            raise InvalidArgument(f"{target}: {os.strerror(error.errno)}") from None
        if attr.is_dir():
            files.extend(await _files_below(meta, inode))
        elif attr.is_file():
            files.append(inode)
        else:
            raise InvalidArgument(f"{target} is neither a file nor a directory")
    return list(dict.fromkeys(files))


async def _files_below(meta: Any, directory: int) -> list[int]:
    from cairn.meta.engine import ROOT_CTX, TRASH_INODE

    files, todo = [], [directory]
    while todo:
        d = todo.pop()
        after = b""
        while entries := await meta.readdir(ROOT_CTX, d, start_after=after, limit=1000):
            for e in entries:
                if e.type == stat.S_IFDIR and e.inode != TRASH_INODE:
                    todo.append(e.inode)
                elif e.type == stat.S_IFREG:
                    files.append(e.inode)
            after = entries[-1].name
    return files


# -- dump and load -------------------------------------------------------------------------


async def _dump(args) -> int:
    async with open_meta(args.meta_url) as meta:
        started = time.monotonic()
        if args.file == "-":
            try:
                count = await meta.dump(_Output(sys.stdout.buffer, "stdout"))
                sys.stdout.buffer.flush()
            except (BrokenPipeError, _OutputClosed):
                count = -1
            if count < 0:  # `cairn dump URL | head`: the reader has had enough
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise FailedPrecondition("dump: the output was closed before the end")
            where = "stdout"
        else:
            count = await _dump_to_file(meta, args.file)
            where = args.file
    print(
        f"dump: {count:,} inodes of volume {meta.fmt.name!r} written to {where} "
        f"({time.monotonic() - started:.1f}s)",
        file=sys.stderr,
    )
    return 0


class _Output:
    """A binary stream whose write errors are not OSErrors, which the metadata engine
    would report as an unreachable Redis: a closed pipe or a full disk says so."""

    def __init__(self, stream: IO[bytes], where: str) -> None:
        self.stream = stream
        self.where = where

    def write(self, data: bytes) -> int:
        try:
            return self.stream.write(data)
        except BrokenPipeError:
            raise _OutputClosed() from None
        except OSError as error:
            raise ResourceExhausted(f"dump: cannot write {self.where}: {error.strerror}") from None


class _OutputClosed(FailedPrecondition):
    pass


async def _dump_to_file(meta: Any, path: str) -> int:
    """A regular file is written next to the target and renamed over it, so a failed dump
    leaves no half file; anything else (a FIFO, a device) is written in place."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        regular = True
    except OSError as error:
        raise ConfigError(f"cannot write {path}: {error.strerror}") from None
    temp = f"{path}.tmp-{os.getpid()}" if regular else path
    try:
        stream: IO[bytes] = open(temp, "wb")  # noqa: ASYNC230 - a local file, written in order
    except OSError as error:
        raise ConfigError(f"cannot write {temp}: {error.strerror}") from None
    try:
        count = await meta.dump(_Output(stream, path))
        try:
            stream.flush()
            if regular:
                os.fsync(stream.fileno())
            stream.close()
        except OSError as error:
            raise ResourceExhausted(f"dump: cannot write {path}: {error.strerror}") from None
        if regular:
            os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            stream.close()  # a failed flush fails again here, but the file is closed
        if regular:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        raise
    return count


async def _load(args) -> int:
    url = check_meta_url(args.meta_url)
    started = time.monotonic()
    if args.file == "-":
        if sys.stdin.isatty():
            raise InvalidArgument("load: name a dump FILE or pipe one into stdin")
        count = await _load_stream(url, sys.stdin.buffer, "stdin")
        where = "stdin"
    else:
        try:
            stream = open(args.file, "rb")  # noqa: ASYNC230 - read whole by json.load
        except OSError as error:
            raise ConfigError(f"cannot read {args.file}: {error.strerror}") from None
        with stream:
            count = await _load_stream(url, stream, args.file)
        where = args.file
    print(
        f"load: {count:,} inodes from {where} loaded into {shown_url(url)} "
        f"({time.monotonic() - started:.1f}s)",
        file=sys.stderr,
    )
    return 0


async def _load_stream(url: str, stream: IO[bytes], where: str) -> int:
    from cairn.meta.engine import load

    try:
        return await load(url, stream)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise InvalidArgument(f"{where} is not a Cairn dump: {error}") from None
