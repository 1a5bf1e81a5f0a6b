"""Cairn's event store: every state change is an event in one JetStream stream.

- envelope, codec, types: what an event is and how it travels (msgpack).
- store: EventStore, idempotent and optimistic appends, aggregate loads, replays.
- consumer: durable pull consumers with bounded, delayed redelivery.
- projection: Redis read models whose state and stream position move together.
- outbox: appends that survive a bus outage on local disk.
- jetstream: the nats-py adapter (the only module that imports nats).

Typical wiring::

    bus = await JetStreamBus.connect(nats_url)
    store = EventStore(bus)
    await store.append("volume", volume_id, [VolumeRequested(...)], expected_version=0)
"""

from cairn.events.bus import DEFAULT_STREAM, EventBus, StreamSpec
from cairn.events.codec import CodecError, decode, encode
from cairn.events.consumer import Consumer
from cairn.events.envelope import Envelope, subject_for
from cairn.events.jetstream import JetStreamBus
from cairn.events.outbox import OutboxedStore
from cairn.events.projection import Projection, VolumeStatusProjection
from cairn.events.store import (
    Appended,
    AppendInterrupted,
    AppendRequest,
    EventStore,
    History,
    Recorded,
)
from cairn.events.types import (
    Event,
    FileSystemFormatted,
    MountRecovered,
    NodeCacheReported,
    NodeCapacityReported,
    ProvisioningFailed,
    ServiceStarted,
    ServiceStopped,
    UnknownEvent,
    VolumeAttached,
    VolumeDeleted,
    VolumeDetached,
    VolumeProvisioned,
    VolumePublished,
    VolumeRequested,
    VolumeStaged,
    VolumeUnpublished,
    VolumeUnstaged,
    event,
)

__all__ = [
    "DEFAULT_STREAM",
    "AppendInterrupted",
    "AppendRequest",
    "Appended",
    "CodecError",
    "Consumer",
    "Envelope",
    "Event",
    "EventBus",
    "EventStore",
    "FileSystemFormatted",
    "History",
    "JetStreamBus",
    "MountRecovered",
    "NodeCacheReported",
    "NodeCapacityReported",
    "OutboxedStore",
    "Projection",
    "ProvisioningFailed",
    "Recorded",
    "ServiceStarted",
    "ServiceStopped",
    "StreamSpec",
    "UnknownEvent",
    "VolumeAttached",
    "VolumeDeleted",
    "VolumeDetached",
    "VolumeProvisioned",
    "VolumePublished",
    "VolumeRequested",
    "VolumeStaged",
    "VolumeStatusProjection",
    "VolumeUnpublished",
    "VolumeUnstaged",
    "decode",
    "encode",
    "event",
    "subject_for",
]
