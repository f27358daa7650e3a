"""Micro-benchmarks (pytest-benchmark) of the built-in echo server in both
handler models, with the C epoll echo as the reference:

- one 64 B round trip on an open connection (the client is a plain blocking
  Python socket, so the figure includes the client's own cost);
- one connect -> accept -> 1-byte echo -> close cycle (the echo makes sure
  the server accepted and served the connection before it is closed).

Run with ``pytest benchmarks/`` (the default ``pytest`` run collects only
tests/).  Each server runs as its own subprocess, started once per module
and ended by PID; every benchmark also checks that the echo is exact.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness

SERVERS = ["unixsrv-event", "unixsrv-blocking", "c-epoll"]
PAYLOAD = bytes(range(64))


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[harness.RunningServer]:
    """A fresh echo server subprocess (ended by PID afterwards)."""
    if request.param == "c-epoll":
        harness.compile_c_server()
    with harness.running_server(request.param) as srv:
        yield srv
    assert srv.proc.returncode is not None  # ended and reaped


def test_round_trip_64b(benchmark, server: harness.RunningServer) -> None:
    """Latency of one 64 B echo on an established connection."""
    benchmark.group = "round trip, 64 B, 1 connection"
    benchmark.extra_info["server"] = server.name
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10.0)
        sock.connect(server.path)

        def round_trip() -> bytes:
            sock.sendall(PAYLOAD)
            return recv_exactly(sock, len(PAYLOAD))

        assert benchmark(round_trip) == PAYLOAD
    assert server.alive()


def test_connect_accept_close(benchmark, server: harness.RunningServer) -> None:
    """One whole connection: connect, 1-byte echo (so the server has accepted
    and served it), close."""
    benchmark.group = "connect + 1 B echo + close"
    benchmark.extra_info["server"] = server.name

    def cycle() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10.0)
            sock.connect(server.path)
            sock.sendall(b"x")
            return recv_exactly(sock, 1)

    assert benchmark(cycle) == b"x"
    assert server.alive()
