"""Counters of one VFS, for the mount to expose (a status file, Prometheus): operations per
kind with their errors and latency, cache hits and misses, bytes read and written."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OpStats:
    """One kind of operation: how many, how many failed, and how long they took."""

    count: int = 0
    errors: int = 0
    seconds: float = 0.0
    max_seconds: float = 0.0

    @property
    def mean_seconds(self) -> float:
        return self.seconds / self.count if self.count else 0.0


@dataclass
class VFSStats:
    ops: dict[str, OpStats] = field(default_factory=dict)
    attr_hits: int = 0
    attr_misses: int = 0
    entry_hits: int = 0
    entry_misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flushes_for_read: int = 0  # reads that had to commit the file's pending writes first
    open_files: int = 0
    open_dirs: int = 0

    def record(self, op: str, seconds: float, failed: bool = False) -> None:
        s = self.ops.get(op)
        if s is None:
            s = self.ops[op] = OpStats()
        s.count += 1
        s.seconds += seconds
        s.max_seconds = max(s.max_seconds, seconds)
        if failed:
            s.errors += 1

    def count(self, op: str) -> int:
        s = self.ops.get(op)
        return s.count if s else 0

    def snapshot(self, extra: dict | None = None) -> dict:
        """Everything as plain numbers (JSON-ready); `extra` is merged in (reader/cache)."""
        out: dict = {
            "ops": {
                name: {
                    "count": s.count,
                    "errors": s.errors,
                    "seconds": round(s.seconds, 6),
                    "mean_seconds": round(s.mean_seconds, 6),
                    "max_seconds": round(s.max_seconds, 6),
                }
                for name, s in sorted(self.ops.items())
            },
            "attr_cache": {"hits": self.attr_hits, "misses": self.attr_misses},
            "entry_cache": {"hits": self.entry_hits, "misses": self.entry_misses},
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "flushes_for_read": self.flushes_for_read,
            "open_files": self.open_files,
            "open_dirs": self.open_dirs,
        }
        if extra:
            out.update(extra)
        return out
