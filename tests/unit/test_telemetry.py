"""cairn.telemetry in-process: setup, trace-aware log lines, propagation, metrics."""

from __future__ import annotations

import io
import json
import logging
import urllib.request

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider

from cairn import telemetry
from cairn.errors import ConfigError
from cairn.telemetry import grpc_otel, logs, metrics
from cairn.telemetry.logs import TraceContextFilter


@pytest.fixture
def fresh_telemetry(monkeypatch):
    """No exporters before or after the test; the root logger put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setattr(logs, "_handler", logs._handler)  # restored with the root's handlers
    telemetry.shutdown()
    yield
    telemetry.shutdown()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def local_tracer():
    """A tracer of a provider of its own: real span ids, whatever the global provider is."""
    provider = TracerProvider()
    yield provider.get_tracer("unit")
    provider.shutdown()


def spans_in(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cairn_handlers() -> list[logging.Handler]:
    return [
        h
        for h in logging.getLogger().handlers
        if any(isinstance(f, TraceContextFilter) for f in h.filters)
    ]


def test_setup_is_idempotent(tmp_path, fresh_telemetry):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    telemetry.setup("unit-svc", span_file=str(first))
    provider = trace.get_tracer_provider()
    telemetry.setup("unit-svc", span_file=str(second))
    telemetry.setup("unit-svc", log_level="DEBUG", span_file=str(second))

    assert telemetry.configured()
    assert trace.get_tracer_provider() is provider
    assert len(cairn_handlers()) == 1
    with telemetry.tracer("unit").start_as_current_span("once"):
        pass
    telemetry.shutdown()
    telemetry.shutdown()  # a second shutdown is harmless

    assert [s["name"] for s in spans_in(first)] == ["once"]  # exported once, not per setup
    assert not second.exists()
    assert not telemetry.configured()


def test_setup_after_shutdown_attaches_new_exporters(tmp_path, fresh_telemetry):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    telemetry.setup("unit-svc", span_file=str(first))
    telemetry.shutdown()
    telemetry.setup("unit-svc", otlp_endpoint=f"file://{second}")
    with telemetry.tracer("unit").start_as_current_span("after"):
        pass
    telemetry.shutdown()
    assert not first.exists()
    [span] = spans_in(second)
    assert span["name"] == "after" and span["parent_span_id"] is None
    assert span["resource"]["service.name"]  # the first setup's name: OpenTelemetry's rule
    assert len(cairn_handlers()) == 1


@pytest.mark.parametrize("endpoint", ["ftp://collector:4317", "http://", "file://"])
def test_setup_rejects_a_bad_endpoint(endpoint, fresh_telemetry):
    with pytest.raises(ConfigError):
        telemetry.setup("unit-svc", otlp_endpoint=endpoint)
    assert not telemetry.configured()


def test_setup_rejects_a_bad_log_level(fresh_telemetry):
    with pytest.raises(ConfigError, match="LOUD"):
        telemetry.setup("unit-svc", log_level="LOUD")
    assert not telemetry.configured()


def test_setup_accepts_an_otlp_endpoint_without_a_collector(fresh_telemetry):
    # Nothing listens there: setup must not block or fail; export happens in the background.
    telemetry.setup("unit-svc", otlp_endpoint="http://127.0.0.1:1")
    assert telemetry.configured()
    telemetry.shutdown()


def test_log_lines_carry_service_and_trace_ids(local_tracer, fresh_telemetry):
    out = io.StringIO()
    telemetry.configure_logging("unit-svc", "DEBUG", stream=out)
    log = logging.getLogger("cairn.unit")
    log.debug("outside any span")
    with local_tracer.start_as_current_span("work") as span:
        log.info("inside a span")
    ctx = span.get_span_context()

    outside, inside = out.getvalue().splitlines()
    assert " DEBUG unit-svc cairn.unit trace_id=- span_id=- outside any span" in outside
    assert (
        f" INFO unit-svc cairn.unit trace_id={ctx.trace_id:032x} "
        f"span_id={ctx.span_id:016x} inside a span"
    ) in inside


def test_a_record_stays_on_one_line(fresh_telemetry):
    out = io.StringIO()
    telemetry.configure_logging("unit-svc", stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("cairn.unit").exception("two\nlines")
    [line] = out.getvalue().splitlines()
    assert "two\\nlines\\nTraceback" in line and "RuntimeError: boom" in line


def test_configure_logging_replaces_its_handler(fresh_telemetry):
    first, second = io.StringIO(), io.StringIO()
    telemetry.configure_logging("a", stream=first)
    telemetry.configure_logging("b", "WARNING", stream=second)
    logging.getLogger("cairn.unit").warning("once")
    logging.getLogger("cairn.unit").info("filtered out")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1 and " b " in second.getvalue()
    assert len(cairn_handlers()) == 1
    with pytest.raises(ConfigError):
        logs.configure("b", "LOUD")


def test_inject_extract_round_trip(local_tracer):
    token = otel_context.attach(baggage.set_baggage("cairn.volume", "pvc-1"))
    try:
        with local_tracer.start_as_current_span("send") as span:
            headers = telemetry.inject()
    finally:
        otel_context.detach(token)
    sent = span.get_span_context()
    assert headers["traceparent"].startswith(f"00-{sent.trace_id:032x}-{sent.span_id:016x}-")
    assert headers["baggage"] == "cairn.volume=pvc-1"

    ctx = telemetry.extract(headers)
    got = trace.get_current_span(ctx).get_span_context()
    assert (got.trace_id, got.span_id, got.is_remote) == (sent.trace_id, sent.span_id, True)
    assert baggage.get_baggage("cairn.volume", ctx) == "pvc-1"


def test_inject_into_an_envelope_and_extract_any_case_or_bytes(local_tracer):
    envelope = {"event_id": "e1", "trace": {}}
    with local_tracer.start_as_current_span("append") as span:
        assert telemetry.inject(envelope["trace"]) is envelope["trace"]
    trace_id = span.get_span_context().trace_id
    # msgpack may hand back bytes; some NATS clients capitalise header names.
    as_bytes = {k.title(): v.encode() for k, v in envelope["trace"].items()}
    for carrier in (envelope["trace"], as_bytes):
        got = trace.get_current_span(telemetry.extract(carrier)).get_span_context()
        assert got.trace_id == trace_id


def test_nothing_to_inject_or_extract_outside_a_trace():
    assert telemetry.inject() == {}
    for carrier in ({}, None, {"traceparent": "garbage"}):
        ctx = telemetry.extract(carrier)
        assert not trace.get_current_span(ctx).get_span_context().is_valid


def test_span_from_headers_continues_the_senders_trace(local_tracer):
    with local_tracer.start_as_current_span("send") as sender:
        headers = telemetry.inject()
    with telemetry.span_from_headers(local_tracer, "receive", headers) as received:
        assert trace.get_current_span() is received
    sent, got = sender.get_span_context(), received.get_span_context()
    assert got.trace_id == sent.trace_id
    assert received.parent.span_id == sent.span_id and received.parent.is_remote
    assert received.kind is trace.SpanKind.CONSUMER
    assert not trace.get_current_span().get_span_context().is_valid  # detached afterwards


def test_span_from_headers_without_headers_starts_a_new_trace(local_tracer):
    with local_tracer.start_as_current_span("unrelated") as outer:
        with telemetry.span_from_headers(local_tracer, "receive", None) as received:
            pass
    assert received.parent is None
    assert received.get_span_context().trace_id != outer.get_span_context().trace_id


def test_grpc_interceptors():
    assert all(
        isinstance(i, grpc_otel.grpc.aio.ServerInterceptor) for i in grpc_otel.server_interceptors()
    )
    assert len(grpc_otel.client_interceptors()) == 4


def test_metric_factories_share_and_prefix():
    ops = metrics.counter("unit_test_ops_total", "ops", ["op"])
    assert metrics.counter("unit_test_ops", "ops", ["op"]) is ops
    assert metrics.counter("cairn_unit_test_ops", "ops", ["op"]) is ops
    seconds = metrics.histogram("unit_test_seconds", "latency")
    assert metrics.histogram("unit_test_seconds", "latency") is seconds
    level = metrics.gauge("unit_test_level", "level")
    ops.labels(op="read").inc(2)
    seconds.observe(0.003)
    level.set(7)
    text = metrics.exposition().decode()
    assert 'cairn_unit_test_ops_total{op="read"} 2.0' in text
    assert 'cairn_unit_test_seconds_bucket{le="0.005"} 1.0' in text
    assert "cairn_unit_test_level 7.0" in text
    with pytest.raises(ValueError):
        metrics.gauge("unit_test_ops", "not a gauge", ["op"])
    with pytest.raises(ValueError):
        metrics.counter("unit_test_ops", "other labels", ["node"])


def test_histograms_count_into_cumulative_buckets():
    latency = metrics.histogram("unit_test_op_seconds", "latency", ["op"], buckets=(0.1, 1.0))
    read = latency.labels("read")
    assert latency.labels(op="read") is read
    for value in (0.05, 0.1, 0.5, 3.0):
        read.observe(value)
    latency.labels("write").observe(2.0)
    lines = set(metrics.exposition().decode().splitlines())
    for line in (
        'cairn_unit_test_op_seconds_bucket{le="0.1",op="read"} 2.0',  # <= 0.1: 0.05 and 0.1
        'cairn_unit_test_op_seconds_bucket{le="1.0",op="read"} 3.0',
        'cairn_unit_test_op_seconds_bucket{le="+Inf",op="read"} 4.0',
        'cairn_unit_test_op_seconds_count{op="read"} 4.0',
        'cairn_unit_test_op_seconds_sum{op="read"} 3.65',
        'cairn_unit_test_op_seconds_bucket{le="1.0",op="write"} 0.0',
        'cairn_unit_test_op_seconds_count{op="write"} 1.0',
    ):
        assert line in lines, line
    with pytest.raises(ValueError):
        latency.labels("read", "extra")
    with pytest.raises(ValueError):
        latency.labels(node="n1")


def test_metrics_server_serves_and_stops():
    assert metrics.start_metrics_server("") is None
    metrics.counter("unit_test_scraped", "scraped").inc()
    server = metrics.start_metrics_server("127.0.0.1:0")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            body = r.read().decode()
    finally:
        server.stop()
    assert "cairn_unit_test_scraped_total 1.0" in body
    assert "process_cpu_seconds_total" in body or "python_info" in body


@pytest.mark.parametrize("addr", ["nope", "host:", "host:99999"])
def test_metrics_server_rejects_a_bad_address(addr):
    with pytest.raises(ConfigError):
        metrics.start_metrics_server(addr)


def test_parse_addr():
    assert metrics.parse_addr(":9100") == ("0.0.0.0", 9100)
    assert metrics.parse_addr("[::1]:9100") == ("::1", 9100)
    assert metrics.parse_addr("127.0.0.1:0") == ("127.0.0.1", 0)
