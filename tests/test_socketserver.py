"""unixsrv.socketserver: the stdlib's socketserver API on unixsrv's core.

CPython's own test_socketserver runs against it in
tests/test_socketserver_cpython.py; these tests cover what that one does
not: each hook as documented, the request as a real socket, what the core
adds (counters, idle timeout, mode and group, the socket file's safety) and
the forking and threading mix-ins' accounting.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import grp
import json
import os
import select
import socket
import socketserver as stdlib_socketserver
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from conftest import (
    DEADLINE,
    IDLE_LATE,
    connect,
    end_processes,
    finish,
    fork_quietly,
    listening_socket,
    read_line,
    reap,
    recv_until_eof,
    wait_until,
)
from unixsrv import AddressInUseError, ServerConfig
from unixsrv import socketserver as ss

#: Python 3.12+ warns at every fork() of a process with threads; the core's
#: loop thread is one (the stdlib's own tests fork from a threaded process
#: too).  The child only runs the handler and os._exit()s.
forking = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")


class Upper(ss.StreamRequestHandler):
    """One line in, the same line upper-cased out."""

    def handle(self) -> None:
        self.wfile.write(self.rfile.readline().upper())


@contextlib.contextmanager
def serving(server: Any, poll_interval: float = 0.01) -> Iterator[threading.Thread]:
    """serve_forever() on a thread for the block; then shutdown(), join and
    server_close()."""
    t = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": poll_interval},
        daemon=True,
    )
    t.start()
    try:
        yield t
    finally:
        server.shutdown()
        t.join(DEADLINE)
        server.server_close()
        assert not t.is_alive()


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    """Servers appended here are server_close()d at the end of the test."""
    servers: list[Any] = []
    yield servers
    for server in servers:
        server.server_close()


def ask(path: str, line: bytes = b"hello\n") -> bytes:
    with connect(path) as c:
        c.sendall(line)
        return recv_until_eof(c)


# ---------------------------------------------------------------------------- the stdlib's API


def test_module_exports_the_stdlib_names() -> None:
    assert set(stdlib_socketserver.__all__) <= set(ss.__all__)
    for name in (
        "BaseServer",
        "BaseRequestHandler",
        "StreamRequestHandler",
        "ForkingMixIn",
        "TCPServer",
    ):
        # re-exported as they are
        assert getattr(ss, name) is getattr(stdlib_socketserver, name), name
    for cls in (
        ss.UnixStreamServer,
        ss.ThreadingUnixStreamServer,
        ss.ForkingUnixStreamServer,
    ):
        assert issubclass(cls, stdlib_socketserver.UnixStreamServer)
    assert issubclass(ss.ThreadingMixIn, stdlib_socketserver.ThreadingMixIn)


@pytest.mark.parametrize("cls", [ss.UnixStreamServer, ss.ThreadingUnixStreamServer])
def test_serves_and_counts(sock_path: str, cls: type) -> None:
    server = cls(sock_path, Upper)
    assert server.server_address == sock_path == server.socket.getsockname()
    assert server.address_family == socket.AF_UNIX and server.socket_type == socket.SOCK_STREAM
    with serving(server):
        for _ in range(3):
            assert ask(sock_path) == b"HELLO\n"
    assert server.stats() == {
        "accepted": 3,
        "rejected": 0,
        "closed": 3,
        "open": 0,
        "bytes_in": 18,
        "bytes_out": 18,
        "errors": 0,
        "denied": 0,
    }
    assert server.socket.fileno() == -1 and server.fileno() == -1
    assert not os.path.exists(sock_path)  # the stdlib would leave it


def test_request_is_a_connected_socket(sock_path: str, closing: list[Any]) -> None:
    seen: dict[str, Any] = {}

    class Inspect(ss.StreamRequestHandler):
        timeout = 5.0  # StreamRequestHandler applies it with settimeout()

        def handle(self) -> None:
            r = self.request
            seen.update(
                is_socket=isinstance(r, socket.socket),
                family=r.family,
                type=r.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
                timeout=r.gettimeout(),
                sockname=r.getsockname(),
                peer_pid=r.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED)
                if hasattr(socket, "SO_PEERCRED")
                else 0,
                client_address=self.client_address,
                line=self.rfile.readline(),
            )
            self.wfile.write(b"ok\n")

    server = ss.UnixStreamServer(sock_path, Inspect)
    closing.append(server)
    with connect(sock_path) as c:
        c.sendall(b"line\n")
        server.handle_request()
        assert recv_until_eof(c) == b"ok\n"
    assert (
        seen["is_socket"]
        and seen["family"] == socket.AF_UNIX
        and seen["type"] == socket.SOCK_STREAM
    )
    assert seen["timeout"] == 5.0 and seen["line"] == b"line\n"
    # the configured name, never the core's temporary one
    assert seen["sockname"] == sock_path
    assert seen["client_address"] == ""  # an unnamed client, as accept() reports it
    assert server.stats()["bytes_in"] == 5 and server.stats()["bytes_out"] == 3


def test_hooks_are_called_as_documented(sock_path: str) -> None:
    calls: list[str] = []
    errors: list[Any] = []

    class Boom(ss.BaseRequestHandler):
        def handle(self) -> None:
            calls.append("handle")
            if self.request.recv(10) == b"boom":
                raise ValueError("boom")

    class Recording(ss.UnixStreamServer):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            calls.append("verify_request")
            return super().verify_request(request, client_address)

        def process_request(self, request: Any, client_address: Any) -> None:
            calls.append("process_request")
            super().process_request(request, client_address)

        def finish_request(self, request: Any, client_address: Any) -> None:
            calls.append("finish_request")
            super().finish_request(request, client_address)

        def shutdown_request(self, request: Any) -> None:
            calls.append("shutdown_request")
            super().shutdown_request(request)

        def close_request(self, request: Any) -> None:
            calls.append("close_request")
            super().close_request(request)

        def handle_error(self, request: Any, client_address: Any) -> None:
            calls.append("handle_error")
            errors.append(sys.exc_info()[1])

        def handle_timeout(self) -> None:
            calls.append("handle_timeout")

    server = Recording(sock_path, Boom)
    with server:
        server.timeout = 0.01
        server.handle_request()  # nobody connects
        assert calls == ["handle_timeout"]
        server.timeout = None  # now wait for each client, however late the core accepts it
        for payload in (b"fine", b"boom"):
            calls.clear()
            with connect(sock_path) as c:
                c.sendall(payload)
                server.handle_request()
                assert recv_until_eof(c) == b""
            expected = ["verify_request", "process_request", "finish_request", "handle"]
            if payload == b"boom":
                # BaseServer: handle_error, then shutdown_request
                expected += ["handle_error"]
            assert calls == [*expected, "shutdown_request", "close_request"]
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    assert server.stats()["open"] == 0 and server.stats()["closed"] == 2


def test_verify_request_false_closes_the_connection(sock_path: str) -> None:
    handled: list[Any] = []

    class Refusing(ss.UnixStreamServer):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return False

    with Refusing(sock_path, lambda *args: handled.append(args)) as server:
        with connect(sock_path) as c:
            server.handle_request()
            assert recv_until_eof(c) == b""
        assert handled == [] and server.stats()["closed"] == 1


def test_service_actions_run_each_poll_interval(sock_path: str) -> None:
    ticks = threading.Semaphore(0)

    class Ticking(ss.UnixStreamServer):
        def service_actions(self) -> None:
            ticks.release()

    server = Ticking(sock_path, Upper)
    with serving(server, poll_interval=0.01):
        for _ in range(3):  # with nothing to serve, the loop still ticks
            assert ticks.acquire(timeout=DEADLINE)
        assert ask(sock_path) == b"HELLO\n"


def test_shutdown_stops_only_the_serve_loop(sock_path: str) -> None:
    with ss.UnixStreamServer(sock_path, Upper) as server:
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
        t.start()
        assert ask(sock_path) == b"HELLO\n"
        server.shutdown()
        t.join(DEADLINE)
        assert not t.is_alive()
        # Still bound: a client connects (and waits) until someone serves it.
        with connect(sock_path) as c:
            c.sendall(b"again\n")
            server.handle_request()
            assert recv_until_eof(c) == b"AGAIN\n"


def test_fileno_is_readable_while_a_connection_waits(sock_path: str) -> None:
    with ss.UnixStreamServer(sock_path, Upper) as server:
        assert select.select([server], [], [], 0)[0] == []
        with connect(sock_path) as c:
            assert select.select([server], [], [], DEADLINE)[0] == [server]
            c.sendall(b"x\n")
            server.handle_request()
            assert recv_until_eof(c) == b"X\n"
        assert select.select([server], [], [], 0)[0] == []


def test_handle_request_honours_the_socket_timeout(sock_path: str) -> None:
    timeouts: list[float] = []

    class Timing(ss.UnixStreamServer):
        def handle_timeout(self) -> None:
            timeouts.append(time.monotonic())

    with Timing(sock_path, Upper) as server:
        # the pre-`timeout` way to escape handle_request()
        server.socket.settimeout(0.05)
        began = time.monotonic()
        server.handle_request()
        assert len(timeouts) == 1 and timeouts[0] - began >= 0.05
        # The listener itself stays non-blocking: the core accepts on it.
        server.socket.settimeout(None)
        assert server.socket.gettimeout() is None and server.socket.getblocking()
        assert not os.get_blocking(server.socket.fileno())
        assert ask_served(server, sock_path) == b"HELLO\n"


def ask_served(server: Any, path: str) -> bytes:
    """One request, served by handle_request() on this thread."""
    with connect(path) as c:
        c.sendall(b"hello\n")
        server.handle_request()
        return recv_until_eof(c)


def test_bind_and_activate_false(sock_path: str) -> None:
    server = ss.UnixStreamServer(sock_path, Upper, bind_and_activate=False)
    try:
        assert server.fileno() == -1 and not os.path.exists(sock_path)
        server.socket_mode = 0o600  # per instance, before server_bind()
        server.server_bind()
        server.server_activate()
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        with pytest.raises(OSError) as again:  # as the stdlib's socket.bind() would
            server.server_bind()
        assert again.value.errno == errno.EINVAL
        assert ask_served(server, sock_path) == b"HELLO\n"
    finally:
        server.server_close()


def test_a_failed_bind_leaves_nothing(sock_path: str) -> None:
    with listening_socket(sock_path):  # a live server owns the path
        with pytest.raises(AddressInUseError) as err:
            ss.UnixStreamServer(sock_path, Upper)
        assert isinstance(err.value, OSError)
        assert os.path.exists(sock_path)  # left alone
    # Now it is a stale socket: replaced, as the core does.
    with ss.UnixStreamServer(sock_path, Upper) as server:
        assert ask_served(server, sock_path) == b"HELLO\n"


# ---------------------------------------------------------------------------- what the core adds


def test_default_mode_is_the_stdlibs(sock_dir: str) -> None:
    ours, theirs = os.path.join(sock_dir, "ours"), os.path.join(sock_dir, "theirs")
    with (
        ss.UnixStreamServer(ours, Upper),
        stdlib_socketserver.UnixStreamServer(theirs, Upper),
    ):
        assert os.stat(ours).st_mode == os.stat(theirs).st_mode
    os.unlink(theirs)


@pytest.mark.root
def test_mode_and_group_are_set_before_anyone_can_connect(sock_path: str) -> None:
    gid = next(g.gr_gid for g in grp.getgrall() if g.gr_gid != os.getgid())
    first_seen: list[os.stat_result] = []
    stop = threading.Event()

    def watch() -> None:
        # The first stat of the file, the moment it appears at the path.
        while not stop.is_set():
            try:
                first_seen.append(os.stat(sock_path))
                return
            except FileNotFoundError:
                continue

    watcher = threading.Thread(target=watch)
    watcher.start()

    class Guarded(ss.UnixStreamServer):
        socket_mode = "0640"
        socket_group = gid

    try:
        with Guarded(sock_path, Upper) as server:
            watcher.join(DEADLINE)
            assert first_seen, "the socket file never appeared"
            assert stat.S_IMODE(first_seen[0].st_mode) == 0o640 and first_seen[0].st_gid == gid
            assert ask_served(server, sock_path) == b"HELLO\n"
    finally:
        stop.set()
        watcher.join()


def test_config_sets_the_core(sock_path: str) -> None:
    cfg = ServerConfig(path=sock_path, mode=0o660, max_connections=1, backlog=7)
    with ss.UnixStreamServer(None, Upper, config=cfg) as server:
        assert server.server_address == sock_path and server.request_queue_size == 7
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
        with connect(sock_path) as first:
            wait_until(lambda: select.select([server], [], [], 0)[0])
            # over max_connections: accepted and closed at once
            with connect(sock_path) as second:
                assert recv_until_eof(second) == b""
            first.sendall(b"x\n")
            server.handle_request()
            assert recv_until_eof(first) == b"X\n"
        stats = server.stats()
        assert (stats["rejected"], stats["accepted"], stats["closed"]) == (1, 1, 1), stats
    with pytest.raises(TypeError):
        ss.UnixStreamServer(sock_path, Upper, config={"path": sock_path})  # type: ignore[arg-type]


def test_config_brings_access_control(sock_path: str, closing: list[Any]) -> None:
    """config= carries every ServerConfig field: a peer the allow-list does
    not admit is closed by the core before get_request() could see it."""
    other = os.geteuid() + 1
    cfg = ServerConfig(path=sock_path, allowed_uids=[other])
    server = ss.UnixStreamServer(None, Upper, config=cfg)
    closing.append(server)
    with connect(sock_path) as c:
        assert recv_until_eof(c) == b""
    assert server.stats()["denied"] == 1 and server.stats()["accepted"] == 0
    assert select.select([server], [], [], 0)[0] == []  # nothing to get


def test_idle_request_is_shut_down_by_the_core(sock_path: str) -> None:
    got: dict[str, Any] = {}
    done = threading.Event()

    class Waiting(ss.BaseRequestHandler):
        def handle(self) -> None:
            got["data"] = self.request.recv(100)  # the client never sends
            got["eof_at"] = time.monotonic()
            try:
                self.request.sendall(b"late")
            except OSError as exc:
                got["send"] = exc
            done.set()

    class Idle(ss.ThreadingUnixStreamServer):
        idle_timeout = 0.2

    server = Idle(sock_path, Waiting)
    with serving(server):
        # the core accepts (and starts the idle clock) after this
        connected_at = time.monotonic()
        with connect(sock_path) as c:
            assert done.wait(DEADLINE)
            assert got["data"] == b"" and 0.2 <= got["eof_at"] - connected_at < 0.2 + IDLE_LATE
            assert isinstance(got["send"], BrokenPipeError)
            assert recv_until_eof(c) == b""
    assert server.stats()["open"] == 0


def test_a_long_answer_to_a_slow_reader_is_not_idle(sock_path: str) -> None:
    """sendall() with an idle timeout reports each piece as activity: a big
    answer that takes longer than the timeout to drain is not cut off,
    while bytes keep moving (every ~10 ms here, far inside the timeout even
    on a loaded machine)."""
    size = 2 * 1024 * 1024
    idle = 1.0

    class Big(ss.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"b" * size)

    class Idle(ss.UnixStreamServer):
        idle_timeout = idle

    server = Idle(sock_path, Big)
    with serving(server), connect(sock_path) as c:
        received = 0
        began = time.monotonic()
        while chunk := c.recv(16384):
            received += len(chunk)
            # A slow reader: time passing is the point, not a synchronisation.
            time.sleep(0.01)
        took = time.monotonic() - began
        assert received == size, f"cut off after {received} bytes, {took:.2f} s"
        assert took > idle  # the whole answer took longer than the idle timeout
    assert server.stats()["bytes_out"] == size


def test_server_close_removes_only_its_own_file(sock_path: str) -> None:
    server = ss.UnixStreamServer(sock_path, Upper)
    moved = sock_path + ".moved"
    os.rename(sock_path, moved)
    try:
        with listening_socket(sock_path):  # a successor owns the path now
            server.server_close()
            assert os.path.exists(sock_path) and os.path.exists(moved)
    finally:
        os.unlink(sock_path)
        os.unlink(moved)


GIL_HELD = """
import os, sys, time
from unixsrv import socketserver as ss

server = ss.UnixStreamServer(sys.argv[1], ss.BaseRequestHandler)
loop = server._acceptor._loop
sys.setswitchinterval(1000.0)  # no thread asks for the GIL from now on and gets it
os.write(int(sys.argv[2]), b"x")  # the client connects now
end = time.monotonic() + 10.0
conn = None
while conn is None and time.monotonic() < end:  # never releases the GIL
    conn = loop.take_accepted()
print("queued" if conn is not None else "not queued", flush=True)
if conn is not None:
    conn._finish()
server.server_close()
"""


def test_connections_are_queued_without_the_gil(sock_path: str) -> None:
    """The loop thread accepts and queues a connection while another thread
    holds the GIL throughout: the hand-over to get_request() takes no GIL."""
    go_r, go_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", GIL_HELD, sock_path, str(go_w)],
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=(go_w,),
    )
    try:
        os.close(go_w)
        ready, _, _ = select.select([go_r], [], [], DEADLINE)
        assert ready and os.read(go_r, 1) == b"x"
        with connect(sock_path):
            assert read_line(proc) == "queued"
        assert proc.wait(DEADLINE) == 0
    finally:
        os.close(go_r)
        end_processes([proc])


def test_server_close_closes_waiting_connections(sock_path: str) -> None:
    server = ss.UnixStreamServer(sock_path, Upper)
    with connect(sock_path) as a, connect(sock_path) as b:
        wait_until(lambda: server.stats()["accepted"] == 2)
        assert len(server._pending) == 2  # both wait in the core's queue
        server.server_close()
        assert recv_until_eof(a) == b"" and recv_until_eof(b) == b""
    assert server.stats()["closed"] == 2 and server.stats()["open"] == 0
    assert server._acceptor.wait(DEADLINE)  # the core stopped


def test_requests_outlive_server_close(sock_path: str) -> None:
    """server_close() stops accepting; a request being served goes on (and
    block_on_close makes it wait for it); then the core stops."""
    entered, release = threading.Event(), threading.Event()

    class Slow(ss.StreamRequestHandler):
        def handle(self) -> None:
            entered.set()
            release.wait(DEADLINE)
            self.wfile.write(self.rfile.readline())

    server = ss.ThreadingUnixStreamServer(sock_path, Slow)
    closer = threading.Thread(target=server.server_close)
    with connect(sock_path) as c:
        server.handle_request()
        assert entered.wait(DEADLINE)
        closer.start()
        wait_until(lambda: not os.path.exists(sock_path))  # the listener is gone
        c.sendall(b"still here\n")
        release.set()
        closer.join(DEADLINE)
        assert not closer.is_alive()
        assert recv_until_eof(c) == b"still here\n"
    assert server.stats()["open"] == 0
    assert server._acceptor.wait(DEADLINE)


def test_detach_closes_the_connection_for_the_core(sock_path: str, closing: list[Any]) -> None:
    kept: list[int] = []

    class Detaching(ss.BaseRequestHandler):
        def handle(self) -> None:
            kept.append(self.request.detach())

    server = ss.UnixStreamServer(sock_path, Detaching)
    closing.append(server)
    with connect(sock_path) as c:
        server.handle_request()
        assert server.stats()["closed"] == 1  # counted once, though...
        # ...the detached fd still talks to the client
        with socket.socket(fileno=kept[0]) as mine:
            mine.sendall(b"detached")
        assert recv_until_eof(c) == b"detached"


def test_every_io_method_counts(sock_path: str, sock_dir: str, closing: list[Any]) -> None:
    payload_file = os.path.join(sock_dir, "payload")
    with open(payload_file, "wb") as f:
        f.write(b"f" * 1000)

    class AllMethods(ss.BaseRequestHandler):
        def handle(self) -> None:
            r = self.request
            buf = bytearray(10)
            got = [len(r.recv(10)), r.recv_into(buf, 10), len(r.recvfrom(10)[0])]
            got += [
                r.recvfrom_into(buf, 10)[0],
                len(r.recvmsg(10)[0]),
                r.recvmsg_into([buf])[0],
            ]
            assert got == [10] * 6, got
            r.send(b"s" * 10)
            r.sendall(memoryview(b"a" * 20))
            r.sendmsg([b"m" * 30])
            with open(payload_file, "rb") as f:
                assert r.sendfile(f) == 1000

    server = ss.UnixStreamServer(sock_path, AllMethods)
    closing.append(server)
    with connect(sock_path) as c:
        c.sendall(b"i" * 60)  # 10 bytes for each of the six receiving methods
        server.handle_request()
        assert len(recv_until_eof(c)) == 10 + 20 + 30 + 1000
    assert server.stats()["bytes_in"] == 60 and server.stats()["bytes_out"] == 1060


@pytest.mark.linux("abstract socket names")
def test_abstract_name(closing: list[Any]) -> None:
    name = b"\0unixsrv-ss-%d" % os.getpid()
    server = ss.UnixStreamServer(name, Upper)
    closing.append(server)
    assert server.server_address == name == server.socket.getsockname()  # bytes, as the stdlib's
    assert ask_served(server, name) == b"HELLO\n"


def test_at_sign_is_a_file_name_as_in_the_stdlib(
    sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(sock_dir)
    with ss.UnixStreamServer("@file", Upper) as server:
        assert server.server_address == "@file" and os.path.exists("@file")
        assert ask_served(server, "./@file") == b"HELLO\n"
    assert not os.path.exists("@file")


def abandon_a_server(path: str) -> Any:
    """Start a server and drop it without server_close(); its core."""
    acceptor = ss.UnixStreamServer(path, Upper)._acceptor
    gc.collect()
    return acceptor


def test_an_abandoned_server_closes_itself(sock_path: str) -> None:
    with pytest.warns(ResourceWarning, match="unclosed server"):
        acceptor = abandon_a_server(sock_path)
    assert acceptor.wait(DEADLINE) and not os.path.exists(sock_path)


# ---------------------------------------------------------------------------- mix-ins


def test_threading_mixin_reuses_pool_threads(sock_path: str) -> None:
    idents: list[int] = []

    class Who(ss.StreamRequestHandler):
        def handle(self) -> None:
            idents.append(threading.get_ident())
            self.wfile.write(self.rfile.readline())

    server = ss.ThreadingUnixStreamServer(sock_path, Who)
    with serving(server):
        for _ in range(5):
            assert ask(sock_path) == b"hello\n"
            # the worker parked again
            wait_until(lambda: server._unixsrv_pool.idle == 1)
    assert len(idents) == 5 and threading.get_ident() not in idents
    assert len(set(idents)) == 1  # the parked worker took each next request
    assert len(server._threads) == 0  # reaped and joined by server_close


def test_finished_requests_are_reaped_from_threads(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_threads`` does not keep every request (CPython issue 37193): it
    is reaped once it has doubled since the last reaping (not at every
    request, a walk over every running request, as the stdlib does), so
    after many requests it holds at most 8 entries, and server_close()
    joins what is left."""
    reaps = []
    reap = stdlib_socketserver._Threads.reap
    monkeypatch.setattr(
        stdlib_socketserver._Threads, "reap", lambda self: reaps.append(1) or reap(self)
    )
    server = ss.ThreadingUnixStreamServer(sock_path, Upper)
    try:
        for _ in range(50):
            with connect(sock_path) as c:
                c.sendall(b"x\n")
                server.handle_request()
                assert c.recv(10) == b"X\n"
            assert len(server._threads) <= 8
        assert isinstance(server._threads, stdlib_socketserver._Threads)
        assert 0 < len(reaps) <= 50 // 7
    finally:
        server.server_close()
    assert server._threads == []


def test_process_request_waits_for_the_previous_requests_start(sock_path: str) -> None:
    """process_request() returns without waiting for its own request to
    start (that wait cost the serve loop a sleep per request), but not
    before the previous request started: the serve loop is never more than
    one request ahead of its workers."""
    gate = threading.Event()
    served: list[bytes] = []

    class Echo(ss.StreamRequestHandler):
        def handle(self) -> None:
            served.append(self.rfile.readline())

    class Gated(ss.ThreadingUnixStreamServer):
        def _run_request(self, item: Any) -> None:
            gate.wait(DEADLINE)  # the worker is slow to start the request
            super()._run_request(item)

    server = Gated(sock_path, Echo)
    try:
        with connect(sock_path) as first, connect(sock_path) as second:
            first.sendall(b"1\n")
            second.sendall(b"2\n")
            server.handle_request()  # returns with the first request not started
            assert served == [] and len(server._threads) == 1
            blocked = threading.Thread(target=server.handle_request, daemon=True)
            blocked.start()
            blocked.join(0.2)
            assert blocked.is_alive()  # waits for the first request's start
            gate.set()
            blocked.join(DEADLINE)
            assert not blocked.is_alive()
            wait_until(lambda: sorted(served) == [b"1\n", b"2\n"])
    finally:
        gate.set()
        server.server_close()
    assert server._threads == []


class HeldServer(ss.ThreadingUnixStreamServer):
    """A threading server whose first request waits for ``release`` and
    whose serving thread, once that request runs, waits in service_actions()
    for ``resume``: connections made meanwhile wait in the core's queue,
    where only a worker can take them."""

    def __init__(self, path: str, handler: Any) -> None:
        super().__init__(path, handler)
        self.first_running = threading.Event()
        self.release = threading.Event()
        self.held = threading.Event()
        self.resume = threading.Event()

    def service_actions(self) -> None:
        if self.first_running.is_set() and not self.resume.is_set():
            self.held.set()
            self.resume.wait(DEADLINE)


def held_echo_threads(server_class: type[HeldServer], path: str) -> tuple[HeldServer, list[int]]:
    """A HeldServer of `server_class` echoing a line, and the thread idents
    its requests ran on."""
    idents: list[int] = []

    class Who(ss.StreamRequestHandler):
        def handle(self) -> None:
            server = self.server
            assert isinstance(server, HeldServer)
            if not server.first_running.is_set():
                server.first_running.set()
                server.release.wait(DEADLINE)
            idents.append(threading.get_ident())
            self.wfile.write(self.rfile.readline())

    return server_class(path, Who), idents


def test_a_worker_takes_the_next_waiting_connection_itself(sock_path: str) -> None:
    """Under serve_forever(), a worker that finished its request takes the
    connections waiting in the queue, one after the other, on its own
    thread: no hand-over from the serving thread (held here) per request."""
    server, idents = held_echo_threads(HeldServer, sock_path)
    try:
        with serving(server), connect(sock_path) as first:
            first.sendall(b"0\n")
            assert server.held.wait(DEADLINE)  # the serving thread takes no more
            clients = [connect(sock_path) for _ in range(3)]
            for i, c in enumerate(clients, 1):
                c.sendall(b"%d\n" % i)
            wait_until(lambda: len(server._pending) == 3)
            server.release.set()
            assert first.recv(10) == b"0\n"
            for i, c in enumerate(clients, 1):
                with c:
                    assert c.recv(10) == b"%d\n" % i  # in queue order
            assert len(server._pending) == 0
            server.resume.set()
    finally:
        server.release.set()
        server.resume.set()
    assert len(idents) == 4 and len(set(idents)) == 1
    assert server._threads == []  # each taken request was tracked and joined


class OwnVerify(HeldServer):
    def verify_request(self, request: Any, client_address: Any) -> bool:
        return True  # the stdlib runs it on the serving thread: so must we


class OwnProcess(HeldServer):
    def process_request(self, request: Any, client_address: Any) -> None:
        super().process_request(request, client_address)


class OwnGet(HeldServer):
    def get_request(self) -> tuple[socket.socket, Any]:
        return super().get_request()


@pytest.mark.parametrize("server_class", [OwnVerify, OwnProcess, OwnGet])
def test_no_worker_takes_connections_past_a_subclass_hook(
    sock_path: str, server_class: type[HeldServer]
) -> None:
    """Where the class overrides what the serving thread runs between
    accepting and the handler, only the serving thread takes connections,
    as in the stdlib: a finished worker leaves the queue alone."""
    server, idents = held_echo_threads(server_class, sock_path)
    try:
        with serving(server), connect(sock_path) as first:
            first.sendall(b"0\n")
            assert server.held.wait(DEADLINE)
            clients = [connect(sock_path) for _ in range(2)]
            for c in clients:
                c.sendall(b"x\n")
            wait_until(lambda: len(server._pending) == 2)
            server.release.set()
            assert first.recv(10) == b"0\n"
            wait_until(lambda: server._unixsrv_pool.idle == 1)  # the worker parked
            assert len(server._pending) == 2
            server.resume.set()  # the serving thread takes them now
            for c in clients:
                with c:
                    assert c.recv(10) == b"x\n"
    finally:
        server.release.set()
        server.resume.set()
    assert len(idents) == 3


def test_no_worker_takes_connections_once_shutdown_is_asked(sock_path: str) -> None:
    """After shutdown() a finished worker leaves the waiting connections to
    server_close(), which closes them: the stdlib serves no connection it
    had not taken when shutdown() was called."""
    server, _ = held_echo_threads(HeldServer, sock_path)
    stopper = threading.Thread(target=server.shutdown, daemon=True)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    t.start()
    try:
        with connect(sock_path) as first:
            first.sendall(b"0\n")
            assert server.held.wait(DEADLINE)
            late = connect(sock_path)
            late.sendall(b"late\n")
            wait_until(lambda: len(server._pending) == 1)
            stopper.start()
            wait_until(lambda: not server._unixsrv_serving)
            server.release.set()
            assert first.recv(10) == b"0\n"
            wait_until(lambda: server._unixsrv_pool.idle == 1)
            assert len(server._pending) == 1
            server.resume.set()
            stopper.join(DEADLINE)
            t.join(DEADLINE)
            assert not t.is_alive() and not stopper.is_alive()
            server.server_close()
            # Closed unserved (reset: its request was never read).
            with late, pytest.raises(ConnectionResetError):
                late.recv(10)
    finally:
        server.release.set()
        server.resume.set()
        server.server_close()


def test_threading_daemon_threads_do_not_block_server_close(sock_path: str) -> None:
    entered, release = threading.Event(), threading.Event()

    class Parked(ss.BaseRequestHandler):
        def handle(self) -> None:
            entered.set()
            release.wait(DEADLINE)

    class Daemonic(ss.ThreadingUnixStreamServer):
        daemon_threads = True

    server = Daemonic(sock_path, Parked)
    try:
        with connect(sock_path):
            server.handle_request()
            assert entered.wait(DEADLINE)
            server.server_close()  # returns with the request still running
            assert server.stats()["open"] == 1
    finally:
        release.set()
    wait_until(lambda: server.stats()["open"] == 0)


EXIT_WAITS = """
import sys
from unixsrv import socketserver as ss

class Late(ss.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline().upper())  # long after the main thread is done

class Server(ss.ThreadingUnixStreamServer):
    daemon_threads = sys.argv[2] == "daemon"

server = Server(sys.argv[1], Late)
server.handle_request()
print("main thread done", flush=True)
"""


@pytest.mark.parametrize("daemon", [False, True])
def test_interpreter_exit_waits_for_non_daemon_requests(
    sock_path: str, spawn: Any, daemon: bool
) -> None:
    """As with the stdlib's request threads: without daemon_threads the
    process lives until its running requests end; with it, it does not."""
    proc = spawn(EXIT_WAITS, sock_path, "daemon" if daemon else "wait")
    wait_until(lambda: os.path.exists(sock_path) or proc.poll() is not None)
    with connect(sock_path) as c:
        assert read_line(proc) == "main thread done"
        if daemon:
            assert proc.wait(DEADLINE) == 0  # the request died with the process
            assert recv_until_eof(c) == b""
        else:
            assert proc.poll() is None  # still serving its request
            c.sendall(b"late\n")
            assert recv_until_eof(c) == b"LATE\n"
            assert proc.wait(DEADLINE) == 0


@forking
# An exception is handle_error()'s in the child too (process_request_thread
# catches it), so that child ends like one whose request returned.
@pytest.mark.parametrize(
    ("child_ends", "status"), [("returns", 0), ("sys.exit(3)", 3), ("raises", 0)]
)
def test_a_child_forked_by_a_request_exits_when_the_request_ends(
    sock_path: str, child_ends: str, status: int
) -> None:
    """A handler on a pool worker that forks: the child ends with the
    request (not parked in the pool), as the child of a request thread ends
    with that thread; the parent goes on serving."""
    pids: list[int] = []
    parent = os.getpid()

    class Forking(ss.BaseRequestHandler):
        def handle(self) -> None:
            pid = fork_quietly()
            if pid == 0:
                if child_ends == "sys.exit(3)":
                    sys.exit(3)
                if child_ends == "raises":
                    raise RuntimeError("child failed")
                return
            pids.append(pid)

    class Quiet(ss.ThreadingUnixStreamServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            # Only the child's RuntimeError comes here (in the child).
            assert os.getpid() != parent and sys.exc_info()[0] is RuntimeError

    server = Quiet(sock_path, Forking)
    with serving(server):
        for _ in range(2):
            with connect(sock_path) as c:
                recv_until_eof(c)
                wait_until(lambda: len(pids) == 1)
                assert reap(pids.pop(), timeout=DEADLINE) == status


def test_escaping_exception_goes_to_threading_excepthook(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_type))

    class Exiting(ss.BaseRequestHandler):
        def handle(self) -> None:
            raise SystemExit(3)  # not an Exception: handle_error does not see it

    server = ss.ThreadingUnixStreamServer(sock_path, Exiting)
    with connect(sock_path) as c:
        server.handle_request()
        server.server_close()  # joins the request
        assert recv_until_eof(c) == b""
    assert seen == [SystemExit]


def test_stdlib_threading_mixin_works_too(sock_path: str) -> None:
    names: list[str] = []

    class Named(ss.StreamRequestHandler):
        def handle(self) -> None:
            names.append(threading.current_thread().name)
            self.wfile.write(self.rfile.readline().upper())

    class Mixed(stdlib_socketserver.ThreadingMixIn, ss.UnixStreamServer):
        pass

    server = Mixed(sock_path, Named)
    with serving(server):
        assert ask(sock_path) == b"HELLO\n" and ask(sock_path) == b"HELLO\n"
    assert all("process_request_thread" in n for n in names) and len(names) == 2
    assert server.stats()["closed"] == 2 and server.stats()["open"] == 0


class Report(ss.StreamRequestHandler):
    """Answers a request line with what this process is and holds: its pid,
    whether the parent's core fds are open here, then the line itself."""

    def handle(self) -> None:
        line = self.rfile.readline()
        core_fds = self.server.core_fds

        def is_open(fd: int) -> bool:
            try:
                os.fstat(fd)
                return True
            except OSError:
                return False

        report = {
            "pid": os.getpid(),
            "open": [fd for fd in core_fds if is_open(fd)],
            "line": line.decode(),
        }
        self.wfile.write(json.dumps(report).encode() + b"\n")


@forking
def test_forking_child_serves_its_request_and_accounting_holds(sock_path: str) -> None:
    class Forking(ss.ForkingUnixStreamServer):
        core_fds: ClassVar[list[int]] = []

        def get_request(self) -> tuple[Any, Any]:
            request, address = super().get_request()
            # The core's own fd of the connection (the request is a dup).
            self.core_fds = [*self.core_fds, request._conn.fileno()]
            return request, address

    server = Forking(sock_path, Report)
    loop = server._acceptor._loop
    # The core's own fds: listener, poller, wakeup pipe; plus the accepted
    # connection's fd is added per request below.
    server.core_fds = [loop.listen_fileno, loop.wakeup_fileno]
    with connect(sock_path) as c:
        wait_until(lambda: server.stats()["accepted"] == 1)
        server.handle_request()  # forks; the parent closes its copy at once
        assert server.stats()["closed"] == 1 and server.stats()["open"] == 0
        # the child still has the request
        c.sendall(b"served after the parent let go\n")
        answer = json.loads(c.makefile("rb").readline())
    assert answer["pid"] != os.getpid()
    assert answer["line"] == "served after the parent let go\n"
    assert answer["open"] == []  # nothing of the core's came along
    server.server_close()
    assert not server.active_children  # drained (block_on_close)
    assert server.stats() == {
        "accepted": 1,
        "rejected": 0,
        "closed": 1,
        "open": 0,
        "bytes_in": 0,
        "bytes_out": 0,
        "errors": 0,
        "denied": 0,
    }


@forking
def test_forking_server_serves_many(sock_path: str) -> None:
    server = ss.ForkingUnixStreamServer(sock_path, Upper)
    with serving(server):
        answers = [ask(sock_path, b"n%d\n" % i) for i in range(5)]
    assert answers == [b"N%d\n" % i for i in range(5)]
    assert not server.active_children
    assert server.stats()["accepted"] == server.stats()["closed"] == 5


def test_request_io_without_and_with_waiting(sock_path: str) -> None:
    """recv/sendall try first without waiting, keeping the GIL
    (unixsrv/_request.pxi); flags (MSG_WAITALL) go to the socket module's call,
    and a sendall larger than the socket buffer sends what fits at once and
    waits for the rest: the client gets every byte, in order, and every
    byte is counted."""
    size = 4 * 1024 * 1024
    big = bytes(range(256)) * (size // 256)

    class Mixed(ss.BaseRequestHandler):
        def handle(self) -> None:
            r = self.request
            first = r.recv(2, socket.MSG_WAITALL) + r.recv(3)
            r.sendall(bytearray(first))
            r.sendall(memoryview(big))

    server = ss.ThreadingUnixStreamServer(sock_path, Mixed)
    with serving(server), connect(sock_path) as c:
        c.sendall(b"hello")
        assert recv_until_eof(c) == b"hello" + big
    assert server.stats()["bytes_in"] == 5
    assert server.stats()["bytes_out"] == 5 + size


_TRACED_ECHO_TWICE = """
import sys
from unixsrv import socketserver as ss

class Twice(ss.BaseRequestHandler):
    def handle(self):
        for _ in range(2):
            self.request.sendall(self.request.recv(64))

server = ss.UnixStreamServer(sys.argv[1], Twice)
print("ready", flush=True)
server.handle_request()
server.server_close()
"""


@pytest.mark.linux("strace")
def test_a_recv_right_after_a_write_does_not_try_first(
    sock_path: str, sock_dir: str, run_traced: Any
) -> None:
    """In request/response traffic the next request comes only once the
    client has read the answer: a recv() right after a write waits at once
    (one recvfrom(2) without MSG_DONTWAIT) instead of first trying without
    waiting, which would find nothing."""
    trace = os.path.join(sock_dir, "trace")
    proc = run_traced(["-e", "trace=recvfrom,sendto", "-o", trace], _TRACED_ECHO_TWICE, sock_path)
    assert read_line(proc) == "ready"
    with connect(sock_path) as c:
        for msg in (b"first", b"second"):
            c.sendall(msg)
            assert c.recv(64) == msg
    assert finish(proc)[0] == 0
    with open(trace) as f:
        calls = [line for line in f if "sendto(" in line or "recvfrom(" in line]
    answered = next(i for i, line in enumerate(calls) if "sendto(" in line and '"first"' in line)
    second = [line for line in calls[answered + 1 :] if "recvfrom(" in line]
    assert second and '"second"' in second[0] and "MSG_DONTWAIT" not in second[0], calls
