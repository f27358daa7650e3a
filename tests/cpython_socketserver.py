"""Run CPython's own test_socketserver against unixsrv.socketserver.

Usage: ``python tests/cpython_socketserver.py`` (run it in a scratch
directory: the tests create their socket files and logs in the current
directory).  Prints one JSON object on stdout; unittest's report goes to
stderr.  tests/test_socketserver_cpython.py runs it once per test session.

The tests run in place, from the interpreter's installed ``test`` package
(``test.test_socketserver``); none of their code is copied here.  The
``socketserver`` module they import is unixsrv.socketserver, loaded under
that name: exactly what a ``socketserver.py`` shim would give, and so
MiscTestCase.test_all sees its classes as the module's own.

Two phases:

``as_is``
    The whole module as it is.  Its Unix-stream cases run on unixsrv's
    classes; its TCP and datagram cases run on the stdlib classes that
    unixsrv.socketserver re-exports unchanged (and ErrorHandlerTest's
    threaded server mixes unixsrv's ThreadingMixIn into the stdlib's
    TCPServer).

``unix``
    The generic server cases (shutdown, handle_request, timeouts, error
    handling, close_request, thread joins) pointed at Unix sockets, by
    rebinding names in the test module while they run: ``TCPServer``,
    ``ThreadingTCPServer`` and ``ForkingTCPServer`` become unixsrv servers
    that take an ``(host, port)`` address as "pick a fresh name", as port 0
    makes the OS pick a port; the error-test servers the module builds at
    import on TCPServer are rebuilt with that server under them; the tests'
    clients (``socket.create_connection``, ``socket.socket(family,
    SOCK_STREAM, IPPROTO_TCP)``) connect to those paths.  ``EXCLUDED`` lists
    what this phase leaves out, and why.

Each phase reports how many connections unixsrv's servers accepted, so a
run that silently used the stdlib's servers is caught.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import sys
import tempfile
import types
import unittest
from typing import Any

#: Cases of the "unix" phase left out, with the reason.  Everything else in
#: the generic classes runs.
EXCLUDED = {
    "test_tcpserver_bind_leak": "AF_INET only: port -1 must raise OverflowError",
    "test_all": "not a server case: module contents, checked in the as_is phase",
}
#: Cases whose name says they are about datagram servers (another socket
#: type; the module re-exports the stdlib's, which run in the as_is phase)
#: or already about Unix-stream servers (run as they are in the as_is phase).
EXCLUDED_NAME_PARTS = {
    "UDP": "datagram server (SOCK_DGRAM, the stdlib's class): runs in the as_is phase",
    "Datagram": "datagram server (SOCK_DGRAM, the stdlib's class): runs in the as_is phase",
    "Unix": "a Unix-stream case: runs as it is in the as_is phase",
}
#: The test classes whose cases are generic server cases.
GENERIC_CLASSES = (
    "SocketServerTest",
    "ErrorHandlerTest",
    "SocketWriterTest",
    "MiscTestCase",
)


def load_swapped() -> types.ModuleType:
    """unixsrv.socketserver, executed as the module ``socketserver`` and
    installed in sys.modules under that name."""
    import socketserver as stdlib  # noqa: F401  (imported first: the swapped module builds on it)

    spec = importlib.util.find_spec("unixsrv.socketserver")
    assert spec is not None and spec.origin is not None
    swapped_spec = importlib.util.spec_from_file_location("socketserver", spec.origin)
    assert swapped_spec is not None and swapped_spec.loader is not None
    module = importlib.util.module_from_spec(swapped_spec)
    swapped_spec.loader.exec_module(module)
    sys.modules["socketserver"] = module
    return module


def record_servers(module: types.ModuleType) -> list[Any]:
    """Every unixsrv server bound from now on (for the accepted counts)."""
    servers: list[Any] = []
    bind = module.UnixStreamServer.server_bind

    def recording_bind(self: Any) -> None:
        servers.append(self)
        bind(self)

    module.UnixStreamServer.server_bind = recording_bind
    return servers


def run_suite(suite: unittest.TestSuite, servers: list[Any]) -> dict[str, Any]:
    first = len(servers)
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)
    mine = servers[first:]
    return {
        "expected": suite.countTestCases(),
        "ran": result.testsRun,
        "failures": [t.id() for t, _ in result.failures],
        "errors": [t.id() for t, _ in result.errors],
        "skipped": {t.id(): reason for t, reason in result.skipped},
        "unexpected_successes": [t.id() for t in result.unexpectedSuccesses],
        "servers": len(mine),
        "accepted": sum(s.stats()["accepted"] for s in mine),
    }


def exclusion(name: str) -> str | None:
    if name in EXCLUDED:
        return EXCLUDED[name]
    for part, reason in EXCLUDED_NAME_PARTS.items():
        if part in name:
            return reason
    return None


def unix_socket_module() -> types.ModuleType:
    """The test module's ``socket``, with clients that reach Unix paths."""
    shim = types.ModuleType("socket")
    shim.__dict__.update(socket.__dict__)

    class ClientSocket(socket.socket):
        def __init__(self, *args: Any) -> None:
            # The generic tests ask for TCP explicitly: (family, type, IPPROTO_TCP).
            if args[:1] == (socket.AF_UNIX,) and args[2:3] == (socket.IPPROTO_TCP,):
                args = (*args[:2], 0, *args[3:])
            super().__init__(*args)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        if not isinstance(address, (str, bytes)):
            return socket.create_connection(address, *args, **kwargs)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(address)
        except BaseException:
            s.close()
            raise
        return s

    shim.socket = ClientSocket  # type: ignore[attr-defined]
    shim.create_connection = create_connection  # type: ignore[attr-defined]
    return shim


def unix_servers(swapped: types.ModuleType) -> dict[str, type]:
    """TCPServer and its threading/forking variants as unixsrv servers."""

    class UnixTCPServer(swapped.UnixStreamServer):  # type: ignore[name-defined,misc]
        def __init__(self, server_address: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(server_address, tuple):
                # A fresh name in the scratch directory (os.curdir keeps it
                # short), as the tests' own pickaddr() makes one.
                server_address = tempfile.mktemp(prefix="unix_socket.", dir=os.curdir)
            super().__init__(server_address, *args, **kwargs)

    servers: dict[str, type] = {
        "TCPServer": UnixTCPServer,
        "ThreadingTCPServer": type(
            "ThreadingTCPServer", (swapped.ThreadingMixIn, UnixTCPServer), {}
        ),
    }
    if hasattr(swapped, "ForkingMixIn"):
        servers["ForkingTCPServer"] = type(
            "ForkingTCPServer", (swapped.ForkingMixIn, UnixTCPServer), {}
        )
    return servers


def point_at_unix(tss: types.ModuleType, swapped: types.ModuleType) -> dict[str, Any]:
    """Rebind the test module's names (see the module doc); returns what
    they were, for restore()."""
    servers = unix_servers(swapped)
    shim = types.ModuleType("socketserver")
    shim.__dict__.update(swapped.__dict__)
    shim.__dict__.update(servers)
    names: dict[str, Any] = {"socketserver": shim, "socket": unix_socket_module()}
    # Built at import on TCPServer: rebuilt with the Unix one beneath it
    # (their own methods first, then UnixTCPServer's, then TCPServer's).
    for name in (
        "BaseErrorTestServer",
        "ThreadingErrorTestServer",
        "ForkingErrorTestServer",
    ):
        if hasattr(tss, name):
            names[name] = type(name, (getattr(tss, name), servers["TCPServer"]), {})
    saved = {name: getattr(tss, name) for name in names}
    for name, value in names.items():
        setattr(tss, name, value)
    return saved


def restore(tss: types.ModuleType, saved: dict[str, Any]) -> None:
    for name, value in saved.items():
        setattr(tss, name, value)


def main() -> int:
    swapped = load_swapped()
    servers = record_servers(swapped)
    import test.test_socketserver as tss

    # test.support.verbose is on outside regrtest: the tests' chatter goes
    # to stderr, stdout carries the JSON report only.
    with contextlib.redirect_stdout(sys.stderr):
        report = run_phases(tss, swapped, servers)
    print(json.dumps(report))
    return 0


def run_phases(
    tss: types.ModuleType, swapped: types.ModuleType, servers: list[Any]
) -> dict[str, Any]:
    loader = unittest.defaultTestLoader
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "phases": {},
        "excluded": {},
    }
    report["phases"]["as_is"] = run_suite(loader.loadTestsFromModule(tss), servers)

    selected = unittest.TestSuite()
    for class_name in GENERIC_CLASSES:
        cls = getattr(tss, class_name)
        for name in loader.getTestCaseNames(cls):
            reason = exclusion(name)
            if reason is None:
                selected.addTest(cls(name))
            else:
                report["excluded"][f"{class_name}.{name}"] = reason
    saved = point_at_unix(tss, swapped)
    try:
        report["phases"]["unix"] = run_suite(selected, servers)
    finally:
        restore(tss, saved)
    return report


if __name__ == "__main__":
    sys.exit(main())
