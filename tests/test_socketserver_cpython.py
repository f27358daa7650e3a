"""CPython's own Lib/test/test_socketserver.py against unixsrv.socketserver.

tests/cpython_socketserver.py runs it in place, from this interpreter's
installed ``test`` package, in a subprocess (the tests fork, install signal
handlers and print); these tests check its JSON report: every case that
should run ran, none failed, erred or was skipped, and unixsrv's servers
accepted the connections (so the stdlib's servers did not quietly stand in).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import pytest

import unixsrv
from conftest import DEADLINE

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("test") is None
    or importlib.util.find_spec("test.test_socketserver") is None,
    reason="CPython's test package (test.test_socketserver) is not installed for this interpreter",
)

RUNNER = os.path.join(os.path.dirname(__file__), "cpython_socketserver.py")

#: Cases per phase for each Python version: the "as_is" phase runs the whole
#: module, the "unix" phase its generic server cases pointed at Unix sockets.
EXPECTED_CASES = {
    (3, 10): {"as_is": 27, "unix": 16},
    (3, 11): {"as_is": 27, "unix": 16},
    (3, 12): {"as_is": 27, "unix": 16},
    (3, 13): {"as_is": 27, "unix": 16},
}
#: Connections unixsrv accepted in each phase: the 3 Unix-stream cases make
#: 3 connections each; the unix phase's cases make 28 between them.
EXPECTED_ACCEPTED = {"as_is": 9, "unix": 28}
#: What the unix phase may leave out: cases about another socket type or
#: address family, or already run as they are.
ALLOWED_REASONS = (
    "datagram server",
    "AF_INET only",
    "a Unix-stream case",
    "not a server case",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the runner once (in a scratch directory under /tmp, where the
    tests create their socket files and logs) and parse its report."""
    scratch = tmp_path_factory.mktemp("cpy", numbered=True)
    src = os.path.dirname(os.path.dirname(unixsrv.__file__))
    env = dict(os.environ, PYTHONPATH=src)
    proc = subprocess.run(
        [sys.executable, RUNNER],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        timeout=30 * DEADLINE,
        check=False,
    )
    assert proc.returncode == 0, f"runner failed ({proc.returncode}):\n{proc.stderr[-5000:]}"
    result: dict[str, Any] = json.loads(proc.stdout)
    result["stderr"] = proc.stderr
    leftovers = sorted(p.name for p in scratch.iterdir())
    assert leftovers == [], f"the tests left files behind: {leftovers}"
    return result


@pytest.mark.parametrize("phase", ["as_is", "unix"])
def test_phase_passes(report: dict[str, Any], phase: str) -> None:
    got = report["phases"][phase]
    detail = report["stderr"][-5000:]
    assert got["failures"] == [] and got["errors"] == [], detail
    assert got["skipped"] == {}, detail
    assert got["unexpected_successes"] == []
    assert got["ran"] == got["expected"]
    known = EXPECTED_CASES.get(sys.version_info[:2])
    if known is not None:
        assert got["ran"] == known[phase]
    else:  # a newer Python: at least what 3.13 has (a case may be added, none removed)
        assert got["ran"] >= EXPECTED_CASES[(3, 13)][phase]


@pytest.mark.parametrize("phase", ["as_is", "unix"])
def test_unixsrv_served(report: dict[str, Any], phase: str) -> None:
    got = report["phases"][phase]
    assert got["servers"] > 0
    if sys.version_info[:2] in EXPECTED_CASES:
        assert got["accepted"] == EXPECTED_ACCEPTED[phase]
    else:
        assert got["accepted"] >= EXPECTED_ACCEPTED[phase]


def test_only_other_families_are_excluded(report: dict[str, Any]) -> None:
    excluded = report["excluded"]
    assert excluded, "the report lists no exclusions: the runner's selection changed"
    for case, reason in excluded.items():
        assert reason.startswith(ALLOWED_REASONS), f"{case}: {reason}"
    # Only one case is left out of both phases' server runs: AF_INET's port check.
    assert [c for c, r in excluded.items() if r.startswith("AF_INET")] == [
        "SocketServerTest.test_tcpserver_bind_leak"
    ]


def test_environment_left_as_found(report: dict[str, Any]) -> None:
    """test.support's checks after each case (threads joined and gone,
    children reaped) print "Warning -- ..." when a case leaves something
    behind: after server_close() nothing of a unixsrv server may remain."""
    warnings = [line for line in report["stderr"].splitlines() if line.startswith("Warning --")]
    assert warnings == []
