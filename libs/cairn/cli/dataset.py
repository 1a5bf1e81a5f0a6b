"""`cairn dataset list|show|history`: datasets, their cache state and their story.

    cairn dataset list [-n NS | -A]      # Datasets with phase, size and cache state (kubectl-like)
    cairn dataset show NAME [-n NS]      # one Dataset, its runtime, cache nodes and DataLoads
    cairn dataset history NAME [-n NS]   # its events from the stream: bound, scaled, labelled,
                                         # cache reports (when they changed), DataLoads
`list` and `show` read the Kubernetes API (--kubeconfig, $KUBECONFIG or in-cluster);
`history` reads the event stream (--nats-url).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from cairn.config import KUBECONFIG, NATS_URL
from cairn.errors import NotFound


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="datasets: list, show, history",
                       description="Datasets (data.cairn.io), their cache state and story.")  # fmt: skip
    cmds = p.add_subparsers(dest="dataset_command", metavar="COMMAND", required=True)
    lst = cmds.add_parser("list", help="datasets with phase, size and cache state")
    _namespace(lst, all_namespaces=True)
    lst.set_defaults(handler=_list)
    show = cmds.add_parser("show", help="one dataset, its runtime, cache nodes and DataLoads")
    show.add_argument("name", metavar="NAME")
    _namespace(show)
    show.set_defaults(handler=_show)
    hist = cmds.add_parser("history", help="the dataset's events from the stream, in order")
    hist.add_argument("name", metavar="NAME")
    hist.add_argument("-n", "--namespace", default="default")
    hist.add_argument("--nats-url", default=None, help=f"(default ${NATS_URL.env} or "
                      f"{NATS_URL.default})")  # fmt: skip
    hist.add_argument("-o", "--output", choices=("text", "json"), default="text")
    hist.set_defaults(handler=_history)


def _namespace(p: argparse.ArgumentParser, all_namespaces: bool = False) -> None:
    p.add_argument("-n", "--namespace", default="default")
    if all_namespaces:
        p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("--kubeconfig", default=os.environ.get(KUBECONFIG.env),
                   help="kubeconfig file (default: $KUBECONFIG, then in-cluster)")  # fmt: skip
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")


async def _api(args: argparse.Namespace):
    from cairn.kube.api import RestAPI
    from cairn.kube.client import api_client

    client = await api_client(args.kubeconfig)
    return client, RestAPI(client)


def _row(ds: dict[str, Any]) -> list[str]:
    st = ds.get("status") or {}
    cs = st.get("cacheStates") or {}
    m = ds["metadata"]
    return [m.get("namespace", ""), m["name"], st.get("phase", "") or "-",
            st.get("ufsTotal") or "-", cs.get("cached") or "-", cs.get("cacheCapacity") or "-",
            cs.get("cachedPercentage") or "-", ",".join(st.get("nodes") or []) or "-"]  # fmt: skip


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])  # fmt: skip


async def _list(args: argparse.Namespace) -> int:
    from cairn.datasets import DATASET

    client, api = await _api(args)
    try:
        items, _ = await api.list(DATASET, None if args.all_namespaces else args.namespace)
    finally:
        await client.close()
    if args.output == "json":
        print(json.dumps(items, indent=2))
        return 0
    if not items:
        print("No datasets found." if args.all_namespaces else
              f"No datasets found in {args.namespace} namespace.")  # fmt: skip
        return 0
    print(table([_row(d) for d in items], ["NAMESPACE", "NAME", "PHASE", "UFS TOTAL", "CACHED",
                                           "CAPACITY", "PERCENT", "NODES"]))  # fmt: skip
    return 0


async def _show(args: argparse.Namespace) -> int:
    from cairn.datasets import DATALOAD, DATASET, RUNTIME

    client, api = await _api(args)
    try:
        try:
            ds = await api.get(DATASET, args.name, args.namespace)
        except NotFound:
            raise NotFound(f"dataset {args.namespace}/{args.name} not found") from None
        try:
            rt = await api.get(RUNTIME, args.name, args.namespace)
        except NotFound:
            rt = None
        loads, _ = await api.list(DATALOAD, args.namespace)
    finally:
        await client.close()
    loads = [d for d in loads if (d.get("spec", {}).get("dataset") or {}).get("name") == args.name]
    if args.output == "json":
        print(json.dumps({"dataset": ds, "runtime": rt, "dataloads": loads}, indent=2))
        return 0
    st = ds.get("status") or {}
    cs = st.get("cacheStates") or {}
    print(f"Dataset {args.namespace}/{args.name}: {st.get('phase', 'Pending')}")
    for c in st.get("conditions") or []:
        print(f"  {c['type']}={c['status']} {c.get('reason', '')}: {c.get('message', '')}")
    print(f"  mounts: {', '.join(m['mountPoint'] for m in ds['spec'].get('mounts', []))}")
    print(f"  ufsTotal {st.get('ufsTotal') or '-'}, files {st.get('fileNum') or '-'}; cached "
          f"{cs.get('cached', '-')} of {cs.get('cacheCapacity', '-')} capacity "
          f"({cs.get('cachedPercentage', '-')})")  # fmt: skip
    print(f"  nodes: {', '.join(st.get('nodes') or []) or '-'}")
    if rt is None:
        print("Runtime: none (create a CairnRuntime of the same name to bind it)")
    else:
        rs = rt.get("status") or {}
        print(f"Runtime: cache {rs.get('cachePhase', '-')} ({rs.get('readyReplicas', 0)}/"
              f"{rs.get('desiredReplicas', 0)} ready), fuse {rs.get('fusePhase', '-')}")  # fmt: skip
        for n in rs.get("nodes") or []:
            print(f"  cache node {n['name']}: {n.get('cached', '-')}")
    for d in loads:
        ls = d.get("status") or {}
        print(f"DataLoad {d['metadata']['name']}: {ls.get('phase', 'Pending')} "
              f"{ls.get('progress', '')} {ls.get('duration', '')}".rstrip())  # fmt: skip
    return 0


async def _history(args: argparse.Namespace) -> int:
    from cairn.connect import nats as probe
    from cairn.events import EventStore, JetStreamBus

    url = args.nats_url or os.environ.get(NATS_URL.env) or NATS_URL.default
    await (await probe(url)).close()  # one line when NATS is not there
    bus = await JetStreamBus.connect(url, name="cairn-dataset-history")
    key = f"{args.namespace}/{args.name}"
    story = []
    try:
        store = EventStore(bus)
        story += list(await store.load("dataset", key))
        loads: set[str] = set()
        last_report: dict[str, int] = {}
        for aggregate in ("dataload", "node"):
            async for rec in store.read_all(filter_subject=store.aggregate_subjects(aggregate)):
                env, p = rec.envelope, rec.envelope.payload
                if env.type == "DataLoadStarted" and p.get("dataset") == key:
                    loads.add(env.aggregate_id)
                if aggregate == "dataload" and env.aggregate_id in loads:
                    story.append(env)
                elif env.type == "NodeCacheReported" and p.get("dataset") == key:
                    if last_report.get(p["node"]) != p.get("cached_bytes"):  # changes only
                        last_report[p["node"]] = p.get("cached_bytes")
                        story.append(env)
    finally:
        await bus.close()
    if not story:
        print(f"(no events of dataset {key})")
        return 0
    for env in sorted(story, key=lambda e: e.occurred_at):
        if args.output == "json":
            print(json.dumps({"aggregate": env.aggregate, "id": env.aggregate_id,
                              "type": env.type, "occurred_at": env.occurred_at,
                              "payload": env.payload}, default=str))  # fmt: skip
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(env.occurred_at))
        payload = " ".join(f"{k}={v}" for k, v in env.payload.items() if k != "mounts")
        print(f"{when}  {env.type:<20} {env.aggregate}/{env.aggregate_id}  {payload}")
    return 0
