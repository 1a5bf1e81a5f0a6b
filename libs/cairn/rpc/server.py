"""A grpc.aio server on a unix socket or a TCP port, started and stopped cleanly.

    server = RpcServer("unix:///run/cairn/csi.sock", interceptors=server_interceptors())
    server.add(csi_pb2_grpc.add_IdentityServicer_to_server, Identity(...))
    await server.start()
    ...
    await server.stop()

For a unix socket the parent directory is created, a stale socket left by a dead process
is removed (a live one is an error: two plugins must not share a socket), and the new
socket gets `socket_mode`. TCP endpoints without a host bind to 127.0.0.1; listening on
every interface takes an explicit 0.0.0.0 or [::]. Port 0 picks a free port (see `port`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from cairn.errors import ConfigError, FailedPrecondition
from cairn.rpc.channel import Endpoint, parse_endpoint

log = logging.getLogger(__name__)

# Only the owner (root for kubelet and the sidecars) and its group may talk to the socket.
DEFAULT_SOCKET_MODE = 0o660
DEFAULT_DIR_MODE = 0o750

Register = Callable[[Any, grpc.aio.Server], None]


class RpcServer:
    """One listening endpoint with its servicers."""

    def __init__(
        self,
        endpoint: str | Endpoint,
        *,
        interceptors: Sequence[Any] = (),
        options: Sequence[tuple[str, Any]] = (),
        maximum_concurrent_rpcs: int | None = None,
        socket_mode: int = DEFAULT_SOCKET_MODE,
    ):
        self.endpoint = (
            endpoint
            if isinstance(endpoint, Endpoint)
            else parse_endpoint(endpoint, allow_port_zero=True)
        )
        self.interceptors = list(interceptors)
        self.options = list(options)
        if not self.endpoint.is_unix:
            # grpc turns SO_REUSEPORT on by default, which would let a second server bind
            # the same port silently and steal half the connections.
            self.options.append(("grpc.so_reuseport", 0))
        self.maximum_concurrent_rpcs = maximum_concurrent_rpcs
        self.socket_mode = socket_mode
        self.port: int | None = None
        self._servicers: list[tuple[Register, Any]] = []
        self._server: grpc.aio.Server | None = None

    def add(self, register: Register, servicer: Any) -> RpcServer:
        """Adds a servicer with its generated `add_*Servicer_to_server` function."""
        if self._server is not None:
            raise FailedPrecondition("add servicers before starting the server")
        self._servicers.append((register, servicer))
        return self

    @property
    def address(self) -> str:
        """The address clients dial (with the real port once started on port 0)."""
        if self.endpoint.is_unix or self.port is None:
            return self.endpoint.target
        return Endpoint(raw="", host=self.endpoint.host, port=self.port).target

    async def start(self) -> None:
        """Binds the endpoint and starts serving; raises ConfigError if it cannot bind."""
        if self._server is not None:
            return
        if self.endpoint.is_unix:
            _prepare_socket_path(self.endpoint.path)
        server = grpc.aio.server(
            interceptors=self.interceptors or None,
            options=self.options,
            maximum_concurrent_rpcs=self.maximum_concurrent_rpcs,
        )
        for register, servicer in self._servicers:
            register(servicer, server)
        try:
            port = server.add_insecure_port(self.endpoint.target)
        except RuntimeError as error:
            # grpc's text is "Failed to bind to address X; set GRPC_VERBOSITY=...".
            reason = str(error).split(";", 1)[0]
            raise ConfigError(f"cannot listen on {self.endpoint.target}: {reason}") from None
        if not port and not self.endpoint.is_unix:
            raise ConfigError(f"cannot listen on {self.endpoint.target}")
        await server.start()
        self._server = server
        self.port = None if self.endpoint.is_unix else port
        if self.endpoint.is_unix:
            os.chmod(self.endpoint.path, self.socket_mode)
        log.info("gRPC server listening on %s", self.address)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stops accepting calls, lets running ones finish for `grace` seconds, then
        cancels them; removes the unix socket file."""
        server, self._server = self._server, None
        if server is None:
            return
        await server.stop(grace)
        if self.endpoint.is_unix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.endpoint.path)
        log.info("gRPC server on %s stopped", self.address)

    async def wait(self) -> None:
        """Returns when the server has stopped (for a process's main task)."""
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> RpcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def serve(
    endpoint: str | Endpoint,
    servicers: Sequence[tuple[Register, Any]],
    *,
    interceptors: Sequence[Any] = (),
    options: Sequence[tuple[str, Any]] = (),
    socket_mode: int = DEFAULT_SOCKET_MODE,
) -> RpcServer:
    """Builds, fills and starts a server in one call; the caller stops it."""
    server = RpcServer(
        endpoint, interceptors=interceptors, options=options, socket_mode=socket_mode
    )
    for register, servicer in servicers:
        server.add(register, servicer)
    await server.start()
    return server


def _prepare_socket_path(path: str) -> None:
    """Creates the socket's directory and clears a stale socket file."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, mode=DEFAULT_DIR_MODE, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create socket directory {parent}: {error.strerror}") from None
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    if _socket_answers(path):
        raise FailedPrecondition(f"another server is already listening on unix://{path}")
    log.info("removing stale socket %s", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _socket_answers(path: str) -> bool:
    """Whether some process still accepts connections on the unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
