"""One trace across two processes: over a gRPC call on a unix socket, and over a NATS message.

The test process starts the trace and calls a peer subprocess (_trace_peer.py); both write
their spans to JSON-lines span files, and the peer's spans must belong to the test's trace,
parented by the span that crossed the process boundary.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import grpc
import nats
import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context

from cairn import localstack, telemetry
from cairn.telemetry.grpc_otel import client_interceptors

PEER = Path(__file__).with_name("_trace_peer.py")
METHOD = "/cairn.test.TracePeer/Echo"


@pytest.fixture
def test_spans(tmp_path):
    """Tracing for the test process, writing to a span file of this test's own."""
    path = tmp_path / "test-spans.jsonl"
    telemetry.shutdown()  # whatever an earlier test left configured
    telemetry.setup("trace-test", span_file=str(path))
    yield path
    telemetry.shutdown()


def start_peer(tmp_path: Path, *args: str) -> tuple[localstack.Server, Path]:
    span_file = tmp_path / "peer-spans.jsonl"
    ready = tmp_path / "peer.ready"
    argv = [
        sys.executable,
        "-W",
        "error",
        str(PEER),
        *args,
        "--span-file",
        str(span_file),
        "--ready-file",
        str(ready),
    ]
    peer = localstack.Server("trace-peer", argv, tmp_path / "peer.log")
    peer.start(ready=ready.exists, timeout=30)
    return peer, span_file


def read_spans(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_span(path: Path, name: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in read_spans(path) if s["name"] == name]
        if found:
            assert len(found) == 1, found
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no span {name!r} in {path}: {read_spans(path)}")
        time.sleep(0.05)


def assert_logged(log: Path, text: str, span: dict) -> None:
    """The peer's log line names its service and the span it was written in."""
    lines = [line for line in log.read_text().splitlines() if text in line]
    assert len(lines) == 1, log.read_text()
    assert " trace-peer " in lines[0]
    assert f"trace_id={span['trace_id']} span_id={span['span_id']}" in lines[0]


def hex_ids(span: trace.Span) -> tuple[str, str]:
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


async def test_trace_continues_in_another_process_over_grpc(tmp_path, test_spans):
    sock = tmp_path / "peer.sock"
    peer, peer_spans = start_peer(tmp_path, "grpc", "--socket", str(sock))
    try:
        tracer = telemetry.tracer(__name__)
        async with grpc.aio.insecure_channel(
            f"unix:{sock}", interceptors=client_interceptors()
        ) as channel:
            echo = channel.unary_unary(METHOD)
            with tracer.start_as_current_span("test.call") as root:
                reply = await echo(b"ping", timeout=10)
    finally:
        peer.stop()
    assert peer.proc.returncode == 0, (tmp_path / "peer.log").read_text()
    trace_id, root_id = hex_ids(root)

    client = wait_for_span(test_spans, METHOD)
    assert client["kind"] == "CLIENT"
    assert (client["trace_id"], client["parent_span_id"]) == (trace_id, root_id)

    server = wait_for_span(peer_spans, METHOD)
    assert server["kind"] == "SERVER"
    assert server["trace_id"] == trace_id
    assert server["parent_span_id"] == client["span_id"]
    assert server["parent_remote"] is True
    assert server["resource"]["service.name"] == "trace-peer"

    inner = wait_for_span(peer_spans, "peer.echo")
    assert (inner["trace_id"], inner["parent_span_id"]) == (trace_id, server["span_id"])
    assert reply.decode() == f"{trace_id}:{inner['span_id']}"
    assert_logged(tmp_path / "peer.log", "echo 4 bytes", inner)


async def test_trace_continues_in_another_process_over_nats(tmp_path, test_spans, nats_url):
    subject = f"cairn.test.trace.{uuid.uuid4().hex}"
    peer, peer_spans = start_peer(tmp_path, "nats", "--nats-url", nats_url, "--subject", subject)
    try:
        tracer = telemetry.tracer(__name__)
        nc = await nats.connect(nats_url, allow_reconnect=False)
        token = otel_context.attach(baggage.set_baggage("cairn.volume", "pvc-1234"))
        try:
            with tracer.start_as_current_span(
                "test.publish", kind=trace.SpanKind.PRODUCER
            ) as sender:
                headers = telemetry.inject()
                reply = await nc.request(subject, b"hello", timeout=10, headers=headers)
        finally:
            otel_context.detach(token)
            await nc.close()
    finally:
        peer.stop()
    assert peer.proc.returncode == 0, (tmp_path / "peer.log").read_text()
    trace_id, sender_id = hex_ids(sender)
    assert "traceparent" in headers and "baggage" in headers

    handled = wait_for_span(peer_spans, "peer.handle")
    assert handled["kind"] == "CONSUMER"
    assert handled["trace_id"] == trace_id
    assert handled["parent_span_id"] == sender_id
    assert handled["parent_remote"] is True
    assert handled["attributes"]["baggage.cairn.volume"] == "pvc-1234"
    assert reply.data.decode() == f"{trace_id}:{handled['span_id']}"

    sent = wait_for_span(test_spans, "test.publish")
    assert sent["span_id"] == sender_id
    assert_logged(tmp_path / "peer.log", "message on", handled)
