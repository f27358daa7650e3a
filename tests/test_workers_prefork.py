"""Server(..., workers=N): pre-fork worker processes on one listener (unixsrv.prefork).

Every model runs on the one supervisor: "blocking" and "event" are
``Server(..., workers=N)``, "asyncio" is ``unixsrv.asyncio.prefork_server``
(protocols on an asyncio loop in each worker), "socketserver" is
``unixsrv.socketserver.ThreadingUnixStreamServer(..., workers=N)`` (each
worker runs the server's own serve_forever).

Which worker accepts a connection is the kernel's choice; to put a
connection on a given worker the tests stop every other worker (SIGSTOP: a
stopped process is not waiting in epoll_wait, so the listener wakes the one
left) and let them go on afterwards (SIGCONT).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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

import unixsrv.asyncio
import unixsrv.socketserver
from conftest import DEADLINE, LINUX, connect, read_line, recv_exactly, wait_until
from unixsrv import (
    Server,
    ServerClosedError,
    ServerConfig,
    WorkerCrashLoopError,
    WorkerError,
)
from unixsrv.errors import ConfigError
from unixsrv.prefork import MIN_UPTIME, worker_count

MODELS = ["blocking", "event", "asyncio", "socketserver"]


# ---------------------------------------------------------------------------- the served protocol
# On connect the worker sends its pid and a newline ("greeting"); then each
# line the client sends comes back, after `pause` seconds for a line "slow".


def _handler(conn: Any) -> None:
    conn.write(b"%d\n" % os.getpid())
    buf = b""
    while data := conn.read():
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line == b"slow":
                time.sleep(0.5)
            conn.write(line + b"\n")


class _Protocol:
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""
        transport.write(b"%d\n" % os.getpid())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line == b"slow":
                time.sleep(0.5)  # in-flight work: it blocks this worker's loop
            self.transport.write(line + b"\n")

    def eof_received(self) -> None:
        self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        pass


class _AsyncioProtocol(_Protocol):
    """_Protocol on a worker's asyncio loop: the greeting goes out through
    the running loop (call_soon), which only a running asyncio loop serves."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""
        asyncio.get_running_loop().call_soon(transport.write, b"%d\n" % os.getpid())


class _RequestHandler(unixsrv.socketserver.StreamRequestHandler):
    """_handler as a socketserver request handler."""

    def handle(self) -> None:
        self.wfile.write(b"%d\n" % os.getpid())
        for line in self.rfile:
            if line == b"slow\n":
                time.sleep(0.5)
            self.wfile.write(line)


class _SocketServerWorkers:
    """A ThreadingUnixStreamServer with workers= behind the Server calls
    these tests make: bound at construction, serve_forever() on a thread
    from start(), shutdown()/server_close() for shutdown()/close(); the rest
    is its supervisor's (the parent's unixsrv.Server)."""

    def __init__(self, cfg: ServerConfig, workers: int | str) -> None:
        self.server = unixsrv.socketserver.ThreadingUnixStreamServer(
            None, _RequestHandler, config=cfg, workers=workers
        )
        assert self.server.supervisor is not None
        self.supervisor: Server = self.server.supervisor
        self.thread: threading.Thread | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.supervisor, name)

    def start(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))
            self.thread.start()
        wait_until(lambda: self.supervisor.is_running or not self.thread.is_alive())  # type: ignore[union-attr]

    def shutdown(self, timeout: float) -> None:
        self.server.shutdown()
        self._join()

    def close(self) -> None:
        self.server.server_close()
        self._join()

    def _join(self) -> None:
        if self.thread is not None:
            self.thread.join(DEADLINE)
            assert not self.thread.is_alive()


def _server(
    path: str, model: str, workers: int | str = 2, handler: Any = _handler, **fields: Any
) -> Any:
    cfg = ServerConfig(path=path, **fields)
    if model == "blocking":
        return Server(cfg, handler, workers=workers)
    if model == "asyncio":
        return unixsrv.asyncio.prefork_server(_AsyncioProtocol, cfg, workers=workers)
    if model == "socketserver":
        return _SocketServerWorkers(cfg, workers)
    return Server(cfg, protocol=_Protocol, workers=workers)


def _gone(pid: int) -> bool:
    """The process ended (reaped, or a zombie nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    if LINUX:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except (FileNotFoundError, ProcessLookupError):  # reaped meanwhile
            return True
    return False


@pytest.fixture
def workers_server() -> Iterator[Callable[..., Server]]:
    """Build Server(workers=N) objects that are closed when the test ends;
    any worker process still alive then is killed by its PID."""
    servers: list[Server] = []
    pids: set[int] = set()

    def factory(
        path: str,
        model: str,
        workers: int | str = 2,
        *,
        start: bool = True,
        handler: Any = _handler,
        **fields: Any,
    ) -> Server:
        srv = _server(path, model, workers, handler, **fields)
        servers.append(srv)
        srv.on_server_info(lambda message: pids.update(w["pid"] for w in srv.worker_stats()))
        if start:
            srv.start()
            pids.update(w["pid"] for w in srv.worker_stats())
        return srv

    yield factory
    for srv in servers:
        pids.update(w["pid"] for w in srv.worker_stats())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        srv.close()
        assert srv.wait(DEADLINE), f"{srv!r} did not stop"
    leftover = [pid for pid in pids if not _gone(pid)]
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover, f"worker processes outlived their server: {leftover}"


def _pids(srv: Server, state: str = "ready") -> list[int]:
    return [w["pid"] for w in srv.worker_stats() if w["state"] == state]


def _state(pid: int) -> str:
    """The process state letter (T = stopped), as ps shows it; on Linux "T"
    only once every thread of it has stopped (each handles the SIGSTOP)."""
    if LINUX:
        states = set()
        for tid in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(FileNotFoundError, ProcessLookupError),
                open(f"/proc/{pid}/task/{tid}/stat") as f,
            ):
                states.add(f.read().rsplit(")", 1)[1].split()[0])
        return "T" if states == {"T"} else "".join(sorted(states))
    out = subprocess.run(
        ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return out.stdout.strip()[:1]


@contextlib.contextmanager
def _only(srv: Server, pid: int) -> Iterator[None]:
    """While in the block, every worker but ``pid`` is stopped (SIGSTOP;
    kill() returns before the target has stopped, so wait for it)."""
    others = [p for p in _pids(srv) if p != pid]
    for p in others:
        os.kill(p, signal.SIGSTOP)
    try:
        for p in others:
            wait_until(lambda: _state(p) == "T")  # noqa: B023 - called at once, in this iteration
        yield
    finally:
        for p in others:
            os.kill(p, signal.SIGCONT)


_EPOLL_WAIT = {"do_epoll_wait", "ep_poll"}  # a thread asleep in epoll_wait(2), by kernel version


def _wchans(pid: int) -> set[str]:
    """Where each thread of ``pid`` sleeps in the kernel (/proc/PID/task/TID/wchan)."""
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/wchan") as f:
            found.add(f.read())
    return found


def _greeted(path: str) -> tuple[socket.socket, int]:
    """A connection and the pid of the worker that greeted it."""
    s = connect(path)
    try:
        with s.makefile("rb") as f:
            line = f.readline()
        assert line.endswith(b"\n"), f"no greeting: {line!r}"
        return s, int(line)
    except BaseException:
        s.close()
        raise


def _ask(s: socket.socket, line: bytes) -> bytes:
    """Send a line, return the answer without its newline."""
    s.sendall(line + b"\n")
    return recv_exactly(s, len(line) + 1)[:-1]


# ---------------------------------------------------------------------------- tests


def test_worker_count() -> None:
    assert worker_count(3) == 3
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert worker_count("auto") == expected
    for bad in (0, -1, True, "two", 1.5, None):
        with pytest.raises(ConfigError):
            worker_count(bad)
    with pytest.raises(ConfigError):
        Server(ServerConfig(path="/tmp/x.sock"), _handler, workers=0)


def test_single_process_server_has_no_workers(sock_path: str) -> None:
    srv = Server(ServerConfig(path=sock_path), _handler)
    assert srv.worker_stats() == []
    with pytest.raises(RuntimeError):
        srv.reload()


def test_not_running(sock_path: str, workers_server: Callable[..., Server]) -> None:
    srv = workers_server(sock_path, "event", 1, start=False)
    assert not srv.is_running and srv.worker_stats() == [] and srv.open_connections == 0
    with pytest.raises(ServerClosedError):
        srv.reload()
    srv.start()
    with pytest.raises(ServerClosedError):  # the loops live in the workers
        srv.call_soon_threadsafe(print)
    srv.start()  # a no-op while running
    assert len(srv.worker_stats()) == 1
    srv.close()
    srv.close()  # idempotent
    assert not os.path.exists(sock_path)
    srv.start()  # a stopped server starts again
    assert srv.is_running and os.path.exists(sock_path)


@pytest.mark.parametrize("model", MODELS)
def test_every_worker_serves(
    model: str, sock_path: str, workers_server: Callable[..., Server]
) -> None:
    srv = workers_server(sock_path, model, 2, mode=0o600)
    pids = _pids(srv)
    assert len(pids) == 2 and os.getpid() not in pids
    assert srv.is_running and not srv.is_gone
    assert os.stat(sock_path).st_mode & 0o777 == 0o600  # the parent applied the mode once
    for pid in pids:
        with _only(srv, pid):
            s, greeter = _greeted(sock_path)
            with s:
                assert greeter == pid
                assert _ask(s, b"hello") == b"hello"
    # The peer credentials a client sees are the listener's creator: the parent.
    with connect(sock_path) as s:
        cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12) if LINUX else None
        if cred is not None:
            assert int.from_bytes(cred[:4], sys.byteorder) == os.getpid()


@pytest.mark.linux("EPOLLEXCLUSIVE")
def test_listener_registered_exclusive(
    sock_path: str, workers_server: Callable[..., Server]
) -> None:
    """Each worker's epoll watches the shared listener with EPOLLEXCLUSIVE
    (the event mask in /proc/<pid>/fdinfo of its epoll fd), so one worker
    wakes per connection."""
    srv = workers_server(sock_path, "event", 2)
    for pid in _pids(srv):
        masks = []
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
                masks += [int(line.split()[3], 16) for line in f if line.startswith("tfd:")]
        assert any(m & 0x10000000 for m in masks), (
            f"no EPOLLEXCLUSIVE registration in worker {pid}: {masks}"
        )


# Not "asyncio": there the C loop's epoll is watched by the asyncio loop's
# own epoll, and the kernel counts an EPOLLEXCLUSIVE wakeup as the one
# exclusive wakeup only when a thread waits on that epoll itself
# (ep_poll_callback in fs/eventpoll.c): every idle asyncio worker wakes and
# the scheduler decides who accepts (README, "Every model").
@pytest.mark.linux("EPOLLEXCLUSIVE")
@pytest.mark.parametrize("model", [m for m in MODELS if m != "asyncio"])
def test_idle_workers_take_turns(
    model: str, sock_path: str, workers_server: Callable[..., Server]
) -> None:
    """EPOLLEXCLUSIVE wakes the first idle worker in the listener's queue;
    each worker re-registers after accepting (goes to the back), so one
    connection after another is spread over the idle workers instead of all
    going to the same one."""
    srv = workers_server(sock_path, model, 2)
    pids = _pids(srv)
    if not any(_wchans(pid) - {"0"} for pid in pids):
        pytest.skip("/proc/PID/task/TID/wchan hides where threads sleep here")
    greeters = []
    for _ in range(20):
        # "Idle" literally: every worker's loop thread asleep in epoll_wait.
        # On a loaded machine a worker still busy with its last connection
        # (or not yet scheduled after it) is passed over by the kernel.
        wait_until(lambda: all(_wchans(pid) & _EPOLL_WAIT for pid in pids))
        s, greeter = _greeted(sock_path)
        s.close()
        greeters.append(greeter)
    counts = sorted(greeters.count(pid) for pid in _pids(srv))
    assert counts[0] >= 5, greeters


@pytest.mark.parametrize("model", MODELS)
def test_kill9_worker_is_replaced(
    model: str, sock_path: str, workers_server: Callable[..., Server]
) -> None:
    srv = workers_server(sock_path, model, 2)
    errors: list[BaseException] = []
    srv.on_error(errors.append)
    victim, survivor = _pids(srv)
    conns: dict[int, list[socket.socket]] = {victim: [], survivor: []}
    for pid in (victim, survivor):
        with _only(srv, pid):
            for _ in range(3):
                s, greeter = _greeted(sock_path)
                assert greeter == pid
                conns[pid].append(s)
    inode = os.stat(sock_path).st_ino
    os.kill(victim, signal.SIGKILL)
    # Replaced within a second (forked; it accepts soon after).
    replacement = wait_until(
        lambda: [p for p in (w["pid"] for w in srv.worker_stats()) if p not in conns], 1.0
    )
    assert len(replacement) == 1
    wait_until(lambda: len(_pids(srv)) == 2)
    assert srv.is_running
    # Only the killed worker's own connections are lost.
    for s in conns[victim]:
        s.settimeout(DEADLINE)
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
    for s in conns[survivor]:
        assert _ask(s, b"still here") == b"still here"
    seen = set()
    for _ in range(20):
        s, greeter = _greeted(sock_path)
        with s:
            assert _ask(s, b"new") == b"new"
        seen.add(greeter)
    assert victim not in seen
    assert os.stat(sock_path).st_ino == inode  # no worker touched the file
    assert any(isinstance(e, WorkerError) and "SIGKILL" in str(e) for e in errors), errors
    for group in conns.values():
        for s in group:
            s.close()


@pytest.mark.parametrize("model", MODELS)
def test_graceful_stop_drains_every_worker(
    model: str, sock_path: str, workers_server: Callable[..., Server]
) -> None:
    srv = workers_server(sock_path, model, 2)
    pids = _pids(srv)
    inflight = []
    for pid in pids:
        with _only(srv, pid):
            s, greeter = _greeted(sock_path)
            assert greeter == pid
        s.sendall(b"slow\n")  # the worker sleeps 0.5 s before it answers
        inflight.append(s)
    wait_until(lambda: srv.stats()["bytes_in"] == 10)  # both requests reached their workers
    started = time.monotonic()
    srv.shutdown(DEADLINE)
    assert time.monotonic() - started < DEADLINE
    assert not os.path.exists(sock_path)
    assert not srv.is_running
    for s in inflight:
        with s:
            s.settimeout(DEADLINE)
            assert recv_exactly(s, 5) == b"slow\n"  # the in-flight request finished
    assert all(_gone(pid) for pid in pids)
    with (
        socket.socket(socket.AF_UNIX) as late,
        pytest.raises((FileNotFoundError, ConnectionRefusedError)),
    ):
        late.connect(sock_path)


def test_shutdown_deadline_stops_stuck_workers(
    sock_path: str, workers_server: Callable[..., Server]
) -> None:
    """A worker still busy at the deadline is stopped (SIGQUIT, then SIGKILL)
    and shutdown() raises ShutdownTimeoutError within the deadline plus the grace."""
    from unixsrv import ShutdownTimeoutError
    from unixsrv.prefork import STOP_GRACE

    srv = workers_server(sock_path, "event", 1)
    (pid,) = _pids(srv)
    s, _ = _greeted(sock_path)
    os.kill(pid, signal.SIGSTOP)  # it cannot drain
    started = time.monotonic()
    with pytest.raises(ShutdownTimeoutError):
        srv.shutdown(0.3)
    assert time.monotonic() - started < 0.3 + 3 * STOP_GRACE
    assert _gone(pid)
    s.close()


@pytest.mark.parametrize("model", MODELS)
def test_reload_under_load_refuses_nothing(
    model: str, sock_path: str, workers_server: Callable[..., Server]
) -> None:
    """Every request made during reload() is answered (no connection
    refused, none closed before its answer): a retiring worker stops
    accepting, dispatches what already arrived on the connections it
    accepted, then drains."""
    srv = workers_server(sock_path, model, 2)
    old = set(_pids(srv))
    failures: list[str] = []
    served: list[int] = []
    stop = threading.Event()

    def client() -> None:
        end = time.monotonic() + 4 * DEADLINE
        for _ in range(20000):  # bounded in count and time
            if stop.is_set() or time.monotonic() > end:
                return
            try:
                with connect(sock_path) as s:
                    s.sendall(
                        b"x\n"
                    )  # at once: a retiring worker dispatches what arrived before it drains
                    with s.makefile("rb") as f:
                        greeting, answer = f.readline(), f.readline()
                assert answer == b"x\n", (greeting, answer)
                served.append(int(greeting))
            except (OSError, AssertionError, ValueError) as exc:
                failures.append(repr(exc))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: len(served) >= 20)
        srv.reload()
        after = len(served)
        wait_until(lambda: len(served) >= after + 20)
    finally:
        stop.set()
        thread.join(5 * DEADLINE)
    assert not thread.is_alive()
    assert failures == []
    new = set(_pids(srv))
    assert len(new) == 2 and not (new & old)
    wait_until(lambda: all(_gone(pid) for pid in old))
    assert os.path.exists(sock_path)  # the old workers left the file alone
    for _ in range(10):
        s, greeter = _greeted(sock_path)
        s.close()
        assert greeter in new


@pytest.mark.parametrize("model", MODELS)
def test_after_reload_every_connection_reaches_a_new_worker(
    model: str, sock_path: str, workers_server: Callable[..., Server]
) -> None:
    """reload() returns only once every old worker said it stopped
    accepting: a client that connects right after it is never served by a
    retiring worker (before, one that had not yet acted on its SIGUSR1 could
    still take it)."""
    srv = workers_server(sock_path, model, 2)
    old = set(_pids(srv))
    srv.reload()
    for _ in range(20):
        s, greeter = _greeted(sock_path)
        s.close()
        assert greeter not in old
    assert not (set(_pids(srv)) & old)


@pytest.mark.parametrize("model", MODELS)
def test_counters_add_up(model: str, sock_path: str, workers_server: Callable[..., Server]) -> None:
    srv = workers_server(sock_path, model, 2)
    sent = received = conns = 0
    for i, pid in enumerate(_pids(srv) * 5):
        with _only(srv, pid):
            s, greeter = _greeted(sock_path)
        with s:
            msg = b"m" * (i + 1)
            assert _ask(s, msg) == msg
            conns += 1
            sent += len(msg) + 1
            received += len(str(greeter)) + 1 + len(msg) + 1
    expected = dict.fromkeys(srv.stats(), 0)  # every counter: those not named here stay 0
    expected.update(accepted=conns, closed=conns, bytes_in=sent, bytes_out=received)
    wait_until(lambda: srv.stats() == expected)
    rows = srv.worker_stats()
    assert [r["accepted"] for r in rows] == [5, 5]
    for key in ("accepted", "closed", "bytes_in", "bytes_out"):
        assert sum(r[key] for r in rows) == expected[key]
    assert srv.open_connections == 0
    srv.shutdown(DEADLINE)
    assert srv.stats() == expected  # what the ended workers counted stays counted


def test_counters_of_a_killed_worker(sock_path: str, workers_server: Callable[..., Server]) -> None:
    """A worker killed with connections open: they count as closed, and what
    it counted before stays in the sum."""
    srv = workers_server(sock_path, "event", 2)
    victim = _pids(srv)[0]
    with _only(srv, victim):
        conns = [_greeted(sock_path)[0] for _ in range(3)]
    wait_until(lambda: srv.stats()["open"] == 3)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in [w["pid"] for w in srv.worker_stats()])
    stats = srv.stats()
    assert (stats["accepted"], stats["closed"], stats["open"]) == (3, 3, 0)
    assert stats["errors"] == 1  # the worker's death, reported by the parent
    for s in conns:
        s.close()


def test_socket_file_removed_once_by_the_parent_if_still_ours(
    sock_dir: str, sock_path: str, workers_server: Callable[..., Server]
) -> None:
    srv = workers_server(sock_path, "event", 2)
    inode = os.stat(sock_path).st_ino
    srv.reload()
    assert os.stat(sock_path).st_ino == inode
    # A successor took the path over: stopping leaves its file alone.
    other = os.path.join(sock_dir, "o.sock")
    with socket.socket(socket.AF_UNIX) as successor:
        successor.bind(other)
        theirs = os.stat(other).st_ino
        os.rename(other, sock_path)
        srv.shutdown(DEADLINE)
        assert os.stat(sock_path).st_ino == theirs != inode


def test_crash_loop_stops_the_server(sock_path: str, workers_server: Callable[..., Server]) -> None:
    srv = workers_server(sock_path, "event", 1)
    errors: list[BaseException] = []
    srv.on_error(errors.append)
    killed: set[int] = set()

    def kill_new() -> bool:
        for w in srv.worker_stats():
            if w["pid"] not in killed:
                killed.add(w["pid"])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w["pid"], signal.SIGKILL)
        return srv.wait(0)

    wait_until(kill_new, DEADLINE, interval=0.001)
    assert not os.path.exists(sock_path)
    crash = [e for e in errors if isinstance(e, WorkerCrashLoopError)]
    assert len(crash) == 1 and f"{MIN_UPTIME:g} s" in str(crash[0])
    assert len(killed) == 5  # CRASH_LOOP_LIMIT: no more forks after the loop was seen
    assert all(_gone(pid) for pid in killed)


def _sigterm_to_this_thread(conn: Any) -> None:
    conn.write(b"%d\n" % os.getpid())
    # Thread-directed (pthread_kill), as the kernel may deliver a
    # process-directed SIGTERM to any thread of the worker (signal(7)).
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)


def test_a_signal_landing_on_another_thread_of_a_worker_is_handled(
    sock_path: str, workers_server: Callable[..., Server]
) -> None:
    """A worker's Python signal handlers run on its main thread, which waits
    while the loop and the handlers run on others: a SIGTERM delivered to a
    handler thread must still make the worker stop (it used to be lost: the
    worker kept running until the parent's deadline)."""
    srv = workers_server(sock_path, "blocking", 1, handler=_sigterm_to_this_thread)
    errors: list[BaseException] = []
    srv.on_error(errors.append)
    s, pid = _greeted(sock_path)
    s.close()
    wait_until(lambda: _gone(pid))  # it stopped by itself (status 0) ...
    wait_until(lambda: len(_pids(srv)) == 1 and pid not in _pids(srv))  # ... and was replaced
    assert any(isinstance(e, WorkerError) and "status 0" in str(e) for e in errors), errors


@pytest.mark.linux("PR_SET_PDEATHSIG")
def test_parent_killed_workers_exit(sock_path: str, spawn: Callable[..., Any]) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from unixsrv import Server, ServerConfig
        from unixsrv.echo import EchoProtocol
        srv = Server(ServerConfig(path={sock_path!r}), protocol=EchoProtocol, workers=2)
        srv.start()
        print(" ".join(str(w["pid"]) for w in srv.worker_stats()), flush=True)
        sys.stdin.readline()
        """
    )
    proc = spawn(code, stdin=subprocess.PIPE)
    pids = [int(p) for p in read_line(proc).split()]
    assert len(pids) == 2
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(DEADLINE)
        wait_until(lambda: all(_gone(pid) for pid in pids))
    finally:
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_cli_workers_reload_and_stop(sock_path: str, spawn: Callable[..., Any]) -> None:
    proc = spawn(
        "import sys; from unixsrv.cli import main; sys.exit(main())",
        *("serve", "--socket", sock_path, "--echo", "--workers", "2"),
        stderr=subprocess.STDOUT,
    )
    wait_until(lambda: os.path.exists(sock_path))
    s = wait_until(lambda: _try_connect(sock_path))
    with s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
    os.kill(proc.pid, signal.SIGHUP)
    while "reloaded 2 workers" not in read_line(proc):  # read_line fails after DEADLINE
        pass
    with connect(sock_path) as s:
        s.sendall(b"pong")
        assert recv_exactly(s, 4) == b"pong"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(DEADLINE) == 0
    assert not os.path.exists(sock_path)


def _try_connect(path: str) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return s
    except OSError:
        s.close()
        return None


def test_socket_activation_listener_shared_with_workers(
    sock_path: str, workers_server: Callable[..., Server]
) -> None:
    """config.fd (systemd socket activation): the workers serve the inherited
    listener as it is; the stop never unlinks its file nor closes it here."""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(sock_path)
        listener.listen()
        inode = os.stat(sock_path).st_ino
        srv = workers_server(sock_path, "event", 2, fd=listener.fileno())
        seen = set()
        for pid in _pids(srv):
            with _only(srv, pid):
                s, greeter = _greeted(sock_path)
            with s:
                assert _ask(s, b"activated") == b"activated"
            seen.add(greeter)
        assert seen == set(_pids(srv))
        srv.shutdown(DEADLINE)
        assert os.stat(sock_path).st_ino == inode  # systemd's file, left alone
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


def test_asyncio_loop_factory(sock_path: str, workers_server: Callable[..., Server]) -> None:
    """prefork_server(loop_factory=...): each worker's protocols run on a
    loop that factory made (uvloop here)."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed")

    class LoopName(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            loop = asyncio.get_running_loop()
            transport.write(f"{type(loop).__module__} {os.getpid()}\n".encode())
            transport.close()

    srv = unixsrv.asyncio.prefork_server(
        LoopName, ServerConfig(path=sock_path), workers=1, loop_factory=uvloop.new_event_loop
    )
    srv.start()
    try:
        with connect(sock_path) as s, s.makefile("rb") as f:
            module, pid = f.readline().split()
        assert module.startswith(b"uvloop") and int(pid) in _pids(srv)
    finally:
        srv.close()
    assert srv.wait(DEADLINE)


def test_socketserver_workers_bind_in_the_parent(sock_path: str) -> None:
    """unixsrv.socketserver with workers: server_bind() makes the socket file
    (mode first) in the parent, which accepts nothing; nothing is forked
    before serve_forever(); server_close() without serving removes the file.
    The class attribute works as the keyword does."""

    class Server2(unixsrv.socketserver.UnixStreamServer):
        workers = 2
        socket_mode = 0o600

    server = Server2(sock_path, _RequestHandler)
    try:
        assert server.supervisor is not None and server.supervisor.worker_stats() == []
        assert os.stat(sock_path).st_mode & 0o777 == 0o600
        assert server.fileno() == -1  # no queue in the parent: it serves nothing itself
        with connect(sock_path) as s:  # queued in the backlog, for the workers to come
            s.settimeout(0.2)
            with pytest.raises(TimeoutError):
                s.recv(1)
        assert server.stats()["accepted"] == 0
    finally:
        server.server_close()
    assert not os.path.exists(sock_path)
    assert server.supervisor.worker_stats() == []


def test_socketserver_workers_dropped_without_server_close(sock_path: str) -> None:
    """A workers= server garbage-collected without server_close() stops its
    supervisor and removes its socket file, with a ResourceWarning (as the
    single-process server does)."""
    import gc

    server = unixsrv.socketserver.UnixStreamServer(sock_path, _RequestHandler, workers=1)
    assert os.path.exists(sock_path)
    with pytest.warns(ResourceWarning, match="unclosed server"):
        del server
        gc.collect()
    assert not os.path.exists(sock_path)
