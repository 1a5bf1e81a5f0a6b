"""`cairn demo`: the README's main job: a local Cairn stack, shown working.

Starts the stack (`cairn dev up`), asks every service whether it is alive over the wire
(admin API, CSI Probe on both unix sockets, HTTP /healthz), formats and mounts a volume
(local Redis, file:// storage in the state directory), writes and reads a data set in it,
shows the mount's statistics and the events on the stream, then keeps it mounted until
Ctrl-C (or `cairn dev down`) and stops exactly what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import urllib.request
from pathlib import Path

from cairn import devstack
from cairn.cli.dev import DEFAULT_STATE


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="start a local Cairn stack and show it working",
        description="Start a local stack, show each service answering and "
        "the events on the stream; Ctrl-C stops everything it started.",
    )
    demo.add_argument("--state-dir", default=DEFAULT_STATE, help=f"default {DEFAULT_STATE}")
    demo.add_argument(
        "--once",
        action="store_true",
        help="stop the stack after showing it instead of waiting for Ctrl-C",
    )
    demo.add_argument(
        "--big-mib",
        type=int,
        default=256,
        help="size of the large file written and read back (default 256)",
    )
    demo.set_defaults(handler=_demo)


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def show_services(stack: devstack.Stack) -> bool:
    """Prints what each service answers; True when all are healthy."""
    from cairn.csi.health import probe
    from cairn.rpc.channel import connect
    from cairn.rpc.gen import admin_pb2, admin_pb2_grpc

    healthy = True
    async with connect(stack.admin_addr) as channel:
        status = await admin_pb2_grpc.AdminStub(channel).GetStatus(admin_pb2.GetStatusRequest())
        usage = await admin_pb2_grpc.AdminStub(channel).GetUsage(admin_pb2.GetUsageRequest())
    print(f"{status.service} {status.version} on {status.node}, up {status.uptime_seconds:.1f}s")
    for dep in status.dependencies:
        healthy &= dep.ok
        print(f"  {dep.name:13} {dep.url:45} {'ok' if dep.ok else 'FAILED'} ({dep.detail})")
    print(
        f"  usage: {usage.used_bytes} bytes, {usage.used_inodes} inodes, "
        f"{usage.volumes} CSI volumes"
    )
    for name, endpoint in (("controller", stack.controller_csi), ("node", stack.node_csi)):
        ready, reason = await probe(endpoint)
        healthy &= ready
        print(f"CSI Probe {name:10} {endpoint}: {'ready' if ready else reason}")
    url = f"http://{stack.health_addr}/healthz"
    code, body = await asyncio.to_thread(_get, url)
    healthy &= code == 200
    print(f"GET {url}: {code} {body.strip()}")
    return healthy


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


async def show_events(nats_url: str, follow: bool) -> None:
    from cairn.cli.events import format_event
    from cairn.events import EventStore, JetStreamBus

    bus = await JetStreamBus.connect(nats_url, name="cairn-demo")
    try:
        store = EventStore(bus)
        await store.ensure_stream()
        async for recorded in store.read_all(1, follow=follow):
            print(format_event(recorded), flush=True)
            if not follow and recorded.sequence >= await store.last_sequence():
                break
    finally:
        await bus.close()


def show_mount(mountpoint) -> None:
    import shutil
    import subprocess
    import sys

    fs = os.statvfs(mountpoint)
    used = (fs.f_blocks - fs.f_bfree) * fs.f_frsize
    print(f"{mountpoint}: {used / (1 << 20):.1f} MiB used, {fs.f_files - fs.f_ffree} inodes")
    cairn = shutil.which("cairn", path=os.path.dirname(sys.executable)) or "cairn"
    shown = subprocess.run(
        [cairn, "stats", "--once", str(mountpoint)], capture_output=True, text=True, timeout=30
    )
    print(
        shown.stdout.rstrip()
        if shown.returncode == 0
        else f"(cairn stats: {shown.stderr.strip() or 'unavailable'})"
    )


def cairn_cli(*args: str, state_dir: str) -> str:
    """Runs a `cairn` command as a user would; its output, or FailedPrecondition."""
    import shutil
    import subprocess
    import sys

    from cairn.errors import FailedPrecondition

    cairn = shutil.which("cairn", path=os.path.dirname(sys.executable)) or "cairn"
    env = {**os.environ, "CAIRN_DEV_STATE": state_dir}
    done = subprocess.run([cairn, *args], capture_output=True, text=True, timeout=120, env=env)
    if done.returncode != 0:
        raise FailedPrecondition(f"cairn {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.rstrip()


def csi_walkthrough(state_dir: str) -> tuple[str, str]:
    """A PVC's life as kubelet and the sidecars drive it, through the CSI sockets:
    CreateVolume, NodeStage, NodePublish into a pod directory, a write, stats, history."""
    created = cairn_cli("volume", "create", "pvc-demo", "--size", "64M", state_dir=state_dir)
    print(f"$ cairn volume create pvc-demo --size 64M\n{created}")
    volume_id = created.split()[1]
    for command in (("stage", volume_id), ("publish", volume_id, "--pod", "demo")):
        print(f"$ cairn volume {' '.join(command)}")
        print(output := cairn_cli("volume", *command, state_dir=state_dir))
    target = output.split(" published at ")[1].split()[0]
    Path(target, "hello.txt").write_text("written by a pod into its CSI volume\n")
    print(f"wrote {target}/hello.txt")
    print(f"$ cairn volume stats {volume_id}")
    print(cairn_cli("volume", "stats", volume_id, state_dir=state_dir))
    return volume_id, target


def csi_cleanup(state_dir: str, volume_id: str) -> None:
    for command in (
        ("unpublish", volume_id, "--pod", "demo"),
        ("unstage", volume_id),
        ("delete", volume_id),
    ):
        cairn_cli("volume", *command, state_dir=state_dir)
    print(f"unpublished, unstaged and deleted {volume_id}")


async def show_dataset(stack: devstack.Stack, volume_id: str, target: str, state_dir: str) -> None:
    """Files in the volume, then a Dataset of it bound, warmed up and reported."""
    from cairn import demo_dataset

    size = await asyncio.to_thread(demo_dataset.make_files, Path(target, "photos"))
    print(f"wrote {size >> 20} MiB of files into {target}/photos")
    tier = os.path.join(stack.state_dir, "cache-tier")  # absolute: the stack made it so
    await demo_dataset.run(stack, volume_id, tier, print)
    key = f"{demo_dataset.NAMESPACE}/{demo_dataset.NAME}"
    print(f"$ cairn dataset history {demo_dataset.NAME} -n {demo_dataset.NAMESPACE}   # {key}")
    print(await asyncio.to_thread(cairn_cli, "dataset", "history", demo_dataset.NAME, "-n",
                                  demo_dataset.NAMESPACE, "--nats-url", stack.nats_url,
                                  state_dir=state_dir))  # fmt: skip


async def _demo(args) -> int:
    from cairn import workload

    step("starting the local stack (cairn dev up)")
    stack = await asyncio.to_thread(devstack.up, args.state_dir)
    try:
        step("asking each service over the wire")
        for _ in range(50):  # services announce themselves right after they listen
            healthy = await show_services(stack)
            if healthy:
                break
            await asyncio.sleep(0.2)
        step("formatting and mounting a volume (cairn format, cairn mount)")
        mountpoint = await asyncio.to_thread(devstack.mount_volume, args.state_dir)
        step("doing real work in the mount")
        source = Path(__file__).parents[1]  # the cairn package itself
        await asyncio.to_thread(workload.run, mountpoint, source, args.big_mib)
        step("the mount's statistics (cairn stats --once)")
        await asyncio.to_thread(show_mount, mountpoint)
        step("a CSI volume, driven over the plugins' unix sockets as kubelet would")
        volume_id, target = await asyncio.to_thread(csi_walkthrough, args.state_dir)
        step(f"its story from the event stream (cairn volume history {volume_id})")
        print(
            await asyncio.to_thread(
                cairn_cli, "volume", "history", volume_id, state_dir=args.state_dir
            )
        )
        step("a dataset on that volume, cached next to its readers (cairn-cache-syncer)")
        await show_dataset(stack, volume_id, target, args.state_dir)
        await asyncio.to_thread(csi_cleanup, args.state_dir, volume_id)
        step("events on the stream (JetStream CAIRN_EVENTS)")
        if args.once:
            await show_events(stack.nats_url, follow=False)
        else:
            env = os.path.join(stack.state_dir, devstack.ENV_FILE)
            print(
                f"(the volume stays mounted at {mountpoint}; in another shell: `source {env}` "
                "and use cairn, or `cairn dev down` to stop; Ctrl-C here stops it all)",
                flush=True,
            )
            await show_events(stack.nats_url, follow=True)
        return 0 if healthy else 1
    finally:
        step("stopping what the demo started")
        await asyncio.to_thread(devstack.down, args.state_dir)
