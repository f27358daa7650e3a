"""Shared fixtures and helpers for the unixsrv test suite.

Rules every test follows (see the README's "Testing" section):
- socket paths are short, under /tmp, unique per test and removed afterwards
  (``sock_path``);
- no sleep is used to synchronise: wait on an event or poll a condition with a
  deadline (``wait_until``);
- every server a test builds is closed when the test ends (``make_server``),
  every process it starts is ended by its PID (``spawn``).

Platforms: the suite runs on Linux and macOS (CI).  A test (or one
parametrisation) that exercises a Linux-only facility carries
``@pytest.mark.linux("<the facility>")``; on any other platform
``pytest_collection_modifyitems`` skips it with a reason naming that facility,
on Linux the marker changes nothing.  Helpers here hide the differences that
are not the subject of a test (``fd_count``, ``connect``, ``make_room``,
``default_gid``).
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

#: True on Linux, where every test runs; elsewhere tests marked ``linux`` are skipped.
LINUX = sys.platform.startswith("linux")

#: Where this process's open fds are listed: /proc/self/fd on Linux, /dev/fd
#: (fdescfs) on macOS and the BSDs.
FD_DIR = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"

#: File descriptors the suite needs at once (1,000 clients and their server
#: ends in one process, plus slack).  macOS starts processes with a soft limit
#: of 256; Linux usually with 1,024 or more.
_NOFILE_WANTED = 4096


def pytest_configure(config: pytest.Config) -> None:
    """Raise the soft RLIMIT_NOFILE to _NOFILE_WANTED (never above the hard
    limit) if it is lower; a higher limit is left alone."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < _NOFILE_WANTED:
        want = _NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(hard, _NOFILE_WANTED)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):  # e.g. above macOS's kern.maxfilesperproc: keep the default
            pass


def _linux_reasons(item: pytest.Item) -> list[str]:
    """The facilities named by every ``linux`` marker on ``item`` (its own,
    its parametrisation's, its class's and its module's)."""
    reasons = []
    for marker in item.iter_markers("linux"):
        if len(marker.args) != 1 or marker.kwargs or not isinstance(marker.args[0], str) or not marker.args[0].strip():
            raise pytest.UsageError(
                f"{item.nodeid}: use @pytest.mark.linux(\"<the Linux-only facility>\"), got args={marker.args!r} "
                f"kwargs={marker.kwargs!r}"
            )
        if marker.args[0] not in reasons:
            reasons.append(marker.args[0])
    return reasons


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``linux`` on other platforms, naming the facility,
    and tests marked ``root`` when not running as root.

    The markers are checked on every platform (a bare ``@pytest.mark.linux``
    is a usage error), so a malformed one is caught on Linux too; on Linux
    nothing is skipped."""
    for item in items:
        reasons = _linux_reasons(item)
        if reasons and not LINUX:
            reason = f"Linux-only facility, not on {sys.platform}: {'; '.join(reasons)}"
            item.add_marker(pytest.mark.skip(reason=reason))
        if item.get_closest_marker("root") is not None and os.geteuid() != 0:
            # chown to an arbitrary group and setuid()/setgid() in a forked
            # child need privileges; CI runners are not root, this machine is.
            item.add_marker(pytest.mark.skip(reason="needs root (uid 0) to change ownership or uid"))


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
    """Open file descriptors of this process, as listed in FD_DIR."""
    return len(os.listdir(FD_DIR))


def connect_socket(s: socket.socket, path: str | bytes, timeout: float = DEADLINE) -> None:
    """``s.connect(path)``, waiting for room in a full listen backlog.

    On Linux this is exactly ``s.connect(path)``: a blocking connect(2) to a
    full backlog waits for room.  macOS and the BSDs refuse it at once with
    ECONNREFUSED, the same error as for a socket nobody listens on, so there
    a refused connect is retried until ``timeout``; a refusal that lasts that
    long is raised."""
    if LINUX:
        s.connect(path)
        return
    refused: list[ConnectionRefusedError] = []

    def attempt() -> bool:
        try:
            s.connect(path)
        except ConnectionRefusedError as exc:
            refused[:] = [exc]
            return False
        return True

    try:
        wait_until(attempt, timeout, interval=0.001)
    except AssertionError:
        raise refused[0] from None


def connect(path: str | bytes, timeout: float = DEADLINE) -> socket.socket:
    """A client socket connected to ``path``, with a timeout so no test hangs."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        connect_socket(s, path, timeout)
    except BaseException:
        s.close()
        raise
    return s


def make_room(s: socket.socket, n: int) -> None:
    """Let the connected ``s`` send ``n`` bytes its peer does not read (yet),
    so that a ``sendall`` of them cannot block.

    On Linux a no-op: the default AF_UNIX buffers (about 200 KiB in each
    direction, on top of what the peer keeps reading and echoing) have always
    sufficed for what the tests send that way.  On macOS the sender's
    SO_SNDBUF bounds the bytes in flight, 8 KiB by default
    (net.local.stream.sendspace), so it is raised to ``n``."""
    if not LINUX and s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < n:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, n)


def default_gid(directory: str) -> int:
    """The group a new file in ``directory`` gets when nobody chooses one: the
    process's group on Linux (``directory`` is never set-group-ID in these
    tests), the directory's group on macOS and the BSDs."""
    return os.getgid() if LINUX else os.stat(directory).st_gid


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
