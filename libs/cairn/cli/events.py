"""`cairn events tail`: print the event stream, one event a line, optionally following it."""

from __future__ import annotations

import argparse
import json
import time

from cairn.config import NATS_URL


def register(sub: argparse._SubParsersAction) -> None:
    events = sub.add_parser("events", help="read Cairn's event stream",
                            description="Read the JetStream event stream every service writes.")
    events.set_defaults(handler=None)
    cmds = events.add_subparsers(dest="events_command", metavar="COMMAND")
    tail = cmds.add_parser("tail", help="print events (type, aggregate, version, payload)")
    tail.add_argument("--nats-url", default=None, help=f"{NATS_URL.help}; env {NATS_URL.env}")
    tail.add_argument("-n", "--last", type=int, default=20,
                      help="start with the last N events (0: from the start; default 20)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    tail.add_argument("--aggregate", help="only this aggregate (volume, service, node...)")
    tail.add_argument("-o", "--output", choices=("text", "json"), default="text")
    tail.set_defaults(handler=_tail)


def nats_url(args) -> str:
    import os

    return args.nats_url or os.environ.get(NATS_URL.env) or NATS_URL.default


def format_event(recorded) -> str:
    env = recorded.envelope
    if env is None:
        return f"#{recorded.sequence:<6} (undecodable: {recorded.error})"
    when = time.strftime("%H:%M:%S", time.localtime(env.occurred_at))
    payload = " ".join(f"{k}={v}" for k, v in env.payload.items())
    return (f"#{recorded.sequence:<6} {when} {env.type:<20} "
            f"{env.aggregate}/{env.aggregate_id} v{env.version}  {payload}")


async def _tail(args) -> int:
    from cairn.connect import nats as probe
    from cairn.events import EventStore, JetStreamBus

    url = nats_url(args)
    await (await probe(url)).close()  # one-line error when unreachable
    bus = await JetStreamBus.connect(url, name="cairn-events-tail")
    try:
        store = EventStore(bus)
        await store.ensure_stream()
        last = await store.last_sequence()
        start = 1 if args.last == 0 else max(1, last - args.last + 1)
        subject = store.aggregate_subjects(args.aggregate) if args.aggregate else None
        if last == 0 and not args.follow:
            print("(no events yet)")
            return 0
        async for recorded in store.read_all(start, follow=args.follow, filter_subject=subject):
            if args.output == "json" and recorded.envelope is not None:
                env = recorded.envelope
                print(json.dumps({"sequence": recorded.sequence, "type": env.type,
                                  "aggregate": env.aggregate, "aggregate_id": env.aggregate_id,
                                  "version": env.version, "occurred_at": env.occurred_at,
                                  "trace": env.trace, "payload": env.payload}, default=str),
                      flush=True)
            else:
                print(format_event(recorded), flush=True)
    finally:
        await bus.close()
    return 0
