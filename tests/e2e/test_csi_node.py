"""The CSI Node service of cairn-nodeplugin, called as kubelet calls it: gRPC over the unix
sockets of real cairn-meta and cairn-nodeplugin processes (with their own redis-server and
nats-server, a formatted file:// file system, kubelet's directory in tmp), real FUSE mounts
and bind mounts. Every call is repeated to show it is idempotent; every error answers the
code the CSI spec gives it. Whatever a test mounted is unmounted, and every process started
is stopped by its PID, also when the test fails."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from cairn import localstack
from cairn.events import EventStore, JetStreamBus
from cairn.rpc.channel import connect
from cairn.rpc.gen import csi_pb2, csi_pb2_grpc
from cairn_nodeplugin.mounts import short_run_dir

BIN = Path(sys.executable).parent
CAIRN = str(BIN / "cairn")
NODE = "node-a"
MiB = 1 << 20
Code = grpc.StatusCode
Mode = csi_pb2.VolumeCapability.AccessMode
Usage = csi_pb2.VolumeUsage
TOPOLOGY_KEY = "topology.csi.cairn.io/node"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACE = (("traceparent", f"00-{TRACE_ID}-b7ad6b7169203331-01"),)


# -- processes ------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}


def socket_answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


def mounted(path: str | Path) -> bool:
    return str(path) in mount_points()


def unmount_below(root: Path) -> None:
    """Lazily unmounts every mount below `root`, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    for point in sorted({p for p in mount_points() if p.startswith(prefix)},
                        key=lambda p: -p.count("/")):  # fmt: skip
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)


@dataclass
class Cluster:
    """cairn-meta and cairn-nodeplugin as one node of a cluster, with their servers."""

    root: Path
    nats: localstack.Server
    redis: localstack.Server
    store: Path
    node_argv: list[str] = field(default_factory=list)
    meta: localstack.Server | None = None
    node: localstack.Server | None = None

    @property
    def kubelet(self) -> Path:
        return self.root / "kubelet"

    @property
    def local_root(self) -> Path:
        return self.root / "local"

    @property
    def node_data(self) -> Path:
        return self.root / "node-data" / "cairn-nodeplugin"

    @property
    def controller_csi(self) -> str:
        return f"unix://{self.root / 'sock' / 'controller.sock'}"

    @property
    def node_csi(self) -> str:
        return f"unix://{self.root / 'sock' / 'node.sock'}"

    def start_meta(self) -> None:
        argv = [sys.executable, "-m", "cairn_meta", "--nats-url", self.nats.url,
                "--data-dir", str(self.root / "meta-data"), "--meta-url", self.redis.url,
                "--storage-url", f"file://{self.store}", "--admin-addr",
                f"127.0.0.1:{localstack.free_port()}", "--csi-endpoint", self.controller_csi,
                "--jobs-interval", "0"]  # fmt: skip
        sock = self.controller_csi.removeprefix("unix://")
        self.meta = localstack.Server("cairn-meta", argv, self.root / "logs" / "meta.log")
        self.meta.start(lambda: socket_answers(sock), timeout=30, env=clean_env())

    def start_node(self) -> None:
        sock = self.node_csi.removeprefix("unix://")
        self.node = localstack.Server("cairn-nodeplugin", self.node_argv,
                                      self.root / "logs" / "node.log")  # fmt: skip
        self.node.start(lambda: socket_answers(sock), timeout=30, env=clean_env())

    def stop_node(self) -> None:
        if self.node is not None:
            self.node.stop()
            self.node = None

    def state(self) -> dict:
        return json.loads((self.node_data / "volumes.json").read_text())["volumes"]

    def mount_pid(self, vid: str) -> int:
        return self.state()[vid]["pid"]

    def log(self) -> str:
        return (self.root / "logs" / "node.log").read_text(errors="replace")

    def teardown(self) -> None:
        """Leaves nothing behind: mounts below the test's directory, mount processes (by the
        PIDs their files name), the services and servers (by PID)."""
        try:
            unmount_below(self.root)
            for pid_file in short_run_dir(self.node_data).glob("*.pid"):
                with contextlib.suppress(ValueError, OSError):
                    pid = int(pid_file.read_text().split()[0])
                    if alive(pid):
                        localstack.stop_pid(pid)
            unmount_below(self.root)
        finally:
            for server in (self.node, self.meta, self.redis, self.nats):
                if server is not None:
                    server.stop()
            shutil.rmtree(short_run_dir(self.node_data), ignore_errors=True)


def format_fs(url: str, name: str, store: Path) -> None:
    store.mkdir(exist_ok=True)
    done = subprocess.run([CAIRN, "format", url, name, "--storage", f"file://{store}",
                           "--trash-days", "0"], capture_output=True, text=True, timeout=60,
                          env=clean_env(), check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr


def _fuse_problem() -> str:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    if os.geteuid() != 0:
        return "bind mounts need root"
    return ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    problem = _fuse_problem()
    if problem:
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("csi")
    nats = localstack.start_tcp(localstack.nats_server(root / "nats"))
    c = Cluster(root=root, nats=nats, redis=localstack.redis_server(root / "redis"),
                store=root / "store")  # fmt: skip
    try:
        localstack.start_tcp(c.redis)
        format_fs(c.redis.url, "fs", c.store)
        c.start_meta()
        c.node_argv = [sys.executable, "-m", "cairn_nodeplugin", "--nats-url", nats.url,
                       "--data-dir", str(root / "node-data"), "--csi-endpoint", c.node_csi,
                       "--node-id", NODE, "--health-addr", f"127.0.0.1:{localstack.free_port()}",
                       "--kubelet-dir", str(c.kubelet), "--meta-url", c.redis.url,
                       "--local-root", str(c.local_root), "--max-volumes-per-node", "16",
                       "--watch-interval", "0.3"]  # fmt: skip
        c.start_node()
        yield c
    finally:
        c.teardown()


# -- calls as kubelet and the sidecars make them -------------------------------------------------


@dataclass
class Stubs:
    controller: csi_pb2_grpc.ControllerStub
    node: csi_pb2_grpc.NodeStub


@pytest.fixture
async def csi(cluster):
    async with connect(cluster.controller_csi) as c, connect(cluster.node_csi) as n:
        yield Stubs(csi_pb2_grpc.ControllerStub(c), csi_pb2_grpc.NodeStub(n))


@pytest.fixture
async def store(cluster):
    bus = await JetStreamBus.connect(cluster.nats.url)
    yield EventStore(bus)
    await bus.close()


def cap(mode: int = Mode.MULTI_NODE_MULTI_WRITER, block: bool = False):
    c = csi_pb2.VolumeCapability(access_mode=Mode(mode=mode))
    if block:
        c.block.SetInParent()
    else:
        c.mount.SetInParent()
    return c


async def fails(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    assert e.value.code() == code, e.value.details()
    return e.value.details()


async def twice(method, request, **kw):
    """Calls twice: the second call must find the work done and answer the same."""
    first = await method(request, **kw)
    second = await method(request, **kw)
    assert first == second
    return first


async def create(csi: Stubs, name: str, size: int = 64 * MiB, **kw):
    kw.setdefault("volume_capabilities", [cap()])
    request = csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size), **kw
    )
    return (await twice(csi.controller.CreateVolume, request)).volume


def staging_of(cluster: Cluster, vid: str) -> str:
    return str(cluster.kubelet / "plugins" / "kubernetes.io" / "csi" / "csi.cairn.io" / vid
               / "globalmount")  # fmt: skip


def target_of(cluster: Cluster, pod: str, vid: str) -> str:
    parent = cluster.kubelet / "pods" / pod / "volumes" / "kubernetes.io~csi" / vid
    parent.mkdir(parents=True, exist_ok=True)  # kubelet makes the parent
    return str(parent / "mount")


def stage_request(cluster, volume, mode=Mode.MULTI_NODE_MULTI_WRITER, **kw):
    kw.setdefault("staging_target_path", staging_of(cluster, volume.volume_id))
    kw.setdefault("volume_capability", cap(mode))
    kw.setdefault("volume_context", volume.volume_context)
    kw.setdefault("volume_id", volume.volume_id)
    return csi_pb2.NodeStageVolumeRequest(**kw)


def publish_request(cluster, volume, pod, mode=Mode.MULTI_NODE_MULTI_WRITER, **kw):
    kw.setdefault("staging_target_path", staging_of(cluster, volume.volume_id))
    kw.setdefault("target_path", target_of(cluster, pod, volume.volume_id))
    kw.setdefault("volume_capability", cap(mode))
    kw.setdefault("volume_context", volume.volume_context)
    kw.setdefault("volume_id", volume.volume_id)
    return csi_pb2.NodePublishVolumeRequest(**kw)


def unpublish_request(volume, target: str):
    return csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id, target_path=target)


def unstage_request(cluster, volume):
    return csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=staging_of(cluster, volume.volume_id)
    )


def stats_request(volume, path: str):
    return csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id, volume_path=path)


def usage(stats, unit: int):
    return next(u for u in stats.usage if u.unit == unit)


async def event_types(store: EventStore, vid: str) -> list[str]:
    return [e.type for e in await store.load("volume", vid)]


# -- file access, as a pod does it (blocking, so in plain functions) --------------------------------


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_errno(path: str) -> int:
    try:
        write_file(path, b"no")
    except OSError as error:
        return error.errno
    return 0


def exists(path: str) -> bool:
    return os.path.lexists(path)


def readable(path: str) -> bool:
    try:
        read_file(path)
    except OSError:
        return False
    return True


def mount_processes(staging: str) -> list[int]:
    """PIDs of `cairn mount` processes serving `staging`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"mount" in argv and staging.encode() in argv and alive(int(proc.name)):
                found.append(int(proc.name))
    return found


# -- the tests ---------------------------------------------------------------------------------------


async def test_node_info_and_capabilities(csi, cluster):
    info = await twice(csi.node.NodeGetInfo, csi_pb2.NodeGetInfoRequest())
    assert info.node_id == NODE
    assert info.max_volumes_per_node == 16
    assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: NODE}
    caps = await csi.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    RPC = csi_pb2.NodeServiceCapability.RPC
    assert {c.rpc.type for c in caps.capabilities} >= {
        RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.EXPAND_VOLUME, RPC.VOLUME_CONDITION,
    }  # fmt: skip


async def test_shared_volume_lifecycle(csi, cluster, store):
    volume = await create(csi, "pvc-life", 64 * MiB)
    vid = volume.volume_id
    assert volume.volume_context["type"] == "shared"
    staging = staging_of(cluster, vid)

    await twice(csi.node.NodeStageVolume, stage_request(cluster, volume), metadata=TRACE)
    assert mounted(staging)
    assert mount_processes(staging) == [cluster.mount_pid(vid)]  # one process, however often

    writer, reader = publish_request(cluster, volume, "pod-w"), publish_request(
        cluster, volume, "pod-r", readonly=True)  # fmt: skip
    await twice(csi.node.NodePublishVolume, writer)
    await twice(csi.node.NodePublishVolume, reader)
    assert mounted(writer.target_path) and mounted(reader.target_path)

    data = os.urandom(300_000)
    await asyncio.to_thread(write_file, f"{writer.target_path}/hello.bin", data)
    assert await asyncio.to_thread(read_file, f"{reader.target_path}/hello.bin") == data
    assert await asyncio.to_thread(write_errno, f"{reader.target_path}/nope") == errno.EROFS

    stats = await twice(csi.node.NodeGetVolumeStats, stats_request(volume, writer.target_path))
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    space = usage(stats, Usage.BYTES)
    assert space.total == 64 * MiB  # the directory's quota, not the file system's size
    assert len(data) <= space.used <= 2 * len(data)
    assert space.available == space.total - space.used
    assert usage(stats, Usage.INODES).used >= 1

    expand = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB)
    )
    await twice(csi.controller.ControllerExpandVolume, expand)
    node_expand = csi_pb2.NodeExpandVolumeRequest(
        volume_id=vid, volume_path=writer.target_path, staging_target_path=staging,
        capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB))  # fmt: skip
    assert (await twice(csi.node.NodeExpandVolume, node_expand)).capacity_bytes == 128 * MiB

    async def total() -> int:
        answer = await csi.node.NodeGetVolumeStats(stats_request(volume, reader.target_path))
        return usage(answer, Usage.BYTES).total

    deadline = time.monotonic() + 10  # the mount's statfs may cache the quota a moment
    while await total() != 128 * MiB:
        assert time.monotonic() < deadline, "the expanded quota never showed in statvfs"
        await asyncio.sleep(0.2)

    pid = cluster.mount_pid(vid)
    for target in (writer.target_path, reader.target_path):
        await twice(csi.node.NodeUnpublishVolume, unpublish_request(volume, target))
        assert not mounted(target) and not exists(target)
    await twice(csi.node.NodeUnstageVolume, unstage_request(cluster, volume))
    assert not mounted(staging)
    wait_until(lambda: not alive(pid), 10, "the mount process's exit")
    await fails(csi.node.NodeGetVolumeStats(stats_request(volume, staging)), Code.NOT_FOUND)
    await twice(csi.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vid))

    history = await store.load("volume", vid)
    types = [e.type for e in history]
    for once in ("VolumeStaged", "VolumeUnstaged"):
        assert types.count(once) == 1, types
    assert types.count("VolumePublished") == types.count("VolumeUnpublished") == 2, types
    assert types.index("VolumeStaged") < types.index("VolumePublished") < types.index(
        "VolumeUnpublished") < types.index("VolumeUnstaged") < types.index("VolumeDeleted")  # fmt: skip
    staged = next(e for e in history if e.type == "VolumeStaged")
    assert staged.payload == {"node": NODE, "staging_path": staging, "mount_pid": pid}
    assert TRACE_ID in staged.trace["traceparent"]  # the trace of the NodeStage call


async def test_errors_answer_the_spec_codes(csi, cluster):
    volume = await create(csi, "pvc-errors", volume_capabilities=[
        cap(Mode.SINGLE_NODE_SINGLE_WRITER)])  # fmt: skip
    vid, node = volume.volume_id, csi.node
    staging = staging_of(cluster, vid)
    single = Mode.SINGLE_NODE_SINGLE_WRITER
    outside = cluster.root / "outside"
    outside.mkdir(exist_ok=True)
    (cluster.kubelet / "pods").mkdir(parents=True, exist_ok=True)
    sneaky = cluster.kubelet / "pods" / "sneaky"
    if not sneaky.is_symlink():
        sneaky.symlink_to(outside)

    # required fields
    for request in (
        stage_request(cluster, volume, volume_id=""),
        stage_request(cluster, volume, staging_target_path=""),
        csi_pb2.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging),
        stage_request(cluster, volume, volume_capability=cap(single, block=True)),
        stage_request(cluster, volume, volume_id="../../etc"),
    ):
        await fails(node.NodeStageVolume(request), Code.INVALID_ARGUMENT)
    for path in ("/tmp/elsewhere", str(cluster.kubelet / ".." / "outside" / "x"),
                 str(sneaky / "globalmount"), "relative/path"):  # fmt: skip
        await fails(node.NodeStageVolume(stage_request(cluster, volume, staging_target_path=path)),
                    Code.INVALID_ARGUMENT)  # fmt: skip
    # paths in the volume context cannot climb out of the file system's directories
    for bad in ("/volumes/../etc", "volumes/x", "/"):
        ctx = {**volume.volume_context, "path": bad}
        await fails(node.NodeStageVolume(stage_request(cluster, volume, volume_context=ctx)),
                    Code.INVALID_ARGUMENT)  # fmt: skip
    missing = {**volume.volume_context, "path": "/volumes/never-made"}
    await fails(node.NodeStageVolume(stage_request(cluster, volume, volume_context=missing)),
                Code.NOT_FOUND)  # fmt: skip
    assert not list(outside.iterdir())  # nothing was made outside kubelet's directory

    # not staged yet
    await fails(node.NodePublishVolume(publish_request(cluster, volume, "p1", single)),
                Code.NOT_FOUND)  # fmt: skip
    await fails(node.NodeGetVolumeStats(stats_request(volume, staging)), Code.NOT_FOUND)

    await node.NodeStageVolume(stage_request(cluster, volume, single))
    try:
        other_staging = staging_of(cluster, "elsewhere")
        await fails(node.NodeStageVolume(stage_request(
            cluster, volume, single, staging_target_path=other_staging)),
            Code.FAILED_PRECONDITION)  # fmt: skip
        await fails(node.NodeStageVolume(stage_request(cluster, volume, Mode.SINGLE_NODE_WRITER)),
                    Code.ALREADY_EXISTS)  # fmt: skip
        await fails(node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id="vol-another", staging_target_path=staging, volume_capability=cap(),
            volume_context=volume.volume_context)), Code.ALREADY_EXISTS)  # fmt: skip
        for request in (
            publish_request(cluster, volume, "p1", single, target_path=""),
            publish_request(cluster, volume, "p1", single, staging_target_path=""),
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid, staging_target_path=staging,
                target_path=target_of(cluster, "p1", vid)),
            publish_request(cluster, volume, "p1", single, target_path=str(outside / "t")),
            publish_request(cluster, volume, "p1", single, target_path=str(sneaky / "t")),
        ):  # fmt: skip
            await fails(node.NodePublishVolume(request), Code.INVALID_ARGUMENT)
        await fails(node.NodePublishVolume(publish_request(
            cluster, volume, "p1", single, staging_target_path=other_staging)),
            Code.FAILED_PRECONDITION)  # fmt: skip

        first = publish_request(cluster, volume, "p1", single)
        await twice(node.NodePublishVolume, first)
        await fails(node.NodePublishVolume(publish_request(
            cluster, volume, "p1", single, readonly=True)), Code.ALREADY_EXISTS)  # fmt: skip
        await fails(node.NodePublishVolume(publish_request(cluster, volume, "p2", single)),
                    Code.FAILED_PRECONDITION)  # a second target of a single writer  # fmt: skip
        await fails(node.NodeUnstageVolume(unstage_request(cluster, volume)),
                    Code.FAILED_PRECONDITION)  # still published  # fmt: skip

        # stats and expansion name the volume's own paths only
        for path in (target_of(cluster, "p2", vid), str(outside), staging + "/.."):
            await fails(node.NodeGetVolumeStats(stats_request(volume, path)), Code.NOT_FOUND)
        await fails(node.NodeGetVolumeStats(stats_request(volume, "")), Code.INVALID_ARGUMENT)
        await fails(node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id="vol-unknown", volume_path=first.target_path)), Code.NOT_FOUND)  # fmt: skip
        await fails(node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=str(outside))), Code.NOT_FOUND)  # fmt: skip
        await fails(node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(volume_id=vid)),
                    Code.INVALID_ARGUMENT)  # fmt: skip
        await fails(node.NodeUnpublishVolume(unpublish_request(volume, "")),
                    Code.INVALID_ARGUMENT)  # fmt: skip
        await fails(node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            target_path=first.target_path)), Code.INVALID_ARGUMENT)  # fmt: skip
        await fails(node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=vid)),
                    Code.INVALID_ARGUMENT)  # fmt: skip
        await twice(node.NodeUnpublishVolume, unpublish_request(volume, first.target_path))
    finally:
        for pod in ("p1", "p2"):
            await node.NodeUnpublishVolume(unpublish_request(volume, target_of(cluster, pod, vid)))
        await node.NodeUnstageVolume(unstage_request(cluster, volume))
    assert not mounted(staging)
    await csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))


async def test_local_volume_on_the_reporting_node(csi, cluster, store):
    reports = [e for e in await store.load("node", NODE) if e.type == "NodeCapacityReported"]
    assert reports, "the node plugin reports its local root at start"
    report = reports[-1].payload
    assert report["local_path"] == str(cluster.local_root)
    assert 0 < report["available_bytes"] <= report["capacity_bytes"]
    wanted = csi_pb2.TopologyRequirement(requisite=[csi_pb2.Topology(
        segments={TOPOLOGY_KEY: NODE})])  # fmt: skip
    request = csi_pb2.CreateVolumeRequest(
        name="pvc-local", parameters={"type": "local"},
        capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB),
        volume_capabilities=[cap(Mode.SINGLE_NODE_WRITER)], accessibility_requirements=wanted,
    )  # fmt: skip
    deadline = time.monotonic() + 15  # the node plugin's capacity report reaches the controller
    while True:
        try:
            volume = (await twice(csi.controller.CreateVolume, request)).volume
            break
        except grpc.aio.AioRpcError as error:
            if error.code() != Code.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)
    vid = volume.volume_id
    assert dict(volume.accessible_topology[0].segments) == {TOPOLOGY_KEY: NODE}
    directory = cluster.local_root / vid
    assert volume.volume_context["path"] == str(directory)
    single = Mode.SINGLE_NODE_WRITER

    elsewhere = {**volume.volume_context, "path": str(cluster.root / "outside-local")}
    await fails(csi.node.NodeStageVolume(stage_request(cluster, volume, single,
                                                       volume_context=elsewhere)),
                Code.INVALID_ARGUMENT)  # fmt: skip
    other_node = {**volume.volume_context, "node": "node-b"}
    await fails(csi.node.NodeStageVolume(stage_request(cluster, volume, single,
                                                       volume_context=other_node)),
                Code.NOT_FOUND)  # fmt: skip

    await twice(csi.node.NodeStageVolume, stage_request(cluster, volume, single))
    assert directory.is_dir()
    publish = publish_request(cluster, volume, "pod-l", single)
    await twice(csi.node.NodePublishVolume, publish)
    await asyncio.to_thread(write_file, f"{publish.target_path}/on-disk.txt", b"local data")
    assert (directory / "on-disk.txt").read_bytes() == b"local data"
    stats = await csi.node.NodeGetVolumeStats(stats_request(volume, publish.target_path))
    assert not stats.volume_condition.abnormal
    assert usage(stats, Usage.BYTES).total > 0

    await twice(csi.node.NodeUnpublishVolume, unpublish_request(volume, publish.target_path))
    await twice(csi.node.NodeUnstageVolume, unstage_request(cluster, volume))
    assert not mounted(staging_of(cluster, vid))
    assert (directory / "on-disk.txt").exists()  # the data stays on the node's disk
    await twice(csi.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vid))


async def test_dead_mount_is_repaired_and_a_restart_keeps_serving(csi, cluster, store):
    volume = await create(csi, "pvc-crash")
    vid = volume.volume_id
    await csi.node.NodeStageVolume(stage_request(cluster, volume))
    rw, ro = (publish_request(cluster, volume, "pod-a"),
              publish_request(cluster, volume, "pod-b", readonly=True))  # fmt: skip
    await csi.node.NodePublishVolume(rw)
    await csi.node.NodePublishVolume(ro)
    await asyncio.to_thread(write_file, f"{rw.target_path}/before.txt", b"kept")

    # The mount process dies: the targets come back within seconds, by themselves.
    old = cluster.mount_pid(vid)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: not alive(old), 5, "the mount process's death")
    started = time.monotonic()
    wait_until(lambda: readable(f"{rw.target_path}/before.txt"), 10, "the writer's target")
    # The targets are bound again one after the other: the reader's may come a moment later.
    wait_until(lambda: readable(f"{ro.target_path}/before.txt"), 10, "the reader's target")
    assert time.monotonic() - started < 10
    assert await asyncio.to_thread(read_file, f"{ro.target_path}/before.txt") == b"kept"
    await asyncio.to_thread(write_file, f"{rw.target_path}/after.txt", b"again")
    assert await asyncio.to_thread(write_errno, f"{ro.target_path}/x") == errno.EROFS
    new = cluster.mount_pid(vid)
    assert new != old and alive(new)
    history = await store.load("volume", vid)
    recovered = [e for e in history if e.type == "MountRecovered"]
    assert len(recovered) == 1
    assert recovered[0].payload["old_pid"] == old and recovered[0].payload["new_pid"] == new
    assert sorted(recovered[0].payload["targets"]) == sorted([rw.target_path, ro.target_path])
    stats = await csi.node.NodeGetVolumeStats(stats_request(volume, rw.target_path))
    assert not stats.volume_condition.abnormal

    # The node plugin restarts: the mounts keep working meanwhile, and it serves them on.
    cluster.stop_node()
    assert await asyncio.to_thread(read_file, f"{rw.target_path}/after.txt") == b"again"
    os.kill(new, signal.SIGKILL)  # and a mount dies while the plugin is away
    wait_until(lambda: not alive(new), 5, "the mount process's death")
    cluster.start_node()
    wait_until(lambda: readable(f"{ro.target_path}/after.txt"), 10, "repair after a restart")
    async with connect(cluster.node_csi) as channel:
        node = csi_pb2_grpc.NodeStub(channel)
        stats = await node.NodeGetVolumeStats(stats_request(volume, ro.target_path))
        assert not stats.volume_condition.abnormal, stats.volume_condition.message
        await node.NodePublishVolume(rw)  # known after the restart: nothing to do
        for target in (rw.target_path, ro.target_path):
            await node.NodeUnpublishVolume(unpublish_request(volume, target))
        await node.NodeUnstageVolume(unstage_request(cluster, volume))
    assert not mounted(staging_of(cluster, vid))
    assert not mount_processes(staging_of(cluster, vid))
    assert (await event_types(store, vid)).count("MountRecovered") == 2


async def test_stats_report_a_dead_mount_abnormal(csi, cluster):
    """While the watcher has not repaired it yet, a dead mount is reported abnormal."""
    volume = await create(csi, "pvc-abnormal")
    vid = volume.volume_id
    staging = staging_of(cluster, vid)
    await csi.node.NodeStageVolume(stage_request(cluster, volume))
    try:
        cluster.stop_node()  # no watcher: the mount stays dead
        pid = cluster.mount_pid(vid)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), 5, "the mount process's death")
        # A second plugin process on the same state, its watcher slowed down, answers stats.
        argv = list(cluster.node_argv)
        argv[argv.index("--watch-interval") + 1] = "3600"
        cluster.node_argv, kept = argv, cluster.node_argv
        cluster.start_node()
        cluster.node_argv = kept
        async with connect(cluster.node_csi) as channel:
            node = csi_pb2_grpc.NodeStub(channel)
            stats = await node.NodeGetVolumeStats(stats_request(volume, staging))
            assert stats.volume_condition.abnormal
            assert str(pid) in stats.volume_condition.message
            await node.NodeStageVolume(stage_request(cluster, volume))  # kubelet's retry repairs
            stats = await node.NodeGetVolumeStats(stats_request(volume, staging))
            assert not stats.volume_condition.abnormal
            await node.NodeUnstageVolume(unstage_request(cluster, volume))
    finally:
        cluster.stop_node()
        cluster.start_node()
    assert not mounted(staging)


async def test_file_system_named_by_secrets_never_leaks_its_password(csi, cluster, store):
    password = "Pa55-w0rd-for-the-test"
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
        volume = await create(csi, "pvc-secret", secrets=secrets)
        vid = volume.volume_id
        assert volume.volume_context["meta"] == "secret"
        await fails(csi.node.NodeStageVolume(stage_request(cluster, volume)),
                    Code.FAILED_PRECONDITION)  # fmt: skip
        wrong = {"metaurl": f"redis://:not-{password}@127.0.0.1:{port}/0"}
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await csi.node.NodeStageVolume(stage_request(cluster, volume, secrets=wrong))
        assert refused.value.code() in (Code.UNAVAILABLE, Code.FAILED_PRECONDITION)
        assert password not in refused.value.details()
        await twice(csi.node.NodeStageVolume, stage_request(cluster, volume, secrets=secrets))
        publish = publish_request(cluster, volume, "pod-s")
        await csi.node.NodePublishVolume(publish)
        await asyncio.to_thread(write_file, f"{publish.target_path}/s.txt", b"secret fs")

        # After a restart the plugin knows the URL again only from the live mount process;
        # it repairs the mount with it.
        cluster.stop_node()
        cluster.start_node()
        old = cluster.mount_pid(vid)
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: readable(f"{publish.target_path}/s.txt"), 10, "repair by secret URL")
        async with connect(cluster.node_csi) as channel:
            node = csi_pb2_grpc.NodeStub(channel)
            await node.NodeUnpublishVolume(unpublish_request(volume, publish.target_path))
            await node.NodeUnstageVolume(unstage_request(cluster, volume))
        await csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid,
                                                                      secrets=secrets))  # fmt: skip
        assert password not in cluster.log()
        assert password not in (cluster.node_data / "volumes.json").read_text()
        for envelope in await store.load("volume", vid):
            assert password not in json.dumps([envelope.payload, envelope.trace], default=str)
    finally:
        private.stop()
