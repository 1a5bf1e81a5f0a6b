"""Runs a Cairn process: flags and environment, validation, telemetry, signals, exit codes.

Every entry point (`cairn-meta`, `cairn-nodeplugin`, ...) declares its settings and an async
main and hands both to `run`. A CairnError ends the process with one line on stderr and the
exit code cairn.errors.exit_code picks; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cairn import __version__
from cairn.config import Setting, add_settings, resolve
from cairn.errors import CairnError, exit_code

log = logging.getLogger(__name__)

Main = Callable[[dict[str, Any]], Awaitable[None]]


def build_parser(prog: str, description: str, settings: Sequence[Setting]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    add_settings(parser, settings)
    return parser


def fail(prog: str, error: BaseException) -> int:
    print(f"{prog}: {error}", file=sys.stderr)
    return exit_code(error)


async def _run_until_signal(main: Main, config: dict[str, Any]) -> None:
    """Runs main; SIGTERM and SIGINT cancel it so its finally-blocks clean up."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await main(config)
    except asyncio.CancelledError:
        log.info("stopped by signal")


def run(prog: str, description: str, settings: Sequence[Setting], main: Main,
        argv: Sequence[str] | None = None) -> int:
    """Parses, validates, sets up telemetry and runs `main`; returns the exit code."""
    args = build_parser(prog, description, settings).parse_args(argv)
    try:
        config = resolve(args, settings)
        config["service"] = prog
        from cairn import telemetry  # late: keeps --help fast

        telemetry.setup(prog, config.get("otlp_endpoint"), config.get("log_level", "INFO"))
        try:
            asyncio.run(_run_until_signal(main, config))
        finally:
            telemetry.shutdown()
    except CairnError as error:
        return fail(prog, error)
    except KeyboardInterrupt:
        return 130
    return 0


def entry(prog: str, description: str, settings: Sequence[Setting], main: Main) -> None:
    """A console-script entry point: run and exit with its code."""
    sys.exit(run(prog, description, settings, main))
