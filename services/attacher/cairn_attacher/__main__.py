"""Entry point of `cairn-attacher`: the external-attacher pattern: VolumeAttachments of
csi.cairn.io to ControllerPublish/Unpublish (or, as Cairn's controller needs no attaching,
only marked attached), leader-elected through a Lease."""

from __future__ import annotations

import contextlib
import logging

from cairn import config
from cairn.kube.sidecar import LEADER_ELECTION_NAMESPACE, open_sidecar
from cairn.service import entry

log = logging.getLogger("cairn_attacher")
PROG = "cairn-attacher"
SETTINGS = config.COMMON + (config.CSI_ENDPOINT, config.KUBECONFIG, LEADER_ELECTION_NAMESPACE)


async def run(cfg: dict) -> None:
    from cairn.kube.leader import LeaderElector
    from cairn_attacher.attacher import Attacher

    async with contextlib.AsyncExitStack() as stack:
        sidecar = await open_sidecar(cfg, stack)
        runtime, api, csi, driver = sidecar.runtime, sidecar.api, sidecar.csi, sidecar.driver
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
