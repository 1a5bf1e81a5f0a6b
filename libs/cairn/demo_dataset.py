"""The main job's dataset part: a Dataset declared, bound, warmed up and reported.

Runs cairn-cache-syncer's reconcilers in this process against the in-memory Kubernetes API
(no cluster here), with the local stack's real event stream, cairn-meta (sizes) and
cairn-nodeplugin (the cache node: it keeps the dataset's cache directory, loads its share
of the DataLoad and reports what it has cached). What a user sees: the Dataset's phase,
size, cacheStates rising to 100 % with a progress bar, and its story from the stream.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

NAMESPACE = "demo"
NAME = "photos"


def make_files(root: Path, count: int = 64, size: int = 256 << 10) -> int:
    """`count` files of `size` bytes (some in subdirectories) under `root`; the bytes."""
    for i in range(count):
        sub = root / f"class-{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img-{i:04d}.bin").write_bytes(bytes([i % 251]) * size)
    return count * size


async def run(stack: Any, volume_id: str, tier: str, say) -> None:
    """Declares the dataset on `volume_id` (already filled) and shows it being cached, with
    the cache tier in directory `tier`."""
    from cairn import datasets as names
    from cairn.events import EventStore, JetStreamBus
    from cairn.kube.api import NAMESPACE as NS_KIND
    from cairn.kube.api import NODE
    from cairn.kube.memory import MemoryAPI
    from cairn.progress import Progress
    from cairn_cache_syncer.syncer import CacheSyncer
    from cairn_cache_syncer.usage import MetaUsage

    say("(Kubernetes: the in-memory API, in this process; the syncer's code is the one that "
        "runs in clusters)")  # fmt: skip
    api = MemoryAPI()
    await api.create(NS_KIND, {"metadata": {"name": NAMESPACE}})
    await api.create(NODE, {"metadata": {"name": stack.node_id, "labels": {
        "kubernetes.io/hostname": stack.node_id}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}})  # fmt: skip
    bus = await JetStreamBus.connect(stack.nats_url, name="cairn-demo-dataset")
    usage = MetaUsage(stack.admin_addr)
    syncer = CacheSyncer(api, EventStore(bus), usage=usage, resync=0.5, usage_ttl=0.5)
    task = asyncio.create_task(syncer.run())
    try:
        await api.create(names.DATASET, {"metadata": {"name": NAME, "namespace": NAMESPACE},
                                         "spec": {"mounts": [{"mountPoint": f"cairn://{volume_id}"}]}})  # fmt: skip
        await api.create(names.RUNTIME, {"metadata": {"name": NAME, "namespace": NAMESPACE},
                                         "spec": {"replicas": 1, "tieredStore": {"levels": [
                                             {"mediumType": "SSD", "path": str(tier),
                                              "quota": "1Gi"}]}}})  # fmt: skip
        say(f"$ kubectl apply -f dataset.yaml   # Dataset {NAMESPACE}/{NAME}: "
            f"cairn://{volume_id}; CairnRuntime: 1 cache node, SSD tier {tier} 1Gi")  # fmt: skip
        ds = await _until(api, names.DATASET, lambda s: s.get("phase") == "Bound"
                          and s.get("fileNum"), "bound")  # fmt: skip
        st = ds["status"]
        say(f"dataset {st['phase']}: ufsTotal {st['ufsTotal']}, {st['fileNum']} files and "
            f"directories, cached {st['cacheStates']['cached']} "
            f"({st['cacheStates']['cachedPercentage']})")  # fmt: skip
        pv = await api.get(_pv_kind(), names.volume_handle(NAMESPACE, NAME))
        say(f"PV {pv['metadata']['name']} + PVC {NAMESPACE}/{NAME}: a pod mounts "
            f"`claimName: {NAME}` (read-only)")  # fmt: skip
        await _until(api, names.RUNTIME, lambda s: s.get("cachePhase") == "Ready", "cache ready")
        node = (await api.get(NODE, stack.node_id))["metadata"]["labels"]
        shown = {k: v for k, v in node.items() if k.startswith(names.PREFIX)}
        say(f"node {stack.node_id} labelled {shown}")
        await api.create(names.DATALOAD, {"metadata": {"name": "warmup", "namespace": NAMESPACE},
                                          "spec": {"dataset": {"name": NAME}}})  # fmt: skip
        say("$ kubectl apply -f dataload.yaml   # DataLoad warmup: the whole dataset")
        total = int(await _total_bytes(usage, syncer, NAMESPACE, NAME))
        with Progress("warm-up", total or None, unit="B") as progress:
            while True:
                dl = await api.get(names.DATALOAD, "warmup", NAMESPACE)
                dls = dl.get("status") or {}
                progress("bytes", int(dls.get("loadedBytes", 0)))
                if dls.get("phase") in ("Complete", "Failed"):
                    break
                await asyncio.sleep(0.2)
            progress.done(f"{dls.get('progress', '')} loaded")
        say(f"DataLoad warmup {dls['phase']}: {dls.get('progress', '')} in "
            f"{dls.get('duration', '')}")  # fmt: skip
        # the node plugin's next cache report shows it; ufsTotal counts space as du does (4 KiB
        # pages, directories too), so a complete cache reads a little under 100 % of it
        ds = await _until(api, names.DATASET, lambda s: float(s.get("cacheStates", {}).get(
            "cachedPercentage", "0%").rstrip("%")) >= 99.0, "cached", timeout=60)  # fmt: skip
        cs = ds["status"]["cacheStates"]
        say(f"cacheStates: cached {cs['cached']} of {ds['status']['ufsTotal']} "
            f"({cs['cachedPercentage']}), capacity {cs['cacheCapacity']}")  # fmt: skip
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await usage.close()
        await bus.close()


def _pv_kind():
    from cairn.kube.api import PV

    return PV


async def _total_bytes(usage, syncer, namespace: str, name: str) -> float:
    d = syncer.facts.datasets.get(f"{namespace}/{name}")
    total = 0
    for mount in (d.bound or {}).get("mounts", []) if d else []:
        total += (await usage(mount["path"]))[0]
    return total


async def _until(api, kind, check, what: str, timeout: float = 30.0):
    end = time.monotonic() + timeout
    obj: dict = {}
    while time.monotonic() < end:
        obj = await api.get(kind, NAME, NAMESPACE)
        if check(obj.get("status") or {}):
            return obj
        await asyncio.sleep(0.2)
    from cairn.errors import DeadlineExceeded

    raise DeadlineExceeded(f"the dataset demo: not {what} after {timeout:g}s "
                           f"(status: {obj.get('status')})")  # fmt: skip
