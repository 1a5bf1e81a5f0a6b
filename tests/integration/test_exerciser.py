"""The random-operations exerciser: a local directory and a cairn VFS (real redis-server,
file:// and moto's S3) must answer thousands of seeded random operations identically."""

from __future__ import annotations

import os

import pytest
import s3server

from cairn.exerciser import Divergence, LocalDirTarget, VFSTarget, run
from cairn.meta.engine import Format, format_volume
from cairn.vfs import VFS

# moto's S3 server fixtures (tests/s3server.py), bound so pytest finds them here.
s3_server = s3server.s3_server
s3_url = s3server.s3_url

BLOCK = 64 * 1024


async def open_vfs(redis_url: str, storage: str, trash_days: int = 0, **options) -> VFS:
    fmt = Format(name="exerciser", storage=storage, block_size=BLOCK, trash_days=trash_days)
    await format_volume(redis_url, fmt)
    return await VFS.open_volume(redis_url, cache_memory=64 << 20, **options)


async def exercise(tmp_path, vfs: VFS, steps: int, seed: int, check_every: int = 100):
    local = tmp_path / "local"
    local.mkdir()
    try:
        return await run(
            steps, seed, LocalDirTarget(local), VFSTarget(vfs), check_every=check_every
        )
    finally:
        await vfs.close()


async def test_exerciser_file_store(redis_url, tmp_path):
    vfs = await open_vfs(redis_url, f"file://{tmp_path}/objects?fsync=false", trash_days=1)
    result = await exercise(tmp_path, vfs, steps=3000, seed=20240611)
    assert result.steps == 3000
    assert result.checks >= 30
    # the run did touch every kind of operation, and errors as well as successes
    for op in ("create", "write", "hwrite", "hread", "rename", "link", "truncate", "rmdir"):
        assert result.ops[op] > 10, op
    assert result.errors["ENOENT"] > 0


async def test_exerciser_s3(redis_url, s3_url, tmp_path):
    vfs = await open_vfs(redis_url, s3_url)
    result = await exercise(tmp_path, vfs, steps=1000, seed=99, check_every=200)
    assert result.steps == 1000


async def test_exerciser_no_caches_small_buffer(redis_url, tmp_path):
    """No metadata caches (every answer from the engine) and a write buffer of four
    blocks, so back-pressure commits writes in the middle of handles' lives."""
    vfs = await open_vfs(
        redis_url,
        f"file://{tmp_path}/objects?fsync=false",
        attr_ttl=0,
        entry_ttl=0,
        dir_entry_ttl=0,
        buffer_size=4 * BLOCK,
    )
    await exercise(tmp_path, vfs, steps=600, seed=5)


async def test_exerciser_subdir_mount(redis_url, tmp_path):
    """Through a subdir mount, where the VFS swaps the subdir's inode with the root's."""
    vfs = await open_vfs(redis_url, f"file://{tmp_path}/objects?fsync=false")
    await vfs.mkdir(VFSTarget(vfs).ctx, 1, b"volume", 0o755)
    await vfs.close()
    vfs = await VFS.open_volume(redis_url, subdir="volume")
    await exercise(tmp_path, vfs, steps=600, seed=8)


async def test_divergence_names_seed_and_step(tmp_path):
    """Two local directories that differ from the start: the report says where."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "intruder").write_bytes(b"x")
    with pytest.raises(Divergence) as caught:
        await run(50, 3, LocalDirTarget(a), LocalDirTarget(b, name="other"), check_every=1)
    error = caught.value
    assert error.seed == 3
    assert error.step == 0
    assert "seed 3 step 0" in str(error)


async def test_two_local_dirs_agree(tmp_path):
    """The exerciser itself is deterministic: a directory against another agrees."""
    a, b = tmp_path / "a", tmp_path / "b"
    os.mkdir(a)
    os.mkdir(b)
    result = await run(300, 11, LocalDirTarget(a), LocalDirTarget(b, threaded=True))
    assert result.steps == 300
