"""The blocking model's Connection: read()/readinto()/write() sizes and results.

read() lands small messages on a stack buffer and, once messages grow past it,
receives straight into a bytes object that is shrunk to fit; these tests pin
every transition (small -> large -> small) to exact bytes.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from conftest import DEADLINE, connect, recv_exactly
from unixsrv import Server

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
def test_read_never_returns_more_than_asked(n: int, sock_path: str, make_server: Callable[..., Server]) -> None:
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
