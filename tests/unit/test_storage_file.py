"""The object store contract, run against the file:// backend; compression codecs; key layout.

`StoreContract` is the backend-neutral suite: tests/integration/test_storage_s3.py runs the
same class against a real S3-compatible server, so both backends are held to one behaviour.
A subclass provides a `store` fixture (an ObjectStore that passed check()).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from cairn.errors import ConfigError, InvalidArgument, NotFound, UnavailableError
from cairn.storage import (
    CODECS,
    CorruptData,
    ObjectStore,
    block_key,
    chunks_prefix,
    get_codec,
    open_store,
    parse_block_key,
    redact_url,
    slice_prefix,
)
from cairn.storage.file import OPEN_OBJECTS, TEMP_PREFIX, FileStore


async def collect(
    store: ObjectStore, prefix: str = "", start_after: str = "", page_size: int = 1000
) -> list[str]:
    return [info.key async for info in store.list(prefix, start_after, page_size)]


class StoreContract:
    """What every ObjectStore backend must do; subclasses provide the `store` fixture."""

    async def test_put_then_get_returns_the_bytes(self, store):
        await store.put("vol/a", b"hello world")
        assert await store.get("vol/a") == b"hello world"

    async def test_put_replaces_the_whole_object(self, store):
        await store.put("k", b"a long first version")
        await store.put("k", b"short")
        assert await store.get("k") == b"short"
        assert (await store.head("k")).size == 5

    async def test_binary_and_empty_objects_round_trip(self, store):
        blob = os.urandom(1 << 20)
        await store.put("bin", blob)
        await store.put("empty", b"")
        assert await store.get("bin") == blob
        assert await store.get("empty") == b""
        assert (await store.head("empty")).size == 0
        assert await store.get("empty", 0, 10) == b""

    async def test_missing_objects_are_not_found(self, store):
        with pytest.raises(NotFound):
            await store.get("nope")
        with pytest.raises(NotFound):
            await store.get("nope", 3, 4)
        with pytest.raises(NotFound):
            await store.get("nope", 0, 0)
        with pytest.raises(NotFound):
            await store.head("no/such/key")

    @pytest.mark.parametrize(
        ("offset", "length", "expected"),
        [
            (0, -1, b"0123456789"),
            (0, 4, b"0123"),
            (3, 4, b"3456"),
            (7, -1, b"789"),
            (7, 100, b"789"),
            (9, 1, b"9"),
            (10, -1, b""),
            (10, 5, b""),
            (25, 5, b""),
            (4, 0, b""),
        ],
    )
    async def test_ranged_gets(self, store, offset, length, expected):
        await store.put("digits", b"0123456789")
        assert await store.get("digits", offset, length) == expected

    async def test_bad_ranges_are_rejected(self, store):
        await store.put("digits", b"0123456789")
        with pytest.raises(InvalidArgument):
            await store.get("digits", -1, 2)
        with pytest.raises(InvalidArgument):
            await store.get("digits", 0, -2)

    async def test_head_reports_size_and_mtime(self, store):
        before = time.time()
        await store.put("a/b/c", b"x" * 1234)
        info = await store.head("a/b/c")
        assert info.key == "a/b/c"
        assert info.size == 1234
        # S3 keeps whole seconds, and the server's clock is this machine's.
        assert before - 2 <= info.mtime <= time.time() + 2

    async def test_delete_is_idempotent(self, store):
        await store.delete("never/existed")
        await store.put("gone", b"data")
        await store.delete("gone")
        await store.delete("gone")
        with pytest.raises(NotFound):
            await store.get("gone")
        assert await collect(store) == []

    async def test_list_is_sorted_paged_and_complete(self, store):
        keys = [
            block_key("vol", sid, index, 100 + index)
            for sid in (1, 2, 999, 1000, 1001, 1_000_000, 12_345_678)
            for index in (0, 1, 2)
        ]
        await asyncio.gather(*(store.put(k, b"z" * (100 + int(k[-1]))) for k in keys))
        for page_size in (1, 4, 1000):
            assert await collect(store, page_size=page_size) == sorted(keys)
        infos = [i async for i in store.list("vol/", page_size=5)]
        assert [(i.key, i.size) for i in infos] == [(k, 100 + int(k[-1])) for k in sorted(keys)]
        key, size, mtime = infos[0]  # unpacks as a tuple
        assert (key, size) == (sorted(keys)[0], 100) and mtime > 0

    async def test_list_orders_keys_bytewise_across_directories(self, store):
        # "a-b" < "a/x" < "a0": a directory sorts as "name/", as S3 sorts full keys.
        keys = ["a0", "a/x", "a-b", "a/y/z", "b", "a/x0"]
        for k in keys:
            await store.put(k, k.encode())
        assert await collect(store, page_size=2) == sorted(keys)

    async def test_list_prefix_is_a_string_prefix(self, store):
        for k in (
            "v/chunks/1/1/1_0_1",
            "v/chunks/10/10/10000000_0_1",
            "v/chunks/2/2/2_0_1",
            "v/other",
            "w/chunks/1/1/1_0_1",
        ):
            await store.put(k, b"1")
        assert await collect(store, "v/chunks/1") == [
            "v/chunks/1/1/1_0_1",
            "v/chunks/10/10/10000000_0_1",
        ]
        assert await collect(store, "v/chunks/") == [
            "v/chunks/1/1/1_0_1",
            "v/chunks/10/10/10000000_0_1",
            "v/chunks/2/2/2_0_1",
        ]
        assert await collect(store, "v/o") == ["v/other"]
        assert await collect(store, "x") == []
        assert await collect(store, "nothing/here/") == []

    async def test_list_resumes_after_a_key(self, store):
        keys = sorted(f"p/{d}/{n}" for d in ("a", "b", "c") for n in range(4))
        for k in keys:
            await store.put(k, b"")
        assert await collect(store, "p/", start_after="p/b/1", page_size=2) == [
            k for k in keys if k > "p/b/1"
        ]
        assert await collect(store, "p/", start_after="p/b") == [k for k in keys if k > "p/b"]
        assert await collect(store, start_after="p/c/3") == []
        # resuming a paged listing from its last key gives the rest, nothing twice
        first = await collect(store, "p/", page_size=5)
        assert await collect(store, "p/", start_after=first[4]) == keys[5:]

    @pytest.mark.parametrize(
        "key",
        ["", "/abs", "a//b", "a/", "../up", "a/./b", "a/../b", ".cairn-tmp-x", "d/.cairn-probe"],
    )
    async def test_invalid_keys_are_rejected(self, store, key):
        with pytest.raises(InvalidArgument):
            await store.put(key, b"x")
        with pytest.raises(InvalidArgument):
            await store.get(key)

    async def test_data_must_be_bytes(self, store):
        with pytest.raises(InvalidArgument):
            await store.put("k", "text")  # type: ignore[arg-type]
        await store.put("k", bytearray(b"ok"))
        assert await store.get("k") == b"ok"

    async def test_concurrent_puts_and_gets(self, store):
        blobs = {f"c/{i:03d}": os.urandom(1000 + i) for i in range(40)}
        await asyncio.gather(*(store.put(k, v) for k, v in blobs.items()))
        got = await asyncio.gather(*(store.get(k) for k in blobs))
        assert dict(zip(blobs, got, strict=True)) == blobs

    async def test_check_passes_twice(self, store):
        await store.check()
        await store.check()


class TestFileStore(StoreContract):
    @pytest.fixture
    async def store(self, tmp_path):
        store = open_store(f"file://{tmp_path}/objects")
        await store.check()
        yield store
        await store.close()


@pytest.fixture
async def file_store(tmp_path):
    store = open_store(f"file://{tmp_path}/objects")
    await store.check()
    yield store
    await store.close()


def leftovers(root) -> list[str]:
    return [name for _, _, names in os.walk(root) for name in names if name.startswith(TEMP_PREFIX)]


async def test_check_creates_the_directory(tmp_path):
    root = tmp_path / "deep" / "er" / "objects"
    async with open_store(f"file://{root}") as store:
        assert not root.exists()
        await store.check()
        assert root.is_dir()
        assert leftovers(root) == []


async def test_check_on_a_file_names_the_url_and_the_fix(tmp_path):
    (tmp_path / "plain").write_text("not a directory")
    async with open_store(f"file://{tmp_path}/plain") as store:
        with pytest.raises(ConfigError) as caught:
            await store.check()
    message = str(caught.value)
    assert f"file://{tmp_path}/plain" in message and "directory" in message
    assert "\n" not in message


async def test_objects_are_files_under_the_directory(file_store):
    await file_store.put("vol/chunks/0/0/1_0_5", b"hello")
    path = file_store.root / "vol" / "chunks" / "0" / "0" / "1_0_5"
    assert path.read_bytes() == b"hello"
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # readable like any data file


async def test_put_is_atomic_when_the_write_fails(file_store, monkeypatch):
    await file_store.put("k", b"old")

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(UnavailableError) as caught:  # EIO: the disk, not the request
        await file_store.put("k", b"new")
    assert "\n" not in str(caught.value) and file_store.url in str(caught.value)
    monkeypatch.undo()
    assert await file_store.get("k") == b"old"
    assert leftovers(file_store.root) == []


async def test_readers_see_old_or_new_never_torn(file_store):
    old, new = b"A" * (1 << 20), b"B" * (1 << 20)
    await file_store.put("k", old)
    stop = False

    async def writer():
        for i in range(30):
            await file_store.put("k", new if i % 2 == 0 else old)
        nonlocal stop
        stop = True

    async def reader():
        seen = 0
        while not stop:
            assert await file_store.get("k") in (old, new)
            seen += 1
        return seen

    _, seen = await asyncio.gather(writer(), reader())
    assert seen > 0


async def test_stale_temp_files_are_not_listed(file_store):
    await file_store.put("d/real", b"1")
    (file_store.root / "d" / f"{TEMP_PREFIX}real-crashed").write_bytes(b"half")
    assert await collect(file_store) == ["d/real"]


async def test_a_prefix_cannot_leave_the_directory(tmp_path):
    (tmp_path / "secret").write_bytes(b"outside")
    async with open_store(f"file://{tmp_path}/objects") as store:
        await store.check()
        assert await collect(store, "../") == []
        assert await collect(store, "../secret") == []


async def test_io_runs_in_a_bounded_pool(tmp_path, monkeypatch):
    store = open_store(f"file://{tmp_path}/o?max_workers=2")
    await store.check()
    await asyncio.gather(*(store.put(f"k{i}", b"x") for i in range(8)))
    lock, running, peak = threading.Lock(), [0], [0]
    real = FileStore._get_sync

    def slow_get(self, *args):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return real(self, *args)

    monkeypatch.setattr(FileStore, "_get_sync", slow_get)
    await asyncio.gather(*(store.get(f"k{i}") for i in range(8)))
    assert peak[0] == 2
    await store.close()


async def test_read_now_answers_small_reads_of_local_objects_at_once(file_store):
    await file_store.put("a/k", b"0123456789" * 10_000)
    assert file_store.read_now("a/k", 5, 10) == b"5678901234"
    assert file_store.read_now("a/k", 99_995, 10) == b"56789"  # cut at the end
    assert file_store.read_now("a/k", 0, file_store.inline_read + 1) is None  # get() it
    assert file_store.read_now("a/k", 0, 0) is None
    with pytest.raises(NotFound):
        file_store.read_now("a/missing", 0, 10)
    with pytest.raises(InvalidArgument):
        file_store.read_now("../k", 0, 10)


async def test_will_need_is_a_hint_that_leaves_nothing_open(file_store):
    await file_store.put("a/k", b"x" * 100_000)
    before = len(os.listdir("/proc/self/fd"))
    file_store.will_need("a/k")
    file_store.will_need("a/missing")  # a hint: the read will say NotFound, not this
    assert len(os.listdir("/proc/self/fd")) == before
    assert await file_store.get("a/k") == b"x" * 100_000


async def test_small_ranged_reads_run_in_place_and_never_read_a_replaced_object(
    tmp_path, monkeypatch
):
    store = open_store(f"file://{tmp_path}/o")
    await store.check()
    await store.put("k", b"0123456789")

    def no_pool(*args, **kwargs):
        raise AssertionError("a small ranged read went to the thread pool")

    monkeypatch.setattr(store, "_run", no_pool)
    assert await store.get("k", 2, 3) == b"234"
    assert list(store._fds) == ["k"]  # the descriptor is kept for the next read
    monkeypatch.undo()

    await store.put("k", b"abcdefghij")  # replaced: the kept descriptor goes
    assert await store.get("k", 2, 3) == b"cde"
    await store.delete("k")
    assert "k" not in store._fds
    with pytest.raises(NotFound):
        await store.get("k", 0, 4)

    for i in range(OPEN_OBJECTS + 10):
        await store.put(f"o{i}", b"x" * 10)
        assert await store.get(f"o{i}", 1, 2) == b"xx"
    assert len(store._fds) == OPEN_OBJECTS
    await store.close()
    assert store._fds == {}

    pooled = open_store(f"file://{tmp_path}/o?inline_read=0")
    await pooled.check()
    await pooled.put("k", b"0123456789")
    assert await pooled.get("k", 2, 3) == b"234"
    assert pooled._fds == {}
    await pooled.close()


async def test_fsync_can_be_turned_off(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    async with open_store(f"file://{tmp_path}/o", fsync="false") as store:
        await store.put("k", b"v")
    assert calls == []
    async with open_store(f"file://{tmp_path}/o") as store:
        await store.put("k", b"v")
    assert len(calls) == 2  # the file, then its directory


@pytest.mark.parametrize(
    "url",
    [
        "file://relative/dir",
        "file:relative",
        "ftp://host/x",
        "/just/a/path",
        "redis://127.0.0.1:6379/0",
    ],
)
def test_bad_urls_are_config_errors(url):
    with pytest.raises(ConfigError) as caught:
        open_store(url)
    assert "\n" not in str(caught.value)


def test_unknown_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="bogus"):
        open_store(f"file://{tmp_path}?bogus=1")
    with pytest.raises(ConfigError, match="max_workers"):
        open_store(f"file://{tmp_path}", max_workers="many")


def test_repr_and_messages_never_show_credentials():
    url = "s3://AKIDEXAMPLE:se/cr+et@bucket/prefix?endpoint=http://127.0.0.1:9&secret_key=zz"
    shown = redact_url(url)
    assert "AKIDEXAMPLE" not in shown and "se/cr" not in shown and "zz" not in shown
    assert shown.startswith("s3://bucket/prefix?endpoint=http://127.0.0.1:9")
    assert redact_url("file:///data/x@y/objects") == "file:///data/x@y/objects"


# -- compression ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize(
    "data",
    [b"", b"a", b"hello " * 100_000, os.urandom(300_000)],
    ids=["empty", "one", "compressible", "random"],
)
def test_codecs_round_trip(name, data):
    codec = get_codec(name)
    assert codec.name == name
    packed = codec.compress(data)
    assert isinstance(packed, bytes)
    assert codec.decompress(packed) == data


@pytest.mark.parametrize("name", ["zstd", "lz4"])
def test_codecs_shrink_compressible_data(name):
    data = b"cairn block " * 50_000
    assert len(get_codec(name).compress(data)) < len(data) // 10


@pytest.mark.parametrize("name", ["zstd", "lz4"])
def test_damaged_blocks_are_reported(name):
    codec = get_codec(name)
    packed = bytearray(codec.compress(os.urandom(10_000)))
    for damaged in (
        b"not a frame at all",
        bytes(packed[: len(packed) // 2]),
        bytes(packed[:-5]) + bytes(5 - i for i in range(5)),
    ):
        with pytest.raises(CorruptData):
            codec.decompress(damaged)
    packed[len(packed) // 2] ^= 0xFF  # a flipped bit inside the payload
    with pytest.raises(CorruptData):
        codec.decompress(bytes(packed))


def test_codec_names():
    assert get_codec(None).name == "none"
    assert get_codec(" ZSTD ").name == "zstd"
    with pytest.raises(ConfigError, match="none, zstd, lz4"):
        get_codec("brotli")


@pytest.mark.parametrize("name", ["zstd", "lz4"])
def test_codecs_are_safe_to_share_between_threads(name):
    codec = get_codec(name)
    blobs = [os.urandom(1000) + bytes([i]) * 50_000 for i in range(16)]
    results: dict[int, bool] = {}

    def work(i: int) -> None:
        ok = True
        for _ in range(20):
            ok &= codec.decompress(codec.compress(blobs[i])) == blobs[i]
        results[i] = ok

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: True for i in range(16)}


# -- key layout -----------------------------------------------------------------------

VOL = "3f1c2a8e-0000-4000-8000-00000000abcd"


@pytest.mark.parametrize(
    ("slice_id", "expected"),
    [
        (0, f"{VOL}/chunks/0/0/0_3_4194304"),
        (999, f"{VOL}/chunks/0/0/999_3_4194304"),
        (1_000, f"{VOL}/chunks/0/1/1000_3_4194304"),
        (1_234_567, f"{VOL}/chunks/1/1234/1234567_3_4194304"),
        (98_765_432_100, f"{VOL}/chunks/98765/98765432/98765432100_3_4194304"),
    ],
)
def test_block_key_layout(slice_id, expected):
    assert block_key(VOL, slice_id, 3, 4 << 20) == expected
    parsed = parse_block_key(expected)
    assert (parsed.volume, parsed.slice_id, parsed.index, parsed.size) == (
        VOL,
        slice_id,
        3,
        4 << 20,
    )
    assert parsed.key == expected and str(parsed) == expected


@pytest.mark.parametrize(
    "key",
    [
        f"{VOL}/chunks/0/0/1_0",  # no size
        f"{VOL}/chunks/0/0/1_0_5_6",
        f"{VOL}/chunks/0/0/01_0_5",  # leading zero: not how ids are written
        f"{VOL}/chunks/0/0/-1_0_5",
        f"{VOL}/chunks/0/5/1_0_5",  # in the wrong directory for its id
        f"{VOL}/chunks/0/1_0_5",
        f"{VOL}/other/0/0/1_0_5",
        "chunks/0/0/1_0_5",
        f"{VOL}/chunks/0/0/1_0_5.tmp",
    ],
)
def test_parse_rejects_other_keys(key):
    with pytest.raises(InvalidArgument):
        parse_block_key(key)


def test_prefixes():
    assert chunks_prefix(VOL) == f"{VOL}/chunks/"
    assert slice_prefix(VOL, 12) == f"{VOL}/chunks/0/0/12_"
    assert block_key(VOL, 12, 7, 10).startswith(slice_prefix(VOL, 12))
    assert not block_key(VOL, 123, 0, 10).startswith(slice_prefix(VOL, 12))
    for bad in ("", "a/b", ".."):
        with pytest.raises(InvalidArgument):
            chunks_prefix(bad)
    with pytest.raises(InvalidArgument):
        block_key(VOL, -1, 0, 1)
    # A volume seen before takes the short way; bad numbers are still refused.
    assert block_key(VOL, 5, 0, 1) == f"{VOL}/chunks/0/0/5_0_1"
    for sid, index, size in ((True, 0, 1), (1.0, 0, 1), (1, -1, 1), (1, 0, "1")):
        with pytest.raises(InvalidArgument):
            block_key(VOL, sid, index, size)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        block_key("a/b", 1, 0, 1)
