"""Shared fixtures and helpers for the unixsrv test suite.

Rules every test follows (see the README's "Testing" section):
- socket paths are short, under /tmp, unique per test and removed afterwards
  (``sock_path``);
- no sleep is used to synchronise: wait on an event or poll a condition with a
  deadline (``wait_until``);
- every server a test builds is closed when the test ends (``make_server``),
  every process it starts is ended by its PID (``spawn``).

Citations in test docstrings point at the repository's own docs:
"docs/design.md" (or "design") is the contract, "checklist N" is item N of
the final list in docs/reliability-checklist.md, "golib spec a.N / b.N / c /
d" and "W<n>" are sections and weaknesses in docs/golib-spec.md.

Platforms: the suite runs on Linux and macOS (CI).  A test (or one
parametrisation) that exercises a Linux-only facility carries
``@pytest.mark.linux("<the facility>")``; on any other platform
``pytest_collection_modifyitems`` skips it with a reason naming that facility,
on Linux the marker changes nothing.  Helpers here hide the differences that
are not the subject of a test (``fd_count``, ``connect``, ``make_room``,
``default_gid``).

Helpers used by more than one test module live here, once (the project rule:
no copy-paste twins): servers and clients (``serve_model``, ``start_echo``,
``connected``, ``listening_socket``, ``echo``, ``echo_once``,
``run_threads``, ``Timed``, ``shutdown_times_out``), idle timeouts
(``keep_talking``, ``idle_eof_after``), child processes (``read_line``,
``finish``, ``CHILD_LOG_LINES``, ``end_processes``, ``fork_quietly``,
``reap``, ``child_pids``, ``proc_stat``, the ``run_traced`` fixture), fds
(``open_fds``, ``fd_snapshot``, ``opened_since``, ``fd_identity``,
``is_listening``), CPU use
(``process_cpu_over``) and event-model protocols
(``Recorder``, ``Collect``, ``Echo``, ``BigWriter``, ``on_loop``,
``payload``, ``sha``, ``squash``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import gc
import hashlib
import os
import random
import resource
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import unixsrv
from unixsrv import Server, ServerClosedError, ServerConfig, ShutdownTimeoutError
from unixsrv.echo import EchoProtocol

# Ctrl-C as a terminal delivers it, whatever started the suite.  A
# non-interactive shell starts a background command (`cmd &`, nohup, a CI
# step's background job) with SIGINT and SIGQUIT ignored (POSIX sh,
# "Asynchronous Lists"), an ignored signal stays ignored across exec(2)
# (signal(7)), and CPython installs its KeyboardInterrupt handler only where
# SIGINT is not ignored: so every child a test starts would ignore the SIGINT
# that tests send as Ctrl-C (the README's serve_forever() examples never
# stopped).  A handled signal is reset to its default at exec, so handling it
# here gives every child the terminal's disposition.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: Generous bound for anything a test waits for; a healthy run needs far less.
#: UNIXSRV_TEST_DEADLINE raises it for slow runs (valgrind: about 10x slower).
DEADLINE = float(os.environ.get("UNIXSRV_TEST_DEADLINE", "10"))

#: True on Linux, where every test runs; elsewhere tests marked ``linux`` are skipped.
LINUX = sys.platform.startswith("linux")

#: Where this process's open fds are listed: /proc/self/fd on Linux, /dev/fd
#: (fdescfs) on macOS and the BSDs.
FD_DIR = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"

#: File descriptors the suite needs at once (1,000 clients and their server
#: ends in one process, plus slack).  macOS starts processes with a soft limit
#: of 256; Linux usually with 1,024 or more.
_NOFILE_WANTED = 4096


def pytest_configure(config: pytest.Config) -> None:
    """Raise the soft RLIMIT_NOFILE to _NOFILE_WANTED (never above the hard
    limit) if it is lower; a higher limit is left alone."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < _NOFILE_WANTED:
        want = _NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(hard, _NOFILE_WANTED)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):  # e.g. above macOS's kern.maxfilesperproc: keep the default
            pass


def _linux_reasons(item: pytest.Item) -> list[str]:
    """The facilities named by every ``linux`` marker on ``item`` (its own,
    its parametrisation's, its class's and its module's)."""
    reasons = []
    for marker in item.iter_markers("linux"):
        if (
            len(marker.args) != 1
            or marker.kwargs
            or not isinstance(marker.args[0], str)
            or not marker.args[0].strip()
        ):
            raise pytest.UsageError(
                f'{item.nodeid}: use @pytest.mark.linux("<the Linux-only facility>"), got args={marker.args!r} '
                f"kwargs={marker.kwargs!r}"
            )
        if marker.args[0] not in reasons:
            reasons.append(marker.args[0])
    return reasons


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``linux`` on other platforms, naming the facility,
    and tests marked ``root`` when not running as root.

    The markers are checked on every platform (a bare ``@pytest.mark.linux``
    is a usage error), so a malformed one is caught on Linux too; on Linux
    nothing is skipped."""
    for item in items:
        reasons = _linux_reasons(item)
        if reasons and not LINUX:
            reason = f"Linux-only facility, not on {sys.platform}: {'; '.join(reasons)}"
            item.add_marker(pytest.mark.skip(reason=reason))
        if item.get_closest_marker("root") is not None and os.geteuid() != 0:
            # chown to an arbitrary group and setuid()/setgid() in a forked
            # child need privileges; CI runners are not root, this machine is.
            item.add_marker(
                pytest.mark.skip(reason="needs root (uid 0) to change ownership or uid")
            )


def wait_until(
    predicate: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.002
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def process_cpu_over(seconds: float) -> float:
    """CPU time (user + system, every thread) this process uses while the
    calling thread waits `seconds`: what the server's threads burn in a
    window where nothing should happen.  CPU time, not wall time, so the
    bound a test puts on it holds on a loaded machine."""

    def used() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    start = used()
    time.sleep(seconds)  # the measured window itself, not a synchronisation
    return used() - start


def fd_count() -> int:
    """Open file descriptors of this process, as listed in FD_DIR."""
    return len(os.listdir(FD_DIR))


def connect_socket(s: socket.socket, path: str | bytes, timeout: float = DEADLINE) -> None:
    """``s.connect(path)``, waiting for room in a full listen backlog.

    On Linux this is exactly ``s.connect(path)``: a blocking connect(2) to a
    full backlog waits for room.  macOS and the BSDs refuse it at once with
    ECONNREFUSED, the same error as for a socket nobody listens on, so there
    a refused connect is retried until ``timeout``; a refusal that lasts that
    long is raised."""
    if LINUX:
        s.connect(path)
        return
    refused: list[ConnectionRefusedError] = []

    def attempt() -> bool:
        try:
            s.connect(path)
        except ConnectionRefusedError as exc:
            refused[:] = [exc]
            return False
        return True

    try:
        wait_until(attempt, timeout, interval=0.001)
    except AssertionError:
        raise refused[0] from None


def connect(path: str | bytes, timeout: float = DEADLINE) -> socket.socket:
    """A client socket connected to ``path``, with a timeout so no test hangs."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        connect_socket(s, path, timeout)
    except BaseException:
        s.close()
        raise
    return s


@contextlib.contextmanager
def connected(path: str | bytes, n: int) -> Iterator[list[socket.socket]]:
    """``n`` clients connected to ``path`` (as ``connect`` makes them), all
    closed at the end of the block, also those a test took out of the list."""
    clients: list[socket.socket] = []
    opened: list[socket.socket] = []
    try:
        for _ in range(n):
            opened.append(connect(path))
        clients.extend(opened)
        yield clients
    finally:
        for c in opened:
            c.close()


def make_room(s: socket.socket, n: int) -> None:
    """Let the connected ``s`` send ``n`` bytes its peer does not read (yet),
    so that a ``sendall`` of them cannot block.

    On Linux a no-op: the default AF_UNIX buffers (about 200 KiB in each
    direction, on top of what the peer keeps reading and echoing) have always
    sufficed for what the tests send that way.  On macOS the sender's
    SO_SNDBUF bounds the bytes in flight, 8 KiB by default
    (net.local.stream.sendspace), so it is raised to ``n``."""
    if not LINUX and s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < n:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, n)


def default_gid(directory: str) -> int:
    """The group a new file in ``directory`` gets when nobody chooses one: the
    process's group on Linux (``directory`` is never set-group-ID in these
    tests), the directory's group on macOS and the BSDs."""
    return os.getgid() if LINUX else os.stat(directory).st_gid


def recv_exactly(s: socket.socket, n: int) -> bytes:
    """Read exactly n bytes (fails on early EOF)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_eof(s: socket.socket) -> bytes:
    """Read until the server closes its side."""
    buf = bytearray()
    while chunk := s.recv(65536):
        buf += chunk
    return bytes(buf)


def echo_handler(conn: Any) -> None:
    """Blocking-model echo used by many tests."""
    while data := conn.read():
        conn.write(data)


# ---------------------------------------------------------------------------- servers and clients


def serve_model(
    make_server: Callable[..., Server],
    path: str | bytes,
    model: str,
    handler: Any,
    protocol: Any,
    **kwargs: Any,
) -> Server:
    """A server (from the ``make_server`` fixture) in ``model``: ``handler``
    for "blocking", the protocol factory ``protocol`` for "event".  ``kwargs``
    go to make_server (config fields, ``start=``, ``update_conn=``)."""
    if model == "blocking":
        return make_server(path, handler, **kwargs)
    return make_server(path, protocol=protocol, **kwargs)


def start_echo(
    make_server: Callable[..., Server], path: str | bytes, model: str, **kwargs: Any
) -> Server:
    """An echo server in ``model`` (golib's echoHandler): ``echo_handler`` or
    ``unixsrv.echo.EchoProtocol``; ``kwargs`` as for ``serve_model``."""
    return serve_model(make_server, path, model, echo_handler, EchoProtocol, **kwargs)


@contextlib.contextmanager
def listening_socket(path: str | bytes, backlog: int | None = None) -> Iterator[socket.socket]:
    """A plain AF_UNIX socket bound to ``path`` and listening: another
    server's socket, as far as unixsrv can tell.  Closed at the end of the
    block without unlinking, so its file is then a stale socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        if backlog is None:
            s.listen()
        else:
            s.listen(backlog)
        yield s
    finally:
        s.close()


def echo(s: socket.socket, msg: bytes) -> None:
    """One round trip on a connected client: ``msg`` must come back as is."""
    s.sendall(msg)
    assert recv_exactly(s, len(msg)) == msg


def echo_once(path: str | bytes, msg: bytes) -> None:
    """One round trip on a fresh connection (golib's sendAndReceive)."""
    with connect(path) as s:
        echo(s, msg)


#: How late an idle close may come and still pass: the timeout says "not
#: before", the loop thread may then wait for a CPU on a loaded 2-core machine
#: (the checklist's +-0.2 s would flake there).  Lower bounds stay exact.
IDLE_LATE = 1.0


def keep_talking(s: socket.socket, seconds: float, every: float) -> tuple[float, float]:
    """Keep the connected echo client ``s`` active: one echoed byte, then
    ``every`` s of think time (time passing is the behaviour, the sleep
    synchronises nothing), until ``seconds`` have passed; every echo must
    come back.  Returns ``(last_sent, longest_gap)``: the monotonic time
    just before the last byte was sent (the server cannot date the
    connection's last activity earlier) and the longest silence between an
    echo received and the next byte sent (for failure messages: a stall of
    the test process, not the server, is what could exceed the timeout)."""
    began = time.monotonic()
    longest = 0.0
    while True:
        last_sent = time.monotonic()
        echo(s, b"k")
        answered = time.monotonic()
        if answered - began >= seconds:
            return last_sent, longest
        time.sleep(every)
        longest = max(longest, time.monotonic() - answered)


def idle_eof_after(s: socket.socket, last_active: float, idle: float) -> float:
    """Read the silent client ``s`` to EOF (the server sends nothing more)
    and return the seconds from ``last_active`` (a monotonic time no later
    than the connection's last byte) to the EOF: never less than ``idle``
    (the timeout counts from the last byte), at most ``idle + IDLE_LATE``."""
    assert recv_until_eof(s) == b""
    elapsed = time.monotonic() - last_active
    assert idle <= elapsed <= idle + IDLE_LATE, (
        f"idle close {elapsed:.3f} s after the last byte (timeout {idle} s)"
    )
    return elapsed


def run_threads(target: Callable[[int], Any], n: int, timeout: float = DEADLINE) -> list[Any]:
    """Run target(i) on n threads released at once by a barrier; return the
    results in order (an exception a call raised is its result).  Fails if a
    thread is still running ``timeout`` s after the ones before it ended."""
    results: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            barrier.wait(DEADLINE)
            results[i] = target(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive()
    return results


class Timed(threading.Thread):
    """Run fn on a thread (a daemon, so a hung call cannot hang the run);
    remember its exception, how long it took (``elapsed``) and the
    monotonic time it ended (``ended``)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.exc: BaseException | None = None
        self.elapsed = -1.0
        self.ended = -1.0

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self.fn()
        except BaseException as exc:
            self.exc = exc
        finally:
            self.ended = time.monotonic()
            self.elapsed = self.ended - t0


def shutdown_times_out(srv: Server, timeout: float) -> float:
    """``srv.shutdown(timeout)``, which must raise ShutdownTimeoutError; the
    seconds it took (each test bounds them as its source requires)."""
    t0 = time.monotonic()
    with pytest.raises(ShutdownTimeoutError):
        srv.shutdown(timeout=timeout)
    return time.monotonic() - t0


# ---------------------------------------------------------------------------- child processes


#: Put first in a child's code: every record of the library's loggers
#: ("unixsrv", "unixsrv.*", DEBUG and up) becomes one stdout line
#: "LOG <LEVEL> <message>" (no traceback), in order with the child's prints.
CHILD_LOG_LINES = textwrap.dedent(
    """
    import logging as _logging, os as _os, sys as _sys
    class _Lines(_logging.Handler):
        def emit(self, record):  # one write(2) a line: records may come from several threads
            _sys.stdout.flush()
            _os.write(1, ("LOG %s %s\\n" % (record.levelname, record.getMessage())).encode())
    _logging.getLogger("unixsrv").setLevel(_logging.DEBUG)
    _logging.getLogger("unixsrv").addHandler(_Lines())
    """
)


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def _exit_report(proc: subprocess.Popen[Any]) -> str:
    """How a child that closed its stdout ended: exit code and stderr."""
    try:
        code = proc.wait(DEADLINE)
    except subprocess.TimeoutExpired:
        return "; it is still running"
    err = proc.stderr.read() if proc.stderr is not None else ""
    return f"; it exited ({code}); stderr:\n{_text(err)}"


def read_line(proc: subprocess.Popen[Any], timeout: float = DEADLINE) -> str:
    """The next line a child printed, without its newline; fails instead of
    hanging if none arrives within ``timeout`` (and shows the child's stderr
    if it exited first).

    Reads the stdout pipe's fd into a buffer kept on ``proc``, so it works for
    a Popen in text or bytes mode alike, and a line that arrived together with
    the previous one is never waited for again (select() cannot see what a
    file object has buffered).  ``finish`` picks up what is left in it."""
    assert proc.stdout is not None
    buf: bytearray = proc.__dict__.setdefault("_linebuf", bytearray())
    end = time.monotonic() + timeout
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"no line from pid {proc.pid} within {timeout} s (so far {bytes(buf)!r})"
            )
        if select.select([proc.stdout], [], [], left)[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(
                    f"pid {proc.pid} closed its stdout before a line{_exit_report(proc)}"
                )
            buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


def finish(proc: subprocess.Popen[Any], timeout: float = DEADLINE) -> tuple[int, str, str]:
    """Let a child end by itself: close its stdin (the signal to stop for the
    children that serve until stdin closes), read the rest of its output and
    wait; (exit code, stdout, stderr) as text.  Raises TimeoutExpired if it
    does not exit within ``timeout`` (the fixture that started it kills it)."""
    out, err = proc.communicate(timeout=timeout)
    unread = bytes(proc.__dict__.pop("_linebuf", b""))  # read by read_line, not returned yet
    return proc.returncode, unread.decode(errors="replace") + _text(out), _text(err)


def end_processes(procs: list[subprocess.Popen[Any]], *, children_first: bool = False) -> None:
    """Teardown of the fixtures that start processes: kill each one still
    running by its PID (its own children first with ``children_first``),
    reap it and close its pipes."""
    for proc in procs:
        if proc.poll() is None:
            if children_first:
                for child in child_pids(proc.pid):
                    with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
                        os.kill(child, signal.SIGKILL)
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(DEADLINE)
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                stream.close()


def fork_quietly() -> int:
    """os.fork() without Python 3.12's "multi-threaded fork" DeprecationWarning
    (warnings are errors here; the child only runs fork-safe code)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def reap(pid: int, timeout: float = DEADLINE) -> int:
    """Wait for a forked child (without hanging) and return its exit code;
    kills it by PID if it does not finish in time."""
    status: list[int] = []

    def done() -> bool:
        got, st = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            status.append(st)
        return bool(status)

    try:
        wait_until(done, timeout)
    finally:
        if not status:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status[0])


def env_without_preload() -> dict[str, str]:
    """This environment less LD_PRELOAD, for the system tools a test runs
    (curl, pgrep): built without ASan, they die or hang under the suite's
    inherited ASan preload."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def env_for_child(**extra: str) -> dict[str, str]:
    """This environment (plus ``extra``) with the directory of the unixsrv
    under test first on PYTHONPATH, as an absolute path: a child started in
    another working directory imports the same package (a relative
    PYTHONPATH such as "src" would name another directory there)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(unixsrv.__file__)))
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def child_pids(pid: int | None = None) -> set[int]:
    """PIDs of the children of ``pid`` (default: this process), live or
    unreaped, as ``pgrep -P`` lists them (Linux and macOS)."""
    env = env_without_preload()
    parent = os.getpid() if pid is None else pid
    out = subprocess.run(
        ["pgrep", "-P", str(parent)], capture_output=True, text=True, check=False, env=env
    )
    return {int(p) for p in out.stdout.split()}


def proc_stat(pid: int, tid: int | None = None) -> list[str]:
    """The fields of /proc/<pid>/stat (or of thread ``tid``'s
    /proc/<pid>/task/<tid>/stat) after the command name: [0] is the state
    ('t' = stopped by a tracer), [1] the parent PID, [11] and [12] utime and
    stime in clock ticks.  Linux only (tests using it are marked ``linux``)."""
    where = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(where) as f:
        return f.read().rsplit(")", 1)[1].split()


# ---------------------------------------------------------------------------- fds


def open_fds() -> set[int]:
    """The fds open in this process now (without the one listdir used)."""
    fds = set()
    for name in os.listdir(FD_DIR):
        fd = int(name)
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue
        fds.add(fd)
    return fds


def fd_snapshot() -> dict[int, tuple[int, int, int] | None]:
    """The fds open now, each with what it refers to (fd_identity), taken
    after a garbage collection: an object an earlier test left unreachable
    would otherwise close its fd in the middle of a count, and the number,
    reused by the code under test, would look old.  See opened_since()."""
    gc.collect()
    return {fd: _identity_or_none(fd) for fd in open_fds()}


def opened_since(snapshot: dict[int, tuple[int, int, int] | None]) -> set[int]:
    """The fds open now that were not in ``snapshot``: new numbers, and old
    numbers that refer to another file now (closed and reused since)."""
    return {fd for fd in open_fds() if fd not in snapshot or snapshot[fd] != _identity_or_none(fd)}


def _identity_or_none(fd: int) -> tuple[int, int, int] | None:
    try:
        return fd_identity(fd)
    except OSError:  # closed meanwhile
        return None


def fd_identity(fd: int) -> tuple[int, int, int]:
    """What an fd refers to: (file type, st_dev, st_ino) from fstat.  For a
    socket on Linux st_ino is the N of its /proc link "socket:[N]"."""
    st = os.fstat(fd)
    return stat.S_IFMT(st.st_mode), st.st_dev, st.st_ino


def is_listening(fd: int) -> bool:
    """True if the socket ``fd`` is a listening one (SO_ACCEPTCONN)."""
    s = socket.socket(fileno=fd)
    try:
        return bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    finally:
        s.detach()


# ---------------------------------------------------------------------------- event model

KiB = 1024
MiB = 1024 * KiB


def payload(n: int, seed: int = 1) -> bytes:
    """n deterministic pseudo-random bytes (no repeating pattern to hide a
    reordered or duplicated chunk)."""
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def squash(names: list[str]) -> list[str]:
    """Collapse runs of 'data' into one entry."""
    return [n for i, n in enumerate(names) if n != "data" or i == 0 or names[i - 1] != "data"]


def outcome(call: Callable[[], Any], expected: type[BaseException]) -> str:
    """What ``call()`` did, for a protocol to record on the loop thread:
    ``expected``'s name if it raised that, "accepted" if it returned, the
    repr of any other exception."""
    try:
        call()
    except expected:
        return expected.__name__
    except BaseException as exc:
        return repr(exc)
    return "accepted"


def on_loop(srv: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(*args) on the server's loop thread, wait, return its result
    (re-raising its exception here).  Also a barrier: when it returns, the
    loop has completed at least one full iteration after this call."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def task() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # handed back to the test thread
            box["error"] = exc
        finally:
            done.set()

    srv.call_soon_threadsafe(task)
    assert done.wait(DEADLINE), "the loop did not run a queued callback"
    if "error" in box:
        raise box["error"]
    return box.get("result")


class Recorder(asyncio.Protocol):
    """An asyncio.Protocol that records every callback (name, argument) and
    the thread it ran on.  ``keep_open`` is what eof_received returns."""

    def __init__(self, keep_open: Any = None) -> None:
        self.keep_open = keep_open
        self.log: list[tuple[str, Any]] = []
        self.threads: set[int] = set()
        self.transport: Any = None
        self.made = threading.Event()
        self.eof = threading.Event()
        self.lost = threading.Event()

    def _rec(self, name: str, arg: Any = None) -> None:
        self.threads.add(threading.get_ident())
        self.log.append((name, arg))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.log]

    @property
    def received(self) -> bytes:
        return b"".join(arg for name, arg in self.log if name == "data")

    def lost_calls(self) -> list[Any]:
        return [arg for name, arg in self.log if name == "lost"]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._rec("made", transport)
        self.on_made(transport)
        self.made.set()  # after on_made: tests may inspect what it did

    def on_made(self, transport: Any) -> None:
        """What a subclass does in connection_made."""

    def data_received(self, data: bytes) -> None:
        self._rec("data", data)

    def eof_received(self) -> Any:
        self._rec("eof")
        self.eof.set()
        return self.keep_open

    def connection_lost(self, exc: BaseException | None) -> None:
        self._rec("lost", exc)
        self.lost.set()


class Collect:
    """A protocol factory that keeps every protocol it built."""

    def __init__(self, cls: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.cls, self.args, self.kwargs = cls, args, kwargs
        self.built: list[Any] = []

    def __call__(self) -> Any:
        proto = self.cls(*self.args, **self.kwargs)
        self.built.append(proto)
        return proto

    def one(self) -> Any:
        """The first protocol, once its connection_made ran."""
        wait_until(lambda: self.built)
        proto = self.built[0]
        assert proto.made.wait(DEADLINE)
        return proto


class Echo(asyncio.Protocol):
    """The asyncio docs' echo, without the close after one message (plain
    asyncio code, unlike unixsrv.echo.EchoProtocol)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class BigWriter(Recorder):
    """Writes `data` in connection_made, then does `then` ('close'/'abort')."""

    def __init__(self, data: bytes, then: str | None = None) -> None:
        super().__init__()
        self.data = data
        self.then = then
        self.after: list[str] = []

    def on_made(self, transport: Any) -> None:
        transport.write(self.data)
        self.buffered = transport.get_write_buffer_size()
        if self.then:
            getattr(transport, self.then)()
            self.closing = transport.is_closing()
            self.reading = transport.is_reading()
            self.after.append(outcome(lambda: transport.write(b"late"), ServerClosedError))


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A fresh private directory under /tmp, removed afterwards."""
    d = tempfile.mkdtemp(prefix="us-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    """A short, unique socket path (the file does not exist yet)."""
    return os.path.join(sock_dir, "s.sock")


@pytest.fixture
def make_server() -> Iterator[Callable[..., Server]]:
    """Build servers that are closed when the test ends.

    ``make_server(path_or_config, handler=None, *, protocol=None, start=True,
    update_conn=None, **config_fields)``.
    """
    servers: list[Server] = []

    def factory(
        config: str | ServerConfig,
        handler: Any = None,
        *,
        protocol: Any = None,
        start: bool = True,
        update_conn: Any = None,
        **fields: Any,
    ) -> Server:
        cfg = config if isinstance(config, ServerConfig) else ServerConfig(path=config, **fields)
        srv = Server(cfg, handler, protocol=protocol, update_conn=update_conn)
        servers.append(srv)
        if start:
            srv.start()
        return srv

    yield factory
    for srv in servers:
        srv.close()
        assert srv.wait(DEADLINE), f"{srv!r} did not stop"


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start Python subprocesses that are killed (by PID) when the test ends."""
    procs: list[subprocess.Popen[str]] = []

    def factory(code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = subprocess.Popen([sys.executable, "-c", code, *args], **kwargs)
        procs.append(proc)
        return proc

    yield factory
    end_processes(procs)


def strace_unusable(strace: str = "strace") -> str | None:
    """Why ``strace`` cannot trace here (not installed, or ptrace forbidden:
    a container without CAP_SYS_PTRACE, Yama's ptrace_scope 3), or None if
    it can: the probe traces ``true`` as the tests trace Python, with -f."""
    if shutil.which(strace) is None:
        return f"{strace} is not installed"
    try:
        probe = subprocess.run(
            [strace, "-f", "-qq", "-o", "/dev/null", "true"],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{strace} cannot run: {exc}"
    if probe.returncode != 0:
        why = " ".join(probe.stderr.split()) or f"exit status {probe.returncode}"
        return f"{strace} cannot trace here (ptrace forbidden?): {why}"
    return None


@functools.cache
def strace_reason() -> str | None:
    """``strace_unusable()`` for this machine's strace, probed once per run."""
    return strace_unusable()


@pytest.fixture
def run_traced() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Run ``python -c code`` under strace (for syscall delay and error
    injection): ``run_traced(strace_args, code, *args, **popen_kwargs)``;
    stdout, stderr and stdin are pipes unless given.  The first call skips
    the test, with the reason, where strace is missing or cannot trace
    (``strace_unusable``, probed once per run).

    Killing strace would only detach its tracee, so teardown kills the
    traced Python child by its PID first, then strace by its PID.
    """
    procs: list[subprocess.Popen[bytes]] = []

    def factory(
        strace_args: list[str], code: str, *args: str, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        reason = strace_reason()
        if reason is not None:
            pytest.skip(reason)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("stdin", subprocess.PIPE)
        argv = [
            "strace",
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            *strace_args,
            sys.executable,
            "-c",
            code,
            *args,
        ]
        proc = subprocess.Popen(argv, **kwargs)
        procs.append(proc)
        return proc

    yield factory
    end_processes(procs, children_first=True)


@pytest.fixture(params=["blocking", "event"])
def model(request: pytest.FixtureRequest) -> str:
    """Run a test once per handler model."""
    return str(request.param)


@pytest.fixture
def echo_server(model: str, sock_path: str, make_server: Callable[..., Server]) -> Server:
    """A started echo server in the model under test."""
    return start_echo(make_server, sock_path, model)


#: The names docs/design.md fixes ("names are fixed; add more, but do not rename these").
DESIGN_NAMES = [
    "ServerConfig",
    "Server",
    "Connection",
    "Protocol",
    "Transport",
    "ConnState",
    "PeerCredentials",
    "UnixSrvError",
    "ConfigError",
    "InvalidPathError",
    "InvalidGroupError",
    "InvalidHandlerError",
    "AddressInUseError",
    "ShutdownTimeoutError",
    "ServerClosedError",
]
