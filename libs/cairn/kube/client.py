"""Loads Kubernetes client configuration, failing with one line when there is no cluster."""

from __future__ import annotations

import asyncio
import os

from cairn.config import KUBECONFIG
from cairn.errors import ConfigError, UnavailableError


async def api_client(kubeconfig: str | None = None):
    """A kubernetes_asyncio ApiClient that reached the API server (version call answered)."""
    from kubernetes_asyncio import client, config
    from kubernetes_asyncio.config import ConfigException

    path = kubeconfig or os.environ.get("KUBECONFIG")
    try:
        if path:
            if not await asyncio.to_thread(os.path.exists, path):
                raise ConfigError(f"kubeconfig '{path}' does not exist: fix {KUBECONFIG.flag} / "
                                  f"{KUBECONFIG.env} or KUBECONFIG")
            await config.load_kube_config(config_file=path)
        else:
            config.load_incluster_config()
    except ConfigException as error:
        raise ConfigError(f"no Kubernetes cluster configured ({str(error)[:120]}): run in a pod "
                          f"or set {KUBECONFIG.flag} / {KUBECONFIG.env} or KUBECONFIG") from None
    api = client.ApiClient()
    try:
        await client.VersionApi(api).get_code(_request_timeout=5)
    except Exception as error:  # any transport failure means the same thing here
        await api.close()
        host = api.configuration.host
        raise UnavailableError(f"cannot reach the Kubernetes API at {host} "
                               f"({type(error).__name__}): check the kubeconfig") from None
    return api
