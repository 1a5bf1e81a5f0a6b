"""`cairn bench events|core`: measure the event store and the file system on this machine.

Both bring up what they need as private child processes on free ports (nats-server for
events unless --nats-url is given; redis-server and a file:// store for core) and stop
them, by PID, when done.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cairn.cli.fs import parse_size


def _positive(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


def _size(text: str) -> int:
    value = parse_size(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least one byte")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks: event store, file system",
        description="Measure Cairn on this machine.",
    )
    bench.set_defaults(handler=None)
    cmds = bench.add_subparsers(dest="bench_command", metavar="COMMAND")

    events = cmds.add_parser(
        "events",
        help="events/s appended and consumed through JetStream",
        description="Append events over many aggregates (optimistic, idempotent) and read "
        "them back with a durable consumer. Without --nats-url a private nats-server is "
        "started on a free port for the run.",
    )
    events.add_argument(
        "--count",
        type=_positive,
        default=100_000,
        metavar="N",
        help="events to append and consume (default 100000)",
    )
    events.add_argument(
        "--aggregates",
        type=_positive,
        default=1000,
        metavar="N",
        help="volumes the events are spread over (default 1000)",
    )
    events.add_argument(
        "--nats-url",
        default=None,
        metavar="URL",
        help="an existing nats-server with JetStream (default: a private one)",
    )
    events.add_argument("--json", action="store_true", help="print the result as JSON")
    events.set_defaults(handler=_events)

    core = cmds.add_parser(
        "core",
        help="Cairn vs a local directory: throughput, IOPS, metadata ops/s",
        description="Start a private redis-server and a file:// object store, format a "
        "volume and measure sequential write/read (1 MiB requests, cold read), 4 KiB random "
        "reads and create/stat/unlink; then the same on a local directory; print both and "
        "their ratio. Sizes take K, M, G suffixes.",
    )
    core.add_argument(
        "--size",
        type=_size,
        default="1G",
        metavar="SIZE",
        help="size of the sequentially written file (default 1G)",
    )
    core.add_argument(
        "--files",
        type=_positive,
        default=10_000,
        metavar="N",
        help="files to create, stat and unlink (default 10000)",
    )
    core.add_argument(
        "--random-reads",
        type=_positive,
        default=5000,
        metavar="N",
        help="4 KiB random reads to time (default 5000)",
    )
    core.add_argument(
        "--dir",
        default=None,
        metavar="LOCALDIR",
        help="local directory for the comparison and the object store "
        f"(default {tempfile.gettempdir()})",
    )
    core.add_argument(
        "--block-size",
        type=_size,
        default="4M",
        metavar="SIZE",
        help="the volume's block size (default 4M)",
    )
    core.add_argument(
        "--via",
        choices=("auto", "vfs", "chunk"),
        default="auto",
        help="drive Cairn through the VFS (as a mount does) or the chunk layer under it "
        "(default auto: the VFS when installed)",
    )
    core.add_argument("--json", action="store_true", help="print the result as JSON")
    core.set_defaults(handler=_core)


async def _events(args) -> int:
    from cairn.bench import events as bench
    from cairn.localstack import nats_server, start_tcp

    url = args.nats_url
    server = None
    with tempfile.TemporaryDirectory(prefix="cairn-bench-nats-") as tmp:
        if url is None:
            server = start_tcp(nats_server(Path(tmp)))
            url = server.url
        try:
            result = await bench.run(url, args.count, aggregates=args.aggregates)
        finally:
            if server is not None:
                server.stop()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        bench.print_report(result)
    return 0


async def _core(args) -> int:
    from cairn.bench import core

    result = await core.run(
        size=args.size,
        files=args.files,
        random_reads=args.random_reads,
        local_dir=args.dir,
        block_size=args.block_size,
        via=args.via,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        core.print_report(result)
    return 0
