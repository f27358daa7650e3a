"""The built-in echo server, in both handler models (CLI, benchmarks, examples)."""

from __future__ import annotations

import asyncio

from ._core import Connection

__all__ = ["EchoProtocol", "echo_handler"]


def echo_handler(conn: Connection) -> None:
    """Blocking model: send back every byte until the client's EOF.

    ``read()`` rather than ``readinto()`` with a big buffer: a parked handler
    then holds no buffer at all, which matters with thousands of them.
    """
    while data := conn.read():
        conn.write(data)


class EchoProtocol(asyncio.Protocol):
    """Event model: send back every chunk as it arrives."""

    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]
