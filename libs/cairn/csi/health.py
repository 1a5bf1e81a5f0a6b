"""HTTP liveness endpoint (/healthz) that calls the plugin's CSI Probe, as livenessprobe does.

200 "ok" while Probe answers ready; 500 with the reason otherwise (not ready, socket gone,
timeout). Runs inside the node plugin or as its own sidecar (`cairn liveness`).
"""

from __future__ import annotations

import logging

import grpc
from aiohttp import web

from cairn.rpc.gen import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)


async def probe(csi_endpoint: str, timeout: float = 3.0) -> tuple[bool, str]:
    """(ready, reason) from the plugin's Probe over its endpoint."""
    try:
        async with grpc.aio.insecure_channel(csi_endpoint) as channel:
            answer = await csi_pb2_grpc.IdentityStub(channel).Probe(
                csi_pb2.ProbeRequest(), timeout=timeout)
    except grpc.aio.AioRpcError as error:
        return False, f"probe failed: {error.code().name}: {error.details()}"
    except TimeoutError:
        return False, "probe timed out"
    if answer.HasField("ready") and not answer.ready.value:
        return False, "plugin reports not ready"
    return True, "ok"


class Healthz:
    """An aiohttp app on host:port answering GET /healthz."""

    def __init__(self, csi_endpoint: str, host: str, port: int, timeout: float = 3.0):
        self.csi_endpoint, self.host, self.port, self.timeout = csi_endpoint, host, port, timeout
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        ready, reason = await probe(self.csi_endpoint, self.timeout)
        return web.Response(status=200 if ready else 500, text=reason + "\n")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
