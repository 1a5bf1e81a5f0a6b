"""`cairn dev up|down|status`: the local stack for development and the README's main job."""

from __future__ import annotations

import argparse
import os

from cairn import devstack

DEFAULT_STATE = os.environ.get("CAIRN_DEV_STATE", ".cairn/dev")


def register(sub: argparse._SubParsersAction) -> None:
    dev = sub.add_parser("dev", help="run a local Cairn stack (NATS, Redis, services)",
                         description="Start, inspect and stop a local Cairn stack.")
    dev.set_defaults(handler=None)
    cmds = dev.add_subparsers(dest="dev_command", metavar="COMMAND")
    up = cmds.add_parser("up", help="start nats-server, redis-server and the services")
    up.add_argument("--state-dir", default=DEFAULT_STATE,
                    help=f"where state, logs and endpoints go (default {DEFAULT_STATE}; "
                    "env CAIRN_DEV_STATE)")
    up.add_argument("--nats-port", type=int, help="port for nats-server (default: a free one)")
    up.add_argument("--redis-port", type=int, help="port for redis-server (default: free)")
    up.set_defaults(handler=_up)
    down = cmds.add_parser("down", help="stop exactly the processes `dev up` started")
    down.add_argument("--state-dir", default=DEFAULT_STATE)
    down.set_defaults(handler=_down)
    status = cmds.add_parser("status", help="show the stack's processes and endpoints")
    status.add_argument("--state-dir", default=DEFAULT_STATE)
    status.set_defaults(handler=_status)


async def _up(args) -> int:
    stack = devstack.up(args.state_dir, args.nats_port, args.redis_port)
    print(f"endpoints: {os.path.join(stack.state_dir, devstack.ENDPOINTS_FILE)} "
          f"(source {os.path.join(stack.state_dir, devstack.ENV_FILE)} for CAIRN_* variables)")
    return 0


async def _down(args) -> int:
    stopped = devstack.down(args.state_dir)
    if not stopped:
        print("nothing was running")
    return 0


async def _status(args) -> int:
    stack = devstack.load(args.state_dir)
    if stack is None or not stack.processes:
        print(f"no local stack in {args.state_dir} (start one with `cairn dev up`)")
        return 3
    alive = stack.alive()
    for name, info in stack.processes.items():
        state = "running" if alive[name] else "DEAD"
        print(f"{name:18} pid {info['pid']:<8} {state:8} log {info['log']}")
    for key, value in stack.env().items():
        print(f"{key}={value}")
    return 0 if all(alive.values()) else 1
