"""The cache-syncer's pure parts: mount URLs, the PV/PVC of a binding, node choice, shares
of a DataLoad, desired labels with expiry, status numbers, and the fold of events."""

from __future__ import annotations

import json

import pytest

from cairn import datasets as names
from cairn.errors import InvalidArgument, NotFound
from cairn.events.envelope import Envelope
from cairn.events.types import (
    DatasetBound,
    DatasetUnbound,
    NodeCacheReported,
    RuntimeScaled,
    VolumeStaged,
    VolumeUnstaged,
)
from cairn_cache_syncer import binding, labels, placement, status
from cairn_cache_syncer.facts import Facts

pytestmark = pytest.mark.unit


def ds(*mounts, **spec):
    return {"metadata": {"name": "d", "namespace": "ns", "uid": "u"},
            "spec": {"mounts": [{"mountPoint": m} for m in mounts], **spec}}  # fmt: skip


def test_mount_urls_resolve_to_file_system_directories():
    volumes = {"vol-1": {"name": "pvc-abc", "path": "/v/vol-1"}}
    assert binding.resolve_mounts(ds("cairn://vol-1/train"), volumes, lambda *_: None)[0][
        "path"] == "/v/vol-1/train"  # fmt: skip
    assert binding.resolve_mounts(ds("cairn://pvc-abc"), volumes, lambda *_: None)[0][
        "path"] == "/v/vol-1"  # by the name it was created with  # fmt: skip
    pv = {"spec": {"csi": {"driver": "csi.cairn.io", "volumeHandle": "vol-1",
                           "volumeAttributes": {"path": "/v/vol-1"}}}}  # fmt: skip
    got = binding.resolve_mounts(ds("pvc://data/x"), volumes, lambda ns, c: pv)
    assert got == [{"name": "x", "path": "/v/vol-1/x", "read_only": True, "volume": "vol-1"}]
    with pytest.raises(NotFound):
        binding.resolve_mounts(ds("cairn://nope"), volumes, lambda *_: None)
    with pytest.raises(InvalidArgument):
        binding.resolve_mounts(ds("cairn://vol-1/../etc"), volumes, lambda *_: None)
    with pytest.raises(InvalidArgument):
        binding.parse_mount("s3://bucket")


def test_several_mounts_are_directories_of_one_tree():
    volumes = {"vol-1": {"name": "pvc-abc", "path": "/v/vol-1"},
               "vol-2": {"path": "/v/vol-2"}}  # fmt: skip
    dataset = ds("cairn://vol-1/train", "cairn://vol-2")
    dataset["spec"]["mounts"][1]["readOnly"] = False
    got = binding.resolve_mounts(dataset, volumes, lambda *_: None)
    assert got == [
        {"name": "train", "path": "/v/vol-1/train", "read_only": True, "volume": "vol-1"},
        {"name": "vol-2", "path": "/v/vol-2", "read_only": False, "volume": "vol-2"},
    ]  # a name by default: the path's last element, else the volume
    pv, _ = binding.pv_and_pvc(dataset, {"spec": {}}, got)
    attrs = pv["spec"]["csi"]["volumeAttributes"]
    assert attrs["path"] == "/v/vol-1/train"  # the first, for plugins from before trees
    assert [m["name"] for m in json.loads(attrs["mounts"])] == ["train", "vol-2"]
    named = ds("cairn://vol-1/a", "cairn://vol-1/b")
    named["spec"]["mounts"][0]["name"] = "first"
    assert [m["name"] for m in binding.resolve_mounts(named, volumes, lambda *_: None)] == [
        "first", "b"]  # fmt: skip
    for bad in ("a/b", "..", ".", "x" * 256):
        dataset = ds("cairn://vol-1/a", "cairn://vol-2")
        dataset["spec"]["mounts"][0]["name"] = bad
        with pytest.raises(InvalidArgument, match="mount 0: name"):
            binding.resolve_mounts(dataset, volumes, lambda *_: None)


def test_two_mounts_may_not_share_a_name():
    volumes = {"vol-1": {"path": "/v/vol-1"}, "vol-2": {"path": "/v/vol-2"}}
    same_last = ds("cairn://vol-1/train", "cairn://vol-2/train")
    with pytest.raises(InvalidArgument, match="mounts 0 and 1 are both named 'train'"):
        binding.resolve_mounts(same_last, volumes, lambda *_: None)
    same_last["spec"]["mounts"][1]["name"] = "train-2"
    assert len(binding.resolve_mounts(same_last, volumes, lambda *_: None)) == 2
    named = ds("cairn://vol-1", "cairn://vol-2")
    named["spec"]["mounts"][1]["name"] = "vol-1"
    with pytest.raises(InvalidArgument, match="both named 'vol-1'"):
        binding.resolve_mounts(named, volumes, lambda *_: None)


def test_binding_writes_a_static_pv_and_its_claim():
    runtime = {"spec": {"tieredStore": {"levels": [
        {"mediumType": "MEM", "path": "/dev/shm/c", "quota": "1Gi"}]}}}  # fmt: skip
    mounts = [{"name": "v", "path": "/v", "read_only": True, "volume": "v"}]
    pv, pvc = binding.pv_and_pvc(ds("cairn://v"), runtime, mounts)
    assert pv["metadata"]["name"] == "ns-d" and pvc["metadata"]["name"] == "d"
    attrs = pv["spec"]["csi"]["volumeAttributes"]
    assert attrs["type"] == "dataset" and attrs["readOnly"] == "true"
    assert attrs["cacheSize"] == str(1 << 30) and attrs["cacheMedium"] == "MEM"
    assert pv["spec"]["claimRef"]["name"] == "d" and pvc["spec"]["volumeName"] == "ns-d"
    assert binding.ours(pv, "ns", "d") and not binding.ours(pv, "ns", "other")
    writable = ds("cairn://v", accessModes=["ReadWriteMany"])
    mounts[0]["read_only"] = False
    assert not binding.read_only(writable, mounts)


def node(name, ready=True, **lab):
    return {"metadata": {"name": name, "labels": lab},
            "status": {"conditions": [{"type": "Ready", "status": str(ready)}]}}  # fmt: skip


def test_nodes_are_chosen_sticky_by_room_and_rules():
    nodes = [node("a", zone="x"), node("b", zone="y"), node("c", zone="x"),
             node("d", ready=False, zone="x")]  # fmt: skip
    choose = dict(nodes=nodes, node_selector=None, taken=set(), dead=set(),
                  available={"a": 1, "b": 5, "c": 3}, node_affinity=None)  # fmt: skip
    assert placement.choose_nodes(current=[], replicas=2, **choose) == ["b", "c"]
    assert placement.choose_nodes(current=["a"], replicas=2, **choose) == ["a", "b"]
    assert placement.choose_nodes(current=["a", "b"], replicas=1, **choose) == ["a"]
    zone_x = {"required": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["x"]}]}]}}  # fmt: skip
    assert placement.choose_nodes(current=[], replicas=5, **{**choose, "node_affinity": zone_x}
                                  ) == ["c", "a"]  # fmt: skip
    assert placement.choose_nodes(current=["b"], replicas=2,
                                  **{**choose, "taken": {"c"}, "dead": {"b"}}) == ["a"]  # fmt: skip


def test_dataload_shares_spread_paths_over_nodes():
    assert placement.shares([("/a", 1), ("/b", 1), ("/c", 2)], ["n1", "n2"]) == {
        "n1": ["/a", "/c"], "n2": ["/b", "/c"]}  # fmt: skip
    assert placement.shares([("/", 3)], ["n1"]) == {"n1": ["/"]}
    assert placement.shares([("/", 1)], []) == {}


def env(event, aggregate_id, at, version=1):
    return Envelope.wrap(event, aggregate_id, version, occurred_at=at)


def test_labels_follow_staging_cache_nodes_and_expire():
    f = Facts()
    f.apply(env(DatasetBound(runtime="r", uid="u", volume_handle="ns-d", pv="ns-d", pvc="ns/d"),
                "ns/d", 100))  # fmt: skip
    f.apply(env(RuntimeScaled(replicas=1, nodes=["a"], tiers=[{"quota": 2 << 30}],
                              clean_policy="OnDemand"), "ns/d", 100, 2))  # fmt: skip
    f.apply(env(VolumeStaged(node="b", staging_path="/s"), "ns-d", 101))
    want = labels.desired(f, now=110, expiry=30)
    assert want["a"] == {"data.cairn.io/s-ns-d": "true", "data.cairn.io/s-c-ns-d": "2Gi",
                         names.DATASET_NUM: "1"}  # fmt: skip
    assert want["b"] == {"data.cairn.io/f-ns-d": "true", names.DATASET_NUM: "1"}
    assert labels.desired(f, now=200, expiry=30) == {}  # nobody reported: all expired
    f.apply(env(NodeCacheReported(node="a", dataset="ns/d", cached_bytes=5), "a", 190))
    assert set(labels.desired(f, now=200, expiry=30)) == {"a"}
    f.apply(env(VolumeUnstaged(node="b", staging_path="/s"), "ns-d", 191))  # OnDemand
    assert "b" not in labels.desired(f, now=192, expiry=30)
    assert labels.diff({"data.cairn.io/f-x": "true", "other": "1"}, {"data.cairn.io/s-y": "true"}
                       ) == ({"data.cairn.io/s-y": "true"}, ["data.cairn.io/f-x"])  # fmt: skip
    f.apply(env(DatasetUnbound(reason="gone"), "ns/d", 193, 3))
    assert labels.desired(f, now=194, expiry=30) == {}


def test_long_names_use_the_uid():
    long = "n" * 60
    assert names.cache_label("ns", long, "1234") == "data.cairn.io/s-1234"
    assert len(names.fuse_label("ns", "short", "u").split("/")[1]) <= 63


def test_status_numbers():
    assert status.human(0) == "0.00B" and status.human(1536 << 20) == "1.50GiB"
    assert status.percentage(1, 3) == "33.3%" and status.percentage(9, 3) == "100.0%"
    assert status.phase_of(2, 2) == "Ready" and status.phase_of(2, 1) == "PartialReady"
    assert status.phase_of(2, 0) == "NotReady"
    old = [status.condition(None, "Ready", True, "Bound", "x")]
    old[0]["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    assert status.condition(old, "Ready", True, "Bound", "x")["lastTransitionTime"] == (
        "2020-01-01T00:00:00Z")  # fmt: skip
