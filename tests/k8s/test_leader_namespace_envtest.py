"""Leader election out of cluster, where the Lease's namespace may not exist: the candidate
says once, clearly, what to create or which flag to set, keeps retrying, and leads as soon
as the namespace is there."""

from __future__ import annotations

import asyncio
import logging
import uuid

from kubeharness import eventually

from cairn.kube.api import NAMESPACE
from cairn.kube.leader import LeaderElector


async def test_missing_namespace_is_said_once_and_retried(kube, caplog):
    ns = f"lease-{uuid.uuid4().hex[:6]}"
    elector = LeaderElector(kube, "cairn-test", ns, "me", lease_duration=3.0,
                            renew_deadline=2.0, retry_period=0.1)  # fmt: skip
    caplog.set_level(logging.WARNING, logger="cairn.kube.leader")
    acquiring = asyncio.create_task(elector._acquire())
    try:
        await asyncio.sleep(1.0)  # about ten attempts
        said = [r.getMessage() for r in caplog.records if r.name == "cairn.kube.leader"]
        assert len(said) == 1, said
        assert f"namespace {ns!r} does not exist" in said[0]
        assert "--leader-election-namespace" in said[0]
        assert not acquiring.done()
        await kube.create(NAMESPACE, {"metadata": {"name": ns}})
        await eventually(lambda: asyncio.sleep(0, elector.leading.is_set()), 10, "leading")
    finally:
        acquiring.cancel()
        await asyncio.gather(acquiring, return_exceptions=True)
