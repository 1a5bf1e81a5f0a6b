"""`cairn bench events|core|fs`: measure the event store and the file system on this machine.

They bring up what they need as private child processes on free ports (nats-server for
events unless --nats-url is given; redis-server and a file:// store for core, and for fs
without DIR a background mount too) and stop them, by PID, when done.
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

    provision = cmds.add_parser(
        "provision",
        help="PVCs from creation to Bound (cairn-provisioner)",
        description="Create N PVCs at once and time each until Bound. Without --kubeconfig: "
        "a private nats-server, redis-server and cairn-meta, the provisioner in-process "
        "against the in-memory Kubernetes API; with it: a real cluster's StorageClass.",
    )
    provision.add_argument("--count", type=_positive, default=100, metavar="N",
                           help="PVCs to create (default 100)")
    provision.add_argument("--kubeconfig", default=None, metavar="PATH",
                           help="measure against this cluster instead")
    provision.add_argument("--storage-class", default="cairn", metavar="NAME",
                           help="StorageClass in the cluster (default cairn)")
    provision.add_argument("--namespace", default="default", metavar="NS",
                           help="namespace of the PVCs in the cluster (default default)")
    provision.add_argument("--json", action="store_true", help="print the result as JSON")
    provision.set_defaults(handler=_provision)
    _register_fs(cmds)


def _register_fs(cmds: argparse._SubParsersAction) -> None:
    fs = cmds.add_parser(
        "fs",
        help="a Cairn mount vs a local directory, through the kernel (FUSE)",
        description="Measure, with system calls, sequential write/read of one file (1 MiB "
        "requests, cold read), 4 KiB random reads and create/stat/unlink of small files, "
        "in DIR (a directory on a running Cairn mount) and in a local directory; print "
        "both, their ratio, the targets, and which cache tier served Cairn's reads. "
        "Without DIR a private redis-server, file:// volume and background mount are "
        "made for the run and removed afterwards. Sizes take K, M, G suffixes.",
    )
    fs.add_argument("dir", nargs="?", default=None, metavar="DIR",
                    help="a directory on a Cairn mount (default: a private mount)")  # fmt: skip
    fs.add_argument("--size", type=_size, default="1G", metavar="SIZE",
                    help="size of the sequentially written file (default 1G)")  # fmt: skip
    fs.add_argument("--files", type=_positive, default=10_000, metavar="N",
                    help="files to create, stat and unlink (default 10000)")  # fmt: skip
    fs.add_argument("--random-reads", type=_positive, default=5000, metavar="N",
                    help="4 KiB random reads to time (default 5000)")  # fmt: skip
    fs.add_argument("--local-dir", default=None, metavar="LOCALDIR",
                    help="local directory for the comparison (and the private volume's "
                    f"store, cache and redis data; default {tempfile.gettempdir()})")  # fmt: skip
    fs.add_argument("--mount-option", action="append", default=[], metavar="FLAG",
                    help="a `cairn mount` flag for the private mount (repeatable), e.g. "
                    "--mount-option=--writeback-cache")  # fmt: skip
    fs.add_argument("--json", action="store_true", help="print the result as JSON")
    fs.set_defaults(handler=_fs)


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


async def _fs(args) -> int:
    from cairn.bench import fs

    result = await fs.run(
        args.dir,
        size=args.size,
        files=args.files,
        random_reads_count=args.random_reads,
        local_dir=args.local_dir,
        mount_args=args.mount_option,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        fs.print_report(result)
    return 0


async def _provision(args) -> int:
    from cairn.bench import provision

    if args.kubeconfig:
        result = await provision.run_cluster(args.count, args.kubeconfig, args.storage_class,
                                             args.namespace)
    else:
        result = await provision.run_memory(args.count)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        provision.print_report(result)
    return 0
