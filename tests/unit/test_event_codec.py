"""The event envelope's wire format, the event registry and subject naming."""

from __future__ import annotations

import msgpack
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from cairn.errors import InvalidArgument, PermanentError
from cairn.events import codec, types
from cairn.events.codec import CodecError
from cairn.events.envelope import Envelope, subject_for, subject_token
from cairn.events.types import (
    MountRecovered,
    NodeCacheReported,
    UnknownEvent,
    VolumePublished,
    VolumeRequested,
)


def test_round_trip_keeps_every_field():
    event = VolumeRequested(name="pvc-1", capacity_bytes=10 << 30, parameters={"type": "local"})
    envelope = Envelope.wrap(
        event, "vol-1", 3, trace={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    )
    back = codec.decode(codec.encode(envelope))
    assert back == envelope
    assert back.type == "VolumeRequested" and back.aggregate == "volume"
    assert back.event() == event


def test_envelope_stamps_id_time_and_version():
    a = Envelope.wrap(NodeCacheReported(node="n1", dataset="ds", cached_bytes=5), "n1", 1)
    b = Envelope.wrap(NodeCacheReported(node="n1", dataset="ds", cached_bytes=5), "n1", 2)
    assert a.event_id != b.event_id and len(a.event_id) == 36
    assert a.version == 1 and a.occurred_at > 1e9
    assert a.payload == {"node": "n1", "dataset": "ds", "cached_bytes": 5, "capacity_bytes": 0}


def test_lists_survive_as_lists():
    event = MountRecovered(node="n", staging_path="/s", targets=["/a", "/b"])
    back = codec.decode(codec.encode(Envelope.wrap(event, "v", 1))).event()
    assert back == event and back.targets == ["/a", "/b"]


def test_trace_context_comes_from_the_active_span():
    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("provision") as span:
        envelope = Envelope.wrap(VolumePublished(node="n", target_path="/t"), "v", 1)
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert trace_id in envelope.trace["traceparent"]
    restored = trace.get_current_span(envelope.trace_context()).get_span_context()
    assert restored.trace_id == span.get_span_context().trace_id
    provider.shutdown()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"\x93\x01\x02",  # truncated array
        b"\xd4\x01\x02",  # a msgpack extension type
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"format": 99}),
        msgpack.packb("just a string"),
    ],
)
def test_garbage_raises_codec_error(data):
    with pytest.raises(CodecError):
        codec.decode(data)


def _body(**changes):
    envelope = Envelope.wrap(VolumePublished(node="n", target_path="/t"), "v", 1)
    body = msgpack.unpackb(codec.encode(envelope))
    body.update(changes)
    return body


@pytest.mark.parametrize(
    "changes",
    [
        {"version": "1"},
        {"version": True},
        {"version": -1},
        {"payload": [1]},
        {"trace": {"traceparent": 5}},
        {"event_id": None},
        {"occurred_at": "yesterday"},
    ],
)
def test_mistyped_fields_raise_codec_error(changes):
    with pytest.raises(CodecError):
        codec.decode(msgpack.packb(_body(**changes)))


def test_missing_field_raises_codec_error():
    body = _body()
    del body["aggregate_id"]
    with pytest.raises(CodecError, match="aggregate_id"):
        codec.decode(msgpack.packb(body))


def test_codec_error_is_a_permanent_cairn_error():
    assert issubclass(CodecError, PermanentError)


def test_extra_keys_from_a_newer_writer_are_ignored():
    envelope = codec.decode(msgpack.packb(_body(priority="high")))
    assert envelope.type == "VolumePublished"


def test_unknown_type_decodes_to_unknown_event():
    body = _body(type="VolumeTeleported", payload={"to": "mars"})
    event = codec.decode(msgpack.packb(body)).event()
    assert isinstance(event, UnknownEvent)
    assert event.type == "VolumeTeleported" and event.payload == {"to": "mars"}


def test_payload_that_does_not_fit_the_class_is_a_codec_error():
    with pytest.raises(CodecError, match="target_path"):
        codec.decode(msgpack.packb(_body(payload={"node": "n"}))).event()
    with pytest.raises(CodecError, match="read_only"):
        codec.decode(
            msgpack.packb(_body(payload={"node": "n", "target_path": "/t", "read_only": "yes"}))
        ).event()


def test_event_of_the_wrong_aggregate_is_a_codec_error():
    with pytest.raises(CodecError, match="aggregate"):
        codec.decode(msgpack.packb(_body(aggregate="node"))).event()


def test_unencodable_payload_raises_codec_error():
    envelope = Envelope.wrap(
        VolumeRequested(name="x", capacity_bytes=1, parameters={"bad": object()}), "v", 1
    )
    with pytest.raises(CodecError):
        codec.encode(envelope)


def test_registry_knows_the_required_events():
    required = {
        "ServiceStarted",
        "ServiceStopped",
        "VolumeRequested",
        "VolumeProvisioned",
        "ProvisioningFailed",
        "VolumeDeleted",
        "VolumeAttached",
        "VolumeDetached",
        "VolumeStaged",
        "VolumePublished",
        "VolumeUnpublished",
        "VolumeUnstaged",
        "MountRecovered",
        "NodeCapacityReported",
        "NodeCacheReported",
        "FileSystemFormatted",
    }
    assert required <= set(types.registered())
    for name, cls in types.registered().items():
        irregular = ("Bound", "Unbound")  # past participles without -ed
        assert name.endswith(("ed", *irregular)), f"{name} is not in the past tense"
        assert cls.aggregate in {"service", "volume", "node", "filesystem", "dataset", "dataload"}


def test_events_are_frozen():
    event = VolumePublished(node="n", target_path="/t")
    with pytest.raises(AttributeError):
        event.node = "other"


def test_subject_tokens_are_safe_and_one_to_one():
    assert subject_for("volume", "pvc-12_ab") == "cairn.events.volume.pvc-12_ab"
    odd = ["a.b", "a*b", "a>b", "a b", "a%2Eb", "é", "a\nb"]
    tokens = [subject_token(i) for i in odd]
    assert len(set(tokens)) == len(odd)
    for token in tokens:
        assert not set(token) & set(".*> \n\t")
    with pytest.raises(InvalidArgument):
        subject_token("")
    with pytest.raises(InvalidArgument):
        subject_for("Volume!", "x")
