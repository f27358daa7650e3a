"""Run CPython's own asyncio tests for Unix servers against unixsrv.asyncio.

Usage: ``python tests/cpython_asyncio_runner.py GROUP`` (GROUP: one of
``GROUPS`` below).  The tests run in place, from the interpreter's installed
``test`` package (nothing of them is copied here), with unixsrv swapped in:

* ``loop.create_unix_server`` of asyncio's Unix selector event loops is
  unixsrv's (so ``asyncio.start_unix_server`` is too);
* ``test_server.TestServer2`` checks ``wait_closed`` / ``close_clients`` /
  ``abort_clients`` on a TCP server from ``asyncio.start_server`` and connects
  with ``asyncio.open_connection(*srv.sockets[0].getsockname())``; here
  ``start_server`` makes a unixsrv Unix server instead, whose listening
  socket reports ``(path, 0)`` from getsockname(), and ``open_connection``
  given a path connects to it with ``open_unix_connection``.

The last line of stdout is a JSON object: ``selected`` (tests chosen),
``ran``, ``failures``, ``errors``,
``skipped`` (test ids), ``servers`` (unixsrv servers created), ``accepted``
(connections they accepted) and ``excluded`` (test id -> reason).
Exit status 0 if the run was successful, 1 if not, 2 if the ``test``
package is missing.
"""

from __future__ import annotations

import asyncio
import asyncio.unix_events
import importlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import unittest
from typing import Any

import unixsrv.asyncio as hosted

#: group -> (module, regex over "Class.method" of the tests to run)
GROUPS = {
    "server": (
        "test.test_asyncio.test_server",
        r"SelectorStartServerTests\.test_start_unix_server.*|UnixServerCleanupTests\..*|TestServer2\..*",
    ),
    "streams": (
        "test.test_asyncio.test_streams",
        r"StreamTests\.test_start_unix_server.*",
    ),
    "events": (
        "test.test_asyncio.test_events",
        r"\w*EventLoopTests\.test_create_unix_server.*",
    ),
    "unix_events": (
        "test.test_asyncio.test_unix_events",
        r"SelectorEventLoopUnixSocketTests\.test_create_unix_server_.*",
    ),
}

#: Tests left out, with the reason (out of scope: they mock the stdlib's socket module).
EXCLUDED = {
    "SelectorEventLoopUnixSocketTests.test_create_unix_server_bind_error": (
        "mocks asyncio.unix_events.socket (the stdlib socket module as asyncio sees it) so that bind() "
        "fails; unixsrv creates its socket in C, which the mock cannot reach"
    ),
}

_servers: list[hosted.UnixServer] = []
_tmpdir = ""


def _install() -> None:
    """The swap: unixsrv's create_unix_server on asyncio's Unix event loops."""
    create = hosted._create_unix_server

    async def counting_create(*args: Any, **kwargs: Any) -> hosted.UnixServer:
        server = await create(*args, **kwargs)
        _servers.append(server)
        return server

    hosted._create_unix_server = counting_create  # type: ignore[assignment]
    loop_class: Any = asyncio.unix_events._UnixSelectorEventLoop
    loop_class.create_unix_server = hosted._loop_create_unix_server


def _install_tcp_redirect() -> None:
    """TestServer2's TCP server and client become a unixsrv Unix server and a Unix client."""
    open_connection = asyncio.open_connection
    count = 0

    async def start_server(
        client_connected_cb: Any, host: Any = None, port: Any = None, **kwds: Any
    ) -> Any:
        nonlocal count
        count += 1
        path = os.path.join(_tmpdir, f"s{count}")
        server = await hosted.start_unix_server(client_connected_cb, path, **kwds)
        server._sockets[0]._name = (
            path,
            0,
        )  # the test unpacks (host, port) from getsockname()
        return server

    async def redirected_open_connection(host: Any = None, port: Any = None, **kwds: Any) -> Any:
        if isinstance(host, str) and host.startswith(_tmpdir):
            return await asyncio.open_unix_connection(host, **kwds)
        return await open_connection(host, port, **kwds)

    asyncio.start_server = start_server  # type: ignore[assignment]
    asyncio.open_connection = redirected_open_connection  # type: ignore[assignment]


def _flatten(suite: unittest.TestSuite) -> list[unittest.TestCase]:
    out: list[unittest.TestCase] = []
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


def _test_id(test: unittest.TestCase) -> str:
    return f"{type(test).__name__}.{test._testMethodName}"


def main(group: str) -> int:
    global _tmpdir
    try:
        importlib.import_module("test.test_asyncio")
    except ImportError as exc:
        print(json.dumps({"missing": f"CPython's test package is not installed: {exc}"}))
        return 2
    module_name, pattern = GROUPS[group]
    _install()
    if group == "server":
        _install_tcp_redirect()
    module = importlib.import_module(module_name)
    selected = re.compile(pattern)
    tests = [
        t
        for t in _flatten(unittest.defaultTestLoader.loadTestsFromModule(module))
        if selected.fullmatch(_test_id(t)) and _test_id(t) not in EXCLUDED
    ]
    _tmpdir = tempfile.mkdtemp(prefix="us-cpy-", dir="/tmp")
    try:
        stream = io.StringIO()
        result = unittest.TextTestRunner(stream=stream, verbosity=2).run(unittest.TestSuite(tests))
    finally:
        shutil.rmtree(_tmpdir, ignore_errors=True)
        # unittest's own module teardown (tearDownModule resets the policy)
        teardown = getattr(module, "tearDownModule", None)
        if teardown is not None:
            teardown()
    sys.stderr.write(stream.getvalue())
    report = {
        "group": group,
        "python": sys.version.split()[0],
        "selected": len(tests),
        "ran": result.testsRun,
        "failures": [_test_id(t) for t, _ in result.failures],
        "errors": [
            _test_id(t) if isinstance(t, unittest.TestCase) else str(t) for t, _ in result.errors
        ],
        "skipped": [_test_id(t) for t, _ in result.skipped],
        "servers": len(_servers),
        "accepted": sum(s.stats()["accepted"] for s in _servers),
        "excluded": {
            k: v
            for k, v in EXCLUDED.items()
            if k.split(".")[0] in {type(t).__name__ for t in tests}
        },
    }
    print(json.dumps(report))
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
