"""CPython's own asyncio tests for Unix servers, run in place against unixsrv.asyncio.

Each case group runs in a subprocess (tests/cpython_asyncio_runner.py) with
``loop.create_unix_server`` / ``asyncio.start_unix_server`` swapped for
unixsrv's; nothing of CPython's tests is copied into this repository.  Skipped
where the interpreter's ``test`` package is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import pytest

import unixsrv
from conftest import finish

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(unixsrv.__file__)))

#: The fewest tests each group selects on each Python version (more may come
#: with a later patch release; every one selected must run and pass).
MINIMUM = {
    "server": {(3, 10): 1, (3, 11): 1, (3, 12): 3, (3, 13): 10},
    "streams": {(3, 10): 1, (3, 11): 1, (3, 12): 1, (3, 13): 1},
    "events": {(3, 10): 15, (3, 11): 15, (3, 12): 15, (3, 13): 15},
    "unix_events": {(3, 10): 9, (3, 11): 9, (3, 12): 9, (3, 13): 9},
}

#: Groups whose tests connect clients (so unixsrv must have accepted some).
CONNECTING = {"server", "streams", "events"}

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("test.test_asyncio") is None,
    reason="CPython's test package (test.test_asyncio) is not installed",
)

RUNNER = f"""
import sys
sys.path.insert(0, {TESTS_DIR!r})
import cpython_asyncio_runner
sys.exit(cpython_asyncio_runner.main(sys.argv[1]))
"""


@pytest.mark.parametrize("group", sorted(MINIMUM))
def test_cpython_unix_server_tests_pass_on_unixsrv(
    group: str, sock_dir: str, spawn: Callable[..., Any]
) -> None:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([SRC_DIR, os.environ.get("PYTHONPATH", "")]),
    )
    # cwd: CPython's unix_socket_path() makes relative paths in the working directory.
    proc = spawn(RUNNER, group, cwd=sock_dir, env=env)
    code, out, err = finish(proc, timeout=240)
    lines = out.strip().splitlines()
    assert lines, f"no report from the runner (exit {code}); stderr:\n{err}"
    report = json.loads(lines[-1])
    assert code == 0, f"CPython's {group} tests failed on unixsrv: {report}\n{err}"
    assert report["failures"] == [] and report["errors"] == []
    minimum = MINIMUM[group].get(sys.version_info[:2], 1)
    assert report["selected"] >= minimum, report
    assert report["ran"] == report["selected"], report
    assert report["skipped"] == [], report
    assert report["servers"] > 0, f"no unixsrv server was created: the swap did not take: {report}"
    if group in CONNECTING:
        assert report["accepted"] > 0, f"unixsrv accepted no connection: {report}"
