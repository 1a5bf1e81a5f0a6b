"""The CSI Identity service, shared by both plugins: name, capabilities and readiness.

Each plugin passes its capabilities and a `probe` coroutine that raises a CairnError when
a dependency (Redis, the object store) does not answer; Probe then reports not ready.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from google.protobuf.wrappers_pb2 import BoolValue

from cairn import DRIVER_NAME, __version__
from cairn.errors import CairnError
from cairn.rpc.gen import csi_pb2, csi_pb2_grpc

log = logging.getLogger(__name__)

Service = csi_pb2.PluginCapability.Service
Expansion = csi_pb2.PluginCapability.VolumeExpansion
CONTROLLER_CAPABILITIES = (
    csi_pb2.PluginCapability(service=Service(type=Service.CONTROLLER_SERVICE)),
    csi_pb2.PluginCapability(service=Service(type=Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
    csi_pb2.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE)),
)
NODE_CAPABILITIES = (
    csi_pb2.PluginCapability(service=Service(type=Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
    csi_pb2.PluginCapability(volume_expansion=Expansion(type=Expansion.ONLINE)),
)


class Identity(csi_pb2_grpc.IdentityServicer):
    def __init__(self, capabilities: tuple, probe: Callable[[], Awaitable[None]]):
        self.capabilities = capabilities
        self.probe = probe
        self.last_problem: str | None = None

    async def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    async def GetPluginCapabilities(self, request, context):
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=self.capabilities)

    async def Probe(self, request, context):
        try:
            await self.probe()
        except CairnError as error:
            if str(error) != self.last_problem:
                log.warning("not ready: %s", error)
            self.last_problem = str(error)
            return csi_pb2.ProbeResponse(ready=BoolValue(value=False))
        self.last_problem = None
        return csi_pb2.ProbeResponse(ready=BoolValue(value=True))
