"""`cairn mount` and `cairn umount` as a user runs them: one-line errors with exit codes,
stale mountpoints, read-only and subdir mounts, busy and lazy unmounts."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time

import pytest
from _mount_helpers import (
    CAIRN,
    cairn,
    env_for,
    ok,
    one_line,
    pid_file,
    wait_for,
)

from cairn.fuse.mount import is_mounted
from cairn.localstack import free_port


def test_bad_meta_url_is_one_line(fuse_ready, tmp_path):
    result = cairn("mount", "http://127.0.0.1:1/0", str(tmp_path))
    assert result.returncode == 2
    assert "META_URL" in one_line(result)


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
def test_unreachable_redis_is_one_line(fuse_ready, tmp_path, background):
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    result = cairn("mount", url, str(tmp_path), *(["--background"] if background else []),
                   "--log", str(tmp_path / "m.log"), run_dir=tmp_path / "run")  # fmt: skip
    assert result.returncode == 69
    line = one_line(result)
    assert "unreachable" in line and "secret" not in line
    assert not is_mounted(str(tmp_path))


def test_unformatted_volume_is_one_line(fuse_ready, redis_url, tmp_path):
    result = cairn("mount", redis_url, str(tmp_path), "--background",
                   "--log", str(tmp_path / "m.log"), run_dir=tmp_path / "run")  # fmt: skip
    assert result.returncode == 2
    assert "cairn format" in one_line(result)


def test_bad_mountpoints_are_one_line(volume, mounts, tmp_path):
    result = cairn("mount", volume.meta_url, str(tmp_path / "missing"), "--background")
    assert result.returncode == 2
    assert "does not exist" in one_line(result)
    (tmp_path / "file").write_bytes(b"")
    result = cairn("mount", volume.meta_url, str(tmp_path / "file"))
    assert result.returncode == 2
    assert "not a directory" in one_line(result)
    m = mounts(volume)
    result = cairn("mount", volume.meta_url, str(m.path), "--background", run_dir=m.run_dir)
    assert result.returncode == 1
    assert "already a mount point" in one_line(result)


def test_umount_of_what_is_not_mounted_is_one_line(fuse_ready, tmp_path):
    result = cairn("umount", str(tmp_path))
    assert result.returncode == 1
    assert "not mounted" in one_line(result)


def test_umount_waits_for_the_mount_process(volume, mounts):
    m = mounts(volume)
    assert pid_file(m.run_dir, m.path).exists()
    (m.path / "f").write_bytes(b"x" * 1000)
    out = ok(cairn("umount", str(m.path), run_dir=m.run_dir))
    assert f"mount process {m.pid} exited" in out
    assert not m.alive() and not m.mounted()
    assert not pid_file(m.run_dir, m.path).exists()


def test_umount_busy_then_lazy(volume, mounts):
    m = mounts(volume)
    f = open(m.path / "held", "wb")  # noqa: SIM115 - held open across the unmounts
    try:
        f.write(b"held open")
        f.flush()
        result = cairn("umount", str(m.path), run_dir=m.run_dir)
        assert result.returncode == 1
        assert "--lazy" in one_line(result)
        assert m.mounted()
        lazy = subprocess.Popen([CAIRN, "umount", "--lazy", str(m.path)], env=env_for(m.run_dir),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        wait_for(lambda: not m.mounted(), 10, "the lazy detach")
        time.sleep(0.3)
        assert lazy.poll() is None  # waits: the process serves the open file until it closes
        f.write(b", and then closed")
    finally:
        f.close()
    out, err = lazy.communicate(timeout=30)
    assert lazy.returncode == 0, err
    assert not m.alive()
    again = mounts(volume, name="again")
    assert (again.path / "held").read_bytes() == b"held open, and then closed"


def test_stale_mountpoint_is_cleaned_by_mount(volume, mounts):
    m = mounts(volume, name="m")
    (m.path / "kept").write_bytes(b"kept")
    os.kill(m.pid, signal.SIGKILL)
    wait_for(lambda: not m.alive(), 10, "the mount process to die")
    with pytest.raises(OSError) as info:
        os.listdir(m.path)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # dead, or dying
    again = mounts(volume, name="m")  # no manual fusermount3 -uz
    assert (again.path / "kept").read_bytes() == b"kept"


def test_read_only_mount(volume, mounts):
    rw = mounts(volume, name="rw")
    (rw.path / "f").write_bytes(b"data")
    ro = mounts(volume, "--read-only", name="ro")
    assert (ro.path / "f").read_bytes() == b"data"
    for attempt in (lambda: (ro.path / "g").write_bytes(b"x"),
                    lambda: open(ro.path / "f", "ab"),
                    lambda: os.mkdir(ro.path / "d"),
                    lambda: os.unlink(ro.path / "f")):  # fmt: skip
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    with open("/proc/self/mounts") as f:
        options = next(line for line in f if f" {ro.path} " in line).split()[3]
    assert options.split(",")[0] == "ro"


def test_subdir_mount(volume, mounts):
    full = mounts(volume, name="full")
    (full.path / "team" / "inner").mkdir(parents=True)
    (full.path / "team" / "inner" / "f").write_bytes(b"team file")
    (full.path / "outside").write_bytes(b"not visible")
    sub = mounts(volume, "--subdir", "team", name="sub")
    assert sorted(os.listdir(sub.path)) == ["inner"]
    assert (sub.path / "inner" / "f").read_bytes() == b"team file"
    assert os.stat(sub.path).st_ino == 1
    assert os.path.samefile(sub.path / "inner" / ".." / "..", sub.path.parent)  # the kernel's ..
    (sub.path / "new").write_bytes(b"from sub")
    wait_for(lambda: (full.path / "team" / "new").exists(), 5, "the new file in the full mount")


def test_missing_subdir_is_one_line(volume, tmp_path):
    (tmp_path / "m").mkdir()
    result = cairn("mount", volume.meta_url, str(tmp_path / "m"), "--subdir", "nope",
                   "--background", "--log", str(tmp_path / "m.log"), run_dir=tmp_path / "run")  # fmt: skip
    assert result.returncode == 2
    assert "subdir" in one_line(result)
    assert not is_mounted(str(tmp_path / "m"))


def test_umount_finds_the_process_without_its_pid_file(volume, mounts, tmp_path):
    m = mounts(volume)
    out = ok(cairn("umount", str(m.path), run_dir=tmp_path / "elsewhere"))
    assert f"mount process {m.pid} exited" in out
    assert not m.alive()
