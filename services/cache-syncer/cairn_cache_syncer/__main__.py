"""Entry point of `cairn-cache-syncer`: the dataset-cache orchestrator: Datasets, Runtimes,
DataLoads, node labels, cache status and warm-up (syncer.py), leader-elected through a
Lease."""

from __future__ import annotations

import contextlib
import logging

from cairn import config
from cairn.errors import ConfigError
from cairn.kube.sidecar import LEADER_ELECTION_NAMESPACE
from cairn.service import entry, open_runtime

log = logging.getLogger("cairn_cache_syncer")
PROG = "cairn-cache-syncer"
META_ADMIN = config.Setting(
    "meta_admin_addr", "host:port of cairn-meta's admin API, for the sizes of datasets "
    "(empty: sizes are not reported)", "127.0.0.1:7450")  # fmt: skip
REPORT_EXPIRY = config.Setting(
    "report_expiry", "seconds after which a node that stopped reporting loses its dataset "
    "labels and its share of the cache status", 90.0, float)  # fmt: skip
RESYNC = config.Setting("resync_interval", "seconds between full passes over every object",
                        10.0, float)  # fmt: skip
SETTINGS = config.COMMON + (config.KUBECONFIG, LEADER_ELECTION_NAMESPACE, META_ADMIN,
                            REPORT_EXPIRY, RESYNC)  # fmt: skip


async def run(cfg: dict) -> None:
    from cairn.kube.api import RestAPI
    from cairn.kube.client import api_client
    from cairn.kube.leader import LeaderElector
    from cairn_cache_syncer.syncer import CacheSyncer
    from cairn_cache_syncer.usage import MetaUsage

    if cfg.get("meta_admin_addr"):
        config.check_addr(META_ADMIN, cfg["meta_admin_addr"])
    if cfg["report_expiry"] <= 0 or cfg["resync_interval"] <= 0:
        raise ConfigError("--report-expiry and --resync-interval must be positive")
    async with contextlib.AsyncExitStack() as stack:
        runtime = await open_runtime(cfg)
        stack.push_async_callback(runtime.close)
        client = await api_client(cfg.get("kubeconfig"))
        stack.push_async_callback(client.close)
        usage = MetaUsage(cfg["meta_admin_addr"]) if cfg.get("meta_admin_addr") else None
        if usage is not None:
            stack.push_async_callback(usage.close)
        syncer = CacheSyncer(RestAPI(client), runtime.store, usage=usage,
                             expiry=cfg["report_expiry"], resync=cfg["resync_interval"],
                             identity=runtime.instance)  # fmt: skip
        await runtime.announce_started()
        stack.push_async_callback(runtime.announce_stopped)
        namespace = cfg.get("leader_election_namespace")
        if namespace:
            elector = LeaderElector(RestAPI(client), "cairn-cache-syncer", namespace,
                                    runtime.instance)  # fmt: skip
            await elector.run(syncer.run)
        else:
            await syncer.run()


def main() -> None:
    entry(PROG, "the dataset-cache orchestrator: Datasets, Runtimes, DataLoads, node labels, "
          "cache status and warm-up.", SETTINGS, run)  # fmt: skip


if __name__ == "__main__":
    main()
