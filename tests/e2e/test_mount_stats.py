"""A running mount's instruments: the control channel (found through the hidden xattr),
`cairn stats`, the Prometheus endpoint, and `cairn warmup` filling, checking and emptying
the mount's own block cache."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import stat
import urllib.request
from pathlib import Path

import pytest
from _mount_helpers import cairn, ok, one_line

from cairn.fuse import control
from cairn.localstack import free_port

MiB = 1 << 20


def write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_cold(path: Path) -> bytes:
    """The file's bytes as the mount serves them: the kernel's cached pages dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, MiB):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def stats(path: Path) -> dict:
    return asyncio.run(control.request(str(path), "stats"))


def warmup(path: Path, *flags: str) -> dict:
    out = ok(cairn("warmup", str(path), *flags, "--json"))
    return json.loads(out.strip().splitlines()[-1])


def test_control_socket_is_found_from_any_path(mount, tmp_path):
    sub = mount.path / "a" / "b"
    sub.mkdir(parents=True)
    (sub / "f").write_bytes(b"x")
    socket = Path(os.fsdecode(os.getxattr(mount.path, control.CONTROL_XATTR)))
    # Beside the PID file, or (this test's paths are long) in the private fallback dir.
    assert socket.parent == mount.run_dir or socket.parent.name == f"cairn-ctl-{os.geteuid()}"
    assert socket.name.endswith(".ctl") and stat.S_ISSOCK(socket.stat().st_mode)
    assert socket.stat().st_mode & 0o777 == 0o600
    socket = str(socket)
    for path in (sub, sub / "f"):
        assert control.find_socket(str(path)) == socket
    # Hidden and not settable: it is not a stored attribute.
    assert control.CONTROL_XATTR not in os.listxattr(mount.path)
    with pytest.raises(OSError) as info:
        os.setxattr(sub / "f", control.CONTROL_XATTR, b"/elsewhere")
    assert info.value.errno == errno.EPERM
    line = one_line(cairn("stats", str(tmp_path), "--once"))
    assert "not on a running Cairn mount" in line
    ok(cairn("umount", str(mount.path), run_dir=mount.run_dir))
    assert not os.path.exists(socket)  # the mount removes its socket


def test_stats_once_shows_ops_store_cache_and_transactions(mount):
    data = random.Random(1).randbytes(5 * MiB)
    write(mount.path / "f", data)
    assert read_cold(mount.path / "f") == data
    snap = json.loads(ok(cairn("stats", str(mount.path), "--once", "--json")))
    assert snap["pid"] == mount.pid and snap["mountpoint"] == str(mount.path)
    assert snap["fuse"]["write"]["count"] >= 5 and snap["fuse"]["write"]["errors"] == 0
    assert snap["fuse"]["read"]["count"] >= 1
    assert snap["object_store"]["put"]["count"] == 2  # a 4 MiB block and a 1 MiB one
    assert snap["object_store"]["put"]["bytes"] == len(data)
    assert snap["bytes_written"] == len(data)
    assert snap["meta"]["txn"] > 0 and snap["meta"]["txn_restarts"] == 0
    cache = snap["block_cache"]
    assert cache["disk_enabled"] and cache["hits"] + cache["misses"] >= 2
    assert snap["buffered_bytes"] == 0 and snap["open_files"] == 0
    text = ok(cairn("stats", str(mount.path), "--once"))
    for word in ("FUSE", "write", "OBJECT STORE", "BLOCK CACHE", "META", "restarts"):
        assert word in text, text


def test_stats_prints_plain_lines_when_piped(mount):
    (mount.path / "f").write_bytes(b"hello")
    out = ok(cairn("stats", str(mount.path), "--interval", "0.2", "--count", "2"))
    lines = out.strip().splitlines()
    assert len(lines) == 2, out
    for line in lines:
        assert "ops" in line and "store get" in line and "cache hit" in line
        assert "\x1b" not in line  # no terminal control sequences in a pipe
    rates = [json.loads(x) for x in ok(cairn("stats", str(mount.path), "--json",
             "--interval", "0.2", "--count", "1")).splitlines()]  # fmt: skip
    assert rates[0]["rates"]["interval"] > 0.1


def test_flush_commits_buffered_writes(mount):
    fd = os.open(mount.path / "open", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * MiB)
        assert stats(mount.path)["open_files"] == 1
        asyncio.run(control.request(str(mount.path), "flush"))
        snap = stats(mount.path)
        assert snap["buffered_bytes"] == 0
        assert snap["object_store"]["put"]["count"] == 1
    finally:
        os.close(fd)


def test_metrics_endpoint(volume, mounts):
    port = free_port()
    m = mounts(volume, "--metrics-addr", f"127.0.0.1:{port}")
    data = random.Random(2).randbytes(MiB)
    write(m.path / "f", data)
    assert read_cold(m.path / "f") == data
    assert stats(m.path)["metrics_addr"] == f"127.0.0.1:{port}"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples['cairn_fuse_op_seconds_count{op="write"}'] >= 1
    assert 'cairn_fuse_op_seconds_bucket{le="0.001",op="write"}' in samples
    assert samples['cairn_object_requests_total{op="put"}'] == 1
    assert samples['cairn_object_bytes_total{op="put"}'] == len(data)
    assert 'cairn_block_cache_hits_total{tier="memory"}' in samples
    assert samples["cairn_block_cache_misses_total"] >= 1
    assert samples["cairn_meta_transactions_total"] >= 1
    assert samples["cairn_meta_txn_restarts_total"] == 0
    assert samples["cairn_open_files"] == 0


def test_bad_metrics_address_is_one_line(volume, tmp_path):
    result = cairn("mount", volume.meta_url, str(tmp_path), "--metrics-addr", "nowhere",
                   "--background", run_dir=tmp_path / "run")  # fmt: skip
    assert result.returncode == 2
    assert "host:port" in one_line(result)


def test_warmup_fills_checks_and_evicts_the_mount_cache(mount):
    data = random.Random(3).randbytes(9 * MiB)  # three blocks
    write(mount.path / "big", data)
    (mount.path / "dir" / "sub").mkdir(parents=True)
    small = b"small file" * 100
    write(mount.path / "dir" / "sub" / "small", small)
    # Written blocks go to the store only (no second write into the disk cache).
    assert warmup(mount.path / "big", "--check")["percent"] == 0.0

    result = warmup(mount.path / "big")
    assert (result["files"], result["blocks"], result["bytes"]) == (1, 3, len(data))
    assert result["fetched_bytes"] == len(data) and result["percent"] == 100.0
    assert warmup(mount.path / "big", "--check")["percent"] == 100.0
    text = ok(cairn("warmup", str(mount.path / "big")))
    assert "9.0 MiB" in text and "MiB/s" in text and "100.0% cached" in text

    before = stats(mount.path)
    assert read_cold(mount.path / "big") == data
    after = stats(mount.path)
    assert after["object_store"]["get"]["count"] == before["object_store"]["get"]["count"]
    assert after["block_cache"]["hits"] >= before["block_cache"]["hits"] + 3

    evicted = warmup(mount.path / "big", "--evict")
    assert evicted["evicted_bytes"] == len(data) and evicted["percent"] == 0.0
    line = ok(cairn("warmup", str(mount.path / "big"), "--check"))
    assert "0.0%" in line and "of 9.0 MiB cached" in line
    assert read_cold(mount.path / "big") == data
    again = stats(mount.path)
    assert again["object_store"]["get"]["count"] >= after["object_store"]["get"]["count"] + 3

    # Directories are walked; the whole mount is two files.
    tree = warmup(mount.path)
    assert tree["files"] == 2 and tree["percent"] == 100.0
    assert warmup(mount.path / "dir", "--check")["bytes"] == len(small)


def test_warmup_needs_a_cairn_mount(fuse_ready, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    line = one_line(cairn("warmup", str(tmp_path / "f")))
    assert "not on a running Cairn mount" in line
    line = one_line(cairn("warmup", str(tmp_path / "missing")))
    assert "no such file" in line
