"""What the provisioner tests need around a Kubernetes API that has no controller manager
(the in-memory API, or envtest's bare kube-apiserver + etcd): the PV controller's binding
loop, small and faithful in what the provisioner sees, and helpers to wait on the API."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cairn.errors import CairnError, NotFound
from cairn.kube.api import KubeAPI, Obj
from cairn.kube.memory import Binder
from cairn.tasks import cancel_all

__all__ = ["Binder", "eventually", "get_or_none", "running"]


@contextlib.asynccontextmanager
async def running(*coros: Awaitable[Any]):
    """Runs the coroutines as tasks for the block; cancels them after."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield tasks
    finally:
        await cancel_all(tasks)


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 20.0, what: str = "condition"
) -> Any:
    """Polls `check` until it returns something truthy; fails the test after `timeout`."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        try:
            last = await check()
        except (CairnError, KeyError) as error:
            last = error
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def get_or_none(api: KubeAPI, kind, name: str, namespace: str | None = None) -> Obj | None:
    try:
        return await api.get(kind, name, namespace)
    except NotFound:
        return None
