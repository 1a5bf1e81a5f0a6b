"""The external-provisioner pattern for csi.cairn.io: PVCs in, volumes and PVs out.

Two reconcilers over watch caches of PVCs, PVs, StorageClasses, CSINodes and Nodes:

- claims (key `namespace/name`): a Pending PVC of a StorageClass that names csi.cairn.io
  and has no volume yet gets one. Immediate binding provisions at once; WaitForFirstConsumer
  waits for the scheduler's `volume.kubernetes.io/selected-node` and asks for that node's
  topology. The volume is named `pvc-<PVC uid>`, so CreateVolume is idempotent across
  retries, restarts and replicas; the PV is then written with a claimRef, which the
  kube-controller-manager's binder completes.
- volumes (key: PV name): a PV this provisioner made that is Released with reclaim policy
  Delete loses its volume (DeleteVolume), then its finalizer and itself; Retain keeps both.

Temporary failures retry per object with exponential backoff (cairn.kube.reconcile);
a RESOURCE_EXHAUSTED answer for a WaitForFirstConsumer claim drops selected-node so the
scheduler tries another node; a permanent failure becomes a Warning event on the PVC.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from cairn.errors import (
    AlreadyExists,
    CairnError,
    ConflictError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TemporaryError,
)
from cairn.events.types import PersistentVolumeCreated, PersistentVolumeDeleted
from cairn.kube.api import (
    CSI_NODE,
    EVENT,
    NODE,
    PV,
    PVC,
    SECRET,
    STORAGE_CLASS,
    KubeAPI,
    Obj,
    annotations,
    deleting,
    finalizers,
    format_quantity,
    key_of,
    labels,
    now_rfc3339,
    parse_quantity,
)
from cairn.kube.reconcile import RECONCILE_BACKOFF, Controller, Informer
from cairn.retry import Backoff
from cairn.rpc.gen import csi_pb2

log = logging.getLogger(__name__)

DRIVER = "csi.cairn.io"
ANN_STORAGE_PROVISIONER = "volume.kubernetes.io/storage-provisioner"
ANN_BETA_STORAGE_PROVISIONER = "volume.beta.kubernetes.io/storage-provisioner"
ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"
ANN_PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
ANN_DELETION_SECRET_NAME = "volume.kubernetes.io/provisioner-deletion-secret-name"
ANN_DELETION_SECRET_NAMESPACE = "volume.kubernetes.io/provisioner-deletion-secret-namespace"
FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"
PREFIX = "csi.storage.k8s.io/"
FSTYPE = PREFIX + "fstype"
PVC_NAME = PREFIX + "pvc/name"
PVC_NAMESPACE = PREFIX + "pvc/namespace"
PV_NAME = PREFIX + "pv/name"
IDENTITY_ATTRIBUTE = "storage.kubernetes.io/csiProvisionerIdentity"
# StorageClass secret parameters: (parameter prefix, PV csi field) per use.
SECRETS = {
    "provisioner": None,
    "controller-publish": "controllerPublishSecretRef",
    "node-stage": "nodeStageSecretRef",
    "node-publish": "nodePublishSecretRef",
    "controller-expand": "controllerExpandSecretRef",
}
TEMPLATE = re.compile(r"\$\{([^}]*)\}")

Mode = csi_pb2.VolumeCapability.AccessMode
ACCESS_MODES = {
    "ReadWriteOnce": Mode.SINGLE_NODE_WRITER,
    "ReadOnlyMany": Mode.MULTI_NODE_READER_ONLY,
    "ReadWriteMany": Mode.MULTI_NODE_MULTI_WRITER,
    "ReadWriteOncePod": Mode.SINGLE_NODE_SINGLE_WRITER,
}


# -- what a claim asks for (pure functions) --------------------------------------------------


def claims_driver(pvc: Obj, sc: Obj | None, driver: str) -> bool:
    """Is `pvc` ours: its provisioner annotation names `driver` (or, before the controller
    manager set it, its StorageClass does)."""
    if sc is None or sc.get("provisioner") != driver:
        return False
    ann = annotations(pvc)
    named = ann.get(ANN_STORAGE_PROVISIONER) or ann.get(ANN_BETA_STORAGE_PROVISIONER)
    return named in (None, driver)


def volume_name(pvc: Obj) -> str:
    return f"pvc-{pvc['metadata']['uid']}"


def fill_template(text: str, pvc: Obj, pv_name: str, what: str) -> str:
    """`text` with ${pvc.name}, ${pvc.namespace} and ${pv.name} filled in."""
    values = {
        "pvc.name": pvc["metadata"]["name"],
        "pvc.namespace": pvc["metadata"].get("namespace", ""),
        "pv.name": pv_name,
    }

    def fill(match: re.Match) -> str:
        if match.group(1) not in values:
            raise InvalidArgument(
                f"{what}: unknown template ${{{match.group(1)}}} "
                f"(known: {', '.join(sorted(values))})"
            )
        return values[match.group(1)]

    return TEMPLATE.sub(fill, text)


def secret_ref(parameters: dict[str, str], use: str, pvc: Obj, pv_name: str) -> Obj | None:
    """{name, namespace} of the secret the StorageClass names for `use`, or None."""
    name = parameters.get(f"{PREFIX}{use}-secret-name")
    namespace = parameters.get(f"{PREFIX}{use}-secret-namespace")
    if name is None and namespace is None:
        return None
    if not name or not namespace:
        raise InvalidArgument(
            f"StorageClass names {use}-secret-name and "
            f"{use}-secret-namespace together or not at all"
        )
    return {
        "name": fill_template(name, pvc, pv_name, f"{use}-secret-name"),
        "namespace": fill_template(namespace, pvc, pv_name, f"{use}-secret-namespace"),
    }


def volume_parameters(sc: Obj, pvc: Obj, pv_name: str, extra_metadata: bool = True) -> dict:
    """The StorageClass parameters minus csi.storage.k8s.io/* keys, plus the claim's
    name, namespace and PV name (external-provisioner's --extra-create-metadata)."""
    params = {k: str(v) for k, v in (sc.get("parameters") or {}).items()
              if not k.startswith(PREFIX)}  # fmt: skip
    if extra_metadata:
        params[PVC_NAME] = pvc["metadata"]["name"]
        params[PVC_NAMESPACE] = pvc["metadata"].get("namespace", "")
        params[PV_NAME] = pv_name
    return params


def capabilities(pvc: Obj, sc: Obj) -> list[Any]:
    """The CSI volume capabilities of a claim's access modes and volume mode."""
    spec = pvc.get("spec", {})
    modes = spec.get("accessModes") or []
    if not modes:
        raise InvalidArgument("the claim names no access mode")
    fstype = (sc.get("parameters") or {}).get(FSTYPE, "")
    caps = []
    for mode in modes:
        if mode not in ACCESS_MODES:
            raise InvalidArgument(f"unknown access mode {mode!r}")
        cap = csi_pb2.VolumeCapability(access_mode=Mode(mode=ACCESS_MODES[mode]))
        if spec.get("volumeMode") == "Block":
            cap.block.SetInParent()
        else:
            cap.mount.fs_type = fstype
            cap.mount.mount_flags.extend(sc.get("mountOptions") or [])
        caps.append(cap)
    return caps


def node_segments(node: Obj | None, csinode: Obj | None, driver: str) -> dict[str, str] | None:
    """The topology of `node` for `driver`: its labels under the keys the driver's CSINode
    entry lists (None when the driver is not registered there)."""
    if node is None or csinode is None:
        return None
    for entry in csinode.get("spec", {}).get("drivers") or []:
        if entry.get("name") == driver:
            node_labels = labels(node)
            return {k: node_labels[k] for k in entry.get("topologyKeys") or []
                    if k in node_labels}  # fmt: skip
    return None


def allowed_segments(sc: Obj) -> list[dict[str, str]]:
    """The StorageClass's allowedTopologies, each term expanded to plain segments."""
    out: list[dict[str, str]] = []
    for term in sc.get("allowedTopologies") or []:
        exprs = term.get("matchLabelExpressions") or []
        keys = [e["key"] for e in exprs]
        for values in itertools.product(*[e.get("values") or [] for e in exprs]):
            out.append(dict(zip(keys, values, strict=True)))
    return out


def matches(segments: dict[str, str], allowed: dict[str, str]) -> bool:
    return all(segments.get(k) == v for k, v in allowed.items())


def topology_requirement(
    sc: Obj, selected: str | None, nodes: dict[str, Obj], csinodes: dict[str, Obj], driver: str
) -> Any | None:
    """The CreateVolume accessibility requirements: the selected node's topology
    (WaitForFirstConsumer), else the allowed topologies, else every node the driver runs on
    (None when nothing is known)."""
    allowed = allowed_segments(sc)
    if selected:
        segments = node_segments(nodes.get(selected), csinodes.get(selected), driver)
        if segments is None:
            raise TemporaryError(f"node {selected} has no {driver} driver registered (CSINode)")
        if allowed and not any(matches(segments, a) for a in allowed):
            raise InvalidArgument(
                f"selected node {selected} is outside the StorageClass's allowedTopologies"
            )
        terms = [segments] if segments else []
    elif allowed:
        terms = allowed
    else:
        found = (node_segments(n, csinodes.get(name), driver) for name, n in nodes.items())
        unique = {tuple(sorted(s.items())) for s in found if s}
        terms = [dict(t) for t in sorted(unique)]
    if not terms:
        return None
    req = csi_pb2.TopologyRequirement()
    for t in terms:
        req.requisite.add(segments=t)
        req.preferred.add(segments=t)
    return req


def node_affinity(volume: Any) -> Obj | None:
    """The PV's required nodeAffinity from the volume's accessible topology."""
    terms = [{"matchExpressions": [{"key": k, "operator": "In", "values": [v]}
                                   for k, v in sorted(t.segments.items())]}
             for t in volume.accessible_topology if t.segments]  # fmt: skip
    return {"required": {"nodeSelectorTerms": terms}} if terms else None


def build_pv(
    pvc: Obj,
    sc: Obj,
    volume: Any,
    pv_name: str,
    driver: str,
    identity: str,
    refs: dict[str, Obj | None],
) -> Obj:
    """The PersistentVolume of a provisioned volume."""
    spec = pvc.get("spec", {})
    requested = parse_quantity((spec.get("resources", {}).get("requests") or {}).get("storage"))
    size = volume.capacity_bytes or requested
    attributes = dict(volume.volume_context)
    attributes[IDENTITY_ATTRIBUTE] = identity
    csi: Obj = {"driver": driver, "volumeHandle": volume.volume_id, "volumeAttributes": attributes}
    fstype = (sc.get("parameters") or {}).get(FSTYPE)
    if fstype:
        csi["fsType"] = fstype
    for use, field in SECRETS.items():
        if field and refs.get(use):
            csi[field] = refs[use]
    ann = {ANN_PROVISIONED_BY: driver}
    if refs.get("provisioner"):
        ann[ANN_DELETION_SECRET_NAME] = refs["provisioner"]["name"]
        ann[ANN_DELETION_SECRET_NAMESPACE] = refs["provisioner"]["namespace"]
    pv_spec: Obj = {
        "capacity": {"storage": format_quantity(size)},
        "accessModes": list(spec.get("accessModes") or []),
        "volumeMode": spec.get("volumeMode") or "Filesystem",
        "persistentVolumeReclaimPolicy": sc.get("reclaimPolicy") or "Delete",
        "storageClassName": sc["metadata"]["name"],
        "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                     "namespace": pvc["metadata"]["namespace"],
                     "name": pvc["metadata"]["name"], "uid": pvc["metadata"]["uid"],
                     "resourceVersion": pvc["metadata"].get("resourceVersion", "")},
        "csi": csi,
    }  # fmt: skip
    if sc.get("mountOptions"):
        pv_spec["mountOptions"] = list(sc["mountOptions"])
    affinity = node_affinity(volume)
    if affinity:
        pv_spec["nodeAffinity"] = affinity
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "annotations": ann, "finalizers": [FINALIZER]},
            "spec": pv_spec}  # fmt: skip


# -- the reconcilers --------------------------------------------------------------------------


class Provisioner:
    """Watches the API and reconciles claims and volumes; see the module docstring.

    `csi` is a cairn.csi.client.ControllerClient; `events` appends to the event stream
    (an OutboxedStore, or None); `after_create` is called between CreateVolume and the PV
    write (tests use it to stop a provisioner at the worst moment).
    """

    def __init__(
        self,
        api: KubeAPI,
        csi: Any,
        events: Any = None,
        *,
        driver: str = DRIVER,
        identity: str = "cairn-provisioner",
        workers: int = 8,
        backoff: Backoff = RECONCILE_BACKOFF,
        extra_metadata: bool = True,
        after_create: Callable[[str], Awaitable[None]] | None = None,
        history: Any = None,
    ):
        self.api, self.csi, self.events = api, csi, events
        self.driver, self.identity, self.extra_metadata = driver, identity, extra_metadata
        self.after_create = after_create
        self.history = history  # an EventStore to rebuild in-flight work from, or None
        self.pvcs = Informer(api, PVC)
        self.pvs = Informer(api, PV)
        self.classes = Informer(api, STORAGE_CLASS)
        self.csinodes = Informer(api, CSI_NODE)
        self.nodes = Informer(api, NODE)
        self.informers = (self.pvcs, self.pvs, self.classes, self.csinodes, self.nodes)
        self.claims = Controller(
            "claim",
            self.sync_claim,
            workers=workers,
            backoff=backoff,
            on_permanent=self.claim_failed,
        )
        self.volumes = Controller("volume", self.sync_volume, workers=workers, backoff=backoff)
        self.pvcs.add_handler(self.claims.handler())
        self.pvs.add_handler(self.volumes.handler())
        self.pvs.add_handler(self._pv_changed)
        self.classes.add_handler(self._class_changed)
        self.nodes.add_handler(self._node_changed)
        self.csinodes.add_handler(self._node_changed)

    async def run(self) -> None:
        """Caches first, then the workers; runs until cancelled."""
        tasks = [asyncio.create_task(i.run(), name=f"watch {i.kind.plural}")
                 for i in self.informers]  # fmt: skip
        try:
            await asyncio.gather(*(i.synced.wait() for i in self.informers))
            log.info(
                "caches synced: %d claims, %d volumes", len(self.pvcs.cache), len(self.pvs.cache)
            )
            if self.history is not None:
                await self.recover()
            tasks += [
                asyncio.create_task(self.claims.run()),
                asyncio.create_task(self.volumes.run()),
            ]
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def recover(self) -> None:
        """After a restart: volumes this provisioner asked for (VolumeRequested naming a PV)
        that have neither a PV nor their claim any more were orphaned between CreateVolume
        and the PV write while the claim went away: delete them. Claims still there are
        simply provisioned again (CreateVolume is idempotent by name)."""
        requested: dict[str, tuple[str, str]] = {}  # volume id -> (PV name, claim key)
        end = await self.history.last_sequence()
        if not end:
            return
        subjects = self.history.aggregate_subjects("volume")
        async with contextlib.aclosing(self.history.read_all(filter_subject=subjects)) as it:
            async for rec in it:
                env = rec.envelope
                if env.type == "VolumeRequested":
                    params = env.payload.get("parameters") or {}
                    if params.get(PV_NAME):
                        key = f"{params.get(PVC_NAMESPACE, '')}/{params.get(PVC_NAME, '')}"
                        requested[env.aggregate_id] = (params[PV_NAME], key)
                elif env.type == "VolumeDeleted":
                    requested.pop(env.aggregate_id, None)
                if rec.sequence >= end:
                    break
        for vid, (pv_name, claim_key) in requested.items():
            pvc = self.pvcs.get(claim_key)
            if self.pvs.get(pv_name) is not None or (pvc and volume_name(pvc) == pv_name):
                continue
            try:
                await self.csi.delete_volume(vid, {})
                log.info("deleted orphaned volume %s (%s, claim %s gone)", vid, pv_name, claim_key)
            except CairnError as error:
                log.warning("orphaned volume %s (%s): %s", vid, pv_name, error)

    # -- change handlers: which keys to look at again ----------------------------------------

    def _pv_changed(self, type_: str, pv: Obj) -> None:
        ref = pv.get("spec", {}).get("claimRef") or {}
        if type_ == "DELETED" and ref.get("name"):
            self.claims.add(f"{ref.get('namespace')}/{ref['name']}")

    def _pending_claims(self) -> list[Obj]:
        return [c for c in self.pvcs.items() if not c.get("spec", {}).get("volumeName")]

    def _class_changed(self, _type: str, sc: Obj) -> None:
        name = sc["metadata"]["name"]
        for pvc in self._pending_claims():
            if pvc.get("spec", {}).get("storageClassName") == name:
                self.claims.add(key_of(pvc))

    def _node_changed(self, _type: str, node: Obj) -> None:
        name = node["metadata"]["name"]
        for pvc in self._pending_claims():
            if annotations(pvc).get(ANN_SELECTED_NODE) == name:
                self.claims.add(key_of(pvc))

    # -- claims -------------------------------------------------------------------------------

    def _class_of(self, pvc: Obj) -> Obj | None:
        name = pvc.get("spec", {}).get("storageClassName")
        return self.classes.get(name) if name else None

    async def sync_claim(self, key: str) -> None:
        pvc = self.pvcs.get(key)
        if pvc is None or deleting(pvc) or pvc.get("spec", {}).get("volumeName"):
            return
        sc = self._class_of(pvc)
        if sc is None:
            if annotations(pvc).get(ANN_STORAGE_PROVISIONER) == self.driver:
                raise TemporaryError(
                    f"StorageClass {pvc['spec'].get('storageClassName')!r} not found"
                )
            return
        if not claims_driver(pvc, sc, self.driver):
            return
        pv_name = volume_name(pvc)
        if self.pvs.get(pv_name) is not None:
            return  # provisioned: the binder's turn
        selected = annotations(pvc).get(ANN_SELECTED_NODE)
        if sc.get("volumeBindingMode") == "WaitForFirstConsumer" and not selected:
            return  # the scheduler has not picked a node yet
        await self.provision(pvc, sc, pv_name, selected)

    async def provision(self, pvc: Obj, sc: Obj, pv_name: str, selected: str | None) -> None:
        parameters = sc.get("parameters") or {}
        refs = {use: secret_ref(parameters, use, pvc, pv_name) for use in SECRETS}
        request = csi_pb2.CreateVolumeRequest(
            name=pv_name,
            parameters=volume_parameters(sc, pvc, pv_name, self.extra_metadata),
            volume_capabilities=capabilities(pvc, sc),
            secrets=await self.secrets(refs["provisioner"]),
        )
        resources = pvc.get("spec", {}).get("resources") or {}
        request.capacity_range.required_bytes = parse_quantity(
            (resources.get("requests") or {}).get("storage")
        )
        request.capacity_range.limit_bytes = parse_quantity(
            (resources.get("limits") or {}).get("storage")
        )
        topology = topology_requirement(
            sc, selected, self.nodes.cache, self.csinodes.cache, self.driver
        )
        if topology is not None:
            request.accessibility_requirements.CopyFrom(topology)
        try:
            volume = await self.csi.create_volume(request)
        except ResourceExhausted as error:
            if not selected:
                raise
            await self.reschedule(pvc, selected, error)
            return
        if self.after_create is not None:
            await self.after_create(pv_name)
        pv = build_pv(pvc, sc, volume, pv_name, self.driver, self.identity, refs)
        try:
            await self.api.create(PV, pv)
        except AlreadyExists:
            return  # an earlier attempt (or another replica) wrote it
        await self.record_event(
            pvc, "Normal", "ProvisioningSucceeded", f"Successfully provisioned volume {pv_name}"
        )
        await self.emit(
            volume.volume_id,
            PersistentVolumeCreated(
                pv=pv_name,
                pvc=key_of(pvc),
                storage_class=sc["metadata"]["name"],
                node=selected or "",
                reclaim_policy=pv["spec"]["persistentVolumeReclaimPolicy"],
            ),
        )

    async def reschedule(self, pvc: Obj, node: str, error: CairnError) -> None:
        """No room on the selected node: drop the annotation so the scheduler picks again."""
        m = pvc["metadata"]
        await self.api.patch(PVC, m["name"], {"metadata": {
            "annotations": {ANN_SELECTED_NODE: None},
            "resourceVersion": m["resourceVersion"]}}, m["namespace"])  # fmt: skip
        await self.record_event(
            pvc,
            "Warning",
            "ProvisioningFailed",
            f"node {node} cannot hold the volume, rescheduling: {error}",
        )

    async def secrets(self, ref: Obj | None) -> dict[str, str]:
        if ref is None:
            return {}
        try:
            secret = await self.api.get(SECRET, ref["name"], ref["namespace"])
        except NotFound:
            raise FailedPrecondition(
                f"secret {ref['namespace']}/{ref['name']} named by the StorageClass does not exist"
            ) from None
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        data.update(secret.get("stringData") or {})
        return data

    async def claim_failed(self, key: str, error: CairnError) -> None:
        pvc = self.pvcs.get(key)
        if pvc is None:
            return
        sc = pvc.get("spec", {}).get("storageClassName", "")
        await self.record_event(
            pvc,
            "Warning",
            "ProvisioningFailed",
            f"failed to provision volume with StorageClass {sc!r}: {error}",
        )

    # -- volumes ------------------------------------------------------------------------------

    async def sync_volume(self, name: str) -> None:
        pv = self.pvs.get(name)
        if pv is None or annotations(pv).get(ANN_PROVISIONED_BY) != self.driver:
            return
        spec = pv.get("spec", {})
        if (spec.get("csi") or {}).get("driver") != self.driver:
            return
        phase = (pv.get("status") or {}).get("phase", "")
        policy = spec.get("persistentVolumeReclaimPolicy", "Delete")
        if policy != "Delete":
            if deleting(pv) and FINALIZER in finalizers(pv):
                await self._drop_finalizer(pv)
                await self.emit(
                    spec["csi"]["volumeHandle"], PersistentVolumeDeleted(pv=name, volume_kept=True)
                )
            return
        if phase == "Bound" or (phase != "Released" and not deleting(pv)):
            return
        if deleting(pv) and FINALIZER not in finalizers(pv):
            return  # done: others' finalizers hold it
        handle = spec["csi"]["volumeHandle"]
        ann = annotations(pv)
        ref = None
        if ann.get(ANN_DELETION_SECRET_NAME):
            ref = {
                "name": ann[ANN_DELETION_SECRET_NAME],
                "namespace": ann.get(ANN_DELETION_SECRET_NAMESPACE, ""),
            }
        await self.csi.delete_volume(handle, await self.secrets(ref))
        if not deleting(pv):
            with contextlib.suppress(NotFound):
                await self.api.delete(PV, name)
        with contextlib.suppress(NotFound):
            await self._drop_finalizer(await self.api.get(PV, name))
        await self.emit(handle, PersistentVolumeDeleted(pv=name))
        log.info("volume %s of PV %s deleted", handle, name)

    async def _drop_finalizer(self, pv: Obj) -> None:
        rest = [f for f in finalizers(pv) if f != FINALIZER]
        if rest == finalizers(pv):
            return
        pv["metadata"]["finalizers"] = rest
        await self.api.update(PV, pv)

    # -- reporting ----------------------------------------------------------------------------

    async def record_event(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on `obj` (best effort: a failure is only logged)."""
        m = obj["metadata"]
        stamp = now_rfc3339()
        event = {
            "metadata": {"generateName": f"{m['name']}.", "namespace": m.get("namespace")
                         or "default"},
            "involvedObject": {"kind": obj.get("kind", "PersistentVolumeClaim"),
                               "apiVersion": obj.get("apiVersion", "v1"),
                               "name": m["name"], "namespace": m.get("namespace", ""),
                               "uid": m.get("uid", ""),
                               "resourceVersion": m.get("resourceVersion", "")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": f"{self.driver}_{self.identity}"},
            "reportingComponent": self.driver, "reportingInstance": self.identity,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }  # fmt: skip
        try:
            await self.api.create(EVENT, event)
        except CairnError as error:
            log.warning("could not record event %s on %s: %s", reason, key_of(obj), error)

    async def emit(self, volume_id: str, event: Any) -> None:
        if self.events is None:
            return
        try:
            for attempt in range(5):  # another service appended meanwhile: go again
                try:
                    await self.events.append("volume", volume_id, [event])
                    return
                except ConflictError:
                    if attempt == 4:
                        raise
        except CairnError as error:  # the volume is done; its story only misses a line
            log.warning("could not record %s for %s: %s", type(event).__name__, volume_id, error)
