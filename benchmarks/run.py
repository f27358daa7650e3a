"""Compare unixsrv with its peers on one machine, in one run, on one load
generator.  See benchmarks/README.md.

    python benchmarks/run.py            # full run (3 rounds), writes docs/benchmarks.{md,png}
    python benchmarks/run.py --quick    # smoke run (1 round, short), writes benchmarks/.build/quick/

Every measurement starts its server as a fresh subprocess, runs the
generator (``python -m unixsrv bench PATH --json --server-pid PID``) as
another, and ends the server by PID.  Measurements are interleaved: each
round goes through every scenario, and within a scenario through every
server (the order rotates from round to round), so whatever else the machine
does falls on every server alike.  The report gives medians over the rounds.
The harness reports; it never asserts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness
from harness import SERVERS, BenchError, CpuSnapshot


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    mode: str  # pingpong | connect | hold | http
    connections: int
    size: int = 64
    one_cpu: bool = False  # server and generator pinned to the same single CPU

    @property
    def is_rss(self) -> bool:
        return self.mode == "hold"

    def fits(self, server: str) -> bool:
        """HTTP scenarios run the HTTP servers, the others the echo servers."""
        return (self.mode == "http") == (server in harness.HTTP_SERVERS)


SCENARIOS = [
    Scenario("pp-1", "ping-pong 64 B, 1 connection", "pingpong", 1),
    Scenario(
        "pp-1-1cpu",
        "ping-pong 64 B, 1 connection, server and generator pinned to one CPU",
        "pingpong",
        1,
        one_cpu=True,
    ),
    Scenario("pp-100", "ping-pong 64 B, 100 connections", "pingpong", 100),
    Scenario("pp-1000", "ping-pong 64 B, 1,000 connections", "pingpong", 1000),
    Scenario("pp-16k", "ping-pong 16 KiB, 10 connections", "pingpong", 10, 16384),
    Scenario("connect", "connect rate (connect, 64 B echo, close; 8 concurrent)", "connect", 8),
    Scenario(
        "connect-16", "connect rate (connect, 64 B echo, close; 16 concurrent)", "connect", 16
    ),
    Scenario("rss-1000", "RSS per idle connection, 1,000 held", "hold", 1000),
    Scenario("rss-10000", "RSS per idle connection, 10,000 held", "hold", 10000),
    Scenario(
        "http-64",
        "uvicorn (httptools) hello-world ASGI app, GET / on 64 keep-alive HTTP/1.1 connections; "
        "server and generator pinned to different CPUs",
        "http",
        64,
    ),
]
SCENARIO_KEYS = [s.key for s in SCENARIOS]
REFERENCE_CPU = "c-epoll"  # CPU per round trip is relative to this one
REFERENCE_RATE = "uvloop-protocol"  # round trips/s are relative to this one
HTTP_REFERENCE = "uvicorn-uvloop"  # the same for the HTTP scenario (CPU per request and requests/s)
GEN_BOUND_SHARE = 0.9  # generator CPU share from which it is the bottleneck
DISTURBED_SHARE = 0.25  # other processes' CPU (cores) that marks a disturbed measurement


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> tuple[float, float, float]:
    a, b, c = os.getloadavg()
    return round(a, 2), round(b, 2), round(c, 2)


# ------------------------------------------------------------------ measuring


def measure_rate(server: str, sc: Scenario, duration: float, warmup: float) -> dict[str, Any]:
    """One ping-pong, connect or HTTP measurement on a fresh, primed server."""
    pin = harness.pin_to_one_cpu if sc.one_cpu or sc.mode == "http" else None
    with harness.running_server(server, preexec=pin) as srv:
        harness.prime(server, srv.path)
        before = CpuSnapshot.take()
        srv_cpu0 = harness.proc_cpu_s(srv.pid) or 0.0
        if sc.mode == "http":
            r = harness.run_http_load(
                srv.path,
                timeout=duration + warmup + 90.0,
                preexec=harness.pin_to_other_cpu,
                connections=sc.connections,
                duration=duration,
                warmup=warmup,
                server_pid=srv.pid,
            )
        else:
            r = harness.run_bench(
                srv.path,
                timeout=duration + warmup + 90.0,
                preexec=pin,
                mode=sc.mode,
                connections=sc.connections,
                size=sc.size,
                duration=duration,
                warmup=warmup,
                server_pid=srv.pid,
            )
        after = CpuSnapshot.take()
        srv_cpu1 = harness.proc_cpu_s(srv.pid) or srv_cpu0
        alive = srv.alive()
    wall = after.wall - before.wall
    known = (srv_cpu1 - srv_cpu0) + (after.children - before.children)
    dur = r["duration_s"] or 0.0
    return {
        "rate": r["round_trips_per_s"],
        "round_trips": r["round_trips"],
        "p50_us": r["latency_us"]["p50"],
        "p99_us": r["latency_us"]["p99"],
        "server_cpu_us_per_rt": r["server_cpu_us_per_rt"],
        "server_cpu_share": round(r["server_cpu_s"] / dur, 4)
        if r["server_cpu_s"] is not None and dur
        else None,
        "client_cpu_share": r["client_cpu_share"],
        "client_cpu_us_per_rt": r.get("client_cpu_us_per_rt"),
        "errors": r["errors"],
        "errors_by_kind": r.get("errors_by_kind"),
        "other_cpu_share": round(max(0.0, (after.busy - before.busy) - known) / wall, 4),
        "steal_share": round((after.steal - before.steal) / wall, 4),
        "server_survived": alive,
        "raw": r,
    }


def measure_rss(server: str, sc: Scenario) -> dict[str, Any]:
    """Server VmRSS with no client vs with `sc.connections` idle, established
    connections (each did one verified echo), divided by their number.  One
    short ping-pong first, so that one-off allocations of the first
    connection (lazy imports, first buffers, the first worker thread) are in
    the baseline, not in the per-connection figure."""
    n = sc.connections
    with harness.running_server(server) as srv:
        harness.run_bench(srv.path, timeout=60.0, connections=1, requests=200, warmup=0.0)
        base = harness.settled_rss(srv.pid)
        threads0 = harness.threads(srv.pid)
        t0 = time.monotonic()
        with harness.hold(srv.path, n, server_pid=srv.pid) as h:
            established = h.established["connections"]
            setup_s = time.monotonic() - t0
            held = harness.settled_rss(srv.pid)
            threads1 = harness.threads(srv.pid)
            fds = harness.open_fds(srv.pid)
        res = h.result or {}
        alive = srv.alive()
    per_conn = None
    if base is not None and held is not None and established:
        per_conn = (held - base) * 1024 / established
    return {
        "established": established,
        "failed": h.established.get("failed"),
        "errors": (h.established.get("errors") or 0) + (res.get("errors") or 0),
        "rss_before_kib": base,
        "rss_held_kib": held,
        "rss_per_conn_bytes": None if per_conn is None else round(per_conn, 1),
        "threads_before": threads0,
        "threads_held": threads1,
        "server_fds_held": fds,
        "setup_s": round(setup_s, 3),
        "server_survived": alive,
        "raw": res,
    }


def measure(server: str, sc: Scenario, duration: float, warmup: float) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "server": server,
        "scenario": sc.key,
        "started": time.time(),
        "load_before": loadavg(),
    }
    try:
        if sc.is_rss:
            rec.update(measure_rss(server, sc))
        else:
            rec.update(measure_rate(server, sc, duration, warmup))
    except (BenchError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        rec["failure"] = f"{type(exc).__name__}: {exc}"
    rec["seconds"] = round(time.time() - rec["started"], 2)
    return rec


def short(rec: dict[str, Any]) -> str:
    if "failure" in rec:
        return "FAILED " + rec["failure"][:300]
    if "rss_per_conn_bytes" in rec:
        return (
            f"{rec['established']:,} held, {rec['rss_per_conn_bytes']} B/conn "
            f"(RSS {rec['rss_before_kib']:,} -> {rec['rss_held_kib']:,} KiB), errors {rec['errors']}"
        )
    return (
        f"{rec['rate']:,.0f}/s  p50 {rec['p50_us']} us  p99 {rec['p99_us']} us  "
        f"server {rec['server_cpu_us_per_rt']} us/rt  gen {rec['client_cpu_share']:.0%}  "
        f"other {rec['other_cpu_share']:.2f}  errors {rec['errors']}"
    )


# ------------------------------------------------------------------ machine facts


def machine_facts() -> dict[str, Any]:
    def run(argv: list[str]) -> str:
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, check=False, cwd=harness.ROOT
            ).stdout.strip()
        except OSError:
            return ""

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
            )
    except OSError:
        pass
    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    try:
        import uvicorn

        uvicorn_version = uvicorn.__version__
    except ImportError:
        uvicorn_version = "not installed"
    import unixsrv

    with open("/proc/meminfo", encoding="ascii") as f:
        memtotal = next(line.split()[1] for line in f if line.startswith("MemTotal"))
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(int(memtotal) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "uvloop": uv,
        "uvicorn": uvicorn_version,
        "unixsrv": getattr(unixsrv, "__version__", "?"),
        "git": run(["git", "describe", "--always", "--dirty"]),
        "cc": run(["cc", "--version"]).splitlines()[0] if run(["cc", "--version"]) else "",
        "nofile_limit": harness.raise_nofile_limit(),
        "somaxconn": open("/proc/sys/net/core/somaxconn").read().strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def busy_cores(seconds: float = 3.0) -> float:
    """CPU in use by everything on the machine (cores) over a short sample."""
    a = CpuSnapshot.take()
    time.sleep(seconds)
    b = CpuSnapshot.take()
    return (b.busy - a.busy) / (b.wall - a.wall)


def wait_quiet(max_load: float, max_busy: float, wait_s: float) -> dict[str, Any]:
    """Wait (up to wait_s) until the machine is quiet: under `max_busy` cores
    in use over a 3 s sample, and a 1-minute load average under `max_load`.
    (The load average counts runnable threads: a previous run's 10,000-thread
    servers keep it high for minutes, so the CPU sample decides alone once
    half the wait is over.)"""
    start = time.monotonic()
    while True:
        load, busy = loadavg(), busy_cores()
        waited = time.monotonic() - start
        if busy <= max_busy and (load[0] <= max_load or waited >= wait_s / 2):
            break
        if waited >= wait_s:
            log(
                f"still busy after {waited:.0f} s (load {load[0]}, {busy:.2f} cores in use): starting anyway"
            )
            break
        log(
            f"load average {load[0]}, {busy:.2f} cores in use by others: waiting for a quiet machine"
        )
        time.sleep(15)
    return {
        "loadavg": load,
        "busy_cores": round(busy, 3),
        "waited_s": round(time.monotonic() - start, 1),
    }


# ------------------------------------------------------------------ driver


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    servers = args.servers
    scenarios = [s for s in SCENARIOS if s.key in args.scenarios]
    harness.raise_nofile_limit()
    harness.compile_c_server()
    if any(s.mode == "http" for s in scenarios):
        harness.compile_http_load()
    facts = machine_facts()
    quiet = wait_quiet(args.max_load, args.max_busy, args.wait_quiet)
    load0 = quiet["loadavg"]
    facts["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data: dict[str, Any] = {
        "command": args.command_line,
        "options": {
            "rounds": args.rounds,
            "duration": args.duration,
            "warmup": args.warmup,
            "quick": args.quick,
            "retry_disturbed": args.retry_disturbed,
        },
        "scenarios": [asdict(s) for s in scenarios],
        "servers": servers,
        "machine": facts,
        "load_before": load0,
        "quiet_check": quiet,
        "json_path": os.path.relpath(args.json_out, harness.ROOT),
        "records": [],
    }
    t0 = time.monotonic()
    total = args.rounds * sum(sc.fits(srv) for sc in scenarios for srv in servers)
    done = 0
    raw_path = args.json_out
    os.makedirs(os.path.dirname(raw_path), exist_ok=True)
    for rnd in range(args.rounds):
        for sc in scenarios:
            fitting = [srv for srv in servers if sc.fits(srv)]
            if not fitting:
                continue
            k = rnd % len(fitting)
            order = fitting[k:] + fitting[:k]
            for server in order:
                rec = measure(server, sc, args.duration, args.warmup)
                # Another process took CPU meanwhile: measure again (a few
                # times at most) and keep the least disturbed attempt.
                attempts = 1
                while (
                    attempts <= args.retry_disturbed
                    and "failure" not in rec
                    and (rec.get("other_cpu_share") or 0) > DISTURBED_SHARE
                ):
                    log(
                        f"    {sc.key} {server}: other processes took {rec['other_cpu_share']:.2f} cores; "
                        f"measuring again"
                    )
                    time.sleep(5)
                    again = measure(server, sc, args.duration, args.warmup)
                    attempts += 1
                    if "failure" not in again and again["other_cpu_share"] < rec["other_cpu_share"]:
                        rec = again
                rec["attempts"] = attempts
                rec["round"] = rnd
                data["records"].append(rec)
                done += 1
                log(f"[{done}/{total}] round {rnd + 1} {sc.key:<9} {server:<17} {short(rec)}")
                with open(raw_path + ".partial", "w", encoding="utf-8") as f:
                    json.dump(data, f)
    data["wall_s"] = round(time.monotonic() - t0, 1)
    data["load_after"] = loadavg()
    with open(raw_path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.unlink(raw_path + ".partial")
    return data


# ------------------------------------------------------------------ analysis


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(data: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Medians over the rounds, per (scenario, server)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in data["records"]:
        groups.setdefault((rec["scenario"], rec["server"]), []).append(rec)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key, recs in groups.items():
        ok = [r for r in recs if "failure" not in r]
        s: dict[str, Any] = {
            "n": len(ok),
            "failures": [r["failure"] for r in recs if "failure" in r],
            "errors": sum(r.get("errors") or 0 for r in ok),
            "server_died": sum(1 for r in ok if not r.get("server_survived", True)),
        }
        for f in (
            "rate",
            "p50_us",
            "p99_us",
            "server_cpu_us_per_rt",
            "server_cpu_share",
            "client_cpu_share",
            "other_cpu_share",
            "steal_share",
            "rss_per_conn_bytes",
            "rss_before_kib",
            "rss_held_kib",
            "threads_held",
            "established",
            "setup_s",
        ):
            s[f] = median([r.get(f) for r in ok])
        rates = [r["rate"] for r in ok if r.get("rate")]
        s["rate_spread"] = (
            (max(rates) - min(rates)) / s["rate"] if len(rates) > 1 and s["rate"] else None
        )
        out[key] = s
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(summ: dict[tuple[str, str], dict[str, Any]]) -> list[tuple[str, str, str, bool | None]]:
    """The issue's targets: (what, target, measured, met?).  Reported, not asserted."""

    def g(sc: str, srv: str, f: str) -> float | None:
        return summ.get((sc, srv), {}).get(f)

    rows: list[tuple[str, str, str, bool | None]] = []

    def add(
        what: str,
        target: str,
        value: float | None,
        ok: bool | None,
        fmt: str = "{:.2f}x",
        rate_of: tuple[str, tuple[str, str]] | None = None,
    ) -> None:
        text = "n/a" if value is None else fmt.format(value)
        if value is not None and rate_of is not None:
            sc, pair = rate_of
            if any((g(sc, srv, "client_cpu_share") or 0) >= GEN_BOUND_SHARE for srv in pair):
                text += " †"
        rows.append((what, target, text, ok))

    for sc in ("pp-100", "pp-1000"):
        r = ratio(
            g(sc, "unixsrv-event", "server_cpu_us_per_rt"),
            g(sc, REFERENCE_CPU, "server_cpu_us_per_rt"),
        )
        add(f"event model CPU/rt vs C epoll, {sc}", "<= 1.25x", r, None if r is None else r <= 1.25)
        r = ratio(g(sc, "unixsrv-event", "rate"), g(sc, REFERENCE_RATE, "rate"))
        add(
            f"event model rt/s vs uvloop Protocol, {sc}",
            ">= 1.3x",
            r,
            None if r is None else r >= 1.3,
            rate_of=(sc, ("unixsrv-event", REFERENCE_RATE)),
        )
    r = ratio(
        g("pp-100", "unixsrv-blocking", "server_cpu_us_per_rt"),
        g("pp-100", "socketserver", "server_cpu_us_per_rt"),
    )
    add(
        "blocking model CPU/rt vs socketserver, pp-100",
        "<= 0.5x",
        r,
        None if r is None else r <= 0.5,
    )
    r = ratio(g("pp-100", "unixsrv-blocking", "rate"), g("pp-100", "socketserver", "rate"))
    add(
        "blocking model rt/s vs socketserver, pp-100",
        ">= 2x",
        r,
        None if r is None else r >= 2.0,
        rate_of=("pp-100", ("unixsrv-blocking", "socketserver")),
    )
    v = g("rss-10000", "unixsrv-event", "rss_per_conn_bytes")
    add(
        "event model RSS per idle connection at 10,000",
        "<= 1 KiB",
        v,
        None if v is None else v <= 1024,
        "{:,.0f} B",
    )
    v = g("rss-10000", "unixsrv-blocking", "rss_per_conn_bytes")
    add(
        "blocking model RSS per idle connection at 10,000",
        "<= 16 KiB",
        v,
        None if v is None else v <= 16384,
        "{:,.0f} B",
    )
    for model in ("unixsrv-event", "unixsrv-blocking"):
        r = ratio(g("connect", model, "rate"), g("connect", REFERENCE_CPU, "rate"))
        add(
            f"{model.split('-')[1]} model connect rate vs C epoll",
            ">= 0.9x",
            r,
            None if r is None else r >= 0.9,
            rate_of=("connect", (model, REFERENCE_CPU)),
        )
    for what, want, sc, ours, theirs in ASYNCIO_LAYER_TARGETS:
        r = ratio(g(sc, ours, "server_cpu_us_per_rt"), g(sc, theirs, "server_cpu_us_per_rt"))
        add(what, f"<= {want:g}x", r, None if r is None else r <= want)
    # issue 10: the same handler on unixsrv.socketserver's ThreadingUnixStreamServer vs the stdlib's
    new, old = "unixsrv-socketserver", "socketserver"
    r = ratio(g("connect-16", new, "rate"), g("connect-16", old, "rate"))
    add(
        "unixsrv.socketserver connect rate vs socketserver, 16 slots",
        ">= 3x",
        r,
        None if r is None else r >= 3.0,
        rate_of=("connect-16", (new, old)),
    )
    r = ratio(g("pp-100", new, "rate"), g("pp-100", old, "rate"))
    add(
        "unixsrv.socketserver rt/s vs socketserver, pp-100",
        ">= 0.95x",
        r,
        None if r is None else r >= 0.95,
        rate_of=("pp-100", (new, old)),
    )
    r = ratio(g("pp-100", new, "server_cpu_us_per_rt"), g("pp-100", old, "server_cpu_us_per_rt"))
    add("unixsrv.socketserver CPU/rt vs socketserver, pp-100", "(reported)", r, None)
    r = ratio(g("rss-1000", new, "rss_per_conn_bytes"), g("rss-1000", old, "rss_per_conn_bytes"))
    add(
        "unixsrv.socketserver RSS per idle connection vs socketserver, 1,000",
        "<= 1x",
        r,
        None if r is None else r <= 1.0,
    )
    return rows


#: Issue 9 (unixsrv.asyncio): server CPU per round trip (per request for
#: HTTP) of the same application code, hosted by unixsrv vs the loop's own
#: server: (what, at most this ratio, scenario, unixsrv's row, the peer's row).
ASYNCIO_LAYER_TARGETS = [
    (
        "unixsrv.asyncio on asyncio CPU/rt vs asyncio's create_unix_server, pp-100",
        0.75,
        "pp-100",
        "unixsrv.asyncio-protocol",
        "asyncio-protocol",
    ),
    (
        "unixsrv.asyncio on uvloop CPU/rt vs uvloop's create_unix_server, pp-100",
        0.95,
        "pp-100",
        "unixsrv.asyncio-uvloop-protocol",
        "uvloop-protocol",
    ),
    (
        "unixsrv.asyncio start_unix_server on asyncio CPU/rt vs asyncio streams, pp-100",
        0.85,
        "pp-100",
        "unixsrv.asyncio-streams",
        "asyncio-streams",
    ),
    (
        "uvicorn on unixsrv.asyncio (uvloop) CPU/request vs uvicorn on uvloop, http-64",
        1.0,
        "http-64",
        "unixsrv.asyncio-uvicorn-uvloop",
        "uvicorn-uvloop",
    ),
    (
        "uvicorn on unixsrv.asyncio (asyncio) CPU/request vs uvicorn on asyncio, http-64",
        0.92,
        "http-64",
        "unixsrv.asyncio-uvicorn-asyncio",
        "uvicorn-asyncio",
    ),
]


# ------------------------------------------------------------------ report


def fmt(v: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "–" if v is None else format(v, spec) + suffix


def render_markdown(
    data: dict[str, Any], summ: dict[tuple[str, str], dict[str, Any]], png_name: str
) -> str:
    m = data["machine"]
    o = data["options"]
    scen = {s["key"]: s for s in data["scenarios"]}
    servers = data["servers"]
    L: list[str] = []
    L.append("# unixsrv benchmarks")
    L.append("")
    L.append(
        "Generated by `benchmarks/run.py` (see [benchmarks/README.md](../benchmarks/README.md)); "
        "do not edit by hand."
    )
    L.append("")
    L.append("```")
    L.append(data["command"])
    L.append("```")
    L.append("")
    L.append(
        f"- **Date**: {m['date']}; wall time {data.get('wall_s', 0) / 60:.1f} min; "
        f"{o['rounds']} round(s), each pingpong/connect measurement {o['duration']:g} s "
        f"after {o['warmup']:g} s of warm-up; values are medians over the rounds."
    )
    L.append(
        f"- **Machine**: {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']} GiB, Linux {m['kernel']}, "
        f"{m['python_impl']} {m['python']}, uvloop {m['uvloop']}, uvicorn {m.get('uvicorn', '?')}, "
        f"unixsrv {m['unixsrv']} "
        f"(git {m['git']}), {m['cc']}; RLIMIT_NOFILE {m['nofile_limit']}, somaxconn {m['somaxconn']}."
    )
    L.append(
        f"- **Load average** (1/5/15 min) before the run {'/'.join(map(str, data['load_before']))}, "
        f"after {'/'.join(map(str, data.get('load_after', ('?',))))} "
        "(the run itself keeps about two cores busy, and its 10,000-thread servers push the load "
        "average far up: it counts threads)."
    )
    q = data.get("quiet_check")
    if q:
        L.append(
            f"- **Before the run** {q['busy_cores']:.2f} cores were in use (3 s sample of /proc/stat)"
            + (
                f", after waiting {q['waited_s']:.0f} s for a quiet machine"
                if q["waited_s"] > 5
                else ""
            )
            + "."
        )
    others = [s["other_cpu_share"] for s in summ.values() if s.get("other_cpu_share") is not None]
    if others:
        L.append(
            f"- **Other processes' CPU** during the measurements (from /proc/stat, minus server and "
            f"generator): median {statistics.median(others):.2f} cores, max {max(others):.2f}."
        )
    L.append("")
    L.append(f"![server CPU per round trip and round trips/s]({png_name})")
    L.append("")
    L.append("## The issue's targets (for context; the harness reports, it does not assert)")
    L.append("")
    L.append(
        f"Medians; † = the generator was saturated (≥ {GEN_BOUND_SHARE:.2f} of a core) in one of the two rows compared, "
        "so that rate ratio is not the servers' alone."
    )
    L.append("")
    L.append("| target | wanted | measured | met |")
    L.append("|---|---|---|---|")
    for what, want, got, ok in targets(summ):
        L.append(
            f"| {what} | {want} | {got} | {'–' if ok is None else ('yes' if ok else '**no**')} |"
        )
    L.append("")
    L.append("## Throughput and CPU")
    L.append("")
    L.append(
        "Ranked by **server CPU per round trip** (µs of user+system CPU of the server process, all its "
        "threads, per round trip, from `--server-pid`). *×C* = CPU per round trip relative to the C "
        "epoll server; *×uvloop* = round trips/s relative to uvloop Protocol. *gen* = the load "
        "generator's own CPU, in cores (1.00 = one core busy); ≥ "
        f"{GEN_BOUND_SHARE:.2f} (marked †) means the generator, not the server, is the bottleneck "
        "of that row's rate. *srv* = the server's CPU in cores. Latency: per message, from its send "
        "to the arrival of its last echoed byte."
    )
    for key in [k for k in SCENARIO_KEYS if k in scen and scen[k]["mode"] != "hold"]:
        sc = scen[key]
        unit = {"connect": "connects/s", "http": "requests/s"}.get(sc["mode"], "rt/s")
        ref_cpu_srv, ref_rate_srv = (
            (HTTP_REFERENCE, HTTP_REFERENCE)
            if sc["mode"] == "http"
            else (REFERENCE_CPU, REFERENCE_RATE)
        )
        ref_cpu = summ.get((key, ref_cpu_srv), {}).get("server_cpu_us_per_rt")
        ref_rate = summ.get((key, ref_rate_srv), {}).get("rate")
        x_cpu, x_rate = ("×uvicorn", "×uvicorn") if sc["mode"] == "http" else ("×C", "×uvloop")
        L.append("")
        L.append(f"### {sc['title']}")
        L.append("")
        if sc["mode"] == "http":
            L.append(
                f"CPU per request; *×uvicorn* = relative to `{HTTP_REFERENCE}` (CPU per request and "
                "requests/s). The generator is benchmarks/http_load.c (C, epoll, one request in flight "
                "per connection, every response's status and length checked). Latency: from a request's "
                "send to its complete response."
            )
            L.append("")
        L.append(
            f"| # | server | CPU µs/rt | {x_cpu} | {unit} | {x_rate} | p50 µs | p99 µs | srv | gen | spread |"
        )
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows = [(srv, summ[(key, srv)]) for srv in servers if (key, srv) in summ]
        rows.sort(
            key=lambda t: (t[1]["server_cpu_us_per_rt"] is None, t[1]["server_cpu_us_per_rt"] or 0)
        )
        for i, (srv, s) in enumerate(rows, 1):
            if s["n"] == 0:
                L.append(f"| {i} | {srv} | failed: {s['failures'][0][:80]} | | | | | | | | |")
                continue
            gen = s["client_cpu_share"]
            mark = " †" if gen is not None and gen >= GEN_BOUND_SHARE else ""
            errs = f" ({s['errors']} errors)" if s["errors"] else ""
            name = f"**{srv}**" if srv.startswith("unixsrv") else srv
            L.append(
                f"| {i} | {name}{errs} | {fmt(s['server_cpu_us_per_rt'], '.2f')} "
                f"| {fmt(ratio(s['server_cpu_us_per_rt'], ref_cpu), '.2f')} "
                f"| {fmt(s['rate'])} | {fmt(ratio(s['rate'], ref_rate), '.2f')} "
                f"| {fmt(s['p50_us'], ',.1f')} | {fmt(s['p99_us'], ',.1f')} "
                f"| {fmt(s['server_cpu_share'], '.2f')} | {fmt(gen, '.2f')}{mark} "
                f"| {fmt(None if s['rate_spread'] is None else s['rate_spread'] * 100, '.0f', ' %')} |"
            )
    rss_keys = [k for k in SCENARIO_KEYS if k in scen and scen[k]["mode"] == "hold"]
    if rss_keys:
        L.append("")
        L.append("## Memory per idle connection")
        L.append("")
        L.append(
            "Server VmRSS (/proc/PID/status) with N established, idle connections (each did one "
            "verified echo) minus VmRSS before they connected (after one short warm-up "
            "connection), divided by N. Kernel socket buffers are not in RSS and not counted."
        )
        L.append("")
        head = " | ".join(f"bytes/conn at {scen[k]['connections']:,}" for k in rss_keys)
        L.append(
            f"| server | {head} | RSS before → held at {scen[rss_keys[-1]]['connections']:,} (MiB) "
            "| threads held |"
        )
        L.append("|---|" + "---:|" * len(rss_keys) + "---:|---:|")
        last = rss_keys[-1]

        def rss_key(srv: str) -> float:
            v = summ.get((last, srv), {}).get("rss_per_conn_bytes")
            return float("inf") if v is None else v

        for srv in sorted(servers, key=rss_key):
            cells = []
            for k in rss_keys:
                s = summ.get((k, srv))
                if not s or s["n"] == 0:
                    cells.append("failed" if s else "–")
                else:
                    extra = f" ({s['errors']} errors)" if s["errors"] else ""
                    cells.append(fmt(s["rss_per_conn_bytes"], ",.0f") + extra)
            s = summ.get((last, srv), {})
            before = s.get("rss_before_kib")
            held = s.get("rss_held_kib")
            mem = (
                "–"
                if before is None or held is None
                else f"{before / 1024:.1f} → {held / 1024:.1f}"
            )
            name = f"**{srv}**" if srv.startswith("unixsrv") else srv
            L.append(
                f"| {name} | " + " | ".join(cells) + f" | {mem} | {fmt(s.get('threads_held'))} |"
            )
    L.append("")
    L.append("## Servers")
    L.append("")
    for srv in servers:
        L.append(f"- `{srv}`: {SERVERS[srv]}")
    L.append("")
    L.append(
        "Every server listens with a backlog of 4096, runs as its own process on a fresh socket for "
        "each measurement, and is ended by PID afterwards. The peers' code is in "
        "[benchmarks/peers.py](../benchmarks/peers.py), the C server in "
        "[benchmarks/echo_epoll.c](../benchmarks/echo_epoll.c)."
    )
    L.append("")
    L.append("## Notes")
    L.append("")
    for note in notes(data, summ):
        L.append(f"- {note}")
    L.append("")
    return "\n".join(L)


def notes(data: dict[str, Any], summ: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    out = []
    nproc = data["machine"]["nproc"]
    out.append(
        f"The generator and the server share the machine's {nproc} CPUs; the generator is one C "
        "thread (epoll, GIL released) that verifies every echoed byte. Where a row's *gen* is near "
        "1.00 the generator is saturated and that row's rate is a lower bound for the server; CPU "
        "per round trip stays meaningful there."
    )
    bound = sorted(
        {
            (k[0], k[1])
            for k, s in summ.items()
            if s.get("client_cpu_share") is not None and s["client_cpu_share"] >= GEN_BOUND_SHARE
        }
    )
    if bound:
        by_sc: dict[str, list[str]] = {}
        for sc, srv in bound:
            by_sc.setdefault(sc, []).append(srv)
        out.append(
            f"Generator-bound (gen ≥ {GEN_BOUND_SHARE:.2f}): "
            + "; ".join(f"{sc}: {', '.join(v)}" for sc, v in by_sc.items())
            + "."
        )
    else:
        out.append(f"No measurement had the generator at ≥ {GEN_BOUND_SHARE:.2f} of a core.")
    retried = [r for r in data["records"] if r.get("attempts", 1) > 1]
    if retried:
        out.append(
            f"{len(retried)} of {len(data['records'])} measurements were repeated because other processes "
            f"took more than {DISTURBED_SHARE} cores meanwhile (the least disturbed attempt is kept)."
        )
    disturbed = [
        (k, s["other_cpu_share"])
        for k, s in summ.items()
        if s.get("other_cpu_share") is not None and s["other_cpu_share"] > DISTURBED_SHARE
    ]
    if disturbed:
        out.append(
            f"Possibly disturbed by other processes (median other-CPU > {DISTURBED_SHARE:.2f} cores): "
            + ", ".join(f"{sc}/{srv} ({v:.2f})" for (sc, srv), v in sorted(disturbed))
            + "."
        )
    fails = [(k, s) for k, s in summ.items() if s["failures"] or s["errors"] or s["server_died"]]
    for (sc, srv), s in sorted(fails):
        what = []
        if s["failures"]:
            what.append(f"{len(s['failures'])} failed measurement(s): {s['failures'][0][:200]}")
        if s["errors"]:
            what.append(f"{s['errors']} generator errors (mismatch/EOF/connect/stall)")
        if s["server_died"]:
            what.append(f"the server exited during {s['server_died']} measurement(s)")
        out.append(f"{sc} / {srv}: " + "; ".join(what) + ".")
    a, b = summ.get(("pp-1", REFERENCE_CPU)), summ.get(("pp-1-1cpu", REFERENCE_CPU))
    if a and b and a.get("rate") and b.get("rate"):
        out.append(
            "pp-1 vs pp-1-1cpu: with one connection every round trip wakes the other side. With server and "
            "generator on different CPUs that is a cross-CPU wake-up of an idle CPU, and on this machine "
            f"(a VM) it dominates: {REFERENCE_CPU} does {a['rate']:,.0f} rt/s at "
            f"{fmt(a['server_cpu_us_per_rt'], '.1f')} µs of server CPU per round trip unpinned, but "
            f"{b['rate']:,.0f} rt/s at {fmt(b['server_cpu_us_per_rt'], '.1f')} µs with both pinned to "
            "one CPU (the wake-up cost shows up in the woken process's CPU time too). The pinned row is "
            "the servers' own cost; the unpinned one mostly measures the machine. The same effect, "
            "diluted, is in every row: a server that sleeps and wakes less often (batching more work per "
            "wake-up) pays it less often."
        )
    out.append(
        "*spread* = (max − min) / median of the rate over the rounds. With only "
        f"{nproc} CPUs for server and generator together, the rates of the fast servers depend on "
        "how their wake-ups line up and move a lot from round to round; CPU per round trip is much "
        "steadier, which is why the tables are ranked by it."
    )
    out.append(
        "CPU per round trip = server CPU over the generator's measured window / round trips in it; "
        "in connect mode a round trip is a whole connect → 64 B echo → close cycle. For the "
        "threaded servers it includes every thread."
    )
    if data.get("json_path"):
        out.append(
            f"Every measurement (each round, with the generator's whole JSON result) is in "
            f"`{data['json_path']}`."
        )
    return out


def render_png(
    data: dict[str, Any], summ: dict[tuple[str, str], dict[str, Any]], path: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = [s for s in data["scenarios"] if s["mode"] != "hold"]
    rss = [s for s in data["scenarios"] if s["mode"] == "hold"]
    servers = data["servers"]
    colors = {
        "unixsrv-event": "#d62728",
        "unixsrv-blocking": "#ff7f0e",
        "uvloop-protocol": "#1f77b4",
        "uvloop-streams": "#aec7e8",
        "asyncio-protocol": "#2ca02c",
        "asyncio-streams": "#98df8a",
        "socketserver": "#9467bd",
        "c-epoll": "#7f7f7f",
        "unixsrv-socketserver": "#8c564b",
    }
    panels = [
        ("server_cpu_us_per_rt", "server CPU per round trip (µs, log; lower is better)", scen),
        ("rate", "round trips/s (connect: connects/s; log; higher is better)", scen),
    ]
    if rss:
        panels.append(("rss_per_conn_bytes", "server RSS per idle connection (bytes, log)", rss))
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 4.2 * len(panels)))
    width = 0.8 / len(servers)
    for ax, (field_, title, scs) in zip(axes, panels, strict=True):
        for j, srv in enumerate(servers):
            xs, ys = [], []
            for i, sc in enumerate(scs):
                v = summ.get((sc["key"], srv), {}).get(field_)
                x = i - 0.4 + width * (j + 0.5)
                if v is not None and v >= 1:
                    xs.append(x)
                    ys.append(v)
                elif v is not None:  # below the log axis (e.g. the C server's ~0 B)
                    ax.text(
                        x, 1.15, "≈0", ha="center", va="bottom", fontsize=7, color=colors.get(srv)
                    )
            ax.bar(xs, ys, width, label=srv, color=colors.get(srv))
        ax.set_yscale("log")
        ax.set_ylim(bottom=1 if field_ == "rss_per_conn_bytes" else None)
        ax.set_title(title)
        ax.set_xticks(range(len(scs)))
        ax.set_xticklabels([s["key"] for s in scs])
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(ncol=4, fontsize=8, loc="upper left")
    m = data["machine"]
    fig.suptitle(
        f"unixsrv vs peers — {m['nproc']} CPUs, Linux {m['kernel']}, Python {m['python']}, "
        f"{m['date']} (medians of {data['options']['rounds']} round(s))",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(data: dict[str, Any], out_dir: str) -> tuple[str, str]:
    summ = summarize(data)
    png = os.path.join(out_dir, "benchmarks.png")
    md = os.path.join(out_dir, "benchmarks.md")
    render_png(data, summ, png)
    with open(md, "w", encoding="utf-8") as f:
        f.write(render_markdown(data, summ, os.path.basename(png)))
    return md, png


# ------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 round, 1 s per measurement; writes to benchmarks/.build/quick/",
    )
    p.add_argument("--rounds", type=int, help="rounds (default 3; --quick 1)")
    p.add_argument(
        "--duration",
        type=float,
        help="seconds measured per pingpong/connect run (default 3; --quick 1)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        help="seconds of traffic before measuring (default 0.5; --quick 0.2)",
    )
    p.add_argument("--servers", help="comma-separated subset of: " + ", ".join(SERVERS))
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIO_KEYS),
        help="comma-separated subset of: " + ", ".join(SCENARIO_KEYS),
    )
    p.add_argument(
        "--out-dir",
        help="where benchmarks.md/.png/.json go (default docs/; --quick benchmarks/.build/quick/)",
    )
    p.add_argument(
        "--json-out",
        help="where every measurement goes (default benchmarks/results/benchmarks.json; "
        "--quick or --out-dir: benchmarks.json in the output directory)",
    )
    p.add_argument(
        "--max-load",
        type=float,
        default=1.5,
        help="before starting, wait for the 1-min load average to drop below this (default 1.5)",
    )
    p.add_argument(
        "--max-busy",
        type=float,
        default=0.3,
        help="... and for the CPU in use by others to drop below this many cores (default 0.3)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        help="wait at most this many seconds for that (default 600; --quick 0)",
    )
    p.add_argument(
        "--retry-disturbed",
        type=int,
        default=2,
        help="measure again (at most this many times) when other processes took more than "
        f"{DISTURBED_SHARE} cores meanwhile; the least disturbed attempt is kept (default 2)",
    )
    p.add_argument(
        "--report-only",
        metavar="JSON",
        help="only re-render the reports from a saved benchmarks.json",
    )
    args = p.parse_args(argv)
    args.command_line = "python benchmarks/run.py" + (
        ""
        if argv is None and len(sys.argv) < 2
        else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.duration = args.duration or (1.0 if q else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.2 if q else 0.5)
    args.wait_quiet = args.wait_quiet if args.wait_quiet is not None else (0.0 if q else 600.0)
    if not args.json_out:
        args.json_out = (
            os.path.join(args.out_dir or os.path.join(harness.BUILD, "quick"), "benchmarks.json")
            if q or args.out_dir
            else os.path.join(harness.HERE, "results", "benchmarks.json")
        )
    if not args.out_dir:
        args.out_dir = (
            os.path.join(harness.BUILD, "quick") if q else os.path.join(harness.ROOT, "docs")
        )
    args.servers_given = args.servers is not None
    args.servers = [s for s in (args.servers or ",".join(SERVERS)).split(",") if s]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    bad = [s for s in args.servers if s not in SERVERS] + [
        s for s in args.scenarios if s not in SCENARIO_KEYS
    ]
    if bad:
        p.error(f"unknown server/scenario: {', '.join(bad)}")
    os.makedirs(args.out_dir, exist_ok=True)
    if args.report_only:
        with open(args.report_only, encoding="utf-8") as f:
            data = json.load(f)
    else:
        try:
            import matplotlib  # noqa: F401
            import uvloop  # noqa: F401
        except ImportError as exc:
            p.error(f"{exc}: install the bench extra (pip install -e '.[bench]')")
        if any(s in harness.HTTP_SERVERS for s in args.servers) and "http-64" in args.scenarios:
            try:
                import httptools  # noqa: F401
                import uvicorn  # noqa: F401
            except ImportError as exc:
                if args.servers_given:
                    p.error(
                        f"{exc}: the HTTP rows need the compat extra (pip install -e '.[bench,compat]')"
                    )
                log(
                    f"{exc}: leaving out the HTTP servers (pip install -e '.[bench,compat]' adds them)"
                )
                args.servers = [s for s in args.servers if s not in harness.HTTP_SERVERS]
        est = args.rounds * sum(
            (args.duration + args.warmup + 2.0)
            if s.mode != "hold"
            else (4.0 + s.connections / 2500)
            for s in SCENARIOS
            if s.key in args.scenarios
            for srv in args.servers
            if s.fits(srv)
        )
        log(
            f"{args.rounds} round(s) x {len(args.scenarios)} scenarios x {len(args.servers)} servers; "
            f"about {est / 60:.0f} min; results to {args.out_dir}"
        )
        data = run_all(args)
    md, png = write_reports(data, args.out_dir)
    log(
        f"wrote {md} and {png}" + (f" in {data['wall_s'] / 60:.1f} min" if "wall_s" in data else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
