"""unixsrv.bench and the LoadGen of unixsrv._loadgen: the load generator
behind ``unixsrv bench`` (issue 3, deliverable 3).

Functional checks only, with small counts: every echoed byte is verified, a
server that corrupts or drops data is caught, each mode counts what it should,
every run is bounded, and every process the generator starts is ended.
Nothing here depends on speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading

import pytest

from conftest import DEADLINE, child_pids, wait_until
from unixsrv import _loadgen
from unixsrv.bench import RESULT_KEYS, BenchOptions, run, run_builtin
from unixsrv.echo import EchoProtocol
from unixsrv.errors import ConfigError

#: The load generator reads a server's CPU time from /proc/<pid>/stat.
PROC_STAT = os.path.exists(f"/proc/{os.getpid()}/stat")

CLI = "import sys; from unixsrv.cli import main; raise SystemExit(main(sys.argv[1:]))"


def bench(path: str, **fields) -> dict:
    fields.setdefault("warmup", 0.0)
    return run(BenchOptions(path=path, **fields))


class FlipProtocol(asyncio.Protocol):
    """Echoes every chunk with one bit of its middle byte flipped."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        corrupted = bytearray(data)
        corrupted[len(corrupted) // 2] ^= 0x01
        self.transport.write(bytes(corrupted))


class HangUpProtocol(asyncio.Protocol):
    """Closes the connection as soon as anything arrives, echoing nothing."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.close()


class SilentProtocol(asyncio.Protocol):
    """Reads everything and never answers."""

    def data_received(self, data):
        pass


# ------------------------------------------------------------------ pingpong


def test_pingpong_verifies_every_echoed_byte(echo_server):
    """Ping-pong with pipelining against the built-in echo (both models): the
    exact number of round trips is measured, every byte checked, no error."""
    r = bench(echo_server.path, connections=4, size=100, pipeline=3, requests=300)
    assert r["errors"] == 0, r["errors_by_kind"]
    assert r["round_trips"] == 300
    assert r["established"] == 4
    assert r["verified_bytes"] >= 300 * 100
    lat = r["latency_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"]
    assert lat["p999"] <= lat["max"]


def test_pingpong_large_messages_cross_the_pattern_wrap(echo_server):
    """Messages bigger than the 64 KiB verification pattern and than one read
    are streamed and verified across the pattern's wrap-around."""
    r = bench(echo_server.path, connections=2, size=300_000, pipeline=2, requests=6)
    assert r["errors"] == 0, r["errors_by_kind"]
    assert r["round_trips"] == 6
    assert r["verified_bytes"] >= 6 * 300_000


def test_corrupting_server_is_detected(sock_path, make_server):
    """A server that flips one bit per chunk is reported as mismatch errors
    (and the run ends once every connection has failed)."""
    make_server(sock_path, protocol=FlipProtocol)
    r = bench(sock_path, connections=3, size=64, requests=100, duration=DEADLINE)
    assert r["errors"] > 0
    assert r["errors_by_kind"]["mismatch"] == 3
    assert r["round_trips"] == 0


def test_early_eof_is_an_error(sock_path, make_server):
    """A server that hangs up instead of echoing is counted as EOF errors."""
    make_server(sock_path, protocol=HangUpProtocol)
    r = bench(sock_path, connections=2, size=64, requests=100, duration=DEADLINE)
    assert r["errors_by_kind"]["eof"] == 2
    assert r["errors"] == 2


def test_silent_server_ends_the_run_by_the_stall_timeout(sock_path, make_server):
    """With only a request bound, a server that never answers cannot make
    the run last forever: the stall timeout ends it as an error."""
    make_server(sock_path, protocol=SilentProtocol)
    r = bench(sock_path, connections=2, requests=10, stall_timeout=0.3)
    assert r["errors_by_kind"]["stall"] == 1
    assert r["round_trips"] == 0


def test_requests_bound_stops_the_run(sock_path, make_server):
    """--requests ends the run after exactly that many measured round trips,
    long before the duration bound."""
    make_server(sock_path, protocol=EchoProtocol)
    r = bench(sock_path, connections=5, requests=777, duration=60.0)
    assert r["round_trips"] == 777
    assert r["duration_s"] < 60.0
    assert not r["stopped_early"]


def test_duration_bound_stops_the_run(sock_path, make_server):
    """--duration alone bounds the measured window."""
    make_server(sock_path, protocol=EchoProtocol)
    r = bench(sock_path, connections=2, duration=0.3, warmup=0.1)
    assert r["duration_s"] >= 0.3
    assert r["round_trips"] > 0
    assert r["errors"] == 0


def test_stop_fd_ends_the_run_early_with_a_report(sock_path, make_server):
    """A byte on the stop fd (what SIGINT/SIGTERM do through the wakeup fd in
    the CLI) ends a long run; the result covers what was measured."""
    make_server(sock_path, protocol=EchoProtocol)
    r_fd, w_fd = os.pipe()
    os.set_blocking(r_fd, False)
    timer = threading.Timer(0.3, os.write, (w_fd, b"x"))
    try:
        timer.start()
        r = run(
            BenchOptions(path=sock_path, connections=2, duration=60.0, warmup=0.0), stop_fd=r_fd
        )
    finally:
        timer.cancel()
        os.close(r_fd)
        os.close(w_fd)
    assert r["stopped_early"]
    assert r["duration_s"] < 60.0
    assert r["errors"] == 0


def test_full_backlog_is_retried(sock_path, make_server):
    """Mass connect into a backlog of 4: connect() meets EAGAIN (Linux) or
    ECONNREFUSED (macOS refuses when the backlog is full) and is retried
    until every connection is up; no connection counts as failed."""
    srv = make_server(sock_path, protocol=EchoProtocol, backlog=4)
    r = bench(sock_path, connections=300, requests=300)
    assert r["errors"] == 0, r["errors_by_kind"]
    assert r["established"] == 300
    assert srv.stats()["accepted"] == 300


def test_connect_pace_spreads_the_connects(sock_path, make_server):
    """--connect-rate paces the connect phase: 20 connections at 200/s take
    at least 19/200 s."""
    make_server(sock_path, protocol=EchoProtocol)
    r = bench(sock_path, connections=20, requests=20, connect_rate=200.0)
    assert r["established"] == 20
    assert r["connect_s"] >= 19 / 200 * 0.99


def test_no_server_raises_a_clear_error(sock_path):
    """Nothing listening: OSError naming the path, not a report of zeros."""
    with pytest.raises(FileNotFoundError, match="no connection"):
        bench(sock_path, connections=2, requests=10)


# ------------------------------------------------------------------ connect / hold


def test_connect_mode_counts_cycles(echo_server):
    """Connect mode: each cycle is a new connection (the server accepts one
    per cycle) with a verified echo; cycles are counted exactly."""
    r = bench(echo_server.path, mode="connect", connections=3, size=32, requests=60)
    assert r["errors"] == 0, r["errors_by_kind"]
    assert r["round_trips"] == 60
    assert r["verified_bytes"] >= 60 * 32
    assert echo_server.stats()["accepted"] >= 60
    assert r["latency_us"]["p50"] > 0


def test_hold_mode_establishes_then_holds(echo_server):
    """Hold mode: every connection does one verified round trip, the
    established notice comes once with all of them open on the server, and
    they stay open for the hold."""
    seen = []

    def established(info):
        seen.append(info)
        wait_until(lambda: echo_server.open_connections == 20)

    r = run(
        BenchOptions(path=echo_server.path, mode="hold", connections=20, duration=0.2),
        on_established=established,
    )
    assert seen == [
        {
            "event": "established",
            "connections": 20,
            "failed": 0,
            "seconds": seen[0]["seconds"],
            "errors": 0,
        }
    ]
    assert r["round_trips"] == 20
    assert r["errors"] == 0
    assert r["duration_s"] >= 0.2
    wait_until(lambda: echo_server.open_connections == 0)


def test_hold_ends_when_the_watched_fd_reaches_eof(sock_path, make_server):
    """Hold until stdin closes: EOF on the watched fd ends an otherwise long
    hold, reported as stopped early."""
    make_server(sock_path, protocol=EchoProtocol)
    r_fd, w_fd = os.pipe()
    try:
        r = run(
            BenchOptions(path=sock_path, mode="hold", connections=3, duration=60.0),
            on_established=lambda info: os.close(w_fd),
            watch_fd=r_fd,
        )
    finally:
        os.close(r_fd)
    assert r["stopped_early"]
    assert r["round_trips"] == 3
    assert r["errors"] == 0


# ------------------------------------------------------------------ processes


def test_processes_merge_counts_and_end_children(sock_path, make_server):
    """--processes 2: the connections and requests are split over two child
    generators whose counts and histograms are merged; none is left behind."""
    srv = make_server(sock_path, protocol=EchoProtocol)
    before = child_pids()
    r = bench(sock_path, connections=4, requests=400, processes=2)
    assert r["errors"] == 0, r["errors_by_kind"]
    assert r["processes"] == 2
    assert r["round_trips"] == 400
    assert r["established"] == 4
    assert srv.stats()["accepted"] == 4
    assert r["latency_us"]["p50"] > 0
    assert child_pids() - before == set()


# ------------------------------------------------------------------ CLI, built-in


def test_cli_json_has_every_key(echo_server, spawn):
    """`unixsrv bench PATH --json` prints one JSON object with every key of
    the contract; the server fields are null without --server-pid."""
    proc = spawn(CLI, "bench", echo_server.path, "--json", "-c", "2", "-n", "200", "--warmup", "0")
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert set(RESULT_KEYS) <= set(r)
    assert set(r["latency_us"]) >= {"p50", "p99", "p999", "max"}
    assert r["path"] == echo_server.path
    assert (r["mode"], r["connections"], r["round_trips"], r["errors"]) == ("pingpong", 2, 200, 0)
    assert r["server_cpu_s"] is None and r["server_cpu_us_per_rt"] is None
    assert "\r" not in err  # --json: no progress line


@pytest.mark.linux("/proc/<pid>/stat (the server's CPU time)")
def test_cli_server_pid_reports_server_cpu(echo_server, spawn):
    """With --server-pid the server's CPU over the window is reported."""
    proc = spawn(
        CLI,
        "bench",
        echo_server.path,
        "--json",
        "-c",
        "2",
        "-n",
        "2000",
        "--warmup",
        "0",
        "--server-pid",
        str(os.getpid()),
    )
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, err
    r = json.loads(out)
    assert r["server_cpu_s"] is not None and r["server_cpu_s"] >= 0
    assert r["server_cpu_us_per_rt"] is not None
    assert r["client_cpu_share"] is not None


def test_cli_exit_status_reports_errors(sock_path, make_server, spawn):
    """The CLI exits 1 when errors were counted (the report is still printed)."""
    make_server(sock_path, protocol=FlipProtocol)
    proc = spawn(
        CLI, "bench", sock_path, "--json", "-c", "2", "-n", "10", "-d", "5", "--warmup", "0"
    )
    out, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 1, err
    assert json.loads(out)["errors"] == 2


def test_no_path_runs_both_models_and_ends_its_servers():
    """No PATH: the built-in echo server runs in each model as a subprocess,
    is measured with its PID (its CPU time where /proc/<pid>/stat exists,
    None elsewhere), and is ended and reaped afterwards."""
    before = child_pids()
    results = run_builtin(BenchOptions(connections=2, duration=0.2, warmup=0.05))
    assert [r["server"] for r in results] == ["unixsrv-event", "unixsrv-blocking"]
    for r in results:
        assert r["errors"] == 0, r["errors_by_kind"]
        assert r["round_trips"] > 0
        assert (r["server_cpu_s"] is not None) == PROC_STAT
        with pytest.raises(ChildProcessError):  # already reaped by run_builtin
            os.waitpid(r["server_pid"], os.WNOHANG)
        assert not os.path.exists(r["path"])
    assert child_pids() - before == set()


def test_cli_no_path_prints_both_models(spawn):
    """`unixsrv bench --json` without PATH: one line per model."""
    proc = spawn(CLI, "bench", "--json", "-c", "2", "-d", "0.2", "--warmup", "0.05")
    out, err = proc.communicate(timeout=DEADLINE * 2)
    assert proc.returncode == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["server"] for r in results] == ["unixsrv-event", "unixsrv-blocking"]
    for r in results:
        with pytest.raises(ProcessLookupError):  # ended (and reaped by the CLI)
            os.kill(r["server_pid"], 0)


# ------------------------------------------------------------------ options, histogram


@pytest.mark.parametrize(
    "fields",
    [
        {"mode": "flood"},
        {"connections": 0},
        {"size": 0},
        {"pipeline": 0},
        {"processes": 3, "connections": 2},
        {"requests": 0},
        {"duration": -1.0},
        {"connect_timeout": 0.0},
    ],
)
def test_bad_options_are_refused(fields):
    """Options are validated when built (ConfigError, a ValueError)."""
    with pytest.raises(ConfigError):
        BenchOptions(path="/tmp/x.sock", **fields)


def test_histogram_buckets_are_within_one_percent():
    """Log-linear buckets: every value lands in a bucket that contains it,
    no wider than 1 % of its lower bound (exact below 128 ns), up to 60 s."""
    v = 1
    while v < 60 * 10**9:
        i = _loadgen.hist_index(v)
        lo, hi = _loadgen.hist_bucket_ns(i)
        assert lo <= v < hi
        assert hi - lo == 1 or (hi - lo) / lo <= 0.01
        v = v * 5 // 4 + 1
    assert _loadgen.hist_index(10**12) == _loadgen.HIST_BUCKETS - 1


def test_histogram_percentiles_merge_by_adding_counts():
    """Percentiles of a merged histogram (what --processes does)."""
    a = {_loadgen.hist_index(1_000): 990}
    b = {_loadgen.hist_index(1_000): 9, _loadgen.hist_index(5_000_000): 1}
    merged = {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}
    p50, p99, p999 = _loadgen.hist_percentiles(merged, (0.5, 0.99, 0.999))
    assert abs(p50 - 1_000) / 1_000 < 0.01
    assert abs(p99 - 1_000) / 1_000 < 0.01
    assert abs(p999 - 1_000) / 1_000 < 0.01  # 999 of 1000 samples at 1 us
    assert _loadgen.hist_percentiles(merged, (1.0,))[0] > 4_900_000
    assert _loadgen.hist_percentiles({}, (0.5,)) == [None]


@pytest.mark.parametrize("bucket", [-1, _loadgen.HIST_BUCKETS, 10**6])
def test_histogram_percentiles_refuse_buckets_out_of_range(bucket):
    """A histogram read back from JSON with a bucket index outside the
    histogram is an error, never a shift past 64 bits."""
    with pytest.raises(IndexError):
        _loadgen.hist_percentiles({0: 1, bucket: 1}, (0.5,))


# ------------------------------------------------------------------ progress line

_INFO = {
    "elapsed": 1.0,
    "phase": "measure",
    "round_trips_per_s": 1234.0,
    "round_trips": 1234,
    "errors": 0,
    "established": 2,
}


def test_progress_line_is_rewritten_in_place_only_on_a_terminal():
    """On a terminal (a pty here) the status line is redrawn with \\r and
    cleared before other output; into a file or pipe each update is a plain
    line and nothing is erased."""
    import io

    from unixsrv.bench import _ProgressLine

    plain = io.StringIO()
    line = _ProgressLine(plain)
    line(_INFO)
    line({**_INFO, "elapsed": 2.0})
    line.clear()
    assert "\r" not in plain.getvalue()
    assert len(plain.getvalue().splitlines()) == 2
    assert plain.getvalue().endswith("conns 2\n")

    primary, secondary = os.openpty()
    try:
        with open(secondary, "w", closefd=False) as tty:
            line = _ProgressLine(tty)
            line(_INFO)
            width = line.width
            line.clear()
        # "\r" + the text, then "\r" + blanks + "\r"; a pty may hand it over in pieces.
        want, drawn = 2 * width + 3, b""
        while len(drawn) < want:
            drawn += os.read(primary, want - len(drawn))
        drawn = drawn.decode()
    finally:
        os.close(primary)
        os.close(secondary)
    assert drawn.startswith("\r[") and "\n" not in drawn
    assert drawn.endswith("\r")  # cleared: the next output starts at column 0


def test_cli_progress_into_a_file_is_plain_lines(echo_server, spawn, tmp_path):
    """`unixsrv bench` with stderr redirected to a file (not --json, not
    --quiet) writes its progress as whole lines, no \\r in the file."""
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = spawn(
            CLI, "bench", echo_server.path, "-c", "2", "-d", "2.5", "--warmup", "0", stderr=stderr
        )
        out, _ = proc.communicate(timeout=DEADLINE)
    err = log.read_text()
    assert proc.returncode == 0, err
    assert "\r" not in err
    progress = [ln for ln in err.splitlines() if " rt/s " in ln]
    assert progress, f"no progress line in {err!r}"
    assert "round trips" in out or "rt/s" in out
