"""gRPC plumbing end to end: a real grpc.aio server on a unix socket (and on TCP), real
client channels, and Cairn errors crossing the wire as the status codes CSI callers expect.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

import grpc
import pytest

from cairn.errors import (
    AlreadyExists,
    CairnError,
    ConfigError,
    ConflictError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermanentError,
    ResourceExhausted,
    TemporaryError,
    UnavailableError,
)
from cairn.rpc import status
from cairn.rpc.channel import connect, open_channel, parse_endpoint
from cairn.rpc.gen import csi_pb2, csi_pb2_grpc
from cairn.rpc.server import RpcServer


@status.handle_servicer_errors
class Identity(csi_pb2_grpc.IdentityServicer):
    """Answers GetPluginInfo; the other two RPCs fail on purpose."""

    async def GetPluginInfo(self, request, context):
        return csi_pb2.GetPluginInfoResponse(name="csi.cairn.io", vendor_version="test")

    async def GetPluginCapabilities(self, request, context):
        raise NotFound("volume pvc-123 does not exist")

    async def Probe(self, request, context):
        raise RuntimeError("disk on fire\nsecond line stays in the log")


@status.handle_servicer_errors
class SnapshotMetadata(csi_pb2_grpc.SnapshotMetadataServicer):
    """Streams one answer, then loses a race."""

    async def GetMetadataAllocated(self, request, context):
        yield csi_pb2.GetMetadataAllocatedResponse(volume_capacity_bytes=42)
        raise ConflictError("snapshot is being deleted concurrently")


def socket_endpoint(tmp_path) -> str:
    return f"unix://{tmp_path}/plugin/csi.sock"


@pytest.fixture
async def identity_server(tmp_path):
    server = RpcServer(socket_endpoint(tmp_path))
    server.add(csi_pb2_grpc.add_IdentityServicer_to_server, Identity())
    server.add(csi_pb2_grpc.add_SnapshotMetadataServicer_to_server, SnapshotMetadata())
    await server.start()
    yield server
    await server.stop(grace=None)


async def test_get_plugin_info_over_unix_socket(identity_server, tmp_path):
    path = tmp_path / "plugin" / "csi.sock"
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    async with connect(identity_server.address, ready_timeout=5) as channel:
        answer = await csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
            csi_pb2.GetPluginInfoRequest(), timeout=5
        )
    assert (answer.name, answer.vendor_version) == ("csi.cairn.io", "test")


async def test_cairn_error_arrives_as_its_status_code(identity_server):
    async with connect(identity_server.address, ready_timeout=5) as channel:
        stub = csi_pb2_grpc.IdentityStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "volume pvc-123 does not exist"

        # And back into the vocabulary on the client side.
        with pytest.raises(NotFound, match="^volume pvc-123 does not exist$"):
            with status.translate_rpc_errors():
                await stub.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())


async def test_unexpected_exception_is_internal_with_logged_traceback(identity_server, caplog):
    caplog.set_level(logging.ERROR, logger="cairn.rpc.status")
    async with connect(identity_server.address, ready_timeout=5) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "unexpected RuntimeError: disk on fire"
    [record] = [r for r in caplog.records if r.name == "cairn.rpc.status"]
    assert "Identity.Probe" in record.getMessage()
    assert record.exc_info and record.exc_info[0] is RuntimeError


async def test_streaming_handler_error_after_first_message(identity_server):
    async with connect(identity_server.address, ready_timeout=5) as channel:
        call = csi_pb2_grpc.SnapshotMetadataStub(channel).GetMetadataAllocated(
            csi_pb2.GetMetadataAllocatedRequest(snapshot_id="s1"), timeout=5
        )
        received = []
        with pytest.raises(ConflictError, match="being deleted"):
            with status.translate_rpc_errors():
                async for answer in call:
                    received.append(answer.volume_capacity_bytes)
    assert received == [42]
    assert await call.code() == grpc.StatusCode.ABORTED


async def test_stale_socket_is_replaced_and_removed_on_stop(tmp_path):
    path = tmp_path / "plugin" / "csi.sock"
    path.parent.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a socket file with nobody listening: a crashed plugin's leftover
    dead.close()
    server = RpcServer(socket_endpoint(tmp_path), socket_mode=0o600)
    server.add(csi_pb2_grpc.add_IdentityServicer_to_server, Identity())
    async with server:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        async with connect(server.address, ready_timeout=5) as channel:
            answer = await csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest(), timeout=5
            )
        assert answer.name == "csi.cairn.io"
    assert not path.exists()


async def test_live_socket_is_not_stolen(identity_server, tmp_path):
    second = RpcServer(socket_endpoint(tmp_path))
    with pytest.raises(FailedPrecondition, match="already listening"):
        await second.start()
    async with connect(identity_server.address, ready_timeout=5):
        pass  # the first server still answers


async def test_non_socket_file_is_not_replaced(tmp_path):
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "csi.sock").write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        await RpcServer(socket_endpoint(tmp_path)).start()
    assert (tmp_path / "plugin" / "csi.sock").read_text() == "precious"


async def test_tcp_on_a_free_loopback_port_with_interceptors():
    seen_by_server: list[str] = []
    seen_by_client: list[str] = []

    class ServerRecorder(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, handler_call_details):
            seen_by_server.append(handler_call_details.method)
            return await continuation(handler_call_details)

    class ClientRecorder(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, client_call_details, request):
            method = client_call_details.method
            seen_by_client.append(method.decode() if isinstance(method, bytes) else method)
            return await continuation(client_call_details, request)

    server = RpcServer(":0", interceptors=[ServerRecorder()])
    server.add(csi_pb2_grpc.add_IdentityServicer_to_server, Identity())
    async with server:
        assert server.port and server.address == f"127.0.0.1:{server.port}"
        async with connect(server.address, interceptors=[ClientRecorder()]) as channel:
            await csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest(), timeout=5
            )
    assert seen_by_server == ["/csi.v1.Identity/GetPluginInfo"]
    assert seen_by_client == ["/csi.v1.Identity/GetPluginInfo"]


async def test_unreachable_endpoint_is_unavailable(tmp_path):
    endpoint = f"unix://{tmp_path}/nobody.sock"
    with pytest.raises(UnavailableError, match="nobody.sock"):
        await open_channel(endpoint, ready_timeout=0.3)


@pytest.mark.parametrize(
    "endpoint",
    ["", "http://example.com:80", "unix://relative.sock", "host:port", "10.0.0.1:99999",
     "localhost:0", "fe80::1:9000", "unix:///tmp/dir/"],
)  # fmt: skip
def test_bad_endpoints_are_config_errors(endpoint):
    with pytest.raises(ConfigError) as caught:
        parse_endpoint(endpoint)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("endpoint", "target"),
    [
        ("unix:///run/cairn/csi.sock", "unix:///run/cairn/csi.sock"),
        ("/var/lib/kubelet/plugins/csi.cairn.io/csi.sock",
         "unix:///var/lib/kubelet/plugins/csi.cairn.io/csi.sock"),
        ("tcp://10.1.2.3:9000", "10.1.2.3:9000"),
        ("meta.cairn.svc:9000", "meta.cairn.svc:9000"),
        (":9000", "127.0.0.1:9000"),
        ("9000", "127.0.0.1:9000"),
        ("[::1]:9000", "[::1]:9000"),
    ],
)  # fmt: skip
def test_endpoint_targets(endpoint, target):
    assert parse_endpoint(endpoint).target == target


def test_too_long_socket_path_is_a_config_error():
    with pytest.raises(ConfigError, match="longer than"):
        parse_endpoint("unix:///" + "d" * 120 + "/csi.sock")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (OutOfRange("x"), grpc.StatusCode.OUT_OF_RANGE),
        (ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (ConflictError("x"), grpc.StatusCode.ABORTED),
        (UnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (TemporaryError("x"), grpc.StatusCode.UNAVAILABLE),
        (ConfigError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (PermanentError("x"), grpc.StatusCode.INTERNAL),
        (CairnError("x"), grpc.StatusCode.INTERNAL),
        (ValueError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_mapping(error, code):
    assert status.status_code(error) == code
    back = status.error_from_status(code, "msg")
    assert isinstance(back, CairnError) and str(back) == "msg"
    assert back.temporary == (
        code
        in {
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        }
    )


def test_codes_without_a_class_come_back_permanent():
    for code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        error = status.error_from_status(code, "")
        assert type(error) is PermanentError and str(error) == code.name
    assert isinstance(status.error_from_status(grpc.StatusCode.CANCELLED, "c"), TemporaryError)
