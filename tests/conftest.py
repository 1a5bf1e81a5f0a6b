"""Shared fixtures: real nats-server and redis-server on free ports, stopped after the run.

Tiers live in tests/unit, tests/integration and tests/e2e; each test file's tier marker is
added from its folder, so `pytest -m unit` picks the fast tier.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cairn import localstack

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    """A nats-server with JetStream shared by the session (streams are per-test)."""
    server = localstack.start_tcp(localstack.nats_server(tmp_path_factory.mktemp("nats")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = localstack.start_tcp(localstack.redis_server(tmp_path_factory.mktemp("redis")))
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server) -> str:
    return nats_server.url


@pytest.fixture
def redis_url(redis_server) -> str:
    """The shared redis-server, emptied before each test."""
    with socket.create_connection(("127.0.0.1", redis_server.port)) as s:
        s.sendall(b"FLUSHALL\r\n")
        assert s.recv(16).startswith(b"+OK")
    return redis_server.url


@pytest.fixture
def own_nats(tmp_path):
    """A nats-server of this test's own, which the test may stop and restart."""
    server = localstack.nats_server(tmp_path / "own-nats")
    localstack.start_tcp(server)
    yield server
    server.stop()


@pytest.fixture
async def bus(nats_url):
    """A JetStream connection to the session's nats-server."""
    from cairn.events import JetStreamBus

    connection = await JetStreamBus.connect(nats_url)
    yield connection
    await connection.close()


@pytest.fixture
async def store(bus, stream_name):
    """An event store on a stream of this test's own (streams of one server may not share
    subjects, so each test gets its own subject prefix too)."""
    from cairn.events import EventStore

    return EventStore(bus, stream_name, subject_prefix=f"t.{stream_name.lower()}")


@pytest.fixture
async def events(store, tmp_path):
    """The event store behind an outbox, as services use it."""
    from cairn.events import OutboxedStore

    outboxed = OutboxedStore(store, tmp_path / "outbox")
    await outboxed.start()
    yield outboxed
    await outboxed.close()


@pytest.fixture
def stream_name(request) -> str:
    """A JetStream stream name unique to this test."""
    safe = "".join(c if c.isalnum() else "_" for c in request.node.name)[-40:]
    return f"T_{safe}_{id(request)}".upper()
