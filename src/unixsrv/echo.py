"""The built-in echo server, in both handler models (CLI, benchmarks, examples)."""

from __future__ import annotations

import asyncio

from ._core import Connection

__all__ = ["echo_handler", "EchoProtocol"]


def echo_handler(conn: Connection) -> None:
    """Blocking model: send back every byte until the client's EOF."""
    buf = bytearray(65536)
    view = memoryview(buf)
    while n := conn.readinto(buf):
        conn.write(view[:n])


class EchoProtocol(asyncio.Protocol):
    """Event model: send back every chunk as it arrives."""

    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]
