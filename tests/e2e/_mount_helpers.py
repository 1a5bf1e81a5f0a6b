"""Helpers of the real-mount tests: run the `cairn` CLI, start a background mount and always
take it down again (by its mountpoint and its PID, never by process name)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cairn.fuse.mount import is_mounted, mount_slug

BIN = Path(sys.executable).parent
CAIRN = str(BIN / "cairn")


def env_for(run_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    if run_dir is not None:
        env["CAIRN_RUN_DIR"] = str(run_dir)
    return env


def cairn(*argv: str, run_dir: Path | None = None, timeout: float = 90,
          cwd: str = "/tmp") -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run([CAIRN, *argv], capture_output=True, text=True, timeout=timeout,
                          env=env_for(run_dir), cwd=cwd, check=False)  # fmt: skip


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}{result.stdout}"
    assert "Traceback" not in result.stderr
    return result.stdout


def one_line(result: subprocess.CompletedProcess) -> str:
    """The single `cairn: ...` error line a failed command prints."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cairn: "), lines[0]
    return lines[0]


def wait_for(condition: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return False


def fusermount(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["fusermount3", *argv], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip


@dataclass
class Volume:
    meta_url: str
    store: Path
    name: str


@dataclass
class Mount:
    """A background `cairn mount` process and its mountpoint."""

    path: Path
    pid: int
    log: Path
    volume: Volume
    run_dir: Path

    def alive(self) -> bool:
        return alive(self.pid)

    def mounted(self) -> bool:
        return is_mounted(str(self.path))

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def format_volume(meta_url: str, store: Path, name: str = "vol", *extra: str) -> Volume:
    store.mkdir(parents=True, exist_ok=True)
    ok(cairn("format", meta_url, name, "--storage", f"file://{store}", "--trash-days", "0",
             *extra))  # fmt: skip
    return Volume(meta_url, store, name)


def pid_file(run_dir: Path, mountpoint: Path) -> Path:
    return run_dir / f"{mount_slug(str(mountpoint))}.pid"


def start_mount(volume: Volume, path: Path, work: Path, *extra: str) -> Mount:
    """`cairn mount --background`; returns once it answered, with the PID from its PID file."""
    try:
        path.mkdir(parents=True)
    except FileExistsError:  # (stat, as exist_ok does, fails on a dead mount)
        pass
    run_dir = work / "run"
    log = work / f"{path.name}.log"
    result = cairn("mount", volume.meta_url, str(path), "--background", "--log", str(log),
                   "--cache-dir", str(work / f"{path.name}.cache"), *extra, run_dir=run_dir)  # fmt: skip
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise AssertionError(f"cairn mount failed ({result.returncode}): {result.stderr}\n{tail}")
    pid = int(pid_file(run_dir, path).read_text().split()[0])
    assert is_mounted(str(path))
    return Mount(path, pid, log, volume, run_dir)


def stop_mount(m: Mount, timeout: float = 30) -> None:
    """Unmounts and ends the mount process however it is doing: politely first
    (fusermount3 -u, then -uz), then SIGTERM and SIGKILL by PID, then a lazy unmount of
    whatever is left."""
    try:
        if m.mounted():
            if fusermount("-u", str(m.path)).returncode != 0:
                fusermount("-uz", str(m.path))
        deadline = time.monotonic() + timeout
        while m.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not m.alive():
                break
            try:
                os.kill(m.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 10
            while m.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        if m.mounted():
            fusermount("-uz", str(m.path))
