"""Entry point of `cairn-attacher`: the external-attacher pattern: VolumeAttachments of
csi.cairn.io to ControllerPublish/Unpublish (or, as Cairn's controller needs no attaching,
only marked attached), leader-elected through a Lease."""

from __future__ import annotations

import contextlib
import logging

from cairn import config
from cairn.errors import ConfigError
from cairn.service import entry, open_runtime

log = logging.getLogger("cairn_attacher")
PROG = "cairn-attacher"
LEADER_ELECTION_NAMESPACE = config.Setting(
    "leader_election_namespace",
    "namespace of the leader election Lease (empty: no leader election; run one replica only)",
    "cairn-system",
)
SETTINGS = config.COMMON + (config.CSI_ENDPOINT, config.KUBECONFIG, LEADER_ELECTION_NAMESPACE)


async def run(cfg: dict) -> None:
    from cairn.csi.client import ControllerClient
    from cairn.kube.api import RestAPI
    from cairn.kube.client import api_client
    from cairn.kube.leader import LeaderElector
    from cairn.rpc.channel import open_channel
    from cairn_attacher.attacher import Attacher

    async with contextlib.AsyncExitStack() as stack:
        runtime = await open_runtime(cfg)
        stack.push_async_callback(runtime.close)
        client = await api_client(cfg.get("kubeconfig"))
        stack.push_async_callback(client.close)
        api = RestAPI(client)
        if not cfg.get("csi_endpoint"):  # checked after NATS and Kubernetes, in start-up order
            raise ConfigError(
                f"{config.CSI_ENDPOINT.flag} / {config.CSI_ENDPOINT.env} is required"
            )
        channel = await open_channel(cfg["csi_endpoint"], ready_timeout=30)
        stack.push_async_callback(channel.close)
        csi = ControllerClient(channel)
        driver = await csi.driver_name()
        publish = await csi.can_publish()
        log.info("driver %s %s ControllerPublishVolume", driver, "supports" if publish else "lacks")
        attacher = Attacher(api, csi, runtime.events, driver=driver, publish=publish)
        await runtime.announce_started()
        stack.push_async_callback(runtime.announce_stopped)
        namespace = cfg.get("leader_election_namespace")
        if namespace:
            lease = "external-attacher-leader-" + driver.replace(".", "-").replace("/", "-")
            await LeaderElector(api, lease, namespace, runtime.instance).run(attacher.run)
        else:
            await attacher.run()


def main() -> None:
    entry(
        PROG,
        "the external-attacher pattern: VolumeAttachments of csi.cairn.io to "
        "ControllerPublish/Unpublish.",
        SETTINGS,
        run,
    )


if __name__ == "__main__":
    main()
