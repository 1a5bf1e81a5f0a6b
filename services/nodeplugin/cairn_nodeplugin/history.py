"""The node plugin's memory in the event stream: what this node staged and published, replayed
at start, and the local volumes the controller deleted, removed from the local root.

`replay` reads the volume events of the stream (VolumeStaged, VolumePublished,
VolumeUnpublished, VolumeUnstaged, MountRecovered carry the node in their payload; the
controller's VolumeProvisioned says where a volume lives) and answers, per volume staged on
this node, its staging path, last known mount PID and published targets. The Keeper
(mounts.py) checks that against the kernel's mount table; volumes.json is only a cache.

`LocalDeletions` is a durable consumer (explicit acks) of the volume events: on VolumeDeleted
of a local volume of this node it removes the volume's directory, which must lie directly
under the local root and be a real directory (never a symlink): nothing outside the local
root is ever removed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from cairn.errors import PermanentError, TemporaryError
from cairn.events import Consumer
from cairn.events.envelope import aggregate_subjects

log = logging.getLogger(__name__)

NODE_EVENTS = frozenset({"VolumeStaged", "VolumePublished", "VolumeUnpublished",
                         "VolumeUnstaged", "MountRecovered"})  # fmt: skip
DELETE_TIMEOUT = 300.0


@dataclass
class Seen:
    """One volume as the stream tells it, for this node."""

    volume_id: str
    staging_path: str = ""
    pid: int = 0
    targets: dict[str, bool] = field(default_factory=dict)  # path -> read-only
    path: str = ""  # VolumeProvisioned: the directory (shared: in the file system)
    node: str = ""  # VolumeProvisioned: the node holding a local volume ("" shared)


async def replay(store: Any, node_id: str) -> dict[str, Seen]:
    """The volumes staged on `node_id` by the stream's volume events (read to its end)."""
    seen: dict[str, Seen] = {}
    async with aclosing(store.read_all(filter_subject=aggregate_subjects("volume"))) as events:
        async for rec in events:
            envelope = rec.envelope
            payload = envelope.payload or {}
            vid = envelope.aggregate_id
            if envelope.type == "VolumeProvisioned":
                v = seen.setdefault(vid, Seen(vid))
                v.path, v.node = str(payload.get("path") or ""), str(payload.get("node") or "")
                continue
            if envelope.type not in NODE_EVENTS or payload.get("node") != node_id:
                continue
            v = seen.setdefault(vid, Seen(vid))
            if envelope.type == "VolumeStaged":
                v.staging_path, v.pid, v.targets = payload["staging_path"], int(
                    payload.get("mount_pid") or 0), {}  # fmt: skip
            elif envelope.type == "VolumePublished":
                v.targets[payload["target_path"]] = bool(payload.get("read_only"))
            elif envelope.type == "VolumeUnpublished":
                v.targets.pop(payload["target_path"], None)
            elif envelope.type == "VolumeUnstaged":
                v.staging_path, v.pid, v.targets = "", 0, {}
            elif envelope.type == "MountRecovered":
                v.pid = int(payload.get("new_pid") or v.pid)
    return {vid: v for vid, v in seen.items() if v.staging_path}


def remove_local_dir(root: str, path: str) -> bool:
    """Removes local volume directory `path` (and what is in it) when it is a real
    directory directly below `root`; whether it removed anything. Refuses anything else."""
    if (not path.startswith("/") or os.path.normpath(path) != path
            or os.path.dirname(path) != root or os.path.basename(path) in ("", ".", "..")):  # fmt: skip
        raise PermanentError(f"{path!r} is not a directory of the local root {root}: left alone")
    return remove_real_dir(path)


def remove_real_dir(path: str) -> bool:
    """Removes directory `path` and all in it when it is a real directory (not a symlink)
    that nothing is mounted on; whether there was one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise PermanentError(f"{path} is not a directory (a symlink?): left alone")
    if os.path.ismount(path):
        raise TemporaryError(f"{path} is mounted on")
    shutil.rmtree(path)  # walks by file descriptors: never follows a symlink inside
    return True


def durable_name(node_id: str) -> str:
    return "cairn-nodeplugin-local-" + re.sub(r"[^A-Za-z0-9_-]", "_", node_id)


class LocalDeletions:
    """Removes the directories of this node's deleted local volumes (see the module doc)."""

    def __init__(self, store: Any, node_id: str, local_root: str, table: Any):
        self.store, self.node_id, self.local_root, self.table = store, node_id, local_root, table
        self.consumer = Consumer(store, durable_name(node_id), self.handle,
                                 filter_subject=aggregate_subjects("volume"))  # fmt: skip

    async def handle(self, event: Any, envelope: Any) -> None:
        if envelope.type != "VolumeDeleted":
            return
        vid = envelope.aggregate_id
        where = envelope.payload or {}
        if not where.get("node"):  # the controller's VolumeProvisioned says where it lived
            provisioned = [e for e in await self.store.load("volume", vid)
                           if e.type == "VolumeProvisioned"]  # fmt: skip
            where = provisioned[-1].payload if provisioned else {}
        path = str(where.get("path") or "")
        if where.get("node") != self.node_id or not path:
            return  # a shared volume, or another node's
        if self.table.get(vid) is not None:
            raise TemporaryError(f"local volume {vid} is deleted but still staged here")
        from cairn_nodeplugin.mounts import in_thread

        if await in_thread(lambda: remove_local_dir(self.local_root, path), DELETE_TIMEOUT):
            log.info("local volume %s deleted: removed %s", vid, path)

    async def run(self) -> None:
        await self.consumer.run()
