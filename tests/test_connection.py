"""The blocking model's Connection: read()/readinto()/write() sizes and results.

read() lands small messages on a stack buffer and, once messages grow past it,
receives straight into a bytes object that is shrunk to fit; these tests pin
every transition (small -> large -> small) to exact bytes.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import DEADLINE, IDLE_LATE, connect, recv_exactly, wait_until
from unixsrv import Server, ServerClosedError

SIZES = [1, 100, 2047, 2048, 2049, 5000, 65536, 70000, 3, 16384, 16384, 10, 2048, 1]


def test_read_returns_exactly_what_arrived_across_size_changes(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Each message is written whole and read back by one read(n) call that
    asks for exactly its size: the result has exactly those bytes, for sizes
    below, at and above the 2 KiB stack buffer, in both directions."""
    got: list[bytes] = []
    done = threading.Event()

    def handler(conn: Any) -> None:
        for size in SIZES:
            buf = bytearray()
            while len(buf) < size:
                chunk = conn.read(size - len(buf))
                assert chunk, "EOF before the message was complete"
                buf += chunk
            got.append(bytes(buf))
            conn.write(buf)
        done.set()

    make_server(sock_path, handler)
    messages = [os.urandom(n) for n in SIZES]
    with connect(sock_path) as s:
        for msg in messages:
            s.sendall(msg)
            assert recv_exactly(s, len(msg)) == msg
    assert done.wait(DEADLINE)
    assert got == messages


@pytest.mark.parametrize("n", [1, 2048, 4096, 65536])
def test_read_never_returns_more_than_asked(
    n: int, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """read(n) returns at most n bytes even when far more is waiting."""
    sizes: list[int] = []
    done = threading.Event()

    def handler(conn: Any) -> None:
        total = 0
        while total < 200_000:
            data = conn.read(n)
            assert data
            sizes.append(len(data))
            total += len(data)
        done.set()

    make_server(sock_path, handler)
    with connect(sock_path) as s:
        s.sendall(os.urandom(200_000))
        assert done.wait(DEADLINE)
    assert max(sizes) <= n
    assert sum(sizes) == 200_000


def test_read_zero_and_negative(sock_path: str, make_server: Callable[..., Server]) -> None:
    """read(0) is b"" without waiting; read(-1) is a ValueError."""
    results: list[Any] = []
    done = threading.Event()

    def handler(conn: Any) -> None:
        results.append(conn.read(0))
        try:
            conn.read(-1)
        except ValueError as exc:
            results.append(exc)
        done.set()

    make_server(sock_path, handler)
    with connect(sock_path):
        assert done.wait(DEADLINE)
    assert results[0] == b""
    assert isinstance(results[1], ValueError)


def test_readinto_and_write_of_buffers(sock_path: str, make_server: Callable[..., Server]) -> None:
    """readinto() fills a caller's buffer (count returned, 0 at EOF); write()
    takes any bytes-like object and returns its length."""
    counts: list[int] = []
    written: list[int] = []
    done = threading.Event()

    def handler(conn: Any) -> None:
        buf = bytearray(70000)
        view = memoryview(buf)
        while n := conn.readinto(buf):
            counts.append(n)
            written.append(conn.write(view[:n]))
        counts.append(0)
        done.set()

    make_server(sock_path, handler)
    payload = os.urandom(300_000)
    with connect(sock_path) as s:
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(s, len(payload)) == payload
        sender.join()
        s.shutdown(2)
        assert done.wait(DEADLINE)
    assert counts[-1] == 0
    assert sum(counts) == len(payload)
    assert written == counts[:-1]


def test_reset_right_after_a_full_small_read_is_raised_by_the_next_read(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """A client that sends exactly one stack buffer (2 KiB) and closes with
    data of ours unread resets the connection (unix(7): the peer gets
    ECONNRESET).  read() returns the 2 KiB; the reset, which the socket
    reports once, is not swallowed by the look-ahead for more data: the next
    read() raises ConnectionResetError instead of returning b""."""
    results: list[Any] = []
    gone = threading.Event()
    done = threading.Event()

    def handler(conn: Any) -> None:
        try:
            conn.write(b"never read")
            assert gone.wait(DEADLINE)
            results.append(len(conn.read(65536)))
            try:
                results.append(conn.read(65536))
            except ConnectionResetError:
                results.append("reset")
        finally:
            done.set()

    make_server(sock_path, handler)
    with connect(sock_path) as s:
        assert s.recv(1, socket.MSG_PEEK) == b"n"  # arrived, and stays unread
        s.sendall(os.urandom(2048))
    gone.set()
    assert done.wait(DEADLINE)
    assert results == [2048, "reset"]


def test_read_without_a_size_reads_up_to_read_buffer_size(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """read() with no argument reads up to the configured read_buffer_size
    (the README's configuration table), however much is waiting; read(n)
    still takes an explicit size above it."""
    sizes: list[int] = []
    explicit: list[int] = []
    more = threading.Event()
    done = threading.Event()

    def handler(conn: Any) -> None:
        try:
            while sum(sizes) < 10_000:
                data = conn.read()
                assert data, "EOF before the 10,000 bytes"
                sizes.append(len(data))
            more.wait(DEADLINE)
            explicit.append(len(conn.read(1000)))
        finally:
            done.set()

    make_server(sock_path, handler, read_buffer_size=256)
    with connect(sock_path) as s:
        s.sendall(os.urandom(10_000))  # one send: all of it is there at the first read
        wait_until(lambda: sum(sizes) == 10_000)
        s.sendall(os.urandom(1000))
        more.set()
        assert done.wait(DEADLINE)
    assert max(sizes) == 256, sizes
    assert sum(sizes) == 10_000
    assert explicit == [1000]


def _idle_write(
    sock_path: str,
    make_server: Callable[..., Server],
    idle: float,
    read_client: Callable[[socket.socket], int],
) -> tuple[Any, float, int]:
    """A blocking handler writes 8 MiB in one conn.write() under
    idle_timeout=idle while read_client(sock) consumes it; returns what the
    write gave (its return value or the exception), how long it took, and
    what read_client returned."""
    outcome: list[Any] = []
    done = threading.Event()
    data = os.urandom(8 * 1024 * 1024)

    def handler(conn: Any) -> None:
        began = time.monotonic()
        try:
            outcome.append(conn.write(data))
        except OSError as exc:  # ServerClosedError is one; the test inspects it
            outcome.append(exc)
        outcome.append(time.monotonic() - began)
        done.set()

    make_server(sock_path, handler, idle_timeout=idle)
    with connect(sock_path) as s:
        got = read_client(s)
        assert done.wait(DEADLINE)
    return outcome[0], outcome[1], got


def test_idle_timeout_spares_a_big_write_to_a_slow_steady_reader(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Issue 8, finding 5: every partial send of a blocking write is activity.
    The reader takes 64 KiB every 20 ms (about 3 s for 8 MiB, three idle
    timeouts), so the write never pauses for anything near 1 s, and it must
    complete: 8 MiB written, all of it read."""
    deadline = time.monotonic() + 6 * DEADLINE

    def slow_steady(s: socket.socket) -> int:
        total = 0
        while total < 8 * 1024 * 1024 and time.monotonic() < deadline:
            chunk = s.recv(64 * 1024)
            if not chunk:
                break
            total += len(chunk)
            time.sleep(0.02)  # the reader's pace: time passing is the behaviour
        return total

    result, took, got = _idle_write(sock_path, make_server, 1.0, slow_steady)
    assert result == 8 * 1024 * 1024, f"the write failed after {took:.2f} s: {result!r}"
    assert got == 8 * 1024 * 1024
    assert took > 1.0, "the reader was not slower than the idle timeout: the test proves nothing"


def test_idle_timeout_still_cuts_a_write_to_a_stalled_reader(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """The control: a reader that takes nothing makes the write idle once the
    socket buffer is full, and the idle timeout ends it with
    ServerClosedError, no sooner than the timeout."""
    idle = 0.5

    def stalled(s: socket.socket) -> int:
        return 0  # reads nothing; the socket stays open until the handler is done

    result, took, _ = _idle_write(sock_path, make_server, idle, stalled)
    assert isinstance(result, ServerClosedError), result
    assert idle <= took <= idle + IDLE_LATE, f"cut after {took:.2f} s (timeout {idle} s)"
