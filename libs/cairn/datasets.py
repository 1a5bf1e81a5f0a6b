"""The names datasets share across services: resource kinds, node labels, volume handles.

A Dataset `<ns>/<name>` is served through one static PV + PVC named after it; its CSI
volume handle is `<ns>-<name>`. Nodes carry labels under `data.cairn.io/`:

- `f-<ns>-<name>`: the node has the dataset staged (a pod mounts it there);
- `s-<ns>-<name>`: the node caches the dataset (one of the runtime's cache nodes), with
  `s-c-<ns>-<name>` = the node's cache capacity for it (a quantity such as `2Gi`);
- `dataset-num`: how many datasets the node mounts or caches.

A label name may have at most 63 characters: when `<ns>-<name>` makes one longer, the
dataset's uid stands in for it. The admission webhook, the syncer and the node plugin all
spell them here.
"""

from __future__ import annotations

from cairn.kube.api import Kind

GROUP = "data.cairn.io"
PREFIX = GROUP + "/"
DATASET = Kind("Dataset", GROUP, "v1alpha1", "datasets", True, True)
RUNTIME = Kind("CairnRuntime", GROUP, "v1alpha1", "cairnruntimes", True, True)
DATALOAD = Kind("DataLoad", GROUP, "v1alpha1", "dataloads", True, True)

DATASET_NUM = PREFIX + "dataset-num"
# On the PV and PVC of a dataset: which one they serve.
DATASET_LABEL = PREFIX + "dataset"
DATASET_NAMESPACE_LABEL = PREFIX + "dataset-namespace"
MAX_NAME = 63


def dataset_id(namespace: str, name: str) -> str:
    """The aggregate id of a dataset (and of its runtime): `<ns>/<name>`."""
    return f"{namespace}/{name}"


def volume_handle(namespace: str, name: str) -> str:
    return f"{namespace}-{name}"


def _label(kind: str, namespace: str, name: str, uid: str) -> str:
    part = f"{kind}-{namespace}-{name}"
    if len(part) > MAX_NAME:
        part = f"{kind}-{uid}"
    return PREFIX + part


def fuse_label(namespace: str, name: str, uid: str) -> str:
    """Label of nodes that have the dataset staged."""
    return _label("f", namespace, name, uid)


def cache_label(namespace: str, name: str, uid: str) -> str:
    """Label of the dataset's cache nodes."""
    return _label("s", namespace, name, uid)


def capacity_label(namespace: str, name: str, uid: str) -> str:
    """Label with a cache node's capacity for the dataset."""
    return _label("s-c", namespace, name, uid)


def sched_label(name: str) -> str:
    """The pod label that asks for required (not preferred) affinity to the cache nodes of
    dataset `name` (value `required`)."""
    return f"{PREFIX}dataset.{name}.sched"


def cache_dir_name(dataset: str) -> str:
    """The directory under a tier's path that holds one dataset's cache (`<ns>-<name>`)."""
    namespace, _, name = dataset.partition("/")
    return volume_handle(namespace, name)
