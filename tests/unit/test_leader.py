"""Leader election through a Lease on the in-memory API: two replicas never both lead, a
stopped leader hands over, and a leader that cannot renew stops leading."""

from __future__ import annotations

import asyncio

from cairn.kube.api import LEASE
from cairn.kube.leader import LeaderElector
from cairn.kube.memory import MemoryAPI


def elector(api, who: str) -> LeaderElector:
    return LeaderElector(api, "cairn", "cairn-system", who, lease_duration=1.0,
                         renew_deadline=0.6, retry_period=0.1)


async def test_two_replicas_elect_one_leader_and_hand_over():
    api = MemoryAPI()
    active: list[str] = []
    overlap = []

    def work(who: str):
        async def lead() -> None:
            if active:
                overlap.append((who, list(active)))
            active.append(who)
            try:
                await asyncio.Event().wait()
            finally:
                active.remove(who)

        return lead

    a, b = elector(api, "a"), elector(api, "b")
    ta = asyncio.create_task(a.run(work("a")))
    await asyncio.wait_for(a.leading.wait(), 5)
    tb = asyncio.create_task(b.run(work("b")))
    await asyncio.sleep(0.5)
    assert active == ["a"] and not b.leading.is_set()
    lease = await api.get(LEASE, "cairn", "cairn-system")
    assert lease["spec"]["holderIdentity"] == "a"

    ta.cancel()  # the leader stops: it releases, the standby takes over quickly
    await asyncio.gather(ta, return_exceptions=True)
    await asyncio.wait_for(b.leading.wait(), 5)
    assert active == ["b"] and not overlap
    lease = await api.get(LEASE, "cairn", "cairn-system")
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] >= 1
    tb.cancel()
    await asyncio.gather(tb, return_exceptions=True)


async def test_a_leader_that_cannot_renew_steps_down():
    api = MemoryAPI()
    a = elector(api, "a")
    stopped = asyncio.Event()

    async def lead() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    task = asyncio.create_task(a.run(lead))
    await asyncio.wait_for(a.leading.wait(), 5)
    lease = await api.get(LEASE, "cairn", "cairn-system")  # someone else takes it over
    lease["spec"]["holderIdentity"] = "intruder"
    lease["spec"]["leaseDurationSeconds"] = 60
    await api.update(LEASE, lease)
    await asyncio.wait_for(stopped.wait(), 5)
    assert not a.leading.is_set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
