"""The peer echo servers the benchmark compares unixsrv with.

    python benchmarks/peers.py KIND PATH [--backlog N]

KIND is one of:

``uvloop-protocol``   uvloop event loop, an ``asyncio.Protocol`` that writes back
                      every chunk in ``data_received``;
``uvloop-streams``    uvloop, ``asyncio.start_unix_server`` with a
                      ``reader.read(65536)`` / ``writer.write`` + ``drain`` loop;
``asyncio-protocol``  the same Protocol on the default asyncio loop;
``asyncio-streams``   the same streams handler on the default asyncio loop;
``socketserver``      ``socketserver.ThreadingUnixStreamServer`` (one thread per
                      connection, ``daemon_threads``) with a ``BaseRequestHandler``
                      doing ``recv(65536)`` + ``sendall`` until EOF;
``unixsrv-socketserver``  the same server class and the same handler class on
                      ``unixsrv.socketserver.ThreadingUnixStreamServer`` (the
                      one-import switch: unixsrv's accept loop and workers).

unixsrv's asyncio layer under the same code (issue 9's rows):

``unixsrv.asyncio-protocol``         the Protocol above, served by
                                     ``unixsrv.asyncio.create_unix_server`` on the
                                     default asyncio loop;
``unixsrv.asyncio-uvloop-protocol``  the same on a uvloop loop;
``unixsrv.asyncio-streams``          the streams handler above, served by
                                     ``unixsrv.asyncio.start_unix_server`` on asyncio;
``unixsrv.asyncio-uvloop-streams``   the same on uvloop.

HTTP servers (spoken to by ``http_load.c``, not the echo generator): uvicorn
(httptools, no access log, no lifespan) serving a hello-world ASGI app:

``uvicorn-asyncio`` / ``uvicorn-uvloop``   ``uvicorn.Server(Config(app, uds=PATH))``
                                           on a plain asyncio / uvloop loop;
``unixsrv.asyncio-uvicorn-asyncio`` /      the same on ``unixsrv.asyncio.new_event_loop()``
``unixsrv.asyncio-uvicorn-uvloop``         (``base=uvloop.Loop``): uvicorn's
                                           ``loop.create_unix_server`` is unixsrv's.

Each is written the way the library's documentation shows it, nothing tuned.
The listening socket is bound under a temporary name, listens with the given
backlog (default 4096), and is then renamed to PATH, so PATH exists only once
the server accepts (the readiness rule of ``unixsrv serve`` and of the C
reference; unixsrv.socketserver binds PATH that way by itself).  unixsrv.asyncio does that itself too (it binds under a
temporary name, applies the mode, listens, renames), so it is simply given
PATH; uvicorn binds PATH itself (the file may exist a moment before it
listens: the HTTP generator retries a refused connect).  The soft RLIMIT_NOFILE is raised to the hard limit.  The process
runs until SIGTERM/SIGINT (default actions: the harness ends it by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import socketserver
from typing import Any

KINDS = (
    "uvloop-protocol",
    "uvloop-streams",
    "asyncio-protocol",
    "asyncio-streams",
    "socketserver",
    "unixsrv-socketserver",
)
HOSTED_KINDS = (
    "unixsrv.asyncio-protocol",
    "unixsrv.asyncio-uvloop-protocol",
    "unixsrv.asyncio-streams",
    "unixsrv.asyncio-uvloop-streams",
)
HTTP_KINDS = (
    "uvicorn-asyncio",
    "uvicorn-uvloop",
    "unixsrv.asyncio-uvicorn-asyncio",
    "unixsrv.asyncio-uvicorn-uvloop",
)


class EchoProtocol(asyncio.Protocol):
    """Writes back every chunk as it arrives."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def echo_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The streams echo: read, write, drain, until EOF."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class EchoHandler(socketserver.BaseRequestHandler):
    """recv(65536) + sendall until EOF."""

    def handle(self) -> None:
        sock = self.request
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except ConnectionError:
            pass


def listening_socket(path: str, backlog: int) -> socket.socket:
    """Bind under a temporary name and listen; the caller renames it to
    ``path`` once its loop is about to accept."""
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(tmp)
    sock.listen(backlog)
    return sock


def serve_asyncio(kind: str, path: str, backlog: int) -> None:
    if kind.startswith("uvloop"):
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    sock = listening_socket(path, backlog)
    tmp = sock.getsockname()
    if kind.endswith("protocol"):
        server = loop.run_until_complete(
            loop.create_unix_server(EchoProtocol, sock=sock, backlog=backlog)
        )
    else:
        server = loop.run_until_complete(
            asyncio.start_unix_server(echo_stream, sock=sock, backlog=backlog)
        )
    os.rename(tmp, path)
    try:
        loop.run_until_complete(server.serve_forever())
    finally:
        loop.close()


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """The loop a hosted or HTTP kind runs on: uvloop's or asyncio's default
    loop class, as a unixsrv.asyncio loop for the ``unixsrv.asyncio-`` kinds."""
    base: type[asyncio.AbstractEventLoop] = asyncio.SelectorEventLoop
    if "uvloop" in kind:
        import uvloop

        base = uvloop.Loop
    if kind.startswith("unixsrv.asyncio-"):
        import unixsrv.asyncio

        return unixsrv.asyncio.new_event_loop(base)
    return base()


def serve_hosted(kind: str, path: str, backlog: int) -> None:
    """The echo Protocol / streams handler served by unixsrv.asyncio."""
    import unixsrv.asyncio

    loop = new_loop(kind)
    asyncio.set_event_loop(loop)
    if kind.endswith("protocol"):
        start = unixsrv.asyncio.create_unix_server(EchoProtocol, path, backlog=backlog)
    else:
        start = unixsrv.asyncio.start_unix_server(echo_stream, path, backlog=backlog)
    server = loop.run_until_complete(start)
    try:
        loop.run_until_complete(server.serve_forever())
    finally:
        loop.close()


async def hello_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The hello-world ASGI application of the HTTP rows."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")],
        }
    )
    await send({"type": "http.response.body", "body": b"Hello, world!"})


def serve_uvicorn(kind: str, path: str, backlog: int) -> None:
    """uvicorn (httptools) serving hello_app on PATH; SIGTERM stops it (uvicorn's handler)."""
    import uvicorn

    config = uvicorn.Config(
        hello_app,
        uds=path,
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=backlog,
    )
    loop = new_loop(kind)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(uvicorn.Server(config).serve())
    finally:
        loop.close()


def serve_socketserver(kind: str, path: str, backlog: int) -> None:
    """EchoHandler on the standard library's ThreadingUnixStreamServer or, for
    ``unixsrv-socketserver``, on unixsrv's: one thread per connection
    (``daemon_threads``), listen(``request_queue_size``)."""
    if kind == "unixsrv-socketserver":
        from unixsrv import socketserver as unixsrv_socketserver

        base = unixsrv_socketserver.ThreadingUnixStreamServer
    else:
        base = socketserver.ThreadingUnixStreamServer
    echo_server = type(
        "EchoUnixServer", (base,), {"daemon_threads": True, "request_queue_size": backlog}
    )
    if kind == "unixsrv-socketserver":
        # unixsrv binds under a temporary name, listens, then renames onto
        # PATH (README "The socket file"): PATH appears only once it accepts.
        server = echo_server(path, EchoHandler)
    else:
        tmp = f"{path}.{os.getpid()}.tmp"
        server = echo_server(tmp, EchoHandler)  # binds and listens(request_queue_size)
        os.rename(tmp, path)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("kind", choices=KINDS + HOSTED_KINDS + HTTP_KINDS)
    parser.add_argument("path")
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.kind.endswith("socketserver"):
        serve_socketserver(args.kind, args.path, args.backlog)
    elif args.kind in HOSTED_KINDS:
        serve_hosted(args.kind, args.path, args.backlog)
    elif args.kind in HTTP_KINDS:
        serve_uvicorn(args.kind, args.path, args.backlog)
    else:
        serve_asyncio(args.kind, args.path, args.backlog)


if __name__ == "__main__":
    main()
