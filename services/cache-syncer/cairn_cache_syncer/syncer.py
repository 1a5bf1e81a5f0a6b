"""The dataset-cache orchestrator: Datasets, CairnRuntimes, DataLoads and node labels.

Level-triggered reconcilers (cairn.kube.reconcile) over watch caches, reading the facts the
event stream tells (facts.py) and writing only Kubernetes objects and events:

- runtimes (key `ns/name`): a CairnRuntime binds to the Dataset of its name: the static
  PV + PVC (binding.py), then `DatasetBound`; it picks the cache nodes (placement.py) and
  records them as `RuntimeScaled`, which the node plugins of those nodes act on; its status
  (cache and fuse phases, replicas, the scale subresource's selector). Deleting it unbinds:
  PVC and PV go (once no pod uses the claim), `DatasetUnbound`, labels fall away.
- datasets (key `ns/name`): phase, conditions, ufsTotal/fileNum from cairn-meta's usage
  counters, cacheStates from the node reports; deleting a dataset waits, saying so, while a
  pod uses its claim.
- nodes (key: node name): the labels labels.py wants, by patches with the node's
  resourceVersion (a conflict re-reads and retries), each change recorded as NodeLabelled.
- dataloads (key `ns/name`): one run at a time per dataset (others queue), shares of the
  work given to the ready cache nodes as `DataLoadStarted`, progress folded into status,
  `DataLoadFinished`; a node that stops reporting fails the run with a reason; Cron
  policies run again on schedule; ttlSecondsAfterFinished removes finished ones.

The syncer appends its own decisions to the stream and waits to read them back before it
goes on, so what it acts on is always what a replay would give.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cairn import datasets as names
from cairn.errors import (
    AlreadyExists,
    CairnError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from cairn.events.types import (
    DataLoadFinished,
    DataLoadStarted,
    DatasetBound,
    DatasetDeleted,
    DatasetUnbound,
    NodeLabelled,
    RuntimeScaled,
)
from cairn.kube.api import (
    EVENT,
    NODE,
    POD,
    PV,
    PVC,
    Kind,
    KubeAPI,
    Obj,
    deleting,
    finalizers,
    key_of,
    labels,
    now_rfc3339,
    parse_time,
    split_key,
)
from cairn.kube.reconcile import RECONCILE_BACKOFF, Controller, Informer
from cairn.retry import Backoff
from cairn.tasks import cancel_all
from cairn_cache_syncer import binding, placement, status
from cairn_cache_syncer import labels as node_labels
from cairn_cache_syncer.facts import Facts, FactsFollower

log = logging.getLogger(__name__)

FINALIZER = names.PREFIX + "cache-syncer"
Usage = Callable[[str], Awaitable[tuple[int, int]]]  # path -> (bytes, inodes)


class CacheSyncer:
    def __init__(
        self,
        api: KubeAPI,
        store: Any,
        *,
        usage: Usage | None = None,
        expiry: float = 90.0,
        resync: float = 10.0,
        usage_ttl: float = 10.0,
        backoff: Backoff = RECONCILE_BACKOFF,
        clock: Callable[[], float] = time.time,
        identity: str = "cairn-cache-syncer",
    ):
        self.api, self.store, self.usage = api, store, usage
        self.expiry, self.resync, self.usage_ttl = expiry, resync, usage_ttl
        self.clock, self.identity = clock, identity
        self.follower = FactsFollower(store, on_change=self._facts_changed)
        self.facts: Facts = self.follower.facts
        self.dataset_cache = Informer(api, names.DATASET)
        self.runtime_cache = Informer(api, names.RUNTIME)
        self.dataload_cache = Informer(api, names.DATALOAD)
        self.node_cache = Informer(api, NODE)
        self.pvc_cache = Informer(api, PVC)
        self.pv_cache = Informer(api, PV)
        self.informers = (self.dataset_cache, self.runtime_cache, self.dataload_cache,
                          self.node_cache, self.pvc_cache, self.pv_cache)  # fmt: skip
        self.datasets = Controller("dataset", self.sync_dataset, backoff=backoff, workers=2)
        self.runtimes = Controller("runtime", self.sync_runtime, backoff=backoff, workers=2)
        self.nodes = Controller("node", self.sync_node, backoff=backoff, workers=2)
        self.dataloads = Controller("dataload", self.sync_dataload, backoff=backoff, workers=2)
        self.controllers = (self.datasets, self.runtimes, self.nodes, self.dataloads)
        self._usage: dict[str, tuple[float, tuple[int, int]]] = {}
        self._warned: dict[str, str] = {}  # object key -> last Warning reason recorded
        # Placements read every dataset's nodes: one at a time, or two runtimes reconciled
        # at once could both take the same free node (Exclusive placement broken).
        self._placing = asyncio.Lock()
        self.dataset_cache.add_handler(self._dataset_changed)
        self.runtime_cache.add_handler(self._runtime_changed)
        self.dataload_cache.add_handler(self.dataloads.handler())
        self.node_cache.add_handler(self._node_changed)
        self.pvc_cache.add_handler(self._claim_changed)

    # -- running -------------------------------------------------------------------------

    async def run(self) -> None:
        """Caches and facts first, then the workers; runs until cancelled."""
        tasks = [asyncio.create_task(i.run(), name=f"watch {i.kind.plural}")
                 for i in self.informers]  # fmt: skip
        try:
            await asyncio.gather(*(i.synced.wait() for i in self.informers))
            position = await self.follower.catch_up()
            log.info("caches synced: %d datasets, %d runtimes, %d dataloads; facts at #%d",
                     len(self.dataset_cache.cache), len(self.runtime_cache.cache),
                     len(self.dataload_cache.cache), position)  # fmt: skip
            tasks.append(asyncio.create_task(self.follower.run(), name="facts"))
            tasks += [asyncio.create_task(c.run(), name=c.name) for c in self.controllers]
            tasks.append(asyncio.create_task(self._resync_forever(), name="resync"))
            await asyncio.gather(*tasks)
        finally:
            await cancel_all(tasks)

    def queue_everything(self) -> None:
        for key in self.dataset_cache.cache:
            self.datasets.add(key)
        for key in self.runtime_cache.cache:
            self.runtimes.add(key)
        for key in self.dataload_cache.cache:
            self.dataloads.add(key)
        for key in set(self.node_cache.cache) | self._labelled_nodes():
            self.nodes.add(key)

    async def _resync_forever(self) -> None:
        while True:
            self.queue_everything()
            await asyncio.sleep(self.resync)

    async def wait_idle(self) -> None:
        for controller in self.controllers:
            await controller.wait_idle()

    def _labelled_nodes(self) -> set[str]:
        return {n for d in self.facts.datasets.values() for n in d.labels}

    # -- what to look at when something changed ------------------------------------------

    def _facts_changed(self, touched: set[tuple[str, str]]) -> None:
        for kind, key in touched:
            if kind == "dataset":
                self.datasets.add(key)
                self.runtimes.add(key)
                self._queue_loads_of(key)
            elif kind == "node":
                self.nodes.add(key)
            elif kind == "dataload":
                self.dataloads.add(key)

    def _queue_loads_of(self, dataset_key: str) -> None:
        for key, load in self.dataload_cache.cache.items():
            if load_dataset(load) == dataset_key:
                self.dataloads.add(key)

    def _dataset_changed(self, _type: str, obj: Obj) -> None:
        key = key_of(obj)
        self.datasets.add(key)
        self.runtimes.add(key)
        self._queue_loads_of(key)

    def _runtime_changed(self, _type: str, obj: Obj) -> None:
        key = key_of(obj)
        self.runtimes.add(key)
        self.datasets.add(key)

    def _node_changed(self, _type: str, obj: Obj) -> None:
        self.nodes.add(key_of(obj))
        for key in self.runtime_cache.cache:  # placement may change
            self.runtimes.add(key)

    def _claim_changed(self, _type: str, obj: Obj) -> None:
        lab = labels(obj)
        if names.DATASET_LABEL in lab:
            key = f"{lab.get(names.DATASET_NAMESPACE_LABEL, '')}/{lab[names.DATASET_LABEL]}"
            self.runtimes.add(key)
            self.datasets.add(key)
        else:  # a pvc:// source may have just bound
            for key in self.runtime_cache.cache:
                if key.startswith(obj["metadata"].get("namespace", "") + "/"):
                    self.runtimes.add(key)

    # -- shared steps --------------------------------------------------------------------

    async def record(self, aggregate: str, key: str, events: list) -> None:
        """Appends the syncer's own events and waits until the facts include them."""
        appended = await self.store.append(aggregate, key, events, None)
        await self.follower.wait_for(appended.sequence)

    async def ensure_finalizer(self, kind: Kind, obj: Obj) -> Obj:
        if FINALIZER in finalizers(obj):
            return obj
        m = obj["metadata"]
        patch = {"metadata": {"finalizers": [*finalizers(obj), FINALIZER],
                              "resourceVersion": m["resourceVersion"]}}  # fmt: skip
        return await self.api.patch(kind, m["name"], patch, m.get("namespace"))

    async def drop_finalizer(self, kind: Kind, obj: Obj) -> None:
        if FINALIZER not in finalizers(obj):
            return
        m = obj["metadata"]
        rest = [f for f in finalizers(obj) if f != FINALIZER]
        patch = {"metadata": {"finalizers": rest or None, "resourceVersion": m["resourceVersion"]}}
        with contextlib.suppress(NotFound):
            await self.api.patch(kind, m["name"], patch, m.get("namespace"))

    async def write_status(self, kind: Kind, obj: Obj, new: dict[str, Any]) -> None:
        if not status.changed(obj.get("status"), new):
            return
        m = obj["metadata"]
        patch = {"metadata": {"resourceVersion": m["resourceVersion"]},
                 "status": {**(obj.get("status") or {}), **new}}  # fmt: skip
        body = {**obj, "status": patch["status"]}
        with contextlib.suppress(NotFound):
            await self.api.update_status(kind, body)

    async def record_event(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on `obj`, once per reason in a row (best effort)."""
        key = f"{obj.get('kind', '')}/{key_of(obj)}"
        if self._warned.get(key) == reason + message:
            return
        self._warned[key] = reason + message
        m = obj["metadata"]
        stamp = now_rfc3339()
        event = {
            "metadata": {"generateName": f"{m['name']}.", "namespace": m.get("namespace")},
            "involvedObject": {"kind": obj.get("kind", ""), "name": m["name"],
                               "namespace": m.get("namespace"), "uid": m.get("uid"),
                               "apiVersion": obj.get("apiVersion", "")},  # fmt: skip
            "type": type_, "reason": reason, "message": message[:1000],
            "source": {"component": "cairn-cache-syncer"},
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }  # fmt: skip
        try:
            await self.api.create(EVENT, event)
        except CairnError as error:
            log.warning("could not record event %s on %s: %s", reason, key, error)

    def claim_pv(self, namespace: str, claim: str) -> Obj | None:
        pvc = self.pvc_cache.get(f"{namespace}/{claim}")
        name = (pvc or {}).get("spec", {}).get("volumeName")
        return self.pv_cache.get(name) if name else None

    async def pods_using(self, namespace: str, claim: str) -> list[str]:
        pods, _ = await self.api.list(POD, namespace)
        return binding.pods_using(pods, namespace, claim)

    async def dir_usage(self, path: str) -> tuple[int, int] | None:
        """(bytes, inodes) below a file system directory, from cairn-meta (cached briefly)."""
        if self.usage is None:
            return None
        now = self.clock()
        kept = self._usage.get(path)
        if kept is not None and now - kept[0] < self.usage_ttl:
            return kept[1]
        try:
            value = await self.usage(path)
        except CairnError as error:
            log.warning("usage of %s: %s", path, error)
            return kept[1] if kept else None
        self._usage[path] = (now, value)
        return value

    # -- runtimes ------------------------------------------------------------------------

    async def sync_runtime(self, key: str) -> None:
        runtime = self.runtime_cache.get(key)
        if runtime is None:
            return
        namespace, name = split_key(key)
        if deleting(runtime):
            if await self.unbind(key, runtime, "the runtime was deleted"):
                await self.drop_finalizer(names.RUNTIME, runtime)
            return
        runtime = await self.ensure_finalizer(names.RUNTIME, runtime)
        dataset = self.dataset_cache.get(key)
        if dataset is None or deleting(dataset):
            await self.write_runtime_status(runtime, "DatasetMissing",
                                            f"no Dataset {key} to serve")  # fmt: skip
            return
        d = self.facts.datasets.get(key)
        bound = d.bound if d is not None else None
        if bound is not None and bound.get("runtime") != runtime["metadata"]["uid"]:
            # bound by an earlier runtime of this name that went without unbinding
            await self.unbind(key, runtime, "a new runtime replaced the old one")
            return
        if bound is None:
            problem = await self.bind(key, dataset, runtime)
            if problem:
                await self.write_runtime_status(runtime, "NotBound", problem)
                return
        await self.place(key, dataset, runtime)
        await self.write_runtime_status(runtime, "Bound", "")

    async def bind(self, key: str, dataset: Obj, runtime: Obj) -> str:
        """Makes the PV and PVC and records DatasetBound; a problem to report, or ""."""
        namespace, name = split_key(key)
        try:
            mounts = binding.resolve_mounts(dataset, self.facts.volumes, self.claim_pv)
        except NotFound as error:
            self.runtimes.add(key, after=5.0)  # a source may appear: look again
            return str(error)
        except (InvalidArgument, FailedPrecondition) as error:
            return str(error)
        handle = names.volume_handle(namespace, name)
        holder = self.facts.handles.get(handle)
        if holder not in (None, key) and (self.facts.datasets.get(holder) or None) and \
                self.facts.datasets[holder].bound is not None:  # fmt: skip
            return f"volume handle {handle} is taken by dataset {holder}"
        pv, pvc = binding.pv_and_pvc(dataset, runtime, mounts)
        for kind, obj in ((PV, pv), (PVC, pvc)):
            try:
                await self.api.create(kind, obj)
            except AlreadyExists:
                existing = await self.api.get(kind, obj["metadata"]["name"],
                                              obj["metadata"].get("namespace"))  # fmt: skip
                if not binding.ours(existing, namespace, name):
                    return (f"{kind.kind} {key_of(obj)} exists and does not belong to the "
                            "dataset")  # fmt: skip
        await self.record("dataset", key, [DatasetBound(
            runtime=runtime["metadata"]["uid"], uid=dataset["metadata"]["uid"],
            volume_handle=handle, pv=pv["metadata"]["name"], pvc=key, mounts=mounts,
            read_only=binding.read_only(dataset, mounts))])  # fmt: skip
        log.info("dataset %s bound to runtime %s", key, key)
        return ""

    async def place(self, key: str, dataset: Obj, runtime: Obj) -> None:
        """Chooses the cache nodes; records RuntimeScaled when they (or the tiers) change."""
        async with self._placing:
            await self._place(key, dataset, runtime)

    async def _place(self, key: str, dataset: Obj, runtime: Obj) -> None:
        d = self.facts.datasets[key]
        now = self.clock()
        spec = runtime.get("spec", {})
        replicas = int(spec.get("replicas", 1))
        exclusive = dataset.get("spec", {}).get("placement") == "Exclusive"
        taken: set[str] = set()
        for other_key, other in self.facts.datasets.items():
            if other_key == key or other.bound is None:
                continue
            other_ds = self.dataset_cache.get(other_key) or {}
            if exclusive or other_ds.get("spec", {}).get("placement") == "Exclusive":
                taken |= set(other.nodes)
        dead = {
            n
            for n in set(d.nodes) | set(self.facts.seen)
            if not self.facts.node_alive(n, now, self.expiry, d.assigned_at.get(n, 0.0))
        }
        available = {n: c.get("available", 0) for n, c in self.facts.capacity.items()}
        nodes = placement.choose_nodes(
            nodes=list(self.node_cache.cache.values()), current=list(d.nodes),
            replicas=replicas, node_affinity=dataset.get("spec", {}).get("nodeAffinity"),
            node_selector=spec.get("nodeSelector"), taken=taken, available=available,
            dead=dead)  # fmt: skip
        tiers = binding.tiers_of(runtime)
        clean = (spec.get("fuse") or {}).get("cleanPolicy") or "OnRuntimeDeleted"
        mounts = d.bound.get("mounts", []) if d.bound else []
        if (nodes, tiers, replicas, clean) == (d.nodes, d.tiers, d.replicas, d.clean_policy):
            return
        await self.record(
            "dataset",
            key,
            [
                RuntimeScaled(
                    replicas=replicas, nodes=nodes, tiers=tiers, mounts=mounts, clean_policy=clean
                )
            ],
        )
        log.info("dataset %s: cache nodes %s (of %d wanted)", key, nodes, replicas)

    async def unbind(self, key: str, obj: Obj, reason: str) -> bool:
        """Removes the dataset's PVC and PV and records DatasetUnbound; False while a pod
        still uses the claim (said in a condition and an event; looked at again soon)."""
        namespace, name = split_key(key)
        pvc = self.pvc_cache.get(key)
        if binding.ours(pvc, namespace, name) and not deleting(pvc):
            users = await self.pods_using(namespace, name)
            if users:
                message = (f"waiting: claim {key} is still used by pod(s) "
                           f"{', '.join(users)}")  # fmt: skip
                await self.record_event(obj, "Warning", "DatasetInUse", message)
                await self.write_deleting_condition(obj, message)
                (self.runtimes if obj.get("kind") == names.RUNTIME.kind else
                 self.datasets).add(key, after=2.0)  # fmt: skip
                return False
        if binding.ours(pvc, namespace, name):
            with contextlib.suppress(NotFound):
                await self.api.delete(PVC, name, namespace)
        handle = names.volume_handle(namespace, name)
        if binding.ours(self.pv_cache.get(handle), namespace, name):
            with contextlib.suppress(NotFound):
                await self.api.delete(PV, handle)
        d = self.facts.datasets.get(key)
        if d is not None and (d.bound is not None or d.nodes):
            await self.record("dataset", key, [DatasetUnbound(reason=reason)])
            log.info("dataset %s unbound: %s", key, reason)
        return True

    async def write_deleting_condition(self, obj: Obj, message: str) -> None:
        kind = names.RUNTIME if obj.get("kind") == names.RUNTIME.kind else names.DATASET
        old = (obj.get("status") or {}).get("conditions") or []
        kept = [c for c in old if c.get("type") != "Deleting"]
        cond = status.condition(old, "Deleting", True, "InUse", message)
        await self.write_status(kind, obj, {"conditions": [*kept, cond]})

    async def write_runtime_status(self, runtime: Obj, reason: str, message: str) -> None:
        key = key_of(runtime)
        namespace, name = split_key(key)
        d = self.facts.datasets.get(key)
        now = self.clock()
        spec = runtime.get("spec", {})
        desired = int(spec.get("replicas", 1))
        nodes = list(d.nodes) if d and d.bound else []
        ready = self.facts.ready_cache_nodes(key, now, self.expiry) if d and d.bound else []
        fused = [n for n, since in (d.fused.items() if d and d.bound else [])
                 if self.facts.node_alive(n, now, self.expiry, since)]  # fmt: skip
        cached = sum(d.reports[n].cached for n in ready) if d else 0
        capacity = sum(t.get("quota", 0) for t in (d.tiers if d else [])) * len(nodes)
        uid = (d.bound or {}).get("uid", "") if d else ""
        old = (runtime.get("status") or {}).get("conditions")
        new = {
            "phase": status.phase_of(desired, len(ready)),
            "cachePhase": status.phase_of(desired, len(ready)),
            "fusePhase": status.phase_of(len(d.fused) if d and d.bound else 0, len(fused)),
            "desiredReplicas": desired,
            "currentReplicas": len(nodes),
            "readyReplicas": len(ready),
            "fuseNumberDesired": len(d.fused) if d and d.bound else 0,
            "fuseNumberReady": len(fused),
            "selector": (f"{names.cache_label(namespace, name, uid)}=true" if uid else ""),
            "cacheStates": status.cache_states(cached, capacity, 0) | {
                "cachedPercentage": ""},
            "nodes": [{"name": n, "cached": status.human(d.reports[n].cached if n in d.reports
                                                          else 0)} for n in nodes],
            "conditions": [status.condition(old, "Bound", reason == "Bound", reason,
                                            message or "bound to its dataset")],
            "observedGeneration": runtime["metadata"].get("generation", 0),
        }  # fmt: skip
        new["cacheStates"].pop("cachedPercentage")
        await self.write_status(names.RUNTIME, runtime, new)

    # -- datasets ------------------------------------------------------------------------

    async def sync_dataset(self, key: str) -> None:
        dataset = self.dataset_cache.get(key)
        if dataset is None:
            return
        if deleting(dataset):
            if not await self.unbind(key, dataset, "the dataset was deleted"):
                return
            if key in self.facts.datasets:
                await self.record("dataset", key, [DatasetDeleted(reason="deleted")])
            await self.drop_finalizer(names.DATASET, dataset)
            return
        dataset = await self.ensure_finalizer(names.DATASET, dataset)
        await self.write_status(names.DATASET, dataset, await self.dataset_status(key, dataset))

    async def dataset_status(self, key: str, dataset: Obj) -> dict[str, Any]:
        d = self.facts.datasets.get(key)
        bound = d.bound if d else None
        old = (dataset.get("status") or {}).get("conditions")
        namespace, name = split_key(key)
        if bound is not None:
            phase, ok, reason, message = "Bound", True, "Bound", f"served by CairnRuntime {key}"
        else:
            phase, ok, reason, message = "NotBound", False, "NoRuntime", "no CairnRuntime"
            if key in self.runtime_cache.cache:
                reason, message = "Binding", "the runtime is binding"
            try:
                binding.resolve_mounts(dataset, self.facts.volumes, self.claim_pv)
            except NotFound as error:
                reason, message = "MountNotFound", str(error)
            except (InvalidArgument, FailedPrecondition) as error:
                phase, reason, message = "Failed", "BadMount", str(error)
        total = files = 0
        for mount in (bound or {}).get("mounts", []):
            usage = await self.dir_usage(mount["path"])
            if usage is not None:
                total += usage[0]
                files += usage[1]
        now = self.clock()
        ready = self.facts.ready_cache_nodes(key, now, self.expiry) if bound else []
        cached = sum(d.reports[n].cached for n in ready) if d else 0
        capacity = sum(t.get("quota", 0) for t in (d.tiers if d else [])) * len(
            d.nodes if d and bound else [])  # fmt: skip
        wanted = node_labels.desired(self.facts, now, self.expiry)
        marks = {names.fuse_label(namespace, name, (bound or {}).get("uid", "")),
                 names.cache_label(namespace, name, (bound or {}).get("uid", ""))}  # fmt: skip
        nodes = sorted(n for n, lab in wanted.items() if marks & set(lab)) if bound else []
        conditions = [status.condition(old, "Ready", ok, reason, message)]
        return {
            "phase": phase,
            "conditions": conditions,
            "runtimes": (
                [{"name": name, "namespace": namespace, "type": "cairn"}] if bound else []
            ),  # fmt: skip
            "ufsTotal": status.human(total) if bound else "",
            "fileNum": str(files) if bound else "",
            "cacheStates": status.cache_states(cached, capacity, total),
            "nodes": nodes,
            "observedGeneration": dataset["metadata"].get("generation", 0),
        }

    # -- node labels ---------------------------------------------------------------------

    async def sync_node(self, name: str) -> None:
        node = self.node_cache.get(name)
        if node is None:
            return
        wanted = node_labels.desired(self.facts, self.clock(), self.expiry).get(name, {})
        to_set, to_remove = node_labels.diff(labels(node), wanted)
        if not to_set and not to_remove:
            return
        patch = {"metadata": {"labels": {**to_set, **dict.fromkeys(to_remove)},
                              "resourceVersion": node["metadata"]["resourceVersion"]}}  # fmt: skip
        await self.api.patch(NODE, name, patch)
        by_dataset: dict[str, tuple[dict[str, str], list[str]]] = {}
        for k, v in to_set.items():
            ds = node_labels.dataset_of_label(self.facts, k)
            if ds:
                by_dataset.setdefault(ds, ({}, []))[0][k] = v
        for k in to_remove:
            ds = node_labels.dataset_of_label(self.facts, k)
            if ds:
                by_dataset.setdefault(ds, ({}, []))[1].append(k)
        for ds, (set_, removed) in sorted(by_dataset.items()):
            await self.record("dataset", ds, [NodeLabelled(node=name, set=set_, removed=removed)])
        log.info("node %s: labels set %s, removed %s", name, sorted(to_set), to_remove)

    # -- data loads ----------------------------------------------------------------------

    async def sync_dataload(self, key: str) -> None:
        load = self.dataload_cache.get(key)
        if load is None:
            return
        run = self.facts.loads.get(key)
        if deleting(load):
            if run is not None and run.finished is None:
                await self.record(
                    "dataload",
                    key,
                    [
                        DataLoadFinished(
                            run=run.run, phase="Failed", reason="the DataLoad was deleted"
                        )
                    ],
                )
            await self.drop_finalizer(names.DATALOAD, load)
            return
        load = await self.ensure_finalizer(names.DATALOAD, load)
        now = self.clock()
        if run is not None and run.finished is None:
            await self.follow_run(key, load, run, now)
            return
        if run is not None:  # finished: clean up, or run again on schedule
            if await self.expire_load(key, load, run, now):
                return
            due = self.next_run(load, run)
            if due is None or due > now:
                if due is not None:
                    self.dataloads.add(key, after=min(due - now + 0.05, 3600.0))
                await self.write_status(names.DATALOAD, load, self.load_status(load, run))
                return
        await self.start_run(key, load, run, now)

    async def start_run(self, key: str, load: Obj, run: Any, now: float) -> None:
        dataset_key = load_dataset(load)
        blocker = self.queued_behind(key, load, dataset_key)
        d = self.facts.datasets.get(dataset_key)
        ready = self.facts.ready_cache_nodes(dataset_key, now, self.expiry)
        if d is None or d.bound is None:
            reason, message = "DatasetNotBound", f"dataset {dataset_key} is not bound"
        elif blocker:
            reason, message = "Queued", f"waiting for DataLoad {blocker} of the same dataset"
        elif not ready:
            reason, message = "NoCacheNodes", f"no cache node of {dataset_key} is ready"
        else:
            targets = [(t.get("path") or "/", int(t.get("replicas", 1)))
                       for t in load.get("spec", {}).get("target") or []] or [("/", 1)]  # fmt: skip
            shares = placement.shares(targets, sorted(ready))
            number = (run.run + 1) if run is not None else 1
            await self.record(
                "dataload",
                key,
                [DataLoadStarted(dataset=dataset_key, run=number, assignments=shares)],
            )
            log.info("dataload %s: run %d on %s", key, number, sorted(shares))
            return  # the facts moved: this key is looked at again
        old = (load.get("status") or {}).get("conditions")
        self.dataloads.add(key, after=2.0)
        await self.write_status(
            names.DATALOAD,
            load,
            {
                "phase": "Pending",
                "conditions": [status.condition(old, "Ready", False, reason, message)],
            },
        )

    def queued_behind(self, key: str, load: Obj, dataset_key: str) -> str:
        """Another DataLoad of the same dataset that goes first: one running, or an older
        one not started yet."""
        mine = (parse_time(load["metadata"].get("creationTimestamp")), key)
        for other_key, other in self.dataload_cache.cache.items():
            if other_key == key or load_dataset(other) != dataset_key or deleting(other):
                continue
            other_run = self.facts.loads.get(other_key)
            if other_run is not None and other_run.finished is None:
                return other_key
            stamp = (parse_time(other["metadata"].get("creationTimestamp")), other_key)
            if other_run is None and stamp < mine:
                return other_key
        return ""

    async def follow_run(self, key: str, load: Obj, run: Any, now: float) -> None:
        done = {n: p for n, p in run.progress.items() if p.get("done")}
        errors = [f"{n}: {p['error']}" for n, p in sorted(done.items()) if p.get("error")]
        files = sum(p.get("files", 0) for p in run.progress.values())
        size = sum(p.get("bytes", 0) for p in run.progress.values())
        if set(run.assignments) <= set(done):
            phase = "Failed" if errors else "Complete"
            await self.record("dataload", key, [DataLoadFinished(
                run=run.run, phase=phase, reason="; ".join(errors), files=files, bytes=size,
                duration_seconds=round(now - run.started_at, 3))])  # fmt: skip
            return
        lost = sorted(n for n in run.assignments if n not in done and not
                      self.facts.node_alive(n, now, self.expiry, run.started_at))  # fmt: skip
        if lost:
            await self.record("dataload", key, [DataLoadFinished(
                run=run.run, phase="Failed", files=files, bytes=size,
                reason=f"cache node(s) {', '.join(lost)} stopped reporting",
                duration_seconds=round(now - run.started_at, 3))])  # fmt: skip
            return
        self.dataloads.add(key, after=self.expiry / 3)  # notice a node that goes quiet
        await self.write_status(names.DATALOAD, load, self.load_status(load, run))

    async def expire_load(self, key: str, load: Obj, run: Any, now: float) -> bool:
        ttl = load.get("spec", {}).get("ttlSecondsAfterFinished")
        if ttl is None or run.finished is None:
            return False
        left = run.finished["at"] + float(ttl) - now
        if left > 0:
            self.dataloads.add(key, after=left + 0.05)
            return False
        namespace, name = split_key(key)
        with contextlib.suppress(NotFound):
            await self.api.delete(names.DATALOAD, name, namespace)
        return True

    @staticmethod
    def next_run(load: Obj, run: Any) -> float | None:
        """When a Cron DataLoad runs next (None for Once)."""
        spec = load.get("spec", {})
        if spec.get("policy") != "Cron" or not spec.get("schedule") or run.finished is None:
            return None
        from croniter import croniter

        try:
            return croniter(spec["schedule"], run.finished["at"]).get_next(float)
        except (ValueError, KeyError):
            return None

    def load_status(self, load: Obj, run: Any) -> dict[str, Any]:
        files = sum(p.get("files", 0) for p in run.progress.values())
        size = sum(p.get("bytes", 0) for p in run.progress.values())
        old = (load.get("status") or {}).get("conditions")
        out: dict[str, Any] = {
            "run": run.run,
            "loadedFiles": files,
            "loadedBytes": size,
            "progress": f"{files} files, {status.human(size)}",
            "nodes": sorted(run.assignments),
            "startTime": _rfc3339(run.started_at),
        }
        finished = run.finished
        if finished is None:
            out["phase"] = "Executing"
            out["duration"] = _duration(self.clock() - run.started_at)
            out["conditions"] = [status.condition(old, "Complete", False, "Executing",
                                                  f"loading on {', '.join(sorted(run.assignments))}")]  # fmt: skip
            return out
        out["phase"] = finished["phase"]
        out["completionTime"] = _rfc3339(finished["at"])
        out["duration"] = _duration(finished.get("duration_seconds", 0.0))
        out["loadedFiles"] = finished.get("files", files)
        out["loadedBytes"] = finished.get("bytes", size)
        ok = finished["phase"] == "Complete"
        out["conditions"] = [status.condition(old, "Complete", ok, finished["phase"],
                                              finished.get("reason") or "loaded")]  # fmt: skip
        due = self.next_run(load, run)
        if due is not None:
            out["nextScheduleTime"] = _rfc3339(due)
        return out


def load_dataset(load: Obj) -> str:
    ref = load.get("spec", {}).get("dataset") or {}
    namespace = ref.get("namespace") or load.get("metadata", {}).get("namespace", "")
    return names.dataset_id(namespace, ref.get("name", ""))


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest}s"
