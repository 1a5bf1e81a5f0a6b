"""The status the syncer writes: Dataset, CairnRuntime and DataLoad, from the facts.

Pure functions: (object, facts, now) -> status dict. Conditions keep their
lastTransitionTime while their status stays the same, so an unchanged world writes nothing.
"""

from __future__ import annotations

from typing import Any

from cairn.kube.api import now_rfc3339

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human(size: int) -> str:
    """Bytes as Fluid prints them: `0.00B`, `512.00KiB`, `1.50GiB`."""
    value, unit = float(size), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{value:.2f}{_UNITS[unit]}"


def percentage(cached: int, total: int) -> str:
    """cached / total with one decimal, at most 100 (copies on several nodes count once)."""
    if total <= 0:
        return "100.0%" if cached > 0 else "0.0%"
    return f"{min(100.0, cached * 100.0 / total):.1f}%"


def condition(old: list[dict] | None, type_: str, ok: bool, reason: str, message: str) -> dict:
    status = "True" if ok else "False"
    for c in old or []:
        if c.get("type") == type_ and c.get("status") == status:
            stamp = c.get("lastTransitionTime") or now_rfc3339()
            break
    else:
        stamp = now_rfc3339()
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": stamp}  # fmt: skip


def phase_of(desired: int, ready: int) -> str:
    if desired > 0 and ready >= desired:
        return "Ready"
    return "PartialReady" if ready > 0 else "NotReady"


def cache_states(cached: int, capacity: int, total: int) -> dict[str, str]:
    return {"cached": human(cached), "cacheCapacity": human(capacity),
            "cachedPercentage": percentage(cached, total)}  # fmt: skip


def changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Does writing `new` over `old` change anything?"""
    old = old or {}
    return any(old.get(k) != v for k, v in new.items())
