"""A real S3-compatible server for tests: moto's server in a child process on 127.0.0.1.

`s3_server` (session-scoped) starts `python -m moto.server` on a free port and stops it by
its PID; its `.url` is the endpoint. `s3_url` gives each test an s3:// URL of a bucket of
its own (created by the store's check()). moto accepts any credentials, so the fixed test
credentials only exercise the code paths that carry them.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import sys
import threading
import uuid

import pytest

from cairn import localstack

ACCESS_KEY = "cairntestkey"
SECRET_KEY = "cairn/test+secret"  # '/' and '+' as real AWS secrets have


def answers_http(port: int) -> bool:
    """True once the server answers an HTTP request (an open port is not enough)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
        finally:
            conn.close()
        return True
    except OSError:
        return False


def moto_server(data_dir, port: int | None = None) -> localstack.Server:
    """moto's S3-compatible server (not started yet)."""
    port = port or localstack.free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return localstack.Server(
        "moto-server", argv, data_dir / "moto-server.log", url=f"http://127.0.0.1:{port}", port=port
    )


def bucket_url(endpoint: str, bucket: str | None = None, prefix: str = "", **query: str) -> str:
    """An s3:// URL with the test credentials for `bucket` (a fresh name if None)."""
    bucket = bucket or f"cairn-test-{uuid.uuid4().hex[:16]}"
    path = f"/{prefix}" if prefix else ""
    params = "".join(f"&{k}={v}" for k, v in query.items())
    return f"s3://{ACCESS_KEY}:{SECRET_KEY}@{bucket}{path}?endpoint={endpoint}{params}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = moto_server(tmp_path_factory.mktemp("moto"))
    server.start(lambda: answers_http(server.port), timeout=60)
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server) -> str:
    """A URL of a bucket no other test uses; check() creates it."""
    return bucket_url(s3_server.url, create_bucket="true")


class TcpGate:
    """A TCP forwarder on 127.0.0.1 in front of `upstream_port` that a test can close and
    open again, as if the server behind it went away and came back.

    `down()` closes the listening socket (new connections are refused) and cuts every
    connection in flight; `up()` listens again on the same port. Threads only: it serves a
    client in another process (a mount) while the test blocks."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = localstack.free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> TcpGate:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by down()
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    client.close()
                    server.close()
                    return
                self._conns.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
