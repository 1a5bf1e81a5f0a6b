"""deploy/ on the real control plane: what the session applied with cairn.kube.apply is
there as written (kustomization's namespace and labels included), CRDs are served, and
applying again changes nothing."""

from __future__ import annotations

import pytest
from controlplane import CLUSTER_CONFIG, DEPLOY

from cairn.kube.apply import CRD, apply, established, kind_of, load_kustomization, plural


@pytest.mark.parametrize(
    ("kind", "resource"),
    [("StorageClass", "storageclasses"), ("NetworkPolicy", "networkpolicies"),
     ("Gateway", "gateways"), ("Endpoints", "endpoints"), ("Ingress", "ingresses"),
     ("CSIStorageCapacity", "csistoragecapacities"), ("Dataset", "datasets")],
)  # fmt: skip
def test_plurals(kind, resource):
    assert plural(kind) == resource


def wanted() -> list[dict]:
    return [o for o in load_kustomization(DEPLOY) if o.get("kind") in CLUSTER_CONFIG]


async def test_deploy_is_applied_as_kustomize_would(kube, cluster):
    objects = wanted()
    assert {o["kind"] for o in objects} >= {"Namespace", "ServiceAccount", "ClusterRole",
                                            "StorageClass", "CSIDriver"}  # fmt: skip
    assert not {o["kind"] for o in cluster.deploy} - CLUSTER_CONFIG
    for obj in objects:
        kind = kind_of(obj, {})
        m = obj["metadata"]
        live = await kube.get(kind, m["name"], m.get("namespace"))
        assert live["metadata"].get("labels", {}).items() >= m.get("labels", {}).items()
        if obj["kind"] == "CustomResourceDefinition":
            assert established(await kube.get(CRD, m["name"]))


async def test_applying_again_changes_nothing(kube, cluster):
    before = {(o["kind"], o["metadata"]["name"]): o["metadata"]["resourceVersion"]
              for o in cluster.deploy}  # fmt: skip
    again = await apply(kube, wanted())
    after = {(o["kind"], o["metadata"]["name"]): o["metadata"]["resourceVersion"] for o in again}
    unchanged = {k for k, v in after.items() if before.get(k) == v}
    # A replace with the same content is a no-op for the API server (same resourceVersion);
    # CRDs and Namespaces may have moved on through their controllers' status writes.
    moved = set(after) - unchanged
    assert all(kind in ("CustomResourceDefinition", "Namespace") for kind, _ in moved), moved
