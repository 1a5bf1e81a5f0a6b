"""The dataset webhook's decisions, in process: the JSON Patch a pod gets (pod_patch), the
AdmissionReview answer (admit) and the claim lookups over the in-memory Kubernetes API."""

from __future__ import annotations

import asyncio
import base64
import copy
import json

import pytest

from cairn import datasets
from cairn.errors import NotFound, UnavailableError
from cairn.kube.api import PVC, Obj
from cairn.kube.memory import MemoryAPI
from cairn_cache_syncer.webhook import (
    AVOID_WEIGHT,
    PREFERRED_WEIGHT,
    ClaimIndex,
    DatasetRef,
    admit,
    pod_patch,
)

SHARED = DatasetRef("team", "imagenet", "uid-1")
CACHED = {"key": SHARED.cache_label, "operator": "Exists"}
AVOID = {"key": datasets.DATASET_NUM, "operator": "DoesNotExist"}


def apply(doc: Obj, ops: list[Obj]) -> Obj:
    """Applies the `add` and `replace` operations the webhook emits (RFC 6902)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] in ("add", "replace"), op
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]
        ]
        target = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            if last == "-":
                target.append(op["value"])
            else:
                target[int(last)] = op["value"]
        else:
            assert op["op"] == "add" or last in target, op
            target[last] = op["value"]
    return doc


def pod(*claims: str, labels: dict | None = None, affinity: Obj | None = None) -> Obj:
    spec: Obj = {
        "containers": [{"name": "main", "image": "busybox"}],
        "volumes": [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": c}}
                    for i, c in enumerate(claims)] + [{"name": "scratch", "emptyDir": {}}],
    }  # fmt: skip
    if affinity is not None:
        spec["affinity"] = affinity
    return {"metadata": {"name": "p", "namespace": "team", "labels": labels or {}}, "spec": spec}


def served_by(**claims: DatasetRef):
    return lambda claim: claims.get(claim)


def mutate(p: Obj, served) -> Obj:
    """The pod after its patch; a second admission of the result changes nothing."""
    after = apply(p, pod_patch(p, served))
    assert pod_patch(after, served) == [], "reinvocation added terms again"
    return after


def node_affinity(p: Obj) -> Obj:
    return p["spec"]["affinity"]["nodeAffinity"]


def test_dataset_claim_prefers_the_cache_nodes():
    after = mutate(pod("imagenet", "logs"), served_by(imagenet=SHARED))
    assert node_affinity(after) == {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": PREFERRED_WEIGHT, "preference": {"matchExpressions": [CACHED]}}
        ]
    }
    assert CACHED["key"] == "data.cairn.io/s-team-imagenet"


def test_sched_label_makes_the_affinity_required():
    p = pod("imagenet", labels={datasets.sched_label("imagenet"): "required"})
    after = mutate(p, served_by(imagenet=SHARED))
    assert node_affinity(after) == {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [CACHED]}]
        }
    }


def test_other_sched_values_stay_preferred():
    p = pod("imagenet", labels={datasets.sched_label("imagenet"): "preferred"})
    after = mutate(p, served_by(imagenet=SHARED))
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in node_affinity(after)


def test_required_is_anded_into_every_user_term_and_nothing_is_removed():
    zone = {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}
    gpu = {"key": "gpu", "operator": "Exists"}
    user = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [zone]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
            ]},
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 10, "preference": {"matchExpressions": [gpu]}}],
        },
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []},
    }  # fmt: skip
    other = DatasetRef("team", "coco", "uid-2")
    p = pod("imagenet", "coco", labels={datasets.sched_label("imagenet"): "required"},
            affinity=user)  # fmt: skip
    ops = pod_patch(p, served_by(imagenet=SHARED, coco=other))
    assert all(op["op"] == "add" for op in ops), ops  # small additions, no replacement
    after = apply(p, ops)
    affinity = after["spec"]["affinity"]
    assert affinity["podAntiAffinity"] == user["podAntiAffinity"]
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {"matchExpressions": [zone, CACHED]},
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}],
         "matchExpressions": [CACHED]},
    ]  # fmt: skip
    assert affinity["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == [
        {"weight": 10, "preference": {"matchExpressions": [gpu]}},
        {"weight": PREFERRED_WEIGHT, "preference": {"matchExpressions": [
            {"key": other.cache_label, "operator": "Exists"}]}},
    ]  # fmt: skip
    assert pod_patch(after, served_by(imagenet=SHARED, coco=other)) == []


def test_pod_without_claims_is_steered_away_from_cache_nodes():
    after = mutate(pod(), served_by())
    assert node_affinity(after) == {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": AVOID_WEIGHT, "preference": {"matchExpressions": [AVOID]}}
        ]
    }


def test_claim_that_is_not_a_datasets_counts_as_no_dataset():
    after = mutate(pod("postgres-data"), served_by(imagenet=SHARED))
    assert node_affinity(after)["preferredDuringSchedulingIgnoredDuringExecution"] == [
        {"weight": AVOID_WEIGHT, "preference": {"matchExpressions": [AVOID]}}
    ]


def test_a_term_the_user_wrote_is_not_added_again():
    user = {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 7, "preference": {"matchExpressions": [CACHED]}}
            ]
        }
    }
    assert pod_patch(pod("imagenet", affinity=user), served_by(imagenet=SHARED)) == []


def test_two_claims_of_one_dataset_make_one_term():
    after = mutate(pod("a", "b"), served_by(a=SHARED, b=SHARED))
    assert len(node_affinity(after)["preferredDuringSchedulingIgnoredDuringExecution"]) == 1


def test_long_names_use_the_dataset_uid():
    ref = DatasetRef("a-rather-long-namespace-name", "and-an-even-longer-dataset-name-too", "u-42")
    assert ref.cache_label == "data.cairn.io/s-u-42"
    after = mutate(pod("x"), served_by(x=ref))
    term = node_affinity(after)["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["preference"]["matchExpressions"] == [
        {"key": "data.cairn.io/s-u-42", "operator": "Exists"}
    ]


def test_pod_bound_to_a_node_is_left_alone():
    p = pod("imagenet", labels={datasets.sched_label("imagenet"): "required"})
    p["spec"]["nodeName"] = "node-1"
    assert pod_patch(p, served_by(imagenet=SHARED)) == []


def test_explicit_null_affinity_is_replaced_by_an_add():
    p = pod(affinity=None)
    p["spec"]["affinity"] = None
    ops = pod_patch(p, served_by())
    assert [op["path"] for op in ops] == ["/spec/affinity"] and ops[0]["op"] == "add"


# ------------------------------------------------------------------ admission reviews


def review(obj: Obj, kind: str = "Pod", operation: str = "CREATE") -> Obj:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "r-1", "kind": {"group": "", "version": "v1", "kind": kind},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "team", "operation": operation, "object": obj}}  # fmt: skip


def patch_of(answer: Obj) -> list[Obj]:
    response = answer["response"]
    assert response["allowed"] is True and response["uid"] == "r-1"
    if "patch" not in response:
        return []
    assert response["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(response["patch"]))


async def test_admit_answers_with_a_base64_json_patch():
    seen = []

    async def lookup(namespace, claims):
        seen.append((namespace, claims))
        return {"imagenet": SHARED}

    answer = await admit(review(pod("imagenet")), lookup)
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    assert seen == [("team", ["imagenet"])]
    assert patch_of(answer) == pod_patch(pod("imagenet"), served_by(imagenet=SHARED))


@pytest.mark.parametrize("error", [UnavailableError("apiserver down"), NotFound("no pvc"),
                                   TimeoutError()])  # fmt: skip
async def test_a_failed_lookup_allows_without_patch_and_logs_one_line(error, caplog):
    async def lookup(namespace, claims):
        raise error

    answer = await admit(review(pod("imagenet")), lookup)
    assert patch_of(answer) == []
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "team/p" in warnings[0].getMessage()


async def test_other_kinds_and_operations_are_allowed_unchanged(caplog):
    async def lookup(namespace, claims):
        raise AssertionError("no lookup expected")

    assert patch_of(await admit(review({"metadata": {}}, kind="Deployment"), lookup)) == []
    assert patch_of(await admit(review(pod(), operation="UPDATE"), lookup)) == []


async def test_a_malformed_pod_is_allowed_unchanged():
    async def lookup(namespace, claims):
        return {}

    broken = pod()
    broken["spec"]["affinity"] = {"nodeAffinity": "not an object"}
    assert patch_of(await admit(review(broken), lookup)) == []


# ------------------------------------------------------------------ claim lookups


async def make_dataset(api: MemoryAPI, ns: str, name: str) -> Obj:
    dataset = await api.create(
        datasets.DATASET,
        {
            "metadata": {"name": name, "namespace": ns},
            "spec": {"mounts": [{"mountPoint": "cairn://v"}]},
        },
    )
    await api.create(
        PVC,
        {
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {datasets.DATASET_LABEL: name, datasets.DATASET_NAMESPACE_LABEL: ns},
            },
            "spec": {},
        },
    )
    return dataset


async def test_claim_index_reads_the_api_then_its_caches():
    api = MemoryAPI()
    dataset = await make_dataset(api, "team", "imagenet")
    await api.create(PVC, {"metadata": {"name": "plain", "namespace": "team"}, "spec": {}})
    index = ClaimIndex(api)
    # before the caches listed: straight from the API
    found = await index.lookup("team", ["imagenet", "plain"])
    assert found == {"imagenet": DatasetRef("team", "imagenet", dataset["metadata"]["uid"]),
                     "plain": None}  # fmt: skip
    task = asyncio.create_task(index.run())
    try:
        await index.claims.synced.wait()
        await index.datasets.synced.wait()
        gets = api.calls.get("get", 0)
        assert (await index.lookup("team", ["imagenet"]))["imagenet"].name == "imagenet"
        assert api.calls.get("get", 0) == gets, "a cached claim was read from the API"
        with pytest.raises(NotFound):
            await index.lookup("team", ["missing"])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_claim_index_gives_up_after_its_timeout():
    class Slow(MemoryAPI):
        async def get(self, kind, name, namespace=None):
            await asyncio.sleep(10)

    with pytest.raises(TimeoutError):
        await ClaimIndex(Slow(), timeout=0.05).lookup("team", ["imagenet"])
