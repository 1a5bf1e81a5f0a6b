"""Runs a Cairn process: flags and environment, validation, telemetry, signals, exit codes.

Every entry point (`cairn-meta`, `cairn-nodeplugin`, ...) declares its settings and an async
main and hands both to `run`. A CairnError ends the process with one line on stderr and the
exit code cairn.errors.exit_code picks; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
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


class Runtime:
    """What a running service holds on to: its event store (with outbox) and its name.

    `open_runtime` validates NATS at start (one line and a non-zero exit when it is
    unreachable); afterwards a bus outage only delays events, through the outbox.
    """

    def __init__(self, cfg: dict[str, Any], bus, store, events):
        self.cfg, self.bus, self.store, self.events = cfg, bus, store, events
        self.prog = cfg["service"]
        self.node = cfg.get("node_id") or os_nodename()
        self.instance = f"{self.prog.removeprefix('cairn-')}@{self.node}"

    async def announce_started(self) -> None:
        from cairn import __version__
        from cairn.events import ServiceStarted

        await self.events.append("service", self.instance, [ServiceStarted(
            service=self.prog, node=self.node, version=__version__, pid=os.getpid())])

    async def announce_stopped(self) -> None:
        from cairn.events import ServiceStopped

        try:
            await self.events.append("service", self.instance, [ServiceStopped(
                service=self.prog, node=self.node)])
        except CairnError as error:  # stopping must not fail on the bus
            log.warning("could not record ServiceStopped: %s", error)

    async def close(self) -> None:
        await self.events.close()
        await self.bus.close()


def os_nodename() -> str:
    return os.uname().nodename


async def open_runtime(cfg: dict[str, Any]) -> Runtime:
    from cairn.connect import nats as probe_nats
    from cairn.events import EventStore, JetStreamBus, OutboxedStore

    probe = await probe_nats(cfg["nats_url"], name=cfg["service"])  # one-line failure
    await probe.close()
    bus = await JetStreamBus.connect(cfg["nats_url"], name=cfg["service"])
    days = float(cfg.get("stream_max_age") or 0)
    store = EventStore(bus, max_age=days * 86400,
                       num_replicas=int(cfg.get("stream_replicas") or 1))
    await store.ensure_stream()
    data_dir = Path(cfg.get("data_dir") or ".cairn") / cfg["service"]
    events = OutboxedStore(store, data_dir / "outbox")
    await events.start()
    return Runtime(cfg, bus, store, events)


async def wait_forever() -> None:
    await asyncio.Event().wait()
