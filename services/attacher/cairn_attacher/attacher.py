"""The external-attacher pattern for csi.cairn.io: VolumeAttachments to ControllerPublish.

One reconciler (key: VolumeAttachment name) over watch caches of VolumeAttachments, PVs and
CSINodes. A VolumeAttachment of csi.cairn.io gets a finalizer, then, when the driver has
PUBLISH_UNPUBLISH_VOLUME, ControllerPublishVolume with the node's id from its CSINode (and a
finalizer on the PV), and `status.attached` with the attachment metadata; a failure is
`status.attachError` and a retry with backoff. A driver without that capability (Cairn's
controller: its volumes need no attaching) is only marked attached, as external-attacher's
trivial handler does. Deletion detaches (ControllerUnpublishVolume when publishing) and
removes the finalizers. Each attach and detach is an event of the volume (its CSI id).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cairn.csi.client import ControllerClient
from cairn.errors import CairnError, ConflictError, NotFound, TemporaryError
from cairn.events.types import VolumeAttached, VolumeDetached
from cairn.kube.api import (
    CSI_NODE,
    PV,
    VOLUME_ATTACHMENT,
    KubeAPI,
    Obj,
    deleting,
    finalizers,
    now_rfc3339,
)
from cairn.kube.reconcile import RECONCILE_BACKOFF, Controller, Informer
from cairn.retry import Backoff
from cairn.rpc.gen import csi_pb2

log = logging.getLogger(__name__)
DRIVER = "csi.cairn.io"
RPC = csi_pb2.ControllerServiceCapability.RPC
Mode = csi_pb2.VolumeCapability.AccessMode
ACCESS_MODES = {
    "ReadWriteOnce": Mode.SINGLE_NODE_WRITER,
    "ReadOnlyMany": Mode.MULTI_NODE_READER_ONLY,
    "ReadWriteMany": Mode.MULTI_NODE_MULTI_WRITER,
    "ReadWriteOncePod": Mode.SINGLE_NODE_SINGLE_WRITER,
}


def finalizer_for(driver: str) -> str:
    return "external-attacher/" + driver.replace("/", "-")


def capability(pv: Obj) -> Any:
    spec = pv.get("spec", {})
    modes = spec.get("accessModes") or ["ReadWriteOnce"]
    cap = csi_pb2.VolumeCapability(
        access_mode=Mode(mode=ACCESS_MODES.get(modes[0], Mode.SINGLE_NODE_WRITER))
    )
    if spec.get("volumeMode") == "Block":
        cap.block.SetInParent()
    else:
        cap.mount.fs_type = (spec.get("csi") or {}).get("fsType", "")
        cap.mount.mount_flags.extend(spec.get("mountOptions") or [])
    return cap


class Attacher:
    """See the module docstring. `csi` is a ControllerClient, or None with publish=False."""

    def __init__(
        self,
        api: KubeAPI,
        csi: ControllerClient | None,
        events: Any = None,
        *,
        driver: str = DRIVER,
        publish: bool = False,
        workers: int = 4,
        backoff: Backoff = RECONCILE_BACKOFF,
    ):
        if publish and csi is None:
            raise ValueError("publishing needs a CSI client")
        self.api, self.csi, self.events = api, csi, events
        self.driver, self.publish, self.finalizer = driver, publish, finalizer_for(driver)
        self.attachments = Informer(api, VOLUME_ATTACHMENT)
        self.pvs = Informer(api, PV)
        self.csinodes = Informer(api, CSI_NODE)
        self.work = Controller("attachment", self.sync, workers=workers, backoff=backoff)
        self.attachments.add_handler(self.work.handler())

    async def run(self) -> None:
        informers = (self.attachments, self.pvs, self.csinodes)
        tasks = [asyncio.create_task(i.run()) for i in informers]
        try:
            await asyncio.gather(*(i.synced.wait() for i in informers))
            tasks.append(asyncio.create_task(self.work.run()))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def sync(self, name: str) -> None:
        va = self.attachments.get(name)
        if va is None or va.get("spec", {}).get("attacher") != self.driver:
            return
        spec = va["spec"]
        pv_name = (spec.get("source") or {}).get("persistentVolumeName")
        pv = self.pvs.get(pv_name) if pv_name else None
        if pv is None and pv_name:
            pv = await self._get(PV, pv_name)
        volume_id = ((pv or {}).get("spec", {}).get("csi") or {}).get("volumeHandle", pv_name)
        node = spec.get("nodeName", "")
        if deleting(va):
            await self.detach(va, pv, volume_id, node)
        elif not (va.get("status") or {}).get("attached"):
            await self.attach(va, pv, volume_id, node)

    async def _get(self, kind, name: str) -> Obj | None:
        try:
            return await self.api.get(kind, name)
        except NotFound:
            return None

    async def attach(self, va: Obj, pv: Obj | None, volume_id: str, node: str) -> None:
        if self.finalizer not in finalizers(va):
            va["metadata"]["finalizers"] = finalizers(va) + [self.finalizer]
            va = await self.api.update(VOLUME_ATTACHMENT, va)
        metadata: dict[str, str] = {}
        if self.publish:
            if pv is None:
                raise TemporaryError(f"PV {va['spec']['source']} not found")
            if self.finalizer not in finalizers(pv):
                pv["metadata"]["finalizers"] = finalizers(pv) + [self.finalizer]
                await self.api.update(PV, pv)
            try:
                metadata = await self.csi.publish(self._publish_request(pv, volume_id, node))
            except CairnError as error:
                va["status"] = {
                    **(va.get("status") or {}),
                    "attached": False,
                    "attachError": {"time": now_rfc3339(), "message": str(error)},
                }
                await self.api.update_status(VOLUME_ATTACHMENT, va)
                raise
        va["status"] = {"attached": True, "attachmentMetadata": metadata}
        await self.api.update_status(VOLUME_ATTACHMENT, va)
        await self.emit(volume_id, VolumeAttached(node=node))

    def _publish_request(self, pv: Obj, volume_id: str, node: str) -> Any:
        node_id = self._node_id(node)
        csi = pv["spec"].get("csi") or {}
        return csi_pb2.ControllerPublishVolumeRequest(
            volume_id=volume_id,
            node_id=node_id,
            volume_capability=capability(pv),
            readonly=bool(csi.get("readOnly")),
            volume_context=csi.get("volumeAttributes") or {},
        )

    def _node_id(self, node: str) -> str:
        csinode = self.csinodes.get(node)
        for entry in (csinode or {}).get("spec", {}).get("drivers") or []:
            if entry.get("name") == self.driver:
                return entry.get("nodeID") or node
        raise TemporaryError(f"node {node} has no {self.driver} driver registered (CSINode)")

    async def detach(self, va: Obj, pv: Obj | None, volume_id: str, node: str) -> None:
        if self.finalizer not in finalizers(va):
            return
        if self.publish:
            await self.csi.unpublish(volume_id, self._node_id(node), {})
            others = [a for a in self.attachments.items() if a is not va and not deleting(a)
                      and (a["spec"].get("source") or {}).get("persistentVolumeName")
                      == (pv or {}).get("metadata", {}).get("name")]  # fmt: skip
            if pv is not None and not others and self.finalizer in finalizers(pv):
                pv["metadata"]["finalizers"] = [f for f in finalizers(pv) if f != self.finalizer]
                await self.api.update(PV, pv)
        va["metadata"]["finalizers"] = [f for f in finalizers(va) if f != self.finalizer]
        await self.api.update(VOLUME_ATTACHMENT, va)
        await self.emit(volume_id, VolumeDetached(node=node))

    async def emit(self, volume_id: str, event: Any) -> None:
        if self.events is None:
            return
        try:
            for attempt in range(5):
                try:
                    await self.events.append("volume", volume_id, [event])
                    return
                except ConflictError:
                    if attempt == 4:
                        raise
        except CairnError as error:
            log.warning("could not record %s for %s: %s", type(event).__name__, volume_id, error)
