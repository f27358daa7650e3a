"""Shared pieces of the benchmarks: the servers under test, starting and
ending them by PID, the load generator (``python -m unixsrv bench``), and
readings from /proc.

Used by run.py (the comparison), scale.py (connection scale) and
test_micro.py (pytest-benchmark).  Linux only (/proc, epoll).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from unixsrv.bench import echo_server_argv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.path.join(HERE, ".build")
C_SOURCE = os.path.join(HERE, "echo_epoll.c")
C_BINARY = os.path.join(BUILD, "echo_epoll")
HTTP_LOAD_SOURCE = os.path.join(HERE, "http_load.c")
HTTP_LOAD_BINARY = os.path.join(BUILD, "http_load")
PEERS = os.path.join(HERE, "peers.py")
PYTHON = sys.executable
BACKLOG = 4096
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: name -> short description, in the order of the reports.
SERVERS: dict[str, str] = {
    "unixsrv-event": "unixsrv, event model (`serve --echo --model event`)",
    "unixsrv-blocking": "unixsrv, blocking model (`serve --echo --model blocking`)",
    "uvloop-protocol": "uvloop, asyncio.Protocol echo",
    "uvloop-streams": "uvloop, start_unix_server + reader/writer",
    "asyncio-protocol": "asyncio (default loop), asyncio.Protocol echo",
    "asyncio-streams": "asyncio (default loop), start_unix_server + reader/writer",
    "socketserver": "socketserver.ThreadingUnixStreamServer, recv(65536) + sendall",
    "c-epoll": "minimal C epoll echo (level-triggered, accept4 until EAGAIN): the reference",
    "unixsrv.asyncio-protocol": "unixsrv.asyncio.create_unix_server hosted on asyncio, the asyncio.Protocol echo",
    "unixsrv.asyncio-uvloop-protocol": "unixsrv.asyncio.create_unix_server hosted on uvloop, the same Protocol",
    "unixsrv.asyncio-streams": "unixsrv.asyncio.start_unix_server hosted on asyncio, the same reader/writer echo",
    "unixsrv.asyncio-uvloop-streams": "unixsrv.asyncio.start_unix_server hosted on uvloop, the same streams echo",
    "uvicorn-asyncio": "uvicorn (httptools) hello-world ASGI app, uds=, on the default asyncio loop",
    "uvicorn-uvloop": "uvicorn (httptools) hello-world ASGI app, uds=, on uvloop",
    "unixsrv.asyncio-uvicorn-asyncio": "the same uvicorn app on unixsrv.asyncio.new_event_loop() (asyncio base)",
    "unixsrv.asyncio-uvicorn-uvloop": "the same uvicorn app on unixsrv.asyncio.new_event_loop(uvloop.Loop)",
    "unixsrv-socketserver": "unixsrv.socketserver.ThreadingUnixStreamServer, the same handler as `socketserver`",
}

#: The servers that speak HTTP (load: http_load.c), not echo (load: unixsrv bench).
HTTP_SERVERS = frozenset(
    {
        "uvicorn-asyncio",
        "uvicorn-uvloop",
        "unixsrv.asyncio-uvicorn-asyncio",
        "unixsrv.asyncio-uvicorn-uvloop",
    }
)


def compile_c(source: str, binary: str, cc: str = "cc") -> str:
    """Compile `source` with ``cc -O2`` into `binary` (when the source is
    newer than the binary); returns the binary's path."""
    os.makedirs(BUILD, exist_ok=True)
    if not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(source):
        tmp = f"{binary}.{os.getpid()}"
        subprocess.run([cc, "-O2", "-Wall", "-o", tmp, source], check=True)
        os.replace(tmp, binary)
    return binary


def compile_c_server(cc: str = "cc") -> str:
    """The C reference server (echo_epoll.c), compiled into .build/."""
    return compile_c(C_SOURCE, C_BINARY, cc)


def compile_http_load(cc: str = "cc") -> str:
    """The HTTP load generator (http_load.c), compiled into .build/."""
    return compile_c(HTTP_LOAD_SOURCE, HTTP_LOAD_BINARY, cc)


def server_argv(name: str, path: str) -> list[str]:
    """The command line of server `name` listening on `path`."""
    if name in ("unixsrv-event", "unixsrv-blocking"):
        model = name.split("-", 1)[1]
        return [*echo_server_argv(path, model, PYTHON), "--backlog", str(BACKLOG)]
    if name == "c-epoll":
        return [C_BINARY, path, str(BACKLOG)]
    if name in SERVERS:
        return [PYTHON, PEERS, name, path, "--backlog", str(BACKLOG)]
    raise ValueError(f"unknown server {name!r}")


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children
    inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ------------------------------------------------------------------ /proc


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of process `pid` (all threads) in seconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (empty when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return {}


def vmrss_kib(pid: int) -> int | None:
    """Resident set size of `pid` in KiB (VmRSS)."""
    value = proc_status(pid).get("VmRSS")
    return int(value.split()[0]) if value else None


def threads(pid: int) -> int | None:
    value = proc_status(pid).get("Threads")
    return int(value) if value else None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def settled_rss(pid: int, timeout: float = 5.0, interval: float = 0.1) -> int | None:
    """VmRSS once it stops changing: two readings `interval` apart that agree
    within 0.1 % (or the last reading after `timeout`)."""
    end = time.monotonic() + timeout
    last = vmrss_kib(pid)
    while time.monotonic() < end:
        time.sleep(interval)
        now = vmrss_kib(pid)
        if now is None or last is None:
            return now
        if abs(now - last) <= max(4, last // 1000):
            return now
        last = now
    return last


@dataclass
class CpuSnapshot:
    """Machine-wide CPU (from /proc/stat, in seconds) and the CPU of this
    process's reaped children: the difference between two snapshots, minus
    what the processes we know about used, is everyone else's load."""

    wall: float
    busy: float
    steal: float
    children: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        with open("/proc/stat", encoding="ascii") as f:
            parts = f.readline().split()[1:]
        v = [int(x) for x in parts] + [0] * 10
        user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(
            time.monotonic(),
            (user + nice + system + irq + softirq) / CLK_TCK,
            steal / CLK_TCK,
            ru.ru_utime + ru.ru_stime,
        )


# ------------------------------------------------------------------ servers


@dataclass
class RunningServer:
    name: str
    path: str
    proc: subprocess.Popen[bytes]
    log_path: str
    sock_dir: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""


def end_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> int | None:
    """End a child by its PID: SIGTERM, SIGKILL after `grace` s; reap it."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def running_server(
    name: str,
    log_dir: str | None = None,
    ready_timeout: float = 20.0,
    preexec: Any = None,
    extra_args: Sequence[str] = (),
) -> Iterator[RunningServer]:
    """Start server `name` on a fresh socket under /tmp, wait until its
    socket file exists (every server here creates it only once it listens),
    yield it, then end it by PID and remove the socket directory.
    `extra_args` are appended to its command line (unixsrv options)."""
    sock_dir = tempfile.mkdtemp(prefix="ubench-", dir="/tmp")
    path = os.path.join(sock_dir, "echo.sock")
    log_dir = log_dir or os.path.join(BUILD, "logs")
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{name}.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [*server_argv(name, path), *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=ROOT,
            preexec_fn=preexec,
        )
    server = RunningServer(name, path, proc, log_path, sock_dir)
    try:
        end = time.monotonic() + ready_timeout
        while not os.path.exists(path):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {proc.returncode}: {server.log_tail()}"
                )
            if time.monotonic() > end:
                raise RuntimeError(f"{name} did not create its socket within {ready_timeout} s")
            time.sleep(0.01)
        yield server
    finally:
        end_process(proc)
        shutil.rmtree(sock_dir, ignore_errors=True)


# ------------------------------------------------------------------ the generator


def bench_argv(
    path: str,
    *,
    mode: str = "pingpong",
    connections: int = 1,
    size: int = 64,
    pipeline: int = 1,
    duration: float | None = None,
    requests: int | None = None,
    warmup: float = 0.5,
    processes: int = 1,
    server_pid: int | None = None,
    connect_timeout: float = 60.0,
    stall_timeout: float = 10.0,
) -> list[str]:
    argv = [
        PYTHON,
        "-m",
        "unixsrv",
        "--log-level",
        "WARNING",
        "bench",
        path,
        "--json",
        "--quiet",
        "--mode",
        mode,
        "--connections",
        str(connections),
        "--size",
        str(size),
        "--pipeline",
        str(pipeline),
        "--warmup",
        repr(warmup),
        "--processes",
        str(processes),
        "--connect-timeout",
        repr(connect_timeout),
        "--stall-timeout",
        repr(stall_timeout),
    ]
    if duration is not None:
        argv += ["--duration", repr(duration)]
    if requests is not None:
        argv += ["--requests", str(requests)]
    if server_pid is not None:
        argv += ["--server-pid", str(server_pid)]
    return argv


class BenchError(RuntimeError):
    pass


def cpu_split(cpus: Sequence[int] | None = None) -> tuple[frozenset[int], frozenset[int]]:
    """The CPUs the server and the load generator are pinned to: the lowest
    and the highest CPU this process may run on (of `cpus`, default
    sched_getaffinity), so they never share one where there are two or more.
    With a single CPU both get it.  One CPU for the server, whatever the
    machine: a threaded server then pays its GIL hand-offs on one CPU, as
    the event-loop servers pay theirs, and the rows stay comparable from a
    2-CPU VM to a large host."""
    allowed = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if not allowed:
        raise ValueError("no CPU to run on")
    return frozenset({allowed[0]}), frozenset({allowed[-1]})


class Pin:
    """preexec_fn for subprocess.Popen: run the child on `cpus`
    (sched_setaffinity(2); the child's threads inherit the mask)."""

    def __init__(self, cpus: frozenset[int]) -> None:
        self.cpus = cpus

    def __call__(self) -> None:
        os.sched_setaffinity(0, self.cpus)

    def __repr__(self) -> str:
        return f"Pin({sorted(self.cpus)})"


def run_http_load(
    path: str,
    timeout: float,
    preexec: Any = None,
    *,
    connections: int,
    duration: float,
    warmup: float,
    server_pid: int | None = None,
    requests: int | None = None,
) -> dict[str, Any]:
    """One http_load.c run (keep-alive GET / on `connections` connections);
    its JSON result, with the keys run_bench's result has for ping-pong."""
    argv = [
        HTTP_LOAD_BINARY,
        path,
        str(connections),
        repr(duration),
        repr(warmup),
        str(server_pid or 0),
    ]
    if requests is not None:
        argv.append(str(requests))
    return _json_result(argv, timeout, preexec)


#: Seconds of connect -> 64 B echo -> close traffic every server gets before
#: it is measured (see prime()).
PRIME_SECONDS = 0.2


def prime(name: str, path: str, preexec: Any = None, seconds: float = PRIME_SECONDS) -> None:
    """Prime a fresh server before it is measured: `seconds` of new
    connections on 8 slots, each doing one exchange and closing (for an HTTP
    server 8 keep-alive connections for that long, then closed).  Lazy
    imports, first allocations and first-connection paths are then behind
    every server alike, and so is glibc's allocator adapting to the server's
    read buffers: asyncio reads with recv(256 KiB), above malloc's initial
    128 KiB mmap threshold, so each read is an mmap/munmap pair until a
    chunk that large is freed whole, which raises the threshold (mallopt(3),
    M_MMAP_THRESHOLD: "dynamic"); a read that returns EOF does that, a
    ping-pong read (shrunk to its 64 bytes first) never does, and a fresh
    asyncio server runs several times slower until then."""
    if name in HTTP_SERVERS:
        run_http_load(
            path, timeout=60.0, preexec=preexec, connections=8, duration=seconds, warmup=0.0
        )
    else:
        run_bench(
            path,
            timeout=60.0,
            preexec=preexec,
            mode="connect",
            connections=8,
            duration=seconds,
            warmup=0.0,
        )


def run_bench(path: str, timeout: float, preexec: Any = None, **options: Any) -> dict[str, Any]:
    """One ``unixsrv bench --json`` run; returns its result object (exit
    status 1 = errors were counted: the result still comes back, with
    ``errors`` > 0).  Raises BenchError when it produced no result."""
    return _json_result(bench_argv(path, **options), timeout, preexec)


def _spawn_generator(argv: list[str], stdin: int, preexec: Any) -> subprocess.Popen[bytes]:
    """A load generator (unixsrv bench or http_load) with its stdout and
    stderr piped, run from the repository's root."""
    return subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        preexec_fn=preexec,
    )


def _json_result(argv: list[str], timeout: float, preexec: Any) -> dict[str, Any]:
    """Run a generator that prints its result as a JSON line (exit status 1 =
    errors were counted: the result still comes back)."""
    proc = _spawn_generator(argv, subprocess.DEVNULL, preexec)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_process(proc, grace=5.0)
        out, err = proc.communicate()
        raise BenchError(
            f"generator did not finish within {timeout} s: {err.decode()[-500:]}"
        ) from None
    finally:
        end_process(proc)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if proc.returncode not in (0, 1) or not lines:
        raise BenchError(f"generator exited {proc.returncode}: {err.decode()[-1000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@dataclass
class Hold:
    """A running ``bench --mode hold`` generator (see hold())."""

    proc: subprocess.Popen[bytes]
    established: dict[str, Any]
    result: dict[str, Any] | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)


def _read_json_line(
    proc: subprocess.Popen[bytes], deadline: float, buf: bytearray
) -> dict[str, Any] | None:
    """The next JSON line of proc's stdout before `deadline` (None: EOF or
    the deadline passed)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            nl = buf.find(b"\n")
            if nl >= 0:
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                if line.startswith(b"{"):
                    obj: dict[str, Any] = json.loads(line)
                    return obj
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            buf += chunk


@contextlib.contextmanager
def hold(
    path: str,
    connections: int,
    *,
    processes: int = 1,
    server_pid: int | None = None,
    size: int = 64,
    max_hold: float = 300.0,
    connect_timeout: float = 120.0,
    preexec: Any = None,
) -> Iterator[Hold]:
    """Open `connections` connections with ``bench --mode hold`` (each does one
    verified round trip), yield once all are established, then end the hold
    (EOF on the generator's stdin) and collect its result into
    ``Hold.result``.  The hold is bounded by `max_hold` seconds anyway, and
    the generator is ended by PID whatever happens.  `preexec`: as for
    running_server (a Pin)."""
    argv = bench_argv(
        path,
        mode="hold",
        connections=connections,
        size=size,
        duration=max_hold,
        processes=processes,
        server_pid=server_pid,
        connect_timeout=connect_timeout,
        warmup=0.0,
    )
    proc = _spawn_generator(argv, subprocess.PIPE, preexec)
    buf = bytearray()
    try:
        deadline = time.monotonic() + connect_timeout + 30.0
        first = _read_json_line(proc, deadline, buf)
        if first is None or first.get("event") != "established":
            end_process(proc, grace=5.0)
            assert proc.stderr is not None
            raise BenchError(
                f"hold: no 'established' line (exit {proc.returncode}): "
                f"{first} {proc.stderr.read().decode()[-1000:]}"
            )
        h = Hold(proc, first)
        yield h
        assert proc.stdin is not None
        proc.stdin.close()
        last = _read_json_line(proc, time.monotonic() + 60.0, buf)
        h.result = last
    finally:
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
        end_process(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def describe_cmd(argv: Sequence[str]) -> str:
    return " ".join(argv)
