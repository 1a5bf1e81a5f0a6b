"""`cairn dev up/status/down` and `cairn events tail` as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cairn.csi.health import probe
from cairn.rpc.channel import connect
from cairn.rpc.gen import admin_pb2, admin_pb2_grpc

CAIRN = str(Path(sys.executable).parent / "cairn")


def cairn(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return subprocess.run([CAIRN, *args], capture_output=True, text=True, timeout=timeout, env=env)


def http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.status


def alive(pid: int) -> bool:
    try:
        return b"zombie" not in Path(f"/proc/{pid}/status").read_bytes().lower()
    except FileNotFoundError:
        return False


@pytest.fixture
def stack(tmp_path):
    state = tmp_path / "dev"
    result = cairn("dev", "up", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    info = json.loads((state / "endpoints.json").read_text())
    yield info
    cairn("dev", "down", "--state-dir", str(state))  # idempotent: harmless after a test's own


async def test_stack_answers_and_down_stops_exactly_it(stack, redis_server):
    state = stack["state_dir"]
    pids = {name: p["pid"] for name, p in stack["processes"].items()}
    assert set(pids) == {"nats-server", "redis-server", "cairn-meta", "cairn-nodeplugin"}
    assert all(alive(pid) for pid in pids.values())

    async with connect(stack["admin_addr"]) as channel:
        status = await admin_pb2_grpc.AdminStub(channel).GetStatus(admin_pb2.GetStatusRequest())
    assert status.service == "cairn-meta"
    assert {d.name: d.ok for d in status.dependencies} == {"redis": True, "object-store": True}
    assert await probe(stack["controller_csi"]) == (True, "ok")
    assert await probe(stack["node_csi"]) == (True, "ok")
    assert await asyncio.to_thread(http_status, f"http://{stack['health_addr']}/healthz") == 200

    status_cmd = cairn("dev", "status", "--state-dir", state)
    assert status_cmd.returncode == 0 and "DEAD" not in status_cmd.stdout

    tail = cairn("events", "tail", "--nats-url", stack["nats_url"], "-o", "json")
    assert tail.returncode == 0, tail.stderr
    started = [json.loads(line) for line in tail.stdout.splitlines()]
    assert {(e["type"], e["payload"]["service"]) for e in started
            if e["type"] == "ServiceStarted"} >= {
        ("ServiceStarted", "cairn-meta"),
        ("ServiceStarted", "cairn-nodeplugin"),
    }

    again = cairn("dev", "up", "--state-dir", state)  # already running: reused, not doubled
    assert "already running" in again.stdout
    assert (
        json.loads((Path(state) / "endpoints.json").read_text())["processes"] == stack["processes"]
    )

    down = cairn("dev", "down", "--state-dir", state)
    assert down.returncode == 0, down.stderr
    assert not any(alive(pid) for pid in pids.values())
    assert alive(redis_server.pid)  # another redis-server (the test session's) is untouched
    assert cairn("dev", "status", "--state-dir", state).returncode == 3


def test_down_without_stack_is_one_line(tmp_path):
    result = cairn("dev", "down", "--state-dir", str(tmp_path / "none"))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert "nothing to stop" in result.stderr


def test_demo_once_shows_everything_and_cleans_up(tmp_path):
    state = tmp_path / "demo"
    result = cairn("demo", "--once", "--state-dir", str(state), "--big-mib", "16", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CSI Probe controller" in result.stdout and "ready" in result.stdout
    assert "/healthz: 200" in result.stdout
    assert "ServiceStarted" in result.stdout
    assert "identical to the source" in result.stdout and "sha256 matches" in result.stdout
    assert "stopped cairn-mount" in result.stdout
    story = result.stdout.split("its story from the event stream")[1]
    for event in ("VolumeRequested", "VolumeProvisioned", "VolumeStaged", "VolumePublished"):
        assert event in story
    dataset = story.split("a dataset on that volume")[1]
    assert "dataset Bound" in dataset and "DataLoad warmup Complete" in dataset
    assert "cacheStates: cached 16.00MiB" in dataset
    for event in ("DatasetBound", "RuntimeScaled", "NodeLabelled", "DataLoadFinished"):
        assert event in dataset
    info = json.loads((state / "endpoints.json").read_text())
    assert info["processes"] == {}
    assert str(state / "mnt") not in Path("/proc/self/mountinfo").read_text()


def test_down_stops_the_mounts_of_volumes_left_staged(stack):
    """A demo that failed half-way leaves a volume staged: `down` stops its mount process
    (the node plugin first, or its watcher would restart it) and leaves nothing mounted."""
    state = stack["state_dir"]
    created = subprocess.run([CAIRN, "volume", "create", "left", "--size", "16M"],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "CAIRN_DEV_STATE": state})  # fmt: skip
    assert created.returncode == 0, created.stderr
    volume = created.stdout.split()[1]
    staged = subprocess.run([CAIRN, "volume", "stage", volume], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "CAIRN_DEV_STATE": state})  # fmt: skip
    assert staged.returncode == 0, staged.stderr
    mount_pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and
                  state.encode() in _cmdline(int(p)) and b"mount" in _cmdline(int(p))]  # fmt: skip
    assert mount_pids, "no mount process for the staged volume"
    down = cairn("dev", "down", "--state-dir", state)
    assert down.returncode == 0, down.stderr
    assert not any(alive(pid) for pid in mount_pids), down.stdout
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if state in line], down.stdout


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
