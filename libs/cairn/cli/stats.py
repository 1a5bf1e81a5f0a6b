"""`cairn stats MOUNTPOINT`: what a running mount is doing, from its control channel.

On a terminal the view refreshes in place like top: per interval, FUSE requests per second
with their mean latency, object store requests and MiB/s, block cache hits and misses (and
what each tier holds), metadata transactions and their restarts, buffered writes and open
files. Piped or redirected, one plain line per interval. `--once` prints the totals since
the mount started and exits; `--json` prints the raw counters (and, per interval, the rates)
as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from cairn.cli.fs import seconds
from cairn.errors import InvalidArgument
from cairn.progress import human_bytes

MiB = 1 << 20
CLEAR = "\x1b[H\x1b[J"  # cursor home, clear to the end of the screen
MAX_OPS_SHOWN = 12


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats", help="live counters of a running mount (ops, latency, store, cache)",
        description="Show what the Cairn mount that PATH is on is doing: FUSE requests and "
        "their latency, object store requests and bytes, block cache hits per tier, "
        "metadata transaction restarts, buffered writes. Refreshes every --interval "
        "seconds (rates over the interval) until interrupted; --once prints the totals "
        "since the mount started.")  # fmt: skip
    p.add_argument("path", metavar="MOUNTPOINT", help="the mountpoint (or any path in it)")
    p.add_argument(
        "--interval", type=seconds, default=1.0, metavar="S",
        help="seconds between refreshes (default 1)",
    )  # fmt: skip
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument(
        "--count", type=int, default=0, metavar="N",
        help="stop after N refreshes (default: until interrupted)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON (one object per line)")
    p.set_defaults(handler=_stats)


async def _stats(args: argparse.Namespace) -> int:
    from cairn.fuse.control import ControlClient, find_socket

    if args.interval <= 0:
        raise InvalidArgument("--interval must be positive")
    path = find_socket(args.path)
    async with ControlClient.connect(path) as client:
        snap = await client.call("stats")
        if args.once:
            if args.json:
                print(json.dumps(snap, indent=2))
            else:
                print("\n".join(table(snap, None)))
            return 0
        live = sys.stdout.isatty() and not args.json
        shown = 0
        while not args.count or shown < args.count:
            await asyncio.sleep(args.interval)
            new = await client.call("stats")
            r = rates(snap, new)
            snap = new
            shown += 1
            if args.json:
                print(json.dumps({"snapshot": new, "rates": r}), flush=True)
            elif live:
                sys.stdout.write(CLEAR + "\n".join(table(new, r)) + "\n")
                sys.stdout.flush()
            else:
                print(line(new, r), flush=True)
    return 0


# -- arithmetic ----------------------------------------------------------------------------------


def _delta(new: dict, old: dict, key: str) -> float:
    return float(new.get(key, 0) or 0) - float(old.get(key, 0) or 0)


def rates(old: dict, new: dict) -> dict[str, Any]:
    """Per-second rates between two snapshots (and mean latencies over the interval)."""
    dt = max(1e-9, new["time"] - old["time"])
    fuse = {}
    for op, cur in new["fuse"].items():
        prev = old["fuse"].get(op, {})
        n = _delta(cur, prev, "count")
        fuse[op] = {
            "ops": n / dt,
            "avg_ms": 1000 * _delta(cur, prev, "seconds") / n if n else 0.0,
            "errors": _delta(cur, prev, "errors") / dt,
        }
    store = {}
    for op, cur in new["object_store"].items():
        prev = old["object_store"].get(op, {})
        n = _delta(cur, prev, "count")
        store[op] = {
            "reqs": n / dt,
            "mib": _delta(cur, prev, "bytes") / MiB / dt,
            "avg_ms": 1000 * _delta(cur, prev, "seconds") / n if n else 0.0,
            "errors": _delta(cur, prev, "errors") / dt,
        }
    cache_new, cache_old = new.get("block_cache") or {}, old.get("block_cache") or {}
    hits, misses = _delta(cache_new, cache_old, "hits"), _delta(cache_new, cache_old, "misses")
    return {
        "interval": dt,
        "fuse": fuse,
        "store": store,
        "cache": {
            "hits": hits / dt,
            "misses": misses / dt,
            "memory_hits": _delta(cache_new, cache_old, "memory_hits") / dt,
            "disk_hits": _delta(cache_new, cache_old, "disk_hits") / dt,
            "hit_percent": 100 * hits / (hits + misses) if hits + misses else 0.0,
        },
        "txn": _delta(new["meta"], old["meta"], "txn") / dt,
        "txn_restarts": _delta(new["meta"], old["meta"], "txn_restarts") / dt,
        "outage_retries": _delta(new["meta"], old["meta"], "outage_retries") / dt,
        "read_mib": _delta(new, old, "bytes_read") / MiB / dt,
        "write_mib": _delta(new, old, "bytes_written") / MiB / dt,
    }


# -- views -----------------------------------------------------------------------------------


def _uptime(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _ms(seconds_total: float, count: float) -> float:
    return 1000 * seconds_total / count if count else 0.0


def table(snap: dict, r: dict | None) -> list[str]:
    """The full view: rates over the last interval, or (r None) totals since the mount."""
    every = f"every {r['interval']:.1f}s" if r else "totals since mount"
    out = [
        f"cairn stats {snap['mountpoint']}  volume {snap['volume']}  pid {snap['pid']}  "
        f"up {_uptime(snap['uptime'])}  ({every})",
        "",
    ]
    out += _fuse_rows(snap, r)
    out += [""] + _store_rows(snap, r)
    out += [""] + _cache_rows(snap, r)
    meta = snap["meta"]
    if r:
        out.append(f"{'META':<14}{r['txn']:>10.1f} txn/s {r['txn_restarts']:>10.1f} restarts/s "
                   f"{r['outage_retries']:>8.1f} outage retries/s")  # fmt: skip
        out.append(f"{'DATA':<14}{r['read_mib']:>10.1f} MiB/s read {r['write_mib']:>8.1f} MiB/s written")  # fmt: skip
    else:
        out.append(f"{'META':<14}{meta['txn']:>10,} txn   {meta['txn_restarts']:>10,} restarts "
                   f"{meta.get('outage_retries', 0):>8,} outage retries")  # fmt: skip
        out.append(f"{'DATA':<14}{human_bytes(snap['bytes_read']):>10} read  "
                   f"{human_bytes(snap['bytes_written']):>10} written")  # fmt: skip
    out.append(
        f"{'WRITES':<14}{human_bytes(snap['buffered_bytes']):>10} buffered "
        f"({human_bytes(snap['uploading_bytes'])} uploading); {snap['open_files']} open "
        f"files, {snap['open_dirs']} open dirs"
    )
    return out


def _fuse_rows(snap: dict, r: dict | None) -> list[str]:
    if r:
        rows = sorted(r["fuse"].items(), key=lambda kv: -kv[1]["ops"])
        rows = [(op, v) for op, v in rows if v["ops"] > 0][:MAX_OPS_SHOWN]
        out = [f"{'FUSE':<14}{'ops/s':>10} {'avg ms':>9} {'errors/s':>9} {'total':>12}"]
        for op, v in rows:
            total = snap["fuse"][op]["count"]
            out.append(f"  {op:<12}{v['ops']:>10.1f} {v['avg_ms']:>9.3f} {v['errors']:>9.1f} {total:>12,}")  # fmt: skip
        if not rows:
            out.append("  (idle)")
        return out
    ops = sorted(snap["fuse"].items(), key=lambda kv: -kv[1]["count"])[:MAX_OPS_SHOWN]
    out = [f"{'FUSE':<14}{'count':>12} {'avg ms':>9} {'max ms':>9} {'errors':>9}"]
    for op, v in ops:
        out.append(f"  {op:<12}{v['count']:>12,} {_ms(v['seconds'], v['count']):>9.3f} "
                   f"{1000 * v['max_seconds']:>9.3f} {v['errors']:>9,}")  # fmt: skip
    if not ops:
        out.append("  (no requests yet)")
    return out


def _store_rows(snap: dict, r: dict | None) -> list[str]:
    if r:
        out = [f"{'OBJECT STORE':<14}{'req/s':>10} {'MiB/s':>9} {'avg ms':>9} {'errors/s':>9}"]
        for op, v in r["store"].items():
            out.append(f"  {op:<12}{v['reqs']:>10.1f} {v['mib']:>9.1f} {v['avg_ms']:>9.2f} {v['errors']:>9.1f}")  # fmt: skip
        return out
    out = [f"{'OBJECT STORE':<14}{'requests':>12} {'bytes':>11} {'avg ms':>9} {'errors':>9}"]
    for op, v in snap["object_store"].items():
        out.append(f"  {op:<12}{v['count']:>12,} {human_bytes(v['bytes']):>11} "
                   f"{_ms(v['seconds'], v['count']):>9.2f} {v['errors']:>9,}")  # fmt: skip
    return out


def _cache_rows(snap: dict, r: dict | None) -> list[str]:
    c = snap.get("block_cache")
    if not c:
        return [f"{'BLOCK CACHE':<14}none"]
    held = (f"memory {human_bytes(c['memory_bytes'])} ({c['memory_items']:,} blocks), "
            f"disk {human_bytes(c['disk_bytes'])} ({c['disk_items']:,} blocks)"
            + ("" if c["disk_enabled"] else " [disk tier off]"))  # fmt: skip
    if r:
        k = r["cache"]
        return [
            f"{'BLOCK CACHE':<14}{k['hits']:>10.1f} hits/s ({k['memory_hits']:.1f} memory, "
            f"{k['disk_hits']:.1f} disk) {k['misses']:>8.1f} misses/s  "
            f"hit {k['hit_percent']:.1f}%",
            f"{'':<14}{held}",
        ]
    total = c["hits"] + c["misses"]
    share = 100 * c["hits"] / total if total else 0.0
    return [
        f"{'BLOCK CACHE':<14}{c['hits']:>10,} hits ({c['memory_hits']:,} memory, "
        f"{c['disk_hits']:,} disk) {c['misses']:>8,} misses  hit {share:.1f}%",
        f"{'':<14}{held}",
    ]


def line(snap: dict, r: dict) -> str:
    """One plain line per interval, for pipes and logs."""
    busy = sorted(((op, v) for op, v in r["fuse"].items() if v["ops"] > 0),
                  key=lambda kv: -kv[1]["ops"])[:5]  # fmt: skip
    total_ops = sum(v["ops"] for v in r["fuse"].values())
    ops = ", ".join(f"{op} {v['ops']:.0f}/s {v['avg_ms']:.2f}ms" for op, v in busy)
    get, put = r["store"].get("get", {}), r["store"].get("put", {})
    k = r["cache"]
    c = snap.get("block_cache") or {}
    stamp = time.strftime("%H:%M:%S", time.localtime(snap["time"]))
    return (
        f"{stamp} ops {total_ops:.0f}/s" + (f" ({ops})" if ops else "")
        + f" | store get {get.get('reqs', 0):.0f}/s {get.get('mib', 0):.1f} MiB/s"
        f" put {put.get('reqs', 0):.0f}/s {put.get('mib', 0):.1f} MiB/s"
        f" | cache hit {k['hit_percent']:.0f}% ({k['hits']:.0f}/s, miss {k['misses']:.0f}/s)"
        f" mem {human_bytes(c.get('memory_bytes', 0))} disk {human_bytes(c.get('disk_bytes', 0))}"
        f" | txn {r['txn']:.0f}/s restarts {r['txn_restarts']:.0f}/s"
        f" | buffered {human_bytes(snap['buffered_bytes'])} open {snap['open_files']}"
    )  # fmt: skip
