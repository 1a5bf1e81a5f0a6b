"""cairn-nodeplugin after a restart of its own: it rebuilds what this node staged and published
from the event history and the mount table (volumes.json is only a cache), never shows a
file system's password in a process listing, its log or its events, and removes the
directories of the local volumes the controller deleted, never anything outside its local
root. Same set-up as test_csi_node.py (its own cluster); whatever a test mounted is unmounted
and every process started is stopped by its PID."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import grpc
import test_csi_node as base
from test_csi_node import (
    NODE,
    TOPOLOGY_KEY,
    Code,
    MiB,
    Mode,
    alive,
    cap,
    create,
    format_fs,
    mount_processes,
    mounted,
    publish_request,
    read_file,
    readable,
    stage_request,
    staging_of,
    stats_request,
    twice,
    unpublish_request,
    unstage_request,
    wait_until,
    write_errno,
    write_file,
)

from cairn import localstack
from cairn.events.types import VolumeDeleted, VolumeProvisioned
from cairn.rpc.channel import connect
from cairn.rpc.gen import csi_pb2, csi_pb2_grpc

cluster, csi, store = base.cluster, base.csi, base.store


def restart_without_cache(c: base.Cluster) -> None:
    c.stop_node()
    (c.node_data / "volumes.json").unlink()
    c.start_node()


def cmdlines() -> list[bytes]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                found.append((proc / "cmdline").read_bytes())
            except OSError:
                continue
    return found


def environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


async def create_local(csi, name: str):
    wanted = csi_pb2.TopologyRequirement(requisite=[csi_pb2.Topology(
        segments={TOPOLOGY_KEY: NODE})])  # fmt: skip
    request = csi_pb2.CreateVolumeRequest(
        name=name, parameters={"type": "local"},
        capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[cap(Mode.SINGLE_NODE_WRITER)], accessibility_requirements=wanted,
    )  # fmt: skip
    deadline = time.monotonic() + 15  # the node plugin's capacity report reaches the controller
    while True:
        try:
            return (await csi.controller.CreateVolume(request)).volume
        except grpc.aio.AioRpcError as error:
            if error.code() != Code.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def test_restart_without_volumes_json_rebuilds_from_events(csi, cluster, store):
    shared = await create(csi, "pvc-rebuild")
    local = await create_local(csi, "pvc-rebuild-local")
    single = Mode.SINGLE_NODE_WRITER
    await csi.node.NodeStageVolume(stage_request(cluster, shared))
    await csi.node.NodeStageVolume(stage_request(cluster, local, single))
    rw, ro = (publish_request(cluster, shared, "pod-r1"),
              publish_request(cluster, shared, "pod-r2", readonly=True))  # fmt: skip
    lp = publish_request(cluster, local, "pod-r3", single)
    for request in (rw, ro, lp):
        await csi.node.NodePublishVolume(request)
    await asyncio.to_thread(write_file, f"{rw.target_path}/shared.txt", b"shared")
    await asyncio.to_thread(write_file, f"{lp.target_path}/local.txt", b"local")
    pid = cluster.mount_pid(shared.volume_id)

    # volumes.json is lost with the restart: the history and the mount table tell it all.
    restart_without_cache(cluster)
    assert "rebuilt from its event history" in cluster.log()
    state = cluster.state()
    assert set(state) >= {shared.volume_id, local.volume_id}
    assert state[shared.volume_id]["pid"] == pid
    assert sorted(state[shared.volume_id]["targets"]) == sorted([rw.target_path, ro.target_path])
    assert state[local.volume_id]["kind"] == "local"
    async with connect(cluster.node_csi) as channel:
        node = csi_pb2_grpc.NodeStub(channel)
        for request, volume in ((rw, shared), (ro, shared), (lp, local)):
            stats = await node.NodeGetVolumeStats(stats_request(volume, request.target_path))
            assert not stats.volume_condition.abnormal, stats.volume_condition.message
        assert await asyncio.to_thread(read_file, f"{ro.target_path}/shared.txt") == b"shared"
        assert await asyncio.to_thread(write_errno, f"{ro.target_path}/x") != 0
        assert await asyncio.to_thread(read_file, f"{lp.target_path}/local.txt") == b"local"
        # kubelet's repeated calls are known and succeed
        await twice(node.NodeStageVolume, stage_request(cluster, shared))
        await twice(node.NodePublishVolume, rw)
        await twice(node.NodePublishVolume, lp)
        for request, volume in ((rw, shared), (ro, shared), (lp, local)):
            await node.NodeUnpublishVolume(unpublish_request(volume, request.target_path))
            assert not mounted(request.target_path)
        await node.NodeUnstageVolume(unstage_request(cluster, shared))
        await node.NodeUnstageVolume(unstage_request(cluster, local))
    for volume in (shared, local):
        assert not mounted(staging_of(cluster, volume.volume_id))
    assert not mount_processes(staging_of(cluster, shared.volume_id))
    assert not alive(pid)

    # Unstaged in the history: a restart without the cache brings nothing back.
    restart_without_cache(cluster)
    assert shared.volume_id not in cluster.state()
    assert local.volume_id not in cluster.state()
    await csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=shared.volume_id))
    await csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=local.volume_id))


async def test_password_stays_out_of_process_listings_logs_and_events(csi, cluster, store):
    password = "Pa55-for-the-restart-test"
    port = localstack.free_port()
    private = localstack.Server("redis-server", [
        localstack.find_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port),
        "--requirepass", password, "--save", "", "--appendonly", "no",
        "--dir", str(cluster.root),
    ], cluster.root / "logs" / "redis-secret.log", port=port)  # fmt: skip
    localstack.start_tcp(private)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    try:
        await asyncio.to_thread(format_fs, url, "fs2", cluster.root / "store2")
        secrets = {"metaurl": url}
        volume = await create(csi, "pvc-secret-restart", secrets=secrets)
        vid = volume.volume_id
        await csi.node.NodeStageVolume(stage_request(cluster, volume, secrets=secrets))
        publish = publish_request(cluster, volume, "pod-sr")
        await csi.node.NodePublishVolume(publish)
        await asyncio.to_thread(write_file, f"{publish.target_path}/s.txt", b"secret fs")
        pid = cluster.mount_pid(vid)
        assert all(password.encode() not in line for line in cmdlines())
        assert password.encode() in environ(pid)

        # Rebuilt without the cache, the URL comes back from the live process's environment,
        # and repairs the mount when its process dies.
        restart_without_cache(cluster)
        old = cluster.mount_pid(vid)
        assert old == pid
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: not alive(old), 5, "the mount process's death")
        wait_until(lambda: readable(f"{publish.target_path}/s.txt"), 15, "repair by secret URL")
        new = cluster.mount_pid(vid)
        assert new != old
        assert all(password.encode() not in line for line in cmdlines())
        async with connect(cluster.node_csi) as channel:
            node = csi_pb2_grpc.NodeStub(channel)
            await node.NodeUnpublishVolume(unpublish_request(volume, publish.target_path))
            await node.NodeUnstageVolume(unstage_request(cluster, volume))
        assert not mount_processes(staging_of(cluster, vid))
        await csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid,
                                                                      secrets=secrets))  # fmt: skip
        assert password not in cluster.log()
        assert password not in (cluster.node_data / "volumes.json").read_text()
        for envelope in await store.load("volume", vid):
            assert password not in json.dumps([envelope.payload, envelope.trace], default=str)
    finally:
        private.stop()


async def test_deleted_local_volume_directory_is_removed_and_nothing_outside(
        csi, cluster, store):  # fmt: skip
    outside = cluster.root / "outside-local"
    outside.mkdir(exist_ok=True)
    (outside / "keep.txt").write_bytes(b"not the plugin's")
    link = cluster.local_root / "evil-link"
    link.symlink_to(outside)
    # Deletions that name what the plugin must never remove: a symlink in the local root to
    # a directory outside, and a directory outside the local root.
    for vid, path in (("evil-link", str(link)), ("evil-out", str(outside))):
        await store.append("volume", vid, [
            VolumeProvisioned(capacity_bytes=MiB, path=path, node=NODE),
            VolumeDeleted(reason="test")], 0)  # fmt: skip

    volume = await create_local(csi, "pvc-delete-local")
    single = Mode.SINGLE_NODE_WRITER
    directory = Path(volume.volume_context["path"])
    await csi.node.NodeStageVolume(stage_request(cluster, volume, single))
    publish = publish_request(cluster, volume, "pod-dl", single)
    await csi.node.NodePublishVolume(publish)
    await asyncio.to_thread(write_file, f"{publish.target_path}/data.txt", b"local")
    await csi.node.NodeUnpublishVolume(unpublish_request(volume, publish.target_path))
    await csi.node.NodeUnstageVolume(unstage_request(cluster, volume))
    assert (directory / "data.txt").exists()
    await csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    wait_until(lambda: not directory.exists(), 15, "the local directory's removal")
    assert (outside / "keep.txt").read_bytes() == b"not the plugin's"
    assert link.is_symlink()
    link.unlink()


async def test_nats_down_at_start_falls_back_to_the_cache(csi, cluster):
    volume = await create(csi, "pvc-no-nats")
    await csi.node.NodeStageVolume(stage_request(cluster, volume))
    publish = publish_request(cluster, volume, "pod-nn")
    await csi.node.NodePublishVolume(publish)
    await asyncio.to_thread(write_file, f"{publish.target_path}/n.txt", b"no nats")
    cluster.stop_node()
    cluster.nats.stop()
    try:
        cluster.start_node()
        assert "rebuilding from volumes.json and the mount table" in cluster.log()
        async with connect(cluster.node_csi) as channel:
            node = csi_pb2_grpc.NodeStub(channel)
            stats = await node.NodeGetVolumeStats(stats_request(volume, publish.target_path))
            assert not stats.volume_condition.abnormal, stats.volume_condition.message
            assert await asyncio.to_thread(read_file, f"{publish.target_path}/n.txt") == b"no nats"
            await node.NodeUnpublishVolume(unpublish_request(volume, publish.target_path))
            await node.NodeUnstageVolume(unstage_request(cluster, volume))
        assert not mounted(staging_of(cluster, volume.volume_id))
    finally:
        cluster.stop_node()
        localstack.start_tcp(cluster.nats)
        cluster.start_node()
