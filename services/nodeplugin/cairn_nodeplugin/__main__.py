"""Entry point of `cairn-nodeplugin`: CSI Identity (+ Node service) on a unix socket and the
HTTP /healthz liveness endpoint that calls Probe."""

from __future__ import annotations

import logging
import os

from cairn import config
from cairn.csi.health import Healthz
from cairn.csi.identity import NODE_CAPABILITIES, Identity
from cairn.errors import FailedPrecondition
from cairn.rpc.gen import csi_pb2_grpc
from cairn.rpc.server import RpcServer
from cairn.service import entry, open_runtime, wait_forever
from cairn.telemetry.grpc_otel import server_interceptors
from cairn.telemetry.metrics import start_metrics_server

log = logging.getLogger("cairn_nodeplugin")
PROG = "cairn-nodeplugin"
CSI_ENDPOINT = config.Setting("csi_endpoint", config.CSI_ENDPOINT.help,
                              "unix:///csi/csi.sock", schemes=("unix",))
SETTINGS = config.COMMON + (CSI_ENDPOINT, config.NODE_ID, config.HEALTH_ADDR,
                            config.KUBELET_DIR, config.REGISTRATION_DIR)


async def probe() -> None:
    """Ready when this node can mount FUSE file systems."""
    if not os.path.exists("/dev/fuse"):
        raise FailedPrecondition("/dev/fuse is missing: run privileged with /dev/fuse")


async def run(cfg: dict) -> None:
    health = config.check_addr(config.HEALTH_ADDR, cfg.get("health_addr") or "")
    cfg["node_id"] = cfg.get("node_id") or os.uname().nodename
    runtime = await open_runtime(cfg)
    csi = RpcServer(cfg["csi_endpoint"], interceptors=server_interceptors())
    csi.add(csi_pb2_grpc.add_IdentityServicer_to_server, Identity(NODE_CAPABILITIES, probe))
    healthz = Healthz(cfg["csi_endpoint"], *health) if health else None
    metrics = start_metrics_server(cfg.get("metrics_addr"))
    try:
        await csi.start()
        if healthz is not None:
            await healthz.start()
        await runtime.announce_started()
        log.info("cairn-nodeplugin ready on %s as node %s", cfg["csi_endpoint"], cfg["node_id"])
        await wait_forever()
    finally:
        if healthz is not None:
            await healthz.stop()
        await csi.stop(grace=2)
        await runtime.announce_stopped()
        await runtime.close()
        if metrics is not None:
            metrics.stop()


def main() -> None:
    entry(PROG, "Cairn node plugin: CSI Identity + Node service, kubelet registration and "
          "liveness.", SETTINGS, run)


if __name__ == "__main__":
    main()
