"""A real S3-compatible server for tests: moto's server in a child process on 127.0.0.1.

`s3_server` (session-scoped) starts `python -m moto.server` on a free port and stops it by
its PID; its `.url` is the endpoint. `s3_url` gives each test an s3:// URL of a bucket of
its own (created by the store's check()). moto accepts any credentials, so the fixed test
credentials only exercise the code paths that carry them.
"""

from __future__ import annotations

import http.client
import sys
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
