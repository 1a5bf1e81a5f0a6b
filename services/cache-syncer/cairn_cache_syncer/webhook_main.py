"""Entry point of `cairn-dataset-webhook`: the mutating admission webhook that gives pods node
affinity to the cache nodes of the datasets they read (cairn_cache_syncer.webhook)."""

from __future__ import annotations

from cairn import config
from cairn.service import entry
from cairn_cache_syncer import webhook

PROG = "cairn-dataset-webhook"
# No NATS: the webhook only reads the Kubernetes API and answers the API server.
SETTINGS = (config.OTLP_ENDPOINT, config.METRICS_ADDR, config.LOG_LEVEL, config.KUBECONFIG,
            webhook.WEBHOOK_ADDR, webhook.TLS_CERT_FILE, webhook.TLS_KEY_FILE,
            webhook.LOOKUP_TIMEOUT)  # fmt: skip


def main() -> None:
    entry(
        PROG,
        "cache-aware scheduling: a mutating admission webhook that steers pods "
        "towards the cache nodes of the datasets they read.",
        SETTINGS,
        webhook.serve,
    )


if __name__ == "__main__":
    main()
