"""`cairn probe` and `cairn liveness`: a CSI plugin's readiness, once or as an HTTP endpoint."""

from __future__ import annotations

import argparse
import asyncio

from cairn.config import CSI_ENDPOINT, HEALTH_ADDR, check_addr, check_url
from cairn.errors import InvalidArgument


def register(sub: argparse._SubParsersAction) -> None:
    probe = sub.add_parser("probe", help="call a CSI plugin's Probe; exit 0 when ready",
                           description="Call CSI Identity.Probe on a plugin's endpoint, as a "
                           "liveness check would. Exit 0: ready; 1: not ready or unreachable.")
    probe.add_argument("--csi-endpoint", required=True, help="unix:///path/csi.sock")
    probe.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    probe.set_defaults(handler=_probe)
    live = sub.add_parser("liveness", help="serve HTTP /healthz backed by CSI Probe (sidecar)",
                          description="Serve GET /healthz: 200 while the plugin's Probe is "
                          "ready, 500 otherwise (the livenessprobe sidecar's job).")
    live.add_argument("--csi-endpoint", required=True, help="unix:///path/csi.sock")
    live.add_argument("--health-addr", default=HEALTH_ADDR.default,
                      help=f"host:port to listen on (default {HEALTH_ADDR.default})")
    live.set_defaults(handler=_liveness)


def _endpoint(value: str) -> str:
    if not value.startswith("unix://"):
        raise InvalidArgument(f"--csi-endpoint '{value}': use unix:///path/to/csi.sock")
    return check_url(CSI_ENDPOINT, value)


async def _probe(args) -> int:
    from cairn.csi.health import probe

    ready, reason = await probe(_endpoint(args.csi_endpoint), args.timeout)
    print("ready" if ready else f"not ready: {reason}")
    return 0 if ready else 1


async def _liveness(args) -> int:
    from cairn.csi.health import Healthz

    host, port = check_addr(HEALTH_ADDR, args.health_addr)
    server = Healthz(_endpoint(args.csi_endpoint), host, port)
    await server.start()
    print(f"serving /healthz on {host}:{port} for {args.csi_endpoint}")
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
    return 0
