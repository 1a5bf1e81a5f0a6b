"""`cairn bench provision`: how long PVCs take from creation to Bound.

In-memory (the default): a private nats-server, redis-server, file:// store and cairn-meta
process (its CSI Controller on a unix socket), the provisioner in this process against the
in-memory Kubernetes API, and the in-memory PV binder standing in for the controller manager.
With a kubeconfig: PVCs of an existing StorageClass are created in a real cluster, whose own
cairn-provisioner and controller manager do the work; they are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cairn.kube.api import PVC, STORAGE_CLASS, KubeAPI

BENCH_CLASS = "cairn-bench"


def claim(i: int, storage_class: str, namespace: str) -> dict:
    return {"metadata": {"name": f"bench-{i:05d}", "namespace": namespace},
            "spec": {"storageClassName": storage_class, "accessModes": ["ReadWriteMany"],
                     "resources": {"requests": {"storage": "1Gi"}}}}  # fmt: skip


async def measure(api: KubeAPI, count: int, storage_class: str, namespace: str,
                  timeout: float) -> dict[str, Any]:
    """Creates `count` PVCs at once and times each until the API shows it Bound."""
    from cairn.kube.reconcile import Informer

    claims = Informer(api, PVC, namespace)
    created: dict[str, float] = {}
    bound: dict[str, float] = {}
    done = asyncio.Event()

    def seen(_type: str, pvc: dict) -> None:
        name = pvc["metadata"]["name"]
        if name in created and name not in bound and (
            (pvc.get("status") or {}).get("phase") == "Bound"
        ):
            bound[name] = time.monotonic()
            if len(bound) == count:
                done.set()

    claims.add_handler(seen)
    watching = asyncio.create_task(claims.run())
    try:
        await claims.synced.wait()
        start = time.monotonic()
        for i in range(count):
            body = claim(i, storage_class, namespace)
            created[body["metadata"]["name"]] = time.monotonic()
            await api.create(PVC, body)
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            pass
        total = time.monotonic() - start
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    latencies = sorted(bound[n] - created[n] for n in bound)
    return {"claims": count, "bound": len(bound), "seconds": round(total, 3),
            "per_second": round(len(bound) / total, 1) if total else 0.0,
            "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1)
            if latencies else None,
            "max_ms": round(latencies[-1] * 1000, 1) if latencies else None}  # fmt: skip


async def run_memory(count: int, timeout: float = 600.0) -> dict[str, Any]:
    from cairn import localstack
    from cairn.csi.client import ControllerClient
    from cairn.kube.memory import Binder, MemoryAPI
    from cairn.meta.engine import Format, format_volume
    from cairn.rpc.channel import connect
    from cairn_provisioner.provisioner import Provisioner

    with tempfile.TemporaryDirectory(prefix="cairn-bench-prov-") as tmp:
        root = Path(tmp)
        servers: list[localstack.Server] = []
        try:
            nats = localstack.start_tcp(localstack.nats_server(root / "nats"))
            servers.append(nats)
            redis = localstack.start_tcp(localstack.redis_server(root / "redis"))
            servers.append(redis)
            await format_volume(redis.url, Format(name="bench",
                                                  storage=f"file://{root}/objects",
                                                  capacity=1 << 50))
            socket = root / "csi.sock"
            meta = localstack.Server("cairn-meta", [
                sys.executable, "-m", "cairn_meta", "--nats-url", nats.url, "--meta-url",
                redis.url, "--csi-endpoint", f"unix://{socket}", "--admin-addr",
                f"127.0.0.1:{localstack.free_port()}", "--data-dir", str(root / "data"),
                "--jobs-interval", "0"], root / "cairn-meta.log")  # fmt: skip
            meta.start(socket.exists, timeout=30)
            servers.append(meta)
            api = MemoryAPI()
            await api.create(STORAGE_CLASS, {"metadata": {"name": BENCH_CLASS},
                                             "provisioner": "csi.cairn.io",
                                             "reclaimPolicy": "Delete",
                                             "volumeBindingMode": "Immediate"})
            async with connect(f"unix://{socket}", ready_timeout=10) as channel:
                provisioner = Provisioner(api, ControllerClient(channel), None, workers=16)
                tasks = [asyncio.create_task(provisioner.run()),
                         asyncio.create_task(Binder(api).run())]
                try:
                    result = await measure(api, count, BENCH_CLASS, "default", timeout)
                finally:
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for server in reversed(servers):
                server.stop()
    result["against"] = "in-memory API + cairn-meta CSI"
    return result


async def run_cluster(count: int, kubeconfig: str, storage_class: str, namespace: str,
                      timeout: float = 600.0) -> dict[str, Any]:
    from cairn.kube.api import RestAPI
    from cairn.kube.client import api_client

    client = await api_client(kubeconfig)
    api = RestAPI(client)
    try:
        await api.get(STORAGE_CLASS, storage_class)
        try:
            result = await measure(api, count, storage_class, namespace, timeout)
        finally:
            for i in range(count):
                try:
                    await api.delete(PVC, claim(i, storage_class, namespace)["metadata"]["name"],
                                     namespace)
                except Exception:  # noqa: BLE001 - best-effort clean-up
                    pass
    finally:
        await client.close()
    result["against"] = f"cluster ({kubeconfig}), StorageClass {storage_class}"
    return result


def print_report(result: dict[str, Any]) -> None:
    print(f"provision: {result['bound']}/{result['claims']} PVCs Bound in "
          f"{result['seconds']:.2f}s ({result['per_second']}/s) against {result['against']}")
    if result["p50_ms"] is not None:
        print(f"  creation -> Bound: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
              f"max {result['max_ms']} ms")
