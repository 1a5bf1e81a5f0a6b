"""Cache-aware scheduling: the mutating admission webhook `cairn-dataset-webhook`.

For a Pod being created, each volume whose PVC serves a Dataset (the PVC carries
`data.cairn.io/dataset` and `data.cairn.io/dataset-namespace`) gets the pod a node affinity
term towards that dataset's cache nodes (`cairn.datasets.cache_label`): preferred (weight
100), or required when the pod's label `cairn.datasets.sched_label(<dataset>)` is
`required`. A pod that reads no dataset gets a preferred term away from nodes that cache or
mount any (`data.cairn.io/dataset-num` DoesNotExist), so it leaves their room to readers.

The webhook never stands in the way of a pod: anything unexpected (another kind, a failed or
slow lookup, a malformed object) answers "allowed" without a patch and logs one line. It
only adds: what the user wrote stays, and a term already present is not added again (the
API server may call it twice when another webhook changed the pod: reinvocationPolicy).

Parts, from pure to wired: `pod_patch` (pod + "which dataset does this claim serve" -> JSON
Patch), `admit` (AdmissionReview in -> AdmissionReview out), `ClaimIndex` (that question
answered from watch caches of PVCs and Datasets, reading the API on a miss), `WebhookServer`
(HTTPS: POST /mutate-pods, GET /healthz) and `serve`, the process's main.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cairn import config, datasets
from cairn.errors import CairnError, ConfigError
from cairn.kube.api import PVC, KubeAPI, Obj, labels
from cairn.kube.reconcile import Informer
from cairn.telemetry import metrics

if TYPE_CHECKING:
    from aiohttp import web  # imported when serving: keeps --help fast

log = logging.getLogger(__name__)

WEBHOOK_ADDR = config.Setting(
    "webhook_addr", "host:port the HTTPS admission endpoint listens on", "0.0.0.0:9443"
)
TLS_CERT_FILE = config.Setting(
    "tls_cert_file", "PEM serving certificate (chain) for the webhook's HTTPS endpoint", None
)
TLS_KEY_FILE = config.Setting("tls_key_file", "PEM private key of --tls-cert-file", None)
LOOKUP_TIMEOUT = config.Setting(
    "lookup_timeout",
    "seconds one admission may spend asking the Kubernetes API before it answers without a patch",
    2.0,
    float,
)

PATH = "/mutate-pods"
PREFERRED_WEIGHT = 100  # towards the cache of a dataset the pod reads
AVOID_WEIGHT = 50  # away from cache nodes, for pods that read no dataset: a gentler nudge
REQUIRED = "required"  # the value of the sched label that makes the term required
REVIEWS = metrics.counter(
    "dataset_webhook_reviews_total",
    "admission reviews answered, by outcome (patched, unchanged, skipped: allowed undecided)",
    ["outcome"],
)


# -- the patch: pure ------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetRef:
    """The dataset a claim serves, as far as scheduling needs it."""

    namespace: str
    name: str
    uid: str = ""

    @property
    def cache_label(self) -> str:
        return datasets.cache_label(self.namespace, self.name, self.uid)


Served = Callable[[str], DatasetRef | None]  # claim name -> the dataset it serves, if any


def claims_of(pod: Obj) -> list[str]:
    """The PVC names the pod's volumes use, in order, each once."""
    names: list[str] = []
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claim and claim not in names:
            names.append(claim)
    return names


def _prefer(node: Obj, expression: Obj, weight: int) -> None:
    terms = node.setdefault("preferredDuringSchedulingIgnoredDuringExecution", [])
    preference = {"matchExpressions": [expression]}
    if not any(term.get("preference") == preference for term in terms):
        terms.append({"weight": weight, "preference": preference})


def _require(node: Obj, expression: Obj) -> None:
    # Terms are ORed and expressions inside a term ANDed: the expression joins every term,
    # so no alternative the user wrote lets the pod escape the cache nodes.
    required = node.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({})
    for term in terms:
        expressions = term.setdefault("matchExpressions", [])
        if expression not in expressions:
            expressions.append(expression)


def _pointer(path: str, key: str | int) -> str:
    return f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"


_MISSING: Any = object()


def _diff(path: str, before: Any, after: Any, ops: list[Obj]) -> None:
    """JSON Patch operations turning `before` into `after`, where `after` only adds to it
    (keys, list items at the end): small operations, so a concurrent change elsewhere in
    the pod by another webhook is not overwritten."""
    if before == after:
        return
    if before is _MISSING or before is None:  # "add" also replaces an explicit null
        ops.append({"op": "add", "path": path, "value": after})
    elif isinstance(before, dict) and isinstance(after, dict):
        for key, value in after.items():
            _diff(_pointer(path, key), before.get(key, _MISSING), value, ops)
    elif isinstance(before, list) and isinstance(after, list) and len(after) >= len(before):
        for index, item in enumerate(before):
            _diff(_pointer(path, index), item, after[index], ops)
        ops.extend({"op": "add", "path": f"{path}/-", "value": item}
                   for item in after[len(before):])  # fmt: skip
    else:
        ops.append({"op": "replace", "path": path, "value": after})


def pod_patch(pod: Obj, served: Served) -> list[Obj]:
    """The JSON Patch (a list of operations, empty for none) that gives `pod` its node
    affinity for the datasets its claims serve (see the module docstring)."""
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        # Bound already: the scheduler never sees it, and kubelet would reject a required
        # term its node does not meet.
        return []
    before = spec.get("affinity", _MISSING)
    affinity = copy.deepcopy(before) if isinstance(before, dict) else {}
    node = affinity.setdefault("nodeAffinity", {})
    pod_labels = labels(pod)
    refs = [ref for ref in (served(claim) for claim in claims_of(pod)) if ref is not None]
    for ref in dict.fromkeys(refs):  # two claims of one dataset: one term
        expression = {"key": ref.cache_label, "operator": "Exists"}
        if pod_labels.get(datasets.sched_label(ref.name)) == REQUIRED:
            _require(node, expression)
        else:
            _prefer(node, expression, PREFERRED_WEIGHT)
    if not refs:
        _prefer(node, {"key": datasets.DATASET_NUM, "operator": "DoesNotExist"}, AVOID_WEIGHT)
    ops: list[Obj] = []
    _diff("/spec/affinity", before, affinity, ops)
    return ops


# -- the admission review -------------------------------------------------------------------

Lookup = Callable[[str, list[str]], Awaitable[dict[str, DatasetRef | None]]]


def _answer(uid: str, ops: list[Obj] | None = None) -> Obj:
    response: Obj = {"uid": uid, "allowed": True}
    if ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


async def admit(review: Obj, lookup: Lookup) -> Obj:
    """The AdmissionReview answer to `review`; `lookup(namespace, claims)` tells which dataset
    each claim serves (raising CairnError or TimeoutError when it cannot tell)."""
    request = review.get("request") or {}
    uid = request.get("uid", "")
    kind = (request.get("kind") or {}).get("kind")
    pod = request.get("object") or {}
    meta = pod.get("metadata") or {}
    namespace = request.get("namespace") or meta.get("namespace", "")
    who = f"{namespace}/{meta.get('name') or meta.get('generateName', '') + '*'}"
    if kind != "Pod" or request.get("operation") != "CREATE" or request.get("subResource"):
        log.warning("admission of %s %s %s: not a pod creation, no patch",
                    request.get("operation"), kind, who)  # fmt: skip
        REVIEWS.labels("skipped").inc()
        return _answer(uid)
    try:
        served = await lookup(namespace, claims_of(pod))
        ops = pod_patch(pod, served.get)
    except (CairnError, TimeoutError) as error:
        log.warning("pod %s: no patch: %s", who, str(error) or type(error).__name__)
        REVIEWS.labels("skipped").inc()
        return _answer(uid)
    except Exception as error:  # a malformed object or a bug: still never block the pod
        log.warning("pod %s: no patch: unexpected %s: %s", who, type(error).__name__, error)
        REVIEWS.labels("skipped").inc()
        return _answer(uid)
    REVIEWS.labels("patched" if ops else "unchanged").inc()
    log.debug("pod %s: %d patch operations", who, len(ops))
    return _answer(uid, ops)


# -- which dataset a claim serves -----------------------------------------------------------


class ClaimIndex:
    """Answers `Lookup` from watch caches of PVCs and Datasets (all namespaces).

    A claim or dataset not in the cache yet (created a moment ago, or the watch still
    listing) is read from the API. All of one admission's reads share `timeout` seconds.
    """

    def __init__(self, api: KubeAPI, timeout: float = 2.0):
        self.api, self.timeout = api, timeout
        self.claims = Informer(api, PVC)
        self.datasets = Informer(api, datasets.DATASET)

    async def run(self) -> None:
        await asyncio.gather(self.claims.run(), self.datasets.run())

    async def _object(self, informer: Informer, name: str, namespace: str) -> Obj:
        cached = informer.get(f"{namespace}/{name}")
        if cached is not None:
            return cached
        return await self.api.get(informer.kind, name, namespace)

    async def _served_by(self, namespace: str, claim: str) -> DatasetRef | None:
        # A claim that does not exist raises NotFound: whether it will serve a dataset is
        # unknown, so the pod is left alone rather than steered away from the caches.
        pvc = await self._object(self.claims, claim, namespace)
        name = labels(pvc).get(datasets.DATASET_LABEL)
        if not name:
            return None
        dataset_ns = labels(pvc).get(datasets.DATASET_NAMESPACE_LABEL) or namespace
        dataset = await self._object(self.datasets, name, dataset_ns)
        return DatasetRef(dataset_ns, name, dataset.get("metadata", {}).get("uid", ""))

    async def lookup(self, namespace: str, claims: Iterable[str]) -> dict[str, DatasetRef | None]:
        claims = list(claims)
        async with asyncio.timeout(self.timeout):
            found = await asyncio.gather(*(self._served_by(namespace, c) for c in claims))
        return dict(zip(claims, found, strict=True))


# -- HTTPS ----------------------------------------------------------------------------------


def _need_pem(setting: config.Setting, path: str | None, marker: bytes) -> None:
    where = f"{setting.flag} / {setting.env}"
    if not path:
        raise ConfigError(f"{where} is required: the webhook serves HTTPS only")
    try:
        text = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{where}: cannot read '{path}': {error.strerror or error}") from None
    if marker not in text:
        raise ConfigError(f"{where}: '{path}' holds no PEM {marker.decode().lower()}")


def tls_context(cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """The server's TLS context; ConfigError naming the flag when a file is unusable.

    The files are read once: a renewed certificate takes a restart (a rollout)."""
    _need_pem(TLS_CERT_FILE, cert_file, b"CERTIFICATE")
    _need_pem(TLS_KEY_FILE, key_file, b"PRIVATE KEY")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as error:
        raise ConfigError(f"{TLS_CERT_FILE.flag} '{cert_file}' and {TLS_KEY_FILE.flag} "
                          f"'{key_file}' are not a certificate and its key "
                          f"({error.reason or error})") from None  # fmt: skip
    return context


class WebhookServer:
    """POST /mutate-pods (AdmissionReview v1) and GET /healthz over HTTPS."""

    def __init__(self, lookup: Lookup, host: str, port: int, context: ssl.SSLContext):
        self.lookup, self.host, self.port, self.context = lookup, host, port, context
        self.runner: web.AppRunner | None = None

    async def mutate(self, request: web.Request) -> web.Response:
        from aiohttp import web

        try:
            review = await request.json()
        except ValueError:
            log.warning("admission request that is not JSON: answered 400")
            return web.Response(status=400, text="not JSON\n")
        if not isinstance(review, dict) or not (review.get("request") or {}).get("uid"):
            log.warning("admission request without a uid: answered 400")
            return web.Response(status=400, text="not an AdmissionReview\n")
        return web.json_response(await admit(review, self.lookup))

    async def healthz(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.Response(text="ok\n")

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=8 << 20)  # a pod may be a few MiB of spec
        app.router.add_post(PATH, self.mutate)
        app.router.add_get("/healthz", self.healthz)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        try:
            await web.TCPSite(self.runner, self.host, self.port, ssl_context=self.context).start()
        except OSError as error:
            await self.stop()
            raise ConfigError(
                f"{WEBHOOK_ADDR.flag} / {WEBHOOK_ADDR.env}: cannot listen on "
                f"{self.host}:{self.port}: {error.strerror or error}"
            ) from None
        self.port = self.runner.addresses[0][1]  # the real one when 0 asked for any

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def serve(cfg: dict[str, Any]) -> None:
    """The process: check the flags, reach the API, follow PVCs and Datasets, serve."""
    from cairn.kube.api import RestAPI
    from cairn.kube.client import api_client
    from cairn.service import wait_forever

    addr = config.check_addr(WEBHOOK_ADDR, cfg.get("webhook_addr") or "")
    if addr is None:
        raise ConfigError(f"{WEBHOOK_ADDR.flag} / {WEBHOOK_ADDR.env} is required")
    context = tls_context(cfg.get("tls_cert_file"), cfg.get("tls_key_file"))
    async with contextlib.AsyncExitStack() as stack:
        client = await api_client(cfg.get("kubeconfig"))
        stack.push_async_callback(client.close)
        exporter = metrics.start_metrics_server(cfg.get("metrics_addr"))
        if exporter is not None:
            stack.callback(exporter.stop)
        index = ClaimIndex(RestAPI(client), timeout=float(cfg.get("lookup_timeout") or 2.0))
        watching = asyncio.create_task(index.run())
        stack.push_async_callback(_cancel, watching)
        server = WebhookServer(index.lookup, *addr, context)
        await server.start()
        stack.push_async_callback(server.stop)
        log.info("serving https://%s:%d%s", server.host, server.port, PATH)
        await wait_forever()


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
