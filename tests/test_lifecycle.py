"""Shutdown and lifecycle: close, graceful drain with a deadline, concurrent
and repeated stops, restarts, connection-state callbacks, stopping from a
handler, cancel, Ctrl-C, the wakeup fd and fork (docs/reliability-checklist.md,
sections F and G: items 37-43)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import stat
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import (
    DEADLINE,
    Timed,
    connect,
    connect_socket,
    connected,
    echo,
    echo_handler,
    echo_once,
    fd_identity,
    fd_snapshot,
    fork_quietly,
    is_listening,
    make_room,
    open_fds,
    opened_since,
    reap,
    recv_exactly,
    recv_until_eof,
    run_threads,
    serve_model,
    shutdown_times_out,
    start_echo,
    wait_until,
)
from unixsrv import ConnState, Server, ServerClosedError, ShutdownTimeoutError
from unixsrv._core import HAVE_ABSTRACT
from unixsrv.echo import EchoProtocol

# ---------------------------------------------------------------------------- helpers


def fd_targets() -> set[tuple[int, int, int]]:
    """fd_identity() of every fd open now."""
    out = set()
    for fd in open_fds():
        try:
            out.add(fd_identity(fd))
        except OSError:
            pass
    return out


def listener_target(before: dict[int, tuple[int, int, int] | None]) -> tuple[int, int, int]:
    """fd_identity() of the one listening socket opened since ``before``
    (an fd_snapshot)."""
    found = []
    for fd in opened_since(before):
        ident = fd_identity(fd)
        if stat.S_ISSOCK(ident[0]) and is_listening(fd):
            found.append(ident)
    assert len(found) == 1, found
    return found[0]


def start_shutdown(srv: Server, idle: socket.socket) -> Timed:
    """Start ``srv.shutdown()`` on a thread (returned, running); the idle
    client ``idle`` must get EOF at once (within 2 s)."""
    stopper = Timed(lambda: srv.shutdown(timeout=DEADLINE))
    stopper.start()
    t0 = time.monotonic()
    assert idle.recv(100) == b""
    assert time.monotonic() - t0 < 2.0
    return stopper


BIG = b"0123456789abcdef" * (1 << 18)  # 4 MiB: far more than the socket buffers hold


# ---------------------------------------------------------------------------- 37: close


def test_close_stops_accepting_at_once(
    model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 37 (benoitc/gunicorn#922): once close() returns, the path is
    gone, a new connect() fails at once with ENOENT (or ECONNREFUSED), the
    listening fd is closed and connected clients see EOF."""
    before = fd_snapshot()
    srv = start_echo(make_server, sock_path, model)
    listener = listener_target(before)
    with connect(sock_path) as client:
        echo(client, b"hello")  # its handler is now parked in read()
        t0 = time.monotonic()
        srv.close()
        assert time.monotonic() - t0 < 2.0  # docs/design.md close(): returns promptly
        assert not os.path.lexists(sock_path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(DEADLINE)
            t0 = time.monotonic()
            with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
                s.connect(sock_path)
            assert time.monotonic() - t0 < 1.0
        assert listener not in fd_targets()
        assert recv_until_eof(client) == b""
    assert not srv.is_running and srv.is_gone


# ---------------------------------------------------------------------------- 38: graceful drain


def test_shutdown_drains_blocking_handlers(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 38 (docs/design.md shutdown(timeout); python/cpython#104344): an idle
    client (its handler parked in read()) gets EOF at once, the socket file
    is gone at once, a client in the middle of a response gets all of it,
    and shutdown() returns only once that handler has finished."""
    in_middle, release = threading.Event(), threading.Event()

    def handler(conn: Any) -> None:
        data = conn.read()
        if data == b"slow":
            conn.write(b"part one, ")
            in_middle.set()
            release.wait(DEADLINE)
            conn.write(b"part two")
            return
        while data:
            conn.write(data)
            data = conn.read()

    srv = make_server(sock_path, handler)
    with connect(sock_path) as idle, connect(sock_path) as busy:
        echo(idle, b"idle one")
        busy.sendall(b"slow")
        assert recv_exactly(busy, 10) == b"part one, "
        assert in_middle.wait(DEADLINE)
        stopper = start_shutdown(srv, idle)
        assert not os.path.lexists(sock_path)
        assert stopper.is_alive()  # the busy handler is still working
        release.set()
        assert recv_until_eof(busy) == b"part two"
        stopper.join(DEADLINE)
    assert not stopper.is_alive() and stopper.exc is None
    assert not srv.is_running


def test_shutdown_flushes_event_model_output(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 38, event model (docs/design.md: stop reading, flush pending output,
    close): an idle client gets EOF at once; a client with 4 MiB of output
    still buffered on the server gets every byte before its EOF, and
    shutdown() returns once that output is flushed."""
    wrote = threading.Event()

    class Big(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            if data == b"big":
                self.transport.write(BIG)
                wrote.set()
            else:
                self.transport.write(data)

    srv = make_server(sock_path, protocol=Big)
    with connect(sock_path) as idle, connect(sock_path) as busy:
        echo(idle, b"idle one")
        busy.sendall(b"big")
        assert wrote.wait(DEADLINE)
        stopper = start_shutdown(srv, idle)
        assert stopper.is_alive()  # 4 MiB cannot have been flushed yet
        assert recv_until_eof(busy) == BIG
        stopper.join(DEADLINE)
    assert not stopper.is_alive() and stopper.exc is None
    assert not srv.is_running and not os.path.lexists(sock_path)


def test_shutdown_deadline_blocking(sock_path: str, make_server: Callable[..., Server]) -> None:
    """Checklist 38 (docs/design.md: force-close at the deadline, then
    ShutdownTimeoutError): a handler that never finishes makes shutdown(0.5)
    raise ShutdownTimeoutError after about 0.5 s; its client sees EOF, and
    the handler's later write raises ServerClosedError."""
    started, stuck = threading.Event(), threading.Event()
    late: list[BaseException] = []

    def handler(conn: Any) -> None:
        conn.read()
        started.set()
        stuck.wait(DEADLINE)  # ignores conn.done on purpose
        try:
            conn.write(b"too late")
        except BaseException as exc:
            late.append(exc)

    srv = make_server(sock_path, handler)
    with connect(sock_path) as client:
        client.sendall(b"go")
        assert started.wait(DEADLINE)
        elapsed = shutdown_times_out(srv, 0.5)
        assert 0.45 <= elapsed < 3.0, elapsed
        assert recv_until_eof(client) == b""
        assert not srv.is_running
        stuck.set()
        wait_until(lambda: late)
    assert isinstance(late[0], ServerClosedError)


def test_shutdown_deadline_event_model(sock_path: str, make_server: Callable[..., Server]) -> None:
    """Checklist 38, event model: a client that never reads its 4 MiB makes
    shutdown(0.5) raise ShutdownTimeoutError after about 0.5 s; the
    connection is aborted (the client gets a short read, then EOF) and
    connection_lost runs exactly once."""
    wrote = threading.Event()
    lost: list[Any] = []

    class Big(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(BIG)
            wrote.set()

        def connection_lost(self, exc: Any) -> None:
            lost.append(exc)

    srv = make_server(sock_path, protocol=Big)
    with connect(sock_path) as client:
        client.sendall(b"big")
        assert wrote.wait(DEADLINE)
        elapsed = shutdown_times_out(srv, 0.5)
        assert 0.45 <= elapsed < 3.0, elapsed
        got = recv_until_eof(client)
        assert len(got) < len(BIG) and BIG.startswith(got)
    assert not srv.is_running
    wait_until(lambda: lost)
    assert len(lost) == 1


def test_shutdown_with_idle_mid_response_and_non_reading_clients(
    model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 38, all three clients at once, both models: an idle client
    (its handler parked in read()), a client in the middle of a 4 MiB
    response that it keeps reading, and a client that asked for 4 MiB and
    never reads.  shutdown(timeout=1): the file is gone and the idle client
    has EOF before the non-reader is aborted (order), within 0.5 s of the
    call (the checklist's "at once"); the mid-response client gets every
    byte, then EOF; the non-reader is aborted no sooner than 0.9 s and no
    later than 2 s after the call (its handler's write fails with
    ServerClosedError / its connection_lost runs), gets a short read, then
    EOF; shutdown raises ShutdownTimeoutError after between 0.9 s (it
    waited) and 2 s (the checklist asks for 1.2 s; the slack is for a
    loaded 2-core machine)."""
    asked: list[float] = []
    aborted: list[tuple[Any, float]] = []

    def handler(conn: Any) -> None:
        data = conn.read()
        if data == b"big":
            asked.append(time.monotonic())
            try:
                conn.write(BIG)
            except ServerClosedError as exc:
                aborted.append((exc, time.monotonic()))
            return
        while data:
            conn.write(data)
            data = conn.read()

    class Proto(asyncio.Protocol):
        deaf = False

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            if data == b"big":
                self.deaf = len(asked) == 1  # the second to ask is the one that never reads
                asked.append(time.monotonic())
                self.transport.write(BIG)
            else:
                self.transport.write(data)

        def connection_lost(self, exc: Any) -> None:
            if self.deaf:
                aborted.append((exc, time.monotonic()))

    srv = serve_model(make_server, sock_path, model, handler, Proto)
    with connect(sock_path) as idle, connect(sock_path) as mid, connect(sock_path) as deaf:
        echo(idle, b"idle one")
        mid.sendall(b"big")
        head = recv_exactly(mid, 64 * 1024)  # mid-response: the first 64 KiB are here
        deaf.sendall(b"big")
        wait_until(lambda: len(asked) == 2)
        t0 = time.monotonic()
        stopper = Timed(lambda: srv.shutdown(timeout=1.0))
        stopper.start()
        assert idle.recv(100) == b""
        idle_eof = time.monotonic()
        assert not os.path.lexists(sock_path)
        assert recv_until_eof(mid) == BIG[len(head) :]
        stopper.join(DEADLINE)
        assert not stopper.is_alive() and isinstance(stopper.exc, ShutdownTimeoutError), stopper.exc
        assert 0.9 <= stopper.elapsed <= 2.0, stopper.elapsed
        got = recv_until_eof(deaf)
        assert len(got) < len(BIG) and BIG.startswith(got)
    wait_until(lambda: aborted)
    ((why, when),) = aborted  # blocking: the mid-response client's write was not aborted
    if model == "blocking":
        assert isinstance(why, ServerClosedError), why
    assert idle_eof - t0 < 0.5 and idle_eof < when
    assert 0.9 <= when - t0 <= 2.0, when - t0
    assert not srv.is_running and srv.open_connections == 0


# ---------------------------------------------------------------------------- 39: concurrent, repeated


@pytest.mark.parametrize("calls", ["close", "close and shutdown"])
def test_eight_threads_stop_at_once(
    calls: str, model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 39: 8 threads stopping the server at the same moment (all
    close(), or close() and shutdown() mixed) raise nothing; every call
    returns, the server is stopped, its file gone, its clients at EOF."""
    srv = start_echo(make_server, sock_path, model)
    with connected(sock_path, 3) as clients:
        for c in clients:
            echo(c, b"x")
        barrier = threading.Barrier(8)

        def stopper(i: int) -> Callable[[], None]:
            def run() -> None:
                barrier.wait(DEADLINE)
                if calls == "close" or i % 2 == 0:
                    srv.close()
                else:
                    srv.shutdown(timeout=DEADLINE)

            return run

        threads = [Timed(stopper(i)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
        assert [t.is_alive() for t in threads] == [False] * 8
        assert [t.exc for t in threads] == [None] * 8
        assert not srv.is_running and srv.wait(0)
        assert not os.path.lexists(sock_path)
        for c in clients:
            assert recv_until_eof(c) == b""


@pytest.mark.parametrize("how", ["close", "shutdown"])
def test_wait_returns_in_time_with_a_silent_client(
    how: str, model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 39 (python/cpython#104344: wait_closed() hung with an idle
    UNIX client): with a silent connected client (its handler parked in
    read()), ``wait(timeout=1)`` on a running server returns False after its
    timeout (no sooner, and by 2 s); then 8 threads at once call close() (or
    shutdown(timeout=1)) followed by wait(timeout=1): every call returns
    True by 1.5 s (the checklist's bound: stopping takes milliseconds), no
    error, and the client gets EOF."""
    srv = start_echo(make_server, sock_path, model)
    with connect(sock_path) as silent:
        echo(silent, b"then silence")
        t0 = time.monotonic()
        assert srv.wait(timeout=1) is False
        assert 1.0 <= time.monotonic() - t0 <= 2.0

        def stop_and_wait(_i: int) -> tuple[bool, float]:
            began = time.monotonic()
            if how == "close":
                srv.close()
            else:
                srv.shutdown(timeout=1)
            return srv.wait(timeout=1), time.monotonic() - began

        results = run_threads(stop_and_wait, 8)
        assert [r[0] if isinstance(r, tuple) else r for r in results] == [True] * 8
        assert max(r[1] for r in results) <= 1.5, results
        assert recv_until_eof(silent) == b""
    assert not srv.is_running and not os.path.lexists(sock_path)


def test_stop_calls_on_a_never_started_server_are_noops(
    sock_dir: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 39 (docs/design.md State): close()/shutdown() on a server that never
    started do nothing and raise nothing; nothing appears on disk."""
    srv = make_server(sock_path, echo_handler, start=False)
    srv.close()
    srv.shutdown()
    srv.shutdown(timeout=0)
    srv.close()
    assert srv.is_gone and not srv.is_running and srv.wait(0)
    assert os.listdir(sock_dir) == []


@pytest.mark.parametrize("first", ["close", "shutdown"])
def test_stop_is_idempotent(
    first: str, model: str, sock_dir: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 39: after a stop, more close()/shutdown() calls are no-ops."""
    srv = start_echo(make_server, sock_path, model)
    echo_once(sock_path, b"once")
    getattr(srv, first)()
    for _ in range(3):
        srv.close()
        srv.shutdown(timeout=0)
        srv.shutdown()
    assert not srv.is_running and os.listdir(sock_dir) == []


def test_restart_after_stop_on_the_same_path(
    model: str, sock_dir: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """docs/design.md State: a stopped Server can be started again on its path (after
    close() and after shutdown()); stats are cumulative; start() on a running
    server is a no-op."""
    srv = start_echo(make_server, sock_path, model)
    echo_once(sock_path, b"run one")
    srv.start()  # no-op
    srv.close()
    assert os.listdir(sock_dir) == []
    srv.start()
    echo_once(sock_path, b"run two")
    srv.shutdown(timeout=DEADLINE)
    assert os.listdir(sock_dir) == []
    srv.start()
    echo_once(sock_path, b"run three")
    assert srv.is_running
    wait_until(lambda: srv.stats()["closed"] == 3)
    assert srv.stats()["accepted"] == 3


# ---------------------------------------------------------------------------- 40: callbacks


#: Checklist 40's connection count.
N_CLIENTS = 1000


def test_conn_state_new_and_close_once_each_in_order(
    model: str, sock_dir: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 40 (docs/design.md ConnState: NEW before the handler, CLOSE after it
    returned and the connection is closed, exactly once each): 1,000
    clients, each bound to its own name (abstract on Linux, a file in the
    test's directory where there are no abstract names) so the server sees
    a distinct remote address, behave at random: close at once, close with
    unread data (a reset), round trip, half-close, abandon a large write
    (the server's echo meets a reset).  NEW and CLOSE each fire as often as
    stats() counts accepted connections, and per connection the events are
    exactly NEW, handler start, handler end, CLOSE."""
    events: list[tuple[str, Any]] = []

    def handler(conn: Any) -> None:
        remote = conn.remote_address
        events.append((remote, "start"))
        try:
            echo_handler(conn)
        finally:
            events.append((remote, "end"))

    class Proto(EchoProtocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.remote = transport.get_extra_info("peername")
            events.append((self.remote, "start"))

        def connection_lost(self, exc: Any) -> None:
            events.append((self.remote, "end"))

    srv = serve_model(make_server, sock_path, model, handler, Proto, start=False)
    locals_seen: set[str] = set()

    @srv.on_conn_state
    def state(local: str, remote: str, st: ConnState) -> None:
        locals_seen.add(local)
        events.append((remote, st))

    srv.start()
    rng = random.Random(40)
    prefix = "us-cs-" + os.urandom(4).hex()
    names = []
    for i in range(N_CLIENTS):
        name = f"{prefix}-{i}"
        if HAVE_ABSTRACT:
            names.append("@" + name)
            address: str | bytes = b"\0" + name.encode()
        else:
            address = os.path.join(sock_dir, f"c{i}")
            names.append(address)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(DEADLINE)
            s.bind(address)
            connect_socket(s, sock_path)
            kind = rng.randrange(5)
            if kind == 1:
                s.sendall(b"unread")
            elif kind == 2:
                echo(s, b"round trip")
            elif kind == 3:
                s.sendall(b"half")
                s.shutdown(socket.SHUT_WR)
                assert recv_until_eof(s) == b"half"
            elif kind == 4:
                make_room(s, 300_000)
                s.sendall(os.urandom(300_000))  # the echo will meet a reset
    wait_until(lambda: sum(1 for _, st in events if st is ConnState.CLOSE) >= N_CLIENTS)
    per_conn: dict[str, list[Any]] = {}
    for remote, what in list(events):
        per_conn.setdefault(remote, []).append(what)
    assert sorted(per_conn) == sorted(names)
    bad = {
        r: seq
        for r, seq in per_conn.items()
        if seq != [ConnState.NEW, "start", "end", ConnState.CLOSE]
    }
    assert bad == {}
    assert locals_seen == {sock_path}
    stats = srv.stats()
    states = [st for _, st in events if isinstance(st, ConnState)]
    assert (
        states.count(ConnState.NEW)
        == states.count(ConnState.CLOSE)
        == stats["accepted"]
        == N_CLIENTS
    )
    assert stats["closed"] == N_CLIENTS


@pytest.mark.parametrize(
    "which", ["on_conn_state", "on_server_info", "update_conn", "handler", "on_error"]
)
def test_raising_callback_does_not_stop_the_server(
    which: str, model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 40 (docs/design.md Callbacks: a raising callback never stops the
    server): a callback that raises is reported to on_error, one exception
    per call, and the server keeps serving; update_conn or a handler /
    protocol callback raising closes only that connection (EOF); on_error
    itself raising is logged and the server serves on."""
    reported: list[BaseException] = []
    failing = [True]

    def boom(*args: Any) -> None:
        if failing[0]:
            raise RuntimeError(f"boom from {which}")

    def handler(conn: Any) -> None:
        while data := conn.read():
            if data == b"raise":
                boom()
            conn.write(data)

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            if data == b"raise":
                boom()
            self.transport.write(data)

    update = {"update_conn": boom} if which == "update_conn" else {}
    srv = serve_model(make_server, sock_path, model, handler, Proto, start=False, **update)
    if which == "on_error":
        srv.on_conn_state(boom)
        srv.on_error(lambda exc: (reported.append(exc), boom()))
    else:
        srv.on_error(reported.append)
    if which == "on_conn_state":
        srv.on_conn_state(boom)
    if which == "on_server_info":
        srv.on_server_info(boom)
    srv.start()
    for i in range(5):
        with connect(sock_path) as s:
            if which == "update_conn":
                assert recv_until_eof(s) == b""
            elif which == "handler":
                s.sendall(b"raise")
                assert recv_until_eof(s) == b""
            else:
                echo(s, b"msg %d" % i)
    expected = {
        "on_conn_state": 10,
        "on_error": 10,
        "update_conn": 5,
        "handler": 5,
        "on_server_info": 1,
    }[which]
    wait_until(lambda: len(reported) >= expected and srv.stats()["open"] == 0)
    assert srv.is_running
    assert len(reported) == expected
    assert all(isinstance(e, RuntimeError) and str(e) == f"boom from {which}" for e in reported), (
        reported
    )
    failing[0] = False
    echo_once(sock_path, b"still serving")
    wait_until(lambda: srv.stats()["open"] == 0)
    assert len(reported) == expected


# ---------------------------------------------------------------------------- stopping from inside


@pytest.mark.parametrize("how", ["shutdown", "close"])
def test_stop_from_inside_a_handler(
    how: str, model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """docs/design.md shutdown(): called from a handler or protocol callback it
    starts the stop and returns at once (it never waits for its own
    caller); the server then stops and removes its file.  The same for
    close()."""
    took: list[float] = []
    srv_box: list[Server] = []

    def stop() -> None:
        t0 = time.monotonic()
        if how == "shutdown":
            srv_box[0].shutdown(timeout=DEADLINE)
        else:
            srv_box[0].close()
        took.append(time.monotonic() - t0)

    def handler(conn: Any) -> None:
        conn.read()
        stop()
        if how == "shutdown":
            conn.write(b"bye")

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            stop()
            if how == "shutdown":
                self.transport.write(b"bye")

    srv = serve_model(make_server, sock_path, model, handler, Proto)
    srv_box.append(srv)
    with connect(sock_path) as s:
        s.sendall(b"stop please")
        assert recv_until_eof(s) == (b"bye" if how == "shutdown" else b"")
    assert srv.wait(DEADLINE)
    # close() returns to the handler (which then records the time) after the
    # server has already stopped: wait for that record, do not race it.
    wait_until(lambda: took)
    assert len(took) == 1 and took[0] < 1.0
    assert not srv.is_running and not os.path.lexists(sock_path)


# ---------------------------------------------------------------------------- serve_forever


def test_serve_forever_returns_when_cancel_is_set(
    model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """golib Listen(ctx) / docs/design.md serve_forever(cancel): setting the event
    stops the server (like close()) and serve_forever returns None."""
    srv = start_echo(make_server, sock_path, model, start=False)
    cancel = threading.Event()
    result: list[Any] = []
    runner = Timed(lambda: result.append(srv.serve_forever(cancel=cancel)))
    runner.start()
    try:
        wait_until(lambda: os.path.exists(sock_path))
        echo_once(sock_path, b"serving forever")
    finally:
        cancel.set()
    runner.join(DEADLINE)
    assert not runner.is_alive() and runner.exc is None and result == [None]
    assert not srv.is_running and not os.path.lexists(sock_path)


@pytest.mark.parametrize("how", ["shutdown", "close"])
def test_serve_forever_returns_after_a_stop(
    how: str, model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """docs/design.md serve_forever: returns None after shutdown() or close() from
    another thread."""
    srv = start_echo(make_server, sock_path, model, start=False)
    runner = Timed(srv.serve_forever)
    runner.start()
    try:
        wait_until(lambda: os.path.exists(sock_path))
        echo_once(sock_path, b"x")
    finally:
        getattr(srv, how)()
    runner.join(DEADLINE)
    assert not runner.is_alive() and runner.exc is None
    assert not os.path.lexists(sock_path)


def test_serve_forever_with_cancel_already_set(
    sock_dir: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """A cancel that is already set: serve_forever returns at once and binds nothing."""
    srv = make_server(sock_path, echo_handler, start=False)
    cancel = threading.Event()
    cancel.set()
    assert srv.serve_forever(cancel=cancel) is None
    assert os.listdir(sock_dir) == [] and not srv.is_running


def test_serve_forever_restores_the_wakeup_fd(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 41: serve_forever on the main thread installs its own wakeup
    fd and puts the previous one back afterwards."""
    assert threading.current_thread() is threading.main_thread()
    r, w = os.pipe()
    os.set_blocking(w, False)
    old = signal.set_wakeup_fd(w)
    try:
        srv = make_server(sock_path, echo_handler, start=False)
        cancel = threading.Event()

        def canceller() -> None:
            try:
                wait_until(lambda: os.path.exists(sock_path))
                echo_once(sock_path, b"wake")
            finally:
                cancel.set()

        t = Timed(canceller)
        t.start()
        srv.serve_forever(cancel=cancel)
        t.join(DEADLINE)
        assert t.exc is None
        assert signal.set_wakeup_fd(w) == w
    finally:
        signal.set_wakeup_fd(old)
        os.close(r)
        os.close(w)


_CTRL_C = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from unixsrv import Server, ServerConfig
    from unixsrv.echo import EchoProtocol, echo_handler
    path, model, how = sys.argv[1:4]
    # A shell that starts us in the background leaves SIGINT ignored, and then
    # Python installs no KeyboardInterrupt handler: install it explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cfg = ServerConfig(path=path)
    srv = Server(cfg, echo_handler) if model == "blocking" else Server(cfg, protocol=EchoProtocol)

    def helper():
        sys.stdin.readline()
        if how == "helper thread":   # the signal lands on this thread, not the loop's
            sent = time.monotonic()
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            os.write(1, b"sent %r\\n" % sent)   # one write: the main thread prints too

    threading.Thread(target=helper, daemon=True).start()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:        # after serve_forever's cleanup
        os.write(1, b"interrupted %r\\n" % time.monotonic())
        raise
    print("serve_forever returned", flush=True)
    """
)


@pytest.mark.parametrize("how", ["os.kill", "helper thread"])
def test_ctrl_c_stops_cleanly_and_reraises(
    how: str, model: str, sock_path: str, spawn: Callable[..., Any]
) -> None:
    """Checklist 41 and 42 (docs/design.md: Ctrl-C cleans up, then re-raises
    KeyboardInterrupt; the wakeup fd makes Python handlers run promptly):
    SIGINT to the process, or pthread_kill'ed to a helper thread while the
    main thread waits in the loop, makes serve_forever clean up and raise
    KeyboardInterrupt within 0.5 s of the kill (the child's monotonic clock
    stamps both; the checklist's 100 ms is tightened only to 0.5 s, which a
    loaded 2-core machine cannot break, while a loop that waits for its
    next timeout instead of waking would take seconds); the process exits
    through KeyboardInterrupt (non-zero), the socket file is removed and no
    ResourceWarning is printed."""
    env = dict(os.environ, PYTHONWARNINGS="always::ResourceWarning")
    proc = spawn(_CTRL_C, sock_path, model, how, text=False, stdin=subprocess.PIPE, env=env)
    wait_until(lambda: os.path.exists(sock_path) or proc.poll() is not None)
    echo_once(sock_path, b"up")
    sent = time.monotonic()  # CLOCK_MONOTONIC: the child's clock too
    if how == "os.kill":
        os.kill(proc.pid, signal.SIGINT)
    else:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    code = proc.wait(DEADLINE)
    assert proc.stderr is not None and proc.stdout is not None
    err = proc.stderr.read().decode(errors="replace")
    out = proc.stdout.read().decode(errors="replace")
    stamps = dict(line.split() for line in out.splitlines())
    if how == "helper thread":
        sent = float(stamps["sent"])
    assert float(stamps["interrupted"]) - sent < 0.5, (stamps, sent)
    assert code != 0
    assert "KeyboardInterrupt" in err
    assert "serve_forever returned" not in out
    assert "ResourceWarning" not in err and "Exception ignored" not in err, err
    assert not os.path.lexists(sock_path)


# ---------------------------------------------------------------------------- 43: fork


def test_fork_while_serving(model: str, sock_path: str, make_server: Callable[..., Server]) -> None:
    """Checklist 43: in a child forked while the server runs, serve_forever()
    and start() raise RuntimeError (the Server belongs to the parent) and
    close() does nothing; the parent's server, including a connection
    opened before the fork, keeps serving: 100 more requests."""
    srv = start_echo(make_server, sock_path, model)
    early = connect(sock_path)
    try:
        echo(early, b"before fork")
        pid = fork_quietly()
        if pid == 0:  # child: fork-safe work only, then _exit
            code = 1
            try:
                try:
                    srv.serve_forever()
                except RuntimeError:
                    code = 2
                    try:
                        srv.start()
                    except RuntimeError:
                        code = 3
                        srv.close()
                        if not srv.is_running:
                            code = 0
            finally:
                os._exit(code)
        assert reap(pid) == 0
        assert srv.is_running and os.path.exists(sock_path)
        echo(early, b"after fork")
        for i in range(100):
            echo_once(sock_path, b"request %d" % i)
    finally:
        early.close()


# ---------------------------------------------------------------------------- update_conn and callbacks


class EchoUntilEof(asyncio.Protocol):
    """Event-model echo that records connection_lost."""

    lost: list[Any] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def connection_lost(self, exc: Any) -> None:
        EchoUntilEof.lost.append(exc)


@pytest.mark.parametrize("what", ["close", "keep", "setsockopt"])
def test_update_conn_cannot_take_the_connections_fd(
    what: str, model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """update_conn gets a socket of its own for the connection: closing it
    or keeping it beyond the call leaves the connection intact (it is served,
    counted, closed and announced exactly once, no fd is leaked), while an
    option set on it applies to the connection itself (it is the same open
    socket)."""
    kept: list[socket.socket] = []
    seen_sndbuf: list[int] = []
    errors: list[BaseException] = []

    def update_conn(sock: socket.socket) -> None:
        if what == "close":
            sock.close()
        elif what == "keep":
            kept.append(sock.dup())
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)

    def handler(conn: Any) -> None:
        s = socket.socket(fileno=os.dup(conn.fileno()))
        seen_sndbuf.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        s.close()
        echo_handler(conn)

    EchoUntilEof.lost = []
    srv = serve_model(
        make_server, sock_path, model, handler, EchoUntilEof, update_conn=update_conn, start=False
    )
    srv.on_error(errors.append)
    states: list[ConnState] = []
    srv.on_conn_state(lambda local, remote, st: states.append(st))
    before = len(open_fds())
    srv.start()
    for _ in range(3):
        with connect(sock_path) as s:
            echo(s, b"still mine")
    wait_until(lambda: srv.stats()["closed"] == 3)
    for k in kept:
        k.close()
    assert errors == []
    assert states.count(ConnState.NEW) == states.count(ConnState.CLOSE) == 3
    assert all(
        states[:k].count(ConnState.CLOSE) <= states[:k].count(ConnState.NEW) for k in range(7)
    )
    stats = srv.stats()
    assert (stats["accepted"], stats["closed"], stats["open"]) == (3, 3, 0)
    if model == "event":
        assert EchoUntilEof.lost == [None] * 3
    if what == "setsockopt" and model == "blocking":
        assert seen_sndbuf and all(v >= 65536 for v in seen_sndbuf)  # Linux doubles it (socket(7))
    srv.close()
    wait_until(lambda: len(open_fds()) <= before)


def test_close_is_announced_only_after_new(
    model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """NEW and CLOSE come in pairs: an on_conn_state registered while a
    connection is open sees neither for that connection, but both for the
    next one."""
    started, release = threading.Event(), threading.Event()

    def handler(conn: Any) -> None:
        started.set()
        release.wait(DEADLINE)
        echo_handler(conn)

    class Started(EchoProtocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            started.set()

    srv = serve_model(make_server, sock_path, model, handler, Started)
    events: list[tuple[int, ConnState]] = []
    with connect(sock_path) as first:
        # Past NEW's moment: the handler (protocol) of this connection runs.
        assert started.wait(DEADLINE)
        srv.on_conn_state(lambda local, remote, st: events.append((1, st)))
        release.set()
        echo(first, b"one")
    wait_until(lambda: srv.stats()["closed"] == 1)
    on_loop_idle(srv)
    assert events == []
    echo_once(sock_path, b"two")
    wait_until(lambda: len(events) == 2)
    assert events == [(1, ConnState.NEW), (1, ConnState.CLOSE)]


def on_loop_idle(srv: Server) -> None:
    """Return once the loop ran a full iteration after this call."""
    done = threading.Event()
    srv.call_soon_threadsafe(done.set)
    assert done.wait(DEADLINE)


def test_close_from_data_received_defers_connection_lost(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """docs/design.md: close() called from a protocol callback stops the server, but
    connection_lost() never runs inside another callback: it follows after
    data_received() returned."""
    log: list[str] = []
    srv_box: list[Server] = []

    class Stopper(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            log.append("data")
            srv_box[0].close()
            log.append("close returned")
            self.transport.write(b"late")  # closing: raises, the transport is closed
            log.append("not reached")

        def connection_lost(self, exc: Any) -> None:
            log.append("lost")

    srv = make_server(sock_path, protocol=Stopper)
    srv_box.append(srv)
    errors: list[BaseException] = []
    srv.on_error(errors.append)
    with connect(sock_path) as s:
        s.sendall(b"stop")
        assert recv_until_eof(s) == b""
    assert srv.wait(DEADLINE)
    assert log == ["data", "close returned", "lost"]
    assert len(errors) == 1 and isinstance(errors[0], ServerClosedError)


def test_system_exit_from_a_callback_during_teardown_is_raised(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """A callback raising KeyboardInterrupt stops serve_forever() with
    another connection still open; tearing down finalizes that transport,
    and its connection_lost() raises SystemExit.  That exception is not
    lost: serve_forever() raises it after the cleanup (with the interrupt as
    its context), as it would have during serving."""
    built: list[Any] = []

    class Stays(asyncio.Protocol):
        def connection_lost(self, exc: Any) -> None:
            raise SystemExit(3)

    class Interrupts(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            raise KeyboardInterrupt

    def factory() -> Any:
        built.append(Stays() if not built else Interrupts())
        return built[-1]

    srv = make_server(sock_path, protocol=factory, start=False)
    raised: list[BaseException] = []

    def serve() -> None:
        try:
            srv.serve_forever()
        except BaseException as exc:  # the test inspects it
            raised.append(exc)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    wait_until(lambda: os.path.exists(sock_path))
    with connect(sock_path), connect(sock_path) as second:
        wait_until(lambda: srv.open_connections == 2)
        second.sendall(b"stop")
        t.join(DEADLINE)
    assert not t.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], SystemExit) and raised[0].args == (3,)
    assert isinstance(raised[0].__context__, KeyboardInterrupt)
    assert not os.path.lexists(sock_path)
    assert srv.is_gone


def test_stats_snapshot_is_consistent_while_connections_churn(
    model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """stats() read from another thread while connections open and close
    always satisfies accepted == closed + open, with open >= 0."""
    srv = start_echo(make_server, sock_path, model)
    stop = threading.Event()
    bad: list[dict[str, int]] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            st = srv.stats()
            reads[0] += 1
            if st["accepted"] != st["closed"] + st["open"] or st["open"] < 0:
                bad.append(st)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        for _ in range(300):
            echo_once(sock_path, b"x")
    finally:
        stop.set()
        t.join(DEADLINE)
    assert reads[0] > 100
    assert bad == []


def test_conn_done_first_read_by_many_threads_while_the_server_closes(sock_path, make_server):
    """Connection.done is made on first use; several threads asking for it
    while the loop thread closes the connection all get the same Event, and
    it is set: the "store it / was it set" step is one (under the GIL, or a
    critical section without it, docs/free-threading.md)."""
    started, finished = threading.Event(), threading.Event()
    seen: list[Any] = []

    def handler(conn: Any) -> None:
        started.set()
        seen.extend(run_threads(lambda i: conn.done if conn.done.wait(DEADLINE) else None, 6))
        finished.set()

    srv = make_server(sock_path, handler)
    with connect(srv.path):
        assert started.wait(DEADLINE)
        srv.close()
        assert finished.wait(DEADLINE)
    assert len(seen) == 6 and seen[0] is not None
    assert all(ev is seen[0] for ev in seen)
