"""A real control plane for the k8s tier, envtest's way: when KUBEBUILDER_ASSETS names a folder
with `etcd` and `kube-apiserver`, both are started on free ports (a token for a
system:masters user, a throw-away service-account key, self-signed serving certs) and a
kubeconfig is written; the tests here are skipped otherwise. Also the event stream and
cairn-meta's CSI Controller the reconcilers talk to (real redis-server and nats-server)."""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from cairn import localstack
from cairn.meta.engine import Format, format_volume
from cairn.rpc.channel import connect

ASSETS = os.environ.get("KUBEBUILDER_ASSETS", "")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    have = bool(ASSETS) and all((Path(ASSETS) / b).exists() for b in ("etcd", "kube-apiserver"))
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.k8s)
            if not have:
                item.add_marker(pytest.mark.skip(
                    reason="KUBEBUILDER_ASSETS does not name a folder with etcd and "
                    "kube-apiserver"))


def _service_account_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))


def _healthy(url: str, token: str) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(f"{url}/readyz", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=1, context=context) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """(kubeconfig path) of a fresh etcd + kube-apiserver, stopped after the session."""
    root = tmp_path_factory.mktemp("envtest")
    assets = Path(ASSETS)
    client_port, peer_port, api_port = (localstack.free_port() for _ in range(3))
    etcd = localstack.Server("etcd", [
        str(assets / "etcd"), "--data-dir", str(root / "etcd"),
        "--listen-client-urls", f"http://127.0.0.1:{client_port}",
        "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--unsafe-no-fsync"], root / "etcd.log")  # fmt: skip
    etcd.start(lambda: localstack.port_open("127.0.0.1", client_port), timeout=30)
    token = secrets.token_hex(16)
    (root / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
    _service_account_key(root / "sa.key")
    api = localstack.Server("kube-apiserver", [
        str(assets / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{client_port}",
        f"--secure-port={api_port}", "--bind-address=127.0.0.1", f"--cert-dir={root / 'certs'}",
        f"--token-auth-file={root / 'tokens.csv'}", "--authorization-mode=RBAC",
        f"--service-account-key-file={root / 'sa.key'}",
        f"--service-account-signing-key-file={root / 'sa.key'}",
        "--service-account-issuer=https://envtest.local", "--service-cluster-ip-range=10.0.0.0/24",
        "--allow-privileged=true"], root / "kube-apiserver.log")  # fmt: skip
    url = f"https://127.0.0.1:{api_port}"
    try:
        api.start(lambda: _healthy(url, token), timeout=90)
    except BaseException:
        etcd.stop()
        raise
    kubeconfig = root / "kubeconfig"
    kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: envtest, cluster: {{server: "{url}", insecure-skip-tls-verify: true}}}}]
users: [{{name: admin, user: {{token: "{token}"}}}}]
contexts: [{{name: envtest, context: {{cluster: envtest, user: admin}}}}]
current-context: envtest
""")
    yield str(kubeconfig)
    api.stop()
    etcd.stop()


@pytest.fixture
async def kube(control_plane):
    """A RestAPI on the control plane; the objects the test made are removed afterwards."""
    from cairn.kube.api import RestAPI
    from cairn.kube.client import api_client

    client = await api_client(control_plane)
    yield RestAPI(client)
    await client.close()


@pytest.fixture
async def csi(redis_url, store, events, tmp_path):
    from cairn.csi.client import ControllerClient
    from cairn_meta.__main__ import build_csi_server
    from cairn_meta.capacity import NodeCapacityProjection
    from cairn_meta.catalogue import Catalogue
    from cairn_meta.controller import Controller, FileSystems

    await format_volume(redis_url, Format(name="csi", storage=f"file://{tmp_path}/objects",
                                          capacity=100 << 30))
    redis = aioredis.from_url(redis_url)
    filesystems = FileSystems(redis_url)
    controller = Controller(Catalogue(redis), filesystems, events,
                            NodeCapacityProjection(redis, store))

    async def probe() -> None:
        await redis.ping()

    server = build_csi_server(f"unix://{tmp_path}/csi.sock", probe, controller)
    await server.start()
    async with connect(server.address, ready_timeout=5) as channel:
        yield ControllerClient(channel)
    await server.stop(None)
    await filesystems.close()
    await redis.aclose()
    await asyncio.sleep(0)
