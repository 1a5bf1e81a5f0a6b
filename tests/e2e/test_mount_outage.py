"""A mount whose Redis or object store goes away: operations wait (up to --outage-wait) and go
on when it is back, or fail with EIO after that time; the mount keeps running either way, and
what was fsync'd stays. The store is moto's S3 server behind a TCP gate the test closes."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
import s3server
from _mount_helpers import Volume, cairn, format_volume, ok, start_mount, stop_mount

from cairn import localstack

s3_server = s3server.s3_server  # moto's S3 server (tests/s3server.py), bound for pytest


@pytest.fixture
def redis(tmp_path):
    """A redis-server of this test's own (append-only, so a restart keeps the volume)."""
    servers = [localstack.start_tcp(localstack.redis_server(tmp_path / "redis"))]

    def restart():
        servers.append(localstack.start_tcp(
            localstack.redis_server(tmp_path / "redis", port=servers[0].port)))  # fmt: skip

    yield servers[0], restart
    for s in servers:
        s.stop()


def write_synced(path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced_meanwhile(path, data: bytes) -> tuple[threading.Thread, dict[str, object]]:
    """write_synced in a thread of its own; the dict gets "ok" (the seconds it took) or
    "error" (the OSError) when it ends."""
    done: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            write_synced(path, data)
            done["ok"] = time.monotonic() - started
        except OSError as error:
            done["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    return worker, done


def test_operations_wait_for_redis_to_come_back(fuse_ready, redis, tmp_path):
    server, restart = redis
    volume = format_volume(server.url, tmp_path / "objects")
    m = start_mount(volume, tmp_path / "mnt", tmp_path, "--outage-wait", "30")
    try:
        write_synced(m.path / "before", b"fsync'd before the outage")
        server.stop()
        worker, done = write_synced_meanwhile(m.path / "during", b"written while Redis was away")
        time.sleep(2)
        assert worker.is_alive(), f"the create did not wait for Redis: {done}"
        restart()
        worker.join(30)
        assert not worker.is_alive() and "ok" in done, done
        assert done["ok"] >= 1.5  # it waited for the restart
        assert (m.path / "before").read_bytes() == b"fsync'd before the outage"
        assert (m.path / "during").read_bytes() == b"written while Redis was away"
        assert m.alive()
    finally:
        stop_mount(m)
    # Remounted, both files are there: nothing fsync'd was lost.
    m = start_mount(volume, tmp_path / "mnt", tmp_path)
    try:
        assert (m.path / "during").read_bytes() == b"written while Redis was away"
    finally:
        stop_mount(m)


def test_after_the_wait_operations_fail_with_eio_and_the_mount_lives_on(
    fuse_ready, redis, tmp_path
):
    server, restart = redis
    volume = format_volume(server.url, tmp_path / "objects")
    m = start_mount(volume, tmp_path / "mnt", tmp_path, "--outage-wait", "1")
    try:
        (m.path / "kept").write_bytes(b"kept")
        server.stop()
        started = time.monotonic()
        with pytest.raises(OSError) as caught:
            (m.path / "new").write_bytes(b"x")
        assert caught.value.errno == errno.EIO
        assert time.monotonic() - started < 15
        assert m.alive() and m.mounted()
        restart()
        deadline = time.monotonic() + 15
        while True:
            try:
                (m.path / "new").write_bytes(b"after")
                break
            except OSError:
                assert time.monotonic() < deadline, "the mount did not recover"
                time.sleep(0.2)
        assert (m.path / "new").read_bytes() == b"after"
        assert (m.path / "kept").read_bytes() == b"kept"
    finally:
        stop_mount(m)


@pytest.fixture
def gated_volume(fuse_ready, redis_url, s3_server, tmp_path):
    """A volume on S3 reached through a TcpGate (up), and the gate. The store's own retries
    give up after a second, so the mount's --outage-wait is what bounds a wait."""
    gate = s3server.TcpGate(s3_server.port).up()
    url = s3server.bucket_url(gate.url, create_bucket="true", deadline="1")
    ok(cairn("format", redis_url, "vol", "--storage", url, "--trash-days", "0"))
    try:
        yield Volume(redis_url, tmp_path / "unused", "vol"), gate
    finally:
        gate.down()


def test_writes_wait_for_the_object_store_to_come_back(gated_volume, tmp_path):
    volume, gate = gated_volume
    m = start_mount(volume, tmp_path / "mnt", tmp_path, "--outage-wait", "60")
    try:
        write_synced(m.path / "before", b"fsync'd before the outage" * 1000)
        gate.down()
        worker, done = write_synced_meanwhile(
            m.path / "during", b"written while the store was away" * 1000
        )
        time.sleep(3)
        assert worker.is_alive(), f"the fsync did not wait for the store: {done}"
        gate.up()
        worker.join(60)
        assert not worker.is_alive() and "ok" in done, done
        assert done["ok"] >= 2.5  # it waited for the store
        assert m.alive()
    finally:
        stop_mount(m)
    # A new mount (empty caches) reads both files from the store: nothing fsync'd was lost.
    m = start_mount(volume, tmp_path / "again", tmp_path)
    try:
        assert (m.path / "before").read_bytes() == b"fsync'd before the outage" * 1000
        assert (m.path / "during").read_bytes() == b"written while the store was away" * 1000
    finally:
        stop_mount(m)


def test_a_store_that_stays_away_gives_eio_and_the_mount_recovers(gated_volume, tmp_path):
    volume, gate = gated_volume
    writer = start_mount(volume, tmp_path / "writer", tmp_path, "--outage-wait", "1")
    reader = start_mount(volume, tmp_path / "reader", tmp_path, "--outage-wait", "1")
    try:
        write_synced(writer.path / "kept", b"kept" * 10_000)
        gate.down()
        started = time.monotonic()
        with pytest.raises(OSError) as caught:  # not in the reader's caches: fetched
            (reader.path / "kept").read_bytes()
        assert caught.value.errno == errno.EIO
        with pytest.raises(OSError) as caught:  # the upload gives up: fsync reports it
            write_synced(writer.path / "new", b"lost with the store away")
        assert caught.value.errno == errno.EIO
        assert time.monotonic() - started < 30
        assert writer.alive() and writer.mounted() and reader.alive() and reader.mounted()
        gate.up()
        assert (reader.path / "kept").read_bytes() == b"kept" * 10_000
        write_synced(writer.path / "new", b"after the outage")
        assert (reader.path / "new").read_bytes() == b"after the outage"
    finally:
        stop_mount(reader)
        stop_mount(writer)
