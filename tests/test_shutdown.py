"""Stop paths (server.py shutdown/close/wait/serve_forever) keep their
deadlines whatever user code or other processes do (README "Lifecycle and
shutdown"): another process holding the socket directory's flock(2), a
protocol callback blocking the loop thread, an interrupted shutdown, odd
timeout values."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import (
    DEADLINE,
    Timed,
    connect,
    echo,
    echo_once,
    read_line,
    recv_until_eof,
    start_echo,
    wait_until,
)
from unixsrv import Server, ServerConfig, ShutdownTimeoutError

#: What a stop may take past its deadline (server._STOP_GRACE, 1 s) plus
#: slack for a loaded machine; still far below the hangs these tests catch.
MARGIN = 3.0

#: A child that holds flock(2) on a directory until it is killed (by PID).
HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def hold_dir_lock(spawn: Callable[..., Any]) -> Iterator[Callable[[str], Any]]:
    """``hold(directory)``: another process holds flock(2) on ``directory``
    until the test calls ``release()`` on the returned handle (it kills the
    child by its PID; the fixture's teardown does too)."""

    class Holder:
        def __init__(self, directory: str) -> None:
            self.proc = spawn(HOLD_LOCK, directory, stdin=subprocess.PIPE)
            assert read_line(self.proc) == "locked"

        def release(self) -> None:
            self.proc.kill()
            self.proc.wait(DEADLINE)

    yield Holder


# ---------------------------------------------------------------------------- the directory lock


def test_close_returns_at_once_while_another_process_holds_the_directory_lock(
    model: str,
    sock_dir: str,
    sock_path: str,
    make_server: Callable[..., Server],
    hold_dir_lock: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 8 finding 2: close() closes every connection and returns; the
    unlink is skipped with a WARNING after a short bound (the file left is a
    stale socket, which the next start removes)."""
    srv = start_echo(make_server, sock_path, model)
    client = connect(sock_path)
    echo(client, b"hi")
    holder = hold_dir_lock(sock_dir)
    try:
        with caplog.at_level(logging.WARNING, logger="unixsrv.listener"):
            closing = Timed(srv.close)
            closing.start()
            closing.join(MARGIN)
            assert not closing.is_alive(), (
                "close() hangs while another process holds the directory lock"
            )
            assert closing.exc is None
            assert recv_until_eof(client) == b""
            assert srv.wait(DEADLINE) and srv.is_gone
        assert any(
            r.name == "unixsrv.listener"
            and r.levelno == logging.WARNING
            and "locked" in r.getMessage()
            for r in caplog.records
        )
        assert os.path.exists(sock_path)  # skipped, not waited for
    finally:
        holder.release()
        client.close()
    restarted = start_echo(make_server, sock_path, model)  # the stale file is removed
    echo_once(restarted.path, b"again")


def test_shutdown_keeps_its_deadline_while_another_process_holds_the_directory_lock(
    sock_dir: str, sock_path: str, make_server: Callable[..., Server], hold_dir_lock: Any
) -> None:
    """shutdown(2) with a handler parked in read(): it returns without error
    well within its deadline (the handler got b"" at once)."""
    srv = start_echo(make_server, sock_path, "blocking")
    client = connect(sock_path)
    echo(client, b"hi")
    holder = hold_dir_lock(sock_dir)
    try:
        stopping = Timed(lambda: srv.shutdown(timeout=2))
        stopping.start()
        stopping.join(2 + MARGIN)
        assert not stopping.is_alive(), (
            "shutdown(2) overran its deadline while the directory was locked"
        )
        assert stopping.exc is None
        assert srv.wait(0) and srv.open_connections == 0
    finally:
        holder.release()
        client.close()


def test_start_waits_10_s_for_the_directory_lock(
    sock_dir: str, sock_path: str, hold_dir_lock: Any
) -> None:
    """The documented start-up wait is 10 s by the clock (it was 12-16 s:
    the C loop counted 1 ms sleeps), then TimeoutError, nothing on disk."""
    holder = hold_dir_lock(sock_dir)
    try:
        srv = Server(ServerConfig(path=sock_path), handler=lambda conn: None)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="locked for 10 s"):
            srv.start()
        elapsed = time.monotonic() - t0
    finally:
        holder.release()
    assert 10.0 <= elapsed < 10.0 + DEADLINE / 20, elapsed  # 0.5 s slack (more under valgrind)
    assert os.listdir(sock_dir) == []


@pytest.mark.parametrize("stop", ["close", "shutdown"])
def test_a_stop_during_start_up_does_not_wait_for_the_directory_lock(
    stop: str, sock_dir: str, sock_path: str, make_server: Callable[..., Server], hold_dir_lock: Any
) -> None:
    """start() may wait 10 s for the directory lock; a stop called meanwhile
    returns at once (it used to wait for the start's internal lock) and wins:
    the start undoes itself and leaves nothing on disk."""
    holder = hold_dir_lock(sock_dir)
    try:
        srv = make_server(sock_path, lambda conn: None, start=False)
        starting = Timed(srv.start)
        starting.start()
        wait_until(lambda: "starting" in repr(srv))
        stopping = Timed(getattr(srv, stop))
        stopping.start()
        stopping.join(MARGIN)
        assert not stopping.is_alive(), (
            f"{stop}() waits for a start that waits for another process's lock"
        )
        assert stopping.exc is None, stopping.exc
    finally:
        holder.release()
    starting.join(DEADLINE)
    assert not starting.is_alive() and starting.exc is None, starting.exc
    assert not srv.is_running and srv.wait(0)
    assert os.listdir(sock_dir) == []


def test_ctrl_c_during_the_start_up_lock_wait_interrupts_it(
    sock_dir: str,
    sock_path: str,
    make_server: Callable[..., Server],
    hold_dir_lock: Any,
    interrupt_main: Any,
) -> None:
    """start() waits for the directory lock without the GIL, in slices with
    Python's signal handlers run between them (they used to run only when
    the 10 s wait ended): Ctrl-C raises KeyboardInterrupt from start() at
    once, and nothing is left on disk."""
    holder = hold_dir_lock(sock_dir)
    try:
        srv = make_server(sock_path, lambda conn: None, start=False)
        interrupt_main(lambda: "starting" in repr(srv))
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            srv.start()
        elapsed = time.monotonic() - t0
    finally:
        holder.release()
    assert elapsed < MARGIN, f"Ctrl-C took {elapsed:.1f} s to interrupt the lock wait"
    assert not srv.is_running and srv.wait(0)
    assert os.listdir(sock_dir) == []


def test_close_from_a_signal_handler_during_the_start_up_lock_wait(
    sock_dir: str,
    sock_path: str,
    make_server: Callable[..., Server],
    hold_dir_lock: Any,
) -> None:
    """A signal handler that calls close() while start() waits for another
    process's directory lock runs within a slice of the wait, and the stop
    wins: once the lock is free, start() undoes itself (no error, nothing
    on disk)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers run on the main thread only")
    srv = make_server(sock_path, lambda conn: None, start=False)
    handled = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        srv.close()
        handled.set()

    holder = hold_dir_lock(sock_dir)
    main = threading.main_thread().ident or 0

    def signal_then_release() -> None:
        wait_until(lambda: "starting" in repr(srv))
        signal.pthread_kill(main, signal.SIGUSR2)
        handled.wait(DEADLINE)  # release even if the handler is late, so start() ends
        holder.release()

    previous = signal.signal(signal.SIGUSR2, on_signal)
    helper = threading.Thread(target=signal_then_release, daemon=True)
    try:
        t0 = time.monotonic()
        helper.start()
        srv.start()
        elapsed = time.monotonic() - t0
    finally:
        helper.join(DEADLINE)
        holder.release()
        signal.signal(signal.SIGUSR2, previous)
    assert handled.is_set()
    assert elapsed < MARGIN, f"the signal handler waited {elapsed:.1f} s for the lock wait"
    assert not srv.is_running and srv.wait(0)
    assert os.listdir(sock_dir) == []


# ---------------------------------------------------------------------------- timeout values


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (math.nan, ValueError),
        (-1, ValueError),
        (-math.inf, ValueError),
        (None, TypeError),
        ("1", TypeError),
        (True, TypeError),  # a flag by mistake, not one second
        (object(), TypeError),
    ],
)
def test_a_bad_timeout_raises_before_anything_changes(
    timeout: Any, error: type[Exception], echo_server: Server
) -> None:
    call = Timed(lambda: echo_server.shutdown(timeout))
    call.start()
    call.join(MARGIN)
    assert not call.is_alive(), f"shutdown({timeout!r}) waits"
    assert isinstance(call.exc, error), call.exc
    assert echo_server.is_running  # still serving
    echo_once(echo_server.path, b"still here")
    if timeout is not None:  # wait(None) is valid: no limit
        with pytest.raises(error):
            echo_server.wait(timeout)


def test_shutdown_with_an_infinite_timeout(echo_server: Server, sock_path: str) -> None:
    """math.inf means no limit (it raised OverflowError after the listener
    was closed, leaving the server half-stopped)."""
    client = connect(sock_path)
    echo(client, b"x")
    stopping = Timed(lambda: echo_server.shutdown(math.inf))
    stopping.start()
    stopping.join(DEADLINE)
    assert not stopping.is_alive() and stopping.exc is None, stopping.exc
    assert recv_until_eof(client) == b""
    client.close()
    assert echo_server.wait(math.inf) and not os.path.exists(sock_path)


# ---------------------------------------------------------------------------- interrupted shutdown


def _main_thread_sleeps_in_the_kernel() -> bool:
    """True while the main thread is blocked in a system call (state ``S``
    in /proc/<pid>/task/<tid>/stat, proc(5)), not running bytecode."""
    tid = threading.main_thread().native_id
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            stat = f.read()
    except OSError:  # no procfs (macOS): the Python-level check alone
        return True
    return stat[stat.rindex(")") + 2] == "S"


@pytest.fixture
def interrupt_main() -> Iterator[Callable[[Callable[[], bool]], None]]:
    """``interrupt_main(when)``: once ``when()`` is true and the main thread
    is asleep in a system call, raise KeyboardInterrupt in the main thread
    (as Ctrl-C does), through SIGUSR1 so pytest's own SIGINT handling stays
    out of it.

    The interrupt must land while the main thread is blocked in a wait, as a
    test means it: a signal handler that raises while the thread runs
    Python code can land inside the threading module's own bookkeeping
    (between a lock's acquire and the ``try`` that releases it), leak that
    lock and hang the next ``Thread.start()``.  So the helper thread is
    started before the test runs anything interruptible, and it signals only
    after seeing the main thread asleep in the kernel twice in a row."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers run on the main thread only")

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    main = threading.main_thread().ident or 0
    requests: queue.SimpleQueue[Callable[[], bool] | None] = queue.SimpleQueue()

    def parked_in(when: Callable[[], bool]) -> Callable[[], bool]:
        seen = [False]

        def check() -> bool:
            now = when() and _main_thread_sleeps_in_the_kernel()
            twice, seen[0] = seen[0] and now, now
            return twice

        return check

    def body() -> None:
        while (when := requests.get()) is not None:
            wait_until(parked_in(when))
            # To the main thread itself: a process-directed signal may land on
            # another thread, and then the main thread's blocked wait is not
            # interrupted (EINTR) and the handler runs only when it ends.
            signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, raise_interrupt)
    helper = threading.Thread(target=body, daemon=True)
    helper.start()
    try:
        yield requests.put
    finally:
        requests.put(None)
        helper.join(DEADLINE)
        signal.signal(signal.SIGUSR1, previous)
    assert not helper.is_alive(), "the interrupting thread did not end"


def _main_thread_waits_in(function: str) -> bool:
    """True while the main thread blocks in a threading wait called (at any
    depth) from ``function``."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return bool(names) and names[0] == "wait" and function in names


@pytest.mark.parametrize("retry", ["shutdown", "close", "start"])
def test_an_interrupted_shutdown_is_finished_by_the_next_call(
    retry: str, sock_path: str, make_server: Callable[..., Server], interrupt_main: Any
) -> None:
    """Ctrl-C during shutdown(10) while a handler works: the server stays
    half-stopped; the next shutdown() or close() finishes the stop, and
    start() finishes it and starts again."""
    entered, release = threading.Event(), threading.Event()

    def handler(conn: Any) -> None:
        entered.set()
        release.wait(DEADLINE)  # working, not reading: the shutdown waits for it

    srv = make_server(sock_path, handler)
    client = connect(sock_path)
    assert entered.wait(DEADLINE)
    interrupt_main(lambda: _main_thread_waits_in("shutdown"))
    with pytest.raises(KeyboardInterrupt):
        srv.shutdown(10)
    assert srv.is_gone and not srv.wait(0)
    release.set()
    client.close()
    call = Timed(getattr(srv, retry))
    call.start()
    call.join(DEADLINE)
    assert not call.is_alive(), f"{retry}() after an interrupted shutdown hangs"
    assert call.exc is None, call.exc
    if retry == "start":
        assert srv.is_running
        entered.clear()
        with connect(sock_path):
            assert entered.wait(DEADLINE)
    else:
        assert srv.wait(0) and not os.path.exists(sock_path)


def test_ctrl_c_in_serve_forever_after_start_stops_the_server(
    sock_path: str, make_server: Callable[..., Server], interrupt_main: Any
) -> None:
    """serve_forever() on a server started with start() waits for it to stop;
    Ctrl-C there stops it (file removed), then re-raises, as when it runs
    the server itself."""
    srv = start_echo(make_server, sock_path, "event")
    interrupt_main(lambda: _main_thread_waits_in("serve_forever"))
    with pytest.raises(KeyboardInterrupt):
        srv.serve_forever()
    assert srv.wait(DEADLINE) and not os.path.exists(sock_path)


# ---------------------------------------------------------------------------- a blocked loop thread


class Blocker(asyncio.Protocol):
    """data_received blocks the loop thread until ``release`` is set."""

    entered = threading.Event()
    release = threading.Event()

    def data_received(self, data: bytes) -> None:
        Blocker.entered.set()
        Blocker.release.wait(DEADLINE)


@pytest.fixture
def blocked_loop(
    sock_path: str, make_server: Callable[..., Server]
) -> Iterator[tuple[Server, socket.socket]]:
    """An event-model server whose loop thread is blocked in data_received,
    and the client that sent the data; the block ends with the test."""
    Blocker.entered.clear()
    Blocker.release.clear()
    srv = make_server(sock_path, protocol=Blocker)
    client = connect(sock_path)
    client.sendall(b"block")
    assert Blocker.entered.wait(DEADLINE)
    try:
        yield srv, client
    finally:
        Blocker.release.set()
        client.close()


def _stop_completes_after_the_callback(srv: Server, client: socket.socket, sock_path: str) -> None:
    assert srv.is_gone
    Blocker.release.set()
    assert srv.wait(DEADLINE)
    assert recv_until_eof(client) == b""
    assert not os.path.exists(sock_path)


def test_shutdown_keeps_its_deadline_while_a_callback_blocks_the_loop(
    blocked_loop: tuple[Server, socket.socket], sock_path: str
) -> None:
    """Issue 8 finding 4: ShutdownTimeoutError within timeout plus a small
    margin; the loop thread completes the stop once the callback returns."""
    srv, client = blocked_loop
    stopping = Timed(lambda: srv.shutdown(timeout=0.5))
    stopping.start()
    stopping.join(0.5 + MARGIN)
    assert not stopping.is_alive(), "shutdown(0.5) waited for the blocked callback"
    assert isinstance(stopping.exc, ShutdownTimeoutError), stopping.exc
    assert stopping.elapsed >= 0.5
    _stop_completes_after_the_callback(srv, client, sock_path)


def test_close_returns_while_a_callback_blocks_the_loop(
    blocked_loop: tuple[Server, socket.socket], sock_path: str
) -> None:
    srv, client = blocked_loop
    closing = Timed(srv.close)
    closing.start()
    closing.join(MARGIN)
    assert not closing.is_alive(), "close() waited for the blocked callback"
    assert closing.exc is None, closing.exc
    _stop_completes_after_the_callback(srv, client, sock_path)
