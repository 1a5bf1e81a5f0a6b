"""Starts and stops local servers (nats-server, redis-server, Cairn services) as child processes.

Used by `cairn dev up` and by the test fixtures. Every process is tracked by its PID and
stopped by that PID only, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cairn.errors import ConfigError, UnavailableError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def find_binary(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError(f"{name} not found: run ./run.sh setup (or apt-get install {name})")


@dataclass
class Server:
    """A child process and how to reach it."""

    name: str
    argv: list[str]
    log_path: Path
    url: str = ""
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, ready: Callable[[], bool], timeout: float = 20.0,
              env: dict[str, str] | None = None) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-400:].strip()
                raise UnavailableError(f"{self.name} exited at start (code "
                                       f"{self.proc.returncode}); see {self.log_path}: {tail}")
            if ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise UnavailableError(f"{self.name} did not become ready in {timeout:.0f}s; "
                               f"see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_pid(self.proc.pid, timeout)
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """SIGTERM the process with this PID, then SIGKILL after `timeout`; True if it was alive."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return True
        except ChildProcessError:  # not our child: poll for existence instead
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def nats_server(data_dir: Path, port: int | None = None, host: str = "127.0.0.1") -> Server:
    """A nats-server with JetStream storing in data_dir (not started yet)."""
    port = port or free_port(host)
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [find_binary("nats-server"), "-a", host, "-p", str(port), "-js",
            "-sd", str(data_dir / "jetstream"), "-n", f"cairn-{port}"]
    return Server("nats-server", argv, data_dir / "nats-server.log",
                  url=f"nats://{host}:{port}", port=port)


def redis_server(data_dir: Path, port: int | None = None, host: str = "127.0.0.1") -> Server:
    """A redis-server with append-only persistence in data_dir (not started yet)."""
    port = port or free_port(host)
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [find_binary("redis-server"), "--bind", host, "--port", str(port),
            "--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--protected-mode", "no", "--daemonize", "no"]
    return Server("redis-server", argv, data_dir / "redis-server.log",
                  url=f"redis://{host}:{port}/0", port=port)


def start_tcp(server: Server, host: str = "127.0.0.1", timeout: float = 20.0) -> Server:
    """Starts a server and waits until its TCP port accepts connections."""
    return server.start(lambda: port_open(host, server.port), timeout=timeout)
