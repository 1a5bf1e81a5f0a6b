"""A client of a CSI Controller (cairn-meta's, over its unix socket), as the provisioner
and the attacher call it.

Failures come back as Cairn errors (cairn.rpc.status): ABORTED and UNAVAILABLE are
temporary, RESOURCE_EXHAUSTED and INVALID_ARGUMENT permanent, and so on.
"""

from __future__ import annotations

from typing import Any

from cairn.rpc.gen import csi_pb2, csi_pb2_grpc
from cairn.rpc.status import translate_rpc_errors

RPC = csi_pb2.ControllerServiceCapability.RPC


class ControllerClient:
    def __init__(self, channel: Any, timeout: float = 60.0):
        self.identity = csi_pb2_grpc.IdentityStub(channel)
        self.controller = csi_pb2_grpc.ControllerStub(channel)
        self.timeout = timeout

    async def driver_name(self) -> str:
        with translate_rpc_errors("CSI"):
            info = await self.identity.GetPluginInfo(
                csi_pb2.GetPluginInfoRequest(), timeout=self.timeout
            )
        return info.name

    async def capabilities(self) -> set[int]:
        with translate_rpc_errors("CSI"):
            answer = await self.controller.ControllerGetCapabilities(
                csi_pb2.ControllerGetCapabilitiesRequest(), timeout=self.timeout
            )
        return {c.rpc.type for c in answer.capabilities}

    async def create_volume(self, request: Any) -> Any:
        with translate_rpc_errors("CreateVolume"):
            answer = await self.controller.CreateVolume(request, timeout=self.timeout)
        return answer.volume

    async def delete_volume(self, volume_id: str, secrets: dict[str, str]) -> None:
        request = csi_pb2.DeleteVolumeRequest(volume_id=volume_id, secrets=secrets)
        with translate_rpc_errors("DeleteVolume"):
            await self.controller.DeleteVolume(request, timeout=self.timeout)

    async def get_capacity(
        self, parameters: dict[str, str], segments: dict[str, str], capabilities: list[Any]
    ) -> tuple[int, int | None]:
        """(available bytes, maximum volume size or None) for volumes at `segments`."""
        request = csi_pb2.GetCapacityRequest(
            parameters=parameters, volume_capabilities=capabilities,
            accessible_topology=csi_pb2.Topology(segments=segments))  # fmt: skip
        with translate_rpc_errors("GetCapacity"):
            answer = await self.controller.GetCapacity(request, timeout=self.timeout)
        maximum = (
            answer.maximum_volume_size.value if answer.HasField("maximum_volume_size") else None
        )
        return answer.available_capacity, maximum

    async def can_publish(self) -> bool:
        """Whether the driver has ControllerPublish/Unpublish (Cairn's has not)."""
        return RPC.PUBLISH_UNPUBLISH_VOLUME in await self.capabilities()

    async def publish(self, request: Any) -> dict[str, str]:
        with translate_rpc_errors("ControllerPublishVolume"):
            answer = await self.controller.ControllerPublishVolume(request, timeout=self.timeout)
        return dict(answer.publish_context)

    async def unpublish(self, volume_id: str, node_id: str, secrets: dict[str, str]) -> None:
        request = csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=volume_id, node_id=node_id, secrets=secrets
        )
        with translate_rpc_errors("ControllerUnpublishVolume"):
            await self.controller.ControllerUnpublishVolume(request, timeout=self.timeout)
