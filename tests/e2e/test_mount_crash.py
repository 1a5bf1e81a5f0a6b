"""A mount process that dies (SIGKILL mid-write) or is told to stop (SIGTERM): what survives,
and that the volume stays consistent."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import subprocess
import sys

import pytest
from _mount_helpers import cairn, fusermount, ok, wait_for

WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
block = os.urandom(1 << 20)
try:
    for i in range(10_000):
        os.write(fd, block)
        if i == 2:
            print("writing", flush=True)
except OSError as e:
    print("error", e.errno, flush=True)
"""


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_sigkill_while_writing_then_remount_and_fsck(volume, mounts, tmp_path):
    m = mounts(volume, name="m")
    synced = os.urandom(9 << 20)
    fd = os.open(m.path / "synced", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, synced)
    os.fsync(fd)
    closed = os.urandom(3 << 20)
    (m.path / "closed").write_bytes(closed)  # committed by close, no fsync
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m.path / "inflight")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "writing"
        os.kill(m.pid, signal.SIGKILL)
        wait_for(lambda: not m.alive(), 10, "the mount process to die")
        out, _ = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
        with contextlib.suppress(OSError):  # the mount went away under it
            os.close(fd)
    assert out.startswith("error")  # the writer saw the mount go, and did not hang

    # A dead mount: ENOTCONN until it is unmounted.
    with pytest.raises(OSError) as info:
        os.stat(m.path)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # dead, or dying
    assert fusermount("-uz", str(m.path)).returncode == 0
    again = mounts(volume, name="again")
    assert digest(again.path / "synced") == hashlib.sha256(synced).hexdigest()
    assert digest(again.path / "closed") == hashlib.sha256(closed).hexdigest()
    size = os.stat(again.path / "inflight").st_size
    assert size % (1 << 20) == 0  # whole committed writes, or nothing

    result = cairn("fsck", volume.meta_url)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("extra", [[], ["--writeback-cache"]], ids=["plain", "writeback"])
def test_sigterm_flushes_and_unmounts(volume, mounts, tmp_path, extra):
    m = mounts(volume, *extra, name="m")
    data = os.urandom((5 << 20) + 12345)
    fd = os.open(m.path / "open-file", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)  # buffered: neither closed nor fsync'd
        os.kill(m.pid, signal.SIGTERM)
        wait_for(lambda: not m.alive(), 30, "the mount process to exit")
    finally:
        try:
            os.close(fd)
        except OSError as error:  # the mount is gone under the open file
            assert error.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED)
    assert not m.mounted()
    log = m.log_text()
    assert "unmounted after a signal" in log
    assert "Traceback" not in log and " ERROR " not in log, log
    again = mounts(volume, name="m")  # the same mountpoint, left clean
    assert os.stat(again.path / "open-file").st_size == len(data)
    assert digest(again.path / "open-file") == hashlib.sha256(data).hexdigest()
    ok(cairn("fsck", volume.meta_url))


def test_sigint_on_a_foreground_mount(volume, mounts, tmp_path):
    path = tmp_path / "fg"
    path.mkdir()
    log = open(tmp_path / "fg.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "cairn.cli.main", "mount", volume.meta_url, str(path),
         "--cache-size", "0"],
        stdout=log, stderr=log, cwd="/tmp",
    )  # fmt: skip
    try:
        wait_for(lambda: os.path.ismount(path), 30, "the foreground mount")
        (path / "f").write_bytes(b"foreground")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not os.path.ismount(path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if os.path.ismount(path):
            fusermount("-uz", str(path))
        log.close()
    text = (tmp_path / "fg.log").read_text()
    assert "Traceback" not in text, text
    again = mounts(volume, name="fg")
    assert (again.path / "f").read_bytes() == b"foreground"
