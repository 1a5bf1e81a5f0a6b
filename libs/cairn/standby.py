"""The start-up of services whose control loops need Kubernetes (provisioner, attacher,
cache-syncer): validate NATS and the Kubernetes API, announce, and wait."""

from __future__ import annotations

from cairn.service import open_runtime, wait_forever


async def standby(cfg: dict, needs_kubernetes: bool = True) -> None:
    runtime = await open_runtime(cfg)
    api = None
    try:
        if needs_kubernetes:
            from cairn.kube.client import api_client

            api = await api_client(cfg.get("kubeconfig"))
        await runtime.announce_started()
        await wait_forever()
    finally:
        if api is not None:
            await api.close()
        await runtime.close()
