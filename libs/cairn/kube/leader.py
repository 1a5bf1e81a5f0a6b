"""Leader election through a coordination.k8s.io Lease, as client-go's leaderelection does.

A candidate takes the Lease when it is free (no holder) or expired (not renewed for
leaseDurationSeconds), by an update carrying the resourceVersion it read: of two candidates
only one update succeeds, the other gets a Conflict. The leader renews every `retry_period`;
when it has not managed to renew for `renew_deadline` it stops leading (its work is
cancelled) before anyone else may take the Lease, since renew_deadline < lease_duration.
Stopping hands the Lease back (holder cleared) so a standby takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from cairn.errors import AlreadyExists, CairnError, NotFound
from cairn.kube.api import LEASE, KubeAPI, Obj, now_rfc3339, parse_time

log = logging.getLogger(__name__)


class LeaderElector:
    def __init__(
        self,
        api: KubeAPI,
        name: str,
        namespace: str,
        identity: str,
        *,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
    ):
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("need retry_period < renew_deadline < lease_duration")
        self.api, self.name, self.namespace, self.identity = api, name, namespace, identity
        self.lease_duration, self.renew_deadline = lease_duration, renew_deadline
        self.retry_period = retry_period
        self.leading = asyncio.Event()
        self.transitions = 0
        self._said = ""  # the last problem logged at WARNING

    def _spec(self, spec: Obj, acquiring: bool) -> Obj:
        stamp = now_rfc3339(micro=True)
        new = dict(spec)
        new.update(
            holderIdentity=self.identity,
            renewTime=stamp,
            leaseDurationSeconds=max(1, round(self.lease_duration)),
        )
        if acquiring:
            new["acquireTime"] = stamp
            new["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if spec else 0)
        return new

    async def try_acquire_or_renew(self) -> bool:
        """One attempt: True when this candidate holds the Lease afterwards."""
        try:
            lease = await self.api.get(LEASE, self.name, self.namespace)
        except NotFound:
            body = {
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec({}, acquiring=True),
            }
            try:
                await self.api.create(LEASE, body)
                return True
            except AlreadyExists:
                return False
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if holder and holder != self.identity:
            renewed = parse_time(spec.get("renewTime"))
            duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
            if time.time() < renewed + duration:
                return False  # held by someone alive
        lease["spec"] = self._spec(spec, acquiring=holder != self.identity)
        try:
            await self.api.update(LEASE, lease)  # carries the resourceVersion we read
        except CairnError:
            return False  # a Conflict: someone else moved first
        return True

    async def _acquire(self) -> None:
        while True:
            if await self._attempt():
                break
            await asyncio.sleep(self.retry_period)
        self.transitions += 1
        self.leading.set()
        log.info("%s leads %s/%s", self.identity, self.namespace, self.name)

    async def _attempt(self) -> bool:
        try:
            answer = await self.try_acquire_or_renew()
        except CairnError as error:
            self._say(self._advice(error))
            return False
        self._said = ""  # a later failure is news again
        return answer

    def _advice(self, error: CairnError) -> str:
        """What to do about a failed attempt, in one line."""
        if isinstance(error, NotFound) and "namespace" in str(error):
            return (f"leader election: namespace {self.namespace!r} does not exist: create it "
                    f"(kubectl create namespace {self.namespace}) or pass "
                    "--leader-election-namespace NAME (empty: no leader election, run one "
                    "replica only); retrying")  # fmt: skip
        return f"leader election: {error}; retrying"

    def _say(self, text: str) -> None:
        """Each problem once at WARNING (retries repeat it only at DEBUG)."""
        if text == self._said:
            log.debug("%s", text)
            return
        self._said = text
        log.warning("%s", text)

    async def _keep(self) -> None:
        """Renews until a renewal has failed for renew_deadline; then returns."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.retry_period)
            if await self._attempt():
                last = time.monotonic()
            elif time.monotonic() - last >= self.renew_deadline:
                log.warning("%s lost the lease %s/%s", self.identity, self.namespace, self.name)
                return

    async def release(self) -> None:
        with contextlib.suppress(CairnError):
            lease = await self.api.get(LEASE, self.name, self.namespace)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            spec.update(
                holderIdentity=None, leaseDurationSeconds=1, renewTime=now_rfc3339(micro=True)
            )
            spec.pop("holderIdentity")
            await self.api.update(LEASE, lease)

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """Waits to lead, runs `work` while leading; when the lease is lost the work is
        cancelled and the candidate tries again. Returns when `work` returns."""
        while True:
            await self._acquire()
            task = asyncio.create_task(work())
            keeper = asyncio.create_task(self._keep())
            lost = False
            try:
                await asyncio.wait({task, keeper}, return_when=asyncio.FIRST_COMPLETED)
                lost = keeper.done() and not task.done()
            finally:
                self.leading.clear()
                for t in (task, keeper):
                    t.cancel()
                await asyncio.gather(task, keeper, return_exceptions=True)
                if not lost:
                    await self.release()
            if not lost:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()
                return
