"""The local Cairn stack behind `cairn dev up|down|status` and the README's main job.

Starts nats-server (JetStream) and redis-server on free or given ports, then every Cairn
service that runs without Kubernetes (cairn-meta, cairn-nodeplugin), all as detached child
processes. Their endpoints and PIDs go to <state dir>/endpoints.json; `down` stops exactly
those PIDs (after checking each still runs the command it started) and nothing else.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cairn import localstack
from cairn.errors import FailedPrecondition
from cairn.localstack import Server, free_port, port_open, stop_pid

ENDPOINTS_FILE = "endpoints.json"
ENV_FILE = "endpoints.env"


@dataclass
class Stack:
    state_dir: str
    nats_url: str = ""
    meta_url: str = ""
    storage_url: str = ""
    admin_addr: str = ""
    controller_csi: str = ""
    node_csi: str = ""
    health_addr: str = ""
    node_id: str = ""
    processes: dict[str, dict] = field(default_factory=dict)  # name -> {pid, argv0, log}

    def env(self) -> dict[str, str]:
        """CAIRN_* variables pointing a client at this stack."""
        return {"CAIRN_NATS_URL": self.nats_url, "CAIRN_META_URL": self.meta_url,
                "CAIRN_STORAGE_URL": self.storage_url, "CAIRN_ADMIN_ADDR": self.admin_addr}

    def save(self) -> None:
        state = Path(self.state_dir)
        (state / ENDPOINTS_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")
        lines = [f"export {k}={v}" for k, v in self.env().items()]
        (state / ENV_FILE).write_text("\n".join(lines) + "\n")

    def alive(self) -> dict[str, bool]:
        return {name: _runs(info) for name, info in self.processes.items()}


def _runs(info: dict) -> bool:
    """True when the PID is alive and still runs what we started (PIDs get reused)."""
    try:
        cmdline = Path(f"/proc/{info['pid']}/cmdline").read_bytes()
    except OSError:
        return False
    return info["match"].encode() in cmdline


def load(state_dir: str | Path) -> Stack | None:
    path = Path(state_dir) / ENDPOINTS_FILE
    if not path.exists():
        return None
    return Stack(**json.loads(path.read_text()))


def _service_argv(module: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", module, *flags]


def up(state_dir: str | Path, nats_port: int | None = None, redis_port: int | None = None,
       say: Callable[[str], None] = print) -> Stack:
    """Starts the stack, or returns the running one when every process is alive."""
    state = Path(state_dir).resolve()
    existing = load(state)
    if existing and existing.processes and all(existing.alive().values()):
        say(f"local stack already running (state in {state})")
        return existing
    if existing:
        down(state, say=lambda _m: None)
    state.mkdir(parents=True, exist_ok=True)
    stack = Stack(state_dir=str(state), node_id=os.uname().nodename)
    try:
        _start_all(stack, state, nats_port, redis_port, say)
    except BaseException:
        stack.save()
        down(state, say=lambda _m: None)
        raise
    stack.save()
    return stack


def _track(stack: Stack, server: Server, match: str) -> None:
    stack.processes[server.name] = {"pid": server.pid, "match": match,
                                    "log": str(server.log_path)}
    stack.save()


def _start_all(stack: Stack, state: Path, nats_port, redis_port, say) -> None:
    logs = state / "logs"
    nats = localstack.nats_server(state / "nats", nats_port)
    localstack.start_tcp(nats)
    _track(stack, nats, "nats-server")
    stack.nats_url = nats.url
    say(f"nats-server   {nats.url}  (JetStream in {state / 'nats'}, pid {nats.pid})")

    redis = localstack.redis_server(state / "redis", redis_port)
    localstack.start_tcp(redis)
    _track(stack, redis, "redis-server")
    stack.meta_url = redis.url
    say(f"redis-server  {redis.url}  (pid {redis.pid})")

    objects = state / "objects"
    objects.mkdir(exist_ok=True)
    stack.storage_url = f"file://{objects}"
    admin_port = free_port()
    stack.admin_addr = f"127.0.0.1:{admin_port}"
    stack.controller_csi = f"unix://{state / 'sockets' / 'controller.sock'}"
    common = ["--nats-url", stack.nats_url, "--data-dir", str(state / "data")]
    meta = Server("cairn-meta", _service_argv(
        "cairn_meta", *common, "--meta-url", stack.meta_url, "--storage-url", stack.storage_url,
        "--admin-addr", stack.admin_addr, "--csi-endpoint", stack.controller_csi),
        logs / "cairn-meta.log")
    meta.start(lambda: port_open("127.0.0.1", admin_port))
    _track(stack, meta, "cairn_meta")
    say(f"cairn-meta    admin {stack.admin_addr}, CSI {stack.controller_csi}  (pid {meta.pid})")

    health_port = free_port()
    stack.health_addr = f"127.0.0.1:{health_port}"
    stack.node_csi = f"unix://{state / 'sockets' / 'node.sock'}"
    node = Server("cairn-nodeplugin", _service_argv(
        "cairn_nodeplugin", *common, "--csi-endpoint", stack.node_csi,
        "--node-id", stack.node_id, "--health-addr", stack.health_addr,
        "--kubelet-dir", str(state / "kubelet")), logs / "cairn-nodeplugin.log")
    node.start(lambda: port_open("127.0.0.1", health_port))
    _track(stack, node, "cairn_nodeplugin")
    say(f"cairn-nodeplugin  CSI {stack.node_csi}, /healthz on {stack.health_addr}  "
        f"(pid {node.pid})")


def down(state_dir: str | Path, say: Callable[[str], None] = print) -> list[str]:
    """Stops the processes `up` started, services first; returns their names."""
    stack = load(state_dir)
    if stack is None:
        raise FailedPrecondition(f"no local stack in {state_dir}: nothing to stop")
    stopped = []
    for name, info in reversed(list(stack.processes.items())):
        if _runs(info):
            stop_pid(info["pid"])
            stopped.append(name)
            say(f"stopped {name} (pid {info['pid']})")
    stack.processes = {}
    stack.save()
    return stopped
