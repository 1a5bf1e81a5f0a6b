"""Entry point of `cairn-provisioner`: the external-provisioner pattern: turns PVCs of
csi.cairn.io StorageClasses into volumes (CreateVolume/DeleteVolume over the CSI socket) and
PersistentVolumes, leader-elected through a Lease."""

from __future__ import annotations

import contextlib
import logging

from cairn import config
from cairn.csi.client import RPC, ControllerClient
from cairn.errors import ConfigError, FailedPrecondition
from cairn.service import entry, open_runtime

log = logging.getLogger("cairn_provisioner")
PROG = "cairn-provisioner"
LEADER_ELECTION_NAMESPACE = config.Setting(
    "leader_election_namespace",
    "namespace of the leader election Lease (empty: no leader election; run one replica only)",
    "cairn-system",
)
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
    from cairn.kube.api import RestAPI
    from cairn.kube.client import api_client
    from cairn.kube.leader import LeaderElector
    from cairn.rpc.channel import open_channel
    from cairn_provisioner.capacity import CapacityPublisher
    from cairn_provisioner.provisioner import Provisioner

    async with contextlib.AsyncExitStack() as stack:
        runtime = await open_runtime(cfg)
        stack.push_async_callback(runtime.close)
        client = await api_client(cfg.get("kubeconfig"))
        stack.push_async_callback(client.close)
        api = RestAPI(client)
        if not cfg.get("csi_endpoint"):  # checked after NATS and Kubernetes, in start-up order
            raise ConfigError(f"{config.CSI_ENDPOINT.flag} / {config.CSI_ENDPOINT.env} is required")
        channel = await open_channel(cfg["csi_endpoint"], ready_timeout=30)
        stack.push_async_callback(channel.close)
        csi = ControllerClient(channel)
        driver = await csi.driver_name()
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
