"""The provisioner, attacher and leader election against a real control plane: the same
reconcilers as the in-memory tests, over kubernetes_asyncio, each logged in as the service
account deploy/ gives it (a rule missing from deploy/rbac.yaml fails here). Claims are bound
by kube-controller-manager's PV binder and pods placed by kube-scheduler, never by a test."""

from __future__ import annotations

import asyncio
import uuid

from kubeharness import eventually, get_or_none, running

from cairn.events import NodeCapacityReported
from cairn.kube.api import (
    EVENT,
    LEASE,
    NAMESPACE,
    POD,
    PV,
    PVC,
    STORAGE_CLASS,
    VOLUME_ATTACHMENT,
    Kind,
    annotations,
)
from cairn.kube.leader import LeaderElector
from cairn.retry import Backoff
from cairn_attacher.attacher import Attacher
from cairn_meta.controller import TOPOLOGY_KEY
from cairn_provisioner.provisioner import ANN_SELECTED_NODE, FINALIZER, Provisioner

FAST = Backoff(initial=0.05, maximum=0.5, jitter=False)
CONTROLLER_SA = "cairn-controller"  # deploy/controller.yaml's pod runs as it
SERVICE_ACCOUNT = Kind("ServiceAccount", "", "v1", "serviceaccounts", True)
GiB = 1 << 30


async def namespace(api) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await api.create(NAMESPACE, {"metadata": {"name": name}})
    return name


async def phase_bound(api, name: str, ns: str):
    pvc = await api.get(PVC, name, ns)
    return pvc if (pvc.get("status") or {}).get("phase") == "Bound" else None


async def test_claim_is_bound_and_deleted(kube, sa_kube, csi, events):
    ns = await namespace(kube)
    sc = f"cairn-{ns}"
    await kube.create(STORAGE_CLASS, {"metadata": {"name": sc}, "provisioner": "csi.cairn.io",
                                      "reclaimPolicy": "Delete",
                                      "volumeBindingMode": "Immediate"})  # fmt: skip
    api = await sa_kube(CONTROLLER_SA)
    p = Provisioner(api, csi, events, backoff=FAST, identity="envtest")
    async with running(p.run()):
        await kube.create(PVC, {"metadata": {"name": "data", "namespace": ns}, "spec": {
            "storageClassName": sc, "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "1Gi"}}}})  # fmt: skip

        pvc = await eventually(lambda: phase_bound(kube, "data", ns), 30, "PVC bound")
        pv = await kube.get(PV, pvc["spec"]["volumeName"])
        assert pv["spec"]["capacity"]["storage"] == "1Gi"
        assert FINALIZER in pv["metadata"]["finalizers"]
        assert pv["spec"]["claimRef"]["uid"] == pvc["metadata"]["uid"]

        async def recorded():  # an Event the provisioner wrote under its service account
            found, _ = await kube.list(EVENT, ns)
            return any(e["reason"] == "ProvisioningSucceeded" for e in found)

        await eventually(recorded, 10, "ProvisioningSucceeded event")
        await kube.delete(PVC, "data", ns)

        async def pv_gone():
            return await get_or_none(kube, PV, pv["metadata"]["name"]) is None

        await eventually(pv_gone, 30, "PV deleted")


async def test_volume_attachment_is_attached_and_cleaned_up(kube, sa_kube):
    name = f"va-{uuid.uuid4().hex[:8]}"
    attacher = Attacher(await sa_kube(CONTROLLER_SA), None, None, backoff=FAST)
    async with running(attacher.run()):
        await kube.create(VOLUME_ATTACHMENT, {"metadata": {"name": name}, "spec": {
            "attacher": "csi.cairn.io", "nodeName": "node-a",
            "source": {"persistentVolumeName": "pv-x"}}})  # fmt: skip

        async def attached():
            va = await kube.get(VOLUME_ATTACHMENT, name)
            return (va.get("status") or {}).get("attached")

        await eventually(attached, 30, "attached")
        await kube.delete(VOLUME_ATTACHMENT, name)

        async def gone():
            return await get_or_none(kube, VOLUME_ATTACHMENT, name) is None

        await eventually(gone, 30, "VolumeAttachment removed")


async def test_two_replicas_elect_one_leader(kube, sa_kube, cairn_namespace):
    lease_name = f"cairn-{uuid.uuid4().hex[:8]}"
    leaders: list[str] = []

    def lead(who):
        async def work():
            leaders.append(who)
            await asyncio.Event().wait()

        return work

    def elector(api, who):
        return LeaderElector(api, lease_name, cairn_namespace, who, lease_duration=3,
                             renew_deadline=2, retry_period=0.5)  # fmt: skip

    a = elector(await sa_kube(CONTROLLER_SA), "a")
    b = elector(await sa_kube(CONTROLLER_SA), "b")

    async def elected():
        return leaders

    async with running(a.run(lead("a")), b.run(lead("b"))):
        await eventually(elected, 10, "a leader")
        await asyncio.sleep(1.5)  # the other replica had its chances to take over
        assert len(leaders) == 1
        lease = await kube.get(LEASE, lease_name, cairn_namespace)
        assert lease["spec"]["holderIdentity"] == leaders[0]


async def test_scheduler_places_a_pod_and_its_wait_for_first_consumer_claim(
    kube, sa_kube, csi, events, nodes
):
    """deploy/'s cairn-local class: the scheduler picks a node for the pod and writes it on
    the claim, the provisioner makes a local volume there, the PV binder binds the claim, the
    scheduler binds the pod to that node. Then the pod and claim go, and the volume with them."""
    for node in nodes:  # what each node's plugin would report about its local disk
        await events.append("node", node, [NodeCapacityReported(
            node=node, capacity_bytes=10 * GiB, available_bytes=10 * GiB,
            local_path="/var/lib/cairn/local")])  # fmt: skip
    ns = await namespace(kube)
    await eventually(lambda: get_or_none(kube, SERVICE_ACCOUNT, "default", ns), 20,
                     "the namespace's default service account")  # fmt: skip
    p = Provisioner(await sa_kube(CONTROLLER_SA), csi, events, backoff=FAST, identity="envtest")
    async with running(p.run()):
        await kube.create(PVC, {"metadata": {"name": "db", "namespace": ns}, "spec": {
            "storageClassName": "cairn-local", "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}}}})  # fmt: skip
        await asyncio.sleep(0.5)
        assert not (await kube.get(PVC, "db", ns))["spec"].get("volumeName"), (
            "a WaitForFirstConsumer claim was bound before any pod used it"
        )
        await kube.create(POD, {"metadata": {"name": "app", "namespace": ns}, "spec": {
            "containers": [{"name": "app", "image": "registry.invalid/app:1",
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "db"}}]}})  # fmt: skip

        pvc = await eventually(lambda: phase_bound(kube, "db", ns), 30, "PVC bound")
        selected = annotations(pvc).get(ANN_SELECTED_NODE)
        assert selected in nodes

        async def scheduled():
            return (await kube.get(POD, "app", ns))["spec"].get("nodeName")

        assert await eventually(scheduled, 30, "pod bound to a node") == selected
        pv = await kube.get(PV, pvc["spec"]["volumeName"])
        terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
        assert terms == [{"matchExpressions": [
            {"key": TOPOLOGY_KEY, "operator": "In", "values": [selected]}]}]  # fmt: skip

        # No kubelet will confirm the pod's end: delete it at once, as a node's loss would.
        from kubernetes_asyncio import client

        await client.CoreV1Api(kube.client).delete_namespaced_pod("app", ns, grace_period_seconds=0)
        await kube.delete(PVC, "db", ns)

        async def pv_gone():
            return await get_or_none(kube, PV, pv["metadata"]["name"]) is None

        await eventually(pv_gone, 30, "PV deleted")
