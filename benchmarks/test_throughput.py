"""Throughput benchmarks (pytest-benchmark): round trips/s and connects/s of
every echo server of run.py under the C load generator, for catching
regressions between commits.

    pytest benchmarks/ --benchmark-json=benchmark.json          # ~1.5 min
    pytest benchmarks/ --benchmark-autosave                     # on the base commit
    pytest benchmarks/ --benchmark-compare --benchmark-compare-fail=median:15%   # on the new one

Each benchmark starts its server as a fresh subprocess pinned to one CPU,
primes it as run.py does (0.2 s of connect -> 64 B echo -> close traffic),
then times a fixed amount of work done by the C generator
(``unixsrv.bench.run``, in this process, which is pinned to another CPU for
the session): ROUND_TRIPS ping-pong round trips on 100 connections, or
CONNECTS connect -> 64 B echo -> close cycles on 16 slots.  pytest-benchmark's
time per round is the time that work took, so a slower server shows up as
a larger time and ``--benchmark-compare-fail`` catches it; the generator's
own figures (round trips/s, server CPU µs per round trip, its CPU share) are
in each benchmark's ``extra_info`` in the JSON.  Every round's echo is
verified byte for byte: a round with an error fails the test.  Nothing here
asserts a speed.

The project's default ``pytest`` collects only tests/.  Linux only (/proc,
sched_setaffinity).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("pytest_benchmark", reason="needs pytest-benchmark (pip install -e '.[bench]')")
if not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/self/stat"):
    pytest.skip("the benchmarks need Linux (/proc, sched_setaffinity)", allow_module_level=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness
from unixsrv.bench import BenchOptions, run

#: Every echo server of the comparison (run.py), in its order.
ECHO_SERVERS = [name for name in harness.SERVERS if name not in harness.HTTP_SERVERS]
ROUND_TRIPS = 20_000  # per round, on PINGPONG_CONNECTIONS connections
PINGPONG_CONNECTIONS = 100
CONNECTS = 2_000  # per round, on CONNECT_SLOTS slots
CONNECT_SLOTS = 16
ROUNDS = 5  # timed rounds per benchmark, after one untimed warm-up round


@pytest.fixture(scope="session")
def cpus() -> Iterator[tuple[frozenset[int], frozenset[int]]]:
    """(server CPUs, generator CPUs), as run.py pins them; this process (the
    generator) runs on the generator's CPU for the session."""
    server, generator = harness.cpu_split()
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, generator)
    harness.raise_nofile_limit()
    harness.compile_c_server()
    try:
        yield server, generator
    finally:
        os.sched_setaffinity(0, before)


@pytest.fixture(params=ECHO_SERVERS)
def server(
    request: pytest.FixtureRequest, cpus: tuple[frozenset[int], frozenset[int]]
) -> Iterator[harness.RunningServer]:
    """A fresh, primed echo server subprocess on its own CPU (ended by PID)."""
    name = request.param
    if "uvloop" in name and importlib.util.find_spec("uvloop") is None:
        pytest.skip(f"{name} needs uvloop (pip install -e '.[bench]')")
    server_cpus, generator_cpus = cpus
    with harness.running_server(name, preexec=harness.Pin(server_cpus)) as srv:
        harness.prime(name, srv.path, preexec=harness.Pin(generator_cpus))
        yield srv
    assert srv.proc.returncode is not None  # ended and reaped


def measure(benchmark: Any, srv: harness.RunningServer, **options: Any) -> dict[str, Any]:
    """Time ROUNDS runs of the generator doing `options`' fixed work against
    `srv`; check every run; record the generator's medians in extra_info."""
    results: list[dict[str, Any]] = []

    def once() -> None:
        results.append(run(BenchOptions(path=srv.path, server_pid=srv.pid, warmup=0.0, **options)))

    benchmark.pedantic(once, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert len(results) == ROUNDS + 1
    for r in results:
        assert r["errors"] == 0, r.get("errors_by_kind")
        assert r["round_trips"] == options["requests"]
    assert srv.alive()
    timed = results[1:]
    info = {
        "server": srv.name,
        "mode": options["mode"],
        "connections": options["connections"],
        "work": options["requests"],
    }
    for key in ("round_trips_per_s", "server_cpu_us_per_rt", "client_cpu_share"):
        values = [r[key] for r in timed if r.get(key) is not None]
        info[key] = round(statistics.median(values), 3) if values else None
    benchmark.extra_info.update(info)
    return info


def test_round_trips(benchmark: Any, server: harness.RunningServer) -> None:
    """ROUND_TRIPS 64 B ping-pong round trips on 100 connections."""
    benchmark.group = f"{ROUND_TRIPS:,} round trips, {PINGPONG_CONNECTIONS} connections × 64 B"
    info = measure(
        benchmark,
        server,
        mode="pingpong",
        connections=PINGPONG_CONNECTIONS,
        requests=ROUND_TRIPS,
    )
    assert info["round_trips_per_s"] > 0


def test_connects(benchmark: Any, server: harness.RunningServer) -> None:
    """CONNECTS connect -> 64 B echo -> close cycles on 16 slots."""
    benchmark.group = f"{CONNECTS:,} connects (connect, 64 B echo, close), {CONNECT_SLOTS} slots"
    info = measure(benchmark, server, mode="connect", connections=CONNECT_SLOTS, requests=CONNECTS)
    assert info["round_trips_per_s"] > 0
