"""The in-memory Kubernetes API keeps the semantics reconcilers rely on: resourceVersion
conflicts, resumable watches, finalizers, the status subresource, generateName/uid, and
the reconciler's watch cache and work queue on top of it."""

from __future__ import annotations

import asyncio

import pytest

from cairn.errors import AlreadyExists, FailedPrecondition, NotFound, TemporaryError
from cairn.kube.api import (
    PV,
    PVC,
    Conflict,
    Gone,
    format_quantity,
    merge_patch,
    parse_quantity,
)
from cairn.kube.memory import MemoryAPI
from cairn.kube.reconcile import Controller, Informer
from cairn.retry import Backoff


def claim(name: str = "c", **meta):
    return {"metadata": {"name": name, "namespace": "ns", **meta}, "spec": {"x": 1}}


async def test_create_fills_identity_and_rejects_taken_names():
    api = MemoryAPI()
    made = await api.create(PVC, {"metadata": {"generateName": "data-", "namespace": "ns"}})
    m = made["metadata"]
    assert m["name"].startswith("data-") and m["uid"] and m["creationTimestamp"]
    assert m["resourceVersion"] and made["kind"] == "PersistentVolumeClaim"
    await api.create(PVC, claim())
    with pytest.raises(AlreadyExists):
        await api.create(PVC, claim())
    with pytest.raises(NotFound):
        await api.get(PVC, "nope", "ns")


async def test_stale_update_conflicts():
    api = MemoryAPI()
    first = await api.create(PVC, claim())
    second = await api.get(PVC, "c", "ns")
    first["spec"]["x"] = 2
    await api.update(PVC, first)
    second["spec"]["x"] = 3
    with pytest.raises(Conflict) as e:
        await api.update(PVC, second)
    assert e.value.temporary
    with pytest.raises(Conflict):
        await api.patch(PVC, "c", {"metadata": {"resourceVersion": second["metadata"][
            "resourceVersion"]}, "spec": {"x": 4}}, "ns")
    assert (await api.get(PVC, "c", "ns"))["spec"]["x"] == 2


async def test_status_changes_only_through_the_status_endpoint():
    api = MemoryAPI()
    obj = await api.create(PVC, claim())
    obj["status"] = {"phase": "Bound"}
    obj = await api.update(PVC, obj)
    assert "status" not in obj
    obj["status"] = {"phase": "Bound"}
    obj["spec"]["x"] = 9
    obj = await api.update_status(PVC, obj)
    assert obj["status"] == {"phase": "Bound"} and obj["spec"]["x"] == 1


async def test_finalizers_hold_deletion_until_the_last_goes():
    api = MemoryAPI()
    await api.create(PV, {"metadata": {"name": "pv", "finalizers": ["a", "b"]}})
    await api.delete(PV, "pv")
    pv = await api.get(PV, "pv")
    assert pv["metadata"]["deletionTimestamp"]
    pv["metadata"]["finalizers"] = ["a", "b", "c"]
    with pytest.raises(FailedPrecondition):
        await api.update(PV, pv)
    pv["metadata"]["finalizers"] = ["b"]
    pv = await api.update(PV, pv)
    await api.patch(PV, "pv", {"metadata": {"finalizers": []}})
    with pytest.raises(NotFound):
        await api.get(PV, "pv")


async def test_watch_resumes_from_a_resource_version():
    api = MemoryAPI(history=4)
    a = await api.create(PV, {"metadata": {"name": "a"}})
    await api.create(PV, {"metadata": {"name": "b"}})
    await api.delete(PV, "a")
    seen = []
    async for event in api.watch(PV, a["metadata"]["resourceVersion"]):
        seen.append((event.type, event.object["metadata"]["name"]))
        if len(seen) == 2:
            break
    assert seen == [("ADDED", "b"), ("DELETED", "a")]
    for i in range(6):
        await api.create(PV, {"metadata": {"name": f"n{i}"}})
    with pytest.raises(Gone):
        async for _ in api.watch(PV, a["metadata"]["resourceVersion"]):
            pass


async def test_informer_follows_and_controller_retries_with_backoff():
    api = MemoryAPI()
    informer = Informer(api, PV)
    calls: list[str] = []

    async def reconcile(key: str) -> None:
        calls.append(key)
        if calls.count(key) < 3:
            raise TemporaryError("not yet")

    work = Controller("t", reconcile, backoff=Backoff(0.01, 0.05, jitter=False))
    informer.add_handler(work.handler())
    tasks = [asyncio.create_task(informer.run()), asyncio.create_task(work.run())]
    try:
        await api.create(PV, {"metadata": {"name": "x"}})
        for _ in range(200):
            if calls.count("x") >= 3 and not work.failures:
                break
            await asyncio.sleep(0.01)
        assert calls.count("x") == 3 and informer.get("x") is not None
        await api.delete(PV, "x")
        for _ in range(100):
            if informer.get("x") is None:
                break
            await asyncio.sleep(0.01)
        assert informer.get("x") is None
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_quantities_and_merge_patch():
    assert parse_quantity("1Gi") == 1 << 30 and parse_quantity("500M") == 500_000_000
    assert parse_quantity("1.5Gi") == 3 << 29 and parse_quantity(7) == 7
    assert format_quantity(2 << 30) == "2Gi" and format_quantity(1000) == "1000"
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {"a": {"c": 2,
                                                                                    "d": 3}}
