"""The start-up the Kubernetes sidecars (cairn-provisioner, cairn-attacher) share: the
event runtime, the Kubernetes API, and a client of the CSI Controller, in that order (the
order of their one-line start-up errors)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from cairn import config
from cairn.errors import ConfigError

LEADER_ELECTION_NAMESPACE = config.Setting(
    "leader_election_namespace",
    "namespace of the leader election Lease (empty: no leader election; run one replica only)",
    "cairn-system",
)


@dataclass
class Sidecar:
    runtime: Any  # cairn.service.Runtime
    api: Any  # cairn.kube.api.RestAPI
    csi: Any  # cairn.csi.client.ControllerClient
    driver: str


async def open_sidecar(cfg: dict, stack: contextlib.AsyncExitStack) -> Sidecar:
    """Connects everything; `stack` closes it all."""
    from cairn.csi.client import ControllerClient
    from cairn.kube.api import RestAPI
    from cairn.kube.client import api_client
    from cairn.rpc.channel import open_channel
    from cairn.service import open_runtime

    runtime = await open_runtime(cfg)
    stack.push_async_callback(runtime.close)
    client = await api_client(cfg.get("kubeconfig"))
    stack.push_async_callback(client.close)
    if not cfg.get("csi_endpoint"):  # checked after NATS and Kubernetes, in start-up order
        raise ConfigError(f"{config.CSI_ENDPOINT.flag} / {config.CSI_ENDPOINT.env} is required")
    channel = await open_channel(cfg["csi_endpoint"], ready_timeout=30)
    stack.push_async_callback(channel.close)
    csi = ControllerClient(channel)
    return Sidecar(runtime, RestAPI(client), csi, await csi.driver_name())
