"""The labels each node should carry for datasets, from the facts.

`data.cairn.io/f-<ns>-<name>` where the dataset is staged (kept after unstaging under
cleanPolicy OnRuntimeDeleted), `s-` and `s-c-` on its cache nodes, `dataset-num` counting
the datasets a node mounts or caches. A node's facts count only while its plugin keeps
reporting (`expiry`), so a node that died or whose NodeStage never happened carries none.
"""

from __future__ import annotations

from cairn import datasets as names
from cairn.kube.api import format_quantity
from cairn_cache_syncer.facts import Facts

OWNED = (names.PREFIX + "f-", names.PREFIX + "s-", names.DATASET_NUM)


def owned(key: str) -> bool:
    """Is this a label key the syncer manages?"""
    return key == names.DATASET_NUM or key.startswith(OWNED[:2])


def desired(facts: Facts, now: float, expiry: float) -> dict[str, dict[str, str]]:
    """node -> {label: value} for every node that should carry dataset labels."""
    out: dict[str, dict[str, str]] = {}
    counted: dict[str, set[str]] = {}
    for key, d in facts.datasets.items():
        if d.bound is None:
            continue
        namespace, _, name = key.partition("/")
        uid = d.bound.get("uid", "")
        for node, since in d.fused.items():
            if facts.node_alive(node, now, expiry, since):
                out.setdefault(node, {})[names.fuse_label(namespace, name, uid)] = "true"
                counted.setdefault(node, set()).add(key)
        quota = sum(t.get("quota", 0) for t in d.tiers)
        for node in d.nodes:
            if not facts.node_alive(node, now, expiry, d.assigned_at.get(node, 0.0)):
                continue
            labels = out.setdefault(node, {})
            labels[names.cache_label(namespace, name, uid)] = "true"
            if quota:
                labels[names.capacity_label(namespace, name, uid)] = format_quantity(quota)
            counted.setdefault(node, set()).add(key)
    for node, keys in counted.items():
        out[node][names.DATASET_NUM] = str(len(keys))
    return out


def diff(actual: dict[str, str], wanted: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(labels to set, owned labels to remove) to get from `actual` to `wanted`."""
    to_set = {k: v for k, v in wanted.items() if actual.get(k) != v}
    to_remove = sorted(k for k in actual if owned(k) and k not in wanted)
    return to_set, to_remove


def dataset_of_label(facts: Facts, key: str) -> str | None:
    """The dataset a syncer label belongs to (None for dataset-num or unknown ones)."""
    for dataset_key, d in facts.datasets.items():
        if d.bound is None and not d.labels:
            continue
        namespace, _, name = dataset_key.partition("/")
        uid = (d.bound or {}).get("uid", "")
        if uid and key in (names.fuse_label(namespace, name, uid),
                           names.cache_label(namespace, name, uid),
                           names.capacity_label(namespace, name, uid)):  # fmt: skip
            return dataset_key
        if any(key in labels for labels in d.labels.values()):
            return dataset_key
    return None
