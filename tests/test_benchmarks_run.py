"""benchmarks/run.py and benchmarks/harness.py, the parts that need no
measurement (issue 11): the interleaved plan, the medians, the targets, the
README blocks and their markers, the CPU split, and the whole report path
(``run.py --report-only ... --readme``) on a saved run.  Synthetic records
stand in for measurements; nothing here starts a server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load_run() -> ModuleType:
    """benchmarks/run.py as the module ``benchmarks_run`` (the directory is
    not a package; run.py puts it on sys.path and imports harness from it)."""
    spec = importlib.util.spec_from_file_location(
        "benchmarks_run", os.path.join(BENCHMARKS, "run.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        # run.py put benchmarks/ first on sys.path for its `import harness`;
        # its other modules (workers.py, access.py, ...) must not shadow anything.
        while BENCHMARKS in sys.path:
            sys.path.remove(BENCHMARKS)
    return module


run = _load_run()
harness = run.harness

SCEN = {s.key: s for s in run.SCENARIOS}

#: (server CPU µs per round trip, rate, generator share) per (scenario, server):
#: every issue-11 target met but the blocking model's connects (3x, wanted 4x).
FIGURES = {
    "pp-100": {
        "c-epoll": (2.0, 400_000, 0.95),
        "unixsrv-event": (2.1, 390_000, 0.85),
        "uvloop-protocol": (3.5, 280_000, 0.7),
        "unixsrv-blocking": (8.0, 100_000, 0.3),
        "socketserver": (20.0, 45_000, 0.2),
    },
    "pp-1000": {
        "c-epoll": (2.2, 410_000, 0.9),
        "unixsrv-event": (2.3, 400_000, 0.88),
        "uvloop-protocol": (4.0, 250_000, 0.6),
        "unixsrv-blocking": (12.0, 80_000, 0.25),
        "socketserver": (24.0, 36_000, 0.2),
    },
    "connect-16": {
        "c-epoll": (8.0, 100_000, 0.5),
        "unixsrv-event": (11.0, 80_000, 0.45),
        "uvloop-protocol": (22.0, 42_000, 0.3),
        "unixsrv-blocking": (50.0, 15_000, 0.1),
        "socketserver": (200.0, 5_000, 0.05),
    },
}
RSS = {"c-epoll": 4.0, "unixsrv-event": 29.0, "uvloop-protocol": 1065.0}


def rate_record(sc: str, srv: str, rnd: int, scale: float = 1.0) -> dict[str, Any]:
    cpu, rate, gen = FIGURES[sc][srv]
    return {
        "server": srv,
        "scenario": sc,
        "round": rnd,
        "rate": rate * scale,
        "round_trips": int(rate * scale * 2),
        "p50_us": 100.0,
        "p99_us": 400.0,
        "server_cpu_us_per_rt": cpu / scale,
        "server_cpu_share": 0.9,
        "client_cpu_share": gen,
        "errors": 0,
        "other_cpu_share": 0.01,
        "steal_share": 0.0,
        "server_survived": True,
        "attempts": 1,
    }


def make_data(rounds: int = 3) -> dict[str, Any]:
    """A saved run (the shape of benchmarks.json): three rounds whose middle
    values are FIGURES (the others 10 % off either way), RSS in round 1."""
    records = []
    for rnd, scale in zip(range(rounds), (1.1, 1.0, 0.9), strict=False):
        for sc, rows in FIGURES.items():
            records += [rate_record(sc, srv, rnd, scale) for srv in rows]
    records += [
        {
            "server": srv,
            "scenario": "rss-1000",
            "round": 0,
            "established": 1000,
            "errors": 0,
            "rss_per_conn_bytes": b,
            "rss_before_kib": 20_000,
            "rss_held_kib": 20_000 + b,
            "server_survived": True,
        }
        for srv, b in RSS.items()
    ]
    servers = list(FIGURES["pp-100"])
    return {
        "command": "python benchmarks/run.py",
        "options": {
            "rounds": rounds,
            "duration": 2.0,
            "warmup": 0.5,
            "prime_s": 0.2,
            "quick": False,
            "retry_disturbed": 2,
            "max_minutes": 12.0,
        },
        "pinning": {"server_cpus": [0], "generator_cpus": [1], "shared": False},
        "scenarios": [{**vars(SCEN[k])} for k in ("pp-100", "pp-1000", "connect-16", "rss-1000")],
        "servers": servers,
        "machine": {
            "nproc": 2,
            "cpu": "Test CPU @ 1 GHz",
            "mem_gib": 4.0,
            "kernel": "6.1.0",
            "python": "3.11.7",
            "python_impl": "CPython",
            "uvloop": "0.23.0",
            "uvicorn": "not installed",
            "unixsrv": "0.1.0",
            "git": "abc1234",
            "cc": "cc 12",
            "nofile_limit": 20000,
            "somaxconn": "4096",
            "date": "2026-12-03 12:00 UTC",
        },
        "load_before": [0.1, 0.2, 0.3],
        "load_after": [1.9, 1.0, 0.5],
        "quiet_check": {"loadavg": [0.1, 0.2, 0.3], "busy_cores": 0.02, "waited_s": 0.0},
        "json_path": "benchmarks/results/benchmarks.json",
        "records": records,
        "wall_s": 600.0,
    }


# ------------------------------------------------------------------ plan and medians


def test_plan_interleaves_rounds_rotates_servers_and_measures_memory_once():
    servers = ["a", "b", "c", "uvicorn-uvloop"]
    scenarios = [SCEN["pp-100"], SCEN["rss-1000"], SCEN["http-64"]]
    order = run.plan(servers, scenarios, rounds=3)
    by_round = [[(sc.key, srv) for r, sc, srv in order if r == rnd] for rnd in range(3)]
    assert by_round[0] == [
        ("pp-100", "a"),
        ("pp-100", "b"),
        ("pp-100", "c"),
        ("rss-1000", "a"),
        ("rss-1000", "b"),
        ("rss-1000", "c"),
        ("http-64", "uvicorn-uvloop"),
    ]
    # the next rounds rotate the echo servers by one each and skip the memory scenario
    assert by_round[1] == [
        ("pp-100", "b"),
        ("pp-100", "c"),
        ("pp-100", "a"),
        ("http-64", "uvicorn-uvloop"),
    ]
    assert [srv for sc, srv in by_round[2] if sc == "pp-100"] == ["c", "a", "b"]


def test_default_run_fits_the_time_budget():
    """The README run (every server, the default scenarios and rounds) is
    estimated to end within its 12-minute budget on a quiet machine."""
    scenarios = [s for s in run.SCENARIOS if s.key in run.DEFAULT_SCENARIOS]
    rounds, duration, warmup = run.FULL
    order = run.plan(list(harness.SERVERS), scenarios, rounds)
    total = sum(run.estimate_s(sc, duration, warmup) for _, sc, _ in order)
    assert total <= 12 * 60, f"{total / 60:.1f} min"
    assert {sc.key for _, sc, _ in order} == set(run.DEFAULT_SCENARIOS)


def test_summarize_takes_medians_over_rounds_and_counts_failures():
    data = make_data()
    data["records"].append({"server": "c-epoll", "scenario": "pp-100", "failure": "boom"})
    summ = run.summarize(data)
    s = summ[("pp-100", "unixsrv-event")]
    assert s["n"] == 3
    assert s["rate"] == pytest.approx(390_000)
    assert s["server_cpu_us_per_rt"] == pytest.approx(2.1)
    assert s["rate_spread"] == pytest.approx((1.1 - 0.9) * 390_000 / 390_000)
    assert summ[("pp-100", "c-epoll")]["failures"] == ["boom"]
    assert summ[("rss-1000", "unixsrv-event")]["rss_per_conn_bytes"] == 29.0


# ------------------------------------------------------------------ targets


def test_issue_11_targets_yes_and_no():
    rows = {t.what: (text, met) for t, text, met in run.target_rows(run.summarize(make_data()), 11)}
    assert len(rows) == 10
    assert rows["event model CPU/rt vs C epoll, 100 conns"] == ("1.05x", True)
    assert rows["blocking model CPU/rt vs socketserver, 100 conns"] == ("0.40x", True)
    assert rows["blocking model CPU/rt vs socketserver, 1,000 conns"] == ("0.50x", True)
    assert rows["blocking model connects/s vs socketserver, 16 slots"] == ("3.00x", False)
    # a rate compared with a row whose generator was saturated is marked
    assert rows["event model rt/s vs uvloop Protocol, 100 conns"] == ("1.39x", True)
    assert rows["event model rt/s vs uvloop Protocol, 1,000 conns"] == ("1.60x", True)
    summ = run.summarize(make_data())
    summ[("pp-100", "uvloop-protocol")]["client_cpu_share"] = 0.95
    text = {t.what: text for t, text, _ in run.target_rows(summ, 11)}
    assert text["event model rt/s vs uvloop Protocol, 100 conns"] == "1.39x †"
    printed = run.targets_text(run.summarize(make_data()))
    assert "9 of 10 met" in printed
    assert "blocking model connects/s vs socketserver, 16 slots" in printed


def test_targets_of_rows_not_measured_say_so():
    summ = run.summarize(make_data())
    del summ[("pp-1000", "socketserver")]
    rows = {t.what: (text, met) for t, text, met in run.target_rows(summ, 11)}
    assert rows["blocking model rt/s vs socketserver, 1,000 conns"] == ("not measured", None)
    assert "7 of 8 met" in run.targets_text(summ)


# ------------------------------------------------------------------ README blocks


def test_readme_table_ranks_by_cpu_and_says_how_it_was_made():
    data = make_data()
    blocks = run.readme_blocks(data, run.summarize(data), "chart.png", "report.md")
    table = blocks["table"]
    lines = table.splitlines()
    assert lines[0] == (
        "| server CPU µs per round trip (round trips/s) | 100 conns × 64 B | 1,000 conns × 64 B "
        "| connect → 64 B → close, 16 slots | RSS per idle conn at 1,000 |"
    )
    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| C epoll echo (the physical limit)",
        "| **unixsrv, event model**",
        "| uvloop, Protocol",
        "| **unixsrv, blocking model**",
        "| socketserver (threads)",
    ]
    # generator-bound rates are marked (†), memory is in bytes, a cell not measured is a dash
    assert (
        rows[0]
        == "| C epoll echo (the physical limit) | 2.00 (400k/s) † | 2.20 (410k/s) † | 8.00 (100k/s) | 4 B |"
    )
    assert rows[4] == "| socketserver (threads) | 20.0 (45k/s) | 24.0 (36k/s) | 200 (5.0k/s) | – |"
    assert "pp-100 0.20–0.95" in table  # the generator's CPU share
    assert "![server CPU per round trip and round trips/s](chart.png)" in table
    for fact in (
        "`python benchmarks/run.py`",
        "2026-12-03 12:00 UTC",
        "git abc1234",
        "2 CPUs (Test CPU @ 1 GHz)",
        "server pinned to CPU 0, the generator to CPU 1",
        "primed with 0.2 s of connect → 64 B echo → close",
        "medians of 3 interleaved round(s)",
        "[docs/benchmarks.md](report.md)",
        "To reproduce: `pip install -e '.[bench,compat]' && python benchmarks/run.py`",
    ):
        assert fact in table, fact
    assert "1.05× the C server's at 100 connections" in table
    assert "makes 3.00× its connects per second" in table
    assert blocks["layers"] == "(Not measured in this run.)"


def test_readme_layers_table_pairs_the_same_code():
    data = make_data()
    data["records"] += [
        {
            **r,
            "server": "unixsrv-socketserver",
            "server_cpu_us_per_rt": r["server_cpu_us_per_rt"] / 2,
        }
        for r in data["records"]
        if r["server"] == "socketserver"
    ]
    data["servers"].append("unixsrv-socketserver")
    layers = run.readme_blocks(data, run.summarize(data), "c.png", "r.md")["layers"]
    row = next(line for line in layers.splitlines() if "BaseRequestHandler" in line)
    assert row.count("(**0.50×**), rate 1.00×") == 3
    assert "uvicorn" not in layers.split("\n\n")[0]  # no HTTP rows were measured


def test_rewrite_blocks_replaces_only_between_markers():
    begin, end = run.BEGIN.format("table"), run.END.format("table")
    text = f"# Title\n\nintro\n\n{begin}\nold table\n{end}\n\nafter\n"
    new = run.rewrite_blocks(text, {"table": "| new |\n"})
    assert new == f"# Title\n\nintro\n\n{begin}\n| new |\n{end}\n\nafter\n"
    assert run.rewrite_blocks(new, {"table": "| new |"}) == new  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "no markers\n",
        "{begin}\nonly the begin\n",
        "{begin}\n{end}\n{begin}\n{end}\n",
        "{end}\nreversed\n{begin}\n",
    ],
    ids=["missing", "no-end", "twice", "reversed"],
)
def test_rewrite_blocks_refuses_broken_markers(text):
    text = text.format(begin=run.BEGIN.format("table"), end=run.END.format("table"))
    with pytest.raises(ValueError, match="table"):
        run.rewrite_blocks(text, {"table": "x"})


def test_project_readme_has_every_generated_block_once():
    with open(os.path.join(harness.ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for name in run.README_BLOCKS:
        assert text.count(run.BEGIN.format(name)) == 1
        assert text.count(run.END.format(name)) == 1


def test_readme_links_point_at_the_repository_for_the_project_readme(tmp_path):
    readme = os.path.join(harness.ROOT, "README.md")
    docs = os.path.join(harness.ROOT, "docs")
    assert run.readme_links(docs, readme) == (
        run.GITHUB_RAW + "docs/benchmarks.png",
        run.GITHUB_BLOB + "docs/benchmarks.md",
    )
    scratch = str(tmp_path / "README.md")
    assert run.readme_links(str(tmp_path / "out"), scratch) == (
        "out/benchmarks.png",
        "out/benchmarks.md",
    )


# ------------------------------------------------------------------ the whole report path


def test_report_only_rewrites_readme_and_docs_from_one_saved_run(tmp_path, capsys):
    """``run.py --report-only JSON --out-dir D --readme R``: the markdown, the
    chart and the README blocks come from that one run; the issue-11 targets
    are printed."""
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib (the bench extra)")
    saved = tmp_path / "benchmarks.json"
    saved.write_text(json.dumps(make_data()), encoding="utf-8")
    begin, end = run.BEGIN, run.END
    readme = tmp_path / "README.md"
    original = (
        f"# x\n\n{begin.format('table')}\nstale\n{end.format('table')}\n\nhand-written\n\n"
        f"{begin.format('layers')}\nstale\n{end.format('layers')}\n"
    )
    readme.write_text(original, encoding="utf-8")
    out = tmp_path / "docs"
    assert (
        run.main(["--report-only", str(saved), "--out-dir", str(out), "--readme", str(readme)]) == 0
    )
    text = readme.read_text(encoding="utf-8")
    assert "stale" not in text
    assert "hand-written" in text
    assert (
        "| **unixsrv, event model** | 2.10 (390k/s) | 2.30 (400k/s) | 11.0 (80k/s) | 29 B |" in text
    )
    assert "](docs/benchmarks.png)" in text
    md = (out / "benchmarks.md").read_text(encoding="utf-8")
    assert "## Issue 11's targets" in md
    assert "| blocking model connects/s vs socketserver, 16 slots | >= 4x | 3.00x | **no** |" in md
    assert (out / "benchmarks.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert printed.startswith("issue 11 targets")
    assert "9 of 10 met" in printed
    # re-rendering the same run gives the same README
    assert (
        run.main(["--report-only", str(saved), "--out-dir", str(out), "--readme", str(readme)]) == 0
    )
    assert readme.read_text(encoding="utf-8") == text


# ------------------------------------------------------------------ CPUs


@pytest.mark.parametrize(
    ("cpus", "server", "generator"),
    [({3}, {3}, {3}), ({0, 1}, {0}, {1}), ({2, 5, 7, 9}, {2}, {9})],
)
def test_cpu_split_keeps_server_and_generator_apart(cpus, server, generator):
    assert harness.cpu_split(cpus) == (frozenset(server), frozenset(generator))


@pytest.mark.linux("sched_setaffinity")
def test_pin_runs_a_child_on_the_given_cpus():
    """harness.Pin as preexec_fn: the child's affinity is the one asked for."""
    cpu = min(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
        preexec_fn=harness.Pin(frozenset({cpu})),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.strip() == f"[{cpu}]"


def test_cpu_stolen_by_the_hypervisor_counts_as_disturbance():
    """Steal time (a VM's CPU given to another guest) disturbs a measurement
    as much as another process does: it is added to the other-CPU share for
    the retry decision and for the report's "possibly disturbed" note, and
    the report states how much was stolen."""
    assert run.disturbance({"other_cpu_share": 0.1, "steal_share": 0.2}) == pytest.approx(0.3)
    assert run.disturbance({"other_cpu_share": None}) == 0.0
    data = make_data()
    for r in data["records"]:
        if r.get("server") == "socketserver" and r.get("scenario") == "pp-100":
            r["steal_share"] = 0.5  # other processes still 0.01
    summ = run.summarize(data)
    text = " ".join(run.notes(data, summ))
    assert "pp-100/socketserver (0.51)" in text
    assert "hypervisor" in text
    md = run.render_markdown(data, summ, "benchmarks.png")
    assert (
        "CPU stolen by the hypervisor** during the measurements (steal time, /proc/stat): median 0.00 cores, max 0.50"
        in md
    )
