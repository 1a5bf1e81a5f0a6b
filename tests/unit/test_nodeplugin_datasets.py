"""The pure parts of cairn-nodeplugin's dataset caches: what the events say (tiers, nodes,
the fold of a dataset's events), the size walk and removal of cache directories, when a
report is due, warm-up paths and shares, progress that never goes back, the volume context
of a dataset's volume, and a dataset of several mounts served as one tree (its branches,
paths mapped through them, the tree read back from the mount table)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cairn.errors import ConflictError, InvalidArgument, NotFound, PermanentError
from cairn.events.envelope import Envelope
from cairn.events.types import (
    DataLoadFinished,
    DataLoadProgressed,
    DataLoadStarted,
    DatasetBound,
    DatasetUnbound,
    NodeCacheReported,
    RuntimeScaled,
)
from cairn.storage.cache import TEMP_PREFIX
from cairn_nodeplugin import datasets, mounts
from cairn_nodeplugin.datasets import (
    DatasetCaches,
    Datasets,
    Layout,
    Prior,
    Share,
    Tier,
    assigned_paths,
    cached_bytes,
    changed,
    local_path,
    node_names,
    parse_tiers,
    prior_of,
    remove_cache_dir,
)
from cairn_nodeplugin.mounts import Keeper, MountProcesses
from cairn_nodeplugin.node import DatasetContext
from cairn_nodeplugin.state import Branch, StateFile, Table, Volume
from cairn_nodeplugin.tree import (
    TREE_SOURCE,
    bind_source,
    common_dir,
    dataset_places,
    parse_branches,
)

MiB = 1 << 20
TIER = {"mediumType": "SSD", "path": "/mnt/ssd", "quota": 2 << 30, "high": "0.9", "low": "0.7"}


def test_tiers_keep_plain_paths_and_whole_quotas():
    tiers = parse_tiers([
        TIER,
        {"mediumType": "MEM", "path": "/dev/shm", "quota": "1048576"},
        {"mediumType": "HDD", "path": "/mnt/../etc", "quota": 1},  # not plain: left out
        {"mediumType": "HDD", "path": "relative", "quota": 1},
        {"mediumType": "HDD", "path": "/mnt/hdd", "quota": True},  # no quota it can use
        "not a tier",
    ])  # fmt: skip
    assert tiers == [Tier("SSD", "/mnt/ssd", 2 << 30), Tier("MEM", "/dev/shm", MiB),
                     Tier("HDD", "/mnt/hdd", 0)]  # fmt: skip
    assert parse_tiers(None) == []


def test_node_names_are_names_or_named_objects():
    assert node_names(["a", {"name": "b"}, {"node": "c"}, "", {}, 7]) == {"a", "b", "c"}
    assert node_names("a") == set()


def envelopes(aggregate_id: str, *events) -> list[Envelope]:
    return [Envelope.wrap(e, aggregate_id, i + 1) for i, e in enumerate(events)]


def test_the_fold_knows_what_this_node_caches_and_every_tier_it_had():
    fold = Datasets("node-a")
    mounts = [{"name": "m", "path": "/data/ds", "read_only": True, "volume": ""}]
    other = {**TIER, "path": "/mnt/other"}
    for envelope in envelopes(
        "ns/ds",
        DatasetBound(runtime="ds", uid="u", volume_handle="ns-ds", pv="ns-ds", pvc="ds",
                     mounts=mounts),
        RuntimeScaled(replicas=1, nodes=["node-a"], tiers=[TIER]),
        RuntimeScaled(replicas=1, nodes=["node-a", "node-b"], tiers=[other]),
    ):  # fmt: skip
        fold.apply(envelope)
    view = fold.views["ns/ds"]
    assert view.cached and view.source == "/data/ds" and view.capacity == TIER["quota"]
    assert view.dirs() == ["/mnt/other/ns-ds"]
    assert view.known_dirs() == {"/mnt/ssd/ns-ds", "/mnt/other/ns-ds"}
    assert fold.by_name("ns-ds") is view

    fold.apply(envelopes("ns/ds", RuntimeScaled(replicas=1, nodes=["node-b"], tiers=[TIER]))[0])
    assert not view.cached and view.dirs() == []
    fold.apply(envelopes("ns/ds", RuntimeScaled(replicas=1, nodes=["node-a"], tiers=[TIER]))[0])
    assert view.cached
    fold.apply(envelopes("ns/ds", DatasetUnbound(reason="runtime deleted"))[0])
    assert not view.cached and view.known_dirs() == {"/mnt/ssd/ns-ds", "/mnt/other/ns-ds"}
    # An id that is no <namespace>/<name> never becomes a directory name.
    assert fold.apply(envelopes("../x", RuntimeScaled(replicas=1, nodes=["node-a"]))[0]) is None
    assert set(fold.views) == {"ns/ds"}


def test_cached_bytes_count_block_files_only(tmp_path: Path):
    cache = tmp_path / "tier" / "ns-ds"
    (cache / "blocks" / "ab").mkdir(parents=True)
    (cache / "blocks" / "ab" / "1_0_4096").write_bytes(b"x" * 5000)
    (cache / "blocks" / "2_0_100").write_bytes(b"y" * 100)
    (cache / "blocks" / f"{TEMP_PREFIX}3_0_100-abc").write_bytes(b"z" * 777)  # torn write
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"o" * 10_000)
    os.symlink(outside, cache / "link")  # never followed
    os.symlink(outside / "big", cache / "file-link")
    assert cached_bytes([str(cache)]) == 5100
    assert cached_bytes([str(cache), str(cache)]) == 5100  # a directory counts once
    assert cached_bytes([str(tmp_path / "missing")]) == 0


def test_cache_dirs_are_removed_only_when_they_are_real(tmp_path: Path):
    tier = tmp_path / "tier"
    cache = tier / "ns-ds"
    (cache / "blocks").mkdir(parents=True)
    (cache / "blocks" / "b").write_bytes(b"data")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_bytes(b"keep")
    os.symlink(victim, tier / "ns-link")
    with pytest.raises(PermanentError):
        remove_cache_dir(str(tier / "ns-link"))  # a symlink is left alone
    assert (victim / "keep").exists()
    os.symlink(victim, cache / "inside")
    assert remove_cache_dir(str(cache)) is True
    assert not cache.exists() and (victim / "keep").exists() and tier.is_dir()
    assert remove_cache_dir(str(cache)) is False  # gone already: nothing to do
    for bad in ("relative/ns-ds", str(tier / ".."), "/ns-ds", str(tier) + "/../x/ns-ds"):
        with pytest.raises(PermanentError):
            remove_cache_dir(bad)


def test_a_report_is_due_on_a_new_capacity_or_a_real_change():
    assert changed(None, (0, 0))
    assert changed((10, 100), (10, 200))
    assert not changed((0, 100), (MiB, 100))  # 1 MiB exactly: not yet
    assert changed((0, 100), (MiB + 1, 100))
    big = 1000 * MiB
    assert not changed((big, 1), (big + 5 * MiB, 1))  # under 1 %
    assert changed((big, 1), (big - 11 * MiB, 1))


def test_warm_up_paths_stay_inside_the_dataset():
    assert assigned_paths({"a": ["/", "/x", "/x"], "b": ["/y"]}, "a") == ["/", "/x"]
    assert assigned_paths({"a": "/x"}, "a") == ["/x"]
    assert assigned_paths({"b": ["/y"]}, "a") == [] and assigned_paths(None, "a") == []
    assert local_path("/mnt/w", "/") == "/mnt/w"
    assert local_path("/mnt/w", "/a/b/") == "/mnt/w/a/b"
    assert local_path("/mnt/w", "/a/./b") == "/mnt/w/a/b"
    for bad in ("a", "/../etc", "/a/../../etc", ""):
        with pytest.raises(InvalidArgument):
            local_path("/mnt/w", bad)


def test_prior_progress_tells_done_over_and_the_floor():
    history = envelopes(
        "ns/load",
        DataLoadStarted(dataset="ns/ds", run=1, assignments={"a": ["/"]}),
        DataLoadProgressed(node="a", run=1, files=3, bytes=300),
        DataLoadProgressed(node="b", run=1, files=9, bytes=900, done=True),
        DataLoadProgressed(node="a", run=1, files=5, bytes=250),
    )
    assert prior_of(history, "a", 1) == Prior(done=False, over=False, files=5, bytes=300)
    assert prior_of(history, "b", 1).done
    done = history + envelopes("ns/load", DataLoadProgressed(node="a", run=1, done=True))
    assert prior_of(done, "a", 1).done
    finished = history + envelopes("ns/load", DataLoadFinished(run=1, phase="Failed"))
    assert prior_of(finished, "a", 1).over
    newer = history + envelopes("ns/load", DataLoadStarted(dataset="ns/ds", run=2))
    assert prior_of(newer, "a", 1).over and not prior_of(newer, "a", 2).over


class Recorder:
    """An event store's append, recording; the first `conflicts` appends lose a race."""

    def __init__(self, conflicts: int = 0):
        self.appended: list[tuple[str, str, list]] = []
        self.conflicts = conflicts

    async def append(self, aggregate, aggregate_id, events, expected_version=None, **_):
        if self.conflicts:
            self.conflicts -= 1
            raise ConflictError("another writer")
        self.appended.append((aggregate, aggregate_id, list(events)))


async def test_share_progress_is_cumulative_and_never_falls(monkeypatch):
    events = Recorder(conflicts=2)
    share = Share(events, "ns/load", "a", 1, Prior(files=4, bytes=4000))
    share.bytes = 1000  # a redelivered run starts again below what was reported
    await share.tick()
    assert events.appended == []  # nothing above the floor yet
    share.files, share.bytes = 6, 6000
    await share.tick()
    await share.tick()  # within the second: not again
    monkeypatch.setattr(datasets, "PROGRESS_EVERY", 0.0)
    share.restart()  # another attempt counts from 0; the floor keeps 6/6000
    share.files, share.bytes = 2, 7000
    await share.tick()
    await share.finish("x: no such file or directory")
    sent = [e for _, _, batch in events.appended for e in batch]
    assert [(e.files, e.bytes, e.done) for e in sent] == [
        (6, 6000, False), (6, 7000, False), (6, 7000, True)]  # fmt: skip
    assert sent[-1].error == "x: no such file or directory"
    assert {a[:2] for a in events.appended} == {("dataload", "ns/load")}


def test_the_dataset_volume_context():
    context = {"type": "dataset", "dataset": "ns/ds", "path": "/data/ds", "readOnly": "false",
               "cacheDir": "/mnt/ssd", "cacheSize": str(2 << 30)}  # fmt: skip
    parsed = DatasetContext.parse(context)
    assert parsed == DatasetContext("ns/ds", False, "/mnt/ssd/ns-ds", 2 << 30)
    volume = Volume(volume_id="ns-ds", kind="shared", staging_path="/s", source="/data/ds",
                    read_only=True)  # fmt: skip
    parsed.apply(volume)
    assert volume.read_only  # a reader-only access mode stays read-only
    assert (volume.dataset, volume.cache_dir, volume.cache_size) == (
        "ns/ds", "/mnt/ssd/ns-ds", 2 << 30)  # fmt: skip
    plain = DatasetContext.parse({"dataset": "ns/ds"})
    assert plain == DatasetContext("ns/ds", True, "", None)  # read-only unless told
    for bad in ({"dataset": "ns"}, {"dataset": "ns/../x"}, {"dataset": "NS/ds"},
                {"dataset": "ns/ds", "readOnly": "yes"},
                {"dataset": "ns/ds", "cacheDir": "/mnt/../etc"},
                {"dataset": "ns/ds", "cacheDir": "/"},
                {"dataset": "ns/ds", "cacheSize": "2Gi"}):  # fmt: skip
        with pytest.raises(InvalidArgument):
            DatasetContext.parse(bad)


def test_a_volume_record_keeps_its_dataset_across_the_state_file():
    volume = Volume(volume_id="ns-ds", kind="shared", staging_path="/s", source="/d",
                    dataset="ns/ds", cache_dir="/mnt/ssd/ns-ds", cache_size=5)  # fmt: skip
    assert Volume.from_json(volume.to_json()) == volume
    old = {k: v for k, v in volume.to_json().items()
           if k not in ("dataset", "cache_dir", "cache_size")}  # fmt: skip
    assert Volume.from_json(old).cache_size is None  # a file from before datasets


async def test_directories_follow_the_dataset_and_wait_for_its_unstage(tmp_path: Path):
    tier = tmp_path / "tier"
    keeper = Keeper(Table(StateFile(tmp_path / "volumes.json")), MountProcesses(tmp_path),
                    Recorder(), "node-a")  # fmt: skip
    events = Recorder()
    caches = DatasetCaches(None, events, keeper, "node-a", tmp_path, interval=30.0)
    scaled = RuntimeScaled(replicas=1, nodes=["node-a"], tiers=[{**TIER, "path": str(tier)}])
    view = caches.datasets.apply(envelopes("ns/ds", scaled)[0])
    await caches.reconcile(view)
    cache = tier / "ns-ds"
    assert cache.is_dir()
    (cache / "b").write_bytes(b"x" * 1000)
    await caches.report()
    await caches.report()  # nothing moved, the heartbeat is not due: no second report
    assert [e for _, _, batch in events.appended for e in batch] == [NodeCacheReported(
        node="node-a", dataset="ns/ds", cached_bytes=1000, capacity_bytes=TIER["quota"])]  # fmt: skip

    # Staged here when the node stops caching it: the directory waits for the unstage.
    keeper.table.put(Volume(volume_id="ns-ds", kind="shared", staging_path="/s", source="/d",
                            dataset="ns/ds", cache_dir=str(cache), cache_size=MiB))  # fmt: skip
    caches.datasets.apply(envelopes("ns/ds", RuntimeScaled(replicas=0, nodes=[]))[0])
    await caches.reconcile(view)
    assert cache.is_dir()
    assert caches.targets() == {"ns/ds": ([str(cache)], MiB)}  # staged: still reported
    keeper.table.remove("ns-ds")
    await caches.reconcile(view)
    assert not cache.exists() and tier.is_dir()
    assert caches.targets() == {}
    await caches.report()
    assert events.appended[-1][2] == [NodeCacheReported(
        node="node-a", dataset="ns/ds", cached_bytes=0, capacity_bytes=0)]  # fmt: skip


# -- a dataset of several mounts: one tree ---------------------------------------------------------

TWO = [{"name": "train", "path": "/vols/v1/train", "read_only": True, "volume": "v1"},
       {"name": "labels", "path": "/vols/v2/labels", "read_only": False, "volume": "v2"}]  # fmt: skip


def test_branches_are_directory_names_of_plain_paths():
    branches = parse_branches(json.dumps(TWO))
    assert branches == [Branch("train", "/vols/v1/train", True),
                        Branch("labels", "/vols/v2/labels", False)]  # fmt: skip
    assert parse_branches(TWO) == branches  # as the events carry them
    assert parse_branches(json.dumps(TWO[:1])) == [] and parse_branches("") == []  # one mount
    assert common_dir(branches) == "/vols"
    assert common_dir([Branch("a", "/x/a"), Branch("b", "/y")]) == "/"
    assert bind_source("/fs", "/vols", branches[1]) == "/fs/v2/labels"
    assert bind_source("/fs", "/vols/v1/train", branches[0]) == "/fs"
    for bad in ([TWO[0], {**TWO[1], "name": "train"}],  # two of one name
                [TWO[0], {**TWO[1], "name": "a/b"}], [TWO[0], {**TWO[1], "name": ".."}],
                [TWO[0], {**TWO[1], "name": ""}], [TWO[0], {**TWO[1], "path": "/vols/../etc"}],
                [TWO[0], {**TWO[1], "path": "relative"}], [TWO[0], {**TWO[1], "path": "/"}],
                [TWO[0], {**TWO[1], "read_only": "yes"}], [TWO[0], "not a mount"],
                "[not json", {"name": "x"}):  # fmt: skip
        with pytest.raises(InvalidArgument):
            parse_branches(bad if isinstance(bad, str) else json.dumps(bad))


def test_dataset_paths_map_through_the_mounts():
    branches = parse_branches(TWO)
    assert dataset_places(branches, "/") == [(branches[0], ""), (branches[1], "")]
    assert dataset_places(branches, "/labels/a/./b/") == [(branches[1], "a/b")]
    with pytest.raises(NotFound, match="no mount named 'private'"):
        dataset_places(branches, "/private/x")
    for bad in ("labels", "/labels/../../etc"):
        with pytest.raises(InvalidArgument):
            dataset_places(branches, bad)
    tree = Layout.of("/vols/v1/train", TWO)
    assert tree.base == "/vols" and tree.branches == tuple(branches)
    assert tree.places("/m", "/") == [("/m/v1/train", "/m/v1/train"),
                                      ("/m/v2/labels", "/m/v2/labels")]  # fmt: skip
    assert tree.places("/m", "/train/sub") == [("/m/v1/train", "/m/v1/train/sub")]
    fold = Datasets("node-a")
    fold.apply(envelopes("ns/ds", DatasetBound(runtime="ds", uid="u", volume_handle="ns-ds",
                                               pv="ns-ds", pvc="ds", mounts=TWO))[0])  # fmt: skip
    view = fold.views["ns/ds"]
    assert view.source == "/vols/v1/train" and Layout.of(view.source, view.mounts) == tree
    one = Layout.of("/data/ds", TWO[:1])
    assert one == Layout("/data/ds") and one.places("/m", "/sub") == [("/m", "/m/sub")]


def test_the_volume_context_of_a_tree():
    context = {"type": "dataset", "dataset": "ns/ds", "path": "/vols/v1/train",
               "readOnly": "true", "mounts": json.dumps(TWO)}  # fmt: skip
    parsed = DatasetContext.parse(context)
    assert parsed.tree == tuple(parse_branches(TWO))
    volume = Volume(volume_id="ns-ds", kind="shared", staging_path="/s", source="/vols/v1/train")
    parsed.apply(volume, "/data/datasets/ns-ds/fs")
    assert (volume.source, volume.fs_path, volume.mountpoint) == (
        "/vols", "/data/datasets/ns-ds/fs", "/data/datasets/ns-ds/fs")  # fmt: skip
    assert volume.read_only and [b.name for b in volume.tree] == ["train", "labels"]
    single = DatasetContext.parse({**context, "mounts": json.dumps(TWO[:1])})
    assert single.tree == ()  # one mount: the plain volume of `path`, as before trees
    plain = Volume(volume_id="ns-ds", kind="shared", staging_path="/s", source="/d")
    single.apply(plain, "/unused")
    assert (plain.source, plain.fs_path, plain.mountpoint) == ("/d", "", "/s")
    with pytest.raises(InvalidArgument, match="volume_context mounts"):
        DatasetContext.parse({**context, "mounts": json.dumps([TWO[0], TWO[0]])})
    assert Volume.from_json(volume.to_json()) == volume  # the state file keeps the tree


def test_a_tree_is_read_back_from_the_mount_table(tmp_path: Path, monkeypatch):
    staging = "/k/plugins/ns-ds/globalmount"
    info = tmp_path / "mountinfo"
    info.write_text(
        f"40 27 0:41 / {staging} ro,relatime - tmpfs {TREE_SOURCE} ro,size=64k\n"
        f"41 40 0:43 /v1/train {staging}/train ro,nosuid - fuse.cairn cairn:fs ro\n"
        f"42 40 0:43 /v2/labels {staging}/labels rw,nosuid - fuse.cairn cairn:fs rw\n"
        "43 27 0:43 / /data/datasets/ns-ds/fs rw,nosuid - fuse.cairn cairn:fs rw\n"
        f"44 27 0:44 / {staging}x/other rw - tmpfs x rw\n"
    )  # fmt: skip
    monkeypatch.setattr(mounts, "MOUNTINFO", str(info))
    assert mounts.mounted_at(staging).source == TREE_SOURCE
    assert mounts.mounted_at(f"{staging}/train").device == "0:43"
    assert mounts.branches_at(staging, "/vols") == [Branch("train", "/vols/v1/train", True),
                                                    Branch("labels", "/vols/v2/labels", False)]  # fmt: skip
    assert mounts.branches_at("/elsewhere", "/vols") == []
