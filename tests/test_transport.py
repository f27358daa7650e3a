"""unixsrv.Transport: the asyncio.Transport given to event-model protocols.

Covers the write side (write/writelines/write_eof, bytes-like types, writes
after close/abort/write_eof), close() vs abort(), both directions of flow
control (pause_writing/resume_writing at the water marks, pause_reading /
resume_reading), the write-buffer limits with asyncio's semantics, the hard
``max_write_buffer`` cap, get_extra_info and the rule that transports are only
used on the server's loop thread (``Server.call_soon_threadsafe`` from others).

Sources: docs/design.md "Event model" and "Public contract" (Transport follows
asyncio.Transport); docs/reliability-checklist.md items 27 (bound per-connection
output: water marks, hard cap) and 32 (partial writes, sha256 equal on both
ends); docs/golib-spec.md W16 (not every I/O condition is fatal: a full socket buffer
only pauses the writer).

Every protocol here is plain asyncio code; callbacks run on the loop thread,
so tests talk to a transport only through ``on_loop`` (call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from conftest import (
    DEADLINE,
    BigWriter,
    Collect,
    Echo,
    KiB,
    MiB,
    Recorder,
    connect,
    echo,
    make_room,
    on_loop,
    outcome,
    payload,
    process_cpu_over,
    recv_exactly,
    recv_until_eof,
    run_threads,
    sha,
    squash,
    wait_until,
)
from unixsrv import PeerCredentials, Server, ServerClosedError, Transport

# ---------------------------------------------------------------- type and basics


def test_transport_is_an_asyncio_transport(sock_path, make_server):
    """docs/design.md 'Event model': Transport subclasses asyncio.Transport, and the
    object passed to connection_made is one; get_protocol() is the protocol."""
    assert issubclass(Transport, asyncio.Transport)
    factory = Collect(Recorder)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path):
        proto = factory.one()
        t = proto.transport
        assert isinstance(t, asyncio.Transport)
        assert isinstance(t, Transport)
        assert t.can_write_eof() is True
        assert on_loop(srv, t.get_protocol) is proto
        assert on_loop(srv, t.is_closing) is False
        assert on_loop(srv, t.is_reading) is True
        assert on_loop(srv, t.get_write_buffer_size) == 0


# ---------------------------------------------------------------- write side


class Writer(asyncio.Protocol):
    """Writes every bytes-like type, then checks what must be refused."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self.made = threading.Event()
        self.lost = threading.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        r = self.results
        transport.write(b"a")
        transport.write(bytearray(b"b"))
        transport.write(memoryview(b"xcx")[1:2])  # a view with an offset
        transport.write(b"")  # a no-op
        transport.writelines([b"d", bytearray(b"e"), memoryview(b"f")])
        transport.writelines(iter([b"g", b"h"]))  # any iterable, like asyncio
        r["write_str"] = outcome(lambda: transport.write("str"), TypeError)
        r["writelines_str"] = outcome(lambda: transport.writelines(["str"]), TypeError)
        transport.close()
        r["write_after_close"] = outcome(lambda: transport.write(b"late"), ServerClosedError)
        r["writelines_after_close"] = outcome(
            lambda: transport.writelines([b"late"]), ServerClosedError
        )
        r["closing"] = transport.is_closing()
        self.made.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.results.setdefault("lost", []).append(exc)
        self.lost.set()


def test_write_accepts_bytes_like_and_rejects_str(sock_path, make_server):
    """write/writelines take bytes, bytearray and memoryview (asyncio's
    contract), str raises TypeError, writes after close() raise
    ServerClosedError ("writes after close rejected") and nothing written
    after close() reaches the client."""
    factory = Collect(Writer)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        assert recv_until_eof(s) == b"abcdefgh"
    proto = factory.one()
    assert proto.lost.wait(DEADLINE)
    assert proto.results == {
        "write_str": "TypeError",
        "writelines_str": "TypeError",
        "write_after_close": "ServerClosedError",
        "writelines_after_close": "ServerClosedError",
        "closing": True,
        "lost": [None],
    }


class EofWriter(Recorder):
    """Writes a large response, then write_eof(); keeps reading."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data
        self.after_eof: list[str] = []

    def on_made(self, transport: Any) -> None:
        transport.write(self.data)
        self.buffered = transport.get_write_buffer_size()
        transport.write_eof()
        transport.write_eof()  # idempotent, like asyncio
        self.after_eof.append(outcome(lambda: transport.write(b"x"), RuntimeError))
        self.closing_after_eof = transport.is_closing()


def test_write_eof_flushes_then_half_closes(sock_path, make_server):
    """write_eof() sends the buffered output, then shuts the write side: the
    client reads everything then EOF while the server keeps receiving;
    write() after write_eof() raises RuntimeError (asyncio's behaviour)."""
    data = payload(2 * MiB)
    factory = Collect(EofWriter, data)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        proto = factory.one()
        assert proto.buffered > 0, "2 MiB should not fit the socket buffer"
        assert recv_until_eof(s) == data
        assert proto.after_eof == ["RuntimeError"]
        assert proto.closing_after_eof is False
        s.sendall(b"still listening")
        wait_until(lambda: proto.received == b"still listening")
        assert not proto.lost.is_set()
        s.shutdown(socket.SHUT_WR)
        assert proto.lost.wait(DEADLINE)
    assert squash(proto.names) == ["made", "data", "eof", "lost"]
    assert proto.lost_calls() == [None]


def test_close_flushes_pending_output_then_connection_lost(sock_path, make_server):
    """close(): stop reading, flush what is buffered, then close and call
    connection_lost(None) once; is_closing() is True at once; writes after
    close() raise ServerClosedError.  The connection is not lost while output
    is still pending."""
    data = payload(4 * MiB)
    factory = Collect(BigWriter, data, "close")
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        proto = factory.one()
        assert proto.buffered > 0
        assert proto.closing is True
        assert proto.reading is False
        assert proto.after == ["ServerClosedError"]
        on_loop(srv, lambda: None)  # a full loop iteration with the client not reading
        assert not proto.lost.is_set(), "lost before the output was flushed"
        assert on_loop(srv, proto.transport.get_write_buffer_size) > 0
        assert sha(recv_until_eof(s)) == sha(data)
    assert proto.lost.wait(DEADLINE)
    assert proto.lost_calls() == [None]
    assert proto.names == ["made", "lost"]


def test_abort_discards_pending_output(sock_path, make_server):
    """abort(): close at once, buffered output discarded, connection_lost(None)
    once, writes afterwards raise ServerClosedError; the client sees EOF
    before the whole payload."""
    data = payload(4 * MiB)
    factory = Collect(BigWriter, data, "abort")
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        proto = factory.one()
        assert proto.buffered > 0
        assert proto.closing is True
        assert proto.after == ["ServerClosedError"]
        assert proto.lost.wait(DEADLINE)
        got = recv_until_eof(s)
        assert len(got) < len(data)
        assert got == data[: len(got)]
    assert proto.lost_calls() == [None]
    assert proto.names == ["made", "lost"]


class FlowRecorder(BigWriter):
    """BigWriter that sets the high-water mark first and records
    pause_writing/resume_writing."""

    def __init__(self, data: bytes, high: int, then: str | None = None) -> None:
        super().__init__(data, then)
        self.high = high
        self.flow: list[str] = []
        self.paused = threading.Event()
        self.resumed = threading.Event()

    def on_made(self, transport: Any) -> None:
        transport.set_write_buffer_limits(high=self.high)
        super().on_made(transport)

    def pause_writing(self) -> None:
        self.flow.append("pause")
        self.paused.set()

    def resume_writing(self) -> None:
        self.flow.append("resume")
        self.resumed.set()


def test_slow_reader_gets_8_mib_written_at_once(sock_path, make_server):
    """Checklist 32 (partial writes): 8 MiB handed to one write() reach a
    slow client intact (sha256 equal).  The client reads nothing until the
    server has called pause_writing() (the 8 MiB are buffered over the
    64 KiB high mark), then reads 4 KiB at a time and stops after each MiB
    to ask the loop for get_write_buffer_size(): while more than 2 MiB are
    still to come (far more than the socket buffers hold), output is
    buffered on the server and the buffer only shrinks.  Once all is read,
    resume_writing() has followed pause_writing() (once each) and the
    buffer is empty; the client's close ends it with connection_lost(None)."""
    data = payload(8 * MiB, seed=8)
    factory = Collect(FlowRecorder, data, 64 * KiB)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        proto = factory.one()
        assert proto.paused.wait(DEADLINE)
        assert proto.buffered > 64 * KiB
        h = hashlib.sha256()
        n = 0
        sizes = []
        while n < len(data):
            chunk = s.recv(min(4096, len(data) - n))
            assert chunk, f"EOF after {n} bytes"
            h.update(chunk)
            before, n = n, n + len(chunk)
            if n // MiB != before // MiB and len(data) - n > 2 * MiB:
                sizes.append(on_loop(srv, proto.transport.get_write_buffer_size))
        assert h.hexdigest() == sha(data)
        assert len(sizes) == 5 and all(size > 0 for size in sizes), sizes
        assert sizes == sorted(sizes, reverse=True), sizes
        assert proto.resumed.wait(DEADLINE)
        assert proto.flow == ["pause", "resume"]
        assert on_loop(srv, proto.transport.get_write_buffer_size) == 0
    assert proto.lost.wait(DEADLINE)
    assert proto.lost_calls() == [None]
    wait_until(lambda: srv.stats()["bytes_out"] >= len(data))


# ---------------------------------------------------------------- buffer limits


def test_write_buffer_limits_follow_asyncio(sock_path, make_server):
    """set_write_buffer_limits/get_write_buffer_limits use asyncio's rules:
    high defaults to 64 KiB (or 4 * low), low to high // 4, and
    ``high >= low >= 0`` else ValueError; get returns (low, high).  The
    initial limits come from the config's water marks."""
    factory = Collect(Recorder)
    srv = make_server(sock_path, protocol=factory, write_buffer_high=1000, write_buffer_low=100)
    with connect(srv.path):
        t = factory.one().transport

        def apply(high: Any = None, low: Any = None) -> tuple[int, int]:
            t.set_write_buffer_limits(high=high, low=low)
            return t.get_write_buffer_limits()

        assert on_loop(srv, t.get_write_buffer_limits) == (100, 1000)
        assert on_loop(srv, apply) == (16 * KiB, 64 * KiB)
        assert on_loop(srv, apply, 4000) == (1000, 4000)
        assert on_loop(srv, apply, None, 100) == (100, 400)
        assert on_loop(srv, apply, 0) == (0, 0)
        assert on_loop(srv, apply, 5000, 5000) == (5000, 5000)
        for high, low in ((10, 20), (-1, None), (None, -4)):
            with pytest.raises(ValueError):
                on_loop(srv, apply, high, low)
        assert on_loop(srv, t.get_write_buffer_limits) == (5000, 5000), (
            "a rejected call changed the limits"
        )


def test_write_buffer_limits_default_from_config(sock_path, make_server):
    """Default config: high 64 KiB, low high // 4."""
    factory = Collect(Recorder)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path):
        t = factory.one().transport
        assert on_loop(srv, t.get_write_buffer_limits) == (16 * KiB, 64 * KiB)


def test_lowering_the_high_mark_pauses_and_draining_resumes(sock_path, make_server):
    """asyncio: set_write_buffer_limits() re-checks the buffer at once, so a
    buffer above the new high mark calls pause_writing(); when the client
    drains it to the low mark resume_writing() follows, once each.
    get_write_buffer_size() reports the unsent bytes (0 when all is sent)."""
    data = payload(1 * MiB)
    factory = Collect(FlowRecorder, data, 8 * MiB)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        proto = factory.one()
        t = proto.transport
        assert 0 < proto.buffered <= len(data)
        assert proto.flow == [], "paused below an 8 MiB high mark"
        assert on_loop(srv, t.get_write_buffer_size) == proto.buffered  # the client reads nothing
        on_loop(srv, t.set_write_buffer_limits, 1000)
        assert proto.flow == ["pause"]
        assert on_loop(srv, t.get_write_buffer_limits) == (250, 1000)
        assert recv_exactly(s, len(data)) == data
        assert proto.resumed.wait(DEADLINE)
        assert on_loop(srv, t.get_write_buffer_size) == 0
        assert proto.flow == ["pause", "resume"]


# ---------------------------------------------------------------- flow control


class Firehose(asyncio.Protocol):
    """Writes `data` in CHUNK pieces, stopping at pause_writing() and going on
    at resume_writing() (the asyncio flow-control pattern)."""

    CHUNK = 64 * KiB

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.off = 0
        self.is_paused = False
        self.flow: list[str] = []
        self.max_buffered = 0
        self.made = threading.Event()
        self.paused = threading.Event()
        self.lost = threading.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.limits = transport.get_write_buffer_limits()
        self.pump()
        self.made.set()

    def pump(self) -> None:
        t = self.transport
        while not self.is_paused and self.off < len(self.data):
            t.write(self.data[self.off : self.off + self.CHUNK])
            self.off += self.CHUNK
            self.max_buffered = max(self.max_buffered, t.get_write_buffer_size())

    def pause_writing(self) -> None:
        self.flow.append("pause")
        self.is_paused = True
        self.paused.set()

    def resume_writing(self) -> None:
        self.flow.append("resume")
        self.is_paused = False
        self.pump()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost_exc = exc
        self.lost.set()


def test_pause_writing_bounds_memory_and_resume_delivers_all(sock_path, make_server):
    """Checklist 27 / docs/design.md 'Event model': a client that does not read makes
    the transport call pause_writing(); a protocol that honours it keeps the
    buffer at most high mark + one chunk; once the client reads,
    resume_writing() follows, pause/resume alternate, and every byte arrives
    intact and in order."""
    data = payload(4 * MiB, seed=4)
    factory = Collect(Firehose, data)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        proto = factory.one()
        assert proto.paused.wait(DEADLINE)
        _low, high = proto.limits
        state = on_loop(
            srv, lambda: (proto.off, proto.transport.get_write_buffer_size(), list(proto.flow))
        )
        off, buffered, flow = state
        assert flow == ["pause"]
        assert off < len(data), "the protocol was never told to stop"
        assert high < buffered <= high + Firehose.CHUNK
        assert recv_exactly(s, len(data)) == data
        wait_until(
            lambda: on_loop(
                srv,
                lambda: proto.transport.get_write_buffer_size() == 0 and len(proto.flow) % 2 == 0,
            )
        )
        flow = list(proto.flow)
        assert len(flow) >= 2
        assert flow == ["pause", "resume"] * (len(flow) // 2), "pause/resume must alternate"
        assert proto.max_buffered <= high + Firehose.CHUNK
    assert proto.lost.wait(DEADLINE)
    assert proto.lost_exc is None


class PausedReader(asyncio.Protocol):
    """Pauses reading as soon as it is connected; on EOF answers with the
    sha256 of everything it received and closes."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.made = threading.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.pause_reading()
        transport.pause_reading()  # idempotent
        self.reading_after_pause = transport.is_reading()
        self.made.set()

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def eof_received(self) -> None:
        self.transport.write(sha(b"".join(self.chunks)).encode())


def test_pause_reading_stops_data_received_until_resumed(sock_path, make_server):
    """pause_reading(): no data_received while paused even when the client
    has filled the socket buffers (its non-blocking send would block);
    is_reading() reflects it; resume_reading() delivers the rest, intact and
    in order."""
    data = payload(8 * MiB, seed=2)
    factory = Collect(PausedReader)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        proto = factory.one()
        t = proto.transport
        assert proto.reading_after_pause is False
        s.setblocking(False)
        sent = 0
        while True:
            try:
                sent += s.send(data[sent : sent + 64 * KiB])
            except BlockingIOError:
                break
            assert sent < len(data), "the client never blocked: the server kept reading"
        s.settimeout(DEADLINE)
        # Two loop iterations after the data was queued: a reading transport
        # would have delivered some of it by now.
        on_loop(srv, lambda: None)
        assert on_loop(srv, lambda: (len(proto.chunks), t.is_reading())) == (0, False)
        on_loop(srv, t.resume_reading)
        on_loop(srv, t.resume_reading)  # idempotent
        assert on_loop(srv, t.is_reading) is True
        s.sendall(data[sent:])
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == sha(data).encode()
    assert b"".join(proto.chunks) == data


class PauseEachChunk(asyncio.Protocol):
    """Pauses reading after every chunk; the test resumes it each time."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.pause = True
        self.made = threading.Event()
        self.eof = threading.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.made.set()

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.pause:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof.set()
        return True


def test_pause_reading_inside_data_received(sock_path, make_server):
    """pause_reading() called from data_received stops delivery after that
    chunk; each resume_reading() lets exactly the next chunk through."""
    data = payload(1 * MiB, seed=3)
    factory = Collect(PauseEachChunk)
    srv = make_server(sock_path, protocol=factory, read_buffer_size=4096)
    with connect(srv.path) as s:
        proto = factory.one()
        make_room(s, 64 * KiB)  # sent while the server reads only 4 KiB per resume
        s.sendall(data[: 64 * KiB])
        wait_until(lambda: proto.chunks)
        for _ in range(3):
            count = len(proto.chunks)
            on_loop(srv, lambda: None)
            assert on_loop(srv, lambda: len(proto.chunks)) == count, "data delivered while paused"
            on_loop(srv, proto.transport.resume_reading)
            wait_until(lambda count=count: len(proto.chunks) == count + 1)

        # Let everything else through.
        def resume_all() -> None:
            proto.pause = False
            proto.transport.resume_reading()

        on_loop(srv, resume_all)
        s.sendall(data[64 * KiB :])
        s.shutdown(socket.SHUT_WR)
        assert proto.eof.wait(DEADLINE)
    assert b"".join(proto.chunks) == data


class Hog(asyncio.Protocol):
    """Ignores pause_writing() and keeps writing to a client that never reads."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.written = 0
        self.pauses = 0
        self.lost_calls: list[Any] = []
        self.made = threading.Event()
        self.lost = threading.Event()

    def connection_made(self, transport: Any) -> None:
        chunk = bytes(64 * KiB)
        while self.written < self.total and not transport.is_closing():
            transport.write(chunk)
            self.written += len(chunk)
        self.write_after = outcome(lambda: transport.write(chunk), ServerClosedError)
        self.made.set()

    def pause_writing(self) -> None:
        self.pauses += 1  # ignored on purpose

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost_calls.append(exc)
        self.lost.set()


def test_max_write_buffer_aborts_a_protocol_that_ignores_pause(sock_path, make_server):
    """Checklist 27 (hard cap): with max_write_buffer = 1 MiB, a protocol that
    ignores pause_writing() and writes 8 MiB to a client that never reads gets
    its connection aborted with connection_lost(BufferError); the client sees
    EOF and the server keeps serving."""
    factory = Collect(Hog, 8 * MiB)
    srv = make_server(sock_path, protocol=factory, max_write_buffer=1 * MiB)
    with connect(srv.path) as s:
        proto = factory.one()
        assert proto.lost.wait(DEADLINE)
        assert len(proto.lost_calls) == 1
        assert isinstance(proto.lost_calls[0], BufferError)
        assert proto.pauses == 1
        assert proto.written < 8 * MiB
        assert proto.write_after == "ServerClosedError"
        got = recv_until_eof(s)
        assert len(got) < 2 * MiB
    wait_until(lambda: srv.open_connections == 0)
    assert srv.is_running


# ---------------------------------------------------------------- extra info


class InfoProbe(Echo):
    """Collects get_extra_info() in connection_made and connection_lost."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.made = threading.Event()
        self.lost = threading.Event()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        info = self.info
        for key in ("peername", "sockname", "peercred"):
            info[key] = transport.get_extra_info(key)
        sock = transport.get_extra_info("socket")
        info["socket_fileno_ok"] = sock.fileno() >= 0
        info["socket_family"] = sock.family
        info["sndbuf"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        info["unknown"] = transport.get_extra_info("no-such-key")
        info["unknown_default"] = transport.get_extra_info("no-such-key", 42)
        self.made.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        t = self.transport
        self.info["lost"] = {
            key: t.get_extra_info(key, "dflt") for key in ("peername", "sockname", "peercred")
        }
        self.info["lost_socket"] = t.get_extra_info("socket", "dflt")
        self.lost.set()


def test_get_extra_info(sock_path, make_server):
    """get_extra_info: 'peername' ('' for an unbound client), 'sockname' (the
    server path), 'peercred' (PeerCredentials of this process), 'socket' (a
    socket object supporting getsockopt that we must not close; the transport
    keeps working after it was handed out); unknown keys give the default."""
    factory = Collect(InfoProbe)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        proto = factory.one()
        echo(s, b"still works")
    info = proto.info
    assert info["peername"] == ""
    assert info["sockname"] == srv.path
    assert info["peercred"] == PeerCredentials(os.getpid(), os.getuid(), os.getgid())
    assert info["socket_fileno_ok"] is True
    assert info["socket_family"] == socket.AF_UNIX
    assert info["sndbuf"] > 0
    assert info["unknown"] is None
    assert info["unknown_default"] == 42
    assert proto.lost.wait(DEADLINE)


def test_get_extra_info_named_client(sock_path, sock_dir, make_server):
    """A client that bound its own path shows up as 'peername'."""
    factory = Collect(InfoProbe)
    srv = make_server(sock_path, protocol=factory)
    client_path = os.path.join(sock_dir, "c.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(DEADLINE)
        s.bind(client_path)
        s.connect(srv.path)
        proto = factory.one()
    assert proto.info["peername"] == client_path


def test_get_extra_info_in_connection_lost(sock_path, make_server):
    """asyncio fills peername/sockname/peercred when the transport is made,
    so a protocol may read them in connection_lost (e.g. to log who left);
    the 'socket' is gone by then (default)."""

    class LateProbe(Recorder):
        def connection_lost(self, exc: BaseException | None) -> None:
            t = self.transport
            self.late = {
                key: t.get_extra_info(key, "dflt")
                for key in ("peername", "sockname", "peercred", "socket")
            }
            super().connection_lost(exc)

    factory = Collect(LateProbe)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path):
        proto = factory.one()
    assert proto.lost.wait(DEADLINE)
    assert proto.late == {
        "peername": "",
        "sockname": srv.path,
        "peercred": PeerCredentials(os.getpid(), os.getuid(), os.getgid()),
        "socket": "dflt",
    }


# ---------------------------------------------------------------- threads


def test_transport_methods_off_the_loop_thread_raise(sock_path, make_server):
    """docs/design.md 'Event model': transports belong to the loop thread.  Calling
    write/writelines/write_eof/close/abort/pause_reading/resume_reading from
    another thread raises RuntimeError and leaves the connection untouched;
    Server.call_soon_threadsafe(fn, *args) runs fn(*args) on the loop thread,
    where transport.write works."""
    factory = Collect(Recorder)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        proto = factory.one()
        t = proto.transport
        calls: list[tuple[str, tuple[Any, ...]]] = [
            ("write", (b"x",)),
            ("writelines", ([b"x"],)),
            ("write_eof", ()),
            ("pause_reading", ()),
            ("resume_reading", ()),
            ("close", ()),
            ("abort", ()),
        ]
        for name, args in calls:
            with pytest.raises(RuntimeError):
                getattr(t, name)(*args)
        assert on_loop(srv, lambda: (t.is_closing(), t.is_reading())) == (False, True)
        seen: list[tuple[int, Any, Any]] = []
        srv.call_soon_threadsafe(lambda a, b: seen.append((threading.get_ident(), a, b)), 1, "two")
        srv.call_soon_threadsafe(t.write, b"from the loop thread")
        assert recv_exactly(s, 20) == b"from the loop thread"
        wait_until(lambda: seen)
        assert seen == [(next(iter(proto.threads)), 1, "two")]
        assert proto.threads != {threading.get_ident()}
        s.sendall(b"ping")
        wait_until(lambda: proto.received == b"ping")
    assert proto.lost.wait(DEADLINE)
    assert len(proto.threads) == 1


def test_set_write_buffer_limits_off_the_loop_thread_raises(sock_path, make_server):
    """set_write_buffer_limits() may call pause_writing()/resume_writing()
    and changes marks the loop reads, so like the other mutating Transport
    methods it must raise RuntimeError off the loop thread (docs/design.md: "all
    methods must be called on the server's loop thread"; callbacks run on the
    loop thread only)."""
    factory = Collect(Recorder)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path):
        t = factory.one().transport
        with pytest.raises(RuntimeError):
            t.set_write_buffer_limits(high=1000)
        assert on_loop(srv, t.get_write_buffer_limits) == (16 * KiB, 64 * KiB)


def test_call_soon_threadsafe_on_a_stopped_server_raises(sock_path, make_server):
    """call_soon_threadsafe needs a running loop: ServerClosedError otherwise."""
    srv = make_server(sock_path, protocol=Echo, start=False)
    with pytest.raises(ServerClosedError):
        srv.call_soon_threadsafe(lambda: None)
    srv.start()
    on_loop(srv, lambda: None)
    srv.close()
    assert srv.wait(DEADLINE)
    with pytest.raises(ServerClosedError):
        srv.call_soon_threadsafe(lambda: None)


# ---------------------------------------------------------------- a peer that went away


class PausedAtOnce(Recorder):
    """Pauses reading as soon as it is connected."""

    def on_made(self, transport: Any) -> None:
        transport.pause_reading()


def test_paused_transport_whose_peer_left_does_not_spin(sock_path, make_server):
    """A paused transport whose client hung up costs no CPU: epoll reports
    EPOLLHUP even for an fd registered with no events (epoll_ctl(2)), so a
    socket that is neither read nor written must not stay registered.  On
    resume_reading() the EOF is delivered."""
    factory = Collect(PausedAtOnce)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path):
        proto = factory.one()
    # The client is gone; the transport is still paused.
    used = process_cpu_over(0.5)
    assert used < 0.15, f"the loop burned {used:.2f} s of CPU in 0.5 s on a hung-up, paused socket"
    assert proto.names == ["made"]
    on_loop(srv, proto.transport.resume_reading)
    assert proto.lost.wait(DEADLINE)
    assert squash(proto.names) == ["made", "eof", "lost"]


class HalfCloseAnswer(Recorder):
    """On the client's EOF: keep the transport open, answer, then write_eof."""

    def __init__(self) -> None:
        super().__init__(keep_open=True)

    def eof_received(self) -> Any:
        keep = super().eof_received()
        self.transport.write(b"answer")
        self.transport.write_eof()
        return keep


def test_both_directions_shut_but_open_does_not_spin(sock_path, make_server):
    """The client sends a request and shuts its write side; eof_received()
    keeps the transport open, the protocol answers and calls write_eof().
    Both directions are now shut and the transport stays open until the
    protocol closes it, without costing CPU meanwhile (asyncio's transports
    idle in this state too)."""
    factory = Collect(HalfCloseAnswer)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        proto = factory.one()
        s.sendall(b"request")
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b"answer"
        used = process_cpu_over(0.5)
        assert used < 0.15, f"the loop burned {used:.2f} s of CPU in 0.5 s on a fully shut socket"
        assert not proto.lost.is_set()
    on_loop(srv, proto.transport.close)
    assert proto.lost.wait(DEADLINE)
    assert proto.lost_calls() == [None]


# ---------------------------------------------------------------- pause_reading within one wakeup


class Pauser(Recorder):
    """On its first data, pauses reading on the transport of `victim`."""

    def __init__(self, victim: list[Any]) -> None:
        super().__init__()
        self.victim = victim

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.victim[0].transport.pause_reading()


class Watched(Recorder):
    """Records whether its transport was reading whenever data arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.reading_at_delivery: list[bool] = []

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.reading_at_delivery.append(self.transport.is_reading())


def test_pause_reading_holds_data_already_received_in_the_same_wakeup(sock_path, make_server):
    """The loop receives every readable connection before it dispatches; a
    pause_reading() that one connection's callback calls on another must
    still hold back that other connection's data already received in the
    same wakeup, deliver it on resume_reading(), in order, then the rest."""
    victim: list[Any] = []
    built: list[Any] = []

    def factory() -> Any:
        proto = Watched() if not built else Pauser(victim)
        if not built:
            victim.append(proto)
        built.append(proto)
        return proto

    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as b, connect(srv.path) as a:
        wait_until(lambda: len(built) == 2 and all(p.made.is_set() for p in built))
        watched, pauser = built
        # Hold the loop in a callback so both sends land in one wakeup, A's
        # first (epoll reports ready sockets in the order they became ready).
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            held.set()
            release.wait(DEADLINE)

        srv.call_soon_threadsafe(hold)
        assert held.wait(DEADLINE)
        a.sendall(b"pause B")
        b.sendall(b"first")
        release.set()
        wait_until(lambda: pauser.received == b"pause B")
        on_loop(srv, lambda: None)
        assert watched.received == b"", "data was delivered to a paused transport"
        assert on_loop(srv, watched.transport.is_reading) is False
        b.sendall(b", second")  # arrives while paused: stays in the kernel
        on_loop(srv, watched.transport.resume_reading)
        wait_until(lambda: watched.received == b"first, second")
    assert watched.reading_at_delivery and all(watched.reading_at_delivery)


# ---------------------------------------------------------------- flow control while closing


class _FlowCloser(BigWriter):
    """Writes ``data``, then close(); records pause/resume_writing."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data, "close")
        self.flow: list[str] = []
        self.resumed = threading.Event()

    def pause_writing(self) -> None:
        self.flow.append("pause")

    def resume_writing(self) -> None:
        self.flow.append("resume")
        self.resumed.set()


def test_resume_writing_is_called_while_a_closing_transport_drains(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """docs/design.md "Transport follows asyncio.Transport" / "pause_writing() /
    resume_writing() are called at the high/low-water marks": like
    asyncio's selector transport (_write_send -> _maybe_resume_protocol
    before connection_lost), a transport closed with a full buffer calls
    resume_writing() once that buffer drained, then connection_lost()."""
    data = payload(8 * MiB, seed=9)
    factory = Collect(_FlowCloser, data)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        assert sha(recv_until_eof(s)) == sha(data)
    proto = factory.one()
    assert proto.lost.wait(DEADLINE)
    assert proto.buffered > 64 * KiB
    assert proto.flow == ["pause", "resume"]


def test_call_soon_threadsafe_racing_close_runs_or_refuses_each_callback(sock_path, make_server):
    """Callbacks queued from many threads while another thread closes the
    server: each call either raises ServerClosedError or its callback runs
    (teardown's last drain sees it), never neither.  Without the GIL this
    needs the loop mutex (docs/free-threading.md); the free-threaded CI jobs
    run it with PYTHON_GIL=0."""
    srv = make_server(sock_path, protocol=Echo)
    ran: list[int] = []
    per_thread = 20_000  # a bound: the close() normally stops them far sooner

    def call(i: int) -> int:
        if i == 0:
            on_loop(srv, lambda: None)  # the others are queueing by now
            srv.close()
            return 0
        queued = 0
        for k in range(per_thread):
            try:
                srv.call_soon_threadsafe(ran.append, i * per_thread + k)
            except ServerClosedError:
                break
            queued += 1
        return queued

    results = run_threads(call, 6)
    assert not [r for r in results if isinstance(r, BaseException)]
    assert srv.wait(DEADLINE)
    assert len(ran) == sum(results) == len(set(ran))
