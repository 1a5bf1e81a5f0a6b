"""CSIStorageCapacity objects for local volumes, one per (StorageClass, node), from GetCapacity.

The scheduler reads them to place pods of WaitForFirstConsumer claims of `type: local`
classes on nodes with room. Shared volumes live in one file system every node reaches, so
they publish none. Objects this provisioner no longer wants (class or node gone) are deleted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from cairn.errors import CairnError, NotFound
from cairn.kube.api import CAPACITY, KubeAPI, Obj, format_quantity
from cairn.rpc.gen import csi_pb2
from cairn_provisioner.provisioner import PREFIX, Provisioner, node_segments

log = logging.getLogger(__name__)
DRIVER_LABEL = "csi.storage.k8s.io/drivername"
MANAGED_BY_LABEL = "csi.storage.k8s.io/managed-by"
MANAGED_BY = "cairn-provisioner"
Mode = csi_pb2.VolumeCapability.AccessMode


def object_name(storage_class: str, segments: dict[str, str]) -> str:
    text = storage_class + "\0" + "\0".join(f"{k}={v}" for k, v in sorted(segments.items()))
    return "csisc-" + hashlib.sha256(text.encode()).hexdigest()[:20]


class CapacityPublisher:
    def __init__(
        self, api: KubeAPI, csi: Any, provisioner: Provisioner, namespace: str, interval: float
    ):
        self.api, self.csi, self.p = api, csi, provisioner
        self.namespace, self.interval = namespace, interval

    async def run(self) -> None:
        if self.interval <= 0:
            await asyncio.Event().wait()
        for informer in (self.p.classes, self.p.nodes, self.p.csinodes):
            await informer.synced.wait()
        while True:
            try:
                await self.publish_once()
            except CairnError as error:
                log.warning("publishing storage capacity failed: %s", error)
            await asyncio.sleep(self.interval)

    async def wanted(self) -> dict[str, Obj]:
        driver = self.p.driver
        cap = csi_pb2.VolumeCapability(access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
        cap.mount.SetInParent()
        out: dict[str, Obj] = {}
        for sc in self.p.classes.items():
            params = {k: str(v) for k, v in (sc.get("parameters") or {}).items()
                      if not k.startswith(PREFIX)}  # fmt: skip
            if sc.get("provisioner") != driver or params.get("type") != "local":
                continue
            for name, node in sorted(self.p.nodes.cache.items()):
                segments = node_segments(node, self.p.csinodes.get(name), driver)
                if not segments:
                    continue
                available, maximum = await self.csi.get_capacity(params, segments, [cap])
                obj_name = object_name(sc["metadata"]["name"], segments)
                obj: Obj = {
                    "metadata": {"name": obj_name, "namespace": self.namespace,
                                 "labels": {DRIVER_LABEL: driver, MANAGED_BY_LABEL: MANAGED_BY}},
                    "storageClassName": sc["metadata"]["name"],
                    "nodeTopology": {"matchLabels": dict(segments)},
                    "capacity": format_quantity(available),
                }  # fmt: skip
                if maximum is not None:
                    obj["maximumVolumeSize"] = format_quantity(maximum)
                out[obj_name] = obj
        return out

    async def publish_once(self) -> None:
        wanted = await self.wanted()
        existing, _ = await self.api.list(CAPACITY, self.namespace)
        ours = {
            o["metadata"]["name"]: o
            for o in existing
            if (o["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY
            and (o["metadata"].get("labels") or {}).get(DRIVER_LABEL) == self.p.driver
        }
        for name, obj in wanted.items():
            current = ours.get(name)
            if current is None:
                await self.api.create(CAPACITY, obj)
            elif (current.get("capacity"), current.get("maximumVolumeSize")) != (
                obj.get("capacity"),
                obj.get("maximumVolumeSize"),
            ):
                current.update(capacity=obj["capacity"])
                if "maximumVolumeSize" in obj:
                    current["maximumVolumeSize"] = obj["maximumVolumeSize"]
                await self.api.update(CAPACITY, current)
        for name in set(ours) - set(wanted):
            try:
                await self.api.delete(CAPACITY, name, self.namespace)
            except NotFound:
                pass
