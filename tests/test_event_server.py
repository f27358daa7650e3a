"""The event model of Server: ``Server(config, protocol=factory)``.

Covers: an unmodified asyncio.Protocol works (and the same class works under
asyncio's own create_unix_server), the callback order per connection,
eof_received's return value and half-close, 1,000 concurrent clients,
exceptions in protocol callbacks and factories, the idle timeout,
max_connections, graceful shutdown, on_conn_state and update_conn.

Sources: docs/design.md "Event model", "Callbacks", "shutdown(timeout)", "stats()";
docs/golib-spec.md W7 (shutdown must drain), W10 (idle is per connection), W12 (a
failing handler must not leak its connection), W19 (NEW and CLOSE once each);
docs/reliability-checklist.md items 22 (max_connections), 25 (idle timeout), 29
(half-close), 31 (resets are normal), 38 (graceful drain with a deadline), 40
(lifecycle callbacks exactly once, in order, exceptions isolated).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from typing import Any

import pytest

from conftest import (
    DEADLINE,
    BigWriter,
    Collect,
    Echo,
    MiB,
    Recorder,
    Timed,
    connect,
    connected,
    echo,
    echo_once,
    idle_eof_after,
    keep_talking,
    on_loop,
    payload,
    recv_exactly,
    recv_until_eof,
    sha,
    shutdown_times_out,
    squash,
    wait_until,
)
from unixsrv import ConnState, IdleTimeoutError


class EchoRecorder(Recorder):
    """Recorder that echoes what it receives."""

    def data_received(self, data):
        super().data_received(data)
        self.transport.write(data)


# ---------------------------------------------------------------- plain asyncio


class UpperEchoProtocol(asyncio.Protocol):
    """Plain asyncio code (the asyncio docs' echo server, upper-casing):
    nothing here knows about unixsrv."""

    def connection_made(self, transport):
        self.transport = transport
        self.is_asyncio_transport = isinstance(transport, asyncio.Transport)
        UpperEchoProtocol.instances.append(self)

    def data_received(self, data):
        self.transport.write(data.upper())

    def eof_received(self):
        self.transport.write(b"<bye>")  # then the default: the transport closes

    instances: list[UpperEchoProtocol] = []


class EchoServerProtocol(asyncio.Protocol):
    """The asyncio docs' EchoServerProtocol verbatim (minus the prints):
    echo one message, then close."""

    def connection_made(self, transport):
        peername = transport.get_extra_info("peername")
        self.peername = peername
        self.transport = transport

    def data_received(self, data):
        message = data.decode()
        self.transport.write(message.encode())
        self.transport.close()


def upper_client(path: str) -> bytes:
    with connect(path) as s:
        s.sendall(b"hello ")
        assert recv_exactly(s, 6) == b"HELLO "
        s.sendall(b"world")
        s.shutdown(socket.SHUT_WR)
        return recv_until_eof(s)


def docs_client(path: str) -> bytes:
    with connect(path) as s:
        s.sendall(b"Hello World!")
        return recv_until_eof(s)


@pytest.mark.parametrize("runner", ["unixsrv", "asyncio"])
def test_unmodified_asyncio_protocol(runner, sock_path, make_server):
    """docs/design.md: "An existing asyncio.Protocol subclass must work unchanged".
    The same protocol classes give the same bytes under unixsrv and under
    asyncio's own create_unix_server (sanity: they really are asyncio code)."""
    UpperEchoProtocol.instances = []
    if runner == "unixsrv":
        srv = make_server(sock_path, protocol=UpperEchoProtocol)
        upper = upper_client(srv.path)
        srv.close()
        srv = make_server(sock_path, protocol=EchoServerProtocol)
        docs = docs_client(srv.path)
    else:

        async def main() -> tuple[bytes, bytes]:
            loop = asyncio.get_running_loop()
            results = []
            for i, (factory, client) in enumerate(
                ((UpperEchoProtocol, upper_client), (EchoServerProtocol, docs_client))
            ):
                path = f"{sock_path}.{i}"  # asyncio >= 3.13 removes its file on close, older ones keep it
                server = await loop.create_unix_server(factory, path)
                async with server:
                    results.append(await loop.run_in_executor(None, client, path))
            return results[0], results[1]

        upper, docs = asyncio.run(main())
    assert upper == b"WORLD<bye>"  # "HELLO " was read by the client already
    assert docs == b"Hello World!"
    assert [p.is_asyncio_transport for p in UpperEchoProtocol.instances] == [True]


# ---------------------------------------------------------------- callback order


def test_callback_order_and_thread(sock_path, make_server):
    """Per connection: connection_made -> data_received* -> eof_received ->
    connection_lost(None), the three bracketing callbacks exactly once, all on
    one thread (the loop thread, not the caller's); the data is intact."""
    factory = Collect(Recorder)
    srv = make_server(sock_path, protocol=factory)
    data = payload(300_000)
    for _ in range(3):
        with connect(srv.path) as s:
            for k in range(0, len(data), 50_000):
                s.sendall(data[k : k + 50_000])
            s.shutdown(socket.SHUT_WR)
            assert recv_until_eof(s) == b""
    wait_until(lambda: len(factory.built) == 3 and all(p.lost.is_set() for p in factory.built))
    threads = set()
    for proto in factory.built:
        assert squash(proto.names) == ["made", "data", "eof", "lost"]
        assert (
            proto.names.count("made") == proto.names.count("eof") == proto.names.count("lost") == 1
        )
        assert proto.received == data
        assert proto.lost_calls() == [None]
        threads |= proto.threads
    assert len(threads) == 1
    assert threads != {threading.get_ident()}


def test_client_close_without_data(sock_path, make_server):
    """A client that connects and closes: made -> eof -> lost(None)."""
    factory = Collect(Recorder)
    srv = make_server(sock_path, protocol=factory)
    connect(srv.path).close()
    proto = factory.one()
    assert proto.lost.wait(DEADLINE)
    assert proto.names == ["made", "eof", "lost"]
    assert proto.lost_calls() == [None]


def test_eof_received_true_keeps_the_transport_half_open(sock_path, make_server):
    """eof_received() returning True: the transport stays open after the
    client's SHUT_WR; the server can still write, the client receives it, and
    the connection ends when the server closes it."""
    factory = Collect(Recorder, keep_open=True)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        proto = factory.one()
        s.sendall(b"request")
        s.shutdown(socket.SHUT_WR)
        assert proto.eof.wait(DEADLINE)
        t = proto.transport
        assert on_loop(srv, t.is_closing) is False
        on_loop(srv, t.write, b"late reply")
        assert recv_exactly(s, 10) == b"late reply"
        assert not proto.lost.is_set()
        on_loop(srv, t.close)
        assert recv_until_eof(s) == b""
    assert proto.lost.wait(DEADLINE)
    assert squash(proto.names) == ["made", "data", "eof", "lost"]
    assert proto.received == b"request"
    assert proto.lost_calls() == [None]


@pytest.mark.parametrize("keep_open", [None, False])
def test_eof_received_falsy_closes(keep_open, sock_path, make_server):
    """eof_received() returning None/False: the transport closes itself
    (client sees EOF, connection_lost(None))."""
    factory = Collect(Recorder, keep_open=keep_open)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        s.sendall(b"x")
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b""
    proto = factory.one()
    assert proto.lost.wait(DEADLINE)
    assert proto.names == ["made", "data", "eof", "lost"]
    assert proto.lost_calls() == [None]


class RequestResponse(asyncio.Protocol):
    """Reads a request until EOF, answers with a large response, closes."""

    def connection_made(self, transport):
        self.transport = transport
        self.request = bytearray()

    def data_received(self, data):
        self.request += data

    def eof_received(self):
        digest = hashlib.sha256(self.request).digest()
        self.transport.write(digest * (2 * MiB // len(digest)))
        return None


def test_half_close_request_then_full_response(sock_path, make_server):
    """Checklist 29: the client sends a request then shutdown(SHUT_WR) ->
    eof_received, the full (2 MiB) response arrives, then EOF."""
    srv = make_server(sock_path, protocol=RequestResponse)
    request = payload(100_000, seed=9)
    with connect(srv.path) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        got = recv_until_eof(s)
    digest = hashlib.sha256(request).digest()
    assert got == digest * (2 * MiB // len(digest))


# ---------------------------------------------------------------- many clients


def test_thousand_concurrent_clients(sock_path, make_server):
    """1,000 clients connected at the same time each echo a unique message
    (every byte checked); afterwards accepted == closed == 1000, open == 0,
    and every protocol saw made and lost exactly once."""
    n = 1000
    factory = Collect(EchoRecorder)
    srv = make_server(sock_path, protocol=factory)
    messages = [
        f"<client {i}>".encode() + hashlib.sha256(str(i).encode()).hexdigest().encode() * 4
        for i in range(n)
    ]
    clients: list[socket.socket] = []
    try:
        for _ in range(n):
            clients.append(connect(srv.path))
        for s, msg in zip(clients, messages, strict=True):
            s.sendall(msg)
        for s, msg in zip(clients, messages, strict=True):
            assert recv_exactly(s, len(msg)) == msg
        assert srv.open_connections == n
    finally:
        for s in clients:
            s.close()
    wait_until(lambda: srv.stats()["closed"] == n)
    stats = srv.stats()
    assert stats["accepted"] == stats["closed"] == n
    assert stats["open"] == 0
    assert stats["rejected"] == 0
    assert stats["bytes_in"] == stats["bytes_out"] == sum(map(len, messages))
    assert len(factory.built) == n
    wait_until(lambda: all(p.lost.is_set() for p in factory.built))
    for proto in factory.built:
        assert proto.names.count("made") == proto.names.count("lost") == 1


# ---------------------------------------------------------------- failing callbacks


class Boom(Exception):
    pass


class Raiser(Recorder):
    """Raises `boom` from the named callback (after recording it)."""

    def __init__(self, where: str, boom: BaseException) -> None:
        super().__init__()
        self.where = where
        self.boom = boom

    def connection_made(self, transport):
        super().connection_made(transport)
        if self.where == "connection_made":
            raise self.boom

    def data_received(self, data):
        super().data_received(data)
        if self.where == "data_received":
            raise self.boom

    def eof_received(self):
        super().eof_received()
        if self.where == "eof_received":
            raise self.boom
        return True  # would keep the connection open if eof_received returned


class Switch:
    """Factory: the first protocol from `first`, the rest from `rest`."""

    def __init__(self, first, rest=Echo) -> None:
        self.first = first
        self.rest = rest
        self.calls = 0
        self.built: list[Any] = []

    def __call__(self):
        self.calls += 1
        proto = self.first() if self.calls == 1 else self.rest()
        self.built.append(proto)
        return proto


@pytest.mark.parametrize("where", ["connection_made", "data_received", "eof_received"])
def test_raising_protocol_callback(where, sock_path, make_server):
    """docs/design.md 'Event model' / checklist 40 / W12: a protocol callback that
    raises is reported to on_error with that exception, its connection is
    closed (client sees EOF), connection_lost is called exactly once (with
    the exception, as asyncio's fatal-error path does) and the server keeps
    serving other clients."""
    boom = Boom(where)
    errors: list[BaseException] = []
    factory = Switch(lambda: Raiser(where, boom))
    srv = make_server(sock_path, protocol=factory, start=False)
    srv.on_error(errors.append)
    srv.start()
    with connect(srv.path) as s:
        if where != "connection_made":
            s.sendall(b"ping")
        if where == "eof_received":
            s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b""
    proto = factory.built[0]
    assert proto.lost.wait(DEADLINE)
    wait_until(lambda: errors)
    assert errors == [boom]
    assert proto.lost_calls() == [boom]
    assert proto.names.count("lost") == 1
    echo_once(srv.path, b"still serving")
    on_loop(srv, lambda: None)
    assert proto.names.count("lost") == 1
    assert errors == [boom]
    assert srv.stats()["errors"] == 1


def test_raising_factory(sock_path, make_server):
    """A protocol factory that raises: reported to on_error, the client sees
    EOF, the server keeps serving (the next connection works)."""
    boom = Boom("factory")
    errors: list[BaseException] = []

    def bad_factory():
        raise boom

    factory = Switch(bad_factory)
    srv = make_server(sock_path, protocol=factory, start=False)
    srv.on_error(errors.append)
    srv.start()
    with connect(srv.path) as s:
        assert recv_until_eof(s) == b""
    wait_until(lambda: errors)
    assert errors == [boom]
    wait_until(lambda: srv.open_connections == 0)
    echo_once(srv.path, b"still serving")
    assert errors == [boom]


def test_raising_connection_lost_and_pause_writing_are_reported(sock_path, make_server):
    """Exceptions from connection_lost and pause_writing are reported too and
    never stop the server (checklist 40)."""
    errors: list[BaseException] = []
    lost_boom, pause_boom = Boom("lost"), Boom("pause")

    class Bad(BigWriter):
        def pause_writing(self):
            raise pause_boom

        def connection_lost(self, exc):
            super().connection_lost(exc)
            raise lost_boom

    factory = Switch(lambda: Bad(payload(1 * MiB), "close"))
    srv = make_server(sock_path, protocol=factory, start=False)
    srv.on_error(errors.append)
    srv.start()
    with connect(srv.path) as s:
        assert len(recv_until_eof(s)) == 1 * MiB
    wait_until(lambda: len(errors) == 2)
    assert errors == [pause_boom, lost_boom]
    echo_once(srv.path, b"still serving")


# ---------------------------------------------------------------- idle, limits


def test_idle_timeout_event_model(sock_path, make_server):
    """Checklist 25 / W10 / W18: an idle connection is closed after
    idle_timeout with connection_lost(IdleTimeoutError) and the client sees
    EOF, no sooner than the timeout after it started connecting, while an
    active connection (from the same process, same empty peer address,
    pinging every idle/10) survives three timeouts."""
    idle = 0.4
    factory = Collect(EchoRecorder)
    srv = make_server(sock_path, protocol=factory, idle_timeout=idle)
    t0 = time.monotonic()
    with connect(srv.path) as quiet, connect(srv.path) as busy:
        wait_until(lambda: len(factory.built) == 2 and all(p.made.is_set() for p in factory.built))
        watcher = Timed(lambda: idle_eof_after(quiet, t0, idle))
        watcher.start()
        _last, longest = keep_talking(busy, 3 * idle, idle / 10)
        assert longest < idle, f"the test client itself was silent for {longest:.3f} s"
        watcher.join(DEADLINE)
        assert not watcher.is_alive() and watcher.exc is None
        quiet_proto = factory.built[0]
        assert quiet_proto.lost.wait(DEADLINE)
        lost = quiet_proto.lost_calls()
        assert len(lost) == 1 and isinstance(lost[0], IdleTimeoutError)
        busy_proto = factory.built[1]
        assert not busy_proto.lost.is_set()
        echo(busy, b"alive")


def test_max_connections_event_model(sock_path, make_server):
    """Checklist 22 / docs/design.md stats(): over max_connections a client is
    accepted and closed at once (sees EOF), counted in `rejected`, no
    protocol is built for it, and the admitted clients keep working."""
    factory = Collect(EchoRecorder)
    srv = make_server(sock_path, protocol=factory, max_connections=2)
    with connect(srv.path) as a, connect(srv.path) as b:
        for s in (a, b):
            echo(s, b"in")
        with connect(srv.path) as extra:
            assert recv_until_eof(extra) == b""
        wait_until(lambda: srv.stats()["rejected"] == 1)
        assert len(factory.built) == 2
        for s in (a, b):
            echo(s, b"still")
        stats = srv.stats()
        assert stats["accepted"] == 2
        assert stats["rejected"] == 1


# ---------------------------------------------------------------- shutdown


def test_graceful_shutdown_flushes_pending_output(sock_path, make_server):
    """docs/design.md shutdown / W7 / checklist 38: shutdown() stops accepting, lets
    a large buffered response flush completely, closes each transport
    (connection_lost(None)), closes idle connections at once, and returns
    without ShutdownTimeoutError."""
    data = payload(4 * MiB, seed=5)
    factory = Switch(lambda: BigWriter(data))
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as reader, connect(srv.path) as idle:
        wait_until(lambda: len(factory.built) == 2)
        writer_proto = factory.built[0]
        assert writer_proto.made.wait(DEADLINE)
        assert writer_proto.buffered > 0
        result: list[Any] = []

        def stop() -> None:
            try:
                srv.shutdown(timeout=DEADLINE)
                result.append("ok")
            except BaseException as exc:
                result.append(exc)

        stopper = threading.Thread(target=stop)
        stopper.start()
        try:
            assert recv_until_eof(idle) == b""
            assert not os.path.exists(sock_path)
            assert not result, "shutdown returned before the output was flushed"
            assert sha(recv_until_eof(reader)) == sha(data)
        finally:
            stopper.join(DEADLINE)
    assert result == ["ok"]
    assert writer_proto.lost_calls() == [None]
    assert srv.is_gone
    assert srv.stats()["open"] == 0


def test_graceful_shutdown_aborts_a_non_reader_at_the_deadline(sock_path, make_server):
    """docs/design.md shutdown / checklist 38: a client that never reads while output
    is buffered is aborted at the deadline (shutdown(0.3) takes at least
    0.3 s and returns within 2 s), connection_lost is called once,
    ShutdownTimeoutError is raised, and the server is stopped."""
    data = payload(4 * MiB, seed=6)
    factory = Collect(BigWriter, data)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        proto = factory.one()
        assert proto.buffered > 0
        elapsed = shutdown_times_out(srv, 0.3)
        # It waited out its 0.3 s, then aborted and returned promptly (1.7 s
        # of slack for a loaded machine; a flush would need a reader).
        assert 0.3 <= elapsed < 2.0, elapsed
        assert proto.lost.wait(DEADLINE)
        assert proto.names == ["made", "lost"]
        got = recv_until_eof(s)
        assert len(got) < len(data)
    assert srv.is_gone
    assert srv.stats()["open"] == 0


def test_shutdown_from_a_protocol_callback(sock_path, make_server):
    """docs/design.md: shutdown() called from a protocol callback starts the shutdown
    and returns at once; the server then stops and the caller's connection
    is closed after its reply was flushed."""
    returned: list[str] = []

    class Stopper(Recorder):
        def data_received(self, data):
            super().data_received(data)
            self.transport.write(b"bye")
            srv.shutdown(timeout=DEADLINE)
            returned.append("returned")

    srv = make_server(sock_path, protocol=Collect(Stopper))
    with connect(srv.path) as s:
        s.sendall(b"stop")
        assert recv_until_eof(s) == b"bye"
    assert srv.wait(DEADLINE)
    assert returned == ["returned"]


# ---------------------------------------------------------------- state callbacks


def test_on_conn_state_brackets_the_protocol(sock_path, make_server):
    """docs/design.md 'Callbacks' / W19 / checklist 40: NEW and CLOSE fire exactly
    once per connection, NEW before connection_made, CLOSE after
    connection_lost, whether the client closes, the protocol closes, or a
    callback raises; addresses are the server path and ''."""
    log: list[Any] = []
    errors: list[BaseException] = []

    class Logged(Recorder):
        def _rec(self, name, arg=None):
            super()._rec(name, arg)
            log.append(name)

        def data_received(self, data):
            super().data_received(data)
            if data == b"close":
                self.transport.close()
            elif data == b"raise":
                raise Boom("data")

    srv = make_server(sock_path, protocol=Logged, start=False)
    srv.on_error(errors.append)
    srv.on_conn_state(lambda local, remote, state: log.append((local, remote, state)))
    srv.start()
    new = (srv.path, "", ConnState.NEW)
    close = (srv.path, "", ConnState.CLOSE)
    expected = {
        None: [new, "made", "eof", "lost", close],
        b"close": [new, "made", "data", "lost", close],
        b"raise": [new, "made", "data", "lost", close],
    }
    for msg, want in expected.items():
        log.clear()
        with connect(srv.path) as s:
            if msg is not None:
                s.sendall(msg)
                assert recv_until_eof(s) == b""
        wait_until(lambda: log and log[-1] == close)
        on_loop(srv, lambda: None)
        assert log == want, msg
    assert len(errors) == 1 and isinstance(errors[0], Boom)


def test_update_conn_runs_once_before_connection_made(sock_path, make_server):
    """docs/design.md 'Callbacks': update_conn(sock) gets a socket.socket for the
    accepted connection (getsockopt works) once per connection, after NEW and
    before the protocol is built; if it raises, that connection is closed
    (client sees EOF, no protocol), the error goes to on_error, CLOSE still
    fires, and the server keeps serving."""
    log: list[Any] = []
    errors: list[BaseException] = []
    boom = Boom("update_conn")

    calls = []

    def update_conn(sock):
        calls.append(sock)
        log.append(
            (
                "update",
                isinstance(sock, socket.socket)
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) > 0,
            )
        )
        if len(calls) == 2:
            raise boom

    class Logged(Echo):
        def __init__(self):
            log.append(("factory",))

        def connection_made(self, transport):
            super().connection_made(transport)
            log.append(("made",))

        def connection_lost(self, exc):
            log.append(("lost",))

    srv = make_server(sock_path, protocol=Logged, update_conn=update_conn, start=False)
    srv.on_error(errors.append)
    srv.on_conn_state(lambda local, remote, state: log.append((state,)))
    srv.start()
    ok = [
        (ConnState.NEW,),
        ("update", True),
        ("factory",),
        ("made",),
        ("lost",),
        (ConnState.CLOSE,),
    ]
    for k in range(3):
        log.clear()
        with connect(srv.path) as s:
            if k == 1:
                assert recv_until_eof(s) == b""
            else:
                echo(s, b"hi")
        wait_until(lambda: log and log[-1] == (ConnState.CLOSE,))
        on_loop(srv, lambda: None)
        if k == 1:
            assert log == [(ConnState.NEW,), ("update", True), (ConnState.CLOSE,)]
            assert errors == [boom]
        else:
            assert log == ok
    assert errors == [boom]
    assert len(calls) == 3
    assert srv.stats()["accepted"] == 3


def test_idle_timeout_counts_bytes_sent(sock_path, make_server):
    """docs/design.md 'Idle': idle means no byte received *or sent*; a connection the
    server keeps writing to every idle/10 for three timeouts (the client only
    reads) is not idle: never lost, not closing, then lost(None) when the
    client leaves."""
    idle = 0.4
    factory = Collect(Recorder)
    srv = make_server(sock_path, protocol=factory, idle_timeout=idle)
    with connect(srv.path) as s:
        proto = factory.one()
        start = last = time.monotonic()
        longest = 0.0
        # Time passes between writes (a behaviour about time, not a sync):
        # idle/10, so only a stalled test process could leave a gap of idle.
        while time.monotonic() - start < 3 * idle:
            srv.call_soon_threadsafe(proto.transport.write, b".")
            assert recv_exactly(s, 1) == b"."
            now = time.monotonic()
            longest, last = max(longest, now - last), now
            time.sleep(idle / 10)
        assert longest < idle, f"{longest:.3f} s between two bytes: the test itself stalled"
        assert not proto.lost.is_set()
        assert on_loop(srv, proto.transport.is_closing) is False
    assert proto.lost.wait(DEADLINE)
    assert proto.lost_calls() == [None]


# ---------------------------------------------------------------- disconnects


def test_peer_disconnect_with_pending_output_is_not_an_error(sock_path, make_server):
    """Checklist 31: clients that close with output pending (and some with
    unread data of their own) are a normal disconnect: connection_lost gets
    the BrokenPipeError/ConnectionResetError once, nothing goes to on_error,
    the errors counter stays 0 and the server keeps serving."""
    errors: list[BaseException] = []
    factory = Collect(BigWriter, payload(2 * MiB))
    srv = make_server(sock_path, protocol=factory, start=False)
    srv.on_error(errors.append)
    srv.start()
    n = 30
    for i in range(n):
        with connect(srv.path) as s:
            if i % 2:
                s.sendall(b"never read by the server")
            assert len(s.recv(100)) > 0
    wait_until(lambda: len(factory.built) == n and all(p.lost.is_set() for p in factory.built))
    for proto in factory.built:
        lost = proto.lost_calls()
        assert len(lost) == 1
        assert isinstance(lost[0], (BrokenPipeError, ConnectionResetError)), lost
    assert errors == []
    assert srv.stats()["errors"] == 0
    assert srv.stats()["closed"] == n


def test_server_close_loses_every_connection_once(sock_path, make_server):
    """close(): every open transport is closed now (clients see EOF, pending
    output dropped) and each protocol's connection_lost(None) runs once; the
    server stops."""
    factory = Switch(lambda: BigWriter(payload(4 * MiB)), Recorder)
    srv = make_server(sock_path, protocol=factory)
    with connected(srv.path, 5) as clients:
        wait_until(lambda: len(factory.built) == 5)
        on_loop(srv, lambda: None)
        srv.close()
        assert srv.wait(DEADLINE)
        for s in clients[1:]:
            assert recv_until_eof(s) == b""
        assert len(recv_until_eof(clients[0])) < 4 * MiB
    assert factory.built[0].buffered > 0
    for proto in factory.built:
        assert proto.lost.wait(DEADLINE)
        assert proto.lost_calls() == [None]
        assert proto.names == ["made", "lost"]
    assert srv.stats()["open"] == 0


def test_server_close_from_a_protocol_callback(sock_path, make_server):
    """docs/design.md: close() is safe from any thread, a protocol callback included:
    every connection is lost once and the server stops."""
    factory = Collect(EchoRecorder)

    class Closer(EchoRecorder):
        def data_received(self, data):
            super().data_received(data)
            if data == b"close the server":
                srv.close()

    factory.cls = Closer
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as other, connect(srv.path) as s:
        echo(other, b"hi")
        s.sendall(b"close the server")
        assert recv_until_eof(s) == b"close the server"  # written before close()
        assert recv_until_eof(other) == b""
    assert srv.wait(DEADLINE)
    for proto in factory.built:
        assert proto.lost.wait(DEADLINE)
        assert proto.lost_calls() == [None]


def test_raising_on_conn_state_does_not_stop_serving(sock_path, make_server):
    """Checklist 40: an on_conn_state callback that raises is reported (for
    NEW and for CLOSE) and the connection is still served."""
    errors: list[BaseException] = []

    def bad_state(local, remote, state):
        raise Boom(state)

    srv = make_server(sock_path, protocol=Echo, start=False)
    srv.on_error(errors.append)
    srv.on_conn_state(bad_state)
    srv.start()
    echo_once(srv.path, b"still serving")
    wait_until(lambda: len(errors) == 2)
    assert [e.args[0] for e in errors] == [ConnState.NEW, ConnState.CLOSE]
    echo_once(srv.path, b"still serving")
