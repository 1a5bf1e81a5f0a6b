"""Everyday tools inside a real mount: cp -a and diff -r, tar, git, SQLite with concurrent
readers, mmap, rsync, dd."""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBS = ROOT / "libs"


# As `cairn mount` runs on a file:// volume: no disk cache, small reads answered in C.
pytestmark = pytest.mark.no_disk_cache


def run(*argv: str, cwd: Path | None = None, timeout: float = 120) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(cwd or "/tmp"),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip
    result = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=env, check=False)  # fmt: skip
    assert result.returncode == 0, f"{argv}: {result.stderr}{result.stdout}"
    return result.stdout


def source_tree(tmp_path: Path) -> Path:
    """A private copy of libs/ (other sessions edit the real one while we run)."""
    src = tmp_path / "src"
    shutil.copytree(LIBS, src / "libs", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
    os.symlink("libs/cairn/__init__.py", src / "link-to-init")
    os.chmod(src / "libs", 0o750)
    return src


def test_cp_a_and_diff_r(mnt, tmp_path):
    src = source_tree(tmp_path)
    run("cp", "-a", str(src), str(mnt / "copy"))
    run("diff", "-r", "--no-dereference", str(src), str(mnt / "copy"))
    for path in src.rglob("*"):
        a = os.lstat(path)
        b = os.lstat(mnt / "copy" / path.relative_to(src))
        assert (a.st_mode, a.st_size, a.st_mtime_ns) == (b.st_mode, b.st_size, b.st_mtime_ns), path
    # ...and back out again
    run("cp", "-a", str(mnt / "copy"), str(tmp_path / "back"))
    run("diff", "-r", "--no-dereference", str(src), str(tmp_path / "back"))


def test_tar_create_and_extract(mnt, tmp_path):
    src = source_tree(tmp_path)
    run("tar", "-C", str(src), "-cf", str(mnt / "src.tar"), ".")
    (mnt / "x").mkdir()
    run("tar", "-C", str(mnt / "x"), "-xpf", str(mnt / "src.tar"))
    run("diff", "-r", "--no-dereference", str(src), str(mnt / "x"))
    listing = run("tar", "-tf", str(mnt / "src.tar"))
    assert "./libs/cairn/__init__.py" in listing.splitlines()


def test_git_init_add_commit_log(mnt, tmp_path):
    repo = mnt / "repo"
    repo.mkdir()
    shutil.copytree(LIBS / "cairn" / "meta", repo / "meta",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    run("git", "init", "-q", "-b", "main", cwd=repo)
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-q", "-m", "first", cwd=repo)
    (repo / "meta" / "new.txt").write_text("second\n")
    os.rename(repo / "meta" / "keys.py", repo / "meta" / "keys_renamed.py")
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-q", "-m", "second", cwd=repo)
    log = run("git", "log", "--format=%s", cwd=repo)
    assert log.split() == ["second", "first"]
    assert run("git", "status", "--porcelain", cwd=repo) == ""
    run("git", "fsck", "--strict", cwd=repo)
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(repo), str(clone))
    assert (clone / "meta" / "new.txt").read_text() == "second\n"


def test_sqlite_with_concurrent_readers(mnt):
    path = mnt / "db.sqlite"
    db = sqlite3.connect(path, timeout=30)
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT)")
    db.commit()
    errors: list[BaseException] = []
    done = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        try:
            conn = sqlite3.connect(path, timeout=30)
            try:
                last = 0
                while not done.is_set():
                    (count,) = conn.execute("SELECT count(*) FROM t").fetchone()
                    assert count >= last  # committed rows never disappear
                    last = count
                    rows = conn.execute("SELECT id, payload FROM t ORDER BY id DESC LIMIT 5")
                    for row_id, payload in rows:
                        assert payload == f"row {row_id} " + "x" * 500
                seen.append(last)
            finally:
                conn.close()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for batch in range(20):
            with db:
                db.executemany(
                    "INSERT INTO t (id, payload) VALUES (?, ?)",
                    [(i, f"row {i} " + "x" * 500) for i in range(batch * 50, batch * 50 + 50)],
                )
    finally:
        done.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert db.execute("SELECT count(*) FROM t").fetchone() == (1000,)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    # A fresh connection (a new open of the file) sees everything.
    again = sqlite3.connect(path)
    assert again.execute("SELECT count(*) FROM t").fetchone() == (1000,)
    again.close()


def test_mmap_reads_and_shared_writes(mnt):
    path = mnt / "mapped"
    data = bytes(range(256)) * 4096 * 4  # 4 MiB: one full block
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:256] == bytes(range(256))
        assert hashlib.sha256(m).digest() == hashlib.sha256(data).digest()
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[4096:4101] = b"HELLO"
        m[-5:] = b"WORLD"
        m.flush()
    expected = bytearray(data)
    expected[4096:4101] = b"HELLO"
    expected[-5:] = b"WORLD"
    assert path.read_bytes() == bytes(expected)
    with open(path, "rb") as f:  # read(2) after the mapping is gone agrees
        f.seek(4096)
        assert f.read(5) == b"HELLO"


@pytest.mark.skipif(shutil.which("rsync") is None,
                    reason="rsync is not installed (apt-get install rsync; not in run.sh)")  # fmt: skip
def test_rsync(mnt, tmp_path):
    src = source_tree(tmp_path)
    run("rsync", "-a", f"{src}/", f"{mnt / 'r'}/")
    run("diff", "-r", "--no-dereference", str(src), str(mnt / "r"))
    (src / "libs" / "added.txt").write_text("new\n")
    out = run("rsync", "-ai", "--delete", f"{src}/", f"{mnt / 'r'}/")
    assert "added.txt" in out
    run("diff", "-r", "--no-dereference", str(src), str(mnt / "r"))


def test_dd_in_and_out(mnt, tmp_path):
    src = tmp_path / "random.bin"
    with open(src, "wb") as f:
        f.write(os.urandom(64 << 20))
    run("dd", f"if={src}", f"of={mnt / 'big'}", "bs=1M", "conv=fsync", "status=none")
    run("dd", f"if={mnt / 'big'}", f"of={tmp_path / 'back.bin'}", "bs=1M", "status=none")
    assert os.path.getsize(mnt / "big") == 64 << 20
    run("cmp", str(src), str(tmp_path / "back.bin"))
