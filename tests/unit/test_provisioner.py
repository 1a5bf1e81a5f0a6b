"""What cairn-provisioner asks CreateVolume for and the PV it writes, from plain objects:
parameters, secrets templates, access modes, topology (selected node, allowedTopologies),
nodeAffinity, and which claims are its own. The whole loop against the real CSI Controller
is in tests/integration/test_provisioner_csi.py."""

from __future__ import annotations

import pytest

from cairn.errors import InvalidArgument, TemporaryError
from cairn.rpc.gen import csi_pb2
from cairn_provisioner.provisioner import (
    ANN_STORAGE_PROVISIONER,
    FINALIZER,
    PVC_NAME,
    build_pv,
    capabilities,
    claims_driver,
    secret_ref,
    topology_requirement,
    volume_parameters,
)

KEY = "topology.csi.cairn.io/node"
Mode = csi_pb2.VolumeCapability.AccessMode


def pvc(**ann):
    return {"metadata": {"name": "data", "namespace": "apps", "uid": "u-1",
                         "annotations": ann, "resourceVersion": "7"},
            "spec": {"storageClassName": "sc", "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}}}


def sc(**kw):
    return {"metadata": {"name": "sc"}, "provisioner": "csi.cairn.io", **kw}


def nodes(*names):
    n = {x: {"metadata": {"name": x, "labels": {KEY: x}}} for x in names}
    c = {x: {"metadata": {"name": x}, "spec": {"drivers": [
        {"name": "csi.cairn.io", "nodeID": x, "topologyKeys": [KEY]}]}} for x in names}
    return n, c


def test_claims_of_our_class_are_ours():
    assert claims_driver(pvc(), sc(), "csi.cairn.io")
    assert claims_driver(pvc(**{ANN_STORAGE_PROVISIONER: "csi.cairn.io"}), sc(), "csi.cairn.io")
    assert not claims_driver(pvc(**{ANN_STORAGE_PROVISIONER: "other"}), sc(), "csi.cairn.io")
    assert not claims_driver(pvc(), sc(provisioner="other"), "csi.cairn.io")


def test_parameters_drop_csi_keys_and_add_claim_metadata():
    params = volume_parameters(sc(parameters={
        "type": "local", "csi.storage.k8s.io/provisioner-secret-name": "s"}), pvc(), "pvc-u-1")
    assert params == {"type": "local", PVC_NAME: "data",
                      "csi.storage.k8s.io/pvc/namespace": "apps",
                      "csi.storage.k8s.io/pv/name": "pvc-u-1"}


def test_secret_templates():
    params = {"csi.storage.k8s.io/provisioner-secret-name": "${pvc.name}-${pv.name}",
              "csi.storage.k8s.io/provisioner-secret-namespace": "${pvc.namespace}"}
    assert secret_ref(params, "provisioner", pvc(), "pvc-u-1") == {
        "name": "data-pvc-u-1", "namespace": "apps"}
    assert secret_ref(params, "node-stage", pvc(), "pvc-u-1") is None
    with pytest.raises(InvalidArgument):
        secret_ref({"csi.storage.k8s.io/provisioner-secret-name": "${nope}",
                    "csi.storage.k8s.io/provisioner-secret-namespace": "x"},
                   "provisioner", pvc(), "p")


def test_access_modes_become_capabilities():
    claim = pvc()
    claim["spec"]["accessModes"] = ["ReadWriteOnce", "ReadOnlyMany"]
    caps = capabilities(claim, sc(mountOptions=["noatime"]))
    assert [c.access_mode.mode for c in caps] == [Mode.SINGLE_NODE_WRITER,
                                                  Mode.MULTI_NODE_READER_ONLY]
    assert list(caps[0].mount.mount_flags) == ["noatime"]


def test_topology_of_the_selected_node_and_allowed_topologies():
    n, c = nodes("a", "b")
    req = topology_requirement(sc(), "b", n, c, "csi.cairn.io")
    assert [dict(t.segments) for t in req.requisite] == [{KEY: "b"}]
    allowed = sc(allowedTopologies=[{"matchLabelExpressions": [{"key": KEY, "values": ["a"]}]}])
    with pytest.raises(InvalidArgument):
        topology_requirement(allowed, "b", n, c, "csi.cairn.io")
    req = topology_requirement(allowed, None, n, c, "csi.cairn.io")
    assert [dict(t.segments) for t in req.requisite] == [{KEY: "a"}]
    req = topology_requirement(sc(), None, n, c, "csi.cairn.io")
    assert [dict(t.segments) for t in req.requisite] == [{KEY: "a"}, {KEY: "b"}]
    with pytest.raises(TemporaryError):
        topology_requirement(sc(), "unknown", n, c, "csi.cairn.io")


def test_pv_from_a_volume():
    volume = csi_pb2.Volume(volume_id="vol-1", capacity_bytes=2 << 30,
                            volume_context={"type": "local"})
    volume.accessible_topology.add(segments={KEY: "a"})
    pv = build_pv(pvc(), sc(reclaimPolicy="Retain", mountOptions=["noatime"]), volume,
                  "pvc-u-1", "csi.cairn.io", "me", {})
    spec = pv["spec"]
    assert spec["capacity"] == {"storage": "2Gi"}
    assert spec["persistentVolumeReclaimPolicy"] == "Retain"
    assert spec["mountOptions"] == ["noatime"]
    assert spec["claimRef"]["uid"] == "u-1" and spec["claimRef"]["namespace"] == "apps"
    assert spec["csi"]["volumeHandle"] == "vol-1"
    assert spec["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"] == [
        {"key": KEY, "operator": "In", "values": ["a"]}]
    assert pv["metadata"]["finalizers"] == [FINALIZER]
