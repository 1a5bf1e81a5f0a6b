"""Endpoints and client channels: every gRPC address Cairn reads goes through here.

An endpoint is written one of these ways:

    unix:///run/cairn/csi.sock    a unix socket (absolute path; the CSI convention)
    unix:relative/csi.sock        a unix socket relative to the working directory
    /run/cairn/csi.sock           a bare absolute path (what kubelet hands around)
    tcp://10.0.0.5:9000           TCP
    10.0.0.5:9000, [::1]:9000     TCP
    :9000 or 9000                 TCP on 127.0.0.1 (loopback unless asked otherwise)

A malformed endpoint is a ConfigError with one line saying what is wrong; a server that
does not answer within the timeout is an UnavailableError naming the endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from cairn.errors import ConfigError, UnavailableError

DEFAULT_HOST = "127.0.0.1"
# sun_path holds 108 bytes including the terminating NUL.
MAX_UNIX_PATH = 107


@dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint: a unix socket path, or a TCP host and port."""

    raw: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def target(self) -> str:
        """The address in the form gRPC expects."""
        if self.path is not None:
            return f"unix://{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.target


def parse_endpoint(
    endpoint: str, *, default_host: str = DEFAULT_HOST, allow_port_zero: bool = False
) -> Endpoint:
    """Parses an endpoint string (see the module docstring); raises ConfigError."""
    raw = endpoint
    endpoint = endpoint.strip()
    if not endpoint:
        raise ConfigError("empty gRPC endpoint: give unix:///path/to.sock or host:port")
    if endpoint.startswith("unix:") or endpoint.startswith("/"):
        return _parse_unix(raw, endpoint)
    if endpoint.startswith("tcp://"):
        endpoint = endpoint[len("tcp://") :]
    elif "://" in endpoint:
        scheme = endpoint.split("://", 1)[0]
        raise ConfigError(f"gRPC endpoint {raw!r}: unsupported scheme {scheme!r} (use unix or tcp)")
    return _parse_tcp(raw, endpoint, default_host, allow_port_zero)


def _parse_unix(raw: str, endpoint: str) -> Endpoint:
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
        if not path.startswith("/"):
            raise ConfigError(
                f"gRPC endpoint {raw!r}: unix:// needs an absolute path (unix:///dir/x.sock)"
            )
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
    else:
        path = endpoint
    if not path or path.endswith("/"):
        raise ConfigError(f"gRPC endpoint {raw!r}: no socket file name")
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise ConfigError(
            f"gRPC endpoint {raw!r}: unix socket path is longer than {MAX_UNIX_PATH} bytes"
        )
    return Endpoint(raw=raw, path=path)


def _parse_tcp(raw: str, hostport: str, default_host: str, allow_port_zero: bool) -> Endpoint:
    if hostport.startswith("["):
        host, sep, rest = hostport[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"gRPC endpoint {raw!r}: expected [ipv6]:port")
        port_text = rest[1:]
    elif ":" in hostport:
        host, port_text = hostport.rsplit(":", 1)
        if ":" in host:
            raise ConfigError(f"gRPC endpoint {raw!r}: write IPv6 hosts as [addr]:port")
    else:
        host, port_text = "", hostport
    if not port_text.isdigit():
        raise ConfigError(f"gRPC endpoint {raw!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535 or (port == 0 and not allow_port_zero):
        raise ConfigError(f"gRPC endpoint {raw!r}: port {port} is out of range")
    if "/" in host or " " in host:
        raise ConfigError(f"gRPC endpoint {raw!r}: {host!r} is not a host name")
    return Endpoint(raw=raw, host=host or default_host, port=port)


async def open_channel(
    endpoint: str | Endpoint,
    *,
    interceptors: Sequence[Any] = (),
    options: Sequence[tuple[str, Any]] = (),
    ready_timeout: float | None = 10.0,
) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to `endpoint`, connected when `ready_timeout` is set.

    `interceptors` are grpc.aio client interceptors (telemetry passes OpenTelemetry's).
    With `ready_timeout=None` the channel connects lazily on its first call. The caller
    closes the channel (`await channel.close()`); see also `connect`.
    """
    parsed = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
    channel = grpc.aio.insecure_channel(
        parsed.target, options=list(options), interceptors=list(interceptors) or None
    )
    if ready_timeout is None:
        return channel
    try:
        await asyncio.wait_for(channel.channel_ready(), ready_timeout)
    except TimeoutError:
        await channel.close()
        raise UnavailableError(
            f"cannot reach gRPC server at {parsed.target} within {ready_timeout:g}s"
        ) from None
    except BaseException:
        await channel.close()
        raise
    return channel


@contextlib.asynccontextmanager
async def connect(
    endpoint: str | Endpoint,
    *,
    interceptors: Sequence[Any] = (),
    options: Sequence[tuple[str, Any]] = (),
    ready_timeout: float | None = 10.0,
) -> AsyncIterator[grpc.aio.Channel]:
    """`async with connect(endpoint) as channel:` opens the channel and closes it after."""
    channel = await open_channel(
        endpoint, interceptors=interceptors, options=options, ready_timeout=ready_timeout
    )
    try:
        yield channel
    finally:
        await channel.close()
