"""cairn-provisioner end to end on the in-memory Kubernetes API, against cairn-meta's real
CSI Controller over its unix socket (real redis-server and nats-server): PVCs of Immediate
and WaitForFirstConsumer classes become Bound PVs, Delete and Retain do what they say,
a provisioner stopped between CreateVolume and the PV write leaves one volume and one PV,
permanent failures are Warning events on the claim, capacity is published for local
classes, and every step is on the event stream keyed by the CSI volume id."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from cairn.csi.client import ControllerClient
from cairn.events import NodeCapacityReported
from cairn.kube.api import CAPACITY, CSI_NODE, EVENT, NODE, PV, PVC, STORAGE_CLASS
from cairn.kube.memory import MemoryAPI
from cairn.meta.engine import Format, format_volume
from cairn.retry import Backoff
from cairn.rpc.channel import connect
from cairn.rpc.gen import csi_pb2
from cairn_meta.__main__ import build_csi_server
from cairn_meta.capacity import NodeCapacityProjection
from cairn_meta.catalogue import Catalogue
from cairn_meta.controller import TOPOLOGY_KEY, Controller, FileSystems
from cairn_provisioner.capacity import CapacityPublisher
from cairn_provisioner.provisioner import ANN_SELECTED_NODE, FINALIZER, Provisioner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "k8s"))
from kubeharness import Binder, eventually, get_or_none, running  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
DRIVER = "csi.cairn.io"
FAST = Backoff(initial=0.05, maximum=0.5, jitter=False)


@pytest.fixture
async def csi(redis_url, store, events, tmp_path):
    """cairn-meta's CSI endpoint (wired as its __main__ wires it) and a provisioner client."""
    await format_volume(
        redis_url, Format(name="csi", storage=f"file://{tmp_path}/objects", capacity=100 * GiB)
    )
    redis = aioredis.from_url(redis_url)
    filesystems = FileSystems(redis_url)
    controller = Controller(
        Catalogue(redis), filesystems, events, NodeCapacityProjection(redis, store)
    )

    async def probe() -> None:
        await redis.ping()

    server = build_csi_server(f"unix://{tmp_path}/csi.sock", probe, controller)
    await server.start()
    async with connect(server.address, ready_timeout=5) as channel:
        yield ControllerClient(channel)
    await server.stop(None)
    await filesystems.close()
    await redis.aclose()


@pytest.fixture
def api():
    return MemoryAPI()


def storage_class(name: str, binding: str = "Immediate", reclaim: str = "Delete", **params):
    return {
        "metadata": {"name": name},
        "provisioner": DRIVER,
        "parameters": params,
        "reclaimPolicy": reclaim,
        "volumeBindingMode": binding,
        "mountOptions": ["noatime"],
    }


def claim(name: str, sc: str, size: str = "1Gi", modes=("ReadWriteMany",), ns: str = "default"):
    return {
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "storageClassName": sc,
            "accessModes": list(modes),
            "resources": {"requests": {"storage": size}},
        },
    }


async def add_node(api, name: str) -> None:
    await api.create(NODE, {"metadata": {"name": name, "labels": {TOPOLOGY_KEY: name}}})
    await api.create(
        CSI_NODE,
        {
            "metadata": {"name": name},
            "spec": {"drivers": [{"name": DRIVER, "nodeID": name, "topologyKeys": [TOPOLOGY_KEY]}]},
        },
    )


async def bound(api, name: str, ns: str = "default"):
    pvc = await api.get(PVC, name, ns)
    return pvc if (pvc.get("status") or {}).get("phase") == "Bound" else None


async def volumes(csi) -> list:
    answer = await csi.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    return list(answer.entries)


async def history(store, vid: str) -> list[str]:
    return [e.type for e in await store.load("volume", vid)]


def provisioner(api, csi, events, **kw):
    return Provisioner(api, csi, events, backoff=FAST, identity="test", **kw)


async def test_immediate_claim_is_bound_then_deleted_with_its_volume(api, csi, events, store):
    await api.create(STORAGE_CLASS, storage_class("cairn"))
    async with running(provisioner(api, csi, events).run(), Binder(api).run()):
        await api.create(PVC, claim("data", "cairn", "2Gi"))
        pvc = await eventually(lambda: bound(api, "data"), what="PVC bound")
        pv = await api.get(PV, pvc["spec"]["volumeName"])
        assert pv["metadata"]["name"] == f"pvc-{pvc['metadata']['uid']}"
        assert pv["spec"]["capacity"] == {"storage": "2Gi"}
        assert pv["spec"]["accessModes"] == ["ReadWriteMany"]
        assert pv["spec"]["mountOptions"] == ["noatime"]
        assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
        assert pv["spec"]["claimRef"]["uid"] == pvc["metadata"]["uid"]
        assert pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == DRIVER
        assert FINALIZER in pv["metadata"]["finalizers"]
        vid = pv["spec"]["csi"]["volumeHandle"]
        assert pv["spec"]["csi"]["driver"] == DRIVER
        assert pv["spec"]["csi"]["volumeAttributes"]["type"] == "shared"
        assert [v.volume.volume_id for v in await volumes(csi)] == [vid]

        await api.delete(PVC, "data", "default")
        await eventually(lambda: _gone(api, PV, pv["metadata"]["name"]), what="PV deleted")
        assert await volumes(csi) == []
    assert await history(store, vid) == [
        "VolumeRequested",
        "VolumeProvisioned",
        "PersistentVolumeCreated",
        "VolumeDeleted",
        "PersistentVolumeDeleted",
    ]


async def _gone(api, kind, name, ns=None) -> bool:
    return await get_or_none(api, kind, name, ns) is None


async def test_retain_keeps_volume_and_pv(api, csi, events):
    await api.create(STORAGE_CLASS, storage_class("keep", reclaim="Retain"))
    async with running(provisioner(api, csi, events).run(), Binder(api).run()):
        await api.create(PVC, claim("kept", "keep"))
        pvc = await eventually(lambda: bound(api, "kept"))
        await api.delete(PVC, "kept", "default")

        async def released():
            pv = await api.get(PV, pvc["spec"]["volumeName"])
            return pv["status"]["phase"] == "Released"

        await eventually(released, what="PV released")
        await asyncio.sleep(0.3)  # the provisioner had its chance to (wrongly) delete
        assert await get_or_none(api, PV, pvc["spec"]["volumeName"]) is not None
        assert len(await volumes(csi)) == 1


async def test_wait_for_first_consumer_waits_for_the_selected_node(api, csi, events):
    for node, room in (("node-a", 10 * GiB), ("node-b", 10 * GiB)):
        await add_node(api, node)
        await events.append(
            "node",
            node,
            [
                NodeCapacityReported(
                    node=node, capacity_bytes=room, available_bytes=room, local_path="/local"
                )
            ],
        )
    await api.create(STORAGE_CLASS, storage_class("local", "WaitForFirstConsumer", type="local"))
    async with running(provisioner(api, csi, events).run(), Binder(api).run()):
        await api.create(PVC, claim("db", "local", modes=("ReadWriteOnce",)))
        await asyncio.sleep(0.5)
        assert (await api.get(PVC, "db", "default"))["spec"].get("volumeName") is None
        assert await volumes(csi) == []

        await api.patch(
            PVC, "db", {"metadata": {"annotations": {ANN_SELECTED_NODE: "node-b"}}}, "default"
        )
        pvc = await eventually(lambda: bound(api, "db"), what="PVC bound")
        pv = await api.get(PV, pvc["spec"]["volumeName"])
        terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        assert terms == [
            {"matchExpressions": [{"key": TOPOLOGY_KEY, "operator": "In", "values": ["node-b"]}]}
        ]


async def test_no_room_on_selected_node_asks_the_scheduler_again(api, csi, events):
    await add_node(api, "small")
    await events.append(
        "node",
        "small",
        [
            NodeCapacityReported(
                node="small", capacity_bytes=GiB, available_bytes=100 * MiB, local_path="/l"
            )
        ],
    )
    await api.create(STORAGE_CLASS, storage_class("local", "WaitForFirstConsumer", type="local"))
    async with running(provisioner(api, csi, events).run()):
        pvc = claim("big", "local", "5Gi", modes=("ReadWriteOnce",))
        pvc["metadata"]["annotations"] = {ANN_SELECTED_NODE: "small"}
        await api.create(PVC, pvc)

        async def unselected():
            got = await api.get(PVC, "big", "default")
            return ANN_SELECTED_NODE not in (got["metadata"].get("annotations") or {})

        await eventually(unselected, what="selected-node removed")
        warnings = await _events(api, "big")
        assert any(
            e["reason"] == "ProvisioningFailed" and "small" in e["message"] for e in warnings
        )


async def _events(api, name: str) -> list[dict]:
    items, _ = await api.list(EVENT, "default")
    return [e for e in items if e["involvedObject"]["name"] == name]


async def test_permanent_failure_is_a_warning_event_on_the_claim(api, csi, events):
    await api.create(STORAGE_CLASS, storage_class("bad", colour="blue"))
    async with running(provisioner(api, csi, events).run()):
        await api.create(PVC, claim("oops", "bad"))

        async def warned():
            return [e for e in await _events(api, "oops") if e["type"] == "Warning"]

        found = await eventually(warned, what="a Warning event")
        assert found[0]["reason"] == "ProvisioningFailed"
        assert "colour" in found[0]["message"]


async def test_restart_between_create_volume_and_pv_write(api, csi, events):
    await api.create(STORAGE_CLASS, storage_class("cairn"))
    reached = asyncio.Event()

    async def crash(_pv: str) -> None:
        reached.set()
        await asyncio.Event().wait()  # "killed" here: cancelled below

    first = provisioner(api, csi, events, after_create=crash)
    async with running(first.run()):
        await api.create(PVC, claim("survivor", "cairn"))
        await asyncio.wait_for(reached.wait(), 20)
    assert len(await volumes(csi)) == 1
    assert (await api.list(PV))[0] == []
    async with running(provisioner(api, csi, events).run(), Binder(api).run()):
        await eventually(lambda: bound(api, "survivor"), what="PVC bound after restart")
    assert len(await volumes(csi)) == 1
    assert len((await api.list(PV))[0]) == 1


async def test_restart_deletes_a_volume_whose_claim_went_away_meanwhile(api, csi, events, store):
    await api.create(STORAGE_CLASS, storage_class("cairn"))
    reached = asyncio.Event()

    async def crash(_pv: str) -> None:
        reached.set()
        await asyncio.Event().wait()

    async with running(provisioner(api, csi, events, after_create=crash).run()):
        await api.create(PVC, claim("short-lived", "cairn"))
        await asyncio.wait_for(reached.wait(), 20)
    await api.delete(PVC, "short-lived", "default")  # while no provisioner runs
    assert len(await volumes(csi)) == 1
    async with running(provisioner(api, csi, events, history=store).run()):

        async def cleaned():
            return await volumes(csi) == []

        await eventually(cleaned, what="orphaned volume deleted")
    assert (await api.list(PV))[0] == []


async def test_capacity_is_published_for_local_classes(api, csi, events):
    await add_node(api, "node-a")
    await events.append(
        "node",
        "node-a",
        [
            NodeCapacityReported(
                node="node-a", capacity_bytes=10 * GiB, available_bytes=8 * GiB, local_path="/l"
            )
        ],
    )
    await api.create(STORAGE_CLASS, storage_class("local", "WaitForFirstConsumer", type="local"))
    await api.create(STORAGE_CLASS, storage_class("shared"))
    p = provisioner(api, csi, events)
    publisher = CapacityPublisher(api, csi, p, "cairn-system", 0.1)
    async with running(p.run(), publisher.run()):

        async def published():
            return (await api.list(CAPACITY, "cairn-system"))[0]

        items = await eventually(published, what="CSIStorageCapacity")
        assert len(items) == 1
        assert items[0]["storageClassName"] == "local"
        assert items[0]["nodeTopology"] == {"matchLabels": {TOPOLOGY_KEY: "node-a"}}
        assert items[0]["capacity"] == "8Gi"
