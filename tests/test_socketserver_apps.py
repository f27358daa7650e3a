"""unixsrv.socketserver under other people's handlers and clients (issue 10,
point 4): the standard library's ``http.server``, ``xmlrpc.server`` and a
``StreamRequestHandler`` run unchanged on unixsrv's server classes, and real
clients (``curl --unix-socket``, ``http.client``, ``xmlrpc.client``) talk to
them over the socket.

Each server runs ``serve_forever(POLL)`` on a thread (``serving``), is shut
down and ``server_close()``-d whatever happens, and its socket file must be
gone afterwards (the standard library would leave it).  Every test ends by
checking ``server.stats()``: the C core counted the connections the clients
made, so these tests fail on any server that is not unixsrv's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.client
import http.server
import os
import shutil
import socket
import subprocess
import threading
import time
import xmlrpc.client
import xmlrpc.server
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import (
    DEADLINE,
    KiB,
    MiB,
    Timed,
    child_pids,
    connect,
    env_without_preload,
    idle_eof_after,
    recv_until_eof,
    run_threads,
    sha,
    wait_until,
)
from unixsrv import socketserver

#: serve_forever's poll interval: how often service_actions() runs (the
#: forking server reaps its children there) and shutdown() is noticed.
POLL = 0.05


@contextlib.contextmanager
def serving(server: Any) -> Iterator[Any]:
    """Run ``server.serve_forever(POLL)`` on a thread for the block.  At the
    end, whatever happened: ``shutdown()`` (bounded: on a thread joined with
    DEADLINE, since the standard library's waits forever), ``server_close()``,
    the serving thread joined.  Then the socket file must be gone."""
    path = server.server_address
    thread = threading.Thread(
        target=server.serve_forever, args=(POLL,), name="serve_forever", daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        stopper = Timed(server.shutdown)
        stopper.start()
        stopper.join(DEADLINE)
        server.server_close()
        thread.join(DEADLINE)
    assert not stopper.is_alive() and stopper.exc is None, (
        f"shutdown() hung or failed: {stopper.exc!r}"
    )
    assert not thread.is_alive(), "serve_forever() did not return after shutdown()"
    assert not os.path.exists(path), "server_close() left the socket file behind"


def counted(server: Any, connections: int) -> dict[str, int]:
    """Wait until unixsrv's counters show ``connections`` accepted and all of
    them closed, and return them (an AttributeError here means the server
    is not unixsrv's)."""
    wait_until(lambda: server.stats()["closed"] >= connections)
    stats: dict[str, int] = server.stats()
    assert (stats["accepted"], stats["closed"], stats["open"]) == (
        connections,
        connections,
        0,
    ), stats
    return stats


#: What ``UnixSocketLogging.setup`` records for a request that is a
#: connected AF_UNIX stream ``socket.socket``.
REAL_SOCKET = (True, socket.AF_UNIX, socket.SOCK_STREAM)


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client.HTTPConnection`` over an AF_UNIX socket: only ``connect``
    differs (the Host header still names ``localhost``)."""

    def __init__(self, path: str, timeout: float = DEADLINE) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = connect(self.unix_path, self.timeout)


class UnixSocketLogging:
    """Mixed into an ``http.server`` handler the way a daemon on a Unix socket
    must: ``BaseHTTPRequestHandler.address_string`` returns
    ``client_address[0]``, and an unnamed AF_UNIX peer's address is ``''``
    (accept(2)), so the stock handler raises IndexError on its first log line,
    on the standard library's server as on unixsrv's.  Log lines go to
    ``server.log`` instead of stderr; each connection's request socket is
    recorded in ``server.requests`` (setup() runs once per connection)."""

    server: Any
    request: Any

    def address_string(self) -> str:
        return "unix:" + self.server.server_address

    def setup(self) -> None:
        self.server.requests.append(
            (
                isinstance(self.request, socket.socket),
                self.request.family,
                self.request.type,
            )
        )
        super().setup()  # type: ignore[misc]

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log.append(f"{self.address_string()} {format % args}")


# ---------------------------------------------------------------------------- http.server


class FileHandler(UnixSocketLogging, http.server.SimpleHTTPRequestHandler):
    """The standard library's file server, speaking HTTP/1.1 (keep-alive)."""

    protocol_version = "HTTP/1.1"


class HTTPServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, handler: Any) -> None:
        self.log: list[str] = []
        self.requests: list[tuple[bool, int, int]] = []
        super().__init__(path, handler)


@dataclasses.dataclass
class FileSite:
    """A running ``HTTPServer`` serving ``blob.bin`` (1 MiB of random bytes)."""

    server: HTTPServer
    path: str
    blob: bytes
    work: str


@pytest.fixture
def file_site(sock_dir: str) -> Iterator[FileSite]:
    """``SimpleHTTPRequestHandler`` serving a directory with ``blob.bin`` in
    it, on ``ThreadingUnixStreamServer``, running for the test."""
    docroot = os.path.join(sock_dir, "www")
    os.mkdir(docroot)
    blob = os.urandom(MiB)
    with open(os.path.join(docroot, "blob.bin"), "wb") as f:
        f.write(blob)
    path = os.path.join(sock_dir, "http.sock")
    with serving(HTTPServer(path, functools.partial(FileHandler, directory=docroot))) as server:
        yield FileSite(server, path, blob, sock_dir)


def test_http_server_serves_files_to_curl(file_site: FileSite) -> None:
    """``curl --unix-socket``, four parallel transfers of the 1 MiB file and
    one of a missing path: the file arrives byte-exact each time (sha256),
    the missing path is a 404 with the handler's error page."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    site = file_site
    urls = ["http://localhost/blob.bin"] * 4 + ["http://localhost/missing.txt"]
    outs = [os.path.join(site.work, f"out{i}") for i in range(len(urls))]
    # Connection: close, so every transfer has a connection of its own
    argv = [
        curl,
        "--silent",
        "--show-error",
        "--unix-socket",
        site.path,
        "--max-time",
        str(DEADLINE),
        "--parallel",
        "--parallel-max",
        "4",
        "--header",
        "Connection: close",
        "--write-out",
        "%{http_code} %{size_download}\\n",
    ]
    for url, out in zip(urls, outs, strict=True):
        argv += [url, "--output", out]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=DEADLINE * 3,
        check=False,
        env=env_without_preload(),
    )
    assert done.returncode == 0, done.stderr
    error_page = os.path.getsize(outs[4])
    # --parallel reports the transfers in the order they finish
    assert sorted(done.stdout.splitlines()) == [f"200 {MiB}"] * 4 + [f"404 {error_page}"]
    for out in outs[:4]:
        with open(out, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == sha(site.blob)
    with open(outs[4], "rb") as f:
        assert b"Error code: 404" in f.read()
    stats = counted(site.server, len(urls))
    # what the handlers' socket calls moved: four files, five small heads
    assert 4 * MiB < stats["bytes_out"] < 4 * MiB + 16 * KiB, stats
    assert 0 < stats["bytes_in"] < 16 * KiB, stats
    assert site.server.requests == [REAL_SOCKET] * len(urls)
    assert site.server.log.count(f'unix:{site.path} "GET /blob.bin HTTP/1.1" 200 -') == 4
    assert f'unix:{site.path} "GET /missing.txt HTTP/1.1" 404 -' in site.server.log


def test_http_server_keeps_http_client_connection_alive(file_site: FileSite) -> None:
    """``http.client`` over the socket: the 1 MiB file, its HEAD and a 404
    on one kept-alive HTTP/1.1 connection (the 404 closes it, as
    ``send_error`` does)."""
    site = file_site
    conn = UnixHTTPConnection(site.path)
    try:
        conn.request("GET", "/blob.bin")
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Content-Length")) == (200, str(MiB))
        assert sha(resp.read()) == sha(site.blob)
        conn.request("HEAD", "/blob.bin")
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Content-Length"), resp.read()) == (
            200,
            str(MiB),
            b"",
        )
        conn.request("GET", "/no/such/file")
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Connection")) == (404, "close")
        assert b"File not found" in resp.read()
    finally:
        conn.close()
    stats = counted(site.server, 1)  # the three requests shared one connection
    assert MiB < stats["bytes_out"] < MiB + 16 * KiB, stats
    assert site.server.requests == [REAL_SOCKET]
    assert [line.split('"')[1] for line in site.server.log if line.count('"') == 2] == [
        "GET /blob.bin HTTP/1.1",
        "HEAD /blob.bin HTTP/1.1",
        "GET /no/such/file HTTP/1.1",
    ]


class IdleHTTPServer(HTTPServer):
    """``HTTPServer`` with unixsrv's idle timeout (a class attribute)."""

    idle_timeout = 0.5


def test_http_keep_alive_connection_ends_at_idle_timeout(sock_dir: str) -> None:
    """``idle_timeout`` on an ``http.server``: a kept-alive HTTP/1.1
    connection that sends nothing more is shut down by the core after the
    timeout (the handler's readline() for the next request returns b"", the
    handler ends), never before."""
    with open(os.path.join(sock_dir, "hello.txt"), "wb") as f:
        f.write(b"hello\n")
    path = os.path.join(sock_dir, "idle.sock")
    handler = functools.partial(FileHandler, directory=sock_dir)
    with serving(IdleHTTPServer(path, handler)) as server:
        conn = UnixHTTPConnection(path)
        try:
            last_active = time.monotonic()  # no later than the connection's last byte
            conn.request("GET", "/hello.txt")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"hello\n")
            assert not resp.will_close  # kept alive: the server waits for the next request
            idle_eof_after(conn.sock, last_active, IdleHTTPServer.idle_timeout)
        finally:
            conn.close()
        counted(server, 1)
    assert server.log == [f'unix:{path} "GET /hello.txt HTTP/1.1" 200 -']


# ---------------------------------------------------------------------------- xmlrpc.server


class RPCHandler(UnixSocketLogging, xmlrpc.server.SimpleXMLRPCRequestHandler):
    """xmlrpc.server's request handler, unchanged but for its log lines and
    Nagle: it sets ``disable_nagle_algorithm`` (TCP_NODELAY, for TCP), which
    setsockopt(2) refuses on an AF_UNIX socket with EOPNOTSUPP."""

    disable_nagle_algorithm = False


class UnixXMLRPCServer(socketserver.UnixStreamServer, xmlrpc.server.SimpleXMLRPCDispatcher):
    """``xmlrpc.server.SimpleXMLRPCServer`` is ``TCPServer`` plus the
    dispatcher; this is the same recipe on unixsrv's ``UnixStreamServer``."""

    def __init__(self, path: str) -> None:
        self.log: list[str] = []
        self.requests: list[tuple[bool, int, int]] = []
        self.logRequests = True
        xmlrpc.server.SimpleXMLRPCDispatcher.__init__(
            self, allow_none=True, encoding=None, use_builtin_types=True
        )
        socketserver.UnixStreamServer.__init__(self, path, RPCHandler)


class UnixTransport(xmlrpc.client.Transport):
    """An ``xmlrpc.client`` transport to a Unix socket: ``make_connection``
    returns an ``http.client`` connection over the socket at ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__(use_builtin_types=True)
        self.unix_path = path

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._connection[0] != host or self._connection[1] is None:
            self._connection = host, UnixHTTPConnection(self.unix_path)
        return self._connection[1]


def refuse(code: int) -> None:
    """An RPC that answers with the Fault its caller asked for."""
    raise xmlrpc.client.Fault(code, f"refused with {code}")


def divide(a: float, b: float) -> float:
    return a / b


def test_xmlrpc_server_answers_xmlrpc_client(sock_path: str) -> None:
    """A SimpleXMLRPCServer-style server on ``UnixStreamServer`` answers
    ``xmlrpc.client`` over the socket: plain calls (with bytes, None, nested
    structures), introspection, a Fault raised by the function, an
    exception turned into a Fault, an unknown method, and a multicall."""
    server = UnixXMLRPCServer(sock_path)
    server.register_function(pow)
    server.register_function(divide)
    server.register_function(refuse)
    server.register_function(lambda x: x, "echo")
    server.register_introspection_functions()
    server.register_multicall_functions()
    with serving(server):
        proxy = xmlrpc.client.ServerProxy(
            "http://localhost/RPC2",
            transport=UnixTransport(sock_path),
            allow_none=True,
            use_builtin_types=True,
        )
        with proxy:
            assert proxy.pow(2, 10) == 1024
            value = {
                "bytes": os.urandom(32 * KiB),
                "none": None,
                "list": [1, 2.5, "ü", [True]],
            }
            assert proxy.echo(value) == value
            assert {"pow", "divide", "refuse", "echo", "system.multicall"} <= set(
                proxy.system.listMethods()
            )
            with pytest.raises(xmlrpc.client.Fault) as refused:
                proxy.refuse(42)
            assert (refused.value.faultCode, refused.value.faultString) == (
                42,
                "refused with 42",
            )
            with pytest.raises(xmlrpc.client.Fault) as failed:
                proxy.divide(1, 0)
            assert failed.value.faultCode == 1 and "ZeroDivisionError" in failed.value.faultString
            with pytest.raises(xmlrpc.client.Fault, match="is not supported"):
                proxy.nosuch()
            multi = xmlrpc.client.MultiCall(proxy)
            multi.pow(3, 3)
            multi.refuse(7)
            multi.echo("after the fault")
            results = multi()
            assert results[0] == 27
            with pytest.raises(xmlrpc.client.Fault) as in_multi:
                results[1]
            assert in_multi.value.faultCode == 7
            assert results[2] == "after the fault"
        calls = 7  # HTTP/1.0 handler: every call (the multicall is one) on a connection of its own
        stats = counted(server, calls)
    # 32 KiB of random bytes went both ways, base64-encoded (and gzip-ped in the
    # answer: SimpleXMLRPCRequestHandler.encode_threshold)
    assert stats["bytes_in"] > 16 * KiB and stats["bytes_out"] > 16 * KiB, stats
    assert server.requests == [REAL_SOCKET] * calls
    assert server.log.count(f'unix:{sock_path} "POST /RPC2 HTTP/1.1" 200 -') == calls


# ---------------------------------------------------------------------------- forking


class PidEcho(socketserver.StreamRequestHandler):
    """Answers one line with the pid and parent pid of the process that
    handled it, then the line."""

    def handle(self) -> None:
        line = self.rfile.readline()
        self.wfile.write(b"%d %d %s" % (os.getpid(), os.getppid(), line))


@pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"
)
def test_forking_server_serves_each_request_in_its_own_child(sock_path: str) -> None:
    """``ForkingUnixStreamServer``: each of 12 requests (4 clients at a time)
    is served by a child of the serving process, each by a different one;
    the parent counts every connection, reaps every child while it serves
    (active_children drained) and leaves no child behind."""
    n, concurrent = 12, 4
    server = socketserver.ForkingUnixStreamServer(sock_path, PidEcho)
    with serving(server):

        def request(i: int) -> tuple[int, int, bytes]:
            with connect(sock_path) as s:
                s.sendall(b"request %d\n" % i)
                pid, ppid, line = recv_until_eof(s).split(b" ", 2)
            return int(pid), int(ppid), line

        answers = []
        for first in range(0, n, concurrent):
            answers += run_threads(lambda i, first=first: request(first + i), concurrent)
        assert not [a for a in answers if isinstance(a, BaseException)], answers
        assert [line for _, _, line in answers] == [b"request %d\n" % i for i in range(n)]
        pids = {pid for pid, _, _ in answers}
        assert len(pids) == n, "two requests were served by the same process"
        assert os.getpid() not in pids
        assert {ppid for _, ppid, _ in answers} == {os.getpid()}, (
            "not children of the serving process"
        )
        wait_until(
            lambda: not server.active_children
        )  # reaped by serve_forever's service_actions()
        counted(server, n)
    assert not server.active_children
    assert not pids & child_pids(), "a child outlived the server"
    for pid in pids:
        with pytest.raises(ChildProcessError):  # reaped by the server, not left for us
            os.waitpid(pid, os.WNOHANG)
