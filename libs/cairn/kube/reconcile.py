"""Level-triggered reconcilers over watch caches, with per-object exponential backoff.

The client-go shape, small: an `Informer` lists a kind, keeps the objects in a cache and
follows a watch from the list's resourceVersion (listing again when the watch is too old to
resume), telling its handlers about every change. A `Controller` holds a work queue of object
keys: a key is queued at most once, never reconciled by two workers at the same time, and a
key queued while it is being reconciled runs again afterwards. `reconcile(key)` reads the
world (the caches, the API) and moves it one step towards what it should be; it is called
with keys, not events, so a missed or merged event costs nothing.

A temporary failure (cairn.errors.TemporaryError, or an unexpected exception) queues the key
again after a delay that doubles per consecutive failure of that key (1 s to 5 min by
default); a permanent failure goes to `on_permanent` and waits for the object to change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cairn.errors import CairnError, UnavailableError
from cairn.kube.api import Gone, Kind, KubeAPI, Obj, key_of
from cairn.retry import Backoff
from cairn.tasks import cancel_all

log = logging.getLogger(__name__)

Handler = Callable[[str, Obj], None]  # (ADDED|MODIFIED|DELETED, object)
WATCH_BACKOFF = Backoff(initial=0.2, maximum=10.0)
RECONCILE_BACKOFF = Backoff(initial=1.0, maximum=300.0, factor=2.0, jitter=False)


class Informer:
    """A watch cache of one kind (optionally one namespace)."""

    def __init__(
        self, api: KubeAPI, kind: Kind, namespace: str | None = None, retry: Backoff = WATCH_BACKOFF
    ):
        self.api, self.kind, self.namespace, self.retry = api, kind, namespace, retry
        self.cache: dict[str, Obj] = {}
        self.handlers: list[Handler] = []
        self.synced = asyncio.Event()
        self.resource_version = ""

    def add_handler(self, handler: Handler) -> None:
        self.handlers.append(handler)

    def get(self, key: str) -> Obj | None:
        return self.cache.get(key)

    def items(self) -> list[Obj]:
        return list(self.cache.values())

    def _tell(self, type_: str, obj: Obj) -> None:
        for handler in self.handlers:
            try:
                handler(type_, obj)
            except Exception:  # a broken handler must not stop the cache
                log.exception("%s handler failed", self.kind.kind)

    async def _relist(self) -> None:
        items, rv = await self.api.list(self.kind, self.namespace)
        fresh = {key_of(o): o for o in items}
        for key in set(self.cache) - set(fresh):
            self._tell("DELETED", self.cache.pop(key))
        for key, obj in fresh.items():
            old = self.cache.get(key)
            self.cache[key] = obj
            if old is None:
                self._tell("ADDED", obj)
            elif old.get("metadata", {}).get("resourceVersion") != obj["metadata"].get(
                "resourceVersion"
            ):
                self._tell("MODIFIED", obj)
        self.resource_version = rv
        self.synced.set()

    async def run(self) -> None:
        failures = 0
        need_list = True
        while True:
            try:
                if need_list:
                    await self._relist()
                    need_list = False
                async for event in self.api.watch(self.kind, self.resource_version, self.namespace):
                    failures = 0
                    obj = event.object
                    key = key_of(obj)
                    if event.type == "DELETED":
                        self.cache.pop(key, None)
                    else:
                        self.cache[key] = obj
                    self.resource_version = obj["metadata"].get(
                        "resourceVersion", self.resource_version
                    )
                    self._tell(event.type, obj)
            except Gone:
                need_list = True
            except (UnavailableError, CairnError) as error:
                log.warning("watch of %s failed: %s", self.kind.plural, error)
                await asyncio.sleep(self.retry.delay(failures))
                failures += 1
                need_list = need_list or failures > 3


class Controller:
    """A work queue of keys and the workers that reconcile them (see the module docstring)."""

    def __init__(
        self,
        name: str,
        reconcile: Callable[[str], Awaitable[None]],
        *,
        workers: int = 4,
        backoff: Backoff = RECONCILE_BACKOFF,
        on_permanent: Callable[[str, CairnError], Awaitable[None]] | None = None,
    ):
        self.name, self.reconcile, self.workers = name, reconcile, workers
        self.backoff, self.on_permanent = backoff, on_permanent
        self.failures: dict[str, int] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._busy: set[str] = set()
        self._again: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, key: str, after: float = 0.0) -> None:
        """Queue `key` now, or after `after` seconds (an earlier add wins)."""
        if after > 0:
            if key not in self._timers:
                loop = asyncio.get_running_loop()
                self._timers[key] = loop.call_later(after, self._fire, key)
            return
        self._idle.clear()
        if key in self._busy:
            self._again.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def handler(self, key_for: Callable[[Obj], str | None] = key_of) -> Handler:
        """An informer handler that queues the key `key_for` gives for each changed object."""

        def queue(_type: str, obj: Obj) -> None:
            key = key_for(obj)
            if key:
                self.add(key)

        return queue

    async def wait_idle(self) -> None:
        """Until nothing is queued or running (backoff timers may still be pending)."""
        await self._idle.wait()

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()
            await cancel_all(tasks)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._busy.add(key)
            try:
                await self._one(key)
            finally:
                self._busy.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self.add(key)
                if not self._queued and not self._busy:
                    self._idle.set()

    async def _one(self, key: str) -> None:
        try:
            await self.reconcile(key)
        except asyncio.CancelledError:
            raise
        except CairnError as error:
            if error.temporary:
                self._retry(key, error)
                return
            self.failures.pop(key, None)
            log.warning("%s %s: %s", self.name, key, error)
            if self.on_permanent is not None:
                try:
                    await self.on_permanent(key, error)
                except CairnError as report_error:
                    log.warning("%s %s: reporting failed: %s", self.name, key, report_error)
                    self._retry(key, report_error)
        except Exception as error:  # a bug or an unmapped failure: keep trying, slowly
            log.exception("%s %s: unexpected failure", self.name, key)
            self._retry(key, error)
        else:
            self.failures.pop(key, None)

    def _retry(self, key: str, error: Any) -> None:
        count = self.failures.get(key, 0)
        self.failures[key] = count + 1
        delay = self.backoff.delay(count)
        log.info("%s %s: %s (retry in %.1fs)", self.name, key, error, delay)
        self.add(key, after=delay)
