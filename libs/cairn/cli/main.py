"""`cairn`: the user's command line. Each command group lives in its own module.

A command module offers `register(subparsers)`, which adds its parsers and sets
`handler` (an async function taking the parsed args and returning an exit code).
CairnErrors end the command with one line on stderr and a sysexits-style code.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence

from cairn import __version__
from cairn.errors import CairnError, exit_code

COMMAND_MODULES = ("dev", "demo", "events", "probe", "fs", "bench", "mount", "volume",
                   "dataset", "stats", "warmup")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cairn",
        description="Cairn: a distributed POSIX file system on Redis and object storage, "
        "with a Kubernetes CSI driver.",
    )
    parser.add_argument("--version", action="version", version=f"cairn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"cairn.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr if args.command is None else sys.stdout)
        sys.exit(2 if args.command is None else 0)
    try:
        code = asyncio.run(handler(args))
    except CairnError as error:
        print(f"cairn: {error}", file=sys.stderr)
        code = exit_code(error)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
