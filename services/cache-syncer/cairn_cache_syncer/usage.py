"""Sizes of dataset sources from cairn-meta's admin API (GetDirUsage): the metadata
engine's usage counters, never a walk of the tree."""

from __future__ import annotations

from typing import Any

from cairn.rpc.status import translate_rpc_errors


class MetaUsage:
    """`await usage(path)` -> (bytes, inodes) below a directory of cairn-meta's file system."""

    def __init__(self, address: str):
        self.address = address
        self._channel: Any = None

    async def __call__(self, path: str) -> tuple[int, int]:
        from cairn.rpc.channel import open_channel
        from cairn.rpc.gen import admin_pb2, admin_pb2_grpc

        with translate_rpc_errors(f"cairn-meta admin API at {self.address}"):
            if self._channel is None:
                self._channel = await open_channel(self.address, ready_timeout=None)
            answer = await admin_pb2_grpc.AdminStub(self._channel).GetDirUsage(
                admin_pb2.GetDirUsageRequest(path=path), timeout=10
            )
        return answer.used_bytes, answer.used_inodes

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
