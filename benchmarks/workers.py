"""Using every core: ``Server(..., workers=N)`` against N stdlib servers on one socket.

Targets of issue 14 (measure on a quiet machine; the figures go into the
README section "Using every core"):

* CPU-bound handler (about ``--cpu-us`` = 200 µs of Python per request),
  ``--connections`` = 64 ping-pong clients: requests/s with 1 and with 2
  workers (target: 2 workers >= 1.7x one), for unixsrv's event and blocking
  models and, side by side, for gunicorn-style pre-fork done with the
  standard library: N ``socketserver.ThreadingUnixStreamServer`` processes
  forked after the parent bound and listened on one socket.
* Accept fairness: ``--short`` (10,000) short connections (connect, one round
  trip, close) to 2 unixsrv workers; the share each worker accepted (read
  from ``worker_stats()``; target: none above 60 %).

    python benchmarks/workers.py                  # full run (~2 min)
    python benchmarks/workers.py --smoke          # tiny counts: checks the harness only
    python benchmarks/workers.py --json out.json  # also write the results

Every server is a subprocess on a fresh socket under /tmp, ended by its PID
(SIGTERM, then SIGKILL), the load comes from ``unixsrv bench`` (harness.py).
Linux only, like the rest of benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import time
from typing import Any

from harness import PYTHON, ROOT, end_process, run_bench

KINDS = ("unixsrv-event", "unixsrv-blocking", "stdlib-prefork")


# ------------------------------------------------------------------ the servers (run with --serve)


def _calibrate(cpu_us: float) -> int:
    """Iterations of _burn that take about ``cpu_us`` microseconds here."""
    n = 20000
    start = time.perf_counter()
    _burn(n)
    per_iter = (time.perf_counter() - start) / n
    return max(1, int(cpu_us * 1e-6 / per_iter))


def _burn(n: int) -> int:
    """Pure-Python work (holds the GIL, as a real handler's parsing would)."""
    acc = 0
    for i in range(n):
        acc = (acc * 31 + i) & 0xFFFF
    return acc


def _serve(kind: str, workers: int, path: str, cpu_us: float) -> None:
    iters = _calibrate(cpu_us)
    if kind == "stdlib-prefork":
        _serve_stdlib(workers, path, iters)
        return
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
    if kind == "unixsrv-event":
        srv = Server(cfg, protocol=CpuProtocol, workers=workers)
    else:
        srv = Server(cfg, cpu_handler, workers=workers)
    rows: list[dict[str, Any]] = []

    def stop(signum: int, frame: object) -> None:
        rows.extend(srv.worker_stats())  # per-worker counters, read before the workers end
        srv.close()

    signal.signal(signal.SIGTERM, stop)
    srv.start()
    while not srv.wait(1.0):
        pass
    print(json.dumps({"workers": rows}), flush=True)


def _serve_stdlib(workers: int, path: str, iters: int) -> None:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                while data := self.request.recv(65536):
                    _burn(iters)
                    self.request.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the generator hung up at the end of a run

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
            server = socketserver.ThreadingUnixStreamServer(path, Handler, bind_and_activate=False)
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
    while not stop:
        signal.pause()
    for pid in children:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    os.unlink(path)
    print(json.dumps({"workers": []}), flush=True)


# ------------------------------------------------------------------ the driver


def _measure(kind: str, workers: int, cpu_us: float, **bench: Any) -> dict[str, Any]:
    sock_dir = tempfile.mkdtemp(prefix="uwork-", dir="/tmp")
    path = os.path.join(sock_dir, "w.sock")
    argv = [
        PYTHON,
        os.path.abspath(__file__),
        "--serve",
        kind,
        str(workers),
        path,
        "--cpu-us",
        repr(cpu_us),
    ]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd=ROOT)
    try:
        end = time.monotonic() + 30
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{kind} x{workers} did not start (status {proc.poll()})")
            time.sleep(0.01)
        result = run_bench(path, timeout=600, server_pid=proc.pid, **bench)
    finally:
        end_process(proc)
        out = proc.stdout.read().decode() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    rows = json.loads(out.strip().splitlines()[-1])["workers"] if out.strip() else []
    return {"kind": kind, "workers": workers, "result": result, "worker_rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--serve", nargs=3, metavar=("KIND", "N", "PATH"), help=argparse.SUPPRESS)
    p.add_argument(
        "--cpu-us", type=float, default=200.0, help="Python CPU per request, µs (default 200)"
    )
    p.add_argument("--connections", type=int, default=64, help="ping-pong clients (default 64)")
    p.add_argument(
        "--duration", type=float, default=10.0, help="seconds per throughput run (default 10)"
    )
    p.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of warm-up per run (default 2)"
    )
    p.add_argument(
        "--short", type=int, default=10000, help="short connections for fairness (default 10000)"
    )
    p.add_argument(
        "--kinds", default=",".join(KINDS), help=f"servers to compare (default {','.join(KINDS)})"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny counts: only checks that everything runs"
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.serve:
        kind, n, path = args.serve
        _serve(kind, int(n), path, args.cpu_us)
        return 0
    if args.smoke:
        args.connections, args.duration, args.warmup, args.short = 4, 0.5, 0.1, 200
    results: dict[str, Any] = {"throughput": [], "fairness": None, "options": vars(args)}
    print(
        f"CPU-bound handler ~{args.cpu_us:g} µs/request, {args.connections} ping-pong connections"
    )
    print(f"{'server':<18} {'workers':>7} {'req/s':>10} {'x 1 worker':>10}")
    for kind in args.kinds.split(","):
        base = None
        for workers in (1, 2):
            m = _measure(
                kind,
                workers,
                args.cpu_us,
                mode="pingpong",
                connections=args.connections,
                duration=args.duration,
                warmup=args.warmup,
            )
            rate = m["result"]["round_trips_per_s"]
            base = base or rate
            results["throughput"].append(
                {
                    "kind": kind,
                    "workers": workers,
                    "requests_per_s": rate,
                    "errors": m["result"]["errors"],
                }
            )
            print(f"{kind:<18} {workers:>7} {rate:>10,.0f} {rate / base:>10.2f}")
    m = _measure(
        "unixsrv-event", 2, 0.0, mode="connect", connections=8, requests=args.short, warmup=0.0
    )
    accepted = [row["accepted"] for row in m["worker_rows"]]
    total = sum(accepted) or 1
    shares = [round(100 * a / total, 1) for a in accepted]
    results["fairness"] = {
        "connections": args.short,
        "accepted_per_worker": accepted,
        "percent": shares,
    }
    print(f"accept fairness, {args.short} short connections to 2 workers: {accepted} = {shares} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
