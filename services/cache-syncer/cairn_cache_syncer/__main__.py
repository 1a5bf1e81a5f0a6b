"""Entry point of `cairn-cache-syncer`: the dataset-cache orchestrator: Datasets, Runtimes, node labels, cache status and warm-up.

The reconcilers arrive with the Kubernetes control-loop issue; today the process validates
its configuration (NATS, Kubernetes API), announces itself on the event stream and waits.
"""

from cairn import config
from cairn.service import entry
from cairn.standby import standby

PROG = "cairn-cache-syncer"
SETTINGS = config.COMMON + (config.KUBECONFIG,)


async def run(cfg: dict) -> None:
    await standby(cfg, needs_kubernetes=True)


def main() -> None:
    entry(PROG, "the dataset-cache orchestrator: Datasets, Runtimes, node labels, cache status and warm-up.", SETTINGS, run)


if __name__ == "__main__":
    main()
