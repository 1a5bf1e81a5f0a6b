"""The CSI Controller service of cairn-meta: volumes, snapshots, clones, expansion, capacity.

Two kinds of volume, chosen by the StorageClass parameter `type`:

- shared (the default): a directory of a Cairn file system, `<root>/<PV name>` (or what the
  `pathPattern` parameter makes of `${pvc.namespace}`, `${pvc.name}` and `${pv.name}`), with a
  directory quota equal to its capacity. Any node mounts it, with any access mode. The file
  system is cairn-meta's own (--meta-url) unless the request's secrets name one (`metaurl`);
  that URL carries a password, so it is never logged, recorded or put in an event.
- local (`type: local`): a directory on one node's disk. The node is picked here, from the
  request's topology (key `topology.csi.cairn.io/node`) and the room the node plugins
  report (capacity.NodeCapacityProjection); the node plugin makes the directory at
  NodeStage. Single-node access modes only.

Snapshots and clones are copy-on-write clones of a volume's directory (cairn.meta.clone):
new inodes naming the same slices, no data copied. Snapshots live under `/.snapshots`.

Every handler validates, looks in the catalogue for work already done, does what is
missing, and answers, so every call is idempotent. Ids are hashes of the names, so a retried
CreateVolume or CreateSnapshot finds its earlier work. A record is added in state
`creating` before any work and turned `ready` at the end; a retry after a crash finishes the
job. Calls on an id that another call of this process is working on answer ABORTED, as CSI
asks. Every change is an event (VolumeRequested, VolumeProvisioned, VolumeExpanded,
VolumeDeleted, SnapshotCreated, SnapshotDeleted) carrying the trace of the CSI call.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import posixpath
import re
import stat
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import Int64Value

from cairn.config import redact
from cairn.errors import (
    AlreadyExists,
    CairnError,
    ConflictError,
    FailedPrecondition,
    FSError,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    UnavailableError,
)
from cairn.events.types import (
    Event,
    ProvisioningFailed,
    SnapshotCreated,
    SnapshotDeleted,
    VolumeDeleted,
    VolumeExpanded,
    VolumeProvisioned,
    VolumeRequested,
)
from cairn.meta.clone import clone_tree
from cairn.meta.engine import ROOT_CTX, Meta
from cairn.rpc.gen import csi_pb2, csi_pb2_grpc
from cairn.rpc.status import handle_servicer_errors
from cairn.telemetry import propagation
from cairn_meta.capacity import NodeCapacityProjection
from cairn_meta.catalogue import (
    CREATING,
    DELETING,
    READY,
    Catalogue,
    SnapshotRecord,
    VolumeRecord,
    page,
)

log = logging.getLogger(__name__)

TOPOLOGY_KEY = "topology.csi.cairn.io/node"
DEFAULT_CAPACITY = 1 << 30
DEFAULT_ROOT = "/volumes"
SNAPSHOT_ROOT = "/.snapshots"
SECRET_META_URL = "metaurl"
PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
PV_NAME = "csi.storage.k8s.io/pv/name"
PARAMETERS = frozenset({"type", "root", "pathPattern"})
# On the root of a volume or snapshot made by cloning: whose it is, so a retry can tell its
# own finished clone from a directory that happened to be there (trusted.*: root only).
MARK = b"trusted.cairn.csi.owner"
VOLUME_ID = re.compile(r"vol-[0-9a-f]{32}")
SNAPSHOT_ID = re.compile(r"snap-[0-9a-f]{32}")
MAX_COMPONENT = 255
PAGE = 1000

Mode = csi_pb2.VolumeCapability.AccessMode
SINGLE_NODE = frozenset({
    Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY, Mode.SINGLE_NODE_SINGLE_WRITER,
    Mode.SINGLE_NODE_MULTI_WRITER,
})  # fmt: skip
RPC = csi_pb2.ControllerServiceCapability.RPC
CAPABILITIES = tuple(
    csi_pb2.ControllerServiceCapability(rpc=RPC(type=t))
    for t in (
        RPC.CREATE_DELETE_VOLUME, RPC.EXPAND_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY,
        RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.GET_SNAPSHOT, RPC.CLONE_VOLUME,
        RPC.GET_VOLUME, RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER,
    )
)  # fmt: skip


def volume_id(name: str) -> str:
    """The id of the volume named `name`: the same name always gives the same id."""
    return "vol-" + hashlib.sha256(name.encode()).hexdigest()[:32]


def snapshot_id(name: str) -> str:
    return "snap-" + hashlib.sha256(name.encode()).hexdigest()[:32]


# -- requests -------------------------------------------------------------------------------


@dataclass
class VolumeSpec:
    """What a CreateVolume request asks for, validated."""

    name: str
    kind: str
    capacity: int
    required: int
    limit: int
    parameters: dict[str, str]
    path: str = ""  # shared: the directory, absolute in the file system
    source_kind: str = ""
    source_id: str = ""


def capability_problem(cap: Any, kind: str) -> str:
    """Why a volume of `kind` cannot serve capability `cap` ("" when it can)."""
    if cap.HasField("block"):
        return "Cairn volumes are file systems: block access is not supported"
    if not cap.HasField("mount"):
        return "a volume capability needs an access type (mount)"
    mode = cap.access_mode.mode
    if mode == Mode.UNKNOWN:
        return "a volume capability needs an access mode"
    if kind == "local" and mode not in SINGLE_NODE:
        return (
            f"a local volume lives on one node: access mode {Mode.Mode.Name(mode)} is not possible"
        )
    return ""


def check_capabilities(caps: Any, kind: str) -> None:
    if not caps:
        raise InvalidArgument("volume_capabilities are required")
    for cap in caps:
        problem = capability_problem(cap, kind)
        if problem:
            raise InvalidArgument(problem)


def check_parameters(parameters: Mapping[str, str]) -> str:
    """The volume kind the parameters ask for; InvalidArgument on a parameter we do not know
    (prefixed ones, like the provisioner's csi.storage.k8s.io/..., are passed through)."""
    for key in parameters:
        if key.lower().replace("-", "").replace("_", "") == SECRET_META_URL:
            raise InvalidArgument(
                f"{key!r} belongs in the StorageClass secrets, not its parameters"
            )
        if "/" not in key and key not in PARAMETERS:
            raise InvalidArgument(
                f"unknown parameter {key!r} (known: {', '.join(sorted(PARAMETERS))})"
            )
    kind = parameters.get("type", "shared")
    if kind not in ("shared", "local"):
        raise InvalidArgument(f"parameter type must be shared or local, not {kind!r}")
    return kind


def capacity_range(rng: Any) -> tuple[int, int, int]:
    """(capacity to give, required, limit) of a CapacityRange."""
    required, limit = rng.required_bytes, rng.limit_bytes
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range must not be negative")
    if limit and required > limit:
        raise OutOfRange(f"required_bytes {required} is above limit_bytes {limit}")
    if required:
        return required, required, limit
    return (min(DEFAULT_CAPACITY, limit) if limit else DEFAULT_CAPACITY), required, limit


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


def _component(text: str, what: str) -> str:
    """One safe path component: unusual characters become '-', and it may not be empty or
    start with '.', so no value can climb out of the volumes root or hide in it."""
    cleaned = _UNSAFE.sub("-", text)[:MAX_COMPONENT]
    if not cleaned or cleaned.startswith("."):
        raise InvalidArgument(f"{what} makes an unusable path component {cleaned!r}")
    return cleaned


def volume_path(name: str, parameters: Mapping[str, str]) -> str:
    """The directory of a shared volume: `root` (default /volumes) and the PV name, or the
    `pathPattern` with its placeholders filled in, every component sanitised."""
    root = parameters.get("root", DEFAULT_ROOT)
    if not root.startswith("/"):
        raise InvalidArgument(f"parameter root must be an absolute path, not {root!r}")
    parts = [p for p in root.split("/") if p]
    if not parts or any(_component(p, "parameter root") != p for p in parts):
        raise InvalidArgument(
            f"parameter root {root!r} must name a directory below the file system's root, "
            "in letters, digits, '.', '_' and '-', no component starting with '.'"
        )
    pattern = parameters.get("pathPattern")
    if not pattern:
        return "/" + "/".join(parts + [_component(name, "the volume name")])
    values = {
        "pvc.name": parameters.get(PVC_NAME, ""),
        "pvc.namespace": parameters.get(PVC_NAMESPACE, ""),
        "pv.name": parameters.get(PV_NAME) or name,
    }

    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise InvalidArgument(f"pathPattern: unknown placeholder ${{{key}}}")
        if not values[key]:
            raise InvalidArgument(
                f"pathPattern uses ${{{key}}} but the request does not say it "
                "(run the provisioner with --extra-create-metadata)"
            )
        return _component(values[key], f"${{{key}}}")

    text = _PLACEHOLDER.sub(fill, pattern)
    rel = [_component(p, "pathPattern") for p in text.split("/") if p]
    if not rel:
        raise InvalidArgument("pathPattern makes an empty path")
    return "/" + "/".join(parts + rel)


def node_of(topology: Any) -> str:
    return topology.segments.get(TOPOLOGY_KEY, "")


def candidate_nodes(req: Any, rooms: dict[str, int]) -> list[str]:
    """Nodes a local volume may go to, best first: the preferred ones in their order, then
    the rest by most room. With requisite topologies only the nodes they name qualify (a
    topology without the node key names none)."""
    by_room = sorted(rooms, key=lambda n: (-rooms[n], n))
    preferred = [node_of(t) for t in req.preferred if node_of(t)]
    if req.requisite:
        allowed = {node_of(t) for t in req.requisite} - {""}
        order = [n for n in preferred if n in allowed]
        order += sorted(allowed - set(order), key=lambda n: (-rooms.get(n, 0), n))
    else:
        order = preferred + by_room
    seen: set[str] = set()
    return [n for n in order if n in rooms and not (n in seen or seen.add(n))]


# -- file systems ---------------------------------------------------------------------------


def _scrub(message: str, url: str) -> str:
    """A message about `url` with the URL and its password taken out."""
    parts = urlsplit(url)
    shown = redact(url) if parts.scheme and parts.hostname else "(not a URL)"
    message = message.replace(url, shown)
    if parts.password:
        message = message.replace(parts.password, "***")
    return message


class FileSystems:
    """The Cairn file systems shared volumes live in: cairn-meta's own and those named by
    requests' secrets, each opened once and kept (by URL, in memory only)."""

    def __init__(self, default_url: str):
        self.default_url = default_url
        self._open: dict[str, Meta] = {}
        self._lock = asyncio.Lock()

    async def get(self, secrets: Mapping[str, str]) -> tuple[Meta, str]:
        """(the file system, "default" | "secret") for a request's secrets."""
        url = secrets.get(SECRET_META_URL, "")
        ref = "secret" if url else "default"
        url = url or self.default_url
        async with self._lock:
            meta = self._open.get(url)
            if meta is None:
                try:
                    meta = await Meta.open(url)
                except CairnError as error:
                    if ref == "default":
                        raise
                    cls = UnavailableError if error.temporary else FailedPrecondition
                    raise cls(
                        "the file system named by the secret 'metaurl': " + _scrub(str(error), url)
                    ) from None
                self._open[url] = meta
        return meta, ref

    async def of(self, record: VolumeRecord | SnapshotRecord, secrets: Mapping[str, str]) -> Meta:
        """The file system holding a recorded volume or snapshot."""
        if record.meta == "secret" and not secrets.get(SECRET_META_URL):
            raise FailedPrecondition(
                f"{record.name} lives on a file system named by secrets: "
                "the call needs them (the StorageClass's provisioner secret)"
            )
        meta, _ = await self.get(secrets if record.meta == "secret" else {})
        if record.fs_uuid and meta.fmt.uuid != record.fs_uuid:
            raise FailedPrecondition(
                f"{record.name} lives on file system {record.fs_uuid}, not on {meta.fmt.uuid}"
            )
        return meta

    async def close(self) -> None:
        async with self._lock:
            metas, self._open = list(self._open.values()), {}
        for meta in metas:
            await meta.close()


def _fs_error(error: CairnError, what: str = "") -> CairnError:
    """The CSI-meaningful error for a file system error (others unchanged)."""
    if not isinstance(error, FSError):
        return error
    reason = f"{what}: {error}" if what else str(error)
    if error.errno in (errno.EDQUOT, errno.ENOSPC):
        return ResourceExhausted(reason)
    if error.errno in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT):
        return FailedPrecondition(reason)
    return error


@contextlib.contextmanager
def fs_errors(what: str):
    """File system errors of a controller action, as the CSI codes that mean them."""
    try:
        yield
    except FSError as error:
        mapped = _fs_error(error, what)
        if mapped is error:
            raise
        raise mapped from None


async def make_dirs(meta: Meta, path: str, mode: int = 0o755) -> int:
    """The inode of directory `path`, made (with its parents) where missing."""
    ino = 1
    for part in [p for p in path.split("/") if p]:
        name = part.encode()
        try:
            ino, _ = await meta.mkdir(ROOT_CTX, ino, name, mode)
        except FSError as error:
            if error.errno != errno.EEXIST:
                raise
            ino, attr = await meta.lookup(ROOT_CTX, ino, name)
            if not attr.is_dir():
                raise FSError(errno.ENOTDIR, f"{path}: {part} is not a directory") from None
    return ino


async def lookup_path(meta: Meta, path: str) -> int | None:
    """The inode at `path` (symlinks not followed), or None when there is none."""
    try:
        ino, _ = await meta.resolve(ROOT_CTX, path.encode(), follow=False)
    except FSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise
    return ino


async def remove_tree(meta: Meta, path: str) -> None:
    """Removes `path` and everything below it through the engine, so files go to the trash
    (for the file system's trash_days). Safe to repeat; a missing path is done."""
    parent = await lookup_path(meta, posixpath.dirname(path) or "/")
    if parent is None:
        return
    stack = [(parent, posixpath.basename(path).encode())]
    while stack:
        where, name = stack[-1]
        try:
            ino, attr = await meta.lookup(ROOT_CTX, where, name)
            if not attr.is_dir():
                await meta.unlink(ROOT_CTX, where, name)
                stack.pop()
                continue
            entries = await meta.readdir(ROOT_CTX, ino, limit=PAGE)
            if not entries:
                await meta.rmdir(ROOT_CTX, where, name)
                stack.pop()
                continue
        except FSError as error:
            if error.errno != errno.ENOENT:
                raise
            stack.pop()
            continue
        for e in entries:
            if e.type == stat.S_IFDIR:
                stack.append((ino, e.name))
                continue
            try:
                await meta.unlink(ROOT_CTX, ino, e.name)
            except FSError as error:
                if error.errno != errno.ENOENT:
                    raise


async def read_mark(meta: Meta, ino: int) -> str:
    try:
        return (await meta.getxattr(ROOT_CTX, ino, MARK)).decode()
    except FSError:
        return ""


# -- the service ----------------------------------------------------------------------------


@handle_servicer_errors
class Controller(csi_pb2_grpc.ControllerServicer):
    """CSI Controller: see the module docstring."""

    def __init__(
        self,
        catalogue: Catalogue,
        filesystems: FileSystems,
        events: Any,
        capacity: NodeCapacityProjection | None = None,
    ):
        self.catalogue = catalogue
        self.fs = filesystems
        self.events = events
        self.capacity = capacity
        self._busy: set[str] = set()
        self._placing = asyncio.Lock()

    # -- capabilities -------------------------------------------------------------------

    async def ControllerGetCapabilities(self, request, context):
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=CAPABILITIES)

    # -- volumes --------------------------------------------------------------------------

    async def CreateVolume(self, request, context):
        spec = self._volume_spec(request)
        trace = propagation.inject()
        vid = volume_id(spec.name)
        async with self._exclusive(vid, spec.source_id):
            record = await self.catalogue.volumes.get(vid)
            if record is not None:
                self._check_compatible(vid, record, spec, request)
                if record.state == READY:
                    return csi_pb2.CreateVolumeResponse(volume=self._volume(vid, record))
            if spec.kind == "local":
                record = await self._create_local(vid, spec, request, trace)
            else:
                record = await self._create_shared(vid, spec, request, trace)
        log.info("volume %s (%s) ready: %s, %d bytes", vid, spec.name, spec.kind, record.capacity)
        return csi_pb2.CreateVolumeResponse(volume=self._volume(vid, record))

    def _volume_spec(self, request: Any) -> VolumeSpec:
        if not request.name:
            raise InvalidArgument("name is required")
        kind = check_parameters(request.parameters)
        check_capabilities(request.volume_capabilities, kind)
        if request.mutable_parameters:
            raise InvalidArgument("mutable_parameters are not supported (no MODIFY_VOLUME)")
        capacity, required, limit = capacity_range(request.capacity_range)
        parameters = dict(request.parameters)
        spec = VolumeSpec(request.name, kind, capacity, required, limit, parameters)
        source = request.volume_content_source
        if request.HasField("volume_content_source"):
            if kind == "local":
                raise InvalidArgument("local volumes cannot start from a snapshot or a volume")
            spec.source_kind = source.WhichOneof("type") or ""
            if spec.source_kind == "snapshot":
                spec.source_id = source.snapshot.snapshot_id
            elif spec.source_kind == "volume":
                spec.source_id = source.volume.volume_id
            if not spec.source_id:
                raise InvalidArgument("volume_content_source names no snapshot or volume")
        if kind == "shared":
            spec.path = volume_path(request.name, parameters)
        return spec

    def _check_compatible(self, vid: str, record: VolumeRecord, spec: VolumeSpec, request) -> None:
        """AlreadyExists unless the recorded volume of this name is what the request asks."""
        if record.state == DELETING:
            raise ConflictError(f"volume {vid} ({spec.name}) is being deleted")
        differ = []
        if record.kind != spec.kind:
            differ.append(f"type ({record.kind})")
        if (spec.required and record.capacity < spec.required) or (
            spec.limit and record.capacity > spec.limit
        ):
            differ.append(f"capacity ({record.capacity} bytes)")
        if (record.source_kind, record.source_id) != (spec.source_kind, spec.source_id):
            differ.append("content source")
        if record.kind == "shared" and (record.meta == "secret") != bool(
            request.secrets.get(SECRET_META_URL)
        ):
            differ.append(f"file system ({record.meta})")
        if _own(record.parameters) != _own(spec.parameters):
            differ.append("parameters")
        if record.kind == "local" and request.accessibility_requirements.requisite:
            allowed = {node_of(t) for t in request.accessibility_requirements.requisite}
            if record.node not in allowed:
                differ.append(f"node ({record.node})")
        if differ:
            raise AlreadyExists(f"volume {spec.name!r} exists with another {', '.join(differ)}")

    async def _create_shared(self, vid: str, spec: VolumeSpec, request, trace) -> VolumeRecord:
        meta, ref = await self.fs.get(request.secrets)
        source_ino = await self._content_source(spec, meta)
        if meta.fmt.capacity and spec.capacity > meta.fmt.capacity:
            raise OutOfRange(
                f"{spec.capacity} bytes is more than the file system holds ({meta.fmt.capacity})"
            )
        owner = await self.catalogue.path_owner(spec.path, meta.fmt.uuid)
        if owner and owner != vid:
            raise AlreadyExists(f"directory {spec.path} is already volume {owner}")
        if source_ino is not None:
            there = await lookup_path(meta, spec.path)
            if there is not None and await read_mark(meta, there) != vid:
                raise FailedPrecondition(f"{spec.path} exists and is not this volume's clone")
        record, new = await self.catalogue.volumes.add(vid, VolumeRecord(
            name=spec.name, kind="shared", capacity=spec.capacity, path=spec.path,
            created_at=time.time(), parameters=spec.parameters, state=CREATING,
            fs_uuid=meta.fmt.uuid, fs_name=meta.fmt.name, meta=ref,
            source_kind=spec.source_kind, source_id=spec.source_id,
        ))  # fmt: skip
        if not new:  # another process got there first
            self._check_compatible(vid, record, spec, request)
            if record.state == READY:
                return record
        else:
            await self._emit("volume", vid, VolumeRequested(
                name=spec.name, capacity_bytes=spec.capacity, volume_type="shared",
                parameters=spec.parameters, pvc=_pvc(spec.parameters),
            ), trace)  # fmt: skip
        with fs_errors(f"volume {spec.name}"):
            try:
                ino = await self._volume_dir(meta, vid, record.path, source_ino)
            except CairnError as error:
                await self._abandon(vid, error, trace)
                raise
            await meta.set_quota(ROOT_CTX, ino, space=record.capacity)
            quota = await meta.get_quota(ino)
        await self._emit("volume", vid, VolumeProvisioned(
            capacity_bytes=record.capacity, path=record.path), trace)  # fmt: skip
        record.state = READY
        record.used_bytes, record.used_inodes = quota.used_space, quota.used_inodes
        await self.catalogue.volumes.put(vid, record)
        return record

    async def _abandon(self, vid: str, error: CairnError, trace: dict) -> None:
        """A creation that failed for good before its directory existed leaves no record
        (nothing to resume, nothing for a DeleteVolume to remove); a temporary failure
        keeps it for the retry."""
        if error.temporary:
            return
        reason = str(_fs_error(error))
        await self._emit("volume", vid, ProvisioningFailed(reason=reason), trace)
        await self.catalogue.volumes.delete(vid)

    async def _content_source(self, spec: VolumeSpec, meta: Meta) -> int | None:
        """The inode to clone a new volume from (None for an empty one); checks the source
        exists, lives on the same file system and fits the requested capacity."""
        if not spec.source_kind:
            return None
        if spec.source_kind == "snapshot":
            snap = await self.catalogue.snapshots.get(spec.source_id)
            if snap is None or snap.state != READY:
                raise NotFound(f"snapshot {spec.source_id} does not exist")
            fs_uuid, size, path = snap.fs_uuid, snap.size_bytes, snap.path
        else:
            vol = await self.catalogue.volumes.get(spec.source_id)
            if vol is None or vol.state != READY:
                raise NotFound(f"volume {spec.source_id} does not exist")
            if vol.kind != "shared":
                raise InvalidArgument("a local volume cannot be cloned: its data is on a node")
            fs_uuid, size, path = vol.fs_uuid, vol.capacity, vol.path
        if fs_uuid != meta.fmt.uuid:
            raise InvalidArgument(f"{spec.source_kind} {spec.source_id} is on another file system")
        if size > spec.capacity:
            if spec.required or (spec.limit and size > spec.limit):
                raise OutOfRange(
                    f"the {spec.source_kind} holds {size} bytes, more than the volume may have"
                )
            spec.capacity = size  # no size asked: as large as the source
        ino = await lookup_path(meta, path)
        if ino is None:
            raise NotFound(f"the directory of {spec.source_kind} {spec.source_id} is gone")
        return ino

    async def _volume_dir(self, meta: Meta, vid: str, path: str, source: int | None) -> int:
        """The volume's directory: made empty, or cloned from `source`; an earlier attempt's
        result is reused (an empty volume reuses any directory there: a pathPattern may
        point at data kept from before)."""
        parent = await make_dirs(meta, posixpath.dirname(path))
        name = posixpath.basename(path).encode()
        ino = await lookup_path(meta, path)
        if ino is None:
            try:
                if source is None:
                    ino, _ = await meta.mkdir(ROOT_CTX, parent, name, 0o777)
                else:
                    attr = await clone_tree(meta, source, parent, name,
                                            root_xattrs={MARK: vid.encode()})  # fmt: skip
                    ino = attr.inode
                return ino
            except FSError as error:
                if error.errno != errno.EEXIST:
                    raise
                ino = await lookup_path(meta, path)  # made meanwhile: look at it as below
                if ino is None:
                    raise
        if not (await meta.getattr(ino)).is_dir():
            raise FailedPrecondition(f"{path} exists and is not a directory")
        if source is not None and await read_mark(meta, ino) != vid:
            raise FailedPrecondition(f"{path} exists and is not this volume's clone")
        return ino

    async def _create_local(self, vid: str, spec: VolumeSpec, request, trace) -> VolumeRecord:
        if self.capacity is None:
            raise FailedPrecondition("local volumes need the node capacity reports (events)")
        async with self._placing:  # one placement at a time: each sees the others' claims
            await self.capacity.refresh()
            nodes = await self.capacity.nodes()
            reserved = await self.catalogue.reserved()
            rooms = {n: c.room(reserved.get(n, 0)) for n, c in nodes.items()}
            chosen = next(
                (n for n in candidate_nodes(request.accessibility_requirements, rooms)
                 if rooms[n] >= spec.capacity),
                None,
            )  # fmt: skip
            if chosen is None:
                raise ResourceExhausted(
                    f"no node allowed by the request's topology has {spec.capacity} bytes free "
                    f"for a local volume ({len(nodes)} nodes reported)"
                )
            base = nodes[chosen].local_path.rstrip("/")
            record, new = await self.catalogue.volumes.add(vid, VolumeRecord(
                name=spec.name, kind="local", capacity=spec.capacity, node=chosen,
                path=f"{base}/{vid}" if base else vid, created_at=time.time(),
                parameters=spec.parameters, state=CREATING,
            ))  # fmt: skip
        if not new:
            self._check_compatible(vid, record, spec, request)
            if record.state == READY:
                return record
        else:
            await self._emit("volume", vid, VolumeRequested(
                name=spec.name, capacity_bytes=spec.capacity, volume_type="local",
                parameters=spec.parameters, pvc=_pvc(spec.parameters),
            ), trace)  # fmt: skip
        await self._emit("volume", vid, VolumeProvisioned(
            capacity_bytes=record.capacity, path=record.path, node=record.node), trace)  # fmt: skip
        record.state = READY
        await self.catalogue.volumes.put(vid, record)
        return record

    async def DeleteVolume(self, request, context):
        vid = request.volume_id
        if not vid:
            raise InvalidArgument("volume_id is required")
        trace = propagation.inject()
        async with self._exclusive(vid):
            record = await self.catalogue.volumes.get(vid)
            if record is None:
                return csi_pb2.DeleteVolumeResponse()  # never made, or already deleted
            if record.kind == "shared":
                meta = await self.fs.of(record, request.secrets)
                await self.catalogue.volumes.update(vid, lambda r: _with_state(r, DELETING))
                with fs_errors(f"deleting volume {record.name}"):
                    await remove_tree(meta, record.path)
            else:
                await self.catalogue.volumes.update(vid, lambda r: _with_state(r, DELETING))
            await self._emit("volume", vid, VolumeDeleted(reason="DeleteVolume"), trace)
            await self.catalogue.volumes.delete(vid)
        log.info("volume %s (%s) deleted", vid, record.name)
        return csi_pb2.DeleteVolumeResponse()

    async def ControllerExpandVolume(self, request, context):
        vid = request.volume_id
        if not vid:
            raise InvalidArgument("volume_id is required")
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        _, required, limit = capacity_range(request.capacity_range)
        wanted = required or limit
        if not wanted:
            raise InvalidArgument("capacity_range asks for no size")
        trace = propagation.inject()
        async with self._exclusive(vid):
            record = await self._ready_volume(vid)
            if request.HasField("volume_capability"):
                problem = capability_problem(request.volume_capability, record.kind)
                if problem:
                    raise InvalidArgument(problem)
            if record.capacity >= wanted:  # done before, or a shrink, which is not done
                if limit and record.capacity > limit:
                    raise OutOfRange(f"volume {vid} has {record.capacity} bytes: it cannot shrink")
                return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=record.capacity)
            if record.kind == "shared":
                await self._grow_quota(record, request.secrets, wanted)
            else:
                await self._check_node_room(record, wanted)
            previous = record.capacity
            record.capacity = wanted
            await self._emit("volume", vid, VolumeExpanded(
                capacity_bytes=wanted, previous_bytes=previous), trace)  # fmt: skip
            await self.catalogue.volumes.update(vid, lambda r: _with_capacity(r, wanted))
        log.info("volume %s expanded from %d to %d bytes", vid, previous, wanted)
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=wanted, node_expansion_required=False
        )

    async def _grow_quota(self, record: VolumeRecord, secrets, wanted: int) -> None:
        meta = await self.fs.of(record, secrets)
        if meta.fmt.capacity and wanted > meta.fmt.capacity:
            raise OutOfRange(f"{wanted} bytes is more than the file system holds")
        with fs_errors(f"expanding volume {record.name}"):
            ino = await lookup_path(meta, record.path)
            if ino is None:
                raise FailedPrecondition(f"the directory of volume {record.name} is gone")
            await meta.set_quota(ROOT_CTX, ino, space=wanted)

    async def _check_node_room(self, record: VolumeRecord, wanted: int) -> None:
        if self.capacity is None:
            raise FailedPrecondition("local volumes need the node capacity reports (events)")
        await self.capacity.refresh()
        node = await self.capacity.node(record.node)
        reserved = (await self.catalogue.reserved()).get(record.node, 0) - record.capacity
        if node is None or node.room(reserved) < wanted:
            raise ResourceExhausted(f"node {record.node} has no room for {wanted} bytes")

    async def ValidateVolumeCapabilities(self, request, context):
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities are required")
        record = await self._ready_volume(request.volume_id)
        problems = [capability_problem(c, record.kind) for c in request.volume_capabilities]
        ours = _context(record)
        problems += [
            f"volume_context {k}={v!r} is not this volume's"
            for k, v in request.volume_context.items()
            if k in ours and ours[k] != v
        ]
        if _own(request.parameters) and _own(request.parameters) != _own(record.parameters):
            problems.append("parameters are not the ones the volume was made with")
        problems = [p for p in problems if p]
        if problems:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        Confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
        ))  # fmt: skip

    async def ListVolumes(self, request, context):
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        ready = [(vid, r) for vid, r in await self.catalogue.volumes.all() if r.state == READY]
        records = dict(ready)
        ids, following = page(list(records), request.starting_token, request.max_entries,
                              VOLUME_ID)  # fmt: skip
        Entry = csi_pb2.ListVolumesResponse.Entry
        Status = csi_pb2.ListVolumesResponse.VolumeStatus
        entries = [
            Entry(volume=self._volume(vid, records[vid]),
                  status=Status(volume_condition=await self._condition(vid, records[vid])))
            for vid in ids
        ]  # fmt: skip
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=following)

    async def ControllerGetVolume(self, request, context):
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        record = await self._ready_volume(request.volume_id)
        Status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus
        condition = await self._condition(request.volume_id, record)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._volume(request.volume_id, record),
            status=Status(volume_condition=condition),
        )

    async def GetCapacity(self, request, context):
        kind = check_parameters(request.parameters)
        if any(capability_problem(c, kind) for c in request.volume_capabilities):
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        if kind == "shared":
            meta, _ = await self.fs.get({})
            free = (await meta.statfs()).avail_space
            return csi_pb2.GetCapacityResponse(
                available_capacity=free, maximum_volume_size=Int64Value(value=free)
            )
        if self.capacity is None:
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        await self.capacity.refresh()
        nodes = await self.capacity.nodes()
        reserved = await self.catalogue.reserved()
        rooms = {n: c.room(reserved.get(n, 0)) for n, c in nodes.items()}
        if request.HasField("accessible_topology"):
            wanted = node_of(request.accessible_topology)
            rooms = {n: r for n, r in rooms.items() if n == wanted}
        return csi_pb2.GetCapacityResponse(
            available_capacity=sum(rooms.values()),
            maximum_volume_size=Int64Value(value=max(rooms.values(), default=0)),
        )

    # -- snapshots ---------------------------------------------------------------------------

    async def CreateSnapshot(self, request, context):
        if not request.name:
            raise InvalidArgument("name is required")
        if not request.source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        trace = propagation.inject()
        sid, source = snapshot_id(request.name), request.source_volume_id
        async with self._exclusive(sid, source):
            record = await self.catalogue.snapshots.get(sid)
            if record is not None:
                self._check_snapshot(sid, record, request)
                if record.state == READY:
                    return csi_pb2.CreateSnapshotResponse(snapshot=_snapshot(sid, record))
            volume = await self._ready_volume(source)
            if volume.kind != "shared":
                raise FailedPrecondition("a local volume's data is on its node: no snapshots")
            meta = await self.fs.of(volume, request.secrets)
            record, new = await self.catalogue.snapshots.add(sid, SnapshotRecord(
                name=request.name, source_volume_id=source, size_bytes=volume.capacity,
                path=f"{SNAPSHOT_ROOT}/{sid}", created_at=time.time(), state=CREATING,
                fs_uuid=volume.fs_uuid, meta=volume.meta,
            ))  # fmt: skip
            if not new:
                self._check_snapshot(sid, record, request)
            with fs_errors(f"snapshot {request.name}"):
                src = await lookup_path(meta, volume.path)
                if src is None:
                    raise FailedPrecondition(f"the directory of volume {source} is gone")
                await self._snapshot_dir(meta, sid, record.path, src)
            await self._emit("volume", source, SnapshotCreated(
                snapshot_id=sid, name=request.name, size_bytes=record.size_bytes,
                path=record.path), trace)  # fmt: skip
            record.state = READY
            await self.catalogue.snapshots.put(sid, record)
        log.info("snapshot %s (%s) of volume %s ready", sid, request.name, source)
        return csi_pb2.CreateSnapshotResponse(snapshot=_snapshot(sid, record))

    @staticmethod
    def _check_snapshot(sid: str, record: SnapshotRecord, request) -> None:
        if record.source_volume_id != request.source_volume_id:
            raise AlreadyExists(
                f"snapshot {request.name!r} exists for volume {record.source_volume_id}"
            )
        if record.state == DELETING:
            raise ConflictError(f"snapshot {sid} is being deleted")

    async def _snapshot_dir(self, meta: Meta, sid: str, path: str, source: int) -> None:
        parent = await make_dirs(meta, posixpath.dirname(path), 0o700)
        ino = await lookup_path(meta, path)
        if ino is None:
            try:
                await clone_tree(meta, source, parent, posixpath.basename(path).encode(),
                                 root_xattrs={MARK: sid.encode()})  # fmt: skip
                return
            except FSError as error:
                if error.errno != errno.EEXIST:
                    raise
                ino = await lookup_path(meta, path)
        if ino is None or await read_mark(meta, ino) != sid:
            raise FailedPrecondition(f"{path} exists and is not this snapshot")

    async def DeleteSnapshot(self, request, context):
        sid = request.snapshot_id
        if not sid:
            raise InvalidArgument("snapshot_id is required")
        trace = propagation.inject()
        async with self._exclusive(sid):
            record = await self.catalogue.snapshots.get(sid)
            if record is None:
                return csi_pb2.DeleteSnapshotResponse()
            meta = await self.fs.of(record, request.secrets)
            await self.catalogue.snapshots.update(sid, lambda r: _with_state(r, DELETING))
            with fs_errors(f"deleting snapshot {record.name}"):
                await remove_tree(meta, record.path)
            await self._emit("volume", record.source_volume_id,
                             SnapshotDeleted(snapshot_id=sid), trace)  # fmt: skip
            await self.catalogue.snapshots.delete(sid)
        log.info("snapshot %s (%s) deleted", sid, record.name)
        return csi_pb2.DeleteSnapshotResponse()

    async def ListSnapshots(self, request, context):
        if request.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        Entry = csi_pb2.ListSnapshotsResponse.Entry
        source = request.source_volume_id
        if request.snapshot_id:  # one snapshot: found or an empty answer, as the spec says
            record = await self.catalogue.snapshots.get(request.snapshot_id)
            found = record and record.state == READY
            if not found or (source and record.source_volume_id != source):
                return csi_pb2.ListSnapshotsResponse()
            return csi_pb2.ListSnapshotsResponse(
                entries=[Entry(snapshot=_snapshot(request.snapshot_id, record))]
            )
        records = {
            sid: r for sid, r in await self.catalogue.snapshots.all()
            if r.state == READY and (not source or r.source_volume_id == source)
        }  # fmt: skip
        ids, following = page(list(records), request.starting_token, request.max_entries,
                              SNAPSHOT_ID)  # fmt: skip
        return csi_pb2.ListSnapshotsResponse(
            entries=[Entry(snapshot=_snapshot(sid, records[sid])) for sid in ids],
            next_token=following,
        )

    async def GetSnapshot(self, request, context):
        if not request.snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        record = await self.catalogue.snapshots.get(request.snapshot_id)
        if record is None or record.state != READY:
            raise NotFound(f"snapshot {request.snapshot_id} does not exist")
        return csi_pb2.GetSnapshotResponse(snapshot=_snapshot(request.snapshot_id, record))

    # -- helpers ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _exclusive(self, *ids: str) -> AsyncIterator[None]:
        """One call at a time per volume or snapshot: CSI's ABORTED for the others."""
        ids = tuple(i for i in ids if i)
        busy = [i for i in ids if i in self._busy]
        if busy:
            raise ConflictError(f"an operation on {busy[0]} is already in progress")
        self._busy.update(ids)
        try:
            yield
        finally:
            self._busy.difference_update(ids)

    async def _ready_volume(self, vid: str) -> VolumeRecord:
        record = await self.catalogue.volumes.get(vid)
        if record is None or record.state != READY:
            raise NotFound(f"volume {vid} does not exist")
        return record

    async def _emit(self, aggregate: str, aggregate_id: str, event: Event, trace: dict) -> None:
        """Appends one event after whatever the aggregate holds (retrying lost races); a bus
        outage only delays it (the outbox)."""
        for _ in range(5):
            try:
                await self.events.append(aggregate, aggregate_id, [event], trace=trace)
                return
            except ConflictError:
                continue
        raise ConflictError(f"{aggregate} {aggregate_id}: its events keep changing, retry")

    def _volume(self, vid: str, record: VolumeRecord) -> Any:
        volume = csi_pb2.Volume(
            capacity_bytes=record.capacity, volume_id=vid, volume_context=_context(record)
        )
        if record.kind == "local":
            volume.accessible_topology.add(segments={TOPOLOGY_KEY: record.node})
        if record.source_kind == "snapshot":
            volume.content_source.snapshot.snapshot_id = record.source_id
        elif record.source_kind == "volume":
            volume.content_source.volume.volume_id = record.source_id
        return volume

    async def _condition(self, vid: str, record: VolumeRecord) -> Any:
        """Is the volume usable: its node reports (local), its directory is there (shared)."""
        Condition = csi_pb2.VolumeCondition
        if record.kind == "local":
            node = await self.capacity.node(record.node) if self.capacity else None
            if node is None:
                return Condition(abnormal=True, message=f"node {record.node} never reported")
            return Condition(abnormal=False, message=f"on node {record.node}")
        if record.meta == "secret":
            return Condition(abnormal=False, message="on a file system named by secrets")
        try:
            meta = await self.fs.of(record, {})
            ino = await lookup_path(meta, record.path)
            if ino is None:
                return Condition(abnormal=True, message=f"directory {record.path} is missing")
            quota = await meta.get_quota(ino)
        except (UnavailableError, FailedPrecondition) as error:
            return Condition(abnormal=True, message=str(error))
        except FSError:
            return Condition(abnormal=True, message=f"directory {record.path} has no quota")
        if (quota.used_space, quota.used_inodes) != (record.used_bytes, record.used_inodes):
            await self.catalogue.volumes.update(
                vid, lambda r: _with_usage(r, quota.used_space, quota.used_inodes)
            )
        full = " (full)" if quota.used_space >= record.capacity else ""
        return Condition(abnormal=False, message=f"{quota.used_space} bytes used{full}")


def _own(parameters: Mapping[str, str]) -> dict[str, str]:
    """The parameters that shape a volume (not the provisioner's per-claim metadata)."""
    return {k: v for k, v in parameters.items() if "/" not in k}


def _pvc(parameters: Mapping[str, str]) -> str:
    ns, name = parameters.get(PVC_NAMESPACE, ""), parameters.get(PVC_NAME, "")
    return f"{ns}/{name}" if name else ""


def _context(record: VolumeRecord) -> dict[str, str]:
    """The volume_context (the PV's volumeAttributes): what the node plugin needs, no secret."""
    if record.kind == "local":
        return {"type": "local", "node": record.node, "path": record.path}
    return {"type": "shared", "path": record.path, "fsName": record.fs_name,
            "fsUUID": record.fs_uuid, "meta": record.meta}  # fmt: skip


def _snapshot(sid: str, record: SnapshotRecord) -> Any:
    created = Timestamp()
    created.FromNanoseconds(int(record.created_at * 1e9))
    return csi_pb2.Snapshot(
        size_bytes=record.size_bytes, snapshot_id=sid, source_volume_id=record.source_volume_id,
        creation_time=created, ready_to_use=record.state == READY,
    )  # fmt: skip


def _with_state(record: Any, state: str) -> Any:
    record.state = state
    return record


def _with_capacity(record: VolumeRecord, capacity: int) -> VolumeRecord:
    record.capacity = capacity
    return record


def _with_usage(record: VolumeRecord, space: int, inodes: int) -> VolumeRecord:
    record.used_bytes, record.used_inodes = space, inodes
    return record
