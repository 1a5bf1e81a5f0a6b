"""cairn-cache-syncer's reconcilers end to end over a real event stream (nats-server), real
sizes (cairn-meta's admin API on a real Redis file system) and the in-memory Kubernetes API:
binding, cache nodes, labels, cache status, DataLoads, expiry, deletion, replay and restart.
The node plugins' side is played by appending the events they append."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from cairn import datasets as names
from cairn.events.types import (
    DataLoadProgressed,
    NodeCacheReported,
    VolumeProvisioned,
    VolumeRequested,
    VolumeStaged,
    VolumeUnstaged,
)
from cairn.kube.api import NODE, POD, PV, PVC, labels
from cairn.kube.memory import MemoryAPI
from cairn.meta.engine import Format, format_volume
from cairn.meta.types import Ctx
from cairn.retry import Backoff
from cairn.rpc.server import RpcServer
from cairn.vfs import VFS
from cairn_cache_syncer.facts import Facts, FactsFollower
from cairn_cache_syncer.syncer import CacheSyncer
from cairn_cache_syncer.usage import MetaUsage

sys.path.insert(0, str(Path(__file__).parent.parent / "k8s"))
from kubeharness import eventually, get_or_none, running  # noqa: E402

pytestmark = pytest.mark.integration
FAST = Backoff(initial=0.05, maximum=0.5, jitter=False)
CTX = Ctx(0, 0, umask=0o022)
NS = "team"
KEY = f"{NS}/imagenet"
GiB = 1 << 30


@pytest.fixture
async def sizes(redis_url, tmp_path):
    """A Cairn file system holding /volumes/vol-1 with three files (1,000 + 2,000 + 3,000
    bytes), and cairn-meta's admin API over it: (MetaUsage, vfs)."""
    from cairn.rpc.gen import admin_pb2_grpc
    from cairn_meta.admin import Admin
    from cairn_meta.controller import FileSystems

    await format_volume(redis_url, Format(name="ds", storage=f"file://{tmp_path}/objects"))
    vfs = await VFS.open_volume(redis_url, cache_memory=4 << 20)
    top = await vfs.mkdir(CTX, 1, b"volumes", 0o755)
    vol = await vfs.mkdir(CTX, top.inode, b"vol-1", 0o755)
    for i, size in enumerate((1000, 2000, 3000)):
        fh, _ = await vfs.create(CTX, vol.inode, f"f{i}".encode(), 0o644, os.O_RDWR | os.O_CREAT)
        await vfs.write(fh, 0, b"x" * size)
        await vfs.release(fh)
    filesystems = FileSystems(redis_url)

    async def filesystem():
        return (await filesystems.get({}))[0]

    server = RpcServer("127.0.0.1:0")
    server.add(
        admin_pb2_grpc.add_AdminServicer_to_server,
        Admin("cairn-meta", vfs.meta.r, [], filesystem=filesystem),
    )
    await server.start()
    usage = MetaUsage(server.address)
    yield usage, vfs
    await usage.close()
    await server.stop(None)
    await filesystems.close()
    await vfs.close()


def node(name: str, **extra) -> dict:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **extra}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip


def dataset(name="imagenet", **spec) -> dict:
    return {"apiVersion": "data.cairn.io/v1alpha1", "kind": "Dataset",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"mounts": [{"mountPoint": "cairn://vol-1"}], **spec}}  # fmt: skip


def runtime(name="imagenet", replicas=2, **spec) -> dict:
    return {"apiVersion": "data.cairn.io/v1alpha1", "kind": "CairnRuntime",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": replicas, "tieredStore": {"levels": [
                {"mediumType": "SSD", "path": "/var/cache/cairn", "quota": "2Gi"}]}, **spec}}  # fmt: skip


def dataload(name, **spec) -> dict:
    return {"apiVersion": "data.cairn.io/v1alpha1", "kind": "DataLoad",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"dataset": {"name": "imagenet"}, **spec}}  # fmt: skip


def plain(fn):
    """`fn` as the coroutine function `eventually` polls."""

    async def check():
        return fn()

    return check


async def put(store, aggregate, key, events):
    """Appends what a node plugin or cairn-meta would."""
    await store.append(aggregate, key, events, None)


async def world(api, store, nodes=("n1", "n2", "n3")):
    for n in nodes:
        await api.create(NODE, node(n))
    await put(store, "node", "n1", [_capacity("n1", 50)])  # n1 has the most room
    await put(store, "volume", "vol-1", [
        VolumeRequested(name="pvc-1", capacity_bytes=GiB),
        VolumeProvisioned(capacity_bytes=GiB, path="/volumes/vol-1")])  # fmt: skip


def _capacity(n, gib):
    from cairn.events.types import NodeCapacityReported

    return NodeCapacityReported(node=n, capacity_bytes=100 * GiB, available_bytes=gib * GiB)


async def report(store, node_name, cached, dataset_key=KEY):
    await put(
        store,
        "node",
        node_name,
        [
            NodeCacheReported(
                node=node_name, dataset=dataset_key, cached_bytes=cached, capacity_bytes=2 * GiB
            )
        ],
    )


def syncer(api, store, usage=None, expiry=30.0):
    return CacheSyncer(api, store, usage=usage, expiry=expiry, resync=0.2, usage_ttl=0.0,
                       backoff=FAST)  # fmt: skip


async def placed(api, s, replicas: int) -> list[str]:
    """Declares the dataset with a runtime of `replicas` cache nodes; the nodes chosen."""
    await api.create(names.DATASET, dataset())
    await api.create(names.RUNTIME, runtime(replicas=replicas))

    async def chosen():
        d = s.facts.datasets.get(KEY)
        return list(d.nodes) if d and len(d.nodes) == replicas else None

    return await eventually(chosen, 10, f"{replicas} cache node(s)")


async def get(api, kind, name, ns=NS):
    return await get_or_none(api, kind, name, ns)


async def phase(api, name="imagenet"):
    obj = await get(api, names.DATASET, name)
    return (obj or {}).get("status", {}).get("phase")


async def node_labels(api):
    nodes, _ = await api.list(NODE)
    return {n["metadata"]["name"]: {k: v for k, v in labels(n).items()
                                    if k.startswith(names.PREFIX)} for n in nodes}  # fmt: skip


async def test_dataset_binds_caches_labels_and_reports(store, sizes):
    usage, _ = sizes
    api = MemoryAPI()
    await world(api, store)
    s = syncer(api, store, usage)
    async with running(s.run()):
        await api.create(names.DATASET, dataset())
        await api.create(names.RUNTIME, runtime())

        async def bound():
            ds = await get(api, names.DATASET, "imagenet")
            st = (ds or {}).get("status", {})
            return st if st.get("phase") == "Bound" and st.get("fileNum") else None

        st = await eventually(bound, 10, "dataset bound with sizes")
        # the space the files take, as du counts it (4 KiB pages), and the files
        assert st["ufsTotal"] == "12.00KiB" and st["fileNum"] == "3"
        pv = await get_or_none(api, PV, "team-imagenet")
        pvc = await get(api, PVC, "imagenet")
        assert pv["spec"]["csi"]["volumeHandle"] == "team-imagenet"
        assert pv["spec"]["csi"]["volumeAttributes"]["path"] == "/volumes/vol-1"
        assert pv["spec"]["csi"]["volumeAttributes"]["readOnly"] == "true"
        assert pvc["spec"]["volumeName"] == "team-imagenet"
        uid = (await get(api, names.DATASET, "imagenet"))["metadata"]["uid"]
        s_label = names.cache_label(NS, "imagenet", uid)

        async def two_cache_nodes():
            lab = await node_labels(api)
            cached = sorted(n for n, v in lab.items() if v.get(s_label) == "true")
            return cached if len(cached) == 2 else None

        cache_nodes = await eventually(two_cache_nodes, 10, "two cache nodes labelled")
        assert "n1" in cache_nodes  # the most free space first
        lab = await node_labels(api)
        for n in cache_nodes:
            assert lab[n][names.capacity_label(NS, "imagenet", uid)] == "2Gi"
            assert lab[n][names.DATASET_NUM] == "1"
        other = ({"n1", "n2", "n3"} - set(cache_nodes)).pop()
        assert lab[other] == {}

        # the node plugins report; a pod's node stages the volume
        await report(store, cache_nodes[0], 3000)
        await report(store, cache_nodes[1], 1500)
        await put(store, "volume", "team-imagenet", [
            VolumeStaged(node=other, staging_path="/var/lib/kubelet/x")])  # fmt: skip

        async def cached():
            st = (await get(api, names.DATASET, "imagenet"))["status"]
            return st if st["cacheStates"]["cached"] == "4.39KiB" else None

        st = await eventually(cached, 10, "cacheStates from the reports")
        assert st["cacheStates"]["cachedPercentage"] == "36.6%"  # 4,500 of 12,288
        assert st["cacheStates"]["cacheCapacity"] == "4.00GiB"

        async def fuse_label():
            lab = (await node_labels(api))[other]
            return lab if lab.get(names.fuse_label(NS, "imagenet", uid)) == "true" else None

        assert (await eventually(fuse_label, 10, "fuse label"))[names.DATASET_NUM] == "1"
        rt = await get(api, names.RUNTIME, "imagenet")
        rs = rt["status"]
        assert (rs["desiredReplicas"], rs["currentReplicas"], rs["readyReplicas"]) == (2, 2, 2)
        assert rs["cachePhase"] == "Ready" and rs["selector"] == f"{s_label}=true"

        # OnRuntimeDeleted keeps the fuse label after unstaging
        await put(store, "volume", "team-imagenet", [
            VolumeUnstaged(node=other, staging_path="/var/lib/kubelet/x")])  # fmt: skip
        await asyncio.sleep(0.5)
        assert (await node_labels(api))[other].get(names.fuse_label(NS, "imagenet", uid))

        # replaying the stream gives the same facts; a restarted syncer changes nothing
        replayed = FactsFollower(store, Facts())
        await replayed.catch_up()
        await s.follower.catch_up()
        assert replayed.facts.snapshot() == s.facts.snapshot()
    before = await store.last_sequence()
    labels_before = await node_labels(api)
    again = syncer(api, store, usage)
    async with running(again.run()):
        await asyncio.sleep(1.0)
        await again.wait_idle()
    assert await node_labels(api) == labels_before
    assert await store.last_sequence() == before, "a restarted syncer recorded new events"

    # deleting the runtime: dataset NotBound, PV/PVC and every label gone
    async with running(again.run()):
        await api.delete(names.RUNTIME, "imagenet", NS)

        async def unbound():
            lab = await node_labels(api)
            return (await phase(api) == "NotBound" and not any(lab.values())
                    and await get(api, names.RUNTIME, "imagenet") is None
                    and await get(api, PVC, "imagenet") is None)  # fmt: skip

        await eventually(unbound, 10, "unbound, labels removed")
        assert await get_or_none(api, PV, "team-imagenet") is None


async def test_dead_node_loses_labels_and_cache_node_is_replaced(store):
    api = MemoryAPI()
    await world(api, store)
    s = syncer(api, store, expiry=1.5)
    async with running(s.run()):
        (first,) = await placed(api, s, 1)
        uid = (await get(api, names.DATASET, "imagenet"))["metadata"]["uid"]
        s_label = names.cache_label(NS, "imagenet", uid)
        # a node whose NodeStage failed never staged: it never gets a fuse label; the cache
        # node reports a while, then dies (stops reporting)
        for _ in range(3):
            await report(store, first, 100)
            await asyncio.sleep(0.3)

        async def moved():
            d = s.facts.datasets[KEY]
            lab = await node_labels(api)
            return (d.nodes and d.nodes[0] != first and s_label not in lab[first]
                    and lab[d.nodes[0]].get(s_label) == "true")  # fmt: skip

        await eventually(moved, 15, "the dead node's labels removed and a new cache node")
        st = (await get(api, names.DATASET, "imagenet"))["status"]
        assert st["cacheStates"]["cached"] == "0.00B"  # the dead node's cache does not count


async def test_deleting_a_dataset_in_use_waits_and_says_so(store):
    api = MemoryAPI()
    await world(api, store)
    s = syncer(api, store)
    async with running(s.run()):
        await api.create(names.DATASET, dataset())
        await api.create(names.RUNTIME, runtime(replicas=1))
        await eventually(lambda: phase(api), 10, "bound")
        await eventually(lambda: get(api, PVC, "imagenet"), 10, "claim")
        await api.create(POD, {"metadata": {"name": "trainer", "namespace": NS}, "spec": {
            "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "imagenet"}}],
            "containers": [{"name": "c", "image": "x"}]}})  # fmt: skip
        await api.delete(names.DATASET, "imagenet", NS)

        async def waiting():
            ds = await get(api, names.DATASET, "imagenet")
            conds = (ds or {}).get("status", {}).get("conditions") or []
            return [c for c in conds if c["type"] == "Deleting" and c["reason"] == "InUse"]

        cond = await eventually(waiting, 10, "a Deleting condition")
        assert "trainer" in cond[0]["message"]
        from cairn.kube.api import EVENT

        events, _ = await api.list(EVENT, NS)
        assert any(e["reason"] == "DatasetInUse" for e in events)
        await api.delete(POD, "trainer", NS)

        async def gone():
            return await get(api, names.DATASET, "imagenet") is None

        await eventually(gone, 10, "dataset deleted once the pod went")
        assert await get(api, PVC, "imagenet") is None


async def test_dataloads_run_one_at_a_time_and_fail_when_a_node_dies(store):
    api = MemoryAPI()
    await world(api, store)
    s = syncer(api, store, expiry=2.0)
    async with running(s.run()):
        nodes = await placed(api, s, 2)
        for n in nodes:
            await report(store, n, 0)
        await api.create(names.DATALOAD, dataload("warm", target=[
            {"path": "/a", "replicas": 1}, {"path": "/b", "replicas": 1}]))  # fmt: skip
        await asyncio.sleep(0.05)
        await api.create(names.DATALOAD, dataload("second"))

        async def started():
            return s.facts.loads.get(f"{NS}/warm")

        run = await eventually(started, 10, "first DataLoad started")
        assert sorted(run.assignments) == sorted(nodes)
        assert sorted(p for ps in run.assignments.values() for p in ps) == ["/a", "/b"]
        second = await get(api, names.DATALOAD, "second")
        await eventually(lambda: _dl_phase(api, "second", "Pending"), 10, "second pending")
        second = await get(api, names.DATALOAD, "second")
        assert "warm" in second["status"]["conditions"][0]["message"]
        for i, n in enumerate(nodes):
            await put(store, "dataload", f"{NS}/warm", [DataLoadProgressed(
                node=n, run=1, files=2, bytes=100 * (i + 1), done=True)])  # fmt: skip
        dl = await eventually(lambda: _dl_phase(api, "warm", "Complete"), 10, "complete")
        assert dl["status"]["loadedFiles"] == 4 and dl["status"]["loadedBytes"] == 300
        # the second one runs now; one node finishes, the other dies
        run2 = await eventually(
            plain(lambda: s.facts.loads.get(f"{NS}/second")), 10, "second started"
        )
        alive = sorted(run2.assignments)[0]
        await put(store, "dataload", f"{NS}/second", [DataLoadProgressed(
            node=alive, run=1, files=1, bytes=10, done=False)])  # fmt: skip
        for _ in range(12):  # only `alive` keeps reporting
            await report(store, alive, 0)
            await asyncio.sleep(0.25)
            if await _dl_phase(api, "second", "Failed"):
                break
        dl = await eventually(lambda: _dl_phase(api, "second", "Failed"), 10, "failed")
        assert "stopped reporting" in dl["status"]["conditions"][0]["message"]


async def test_cron_dataload_runs_again_and_ttl_removes_it(store):
    api = MemoryAPI()
    await world(api, store)
    s = syncer(api, store)
    async with running(s.run()):
        nodes = await placed(api, s, 1)
        await report(store, nodes[0], 0)
        await api.create(names.DATALOAD, dataload("nightly", policy="Cron",
                                                  schedule="* * * * * */2"))  # fmt: skip
        for run in (1, 2):
            await eventually(plain(lambda run=run: (s.facts.loads.get(f"{NS}/nightly") or None)
                                   and s.facts.loads[f"{NS}/nightly"].run == run), 10,
                             f"run {run}")  # fmt: skip
            await put(store, "dataload", f"{NS}/nightly", [DataLoadProgressed(
                node=nodes[0], run=run, files=1, bytes=1, done=True)])  # fmt: skip
        await api.create(names.DATALOAD, dataload("once", ttlSecondsAfterFinished=0))

        async def once_started():
            return s.facts.loads.get(f"{NS}/once")

        await eventually(once_started, 15, "once started")
        await put(store, "dataload", f"{NS}/once", [DataLoadProgressed(
            node=nodes[0], run=1, files=1, bytes=1, done=True)])  # fmt: skip

        async def removed():
            return await get(api, names.DATALOAD, "once") is None

        await eventually(removed, 10, "finished DataLoad removed after its TTL")


async def _dl_phase(api, name, wanted):
    dl = await get(api, names.DATALOAD, name)
    return dl if (dl or {}).get("status", {}).get("phase") == wanted else None


async def test_exclusive_placement_and_scale_in(store):
    api = MemoryAPI()
    await world(api, store)
    s = syncer(api, store)
    async with running(s.run()):
        await api.create(names.DATASET, dataset(placement="Exclusive"))
        await api.create(names.RUNTIME, runtime(replicas=2))
        await eventually(plain(lambda: len(getattr(s.facts.datasets.get(KEY), "nodes", [])) == 2),
                         10, "the exclusive dataset placed first")  # fmt: skip
        await api.create(names.DATASET, dataset("other"))
        await api.create(names.RUNTIME, runtime("other", replicas=3))

        async def placed():
            a, b = s.facts.datasets.get(KEY), s.facts.datasets.get(f"{NS}/other")
            return (a, b) if a and b and len(a.nodes) == 2 and b.nodes else None

        a, b = await eventually(placed, 10, "both placed")
        assert not set(a.nodes) & set(b.nodes) and len(b.nodes) == 1
        for n in a.nodes:
            await report(store, n, 1000)
        await eventually(lambda: _cached(api, "1.95KiB"), 10, "both caches count")
        await api.patch(names.RUNTIME, "imagenet", {"spec": {"replicas": 1}}, NS)
        await eventually(lambda: _cached(api, "1000.00B"), 10, "scale-in: one cache counts")
        rt = await get(api, names.RUNTIME, "imagenet")
        assert rt["status"]["currentReplicas"] == 1


async def _cached(api, wanted):
    ds = await get(api, names.DATASET, "imagenet")
    return (ds or {}).get("status", {}).get("cacheStates", {}).get("cached") == wanted


class CrashingAPI:
    """The in-memory API, but the syncer dies right after the call `verb` on `kind` went
    through (its task is cancelled there, as a SIGKILL would stop it between two writes)."""

    def __init__(self, api, verb: str, kind: str):
        self.api, self.verb, self.kind = api, verb, kind
        self.task: asyncio.Task | None = None
        self.crashed = asyncio.Event()

    def __getattr__(self, name):
        call = getattr(self.api, name)
        if name != self.verb:
            return call

        async def then_die(kind, *args, **kwargs):
            answer = await call(kind, *args, **kwargs)
            if kind.kind == self.kind and not self.crashed.is_set():
                self.crashed.set()
                self.task.cancel()
                await asyncio.sleep(3600)  # the cancellation lands here
            return answer

        return then_die


@pytest.mark.parametrize("verb,kind", [("create", "PersistentVolume"),
                                       ("create", "PersistentVolumeClaim"),
                                       ("patch", "Node"),
                                       ("update_status", "Dataset")])  # fmt: skip
async def test_syncer_killed_mid_reconcile_converges_after_restart(store, verb, kind):
    api = MemoryAPI()
    await world(api, store)
    crashing = CrashingAPI(api, verb, kind)
    first = syncer(crashing, store)
    crashing.task = asyncio.create_task(first.run())
    await api.create(names.DATASET, dataset())
    await api.create(names.RUNTIME, runtime(replicas=2))
    await asyncio.wait_for(crashing.crashed.wait(), 10)
    await asyncio.gather(crashing.task, return_exceptions=True)
    again = syncer(api, store)
    async with running(again.run()):

        async def settled():
            lab = await node_labels(api)
            return (await phase(api) == "Bound" and await get(api, PVC, "imagenet")
                    and sum(1 for v in lab.values() if v) == 2)  # fmt: skip

        await eventually(settled, 10, "bound and two cache nodes labelled after the restart")
        await again.wait_idle()
    history = await store.load("dataset", KEY)
    types = [e.type for e in history]
    assert types.count("DatasetBound") == 1 and types.count("RuntimeScaled") == 1, types
    pvs, _ = await api.list(PV)
    assert [p["metadata"]["name"] for p in pvs] == ["team-imagenet"]
    replayed = FactsFollower(store, Facts())
    await replayed.catch_up()
    assert replayed.facts.snapshot()["datasets"] == again.facts.snapshot()["datasets"]
