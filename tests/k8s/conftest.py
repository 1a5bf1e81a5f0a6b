"""The k8s tier runs against a real control plane (controlplane.py): etcd, kube-apiserver,
kube-controller-manager (the PV binder among its controllers) and kube-scheduler, started
once per session from KUBEBUILDER_ASSETS, with deploy/'s cluster configuration applied
(Namespace, CRDs, RBAC, CSIDriver, StorageClasses). Without the binaries the whole tier is
skipped with one line saying why.

Fixtures: `control_plane` (the admin kubeconfig's path), `kube` (a RestAPI as admin),
`sa_kubeconfig(name)` / `sa_kube(name)` (a kubeconfig / RestAPI as one of deploy/'s service
accounts, so the code under test has exactly the rights deploy/ gives it), `nodes` (Nodes
without kubelets, with CSINodes registering csi.cairn.io, for the scheduler to place pods
on), and `csi`, cairn-meta's CSI Controller over real redis-server and nats-server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from controlplane import (
    CLUSTER_CONFIG,
    DEPLOY,
    ControlPlane,
    StartError,
    find_assets,
    find_etcd,
    write_kubeconfig,
)

from cairn.kube.api import CSI_NODE, NODE, Obj, RestAPI, now_rfc3339
from cairn.meta.engine import Format, format_volume
from cairn.rpc.channel import connect

ASSETS, SKIP_REASON = find_assets()
DRIVER = "csi.cairn.io"
NODE_NAMES = ("worker-a", "worker-b")
NOT_READY = "node.kubernetes.io/not-ready"
TOKEN_SECONDS = 24 * 3600
_timings: dict[str, float] = {}


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.k8s)
            if ASSETS is None:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """The tier's skips are reported from here, so the summary folds them into one line."""
    report = yield
    if ASSETS is None and report.skipped and isinstance(report.longrepr, tuple):
        report.longrepr = (__file__, None, SKIP_REASON)
    return report


def pytest_terminal_summary(terminalreporter):
    if _timings:
        terminalreporter.write_line(
            f"k8s control plane: started in {_timings['start']:.1f} s, deploy/ applied in "
            f"{_timings['apply']:.1f} s"
        )


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Runs a coroutine to the end on a loop of its own in a worker thread (session fixtures
    are synchronous; each test's loop is pytest-asyncio's)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def kube_client(kubeconfig: str | Path):
    """A kubernetes_asyncio ApiClient for one kubeconfig (the library's global default
    configuration is left alone, so several identities can live side by side)."""
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return client.ApiClient(configuration=configuration)


async def _as(kubeconfig: str | Path, work) -> Any:
    api_client = await kube_client(kubeconfig)
    try:
        return await work(RestAPI(api_client))
    finally:
        await api_client.close()


# -- the control plane, with deploy/ applied ----------------------------------------------------


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> ControlPlane:
    """The running control plane (logs and certificates under its `root`)."""
    from cairn.kube.apply import apply, load_kustomization

    assert ASSETS is not None
    plane = ControlPlane(ASSETS, find_etcd(ASSETS) or "etcd", tmp_path_factory.mktemp("k8s"))
    failed = ""
    try:
        plane.start()
    except StartError as error:
        failed = str(error)
    if failed:  # outside the except: the message alone, no chained traceback
        pytest.fail(f"the k8s control plane did not start: {failed}", pytrace=False)
    _timings["start"] = plane.started_in
    try:
        began = time.monotonic()
        objects = [o for o in load_kustomization(DEPLOY) if o.get("kind") in CLUSTER_CONFIG]
        plane.deploy = run_async(_as(plane.kubeconfig, lambda api: apply(api, objects)))
        _timings["apply"] = time.monotonic() - began
    except BaseException:
        plane.stop()
        raise
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def control_plane(cluster) -> str:
    """The admin's kubeconfig (system:masters)."""
    return str(cluster.kubeconfig)


@pytest.fixture(scope="session")
def cairn_namespace(cluster) -> str:
    """The namespace deploy/ puts Cairn's service accounts, leases and capacities in."""
    spaces = [o["metadata"]["name"] for o in cluster.deploy if o.get("kind") == "Namespace"]
    assert len(spaces) == 1, f"deploy/ should define one Namespace, not {spaces}"
    return spaces[0]


@pytest.fixture
async def kube(control_plane):
    """A RestAPI on the control plane as its admin."""
    from cairn.kube.client import api_client

    client = await api_client(control_plane)
    yield RestAPI(client)
    await client.close()


# -- service-account identities -----------------------------------------------------------------


@pytest.fixture(scope="session")
def sa_kubeconfig(cluster, cairn_namespace):
    """`sa_kubeconfig(name)`: the path of a kubeconfig for deploy/'s ServiceAccount `name`,
    with a token from the TokenRequest API (made once per session)."""
    accounts = {o["metadata"]["name"] for o in cluster.deploy if o.get("kind") == "ServiceAccount"}
    made: dict[str, str] = {}

    async def token(api: RestAPI, name: str) -> str:
        from kubernetes_asyncio import client

        answer = await client.CoreV1Api(api.client).create_namespaced_service_account_token(
            name, cairn_namespace, {"spec": {"expirationSeconds": TOKEN_SECONDS}}
        )
        return answer.status.token

    def get(name: str) -> str:
        if name not in accounts:
            raise AssertionError(
                f"deploy/ has no ServiceAccount {name} (it has {sorted(accounts)})"
            )
        if name not in made:
            secret = run_async(_as(cluster.kubeconfig, lambda api: token(api, name)))
            user = f"system:serviceaccount:{cairn_namespace}:{name}"
            path = cluster.root / f"sa-{name}.kubeconfig"
            made[name] = str(write_kubeconfig(path, cluster.url, cluster.pki.ca, user, secret))
        return made[name]

    return get


@pytest.fixture
async def sa_kube(sa_kubeconfig):
    """`await sa_kube(name)`: a RestAPI logged in as deploy/'s ServiceAccount `name`."""
    clients = []

    async def login(name: str) -> RestAPI:
        api_client = await kube_client(sa_kubeconfig(name))
        clients.append(api_client)
        return RestAPI(api_client)

    yield login
    for api_client in clients:
        await api_client.close()


# -- nodes without kubelets ---------------------------------------------------------------------


def fake_node(name: str, topology_key: str) -> Obj:
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
              "kubernetes.io/arch": "amd64", topology_key: name}  # fmt: skip
    resources = {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "100Gi"}
    stamp = now_rfc3339()
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "a test node: no kubelet behind it",
                            "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}],
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                         "kubeletVersion": "v1.36.2", "containerRuntimeVersion": "none://0",
                         "kernelVersion": "", "osImage": "", "kubeProxyVersion": "",
                         "machineID": "", "systemUUID": "", "bootID": ""},
        },
    }  # fmt: skip


def csi_node(node: Obj, topology_key: str) -> Obj:
    """The CSINode kubelet writes once the node plugin registered (owned by its Node)."""
    m = node["metadata"]
    return {
        "metadata": {"name": m["name"], "ownerReferences": [
            {"apiVersion": "v1", "kind": "Node", "name": m["name"], "uid": m["uid"]}]},
        "spec": {"drivers": [{"name": DRIVER, "nodeID": m["name"],
                              "topologyKeys": [topology_key]}]},
    }  # fmt: skip


@pytest.fixture(scope="session")
def nodes(cluster) -> list[str]:
    """Ready Nodes with room for pods and Cairn's topology label, each with a CSINode that
    registers csi.cairn.io, as kubelet and the node plugin would leave them; their names."""
    from cairn_meta.controller import TOPOLOGY_KEY

    async def make(api: RestAPI) -> None:
        for name in NODE_NAMES:
            wanted = fake_node(name, TOPOLOGY_KEY)
            node = await api.create(NODE, wanted)
            node["status"] = wanted["status"]
            node = await api.update_status(NODE, node)
            # Admission (TaintNodesByCondition) taints a new node not-ready until the node
            # lifecycle controller sees it Ready; that controller does not run here.
            taints = node["spec"].get("taints") or []
            node["spec"]["taints"] = [t for t in taints if t.get("key") != NOT_READY]
            node = await api.update(NODE, node)
            await api.create(CSI_NODE, csi_node(node, TOPOLOGY_KEY))

    run_async(_as(cluster.kubeconfig, make))
    return list(NODE_NAMES)


# -- cairn-meta's CSI Controller -----------------------------------------------------------------


@pytest.fixture
async def csi(redis_url, store, events, tmp_path):
    from cairn.csi.client import ControllerClient
    from cairn_meta.__main__ import build_csi_server
    from cairn_meta.capacity import NodeCapacityProjection
    from cairn_meta.catalogue import Catalogue
    from cairn_meta.controller import Controller, FileSystems

    await format_volume(
        redis_url, Format(name="csi", storage=f"file://{tmp_path}/objects", capacity=100 << 30)
    )
    redis = aioredis.from_url(redis_url)
    filesystems = FileSystems(redis_url)
    controller = Controller(
        Catalogue(redis), filesystems, events, NodeCapacityProjection(redis, store)
    )

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
