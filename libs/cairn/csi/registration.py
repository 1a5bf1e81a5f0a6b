"""Kubelet plugin registration: how kubelet learns that this node runs the csi.cairn.io driver.

Kubelet's plugin watcher looks for sockets in its registration directory
(/var/lib/kubelet/plugins_registry). Serving the registration API on
`<dir>/csi.cairn.io-reg.sock` is enough: kubelet calls GetInfo (the plugin type, the driver's
name, the CSI endpoint as kubelet sees it, the CSI versions), then NodeGetInfo on that
endpoint, and answers with NotifyRegistrationStatus. When kubelet refuses the plugin the
process logs why and ends with a non-zero code, so that it is restarted and tried again,
as node-driver-registrar does.

The node plugin serves this itself (--registration-dir); `cairn registrar` runs the same
thing as a sidecar next to any CSI plugin, asking the plugin for its name first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from cairn import DRIVER_NAME
from cairn.errors import FailedPrecondition, UnavailableError
from cairn.rpc.channel import connect
from cairn.rpc.gen import csi_pb2, csi_pb2_grpc, pluginregistration_pb2, pluginregistration_pb2_grpc
from cairn.rpc.server import RpcServer
from cairn.rpc.status import translate_rpc_errors

log = logging.getLogger(__name__)

PLUGIN_TYPE = "CSIPlugin"
SUPPORTED_VERSIONS = ("1.0.0",)


def socket_path(registration_dir: str, name: str = DRIVER_NAME) -> str:
    """Where kubelet's plugin watcher finds the registration socket of driver `name`."""
    return os.path.join(os.path.abspath(registration_dir), f"{name}-reg.sock")


class Registration(pluginregistration_pb2_grpc.RegistrationServicer):
    """The registration API kubelet calls; `refused` ends when kubelet says no."""

    def __init__(self, name: str, endpoint: str):
        self.name = name
        self.endpoint = endpoint  # the CSI socket path, as kubelet (on the host) sees it
        self.registered = asyncio.Event()
        self._refusals: asyncio.Queue[str] = asyncio.Queue()

    async def GetInfo(self, request, context):
        return pluginregistration_pb2.PluginInfo(
            type=PLUGIN_TYPE, name=self.name, endpoint=self.endpoint,
            supported_versions=list(SUPPORTED_VERSIONS),
        )  # fmt: skip

    async def NotifyRegistrationStatus(self, request, context):
        if request.plugin_registered:
            log.info("kubelet registered %s (CSI endpoint %s)", self.name, self.endpoint)
            self.registered.set()
        else:
            log.error("kubelet refused to register %s: %s", self.name,
                      request.error or "no reason given")  # fmt: skip
            self._refusals.put_nowait(request.error or "no reason given")
        return pluginregistration_pb2.RegistrationStatusResponse()

    async def refused(self) -> None:
        """Returns never while kubelet is content; raises FailedPrecondition (the process's
        non-zero exit) once kubelet refused the registration."""
        reason = await self._refusals.get()
        await asyncio.sleep(0.2)  # let the answer to kubelet leave first
        raise FailedPrecondition(f"kubelet refused to register {self.name}: {reason}")


class Registrar:
    """Serves the registration API on the socket kubelet's plugin watcher looks at."""

    def __init__(self, registration_dir: str, endpoint: str, name: str = DRIVER_NAME):
        self.path = socket_path(registration_dir, name)
        self.registration = Registration(name, endpoint)
        self.server = RpcServer(f"unix://{self.path}")
        self.server.add(pluginregistration_pb2_grpc.add_RegistrationServicer_to_server,
                        self.registration)  # fmt: skip

    async def start(self) -> None:
        await self.server.start()
        log.info("registration socket %s offers %s at %s", self.path, self.registration.name,
                 self.registration.endpoint)  # fmt: skip

    async def stop(self) -> None:
        await self.server.stop(grace=1)  # the socket goes: kubelet deregisters the plugin

    async def refused(self) -> None:
        await self.registration.refused()


async def plugin_name(csi_endpoint: str, wait: float = 60.0) -> str:
    """The driver name the CSI plugin at `csi_endpoint` gives (GetPluginInfo), waiting up to
    `wait` seconds for it to answer, as a sidecar started next to the plugin must."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        try:
            async with connect(csi_endpoint, ready_timeout=2.0) as channel:
                with translate_rpc_errors(csi_endpoint):
                    info = await csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
                        csi_pb2.GetPluginInfoRequest(), timeout=5
                    )
            return info.name
        except UnavailableError as error:
            if loop.time() > deadline:
                raise UnavailableError(f"the CSI plugin at {csi_endpoint} does not answer: "
                                       f"{error}") from None  # fmt: skip
            log.info("waiting for the CSI plugin at %s", csi_endpoint)
            await asyncio.sleep(1.0)


async def run_registrar(csi_endpoint: str, registration_dir: str, kubelet_path: str) -> None:
    """`cairn registrar`: registers the plugin at `csi_endpoint` with kubelet until stopped;
    raises FailedPrecondition when kubelet refuses it."""
    name = await plugin_name(csi_endpoint)
    registrar = Registrar(registration_dir, kubelet_path, name)
    await registrar.start()
    try:
        await registrar.refused()
    finally:
        with contextlib.suppress(Exception):
            await registrar.stop()
