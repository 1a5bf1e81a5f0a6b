"""The provisioner, attacher and leader election against a real kube-apiserver (envtest):
the same reconcilers as the in-memory tests, over kubernetes_asyncio."""

from __future__ import annotations

import asyncio
import uuid

from kubeharness import Binder, eventually, get_or_none, running

from cairn.kube.api import LEASE, NAMESPACE, PV, PVC, STORAGE_CLASS, VOLUME_ATTACHMENT
from cairn.kube.leader import LeaderElector
from cairn.retry import Backoff
from cairn_attacher.attacher import Attacher
from cairn_provisioner.provisioner import FINALIZER, Provisioner

FAST = Backoff(initial=0.05, maximum=0.5, jitter=False)


async def namespace(api) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await api.create(NAMESPACE, {"metadata": {"name": name}})
    return name


async def test_claim_is_bound_and_deleted(kube, csi, events):
    ns = await namespace(kube)
    sc = f"cairn-{ns}"
    await kube.create(STORAGE_CLASS, {"metadata": {"name": sc}, "provisioner": "csi.cairn.io",
                                      "reclaimPolicy": "Delete",
                                      "volumeBindingMode": "Immediate"})
    p = Provisioner(kube, csi, events, backoff=FAST, identity="envtest")
    async with running(p.run(), Binder(kube).run()):
        await kube.create(PVC, {"metadata": {"name": "data", "namespace": ns}, "spec": {
            "storageClassName": sc, "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "1Gi"}}}})

        async def bound():
            pvc = await kube.get(PVC, "data", ns)
            return pvc if (pvc.get("status") or {}).get("phase") == "Bound" else None

        pvc = await eventually(bound, 30, "PVC bound")
        pv = await kube.get(PV, pvc["spec"]["volumeName"])
        assert pv["spec"]["capacity"]["storage"] == "1Gi"
        assert FINALIZER in pv["metadata"]["finalizers"]
        await kube.delete(PVC, "data", ns)

        async def pv_gone():
            return await get_or_none(kube, PV, pv["metadata"]["name"]) is None

        await eventually(pv_gone, 30, "PV deleted")


async def test_volume_attachment_is_attached_and_cleaned_up(kube):
    name = f"va-{uuid.uuid4().hex[:8]}"
    attacher = Attacher(kube, None, None, backoff=FAST)
    async with running(attacher.run()):
        await kube.create(VOLUME_ATTACHMENT, {"metadata": {"name": name}, "spec": {
            "attacher": "csi.cairn.io", "nodeName": "node-a",
            "source": {"persistentVolumeName": "pv-x"}}})

        async def attached():
            va = await kube.get(VOLUME_ATTACHMENT, name)
            return (va.get("status") or {}).get("attached")

        await eventually(attached, 30, "attached")
        await kube.delete(VOLUME_ATTACHMENT, name)

        async def gone():
            return await get_or_none(kube, VOLUME_ATTACHMENT, name) is None

        await eventually(gone, 30, "VolumeAttachment removed")


async def test_two_replicas_elect_one_leader(kube):
    ns = await namespace(kube)
    leaders: list[str] = []

    def lead(who):
        async def work():
            leaders.append(who)
            await asyncio.Event().wait()

        return work

    a = LeaderElector(kube, "cairn", ns, "a", lease_duration=3, renew_deadline=2,
                      retry_period=0.5)
    b = LeaderElector(kube, "cairn", ns, "b", lease_duration=3, renew_deadline=2,
                      retry_period=0.5)
    async with running(a.run(lead("a")), b.run(lead("b"))):
        await asyncio.sleep(2)
        assert len(leaders) == 1
        lease = await kube.get(LEASE, "cairn", ns)
        assert lease["spec"]["holderIdentity"] == leaders[0]
