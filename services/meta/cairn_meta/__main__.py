"""Entry point of `cairn-meta`: wires Redis, the object store, the event stream and the
gRPC servers (CSI Identity/Controller on a unix socket, the admin API on TCP)."""

from __future__ import annotations

import contextlib
import logging

from cairn import config
from cairn.config import redact
from cairn.connect import ping_redis
from cairn.connect import redis as connect_redis
from cairn.csi.identity import CONTROLLER_CAPABILITIES, Identity
from cairn.rpc.gen import admin_pb2_grpc, csi_pb2_grpc
from cairn.rpc.server import RpcServer
from cairn.service import entry, open_runtime, wait_forever
from cairn.telemetry.grpc_otel import server_interceptors
from cairn.telemetry.metrics import start_metrics_server
from cairn_meta.admin import Admin

log = logging.getLogger("cairn_meta")
PROG = "cairn-meta"
SETTINGS = config.COMMON + (config.META_URL, config.STORAGE_URL, config.CSI_ENDPOINT,
                            config.ADMIN_ADDR, config.STREAM_REPLICAS, config.STREAM_MAX_AGE)


async def run(cfg: dict) -> None:
    config.check_addr(config.ADMIN_ADDR, cfg["admin_addr"])
    async with contextlib.AsyncExitStack() as stack:
        runtime = await open_runtime(cfg)  # NATS first: every later step may emit events
        stack.push_async_callback(runtime.close)
        redis = await connect_redis(cfg["meta_url"])
        stack.push_async_callback(redis.aclose)
        store = None
        if cfg.get("storage_url"):
            from cairn.storage import open_store

            store = open_store(cfg["storage_url"])
            stack.push_async_callback(store.close)
            await store.check()
        metrics = start_metrics_server(cfg.get("metrics_addr"))
        if metrics is not None:
            stack.callback(metrics.stop)

        async def redis_ok() -> None:
            await ping_redis(redis, cfg["meta_url"])

        async def probe() -> None:
            await redis_ok()
            if store is not None:
                await store.check()

        checks = [("redis", redact(cfg["meta_url"]), redis_ok)]
        if store is not None:
            checks.append(("object-store", redact(cfg["storage_url"]), store.check))
        admin = RpcServer(cfg["admin_addr"], interceptors=server_interceptors())
        admin.add(admin_pb2_grpc.add_AdminServicer_to_server, Admin(PROG, redis, checks))
        servers = [admin]
        if cfg.get("csi_endpoint"):
            csi = RpcServer(cfg["csi_endpoint"], interceptors=server_interceptors())
            csi.add(csi_pb2_grpc.add_IdentityServicer_to_server,
                    Identity(CONTROLLER_CAPABILITIES, probe))
            servers.append(csi)
        stack.push_async_callback(runtime.announce_stopped)
        for server in servers:
            await server.start()
            stack.push_async_callback(server.stop, 2)
        await runtime.announce_started()
        log.info("cairn-meta ready: admin on %s, CSI on %s", admin.address,
                 cfg.get("csi_endpoint") or "(none)")
        await wait_forever()


def main() -> None:
    entry(PROG, "Cairn meta service: CSI Identity + Controller plugin, admin API, volume "
          "catalogue and background jobs.", SETTINGS, run)


if __name__ == "__main__":
    main()
