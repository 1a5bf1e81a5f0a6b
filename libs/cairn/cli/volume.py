"""`cairn volume ...`: CSI volumes by hand, over the same sockets kubelet and the sidecars use;
and `cairn registrar`, the kubelet plugin registration sidecar.

    cairn volume create NAME --size 1G [--type local --local-node NODE]
    cairn volume list | delete VOLUME
    cairn volume stage VOLUME            # NodeStageVolume at kubelet's global mount path
    cairn volume publish VOLUME --pod P  # NodePublishVolume into a pod's volume directory
    cairn volume stats VOLUME | unpublish VOLUME --pod P | unstage VOLUME
    cairn volume history VOLUME          # the volume's events from the stream, in order

The controller (`--controller`), node (`--node`) and NATS endpoints and kubelet's directory
default to those of the `cairn dev up` stack (<state dir>/endpoints.json), so against the dev
stack no flag is needed. Paths are kubelet's: the staging path is
<kubelet dir>/plugins/kubernetes.io/csi/csi.cairn.io/<sha256 of the id>/globalmount and a
pod's target <kubelet dir>/pods/<pod>/volumes/kubernetes.io~csi/<volume>/mount.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from cairn import DRIVER_NAME
from cairn.cli.fs import parse_size
from cairn.config import NATS_URL
from cairn.errors import ConfigError, InvalidArgument, UnavailableError

DEFAULT_STATE = os.environ.get("CAIRN_DEV_STATE", ".cairn/dev")
DEFAULT_KUBELET = "/var/lib/kubelet"
TOPOLOGY_KEY = "topology.csi.cairn.io/node"
MODES = ("SINGLE_NODE_WRITER", "SINGLE_NODE_READER_ONLY", "MULTI_NODE_READER_ONLY",
         "MULTI_NODE_SINGLE_WRITER", "MULTI_NODE_MULTI_WRITER", "SINGLE_NODE_SINGLE_WRITER",
         "SINGLE_NODE_MULTI_WRITER")  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    _register_volume(sub)
    _register_registrar(sub)


def _register_volume(sub: argparse._SubParsersAction) -> None:
    volume = sub.add_parser(
        "volume", help="create, stage, publish and inspect CSI volumes by hand",
        description="Call the CSI Controller and Node services as the Kubernetes sidecars and "
        "kubelet do. Endpoints default to the `cairn dev up` stack's.")  # fmt: skip
    volume.set_defaults(handler=None)
    cmds = volume.add_subparsers(dest="volume_command", metavar="COMMAND")

    p = _command(cmds, "create", "CreateVolume: a shared directory with a quota, or local")
    p.add_argument("name", metavar="NAME", help="the volume's name (the PV name)")
    p.add_argument("--size", type=parse_size, default="1G", help="capacity (default 1G)")
    p.add_argument("--type", choices=("shared", "local"), default="shared")
    p.add_argument("--local-node", metavar="NODE", help="the node a local volume must be on")
    p.add_argument("--access-mode", choices=MODES, help="default: by type")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a StorageClass parameter (repeatable)")  # fmt: skip
    _secret_flag(p)
    p.set_defaults(handler=_create)

    p = _command(cmds, "list", "ListVolumes")
    p.set_defaults(handler=_list)

    p = _command(cmds, "delete", "DeleteVolume")
    p.add_argument("volume", metavar="VOLUME", help="volume id")
    _secret_flag(p)
    p.set_defaults(handler=_delete)

    p = _command(cmds, "stage", "NodeStageVolume at kubelet's global mount path")
    _node_args(p)
    p.add_argument("--access-mode", choices=MODES, help="default: by the volume's type")
    _secret_flag(p)
    p.set_defaults(handler=_stage)

    p = _command(cmds, "publish", "NodePublishVolume into a pod's volume directory")
    _node_args(p, target=True)
    p.add_argument("--access-mode", choices=MODES, help="default: by the volume's type")
    p.add_argument("--read-only", action="store_true")
    p.set_defaults(handler=_publish)

    p = _command(cmds, "unpublish", "NodeUnpublishVolume")
    _node_args(p, target=True)
    p.set_defaults(handler=_unpublish)

    p = _command(cmds, "unstage", "NodeUnstageVolume")
    _node_args(p)
    p.set_defaults(handler=_unstage)

    p = _command(cmds, "stats", "NodeGetVolumeStats: bytes, inodes and the volume's condition")
    _node_args(p)
    p.add_argument("--path", help="the volume path to ask about (default: the staging path)")
    p.set_defaults(handler=_stats)

    p = _command(cmds, "history", "the volume's events, from the stream, in order")
    p.add_argument("volume", metavar="VOLUME", help="volume id")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.set_defaults(handler=_history)


def _command(cmds: argparse._SubParsersAction, name: str, help_: str) -> argparse.ArgumentParser:
    p = cmds.add_parser(name, help=help_, description=help_ + ".")
    p.add_argument("--state-dir", default=DEFAULT_STATE,
                   help=f"the `cairn dev up` stack whose endpoints are the defaults "
                   f"(default {DEFAULT_STATE}; env CAIRN_DEV_STATE)")  # fmt: skip
    p.add_argument("--controller", metavar="ENDPOINT", help="CSI controller (unix:///...)")
    p.add_argument("--node", metavar="ENDPOINT", help="CSI node plugin (unix:///...)")
    p.add_argument("--nats-url", help=f"{NATS_URL.help}; env {NATS_URL.env}")
    p.add_argument("--kubelet-dir", help=f"kubelet's directory (default: the stack's, else "
                   f"{DEFAULT_KUBELET})")  # fmt: skip
    return p


def _node_args(p: argparse.ArgumentParser, target: bool = False) -> None:
    p.add_argument("volume", metavar="VOLUME", help="volume id")
    p.add_argument("--staging-path", help="default: kubelet's global mount path of the volume")
    if target:
        p.add_argument("--pod", default="cli", help="the pod whose volume directory to use "
                       "(default 'cli')")  # fmt: skip
        p.add_argument("--target", help="the target path (default: from --pod)")


def _secret_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--secret", action="append", default=[], metavar="KEY=VALUE",
                   help="a secret for the call, e.g. metaurl=redis://... (repeatable)")  # fmt: skip


def _register_registrar(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "registrar", help="register a CSI plugin with kubelet (sidecar)",
        description="Serve kubelet's plugin registration API on "
        "<registration dir>/<driver>-reg.sock for the CSI plugin at --csi-endpoint, as "
        "node-driver-registrar does. Exits non-zero when kubelet refuses the plugin.")  # fmt: skip
    p.add_argument("--csi-endpoint", required=True, help="the plugin's socket, unix:///...")
    p.add_argument("--registration-dir", default="/registration",
                   help="kubelet's plugins_registry as mounted here (default /registration)")  # fmt: skip
    p.add_argument("--kubelet-registration-path", default=None,
                   help="the plugin's socket path as kubelet sees it (default: the "
                   "--csi-endpoint path)")  # fmt: skip
    p.set_defaults(handler=_registrar)


# -- where things are --------------------------------------------------------------------------


def _stack(args: argparse.Namespace) -> dict[str, Any]:
    path = Path(args.state_dir) / "endpoints.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _endpoint(args: argparse.Namespace, which: str) -> str:
    value = getattr(args, which) or _stack(args).get(
        {"controller": "controller_csi", "node": "node_csi"}[which])  # fmt: skip
    if not value:
        raise ConfigError(f"no CSI {which} endpoint: give --{which} unix:///path.sock, or start "
                          f"the local stack (`cairn dev up`)")  # fmt: skip
    return value


def _kubelet_dir(args: argparse.Namespace) -> str:
    return os.path.abspath(args.kubelet_dir or _stack(args).get("kubelet_dir") or DEFAULT_KUBELET)


def staging_path(kubelet_dir: str, volume_id: str) -> str:
    """Where kubelet stages a CSI volume (its 'global mount')."""
    digest = hashlib.sha256(volume_id.encode()).hexdigest()
    return os.path.join(kubelet_dir, "plugins", "kubernetes.io", "csi", DRIVER_NAME, digest,
                        "globalmount")  # fmt: skip


def target_path(kubelet_dir: str, pod: str, volume_id: str) -> str:
    """Where kubelet has a pod's CSI volume published."""
    return os.path.join(kubelet_dir, "pods", pod, "volumes", "kubernetes.io~csi", volume_id,
                        "mount")  # fmt: skip


def _staging(args: argparse.Namespace) -> str:
    return os.path.abspath(args.staging_path or staging_path(_kubelet_dir(args), args.volume))


def _target(args: argparse.Namespace) -> str:
    return os.path.abspath(args.target or target_path(_kubelet_dir(args), args.pod, args.volume))


def _absolute(path: str) -> str:
    return os.path.abspath(path)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"{what} {item!r}: use KEY=VALUE")
        found[key] = value
    return found


# -- calls ----------------------------------------------------------------------------------------


class _Csi:
    """A channel to one CSI endpoint with its stubs; failures become one-line CairnErrors."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    async def __aenter__(self) -> _Csi:
        from cairn.rpc.channel import open_channel, parse_endpoint
        from cairn.rpc.gen import csi_pb2_grpc

        parsed = parse_endpoint(self.endpoint)
        if parsed.is_unix and not _is_socket(parsed.path):
            raise UnavailableError(f"no CSI server at {self.endpoint}: the socket is not there")
        self.channel = await open_channel(self.endpoint, ready_timeout=5.0)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    async def call(self, method: Any, request: Any, timeout: float = 120.0) -> Any:
        from cairn.rpc.status import translate_rpc_errors

        with translate_rpc_errors(self.endpoint):
            return await method(request, timeout=timeout)


def _make_parent(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)


def _is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _capability(mode_name: str) -> Any:
    from cairn.rpc.gen import csi_pb2

    Mode = csi_pb2.VolumeCapability.AccessMode
    cap = csi_pb2.VolumeCapability(access_mode=Mode(mode=Mode.Mode.Value(mode_name)))
    cap.mount.SetInParent()
    return cap


def _default_mode(kind: str) -> str:
    return "SINGLE_NODE_WRITER" if kind == "local" else "MULTI_NODE_MULTI_WRITER"


async def _volume(args: argparse.Namespace) -> Any:
    """The volume as the controller describes it (its volume_context is what NodeStage needs)."""
    from cairn.rpc.gen import csi_pb2

    async with _Csi(_endpoint(args, "controller")) as csi:
        answer = await csi.call(csi.controller.ControllerGetVolume,
                                csi_pb2.ControllerGetVolumeRequest(volume_id=args.volume))  # fmt: skip
    return answer.volume


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- handlers ----------------------------------------------------------------------------------


async def _create(args: argparse.Namespace) -> int:
    from cairn.rpc.gen import csi_pb2

    params = _pairs(args.param, "--param")
    if args.type != "shared":
        params["type"] = args.type
    request = csi_pb2.CreateVolumeRequest(
        name=args.name, capacity_range=csi_pb2.CapacityRange(required_bytes=args.size),
        volume_capabilities=[_capability(args.access_mode or _default_mode(args.type))],
        parameters=params, secrets=_pairs(args.secret, "--secret"),
    )  # fmt: skip
    if args.local_node:
        request.accessibility_requirements.requisite.add(
            segments={TOPOLOGY_KEY: args.local_node})  # fmt: skip
    async with _Csi(_endpoint(args, "controller")) as csi:
        volume = (await csi.call(csi.controller.CreateVolume, request)).volume
    context = dict(volume.volume_context)
    where = f"node {context.get('node')}" if context.get("type") == "local" else "shared"
    print(f"volume {volume.volume_id} ({args.name}): {where}, {_size(volume.capacity_bytes)}, "
          f"path {context.get('path', '')}")  # fmt: skip
    return 0


async def _list(args: argparse.Namespace) -> int:
    from cairn.rpc.gen import csi_pb2

    async with _Csi(_endpoint(args, "controller")) as csi:
        answer = await csi.call(csi.controller.ListVolumes, csi_pb2.ListVolumesRequest())
    if not answer.entries:
        print("(no volumes)")
    for entry in answer.entries:
        v, condition = entry.volume, entry.status.volume_condition
        context = dict(v.volume_context)
        state = "ABNORMAL " if condition.abnormal else ""
        print(f"{v.volume_id}  {context.get('type', 'shared'):6} {_size(v.capacity_bytes):>10}  "
              f"{context.get('path', '')}  {state}{condition.message}")  # fmt: skip
    return 0


async def _delete(args: argparse.Namespace) -> int:
    from cairn.rpc.gen import csi_pb2

    request = csi_pb2.DeleteVolumeRequest(volume_id=args.volume,
                                          secrets=_pairs(args.secret, "--secret"))  # fmt: skip
    async with _Csi(_endpoint(args, "controller")) as csi:
        await csi.call(csi.controller.DeleteVolume, request)
    print(f"volume {args.volume} deleted")
    return 0


async def _stage(args: argparse.Namespace) -> int:
    from cairn.rpc.gen import csi_pb2

    volume = await _volume(args)
    kind = volume.volume_context.get("type", "shared")
    request = csi_pb2.NodeStageVolumeRequest(
        volume_id=args.volume, staging_target_path=_staging(args),
        volume_capability=_capability(args.access_mode or _default_mode(kind)),
        volume_context=volume.volume_context, secrets=_pairs(args.secret, "--secret"),
    )  # fmt: skip
    async with _Csi(_endpoint(args, "node")) as csi:
        await csi.call(csi.node.NodeStageVolume, request)
    print(f"volume {args.volume} staged at {request.staging_target_path}")
    return 0


async def _publish(args: argparse.Namespace) -> int:
    from cairn.rpc.gen import csi_pb2

    volume = await _volume(args)
    kind = volume.volume_context.get("type", "shared")
    target = _target(args)
    _make_parent(target)  # kubelet makes the parent
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id=args.volume, staging_target_path=_staging(args), target_path=target,
        volume_capability=_capability(args.access_mode or _default_mode(kind)),
        readonly=args.read_only, volume_context=volume.volume_context,
    )  # fmt: skip
    async with _Csi(_endpoint(args, "node")) as csi:
        await csi.call(csi.node.NodePublishVolume, request)
    print(f"volume {args.volume} published at {target}{' (read-only)' if args.read_only else ''}")
    return 0


async def _unpublish(args: argparse.Namespace) -> int:
    from cairn.rpc.gen import csi_pb2

    target = _target(args)
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id=args.volume, target_path=target)
    async with _Csi(_endpoint(args, "node")) as csi:
        await csi.call(csi.node.NodeUnpublishVolume, request)
    print(f"volume {args.volume} unpublished from {target}")
    return 0


async def _unstage(args: argparse.Namespace) -> int:
    from cairn.rpc.gen import csi_pb2

    request = csi_pb2.NodeUnstageVolumeRequest(volume_id=args.volume,
                                               staging_target_path=_staging(args))  # fmt: skip
    async with _Csi(_endpoint(args, "node")) as csi:
        await csi.call(csi.node.NodeUnstageVolume, request)
    print(f"volume {args.volume} unstaged from {request.staging_target_path}")
    return 0


async def _stats(args: argparse.Namespace) -> int:
    from cairn.rpc.gen import csi_pb2

    path = _absolute(args.path) if args.path else _staging(args)
    request = csi_pb2.NodeGetVolumeStatsRequest(volume_id=args.volume, volume_path=path,
                                                staging_target_path=_staging(args))  # fmt: skip
    async with _Csi(_endpoint(args, "node")) as csi:
        answer = await csi.call(csi.node.NodeGetVolumeStats, request)
    Usage = csi_pb2.VolumeUsage
    for u in answer.usage:
        if u.unit == Usage.BYTES:
            print(f"bytes   total {_size(u.total):>10}  used {_size(u.used):>10}  "
                  f"available {_size(u.available):>10}")  # fmt: skip
        elif u.unit == Usage.INODES:
            print(f"inodes  total {u.total:>10}  used {u.used:>10}  available {u.available:>10}")
    condition = answer.volume_condition
    print(f"condition: {'ABNORMAL' if condition.abnormal else 'normal'}: {condition.message}")
    return 1 if condition.abnormal else 0


async def _history(args: argparse.Namespace) -> int:
    from cairn.connect import nats as probe
    from cairn.events import EventStore, JetStreamBus

    url = args.nats_url or os.environ.get(NATS_URL.env) or _stack(args).get("nats_url")
    url = url or NATS_URL.default
    await (await probe(url)).close()  # one line when NATS is not there
    bus = await JetStreamBus.connect(url, name="cairn-volume-history")
    try:
        store = EventStore(bus)
        history = await store.load("volume", args.volume)
    finally:
        await bus.close()
    if not len(history):
        print(f"(no events of volume {args.volume})")
        return 0
    for env in history:
        if args.output == "json":
            print(json.dumps({"version": env.version, "type": env.type,
                              "occurred_at": env.occurred_at, "trace": env.trace,
                              "payload": env.payload}, default=str))  # fmt: skip
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(env.occurred_at))
        payload = " ".join(f"{k}={v}" for k, v in env.payload.items())
        trace = _trace_id(env.trace)
        print(f"v{env.version:<3} {when}  {env.type:<18} {payload}"
              + (f"  trace={trace}" if trace else ""))  # fmt: skip
    return 0


def _trace_id(trace: dict) -> str:
    parts = str(trace.get("traceparent", "")).split("-")
    return parts[1] if len(parts) == 4 else ""


async def _registrar(args: argparse.Namespace) -> int:
    from cairn.csi.registration import run_registrar
    from cairn.rpc.channel import parse_endpoint
    from cairn.telemetry.logs import configure

    configure("cairn-registrar", os.environ.get("CAIRN_LOG_LEVEL", "INFO"))
    endpoint = parse_endpoint(args.csi_endpoint)
    if not endpoint.is_unix:
        raise InvalidArgument(f"--csi-endpoint {args.csi_endpoint}: use unix:///path/csi.sock")
    await run_registrar(endpoint.target, args.registration_dir,
                        args.kubelet_registration_path or endpoint.path)  # fmt: skip
    return 0
