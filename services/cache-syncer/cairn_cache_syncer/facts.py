"""What the syncer knows from the event stream: a projection rebuilt by replay.

The node plugins report facts (VolumeStaged/Unstaged, NodeCacheReported,
NodeCapacityReported, DataLoadProgressed) and the syncer records its own decisions
(DatasetBound, RuntimeScaled, NodeLabelled, DatasetUnbound, DataLoadStarted/Finished).
`Facts.apply` folds one envelope into plain dicts; nothing else changes them, so a syncer
that restarts replays the stream from its start and ends with the same state (`snapshot`
compares them), labelling nothing twice and forgetting nothing.

Facts expire: what a node said counts only while it keeps reporting (`alive`), judged by
the events' own times, so a replay judges the same.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from typing import Any

from cairn.events.envelope import Envelope

log = logging.getLogger(__name__)
AGGREGATES = ("dataset", "dataload", "node", "volume")


@dataclass
class Report:
    cached: int = 0
    capacity: int = 0
    at: float = 0.0


@dataclass
class DatasetFacts:
    bound: dict | None = None  # the DatasetBound payload while bound
    bound_at: float = 0.0
    nodes: list = field(default_factory=list)  # cache nodes (RuntimeScaled)
    assigned_at: dict = field(default_factory=dict)  # cache node -> when it was assigned
    replicas: int = 0
    tiers: list = field(default_factory=list)
    clean_policy: str = "OnRuntimeDeleted"
    staged: dict = field(default_factory=dict)  # node -> when staged (staged now)
    fused: dict = field(default_factory=dict)  # node -> when staged (label kept per policy)
    reports: dict = field(default_factory=dict)  # node -> Report
    labels: dict = field(default_factory=dict)  # node -> {key: value} the syncer set


@dataclass
class LoadRun:
    dataset: str
    run: int
    started_at: float
    assignments: dict
    progress: dict = field(default_factory=dict)  # node -> {files, bytes, done, error, at}
    finished: dict | None = None  # DataLoadFinished payload + "at"


@dataclass
class Facts:
    datasets: dict = field(default_factory=dict)  # "<ns>/<name>" -> DatasetFacts
    handles: dict = field(default_factory=dict)  # CSI volume handle -> dataset id
    volumes: dict = field(default_factory=dict)  # volume id -> {name, path}
    capacity: dict = field(default_factory=dict)  # node -> {available, capacity, at}
    seen: dict = field(default_factory=dict)  # node -> last time it reported anything
    loads: dict = field(default_factory=dict)  # "<ns>/<name>" of a DataLoad -> LoadRun
    position: int = 0

    def dataset(self, key: str) -> DatasetFacts:
        return self.datasets.setdefault(key, DatasetFacts())

    def apply(self, envelope: Envelope, sequence: int = 0) -> set[tuple[str, str]]:
        """Folds one event in; the (kind, key) pairs it concerns ("dataset", "node",
        "dataload"), for the reconcilers to look at."""
        if sequence:
            self.position = max(self.position, sequence)
        handler = getattr(self, f"_{envelope.aggregate}", None)
        if handler is None:
            return set()
        return handler(envelope.type, envelope.aggregate_id, envelope.payload,
                       envelope.occurred_at)  # fmt: skip

    # -- per aggregate -------------------------------------------------------------------

    def _dataset(self, type_: str, key: str, p: dict, at: float) -> set[tuple[str, str]]:
        d = self.dataset(key)
        touched = {("dataset", key)} | {("node", n) for n in _nodes_of(d)}
        if type_ == "DatasetBound":
            d.bound = dict(p)
            d.bound_at = at
            self.handles[p["volume_handle"]] = key
        elif type_ == "RuntimeScaled":
            d.assigned_at = {n: d.assigned_at.get(n, at) for n in p.get("nodes", [])}
            d.nodes = list(p.get("nodes", []))
            d.replicas = p.get("replicas", 0)
            d.tiers = list(p.get("tiers", []))
            d.clean_policy = p.get("clean_policy", "OnRuntimeDeleted")
        elif type_ == "NodeLabelled":
            current = d.labels.setdefault(p["node"], {})
            current.update(p.get("set") or {})
            for k in p.get("removed") or []:
                current.pop(k, None)
            if not current:
                d.labels.pop(p["node"], None)
        elif type_ in ("DatasetUnbound", "DatasetDeleted"):
            d.bound, d.nodes, d.assigned_at, d.replicas = None, [], {}, 0
            d.fused = {}
            if type_ == "DatasetDeleted" and not d.labels:
                self.datasets.pop(key, None)
        return touched | {("node", n) for n in _nodes_of(d)}

    def _volume(self, type_: str, vid: str, p: dict, at: float) -> set[tuple[str, str]]:
        if type_ == "VolumeRequested":
            self.volumes.setdefault(vid, {})["name"] = p.get("name", "")
        elif type_ == "VolumeProvisioned":
            self.volumes.setdefault(vid, {})["path"] = p.get("path", "")
        elif type_ == "VolumeDeleted":
            self.volumes.pop(vid, None)
        key = self.handles.get(vid)
        if key is None or type_ not in ("VolumeStaged", "VolumeUnstaged", "MountRecovered"):
            return set()
        d, node = self.dataset(key), p.get("node", "")
        if type_ == "VolumeUnstaged":
            d.staged.pop(node, None)
            if d.clean_policy == "OnDemand":
                d.fused.pop(node, None)
        elif d.bound is not None:
            d.staged[node] = at
            d.fused[node] = at
        self.seen[node] = max(self.seen.get(node, 0.0), at)
        return {("dataset", key), ("node", node)}

    def _node(self, type_: str, node: str, p: dict, at: float) -> set[tuple[str, str]]:
        self.seen[node] = max(self.seen.get(node, 0.0), at)
        if type_ == "NodeCapacityReported":
            self.capacity[node] = {"available": p.get("available_bytes", 0),
                                   "capacity": p.get("capacity_bytes", 0), "at": at}  # fmt: skip
            return {("node", node)}
        if type_ != "NodeCacheReported":
            return set()
        key = p.get("dataset", "")
        d = self.datasets.get(key)
        if d is None:
            return {("node", node)}
        d.reports[node] = Report(p.get("cached_bytes", 0), p.get("capacity_bytes", 0), at)
        return {("dataset", key), ("node", node)}

    def _dataload(self, type_: str, key: str, p: dict, at: float) -> set[tuple[str, str]]:
        run = self.loads.get(key)
        if type_ == "DataLoadStarted":
            self.loads[key] = LoadRun(p["dataset"], p["run"], at, dict(p.get("assignments") or {}))
        elif run is None or p.get("run") != run.run:
            return set()  # news of a run that is not the current one
        elif type_ == "DataLoadProgressed":
            run.progress[p["node"]] = {"files": p.get("files", 0), "bytes": p.get("bytes", 0),
                                       "done": p.get("done", False), "error": p.get("error", ""),
                                       "at": at}  # fmt: skip
            self.seen[p["node"]] = max(self.seen.get(p["node"], 0.0), at)
        elif type_ == "DataLoadFinished":
            run.finished = {**p, "at": at}
        return {("dataload", key)}

    # -- questions -----------------------------------------------------------------------

    def node_alive(self, node: str, now: float, expiry: float, since: float = 0.0) -> bool:
        """Did `node` report anything within `expiry` seconds (or is it newer than that, by
        `since`: its assignment or staging time)?"""
        return max(self.seen.get(node, 0.0), since) >= now - expiry

    def ready_cache_nodes(self, key: str, now: float, expiry: float) -> list[str]:
        """Cache nodes of a dataset that reported its cache within `expiry`."""
        d = self.datasets.get(key)
        if d is None:
            return []
        return [n for n in d.nodes
                if n in d.reports and d.reports[n].at >= now - expiry]  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        """Everything, as plain data (to compare a live projection with a replayed one)."""
        return {
            "datasets": {k: asdict(v) for k, v in sorted(self.datasets.items())},
            "handles": dict(sorted(self.handles.items())),
            "volumes": dict(sorted(self.volumes.items())),
            "capacity": dict(sorted(self.capacity.items())),
            "seen": dict(sorted(self.seen.items())),
            "loads": {k: asdict(v) for k, v in sorted(self.loads.items())},
        }


def _nodes_of(d: DatasetFacts) -> set[str]:
    return set(d.nodes) | set(d.fused) | set(d.labels)


class FactsFollower:
    """Keeps a Facts up to date from the stream and tells `on_change` what moved."""

    def __init__(self, store: Any, facts: Facts | None = None, on_change=None):
        self.store, self.facts, self.on_change = store, facts or Facts(), on_change
        self._moved = asyncio.Condition()

    def subjects(self) -> list[str]:
        return [self.store.aggregate_subjects(a) for a in AGGREGATES]

    async def catch_up(self) -> int:
        """Applies everything stored now; the position."""
        end = await self.store.last_sequence()
        if end > self.facts.position:
            await self._read(follow=False, until=end)
        return self.facts.position

    async def run(self) -> None:
        while True:
            try:
                await self._read(follow=True)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the bus went away: resume from the position
                log.warning("event stream: %s; resuming at #%d", error, self.facts.position)
                await asyncio.sleep(1.0)

    async def _read(self, *, follow: bool, until: int = 0) -> None:
        batches = self.store.read_batches(self.facts.position + 1, follow=follow,
                                          filter_subject=self.store.all_subjects)  # fmt: skip
        async with aclosing(batches) as it:
            async for batch in it:
                touched: set[tuple[str, str]] = set()
                for rec in batch:
                    if rec.envelope is not None:
                        touched |= self.facts.apply(rec.envelope, rec.sequence)
                    self.facts.position = max(self.facts.position, rec.sequence)
                async with self._moved:
                    self._moved.notify_all()
                if self.on_change is not None and touched:
                    self.on_change(touched)
                if until and self.facts.position >= until:
                    return

    async def wait_for(self, sequence: int, timeout: float = 10.0) -> None:
        """Until the facts include the event at `sequence` (one this syncer appended)."""
        async with self._moved:
            await asyncio.wait_for(
                self._moved.wait_for(lambda: self.facts.position >= sequence), timeout
            )
