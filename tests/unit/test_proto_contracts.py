"""The wire contracts kubelet and the CSI sidecars rely on, checked on the generated code.

Field numbers and types here were read off the published CSI specification (csi.v1) and
kubelet's pluginregistration v1 API. A failure means proto/*.proto drifted from what the
other side decodes: fix the .proto, not this test.
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor

from cairn.rpc.gen import admin_pb2, csi_pb2, csi_pb2_grpc, pluginregistration_pb2

CSI = csi_pb2.DESCRIPTOR
T = FieldDescriptor


def repeated(field: FieldDescriptor) -> bool:
    # protobuf 7 dropped FieldDescriptor.label; older releases lack is_repeated.
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == T.LABEL_REPEATED


def fields(message) -> dict[str, tuple[int, int, bool]]:
    """name -> (number, type, repeated) for a message class or descriptor."""
    descriptor = getattr(message, "DESCRIPTOR", message)
    return {f.name: (f.number, f.type, repeated(f)) for f in descriptor.fields}


def numbers(message) -> dict[str, int]:
    return {name: spec[0] for name, spec in fields(message).items()}


def test_package_and_services():
    assert CSI.package == "csi.v1"
    assert set(CSI.services_by_name) >= {"Identity", "Controller", "Node"}
    methods = {s: [m.name for m in CSI.services_by_name[s].methods] for s in CSI.services_by_name}
    assert methods["Identity"] == ["GetPluginInfo", "GetPluginCapabilities", "Probe"]
    assert set(methods["Controller"]) == {
        "CreateVolume", "DeleteVolume", "ControllerPublishVolume",
        "ControllerUnpublishVolume", "ValidateVolumeCapabilities", "ListVolumes",
        "GetCapacity", "ControllerGetCapabilities", "CreateSnapshot", "DeleteSnapshot",
        "ListSnapshots", "GetSnapshot", "ControllerExpandVolume", "ControllerGetVolume",
        "ControllerModifyVolume",
    }  # fmt: skip
    assert set(methods["Node"]) == {
        "NodeStageVolume", "NodeUnstageVolume", "NodePublishVolume", "NodeUnpublishVolume",
        "NodeGetVolumeStats", "NodeExpandVolume", "NodeGetCapabilities", "NodeGetInfo",
    }  # fmt: skip
    assert set(methods["GroupController"]) == {
        "GroupControllerGetCapabilities", "CreateVolumeGroupSnapshot",
        "DeleteVolumeGroupSnapshot", "GetVolumeGroupSnapshot",
    }  # fmt: skip
    snapshot_metadata = CSI.services_by_name["SnapshotMetadata"]
    assert all(m.server_streaming for m in snapshot_metadata.methods)


def test_rpc_request_and_response_types():
    for service in CSI.services_by_name.values():
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request"
            expected = f"{method.name}Response"
            assert method.output_type.name == expected, method.full_name


class _RecordingChannel:
    """Stands in for a channel: records the method paths a generated stub registers."""

    def __init__(self):
        self.paths = []

    def _record(self, path, *args, **kwargs):
        self.paths.append(path)
        return None

    unary_unary = unary_stream = stream_unary = stream_stream = _record


def test_grpc_paths_kubelet_dials():
    # kubelet and the sidecars call fully qualified paths such as /csi.v1.Node/NodeGetInfo.
    channel = _RecordingChannel()
    csi_pb2_grpc.IdentityStub(channel)
    csi_pb2_grpc.NodeStub(channel)
    assert "/csi.v1.Identity/Probe" in channel.paths
    assert "/csi.v1.Node/NodeGetInfo" in channel.paths
    assert "/csi.v1.Node/NodePublishVolume" in channel.paths


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            csi_pb2.CreateVolumeRequest,
            {
                "name": (1, T.TYPE_STRING, False),
                "capacity_range": (2, T.TYPE_MESSAGE, False),
                "volume_capabilities": (3, T.TYPE_MESSAGE, True),
                "parameters": (4, T.TYPE_MESSAGE, True),
                "secrets": (5, T.TYPE_MESSAGE, True),
                "volume_content_source": (6, T.TYPE_MESSAGE, False),
                "accessibility_requirements": (7, T.TYPE_MESSAGE, False),
                "mutable_parameters": (8, T.TYPE_MESSAGE, True),
            },
        ),
        (
            csi_pb2.NodePublishVolumeRequest,
            {
                "volume_id": (1, T.TYPE_STRING, False),
                "publish_context": (2, T.TYPE_MESSAGE, True),
                "staging_target_path": (3, T.TYPE_STRING, False),
                "target_path": (4, T.TYPE_STRING, False),
                "volume_capability": (5, T.TYPE_MESSAGE, False),
                "readonly": (6, T.TYPE_BOOL, False),
                "secrets": (7, T.TYPE_MESSAGE, True),
                "volume_context": (8, T.TYPE_MESSAGE, True),
            },
        ),
        (
            csi_pb2.NodeStageVolumeRequest,
            {
                "volume_id": (1, T.TYPE_STRING, False),
                "publish_context": (2, T.TYPE_MESSAGE, True),
                "staging_target_path": (3, T.TYPE_STRING, False),
                "volume_capability": (4, T.TYPE_MESSAGE, False),
                "secrets": (5, T.TYPE_MESSAGE, True),
                "volume_context": (6, T.TYPE_MESSAGE, True),
            },
        ),
        (
            csi_pb2.NodeGetInfoResponse,
            {
                "node_id": (1, T.TYPE_STRING, False),
                "max_volumes_per_node": (2, T.TYPE_INT64, False),
                "accessible_topology": (3, T.TYPE_MESSAGE, False),
            },
        ),
        (
            csi_pb2.Volume,
            {
                "capacity_bytes": (1, T.TYPE_INT64, False),
                "volume_id": (2, T.TYPE_STRING, False),
                "volume_context": (3, T.TYPE_MESSAGE, True),
                "content_source": (4, T.TYPE_MESSAGE, False),
                "accessible_topology": (5, T.TYPE_MESSAGE, True),
            },
        ),
        (csi_pb2.Topology, {"segments": (1, T.TYPE_MESSAGE, True)}),
        (
            csi_pb2.TopologyRequirement,
            {"requisite": (1, T.TYPE_MESSAGE, True), "preferred": (2, T.TYPE_MESSAGE, True)},
        ),
        (
            csi_pb2.CapacityRange,
            {"required_bytes": (1, T.TYPE_INT64, False), "limit_bytes": (2, T.TYPE_INT64, False)},
        ),
        (
            csi_pb2.VolumeCapability,
            {
                "block": (1, T.TYPE_MESSAGE, False),
                "mount": (2, T.TYPE_MESSAGE, False),
                "access_mode": (3, T.TYPE_MESSAGE, False),
            },
        ),
        (
            csi_pb2.VolumeCapability.MountVolume,
            {
                "fs_type": (1, T.TYPE_STRING, False),
                "mount_flags": (2, T.TYPE_STRING, True),
                "volume_mount_group": (3, T.TYPE_STRING, False),
            },
        ),
        (
            csi_pb2.GetPluginInfoResponse,
            {
                "name": (1, T.TYPE_STRING, False),
                "vendor_version": (2, T.TYPE_STRING, False),
                "manifest": (3, T.TYPE_MESSAGE, True),
            },
        ),
        (csi_pb2.GetPluginCapabilitiesResponse, {"capabilities": (1, T.TYPE_MESSAGE, True)}),
        (csi_pb2.ProbeResponse, {"ready": (1, T.TYPE_MESSAGE, False)}),
        (
            csi_pb2.DeleteVolumeRequest,
            {"volume_id": (1, T.TYPE_STRING, False), "secrets": (2, T.TYPE_MESSAGE, True)},
        ),
        (
            csi_pb2.ControllerPublishVolumeRequest,
            {
                "volume_id": (1, T.TYPE_STRING, False),
                "node_id": (2, T.TYPE_STRING, False),
                "volume_capability": (3, T.TYPE_MESSAGE, False),
                "readonly": (4, T.TYPE_BOOL, False),
                "secrets": (5, T.TYPE_MESSAGE, True),
                "volume_context": (6, T.TYPE_MESSAGE, True),
            },
        ),
        (
            csi_pb2.ListVolumesRequest,
            {"max_entries": (1, T.TYPE_INT32, False), "starting_token": (2, T.TYPE_STRING, False)},
        ),
        (
            csi_pb2.ListVolumesResponse,
            {"entries": (1, T.TYPE_MESSAGE, True), "next_token": (2, T.TYPE_STRING, False)},
        ),
        (
            csi_pb2.GetCapacityRequest,
            {
                "volume_capabilities": (1, T.TYPE_MESSAGE, True),
                "parameters": (2, T.TYPE_MESSAGE, True),
                "accessible_topology": (3, T.TYPE_MESSAGE, False),
            },
        ),
        (
            csi_pb2.GetCapacityResponse,
            {
                "available_capacity": (1, T.TYPE_INT64, False),
                "maximum_volume_size": (2, T.TYPE_MESSAGE, False),
                "minimum_volume_size": (3, T.TYPE_MESSAGE, False),
            },
        ),
        (
            csi_pb2.ControllerExpandVolumeRequest,
            {
                "volume_id": (1, T.TYPE_STRING, False),
                "capacity_range": (2, T.TYPE_MESSAGE, False),
                "secrets": (3, T.TYPE_MESSAGE, True),
                "volume_capability": (4, T.TYPE_MESSAGE, False),
            },
        ),
        (
            csi_pb2.ControllerExpandVolumeResponse,
            {
                "capacity_bytes": (1, T.TYPE_INT64, False),
                "node_expansion_required": (2, T.TYPE_BOOL, False),
            },
        ),
        (
            csi_pb2.NodeExpandVolumeRequest,
            {
                "volume_id": (1, T.TYPE_STRING, False),
                "volume_path": (2, T.TYPE_STRING, False),
                "capacity_range": (3, T.TYPE_MESSAGE, False),
                "staging_target_path": (4, T.TYPE_STRING, False),
                "volume_capability": (5, T.TYPE_MESSAGE, False),
                "secrets": (6, T.TYPE_MESSAGE, True),
            },
        ),
        (
            csi_pb2.NodeGetVolumeStatsRequest,
            {
                "volume_id": (1, T.TYPE_STRING, False),
                "volume_path": (2, T.TYPE_STRING, False),
                "staging_target_path": (3, T.TYPE_STRING, False),
            },
        ),
        (
            csi_pb2.VolumeUsage,
            {
                "available": (1, T.TYPE_INT64, False),
                "total": (2, T.TYPE_INT64, False),
                "used": (3, T.TYPE_INT64, False),
                "unit": (4, T.TYPE_ENUM, False),
            },
        ),
        (
            csi_pb2.Snapshot,
            {
                "size_bytes": (1, T.TYPE_INT64, False),
                "snapshot_id": (2, T.TYPE_STRING, False),
                "source_volume_id": (3, T.TYPE_STRING, False),
                "creation_time": (4, T.TYPE_MESSAGE, False),
                "ready_to_use": (5, T.TYPE_BOOL, False),
                "group_snapshot_id": (6, T.TYPE_STRING, False),
            },
        ),
        (
            csi_pb2.ValidateVolumeCapabilitiesRequest,
            {
                "volume_id": (1, T.TYPE_STRING, False),
                "volume_context": (2, T.TYPE_MESSAGE, True),
                "volume_capabilities": (3, T.TYPE_MESSAGE, True),
                "parameters": (4, T.TYPE_MESSAGE, True),
                "secrets": (5, T.TYPE_MESSAGE, True),
                "mutable_parameters": (6, T.TYPE_MESSAGE, True),
            },
        ),
        (
            csi_pb2.ControllerModifyVolumeRequest,
            {
                "volume_id": (1, T.TYPE_STRING, False),
                "secrets": (2, T.TYPE_MESSAGE, True),
                "mutable_parameters": (3, T.TYPE_MESSAGE, True),
            },
        ),
    ],
    ids=lambda value: getattr(value, "__name__", None) if isinstance(value, type) else None,
)
def test_csi_field_numbers_and_types(message, expected):
    assert fields(message) == expected


def test_access_modes_and_capability_enums():
    mode = csi_pb2.VolumeCapability.AccessMode.Mode
    assert dict(mode.items()) == {
        "UNKNOWN": 0,
        "SINGLE_NODE_WRITER": 1,
        "SINGLE_NODE_READER_ONLY": 2,
        "MULTI_NODE_READER_ONLY": 3,
        "MULTI_NODE_SINGLE_WRITER": 4,
        "MULTI_NODE_MULTI_WRITER": 5,
        "SINGLE_NODE_SINGLE_WRITER": 6,
        "SINGLE_NODE_MULTI_WRITER": 7,
    }
    service = csi_pb2.PluginCapability.Service.Type
    assert service.Value("CONTROLLER_SERVICE") == 1
    assert service.Value("VOLUME_ACCESSIBILITY_CONSTRAINTS") == 2
    assert service.Value("GROUP_CONTROLLER_SERVICE") == 3
    expansion = csi_pb2.PluginCapability.VolumeExpansion.Type
    assert (expansion.Value("ONLINE"), expansion.Value("OFFLINE")) == (1, 2)
    controller = csi_pb2.ControllerServiceCapability.RPC.Type
    assert [controller.Value(n) for n in (
        "CREATE_DELETE_VOLUME", "PUBLISH_UNPUBLISH_VOLUME", "LIST_VOLUMES", "GET_CAPACITY",
        "CREATE_DELETE_SNAPSHOT", "LIST_SNAPSHOTS", "CLONE_VOLUME", "PUBLISH_READONLY",
        "EXPAND_VOLUME", "LIST_VOLUMES_PUBLISHED_NODES", "VOLUME_CONDITION", "GET_VOLUME",
        "SINGLE_NODE_MULTI_WRITER", "MODIFY_VOLUME",
    )] == list(range(1, 15))  # fmt: skip
    node = csi_pb2.NodeServiceCapability.RPC.Type
    assert [node.Value(n) for n in (
        "STAGE_UNSTAGE_VOLUME", "GET_VOLUME_STATS", "EXPAND_VOLUME", "VOLUME_CONDITION",
        "SINGLE_NODE_MULTI_WRITER", "VOLUME_MOUNT_GROUP",
    )] == list(range(1, 7))  # fmt: skip
    unit = csi_pb2.VolumeUsage.Unit
    assert (unit.Value("BYTES"), unit.Value("INODES")) == (1, 2)


def test_oneofs():
    capability = csi_pb2.VolumeCapability.DESCRIPTOR
    assert [f.name for f in capability.oneofs_by_name["access_type"].fields] == [
        "block",
        "mount",
    ]
    source = csi_pb2.VolumeContentSource.DESCRIPTOR
    assert numbers(source) == {"snapshot": 1, "volume": 2}
    assert [f.name for f in source.oneofs_by_name["type"].fields] == ["snapshot", "volume"]


def test_secrets_carry_the_csi_secret_option():
    secret = csi_pb2.csi_secret
    assert secret.number == 1059
    assert csi_pb2.alpha_field.number == 1060
    flagged = []
    for message in CSI.message_types_by_name.values():
        for field in message.fields:
            if field.name == "secrets":
                assert field.GetOptions().Extensions[secret], message.name
                flagged.append(message.name)
    assert "CreateVolumeRequest" in flagged and "NodePublishVolumeRequest" in flagged
    assert (
        not csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name["parameters"]
        .GetOptions()
        .Extensions[secret]
    )


def test_wire_round_trip_with_known_bytes():
    # Hand-computed encoding: field 1 (name) "v" and field 5 (secrets) {"k": "s"}.
    request = csi_pb2.CreateVolumeRequest(name="v", secrets={"k": "s"})
    assert request.SerializeToString() == b"\x0a\x01v" + b"\x2a\x06\x0a\x01k\x12\x01s"
    info = csi_pb2.NodeGetInfoResponse(node_id="n", max_volumes_per_node=3)
    assert info.SerializeToString() == b"\x0a\x01n\x10\x03"


def test_pluginregistration_contract():
    d = pluginregistration_pb2.DESCRIPTOR
    assert d.package == "pluginregistration"
    service = d.services_by_name["Registration"]
    assert service.full_name == "pluginregistration.Registration"
    assert {m.name: (m.input_type.name, m.output_type.name) for m in service.methods} == {
        "GetInfo": ("InfoRequest", "PluginInfo"),
        "NotifyRegistrationStatus": ("RegistrationStatus", "RegistrationStatusResponse"),
    }
    assert fields(pluginregistration_pb2.PluginInfo) == {
        "type": (1, T.TYPE_STRING, False),
        "name": (2, T.TYPE_STRING, False),
        "endpoint": (3, T.TYPE_STRING, False),
        "supported_versions": (4, T.TYPE_STRING, True),
    }
    assert fields(pluginregistration_pb2.RegistrationStatus) == {
        "plugin_registered": (1, T.TYPE_BOOL, False),
        "error": (2, T.TYPE_STRING, False),
    }
    assert fields(pluginregistration_pb2.InfoRequest) == {}
    assert fields(pluginregistration_pb2.RegistrationStatusResponse) == {}


def test_admin_api_shape():
    d = admin_pb2.DESCRIPTOR
    assert d.package == "cairn.admin.v1"
    assert [m.name for m in d.services_by_name["Admin"].methods] == [
        "GetStatus",
        "ListVolumes",
        "ListSessions",
        "GetUsage",
        "GetDirUsage",
    ]
    volume = numbers(admin_pb2.Volume)
    assert volume["volume_id"] == 1 and volume["parameters"] == 10
    assert set(numbers(admin_pb2.Dependency)) == {"name", "url", "ok", "detail"}
    assert set(numbers(admin_pb2.Session)) == {
        "session_id", "hostname", "pid", "mountpoint", "version", "started_at", "heartbeat_at",
    }  # fmt: skip
    assert set(numbers(admin_pb2.GetUsageResponse)) == {
        "used_bytes", "used_inodes", "capacity_bytes", "inode_limit", "volumes",
    }  # fmt: skip
