"""A Dataset bound to its runtime: its sources resolved, and the static PV + PVC a pod
mounts (`claimName: <dataset>`), named after the dataset.

A mount is `cairn://<volume>[/path]` (a Cairn CSI volume, by id or by the name it was
created with) or `pvc://<claim>[/path]` (a claim of the dataset's namespace bound to a
csi.cairn.io PV). Either way it ends as a directory of the Cairn file system.

A dataset of several mounts is served to pods as one tree: a directory per mount, named by
the mount's `name` (by default the last element of its path, or the volume or claim), so
names must be single path components and unique. The PV keeps the first mount's directory
as `path` (what a node plugin from before trees mounts); `mounts` lists them all.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any
from urllib.parse import urlsplit

from cairn import datasets as names
from cairn.errors import InvalidArgument, NotFound
from cairn.kube.api import Obj

DRIVER = "csi.cairn.io"
CAPACITY = "100Pi"  # what the PV and PVC say: a dataset is not a sized volume
NAME_MAX = 255  # bytes of one path component (the kernel's limit)


def _clean(path: str) -> str:
    if not path:
        return ""
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise InvalidArgument(f"mount path {path!r} must not contain '.' or '..'")
    return "/".join(parts)


def parse_mount(mount_point: str) -> tuple[str, str, str]:
    """(scheme, volume or claim, path inside it) of a Dataset mountPoint."""
    parts = urlsplit(mount_point)
    if parts.scheme not in ("cairn", "pvc") or not parts.netloc:
        raise InvalidArgument(
            f"mountPoint {mount_point!r}: use cairn://<volume>[/path] or pvc://<claim>[/path]"
        )
    return parts.scheme, parts.netloc, _clean(parts.path)


def volume_path(volumes: dict[str, dict], ref: str) -> str | None:
    """The file system directory of a Cairn volume, by id or by its creation name."""
    if ref in volumes and volumes[ref].get("path"):
        return volumes[ref]["path"]
    for info in volumes.values():
        if info.get("name") == ref and info.get("path"):
            return info["path"]
    return None


def mount_name(i: int, given: str, sub: str, ref: str) -> str:
    """The directory name mount `i` gets in the dataset's tree: `given`, else the last
    element of its path, else the volume or claim. InvalidArgument unless it is one plain
    path component (pods see it as a directory name)."""
    name = given or (sub.rsplit("/", 1)[-1] if sub else ref)
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise InvalidArgument(f"mount {i}: name {name!r} is not a directory name (one path "
                              "component, not '.' or '..')")  # fmt: skip
    if len(name.encode()) > NAME_MAX:
        raise InvalidArgument(f"mount {i}: name {name[:32]!r}... is longer than {NAME_MAX} bytes")
    return name


def check_unique(mounts: list[dict[str, Any]]) -> None:
    """InvalidArgument when two mounts would be the same directory of the tree."""
    first: dict[str, int] = {}
    for i, mount in enumerate(mounts):
        j = first.setdefault(mount["name"], i)
        if j != i:
            raise InvalidArgument(f"mounts {j} and {i} are both named {mount['name']!r}: give "
                                  "one of them another name")  # fmt: skip


def resolve_mounts(dataset: Obj, volumes: dict[str, dict], claim_pv) -> list[dict[str, Any]]:
    """The dataset's mounts as [{name, path, read_only, volume}] with `path` a directory of
    the file system and `name` its directory in the dataset's tree. `claim_pv(namespace,
    claim)` gives the PV a claim is bound to (or None). NotFound (a source that is not there
    yet) or InvalidArgument (one that never will be, or a name that cannot be a directory)."""
    namespace = dataset["metadata"]["namespace"]
    out = []
    for i, mount in enumerate(dataset.get("spec", {}).get("mounts") or []):
        scheme, ref, sub = parse_mount(mount.get("mountPoint", ""))
        if scheme == "cairn":
            base, volume = volume_path(volumes, ref), ref
            if base is None:
                raise NotFound(f"mount {i}: Cairn volume {ref!r} is not known")
        else:
            pv = claim_pv(namespace, ref)
            if pv is None:
                raise NotFound(f"mount {i}: claim {namespace}/{ref} is not bound to a volume")
            csi = pv.get("spec", {}).get("csi") or {}
            if csi.get("driver") != DRIVER:
                raise InvalidArgument(f"mount {i}: claim {ref!r} is not a {DRIVER} volume")
            volume = csi.get("volumeHandle", "")
            base = (csi.get("volumeAttributes") or {}).get("path") or volume_path(volumes, volume)
            if not base:
                raise NotFound(f"mount {i}: volume {volume} of claim {ref!r} has no directory")
        name = mount_name(i, str(mount.get("name") or ""), sub, ref)
        path = posixpath.join(base, sub) if sub else base
        out.append({"name": name, "path": path, "read_only": mount.get("readOnly", True),
                    "volume": volume})  # fmt: skip
    if not out:
        raise InvalidArgument("the dataset has no mounts")
    check_unique(out)
    return out


def read_only(dataset: Obj, mounts: list[dict]) -> bool:
    modes = dataset.get("spec", {}).get("accessModes") or ["ReadOnlyMany"]
    writable = any(m in ("ReadWriteMany", "ReadWriteOnce") for m in modes)
    return not writable or all(m["read_only"] for m in mounts)


def access_modes(dataset: Obj) -> list[str]:
    return list(dataset.get("spec", {}).get("accessModes") or ["ReadOnlyMany"])


def tiers_of(runtime: Obj) -> list[dict[str, Any]]:
    """The runtime's tiered store levels with quotas in bytes."""
    from cairn.kube.api import parse_quantity

    levels = (runtime.get("spec", {}).get("tieredStore") or {}).get("levels") or []
    return [{"mediumType": lv.get("mediumType", "SSD"), "path": lv.get("path", ""),
             "quota": parse_quantity(lv.get("quota")), "high": str(lv.get("high", "0.95")),
             "low": str(lv.get("low", "0.7"))} for lv in levels]  # fmt: skip


def pv_and_pvc(dataset: Obj, runtime: Obj, mounts: list[dict]) -> tuple[Obj, Obj]:
    """The static PV and the PVC bound to it, named after the dataset."""
    m = dataset["metadata"]
    namespace, name = m["namespace"], m["name"]
    handle = names.volume_handle(namespace, name)
    ro = read_only(dataset, mounts)
    attributes = {"type": "dataset", "dataset": names.dataset_id(namespace, name),
                  "path": mounts[0]["path"], "readOnly": "true" if ro else "false",
                  "mounts": json.dumps(mounts, sort_keys=True)}  # fmt: skip
    tiers = tiers_of(runtime)
    if tiers:
        attributes["cacheDir"] = tiers[0]["path"]
        attributes["cacheSize"] = str(tiers[0]["quota"])
        attributes["cacheMedium"] = tiers[0]["mediumType"]
    owned = {names.DATASET_LABEL: name, names.DATASET_NAMESPACE_LABEL: namespace}
    pv = {
        "metadata": {"name": handle, "labels": dict(owned)},
        "spec": {
            "capacity": {"storage": CAPACITY},
            "accessModes": access_modes(dataset),
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "volumeMode": "Filesystem",
            "claimRef": {
                "namespace": namespace,
                "name": name,
                "kind": "PersistentVolumeClaim",
                "apiVersion": "v1",
            },  # fmt: skip
            "csi": {
                "driver": DRIVER,
                "volumeHandle": handle,
                "readOnly": ro,
                "volumeAttributes": attributes,
            },  # fmt: skip
        },
    }
    pvc = {
        "metadata": {"name": name, "namespace": namespace, "labels": dict(owned)},
        "spec": {
            "accessModes": access_modes(dataset),
            "storageClassName": "",
            "volumeName": handle,
            "volumeMode": "Filesystem",
            "resources": {"requests": {"storage": CAPACITY}},
        },
    }
    return pv, pvc


def ours(obj: Obj | None, namespace: str, name: str) -> bool:
    """Is this PV or PVC the one a dataset's binding made?"""
    if obj is None:
        return False
    lab = obj.get("metadata", {}).get("labels") or {}
    return (lab.get(names.DATASET_LABEL), lab.get(names.DATASET_NAMESPACE_LABEL)) == (
        name, namespace)  # fmt: skip


def pods_using(pods: list[Obj], namespace: str, claim: str) -> list[str]:
    """Names of the pods (not finished) in `namespace` that mount `claim`."""
    out = []
    for pod in pods:
        m = pod.get("metadata", {})
        if m.get("namespace") != namespace:
            continue
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            continue
        for vol in pod.get("spec", {}).get("volumes") or []:
            if (vol.get("persistentVolumeClaim") or {}).get("claimName") == claim:
                out.append(m.get("name", ""))
                break
    return sorted(out)
