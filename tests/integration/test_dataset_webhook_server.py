"""The dataset webhook's HTTPS server for real: TLS on 127.0.0.1 with a certificate made
here, AdmissionReviews posted as the API server posts them, /healthz, and the one-line
failures of `cairn-dataset-webhook` when its certificate flags are wrong."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from selfsigned import make_certs

from cairn import datasets
from cairn.kube.api import PVC
from cairn.kube.memory import MemoryAPI
from cairn_cache_syncer.webhook import PATH, ClaimIndex, WebhookServer, tls_context

BIN = Path(sys.executable).parent


@pytest.fixture
def certs(tmp_path):
    return make_certs(tmp_path / "tls")


@pytest.fixture
async def api():
    api = MemoryAPI()
    await api.create(datasets.DATASET, {
        "metadata": {"name": "imagenet", "namespace": "team"},
        "spec": {"mounts": [{"mountPoint": "cairn://images"}]}})  # fmt: skip
    await api.create(PVC, {"metadata": {"name": "imagenet", "namespace": "team", "labels": {
        datasets.DATASET_LABEL: "imagenet", datasets.DATASET_NAMESPACE_LABEL: "team"}},
        "spec": {}})  # fmt: skip
    return api


@pytest.fixture
async def server(api, certs):
    server = WebhookServer(ClaimIndex(api).lookup, "127.0.0.1", 0,
                           tls_context(str(certs.cert_file), str(certs.key_file)))  # fmt: skip
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def client(certs):
    trust = ssl.create_default_context(cafile=str(certs.ca_file))  # verifies name and chain
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust),
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:  # fmt: skip
        yield session


def review(claim: str, labels: dict | None = None) -> dict:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "train-", "namespace": "team", "labels": labels or {}},
        "spec": {
            "containers": [{"name": "main", "image": "busybox"}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "6c2b1b4e-0000-4000-8000-000000000001",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "namespace": "team", "operation": "CREATE", "object": pod,
        "userInfo": {"username": "admin"}, "dryRun": False}}  # fmt: skip


async def post(client, server, body) -> dict:
    url = f"https://127.0.0.1:{server.port}{PATH}"
    async with client.post(url, json=body) as answer:
        assert answer.status == 200, await answer.text()
        assert answer.content_type == "application/json"
        return await answer.json()


async def test_dataset_pod_gets_its_affinity_over_https(client, server, api):
    answer = await post(client, server, review("imagenet"))
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == "6c2b1b4e-0000-4000-8000-000000000001"
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    uid = (await api.get(datasets.DATASET, "imagenet", "team"))["metadata"]["uid"]
    label = datasets.cache_label("team", "imagenet", uid)
    assert patch == [{"op": "add", "path": "/spec/affinity", "value": {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": {
            "matchExpressions": [{"key": label, "operator": "Exists"}]}}]}}}]  # fmt: skip


async def test_required_label_and_missing_claim(client, server):
    required = {datasets.sched_label("imagenet"): "required"}
    response = (await post(client, server, review("imagenet", required)))["response"]
    value = json.loads(base64.b64decode(response["patch"]))[0]["value"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in value["nodeAffinity"]
    # a claim that does not exist (yet): allowed, unchanged
    response = (await post(client, server, review("no-such-claim")))["response"]
    assert response["allowed"] is True and "patch" not in response


async def test_healthz_and_bad_requests(client, server):
    async with client.get(f"https://127.0.0.1:{server.port}/healthz") as answer:
        assert answer.status == 200 and (await answer.text()).strip() == "ok"
    url = f"https://127.0.0.1:{server.port}{PATH}"
    async with client.post(url, data=b"{not json") as answer:
        assert answer.status == 400
    async with client.post(url, json={"kind": "AdmissionReview"}) as answer:
        assert answer.status == 400


async def test_plain_http_is_refused(server):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{server.port}/healthz") as answer:
                await answer.read()


# ------------------------------------------------------------------ the entry point's flags


def webhook(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return subprocess.run([str(BIN / "cairn-dataset-webhook"), *argv], capture_output=True,
                          text=True, timeout=60, env={**clean, **(env or {})}, cwd="/tmp")  # fmt: skip


def one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_missing_cert_file_is_one_line_naming_the_flag(certs, tmp_path):
    missing = tmp_path / "nope.crt"
    line = one_line(webhook("--tls-cert-file", str(missing), "--tls-key-file",
                            str(certs.key_file)))  # fmt: skip
    assert "--tls-cert-file" in line and str(missing) in line


def test_unset_cert_flags_are_one_line():
    assert "--tls-cert-file" in one_line(webhook())
    line = one_line(webhook(env={"CAIRN_TLS_CERT_FILE": "/etc/hostname"}))
    assert "--tls-cert-file" in line and "PEM" in line


def test_key_that_is_not_the_certificates_is_one_line(certs, tmp_path):
    other = make_certs(tmp_path / "other")
    line = one_line(webhook("--tls-cert-file", str(certs.cert_file), "--tls-key-file",
                            str(other.key_file)))  # fmt: skip
    assert "--tls-cert-file" in line and "--tls-key-file" in line


def test_good_certificate_then_no_cluster_is_one_line(certs, tmp_path):
    result = webhook("--tls-cert-file", str(certs.cert_file), "--tls-key-file",
                     str(certs.key_file), "--log-level", "ERROR",
                     env={"KUBECONFIG": str(tmp_path / "missing")})  # fmt: skip
    line = one_line(result)
    assert "kubeconfig" in line and "missing" in line
