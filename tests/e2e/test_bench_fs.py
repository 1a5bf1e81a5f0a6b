"""`cairn bench fs`: runs end to end, on a private mount it makes and takes down itself, and
on a directory of a running mount (no timing assertions: only that it measures and reports)."""

from __future__ import annotations

import json
import os

from _mount_helpers import cairn, ok, one_line

NAMES = ("sequential write", "sequential read", "random read", "create", "stat", "unlink")


def test_bench_fs_private_mount(fuse_ready, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    out = ok(cairn("bench", "fs", "--size", "32M", "--files", "300", "--random-reads", "500",
                   "--local-dir", str(local), run_dir=tmp_path / "run", timeout=240))  # fmt: skip
    lines = out.splitlines()
    assert lines[0].startswith("cairn bench fs: 32.0 MiB file, 300 files"), out
    head = next(i for i, line in enumerate(lines) if line.startswith("test "))
    assert "cairn" in lines[head] and "local" in lines[head] and "ratio" in lines[head]
    rows = lines[head + 1 :]
    assert [r for r in rows if r.startswith(NAMES)] == rows and len(rows) == len(NAMES), out
    read = next(r for r in rows if r.startswith("sequential read"))
    assert "object store" in read  # cold: the mount's caches were emptied before
    # Everything it made is gone: the mount, its mount process, its temporary directory.
    assert os.listdir(local) == []
    with open("/proc/self/mountinfo") as f:
        assert "cairn-bench-fs-" not in f.read()


def test_bench_fs_in_a_mounted_directory(mount, tmp_path):
    (mount.path / "keep").write_bytes(b"x")
    out = ok(cairn("bench", "fs", str(mount.path), "--size", "8M", "--files", "50",
                   "--random-reads", "100", "--local-dir", str(tmp_path), "--json",
                   timeout=240))  # fmt: skip
    result = json.loads(out)
    assert [row["key"] for row in result["rows"]] == [
        "seq_write", "seq_read", "rand_read", "create", "stat", "unlink"]  # fmt: skip
    for row in result["rows"]:
        assert row["cairn"] > 0 and row["local"] > 0 and row["ratio"] > 0
    tiers = result["rows"][1]["tiers"]
    assert tiers["store_bytes"] >= 8 << 20 and tiers["requested"] == 8 << 20
    assert sorted(os.listdir(mount.path)) == ["keep"]  # its work directory is removed


def test_bench_fs_needs_a_cairn_directory(fuse_ready, tmp_path):
    line = one_line(cairn("bench", "fs", str(tmp_path), "--size", "1M", "--files", "1"))
    assert "not on a running Cairn mount" in line
