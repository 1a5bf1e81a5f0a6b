"""The small Kubernetes API the reconcilers use, and its real implementation.

Reconcilers see objects as plain dicts shaped like the API's JSON (camelCase keys, as
`kubectl get -o json` prints them) and reach the API through `KubeAPI`: get, list, watch,
create, update, update_status, patch (JSON merge patch) and delete per resource kind. Two
implementations keep the same semantics: `RestAPI` here, over kubernetes_asyncio's
ApiClient, and `cairn.kube.memory.MemoryAPI` for the unit tier.

API failures arrive in Cairn's error vocabulary: 404 is NotFound, 409 on a stale
resourceVersion is `Conflict` (temporary: reload and retry), 409 on a name in use is
AlreadyExists, 410 on a watch too old to resume is `Gone`, 5xx and transport failures are
UnavailableError.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from cairn.errors import (
    AlreadyExists,
    ConflictError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TemporaryError,
    UnavailableError,
)

Obj = dict[str, Any]


class Conflict(ConflictError):
    """409: the object changed since it was read (stale resourceVersion)."""


class Gone(TemporaryError):
    """410: a watch asked for a resourceVersion that is no longer kept: list again."""


@dataclass(frozen=True)
class Kind:
    """One resource type: where it lives in the API and how it behaves."""

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool
    status: bool = False  # has a status subresource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base


PVC = Kind("PersistentVolumeClaim", "", "v1", "persistentvolumeclaims", True, True)
PV = Kind("PersistentVolume", "", "v1", "persistentvolumes", False, True)
NODE = Kind("Node", "", "v1", "nodes", False, True)
POD = Kind("Pod", "", "v1", "pods", True, True)
SECRET = Kind("Secret", "", "v1", "secrets", True)
EVENT = Kind("Event", "", "v1", "events", True)
NAMESPACE = Kind("Namespace", "", "v1", "namespaces", False, True)
STORAGE_CLASS = Kind("StorageClass", "storage.k8s.io", "v1", "storageclasses", False)
CSI_NODE = Kind("CSINode", "storage.k8s.io", "v1", "csinodes", False)
VOLUME_ATTACHMENT = Kind(
    "VolumeAttachment", "storage.k8s.io", "v1", "volumeattachments", False, True
)
CAPACITY = Kind("CSIStorageCapacity", "storage.k8s.io", "v1", "csistoragecapacities", True)
LEASE = Kind("Lease", "coordination.k8s.io", "v1", "leases", True)
KINDS = (
    PVC,
    PV,
    NODE,
    POD,
    SECRET,
    EVENT,
    NAMESPACE,
    STORAGE_CLASS,
    CSI_NODE,
    VOLUME_ATTACHMENT,
    CAPACITY,
    LEASE,
)


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED (BOOKMARK is handled inside the implementations)
    object: Obj


class KubeAPI(Protocol):
    async def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj: ...

    async def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], str]:
        """The objects and the list's resourceVersion (where a watch resumes)."""
        ...

    def watch(
        self, kind: Kind, resource_version: str, namespace: str | None = None
    ) -> AsyncIterator[WatchEvent]:
        """Changes after `resource_version`, until cancelled (or Gone)."""
        ...

    async def create(self, kind: Kind, obj: Obj) -> Obj: ...

    async def update(self, kind: Kind, obj: Obj) -> Obj: ...

    async def update_status(self, kind: Kind, obj: Obj) -> Obj: ...

    async def patch(
        self, kind: Kind, name: str, patch: Obj, namespace: str | None = None
    ) -> Obj: ...

    async def delete(self, kind: Kind, name: str, namespace: str | None = None) -> None: ...


# -- helpers on plain objects ---------------------------------------------------------------


def meta(obj: Obj) -> Obj:
    return obj.setdefault("metadata", {})


def name_of(obj: Obj) -> str:
    return obj.get("metadata", {}).get("name", "")


def key_of(obj: Obj) -> str:
    """`namespace/name`, or `name` for cluster-scoped objects (client-go's cache key)."""
    m = obj.get("metadata", {})
    return f"{m['namespace']}/{m['name']}" if m.get("namespace") else m.get("name", "")


def split_key(key: str) -> tuple[str | None, str]:
    namespace, _, name = key.rpartition("/")
    return (namespace or None), name


def annotations(obj: Obj) -> dict[str, str]:
    return obj.get("metadata", {}).get("annotations") or {}


def labels(obj: Obj) -> dict[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def finalizers(obj: Obj) -> list[str]:
    return list(obj.get("metadata", {}).get("finalizers") or [])


def deleting(obj: Obj) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


def now_rfc3339(micro: bool = False) -> str:
    """A Kubernetes Time (seconds) or MicroTime string for now."""
    stamp = datetime.now(UTC)
    if micro:
        return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> float:
    """Seconds since the epoch of a Time/MicroTime string (0 for none)."""
    if not text:
        return 0.0
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, None removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


_SUFFIXES = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50,
             "Ei": 1 << 60, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
             "E": 10**18}  # fmt: skip


def parse_quantity(text: str | int | None) -> int:
    """Bytes of a resource quantity ("1Gi", "500M", "1e9", 1024), rounded up."""
    if text is None or text == "":
        return 0
    if isinstance(text, int):
        return text
    value = str(text).strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if value.endswith(suffix):
            number = value[: -len(suffix)]
            try:
                return -(-int(float(number) * _SUFFIXES[suffix]) // 1)
            except ValueError:
                break
    try:
        return int(-(-float(value) // 1))
    except ValueError:
        raise InvalidArgument(f"{text!r} is not a resource quantity") from None


def format_quantity(size: int) -> str:
    """The shortest exact binary quantity for a byte count ("1Gi", "1536Mi", "1000")."""
    for suffix in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        unit = _SUFFIXES[suffix]
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


# -- the real API ---------------------------------------------------------------------------


def _error(status: int, body: str, what: str) -> Exception:
    try:
        detail = json.loads(body)
        message, reason = detail.get("message", body), detail.get("reason", "")
    except (ValueError, AttributeError):
        message, reason = str(body)[:200], ""
    text = f"{what}: {message}"
    if status == 404:
        return NotFound(text)
    if status == 409:
        return AlreadyExists(text) if reason == "AlreadyExists" else Conflict(text)
    if status == 410:
        return Gone(text)
    if status in (400, 422):
        return InvalidArgument(text)
    if status in (401, 403):
        return FailedPrecondition(text)
    return UnavailableError(text)


class RestAPI:
    """KubeAPI over a kubernetes_asyncio ApiClient (from cairn.kube.client.api_client)."""

    def __init__(self, client: Any, watch_timeout: int = 300):
        self.client = client
        self.watch_timeout = watch_timeout

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Any = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> Any:
        """The raw response of a 2xx answer; the matching Cairn error otherwise."""
        import aiohttp
        from kubernetes_asyncio.client.exceptions import ApiException

        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            response = await self.client.call_api(
                path, method, query_params=query or [], header_params=headers, body=body,
                auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=timeout,
            )  # fmt: skip
            if not 200 <= response.status <= 299:
                text = await response.text()
                response.release()
                raise _error(response.status, text, f"{method} {path}")
        except ApiException as error:
            raise _error(error.status, error.body, f"{method} {path}") from None
        except (OSError, TimeoutError, aiohttp.ClientError) as error:
            raise UnavailableError(f"{method} {path}: {type(error).__name__}: {error}") from None
        return response

    async def _call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Obj:
        import aiohttp

        response = await self._request(method, path, body=body, content_type=content_type)
        try:
            raw = await response.read()
        except (OSError, TimeoutError, aiohttp.ClientError) as error:
            raise UnavailableError(f"{method} {path}: {type(error).__name__}: {error}") from None
        finally:
            response.release()
        return json.loads(raw) if raw else {}

    async def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj:
        return await self._call("GET", kind.path(namespace, name))

    async def list(self, kind: Kind, namespace: str | None = None) -> tuple[list[Obj], str]:
        answer = await self._call("GET", kind.path(namespace))
        items = answer.get("items") or []
        for item in items:  # lists leave out each item's kind and apiVersion
            item.setdefault("kind", kind.kind)
            item.setdefault("apiVersion", kind.api_version)
        return items, answer.get("metadata", {}).get("resourceVersion", "")

    async def watch(
        self, kind: Kind, resource_version: str, namespace: str | None = None
    ) -> AsyncIterator[WatchEvent]:
        import aiohttp

        query = [
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(self.watch_timeout)),
        ]
        response = await self._request(
            "GET", kind.path(namespace), query=query, timeout=self.watch_timeout + 30
        )
        try:
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind_of, obj = event.get("type"), event.get("object") or {}
                if kind_of == "ERROR":
                    raise _error(obj.get("code", 500), json.dumps(obj), f"watch {kind.plural}")
                if kind_of == "BOOKMARK":
                    continue
                yield WatchEvent(kind_of, obj)
        except (OSError, TimeoutError, aiohttp.ClientError) as error:
            raise UnavailableError(f"watch {kind.plural}: {type(error).__name__}") from None
        finally:
            response.release()

    async def create(self, kind: Kind, obj: Obj) -> Obj:
        ns = obj.get("metadata", {}).get("namespace")
        body = {"apiVersion": kind.api_version, "kind": kind.kind, **obj}
        return await self._call("POST", kind.path(ns), body)

    async def update(self, kind: Kind, obj: Obj) -> Obj:
        m = obj["metadata"]
        body = {"apiVersion": kind.api_version, "kind": kind.kind, **obj}
        return await self._call("PUT", kind.path(m.get("namespace"), m["name"]), body)

    async def update_status(self, kind: Kind, obj: Obj) -> Obj:
        m = obj["metadata"]
        body = {"apiVersion": kind.api_version, "kind": kind.kind, **obj}
        path = kind.path(m.get("namespace"), m["name"]) + "/status"
        return await self._call("PUT", path, body)

    async def patch(self, kind: Kind, name: str, patch: Obj, namespace: str | None = None) -> Obj:
        return await self._call(
            "PATCH", kind.path(namespace, name), patch, content_type="application/merge-patch+json"
        )

    async def delete(self, kind: Kind, name: str, namespace: str | None = None) -> None:
        await self._call("DELETE", kind.path(namespace, name))
