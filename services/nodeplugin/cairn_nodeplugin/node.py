"""The CSI Node service of cairn-nodeplugin: stage, publish, unpublish, unstage, stats, expand.

- NodeStageVolume makes the volume available at kubelet's staging path, once per node: a
  shared volume (a directory of a Cairn file system, `path` in the volume_context) gets one
  `cairn mount --subdir <path>` process mounted there; a local volume (`type: local`) gets
  its directory under this node's local root created and bind-mounted there. A dataset's
  volume (`type: dataset`, the static PV cairn-cache-syncer writes) is staged as a shared
  one, read-only when its `readOnly` says so, with its block cache in the dataset's
  directory of the runtime's first tier (`<cacheDir>/<ns>-<name>`, `cacheSize` bytes): the
  cache this node's warm-ups filled (datasets.py), so the pod reads from there. A dataset
  of several mounts (`mounts` in the volume_context) is served as one tree (tree.py): its
  one mount process serves the mounts' common directory at a hidden place of the plugin, and
  the staging path holds a directory per mount, each a bind of that mount's directory
  (read-only where the mount or the dataset is); with one mount, `path` is the directory.
- NodePublishVolume bind-mounts the staging path at the pod's target path (read-only for a
  readonly request or a reader-only access mode); NodeUnpublishVolume undoes that and removes
  the target directory; NodeUnstageVolume stops the mount process once no target uses it
  (a tree's binds undone first). A tree is bound at targets recursively, its branches along.
- NodeGetVolumeStats answers from statvfs on the volume, which a Cairn mount answers from
  the directory's quota (bytes and inodes), and reports the volume abnormal while its mount
  is dead; NodeExpandVolume has nothing to do (the quota grew in the controller).

Every handler validates, looks at what is already done (the table in state.py and the
kernel's mounts), does the rest and answers, so a repeated call succeeds without doing the
work twice, and answers the spec's codes. Calls on one volume run one at a time (a lock per
volume), also against the watcher that restarts dead mounts. Staging and target paths must
lie below kubelet's directory after resolving symlinks; a local volume's directory must lie
directly under the local root, and a shared volume's path must be a plain absolute path of
real directories (no '..', no symlinks), so no request reaches outside the volume.

The file system of a shared volume is this plugin's --meta-url, or the one the NodeStage
secrets name (`metaurl`) when the volume_context says `meta: secret`; that URL carries a
password, so it is never logged, stored on disk or put in an event. Each change is an event
(VolumeStaged, VolumePublished, VolumeUnpublished, VolumeUnstaged, MountRecovered) on the
volume's aggregate, carrying the node and the trace of the CSI call: the plugin rebuilds its
table from them after a restart (mounts.Keeper.restore, history.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import posixpath
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cairn.config import redact
from cairn.datasets import cache_dir_name
from cairn.errors import (
    AlreadyExists,
    CairnError,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    FSError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    UnavailableError,
)
from cairn.events.types import (
    NodeCapacityReported,
    VolumePublished,
    VolumeStaged,
    VolumeUnpublished,
    VolumeUnstaged,
)
from cairn.rpc.gen import csi_pb2, csi_pb2_grpc
from cairn.rpc.status import handle_servicer_errors
from cairn.telemetry import propagation
from cairn_nodeplugin import mounts
from cairn_nodeplugin.state import Branch, Target, Volume
from cairn_nodeplugin.tree import common_dir, parse_branches

log = logging.getLogger(__name__)

TOPOLOGY_KEY = "topology.csi.cairn.io/node"  # the controller places local volumes by it
SECRET_META_URL = mounts.SECRET_META_URL
META_SCHEMES = ("redis", "rediss", "unix")
FS_TYPES = frozenset({"", "fuse", "cairn", "fuse.cairn"})
VOLUME_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A Kubernetes namespace or object name (DNS-1123 subdomain): a dataset is "<ns>/<name>".
K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")

Mode = csi_pb2.VolumeCapability.AccessMode
READ_ONLY_MODES = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})
RPC = csi_pb2.NodeServiceCapability.RPC
CAPABILITIES = tuple(
    csi_pb2.NodeServiceCapability(rpc=RPC(type=t))
    for t in (RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.EXPAND_VOLUME,
              RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER)
)  # fmt: skip
Usage = csi_pb2.VolumeUsage


@dataclass
class NodeConfig:
    node_id: str
    kubelet_dir: str  # resolved (realpath)
    local_root: str  # resolved; local volumes' directories go directly below it
    meta_url: str | None = None
    max_volumes: int = 0


# -- requests ----------------------------------------------------------------------------------


def check_volume_id(value: str) -> str:
    if not value:
        raise InvalidArgument("volume_id is required")
    if not VOLUME_ID.fullmatch(value):
        raise InvalidArgument(
            f"volume_id {value[:64]!r} is not a volume id (letters, digits, '.', '_', '-')"
        )
    return value


def check_capability(request: Any) -> Any:
    """The request's volume capability, checked: a file system mount with an access mode."""
    if not request.HasField("volume_capability"):
        raise InvalidArgument("volume_capability is required")
    cap = request.volume_capability
    if cap.HasField("block"):
        raise InvalidArgument("Cairn volumes are file systems: block access is not supported")
    if not cap.HasField("mount"):
        raise InvalidArgument("volume_capability needs an access type (mount)")
    if cap.access_mode.mode == Mode.UNKNOWN:
        raise InvalidArgument("volume_capability needs an access mode")
    if cap.mount.fs_type not in FS_TYPES:
        raise InvalidArgument(f"fs_type {cap.mount.fs_type!r}: Cairn volumes are fuse.cairn")
    return cap


def fingerprint(cap: Any) -> str:
    """A short digest of a capability, to tell a repeated call from a different one."""
    return hashlib.sha256(cap.SerializeToString(deterministic=True)).hexdigest()[:16]


def check_shared_path(value: str) -> str:
    """A shared volume's directory: absolute, normalised, below the file system's root."""
    if not value:
        raise InvalidArgument("volume_context has no path: not a volume CreateVolume made")
    parts = value.split("/")
    if (not value.startswith("/") or value == "/" or posixpath.normpath(value) != value
            or any(p in ("", ".", "..") for p in parts[1:])):  # fmt: skip
        raise InvalidArgument(f"volume_context path {value!r} is not a plain absolute path")
    return value


def check_dataset(value: str) -> str:
    """A dataset's id, `<namespace>/<name>`."""
    namespace, _, name = value.partition("/")
    if not (K8S_NAME.fullmatch(namespace) and K8S_NAME.fullmatch(name)):
        raise InvalidArgument(f"volume_context dataset {value[:128]!r} is not <namespace>/<name>")
    return value


def check_host_dir(value: str, what: str) -> str:
    """A directory on this node named by a request: absolute, normalised, not the root."""
    if not value.startswith("/") or value == "/" or posixpath.normpath(value) != value:
        raise InvalidArgument(f"{what} {value[:256]!r} is not a plain absolute path")
    return value


@dataclass(frozen=True)
class DatasetContext:
    """What the volume_context of a dataset's volume asks for beyond a shared volume's."""

    dataset: str
    read_only: bool
    cache_dir: str = ""  # "" : the plugin's own cache for the volume
    cache_size: int | None = None
    tree: tuple[Branch, ...] = ()  # several mounts: served as one tree of these branches

    @classmethod
    def parse(cls, context: Mapping[str, str]) -> DatasetContext:
        dataset = check_dataset(context.get("dataset", ""))
        flag = context.get("readOnly", "true").strip().lower()
        if flag not in ("true", "false"):
            raise InvalidArgument(f"volume_context readOnly {flag[:16]!r} is not true or false")
        cache_dir, size = "", None
        if context.get("cacheDir"):
            tier = check_host_dir(context["cacheDir"], "volume_context cacheDir")
            cache_dir = posixpath.join(tier, cache_dir_name(dataset))
        if context.get("cacheSize"):
            if not context["cacheSize"].isdigit():
                raise InvalidArgument(f"volume_context cacheSize {context['cacheSize'][:32]!r} "
                                      "is not a number of bytes")  # fmt: skip
            size = int(context["cacheSize"])
        try:
            tree = tuple(parse_branches(context.get("mounts", "")))
        except InvalidArgument as error:
            raise InvalidArgument(f"volume_context mounts: {error}") from None
        return cls(dataset, flag == "true", cache_dir, size, tree)

    def apply(self, volume: Volume, fs_path: str = "") -> None:
        """The dataset's part of the volume's record; a tree's mount serves the branches'
        common directory at `fs_path`."""
        volume.dataset, volume.cache_dir, volume.cache_size = (
            self.dataset, self.cache_dir, self.cache_size)  # fmt: skip
        volume.read_only = volume.read_only or self.read_only
        if self.tree:
            volume.tree, volume.source, volume.fs_path = (
                list(self.tree), common_dir(self.tree), fs_path)  # fmt: skip


def meta_problem(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in META_SCHEMES or (parts.scheme != "unix" and not parts.hostname):
        return f"{redact(url) if parts.password is None else '(a URL)'} is not redis://host:port"
    return ""


async def find_dir(meta: Any, path: str) -> int:
    """The inode of directory `path`, walked one real directory at a time (a symlink on the
    way is not followed: it could point out of the volume)."""
    from cairn.meta.engine import ROOT_CTX

    ino = 1
    for part in path.strip("/").split("/"):
        try:
            ino, attr = await meta.lookup(ROOT_CTX, ino, part.encode())
        except FSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR):
                raise NotFound(f"volume directory {path} does not exist") from None
            raise
        if not attr.is_dir():
            raise NotFound(f"{path}: {part} is not a directory")
    return ino


class FileSystems:
    """Metadata clients of the file systems shared volumes live in, one per URL, kept."""

    def __init__(self):
        self._metas: dict[str, Any] = {}
        self._pings: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def get(self, url: str) -> Any:
        from cairn.meta.engine import Meta

        async with self._lock:
            meta = self._metas.get(url)
            if meta is None:
                try:
                    meta = await Meta.open(url)
                except ConfigError as error:  # reachable, but no Cairn file system there
                    raise FailedPrecondition(mounts.scrub(str(error), url)) from None
                except CairnError as error:
                    raise UnavailableError(mounts.scrub(str(error), url)) from None
                self._metas[url] = meta
        return meta

    async def ping(self, url: str) -> None:
        """UnavailableError (one line, no password) unless the Redis at `url` answers."""
        from cairn.connect import ping_redis
        from cairn.connect import redis as connect_redis

        client = self._pings.get(url)
        if client is None:
            client = await connect_redis(url, timeout=2.0)
            self._pings[url] = client
        await ping_redis(client, url)

    async def close(self) -> None:
        metas, self._metas = list(self._metas.values()), {}
        pings, self._pings = list(self._pings.values()), {}
        for meta in metas:
            with contextlib.suppress(Exception):
                await meta.close()
        for client in pings:
            with contextlib.suppress(Exception):
                await client.aclose()


# -- the service ---------------------------------------------------------------------------------


@handle_servicer_errors
class NodeService(csi_pb2_grpc.NodeServicer):
    """CSI Node: see the module docstring."""

    def __init__(self, cfg: NodeConfig, keeper: mounts.Keeper, filesystems: FileSystems,
                 datasets_changed: Callable[[], None] | None = None):  # fmt: skip
        self.cfg = cfg
        self.keeper = keeper
        self.table = keeper.table
        self.fs = filesystems
        # Told when a dataset's volume was staged or unstaged (its cache reports and
        # directories follow: datasets.DatasetCaches.poke).
        self.datasets_changed = datasets_changed or (lambda: None)

    # -- identity and capabilities ----------------------------------------------------------

    async def NodeGetInfo(self, request, context):
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.cfg.node_id,
            max_volumes_per_node=self.cfg.max_volumes,
            accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: self.cfg.node_id}),
        )

    async def NodeGetCapabilities(self, request, context):
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=CAPABILITIES)

    # -- stage -------------------------------------------------------------------------------

    async def NodeStageVolume(self, request, context):
        vid = check_volume_id(request.volume_id)
        staging = await self._kubelet_path(request.staging_target_path, "staging_target_path")
        cap = check_capability(request)
        trace = propagation.inject()
        async with self.keeper.exclusive(vid):
            volume = self.table.get(vid)
            if volume is not None:
                _check_restage(volume, staging, cap)
                self._complete(volume, request.volume_context)
                if await self.keeper.problem(volume):
                    await self.keeper.recover(volume, dict(request.secrets), trace)
                return csi_pb2.NodeStageVolumeResponse()
            other = self.table.at_staging(staging)
            if other is not None:
                raise AlreadyExists(f"{staging} is where volume {other.volume_id} is staged")
            if self.cfg.max_volumes and len(self.table) >= self.cfg.max_volumes:
                raise ResourceExhausted(f"node {self.cfg.node_id} has its "
                                        f"{self.cfg.max_volumes} volumes")  # fmt: skip
            context_ = dict(request.volume_context)
            kind = context_.get("type", "shared")
            if kind in ("shared", "dataset"):
                dataset = DatasetContext.parse(context_) if kind == "dataset" else None
                volume = await self._stage_shared(vid, staging, cap, context_, request.secrets,
                                                  dataset)  # fmt: skip
            elif kind == "local":
                volume = await self._stage_local(vid, staging, cap, context_)
            else:
                raise InvalidArgument(f"volume_context type {kind!r} is not shared, local or "
                                      "dataset")  # fmt: skip
        log.info("volume %s staged at %s%s", vid, staging,
                 f" (dataset {volume.dataset})" if volume.dataset else "")  # fmt: skip
        await self.keeper.emit(vid, VolumeStaged(node=self.cfg.node_id, staging_path=staging,
                                                 mount_pid=volume.pid), trace)  # fmt: skip
        if volume.dataset:
            self.datasets_changed()
        return csi_pb2.NodeStageVolumeResponse()

    def _complete(self, volume: Volume, context: Mapping[str, str]) -> None:
        """What a volume rebuilt from the events lacks, from kubelet's NodeStage again: its
        directory, its dataset (and a dataset's tree)."""
        if volume.kind != "shared":
            return
        changed = False
        if context.get("type") == "dataset" and not volume.dataset:
            DatasetContext.parse(context).apply(
                volume, self.keeper.processes.tree_fs(volume.volume_id))  # fmt: skip
            changed = True
        if not volume.source:
            volume.source = check_shared_path(context.get("path", ""))
            changed = True
        if changed:
            self.table.save()

    def _meta_url(self, context: Mapping[str, str], secrets: Mapping[str, str]) -> tuple[str, str]:
        """(META_URL, "default" | "secret") of a shared volume's file system."""
        secret = secrets.get(SECRET_META_URL, "")
        # The controller says which file system; a volume made by hand (a static PV) may
        # say nothing, and then a secret, when given, names it.
        if context.get("meta") == "secret" or (secret and "meta" not in context):
            if not secret:
                raise FailedPrecondition(
                    "the volume lives on a file system named by secrets: NodeStage needs "
                    f"them ({SECRET_META_URL!r}, the StorageClass's node-stage secret)"
                )
            url, ref = secret, "secret"
        else:
            if not self.cfg.meta_url:
                raise FailedPrecondition(
                    "no file system for shared volumes: start cairn-nodeplugin with --meta-url "
                    f"or give the {SECRET_META_URL!r} secret"
                )
            url, ref = self.cfg.meta_url, "default"
        problem = meta_problem(url)
        if problem:
            raise InvalidArgument(f"the file system URL of the volume: {problem}")
        return url, ref

    async def _stage_shared(self, vid: str, staging: str, cap: Any, context: dict[str, str],
                            secrets: Mapping[str, str],
                            dataset: DatasetContext | None = None) -> Volume:  # fmt: skip
        url, ref = self._meta_url(context, secrets)
        path = check_shared_path(context.get("path", ""))
        meta = await self.fs.get(url)
        wanted = context.get("fsUUID")
        if wanted and meta.fmt.uuid != wanted:
            raise FailedPrecondition(f"volume {vid} lives on file system {wanted}, not on "
                                     f"{meta.fmt.uuid}")  # fmt: skip
        await find_dir(meta, path)
        for branch in dataset.tree if dataset is not None else ():
            await find_dir(meta, branch.path)
        volume = Volume(
            volume_id=vid, kind="shared", staging_path=staging, source=path,
            access_mode=cap.access_mode.mode, capability=fingerprint(cap),
            read_only=cap.access_mode.mode in READ_ONLY_MODES, meta=ref, fs_uuid=meta.fmt.uuid,
            log=str(self.keeper.processes.log_path(vid)), staged_at=time.time(), meta_url=url,
        )  # fmt: skip
        if dataset is not None:
            dataset.apply(volume, self.keeper.processes.tree_fs(vid))
        self.table.put(volume)  # recorded first: a crash from here on is finished by a retry
        try:
            await mounts.make_dir(volume.mountpoint)
            volume.pid = await self.keeper.mount_process(volume)
            if volume.fs_path:
                self.table.save()  # the PID, before the binds
                await self.keeper.build_tree(volume)
        except BaseException:
            if volume.fs_path:  # nothing of a half-made tree stays behind
                with contextlib.suppress(CairnError, OSError):
                    await self.keeper.take_down(volume)
            self.table.remove(vid)
            raise
        self.table.save()
        return volume

    async def _stage_local(self, vid: str, staging: str, cap: Any,
                           context: dict[str, str]) -> Volume:  # fmt: skip
        node = context.get("node", "")
        if node and node != self.cfg.node_id:
            raise NotFound(f"local volume {vid} lives on node {node}, not {self.cfg.node_id}")
        path = await self._local_path(context.get("path", ""))
        volume = Volume(
            volume_id=vid, kind="local", staging_path=staging, source=path,
            access_mode=cap.access_mode.mode, capability=fingerprint(cap),
            read_only=cap.access_mode.mode in READ_ONLY_MODES, staged_at=time.time(),
        )  # fmt: skip
        self.table.put(volume)
        try:
            await self.keeper.bind_local(volume)
        except BaseException:
            self.table.remove(vid)
            raise
        return volume

    async def _local_path(self, value: str) -> str:
        """A local volume's directory, which must lie directly below the local root."""
        if not value.startswith("/"):
            raise InvalidArgument("volume_context of a local volume needs an absolute path")
        real = await mounts.realpath(value)
        if posixpath.dirname(real) != self.cfg.local_root:
            raise InvalidArgument(
                f"local volume path {value} is not a directory of this node's local root "
                f"{self.cfg.local_root}"
            )
        return real

    # -- publish -------------------------------------------------------------------------------

    async def NodePublishVolume(self, request, context):
        vid = check_volume_id(request.volume_id)
        staging = await self._kubelet_path(request.staging_target_path, "staging_target_path")
        target = await self._kubelet_path(request.target_path, "target_path")
        cap = check_capability(request)
        if target == staging:
            raise InvalidArgument("target_path and staging_target_path are the same")
        read_only = request.readonly or cap.access_mode.mode in READ_ONLY_MODES
        trace = propagation.inject()
        async with self.keeper.exclusive(vid):
            volume = self.table.get(vid)
            if volume is None:
                raise NotFound(f"volume {vid} is not staged on node {self.cfg.node_id}")
            if volume.staging_path != staging:
                raise FailedPrecondition(f"volume {vid} is staged at {volume.staging_path}, "
                                         f"not {staging}")  # fmt: skip
            wanted = Target(path=target, read_only=read_only, capability=fingerprint(cap))
            existing = volume.targets.get(target)
            if existing is not None and not existing.capability:  # rebuilt from events
                existing.capability = wanted.capability
            if existing is not None:
                if existing != wanted:
                    raise AlreadyExists(f"volume {vid} is published at {target} with other "
                                        "arguments (readonly or capability)")  # fmt: skip
                if not await self.keeper.target_problem(volume, target):
                    return csi_pb2.NodePublishVolumeResponse()
            else:
                self._check_new_target(volume, target, cap)
                volume.targets[target] = wanted
                self.table.save()  # recorded first, as for staging
            try:
                await self.keeper.bind_target(volume, target, read_only)
            except BaseException:
                volume.targets.pop(target, None)  # not published: a retry starts clean
                self.table.save()
                raise
        log.info("volume %s published at %s%s", vid, target, " (read-only)" if read_only else "")
        if existing is None:
            await self.keeper.emit(vid, VolumePublished(
                node=self.cfg.node_id, target_path=target, read_only=read_only), trace)  # fmt: skip
        return csi_pb2.NodePublishVolumeResponse()

    def _check_new_target(self, volume: Volume, target: str, cap: Any) -> None:
        owner = self.table.owner_of_target(target)
        if owner is not None:
            raise AlreadyExists(f"{target} is where volume {owner.volume_id} is published")
        single = Mode.SINGLE_NODE_SINGLE_WRITER
        if volume.targets and single in (cap.access_mode.mode, volume.access_mode):
            raise FailedPrecondition(
                f"volume {volume.volume_id} is SINGLE_NODE_SINGLE_WRITER and already "
                f"published at {next(iter(volume.targets))}"
            )

    async def NodeUnpublishVolume(self, request, context):
        vid = check_volume_id(request.volume_id)
        target = await self._kubelet_path(request.target_path, "target_path")
        trace = propagation.inject()
        async with self.keeper.exclusive(vid):
            volume = self.table.get(vid)
            known = volume is not None and target in volume.targets
            if not known:
                owner = self.table.owner_of_target(target)
                if owner is not None:
                    raise NotFound(f"{target} is where volume {owner.volume_id} is published, "
                                   f"not {vid}")  # fmt: skip
            if known and volume.fs_path:
                await mounts.unmount_tree(target)  # a tree's branches, then its root
            await mounts.unmount_all(target)
            await mounts.remove_dir(target)
            if known:
                del volume.targets[target]
                self.table.save()
        if known:
            log.info("volume %s unpublished from %s", vid, target)
            await self.keeper.emit(vid, VolumeUnpublished(node=self.cfg.node_id,
                                                          target_path=target), trace)  # fmt: skip
        return csi_pb2.NodeUnpublishVolumeResponse()

    # -- unstage -----------------------------------------------------------------------------

    async def NodeUnstageVolume(self, request, context):
        vid = check_volume_id(request.volume_id)
        staging = await self._kubelet_path(request.staging_target_path, "staging_target_path")
        trace = propagation.inject()
        async with self.keeper.exclusive(vid):
            volume = self.table.get(vid)
            if volume is None or volume.staging_path != staging:
                await self._clear_unknown_staging(vid, staging)
                return csi_pb2.NodeUnstageVolumeResponse()
            if volume.targets:
                raise FailedPrecondition(f"volume {vid} is still published at "
                                         f"{', '.join(sorted(volume.targets))}")  # fmt: skip
            await self.keeper.take_down(volume)
            await mounts.unmount_all(staging)
            self.table.remove(vid)
        log.info("volume %s unstaged from %s", vid, staging)
        await self.keeper.emit(vid, VolumeUnstaged(node=self.cfg.node_id, staging_path=staging),
                               trace)  # fmt: skip
        if volume.dataset:
            self.datasets_changed()
        return csi_pb2.NodeUnstageVolumeResponse()

    async def _clear_unknown_staging(self, vid: str, staging: str) -> None:
        """Unstage of a volume not staged there: done already, unless something was left."""
        other = self.table.at_staging(staging)
        if other is not None:
            raise NotFound(f"{staging} is where volume {other.volume_id} is staged, not {vid}")
        pid = self.keeper.processes.pid_of(staging)
        if pid:
            await self.keeper.processes.stop(staging, pid)
        await self.keeper.clear_leftover_tree(vid, staging)
        await mounts.unmount_all(staging)

    # -- stats and expansion ----------------------------------------------------------------

    async def NodeGetVolumeStats(self, request, context):
        vid = check_volume_id(request.volume_id)
        volume, path = await self._volume_at(vid, request.volume_path)
        problem = await self.keeper.problem(volume, path)
        usage = []
        if not problem:
            try:
                # A tree's root is a tmpfs: its mount answers for the dataset's directories.
                usage = _usage(await mounts.statvfs(volume.fs_path or path))
            except (OSError, DeadlineExceeded) as error:
                problem = f"{path}: {getattr(error, 'strerror', None) or error}"
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=usage,
            volume_condition=csi_pb2.VolumeCondition(
                abnormal=bool(problem), message=problem or _healthy_message(volume)),
        )  # fmt: skip

    async def NodeExpandVolume(self, request, context):
        vid = check_volume_id(request.volume_id)
        if request.HasField("volume_capability"):
            check_capability(request)
        volume, path = await self._volume_at(vid, request.volume_path)
        size = request.capacity_range.required_bytes or request.capacity_range.limit_bytes
        if volume.kind == "shared" and not await self.keeper.problem(volume, path):
            # Nothing to do here: the quota grew in the controller, and the mount answers
            # statvfs from it.
            with contextlib.suppress(OSError, DeadlineExceeded):
                st = await mounts.statvfs(volume.fs_path or path)
                size = max(size, st.f_blocks * st.f_frsize)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    async def _volume_at(self, vid: str, volume_path: str) -> tuple[Volume, str]:
        """The staged volume, and the (resolved) path of it that a stats or expand call names."""
        if not volume_path:
            raise InvalidArgument("volume_path is required")
        volume = self.table.get(vid)
        if volume is None:
            raise NotFound(f"volume {vid} is not staged on node {self.cfg.node_id}")
        path = await mounts.realpath(volume_path) if volume_path.startswith("/") else ""
        if path != volume.staging_path and path not in volume.targets:
            raise NotFound(f"{volume_path} is not where volume {vid} is staged or published")
        return volume, path

    # -- helpers -----------------------------------------------------------------------------

    async def _kubelet_path(self, value: str, what: str) -> str:
        """`value` resolved (symlinks followed), which must lie below kubelet's directory."""
        if not value:
            raise InvalidArgument(f"{what} is required")
        if not value.startswith("/"):
            raise InvalidArgument(f"{what} {value!r} is not an absolute path")
        try:
            real = await mounts.realpath(value)
        except DeadlineExceeded:
            raise UnavailableError(f"{what} {value}: a mount on the way does not answer") from None
        if not real.startswith(self.cfg.kubelet_dir.rstrip("/") + "/"):
            raise InvalidArgument(
                f"{what} {value} is not below kubelet's directory {self.cfg.kubelet_dir}"
            )
        return real


def _check_restage(volume: Volume, staging: str, cap: Any) -> None:
    if volume.staging_path != staging:
        raise FailedPrecondition(
            f"volume {volume.volume_id} is already staged at {volume.staging_path}"
        )
    if not volume.capability:  # rebuilt from the event history, which does not keep it
        volume.capability = fingerprint(cap)
        volume.access_mode = cap.access_mode.mode
    if volume.capability != fingerprint(cap):
        raise AlreadyExists(
            f"volume {volume.volume_id} is staged at {staging} with another capability"
        )


def readiness(cfg: NodeConfig, keeper: mounts.Keeper, filesystems: FileSystems):
    """The node plugin's Probe: FUSE is usable, the configured file system's Redis answers,
    and no staged volume is broken beyond what the watcher could repair."""

    async def probe() -> None:
        if not await mounts.in_thread(lambda: os.path.exists("/dev/fuse")):
            raise FailedPrecondition("/dev/fuse is missing: run privileged with /dev/fuse")
        if cfg.meta_url:
            await filesystems.ping(cfg.meta_url)
        broken = keeper.unrepaired()
        if broken:
            raise UnavailableError(f"volume {broken[0].volume_id} cannot be repaired: "
                                   f"{broken[0].problem}")  # fmt: skip

    return probe


def _usage(st: os.statvfs_result) -> list[Any]:
    total = st.f_blocks * st.f_frsize
    return [
        Usage(unit=Usage.BYTES, total=total, available=st.f_bavail * st.f_frsize,
              used=max(0, total - st.f_bfree * st.f_frsize)),
        Usage(unit=Usage.INODES, total=st.f_files, available=st.f_favail,
              used=max(0, st.f_files - st.f_ffree)),
    ]  # fmt: skip


def _healthy_message(volume: Volume) -> str:
    if volume.kind == "shared":
        return f"mounted by process {volume.pid}"
    return f"local directory {volume.source}"


# -- capacity of the local root -------------------------------------------------------------------


class CapacityReporter:
    """Reports the local root's size and free space (NodeCapacityReported on the node's
    aggregate) at start and then whenever it changed noticeably, at least every `every`
    reports' time, for the controller's placement of local volumes."""

    def __init__(self, cfg: NodeConfig, events: Any, interval: float = 60.0, every: int = 60):
        self.cfg, self.events, self.interval, self.every = cfg, events, interval, every
        self._last: tuple[int, int] | None = None
        self._quiet = 0

    async def report(self, force: bool = False) -> bool:
        """Appends a report when it is due; whether one was appended."""
        root = self.cfg.local_root
        await mounts.in_thread(lambda: os.makedirs(root, mode=0o755, exist_ok=True))
        st = await mounts.statvfs(root)
        capacity, available = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        if not force and self._last is not None and self._quiet < self.every:
            old_capacity, old_available = self._last
            if old_capacity == capacity and abs(old_available - available) < max(
                    capacity // 100, 1 << 20):  # fmt: skip
                self._quiet += 1
                return False
        await self.events.append("node", self.cfg.node_id, [NodeCapacityReported(
            node=self.cfg.node_id, capacity_bytes=capacity, available_bytes=available,
            local_path=self.cfg.local_root)])  # fmt: skip
        self._last, self._quiet = (capacity, available), 0
        return True

    async def run(self) -> None:
        first = True
        while True:
            try:
                await self.report(force=first)
                first = False
            except (CairnError, OSError) as error:
                log.warning("could not report the capacity of %s: %s", self.cfg.local_root, error)
            await asyncio.sleep(self.interval)
