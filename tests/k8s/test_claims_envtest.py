"""More of a claim's life on the real control plane, with the provisioner under deploy/'s
service account: Retain keeps the volume after its claim goes, and a provisioner killed
between CreateVolume and the PV write converges after a restart without a second volume."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from kubeharness import eventually, get_or_none, running
from test_reconcilers_envtest import CONTROLLER_SA, FAST, namespace, phase_bound

from cairn.kube.api import PV, PVC, STORAGE_CLASS
from cairn.meta import keys
from cairn_provisioner.provisioner import Provisioner


async def storage_class(kube, ns: str, reclaim: str) -> str:
    name = f"cairn-{ns}"
    await kube.create(STORAGE_CLASS, {"metadata": {"name": name}, "provisioner": "csi.cairn.io",
                                      "reclaimPolicy": reclaim,
                                      "volumeBindingMode": "Immediate"})  # fmt: skip
    return name


def claim(ns: str, sc: str) -> dict:
    return {"metadata": {"name": "data", "namespace": ns}, "spec": {
        "storageClassName": sc, "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "1Gi"}}}}  # fmt: skip


async def volumes(redis_url: str) -> list[str]:
    r = aioredis.from_url(redis_url)
    try:
        return sorted(k.decode() for k in await r.hkeys(keys.CSI_VOLUMES))
    finally:
        await r.aclose()


async def test_retain_keeps_the_volume_after_its_claim(kube, sa_kube, csi, events, redis_url):
    ns = await namespace(kube)
    sc = await storage_class(kube, ns, "Retain")
    p = Provisioner(await sa_kube(CONTROLLER_SA), csi, events, backoff=FAST, identity="envtest")
    async with running(p.run()):
        await kube.create(PVC, claim(ns, sc))
        pvc = await eventually(lambda: phase_bound(kube, "data", ns), 30, "PVC bound")
        name = pvc["spec"]["volumeName"]
        assert (await kube.get(PV, name))["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
        kept = await volumes(redis_url)
        assert len(kept) == 1
        await kube.delete(PVC, "data", ns)

        async def released():
            pv = await get_or_none(kube, PV, name)
            return pv if (pv or {}).get("status", {}).get("phase") == "Released" else None

        await eventually(released, 30, "the PV Released, not deleted")
        await asyncio.sleep(1.0)  # the provisioner had its chance to (wrongly) delete it
        assert await get_or_none(kube, PV, name) is not None
        assert await volumes(redis_url) == kept  # the data stays


class DiesBeforePV:
    """The provisioner's API, but the process dies right before it writes a PV: after
    CreateVolume answered, before anything in Kubernetes says so."""

    def __init__(self, api):
        self.api, self.task, self.died = api, None, asyncio.Event()

    def __getattr__(self, name):
        call = getattr(self.api, name)
        if name != "create":
            return call

        async def create(kind, obj, *args, **kwargs):
            if kind is PV and not self.died.is_set():
                self.died.set()
                self.task.cancel()
                await asyncio.sleep(3600)
            return await call(kind, obj, *args, **kwargs)

        return create


async def test_provisioner_killed_mid_provisioning_makes_no_second_volume(
    kube, sa_kube, csi, events, redis_url
):
    ns = await namespace(kube)
    sc = await storage_class(kube, ns, "Delete")
    api = await sa_kube(CONTROLLER_SA)
    dying = DiesBeforePV(api)
    first = Provisioner(dying, csi, events, backoff=FAST, identity="envtest-1", history=None)
    dying.task = asyncio.create_task(first.run())
    await kube.create(PVC, claim(ns, sc))
    await asyncio.wait_for(dying.died.wait(), 30)
    await asyncio.gather(dying.task, return_exceptions=True)
    assert len(await volumes(redis_url)) == 1  # CreateVolume happened; no PV says so
    again = Provisioner(api, csi, events, backoff=FAST, identity="envtest-2")
    async with running(again.run()):
        pvc = await eventually(lambda: phase_bound(kube, "data", ns), 30, "PVC bound")
        assert len(await volumes(redis_url)) == 1  # the same volume, by its name
        name = pvc["spec"]["volumeName"]
        await kube.delete(PVC, "data", ns)

        async def reclaimed():
            return await get_or_none(kube, PV, name) is None and not await volumes(redis_url)

        await eventually(reclaimed, 30, "PV and volume gone after the claim")
