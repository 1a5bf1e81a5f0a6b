"""Kubelet plugin registration and liveness of cairn-nodeplugin, as kubelet and the
livenessprobe see them: the plugin watcher's calls on the registration socket (in the node
plugin, and in the `cairn registrar` sidecar), a refused registration ending the process, and
/healthz following the plugin's Probe (a private redis-server stopped and started again)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cairn import DRIVER_NAME, localstack
from cairn.rpc.channel import connect
from cairn.rpc.gen import (
    csi_pb2,
    csi_pb2_grpc,
    pluginregistration_pb2,
    pluginregistration_pb2_grpc,
)

BIN = Path(sys.executable).parent
KUBELET_SOCKET = "/var/lib/kubelet/plugins/csi.cairn.io/csi.sock"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}


def socket_answers(path: str | Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code
    except urllib.error.URLError:  # not listening yet (it starts after the CSI socket)
        return 0


async def wait_status(url: str, wanted: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (status := await asyncio.to_thread(http_status, url)) != wanted:
        assert time.monotonic() < deadline, f"/healthz stays {status}, not {wanted}"
        await asyncio.sleep(0.2)


def wait_exit(server: localstack.Server, timeout: float = 15.0) -> int:
    try:
        return server.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{server.name} still runs {timeout}s later") from None


def node_plugin(tmp: Path, nats_url: str, *extra: str) -> localstack.Server:
    """A cairn-nodeplugin with its sockets, data and kubelet directory under `tmp`."""
    sock = tmp / "plugin" / "csi.sock"
    argv = [sys.executable, "-m", "cairn_nodeplugin", "--nats-url", nats_url,
            "--data-dir", str(tmp / "data"), "--csi-endpoint", f"unix://{sock}",
            "--node-id", "node-r", "--kubelet-dir", str(tmp / "kubelet"),
            "--health-addr", "", *extra]  # fmt: skip
    server = localstack.Server("cairn-nodeplugin", argv, tmp / "nodeplugin.log")
    return server.start(lambda: socket_answers(sock), timeout=30, env=clean_env())


@pytest.fixture
def servers():
    """Servers a test started, stopped (by PID) at the end whatever happened."""
    started: list[localstack.Server] = []
    yield started
    for server in reversed(started):
        server.stop()


async def plugin_watcher(reg_socket: Path) -> pluginregistration_pb2.PluginInfo:
    """What kubelet's plugin watcher does with a new socket: GetInfo, then the plugin's own
    NodeGetInfo on the endpoint it names."""
    async with connect(f"unix://{reg_socket}") as channel:
        info = await pluginregistration_pb2_grpc.RegistrationStub(channel).GetInfo(
            pluginregistration_pb2.InfoRequest())  # fmt: skip
    return info


async def notify(reg_socket: Path, registered: bool, error: str = "") -> None:
    async with connect(f"unix://{reg_socket}") as channel:
        await pluginregistration_pb2_grpc.RegistrationStub(channel).NotifyRegistrationStatus(
            pluginregistration_pb2.RegistrationStatus(plugin_registered=registered, error=error)
        )


async def test_kubelet_registers_the_node_plugin(tmp_path, nats_url, servers):
    registry = tmp_path / "plugins_registry"
    plugin = node_plugin(tmp_path, nats_url, "--registration-dir", str(registry))
    servers.append(plugin)
    reg_socket = registry / f"{DRIVER_NAME}-reg.sock"
    deadline = time.monotonic() + 15  # registration starts once the CSI socket serves
    while not socket_answers(reg_socket):
        assert time.monotonic() < deadline, "the registration socket never answered"
        await asyncio.sleep(0.1)

    info = await plugin_watcher(reg_socket)
    assert info.type == "CSIPlugin"
    assert info.name == DRIVER_NAME
    assert list(info.supported_versions) == ["1.0.0"]
    endpoint = tmp_path / "plugin" / "csi.sock"  # by default: the CSI socket's own path
    assert info.endpoint == str(endpoint)
    async with connect(info.endpoint) as channel:  # kubelet dials the path it was given
        node = await csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest())
        name = await csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
            csi_pb2.GetPluginInfoRequest())  # fmt: skip
    assert node.node_id == "node-r"
    assert name.name == info.name
    await notify(reg_socket, True)
    await asyncio.sleep(0.3)
    assert plugin.proc.poll() is None  # registered: it keeps running

    await notify(reg_socket, False, "plugin name conflicts with another")
    assert await asyncio.to_thread(wait_exit, plugin) != 0
    log = plugin.log_path.read_text()
    assert "plugin name conflicts with another" in log
    assert not reg_socket.exists()  # kubelet sees the plugin go


async def test_registrar_sidecar(tmp_path, nats_url, servers):
    plugin = node_plugin(tmp_path, nats_url)  # no --registration-dir: the sidecar registers
    servers.append(plugin)
    registry = tmp_path / "registry"
    registrar = localstack.Server("cairn-registrar", [
        str(BIN / "cairn"), "registrar", "--csi-endpoint",
        f"unix://{tmp_path / 'plugin' / 'csi.sock'}", "--registration-dir", str(registry),
        "--kubelet-registration-path", KUBELET_SOCKET,
    ], tmp_path / "registrar.log")  # fmt: skip
    reg_socket = registry / f"{DRIVER_NAME}-reg.sock"
    servers.append(registrar.start(lambda: socket_answers(reg_socket), timeout=30,
                                   env=clean_env()))  # fmt: skip
    info = await plugin_watcher(reg_socket)
    assert (info.type, info.name, info.endpoint) == ("CSIPlugin", DRIVER_NAME, KUBELET_SOCKET)
    assert list(info.supported_versions) == ["1.0.0"]
    await notify(reg_socket, True)
    await asyncio.sleep(0.3)
    assert registrar.proc.poll() is None
    await notify(reg_socket, False, "refused for the test")
    assert await asyncio.to_thread(wait_exit, registrar) != 0
    assert "refused for the test" in registrar.log_path.read_text()
    assert plugin.proc.poll() is None  # the plugin itself is not the registrar's business


async def test_healthz_follows_the_file_system_redis(tmp_path, nats_url, servers):
    redis = localstack.start_tcp(localstack.redis_server(tmp_path / "redis"))
    servers.append(redis)
    health = f"127.0.0.1:{localstack.free_port()}"
    plugin = node_plugin(tmp_path, nats_url, "--health-addr", health, "--meta-url", redis.url)
    servers.append(plugin)
    url = f"http://{health}/healthz"
    await wait_status(url, 200)

    redis.stop()  # the configured file system's Redis is gone: the plugin is not healthy
    await wait_status(url, 500)

    again = localstack.redis_server(tmp_path / "redis", port=redis.port)
    servers.append(localstack.start_tcp(again))
    await wait_status(url, 200)
    assert plugin.proc.poll() is None
