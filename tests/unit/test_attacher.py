"""cairn-attacher on the in-memory API, for a driver without PUBLISH_UNPUBLISH_VOLUME (Cairn's
controller): a VolumeAttachment of csi.cairn.io is marked attached (with a finalizer) and
cleaned up on deletion; others' attachments are left alone; attach and detach are events of
the volume's CSI id."""

from __future__ import annotations

import asyncio

import pytest

from cairn.kube.api import PV, VOLUME_ATTACHMENT
from cairn.kube.memory import MemoryAPI
from cairn.retry import Backoff
from cairn_attacher.attacher import Attacher, finalizer_for


class Recorder:
    """Collects appended events (the event store's append, in memory)."""

    def __init__(self):
        self.appended: list[tuple[str, str, str]] = []

    async def append(self, aggregate, aggregate_id, events, **_kw):
        for e in events:
            self.appended.append((aggregate, aggregate_id, type(e).__name__))


def attachment(name: str, attacher: str = "csi.cairn.io"):
    return {"metadata": {"name": name}, "spec": {
        "attacher": attacher, "nodeName": "node-a",
        "source": {"persistentVolumeName": "pv-1"}}}


async def wait_for(check, timeout: float = 5.0):
    for _ in range(int(timeout / 0.02)):
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.02)
    pytest.fail("timed out")


async def test_attachment_is_marked_attached_and_cleaned_up():
    api, events = MemoryAPI(), Recorder()
    await api.create(PV, {"metadata": {"name": "pv-1"}, "spec": {
        "csi": {"driver": "csi.cairn.io", "volumeHandle": "vol-1"}}})
    attacher = Attacher(api, None, events, backoff=Backoff(0.01, 0.1, jitter=False))
    task = asyncio.create_task(attacher.run())
    try:
        await api.create(VOLUME_ATTACHMENT, attachment("va-1"))
        await api.create(VOLUME_ATTACHMENT, attachment("va-other", attacher="other.csi"))

        async def attached():
            va = await api.get(VOLUME_ATTACHMENT, "va-1")
            return va if (va.get("status") or {}).get("attached") else None

        va = await wait_for(attached)
        assert va["metadata"]["finalizers"] == [finalizer_for("csi.cairn.io")]
        assert va["status"]["attachmentMetadata"] == {}
        assert "status" not in await api.get(VOLUME_ATTACHMENT, "va-other")

        await api.delete(VOLUME_ATTACHMENT, "va-1")

        async def gone():
            items, _ = await api.list(VOLUME_ATTACHMENT)
            return [i["metadata"]["name"] for i in items] == ["va-other"]

        await wait_for(gone)
        assert events.appended == [("volume", "vol-1", "VolumeAttached"),
                                   ("volume", "vol-1", "VolumeDetached")]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
