"""Two real mounts with the default 30 s kernel caches: what one changes, the other's kernel
forgets within a moment, because change notes invalidate its entries and attributes."""

from __future__ import annotations

import asyncio
import os
import stat
import time

from _mount_helpers import wait_for

from cairn.fuse import control

SOON = 3.0  # seconds: far below the 30 s the kernel would otherwise trust its caches


def test_the_other_kernel_forgets_what_changed(volume, mounts):
    a = mounts(volume, name="a").path
    b = mounts(volume, name="b").path
    (a / "f").write_bytes(b"one")
    wait_for(lambda: (b / "f").exists(), SOON, "a's file in b")
    assert os.stat(b / "f").st_size == 3  # b's kernel now holds the entry and attributes

    os.chmod(a / "f", 0o600)
    wait_for(lambda: stat.S_IMODE(os.stat(b / "f").st_mode) == 0o600, SOON, "chmod in b")

    (a / "f").write_bytes(b"longer contents")  # no open in b: its cached size must go
    wait_for(lambda: os.stat(b / "f").st_size == 15, SOON, "the new size in b")
    assert (b / "f").read_bytes() == b"longer contents"

    os.rename(a / "f", a / "g")
    wait_for(lambda: not (b / "f").exists(), SOON, "the old name gone in b")
    assert (b / "g").read_bytes() == b"longer contents"

    (b / "d").mkdir()
    assert not (b / "d" / "new").exists()  # b's kernel may remember that it is absent
    wait_for(lambda: (a / "d").is_dir(), SOON, "b's directory in a")
    (a / "d" / "new").write_bytes(b"x")
    wait_for(lambda: (b / "d" / "new").exists(), SOON, "a's new file in b's directory")
    os.unlink(b / "g")
    wait_for(lambda: not (a / "g").exists(), SOON, "the unlink in a")


def test_stat_of_known_files_is_answered_by_the_kernel(volume, mounts):
    m = mounts(volume, name="m")
    for i in range(200):
        (m.path / f"f{i}").write_bytes(b"")
    before = fuse_counts(m.path)
    started = time.monotonic()
    for _ in range(5):
        for i in range(200):
            os.stat(m.path / f"f{i}")
    elapsed = time.monotonic() - started
    after = fuse_counts(m.path)
    asked = sum(after[op]["count"] - before.get(op, {}).get("count", 0)
                for op in ("lookup", "getattr"))  # fmt: skip
    assert asked == 0, f"{asked} requests reached the mount for 1,000 cached stats"
    assert elapsed < 30


def fuse_counts(path) -> dict:
    return asyncio.run(control.request(str(path), "stats"))["fuse"]
