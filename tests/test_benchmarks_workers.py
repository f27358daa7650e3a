"""benchmarks/workers.py (issue 14's "Using every core" figures): its smoke
run starts every model's pre-forked server and the stdlib pre-fork with 1
and 2 workers, drives each with the C load generator and writes the JSON
the README's table is filled from.  The figures of a smoke run mean nothing;
what is checked is that every row was measured without an error, that the
fairness runs counted each worker's accepts, and that nothing is left
behind (every server ended by its PID, its socket directory removed).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import LINUX, env_for_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not LINUX, reason="the benchmarks need Linux (/proc, PR_SET_PDEATHSIG)"
)


def test_quick_run_measures_every_model_and_cleans_up(tmp_path) -> None:
    before = set(glob.glob("/tmp/uwork-*"))
    out = tmp_path / "workers.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/workers.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env_for_child(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = {(r["kind"], r["workers"]) for r in result["throughput"]}
    kinds = {"unixsrv-event", "unixsrv-blocking", "unixsrv-asyncio"}
    kinds |= {"unixsrv-socketserver", "stdlib-prefork"}
    assert rows == {(k, n) for k in kinds for n in (1, 2)}
    for r in result["throughput"]:
        assert r["errors"] == 0 and r["requests_per_s"] > 0, r
    assert result["options"]["iters"] >= 1  # calibrated once, by the driver
    assert {f["kind"] for f in result["fairness"]["servers"]} == {
        "unixsrv-event",
        "unixsrv-asyncio",
    }
    for f in result["fairness"]["servers"]:
        for run in f["runs"]:
            accepted = run["accepted_per_worker"]
            assert len(accepted) == 2 and sum(accepted) >= result["fairness"]["connections"], f
    assert set(glob.glob("/tmp/uwork-*")) == before
