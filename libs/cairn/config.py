"""Configuration by flags and environment variables, with one naming scheme.

A setting `nats_url` is the flag `--nats-url` and the variable `CAIRN_NATS_URL`; the flag
wins over the variable, the variable over the default. URLs are checked for their form here
(`check_url`); reachability is checked by the adapters that connect (cairn.adapters.*),
which raise ConfigError with one line naming the URL and what to fix.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cairn.errors import ConfigError

ENV_PREFIX = "CAIRN_"


@dataclass(frozen=True)
class Setting:
    name: str
    help: str
    default: Any = None
    type: Callable[[str], Any] = str
    schemes: tuple[str, ...] = ()  # for URL settings: the accepted schemes

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# The settings every Cairn process understands, by name; services pick the ones they use.
NATS_URL = Setting("nats_url", "NATS server with JetStream", "nats://127.0.0.1:4222",
                   schemes=("nats", "tls"))
META_URL = Setting("meta_url", "Redis metadata engine (redis://[:password@]host:port/db)",
                   "redis://127.0.0.1:6379/0", schemes=("redis", "rediss", "unix"))
STORAGE_URL = Setting("storage_url", "object store for chunks (file:///dir or s3://bucket)",
                      None, schemes=("file", "s3"))
OTLP_ENDPOINT = Setting("otlp_endpoint", "OTLP/gRPC endpoint for traces (e.g. "
                        "http://127.0.0.1:4317); 'console' prints spans; unset: no export",
                        None)
METRICS_ADDR = Setting("metrics_addr", "host:port for the Prometheus /metrics endpoint "
                       "(empty: off)", "")
LOG_LEVEL = Setting("log_level", "DEBUG, INFO, WARNING or ERROR", "INFO")
DATA_DIR = Setting("data_dir", "directory for local state (outbox, sockets)", ".cairn")
CSI_ENDPOINT = Setting("csi_endpoint", "CSI gRPC endpoint (unix:///path/csi.sock)", None,
                       schemes=("unix",))
ADMIN_ADDR = Setting("admin_addr", "host:port of the admin gRPC API", "127.0.0.1:7450")
NODE_ID = Setting("node_id", "this node's name, as Kubernetes knows it", None)
STREAM_REPLICAS = Setting("stream_replicas", "JetStream replicas for the event stream", 1, int)
STREAM_MAX_AGE = Setting("stream_max_age", "days events are kept (0: forever)", 0.0, float)

COMMON = (NATS_URL, OTLP_ENDPOINT, METRICS_ADDR, LOG_LEVEL, DATA_DIR)


def check_url(setting: Setting, value: str | None) -> str | None:
    """Checks the form of a URL setting; raises ConfigError naming the setting."""
    if value in (None, "") or not setting.schemes:
        return value
    parts = urlsplit(value)
    where = f"{setting.flag} / {setting.env}"
    if parts.scheme not in setting.schemes:
        wanted = " or ".join(f"{s}://" for s in setting.schemes)
        raise ConfigError(f"{where}: '{value}' is not a valid URL: use {wanted}")
    if parts.scheme in ("nats", "tls", "redis", "rediss") and not parts.hostname:
        raise ConfigError(f"{where}: '{value}' names no host: use {parts.scheme}://host:port")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{where}: '{value}' has a bad port number") from None
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(f"{where}: '{value}' names no socket path: use unix:///path/to.sock")
    return value


def check_addr(setting: Setting, value: str) -> tuple[str, int] | None:
    """Parses host:port (None for an empty value); raises ConfigError when malformed."""
    if not value:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{setting.flag} / {setting.env}: '{value}' is not host:port")
    return host, int(port)


def add_settings(parser: argparse.ArgumentParser, settings: Iterable[Setting]) -> None:
    """Adds one flag per setting, whose default comes from the environment variable."""
    for s in settings:
        default = os.environ.get(s.env, s.default)
        shown = "" if s.default in (None, "") else f" (default: {s.default})"
        parser.add_argument(s.flag, dest=s.name, default=default, metavar=s.name.upper(),
                            help=f"{s.help}{shown}; env {s.env}")


def resolve(args: argparse.Namespace, settings: Iterable[Setting]) -> dict[str, Any]:
    """The validated values of `settings` from parsed arguments."""
    values: dict[str, Any] = {}
    for s in settings:
        raw = getattr(args, s.name)
        if raw is not None and not isinstance(raw, s.type) and s.type is not str:
            try:
                raw = s.type(raw)
            except ValueError:
                raise ConfigError(f"{s.flag} / {s.env}: '{raw}' is not a valid "
                                  f"{s.type.__name__}") from None
        values[s.name] = check_url(s, raw) if isinstance(raw, str) else raw
    return values


def redact(url: str | None) -> str:
    """The URL with any password replaced, safe for logs, events and error messages."""
    if not url:
        return url or ""
    parts = urlsplit(url)
    if parts.password is None and not (parts.username and parts.scheme == "s3"):
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username if parts.password is not None and parts.scheme != "s3" else ""
    return parts._replace(netloc=f"{user}:***@{host}" if user else f"***@{host}").geturl()


KUBECONFIG = Setting("kubeconfig", "kubeconfig file (default: in-cluster, then $KUBECONFIG)",
                     None)
HEALTH_ADDR = Setting("health_addr", "host:port for the HTTP /healthz liveness endpoint "
                      "(empty: off)", "127.0.0.1:9808")
KUBELET_DIR = Setting("kubelet_dir", "kubelet's root directory", "/var/lib/kubelet")
REGISTRATION_DIR = Setting("registration_dir", "kubelet's plugin registration directory "
                           "(empty: do not register)", "")
