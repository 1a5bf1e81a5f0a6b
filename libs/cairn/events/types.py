"""Cairn's events: one frozen dataclass per fact, named in the past tense.

Each class names the aggregate it belongs to (`aggregate`) and carries its payload as
fields. `@event` registers a class by name so an envelope decodes to the right class;
a type this process does not know becomes an UnknownEvent rather than an error, so an
older reader skips a newer writer's events instead of choking on them.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from cairn.events.codec import CodecError
from cairn.events.envelope import Envelope, check_aggregate

E = TypeVar("E", bound="Event")

_REGISTRY: dict[str, type[Event]] = {}

# The payload types an event field may declare, and what an unpacked value must be.
_CHECKS: dict[Any, tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    float: (float, int),
    bool: (bool,),
    dict: (dict,),
    list: (list, tuple),
}


class Event:
    """Base of every event class. Subclasses are frozen dataclasses made by `@event`."""

    aggregate: ClassVar[str]

    @classmethod
    def type_name(cls) -> str:
        return cls.__name__

    def to_payload(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_payload(cls: type[E], payload: dict[str, Any]) -> E:
        """The event from its payload; CodecError if a field is missing or mistyped."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in payload:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise CodecError(f"{cls.__name__} misses its {f.name!r} field")
                continue
            value = payload[f.name]
            wanted = _field_types(cls).get(f.name)
            if wanted and not _type_ok(value, wanted):
                raise CodecError(
                    f"{cls.__name__}.{f.name} should be {wanted}, not {type(value).__name__}"
                )
            kwargs[f.name] = list(value) if isinstance(value, tuple) else value
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event of a type this process does not know; handlers usually skip it."""

    type: str
    aggregate: str
    payload: dict[str, Any]

    def type_name(self) -> str:
        return self.type

    def to_payload(self) -> dict[str, Any]:
        return dict(self.payload)


def event(cls: type[E]) -> type[E]:
    """Class decorator: makes `cls` a frozen dataclass and registers it by name."""
    if not issubclass(cls, Event):
        raise TypeError(f"{cls.__name__} must derive from Event")
    check_aggregate(getattr(cls, "aggregate", ""))
    name = cls.__name__
    if name in _REGISTRY and _REGISTRY[name].__qualname__ != cls.__qualname__:
        raise TypeError(f"two event classes are named {name}")
    made = dataclass(frozen=True)(cls)
    _REGISTRY[name] = made
    return made


def registered() -> dict[str, type[Event]]:
    return dict(_REGISTRY)


def event_class(type_name: str) -> type[Event] | None:
    return _REGISTRY.get(type_name)


def event_from(envelope: Envelope) -> Event | UnknownEvent:
    """The typed event an envelope carries; CodecError when the payload does not fit."""
    cls = _REGISTRY.get(envelope.type)
    if cls is None:
        return UnknownEvent(envelope.type, envelope.aggregate, dict(envelope.payload))
    if cls.aggregate != envelope.aggregate:
        raise CodecError(
            f"{envelope.type} belongs to aggregate {cls.aggregate!r}, not {envelope.aggregate!r}"
        )
    return cls.from_payload(envelope.payload)


_HINTS: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        raw = typing.get_type_hints(cls)
        hints = {name: typing.get_origin(t) or t for name, t in raw.items()}
        _HINTS[cls] = hints
    return hints


def _type_ok(value: Any, wanted: Any) -> bool:
    accepted = _CHECKS.get(wanted)
    if accepted is None:
        return True  # a type the checks do not cover: trust the writer
    if wanted is not bool and isinstance(value, bool):
        return False
    return isinstance(value, accepted)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


# --- services -------------------------------------------------------------------------


@event
class ServiceStarted(Event):
    """A Cairn process started (aggregate id: its instance name, e.g. `meta@node-a`)."""

    aggregate = "service"
    service: str
    node: str = ""
    version: str = ""
    pid: int = 0


@event
class ServiceStopped(Event):
    aggregate = "service"
    service: str
    node: str = ""
    reason: str = ""


# --- volumes (aggregate id: the CSI volume id) ---------------------------------------------


@event
class VolumeRequested(Event):
    aggregate = "volume"
    name: str
    capacity_bytes: int
    volume_type: str = "shared"  # "shared" (a Cairn directory) or "local" (one node's disk)
    parameters: dict = field(default_factory=dict)
    pvc: str = ""  # namespace/name of the claim, when a provisioner asked


@event
class VolumeProvisioned(Event):
    aggregate = "volume"
    capacity_bytes: int
    path: str = ""
    node: str = ""  # set for local volumes: the node that holds the data


@event
class ProvisioningFailed(Event):
    aggregate = "volume"
    reason: str
    temporary: bool = False


@event
class VolumeDeleted(Event):
    aggregate = "volume"
    reason: str = ""


@event
class VolumeExpanded(Event):
    """The volume's capacity (its directory quota, for a shared volume) grew."""

    aggregate = "volume"
    capacity_bytes: int
    previous_bytes: int = 0


@event
class VolumeAttached(Event):
    aggregate = "volume"
    node: str


@event
class VolumeDetached(Event):
    aggregate = "volume"
    node: str


@event
class VolumeStaged(Event):
    aggregate = "volume"
    node: str
    staging_path: str
    mount_pid: int = 0


@event
class VolumePublished(Event):
    aggregate = "volume"
    node: str
    target_path: str
    read_only: bool = False


@event
class VolumeUnpublished(Event):
    aggregate = "volume"
    node: str
    target_path: str


@event
class VolumeUnstaged(Event):
    aggregate = "volume"
    node: str
    staging_path: str


@event
class MountRecovered(Event):
    """A dead mount process of a staged volume was restarted and its targets re-bound."""

    aggregate = "volume"
    node: str
    staging_path: str
    old_pid: int = 0
    new_pid: int = 0
    targets: list = field(default_factory=list)


@event
class PersistentVolumeCreated(Event):
    """cairn-provisioner wrote the PersistentVolume of a provisioned volume."""

    aggregate = "volume"
    pv: str
    pvc: str = ""  # namespace/name of the claim
    storage_class: str = ""
    node: str = ""  # WaitForFirstConsumer: the node the scheduler picked
    reclaim_policy: str = "Delete"


@event
class PersistentVolumeDeleted(Event):
    """cairn-provisioner removed a released volume's PersistentVolume (Delete policy), or
    let go of it (Retain: `volume_kept`, the data stays)."""

    aggregate = "volume"
    pv: str
    volume_kept: bool = False


# --- snapshots: events of their source volume (aggregate id: the source volume's id), so a
# volume's history shows the snapshots taken of it ------------------------------------------


@event
class SnapshotCreated(Event):
    """A copy-on-write clone of the volume's directory was taken (no data copied)."""

    aggregate = "volume"
    snapshot_id: str
    name: str
    size_bytes: int
    path: str = ""


@event
class SnapshotDeleted(Event):
    aggregate = "volume"
    snapshot_id: str


# --- nodes (aggregate id: the Kubernetes node name) ----------------------------------------


@event
class NodeCapacityReported(Event):
    aggregate = "node"
    node: str
    capacity_bytes: int
    available_bytes: int
    local_path: str = ""


@event
class NodeCacheReported(Event):
    aggregate = "node"
    node: str
    dataset: str
    cached_bytes: int
    capacity_bytes: int = 0


# --- file systems (aggregate id: the file system's uuid) ----------------------------------


@event
class FileSystemFormatted(Event):
    aggregate = "filesystem"
    name: str
    uuid: str
    storage: str  # the object store URL, password redacted
    block_size: int = 4 * 1024 * 1024
    trash_days: int = 1


# --- datasets (aggregate id: "<namespace>/<name>" of the Dataset) -------------------------
# Written by cairn-cache-syncer; node plugins follow RuntimeScaled and DatasetUnbound to know
# which datasets they cache, and report back with NodeCacheReported (dataset "<ns>/<name>").


@event
class DatasetBound(Event):
    """A CairnRuntime took the Dataset: its static PV and PVC exist (both named after the
    dataset), `mounts` are the resolved sources [{name, path, read_only, volume}], `path`
    (of the file system) the tree a pod sees."""

    aggregate = "dataset"
    runtime: str
    uid: str
    volume_handle: str
    pv: str
    pvc: str
    mounts: list = field(default_factory=list)
    read_only: bool = True


@event
class RuntimeScaled(Event):
    """The cache nodes of a dataset changed: `nodes` hold its cache, with the runtime's
    tiers [{mediumType, path, quota (bytes), high, low}]. The node plugins of `nodes` keep
    a cache directory of the dataset under each tier's path (`<path>/<ns>-<name>`)."""

    aggregate = "dataset"
    replicas: int
    nodes: list = field(default_factory=list)
    tiers: list = field(default_factory=list)
    mounts: list = field(default_factory=list)
    clean_policy: str = "OnRuntimeDeleted"


@event
class NodeLabelled(Event):
    """The syncer patched a node's labels for this dataset: `set` (key -> value) and
    `removed` (keys)."""

    aggregate = "dataset"
    node: str
    set: dict = field(default_factory=dict)
    removed: list = field(default_factory=list)


@event
class DatasetUnbound(Event):
    """The runtime went away (or the dataset is being deleted): no cache nodes, no PV/PVC,
    no labels; the node plugins drop the dataset's cache directories."""

    aggregate = "dataset"
    reason: str = ""


@event
class DatasetDeleted(Event):
    aggregate = "dataset"
    reason: str = ""


# --- data loads (aggregate id: "<namespace>/<name>" of the DataLoad) ----------------------


@event
class DataLoadStarted(Event):
    """Run `run` of a DataLoad: `assignments` maps each cache node to the dataset paths it
    loads (paths inside the dataset's tree, "/" for all of it)."""

    aggregate = "dataload"
    dataset: str  # "<ns>/<name>"
    run: int
    assignments: dict = field(default_factory=dict)


@event
class DataLoadProgressed(Event):
    """A node's progress on its share of run `run` (cumulative); `done` when it finished,
    with `error` when it failed."""

    aggregate = "dataload"
    node: str
    run: int
    files: int = 0
    bytes: int = 0
    done: bool = False
    error: str = ""


@event
class DataLoadFinished(Event):
    """Run `run` ended: phase Complete or Failed (with `reason`)."""

    aggregate = "dataload"
    run: int
    phase: str
    reason: str = ""
    files: int = 0
    bytes: int = 0
    duration_seconds: float = 0.0
