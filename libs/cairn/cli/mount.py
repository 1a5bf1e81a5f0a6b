"""`cairn mount META_URL MOUNTPOINT` and `cairn umount MOUNTPOINT`: the FUSE client commands.

`cairn mount` serves in the foreground until the mountpoint is unmounted or the process gets
SIGTERM/SIGINT; with --background it starts a detached mount process and returns once the
mount answers (exit 0), or with one line and a non-zero code when it could not be made.
`cairn umount` unmounts and waits for the mount process to finish its last writes.

META_URL may be `-` or left out: the URL is then read from the environment
(CAIRN_META_URL), so a password in it never shows in a process listing (the node plugin
starts its mounts that way; a background child is handed `-` and inherits the variable).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cairn.cli.fs import META_HELP, check_meta_url, parse_size, seconds
from cairn.errors import CairnError, ConfigError

META_ENV = "CAIRN_META_URL"  # where META_URL is read from when given as '-' or left out


def register(sub: argparse._SubParsersAction) -> None:
    _register_mount(sub)
    _register_umount(sub)


def _register_mount(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mount", help="mount a volume with FUSE",
        description="Mount a Cairn volume at MOUNTPOINT (an existing, empty directory). A "
        "dead mount left there by a killed process is cleaned up first. Runs until "
        "unmounted (cairn umount) or stopped with SIGTERM/SIGINT, which flush every write "
        "and unmount. Sizes take K, M, G, T suffixes.")  # fmt: skip
    p.add_argument("meta_url", metavar="META_URL", nargs="?", default="-",
                   help=META_HELP + f"; '-' or none: the {META_ENV} environment variable")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="directory to mount on")
    p.add_argument(
        "--subdir",
        default="",
        metavar="DIR",
        help="mount only this directory of the volume (a path inside it)",
    )
    p.add_argument("--read-only", action="store_true", help="mount read-only")
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="disk cache of blocks (default: a directory per volume under "
        "/var/cache/cairn, or ~/.cache/cairn)",
    )
    p.add_argument(
        "--cache-size",
        type=parse_size,
        default="1G",
        metavar="SIZE",
        help="disk cache size (0: no disk cache; default 1G)",
    )
    p.add_argument(
        "--buffer-size",
        type=parse_size,
        default="256M",
        metavar="SIZE",
        help="memory for buffered writes before they are flushed (default 256M)",
    )
    p.add_argument(
        "--attr-cache",
        type=seconds,
        default=30.0,
        metavar="S",
        help="seconds attributes stay cached (kernel and mount) when no change note from "
        "another mount drops them first (default 30)",
    )
    p.add_argument(
        "--entry-cache",
        type=seconds,
        default=30.0,
        metavar="S",
        help="seconds name lookups stay cached when no change note drops them (default 30)",
    )
    p.add_argument(
        "--outage-wait",
        type=seconds,
        default=60.0,
        metavar="S",
        help="seconds an operation waits for an unreachable Redis or object store to come "
        "back before failing with EIO (default 60)",
    )
    p.add_argument(
        "--writeback-cache",
        action="store_true",
        help="let the kernel buffer small writes (faster, less consistent between clients)",
    )
    p.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users access the mount (root, or user_allow_other)",
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=128,
        metavar="N",
        help="FUSE requests served at once (default 128)",
    )
    p.add_argument(
        "--kernel-readahead",
        type=parse_size,
        default="4M",
        metavar="SIZE",
        help="how far the kernel reads ahead of a sequential reader (root only; 0: the "
        "kernel's 128K; default 4M)",
    )
    p.add_argument(
        "--cache-writes",
        action="store_true",
        help="also keep written blocks in the disk cache (default: only blocks read)",
    )
    p.add_argument(
        "--metrics-addr",
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off)",
    )
    p.add_argument(
        "-d",
        "--background",
        action="store_true",
        help="run in the background; return once the mount is ready",
    )
    p.add_argument(
        "--log",
        default=None,
        metavar="FILE",
        help="log file (default with --background: <run dir>/<mountpoint>.log; else stderr)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR (default INFO)",
    )
    p.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    p.set_defaults(handler=_mount)


def _register_umount(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "umount", help="unmount a Cairn mount and wait for its process to exit",
        description="Unmount MOUNTPOINT (fusermount3 -u) and wait until its mount process has "
        "flushed its writes and exited. Fails while files are open in it, unless --lazy "
        "(which detaches it now and lets the process finish when the last file closes).")  # fmt: skip
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-z", "--lazy", action="store_true", help="detach even while files are open")
    p.add_argument(
        "--timeout",
        type=seconds,
        default=60.0,
        metavar="S",
        help="how long to wait for the mount process to exit (default 60)",
    )
    p.set_defaults(handler=_umount)


def _config(args: argparse.Namespace) -> object:
    from cairn.fuse.mount import MountConfig

    return MountConfig(
        meta_url=args.meta_url, mountpoint=os.path.abspath(args.mountpoint),
        subdir=args.subdir, read_only=args.read_only,
        cache_dir=os.path.abspath(args.cache_dir) if args.cache_dir else None,
        cache_size=args.cache_size, buffer_size=args.buffer_size,
        attr_timeout=args.attr_cache, entry_timeout=args.entry_cache,
        writeback_cache=args.writeback_cache, allow_other=args.allow_other,
        max_tasks=max(1, args.max_requests), log_file=args.log,
        metrics_addr=args.metrics_addr, kernel_readahead=args.kernel_readahead,
        cache_writes=args.cache_writes, outage_wait=args.outage_wait,
    )  # fmt: skip


def _child_argv(args: argparse.Namespace, log_path: Path) -> list[str]:
    """`cairn mount ...` for the detached child: the same settings, absolute paths, no -d."""
    argv = ["mount", "-" if args.meta_from_env else args.meta_url, os.path.abspath(args.mountpoint),
            "--cache-size", str(args.cache_size), "--buffer-size", str(args.buffer_size),
            "--attr-cache", repr(args.attr_cache), "--entry-cache", repr(args.entry_cache),
            "--outage-wait", repr(args.outage_wait),
            "--max-requests", str(args.max_requests), "--log", str(log_path),
            "--kernel-readahead", str(args.kernel_readahead),
            "--log-level", args.log_level]  # fmt: skip
    if args.subdir:
        argv += ["--subdir", args.subdir]
    if args.cache_dir:
        argv += ["--cache-dir", os.path.abspath(args.cache_dir)]
    if args.metrics_addr:
        argv += ["--metrics-addr", args.metrics_addr]
    for flag in ("read_only", "writeback_cache", "allow_other", "cache_writes"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    return argv


def _setup_logging(args: argparse.Namespace) -> None:
    from cairn.telemetry.logs import configure

    if args.log and args.ready_fd < 0:
        # Foreground with --log: lines go to the file (a background child's stderr is
        # already its log file).
        path = Path(args.log)
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
        configure("cairn-mount", args.log_level, stream=stream)
    else:
        configure("cairn-mount", args.log_level)
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)


async def _mount(args: argparse.Namespace) -> int:
    from cairn.fuse import mount

    args.meta_from_env = args.meta_url in ("", "-")
    if args.meta_from_env:
        args.meta_url = os.environ.get(META_ENV, "")
        if not args.meta_url:
            raise ConfigError(f"no META_URL: give it, or set {META_ENV} and give '-'")
    check_meta_url(args.meta_url)
    if args.metrics_addr:
        from cairn.telemetry.metrics import parse_addr

        parse_addr(args.metrics_addr)  # a typo fails here, in the caller's terminal
    if args.background:
        return _start_background(args)
    ready = mount.ReadyPipe(args.ready_fd)
    try:
        _setup_logging(args)
        return await mount.serve(_config(args), on_ready=ready.ready)
    except BaseException as error:
        ready.failed(error)
        raise


def _start_background(args: argparse.Namespace) -> int:
    from cairn.fuse import mount

    mountpoint = os.path.abspath(args.mountpoint)
    mount.prepare_mountpoint(mountpoint)  # fail fast, in the caller's terminal
    log_path = Path(os.path.abspath(args.log)) if args.log else mount.default_log(mountpoint)
    try:
        pid = mount.start_background(_child_argv(args, log_path), mountpoint, log_path)
    except CairnError as error:
        print(f"cairn: {error}", file=sys.stderr)
        return mount.child_exit_code(error)
    print(f"cairn: mounted at {mountpoint} (pid {pid}, log {log_path})")
    return 0


async def _umount(args: argparse.Namespace) -> int:
    from cairn.fuse import mount

    where, pid = mount.unmount(args.mountpoint, lazy=args.lazy, timeout=args.timeout)
    print(f"cairn: unmounted {where}" + (f" (mount process {pid} exited)" if pid else ""))
    return 0
