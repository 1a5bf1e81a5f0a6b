"""Entry point of `cairn-attacher`: the external-attacher pattern: VolumeAttachments of csi.cairn.io to ControllerPublish/Unpublish.

The reconcilers arrive with the Kubernetes control-loop issue; today the process validates
its configuration (NATS, Kubernetes API), announces itself on the event stream and waits.
"""

from cairn import config
from cairn.service import entry
from cairn.standby import standby

PROG = "cairn-attacher"
SETTINGS = config.COMMON + (config.CSI_ENDPOINT, config.KUBECONFIG)


async def run(cfg: dict) -> None:
    await standby(cfg, needs_kubernetes=True)


def main() -> None:
    entry(PROG, "the external-attacher pattern: VolumeAttachments of csi.cairn.io to ControllerPublish/Unpublish.", SETTINGS, run)


if __name__ == "__main__":
    main()
