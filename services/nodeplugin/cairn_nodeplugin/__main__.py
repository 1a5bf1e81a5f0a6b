"""Entry point of `cairn-nodeplugin`: CSI Identity + Node on a unix socket, kubelet plugin
registration, the HTTP /healthz liveness endpoint calling Probe, the watcher that repairs dead
mounts, the capacity reports of the local root, and the node's dataset caches (their
directories, reports and warm-ups)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from cairn import config
from cairn.csi.health import Healthz
from cairn.csi.identity import NODE_CAPABILITIES, Identity
from cairn.csi.registration import Registrar
from cairn.errors import ConfigError, UnavailableError
from cairn.events import EventStore, JetStreamBus, OutboxedStore
from cairn.rpc.channel import parse_endpoint
from cairn.rpc.gen import csi_pb2_grpc
from cairn.rpc.server import RpcServer
from cairn.service import Runtime, entry, open_runtime, wait_forever
from cairn.telemetry.grpc_otel import server_interceptors
from cairn.telemetry.metrics import start_metrics_server
from cairn_nodeplugin.datasets import DatasetCaches
from cairn_nodeplugin.history import LocalDeletions
from cairn_nodeplugin.mounts import Keeper, MountProcesses
from cairn_nodeplugin.node import CapacityReporter, FileSystems, NodeConfig, NodeService, readiness
from cairn_nodeplugin.state import StateFile, Table

log = logging.getLogger("cairn_nodeplugin")
PROG = "cairn-nodeplugin"
CSI_ENDPOINT = config.Setting(
    "csi_endpoint", config.CSI_ENDPOINT.help, "unix:///csi/csi.sock", schemes=("unix",)
)
META_URL = config.Setting(
    "meta_url", "Redis of the Cairn file system shared volumes live in "
    "(redis://[:password@]host:port/db); a volume may name another by the NodeStage secret "
    "'metaurl' (empty: only those)", None, schemes=("redis", "rediss", "unix"))  # fmt: skip
KUBELET_REGISTRATION_PATH = config.Setting(
    "kubelet_registration_path", "the CSI socket's path as kubelet sees it, given at "
    "registration (default: the --csi-endpoint path)", None)  # fmt: skip
LOCAL_ROOT = config.Setting("local_root", "directory local volumes are made in (default: "
                            "<data-dir>/cairn-nodeplugin/local-volumes)", None)  # fmt: skip
MAX_VOLUMES = config.Setting("max_volumes_per_node", "volumes this node takes (0: no limit)",
                             0, int)  # fmt: skip
WATCH_INTERVAL = config.Setting("watch_interval", "seconds between looks at the mounts (a dead "
                                "mount process is restarted)", 1.0, float)  # fmt: skip
CAPACITY_INTERVAL = config.Setting("capacity_interval", "seconds between looks at the local "
                                   "root's free space (reported when it changed)", 60.0, float)  # fmt: skip
CACHE_REPORT_INTERVAL = config.Setting(
    "cache_report_interval", "seconds between reports of this node's dataset caches "
    "(NodeCacheReported, sooner when they change; cairn-cache-syncer takes them as the "
    "node's heartbeat)", 30.0, float)  # fmt: skip
SETTINGS = config.COMMON + (CSI_ENDPOINT, config.NODE_ID, config.HEALTH_ADDR, config.KUBELET_DIR,
                            config.REGISTRATION_DIR, KUBELET_REGISTRATION_PATH, META_URL,
                            LOCAL_ROOT, MAX_VOLUMES, WATCH_INTERVAL, CAPACITY_INTERVAL,
                            CACHE_REPORT_INTERVAL)  # fmt: skip


def data_dir(cfg: dict) -> Path:
    """The plugin's own directory: state file, mount logs, caches, PID files (absolute: the
    mount processes run from /)."""
    return Path(cfg.get("data_dir") or ".cairn").resolve() / PROG


def node_config(cfg: dict, data: Path) -> NodeConfig:
    """The node's settings with kubelet's directory and the local root made and resolved."""
    dirs = {}
    for name, path in (("kubelet_dir", cfg["kubelet_dir"]),
                       ("local_root", cfg.get("local_root") or data / "local-volumes")):  # fmt: skip
        try:
            os.makedirs(path, mode=0o750, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"--{name.replace('_', '-')} {path}: {error.strerror}") from None
        dirs[name] = os.path.realpath(path)
    if cfg["max_volumes_per_node"] < 0:
        raise ConfigError("--max-volumes-per-node must not be negative")
    if not cfg["cache_report_interval"] > 0:
        raise ConfigError("--cache-report-interval must be more than 0 seconds")
    return NodeConfig(node_id=cfg["node_id"], kubelet_dir=dirs["kubelet_dir"],
                      local_root=dirs["local_root"], meta_url=cfg.get("meta_url") or None,
                      max_volumes=cfg["max_volumes_per_node"])  # fmt: skip


async def run(cfg: dict) -> None:
    health = config.check_addr(config.HEALTH_ADDR, cfg.get("health_addr") or "")
    cfg["node_id"] = cfg.get("node_id") or os.uname().nodename
    data = data_dir(cfg)
    node_cfg = node_config(cfg, data)
    kubelet_path = cfg.get("kubelet_registration_path") or parse_endpoint(
        cfg["csi_endpoint"]).path  # fmt: skip
    runtime, history_store = await open_events(cfg, data)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(runtime.close)
        filesystems = FileSystems()
        stack.push_async_callback(filesystems.close)
        keeper = Keeper(Table(StateFile(data / "volumes.json")), MountProcesses(data),
                        runtime.events, node_cfg.node_id, node_cfg.meta_url,
                        node_cfg.local_root)  # fmt: skip
        # The volumes staged before a restart: rebuilt from the event history and the mount
        # table, served on, repaired if dead.
        await keeper.restore(history_store)
        datasets = DatasetCaches(runtime.store, runtime.events, keeper, node_cfg.node_id, data,
                                 cfg["cache_report_interval"])  # fmt: skip
        csi = RpcServer(cfg["csi_endpoint"], interceptors=server_interceptors())
        csi.add(
            csi_pb2_grpc.add_IdentityServicer_to_server,
            Identity(NODE_CAPABILITIES, readiness(node_cfg, keeper, filesystems)),
        )
        csi.add(csi_pb2_grpc.add_NodeServicer_to_server,
                NodeService(node_cfg, keeper, filesystems, datasets.poke))  # fmt: skip
        metrics = start_metrics_server(cfg.get("metrics_addr"))
        if metrics is not None:
            stack.callback(metrics.stop)
        stack.push_async_callback(runtime.announce_stopped)
        await csi.start()
        stack.push_async_callback(csi.stop, 2)
        for job in (
            keeper.watch(cfg["watch_interval"]),
            CapacityReporter(node_cfg, runtime.events, cfg["capacity_interval"]).run(),
            LocalDeletions(
                runtime.store, node_cfg.node_id, node_cfg.local_root, keeper.table
            ).run(),
            datasets.run(),
        ):
            stack.push_async_callback(cancel_and_wait, asyncio.create_task(job))
        if health:
            healthz = Healthz(cfg["csi_endpoint"], *health)
            await healthz.start()
            stack.push_async_callback(healthz.stop)
        registrar = None
        if cfg.get("registration_dir"):
            registrar = Registrar(cfg["registration_dir"], kubelet_path)
            await registrar.start()
            stack.push_async_callback(registrar.stop)
        await runtime.announce_started()
        log.info("cairn-nodeplugin ready on %s as node %s (kubelet dir %s, local root %s)",
                 cfg["csi_endpoint"], node_cfg.node_id, node_cfg.kubelet_dir,
                 node_cfg.local_root)  # fmt: skip
        if registrar is not None:
            await registrar.refused()  # raises: the process ends non-zero, kubelet retries
        else:
            await wait_forever()


async def open_events(cfg: dict, data: Path) -> tuple[Runtime, Any]:
    """The service runtime, and the event store to rebuild from.

    A first start validates NATS like every service: unreachable -> one line, non-zero
    exit. A restart on a node that already serves volumes (volumes.json or an outbox left
    by the previous run) must not fail the mounts over a bus outage: the store is then
    None, the plugin starts from volumes.json and the mount table, its events wait in the
    outbox and the bus is connected in the background."""
    try:
        runtime = await open_runtime(cfg)
    except UnavailableError as error:
        if not ((data / "volumes.json").exists() or (data / "outbox").exists()):
            raise
        log.warning("NATS is down at start (%s): rebuilding from volumes.json and the mount "
                    "table; events wait in the outbox", error)  # fmt: skip
        bus = await JetStreamBus.connect(cfg["nats_url"], name=cfg["service"], wait=False)
        store = EventStore(bus, max_age=float(cfg.get("stream_max_age") or 0) * 86400,
                           num_replicas=int(cfg.get("stream_replicas") or 1))  # fmt: skip
        events = OutboxedStore(store, data / "outbox")
        await events.start()
        return Runtime(cfg, bus, store, events), None
    return runtime, runtime.store


async def cancel_and_wait(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main() -> None:
    entry(
        PROG,
        "Cairn node plugin: CSI Identity + Node service, kubelet registration and liveness.",
        SETTINGS,
        run,
    )


if __name__ == "__main__":
    main()
