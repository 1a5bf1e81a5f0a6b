"""What this node has staged and published, kept across restarts of the node plugin.

The table of staged volumes lives in memory and in one small JSON file in the plugin's data
directory (`volumes.json`, root-only), rewritten whole and atomically after every change. The
record of truth is the event history (VolumeStaged/Published/Unpublished/Unstaged carry the
node): a plugin that restarts rebuilds the table from it and the mount table
(mounts.Keeper.restore), using volumes.json only as a cache of details, and keeps serving the
volumes: the mount processes are detached and outlive the plugin.

A change is recorded before the work it describes (a target is added, then bound), so a
crash in between leaves a record the next call or the watcher completes; the kernel's own
table (/proc/self/mountinfo) tells what is really mounted.

No secret is written here. A shared volume whose file system was named by the NodeStage
secrets (`meta: "secret"`) keeps its URL in memory only; after a restart it is read back from
the live mount process's environment (CAIRN_META_URL, where `cairn mount` was given it, never
its command line), and is unknown
again only if that process died while the plugin was down, in which case the volume is
reported abnormal until kubelet stages it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass
class Target:
    """One published target path (a bind mount of the staging path)."""

    path: str
    read_only: bool = False
    capability: str = ""  # fingerprint of the NodePublish's volume capability


@dataclass(frozen=True)
class Branch:
    """One mount of a dataset served as a tree: directory `name` of the staging path, a bind
    of directory `path` of the file system (read-only when the mount or the dataset is)."""

    name: str
    path: str
    read_only: bool = True


@dataclass
class Volume:
    """A volume staged on this node."""

    volume_id: str
    kind: str  # "shared" (a FUSE mount process) | "local" (a bind of a local directory)
    staging_path: str
    source: str  # shared: the directory in the file system; local: the directory on disk
    access_mode: int = 0
    capability: str = ""  # fingerprint of the NodeStage's volume capability
    read_only: bool = False
    meta: str = "default"  # shared: "default" (--meta-url) | "secret" (NodeStage secrets)
    fs_uuid: str = ""
    pid: int = 0  # shared: the mount process
    log: str = ""  # shared: the mount process's log file
    staged_at: float = 0.0
    targets: dict[str, Target] = field(default_factory=dict)
    # A dataset's volume (`type: dataset`): which one ("<ns>/<name>"), and the block cache
    # its mount uses ("" and None: the plugin's own per-volume cache, as other volumes).
    dataset: str = ""
    cache_dir: str = ""
    cache_size: int | None = None
    # A dataset of several mounts (tree.py): its mount process serves `source` (the mounts'
    # lowest common directory) at `fs_path`, a hidden place of the plugin, and the staging
    # path is a small tree of binds, one per branch. "" and []: any other volume.
    fs_path: str = ""
    tree: list[Branch] = field(default_factory=list)
    # In memory only: never written to the state file.
    meta_url: str = field(default="", repr=False, compare=False)
    problem: str = field(default="", compare=False)  # why it is not healthy, "" when it is
    failures: int = field(default=0, compare=False)  # recoveries failed in a row
    retry_at: float = field(default=0.0, compare=False)  # monotonic time of the next attempt

    @property
    def mountpoint(self) -> str:
        """Where a shared volume's mount process mounts: the staging path, or for a tree
        the hidden directory its branches are bound from."""
        return self.fs_path or self.staging_path

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in _MEMORY_ONLY}  # fmt: skip
        data["targets"] = {p: dataclasses.asdict(t) for p, t in self.targets.items()}
        data["tree"] = [dataclasses.asdict(b) for b in self.tree]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Volume:
        names = {f.name for f in dataclasses.fields(cls)} - _MEMORY_ONLY
        known = {k: v for k, v in data.items() if k in names}
        targets = {p: Target(**{k: v for k, v in t.items() if k in _TARGET_FIELDS})
                   for p, t in (data.get("targets") or {}).items()}  # fmt: skip
        known["targets"] = targets
        known["tree"] = [Branch(**{k: v for k, v in b.items() if k in _BRANCH_FIELDS})
                         for b in (data.get("tree") or [])]  # fmt: skip
        return cls(**known)


_MEMORY_ONLY = frozenset({"meta_url", "problem", "failures", "retry_at"})
_TARGET_FIELDS = frozenset(f.name for f in dataclasses.fields(Target))
_BRANCH_FIELDS = frozenset(f.name for f in dataclasses.fields(Branch))


class StateFile:
    """The JSON file holding the table; written atomically (temporary file, fsync, rename)."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, Volume]:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
            volumes = {vid: Volume.from_json(v) for vid, v in data.get("volumes", {}).items()}
        except (ValueError, TypeError, AttributeError) as error:
            # Keep the damaged file for a human; start from what the kernel shows.
            keep = self.path.with_suffix(".damaged")
            with contextlib.suppress(OSError):
                os.replace(self.path, keep)
            log.error("state file %s is damaged (%s): kept as %s", self.path, error, keep)
            return {}
        return volumes

    def save(self, volumes: dict[str, Volume]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {"format": FORMAT, "volumes": {vid: v.to_json() for vid, v in volumes.items()}}
        temp = self.path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.path)


class Table:
    """The staged volumes: the in-memory dict and its file, saved after each change."""

    def __init__(self, file: StateFile):
        self.file = file
        self.volumes: dict[str, Volume] = {}

    def load(self) -> None:
        self.volumes = self.file.load()

    def save(self) -> None:
        self.file.save(self.volumes)

    def get(self, volume_id: str) -> Volume | None:
        return self.volumes.get(volume_id)

    def put(self, volume: Volume) -> None:
        self.volumes[volume.volume_id] = volume
        self.save()

    def remove(self, volume_id: str) -> None:
        if self.volumes.pop(volume_id, None) is not None:
            self.save()

    def at_staging(self, path: str) -> Volume | None:
        """The volume staged at `path`, if any."""
        return next((v for v in self.volumes.values() if v.staging_path == path), None)

    def owner_of_target(self, path: str) -> Volume | None:
        """The volume published at target `path`, if any."""
        return next((v for v in self.volumes.values() if path in v.targets), None)

    def __iter__(self):
        return iter(list(self.volumes.values()))

    def __len__(self) -> int:
        return len(self.volumes)
