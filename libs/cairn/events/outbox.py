"""The outbox: events survive a bus outage on local disk and reach the stream later, in order.

OutboxedStore.append tries the stream first. When the bus is down, or does not answer in
`publish_timeout`, the events go to an append-only file (fsync'd before append returns)
and a background drainer publishes them, oldest first, once the bus is back. Until the
outbox is empty, new appends queue behind it, so the stream sees one process's events in
the order that process appended them. A bus outage therefore delays events; it never fails
the caller and never loses an event.

Exactly once in the stream, across crashes:
- an outboxed event gets its version when it is drained (it is a fact that happened; it
  goes after whatever the aggregate holds by then), and that version and the stream
  sequence it is conditioned on are written to the file *before* the publish;
- a crash after the publish but before the event is marked done re-publishes it with the
  same message id: the duplicate window drops it, the duplicate ack is checked against
  the event id. Past the window, the conditional publish fails and a scan of the
  aggregate's subject after the recorded sequence finds the event by its id.
So the optimistic version check applies while the bus is up; events written during an
outage skip it by design.

File format: frames of (length, crc32, msgpack body), one per record: `put` (a new event),
`assign` (its version and condition), `done`. A torn last frame from a crash is cut off on
replay. The file is truncated when everything in it is done.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from cairn.errors import ConflictError, FailedPrecondition, PermanentError, UnavailableError
from cairn.events import codec
from cairn.events.envelope import Envelope
from cairn.events.store import (
    Appended,
    AppendInterrupted,
    EventStore,
    History,
    Recorded,
    check_events,
)
from cairn.events.types import Event
from cairn.retry import Backoff

log = logging.getLogger(__name__)

_FRAME = struct.Struct(">II")  # body length, crc32 of the body


@dataclass
class Entry:
    """One outboxed event. `after` is None until a version is assigned for publishing."""

    no: int
    envelope: Envelope
    after: int | None = None


class OutboxFile:
    """The append-only file behind an outbox. Blocking; OutboxedStore calls it in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self) -> list[Entry]:
        """Opens (creating) the file, locks it, and returns the entries not done yet."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FailedPrecondition(f"outbox {self.path} is in use by another process") from None
        self._fd = fd
        entries, good = self._replay()
        if good < os.fstat(fd).st_size:
            log.warning("outbox %s: dropping a torn record at byte %d", self.path, good)
            os.ftruncate(fd, good)
            os.fsync(fd)
        return list(entries.values())

    def _replay(self) -> tuple[OrderedDict[int, Entry], int]:
        with open(self.path, "rb") as f:
            data = f.read()
        entries: OrderedDict[int, Entry] = OrderedDict()
        offset = 0
        while offset + _FRAME.size <= len(data):
            length, crc = _FRAME.unpack_from(data, offset)
            body = data[offset + _FRAME.size : offset + _FRAME.size + length]
            if len(body) < length or zlib.crc32(body) != crc:
                break
            try:
                _apply(entries, msgpack.unpackb(body, raw=False))
            except (ValueError, KeyError, TypeError, codec.CodecError) as error:
                log.error("outbox %s: unreadable record at byte %d: %s", self.path, offset, error)
                break
            offset += _FRAME.size + length
        return entries, offset

    def write(self, records: Sequence[dict[str, Any]], *, sync: bool = True) -> None:
        assert self._fd is not None, "outbox file is not open"
        frames = []
        for record in records:
            body = msgpack.packb(record, use_bin_type=True)
            frames.append(_FRAME.pack(len(body), zlib.crc32(body)) + body)
        os.write(self._fd, b"".join(frames))
        if sync:
            os.fsync(self._fd)

    def truncate(self) -> None:
        assert self._fd is not None, "outbox file is not open"
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # releases the lock


def _apply(entries: OrderedDict[int, Entry], record: dict[str, Any]) -> None:
    op, no = record["op"], record["no"]
    if op == "put":
        entries[no] = Entry(no, codec.decode(record["env"]), record.get("after"))
    elif op == "assign" and no in entries:
        entry = entries[no]
        entry.envelope = entry.envelope.with_version(record["version"])
        entry.after = record["after"]
    elif op == "done":
        entries.pop(no, None)


class OutboxedStore:
    """An EventStore whose appends fall back to a local outbox while the bus is away."""

    def __init__(
        self,
        store: EventStore,
        data_dir: Path | str,
        *,
        publish_timeout: float = 2.0,
        name: str = "events",
    ) -> None:
        self.store = store
        self.publish_timeout = publish_timeout
        self.file = OutboxFile(Path(data_dir) / f"{name}.outbox")
        self.rejected_path = Path(data_dir) / f"{name}.rejected"
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next_no = 1
        self._wakeup = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._io = asyncio.Lock()
        self._drainer: asyncio.Task | None = None
        self.published = 0  # events the drainer has delivered, for tests and metrics

    async def start(self) -> None:
        """Replays the outbox file left by an earlier run and starts the drainer."""
        entries = await asyncio.to_thread(self.file.open)
        self._entries = OrderedDict((e.no, e) for e in entries)
        self._next_no = max(self._entries, default=0) + 1
        if self._entries:
            log.info(
                "outbox %s: %d events from an earlier run to publish",
                self.file.path,
                len(self._entries),
            )
            self._empty.clear()
            self._wakeup.set()
        self._drainer = asyncio.create_task(self._drain_forever(), name="cairn-outbox-drainer")

    async def close(self) -> None:
        """Stops the drainer; what is still outboxed stays on disk for the next start."""
        task, self._drainer = self._drainer, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        async with self._io:
            await asyncio.to_thread(self.file.close)

    async def __aenter__(self) -> OutboxedStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pending(self) -> int:
        return len(self._entries)

    async def flush(self, deadline: float | None = None) -> bool:
        """Waits until the outbox is empty; False if `deadline` seconds passed first."""
        try:
            await asyncio.wait_for(self._empty.wait(), deadline)
        except TimeoutError:
            return False
        return True

    # -- the store's interface ---------------------------------------------------------

    async def append(
        self,
        aggregate: str,
        aggregate_id: str,
        events: Event | Sequence[Event],
        expected_version: int | None = None,
        *,
        expected_sequence: int | None = None,
        trace: dict[str, str] | None = None,
    ) -> Appended:
        """Appends like EventStore.append while the bus is up and the outbox is empty;
        otherwise outboxes the events (Appended.outboxed) and never raises for the bus.
        ConflictError still comes through while the bus is up."""
        batch = check_events(events, aggregate)
        if not batch:
            return Appended(aggregate, aggregate_id, [], expected_version or 0, 0)
        if not self._entries and self.store.bus.connected:
            try:
                return await self.store.append(
                    aggregate,
                    aggregate_id,
                    batch,
                    expected_version,
                    expected_sequence=expected_sequence,
                    trace=trace,
                    publish_timeout=self.publish_timeout,
                )
            except AppendInterrupted as error:
                log.warning(
                    "outboxing %d events of %s %s: %s",
                    len(error.unpublished),
                    aggregate,
                    aggregate_id,
                    error,
                )
                first, *rest = error.unpublished
                await self._put([(first, error.after_sequence)] + [(e, None) for e in rest])
                return Appended(
                    aggregate,
                    aggregate_id,
                    error.published + error.unpublished,
                    0,
                    0,
                    outboxed=True,
                )
            except UnavailableError as error:
                log.warning(
                    "outboxing %d events of %s %s: %s", len(batch), aggregate, aggregate_id, error
                )
        envelopes = [Envelope.wrap(e, aggregate_id, 0, trace=trace) for e in batch]
        await self._put([(e, None) for e in envelopes])
        return Appended(aggregate, aggregate_id, envelopes, 0, 0, outboxed=True)

    async def load(self, aggregate: str, aggregate_id: str) -> History:
        return await self.store.load(aggregate, aggregate_id)

    async def last_sequence(self) -> int:
        return await self.store.last_sequence()

    def read_all(self, from_sequence: int = 1, **options: Any):
        return self.store.read_all(from_sequence, **options)

    async def last_envelope(self, aggregate: str, aggregate_id: str) -> Recorded | None:
        return await self.store.last_envelope(aggregate, aggregate_id)

    # -- the outbox --------------------------------------------------------------------

    async def _put(self, items: list[tuple[Envelope, int | None]]) -> None:
        async with self._io:
            entries = []
            for envelope, after in items:
                entries.append(Entry(self._next_no, envelope, after))
                self._next_no += 1
            records = [
                {"op": "put", "no": e.no, "env": codec.encode(e.envelope), "after": e.after}
                for e in entries
            ]
            await asyncio.to_thread(self.file.write, records)
            for e in entries:
                self._entries[e.no] = e
            self._empty.clear()
        self._wakeup.set()

    async def _drain_forever(self) -> None:
        backoff = Backoff(initial=0.05, maximum=2.0)
        failures = 0
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._entries:
                entry = next(iter(self._entries.values()))
                try:
                    await self._deliver(entry)
                    failures = 0
                except UnavailableError as error:
                    if failures == 0:
                        log.info(
                            "outbox: %d events waiting for the bus: %s", len(self._entries), error
                        )
                    if self.store.bus.connected:  # up but not answering: back off
                        await asyncio.sleep(backoff.delay(failures))
                    else:  # down: go as soon as it is back
                        await self.store.bus.wait_connected(deadline=5.0)
                    failures += 1
                except PermanentError as error:
                    await self._reject(entry, error)
                except Exception:
                    log.exception(
                        "outbox: publishing %s %s failed",
                        entry.envelope.type,
                        entry.envelope.aggregate_id,
                    )
                    await asyncio.sleep(backoff.delay(failures))
                    failures += 1
            async with self._io:
                if not self._entries:
                    await asyncio.to_thread(self.file.truncate)
                    self._empty.set()

    async def _deliver(self, entry: Entry) -> None:
        """Publishes one entry exactly once, then marks it done."""
        await self.store.ensure_stream()
        if entry.after is None:
            await self._assign(entry)
        while True:
            assert entry.after is not None
            try:
                await self.store.publish_envelope(
                    entry.envelope, entry.after, publish_timeout=self.publish_timeout
                )
                break
            except ConflictError:
                # Already stored by an earlier attempt whose ack never came back?
                found = await self.store.contains(entry.envelope, entry.after)
                if found:
                    log.info(
                        "outbox: %s %s %s was already in the stream (#%d)",
                        entry.envelope.type,
                        entry.envelope.aggregate,
                        entry.envelope.aggregate_id,
                        found,
                    )
                    break
                await self._assign(entry)  # someone else appended: go after them
        await self._done(entry)

    async def _assign(self, entry: Entry) -> None:
        """Gives the entry the aggregate's next version, durably, before any publish."""
        last = await self.store.last_envelope(entry.envelope.aggregate, entry.envelope.aggregate_id)
        if last is not None and last.envelope is None:
            raise FailedPrecondition(
                f"the last event of {entry.envelope.aggregate} "
                f"{entry.envelope.aggregate_id} is unreadable: {last.error}"
            )
        version = last.envelope.version + 1 if last else 1
        after = last.sequence if last else 0
        async with self._io:
            await asyncio.to_thread(
                self.file.write,
                [{"op": "assign", "no": entry.no, "version": version, "after": after}],
            )
        entry.envelope = entry.envelope.with_version(version)
        entry.after = after

    async def _done(self, entry: Entry) -> None:
        async with self._io:
            # No fsync: losing a `done` only means a harmless, deduplicated re-publish.
            await asyncio.to_thread(self.file.write, [{"op": "done", "no": entry.no}], sync=False)
            self._entries.pop(entry.no, None)
        self.published += 1

    async def _reject(self, entry: Entry, error: Exception) -> None:
        """Moves an event the stream refuses for good to the rejected file, loudly."""
        log.error(
            "outbox: the stream refuses %s %s %s (%s); kept in %s",
            entry.envelope.type,
            entry.envelope.aggregate,
            entry.envelope.aggregate_id,
            error,
            self.rejected_path,
        )
        rejected = OutboxFile(self.rejected_path)
        async with self._io:

            def keep() -> None:
                rejected.open()
                try:
                    rejected.write(
                        [
                            {
                                "op": "put",
                                "no": entry.no,
                                "env": codec.encode(entry.envelope),
                                "after": None,
                                "error": str(error),
                            }
                        ]
                    )
                finally:
                    rejected.close()

            await asyncio.to_thread(keep)
        await self._done(entry)
