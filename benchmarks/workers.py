"""Using every core: pre-fork workers of every unixsrv model against N stdlib servers on one socket.

Targets of issue 14 (measure on a quiet machine; the figures go into the
README section "Using every core"):

* CPU-bound handler (about ``--cpu-us`` = 200 µs of pure Python per
  request), ``--connections`` = 64 ping-pong clients: requests/s with 1 and
  with 2 workers (target: 2 workers >= 1.7x one) for each unixsrv model
  (``Server(..., workers=N)`` event and blocking, ``unixsrv.asyncio.
  prefork_server``, ``unixsrv.socketserver.ThreadingUnixStreamServer(...,
  workers=N)``) and, side by side, gunicorn-style pre-fork done with the
  standard library: N ``socketserver.ThreadingUnixStreamServer`` processes
  forked after the parent bound and listened on one socket.
* Accept fairness: ``--short`` (10,000) short connections (connect, one
  round trip, close) to 2 unixsrv workers, event model (EPOLLEXCLUSIVE) and
  unixsrv.asyncio (nested epoll: every idle worker wakes); the share each
  worker accepted (from ``worker_stats()``; target: none above 60 %).

Method: ``--rounds`` rounds; in each, every (server, workers) pair runs once,
the pairs interleaved (the order rotates from round to round, so a slow
spell of a shared machine hits every pair alike); each run starts a fresh
server, waits until every worker accepts, primes it (200 connect-exchange-
close cycles, harness.prime), then measures ``--warmup`` + ``--duration``
seconds of ping-pong.  The table shows the median over the rounds, the
2 ÷ 1 ratio of the medians and the load generator's CPU share (a core = 100
%: on a 2-CPU machine the generator competes with the workers, so read the
ratio together with it).

    python benchmarks/workers.py                  # full run: 3 rounds, 10 pairs, about 4 minutes (at most 5)
    python benchmarks/workers.py --quick          # smoke run, seconds: checks the harness only, no figures
    python benchmarks/workers.py --json out.json  # also write the results

The full run is bounded: rounds x 10 pairs x (start + prime + warmup +
duration, about 6.5 s) + rounds x two fairness runs (a few seconds each),
and every step has a timeout.

The handler's work is calibrated once, by this driver (the fastest of five
samples), and passed to every server as an iteration count, so every row
runs the same handler.

Every server is a subprocess on a fresh socket under /tmp, ended by its PID
(SIGTERM, then SIGKILL; its workers follow it, PR_SET_PDEATHSIG), the load
comes from ``unixsrv bench`` (harness.py).  Linux only, like the rest of
benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from harness import PYTHON, ROOT, end_process, prime, run_bench

KINDS = (
    "unixsrv-event",
    "unixsrv-blocking",
    "unixsrv-asyncio",
    "unixsrv-socketserver",
    "stdlib-prefork",
)
#: Accept fairness is measured for these: EPOLLEXCLUSIVE (the C loop's own
#: epoll) and the nested epoll of unixsrv.asyncio (every idle worker wakes).
FAIRNESS_KINDS = ("unixsrv-event", "unixsrv-asyncio")
#: How long a server may take to have every worker accepting.
READY_TIMEOUT = 30.0


# ------------------------------------------------------------------ the servers (run with --serve)


def _calibrate(cpu_us: float) -> int:
    """Iterations of _burn that take about ``cpu_us`` microseconds here.

    Done once, by the driver, and passed to every server (``--iters``): a
    server that calibrated itself would do less work per request whenever
    its calibration ran on a busy CPU, and the rows would not compare the
    same handler.  The fastest of five samples is the least disturbed one.
    """
    n = 20000
    per_iter = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        _burn(n)
        per_iter = min(per_iter, (time.perf_counter() - start) / n)
    return max(1, int(cpu_us * 1e-6 / per_iter))


def _burn(n: int) -> int:
    """Pure-Python work (holds the GIL, as a real handler's parsing would)."""
    acc = 0
    for i in range(n):
        acc = (acc * 31 + i) & 0xFFFF
    return acc


def _handler_class(iters: int) -> type[socketserver.BaseRequestHandler]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                while data := self.request.recv(65536):
                    _burn(iters)
                    self.request.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the generator hung up at the end of a run

    return Handler


def _serve(kind: str, workers: int, path: str, iters: int) -> None:
    """Serve until SIGTERM, ``iters`` iterations of _burn per request; print a
    line {"ready": true} once every worker accepts, and {"workers": rows}
    (per-worker counters) at the end."""
    if kind == "stdlib-prefork":
        _serve_stdlib(workers, path, iters)
        return
    import unixsrv.asyncio
    import unixsrv.socketserver
    from unixsrv import Server, ServerConfig

    class CpuProtocol:
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            _burn(iters)
            self.transport.write(data)

        def eof_received(self) -> None:
            self.transport.close()

        def connection_lost(self, exc: BaseException | None) -> None:
            pass

    def cpu_handler(conn: Any) -> None:
        while data := conn.read():
            _burn(iters)
            conn.write(data)

    cfg = ServerConfig(path=path, backlog=4096)
    ss = None
    if kind == "unixsrv-event":
        srv = Server(cfg, protocol=CpuProtocol, workers=workers)
    elif kind == "unixsrv-blocking":
        srv = Server(cfg, cpu_handler, workers=workers)
    elif kind == "unixsrv-asyncio":
        srv = unixsrv.asyncio.prefork_server(CpuProtocol, cfg, workers=workers)
    else:
        ss = unixsrv.socketserver.ThreadingUnixStreamServer(
            None, _handler_class(iters), config=cfg, workers=workers
        )
        ss.daemon_threads = True
        assert ss.supervisor is not None
        srv = ss.supervisor
    rows: list[dict[str, Any]] = []

    def stop(signum: int, frame: object) -> None:
        rows.extend(srv.worker_stats())  # per-worker counters, read before the workers end
        srv.close()

    signal.signal(signal.SIGTERM, stop)
    if ss is None:
        srv.start()
    else:
        threading.Thread(target=ss.serve_forever, daemon=True).start()
        end = time.monotonic() + READY_TIMEOUT
        while not srv.is_running and time.monotonic() < end:
            time.sleep(0.01)
    print(json.dumps({"ready": srv.is_running}), flush=True)
    while not srv.wait(1.0):
        pass
    if ss is not None:
        ss.server_close()
    print(json.dumps({"workers": rows}), flush=True)


def _serve_stdlib(workers: int, path: str, iters: int) -> None:
    from unixsrv._core import exit_with_parent

    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(tmp)
    sock.listen(4096)
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            exit_with_parent(signal.SIGKILL)  # no orphan if the driver kills us with SIGKILL
            server = socketserver.ThreadingUnixStreamServer(
                path, _handler_class(iters), bind_and_activate=False
            )
            server.daemon_threads = True
            server.socket.close()
            server.socket = sock  # the inherited listener
            try:
                server.serve_forever()
            finally:
                os._exit(0)
        children.append(pid)
    os.rename(tmp, path)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    # Listening before the forks: connections queue in the backlog until a child accepts.
    print(json.dumps({"ready": True}), flush=True)
    while not stop:
        signal.pause()
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    os.unlink(path)
    print(json.dumps({"workers": []}), flush=True)


# ------------------------------------------------------------------ the driver


def _read_json(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The server's next JSON line; RuntimeError if none comes in time."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    end = time.monotonic() + timeout
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"no line from the server within {timeout:g} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError(f"the server exited (status {proc.wait()})")
        buf += chunk
    result: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
    return result


def _measure(kind: str, workers: int, iters: int, *, primed: bool, **bench: Any) -> dict[str, Any]:
    """Start a fresh server, wait until it is ready, prime it (``primed``),
    run one ``unixsrv bench``, end the server; its result and worker rows."""
    sock_dir = tempfile.mkdtemp(prefix="uwork-", dir="/tmp")
    path = os.path.join(sock_dir, "w.sock")
    argv = [PYTHON, os.path.abspath(__file__), "--serve", kind, str(workers), path]
    argv += ["--iters", str(iters)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd=ROOT)
    rows: list[dict[str, Any]] = []
    try:
        if not _read_json(proc, READY_TIMEOUT).get("ready"):
            raise RuntimeError(f"{kind} x{workers}: the workers did not start")
        if primed:
            prime(kind, path)
        result = run_bench(path, timeout=600, **bench)
        os.kill(proc.pid, signal.SIGTERM)
        rows = _read_json(proc, READY_TIMEOUT)["workers"]
    finally:
        end_process(proc)
        if proc.stdout:
            proc.stdout.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    return {"result": result, "worker_rows": rows}


def _throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    kinds = args.kinds.split(",")
    pairs = [(kind, workers) for kind in kinds for workers in (1, 2)]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {pair: [] for pair in pairs}
    for round_no in range(args.rounds):
        shift = (round_no * 3) % len(pairs)  # rotate the order from round to round
        for kind, workers in pairs[shift:] + pairs[:shift]:
            m = _measure(
                kind,
                workers,
                args.iters,
                primed=True,
                mode="pingpong",
                connections=args.connections,
                duration=args.duration,
                warmup=args.warmup,
            )
            r = m["result"]
            runs[kind, workers].append(r)
            print(
                f"  round {round_no + 1}/{args.rounds}: {kind} x{workers}:"
                f" {r['round_trips_per_s']:,.0f} req/s, generator CPU"
                f" {r['client_cpu_share'] or 0:.0%} of a core, errors {r['errors']}",
                flush=True,
            )
    rows = []
    for kind, workers in pairs:
        done = runs[kind, workers]
        rows.append(
            {
                "kind": kind,
                "workers": workers,
                "requests_per_s": statistics.median(r["round_trips_per_s"] for r in done),
                "rounds": [r["round_trips_per_s"] for r in done],
                "generator_cpu_share": statistics.median(
                    r["client_cpu_share"] or 0.0 for r in done
                ),
                "errors": sum(r["errors"] for r in done),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--serve", nargs=3, metavar=("KIND", "N", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument(
        "--cpu-us", type=float, default=200.0, help="Python CPU per request, µs (default 200)"
    )
    p.add_argument("--connections", type=int, default=64, help="ping-pong clients (default 64)")
    p.add_argument(
        "--duration", type=float, default=4.0, help="measured seconds per run (default 4)"
    )
    p.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of warm-up per run (default 1)"
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument(
        "--short", type=int, default=10000, help="short connections for fairness (default 10000)"
    )
    p.add_argument(
        "--kinds", default=",".join(KINDS), help=f"servers to compare (default {','.join(KINDS)})"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (4 connections, 0.3 s, 1 round, 200 short connections):"
        " checks that every server and the harness run; its figures mean nothing",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.serve:
        kind, n, path = args.serve
        _serve(kind, int(n), path, args.iters)
        return 0
    if args.quick:
        args.connections, args.duration, args.warmup, args.rounds, args.short = 4, 0.3, 0.1, 1, 200
    started = time.monotonic()
    args.iters = _calibrate(args.cpu_us)
    print(
        f"CPU-bound handler ~{args.cpu_us:g} µs/request ({args.iters} iterations), {args.connections} ping-pong"
        f" connections, {args.rounds} interleaved round(s) of {args.duration:g} s",
        flush=True,
    )
    rows = _throughput(args)
    print(f"\n{'server':<22} {'workers':>7} {'req/s':>10} {'2 ÷ 1':>6} {'generator CPU':>14}")
    base: dict[str, float] = {}
    for row in rows:
        rate = row["requests_per_s"]
        base.setdefault(row["kind"], rate)
        row["x_one_worker"] = rate / base[row["kind"]] if base[row["kind"]] else None
        ratio = f"{row['x_one_worker']:.2f}" if row["workers"] == 2 and row["x_one_worker"] else ""
        print(
            f"{row['kind']:<22} {row['workers']:>7} {rate:>10,.0f} {ratio:>6}"
            f" {row['generator_cpu_share']:>13.0%}"
        )
    fairness = []
    print(f"\naccept fairness, {args.short} short connections to 2 workers, {args.rounds} run(s):")
    for kind in FAIRNESS_KINDS:
        runs = []
        for _ in range(args.rounds):  # which worker wins is the scheduler's choice: several runs
            m = _measure(
                kind,
                2,
                0,
                primed=False,  # counted: the --short ones (and the few in flight at the end)
                mode="connect",
                connections=8,
                requests=args.short,
                warmup=0.0,
            )
            accepted = [row["accepted"] for row in m["worker_rows"]]
            total = sum(accepted) or 1
            runs.append(
                {
                    "accepted_per_worker": accepted,
                    "percent": [round(100 * a / total, 1) for a in accepted],
                }
            )
        busiest = [max(r["percent"]) for r in runs]
        fairness.append(
            {
                "kind": kind,
                "runs": runs,
                "busiest_percent": busiest,
                "busiest_median": statistics.median(busiest),
            }
        )
        print(
            f"  {kind:<20} busiest worker's share per run {busiest} %,"
            f" median {statistics.median(busiest)} %, max {max(busiest)} %"
        )
    print(f"({time.monotonic() - started:.0f} s)")
    if args.json:
        results = {
            "throughput": rows,
            "fairness": {"connections": args.short, "servers": fairness},
            "options": {k: v for k, v in vars(args).items() if k != "serve"},
        }
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
