"""cairn-nodeplugin's half of datasets, with real parts: nats-server, redis-server, a formatted
file:// file system holding the dataset's files, FUSE mounts, and the node plugin called over
its CSI socket as kubelet calls it. The cache-syncer's decisions are appended as events by the
test (RuntimeScaled, DataLoadStarted); the node plugin's facts are read back from the stream
(NodeCacheReported, DataLoadProgressed). The story: the node becomes a cache node (its
directory appears, reports start), warms the whole dataset through a temporary mount,
serves the dataset's volume read-only from that cache, warms part of it again through the
staged mount, survives a restart and a dead mount, and drops its directory once it neither
caches nor stages the dataset. Whatever was mounted is unmounted and every process started is
stopped by its PID."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import test_csi_node as base
from _mount_helpers import Volume, start_mount, stop_mount
from test_csi_node import (
    NODE,
    MiB,
    alive,
    cap,
    format_fs,
    mounted,
    read_file,
    readable,
    staging_of,
    target_of,
    twice,
    wait_until,
    write_errno,
)

from cairn import localstack
from cairn.events import EventStore, JetStreamBus
from cairn.events.types import DataLoadStarted, DatasetBound, RuntimeScaled
from cairn.fuse.control import request as control_request
from cairn.rpc.channel import connect
from cairn.rpc.gen import csi_pb2, csi_pb2_grpc

DATASET = "default/ds1"
HANDLE = "default-ds1"  # its volume handle and its cache directory's name
LOAD = "default/warm-ds1"
SOURCE = "/data/ds1"  # the dataset's directory in the file system
QUOTA = 64 * MiB
FILES = {
    "a.bin": os.urandom(MiB + 123),
    "b.bin": os.urandom(700_000),
    "sub/c.bin": os.urandom(300_000),
    "sub/d.bin": os.urandom(5_000),
    "sub/deeper/e.bin": os.urandom(1_500_000),
}
TOTAL = sum(len(d) for d in FILES.values())
SUB = {k: v for k, v in FILES.items() if k.startswith("sub/")}
MOUNTS = [{"name": "data", "path": SOURCE, "read_only": True, "volume": ""}]


def write_dataset(c: base.Cluster) -> None:
    """The dataset's files, written through a mount of the file system of its own."""
    m = start_mount(Volume(c.redis.url, c.store, "fs"), c.root / "writer", c.root / "writer-work")
    try:
        for name, data in FILES.items():
            path = m.path / SOURCE.lstrip("/") / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    finally:
        stop_mount(m)


@contextlib.contextmanager
def node_with_files(tmp_path_factory, name: str, write: Callable[[base.Cluster], None]):
    """nats-server, redis-server, a file system with `write`'s files and the node plugin
    (cache reports every second); everything stopped after, the node plugin first (its
    watcher would bring back what the teardown unmounts)."""
    problem = base._fuse_problem()
    if problem:
        pytest.skip(problem)
    root = tmp_path_factory.mktemp(name)
    nats = localstack.start_tcp(localstack.nats_server(root / "nats"))
    c = base.Cluster(root=root, nats=nats, redis=localstack.redis_server(root / "redis"),
                     store=root / "store")  # fmt: skip
    try:
        localstack.start_tcp(c.redis)
        format_fs(c.redis.url, "fs", c.store)
        write(c)
        c.node_argv = [sys.executable, "-m", "cairn_nodeplugin", "--nats-url", nats.url,
                       "--data-dir", str(root / "node-data"), "--csi-endpoint", c.node_csi,
                       "--node-id", NODE, "--kubelet-dir", str(c.kubelet),
                       "--meta-url", c.redis.url, "--local-root", str(c.local_root),
                       "--watch-interval", "0.3", "--cache-report-interval", "1"]  # fmt: skip
        c.start_node()
        yield c
    finally:
        c.stop_node()
        c.teardown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with node_with_files(tmp_path_factory, "datasets", write_dataset) as c:
        yield c


@pytest.fixture
async def store(cluster):
    bus = await JetStreamBus.connect(cluster.nats.url)
    yield EventStore(bus)
    await bus.close()


# -- what the test appends as the syncer, and reads back ------------------------------------------


def scaled(nodes: list[str], tier: Path) -> RuntimeScaled:
    return RuntimeScaled(replicas=len(nodes), nodes=nodes, mounts=MOUNTS, tiers=[
        {"mediumType": "SSD", "path": str(tier), "quota": QUOTA, "high": "0.95", "low": "0.7"}])  # fmt: skip


async def until(find: Callable, timeout: float = 20.0, what: str = "condition"):
    """Polls the awaitable `find()` until it answers something truthy; that answer."""
    deadline = time.monotonic() + timeout
    while True:
        found = await find()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.1)


async def cache_reports(store: EventStore) -> list[dict]:
    return [e.payload for e in await store.load("node", NODE)
            if e.type == "NodeCacheReported" and e.payload["dataset"] == DATASET]  # fmt: skip


async def report_where(store: EventStore, wanted: Callable[[dict], bool], after: int = 0) -> dict:
    """The first NodeCacheReported of the dataset, from the `after`th on, that fits."""

    async def find():
        return next((r for r in (await cache_reports(store))[after:] if wanted(r)), None)

    return await until(find, what="a NodeCacheReported that fits")


async def progress(store: EventStore, run: int) -> list[dict]:
    return [e.payload for e in await store.load("dataload", LOAD)
            if e.type == "DataLoadProgressed" and e.payload["run"] == run]  # fmt: skip


async def finished(store: EventStore, run: int) -> dict:
    async def find():
        return next((p for p in await progress(store, run) if p["done"]), None)

    return await until(find, 30, f"run {run} done")


def cmdline(pid: int) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def mounts_below(path: Path) -> list[str]:
    prefix = str(path) + "/"
    return [p for p in base.mount_points() if p.startswith(prefix)]


# -- the story ----------------------------------------------------------------------------------


async def test_dataset_cached_warmed_served_and_dropped(cluster, store):
    tier = cluster.root / "tiers" / "ssd"
    cache = tier / HANDLE

    # The syncer binds the dataset and makes this node one of its cache nodes.
    await store.append("dataset", DATASET, [DatasetBound(
        runtime="ds1", uid="uid-1", volume_handle=HANDLE, pv=HANDLE, pvc="ds1",
        mounts=MOUNTS)], None)  # fmt: skip
    await store.append("dataset", DATASET, [scaled([NODE], tier)], None)
    await until(lambda: asyncio.to_thread(cache.is_dir), what="the dataset's cache directory")
    first = await report_where(store, lambda r: r["capacity_bytes"] == QUOTA)
    assert first["cached_bytes"] == 0 and first["node"] == NODE
    # Reports keep coming (the heartbeat, every second here) while nothing changes.
    seen = len(await cache_reports(store))
    await report_where(store, lambda r: True, after=seen)

    # Run 1 loads all of it ("/"), through a temporary mount (the dataset is not staged).
    await store.append("dataload", LOAD, [DataLoadStarted(
        dataset=DATASET, run=1, assignments={NODE: ["/"], "node-b": ["/"]})], None)  # fmt: skip
    done = await finished(store, 1)
    assert (done["files"], done["bytes"], done["error"]) == (len(FILES), TOTAL, "")
    steps = await progress(store, 1)
    assert [p["bytes"] for p in steps] == sorted(p["bytes"] for p in steps)  # cumulative
    assert not mounts_below(cluster.node_data / "warmup")  # the temporary mount is gone
    grown = await report_where(store, lambda r: r["cached_bytes"] >= TOTAL)
    assert grown["cached_bytes"] <= TOTAL + TOTAL // 100  # the blocks and their checksums

    # The same run delivered again is skipped: no second count of it.
    await store.append("dataload", LOAD, [DataLoadStarted(
        dataset=DATASET, run=1, assignments={NODE: ["/"]})], None)  # fmt: skip
    await asyncio.sleep(2)
    assert [p["done"] for p in await progress(store, 1)].count(True) == 1

    async with connect(cluster.node_csi) as channel:
        node = csi_pb2_grpc.NodeStub(channel)
        # The dataset's volume, as the syncer's static PV gives it: read-only whatever the
        # access mode, its block cache the one the warm-up filled.
        context = {"type": "dataset", "dataset": DATASET, "path": SOURCE, "readOnly": "true",
                   "cacheDir": str(tier), "cacheSize": str(QUOTA)}  # fmt: skip
        staging = staging_of(cluster, HANDLE)
        stage = csi_pb2.NodeStageVolumeRequest(
            volume_id=HANDLE, staging_target_path=staging, volume_capability=cap(),
            volume_context=context)  # fmt: skip
        await twice(node.NodeStageVolume, stage)
        pid = cluster.mount_pid(HANDLE)
        argv = cmdline(pid)
        assert "--read-only" in argv
        assert option(argv, "--cache-dir") == str(cache)
        assert option(argv, "--cache-size") == str(QUOTA)
        assert option(argv, "--subdir") == SOURCE
        assert cluster.state()[HANDLE]["dataset"] == DATASET
        target = target_of(cluster, "pod-ds", HANDLE)
        publish = csi_pb2.NodePublishVolumeRequest(
            volume_id=HANDLE, staging_target_path=staging, target_path=target,
            volume_capability=cap(), volume_context=context)  # fmt: skip
        await twice(node.NodePublishVolume, publish)
        for name, data in FILES.items():
            assert await asyncio.to_thread(read_file, f"{target}/{name}") == data
        assert await asyncio.to_thread(write_errno, f"{target}/new.bin") == errno.EROFS
        stats = await control_request(target, "stats")
        assert stats["block_cache"]["disk_hits"] > 0  # served from the warmed cache
        history = [e.type for e in await store.load("volume", HANDLE)]
        assert history == ["VolumeStaged", "VolumePublished"]

        # Run 2 loads a part through the staged mount; a path not in the dataset is an error
        # of the share, the rest is loaded all the same.
        await store.append("dataload", LOAD, [DataLoadStarted(
            dataset=DATASET, run=2, assignments={NODE: ["/sub", "/missing"]})], None)  # fmt: skip
        done = await finished(store, 2)
        assert (done["files"], done["bytes"]) == (len(SUB), sum(len(d) for d in SUB.values()))
        assert "/missing: no such file or directory" in done["error"]
        assert not mounts_below(cluster.node_data / "warmup")

        # A restart of the plugin without its state file, then a dead mount: the mount comes
        # back with the dataset's cache and read-only, from the running process's options.
        cluster.stop_node()
        (cluster.node_data / "volumes.json").unlink()
        cluster.start_node()
        assert cluster.mount_pid(HANDLE) == pid
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), 5, "the mount process's death")
        wait_until(lambda: readable(f"{target}/a.bin"), 15, "the repaired mount")
        argv = cmdline(cluster.mount_pid(HANDLE))
        assert "--read-only" in argv and option(argv, "--cache-dir") == str(cache)
        assert await asyncio.to_thread(read_file, f"{target}/a.bin") == FILES["a.bin"]

    # The node is no cache node any more, but the dataset is staged: its cache stays.
    async with connect(cluster.node_csi) as channel:
        node = csi_pb2_grpc.NodeStub(channel)
        seen = len(await cache_reports(store))
        await store.append("dataset", DATASET, [scaled([], tier)], None)
        staged_only = await report_where(store, lambda r: r["cached_bytes"] > 0, after=seen)
        await asyncio.sleep(1.5)
        assert cache.is_dir()
        assert staged_only["capacity_bytes"] == QUOTA  # the volume's cacheSize
        seen = len(await cache_reports(store))
        await twice(node.NodeUnpublishVolume,
                    csi_pb2.NodeUnpublishVolumeRequest(volume_id=HANDLE, target_path=target))  # fmt: skip
        await twice(node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
            volume_id=HANDLE, staging_target_path=staging))  # fmt: skip
    assert not mounted(staging)
    # Unstaged: the directory goes, and a last report says the node holds nothing of it.
    wait_until(lambda: not cache.exists(), 10, "the cache directory's removal")
    assert tier.is_dir()  # the tier itself stays
    await report_where(store, lambda r: (r["cached_bytes"], r["capacity_bytes"]) == (0, 0),
                       after=seen)  # fmt: skip
    count = len(await cache_reports(store))
    await asyncio.sleep(2)
    assert len(await cache_reports(store)) == count  # and no more heartbeats for it


async def test_failed_stage_leaves_no_fact_behind_under_a_custom_kubelet_root(cluster, store):
    """Fluid's users see nodes keep a dataset's label after a NodeStage that failed, and mounts
    break when kubelet's root is not /var/lib/kubelet. Here kubelet's root is a directory of
    the test's own, and a NodeStage that fails (its directory is not in the file system)
    appends no VolumeStaged, the only fact a node label is derived from, and leaves no mount."""
    import grpc

    assert not str(cluster.kubelet).startswith("/var/lib/kubelet")
    handle = "team-broken"
    context = {"type": "dataset", "dataset": "team/broken", "path": "/no/such/dir",
               "readOnly": "true"}  # fmt: skip
    staging = staging_of(cluster, handle)
    async with connect(cluster.node_csi) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await csi_pb2_grpc.NodeStub(channel).NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=handle, staging_target_path=staging, volume_capability=cap(),
                volume_context=context))  # fmt: skip
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND, failed.value.details()
    assert str(staging).startswith(str(cluster.kubelet))
    assert [e.type for e in await store.load("volume", handle)] == []
    assert not mounts_below(Path(staging).parent)
