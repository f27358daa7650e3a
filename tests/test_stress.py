"""Stress: many concurrent clients with every byte verified, and many
connection cycles from several threads without fd leaks (reliability
checklist items 34 and 40 under load; both handler models)."""

from __future__ import annotations

import random
import selectors
import socket
import time
from collections.abc import Callable

from conftest import connect, echo, fd_count, run_threads, start_echo, wait_until
from unixsrv import Server

CLIENTS = 200
ROUNDS = 50


class _Client:
    """One client of the selector loop: sends a payload, reads it back, next."""

    def __init__(self, sock: socket.socket, payloads: list[bytes]) -> None:
        self.sock = sock
        self.payloads = payloads
        self.round = 0
        self.sent = 0
        self.got = bytearray()
        self.mismatches = 0

    @property
    def done(self) -> bool:
        return self.round == len(self.payloads)

    @property
    def payload(self) -> bytes:
        return self.payloads[self.round]


def test_200_clients_50_echoes_each(
    model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """200 clients at once, each doing 50 request/echo rounds with random
    payloads (1 byte .. 8 KiB), driven by one selector loop in the test:
    every byte comes back, in order, on the connection it was sent on; the
    server's byte counters match and every connection is closed in the end."""
    srv = start_echo(make_server, sock_path, model)
    rng = random.Random(2024)
    sel = selectors.DefaultSelector()
    clients: list[_Client] = []
    total = 0
    try:
        for _ in range(CLIENTS):
            s = connect(sock_path)
            s.setblocking(False)
            payloads = [rng.randbytes(rng.randint(1, 8192)) for _ in range(ROUNDS)]
            total += sum(map(len, payloads))
            c = _Client(s, payloads)
            clients.append(c)
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
        remaining = CLIENTS
        deadline = time.monotonic() + 60
        while remaining:
            assert time.monotonic() < deadline, f"{remaining} clients unfinished"
            for key, events in sel.select(timeout=1.0):
                c = key.data
                if events & selectors.EVENT_WRITE and c.sent < len(c.payload):
                    try:
                        c.sent += c.sock.send(c.payload[c.sent :])
                    except BlockingIOError:
                        pass
                    if c.sent == len(c.payload):
                        sel.modify(c.sock, selectors.EVENT_READ, c)
                if events & selectors.EVENT_READ:
                    try:
                        chunk = c.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    assert chunk, "the server closed a connection in the middle of a round"
                    c.got += chunk
                    assert len(c.got) <= len(c.payload), "more bytes came back than were sent"
                    if len(c.got) == len(c.payload):
                        if c.got != c.payload:
                            c.mismatches += 1
                        c.round += 1
                        c.sent = 0
                        c.got = bytearray()
                        if c.done:
                            remaining -= 1
                            sel.unregister(c.sock)
                        else:
                            sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
        assert [c.mismatches for c in clients] == [0] * CLIENTS
        assert all(c.done for c in clients)
        wait_until(lambda: srv.stats()["bytes_out"] == total)
        stats = srv.stats()
        assert stats["bytes_in"] == total
        assert stats["accepted"] == CLIENTS and stats["open"] == CLIENTS
    finally:
        sel.close()
        for c in clients:
            c.sock.close()
    wait_until(lambda: srv.stats()["closed"] == CLIENTS)
    assert srv.stats()["open"] == 0


def test_2000_cycles_from_8_threads_leak_nothing(
    model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 34 under concurrency: 8 threads x 250 connect/close cycles
    (close at once, round trip, or close with the echo unread) leave the fd
    count where it was, and stats()['accepted'] == stats()['closed'] == 2000."""
    srv = start_echo(make_server, sock_path, model)
    base = fd_count()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(250):
            with connect(sock_path) as s:
                kind = rng.randrange(3)
                if kind == 1:
                    echo(s, b"%d:%d" % (seed, i))
                elif kind == 2:
                    s.sendall(b"x" * 4096)

    results = run_threads(worker, 8, timeout=60)  # fails if a thread has not finished
    errors = [r for r in results if r is not None]
    assert errors == []
    wait_until(lambda: srv.stats()["closed"] == 2000)
    wait_until(lambda: fd_count() == base)
    stats = srv.stats()
    assert stats["accepted"] == stats["closed"] == 2000
    assert stats["open"] == 0 and stats["rejected"] == 0
    assert srv.is_running
