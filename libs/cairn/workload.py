"""A visible workload for a mounted volume (the README's main job): copy a source tree,
write and read back a large file, create and list many small files, each timed and checked."""

from __future__ import annotations

import filecmp
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20


def _timed(say: Callable[[str], None], label: str, work: Callable[[], str]) -> None:
    began = time.monotonic()
    detail = work()
    say(f"  {label:32} {detail:40} {time.monotonic() - began:6.2f}s")


def run(mountpoint: Path, source_tree: Path, big_mib: int = 256, small_files: int = 1000,
        say: Callable[[str], None] = print) -> None:
    """Writes a data set into mountpoint/demo and reads it back, failing loudly on any
    difference (AssertionError)."""
    root = mountpoint / "demo"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()

    def copy_tree() -> str:
        target = root / source_tree.name
        shutil.copytree(source_tree, target, ignore=shutil.ignore_patterns("__pycache__"))
        compared = filecmp.dircmp(source_tree, target, ignore=["__pycache__"])
        assert not (compared.diff_files or compared.left_only or compared.right_only)
        count = sum(len(files) for _, _, files in os.walk(target))
        return f"{count} files, identical to the source"

    digest = hashlib.sha256()

    def write_big() -> str:
        block = os.urandom(MiB)
        with open(root / "big.bin", "wb") as out:
            for i in range(big_mib):
                chunk = block[i % 7:] + block[:i % 7]  # every MiB different
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        return f"{big_mib} MiB in 1 MiB writes, fsync'd"

    def read_big() -> str:
        check = hashlib.sha256()
        with open(root / "big.bin", "rb") as src:
            while chunk := src.read(MiB):
                check.update(chunk)
        assert check.digest() == digest.digest(), "big.bin read back differently"
        return f"{big_mib} MiB, sha256 matches"

    def small() -> str:
        folder = root / "small"
        folder.mkdir()
        for i in range(small_files):
            (folder / f"f{i:05}").write_bytes(f"file {i}\n".encode())
        names = sorted(os.listdir(folder))
        assert len(names) == small_files
        assert (folder / names[-1]).read_bytes() == f"file {small_files - 1}\n".encode()
        return f"{small_files} files created, listed, read"

    say(f"writing a data set into {root}")
    _timed(say, f"copy {source_tree.name}/", copy_tree)
    _timed(say, "write big.bin", write_big)
    _timed(say, "read big.bin", read_big)
    _timed(say, "small files", small)
