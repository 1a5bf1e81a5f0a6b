"""`cairn warmup PATH...`: fill a running mount's block cache with files' blocks.

The paths (files, or directories walked recursively, not crossing into other file systems)
are resolved here, through the mount, so the caller's permissions decide what it may name;
their inode numbers go to the mount over its control channel (cairn.fuse.control), and the
mount process fetches the blocks into its own cache, which is the cache later reads use.
`--evict` drops them again (and the kernel's cached pages); `--check` says how much of them
is cached. A progress bar runs on a terminal; a summary line is always printed.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from typing import Any

from cairn.errors import ConfigError, FailedPrecondition
from cairn.progress import Progress, human_bytes

MiB = 1 << 20


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "warmup", help="fill a mount's block cache with files (or --check, --evict)",
        description="Fetch the blocks of the files under each PATH (on a running Cairn "
        "mount; directories are walked) into that mount's local block cache, so reads of "
        "them are served from local memory or disk. --evict drops them from the cache; "
        "--check reports how much of them is cached.")  # fmt: skip
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or directories on a mount")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--evict", action="store_true", help="drop their blocks from the cache")
    action.add_argument("--check", action="store_true", help="report how much is cached")
    p.add_argument(
        "--threads", type=_positive, default=16, metavar="N",
        help="blocks fetched at once (default 16)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print each mount's result as JSON")
    p.set_defaults(handler=_warmup)


def collect(paths: list[str]) -> tuple[dict[str, list[int]], list[str]]:
    """socket -> the inodes of the regular files under `paths` on that mount; and the
    problems met (unreadable directories), which do not stop the walk."""
    from cairn.fuse.control import find_socket

    groups: dict[str, dict[int, None]] = {}
    problems: list[str] = []
    for given in paths:
        path = os.path.abspath(given)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ConfigError(f"{given}: no such file or directory") from None
        except OSError as error:
            raise ConfigError(f"{given}: {error.strerror}") from None
        inodes = groups.setdefault(find_socket(path), {})
        if stat.S_ISREG(st.st_mode):
            inodes[st.st_ino] = None
        elif stat.S_ISDIR(st.st_mode):
            _walk(path, st.st_dev, inodes, problems)
        else:
            problems.append(f"{given}: not a file or directory")
    return {sock: list(inodes) for sock, inodes in groups.items()}, problems


def _walk(top: str, dev: int, inodes: dict[int, None], problems: list[str]) -> None:
    """Regular files below top, from readdir alone (d_type, d_ino): no stat per file."""
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        inodes[entry.inode()] = None
                    elif entry.is_dir(follow_symlinks=False):
                        if entry.stat(follow_symlinks=False).st_dev == dev:
                            stack.append(entry.path)
        except OSError as error:
            problems.append(f"{directory}: {error.strerror}")


async def _warmup(args: argparse.Namespace) -> int:
    from cairn.fuse.control import ControlClient

    action = "evict" if args.evict else "check" if args.check else "warm"
    groups, problems = collect(args.paths)
    for problem in problems:
        print(f"cairn: warning: {problem}", file=sys.stderr)
    failed = 0
    for sock, inodes in groups.items():
        label = "warmup" if action == "warm" else f"warmup --{action}"
        with Progress(label, unit="B", stream=sys.stdout, live=False if args.json else None) as progress:  # fmt: skip

            def report(state: dict[str, Any], progress: Progress = progress) -> None:
                progress.total = state.get("total") or None
                progress("", int(state.get("bytes", 0)))

            async with ControlClient.connect(sock) as client:
                result = await client.call(
                    "warmup", progress=report, inodes=inodes, action=action, threads=args.threads
                )
            if args.json:
                print(json.dumps(result))
            else:
                progress.done(summary(result))
        failed += result.get("failed_blocks", 0)
        for error in result.get("errors", []):
            print(f"cairn: warning: {error}", file=sys.stderr)
    if failed:
        raise FailedPrecondition(f"warmup: {failed} block(s) could not be fetched")
    return 0


def summary(result: dict[str, Any]) -> str:
    """One line: what was done, how much, how fast, how much is cached now."""
    files = f"{result['files']:,} file(s)"
    if result["skipped"]:
        files += f" ({result['skipped']:,} skipped: gone or not regular files)"
    total = human_bytes(result["bytes"])
    seconds = max(result["seconds"], 1e-9)
    if result["action"] == "check":
        return (
            f"{human_bytes(result['cached_bytes'])} of {total} cached "
            f"({result['percent']:.1f}%), {result['cached_blocks']:,} of "
            f"{result['blocks']:,} blocks, {files}"
        )
    if result["action"] == "evict":
        return (
            f"dropped {total} ({result['blocks']:,} blocks) of {files} from the cache; "
            f"{result['percent']:.1f}% cached now"
        )
    rate = result["fetched_bytes"] / MiB / seconds
    disk = "" if result["disk_cache"] else " [no disk cache: memory only]"
    return (
        f"{total} in {result['blocks']:,} blocks of {files}: "
        f"{human_bytes(result['fetched_bytes'])} fetched, "
        f"{human_bytes(result['already_bytes'])} already cached; "
        f"{seconds:.2f}s, {rate:.1f} MiB/s; {result['percent']:.1f}% cached{disk}"
    )
