"""Entry point of `cairn-meta`: wires Redis, the object store, the event stream and the
gRPC servers (CSI Identity/Controller on a unix socket, the admin API on TCP)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

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
from cairn_meta.capacity import NodeCapacityProjection
from cairn_meta.catalogue import Catalogue
from cairn_meta.controller import Controller, FileSystems
from cairn_meta.jobs import run_jobs

log = logging.getLogger("cairn_meta")
PROG = "cairn-meta"
JOBS_INTERVAL = config.Setting("jobs_interval", "seconds between housekeeping passes (session "
                               "cleanup, trash expiry, compaction, GC); 0: off", 60.0, float)
SETTINGS = config.COMMON + (config.META_URL, config.STORAGE_URL, config.CSI_ENDPOINT,
                            config.ADMIN_ADDR, config.STREAM_REPLICAS, config.STREAM_MAX_AGE,
                            JOBS_INTERVAL)


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
        filesystems = FileSystems(cfg["meta_url"])
        stack.push_async_callback(filesystems.close)

        async def filesystem():
            return (await filesystems.get({}))[0]

        admin = RpcServer(cfg["admin_addr"], interceptors=server_interceptors())
        admin.add(admin_pb2_grpc.add_AdminServicer_to_server,
                  Admin(PROG, redis, checks, filesystem=filesystem))  # fmt: skip
        servers = [admin]
        if cfg.get("csi_endpoint"):
            capacity = NodeCapacityProjection(redis, runtime.store)
            controller = Controller(Catalogue(redis), filesystems, runtime.events, capacity)
            servers.append(build_csi_server(cfg["csi_endpoint"], probe, controller))
            following = asyncio.create_task(capacity.run())  # node reports -> Redis
            stack.push_async_callback(cancel_and_wait, following)
        stack.push_async_callback(runtime.announce_stopped)
        for server in servers:
            await server.start()
            stack.push_async_callback(server.stop, 2)
        if cfg["jobs_interval"] > 0:
            stop_jobs = asyncio.Event()
            jobs = asyncio.create_task(run_jobs(cfg["meta_url"], stop_jobs,
                                                cfg["jobs_interval"]))
            stack.push_async_callback(stop_and_wait, jobs, stop_jobs)
        await runtime.announce_started()
        log.info("cairn-meta ready: admin on %s, CSI on %s", admin.address,
                 cfg.get("csi_endpoint") or "(none)")
        await wait_forever()


def build_csi_server(endpoint: str, probe: Callable[[], Awaitable[None]],
                     controller: Controller) -> RpcServer:
    """The CSI endpoint of cairn-meta: Identity and Controller on one (unix) socket."""
    csi = RpcServer(endpoint, interceptors=server_interceptors())
    csi.add(csi_pb2_grpc.add_IdentityServicer_to_server, Identity(CONTROLLER_CAPABILITIES, probe))
    csi.add(csi_pb2_grpc.add_ControllerServicer_to_server, controller)
    return csi


async def cancel_and_wait(task: asyncio.Task, grace: float = 10.0) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(task, grace)


async def stop_and_wait(task: asyncio.Task, stop: asyncio.Event, grace: float = 10.0) -> None:
    stop.set()
    try:
        await asyncio.wait_for(task, grace)
    except (TimeoutError, asyncio.CancelledError):
        log.warning("background jobs did not stop within %.0fs", grace)


def main() -> None:
    entry(PROG, "Cairn meta service: CSI Identity + Controller plugin, admin API, volume "
          "catalogue and background jobs.", SETTINGS, run)


if __name__ == "__main__":
    main()
