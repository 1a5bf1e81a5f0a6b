"""Fixtures of the real-mount tests: a volume formatted in the shared redis-server (emptied per
test) with a file:// store in tmp_path, and `cairn mount --background` processes that are
unmounted and stopped by PID at teardown, also when the test failed."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _mount_helpers import Mount, Volume, format_volume, start_mount, stop_mount


def _fuse_usable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not usable by this user"
    from shutil import which

    if which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


@pytest.fixture
def fuse_ready() -> None:
    reason = _fuse_usable()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def volume(fuse_ready, redis_url: str, tmp_path: Path) -> Volume:
    """A freshly formatted volume (trash off, so deletes free at once)."""
    return format_volume(redis_url, tmp_path / "store")


@pytest.fixture
def mounts(fuse_ready, tmp_path: Path, request) -> Iterator[Callable[..., Mount]]:
    """mounts(volume, *extra cairn-mount flags, name="m") -> Mount; every mount made is
    taken down at teardown. Mounts get a --cache-dir of the test's own; a test or module
    marked `no_disk_cache` gets none (--cache-size 0), as `cairn mount` on a file:// volume
    has none, so its small reads are answered in C (cairn.fuse.extents)."""
    made: list[Mount] = []
    defaults = ("--cache-size", "0") if request.node.get_closest_marker("no_disk_cache") else ()

    def make(volume: Volume, *extra: str, name: str | None = None) -> Mount:
        path = tmp_path / (name or f"mnt{len(made)}")
        m = start_mount(volume, path, tmp_path, *defaults, *extra)
        made.append(m)
        return m

    try:
        yield make
    finally:
        for m in reversed(made):
            stop_mount(m)
    # A handler that failed unexpectedly answered EIO, which a test may not notice: its
    # traceback in the mount's log fails the test here.
    problems = [
        f"{m.log}: {line}"
        for m in made
        for line in m.log_text().splitlines()
        if " ERROR " in line or "Traceback" in line
    ]
    if problems:
        pytest.fail("mount logs show errors:\n" + "\n".join(problems[:20]))


@pytest.fixture
def mount(volume: Volume, mounts: Callable[..., Mount]) -> Mount:
    """One mount of a fresh volume."""
    return mounts(volume)


@pytest.fixture
def mnt(mount: Mount) -> Path:
    """The mountpoint of one mount of a fresh volume."""
    return mount.path
