"""Shared fixtures and helpers for the unixsrv test suite.

Rules every test follows (see the README's "Testing" section):
- socket paths are short, under /tmp, unique per test and removed afterwards
  (``sock_path``);
- no sleep is used to synchronise: wait on an event or poll a condition with a
  deadline (``wait_until``);
- every server a test builds is closed when the test ends (``make_server``),
  every process it starts is ended by its PID (``spawn``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from unixsrv import Server, ServerConfig

#: Generous bound for anything a test waits for; a healthy run needs far less.
DEADLINE = 10.0


def wait_until(predicate: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.002) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else len(os.listdir("/dev/fd"))


def connect(path: str | bytes, timeout: float = DEADLINE) -> socket.socket:
    """A client socket connected to ``path``, with a timeout so no test hangs."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    """Read exactly n bytes (fails on early EOF)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_eof(s: socket.socket) -> bytes:
    """Read until the server closes its side."""
    buf = bytearray()
    while chunk := s.recv(65536):
        buf += chunk
    return bytes(buf)


def echo_handler(conn: Any) -> None:
    """Blocking-model echo used by many tests."""
    while data := conn.read():
        conn.write(data)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A fresh private directory under /tmp, removed afterwards."""
    d = tempfile.mkdtemp(prefix="us-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    """A short, unique socket path (the file does not exist yet)."""
    return os.path.join(sock_dir, "s.sock")


@pytest.fixture
def make_server() -> Iterator[Callable[..., Server]]:
    """Build servers that are closed when the test ends.

    ``make_server(path_or_config, handler=None, *, protocol=None, start=True,
    update_conn=None, **config_fields)``.
    """
    servers: list[Server] = []

    def factory(
        config: str | ServerConfig,
        handler: Any = None,
        *,
        protocol: Any = None,
        start: bool = True,
        update_conn: Any = None,
        **fields: Any,
    ) -> Server:
        cfg = config if isinstance(config, ServerConfig) else ServerConfig(path=config, **fields)
        srv = Server(cfg, handler, protocol=protocol, update_conn=update_conn)
        servers.append(srv)
        if start:
            srv.start()
        return srv

    yield factory
    for srv in servers:
        srv.close()
        assert srv.wait(DEADLINE), f"{srv!r} did not stop"


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start Python subprocesses that are killed (by PID) when the test ends."""
    procs: list[subprocess.Popen[str]] = []

    def factory(code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = subprocess.Popen([sys.executable, "-c", code, *args], **kwargs)
        procs.append(proc)
        return proc

    yield factory
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(DEADLINE)
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                stream.close()


@pytest.fixture(params=["blocking", "event"])
def model(request: pytest.FixtureRequest) -> str:
    """Run a test once per handler model."""
    return str(request.param)


@pytest.fixture
def echo_server(model: str, sock_path: str, make_server: Callable[..., Server]) -> Server:
    """A started echo server in the model under test."""
    from unixsrv.echo import EchoProtocol

    if model == "blocking":
        return make_server(sock_path, echo_handler)
    return make_server(sock_path, protocol=EchoProtocol)
