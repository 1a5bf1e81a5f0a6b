"""Cache-aware scheduling on the real control plane, end to end: the cache-syncer (under its
ServiceAccount) binds a Dataset and labels its cache node, `cairn-dataset-webhook` (a real
process under its own ServiceAccount, called by the apiserver) adds the affinity, and the
real kube-scheduler places the pods: a pod that requires the cache lands on the cache node,
and a pod that reads no dataset lands elsewhere."""

from __future__ import annotations

import uuid

from kubeharness import eventually, get_or_none, running
from selfsigned import make_certs
from test_webhook_envtest import WEBHOOKS, configuration, make_namespace, webhook_process

from cairn import datasets as names
from cairn.events.types import VolumeProvisioned, VolumeRequested
from cairn.kube.api import NODE, POD, labels
from cairn.localstack import free_port
from cairn.retry import Backoff
from cairn_cache_syncer.syncer import CacheSyncer

FAST = Backoff(initial=0.05, maximum=0.5, jitter=False)


def pod(ns: str, name: str, claim: str | None = None, required: str | None = None) -> dict:
    spec: dict = {"containers": [{"name": "main", "image": "busybox"}]}
    if claim:
        spec["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
    pod_labels = {names.sched_label(required): "required"} if required else {}
    return {"metadata": {"name": name, "namespace": ns, "labels": pod_labels}, "spec": spec}


async def force_delete(kube, ns: str, name: str) -> None:
    """Pods bound to nodes without a kubelet would wait for it forever: gone at once."""
    await kube._call("DELETE", POD.path(ns, name), {"gracePeriodSeconds": 0})


async def test_pods_go_to_the_cache_nodes_the_webhook_names(
    kube, control_plane, sa_kube, sa_kubeconfig, nodes, store, tmp_path
):
    ns = await make_namespace(kube)
    vol = f"vol-{uuid.uuid4().hex[:6]}"
    await store.append("volume", vol, [VolumeRequested(name=vol, capacity_bytes=1 << 30),
                                       VolumeProvisioned(capacity_bytes=1 << 30,
                                                         path=f"/volumes/{vol}")], None)  # fmt: skip
    syncer = CacheSyncer(await sa_kube("cairn-cache-syncer"), store, resync=0.5, backoff=FAST)
    certs = make_certs(tmp_path / "tls")
    port = free_port()
    hooks = f"cairn-sched-{ns}"
    placed: list[str] = []
    async with running(syncer.run()):
        await kube.create(names.DATASET, {"metadata": {"name": "imagenet", "namespace": ns},
                                          "spec": {"mounts": [{"mountPoint": f"cairn://{vol}"}]}})  # fmt: skip
        await kube.create(names.RUNTIME, {"metadata": {"name": "imagenet", "namespace": ns},
                                          "spec": {"replicas": 1}})  # fmt: skip
        uid = (await kube.get(names.DATASET, "imagenet", ns))["metadata"]["uid"]
        s_label = names.cache_label(ns, "imagenet", uid)

        async def cache_node():
            found = [n for n in nodes if labels(await kube.get(NODE, n)).get(s_label)]
            return found[0] if found else None

        cached = await eventually(cache_node, 30, "the cache node labelled")
        try:
            async with webhook_process(sa_kubeconfig("cairn-dataset-webhook"), certs, port,
                                       tmp_path / "webhook.log"):  # fmt: skip
                await kube.create(WEBHOOKS, configuration(hooks, ns, port, certs.ca_pem))

                async def steered():  # the apiserver picks the configuration up a moment later
                    name = f"probe-{uuid.uuid4().hex[:6]}"
                    made = await kube.create(POD, pod(ns, name, "imagenet", required="imagenet"))
                    placed.append(name)
                    return made if (made["spec"].get("affinity") or {}).get("nodeAffinity") \
                        else None  # fmt: skip

                reader = await eventually(steered, 30, "the webhook in effect")
                terms = reader["spec"]["affinity"]["nodeAffinity"][
                    "requiredDuringSchedulingIgnoredDuringExecution"
                ]["nodeSelectorTerms"]
                assert terms == [{"matchExpressions": [{"key": s_label, "operator": "Exists"}]}]
                other = await kube.create(POD, pod(ns, "no-dataset"))
                placed.append("no-dataset")

                async def scheduled(name):
                    got = await get_or_none(kube, POD, name, ns)
                    return (got or {}).get("spec", {}).get("nodeName")

                node_of_reader = await eventually(
                    lambda: scheduled(reader["metadata"]["name"]), 30, "the reader scheduled"
                )
                assert node_of_reader == cached  # required: nowhere else
                node_of_other = await eventually(
                    lambda: scheduled(other["metadata"]["name"]), 30, "the other pod scheduled"
                )
                assert node_of_other != cached  # steered away from cache nodes
        finally:
            await kube._call("DELETE", WEBHOOKS.path(None, hooks))
            for name in placed:
                await force_delete(kube, ns, name)
        await kube.delete(names.RUNTIME, "imagenet", ns)

        async def unlabelled():
            return not labels(await kube.get(NODE, cached)).get(s_label)

        await eventually(unlabelled, 30, "labels removed with the runtime")
