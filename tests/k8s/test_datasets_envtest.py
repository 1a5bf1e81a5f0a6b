"""cairn-cache-syncer on the real control plane, as a cluster user meets it: deploy/'s CRDs
and RBAC applied, the syncer under its own ServiceAccount, objects from kubectl-style
manifests, the real PV binder binding the dataset's claim, the scale subresource an HPA
would use, and a Dataset deleted while a pod uses it."""

from __future__ import annotations

import uuid

import yaml
from kubeharness import eventually, get_or_none, running

from cairn import datasets as names
from cairn.events.types import NodeCacheReported, VolumeProvisioned, VolumeRequested
from cairn.kube.api import EVENT, NAMESPACE, NODE, POD, PV, PVC, labels
from cairn.retry import Backoff
from cairn_cache_syncer.syncer import CacheSyncer

FAST = Backoff(initial=0.05, maximum=0.5, jitter=False)

MANIFESTS = """
apiVersion: data.cairn.io/v1alpha1
kind: Dataset
metadata: {name: imagenet, namespace: NS}
spec:
  mounts: [{mountPoint: "cairn://VOL/train"}]
  placement: Exclusive
---
apiVersion: data.cairn.io/v1alpha1
kind: CairnRuntime
metadata: {name: imagenet, namespace: NS}
spec:
  replicas: 1
  tieredStore:
    levels: [{mediumType: SSD, path: /var/cache/cairn, quota: 1Gi}]
---
apiVersion: v1
kind: Pod
metadata: {name: trainer, namespace: NS}
spec:
  nodeSelector: {no-such-node: "true"}  # stays unscheduled: no kubelet would run it anyway
  containers: [{name: c, image: busybox}]
  volumes: [{name: data, persistentVolumeClaim: {claimName: imagenet}}]
"""


async def test_dataset_is_bound_labelled_scaled_and_deleted(kube, sa_kube, nodes, store):
    ns = f"ds-{uuid.uuid4().hex[:6]}"
    vol = f"vol-{uuid.uuid4().hex[:6]}"
    await kube.create(NAMESPACE, {"metadata": {"name": ns}})
    await store.append("volume", vol, [VolumeRequested(name=vol, capacity_bytes=1 << 30),
                                       VolumeProvisioned(capacity_bytes=1 << 30,
                                                         path=f"/volumes/{vol}")], None)  # fmt: skip
    dataset, runtime, pod = yaml.safe_load_all(
        MANIFESTS.replace("NS", ns).replace("VOL", vol))  # fmt: skip
    api = await sa_kube("cairn-cache-syncer")  # a missing RBAC rule fails here
    syncer = CacheSyncer(api, store, resync=0.5, backoff=FAST)
    async with running(syncer.run()):
        await kube.create(names.DATASET, dataset)
        await kube.create(names.RUNTIME, runtime)

        async def claim_bound():
            pvc = await get_or_none(kube, PVC, "imagenet", ns)
            return pvc if (pvc or {}).get("status", {}).get("phase") == "Bound" else None

        pvc = await eventually(claim_bound, 30, "the dataset's claim bound by the PV binder")
        pv = await kube.get(PV, pvc["spec"]["volumeName"])
        assert pv["spec"]["csi"]["volumeHandle"] == f"{ns}-imagenet"
        assert pv["spec"]["csi"]["volumeAttributes"]["path"] == f"/volumes/{vol}/train"
        ds = await kube.get(names.DATASET, "imagenet", ns)
        assert ds["status"]["phase"] == "Bound"
        s_label = names.cache_label(ns, "imagenet", ds["metadata"]["uid"])

        async def labelled():
            found = [n for n in nodes if labels(await kube.get(NODE, n)).get(s_label)]
            return found if len(found) == 1 else None

        (cache_node,) = await eventually(labelled, 30, "one cache node labelled")
        await store.append("node", cache_node, [NodeCacheReported(
            node=cache_node, dataset=f"{ns}/imagenet", cached_bytes=512 << 20,
            capacity_bytes=1 << 30)], None)  # fmt: skip

        async def ready():
            rt = await kube.get(names.RUNTIME, "imagenet", ns)
            st = rt.get("status") or {}
            return st if st.get("cachePhase") == "Ready" else None

        st = await eventually(ready, 30, "runtime cache Ready")
        assert st["readyReplicas"] == 1 and st["selector"] == f"{s_label}=true"
        # the scale subresource, as an HPA reads it
        scale = await kube._call("GET", names.RUNTIME.path(ns, "imagenet") + "/scale")
        assert scale["spec"]["replicas"] == 1 and scale["status"]["replicas"] == 1
        assert scale["status"]["selector"] == f"{s_label}=true"
        ds = await kube.get(names.DATASET, "imagenet", ns)
        assert ds["status"]["cacheStates"]["cached"] == "512.00MiB"
        assert labels(await kube.get(NODE, cache_node))[names.DATASET_NUM] == "1"

        # deleting the dataset while a pod uses its claim waits, and says so
        await kube.create(POD, pod)
        await kube.delete(names.DATASET, "imagenet", ns)

        async def waiting():
            obj = await kube.get(names.DATASET, "imagenet", ns)
            conds = (obj.get("status") or {}).get("conditions") or []
            return [c for c in conds if c["type"] == "Deleting"]

        (cond,) = await eventually(waiting, 30, "a Deleting condition")
        assert cond["reason"] == "InUse" and "trainer" in cond["message"]
        events, _ = await kube.list(EVENT, ns)
        assert any(e["reason"] == "DatasetInUse" for e in events)
        await kube.delete(POD, "trainer", ns)

        async def all_gone():
            return (await get_or_none(kube, names.DATASET, "imagenet", ns) is None
                    and await get_or_none(kube, PVC, "imagenet", ns) is None
                    and await get_or_none(kube, PV, f"{ns}-imagenet") is None
                    and not labels(await kube.get(NODE, cache_node)).get(s_label))  # fmt: skip

        await eventually(all_gone, 60, "dataset, claim, PV and labels gone")
        # the runtime stays, NotReady, and can be deleted without hanging
        await kube.delete(names.RUNTIME, "imagenet", ns)

        async def runtime_gone():
            return await get_or_none(kube, names.RUNTIME, "imagenet", ns) is None

        await eventually(runtime_gone, 30, "runtime deleted")
        assert names.DATASET_NUM not in labels(await kube.get(NODE, cache_node))
