"""The dataset webhook behind a real kube-apiserver: `cairn-dataset-webhook` runs as a process
on 127.0.0.1 with a certificate made here, a MutatingWebhookConfiguration sends it this
test's namespace, and the pods the API server stores carry the affinity it added; with the
webhook stopped, pods are still created (failurePolicy Ignore)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import yaml
from selfsigned import make_certs

from cairn import datasets
from cairn.errors import AlreadyExists, CairnError, NotFound
from cairn.kube.api import NAMESPACE, PVC, Kind, Obj
from cairn.localstack import free_port

POD = Kind("Pod", "", "v1", "pods", True, True)
SERVICE_ACCOUNT = Kind("ServiceAccount", "", "v1", "serviceaccounts", True)
CRD = Kind("CustomResourceDefinition", "apiextensions.k8s.io", "v1", "customresourcedefinitions",
           False, True)  # fmt: skip
WEBHOOKS = Kind("MutatingWebhookConfiguration", "admissionregistration.k8s.io", "v1",
                "mutatingwebhookconfigurations", False)  # fmt: skip
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
AVOID = {"key": datasets.DATASET_NUM, "operator": "DoesNotExist"}


async def poll(check, timeout: float = 30.0, what: str = "condition"):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = await check()
        except CairnError as error:
            last = error
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def ensure_dataset_crd(kube) -> None:
    """The CRDs, from deploy/crds.yaml when the control plane was started without them."""
    try:
        await kube.list(datasets.DATASET, "default")
        return
    except NotFound:
        pass
    for doc in yaml.safe_load_all((ROOT / "deploy" / "crds.yaml").read_text()):
        if doc and doc.get("kind") == "CustomResourceDefinition":
            with contextlib.suppress(AlreadyExists):
                await kube.create(CRD, doc)

    async def served():
        await kube.list(datasets.DATASET, "default")
        return True

    await poll(served, what="the Dataset CRD served")


async def make_namespace(kube) -> str:
    name = f"t-wh-{uuid.uuid4().hex[:8]}"
    await kube.create(NAMESPACE, {"metadata": {"name": name}})
    # a pod needs its namespace's `default` ServiceAccount; no controller may be making it
    with contextlib.suppress(AlreadyExists):
        await kube.create(SERVICE_ACCOUNT, {"metadata": {"name": "default", "namespace": name}})
    return name


async def make_dataset(kube, ns: str, name: str) -> Obj:
    dataset = await kube.create(datasets.DATASET, {
        "metadata": {"name": name, "namespace": ns},
        "spec": {"mounts": [{"mountPoint": f"cairn://{name}"}]}})  # fmt: skip
    await kube.create(PVC, {
        "metadata": {"name": name, "namespace": ns, "labels": {
            datasets.DATASET_LABEL: name, datasets.DATASET_NAMESPACE_LABEL: ns}},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "",
                 "resources": {"requests": {"storage": "1Gi"}}}})  # fmt: skip
    return dataset


def pod(ns: str, *claims: str, labels: dict | None = None, affinity: Obj | None = None) -> Obj:
    spec: Obj = {
        # no scheduler picks these pods: they stay unbound, and are deleted at once
        "schedulerName": "cairn-test-nobody",
        "containers": [{"name": "main", "image": "busybox"}],
        "volumes": [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": claim}}
                    for i, claim in enumerate(claims)],
    }  # fmt: skip
    if affinity:
        spec["affinity"] = affinity
    return {"metadata": {"generateName": "p-", "namespace": ns, "labels": labels or {}},
            "spec": spec}  # fmt: skip


def node_affinity(obj: Obj) -> Obj:
    return (obj["spec"].get("affinity") or {}).get("nodeAffinity") or {}


@contextlib.asynccontextmanager
async def webhook_process(kubeconfig: str, certs, port: int, log: Path) -> AsyncIterator:
    """`cairn-dataset-webhook` on 127.0.0.1:port, until it answers /healthz; stopped after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    out = await asyncio.to_thread(log.open, "w")
    process = await asyncio.create_subprocess_exec(
        str(BIN / "cairn-dataset-webhook"), "--kubeconfig", kubeconfig,
        "--webhook-addr", f"127.0.0.1:{port}", "--tls-cert-file", str(certs.cert_file),
        "--tls-key-file", str(certs.key_file),
        stdout=out, stderr=asyncio.subprocess.STDOUT, env=env, cwd="/tmp")  # fmt: skip
    out.close()  # the child has its own copy
    try:
        trust = ssl.create_default_context(cafile=str(certs.ca_file))
        # a short timeout per probe: aiohttp's default (5 minutes) would outlast the test if
        # the server took a connection and never answered it
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust),
                                         timeout=aiohttp.ClientTimeout(total=2)) as session:  # fmt: skip

            async def healthy():
                if process.returncode is not None:
                    raise AssertionError(await asyncio.to_thread(log.read_text))
                try:
                    async with session.get(f"https://127.0.0.1:{port}/healthz") as answer:
                        return answer.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            await poll(healthy, what="the webhook's /healthz")
        yield process
    finally:
        if process.returncode is None:
            process.terminate()  # by its PID: only the process this test started
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


def configuration(name: str, ns: str, port: int, ca_pem: bytes, entries: int = 1) -> Obj:
    """A webhook configuration for this test's namespace only (others run beside it)."""
    hook = {
        "clientConfig": {"url": f"https://127.0.0.1:{port}/mutate-pods",
                         "caBundle": base64.b64encode(ca_pem).decode()},
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                   "resources": ["pods"], "scope": "Namespaced"}],
        "failurePolicy": "Ignore", "sideEffects": "None", "admissionReviewVersions": ["v1"],
        "timeoutSeconds": 5, "reinvocationPolicy": "IfNeeded",
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
    }  # fmt: skip
    # Two entries calling the same server: the second sees what the first added and must
    # add nothing (what a reinvocation also sees).
    webhooks = [{**hook, "name": f"pods-{i}.{name}.data.cairn.io"} for i in range(entries)]
    return {"metadata": {"name": name}, "webhooks": webhooks}


async def test_webhook_gives_pods_their_dataset_affinity(kube, control_plane, tmp_path):
    await ensure_dataset_crd(kube)
    ns = await make_namespace(kube)
    dataset = await make_dataset(kube, ns, "imagenet")
    cached = {
        "key": datasets.cache_label(ns, "imagenet", dataset["metadata"]["uid"]),
        "operator": "Exists",
    }
    certs = make_certs(tmp_path / "tls")
    port = free_port()
    name = f"cairn-test-{ns}"
    try:
        async with webhook_process(control_plane, certs, port, tmp_path / "webhook.log"):
            await kube.create(WEBHOOKS, configuration(name, ns, port, certs.ca_pem, entries=2))

            # the API server picks the configuration up a moment later
            async def steered():
                created = await kube.create(POD, pod(ns))
                return created if node_affinity(created) else None

            first = await poll(steered, what="the webhook configuration in effect")
            assert node_affinity(first) == {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 50, "preference": {"matchExpressions": [AVOID]}}]}  # fmt: skip

            reader = await kube.create(POD, pod(ns, "imagenet"))
            stored = await kube.get(POD, reader["metadata"]["name"], ns)
            assert node_affinity(stored) == {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "preference": {"matchExpressions": [cached]}}]}  # fmt: skip

            zone = {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a", "b"]}
            user = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [zone]}]}}}  # fmt: skip
            required = pod(ns, "imagenet", labels={datasets.sched_label("imagenet"): "required"},
                           affinity=user)  # fmt: skip
            stored = await kube.get(POD, (await kube.create(POD, required))["metadata"]["name"], ns)
            terms = node_affinity(stored)["requiredDuringSchedulingIgnoredDuringExecution"]
            assert terms == {"nodeSelectorTerms": [{"matchExpressions": [zone, cached]}]}
            assert "preferredDuringSchedulingIgnoredDuringExecution" not in node_affinity(stored)

        # stopped: the API server cannot reach it, and creates pods unchanged all the same
        plain = await kube.create(POD, pod(ns, "imagenet"))
        assert node_affinity(plain) == {}
    finally:
        with contextlib.suppress(NotFound):
            await kube.delete(WEBHOOKS, name)
