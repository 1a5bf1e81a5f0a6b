"""Entry point of `cairn-provisioner`: the external-provisioner pattern: turns PVCs of
csi.cairn.io StorageClasses into volumes (CreateVolume/DeleteVolume over the CSI socket) and
PersistentVolumes, leader-elected through a Lease."""

from __future__ import annotations

import contextlib
import logging

from cairn import config
from cairn.csi.client import RPC
from cairn.errors import FailedPrecondition
from cairn.kube.sidecar import LEADER_ELECTION_NAMESPACE, open_sidecar
from cairn.service import entry

log = logging.getLogger("cairn_provisioner")
PROG = "cairn-provisioner"
CAPACITY_NAMESPACE = config.Setting(
    "capacity_namespace",
    "namespace of the CSIStorageCapacity objects for local volumes",
    "cairn-system",
)
CAPACITY_INTERVAL = config.Setting(
    "capacity_interval",
    "seconds between CSIStorageCapacity updates (0: do not publish)",
    60.0,
    float,
)
SETTINGS = config.COMMON + (
    config.CSI_ENDPOINT,
    config.KUBECONFIG,
    LEADER_ELECTION_NAMESPACE,
    CAPACITY_NAMESPACE,
    CAPACITY_INTERVAL,
)


async def run(cfg: dict) -> None:
    from cairn.kube.leader import LeaderElector
    from cairn_provisioner.capacity import CapacityPublisher
    from cairn_provisioner.provisioner import Provisioner

    async with contextlib.AsyncExitStack() as stack:
        sidecar = await open_sidecar(cfg, stack)
        runtime, api, csi, driver = sidecar.runtime, sidecar.api, sidecar.csi, sidecar.driver
        if RPC.CREATE_DELETE_VOLUME not in await csi.capabilities():
            raise FailedPrecondition(f"CSI driver {driver} cannot create volumes")
        provisioner = Provisioner(
            api,
            csi,
            runtime.events,
            driver=driver,
            identity=runtime.instance,
            history=runtime.store,
        )
        capacity = CapacityPublisher(
            api, csi, provisioner, cfg["capacity_namespace"], cfg["capacity_interval"]
        )
        await runtime.announce_started()
        stack.push_async_callback(runtime.announce_stopped)

        async def lead() -> None:
            import asyncio

            await asyncio.gather(provisioner.run(), capacity.run())

        namespace = cfg.get("leader_election_namespace")
        if namespace:
            lease = driver.replace(".", "-").replace("/", "-") + "-provisioner"
            await LeaderElector(api, lease, namespace, runtime.instance).run(lead)
        else:
            await lead()


def main() -> None:
    entry(
        PROG,
        "the external-provisioner pattern: turns PVCs of csi.cairn.io StorageClasses into volumes.",
        SETTINGS,
        run,
    )


if __name__ == "__main__":
    main()
