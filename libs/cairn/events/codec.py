"""Envelopes on the wire: one msgpack map per message, checked field by field on the way in.

Decoding is strict about what it needs (every envelope field, with its type) and lenient
about what it does not (extra keys from a newer writer are ignored). Anything else, from
truncated bytes to a payload that is not a map, raises CodecError: the caller treats the
message as poison instead of crashing on it.
"""

from __future__ import annotations

from typing import Any

import msgpack

from cairn.errors import InvalidArgument
from cairn.events.envelope import Envelope

FORMAT = 1  # bumped only for a change old readers cannot ignore

# Limits on what a message may unpack to, so a hostile or corrupt one cannot eat memory.
_MAX_BYTES = 8 * 1024 * 1024


class CodecError(InvalidArgument):
    """A message is not a valid Cairn event envelope (a poison message)."""


def encode(envelope: Envelope) -> bytes:
    body = {
        "format": FORMAT,
        "event_id": envelope.event_id,
        "type": envelope.type,
        "aggregate": envelope.aggregate,
        "aggregate_id": envelope.aggregate_id,
        "version": envelope.version,
        "occurred_at": float(envelope.occurred_at),
        "trace": envelope.trace,
        "payload": envelope.payload,
    }
    try:
        return msgpack.packb(body, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as error:
        raise CodecError(f"cannot encode {envelope.type} event: {error}") from None


# field -> accepted Python types after unpacking
_FIELDS: dict[str, tuple[type, ...]] = {
    "event_id": (str,),
    "type": (str,),
    "aggregate": (str,),
    "aggregate_id": (str,),
    "version": (int,),
    "occurred_at": (float, int),
    "trace": (dict,),
    "payload": (dict,),
}


def decode(data: bytes) -> Envelope:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"an event must be bytes, not {type(data).__name__}")
    if len(data) > _MAX_BYTES:
        raise CodecError(f"an event of {len(data)} bytes is larger than {_MAX_BYTES}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_no_extensions)
    except (ValueError, msgpack.exceptions.UnpackException) as error:
        raise CodecError(f"not a msgpack event: {type(error).__name__}: {error}") from None
    return _envelope(body)


def _no_extensions(code: int, data: bytes) -> None:
    raise ValueError(f"msgpack extension type {code} is not allowed in an event")


def _envelope(body: Any) -> Envelope:
    if not isinstance(body, dict):
        raise CodecError(f"an event must be a map, not {type(body).__name__}")
    fmt = body.get("format")
    if fmt != FORMAT:
        raise CodecError(f"unknown event format {fmt!r} (this reader knows {FORMAT})")
    values = {}
    for name, types in _FIELDS.items():
        if name not in body:
            raise CodecError(f"event misses its {name!r} field")
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise CodecError(f"event field {name!r} has the wrong type {type(value).__name__}")
        values[name] = value
    if values["version"] < 0:
        raise CodecError(f"event version {values['version']} is negative")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in values["trace"].items()):
        raise CodecError("event trace headers must be strings")
    if not all(isinstance(k, str) for k in values["payload"]):
        raise CodecError("event payload keys must be strings")
    values["occurred_at"] = float(values["occurred_at"])
    return Envelope(**values)
