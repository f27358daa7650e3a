"""Compare unixsrv with its peers on one machine, in one run, on one load
generator.  See benchmarks/README.md.

    python benchmarks/run.py            # full run (~11 min): README.md's Performance tables,
                                        # docs/benchmarks.{md,png}, benchmarks/results/benchmarks.json
    python benchmarks/run.py --quick    # smoke run (~2 min), writes benchmarks/.build/quick/

Every measurement starts its server as a fresh subprocess pinned to one CPU,
primes it with 0.2 s of connect -> echo -> close traffic, runs the generator
(``python -m unixsrv bench PATH --json --server-pid PID``) pinned to another
CPU, and ends the server by PID.  Measurements are interleaved: each round
goes through every scenario, and within a scenario through every server (the
order rotates from round to round), so whatever else the machine does falls
on every server alike.  The report gives medians over the rounds, ranked by
server CPU per round trip.  The harness reports; it never asserts.
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
    short: str = ""  # column heading of the README table
    once: bool = False  # measured in the first round only (memory does not vary with load)

    @property
    def is_rss(self) -> bool:
        return self.mode == "hold"

    def fits(self, server: str) -> bool:
        """HTTP scenarios run the HTTP servers, the others the echo servers."""
        return (self.mode == "http") == (server in harness.HTTP_SERVERS)


SCENARIOS = [
    Scenario("pp-1", "ping-pong 64 B, 1 connection", "pingpong", 1, short="1 conn × 64 B"),
    Scenario(
        "pp-1-1cpu",
        "ping-pong 64 B, 1 connection, server and generator pinned to one CPU",
        "pingpong",
        1,
        one_cpu=True,
        short="1 conn × 64 B, one CPU",
    ),
    Scenario(
        "pp-100", "ping-pong 64 B, 100 connections", "pingpong", 100, short="100 conns × 64 B"
    ),
    Scenario(
        "pp-1000",
        "ping-pong 64 B, 1,000 connections",
        "pingpong",
        1000,
        short="1,000 conns × 64 B",
    ),
    Scenario(
        "pp-16k",
        "ping-pong 16 KiB, 10 connections",
        "pingpong",
        10,
        16384,
        short="10 conns × 16 KiB",
    ),
    Scenario(
        "connect",
        "connect rate (connect, 64 B echo, close; 8 concurrent)",
        "connect",
        8,
        short="connect → 64 B → close, 8 slots",
    ),
    Scenario(
        "connect-16",
        "connect rate (connect, 64 B echo, close; 16 concurrent)",
        "connect",
        16,
        short="connect → 64 B → close, 16 slots",
    ),
    Scenario(
        "rss-1000",
        "RSS per idle connection, 1,000 held",
        "hold",
        1000,
        short="RSS per idle conn at 1,000",
        once=True,
    ),
    Scenario(
        "rss-10000",
        "RSS per idle connection, 10,000 held",
        "hold",
        10000,
        short="RSS per idle conn at 10,000",
        once=True,
    ),
    Scenario(
        "http-64",
        "uvicorn (httptools) hello-world ASGI app, GET / on 64 keep-alive HTTP/1.1 connections",
        "http",
        64,
        short="uvicorn hello world, 64 conns",
    ),
]
SCENARIO_KEYS = [s.key for s in SCENARIOS]
#: What a run without --scenarios measures: the README's tables.
DEFAULT_SCENARIOS = ["pp-100", "pp-1000", "connect-16", "rss-1000", "http-64"]
REFERENCE_CPU = "c-epoll"  # CPU per round trip is relative to this one
REFERENCE_RATE = "uvloop-protocol"  # round trips/s are relative to this one
HTTP_REFERENCE = "uvicorn-uvloop"  # the same for the HTTP scenario (CPU per request and requests/s)
GEN_BOUND_SHARE = 0.9  # generator CPU share from which it is the bottleneck
#: CPU (cores) taken from the measurement by others -- other processes, or
#: the hypervisor (steal time, proc(5) /proc/stat: a virtual machine's CPU
#: given to another guest) -- that marks a disturbed measurement.  Steal
#: counts: on a shared VM it reached 0.8 cores in a whole round of a run and
#: halved the rates of every server measured then.
DISTURBED_SHARE = 0.25
#: Seconds a measurement takes besides its warm-up and measured window
#: (starting and ending the server, starting the generator, connecting),
#: for the time estimate; and the same for an RSS measurement, plus 1 s
#: per 2,500 connections held.
OVERHEAD_S = 1.0
RSS_OVERHEAD_S = 4.0
RETRY_PAUSE_S = 3.0  # before measuring a disturbed measurement again


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> tuple[float, float, float]:
    a, b, c = os.getloadavg()
    return round(a, 2), round(b, 2), round(c, 2)


# ------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class Pinning:
    """The CPUs of the server and of the generator (see harness.cpu_split)."""

    server: frozenset[int]
    generator: frozenset[int]

    @classmethod
    def split(cls) -> Pinning:
        return cls(*harness.cpu_split())

    def for_scenario(self, sc: Scenario) -> tuple[harness.Pin, harness.Pin]:
        """preexec_fns of (server, generator): both on the server's CPU for a
        one_cpu scenario."""
        gen = self.server if sc.one_cpu else self.generator
        return harness.Pin(self.server), harness.Pin(gen)

    def describe(self) -> dict[str, Any]:
        return {
            "server_cpus": sorted(self.server),
            "generator_cpus": sorted(self.generator),
            "shared": bool(self.server & self.generator),
        }


def measure_rate(
    server: str, sc: Scenario, duration: float, warmup: float, pinning: Pinning
) -> dict[str, Any]:
    """One ping-pong, connect or HTTP measurement on a fresh, primed server."""
    pin_server, pin_gen = pinning.for_scenario(sc)
    with harness.running_server(server, preexec=pin_server) as srv:
        harness.prime(server, srv.path, preexec=pin_gen)
        before = CpuSnapshot.take()
        srv_cpu0 = harness.proc_cpu_s(srv.pid) or 0.0
        if sc.mode == "http":
            r = harness.run_http_load(
                srv.path,
                timeout=duration + warmup + 90.0,
                preexec=pin_gen,
                connections=sc.connections,
                duration=duration,
                warmup=warmup,
                server_pid=srv.pid,
            )
        else:
            r = harness.run_bench(
                srv.path,
                timeout=duration + warmup + 90.0,
                preexec=pin_gen,
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


def measure_rss(server: str, sc: Scenario, pinning: Pinning) -> dict[str, Any]:
    """Server VmRSS after priming vs with `sc.connections` idle, established
    connections (each did one verified echo), divided by their number.  The
    priming traffic comes first, so that one-off allocations of the first
    connections (lazy imports, first buffers, the first worker threads) are
    in the baseline, not in the per-connection figure."""
    n = sc.connections
    pin_server, pin_gen = pinning.for_scenario(sc)
    with harness.running_server(server, preexec=pin_server) as srv:
        harness.prime(server, srv.path, preexec=pin_gen)
        base = harness.settled_rss(srv.pid)
        threads0 = harness.threads(srv.pid)
        t0 = time.monotonic()
        with harness.hold(srv.path, n, server_pid=srv.pid, preexec=pin_gen) as h:
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


def measure(
    server: str, sc: Scenario, duration: float, warmup: float, pinning: Pinning
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "server": server,
        "scenario": sc.key,
        "started": time.time(),
        "load_before": loadavg(),
    }
    try:
        if sc.is_rss:
            rec.update(measure_rss(server, sc, pinning))
        else:
            rec.update(measure_rate(server, sc, duration, warmup, pinning))
    except (BenchError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        rec["failure"] = f"{type(exc).__name__}: {exc}"
    rec["seconds"] = round(time.time() - rec["started"], 2)
    return rec


def field_values(summ: Summary, field: str) -> list[float]:
    """The rows' (medians') values of `field`, where it was measured."""
    return [s[field] for s in summ.values() if s.get(field) is not None]


def disturbance(rec: dict[str, Any]) -> float:
    """Cores taken from a measurement by other processes and the hypervisor."""
    return (rec.get("other_cpu_share") or 0.0) + (rec.get("steal_share") or 0.0)


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
        f"other {rec['other_cpu_share']:.2f}  steal {rec.get('steal_share') or 0:.2f}  "
        f"errors {rec['errors']}"
    )


def plan(
    servers: list[str], scenarios: list[Scenario], rounds: int
) -> list[tuple[int, Scenario, str]]:
    """The interleaved order of the measurements: (round, scenario, server).
    Each round runs every scenario, each scenario every server that speaks
    its protocol, the servers' order rotated by one from round to round; a
    `once` scenario only in the first round."""
    out = []
    for rnd in range(rounds):
        for sc in scenarios:
            fitting = [srv for srv in servers if sc.fits(srv)]
            if not fitting or (sc.once and rnd > 0):
                continue
            k = rnd % len(fitting)
            out.extend((rnd, sc, srv) for srv in fitting[k:] + fitting[:k])
    return out


def estimate_s(sc: Scenario, duration: float, warmup: float) -> float:
    """About how long one measurement of `sc` takes (for the time estimate
    and the retry budget)."""
    if sc.is_rss:
        return RSS_OVERHEAD_S + sc.connections / 2500
    return OVERHEAD_S + harness.PRIME_SECONDS + warmup + duration


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
    """CPU in use by everything on the machine (cores) over a short sample,
    including what the hypervisor gave to other guests (steal time)."""
    a = CpuSnapshot.take()
    time.sleep(seconds)
    b = CpuSnapshot.take()
    return ((b.busy + b.steal) - (a.busy + a.steal)) / (b.wall - a.wall)


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
    pinning = Pinning.split()
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
            "prime_s": harness.PRIME_SECONDS,
            "quick": args.quick,
            "retry_disturbed": args.retry_disturbed,
            "max_minutes": args.max_minutes,
        },
        "pinning": pinning.describe(),
        "scenarios": [asdict(s) for s in scenarios],
        "servers": servers,
        "machine": facts,
        "load_before": load0,
        "quiet_check": quiet,
        "json_path": os.path.relpath(args.json_out, harness.ROOT),
        "records": [],
    }
    order = plan(servers, scenarios, args.rounds)
    t0 = time.monotonic()
    deadline = t0 + args.max_minutes * 60
    skipped_retries = 0
    raw_path = args.json_out
    os.makedirs(os.path.dirname(raw_path), exist_ok=True)
    for done, (rnd, sc, server) in enumerate(order, 1):
        rec = measure(server, sc, args.duration, args.warmup, pinning)
        # Another process or the hypervisor took CPU meanwhile: measure
        # again (a few times at most, and only while the rest of the run
        # still fits in the time budget) and keep the least disturbed attempt.
        attempts = 1
        while (
            attempts <= args.retry_disturbed
            and "failure" not in rec
            and disturbance(rec) > DISTURBED_SHARE
        ):
            rest = sum(estimate_s(s, args.duration, args.warmup) for _, s, _ in order[done:])
            if time.monotonic() + RETRY_PAUSE_S + rec["seconds"] + rest > deadline:
                skipped_retries += 1
                break
            log(
                f"    {sc.key} {server}: other processes took {rec['other_cpu_share']:.2f} cores, "
                f"the hypervisor {rec.get('steal_share') or 0:.2f}; measuring again in {RETRY_PAUSE_S:g} s"
            )
            time.sleep(RETRY_PAUSE_S)  # a pause: a short burst elsewhere may be over by then
            again = measure(server, sc, args.duration, args.warmup, pinning)
            attempts += 1
            if "failure" not in again and disturbance(again) < disturbance(rec):
                rec = again
        rec["attempts"] = attempts
        rec["round"] = rnd
        data["records"].append(rec)
        log(f"[{done}/{len(order)}] round {rnd + 1} {sc.key:<10} {server:<31} {short(rec)}")
        with open(raw_path + ".partial", "w", encoding="utf-8") as f:
            json.dump(data, f)
    data["wall_s"] = round(time.monotonic() - t0, 1)
    data["skipped_retries"] = skipped_retries
    data["load_after"] = loadavg()
    with open(raw_path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.unlink(raw_path + ".partial")
    return data


# ------------------------------------------------------------------ analysis


#: Medians per (scenario, server), as summarize() makes them.
Summary = dict[tuple[str, str], dict[str, Any]]


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(data: dict[str, Any]) -> Summary:
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


@dataclass(frozen=True)
class Target:
    """One target of an issue: the median `field` of server `ours` over the
    same of `theirs` in `scenario`, wanted `op` `bound` (op "" = reported
    only).  `field` is server_cpu_us_per_rt, rate or rss_per_conn_bytes."""

    issue: int
    what: str
    scenario: str
    field: str
    ours: str
    theirs: str
    op: str
    bound: float = 0.0

    @property
    def wanted(self) -> str:
        return f"{self.op} {self.bound:g}x" if self.op else "(reported)"

    def evaluate(self, summ: Summary) -> tuple[float | None, bool | None, bool]:
        """(ratio, met?, generator-bound?): met is None when a row is
        missing or the target is only reported; generator-bound when a rate
        is compared and the generator was saturated in either row."""
        rows = [summ.get((self.scenario, srv), {}) for srv in (self.ours, self.theirs)]
        r = ratio(rows[0].get(self.field), rows[1].get(self.field))
        met = None
        if r is not None and self.op == "<=":
            met = r <= self.bound
        elif r is not None and self.op == ">=":
            met = r >= self.bound
        bound_gen = self.field == "rate" and any(
            (row.get("client_cpu_share") or 0) >= GEN_BOUND_SHARE for row in rows
        )
        return r, met, bound_gen


_CPU, _RATE, _RSS = "server_cpu_us_per_rt", "rate", "rss_per_conn_bytes"
_EV, _BL, _SS = "unixsrv-event", "unixsrv-blocking", "socketserver"

TARGETS = [
    # issue 11: the event model against the C server and uvloop, the blocking
    # model against socketserver, at 100 and 1,000 connections; connects/s.
    *(
        t
        for sc, n, cpu_bl in (("pp-100", "100", 0.45), ("pp-1000", "1,000", 0.6))
        for t in (
            Target(11, f"event model CPU/rt vs C epoll, {n} conns", sc, _CPU, _EV, "c-epoll", "<=", 1.10),
            Target(11, f"event model rt/s vs uvloop Protocol, {n} conns", sc, _RATE, _EV, "uvloop-protocol", ">=", 1.3),
            Target(11, f"blocking model CPU/rt vs socketserver, {n} conns", sc, _CPU, _BL, _SS, "<=", cpu_bl),
            Target(11, f"blocking model rt/s vs socketserver, {n} conns", sc, _RATE, _BL, _SS, ">=", 2.0),
        )
    ),
    Target(11, "event model connects/s vs uvloop Protocol, 16 slots", "connect-16", _RATE, _EV, "uvloop-protocol", ">=", 1.3),
    Target(11, "blocking model connects/s vs socketserver, 16 slots", "connect-16", _RATE, _BL, _SS, ">=", 4.0),
    # issue 10: the same handler on unixsrv.socketserver vs the standard library's.
    Target(10, "unixsrv.socketserver connects/s vs socketserver, 16 slots", "connect-16", _RATE, "unixsrv-socketserver", _SS, ">=", 3.0),
    Target(10, "unixsrv.socketserver rt/s vs socketserver, 100 conns", "pp-100", _RATE, "unixsrv-socketserver", _SS, ">=", 0.95),
    Target(10, "unixsrv.socketserver CPU/rt vs socketserver, 100 conns", "pp-100", _CPU, "unixsrv-socketserver", _SS, ""),
    Target(10, "unixsrv.socketserver RSS per idle connection vs socketserver, 1,000", "rss-1000", _RSS, "unixsrv-socketserver", _SS, "<=", 1.0),
    # issue 9: the same application code hosted by unixsrv.asyncio vs the loop's own server.
    Target(9, "unixsrv.asyncio on asyncio CPU/rt vs asyncio's create_unix_server, 100 conns", "pp-100", _CPU, "unixsrv.asyncio-protocol", "asyncio-protocol", "<=", 0.75),
    Target(9, "unixsrv.asyncio on uvloop CPU/rt vs uvloop's create_unix_server, 100 conns", "pp-100", _CPU, "unixsrv.asyncio-uvloop-protocol", "uvloop-protocol", "<=", 0.95),
    Target(9, "unixsrv.asyncio start_unix_server on asyncio CPU/rt vs asyncio streams, 100 conns", "pp-100", _CPU, "unixsrv.asyncio-streams", "asyncio-streams", "<=", 0.85),
    Target(9, "uvicorn on unixsrv.asyncio (uvloop) CPU/request vs uvicorn on uvloop", "http-64", _CPU, "unixsrv.asyncio-uvicorn-uvloop", "uvicorn-uvloop", "<=", 1.0),
    Target(9, "uvicorn on unixsrv.asyncio (asyncio) CPU/request vs uvicorn on asyncio", "http-64", _CPU, "unixsrv.asyncio-uvicorn-asyncio", "uvicorn-asyncio", "<=", 0.92),
]  # fmt: skip


def target_rows(summ: Summary, issue: int | None = None) -> list[tuple[Target, str, bool | None]]:
    """(target, measured text, met?) for the targets (of one issue, or all);
    "not measured" where a row is missing from the run, † marks a
    generator-bound rate."""
    out = []
    for t in TARGETS:
        if issue is not None and t.issue != issue:
            continue
        if (t.scenario, t.ours) not in summ or (t.scenario, t.theirs) not in summ:
            out.append((t, "not measured", None))
            continue
        r, met, bound_gen = t.evaluate(summ)
        text = "n/a" if r is None else f"{r:.2f}x" + (" †" if bound_gen else "")
        out.append((t, text, met))
    return out


def yes_no(met: bool | None) -> str:
    return "–" if met is None else ("yes" if met else "no")


def targets_text(summ: Summary, issue: int = 11) -> str:
    """The targets of `issue` as a plain-text table (printed after a run)."""
    rows = target_rows(summ, issue)
    width = max(len(t.what) for t, _, _ in rows)
    lines = [f"issue {issue} targets (medians; † = generator-bound rate):"]
    lines.append(f"  {'target':<{width}}  {'wanted':<9}  {'measured':<12}  met")
    for t, text, met in rows:
        lines.append(f"  {t.what:<{width}}  {t.wanted:<9}  {text:<12}  {yes_no(met)}")
    met = [m for _, _, m in rows if m is not None]
    lines.append(f"  {sum(met)} of {len(met)} met")
    return "\n".join(lines)


# ------------------------------------------------------------------ report


def fmt(v: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "–" if v is None else format(v, spec) + suffix


def render_markdown(data: dict[str, Any], summ: Summary, png_name: str) -> str:
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
        f"{m['python_impl']} {m['python']}, uvloop {m['uvloop']}, uvicorn {m.get('uvicorn', 'not recorded')}, "
        f"unixsrv {m['unixsrv']} "
        f"(git {m['git']}), {m['cc']}; RLIMIT_NOFILE {m['nofile_limit']}, somaxconn {m['somaxconn']}."
    )
    L.append(f"- **Method**: {method_text(data)}.")
    L.append(
        f"- **Load average** (1/5/15 min) before the run {'/'.join(map(str, data['load_before']))}, "
        f"after {'/'.join(map(str, data.get('load_after', ('?',))))} "
        "(it counts runnable threads: the threaded servers' handler threads push it up)."
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
    others = field_values(summ, "other_cpu_share")
    if others:
        L.append(
            f"- **Other processes' CPU** during the measurements (from /proc/stat, minus server and "
            f"generator): median {statistics.median(others):.2f} cores, max {max(others):.2f}."
        )
    steals = field_values(summ, "steal_share")
    if steals:
        L.append(
            f"- **CPU stolen by the hypervisor** during the measurements (steal time, /proc/stat): "
            f"median {statistics.median(steals):.2f} cores, max {max(steals):.2f}; a measurement "
            f"that lost more than {DISTURBED_SHARE} cores to it and to other processes was repeated."
        )
    L.append("")
    L.append(f"![server CPU per round trip and round trips/s]({png_name})")
    for issue in sorted({t.issue for t in TARGETS}, reverse=True):
        rows = target_rows(summ, issue)
        if all(text == "not measured" for _, text, _ in rows):
            continue
        L.append("")
        L.append(f"## Issue {issue}'s targets (the harness reports, it does not assert)")
        L.append("")
        L.append(
            f"Medians; † = the generator was saturated (≥ {GEN_BOUND_SHARE:.2f} of a core) in one "
            "of the two rows compared, so that rate ratio is not the servers' alone."
        )
        L.append("")
        L.append("| target | wanted | measured | met |")
        L.append("|---|---|---|---|")
        for t, text, met in rows:
            L.append(
                f"| {t.what} | {t.wanted} | {text} | {'**no**' if met is False else yes_no(met)} |"
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


def notes(data: dict[str, Any], summ: Summary) -> list[str]:
    out = []
    nproc = data["machine"]["nproc"]
    pin = data.get("pinning")
    where = (
        f"not pinned: it and the server shared the machine's {nproc} CPUs"
        if not pin
        else "on the server's CPU (the machine has only one)"
        if pin["shared"]
        else "on a CPU of its own"
    )
    out.append(
        f"The generator is one C thread (epoll, GIL released) that verifies every echoed byte, {where}. "
        "Where a row's *gen* is near 1.00 the generator is saturated and that row's rate is a lower "
        "bound for the server; CPU per round trip stays meaningful there."
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
            f"or the hypervisor (steal time) took more than {DISTURBED_SHARE} cores meanwhile "
            "(the least disturbed attempt is kept)."
        )
    if data.get("skipped_retries"):
        out.append(
            f"{data['skipped_retries']} disturbed measurement(s) were not repeated: the rest of the run "
            f"would not have fitted in its {data['options'].get('max_minutes')}-minute budget."
        )
    disturbed = [(k, disturbance(s)) for k, s in summ.items() if disturbance(s) > DISTURBED_SHARE]
    if disturbed:
        out.append(
            "Possibly disturbed by other processes or the hypervisor (median other-CPU plus "
            f"steal > {DISTURBED_SHARE:.2f} cores): "
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


def render_png(data: dict[str, Any], summ: Summary, path: str) -> None:
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
        "unixsrv.asyncio-protocol": "#e377c2",
        "unixsrv.asyncio-uvloop-protocol": "#f7b6d2",
        "unixsrv.asyncio-streams": "#bcbd22",
        "unixsrv.asyncio-uvloop-streams": "#dbdb8d",
        "uvicorn-asyncio": "#17becf",
        "uvicorn-uvloop": "#9edae5",
        "unixsrv.asyncio-uvicorn-asyncio": "#c49c94",
        "unixsrv.asyncio-uvicorn-uvloop": "#c5b0d5",
    }
    panels = [
        ("server_cpu_us_per_rt", "server CPU per round trip (µs, log; lower is better)", scen),
        ("rate", "round trips/s (connect: connects/s; log; higher is better)", scen),
    ]
    if rss:
        panels.append(("rss_per_conn_bytes", "server RSS per idle connection (bytes, log)", rss))
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 4.2 * len(panels)), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, (field_, title, scs) in zip(axes[:, 0], panels, strict=True):
        for i, sc in enumerate(scs):
            # Each scenario's group holds only the servers measured in it (the
            # HTTP servers have no echo figures and the other way round).
            present = [
                (srv, v)
                for srv in servers
                if (v := summ.get((sc["key"], srv), {}).get(field_)) is not None
            ]
            width = 0.8 / max(len(present), 1)
            for j, (srv, v) in enumerate(present):
                x = i - 0.4 + width * (j + 0.5)
                if v < 1:  # below the log axis (e.g. the C server's ~0 B)
                    ax.text(
                        x, 1.15, "≈0", ha="center", va="bottom", fontsize=7, color=colors.get(srv)
                    )
                    continue
                bars = ax.bar([x], [v], width, color=colors.get(srv))
                handles.setdefault(srv, bars)
        ax.set_yscale("log")
        ax.set_ylim(bottom=1 if field_ == "rss_per_conn_bytes" else None)
        ax.set_title(title)
        ax.set_xticks(range(len(scs)))
        ax.set_xticklabels([s["key"] for s in scs])
        ax.grid(axis="y", which="both", alpha=0.3)
    order = [srv for srv in servers if srv in handles]
    fig.legend(
        [handles[srv] for srv in order],
        order,
        ncol=4,
        fontsize=8,
        loc="lower center",
        frameon=False,
    )
    legend_rows = (len(order) + 3) // 4
    m = data["machine"]
    fig.suptitle(
        f"unixsrv vs peers — {m['nproc']} CPUs, Linux {m['kernel']}, Python {m['python']}, "
        f"{m['date']} (medians of {data['options']['rounds']} round(s))",
        fontsize=10,
    )
    # room at the bottom for the legend: about 0.18 inch per row of it
    fig.tight_layout(rect=(0, min(0.3, 0.18 * legend_rows / fig.get_figheight() + 0.01), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def method_text(data: dict[str, Any]) -> str:
    """How the run measured (pinning, priming, rounds), one sentence."""
    o = data["options"]
    p = data.get("pinning")
    if not p:
        pin = "server and generator not pinned"
    elif p["shared"]:
        pin = (
            f"server and generator share CPU {','.join(map(str, p['server_cpus']))} (the only one)"
        )
    else:
        pin = (
            f"server pinned to CPU {','.join(map(str, p['server_cpus']))}, the generator to CPU "
            f"{','.join(map(str, p['generator_cpus']))}"
        )
    prime_s = o.get("prime_s")
    prime = (
        f"every server primed with {prime_s:g} s of connect → 64 B echo → close traffic first"
        if prime_s
        else "priming not recorded (a run of an older harness)"
    )
    once = [s["key"] for s in data["scenarios"] if s.get("once")]
    return (
        f"{pin}; {prime}; medians of {o['rounds']} interleaved round(s), each measurement "
        f"{o['duration']:g} s after {o['warmup']:g} s of warm-up"
        + (f" ({', '.join(once)}: first round only)" if once and o["rounds"] > 1 else "")
    )


#: Row names of the README tables.
LABELS = {
    "c-epoll": "C epoll echo (the physical limit)",
    "unixsrv-event": "**unixsrv, event model**",
    "unixsrv-blocking": "**unixsrv, blocking model**",
    "uvloop-protocol": "uvloop, Protocol",
    "uvloop-streams": "uvloop, streams",
    "asyncio-protocol": "asyncio, Protocol",
    "asyncio-streams": "asyncio, streams",
    "socketserver": "socketserver (threads)",
    "unixsrv-socketserver": "**unixsrv.socketserver** (socketserver's code, one import changed)",
    "unixsrv.asyncio-protocol": "**unixsrv.asyncio**, Protocol on asyncio",
    "unixsrv.asyncio-uvloop-protocol": "**unixsrv.asyncio**, Protocol on uvloop",
    "unixsrv.asyncio-streams": "**unixsrv.asyncio**, streams on asyncio",
    "unixsrv.asyncio-uvloop-streams": "**unixsrv.asyncio**, streams on uvloop",
}

#: The drop-in layers' table: (unixsrv's row, the row of the same code on
#: the server it replaces, what the code is).
LAYER_PAIRS = [
    ("unixsrv.asyncio-protocol", "asyncio-protocol", "`asyncio.Protocol` echo, stock asyncio"),
    ("unixsrv.asyncio-uvloop-protocol", "uvloop-protocol", "`asyncio.Protocol` echo, uvloop"),
    ("unixsrv.asyncio-streams", "asyncio-streams", "`start_unix_server` streams echo, stock asyncio"),
    ("unixsrv.asyncio-uvloop-streams", "uvloop-streams", "`start_unix_server` streams echo, uvloop"),
    ("unixsrv-socketserver", "socketserver", "`socketserver` `BaseRequestHandler` echo, threads"),
    ("unixsrv.asyncio-uvicorn-uvloop", "uvicorn-uvloop", "uvicorn (httptools) hello world, uvloop"),
    ("unixsrv.asyncio-uvicorn-asyncio", "uvicorn-asyncio", "uvicorn (httptools) hello world, stock asyncio"),
]  # fmt: skip

README_BLOCKS = ("table", "layers")
#: The columns of the README's main table, when the run has them (else every
#: echo scenario it has).
README_COLUMNS = ("pp-100", "pp-1000", "connect-16", "rss-1000")
BEGIN = "<!-- BEGIN generated by benchmarks/run.py: {} -->"
END = "<!-- END generated by benchmarks/run.py: {} -->"
GITHUB_BLOB = "https://github.com/unixsrv/unixsrv/blob/main/"
GITHUB_RAW = "https://raw.githubusercontent.com/unixsrv/unixsrv/main/"


def heading(sc: dict[str, Any]) -> str:
    """A scenario's column heading (runs saved before headings were
    recorded: the current one for its key)."""
    known = {s.key: s.short for s in SCENARIOS}
    return sc.get("short") or known.get(sc["key"]) or sc["key"]


def sig(v: float) -> str:
    """About three significant digits: 2.47, 11.4, 225."""
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def krate(v: float) -> str:
    """A rate in thousands: 392k, 9.4k, 850."""
    return f"{v / 1000:.0f}k" if v >= 10_000 else f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def nbytes(v: float) -> str:
    return f"{v:,.0f} B" if v < 10_000 else f"{v / 1000:.1f} KB"


def _cell(s: dict[str, Any] | None, mode: str) -> str:
    """A README table cell: CPU µs (rate/s), or bytes for a memory scenario."""
    if s is None:
        return "–"
    if s["n"] == 0:
        return "failed"
    if mode == "hold":
        v = s.get("rss_per_conn_bytes")
        return "–" if v is None else nbytes(v)
    cpu, rate = s.get("server_cpu_us_per_rt"), s.get("rate")
    if cpu is None or rate is None:
        return "–"
    gen = s.get("client_cpu_share")
    mark = " †" if gen is not None and gen >= GEN_BOUND_SHARE else ""
    return f"{sig(cpu)} ({krate(rate)}/s){mark}"


def _ratio_text(summ: Summary, sc: str, ours: str, theirs: str, field: str) -> str:
    r = ratio(summ.get((sc, ours), {}).get(field), summ.get((sc, theirs), {}).get(field))
    return "n/a" if r is None else f"{r:.2f}×"


def readme_blocks(data: dict[str, Any], summ: Summary, png: str, md: str) -> dict[str, str]:
    """The README's generated blocks ("table": the comparison, its note and
    the chart; "layers": the drop-in layers against what they replace), from
    one run.  `png` and `md` are the links to the chart and the full report."""
    m = data["machine"]
    scen = [s for s in data["scenarios"] if s["key"] in README_COLUMNS] or [
        s for s in data["scenarios"] if s["mode"] != "http"
    ]
    servers = [srv for srv in data["servers"] if srv not in harness.HTTP_SERVERS]
    rate_keys = [s["key"] for s in scen if s["mode"] != "hold"]
    first = rate_keys[0] if rate_keys else None

    def rank(srv: str) -> tuple[bool, float]:
        v = summ.get((first, srv), {}).get("server_cpu_us_per_rt") if first else None
        return v is None, v or 0.0

    L = [
        "| server CPU µs per round trip (round trips/s) | "
        + " | ".join(heading(s) for s in scen)
        + " |",
        "|---|" + "---:|" * len(scen),
    ]
    for srv in sorted(servers, key=rank):
        if not any((s["key"], srv) in summ for s in scen):
            continue
        cells = [_cell(summ.get((s["key"], srv)), s["mode"]) for s in scen]
        L.append(f"| {LABELS.get(srv, srv)} | " + " | ".join(cells) + " |")
    L.append("")
    gens = []
    for key in rate_keys:
        shares = [
            s["client_cpu_share"]
            for (k, _), s in summ.items()
            if k == key and s.get("client_cpu_share") is not None
        ]
        if shares:
            gens.append(f"{key} {min(shares):.2f}–{max(shares):.2f}")
    L.append(
        "Ranked by server CPU per round trip"
        + (f" ({first})" if first else "")
        + (
            "; a round trip in the connect columns is a whole connect → 64 B echo → close"
            if any(s["mode"] == "connect" for s in scen)
            else ""
        )
        + ". The load generator's own CPU share (1.00 = its CPU saturated, then the rate is the "
        f"generator's limit and marked †): {'; '.join(gens) or 'n/a'}."
    )
    L.append("")
    L.append(f"![server CPU per round trip and round trips/s]({png})")
    L.append("")
    others = field_values(summ, "other_cpu_share")
    steals = field_values(summ, "steal_share")
    L.append(
        f"Measured by `{data['command']}` on {m['date']} in {data.get('wall_s', 0) / 60:.1f} min "
        f"(git {m['git']}): {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, "
        f"{m['python_impl']} {m['python']}, uvloop {m['uvloop']}; {method_text(data)}"
        + (
            f"; other processes used {statistics.median(others):.2f} cores (median)"
            if others
            else ""
        )
        + (
            f", the hypervisor took {statistics.median(steals):.2f} (median steal time)"
            if steals
            else ""
        )
        + f". Full tables, latencies and the issues' targets: [docs/benchmarks.md]({md}). "
        "To reproduce: `pip install -e '.[bench,compat]' && python benchmarks/run.py` on a quiet "
        "Linux machine; it rewrites these tables, docs/benchmarks.md and the chart."
    )
    L.append("")
    measured = {srv for _, srv in summ}
    bullets = [
        (
            "unixsrv-event",
            "The event model's CPU per round trip is "
            f"{_ratio_text(summ, 'pp-100', 'unixsrv-event', REFERENCE_CPU, _CPU)} the C server's at 100 "
            f"connections and {_ratio_text(summ, 'pp-1000', 'unixsrv-event', REFERENCE_CPU, _CPU)} at 1,000 "
            f"(uvloop Protocol: {_ratio_text(summ, 'pp-100', REFERENCE_RATE, REFERENCE_CPU, _CPU)}, "
            f"{_ratio_text(summ, 'pp-1000', REFERENCE_RATE, REFERENCE_CPU, _CPU)}); it makes "
            f"{_ratio_text(summ, 'pp-100', 'unixsrv-event', REFERENCE_RATE, _RATE)} and "
            f"{_ratio_text(summ, 'pp-1000', 'unixsrv-event', REFERENCE_RATE, _RATE)} uvloop Protocol's "
            "round trips per second, and "
            f"{_ratio_text(summ, 'connect-16', 'unixsrv-event', REFERENCE_RATE, _RATE)} its connects "
            "per second with 16 client slots.",
        ),
        (
            "unixsrv-blocking",
            "The blocking model costs "
            f"{_ratio_text(summ, 'pp-100', 'unixsrv-blocking', 'socketserver', _CPU)} socketserver's CPU "
            f"per round trip at 100 connections and "
            f"{_ratio_text(summ, 'pp-1000', 'unixsrv-blocking', 'socketserver', _CPU)} at 1,000, for "
            f"{_ratio_text(summ, 'pp-100', 'unixsrv-blocking', 'socketserver', _RATE)} and "
            f"{_ratio_text(summ, 'pp-1000', 'unixsrv-blocking', 'socketserver', _RATE)} its round trips "
            "per second, and makes "
            f"{_ratio_text(summ, 'connect-16', 'unixsrv-blocking', 'socketserver', _RATE)} its connects "
            "per second.",
        ),
    ]
    L += [f"- {text}" for srv, text in bullets if srv in measured]
    blocks = {"table": "\n".join(L)}

    paired = [
        s
        for s in data["scenarios"]
        if any((s["key"], a) in summ and (s["key"], b) in summ for a, b, _ in LAYER_PAIRS)
    ]
    cols = [s for s in paired if s["key"] in README_COLUMNS or s["mode"] == "http"] or paired
    if not cols:
        blocks["layers"] = "(Not measured in this run.)"
        return blocks
    L = [
        "| the same code: server CPU µs (memory: bytes) on unixsrv / on its own server (ratio) | "
        + " | ".join(heading(s) for s in cols)
        + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for ours, theirs, what in LAYER_PAIRS:
        cells = []
        for s in cols:
            a, b = summ.get((s["key"], ours)), summ.get((s["key"], theirs))
            field = _RSS if s["mode"] == "hold" else _CPU
            va, vb = (a or {}).get(field), (b or {}).get(field)
            if va is None or vb is None:
                cells.append("–")
                continue
            show = nbytes if s["mode"] == "hold" else sig
            cell = f"{show(va)} / {show(vb)} (**{va / vb:.2f}×**)"
            if s["mode"] != "hold" and a and b and a.get("rate") and b.get("rate"):
                cell += f", rate {a['rate'] / b['rate']:.2f}×"
            cells.append(cell)
        if any(c != "–" for c in cells):
            L.append(f"| {what} | " + " | ".join(cells) + " |")
    L.append("")
    L.append(
        "From the same run as the table above (CPU per request for uvicorn, whose server is "
        "pinned and primed alike; its load comes from benchmarks/http_load.c). Below 1.00× "
        "unixsrv's layer costs less than the server it replaces; *rate* is its round trips "
        "(requests, connects) per second over the other's."
    )
    blocks["layers"] = "\n".join(L)
    return blocks


def rewrite_blocks(text: str, blocks: dict[str, str]) -> str:
    """Replace what lies between each block's BEGIN and END marker lines in
    `text` with the block's new content.  Every block must be there exactly
    once, END after BEGIN (ValueError otherwise); the rest is untouched."""
    for name, content in blocks.items():
        begin, end = BEGIN.format(name), END.format(name)
        if text.count(begin) != 1 or text.count(end) != 1:
            raise ValueError(f"README block {name!r}: want one {begin!r} and one {end!r}")
        i = text.index(begin) + len(begin)
        j = text.index(end)
        if j < i:
            raise ValueError(f"README block {name!r}: its END marker comes before its BEGIN")
        text = text[:i] + "\n" + content.strip("\n") + "\n" + text[j:]
    return text


def readme_links(out_dir: str, readme: str) -> tuple[str, str]:
    """Links from `readme` to the chart and the report in `out_dir`: the
    repository's URLs for the project's own README and docs/ (it is also the
    PyPI page, where relative links break), relative paths otherwise."""
    png = os.path.join(out_dir, "benchmarks.png")
    md = os.path.join(out_dir, "benchmarks.md")
    if os.path.realpath(readme) == os.path.realpath(os.path.join(harness.ROOT, "README.md")):
        docs = os.path.realpath(os.path.join(harness.ROOT, "docs"))
        if os.path.realpath(out_dir) == docs:
            return GITHUB_RAW + "docs/benchmarks.png", GITHUB_BLOB + "docs/benchmarks.md"
    base = os.path.dirname(os.path.abspath(readme))
    return os.path.relpath(png, base), os.path.relpath(md, base)


def write_readme(path: str, data: dict[str, Any], summ: Summary, out_dir: str) -> None:
    """Rewrite the generated blocks of the README at `path` (atomically)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = rewrite_blocks(text, readme_blocks(data, summ, *readme_links(out_dir, path)))
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_reports(
    data: dict[str, Any], out_dir: str, readme: str | None = None
) -> tuple[str, str, Summary]:
    """benchmarks.md and benchmarks.png in `out_dir`, and the generated
    blocks of `readme` (when given); returns the paths and the medians."""
    summ = summarize(data)
    png = os.path.join(out_dir, "benchmarks.png")
    md = os.path.join(out_dir, "benchmarks.md")
    render_png(data, summ, png)
    with open(md, "w", encoding="utf-8") as f:
        f.write(render_markdown(data, summ, os.path.basename(png)))
    if readme:
        write_readme(readme, data, summ, out_dir)
    return md, png, summ


# ------------------------------------------------------------------ CLI

#: Defaults of a full run and of --quick: rounds, seconds measured, seconds of warm-up.
FULL = (4, 2.0, 0.5)
QUICK = (1, 1.0, 0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK[0]} round, {QUICK[1]:g} s per measurement, no waiting or "
        "retries; writes to benchmarks/.build/quick/ (and no README unless --readme)",
    )
    p.add_argument("--rounds", type=int, help=f"rounds (default {FULL[0]}; --quick {QUICK[0]})")
    p.add_argument(
        "--duration",
        type=float,
        help=f"seconds measured per pingpong/connect run (default {FULL[1]:g}; --quick {QUICK[1]:g})",
    )
    p.add_argument(
        "--warmup",
        type=float,
        help="seconds of traffic before measuring, after the priming "
        f"(default {FULL[2]:g}; --quick {QUICK[2]:g})",
    )
    p.add_argument("--servers", help="comma-separated subset of: " + ", ".join(SERVERS))
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help="comma-separated subset of: "
        + ", ".join(SCENARIO_KEYS)
        + f", or all (default: {','.join(DEFAULT_SCENARIOS)})",
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
        "--readme",
        help="rewrite the generated blocks of this README (default: README.md for a full run "
        "into docs/; none for --quick or --out-dir)",
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
        help="wait at most this many seconds for that (default 60; --quick 0)",
    )
    p.add_argument(
        "--retry-disturbed",
        type=int,
        help="measure again (at most this many times) when other processes took more than "
        f"{DISTURBED_SHARE} cores meanwhile; the least disturbed attempt is kept "
        "(default 2; --quick 0)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=12.0,
        help="time budget of the measurements: no retry once the rest of the run would not fit "
        "(default 12)",
    )
    p.add_argument(
        "--report-only",
        metavar="JSON",
        help="only re-render the reports (and --readme) from a saved benchmarks.json",
    )
    args = p.parse_args(argv)
    args.command_line = "python benchmarks/run.py" + (
        ""
        if argv is None and len(sys.argv) < 2
        else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    q = args.quick
    rounds, duration, warmup = QUICK if q else FULL
    args.rounds = args.rounds or rounds
    args.duration = args.duration or duration
    args.warmup = args.warmup if args.warmup is not None else warmup
    args.wait_quiet = args.wait_quiet if args.wait_quiet is not None else (0.0 if q else 60.0)
    if args.retry_disturbed is None:
        args.retry_disturbed = 0 if q else 2
    if not args.readme and not q and not args.out_dir:
        args.readme = os.path.join(harness.ROOT, "README.md")
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
    args.scenarios = (
        SCENARIO_KEYS if args.scenarios == "all" else [s for s in args.scenarios.split(",") if s]
    )
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
        scenarios = [s for s in SCENARIOS if s.key in args.scenarios]
        order = plan(args.servers, scenarios, args.rounds)
        est = sum(estimate_s(sc, args.duration, args.warmup) for _, sc, _ in order)
        log(
            f"{len(order)} measurements ({args.rounds} round(s), {len(scenarios)} scenarios, "
            f"{len(args.servers)} servers): about {est / 60:.0f} min once the machine is quiet "
            f"(waiting up to {args.wait_quiet:.0f} s for that); results to {args.out_dir}"
            + (f", README blocks to {args.readme}" if args.readme else "")
        )
        data = run_all(args)
    md, png, summ = write_reports(data, args.out_dir, args.readme)
    log(
        f"wrote {md} and {png}"
        + (f" and {args.readme}" if args.readme else "")
        + (f" in {data['wall_s'] / 60:.1f} min" if not args.report_only else "")
    )
    print(targets_text(summ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
