"""The local Cairn stack behind `cairn dev up|down|status` and the README's main job.

Starts nats-server (JetStream) and redis-server on free or given ports, formats a file system
(`dev`, data in <state dir>/objects) for shared volumes, then every Cairn service that runs
without Kubernetes (cairn-meta, cairn-nodeplugin with <state dir>/kubelet as kubelet's
directory), all as detached child processes. Their endpoints and PIDs go to
<state dir>/endpoints.json; `down` unmounts what the node plugin mounted below the stack's
kubelet directory (its mount processes then exit) and stops exactly those PIDs (after
checking each still runs the command it started) and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
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
    kubelet_dir: str = ""
    fs_name: str = ""
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
    _format_dev_fs(stack)
    say(f"file system   {stack.fs_name!r} in {stack.meta_url}, data in {stack.storage_url}")
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
    stack.kubelet_dir = str(state / "kubelet")
    node = Server("cairn-nodeplugin", _service_argv(
        "cairn_nodeplugin", *common, "--csi-endpoint", stack.node_csi,
        "--node-id", stack.node_id, "--health-addr", stack.health_addr,
        "--kubelet-dir", stack.kubelet_dir, "--meta-url", stack.meta_url,
        "--local-root", str(state / "local-volumes")), logs / "cairn-nodeplugin.log")
    node.start(lambda: port_open("127.0.0.1", health_port))
    _track(stack, node, "cairn_nodeplugin")
    say(f"cairn-nodeplugin  CSI {stack.node_csi}, /healthz on {stack.health_addr}  "
        f"(pid {node.pid})")


def _format_dev_fs(stack: Stack) -> None:
    """Formats the stack's file system (the home of shared volumes) unless it is there, with
    the settings `mount_volume` uses. In a thread of its own: `up` may run inside an event loop."""
    from concurrent.futures import ThreadPoolExecutor

    from cairn.meta.engine import Format, format_volume

    stack.fs_name = DEV_VOLUME
    fmt = Format(name=DEV_VOLUME, storage=stack.storage_url)
    with ThreadPoolExecutor(1, thread_name_prefix="cairn-dev-format") as pool:
        pool.submit(lambda: asyncio.run(format_volume(stack.meta_url, fmt))).result(timeout=120)


def _unmount_leftover(mountpoint: str) -> None:
    """A mount whose process died leaves ENOTCONN behind: detach it."""
    from cairn.fuse.mount import fusermount_unmount, is_mounted

    if is_mounted(mountpoint):
        fusermount_unmount(mountpoint, lazy=True)


def down(state_dir: str | Path, say: Callable[[str], None] = print) -> list[str]:
    """Stops the processes `up` started, services first; returns their names."""
    stack = load(state_dir)
    if stack is None:
        raise FailedPrecondition(f"no local stack in {state_dir}: nothing to stop")
    # The node plugin first: its watcher would restart the mount processes of volumes still
    # staged as soon as their mounts went away. Then what it left mounted (volumes still
    # staged when the demo failed, dataset trees): their mount processes go by their PIDs
    # (SIGTERM flushes and unmounts), and whatever is left is detached.
    stopped = []
    plugin = stack.processes.get("cairn-nodeplugin")
    if plugin is not None and _runs(plugin):
        stop_pid(plugin["pid"], timeout=10)
        stopped.append("cairn-nodeplugin")
        say(f"stopped cairn-nodeplugin (pid {plugin['pid']})")
    tracked = {info["pid"] for info in stack.processes.values()}
    ours = {os.path.realpath(i["mountpoint"]) for i in stack.processes.values()
            if "mountpoint" in i}  # fmt: skip
    for mountpoint in _mounts_below(stack.state_dir):
        if mountpoint in ours:
            continue  # the dev mount: stopped below, with the servers
        pid = _mount_process(mountpoint)
        if pid and pid not in tracked:
            stop_pid(pid, timeout=30)
            say(f"stopped the mount process of {mountpoint} (pid {pid})")
        if mountpoint in _mounts_below(stack.state_dir):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, timeout=60,
                           check=False)  # fmt: skip
            say(f"unmounted {mountpoint}")
    for name, info in reversed(list(stack.processes.items())):
        if _runs(info):
            stop_pid(info["pid"], timeout=60 if "mountpoint" in info else 10)
            stopped.append(name)
            say(f"stopped {name} (pid {info['pid']})")
        if "mountpoint" in info:
            _unmount_leftover(info["mountpoint"])
    stack.processes = {}
    stack.save()
    return stopped


DEV_VOLUME = "dev"


def mount_volume(state_dir: str | Path, say: Callable[[str], None] = print) -> Path:
    """Formats the stack's volume (once) and mounts it at <state>/mnt in the background.

    The mount process is tracked like the servers, last, so `down` unmounts it first
    (SIGTERM flushes and unmounts); returns the mountpoint.
    """
    import asyncio

    from cairn.fuse.mount import is_mounted

    stack = load(state_dir)
    if stack is None or not stack.processes:
        raise FailedPrecondition(f"no local stack in {state_dir}: run `cairn dev up` first")
    state = Path(stack.state_dir)
    mountpoint = state / "mnt"
    mount = stack.processes.get("cairn-mount")
    if mount and _runs(mount) and is_mounted(str(mountpoint)):
        return mountpoint
    asyncio.run(_format(stack.meta_url, stack.storage_url))
    mountpoint.mkdir(exist_ok=True)
    log = state / "logs" / "cairn-mount.log"
    argv = [sys.executable, "-m", "cairn.cli.main", "mount", stack.meta_url, str(mountpoint),
            "--background", "--log", str(log), "--cache-dir", str(state / "cache")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise FailedPrecondition(done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                                 else f"cairn mount failed with code {done.returncode}")
    from cairn.fuse.mount import pid_file  # the mount's default run dir (a short path)

    pid = int(pid_file(str(mountpoint)).read_text().split()[0])
    stack.processes["cairn-mount"] = {"pid": pid, "match": "mount", "log": str(log),
                                      "mountpoint": str(mountpoint)}
    stack.save()
    say(f"cairn mount   volume {DEV_VOLUME!r} at {mountpoint}  (pid {pid})")
    return mountpoint


async def _format(meta_url: str, storage_url: str) -> None:
    from cairn.meta.engine import Format, format_volume

    await format_volume(meta_url, Format(name=DEV_VOLUME, storage=storage_url))


def _mount_process(mountpoint: str) -> int | None:
    """The PID of the `cairn mount` process serving `mountpoint`, if one runs."""
    wanted = mountpoint.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"cairn.cli.main" in argv and b"mount" in argv and wanted in argv:
            return int(entry)
    return None


def _mounts_below(root: str) -> list[str]:
    """Mountpoints below `root` (from /proc/self/mountinfo), deepest first."""
    prefix = os.path.realpath(root).rstrip("/") + "/"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            points = {line.split()[4].replace("\\040", " ") for line in f}
    except OSError:
        return []
    return sorted((p for p in points if p.startswith(prefix)), key=lambda p: -p.count("/"))
