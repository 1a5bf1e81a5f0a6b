"""Every entry point from .venv/bin: --help works, bad or unreachable URLs end with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cairn.localstack import free_port

BIN = Path(sys.executable).parent
SERVICES = [
    "cairn-meta",
    "cairn-nodeplugin",
    "cairn-provisioner",
    "cairn-attacher",
    "cairn-cache-syncer",
]


def run(*argv: str, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
        cwd="/tmp",
    )


@pytest.mark.parametrize("program", ["cairn", *SERVICES])
def test_help(program):
    result = run(program, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert "--help" in result.stdout


def test_cairn_without_command_prints_usage_and_fails():
    result = run("cairn")
    assert result.returncode == 2
    assert "usage:" in result.stderr


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("program", SERVICES)
def test_unreachable_nats_is_one_line(program, tmp_path):
    url = f"nats://127.0.0.1:{free_port()}"
    result = run(
        program, "--nats-url", url, "--data-dir", str(tmp_path), env={"CAIRN_LOG_LEVEL": "ERROR"}
    )
    assert result.returncode != 0
    line = one_line(result)
    assert url in line and "nats" in line.lower()


def test_unreachable_redis_is_one_line(nats_url, tmp_path):
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    result = run(
        "cairn-meta",
        "--nats-url",
        nats_url,
        "--meta-url",
        url,
        "--data-dir",
        str(tmp_path),
        "--log-level",
        "ERROR",
    )
    assert result.returncode != 0
    line = one_line(result)
    assert f"127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}" in line
    assert "secret" not in line  # the password never reaches the message
    assert "CAIRN_META_URL" in line


def test_env_variable_is_used_and_validated(tmp_path):
    result = run(
        "cairn-meta", "--data-dir", str(tmp_path), env={"CAIRN_NATS_URL": "http://127.0.0.1:1"}
    )
    assert result.returncode == 2
    line = one_line(result)
    assert "CAIRN_NATS_URL" in line and "nats://" in line


def test_bad_number_setting_is_one_line(tmp_path):
    result = run("cairn-meta", "--stream-replicas", "three", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--stream-replicas" in one_line(result)


@pytest.mark.parametrize("program", ["cairn-provisioner", "cairn-attacher", "cairn-cache-syncer"])
def test_kubernetes_services_without_cluster_are_one_line(program, nats_url, tmp_path):
    result = run(
        program,
        "--nats-url",
        nats_url,
        "--data-dir",
        str(tmp_path),
        "--log-level",
        "ERROR",
        env={"KUBECONFIG": str(tmp_path / "missing")},
    )
    assert result.returncode == 2
    line = one_line(result)
    assert "kubeconfig" in line and "missing" in line


def test_unreachable_kubernetes_api_is_one_line(nats_url, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{free_port()}'}}}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
    )
    result = run(
        "cairn-provisioner",
        "--nats-url",
        nats_url,
        "--data-dir",
        str(tmp_path),
        "--kubeconfig",
        str(kubeconfig),
        "--log-level",
        "ERROR",
    )
    assert result.returncode == 69
    assert "cannot reach the Kubernetes API" in one_line(result)
