"""`cairn volume ...` against the `cairn dev up` stack, as a user runs it: no endpoint flags
(the stack's endpoints.json names them), real FUSE and bind mounts below the stack's kubelet
directory, and the volume's story read back with `cairn volume history`. The stack is taken
down at the end, with whatever the test left mounted."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cairn import localstack
from cairn_nodeplugin.mounts import short_run_dir

CAIRN = str(Path(sys.executable).parent / "cairn")


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs /dev/fuse and fusermount3")
    tmp_path = tmp_path_factory.mktemp("cli")
    state = tmp_path / "dev"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    env["CAIRN_DEV_STATE"] = str(state)

    def cairn(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([CAIRN, *argv], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=str(tmp_path), check=False)  # fmt: skip

    try:
        up = cairn("dev", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        cairn.info = json.loads((state / "endpoints.json").read_text())
        cairn.tmp = tmp_path
        yield cairn
    finally:
        cairn("dev", "down")
        prefix = str(tmp_path) + "/"
        for point in sorted((p for p in mount_points() if p.startswith(prefix)),
                            key=lambda p: -p.count("/")):  # fmt: skip
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)
        run = short_run_dir(state / "data" / "cairn-nodeplugin")
        for pid_file in run.glob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                localstack.stop_pid(int(pid_file.read_text().split()[0]))
        shutil.rmtree(run, ignore_errors=True)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}{result.stdout}"
    assert "Traceback" not in result.stderr
    return result.stdout


def one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cairn: "), result.stderr
    return lines[0]


def test_volume_commands_against_the_dev_stack(stack):
    cairn = stack
    created = ok(cairn("volume", "create", "pvc-cli", "--size", "32M"))
    vid = created.split()[1]
    assert vid.startswith("vol-") and "32.0 MiB" in created and "/volumes/pvc-cli" in created
    assert ok(cairn("volume", "create", "pvc-cli", "--size", "32M")) == created
    assert vid in ok(cairn("volume", "list"))

    for _ in range(2):
        assert "staged at" in ok(cairn("volume", "stage", vid))
    web = ok(cairn("volume", "publish", vid, "--pod", "web")).split(" published at ")[1].strip()
    reader = ok(cairn("volume", "publish", vid, "--pod", "reader", "--read-only"))
    reader = reader.split(" published at ")[1].split(" (read-only)")[0]
    kubelet = Path(cairn.info["kubelet_dir"])
    assert web == str(kubelet / "pods" / "web" / "volumes" / "kubernetes.io~csi" / vid / "mount")
    (Path(web) / "index.html").write_text("served by cairn\n")
    assert (Path(reader) / "index.html").read_text() == "served by cairn\n"

    stats = ok(cairn("volume", "stats", vid))
    assert "total   32.0 MiB" in stats and "condition: normal" in stats
    assert "still published" in one_line(cairn("volume", "unstage", vid))

    for pod in ("web", "reader"):
        for _ in range(2):
            ok(cairn("volume", "unpublish", vid, "--pod", pod))
    for _ in range(2):
        ok(cairn("volume", "unstage", vid))
    assert not any(str(kubelet) in p for p in mount_points())
    ok(cairn("volume", "delete", vid))
    assert vid not in ok(cairn("volume", "list"))

    history = ok(cairn("volume", "history", vid)).splitlines()
    assert [line.split()[3] for line in history] == [
        "VolumeRequested", "VolumeProvisioned", "VolumeStaged", "VolumePublished",
        "VolumePublished", "VolumeUnpublished", "VolumeUnpublished", "VolumeUnstaged",
        "VolumeDeleted",
    ]  # fmt: skip
    as_json = [json.loads(line) for line in ok(cairn("volume", "history", vid, "-o", "json"))
               .splitlines()]  # fmt: skip
    assert as_json[2]["payload"]["node"] == cairn.info["node_id"]

    # a local volume, on the stack's own node
    node = cairn.info["node_id"]
    local = ok(cairn("volume", "create", "pvc-local", "--type", "local", "--size", "8M",
                     "--local-node", node))  # fmt: skip
    lid = local.split()[1]
    assert f"node {node}" in local
    ok(cairn("volume", "stage", lid))
    target = ok(cairn("volume", "publish", lid)).split(" published at ")[1].strip()
    (Path(target) / "note.txt").write_text("on the node's disk\n")
    ok(cairn("volume", "unpublish", lid))
    ok(cairn("volume", "unstage", lid))
    assert (Path(cairn.info["state_dir"]) / "local-volumes" / lid / "note.txt").exists()
    ok(cairn("volume", "delete", lid))


def test_volume_errors_are_one_line(stack):
    cairn = stack
    assert "does not exist" in one_line(cairn("volume", "stage", "vol-unknown"))
    assert "not staged" in one_line(cairn("volume", "stats", "vol-unknown"))
    missing = f"unix://{cairn.tmp / 'nothing.sock'}"
    assert "no CSI server" in one_line(cairn("volume", "list", "--controller", missing))
    assert "no events" in ok(cairn("volume", "history", "vol-unknown"))
