"""The CSI Controller of cairn-meta, called over its unix socket as the external-provisioner,
-resizer and -snapshotter call it, against real redis-server and nats-server and a file://
object store: shared volumes (directory + quota), local volumes (placed from the nodes'
capacity events), snapshots and clones (copy-on-write, no data copied), every status code
the CSI spec asks for, and no secret leaking into logs, events or the catalogue."""

from __future__ import annotations

import asyncio
import errno
import logging
import os

import grpc
import pytest
import redis.asyncio as aioredis

from cairn.errors import FSError
from cairn.events import EventStore, NodeCapacityReported
from cairn.meta import keys
from cairn.meta.engine import ROOT_CTX, Ctx, Format, format_volume
from cairn.rpc.channel import connect
from cairn.rpc.gen import admin_pb2, csi_pb2, csi_pb2_grpc
from cairn.vfs import VFS
from cairn_meta.__main__ import build_csi_server
from cairn_meta.admin import Admin
from cairn_meta.capacity import NodeCapacityProjection
from cairn_meta.catalogue import Catalogue
from cairn_meta.controller import (
    TOPOLOGY_KEY,
    Controller,
    FileSystems,
    snapshot_id,
    volume_id,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BLOCK = 64 * KiB
CTX = Ctx(0, 0, umask=0o022)
Code = grpc.StatusCode
Mode = csi_pb2.VolumeCapability.AccessMode
RPC = csi_pb2.ControllerServiceCapability.RPC
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
PASSWORD = "s3cret-Pa55word"


def cap(mode: int = Mode.MULTI_NODE_MULTI_WRITER, block: bool = False):
    c = csi_pb2.VolumeCapability(access_mode=Mode(mode=mode))
    if block:
        c.block.SetInParent()
    else:
        c.mount.SetInParent()
    return c


def create_request(name: str, required: int = 0, limit: int = 0, **kw):
    kw.setdefault("volume_capabilities", [cap()])
    return csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
        **kw,
    )


def topology(*nodes: str):
    return [csi_pb2.Topology(segments={TOPOLOGY_KEY: n}) for n in nodes]


async def fails(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == code, e.value.details()
    return e.value.details()


@pytest.fixture
async def volume(redis_url, tmp_path) -> str:
    """A formatted Cairn file system (1 GiB, trash kept a day) on a file:// store."""
    await format_volume(
        redis_url,
        Format(
            name="csi",
            storage=f"file://{tmp_path}/objects?fsync=false",
            block_size=BLOCK,
            trash_days=1,
            capacity=GiB,
        ),
    )
    return redis_url


@pytest.fixture
async def redis(redis_url):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def plugin(volume, redis, store, events, tmp_path):
    """cairn-meta's CSI endpoint, wired as its __main__ wires it, and a client channel."""
    filesystems = FileSystems(volume)
    capacity = NodeCapacityProjection(redis, store)
    controller = Controller(Catalogue(redis), filesystems, events, capacity)

    async def probe() -> None:
        await redis.ping()

    server = build_csi_server(f"unix://{tmp_path}/csi/csi.sock", probe, controller)
    await server.start()
    async with connect(server.address, ready_timeout=5) as channel:
        yield csi_pb2_grpc.ControllerStub(channel), csi_pb2_grpc.IdentityStub(channel)
    await server.stop(None)
    await filesystems.close()


@pytest.fixture
async def vfs(volume):
    v = await VFS.open_volume(volume, cache_memory=8 << 20)
    yield v
    await v.close()


async def objects(vfs: VFS) -> int:
    return len([o async for o in vfs.store.list("")])


async def write(vfs: VFS, path: str, data: bytes) -> None:
    parent, _ = await vfs.meta.resolve(ROOT_CTX, os.path.dirname(path).encode())
    fh, _ = await vfs.create(
        CTX, parent, os.path.basename(path).encode(), 0o644, os.O_RDWR | os.O_CREAT
    )
    try:
        await vfs.write(fh, 0, data)
    finally:
        await vfs.release(fh)


async def files(vfs: VFS, path: str) -> dict[str, bytes]:
    """{relative name: bytes} of every file below a directory."""
    out = {}
    root, _ = await vfs.meta.resolve(ROOT_CTX, path.encode())
    todo = [(root, "")]
    while todo:
        d, prefix = todo.pop()
        for e in await vfs.meta.readdir(ROOT_CTX, d, plus=True):
            name = f"{prefix}/{e.name.decode()}"
            if e.attr.is_dir():
                todo.append((e.inode, name))
                continue
            fh = await vfs.open(CTX, e.inode, os.O_RDONLY)
            out[name] = await vfs.read(fh, 0, e.attr.size + 1)
            await vfs.release(fh)
    return out


async def recorded(store: EventStore) -> list:
    last = await store.last_sequence()
    out = []
    async for rec in store.read_all():
        out.append(rec.envelope)
        if rec.sequence >= last:
            break
    return out


# -- the external-provisioner's story ----------------------------------------------------------


async def test_shared_volume_lifecycle(plugin, vfs, store, redis):
    ctl, identity = plugin
    meta = [("traceparent", TRACEPARENT)]
    info = await identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.cairn.io"
    caps = await ctl.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    have = {c.rpc.type for c in caps.capabilities}
    assert {
        RPC.CREATE_DELETE_VOLUME,
        RPC.EXPAND_VOLUME,
        RPC.LIST_VOLUMES,
        RPC.GET_CAPACITY,
        RPC.CREATE_DELETE_SNAPSHOT,
        RPC.LIST_SNAPSHOTS,
        RPC.CLONE_VOLUME,
        RPC.GET_VOLUME,
        RPC.VOLUME_CONDITION,
        RPC.SINGLE_NODE_MULTI_WRITER,
    } <= have
    assert RPC.PUBLISH_UNPUBLISH_VOLUME not in have
    assert RPC.LIST_VOLUMES_PUBLISHED_NODES not in have

    # create, and the same call again: the same volume
    params = {"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "team"}
    request = create_request("pvc-1", required=MiB, parameters=params)
    first = (await ctl.CreateVolume(request, metadata=meta)).volume
    assert first.volume_id == volume_id("pvc-1")
    assert first.capacity_bytes == MiB
    assert first.volume_context["path"] == "/volumes/pvc-1"
    assert first.volume_context["type"] == "shared"
    assert not first.accessible_topology
    assert (await ctl.CreateVolume(request)).volume == first
    vid = first.volume_id
    ino, attr = await vfs.meta.resolve(ROOT_CTX, b"/volumes/pvc-1")
    assert attr.is_dir() and (await vfs.meta.get_quota(ino)).space == MiB

    # same name, other size; impossible ranges
    await fails(
        ctl.CreateVolume(create_request("pvc-1", required=2 * MiB, parameters=params)),
        Code.ALREADY_EXISTS,
    )
    await fails(
        ctl.CreateVolume(
            create_request(
                "pvc-1",
                required=MiB,
                parameters={"type": "local"},
                volume_capabilities=[cap(Mode.SINGLE_NODE_WRITER)],
            )
        ),
        Code.ALREADY_EXISTS,
    )
    await fails(
        ctl.CreateVolume(create_request("pvc-x", required=2 * MiB, limit=MiB)), Code.OUT_OF_RANGE
    )
    await fails(ctl.CreateVolume(create_request("pvc-x", required=2 * GiB)), Code.OUT_OF_RANGE)

    # the quota is the volume's size: writing past it fails with EDQUOT
    await write(vfs, "/volumes/pvc-1/a", bytes(range(256)) * 2048)  # 512 KiB
    with pytest.raises(FSError) as e:
        await write(vfs, "/volumes/pvc-1/too-much", b"x" * (MiB))
    assert e.value.errno == errno.EDQUOT

    # expand: the quota grows; asking less answers what it has; shrinking is out of range
    grown = await ctl.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=4 * MiB)
        )
    )
    assert (grown.capacity_bytes, grown.node_expansion_required) == (4 * MiB, False)
    assert (await vfs.meta.get_quota(ino)).space == 4 * MiB
    again = await ctl.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * MiB)
        )
    )
    assert again.capacity_bytes == 4 * MiB
    await fails(
        ctl.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=vid, capacity_range=csi_pb2.CapacityRange(limit_bytes=2 * MiB)
            )
        ),
        Code.OUT_OF_RANGE,
    )
    await fails(
        ctl.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=volume_id("nope"),
                capacity_range=csi_pb2.CapacityRange(required_bytes=MiB),
            )
        ),
        Code.NOT_FOUND,
    )
    await fails(
        ctl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(volume_id=vid)),
        Code.INVALID_ARGUMENT,
    )
    await write(vfs, "/volumes/pvc-1/b", b"fits now" * 100_000)
    await write(vfs, "/volumes/pvc-1/empty", b"")

    # validate
    ok = await ctl.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vid, volume_capabilities=[cap(), cap(Mode.MULTI_NODE_READER_ONLY)]
        )
    )
    assert len(ok.confirmed.volume_capabilities) == 2 and not ok.message
    no = await ctl.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vid, volume_capabilities=[cap(block=True)]
        )
    )
    assert not no.HasField("confirmed") and "block" in no.message
    await fails(
        ctl.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=volume_id("nope"), volume_capabilities=[cap()]
            )
        ),
        Code.NOT_FOUND,
    )
    await fails(
        ctl.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=vid)),
        Code.INVALID_ARGUMENT,
    )

    # list, a page at a time; a token we never gave is ABORTED
    for name in ("pvc-2", "pvc-3"):
        await ctl.CreateVolume(create_request(name, required=MiB))
    listed, token, pages = [], "", 0
    while True:
        answer = await ctl.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token)
        )
        assert len(answer.entries) <= 2
        listed += [e.volume.volume_id for e in answer.entries]
        assert all(not e.status.volume_condition.abnormal for e in answer.entries)
        pages += 1
        token = answer.next_token
        if not token:
            break
    assert pages == 2
    assert sorted(listed) == sorted(volume_id(n) for n in ("pvc-1", "pvc-2", "pvc-3"))
    everything = await ctl.ListVolumes(csi_pb2.ListVolumesRequest())
    assert len(everything.entries) == 3 and not everything.next_token
    await fails(ctl.ListVolumes(csi_pb2.ListVolumesRequest(starting_token="bogus!")), Code.ABORTED)
    await fails(ctl.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=-1)), Code.INVALID_ARGUMENT)

    # get volume (with its condition) and the capacity left
    got = await ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid))
    assert got.volume.capacity_bytes == 4 * MiB
    assert not got.status.volume_condition.abnormal
    assert "bytes used" in got.status.volume_condition.message
    await fails(
        ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id("nope"))),
        Code.NOT_FOUND,
    )
    free = await ctl.GetCapacity(csi_pb2.GetCapacityRequest(volume_capabilities=[cap()]))
    status = await vfs.meta.status()
    assert free.available_capacity == GiB - status["used_space"]
    assert free.maximum_volume_size.value == free.available_capacity
    none = await ctl.GetCapacity(csi_pb2.GetCapacityRequest(volume_capabilities=[cap(block=True)]))
    assert none.available_capacity == 0

    # snapshot: idempotent by name; same name for another volume is ALREADY_EXISTS
    original = await files(vfs, "/volumes/pvc-1")
    before = await objects(vfs)
    snap_req = csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=vid)
    snap = (await ctl.CreateSnapshot(snap_req, metadata=meta)).snapshot
    assert snap.snapshot_id == snapshot_id("snap-1") and snap.ready_to_use
    assert snap.size_bytes == 4 * MiB and snap.source_volume_id == vid
    assert snap.creation_time.seconds > 0
    assert (await ctl.CreateSnapshot(snap_req)).snapshot == snap
    await fails(
        ctl.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=volume_id("pvc-2"))
        ),
        Code.ALREADY_EXISTS,
    )
    await fails(
        ctl.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name="snap-2", source_volume_id=volume_id("nope"))
        ),
        Code.NOT_FOUND,
    )
    await ctl.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap-of-2", source_volume_id=volume_id("pvc-2"))
    )

    by_id = await ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=snap.snapshot_id))
    assert [e.snapshot for e in by_id.entries] == [snap]
    by_source = await ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=vid))
    assert [e.snapshot.snapshot_id for e in by_source.entries] == [snap.snapshot_id]
    first_page = await ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(max_entries=1))
    assert len(first_page.entries) == 1 and first_page.next_token
    second = await ctl.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(max_entries=1, starting_token=first_page.next_token)
    )
    assert len(second.entries) == 1 and not second.next_token
    assert first_page.entries[0].snapshot.snapshot_id != second.entries[0].snapshot.snapshot_id
    await fails(
        ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(starting_token="nope nope")), Code.ABORTED
    )
    unknown = await ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=snapshot_id("x")))
    assert not unknown.entries
    gotten = await ctl.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert gotten.snapshot == snap

    # a volume from the snapshot: the same files, no object written
    from_snap = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
    )
    await fails(
        ctl.CreateVolume(
            create_request("pvc-small", required=MiB, volume_content_source=from_snap)
        ),
        Code.OUT_OF_RANGE,
    )
    restored = (
        await ctl.CreateVolume(
            create_request("pvc-restored", required=8 * MiB, volume_content_source=from_snap)
        )
    ).volume
    assert restored.content_source == from_snap
    assert restored.capacity_bytes == 8 * MiB
    assert await files(vfs, restored.volume_context["path"]) == original
    again = (
        await ctl.CreateVolume(
            create_request("pvc-restored", required=8 * MiB, volume_content_source=from_snap)
        )
    ).volume
    assert again == restored
    restored_ino, _ = await vfs.meta.resolve(ROOT_CTX, restored.volume_context["path"].encode())
    assert (await vfs.meta.get_quota(restored_ino)).space == 8 * MiB

    # a clone of the volume itself (no size asked: the default, 1 GiB)
    from_vol = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vid)
    )
    clone = (
        await ctl.CreateVolume(create_request("pvc-clone", volume_content_source=from_vol))
    ).volume
    assert clone.content_source == from_vol and clone.capacity_bytes == GiB
    assert await files(vfs, clone.volume_context["path"]) == original
    await fails(
        ctl.CreateVolume(create_request("pvc-clone", volume_content_source=from_snap)),
        Code.ALREADY_EXISTS,
    )
    await fails(
        ctl.CreateVolume(
            create_request(
                "pvc-y",
                volume_content_source=csi_pb2.VolumeContentSource(
                    volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=volume_id("nope"))
                ),
            )
        ),
        Code.NOT_FOUND,
    )
    assert await objects(vfs) == before  # snapshots and clones copied no data

    # the clone is independent of its source
    await write(vfs, clone.volume_context["path"] + "/new", b"only in the clone")
    assert "/new" not in await files(vfs, "/volumes/pvc-1")

    # delete the snapshot (twice); volumes made from it live on
    for _ in range(2):
        await ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert not (
        await ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=snap.snapshot_id))
    ).entries
    assert await files(vfs, restored.volume_context["path"]) == original

    # delete the volume (twice: OK); its files wait in the trash
    trash_before = (await vfs.meta.status())["trash_files"]
    for _ in range(2):
        await ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), metadata=meta)
    assert await vfs.meta.r.hget(keys.CSI_VOLUMES, vid) is None
    with pytest.raises(FSError):
        await vfs.meta.resolve(ROOT_CTX, b"/volumes/pvc-1")
    assert (await vfs.meta.status())["trash_files"] == trash_before + len(original)
    await fails(
        ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid)), Code.NOT_FOUND
    )
    assert await files(vfs, clone.volume_context["path"]) == {
        **original,
        "/new": b"only in the clone",
    }
    await ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="never-made"))

    # every change is an event, in the trace of the call that made it
    envelopes = await recorded(store)
    history = [e for e in envelopes if e.aggregate == "volume" and e.aggregate_id == vid]
    assert [e.type for e in history] == [
        "VolumeRequested",
        "VolumeProvisioned",
        "VolumeExpanded",
        "SnapshotCreated",  # a volume's snapshots are part of its story
        "SnapshotDeleted",
        "VolumeDeleted",
    ]
    assert history[3].payload["snapshot_id"] == snap.snapshot_id
    traced = [e for e in history if e.type != "VolumeExpanded" and e.type != "SnapshotDeleted"]
    assert all(TRACE_ID in e.trace.get("traceparent", "") for e in traced), traced
    requested = next(e for e in envelopes if e.type == "VolumeRequested" and e.aggregate_id == vid)
    assert requested.payload["pvc"] == "team/data"

    # the admin API reads the same catalogue
    admin = Admin("cairn-meta", redis, [])
    shown = await admin.ListVolumes(admin_pb2.ListVolumesRequest(), None)
    by_id = {v.volume_id: v for v in shown.volumes}
    assert set(by_id) == {
        e.volume.volume_id for e in (await ctl.ListVolumes(csi_pb2.ListVolumesRequest())).entries
    }
    assert by_id[clone.volume_id].kind == "shared"
    assert by_id[clone.volume_id].capacity_bytes == GiB
    assert by_id[clone.volume_id].path == clone.volume_context["path"]


async def test_path_pattern_stays_below_the_volumes_root(plugin, vfs):
    ctl, _ = plugin
    pattern = {"pathPattern": "${pvc.namespace}/${pvc.name}"}

    def req(name, namespace, pvc, extra=None):
        params = {
            **pattern,
            "csi.storage.k8s.io/pvc/namespace": namespace,
            "csi.storage.k8s.io/pvc/name": pvc,
            **(extra or {}),
        }
        return create_request(name, required=MiB, parameters=params)

    vol = (await ctl.CreateVolume(req("pv-a", "team", "data"))).volume
    assert vol.volume_context["path"] == "/volumes/team/data"
    odd = (await ctl.CreateVolume(req("pv-b", "a/../../b", "x y"))).volume
    assert odd.volume_context["path"] == "/volumes/a-..-..-b/x-y"
    await fails(ctl.CreateVolume(req("pv-c", "..", "data")), Code.INVALID_ARGUMENT)
    await fails(
        ctl.CreateVolume(req("pv-d", "team", "data", {"pathPattern": "../../${pvc.name}"})),
        Code.INVALID_ARGUMENT,
    )
    await fails(
        ctl.CreateVolume(req("pv-e", "team", "data", {"pathPattern": "${secret}"})),
        Code.INVALID_ARGUMENT,
    )
    await fails(
        ctl.CreateVolume(req("pv-f", "team", "data", {"root": "/../etc"})), Code.INVALID_ARGUMENT
    )
    await fails(
        ctl.CreateVolume(req("pv-g", "team", "data", {"root": "/.trash"})), Code.INVALID_ARGUMENT
    )
    # two volumes may not share one directory
    await fails(ctl.CreateVolume(req("pv-h", "team", "data")), Code.ALREADY_EXISTS)
    other_root = (await ctl.CreateVolume(req("pv-i", "team", "data", {"root": "/k8s/pvs"}))).volume
    assert other_root.volume_context["path"] == "/k8s/pvs/team/data"


async def test_missing_fields_are_invalid_arguments(plugin):
    ctl, _ = plugin
    bad = [
        ctl.CreateVolume(create_request("")),
        ctl.CreateVolume(create_request("pvc", volume_capabilities=[])),
        ctl.CreateVolume(create_request("pvc", volume_capabilities=[cap(block=True)])),
        ctl.CreateVolume(create_request("pvc", volume_capabilities=[cap(Mode.UNKNOWN)])),
        ctl.CreateVolume(create_request("pvc", parameters={"colour": "red"})),
        ctl.CreateVolume(create_request("pvc", parameters={"type": "tape"})),
        ctl.CreateVolume(create_request("pvc", required=-1)),
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest()),
        ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest()),
        ctl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest()),
        ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(source_volume_id=volume_id("x"))),
        ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s")),
        ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest()),
        ctl.GetSnapshot(csi_pb2.GetSnapshotRequest()),
        ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(max_entries=-5)),
    ]
    for call in bad:
        await fails(call, Code.INVALID_ARGUMENT)
    await fails(
        ctl.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(volume_id="v", node_id="n")
        ),
        Code.UNIMPLEMENTED,
    )
    await ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id("never")))


# -- local volumes ----------------------------------------------------------------------------


async def test_local_volumes_are_placed_by_topology_and_reported_room(plugin, events, store):
    ctl, _ = plugin
    await events.append(
        "node",
        "node-a",
        [
            NodeCapacityReported(
                node="node-a",
                capacity_bytes=10 * GiB,
                available_bytes=8 * GiB,
                local_path="/var/lib/cairn/local",
            )
        ],
    )
    await events.append(
        "node",
        "node-b",
        [NodeCapacityReported(node="node-b", capacity_bytes=GiB, available_bytes=100 * MiB)],
    )
    local = {"type": "local"}
    rwo = [cap(Mode.SINGLE_NODE_WRITER)]

    def req(name, size, requisite=(), preferred=(), **kw):
        kw.setdefault("volume_capabilities", rwo)
        return create_request(
            name,
            required=size,
            parameters=local,
            accessibility_requirements=csi_pb2.TopologyRequirement(
                requisite=topology(*requisite), preferred=topology(*preferred)
            ),
            **kw,
        )

    one = (await ctl.CreateVolume(req("local-1", GiB, ["node-a"]))).volume
    assert list(one.accessible_topology) == topology("node-a")
    assert one.volume_context["type"] == "local" and one.volume_context["node"] == "node-a"
    assert one.volume_context["path"] == f"/var/lib/cairn/local/{one.volume_id}"
    assert (await ctl.CreateVolume(req("local-1", GiB, ["node-a"]))).volume == one
    # the same name asked for on another node is another volume
    await fails(ctl.CreateVolume(req("local-1", GiB, ["node-b"])), Code.ALREADY_EXISTS)
    # only single-node access modes
    await fails(
        ctl.CreateVolume(req("local-rwx", GiB, ["node-a"], volume_capabilities=[cap()])),
        Code.INVALID_ARGUMENT,
    )
    # no allowed node has room, or the allowed node never reported
    await fails(ctl.CreateVolume(req("local-2", GiB, ["node-b"])), Code.RESOURCE_EXHAUSTED)
    await fails(ctl.CreateVolume(req("local-3", MiB, ["node-z"])), Code.RESOURCE_EXHAUSTED)
    await fails(ctl.CreateVolume(req("local-4", 20 * GiB)), Code.RESOURCE_EXHAUSTED)
    # preferred first when it has room; with no topology, the node with the most room
    small = (
        await ctl.CreateVolume(req("local-5", 50 * MiB, ["node-a", "node-b"], ["node-b", "node-a"]))
    ).volume
    assert list(small.accessible_topology) == topology("node-b")
    anywhere = (await ctl.CreateVolume(req("local-6", GiB))).volume
    assert list(anywhere.accessible_topology) == topology("node-a")

    # capacity per node, from the reports less what volumes there claim
    def capacity_req(*nodes):
        request = csi_pb2.GetCapacityRequest(volume_capabilities=rwo, parameters=local)
        if nodes:
            request.accessible_topology.CopyFrom(topology(*nodes)[0])
        return request

    a = await ctl.GetCapacity(capacity_req("node-a"))
    assert a.available_capacity == 8 * GiB  # min(8 GiB free, 10 GiB - 2 GiB claimed)
    b = await ctl.GetCapacity(capacity_req("node-b"))
    assert b.available_capacity == 100 * MiB - 0  # min(100 MiB, 1 GiB - 50 MiB)
    total = await ctl.GetCapacity(capacity_req())
    assert total.available_capacity == 8 * GiB + 100 * MiB
    assert total.maximum_volume_size.value == 8 * GiB
    nowhere = await ctl.GetCapacity(capacity_req("node-z"))
    assert nowhere.available_capacity == 0
    multi = await ctl.GetCapacity(
        csi_pb2.GetCapacityRequest(volume_capabilities=[cap()], parameters=local)
    )
    assert multi.available_capacity == 0

    # validate, get, expand, snapshot, delete
    no = await ctl.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=one.volume_id, volume_capabilities=[cap()]
        )
    )
    assert not no.HasField("confirmed") and "one node" in no.message
    got = await ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=one.volume_id))
    assert list(got.volume.accessible_topology) == topology("node-a")
    assert not got.status.volume_condition.abnormal
    grown = await ctl.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=one.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB)
        )
    )
    assert grown.capacity_bytes == 2 * GiB
    await fails(
        ctl.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=small.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=GiB)
            )
        ),
        Code.RESOURCE_EXHAUSTED,
    )
    await fails(
        ctl.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name="local-snap", source_volume_id=one.volume_id)
        ),
        Code.FAILED_PRECONDITION,
    )
    for _ in range(2):
        await ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=one.volume_id))
    after = await ctl.GetCapacity(capacity_req("node-a"))
    assert after.available_capacity == 8 * GiB  # min(8 GiB free, 10 GiB - 1 GiB)
    envelopes = await recorded(store)
    story = [e.type for e in envelopes if e.aggregate_id == one.volume_id]
    assert story == ["VolumeRequested", "VolumeProvisioned", "VolumeExpanded", "VolumeDeleted"]
    provisioned = next(
        e for e in envelopes if e.type == "VolumeProvisioned" and e.aggregate_id == one.volume_id
    )
    assert provisioned.payload["node"] == "node-a"


# -- secrets ----------------------------------------------------------------------------------


@pytest.fixture
async def secret_volume(redis_url, redis, tmp_path) -> str:
    """A second file system, in Redis database 1, reachable only with a password."""
    await redis.execute_command(
        "ACL", "SETUSER", "csi-user", "on", f">{PASSWORD}", "~*", "&*", "+@all"
    )
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    url = f"redis://csi-user:{PASSWORD}@127.0.0.1:{port}/1"
    await format_volume(
        url,
        Format(
            name="tenant",
            storage=f"file://{tmp_path}/tenant-objects",
            block_size=BLOCK,
            trash_days=0,
        ),
    )
    yield url
    await redis.execute_command("ACL", "DELUSER", "csi-user")


async def test_a_secret_password_never_leaks(plugin, secret_volume, store, redis, caplog):
    caplog.set_level(logging.DEBUG)
    ctl, _ = plugin
    secrets = {"metaurl": secret_volume}
    request = create_request(
        "pvc-tenant",
        required=MiB,
        secrets=secrets,
        parameters={"pathPattern": "${pvc.name}", "csi.storage.k8s.io/pvc/name": "tenant-data"},
    )
    vol = (await ctl.CreateVolume(request)).volume
    assert vol.volume_context["meta"] == "secret"
    assert vol.volume_context["fsName"] == "tenant"
    assert (await ctl.CreateVolume(request)).volume == vol
    elsewhere = csi_pb2.CreateVolumeRequest()
    elsewhere.CopyFrom(request)
    elsewhere.secrets.clear()  # the same name on cairn-meta's own file system: another volume
    await fails(ctl.CreateVolume(elsewhere), Code.ALREADY_EXISTS)
    # it really is in the tenant's file system
    from cairn.meta.engine import Meta

    tenant = await Meta.open(secret_volume)
    try:
        ino, _ = await tenant.resolve(ROOT_CTX, b"/volumes/tenant-data")
        assert (await tenant.get_quota(ino)).space == MiB
    finally:
        await tenant.close()
    snap = (
        await ctl.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(
                name="tenant-snap", source_volume_id=vol.volume_id, secrets=secrets
            )
        )
    ).snapshot
    await fails(
        ctl.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name="tenant-snap-2", source_volume_id=vol.volume_id)
        ),
        Code.FAILED_PRECONDITION,
    )
    await fails(
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id)),
        Code.FAILED_PRECONDITION,
    )
    got = await ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert not got.status.volume_condition.abnormal

    # wrong passwords and garbage: errors that do not repeat the secret
    wrong = secret_volume.replace(PASSWORD, PASSWORD + "-wrong")
    details = [
        await fails(
            ctl.CreateVolume(create_request("pvc-wrong", secrets={"metaurl": wrong})),
            Code.UNAVAILABLE,
        ),
        await fails(
            ctl.CreateVolume(
                create_request("pvc-garbage", secrets={"metaurl": f"not a url {PASSWORD}"})
            ),
            Code.FAILED_PRECONDITION,
        ),
        await fails(
            ctl.CreateVolume(create_request("pvc-param", parameters={"metaurl": secret_volume})),
            Code.INVALID_ARGUMENT,
        ),
    ]
    for text in details:
        assert PASSWORD not in text, text

    await ctl.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id, secrets=secrets)
    )
    await ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id, secrets=secrets))

    assert PASSWORD not in caplog.text
    for envelope in await recorded(store):
        assert PASSWORD not in repr(envelope)
    await ctl.CreateVolume(request)  # leave a record behind to look at
    for key in (keys.CSI_VOLUMES, keys.CSI_SNAPSHOTS):
        for field, value in (await redis.hgetall(key)).items():
            assert PASSWORD.encode() not in field + value
    async for key in redis.scan_iter():
        kind = await redis.type(key)
        if kind == b"string":
            assert PASSWORD.encode() not in (await redis.get(key) or b"")
        elif kind == b"hash":
            assert PASSWORD.encode() not in b"".join(
                k + v for k, v in (await redis.hgetall(key)).items()
            )


# -- retries ------------------------------------------------------------------------------------


async def test_racing_calls_make_one_volume(plugin, vfs):
    ctl, _ = plugin
    request = create_request("pvc-race", required=MiB)
    results = await asyncio.gather(
        *(ctl.CreateVolume(request) for _ in range(4)), return_exceptions=True
    )
    made = [r.volume for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert made and all(v == made[0] for v in made)
    assert all(r.code() == Code.ABORTED for r in refused), refused  # "in progress: retry"
    assert len((await ctl.ListVolumes(csi_pb2.ListVolumesRequest())).entries) == 1


async def test_a_retry_finishes_what_a_crash_left(plugin, vfs, redis):
    ctl, _ = plugin
    request = create_request("pvc-crash", required=2 * MiB)
    vol = (await ctl.CreateVolume(request)).volume
    vid = vol.volume_id
    ino, _ = await vfs.meta.resolve(ROOT_CTX, b"/volumes/pvc-crash")
    # as if the process died after the record and the directory, before the quota
    catalogue = Catalogue(redis)
    await catalogue.volumes.update(vid, lambda r: setattr(r, "state", "creating") or r)
    await vfs.meta.remove_quota(ROOT_CTX, ino)
    await fails(
        ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vid)),
        Code.NOT_FOUND,
    )  # not a volume until it is finished
    assert (await ctl.CreateVolume(request)).volume == vol
    assert (await vfs.meta.get_quota(ino)).space == 2 * MiB
    assert (await catalogue.volumes.get(vid)).state == "ready"

    # a clone whose directory is there but is not its own clone is refused, not reused
    src = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vid)
    )
    parent, _ = await vfs.meta.resolve(ROOT_CTX, b"/volumes")
    await vfs.meta.mkdir(ROOT_CTX, parent, b"pvc-squatted", 0o755)
    await fails(
        ctl.CreateVolume(create_request("pvc-squatted", volume_content_source=src)),
        Code.FAILED_PRECONDITION,
    )
    assert await Catalogue(redis).volumes.get(volume_id("pvc-squatted")) is None
    # an empty volume adopts a directory left from before (a pathPattern may point there)
    await write(vfs, "/volumes/pvc-squatted/kept", b"data from before")
    await ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id("pvc-squatted")))
    adopted = (
        await ctl.CreateVolume(
            create_request("pvc-squatted2", parameters={"pathPattern": "pvc-squatted"})
        )
    ).volume
    assert await files(vfs, adopted.volume_context["path"]) == {"/kept": b"data from before"}


async def test_a_clone_that_does_not_fit_leaves_no_record(plugin, redis, store, monkeypatch):
    from cairn_meta import controller as controller_module

    ctl, _ = plugin
    vid = (await ctl.CreateVolume(create_request("pvc-src", required=MiB))).volume.volume_id

    async def full(*args, **kwargs):
        raise FSError(errno.EDQUOT, "quota of directory 1 exceeded (space)")

    monkeypatch.setattr(controller_module, "clone_tree", full)
    src = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vid)
    )
    await fails(
        ctl.CreateVolume(create_request("pvc-big-clone", volume_content_source=src)),
        Code.RESOURCE_EXHAUSTED,
    )
    failed = volume_id("pvc-big-clone")
    assert await Catalogue(redis).volumes.get(failed) is None
    story = [e.type for e in await recorded(store) if e.aggregate_id == failed]
    assert story == ["VolumeRequested", "ProvisioningFailed"]
