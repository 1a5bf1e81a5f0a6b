"""This node's dataset caches, driven by events: which datasets the node caches, their cache
directories, reports of how much is cached, and the warm-ups cairn-cache-syncer asks for.

The syncer decides and this module acts, reporting facts back as events (it never calls
the Kubernetes API):

- `Datasets` folds the dataset aggregate's events (DatasetBound, RuntimeScaled,
  DatasetUnbound, DatasetDeleted). `DatasetCaches.follow` replays them from the start of
  the stream when the plugin starts and then polls for new ones, so a restarted plugin
  rebuilds the same picture. The node caches a dataset while the dataset's last
  RuntimeScaled names it: each tier then has a directory `<tier path>/<ns>-<name>` (made
  here). Otherwise, or once the dataset is unbound, those directories are removed, but
  only after the dataset is no longer staged on this node or being warmed.
- Reports: a NodeCacheReported on the node's aggregate for each dataset cached or staged
  here. One is sent at start, one when a dataset's cached bytes moved by more than
  max(1 MiB, 1 %), and one for every dataset at least every `interval` seconds (the
  heartbeat by which the syncer expires a silent node). A dataset that leaves gets one
  last report of 0/0. Cached bytes are the sizes of the block files in the dataset's cache
  directories, walked in a thread.
- Warm-ups: a durable consumer of the dataload aggregate. On a DataLoadStarted that
  assigns paths to this node, the files under each path are loaded into the dataset's
  cache the way `cairn warmup` does it: inodes are collected on a mount of the dataset
  and sent to that mount's control socket. The mount used is the dataset's staged one
  when it has one, otherwise a temporary read-only mount with the dataset's cache. A path
  is one of the dataset's tree: with several mounts (tree.py) "/" is all of them and
  "/<name>/sub" is below mount <name>, so the mount used is one of the mounts' common
  directory (a staged tree's hidden mount) and each path is mapped through the mounts.
  DataLoadProgressed events go on the dataload's aggregate: cumulative, about once a
  second at most, and a last one with done=True (and error= when the load failed). A run
  this node has already finished, or one that is over, is skipped. Numbers reported never
  fall below earlier ones, so a redelivery after a crash neither repeats work nor counts
  it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import re
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cairn.datasets import cache_dir_name
from cairn.errors import (
    CairnError,
    ConflictError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermanentError,
    TemporaryError,
    UnavailableError,
)
from cairn.events import Consumer
from cairn.events.codec import CodecError
from cairn.events.envelope import Envelope, aggregate_subjects
from cairn.events.types import (
    DataLoadProgressed,
    DataLoadStarted,
    DatasetBound,
    DatasetDeleted,
    DatasetUnbound,
    Event,
    NodeCacheReported,
    RuntimeScaled,
    UnknownEvent,
)
from cairn.storage.cache import TEMP_PREFIX
from cairn_nodeplugin import mounts
from cairn_nodeplugin.history import remove_real_dir
from cairn_nodeplugin.node import check_dataset, check_shared_path
from cairn_nodeplugin.state import Branch, Volume
from cairn_nodeplugin.tree import bind_source, common_dir, dataset_places, parse_branches

log = logging.getLogger(__name__)

MiB = 1 << 20
POLL = 1.0  # seconds between looks for new dataset events
LOOK_MAX = 5.0  # seconds between measurements of the caches, at most
RETRY = 5.0  # seconds before a failed read of the stream is tried again
PROGRESS_EVERY = 1.0  # seconds between two DataLoadProgressed of one share, at least
WALK_TIMEOUT = 120.0
COLLECT_TIMEOUT = 600.0
REMOVE_TIMEOUT = 300.0
BATCH = 1000  # files per warm-up request: the files count of the progress moves by batch
THREADS = 16  # blocks a warm-up fetches at once (as `cairn warmup`)
RETRIES = (2.0, 10.0)  # delays before a share that failed for a passing reason is tried again
APPEND_ATTEMPTS = 10
CACHE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# -- what the events say ---------------------------------------------------------------------


@dataclass(frozen=True)
class Tier:
    """One cache tier of a runtime: a directory on each cache node, and its quota."""

    medium: str
    path: str
    quota: int


def plain_dir(path: str) -> bool:
    """Whether `path` is absolute, normalised and not the root (no '..', no '//')."""
    return path.startswith("/") and path != "/" and posixpath.normpath(path) == path


def parse_tiers(raw: Any) -> list[Tier]:
    """The tiers of a RuntimeScaled ([{mediumType, path, quota, ...}]); an entry without a
    plain absolute path is left out (with a warning): nothing is made or removed for it."""
    tiers = []
    for item in raw if isinstance(raw, list | tuple) else ():
        if not isinstance(item, dict):
            continue
        path = str(item.get("path") or "")
        if not plain_dir(path):
            log.warning("ignoring cache tier %r: its path is not a plain absolute path", item)
            continue
        quota = item.get("quota")
        if isinstance(quota, str) and quota.isdigit():
            quota = int(quota)
        if not isinstance(quota, int) or isinstance(quota, bool) or quota < 0:
            quota = 0
        tiers.append(Tier(str(item.get("mediumType") or ""), path, quota))
    return tiers


def node_names(raw: Any) -> set[str]:
    """The node names of a RuntimeScaled's `nodes` (names, or objects with a name)."""
    names = set()
    for item in raw if isinstance(raw, list | tuple) else ():
        if isinstance(item, str):
            names.add(item)
        elif isinstance(item, dict):
            names.add(str(item.get("name") or item.get("node") or ""))
    names.discard("")
    return names


def source_of(mounts_: Any) -> str:
    """The directory of the file system a dataset serves: its first mount's `path`."""
    if isinstance(mounts_, list | tuple) and mounts_ and isinstance(mounts_[0], dict):
        return str(mounts_[0].get("path") or "")
    return ""


def mounts_of(raw: Any) -> list[Any]:
    """A DatasetBound's or RuntimeScaled's mounts, as a list ([] when they are none)."""
    return list(raw) if isinstance(raw, list | tuple) else []


@dataclass(frozen=True)
class Layout:
    """How a dataset's tree lies on a mount of file system directory `base`: the dataset is
    `base` itself (one mount, no branches), or its branches lie below `base`."""

    base: str
    branches: tuple[Branch, ...] = ()

    @classmethod
    def of(cls, source: str, mounts_: Any) -> Layout:
        """The layout of a dataset whose events say `mounts_` (first one: `source`).
        InvalidArgument when its mounts cannot be a tree."""
        branches = tuple(parse_branches(mounts_ if isinstance(mounts_, list | tuple) else []))
        if branches:
            return cls(common_dir(branches), branches)
        return cls(source)

    def places(self, root: str, path: str) -> list[tuple[str, str]]:
        """Where dataset path `path` is on a mount of `base` at `root`: [(the directory the
        walk must stay in, the path to walk)]."""
        if not self.branches:
            return [(root, local_path(root, path))]
        out = []
        for branch, inner in dataset_places(self.branches, path):
            top = bind_source(root, self.base, branch)
            out.append((top, local_path(top, "/" + inner)))
        return out


@dataclass
class DatasetView:
    """One dataset as this node sees it from the events."""

    dataset: str  # "<ns>/<name>"
    cached: bool = False  # this node is one of its cache nodes
    tiers: list[Tier] = field(default_factory=list)
    source: str = ""  # the directory of the file system the dataset is (its first mount)
    mounts: list[Any] = field(default_factory=list)  # all of them, as the events say
    tier_paths: set[str] = field(default_factory=set)  # every tier path its runtime named

    @property
    def name(self) -> str:
        return cache_dir_name(self.dataset)

    @property
    def capacity(self) -> int:
        return sum(t.quota for t in self.tiers)

    def dirs(self) -> list[str]:
        """The cache directories the dataset has here (none when not cached here)."""
        if not self.cached:
            return []
        return list(dict.fromkeys(posixpath.join(t.path, self.name) for t in self.tiers))

    def known_dirs(self) -> set[str]:
        """Every directory of the dataset under a tier it ever had: what may need removing."""
        return {posixpath.join(p, self.name) for p in self.tier_paths}


class Datasets:
    """The fold of the dataset aggregate's events, for one node."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        self.views: dict[str, DatasetView] = {}

    def apply(self, envelope: Envelope) -> DatasetView | None:
        """Folds one event in; the dataset's view when the event changed it."""
        if envelope.aggregate != "dataset":
            return None
        try:
            check_dataset(envelope.aggregate_id)
            event = envelope.event()
        except (CodecError, InvalidArgument) as error:
            log.warning("skipping %s of dataset %r: %s", envelope.type,
                        envelope.aggregate_id, error)  # fmt: skip
            return None
        view = self.views.get(envelope.aggregate_id) or DatasetView(envelope.aggregate_id)
        if isinstance(event, DatasetBound):
            view.source = source_of(event.mounts) or view.source
            view.mounts = mounts_of(event.mounts) or view.mounts
        elif isinstance(event, RuntimeScaled):
            view.tiers = parse_tiers(event.tiers)
            view.tier_paths.update(t.path for t in view.tiers)
            view.cached = self.node_id in node_names(event.nodes)
            view.source = source_of(event.mounts) or view.source
            view.mounts = mounts_of(event.mounts) or view.mounts
        elif isinstance(event, DatasetUnbound | DatasetDeleted):
            view.cached = False
        else:
            return None
        self.views[view.dataset] = view
        return view

    def by_name(self, name: str) -> DatasetView | None:
        """The dataset whose volume handle (and cache directory name) is `name`."""
        return next((v for v in self.views.values() if v.name == name), None)


# -- the disk -----------------------------------------------------------------------------------


def cached_bytes(dirs: Iterable[str]) -> int:
    """Bytes of the block files under `dirs`. Blocks half-written when a mount died, and
    anything on another file system, are not counted; a missing directory holds 0."""
    total = 0
    for top in dict.fromkeys(dirs):
        try:
            device = os.lstat(top).st_dev
        except OSError:
            continue
        stack = [top]
        while stack:
            try:
                with os.scandir(stack.pop()) as entries:
                    for entry in entries:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:  # evicted while we looked
                            continue
                        if stat.S_ISDIR(st.st_mode) and st.st_dev == device:
                            stack.append(entry.path)
                        elif stat.S_ISREG(st.st_mode) and not entry.name.startswith(TEMP_PREFIX):
                            total += st.st_size
            except OSError:
                continue  # removed meanwhile, or unreadable: nothing of it counts
    return total


def make_dirs(dirs: Iterable[str]) -> None:
    for path in dirs:
        os.makedirs(path, mode=0o700, exist_ok=True)


def remove_cache_dir(path: str) -> bool:
    """Removes a dataset's cache directory `<tier>/<ns>-<name>` and all in it; whether
    there was one. Only a real directory with such a name is removed (never a symlink, never
    what a symlink inside points to), and never a mountpoint."""
    parent, name = posixpath.split(path)
    if not plain_dir(parent) or not CACHE_NAME.fullmatch(name):
        raise PermanentError(f"{path!r} is not a dataset's cache directory: left alone")
    return remove_real_dir(path)


def changed(old: tuple[int, int] | None, new: tuple[int, int]) -> bool:
    """Whether a cache's (cached, capacity) bytes moved enough to be reported before the
    next heartbeat: a new capacity, or cached bytes off by more than max(1 MiB, 1 %)."""
    if old is None or old[1] != new[1]:
        return True
    return abs(new[0] - old[0]) > max(MiB, old[0] // 100)


# -- warm-up commands ------------------------------------------------------------------------------


def assigned_paths(assignments: Any, node: str) -> list[str]:
    """The dataset paths a DataLoadStarted gives `node` (a list, or one path)."""
    share = assignments.get(node) if isinstance(assignments, dict) else None
    if isinstance(share, str):
        share = [share]
    if not isinstance(share, list | tuple):
        return []
    return list(dict.fromkeys(str(p) for p in share if p))


def local_path(root: str, path: str) -> str:
    """Where dataset path `path` (absolute inside the dataset's tree, "/" for all of it) is
    on a mount of that tree at `root`."""
    if not path.startswith("/") or ".." in path.split("/"):
        raise InvalidArgument(f"{path!r} is not a path inside the dataset")
    clean = posixpath.normpath(path).lstrip("/")
    return posixpath.join(root, clean) if clean else root


def collect_below(root: str, local: str) -> tuple[dict[str, list[int]], list[str]]:
    """`cairn warmup`'s walk of `local` (cairn.cli.warmup.collect): control socket -> inodes
    of the regular files, and the problems met. `local` must stay inside the tree at `root`
    once symlinks are followed (a symlink in a dataset must not lead the walk out of it)."""
    from cairn.cli.warmup import collect

    try:
        os.stat(root)
    except OSError as error:
        raise UnavailableError(f"the mount at {root}: {error.strerror}") from None
    top, real = os.path.realpath(root), os.path.realpath(local)
    if real != top and not real.startswith(top.rstrip("/") + "/"):
        raise InvalidArgument("leads out of the dataset")
    try:
        os.lstat(real)
    except FileNotFoundError:
        raise NotFound("no such file or directory") from None
    return collect([real])


@dataclass
class Prior:
    """What the dataload's history says about one node's share of one run."""

    done: bool = False  # this node reported the share done
    over: bool = False  # the run finished, or a newer run started
    files: int = 0  # the highest numbers it reported
    bytes: int = 0


def prior_of(envelopes: Iterable[Envelope], node: str, run: int) -> Prior:
    prior = Prior()
    for envelope in envelopes:
        p = envelope.payload or {}
        if envelope.type == "DataLoadProgressed" and p.get("node") == node and p.get("run") == run:
            prior.files = max(prior.files, int(p.get("files") or 0))
            prior.bytes = max(prior.bytes, int(p.get("bytes") or 0))
            prior.done = prior.done or bool(p.get("done"))
        elif envelope.type == "DataLoadFinished" and int(p.get("run") or 0) >= run:
            prior.over = True
        elif envelope.type == "DataLoadStarted" and int(p.get("run") or 0) > run:
            prior.over = True
    return prior


async def append(events: Any, aggregate: str, aggregate_id: str, facts: list[Event]) -> None:
    """Appends facts after whatever the aggregate holds, again when another writer got
    there first (the dataload's aggregate takes every cache node's progress and the
    syncer's)."""
    for attempt in range(APPEND_ATTEMPTS):
        try:
            await events.append(aggregate, aggregate_id, facts)
            return
        except ConflictError:
            await asyncio.sleep(0.01 * (attempt + 1))
    raise TemporaryError(f"{aggregate} {aggregate_id} keeps changing: could not append")


class Share:
    """One node's share of a dataload run: its progress, cumulative, appended as
    DataLoadProgressed at most every PROGRESS_EVERY seconds, never below what the stream
    already holds for it."""

    def __init__(self, events: Any, load_id: str, node: str, run: int, prior: Prior):
        self.events, self.load_id, self.node, self.run = events, load_id, node, run
        self.floor = (prior.files, prior.bytes)
        self.files = self.bytes = 0  # done by this attempt
        self._sent = self.floor
        self._at = 0.0

    def restart(self) -> None:
        """A new attempt counts from 0 again; what was counted stays the floor."""
        self.floor = self.numbers()
        self.files = self.bytes = 0

    def numbers(self) -> tuple[int, int]:
        return max(self.files, self.floor[0]), max(self.bytes, self.floor[1])

    async def tick(self) -> None:
        """Appends the progress when it moved and the last one is old enough; a failure
        only delays it (the warm-up goes on)."""
        numbers = self.numbers()
        if numbers == self._sent or time.monotonic() - self._at < PROGRESS_EVERY:
            return
        try:
            await self._send(numbers, False, "")
        except CairnError as error:
            log.warning("dataload %s: could not report progress: %s", self.load_id, error)

    async def finish(self, error: str = "") -> None:
        await self._send(self.numbers(), True, error)

    async def _send(self, numbers: tuple[int, int], done: bool, error: str) -> None:
        await append(self.events, "dataload", self.load_id, [DataLoadProgressed(
            node=self.node, run=self.run, files=numbers[0], bytes=numbers[1], done=done,
            error=error)])  # fmt: skip
        self._sent, self._at = numbers, time.monotonic()


def durable_name(node_id: str) -> str:
    return "cairn-nodeplugin-dataload-" + re.sub(r"[^A-Za-z0-9_-]", "_", node_id)


# -- the node's caches ---------------------------------------------------------------------------


class DatasetCaches:
    """See the module docstring. `run` follows the dataset events, keeps the directories
    and reports, and serves the warm-ups; `poke` asks for a look now (a dataset's volume
    was staged or unstaged)."""

    def __init__(self, store: Any, events: Any, keeper: mounts.Keeper, node_id: str,
                 data_dir: Path, interval: float = 30.0):  # fmt: skip
        self.store, self.events, self.keeper, self.node_id = store, events, keeper, node_id
        self.table = keeper.table
        self.interval = interval
        self.look = min(LOOK_MAX, interval)
        self.datasets = Datasets(node_id)
        self.warmup_dir = data_dir / "warmup"
        self.ready = asyncio.Event()  # the replay reached the end of the stream once
        self._wake = asyncio.Event()
        self._busy: dict[str, int] = {}  # dataset -> warm-ups running on it
        self._deferred: set[str] = set()  # datasets with directories to remove later
        self._staged_dirs: dict[str, set[str]] = {}  # dataset -> its staged mounts' caches
        self._staged_before: set[str] = set()
        self._reported: dict[str, tuple[int, int]] = {}
        self._last_full = 0.0
        self.loads = Consumer(store, durable_name(node_id), self.handle_load,
                              filter_subject=aggregate_subjects("dataload"))  # fmt: skip

    def poke(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        await self._clear_leftover_mounts()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_forever("following the dataset events", self.follow))
            tasks.create_task(_forever("keeping the dataset caches", self.keep))
            tasks.create_task(_forever("serving warm-ups", self.loads.run))

    # -- following the datasets ----------------------------------------------------------

    async def follow(self) -> None:
        """Replays the dataset events from the stream's start, then polls for new ones
        (a read from the last position each POLL seconds: costs one request when idle and
        survives NATS restarts)."""
        position = 1
        subject = aggregate_subjects("dataset")
        while True:
            try:
                async with aclosing(self.store.read_all(position, filter_subject=subject)) as it:
                    async for record in it:
                        position = record.sequence + 1
                        view = self.datasets.apply(record.envelope)
                        if view is not None and self.ready.is_set():
                            await self.reconcile(view)
                            self.poke()
            except CairnError as error:
                log.warning("reading the dataset events: %s; again in %gs", error, RETRY)
                await asyncio.sleep(RETRY)
                continue
            if not self.ready.is_set():
                for view in list(self.datasets.views.values()):
                    await self.reconcile(view)
                cached = sorted(v.dataset for v in self.datasets.views.values() if v.cached)
                log.info("dataset caches: %d datasets known, cached here: %s",
                         len(self.datasets.views), ", ".join(cached) or "none")  # fmt: skip
                self.ready.set()
                self.poke()
            await asyncio.sleep(POLL)

    def staged(self, dataset: str) -> Volume | None:
        """The dataset's volume staged on this node, if any (after a restart rebuilt from
        the events alone, a volume knows its handle but not its dataset)."""
        name = cache_dir_name(dataset)
        for volume in self.table:
            if volume.dataset == dataset or (not volume.dataset and volume.volume_id == name):
                return volume
        return None

    def dataset_of(self, volume: Volume) -> str:
        """The dataset a staged volume serves ("" for any other volume)."""
        if volume.dataset:
            return volume.dataset
        view = self.datasets.by_name(volume.volume_id)
        return view.dataset if view is not None else ""

    async def reconcile(self, view: DatasetView) -> None:
        """Makes the dataset's cache directories when it is cached here; removes the ones
        it should not have, unless it is staged or being warmed here (then later)."""
        dataset = view.dataset
        wanted = set(view.dirs())
        volume = self.staged(dataset)
        if volume is not None and volume.cache_dir:
            self._staged_dirs.setdefault(dataset, set()).add(volume.cache_dir)
        unwanted = (view.known_dirs() | self._staged_dirs.get(dataset, set())) - wanted
        try:
            if wanted:
                await mounts.in_thread(lambda: make_dirs(sorted(wanted)))
            if not unwanted:
                self._deferred.discard(dataset)
                return
            if volume is not None or self._busy.get(dataset):
                self._deferred.add(dataset)
                return
            removed = await mounts.in_thread(
                lambda: [d for d in sorted(unwanted) if remove_cache_dir(d)], REMOVE_TIMEOUT)  # fmt: skip
        except (OSError, CairnError) as error:
            log.warning("dataset %s: cache directories: %s (tried again later)", dataset,
                        getattr(error, "strerror", None) or error)  # fmt: skip
            self._deferred.add(dataset)
            return
        self._deferred.discard(dataset)
        self._staged_dirs.pop(dataset, None)
        for path in removed:
            log.info("dataset %s: not cached on this node any more: removed %s", dataset, path)

    # -- keeping and reporting ----------------------------------------------------------------

    async def keep(self) -> None:
        """Each look (and when poked): finishes deferred removals, then reports."""
        await self.ready.wait()
        while True:
            self._wake.clear()
            try:
                staged = {self.dataset_of(v) for v in self.table} - {""}
                for dataset in sorted(self._deferred | staged | self._staged_before):
                    view = self.datasets.views.get(dataset)
                    if view is not None:
                        await self.reconcile(view)
                self._staged_before = staged
                await self.report()
            except Exception:  # the reports must go on
                log.exception("keeping the dataset caches failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.look)

    def targets(self) -> dict[str, tuple[list[str], int]]:
        """dataset -> (its cache directories here, capacity bytes) for every dataset this
        node caches or has staged."""
        found = {v.dataset: (v.dirs(), v.capacity) for v in self.datasets.views.values()
                 if v.cached}  # fmt: skip
        for volume in self.table:
            dataset = self.dataset_of(volume)
            if not dataset:
                continue
            dirs, capacity = found.get(dataset, ([], volume.cache_size or 0))
            own = volume.cache_dir or str(self.keeper.processes.cache_path(volume.volume_id))
            found[dataset] = (list(dict.fromkeys([*dirs, own])), capacity)
        return found

    async def report(self) -> None:
        """NodeCacheReported for the datasets whose numbers moved, for all of them when
        the heartbeat is due, and 0/0 for those that left."""
        targets = self.targets()
        sizes = await mounts.in_thread(
            lambda: {d: cached_bytes(dirs) for d, (dirs, _) in targets.items()}, WALK_TIMEOUT)  # fmt: skip
        now = time.monotonic()
        full = now - self._last_full >= self.interval
        numbers = {d: (sizes[d], capacity) for d, (_, capacity) in targets.items()}
        facts = [NodeCacheReported(node=self.node_id, dataset=d, cached_bytes=n[0],
                                   capacity_bytes=n[1])
                 for d, n in sorted(numbers.items()) if full or changed(self._reported.get(d), n)]  # fmt: skip
        facts += [NodeCacheReported(node=self.node_id, dataset=d, cached_bytes=0,
                                    capacity_bytes=0)
                  for d in sorted(set(self._reported) - set(numbers))]  # fmt: skip
        if facts:
            await append(self.events, "node", self.node_id, list(facts))
        for fact in facts:
            if fact.dataset in numbers:
                self._reported[fact.dataset] = numbers[fact.dataset]
            else:
                self._reported.pop(fact.dataset, None)
        if full:
            self._last_full = now

    # -- warm-ups -------------------------------------------------------------------------------

    async def handle_load(self, event: Event | UnknownEvent, envelope: Envelope) -> None:
        """A DataLoadStarted with a share for this node: the share loaded and reported,
        unless done or over already (a redelivery)."""
        if not isinstance(event, DataLoadStarted):
            return
        paths = assigned_paths(event.assignments, self.node_id)
        if not paths:
            return
        load_id = envelope.aggregate_id
        prior = prior_of(await self.store.load("dataload", load_id), self.node_id, event.run)
        if prior.done or prior.over:
            log.info("dataload %s run %d: %s; skipped", load_id, event.run,
                     "this node's share is done" if prior.done else "the run is over")  # fmt: skip
            return
        log.info("dataload %s run %d: loading %s of dataset %s", load_id, event.run,
                 ", ".join(paths), event.dataset)  # fmt: skip
        share = Share(self.events, load_id, self.node_id, event.run, prior)
        error = ""
        for delay in (*RETRIES, None):
            share.restart()
            try:
                error = await self.load(event.dataset, paths, share)
                break
            except PermanentError as failure:
                error = str(failure)
                break
            except TemporaryError as failure:
                if delay is None:
                    error = str(failure)
                    break
                log.warning("dataload %s run %d: %s; again in %gs", load_id, event.run,
                            failure, delay)  # fmt: skip
                await asyncio.sleep(delay)
        files, nbytes = share.numbers()
        if error:
            log.warning("dataload %s run %d failed here: %s", load_id, event.run, error)
        else:
            log.info("dataload %s run %d: %d files, %d bytes in the cache", load_id,
                     event.run, files, nbytes)  # fmt: skip
        await share.finish(error)

    async def view_of(self, dataset: str) -> DatasetView:
        """The dataset as its events say now (read, not the follower's picture, which may
        not have reached the RuntimeScaled the DataLoadStarted came after)."""
        check_dataset(dataset)
        fold = Datasets(self.node_id)
        for envelope in await self.store.load("dataset", dataset):
            fold.apply(envelope)
        return fold.views.get(dataset) or DatasetView(dataset)

    async def load(self, dataset: str, paths: list[str], share: Share) -> str:
        """Loads the paths of the dataset into this node's cache; the error ("" if none)
        that ends the share. TemporaryError when it is worth another attempt."""
        view = await self.view_of(dataset)
        if not view.cached:
            return f"node {self.node_id} is not a cache node of dataset {dataset}"
        for path in paths:
            local_path("/", path)  # a bad path fails the share before anything is mounted
        self._busy[dataset] = self._busy.get(dataset, 0) + 1
        try:
            await mounts.in_thread(lambda: make_dirs(view.dirs()))
            async with self.tree(view) as (root, layout):
                return await self.warm(root, layout, dataset, paths, share)
        finally:
            self._busy[dataset] -= 1
            if not self._busy[dataset]:
                del self._busy[dataset]
            self.poke()  # report the new numbers; finish a removal put off meanwhile

    @contextlib.asynccontextmanager
    async def tree(self, view: DatasetView) -> AsyncIterator[tuple[str, Layout]]:
        """A mount of the dataset's tree and how the tree lies on it: its staged mount when
        healthy (a staged tree's hidden one), else a temporary read-only mount with the
        dataset's cache (first tier), unmounted afterwards."""
        volume = self.staged(view.dataset)
        if volume is not None and volume.kind == "shared":
            if not await self.keeper.problem(volume):
                yield volume.mountpoint, Layout(volume.source, tuple(volume.tree))
                return
        if not self.keeper.meta_url:
            raise FailedPrecondition("no file system for datasets: cairn-nodeplugin runs "
                                     "without --meta-url")  # fmt: skip
        if not view.source:
            raise FailedPrecondition(f"dataset {view.dataset} names no directory of the file "
                                     "system (RuntimeScaled has no mounts)")  # fmt: skip
        layout = Layout.of(view.source, view.mounts)
        # A tree's common directory may be the file system's root, which a plain volume's
        # directory never is.
        source = layout.base if layout.branches else check_shared_path(view.source)
        if view.tiers:
            tier = view.tiers[0]
            cache_dir, size = posixpath.join(tier.path, view.name), tier.quota or None
        else:  # where a staged volume of the dataset without a tier caches
            cache_dir, size = str(self.keeper.processes.cache_path(view.name)), None
        # A NodeStage meanwhile mounts the dataset with the same cache directory: both
        # mounts may write a block there (the same bytes, renamed into place), and the staged
        # one finds at its start what this one has fetched so far.
        point = str(self.warmup_dir / view.name)
        await self._clear(point)
        await mounts.make_dir(point)
        pid = await self.keeper.processes.start(
            f"warmup-{view.name}", self.keeper.meta_url, source, point, read_only=True,
            cache_dir=cache_dir, cache_size=size)  # fmt: skip
        try:
            yield point, layout
        finally:
            await self._clear(point, pid)

    async def warm(self, root: str, layout: Layout, dataset: str, paths: list[str],
                   share: Share) -> str:  # fmt: skip
        """Loads the files under `paths` of the tree, on the mount at `root` laid out as
        `layout` says, in batches over the mount's control socket; the problems met ("" when
        none)."""
        groups: dict[str, dict[int, None]] = {}
        problems = []
        for path in paths:
            try:
                found, skipped = await self._collect(root, layout, path)
            except PermanentError as error:
                problems.append(f"{path}: {error}")
                continue
            for problem in skipped:
                log.warning("dataset %s: warm-up skips %s", dataset, problem)
            for sock, inodes in found.items():
                groups.setdefault(sock, {}).update(dict.fromkeys(inodes))
        failed = 0
        for sock, inodes in groups.items():
            listed = list(inodes)
            for start in range(0, len(listed), BATCH):
                result = await self._warm_batch(sock, listed[start : start + BATCH], share)
                failed += int(result.get("failed_blocks") or 0)
        if failed:
            problems.append(f"{failed} block(s) could not be fetched")
        return "; ".join(problems)

    @staticmethod
    async def _collect(root: str, layout: Layout, path: str,
                       ) -> tuple[dict[str, list[int]], list[str]]:  # fmt: skip
        """The inodes under dataset path `path` (of every mount it covers), by socket."""
        found: dict[str, list[int]] = {}
        skipped: list[str] = []
        for top, local in layout.places(root, path):
            more, problems = await mounts.in_thread(lambda top=top, local=local: collect_below(
                top, local), COLLECT_TIMEOUT)  # fmt: skip
            for sock, inodes in more.items():
                found.setdefault(sock, []).extend(inodes)
            skipped += problems
        return found, skipped

    async def _warm_batch(self, sock: str, inodes: list[int], share: Share) -> dict[str, Any]:
        """One warm-up request over the mount's control socket (as `cairn warmup` sends it),
        its progress passed on to the share."""
        from cairn.fuse.control import ControlClient

        base = share.bytes

        def progress(state: dict[str, Any]) -> None:
            share.bytes = base + int(state.get("bytes") or 0)

        async with ControlClient.connect(sock) as client:
            call = asyncio.ensure_future(client.call(
                "warmup", progress=progress, inodes=inodes, action="warm", threads=THREADS))  # fmt: skip
            try:
                while not call.done():
                    await asyncio.wait({call}, timeout=PROGRESS_EVERY)
                    await share.tick()
            finally:
                if not call.done():
                    call.cancel()
                    with contextlib.suppress(asyncio.CancelledError, CairnError):
                        await call
            result = call.result()
        share.files += int(result.get("files") or 0)
        share.bytes = base + int(result.get("bytes") or 0)
        await share.tick()
        return result

    async def _clear(self, point: str, pid: int = 0) -> None:
        """Unmounts a temporary warm-up mount and stops its process; removes the directory."""
        pid = pid or self.keeper.processes.pid_of(point) or 0
        await self.keeper.processes.stop(point, pid)
        await mounts.unmount_all(point)
        await mounts.remove_dir(point)

    async def _clear_leftover_mounts(self) -> None:
        """Warm-up mounts a crashed plugin left behind (their runs are redelivered)."""
        try:
            names = await mounts.in_thread(lambda: sorted(os.listdir(self.warmup_dir)))
        except OSError:
            return
        for name in names:
            try:
                await self._clear(str(self.warmup_dir / name))
            except CairnError as error:
                log.warning("leftover warm-up mount %s: %s", name, error)


async def _forever(what: str, work: Callable[[], Awaitable[None]]) -> None:
    """Runs `work` again whenever it ended by an error, so one bug does not stop the
    rest of the node's dataset work."""
    while True:
        try:
            await work()
            return
        except Exception:
            log.exception("%s failed; again in %gs", what, RETRY)
        await asyncio.sleep(RETRY)
