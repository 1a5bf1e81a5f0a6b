"""The s3:// backend against a real S3-compatible server (moto's, in a child process).

The same StoreContract the file backend passes (tests/unit/test_storage_file.py) runs here.
Failure handling is tested through FaultProxy, a small HTTP proxy in front of the server that
answers chosen requests with an S3 error (503 SlowDown, 403 AccessDenied, ...) and forwards
the rest untouched: the client really sees those status codes on the wire.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import s3server
from aiohttp import web
from s3server import ACCESS_KEY, SECRET_KEY, bucket_url
from yarl import URL

from cairn.errors import (
    ConfigError,
    DeadlineExceeded,
    NotFound,
    TemporaryError,
    UnavailableError,
)
from cairn.localstack import free_port
from cairn.storage import open_store
from cairn.storage.s3 import S3Store


def _load_contract() -> type:
    # The contract lives with the file backend's unit tests; load that module by path so
    # this works whichever test folders are on sys.path.
    path = Path(__file__).resolve().parents[1] / "unit" / "test_storage_file.py"
    spec = importlib.util.spec_from_file_location("cairn_storage_contract", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StoreContract


StoreContract = _load_contract()

# The moto fixtures (tests/s3server.py), bound here so this module runs on its own even
# where conftest does not provide them.
s3_server = s3server.s3_server
s3_url = s3server.s3_url


class TestS3Store(StoreContract):
    @pytest.fixture
    async def store(self, s3_url):
        store = open_store(s3_url)
        await store.check()
        yield store
        await store.close()


def new_bucket() -> str:
    return f"cairn-test-{uuid.uuid4().hex[:16]}"


async def make_bucket(endpoint: str, bucket: str) -> None:
    async with open_store(bucket_url(endpoint, bucket, create_bucket="true")) as store:
        await store.check()


def retries_logged(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "cairn.storage.s3" and r.getMessage().startswith("retrying")
    ]


def no_credentials_in(text: str) -> bool:
    return ACCESS_KEY not in text and SECRET_KEY not in text and "test+secret" not in text


# -- configuration --------------------------------------------------------------------


async def test_prefixes_keep_stores_apart(s3_server):
    bucket = new_bucket()
    await make_bucket(s3_server.url, bucket)
    async with (
        open_store(bucket_url(s3_server.url, bucket, "a")) as a,
        open_store(bucket_url(s3_server.url, bucket, "b/c/")) as bc,
        open_store(bucket_url(s3_server.url, bucket)) as whole,
    ):
        await a.put("k", b"in a")
        await bc.put("k", b"in b/c")
        assert await a.get("k") == b"in a"
        assert await bc.get("k") == b"in b/c"
        assert [i.key async for i in a.list()] == ["k"]
        assert [i.key async for i in bc.list(start_after="")] == ["k"]
        assert [i.key async for i in whole.list()] == ["a/k", "b/c/k"]
        assert [i.key async for i in a.list(start_after="k")] == []


async def test_missing_bucket_is_a_config_error_unless_asked_to_create(s3_server):
    bucket = new_bucket()
    async with open_store(bucket_url(s3_server.url, bucket)) as store:
        with pytest.raises(ConfigError) as caught:
            await store.check()
        message = str(caught.value)
        assert bucket in message and "create_bucket=true" in message and "\n" not in message
        with pytest.raises(ConfigError, match="does not exist"):
            await store.put("k", b"v")
    async with open_store(bucket_url(s3_server.url, bucket), create_bucket=True) as store:
        await store.check()
        await store.check()  # the bucket exists now: nothing to do
        await store.put("k", b"v")


async def test_bucket_in_another_region(s3_server):
    async with open_store(
        bucket_url(s3_server.url, region="eu-west-1", create_bucket="true")
    ) as store:
        await store.check()
        await store.put("k", b"v")
        assert await store.get("k") == b"v"


async def test_credentials_and_endpoint_from_the_environment(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    async with open_store(f"s3://{new_bucket()}/p?create_bucket=1") as store:
        assert store.endpoint == s3_server.url and store.path_style
        await store.check()
        await store.put("k", b"v")
        assert await store.get("k") == b"v"


async def test_no_credentials_at_all_is_a_config_error(s3_server, monkeypatch, tmp_path):
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    # No instance metadata service either: nothing may leave 127.0.0.1.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    async with open_store(f"s3://{new_bucket()}?endpoint={s3_server.url}") as store:
        with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
            await store.check()


@pytest.mark.parametrize(
    "url",
    [
        "s3://",
        "s3://127.0.0.1:9000/bucket",  # the server goes in ?endpoint=
        "s3://onlykey@bucket",
        "s3://bucket?endpoint=127.0.0.1:9000",
        "s3://bucket?deadline=soon",
        "s3://bucket?colour=blue",
    ],
)
def test_bad_urls_are_one_line_config_errors(url):
    with pytest.raises(ConfigError) as caught:
        open_store(url)
    assert "\n" not in str(caught.value)


async def test_credentials_never_appear_in_repr_or_errors(s3_server):
    url = bucket_url(f"http://127.0.0.1:{free_port()}", new_bucket(), "p")
    store = open_store(url, check_deadline=0.5, deadline=0.5)
    shown = [repr(store), str(store.url), store.where, repr(vars(store))]
    for call in (store.check(), store.get("k"), store.put("k", b"v")):
        with pytest.raises(TemporaryError) as caught:  # Unavailable, or DeadlineExceeded
            await call
        shown += [str(caught.value), repr(caught.value), str(caught.value.__cause__)]
    assert all(no_credentials_in(text) for text in shown), shown
    assert isinstance(store, S3Store) and store.bucket in repr(store)
    await store.close()


async def test_an_unreachable_server_fails_check_in_one_line(s3_server):
    port = free_port()
    store = open_store(bucket_url(f"http://127.0.0.1:{port}", "somebucket"), check_deadline=1)
    started = time.monotonic()
    with pytest.raises(UnavailableError) as caught:
        await store.check()
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "\n" not in message and "s3://somebucket" in message and str(port) in message
    assert "check the endpoint" in message
    await store.close()


# -- temporary errors and retries -----------------------------------------------------


class FaultProxy:
    """Forwards HTTP to `upstream`, except that chosen requests get an S3 error answer.

    `script` holds one entry per coming request: None forwards it, (status, code) answers
    with that error. `always` answers every request with an error while it is set.
    """

    _HOP = {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "expect",
        "upgrade",
        "proxy-connection",
        "te",
        "trailer",
    }

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.script: list[tuple[int, str] | None] = []
        self.always: tuple[int, str] | None = None
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status answered)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int | None = None) -> FaultProxy:
        self.port = port or free_port()
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def count(self, method: str) -> int:
        return sum(1 for m, _, _ in self.requests if m == method)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = self.always or (self.script.pop(0) if self.script else None)
        if fault is not None:
            status, code = fault
            self.requests.append((request.method, request.path, status))
            xml = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                f"<Message>injected by the test</Message></Error>"
            )
            return web.Response(status=status, body=xml.encode(), content_type="application/xml")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self._HOP}
        async with self._session.request(
            request.method,
            URL(self.upstream + request.raw_path, encoded=True),
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as answer:
            payload = await answer.read()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in self._HOP}
            self.requests.append((request.method, request.path, answer.status))
            return web.Response(status=answer.status, headers=out, body=payload)


@pytest.fixture
async def proxy(s3_server):
    proxy = await FaultProxy(s3_server.url).start()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def proxied(proxy, s3_server):
    """A store whose requests go through the proxy, for an existing bucket."""
    bucket = new_bucket()
    await make_bucket(s3_server.url, bucket)
    store = open_store(bucket_url(proxy.url, bucket), deadline=15)
    yield store
    await store.close()


async def test_temporary_errors_are_retried_until_success(proxied, proxy, caplog):
    proxy.script = [(503, "SlowDown"), (503, "ServiceUnavailable")]
    with caplog.at_level(logging.INFO, logger="cairn.storage.s3"):
        await proxied.put("k", b"payload")
    # Three PUTs on the wire, and the two retries were ours (boto's own are off).
    assert [s for m, _, s in proxy.requests if m == "PUT"] == [503, 503, 200]
    assert len(retries_logged(caplog)) == 2

    proxy.script = [(500, "InternalError"), (429, "TooManyRequests")]
    assert await proxied.get("k", 2, 3) == b"ylo"
    assert [s for m, _, s in proxy.requests if m == "GET"] == [500, 429, 206]


async def test_a_failed_page_does_not_restart_a_listing(proxied, proxy):
    keys = [f"d/{i:02d}" for i in range(7)]
    for k in keys:
        await proxied.put(k, b"x")
    proxy.requests.clear()
    proxy.script = [None, (503, "SlowDown")]  # the second page fails once
    assert [i.key async for i in proxied.list("d/", page_size=3)] == keys
    assert [s for m, _, s in proxy.requests if m == "GET"] == [200, 503, 200, 200]


async def test_permanent_errors_are_not_retried(proxied, proxy):
    proxy.script = [(403, "AccessDenied")]
    with pytest.raises(ConfigError) as caught:
        await proxied.put("k", b"v")
    message = str(caught.value)
    assert "AccessDenied" in message and "access key" in message and "\n" not in message
    assert no_credentials_in(message)
    assert proxy.count("PUT") == 1

    proxy.script = [(404, "NoSuchKey")]
    with pytest.raises(NotFound):
        await proxied.get("k")
    assert proxy.count("GET") == 1


async def test_retries_stop_at_the_deadline(s3_server, proxy):
    bucket = new_bucket()
    await make_bucket(s3_server.url, bucket)
    proxy.always = (503, "ServiceUnavailable")
    async with open_store(bucket_url(proxy.url, bucket), deadline=1) as store:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            await store.put("k", b"v")
        assert time.monotonic() - started < 5
        assert proxy.count("PUT") >= 2
        assert "503" in str(caught.value) and "\n" not in str(caught.value)


async def test_a_server_that_comes_back_is_waited_for(s3_server, caplog):
    bucket = new_bucket()
    await make_bucket(s3_server.url, bucket)
    port = free_port()
    store = open_store(bucket_url(f"http://127.0.0.1:{port}", bucket), deadline=20)
    late = FaultProxy(s3_server.url)
    with caplog.at_level(logging.INFO, logger="cairn.storage.s3"):
        put = asyncio.ensure_future(store.put("k", b"after the outage"))
        await asyncio.sleep(0.7)  # connections are refused meanwhile
        assert not put.done()
        await late.start(port)
        try:
            await put
            assert await store.get("k") == b"after the outage"
        finally:
            await late.stop()
            await store.close()
    assert any("cannot reach" in m for m in retries_logged(caplog))
