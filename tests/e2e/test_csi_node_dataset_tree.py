"""A dataset of two mounts served as one tree by cairn-nodeplugin, with real parts: nats-server,
redis-server, a formatted file:// file system holding two directories of different volumes,
FUSE and bind mounts, the node plugin called over its CSI socket as kubelet calls it. The
cache-syncer's decisions are appended as events by the test.

The story: a warm-up of "/" loads both mounts through a temporary mount; the dataset's
volume is staged (one mount process of the mounts' common directory, hidden, and a tree of
binds at the staging path) and published; the pod's target shows exactly the two mounts,
read-only; a warm-up of one mount goes through the staged mount; a killed mount process
comes back with its binds and the target's; a restart without the state file rebuilds the
tree from the mount table and still repairs it; unpublish and unstage leave no mount. A
writable dataset keeps a read-only mount read-only. Whatever was mounted is unmounted and
every process started is stopped by its PID."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import test_csi_node as base
from _mount_helpers import Volume, start_mount, stop_mount
from test_csi_node import (
    NODE,
    MiB,
    Mode,
    alive,
    cap,
    mount_points,
    read_file,
    readable,
    staging_of,
    target_of,
    twice,
    wait_until,
    write_errno,
)
from test_csi_node_datasets import cmdline, node_with_files, option, until

from cairn.events import EventStore, JetStreamBus
from cairn.events.types import DataLoadStarted, DatasetBound, RuntimeScaled
from cairn.rpc.channel import connect
from cairn.rpc.gen import csi_pb2, csi_pb2_grpc

DATASET = "default/tree"
HANDLE = "default-tree"
LOAD = "default/warm-tree"
QUOTA = 64 * MiB
# Two directories of two volumes; their common directory /vols holds more (v1/private) that
# pods must not see.
TRAIN, LABELS = "/vols/v1/train", "/vols/v2/labels"
FILES = {
    f"{TRAIN}/a.bin": os.urandom(MiB + 77),
    f"{TRAIN}/sub/b.bin": os.urandom(300_000),
    f"{LABELS}/c.txt": os.urandom(40_000),
    f"{LABELS}/deep/er/d.bin": os.urandom(900_000),
    "/vols/v1/private/x.bin": os.urandom(1000),
}
MOUNTS = [{"name": "train", "path": TRAIN, "read_only": True, "volume": "v1"},
          {"name": "labels", "path": LABELS, "read_only": True, "volume": "v2"}]  # fmt: skip
IN_TREE = {
    "train/a.bin": FILES[f"{TRAIN}/a.bin"],
    "train/sub/b.bin": FILES[f"{TRAIN}/sub/b.bin"],
    "labels/c.txt": FILES[f"{LABELS}/c.txt"],
    "labels/deep/er/d.bin": FILES[f"{LABELS}/deep/er/d.bin"],
}
LABEL_FILES = {k: v for k, v in IN_TREE.items() if k.startswith("labels/")}


def write_files(c: base.Cluster) -> None:
    m = start_mount(Volume(c.redis.url, c.store, "fs"), c.root / "writer", c.root / "writer-work")
    try:
        for name, data in FILES.items():
            path = m.path / name.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    finally:
        stop_mount(m)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with node_with_files(tmp_path_factory, "tree", write_files) as c:
        yield c


@pytest.fixture
async def store(cluster):
    bus = await JetStreamBus.connect(cluster.nats.url)
    yield EventStore(bus)
    await bus.close()


def below(path: str | Path) -> list[str]:
    """Mountpoints at or below `path` in /proc/self/mountinfo."""
    prefix = str(path).rstrip("/") + "/"
    return [p for p in mount_points() if p == str(path) or p.startswith(prefix)]


def context(tier: Path, read_only: bool = True, mounts: list[dict] = MOUNTS) -> dict[str, str]:
    """The volume_context of the syncer's static PV for a dataset of several mounts."""
    return {"type": "dataset", "dataset": DATASET, "path": mounts[0]["path"],
            "mounts": json.dumps(mounts, sort_keys=True),
            "readOnly": "true" if read_only else "false",
            "cacheDir": str(tier), "cacheSize": str(QUOTA)}  # fmt: skip


async def finished(store: EventStore, run: int) -> dict:
    async def find():
        return next((e.payload for e in await store.load("dataload", LOAD)
                     if e.type == "DataLoadProgressed" and e.payload["run"] == run
                     and e.payload["done"]), None)  # fmt: skip

    return await until(find, 30, f"run {run} done")


def tree_of(target: str) -> dict[str, bytes]:
    """Every file under `target`, by its path in the tree."""
    out = {}
    for top, _, files in os.walk(target):
        for name in files:
            path = os.path.join(top, name)
            out[os.path.relpath(path, target)] = read_file(path)
    return out


async def test_two_mounts_are_one_read_only_tree(cluster, store):
    tier = cluster.root / "tiers" / "ssd"
    await store.append("dataset", DATASET, [DatasetBound(
        runtime="tree", uid="uid-t", volume_handle=HANDLE, pv=HANDLE, pvc="tree",
        mounts=MOUNTS)], None)  # fmt: skip
    await store.append("dataset", DATASET, [RuntimeScaled(replicas=1, nodes=[NODE], mounts=MOUNTS,
        tiers=[{"mediumType": "SSD", "path": str(tier), "quota": QUOTA}])], None)  # fmt: skip
    await until(lambda: asyncio.to_thread((tier / HANDLE).is_dir), what="the cache directory")

    # "/" of the tree is both mounts, loaded through a temporary mount of their common
    # directory: the private directory beside them is not part of it.
    await store.append("dataload", LOAD, [DataLoadStarted(
        dataset=DATASET, run=1, assignments={NODE: ["/"]})], None)  # fmt: skip
    done = await finished(store, 1)
    assert (done["files"], done["bytes"], done["error"]) == (
        len(IN_TREE), sum(len(d) for d in IN_TREE.values()), "")  # fmt: skip
    assert not below(cluster.node_data / "warmup")

    staging = staging_of(cluster, HANDLE)
    target = target_of(cluster, "pod-tree", HANDLE)
    hidden = cluster.node_data / "datasets" / HANDLE / "fs"
    ctx = context(tier)
    async with connect(cluster.node_csi) as channel:
        node = csi_pb2_grpc.NodeStub(channel)
        stage = csi_pb2.NodeStageVolumeRequest(
            volume_id=HANDLE, staging_target_path=staging, volume_capability=cap(),
            volume_context=ctx)  # fmt: skip
        await twice(node.NodeStageVolume, stage)
        pid = cluster.mount_pid(HANDLE)
        argv = cmdline(pid)
        assert option(argv, "--subdir") == "/vols" and str(hidden) in argv
        assert "--read-only" in argv and option(argv, "--cache-dir") == str(tier / HANDLE)
        assert sorted(os.listdir(staging)) == ["labels", "train"]
        assert sorted(below(staging)) == [staging, f"{staging}/labels", f"{staging}/train"]
        record = cluster.state()[HANDLE]
        assert record["fs_path"] == str(hidden) and record["source"] == "/vols"
        assert [b["name"] for b in record["tree"]] == ["train", "labels"]

        publish = csi_pb2.NodePublishVolumeRequest(
            volume_id=HANDLE, staging_target_path=staging, target_path=target,
            volume_capability=cap(), volume_context=ctx)  # fmt: skip
        await twice(node.NodePublishVolume, publish)
        assert sorted(os.listdir(target)) == ["labels", "train"]
        assert await asyncio.to_thread(tree_of, target) == IN_TREE
        for path in ("new.bin", "train/new.bin", "labels/deep/new.bin"):
            assert await asyncio.to_thread(write_errno, f"{target}/{path}") == errno.EROFS
        stats = await node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=HANDLE, volume_path=target))  # fmt: skip
        assert not stats.volume_condition.abnormal and stats.usage  # the mount's numbers

        # Part of the tree, through the staged mount; a name that is no mount is an error
        # of the share.
        await store.append("dataload", LOAD, [DataLoadStarted(
            dataset=DATASET, run=2, assignments={NODE: ["/labels", "/private"]})], None)  # fmt: skip
        done = await finished(store, 2)
        assert (done["files"], done["bytes"]) == (
            len(LABEL_FILES), sum(len(d) for d in LABEL_FILES.values()))  # fmt: skip
        assert "/private: the dataset has no mount named 'private'" in done["error"]
        assert not below(cluster.node_data / "warmup")

        # A dead mount process: a new one, the branches bound again, then the target.
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), 5, "the mount process's death")
        wait_until(lambda: readable(f"{target}/train/a.bin")
                   and readable(f"{target}/labels/c.txt"), 20, "the repaired tree")  # fmt: skip
        assert await asyncio.to_thread(tree_of, target) == IN_TREE
        assert cluster.mount_pid(HANDLE) != pid
        recovered = [e.payload for e in await store.load("volume", HANDLE)
                     if e.type == "MountRecovered"]  # fmt: skip
        assert recovered and recovered[-1]["targets"] == [target]

        # A restart without the state file: the tree comes back from the events and the mount
        # table, and a dead process is still repaired with its branches.
        cluster.stop_node()
        (cluster.node_data / "volumes.json").unlink()
        cluster.start_node()
        pid = cluster.mount_pid(HANDLE)
        record = cluster.state()[HANDLE]
        assert record["fs_path"] == str(hidden) and record["source"] == "/vols"
        assert {(b["name"], b["path"], b["read_only"]) for b in record["tree"]} == {
            ("train", TRAIN, True), ("labels", LABELS, True)}  # fmt: skip
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), 5, "the mount process's death")
        wait_until(lambda: readable(f"{target}/labels/deep/er/d.bin"), 20, "the repaired tree")
        assert await asyncio.to_thread(tree_of, target) == IN_TREE
        await twice(node.NodeStageVolume, stage)  # kubelet's NodeStage again finds it done

        # A lost bind of a branch is bound again; the mount process, alive, stays.
        pid = cluster.mount_pid(HANDLE)
        await asyncio.to_thread(subprocess.run, ["umount", "-l", f"{staging}/train"], check=True)
        wait_until(lambda: f"{staging}/train" in below(staging), 10, "the branch bound again")
        assert cluster.mount_pid(HANDLE) == pid
        assert await asyncio.to_thread(tree_of, target) == IN_TREE

        await twice(node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=HANDLE, target_path=target))  # fmt: skip
        assert not below(target) and not await asyncio.to_thread(os.path.exists, target)
        pid = cluster.mount_pid(HANDLE)
        await twice(node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
            volume_id=HANDLE, staging_target_path=staging))  # fmt: skip
    assert not below(cluster.kubelet) and not below(cluster.node_data)
    assert not alive(pid) and not hidden.parent.exists()
    assert HANDLE not in cluster.state()


async def test_a_read_only_mount_stays_read_only_in_a_writable_dataset(cluster):
    tier = cluster.root / "tiers" / "rw"
    mounts = [{**MOUNTS[0], "read_only": False}, MOUNTS[1]]
    vid = "default-tree-rw"
    staging = staging_of(cluster, vid)
    target = target_of(cluster, "pod-rw", vid)
    ctx = {**context(tier, read_only=False, mounts=mounts), "dataset": "default/tree-rw"}
    mode = cap(Mode.MULTI_NODE_MULTI_WRITER)
    async with connect(cluster.node_csi) as channel:
        node = csi_pb2_grpc.NodeStub(channel)
        await twice(node.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=staging, volume_capability=mode,
            volume_context=ctx))  # fmt: skip
        assert "--read-only" not in cmdline(cluster.mount_pid(vid))
        await twice(node.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=staging, target_path=target,
            volume_capability=mode, volume_context=ctx))  # fmt: skip
        try:
            assert await asyncio.to_thread(write_errno, f"{target}/train/new.bin") == 0
            assert await asyncio.to_thread(read_file, f"{target}/train/new.bin") == b"no"
            assert await asyncio.to_thread(write_errno, f"{target}/labels/new.bin") == errno.EROFS
            assert await asyncio.to_thread(write_errno, f"{target}/new.bin") == errno.EROFS
        finally:
            with_file = Path(target) / "train" / "new.bin"
            await asyncio.to_thread(with_file.unlink, missing_ok=True)
        await twice(node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=target))  # fmt: skip
        await twice(node.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=staging))  # fmt: skip
    assert not below(staging) and not below(cluster.node_data / "datasets")
