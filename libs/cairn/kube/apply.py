"""Applies manifests through the KubeAPI: the plain case of `kubectl apply -k`.

`load_kustomization(folder)` reads a kustomization's `resources` (manifest files, and folders
with a kustomization of their own, in order) and does what its `namespace`, `labels`,
`commonLabels`, `commonAnnotations` and `images` say, as kustomize would; any other field
that would change the objects is refused rather than ignored. `kind_of(obj)` finds an
object's resource type from its apiVersion and kind: the plural is derived (a table holds
the irregular ones), the scope comes from a table of cluster-scoped kinds or from the CRDs
being applied. `apply()` creates each object, or replaces it when it exists already, so
applying twice changes nothing; CRDs go first and are waited for until Established.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from cairn.errors import AlreadyExists, CairnError, DeadlineExceeded, InvalidArgument
from cairn.kube.api import Conflict, Kind, KubeAPI, Obj

CRD = Kind(
    "CustomResourceDefinition", "apiextensions.k8s.io", "v1", "customresourcedefinitions", False
)
# Kinds whose objects live outside namespaces (custom kinds: their CRD's spec.scope).
CLUSTER_SCOPED = frozenset({
    "APIService", "CertificateSigningRequest", "ClusterRole", "ClusterRoleBinding",
    "ComponentStatus", "CSIDriver", "CSINode", "CustomResourceDefinition", "FlowSchema",
    "IngressClass", "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding",
    "MutatingWebhookConfiguration", "Namespace", "Node", "PersistentVolume", "PriorityClass",
    "PriorityLevelConfiguration", "RuntimeClass", "StorageClass", "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding", "ValidatingWebhookConfiguration", "VolumeAttachment",
    "VolumeAttributesClass",
})  # fmt: skip
IRREGULAR_PLURALS = {"Endpoints": "endpoints"}
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
# Fields of a kustomization this loader does (or that change no object).
SUPPORTED = frozenset({"apiVersion", "kind", "resources", "namespace", "labels",
                       "commonLabels", "commonAnnotations", "images"})  # fmt: skip
ORDER = {"Namespace": 0, "CustomResourceDefinition": 1}  # then everything else, in order


# -- resource types ---------------------------------------------------------------------------


def plural(kind: str) -> str:
    """The resource name of a kind, the way the API server names built-in ones."""
    if kind in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[kind]
    word = kind.lower()
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return word[:-1] + "ies"
    return word + "s"


def custom_kinds(objects: Iterable[Obj]) -> dict[tuple[str, str], tuple[str, bool]]:
    """(group, kind) -> (plural, namespaced) of the CRDs among `objects`."""
    out = {}
    for obj in objects:
        if obj.get("kind") == "CustomResourceDefinition":
            spec = obj.get("spec") or {}
            names = spec.get("names") or {}
            out[(spec.get("group", ""), names.get("kind", ""))] = (
                names.get("plural") or plural(names.get("kind", "")),
                spec.get("scope", "Namespaced") == "Namespaced",
            )
    return out


def kind_of(obj: Obj, custom: dict[tuple[str, str], tuple[str, bool]] | None = None) -> Kind:
    """The Kind an object is created as (custom: from `custom_kinds` of the CRDs)."""
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    if not api_version or not kind:
        raise InvalidArgument(f"object {_name(obj)} lacks apiVersion or kind")
    group, _, version = api_version.rpartition("/")
    if (group, kind) in (custom or {}):
        resource, namespaced = (custom or {})[(group, kind)]
    else:
        resource, namespaced = plural(kind), kind not in CLUSTER_SCOPED
    return Kind(kind, group, version, resource, namespaced)


def _name(obj: Obj) -> str:
    m = obj.get("metadata") or {}
    where = f"{m['namespace']}/" if m.get("namespace") else ""
    return f"{obj.get('kind', '?')} {where}{m.get('name', '?')}"


# -- loading ----------------------------------------------------------------------------------


def load_manifests(path: Path) -> list[Obj]:
    """The objects of a YAML file (empty documents skipped; a List's items unpacked)."""
    out: list[Obj] = []
    for doc in yaml.safe_load_all(Path(path).read_text()):
        if not doc:
            continue
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{path}: a document is not an object")
        if doc.get("kind", "").endswith("List") and "items" in doc:
            out.extend(doc["items"] or [])
        else:
            out.append(doc)
    return out


def load_kustomization(folder: Path) -> list[Obj]:
    """The objects `kubectl apply -k folder` would send (for the fields in SUPPORTED)."""
    folder = Path(folder)
    found = [folder / n for n in KUSTOMIZATION_FILES if (folder / n).is_file()]
    if not found:
        raise InvalidArgument(f"{folder} has no kustomization.yaml")
    spec = yaml.safe_load(found[0].read_text()) or {}
    unknown = sorted(set(spec) - SUPPORTED)
    if unknown:
        raise InvalidArgument(f"{found[0]}: {', '.join(unknown)} not supported by cairn.kube.apply")
    objects: list[Obj] = []
    for entry in spec.get("resources") or []:
        if "://" in entry or entry.startswith(("github.com/", "git@")):
            raise InvalidArgument(f"{found[0]}: remote resource {entry} not supported")
        path = folder / entry
        objects.extend(load_kustomization(path) if path.is_dir() else load_manifests(path))
    custom = custom_kinds(objects)
    for obj in objects:
        _transform(obj, spec, custom)
    return objects


def _transform(obj: Obj, spec: dict, custom: dict) -> None:
    meta = obj.setdefault("metadata", {})
    namespace = spec.get("namespace")
    if namespace and kind_of(obj, custom).namespaced:
        meta["namespace"] = namespace
    if namespace and obj.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
        for subject in obj.get("subjects") or []:  # kustomize's `defaultOnly`
            if subject.get("kind") == "ServiceAccount" and subject.get("namespace") in (
                None, "", "default"):  # fmt: skip
                subject["namespace"] = namespace
    for entry in spec.get("labels") or []:
        pairs = entry.get("pairs") or {}
        meta["labels"] = {**(meta.get("labels") or {}), **pairs}
        selectors = bool(entry.get("includeSelectors"))
        _label_pods(obj, pairs, templates=selectors or bool(entry.get("includeTemplates")),
                    selectors=selectors)  # fmt: skip
    if spec.get("commonLabels"):
        meta["labels"] = {**(meta.get("labels") or {}), **spec["commonLabels"]}
        _label_pods(obj, spec["commonLabels"], templates=True, selectors=True)
    if spec.get("commonAnnotations"):
        meta["annotations"] = {**(meta.get("annotations") or {}), **spec["commonAnnotations"]}
    for image in spec.get("images") or []:
        _set_image(obj, image)


def _label_pods(obj: Obj, pairs: dict, *, templates: bool, selectors: bool) -> None:
    body = obj.get("spec")
    if not isinstance(body, dict) or not pairs:
        return
    template = body.get("template")
    if templates and isinstance(template, dict):
        tmeta = template.setdefault("metadata", {})
        tmeta["labels"] = {**(tmeta.get("labels") or {}), **pairs}
    if not selectors:
        return
    if obj.get("kind") == "Service":
        body["selector"] = {**(body.get("selector") or {}), **pairs}
    elif isinstance(body.get("selector"), dict):
        selector = body["selector"]
        selector["matchLabels"] = {**(selector.get("matchLabels") or {}), **pairs}


def _set_image(obj: Obj, image: dict) -> None:
    pod = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    for container in (pod.get("containers") or []) + (pod.get("initContainers") or []):
        current = container.get("image", "")
        name, tag = current, ""
        if "@" not in current and ":" in current.rsplit("/", 1)[-1]:
            name, tag = current.rsplit(":", 1)
        if name != image.get("name"):
            continue
        name = image.get("newName") or name
        if image.get("digest"):
            container["image"] = f"{name}@{image['digest']}"
        else:
            new_tag = image.get("newTag") or tag
            container["image"] = f"{name}:{new_tag}" if new_tag else name


# -- applying ---------------------------------------------------------------------------------


async def apply_one(api: KubeAPI, kind: Kind, obj: Obj) -> Obj:
    """Creates `obj`, or replaces the live object of that name (its resourceVersion kept)."""
    body = copy.deepcopy(obj)
    try:
        return await api.create(kind, body)
    except AlreadyExists:
        pass
    m = body["metadata"]
    for _ in range(5):  # someone else wrote it meanwhile: read again
        live = await api.get(kind, m["name"], m.get("namespace"))
        m["resourceVersion"] = live["metadata"]["resourceVersion"]
        try:
            return await api.update(kind, body)
        except Conflict:
            continue
    raise Conflict(f"{_name(obj)} kept changing while it was applied")


async def apply(api: KubeAPI, objects: Iterable[Obj], timeout: float = 60.0) -> list[Obj]:
    """Applies the objects, Namespaces and CRDs first; waits for the CRDs to be Established
    before anything after them. Returns what the API answered, in the order applied."""
    ordered = sorted(objects, key=lambda o: ORDER.get(o.get("kind", ""), len(ORDER)))
    custom = custom_kinds(ordered)
    done: list[Obj] = []
    crds: list[str] = []
    for obj in ordered:
        if crds and obj.get("kind") != "CustomResourceDefinition":
            await wait_established(api, crds, timeout)
            crds = []
        done.append(await apply_one(api, kind_of(obj, custom), obj))
        if obj.get("kind") == "CustomResourceDefinition":
            crds.append(obj["metadata"]["name"])
    if crds:
        await wait_established(api, crds, timeout)
    return done


async def _served(api: KubeAPI, crd: Obj) -> bool:
    """Does a list of the CRD's objects answer? Established comes a moment before the
    apiserver's storage for them is ready ("storage is (re)initializing", a 503)."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    version = next((v["name"] for v in spec.get("versions") or [] if v.get("served")), None)
    if version is None:
        return True
    kind = Kind(names.get("kind", ""), spec.get("group", ""), version, names.get("plural", ""),
                spec.get("scope") == "Namespaced")  # fmt: skip
    try:
        await api.list(kind)
    except CairnError:
        return False
    return True


def established(crd: Obj) -> bool:
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


async def wait_established(api: KubeAPI, names: Iterable[str], timeout: float = 60.0) -> None:
    """Waits until every named CRD reports condition Established (its API is served)."""
    waiting = list(names)
    deadline = time.monotonic() + timeout
    while waiting:
        crds: list[Any] = [await api.get(CRD, n) for n in waiting]
        waiting = [n for n, crd in zip(waiting, crds, strict=True)
                   if not established(crd) or not await _served(api, crd)]  # fmt: skip
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"CRDs not Established after {timeout:.0f}s: {', '.join(waiting)}"
            )
        await asyncio.sleep(0.1)
