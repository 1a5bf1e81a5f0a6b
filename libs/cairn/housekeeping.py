"""Housekeeping of one volume: the background work any client may do, in one place.

Expired sessions are cleaned (their locks released, their open-but-unlinked files freed),
the trash is purged after trash-days, interrupted deletions (and clones) are finished, slices whose
objects are due are deleted from the object store, and fragmented chunks are compacted.
`cairn gc --delete` runs one pass by hand; cairn-meta runs passes on a timer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Pass:
    sessions: int = 0
    trash: int = 0
    deletions: int = 0
    compacted: int = 0
    freed_slices: int = 0
    leaked_deleted: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.sessions} expired sessions, {self.trash} trash entries purged, "
                f"{self.deletions} deletions finished, {self.compacted} chunks compacted, "
                f"{self.freed_slices} slices freed, {self.leaked_deleted} leaked objects "
                f"deleted")


async def run_pass(meta: Any, store: Any, *, session_timeout: float = 60.0,
                   gc_objects: bool = False, grace: float = 3600.0,
                   compact: bool = True, now: float | None = None) -> Pass:
    """One pass. `gc_objects` also lists the whole object store for leaked objects (slow
    on big volumes, so cairn-meta does it less often than the rest)."""
    from cairn.chunk.compact import compact_all
    from cairn.chunk.gc import gc
    from cairn.meta.clone import cleanup_detached

    done = Pass()
    done.sessions = await meta.clean_expired_sessions(timeout=session_timeout)
    done.trash = await meta.purge_trash(now)
    done.deletions = await meta.cleanup_deleted_files()
    done.deletions += await cleanup_detached(meta)  # trees of clones whose process died
    if compact:
        done.compacted = len(await compact_all(meta, store))
    if gc_objects:
        report = await gc(meta, store, delete=True, grace=grace)
        done.freed_slices, done.leaked_deleted = report.pending_freed, report.deleted
        done.errors.extend(str(e) for e in report.errors)
    return done
