"""Real asyncio applications on unixsrv.asyncio, with real clients (issue 9, point 4).

DESIGN.md, "unixsrv.asyncio": ``new_event_loop()`` returns a loop whose
``create_unix_server`` is unixsrv's, "and so ``asyncio.start_unix_server``,
aiohttp's ``UnixSite``, uvicorn's ``--uds``"; ``run()`` is ``asyncio.run`` on
such a loop.  Here an aiohttp application (``web.UnixSite`` on
``unixsrv.asyncio.new_event_loop()``, with asyncio's and with uvloop's loop
class as the base) and an ASGI application served by
uvicorn with ``uds=`` inside ``unixsrv.asyncio.run()`` (and through uvicorn's
own command line with ``--loop unixsrv.asyncio:new_event_loop``) answer
``curl --unix-socket`` and a Python HTTP client (``http.client``):

- several requests on one keep-alive connection (curl's ``num_connects`` and
  the client's socket object show the connection is reused);
- a streamed upload (chunked request body) and a streamed download (chunked
  response), 4 MiB each way, verified by SHA-256;
- handlers that use the loop (a ``call_later`` timer, a future) on the loop
  the framework runs on;
- the server under the framework is unixsrv's: its type comes from
  ``unixsrv.asyncio``, its ``sockets`` report the configured path, and its
  ``stats()`` counted exactly the connections the clients made and at least
  the bytes they sent and received — so these tests fail on asyncio's or
  uvloop's own server;
- a clean stop: the socket file is removed, every connection closed, the
  serving thread or process ends by itself (bounded waits), no process is left.

The aiohttp application runs on a thread of this process (the test reads the
server's stats directly); uvicorn runs in a child process stopped with
SIGTERM, as a service manager stops it, and reports its server's facts as
JSON (an HTTP endpoint while serving, a line at lifespan shutdown).

Needs the ``compat`` extra (aiohttp, uvicorn, httptools); each test skips with
the reason when a framework or curl is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any

import pytest

from conftest import (
    DEADLINE,
    MiB,
    child_pids,
    connect,
    end_processes,
    env_without_preload,
    finish,
    payload,
    sha,
    wait_until,
)

KiB = 1024
#: Bytes each way of the streamed upload and download.
BIG = 4 * MiB
#: Size of the pieces the clients and the applications stream.
CHUNK = 256 * KiB
#: Three requests on one connection; curl's %{num_connects} per transfer.
KEEPALIVE_URLS = ["http://localhost/", "http://localhost/", "http://localhost/"]


def unixsrv_asyncio() -> Any:
    """The layer under test (imported lazily: the module is collected even
    where a framework is missing)."""
    import unixsrv.asyncio

    return unixsrv.asyncio


# ------------------------------------------------------------------ clients


def curl(path: str, *args: str) -> str:
    """``curl --unix-socket PATH ARGS``; fails on an HTTP error; its stdout."""
    exe = shutil.which("curl")
    if exe is None:
        pytest.skip("curl is not installed (the tests talk to the servers with curl --unix-socket)")
    argv = [
        exe,
        "--silent",
        "--show-error",
        "--fail",
        "--max-time",
        str(DEADLINE),
        "--unix-socket",
        path,
        *args,
    ]
    env = env_without_preload()
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=DEADLINE + 5, check=False, env=env
    )
    assert done.returncode == 0, f"{argv}: exit {done.returncode}: {done.stderr}"
    return done.stdout


def curl_keepalive(path: str) -> list[str]:
    """Three GETs of "/" by one curl run: the bodies, each followed by the
    new connections curl opened for it (1, then 0 while the connection is
    kept alive) and the status."""
    out = curl(path, "--write-out", "|%{num_connects} %{http_code}\n", *KEEPALIVE_URLS)
    return out.splitlines()


def curl_upload(path: str, tmp_dir: str) -> dict[str, Any]:
    """POST a 1 MiB file to /upload; the application's JSON answer."""
    body = payload(MiB, seed=3)
    file = os.path.join(tmp_dir, "upload.bin")
    with open(file, "wb") as f:
        f.write(body)
    answer: dict[str, Any] = json.loads(
        curl(path, "--data-binary", f"@{file}", "http://localhost/upload")
    )
    assert answer == {"sha": sha(body), "len": MiB}
    return answer


class UnixHTTPConnection(http.client.HTTPConnection):
    """The standard library's HTTP/1.1 client over a Unix socket (keep-alive
    by default: one connection for every request until it is closed)."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=DEADLINE)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = connect(self.unix_path)

    def fetch(self, method: str, url: str, body: Iterable[bytes] | bytes | None = None) -> bytes:
        """One request; the response body (status 200 required)."""
        self.request(method, url, body=body)
        resp = self.getresponse()
        data = resp.read()
        assert resp.status == 200, (resp.status, data[:200])
        return data


def python_client_session(path: str) -> None:
    """On one keep-alive connection: three GETs, a streamed (chunked) 4 MiB
    upload, a streamed 4 MiB download read piece by piece, a last GET."""
    conn = UnixHTTPConnection(path)
    try:
        assert conn.fetch("GET", "/") == b"hello timer"
        sock = conn.sock
        assert conn.fetch("GET", "/") == b"hello timer"
        assert conn.fetch("GET", "/") == b"hello timer"
        up = payload(BIG, seed=2)
        # An iterable body without a length: http.client sends it chunked.
        answer = json.loads(
            conn.fetch("POST", "/upload", (up[i : i + CHUNK] for i in range(0, BIG, CHUNK)))
        )
        assert answer == {"sha": sha(up), "len": BIG}
        conn.request("GET", f"/download/{BIG}")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Transfer-Encoding") == "chunked"
        digest, got = hashlib.sha256(), 0
        while piece := resp.read(64 * KiB):
            digest.update(piece)
            got += len(piece)
        assert (got, digest.hexdigest()) == (BIG, sha(payload(BIG)))
        assert conn.fetch("GET", "/") == b"hello timer"
        assert conn.sock is sock, "the client had to reconnect: the connection was not kept alive"
    finally:
        conn.close()


def check_keepalive(lines: list[str]) -> None:
    assert lines == ["hello timer|1 200", "hello timer|0 200", "hello timer|0 200"], lines


def check_stats(stats: dict[str, int], connections: int) -> None:
    """unixsrv's counters after the clients of a test: exactly their
    connections, at least the bytes they streamed each way, no errors."""
    assert stats["accepted"] == connections, stats
    assert stats["rejected"] == 0, stats
    assert stats["errors"] == 0, stats
    assert stats["bytes_in"] > BIG + MiB, stats  # the uploads went through unixsrv's core
    assert stats["bytes_out"] > BIG, stats  # and so did the download


# ------------------------------------------------------------------ aiohttp


def aiohttp_app(web: Any, static_file: str) -> Any:
    """A small aiohttp application: "/" answers after a loop timer,
    "/upload" hashes a streamed request body, "/download/N" streams N bytes,
    "/file" is ``static_file`` served by ``web.FileResponse`` (which tries
    ``loop.sendfile`` first)."""

    async def hello(request: Any) -> Any:
        loop = asyncio.get_running_loop()
        timer: asyncio.Future[str] = loop.create_future()
        loop.call_later(0.001, timer.set_result, "timer")
        return web.Response(text=f"hello {await timer}")

    async def upload(request: Any) -> Any:
        digest, n = hashlib.sha256(), 0
        async for piece in request.content.iter_chunked(64 * KiB):
            digest.update(piece)
            n += len(piece)
        return web.json_response({"sha": digest.hexdigest(), "len": n})

    async def download(request: Any) -> Any:
        n = int(request.match_info["n"])
        data = payload(n)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, n, CHUNK):
            await resp.write(data[i : i + CHUNK])
        await resp.write_eof()
        return resp

    async def file(request: Any) -> Any:
        return web.FileResponse(static_file)

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download/{n}", download)
    app.router.add_get("/file", file)
    return app


@contextlib.contextmanager
def loop_thread(
    loop: asyncio.AbstractEventLoop,
) -> Iterator[Callable[[Coroutine[Any, Any, Any]], Any]]:
    """Run ``loop`` on a thread; yield ``run(coro)`` (runs it there, waits
    at most DEADLINE for its result); at the end stop the loop, join the
    thread (bounded) and close the loop."""
    thread = threading.Thread(target=loop.run_forever, name="app-loop", daemon=True)
    thread.start()

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(DEADLINE)

    try:
        yield run
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(DEADLINE)
        assert not thread.is_alive(), "the application's loop did not stop"
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@pytest.mark.parametrize("base", ["asyncio", "uvloop"])
def test_aiohttp_unix_site(sock_path: str, sock_dir: str, base: str) -> None:
    """aiohttp's ``web.UnixSite`` on ``unixsrv.asyncio.new_event_loop()``
    (asyncio's loop class, or ``uvloop.Loop`` as the base): unixsrv's server
    under it answers curl and http.client (keep-alive, streamed bodies, a
    static file), counts their connections, and ``runner.cleanup()`` stops
    it cleanly (file removed, every connection closed)."""
    web = pytest.importorskip(
        "aiohttp.web", reason="aiohttp is not installed (pip install '.[compat]')"
    )
    if base == "uvloop":
        uvloop = pytest.importorskip(
            "uvloop", reason="uvloop is not installed (pip install '.[bench]')"
        )
        loop = unixsrv_asyncio().new_event_loop(uvloop.Loop)
        assert isinstance(loop, uvloop.Loop)
    else:
        loop = unixsrv_asyncio().new_event_loop()
    # Keep what the loop's create_unix_server returns: the server under aiohttp.
    servers: list[Any] = []
    create = loop.create_unix_server

    async def recording(*args: Any, **kwargs: Any) -> Any:
        srv = await create(*args, **kwargs)
        servers.append(srv)
        return srv

    loop.create_unix_server = recording  # type: ignore[method-assign]
    with loop_thread(loop) as run:
        static = os.path.join(sock_dir, "static.bin")
        with open(static, "wb") as f:
            f.write(payload(MiB, seed=4))
        runner = web.AppRunner(aiohttp_app(web, static))
        run(runner.setup())
        try:
            run(web.UnixSite(runner, sock_path).start())
            [srv] = servers
            assert type(srv).__module__ == "unixsrv.asyncio", f"not unixsrv's server: {type(srv)}"
            assert isinstance(srv, asyncio.AbstractServer)
            assert [s.getsockname() for s in srv.sockets] == [sock_path]
            assert runner.addresses == [sock_path]

            check_keepalive(curl_keepalive(sock_path))
            curl_upload(sock_path, sock_dir)
            fetched = os.path.join(sock_dir, "fetched.bin")
            curl(sock_path, "--output", fetched, "http://localhost/file")
            with open(fetched, "rb") as f:
                assert sha(f.read()) == sha(payload(MiB, seed=4))
            python_client_session(sock_path)
            check_stats(srv.stats(), connections=4)
        finally:
            run(runner.cleanup())
        assert not os.path.lexists(sock_path), "the socket file outlived the server"
        wait_until(lambda: srv.stats()["open"] == 0)
        stats = srv.stats()
        assert stats["closed"] == stats["accepted"] == 4, stats
        assert not srv.is_serving()


# ------------------------------------------------------------------ uvicorn

#: The ASGI application and the way it is started inside unixsrv.asyncio.run().
#: "/" answers after a loop timer, "/upload" hashes a streamed body,
#: "/download/N" streams N bytes, "/facts" reports the loop and unixsrv's
#: server (type, stats, sockets); the lifespan shutdown prints the same facts
#: as a JSON line, after uvicorn closed its server and connections.
UVICORN_APP = """
import asyncio, hashlib, json, os, random

SERVER = None    # the uvicorn.Server (set when started by this module's main)
CHUNK = 256 * 1024


def facts(path):
    loop = asyncio.get_running_loop()
    out = {"loop_modules": sorted({c.__module__ for c in type(loop).__mro__})}
    if SERVER is not None:
        [srv] = SERVER.servers
        out.update(server=type(srv).__module__, stats=srv.stats() if hasattr(srv, "stats") else None,
                   socknames=[s.getsockname() for s in srv.sockets], file_exists=os.path.lexists(path))
    return out


async def respond(send, body, status=200):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                print(json.dumps({"event": "lifespan.shutdown", **facts(os.environ["ASGI_APP_SOCKET"])}), flush=True)
                await send({"type": "lifespan.shutdown.complete"})
                return
    route = scope["path"]
    if route == "/upload":
        digest, n, more = hashlib.sha256(), 0, True
        while more:
            message = await receive()
            body = message.get("body", b"")
            digest.update(body)
            n += len(body)
            more = message.get("more_body", False)
        await respond(send, json.dumps({"sha": digest.hexdigest(), "len": n}).encode())
    elif route.startswith("/download/"):
        n = int(route.rsplit("/", 1)[1])
        data = random.Random(1).randbytes(n)   # conftest.payload(n)
        await send({"type": "http.response.start", "status": 200, "headers": []})  # no length: chunked
        for i in range(0, n, CHUNK):
            await send({"type": "http.response.body", "body": data[i:i + CHUNK], "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif route == "/facts":
        await respond(send, json.dumps(facts(os.environ["ASGI_APP_SOCKET"])).encode())
    else:
        loop = asyncio.get_running_loop()
        timer = loop.create_future()
        loop.call_later(0.001, timer.set_result, b"timer")
        await respond(send, b"hello " + await timer)


async def main(path):
    global SERVER
    import uvicorn

    config = uvicorn.Config(app, uds=path, http="httptools", lifespan="on", log_level="warning")
    SERVER = uvicorn.Server(config)
    await SERVER.serve()


if __name__ == "__main__":
    import unixsrv.asyncio

    unixsrv.asyncio.run(main(os.environ["ASGI_APP_SOCKET"]))
"""


@pytest.fixture
def uvicorn_app(tmp_path: Any) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start the ASGI application above in a child process: ``start(path,
    *argv)`` runs ``python ARGV`` with the application's module
    (``asgi_app``) on PYTHONPATH and ``path``, where it serves, in
    ASGI_APP_SOCKET.  Every child is ended by its PID at the end of the test."""
    pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install '.[compat]')")
    pytest.importorskip("httptools", reason="httptools is not installed (pip install '.[compat]')")
    (tmp_path / "asgi_app.py").write_text(textwrap.dedent(UVICORN_APP), encoding="utf-8")
    procs: list[subprocess.Popen[str]] = []

    def start(path: str, *argv: str) -> subprocess.Popen[str]:
        env = dict(os.environ, ASGI_APP_SOCKET=path)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            [sys.executable, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(tmp_path),
        )
        procs.append(proc)
        return proc

    yield start
    end_processes(procs)


def get_facts(path: str) -> dict[str, Any]:
    """GET /facts on a connection of its own."""
    conn = UnixHTTPConnection(path)
    try:
        facts: dict[str, Any] = json.loads(conn.fetch("GET", "/facts"))
    finally:
        conn.close()
    return facts


def facts_when_serving(proc: subprocess.Popen[str], path: str) -> dict[str, Any]:
    """Poll GET /facts until the child answers (no file yet, or not
    listening yet: try again); fail at once if the child exited."""

    def answer() -> dict[str, Any] | None:
        assert proc.poll() is None, f"the server exited before serving: {proc.communicate()}"
        try:
            return get_facts(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return None

    facts: dict[str, Any] = wait_until(answer)
    return facts


def stop_with_sigterm(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, as a service manager stops the server; it must end by itself.
    uvicorn (>= 0.29) re-raises the signal it caught once it has shut down,
    so the status is that signal (0 with older uvicorn).  Its stdout."""
    assert child_pids(proc.pid) == set(), "uvicorn started processes of its own"
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert status in (0, -signal.SIGTERM), f"exit {status}:\n{err}"
    assert "Traceback" not in err, err
    return out


def test_uvicorn_uds_in_unixsrv_run(
    uvicorn_app: Callable[..., subprocess.Popen[str]], sock_path: str, sock_dir: str
) -> None:
    """uvicorn ``Server(Config(app, uds=path)).serve()`` inside
    ``unixsrv.asyncio.run()``: served by unixsrv's server (its type, its
    sockets' name, its stats count exactly the clients' connections), answers
    curl and http.client with keep-alive and streamed bodies; SIGTERM shuts
    it down gracefully: the socket file is gone and every connection closed
    before the application's lifespan shutdown runs."""
    proc = uvicorn_app(sock_path, "-m", "asgi_app")
    first = facts_when_serving(proc, sock_path)
    assert first["server"] == "unixsrv.asyncio", f"not unixsrv's server: {first}"
    assert "unixsrv.asyncio" in first["loop_modules"], first
    assert first["socknames"] == [sock_path]
    assert first["file_exists"] is True

    check_keepalive(curl_keepalive(sock_path))
    curl_upload(sock_path, sock_dir)
    python_client_session(sock_path)
    now = get_facts(sock_path)
    # The /facts polls, curl's two runs, the client session, this request.
    polls = 1
    check_stats(now["stats"], connections=polls + 2 + 1 + 1)

    out = stop_with_sigterm(proc)
    [last] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert last["event"] == "lifespan.shutdown"
    assert last["file_exists"] is False, "the socket file outlived uvicorn's server.close()"
    assert last["stats"]["open"] == 0, last
    assert last["stats"]["closed"] == last["stats"]["accepted"] == now["stats"]["accepted"], last
    assert not os.path.lexists(sock_path)


def test_uvicorn_cli_loop_option(
    uvicorn_app: Callable[..., subprocess.Popen[str]], sock_path: str, sock_dir: str
) -> None:
    """uvicorn's own command line with the one-option change the README
    gives, ``--loop unixsrv.asyncio:new_event_loop`` (uvicorn >= 0.36 takes a
    loop factory there): the application runs on unixsrv's loop, answers curl
    and http.client, and SIGTERM stops it with the socket file removed."""
    import uvicorn

    if tuple(int(p) for p in uvicorn.__version__.split(".")[:2]) < (0, 36):
        pytest.skip(
            f"uvicorn {uvicorn.__version__} has no loop factories in --loop (0.36 added them)"
        )
    proc = uvicorn_app(
        sock_path,
        "-m",
        "uvicorn",
        "asgi_app:app",
        "--uds",
        sock_path,
        "--loop",
        "unixsrv.asyncio:new_event_loop",
        "--http",
        "httptools",
        "--log-level",
        "warning",
    )
    first = facts_when_serving(proc, sock_path)
    assert "unixsrv.asyncio" in first["loop_modules"], f"not unixsrv's loop: {first}"
    check_keepalive(curl_keepalive(sock_path))
    curl_upload(sock_path, sock_dir)
    python_client_session(sock_path)
    out = stop_with_sigterm(proc)
    assert '"event": "lifespan.shutdown"' in out
    assert not os.path.lexists(sock_path), "the socket file outlived uvicorn"
