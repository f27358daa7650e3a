"""``unixsrv bench``: a load generator for any Unix stream socket server.

The work is done by :class:`unixsrv._loadgen.LoadGen` (its own extension): one
thread, non-blocking AF_UNIX sockets, an epoll/kqueue loop in C with the GIL
released for the whole run, every echoed byte checked against the bytes sent.
This module adds the options, the multi-process mode, the built-in echo
servers, the progress line and the report.

Modes:

``pingpong``
    N connections each keep P messages of S bytes in flight; a message's
    latency runs from its send to the arrival of its last echoed byte.
``connect``
    N concurrent slots each loop connect -> send S bytes -> read the echo ->
    close; reports connects (cycles) per second and the cycle latency.
``hold``
    Open N connections, do one verified round trip on each, print a JSON line
    ``{"event": "established", ...}``, then keep them open until the duration
    passes (0 = no time limit), stdin reaches EOF, or SIGINT/SIGTERM.

Every run is bounded: ``--duration`` seconds of measurement (default 5 s,
after ``--warmup`` seconds) and/or ``--requests`` round trips; with only
``--requests`` the run ends anyway when no round trip completes for
``--stall-timeout`` seconds.  SIGINT/SIGTERM end a run early and still report.

CPU: ``client_cpu_s`` is the generator's own CPU time (getrusage of each
generator process, summed over ``--processes``) over the measured window;
``client_cpu_share`` is that divided by the window's wall time (1.0 = one
core busy).  With ``--server-pid`` the server's utime+stime over the same
window is read from ``/proc/PID/stat`` (all its threads); with several
processes, the first generator process measures it over its window.

Output: a human report, or with ``--json`` one JSON object per run on one line
(JSON Lines: with no PATH there is one line per built-in server model).  The
exit status is 0, or 1 when any error (mismatch, early EOF, failed connect,
stall) was counted, or 2 when the run could not happen at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import _loadgen
from .errors import ConfigError

__all__ = [
    "RESULT_KEYS",
    "BenchOptions",
    "add_bench_parser",
    "format_summary",
    "run",
    "run_builtin",
]

#: The keys of every result object (``--json``), in order; more may follow.
RESULT_KEYS = (
    "path",
    "mode",
    "connections",
    "size",
    "pipeline",
    "processes",
    "duration_s",
    "round_trips",
    "round_trips_per_s",
    "mb_per_s",
    "latency_us",
    "errors",
    "verified_bytes",
    "client_cpu_s",
    "client_cpu_share",
    "server_cpu_s",
    "server_cpu_us_per_rt",
)

MODES = ("pingpong", "connect", "hold")
Progress = Callable[[dict[str, Any]], None]

# File descriptors a generator process needs besides its connections.
_FD_SLACK = 64


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What to run.  ``duration`` None means 5 s, or no time bound when
    ``requests`` is given (the stall timeout still applies); 0 means no time
    bound (hold: hold until stdin EOF or a signal)."""

    path: str | None = None
    mode: str = "pingpong"
    connections: int = 1
    size: int = 64
    pipeline: int = 1
    duration: float | None = None
    requests: int | None = None
    warmup: float = 0.5
    processes: int = 1
    server_pid: int | None = None
    connect_timeout: float = 30.0
    connect_rate: float = 0.0
    stall_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        for name in ("connections", "size", "pipeline", "processes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for name in ("warmup", "connect_rate", "stall_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.connect_timeout <= 0:
            raise ConfigError("connect_timeout must be positive")
        if self.duration is not None and self.duration < 0:
            raise ConfigError("duration must not be negative")
        if self.requests is not None and self.requests < 1:
            raise ConfigError("requests must be at least 1")
        if self.processes > self.connections:
            raise ConfigError("processes must not exceed connections")
        if self.requests is not None and self.requests < self.processes:
            raise ConfigError("requests must be at least processes")
        if self.path is not None and not os.fsencode(self.path):
            raise ConfigError("empty socket path")

    @property
    def run_duration(self) -> float:
        """Seconds to measure (hold: to hold); 0 = no time bound."""
        if self.duration is not None:
            return self.duration
        return 0.0 if self.requests else 5.0


# ---------------------------------------------------------------- running


def run(
    options: BenchOptions,
    *,
    progress: Progress | None = None,
    on_established: Progress | None = None,
    stop_fd: int = -1,
    watch_fd: int = -1,
) -> dict[str, Any]:
    """Run one benchmark against ``options.path``; return the result object.

    ``progress(info)`` is called about once a second with ``phase``,
    ``elapsed``, ``round_trips_per_s``, ``round_trips`` (measured so far),
    ``errors`` and ``established``.  ``on_established(info)`` is called in
    hold mode once every connection is up.  A readable ``stop_fd`` ends the
    run early (the result covers what was measured); in hold mode EOF on
    ``watch_fd`` ends the hold.  Raises OSError when no connection at all
    could be made, ConfigError for bad options.
    """
    if options.path is None:
        raise ConfigError("run() needs a path; run_builtin() starts its own servers")
    if options.processes > 1:
        raw = _run_processes(options, progress, on_established, stop_fd, watch_fd)
    else:
        raw = _run_local(options, _rate_progress(progress), on_established, stop_fd, watch_fd)
    return _summarize(options, raw)


def echo_server_argv(path: str, model: str, python: str = sys.executable) -> list[str]:
    """The command line of the built-in echo server in ``model`` on ``path``
    (``python -m unixsrv serve --echo``, warnings and errors logged only)."""
    serve = ["serve", "--socket", path, "--echo", "--model", model]
    return [python, "-m", "unixsrv", "--log-level", "WARNING", *serve]


def run_builtin(
    options: BenchOptions,
    *,
    progress: Progress | None = None,
    on_established: Progress | None = None,
    stop_fd: int = -1,
    watch_fd: int = -1,
    models: Sequence[str] = ("event", "blocking"),
) -> list[dict[str, Any]]:
    """Benchmark the built-in echo server in each model: each one runs as
    ``python -m unixsrv serve --echo --model M`` on a private socket, is
    measured with ``--server-pid``, then ended (SIGTERM, then SIGKILL) by its
    PID.  Returns one result per model (key ``server`` names it); stops
    after a run that a signal ended early."""
    results = []
    for model in models:
        sock_dir = tempfile.mkdtemp(prefix="usbench-", dir="/tmp")
        path = os.path.join(sock_dir, "echo.sock")
        proc = subprocess.Popen(echo_server_argv(path, model), stdin=subprocess.DEVNULL)
        try:
            _wait_for_socket(path, proc)
            opts = dataclasses.replace(options, path=path, server_pid=proc.pid)
            result = run(
                opts,
                progress=progress,
                on_established=on_established,
                stop_fd=stop_fd,
                watch_fd=watch_fd,
            )
        finally:
            _end_process(proc)
            shutil.rmtree(sock_dir, ignore_errors=True)
        result["server"] = f"unixsrv-{model}"
        results.append(result)
        if result["stopped_early"]:
            break
    return results


def _run_local(
    options: BenchOptions,
    progress: Callable[[dict[str, Any]], None] | None,
    on_established: Progress | None,
    stop_fd: int,
    watch_fd: int,
    first_index: int = 0,
    ready: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """One generator in this process; returns LoadGen's raw result (or
    raises).  ``ready(connect_info)`` runs between the connect phase and the
    run; returning False skips the run."""
    assert options.path is not None
    _raise_fd_limit(options.connections + _FD_SLACK)
    gen = _loadgen.LoadGen(
        _address(options.path),
        options.mode,
        options.connections,
        options.size,
        options.pipeline,
        first_index,
        options.server_pid or 0,
        stop_fd,
        watch_fd if options.mode == "hold" else -1,
        progress,
    )
    try:
        info = gen.connect(options.connect_timeout, options.connect_rate)
        if options.mode != "connect" and info["established"] == 0:
            raw = gen.result()
            if raw["stopped"]:
                return gen.run(0.0, 0.0, 0, 0.0)
            raise _connect_error(raw["connect_errno"], options.path)
        if options.mode == "hold" and on_established is not None:
            on_established(_established_info(info, gen.result()))
        if ready is not None and not ready(
            {**info, "errors": sum(gen.result()["errors"].values())}
        ):
            return gen.result()
        return gen.run(
            options.run_duration, options.warmup, options.requests or 0, options.stall_timeout
        )
    finally:
        gen.close()


def _established_info(info: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "event": "established",
        "connections": info["established"],
        "failed": info["failed"],
        "seconds": round(info["seconds"], 6),
        "errors": sum(raw["errors"].values()),
    }


def _rate_progress(progress: Progress | None) -> Callable[[dict[str, Any]], None] | None:
    """Adapt LoadGen's cumulative counts to a rate for ``progress``."""
    if progress is None:
        return None
    last = {"elapsed": 0.0, "done": 0}

    def tick(info: dict[str, Any]) -> None:
        dt = info["elapsed"] - last["elapsed"]
        rate = (info["done"] - last["done"]) / dt if dt > 0 else 0.0
        last["elapsed"], last["done"] = info["elapsed"], info["done"]
        progress(
            {
                "phase": info["phase"],
                "elapsed": info["elapsed"],
                "round_trips_per_s": rate,
                "round_trips": info["round_trips"],
                "errors": info["errors"],
                "established": info["established"],
            }
        )

    return tick


# ------------------------------------------------------------ several processes


def _run_processes(
    options: BenchOptions,
    progress: Progress | None,
    on_established: Progress | None,
    stop_fd: int,
    watch_fd: int,
) -> dict[str, Any]:
    """Spread the connections over ``options.processes`` child generators
    (``unixsrv bench --child``).  Each connects, reports ready and waits; all
    start together on "go"; the parent merges their counts and histograms.
    Children are ended by PID whatever happens."""
    k = options.processes
    procs: list[subprocess.Popen[bytes]] = []
    try:
        first = 0
        for i in range(k):
            n = options.connections // k + (1 if i < options.connections % k else 0)
            req = None
            if options.requests:
                req = options.requests // k + (1 if i < options.requests % k else 0)
            child = dataclasses.replace(
                options,
                connections=n,
                requests=req,
                processes=1,
                duration=options.run_duration,
                connect_rate=options.connect_rate / k,
                server_pid=options.server_pid if i == 0 else None,
            )
            procs.append(
                subprocess.Popen(
                    _child_argv(child, first), stdin=subprocess.PIPE, stdout=subprocess.PIPE
                )
            )
            first += n
        return _ChildSet(options, procs, progress, on_established, stop_fd, watch_fd).run()
    finally:
        for proc in procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()  # a child still waiting for "go" gives up
            _end_process(proc)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass


def _child_argv(o: BenchOptions, first_index: int) -> list[str]:
    assert o.path is not None
    argv = [
        sys.executable,
        "-m",
        "unixsrv",
        "--log-level",
        "WARNING",
        "bench",
        o.path,
        "--child",
        "--first-index",
        str(first_index),
        "--mode",
        o.mode,
        "--connections",
        str(o.connections),
        "--size",
        str(o.size),
        "--pipeline",
        str(o.pipeline),
        "--duration",
        repr(o.run_duration),
        "--warmup",
        repr(o.warmup),
        "--connect-timeout",
        repr(o.connect_timeout),
        "--connect-rate",
        repr(o.connect_rate),
        "--stall-timeout",
        repr(o.stall_timeout),
    ]
    if o.requests:
        argv += ["--requests", str(o.requests)]
    if o.server_pid:
        argv += ["--server-pid", str(o.server_pid)]
    return argv


class _ChildSet:
    """The parent's side of a multi-process run: read the children's JSON
    lines, start them together, forward stops, merge the results."""

    def __init__(
        self,
        options: BenchOptions,
        procs: list[subprocess.Popen[bytes]],
        progress: Progress | None,
        on_established: Progress | None,
        stop_fd: int,
        watch_fd: int,
    ) -> None:
        self.options = options
        self.procs = procs
        self.progress = progress
        self.on_established = on_established
        self.stop_fd = stop_fd
        self.watch_fd = watch_fd if options.mode == "hold" else -1
        self.sel = selectors.DefaultSelector()
        self.bufs: dict[int, bytearray] = {}
        self.ready: dict[int, dict[str, Any]] = {}
        self.results: dict[int, dict[str, Any]] = {}
        self.last: dict[int, dict[str, Any]] = {}
        self.stopped = False
        self.started = False
        self.start = time.monotonic()
        self.last_tick = (self.start, 0)

    def run(self) -> dict[str, Any]:
        o = self.options
        for i, proc in enumerate(self.procs):
            assert proc.stdout is not None
            self.bufs[i] = bytearray()
            self.sel.register(proc.stdout, selectors.EVENT_READ, i)
        if self.stop_fd >= 0:
            self.sel.register(self.stop_fd, selectors.EVENT_READ, "stop")
        try:
            self._pump(
                lambda: len(self.ready) == len(self.procs),
                time.monotonic() + o.connect_timeout + 60.0,
            )
            if self.stopped:
                self._stop_children()
            else:
                if o.mode == "hold" and self.on_established is not None:
                    self.on_established(
                        {
                            "event": "established",
                            "connections": sum(r["established"] for r in self.ready.values()),
                            "failed": sum(r["failed"] for r in self.ready.values()),
                            "seconds": round(max(r["seconds"] for r in self.ready.values()), 6),
                            "errors": sum(r["errors"] for r in self.ready.values()),
                        }
                    )
                if self.watch_fd >= 0:
                    try:
                        self.sel.register(self.watch_fd, selectors.EVENT_READ, "watch")
                    except (OSError, ValueError):
                        self.watch_fd = -1  # not pollable (a file, /dev/null)
                for proc in self.procs:
                    assert proc.stdin is not None
                    proc.stdin.write(b"go\n")
                    proc.stdin.flush()
                self.started = True
            dur = o.run_duration
            limit = None
            if dur > 0 or o.mode != "hold":
                limit = time.monotonic() + o.warmup + (dur or 0) + o.stall_timeout + 60.0
            self._pump(lambda: len(self.results) == len(self.procs), limit)
        finally:
            self.sel.close()
        return _merge([self.results[i] for i in range(len(self.procs))], self.stopped)

    def _pump(self, done: Callable[[], bool], limit: float | None) -> None:
        while not done():
            now = time.monotonic()
            if limit is not None and now > limit:
                raise TimeoutError("benchmark child processes did not finish in time")
            timeout = 1.0 if limit is None else max(0.0, min(1.0, limit - now))
            for key, _ in self.sel.select(timeout):
                if key.data == "stop":
                    _drain(self.stop_fd)
                    self._request_stop()
                elif key.data == "watch":
                    if not os.read(self.watch_fd, 4096):
                        self.sel.unregister(self.watch_fd)
                        self.watch_fd = -1
                        self._request_stop()
                else:
                    self._read_child(key.data, key.fileobj)
            self._tick()

    def _read_child(self, i: int, stream: Any) -> None:
        data = os.read(stream.fileno(), 65536)
        if not data:
            self.sel.unregister(stream)
            if i not in self.results:
                code = self.procs[i].wait()
                raise ChildProcessError(
                    f"benchmark child {i} exited with status {code} before reporting"
                )
            return
        buf = self.bufs[i]
        buf += data
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if line.strip():
                self._on_message(i, json.loads(line))

    def _on_message(self, i: int, msg: dict[str, Any]) -> None:
        event = msg.pop("event", None)
        if event == "ready":
            self.ready[i] = msg
        elif event == "progress":
            self.last[i] = msg
        elif event == "result":
            self.results[i] = msg
        elif event == "error":
            raise OSError(
                msg.get("errno") or errno.EIO,
                msg.get("message") or "benchmark child failed",
                msg.get("filename"),
            )

    def _request_stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            if self.ready and len(self.ready) == len(self.procs):
                self._stop_children()

    def _stop_children(self) -> None:
        """Make every child end now and report: before "go" and in hold mode
        by closing its stdin, otherwise by SIGTERM (handled gracefully)."""
        for proc in self.procs:
            if (not self.started or self.options.mode == "hold") and proc.stdin is not None:
                if not proc.stdin.closed:
                    proc.stdin.close()
            elif proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)

    def _tick(self) -> None:
        now = time.monotonic()
        if self.progress is None or now - self.last_tick[0] < 1.0 or not self.last:
            return
        done = sum(m["done"] for m in self.last.values())
        t0, d0 = self.last_tick
        self.last_tick = (now, done)
        phases = {m["phase"] for m in self.last.values()}
        self.progress(
            {
                "phase": phases.pop() if len(phases) == 1 else "mixed",
                "elapsed": now - self.start,
                "round_trips_per_s": (done - d0) / (now - t0),
                "round_trips": sum(m["round_trips"] for m in self.last.values()),
                "errors": sum(m["errors"] for m in self.last.values()),
                "established": sum(m["established"] for m in self.last.values()),
            }
        )


def _merge(raws: list[dict[str, Any]], stopped: bool) -> dict[str, Any]:
    """Combine the children's raw results: sums, merged histogram, rates
    summed per child (their windows nearly coincide)."""
    hist: dict[int, int] = {}
    for r in raws:
        for i, c in r["hist"]:
            hist[i] = hist.get(i, 0) + c
    errors = {k: sum(r["errors"][k] for r in raws) for k in raws[0]["errors"]}
    first = raws[0]
    return {
        "mode": first["mode"],
        "connections": sum(r["connections"] for r in raws),
        "established": sum(r["established"] for r in raws),
        "connect_s": max(r["connect_s"] for r in raws),
        "connect_errno": next((r["connect_errno"] for r in raws if r["connect_errno"]), 0),
        "duration_s": max(r["duration_s"] for r in raws),
        "round_trips": sum(r["round_trips"] for r in raws),
        "rt_per_s": sum(r["round_trips"] / r["duration_s"] for r in raws if r["duration_s"] > 0),
        "bytes_per_s": sum(
            r["verified_bytes"] / r["duration_s"] for r in raws if r["duration_s"] > 0
        ),
        "verified_bytes": sum(r["verified_bytes"] for r in raws),
        "hist": sorted(hist.items()),
        "lat_max_ns": max(r["lat_max_ns"] for r in raws),
        "lat_sum_ns": sum(r["lat_sum_ns"] for r in raws),
        "errors": errors,
        "stopped": stopped or any(r["stopped"] for r in raws),
        "client_cpu_s": sum(r["client_cpu_s"] for r in raws),
        "server_cpu_ticks": first["server_cpu_ticks"],
        "server_window_s": first["duration_s"],
        "clk_tck": first["clk_tck"],
    }


# ---------------------------------------------------------------- the report


def _summarize(o: BenchOptions, raw: dict[str, Any]) -> dict[str, Any]:
    dur = raw["duration_s"]
    rt = raw["round_trips"]
    rps = raw.get("rt_per_s", rt / dur if dur > 0 else 0.0)
    bps = raw.get("bytes_per_s", raw["verified_bytes"] / dur if dur > 0 else 0.0)
    # Percentiles are bucket midpoints (< 0.4 % off); never above the exact max.
    p50, p99, p999 = (
        None if p is None else min(p, raw["lat_max_ns"])
        for p in _loadgen.hist_percentiles(raw["hist"], (0.5, 0.99, 0.999))
    )
    cpu = raw["client_cpu_s"]
    server_cpu = None
    server_per_rt = None
    if raw["server_cpu_ticks"] is not None and raw["clk_tck"] > 0:
        server_cpu = raw["server_cpu_ticks"] / raw["clk_tck"]
        window_rt = rps * raw.get("server_window_s", dur)
        if window_rt > 0:
            server_per_rt = round(server_cpu / window_rt * 1e6, 3)

    def us(ns: float | None) -> float | None:
        return None if ns is None else round(ns / 1000.0, 2)

    errors = raw["errors"]
    return {
        "path": o.path,
        "mode": o.mode,
        "connections": o.connections,
        "size": o.size,
        "pipeline": o.pipeline if o.mode == "pingpong" else 1,
        "processes": o.processes,
        "duration_s": round(dur, 6),
        "round_trips": rt,
        "round_trips_per_s": round(rps, 1),
        "mb_per_s": round(bps / 1e6, 3),
        "latency_us": {
            "p50": us(p50),
            "p99": us(p99),
            "p999": us(p999),
            "max": us(raw["lat_max_ns"]) if rt else None,
            "mean": us(raw["lat_sum_ns"] / rt) if rt else None,
        },
        "errors": sum(errors.values()),
        "verified_bytes": raw["verified_bytes"],
        "client_cpu_s": round(cpu, 4),
        "client_cpu_share": round(cpu / dur, 4) if dur > 0 else None,
        "server_cpu_s": None if server_cpu is None else round(server_cpu, 4),
        "server_cpu_us_per_rt": server_per_rt,
        "client_cpu_us_per_rt": round(cpu / rt * 1e6, 3) if rt else None,
        "errors_by_kind": errors,
        "established": raw["established"] if o.mode != "connect" else None,
        "connect_s": round(raw["connect_s"], 6),
        "warmup_s": o.warmup if o.mode != "hold" else 0.0,
        "requests": o.requests,
        "server_pid": o.server_pid,
        "server": None,
        "stopped_early": bool(raw["stopped"]),
    }


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable report of one result object."""
    what = s["server"] or s["path"]
    shape = f"{s['connections']:,} connections x {s['size']:,} B"
    if s["mode"] == "pingpong":
        shape += f" x pipeline {s['pipeline']}"
    procs = f"{s['processes']} process" + ("es" if s["processes"] > 1 else "")
    unit = {"pingpong": "round trips", "connect": "connects", "hold": "round trips"}[s["mode"]]
    lat = s["latency_us"]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:,.1f}"

    lines = [
        f"{what}: {s['mode']}, {shape}, {procs}, {s['duration_s']:.2f} s measured"
        + (" (stopped early)" if s["stopped_early"] else ""),
        f"  {s['round_trips']:,} {unit}   {s['round_trips_per_s']:,.0f}/s   {s['mb_per_s']:,.2f} MB/s",
        f"  latency us   p50 {f(lat['p50'])}   p99 {f(lat['p99'])}   p99.9 {f(lat['p999'])}"
        f"   max {f(lat['max'])}",
    ]
    errs = ", ".join(f"{k} {v}" for k, v in s["errors_by_kind"].items() if v)
    lines.append(
        f"  errors {s['errors']}"
        + (f" ({errs})" if errs else "")
        + f"   verified {s['verified_bytes']:,} bytes"
    )
    cpu = f"  client CPU {s['client_cpu_s']:.2f} s"
    if s["client_cpu_share"] is not None:
        cpu += f" ({s['client_cpu_share']:.0%} of a core"
        cpu += f", {s['client_cpu_us_per_rt']:.2f} us/rt)" if s["client_cpu_us_per_rt"] else ")"
    if s["server_cpu_s"] is not None:
        cpu += f"   server CPU {s['server_cpu_s']:.2f} s"
        if s["server_cpu_us_per_rt"] is not None:
            cpu += f" ({s['server_cpu_us_per_rt']:.2f} us/rt)"
    lines.append(cpu)
    return "\n".join(lines)


# ---------------------------------------------------------------- helpers


def _address(path: str) -> bytes:
    raw = os.fsencode(path)
    if raw.startswith(b"@"):
        return b"\0" + raw[1:]
    return raw


def _connect_error(err: int, path: str) -> OSError:
    err = err or errno.ECONNREFUSED
    return OSError(err, f"no connection to the server: {os.strerror(err)}", path)


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ConfigError(
            f"{need - _FD_SLACK} connections in one process need about {need} file descriptors, "
            f"but the hard limit is {hard}: use --processes or raise the limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _wait_for_socket(path: str, proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """The server renames its socket into place only once it listens."""
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise ChildProcessError(f"the echo server exited with status {proc.returncode}")
        if time.monotonic() > end:
            raise TimeoutError(f"the echo server did not create {path} within {timeout} s")
        time.sleep(0.01)


def _end_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """End a child by its PID: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 256):
            pass
    except BlockingIOError:
        pass


class _StopSignals:
    """SIGINT and SIGTERM end the run gracefully: the handlers only note the
    signal, and ``signal.set_wakeup_fd`` makes the C loop's stop pipe
    readable at once (the loop runs without the GIL, so no Python handler
    could run there).  Restores everything on exit.  Outside the main thread
    it does nothing (``fd`` is -1)."""

    def __init__(self) -> None:
        self.fd = -1
        self.received: int | None = None
        self._w = -1
        self._old_wakeup = -1
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self.fd, self._w = r, w
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, frame: object) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: give up at once
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        if self.fd < 0:
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self.fd)
        os.close(self._w)
        self.fd = self._w = -1


class _ProgressLine:
    """The live status on stderr: on a terminal one line rewritten in place
    (``\r``); anywhere else (a file, a pipe, a CI log) a plain line per
    update, which stays readable there."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.width = 0
        try:
            self.in_place = bool(stream.isatty())
        except (AttributeError, ValueError):  # no isatty(), or a closed stream
            self.in_place = False

    def __call__(self, info: dict[str, Any]) -> None:
        text = (
            f"[{info['elapsed']:6.1f}s] {info['phase']:<8} {info['round_trips_per_s']:>12,.0f} rt/s"
            f"   measured {info['round_trips']:,}   errors {info['errors']:,}"
            f"   conns {info['established']:,}"
        )
        if self.in_place:
            self.width = max(self.width, len(text))
            self.stream.write("\r" + text.ljust(self.width))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Before other output: erase the line in place (nothing to do for
        plain lines)."""
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


# ---------------------------------------------------------------- the CLI


def add_bench_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``bench`` sub-command."""
    p = sub.add_parser(
        "bench",
        help="load-test a Unix socket echo server (no PATH: the built-in one, both models)",
        description=(__doc__ or "").split("\n\n", 1)[0],
    )
    p.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help="socket of an echo server ('@name' = abstract); none: start the built-in "
        "echo server in each model and report both",
    )
    p.add_argument(
        "--mode", choices=MODES, default="pingpong", help="what to measure (default pingpong)"
    )
    p.add_argument(
        "--connections", "-c", type=int, default=1, metavar="N", help="connections / slots"
    )
    p.add_argument(
        "--size", "-s", type=int, default=64, metavar="S", help="message size in bytes (default 64)"
    )
    p.add_argument(
        "--pipeline",
        "-p",
        type=int,
        default=1,
        metavar="P",
        help="messages in flight per connection (pingpong; default 1)",
    )
    p.add_argument(
        "--duration",
        "-d",
        type=float,
        default=None,
        metavar="D",
        help="seconds to measure (hold: to hold; 0 = no time bound); default 5, "
        "or none when --requests is given",
    )
    p.add_argument(
        "--requests",
        "-n",
        type=int,
        default=None,
        metavar="R",
        help="stop after R measured round trips (connect: cycles)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=0.5,
        metavar="W",
        help="seconds of traffic before measuring (default 0.5)",
    )
    p.add_argument(
        "--processes",
        "-k",
        type=int,
        default=1,
        metavar="K",
        help="spread the connections over K generator processes",
    )
    p.add_argument(
        "--server-pid",
        type=int,
        default=None,
        metavar="PID",
        help="measure this process's CPU time over the run (/proc/PID/stat)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        metavar="SEC",
        help="deadline for opening all connections (default 30)",
    )
    p.add_argument(
        "--connect-rate",
        type=float,
        default=0.0,
        metavar="PER_S",
        help="pace: at most this many new connections per second (default: no pacing)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=10.0,
        metavar="SEC",
        help="end the run (as an error) when no round trip completes this long (default 10)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per run (JSON Lines)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--first-index", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=_bench_command)


def _options(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        path=args.path,
        mode=args.mode,
        connections=args.connections,
        size=args.size,
        pipeline=args.pipeline,
        duration=args.duration,
        requests=args.requests,
        warmup=args.warmup,
        processes=args.processes,
        server_pid=args.server_pid,
        connect_timeout=args.connect_timeout,
        connect_rate=args.connect_rate,
        stall_timeout=args.stall_timeout,
    )


def _bench_command(args: argparse.Namespace) -> int:
    options = _options(args)
    if args.child:
        return _child_main(options, args.first_index)
    out = sys.stdout

    def established(info: dict[str, Any]) -> None:
        if line is not None:
            line.clear()
        out.write(json.dumps(info) + "\n")
        out.flush()

    line = None if (args.quiet or args.json) else _ProgressLine(sys.stderr)
    with _StopSignals() as stop:
        try:
            if options.path is None:
                results = run_builtin(
                    options, progress=line, on_established=established, stop_fd=stop.fd, watch_fd=0
                )
            else:
                results = [
                    run(
                        options,
                        progress=line,
                        on_established=established,
                        stop_fd=stop.fd,
                        watch_fd=0,
                    )
                ]
        finally:
            if line is not None:
                line.clear()
    for result in results:
        out.write((json.dumps(result) if args.json else format_summary(result)) + "\n")
    out.flush()
    return 1 if any(r["errors"] for r in results) else 0


def _child_main(options: BenchOptions, first_index: int) -> int:
    """One generator of a ``--processes`` run: JSON lines on stdout (ready,
    progress, result or error); waits for "go" on stdin before the run."""
    out = sys.stdout

    def emit(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    def ready(info: dict[str, Any]) -> bool:
        emit({"event": "ready", **info})
        return _read_line(0) == b"go"

    with _StopSignals() as stop:
        try:
            raw = _run_local(
                options,
                lambda info: emit({"event": "progress", **info}),
                None,
                stop.fd,
                0,
                first_index,
                ready,
            )
        except OSError as exc:
            emit(
                {
                    "event": "error",
                    "errno": exc.errno,
                    "message": exc.strerror or str(exc),
                    "filename": exc.filename,
                }
            )
            return 2
    emit({"event": "result", **raw})
    return 0


def _read_line(fd: int) -> bytes:
    """A line from fd, read byte by byte so nothing after it is consumed
    (the rest of stdin is watched for EOF by the C loop)."""
    buf = bytearray()
    while (b := os.read(fd, 1)) and b != b"\n":
        buf += b
    return bytes(buf)
