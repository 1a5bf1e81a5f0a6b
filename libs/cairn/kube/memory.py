"""An in-memory Kubernetes API for the unit tier, keeping the semantics reconcilers rely on.

- Every write bumps one global resourceVersion; an update or patch that carries a stale
  `metadata.resourceVersion` fails with Conflict (409), as the API server's optimistic
  concurrency does.
- Watches see ADDED / MODIFIED / DELETED events with the object's resourceVersion, and resume
  from any resourceVersion still in the kept history (older ones: Gone, 410).
- Finalizers: delete on an object with finalizers only sets deletionTimestamp; the write that
  removes the last finalizer deletes it. No finalizer may be added once deletion started.
- Status subresource: for kinds that have one, update and patch leave `status` alone and
  update_status changes only `status`.
- create fills uid, creationTimestamp, resourceVersion, generation and names from
  generateName; a taken name is AlreadyExists.

Objects are deep-copied in and out, so callers never share state with the store.
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import uuid
from collections.abc import AsyncIterator

from cairn.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from cairn.kube.api import (
    PV,
    PVC,
    Conflict,
    Gone,
    Kind,
    KubeAPI,
    Obj,
    WatchEvent,
    key_of,
    merge_patch,
    now_rfc3339,
)
from cairn.kube.reconcile import Controller, Informer


class MemoryAPI:
    """KubeAPI in memory (see the module docstring). `history` caps the kept watch events."""

    def __init__(self, history: int = 100_000):
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {}
        self._log: list[tuple[int, str, WatchEvent]] = []  # (rv, kind plural, event)
        self._history = history
        self._first_kept = 1  # the oldest resourceVersion a watch may resume after
        self._rv = 0
        self._changed = asyncio.Condition()
        self.calls: dict[str, int] = {}  # verb -> count, for tests and benchmarks

    # -- reading ------------------------------------------------------------------------------

    def _store(self, kind: Kind) -> dict[tuple[str, str], Obj]:
        return self._objects.setdefault(kind.plural, {})

    @staticmethod
    def _key(kind: Kind, name: str, namespace: str | None) -> tuple[str, str]:
        if kind.namespaced and not namespace:
            raise InvalidArgument(f"{kind.kind} {name!r} needs a namespace")
        return (namespace or "") if kind.namespaced else "", name

    def _count(self, verb: str) -> None:
        self.calls[verb] = self.calls.get(verb, 0) + 1

    async def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj:
        self._count("get")
        obj = self._store(kind).get(self._key(kind, name, namespace))
        if obj is None:
            raise NotFound(f"{kind.kind} {namespace + '/' if namespace else ''}{name} not found")
        return copy.deepcopy(obj)

    async def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], str]:
        self._count("list")
        items = [copy.deepcopy(o) for (ns, _), o in sorted(self._store(kind).items())
                 if namespace is None or ns == namespace]  # fmt: skip
        return items, str(self._rv)

    async def watch(
        self, kind: Kind, resource_version: str, namespace: str | None = None
    ) -> AsyncIterator[WatchEvent]:
        self._count("watch")
        after = int(resource_version or 0)
        if after + 1 < self._first_kept:
            raise Gone(f"resourceVersion {after} is too old: list again")
        index = self._index_after(after)
        while True:
            async with self._changed:
                while index >= len(self._log) + self._dropped:
                    await self._changed.wait()
                if index < self._dropped:
                    raise Gone(f"watch of {kind.plural} fell behind the kept history")
                pending = self._log[index - self._dropped :]
                index = len(self._log) + self._dropped
            for _, plural, event in pending:
                ns = event.object.get("metadata", {}).get("namespace", "")
                if plural == kind.plural and (namespace is None or ns == namespace):
                    yield WatchEvent(event.type, copy.deepcopy(event.object))

    _dropped = 0  # events dropped from the front of _log (absolute index of _log[0])

    def _index_after(self, rv: int) -> int:
        """The absolute log index of the first event newer than `rv`."""
        low, high = 0, len(self._log)
        while low < high:
            mid = (low + high) // 2
            if self._log[mid][0] <= rv:
                low = mid + 1
            else:
                high = mid
        return low + self._dropped

    # -- writing ------------------------------------------------------------------------------

    async def _record(self, kind: Kind, type_: str, obj: Obj) -> None:
        self._log.append((self._rv, kind.plural, WatchEvent(type_, copy.deepcopy(obj))))
        if len(self._log) > self._history:
            drop = len(self._log) - self._history
            self._first_kept = self._log[drop][0]
            del self._log[:drop]
            self._dropped += drop
        async with self._changed:
            self._changed.notify_all()

    def _bump(self, obj: Obj) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    async def create(self, kind: Kind, obj: Obj) -> Obj:
        self._count("create")
        obj = copy.deepcopy(obj)
        m = obj.setdefault("metadata", {})
        if not m.get("name"):
            if not m.get("generateName"):
                raise InvalidArgument(f"a {kind.kind} needs metadata.name or generateName")
            m["name"] = m["generateName"] + secrets.token_hex(3)[:5]
        if m.get("resourceVersion"):
            raise InvalidArgument("resourceVersion must not be set on create")
        key = self._key(kind, m["name"], m.get("namespace"))
        store = self._store(kind)
        if key in store:
            raise AlreadyExists(f"{kind.kind} {m['name']!r} already exists")
        if not kind.namespaced:
            m.pop("namespace", None)
        m["uid"] = str(uuid.uuid4())
        m["creationTimestamp"] = now_rfc3339()
        m["generation"] = 1
        m.pop("deletionTimestamp", None)
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        self._bump(obj)
        store[key] = obj
        await self._record(kind, "ADDED", obj)
        return copy.deepcopy(obj)

    def _current(self, kind: Kind, obj: Obj) -> tuple[tuple[str, str], Obj]:
        m = obj.get("metadata", {})
        key = self._key(kind, m.get("name", ""), m.get("namespace"))
        current = self._store(kind).get(key)
        if current is None:
            raise NotFound(f"{kind.kind} {m.get('name')!r} not found")
        wanted = m.get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise Conflict(
                f"Operation cannot be fulfilled on {kind.plural} {m.get('name')!r}: the object "
                "has been modified; please apply your changes to the latest version and try again"
            )
        return key, current

    async def _replace(self, kind: Kind, key: tuple[str, str], old: Obj, new: Obj) -> Obj:
        """Stores `new` in place of `old` with the API server's rules; deletes when the last
        finalizer of a deleting object goes."""
        m, old_m = new["metadata"], old["metadata"]
        m["resourceVersion"] = old_m["resourceVersion"]
        for fixed in ("uid", "creationTimestamp", "name", "namespace", "deletionTimestamp"):
            if fixed in old_m:
                m[fixed] = old_m[fixed]
            else:
                m.pop(fixed, None)
        if old_m.get("deletionTimestamp"):
            added = set(m.get("finalizers") or []) - set(old_m.get("finalizers") or [])
            if added:
                raise FailedPrecondition(
                    f"no new finalizers can be added if the object is being deleted: {added}"
                )
        new["apiVersion"], new["kind"] = kind.api_version, kind.kind
        if {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
            k: v for k, v in old.items() if k not in ("metadata", "status")
        }:
            m["generation"] = old_m.get("generation", 1) + 1
        else:
            m["generation"] = old_m.get("generation", 1)
        if new == old:
            return copy.deepcopy(old)  # a no-op write keeps the resourceVersion
        self._bump(new)
        if m.get("deletionTimestamp") and not m.get("finalizers"):
            del self._store(kind)[key]
            await self._record(kind, "DELETED", new)
        else:
            self._store(kind)[key] = new
            await self._record(kind, "MODIFIED", new)
        return copy.deepcopy(new)

    async def update(self, kind: Kind, obj: Obj) -> Obj:
        self._count("update")
        key, current = self._current(kind, obj)
        new = copy.deepcopy(obj)
        new.setdefault("metadata", {})
        if kind.status:
            new.pop("status", None)
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
        return await self._replace(kind, key, current, new)

    async def update_status(self, kind: Kind, obj: Obj) -> Obj:
        self._count("update_status")
        if not kind.status:
            raise NotFound(f"{kind.kind} has no status subresource")
        key, current = self._current(kind, obj)
        new = copy.deepcopy(current)
        if "status" in obj:
            new["status"] = copy.deepcopy(obj["status"])
        else:
            new.pop("status", None)
        return await self._replace(kind, key, current, new)

    async def patch(self, kind: Kind, name: str, patch: Obj, namespace: str | None = None) -> Obj:
        self._count("patch")
        rv = (patch.get("metadata") or {}).get("resourceVersion")
        key, current = self._current(
            kind, {"metadata": {"name": name, "namespace": namespace, "resourceVersion": rv}}
        )
        body = {k: v for k, v in patch.items() if not (kind.status and k == "status")}
        new = merge_patch(copy.deepcopy(current), body)  # a copy: the merge shares what it keeps
        new["metadata"].pop("resourceVersion", None)
        return await self._replace(kind, key, current, new)

    async def delete(self, kind: Kind, name: str, namespace: str | None = None) -> None:
        self._count("delete")
        key = self._key(kind, name, namespace)
        current = self._store(kind).get(key)
        if current is None:
            raise NotFound(f"{kind.kind} {name!r} not found")
        if current["metadata"].get("finalizers"):
            if current["metadata"].get("deletionTimestamp"):
                return  # already being deleted
            new = copy.deepcopy(current)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            self._bump(new)
            self._store(kind)[key] = new
            await self._record(kind, "MODIFIED", new)
            return
        gone = copy.deepcopy(current)
        self._bump(gone)
        del self._store(kind)[key]
        await self._record(kind, "DELETED", gone)


class Binder:
    """The kube-controller-manager's PV binder in miniature, for APIs that have none (this
    one, envtest's bare kube-apiserver): a PV that names its claim (claimRef, as provisioned
    PVs do) and the claim are marked Bound; a Bound PV whose claim is gone, Released."""

    def __init__(self, api: KubeAPI):
        self.api = api
        self.pvcs, self.pvs = Informer(api, PVC), Informer(api, PV)
        self.work = Controller("binder", self.sync, workers=2)
        self.pvs.add_handler(self.work.handler())

        def claim_changed(_type: str, pvc: Obj) -> None:
            for pv in self.pvs.items():
                ref = pv["spec"].get("claimRef") or {}
                if f"{ref.get('namespace')}/{ref.get('name')}" == key_of(pvc):
                    self.work.add(pv["metadata"]["name"])

        self.pvcs.add_handler(claim_changed)

    async def run(self) -> None:
        await asyncio.gather(self.pvcs.run(), self.pvs.run(), self.work.run())

    async def sync(self, name: str) -> None:
        pv = self.pvs.get(name)
        if pv is None:
            return
        ref = pv["spec"].get("claimRef") or {}
        phase = (pv.get("status") or {}).get("phase")
        pvc = self.pvcs.get(f"{ref.get('namespace')}/{ref.get('name')}")
        if pvc is None or pvc["metadata"]["uid"] != ref.get("uid"):
            if phase == "Bound":
                pv["status"] = {"phase": "Released"}
                await self.api.update_status(PV, pv)
            return
        if phase != "Bound":
            pv["status"] = {"phase": "Bound"}
            await self.api.update_status(PV, pv)
        if pvc["spec"].get("volumeName") != name:
            pvc = await self.api.get(PVC, pvc["metadata"]["name"], pvc["metadata"]["namespace"])
            pvc["spec"]["volumeName"] = name
            pvc = await self.api.update(PVC, pvc)
        if (pvc.get("status") or {}).get("phase") != "Bound":
            pvc["status"] = {
                "phase": "Bound",
                "accessModes": pv["spec"]["accessModes"],
                "capacity": dict(pv["spec"]["capacity"]),
            }
            await self.api.update_status(PVC, pvc)
