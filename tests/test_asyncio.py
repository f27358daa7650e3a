"""unixsrv.asyncio: the C core hosted by the application's own asyncio/uvloop loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import importlib.util
import json
import math
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import unixsrv.asyncio as ua
from conftest import (
    DEADLINE,
    Echo,
    echo_once,
    finish,
    open_fds,
    payload,
    read_line,
    sha,
)
from unixsrv import (
    AddressInUseError,
    ConnState,
    IdleTimeoutError,
    InvalidHandlerError,
    ServerConfig,
    ShutdownTimeoutError,
)

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def arun(
    main: Callable[[], Awaitable[Any]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> Any:
    """Run main() on a fresh event loop (asyncio's, or loop_factory's), bounded by DEADLINE."""
    loop = loop_factory() if loop_factory is not None else asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(main(), 3 * DEADLINE))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def roundtrip(path: str, msg: bytes) -> bytes:
    """Send msg on a new connection, half-close, read the answer to EOF."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(msg)
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()
        await writer.wait_closed()


async def until(predicate: Callable[[], bool]) -> None:
    """Poll predicate on the running loop until it holds (DEADLINE bound)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


async def stream_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


# ---------------------------------------------------------------- protocols using the loop


class LoopUser(asyncio.Protocol):
    """Answers each message from a task, after a call_later timer and a
    future resolved by another callback: everything asyncio code does."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()  # the factory runs on the loop's thread too
        self.threads: set[int] = set()
        self.lost: asyncio.Future[BaseException | None] = self.loop.create_future()
        self.answers: list[asyncio.Task[None]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.threads.add(threading.get_ident())

    def data_received(self, data: bytes) -> None:
        assert asyncio.get_running_loop() is self.loop
        self.threads.add(threading.get_ident())
        self.answers.append(self.loop.create_task(self.answer(data)))

    async def answer(self, data: bytes) -> None:
        fut: asyncio.Future[bytes] = self.loop.create_future()
        self.loop.call_later(0.001, fut.set_result, data.upper())
        self.transport.write(await fut)

    def eof_received(self) -> bool:
        self.loop.create_task(self.close_when_answered())
        return True

    async def close_when_answered(self) -> None:
        await asyncio.gather(*self.answers)
        # closed from a plain loop callback, outside any dispatch of the C loop
        self.loop.call_soon(self.transport.close)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


def test_protocol_uses_the_running_loop(sock_path: str) -> None:
    protos: list[LoopUser] = []

    def factory() -> LoopUser:
        protos.append(LoopUser())
        return protos[-1]

    async def main() -> None:
        server = await ua.create_unix_server(factory, sock_path)
        async with server:
            assert isinstance(server, asyncio.AbstractServer) and server.is_serving()
            assert await roundtrip(sock_path, b"hello") == b"HELLO"
            assert await asyncio.wait_for(protos[0].lost, DEADLINE) is None
            assert protos[0].threads == {threading.get_ident()}
            assert server.stats()["accepted"] == 1

    arun(main)


def test_streams_echo_with_flow_control(sock_path: str) -> None:
    """start_unix_server streams; a small limit makes the StreamReader pause
    and resume reading from its task (outside the C loop's dispatch)."""
    data = payload(3 * 1024 * 1024)

    async def main() -> None:
        server = await ua.start_unix_server(stream_echo, sock_path, limit=4096)
        async with server:
            reader, writer = await asyncio.open_unix_connection(sock_path)

            async def send() -> None:
                writer.write(data)
                await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            got = await asyncio.wait_for(reader.read(), DEADLINE)
            await sender
            writer.close()
            await writer.wait_closed()
            assert sha(got) == sha(data)
            stats = server.stats()
            assert stats["bytes_in"] == stats["bytes_out"] == len(data)

    arun(main)


def test_stdlib_start_unix_server_on_new_event_loop_and_run(sock_path: str) -> None:
    """asyncio.start_unix_server itself, on unixsrv's loop (run() and new_event_loop())."""

    async def main() -> ua.UnixServer:
        server = await asyncio.start_unix_server(stream_echo, sock_path)
        assert isinstance(server, ua.UnixServer)
        async with server:
            assert await roundtrip(sock_path, b"stdlib") == b"stdlib"
        return server

    server = ua.run(main())
    assert server.stats()["accepted"] == 1 and not os.path.exists(sock_path)
    loop = ua.new_event_loop()
    loop.close()
    assert isinstance(loop, asyncio.SelectorEventLoop) and type(loop) is ua.loop_class(
        asyncio.SelectorEventLoop
    )
    assert arun(main, ua.new_event_loop).stats()["closed"] == 1


class Buffered(asyncio.BufferedProtocol):
    """Receives into its own small buffer; echoes what it got."""

    def __init__(self) -> None:
        self.buf = bytearray(1000)
        self.asked: list[int] = []
        self.sizes: list[int] = []
        self.got = bytearray()
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        self.asked.append(sizehint)
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        assert 0 < nbytes <= len(self.buf)
        self.sizes.append(nbytes)
        self.got += self.buf[:nbytes]
        self.transport.write(bytes(self.buf[:nbytes]))

    def eof_received(self) -> None:
        self.eof = True


def test_buffered_protocol_receives_into_its_buffer(sock_path: str) -> None:
    protos: list[Buffered] = []
    data = payload(200_000)

    def factory() -> Buffered:
        protos.append(Buffered())
        return protos[-1]

    async def main() -> None:
        server = await ua.create_unix_server(factory, sock_path)
        async with server:
            assert await roundtrip(sock_path, data) == data
        proto = protos[0]
        assert bytes(proto.got) == data and proto.eof
        # Straight into the protocol's 1,000-byte buffer: never more per call,
        # asked with asyncio's -1 (no copy through a bytes object first).
        assert max(proto.sizes) <= 1000 and len(proto.sizes) >= 200
        assert set(proto.asked) == {-1}

    arun(main)


def test_buffered_protocol_errors_close_the_connection(sock_path: str) -> None:
    class Bad(Buffered):
        def get_buffer(self, sizehint: int) -> bytearray:
            return bytearray()  # asyncio refuses an empty buffer too

    async def main() -> None:
        server = await ua.create_unix_server(Bad, sock_path)
        errors: list[BaseException] = []
        server.on_error(errors.append)
        async with server:
            try:
                assert await roundtrip(sock_path, b"x") == b""
            except ConnectionResetError:
                pass  # closed with our byte unread: the kernel resets (as with asyncio)
        assert [type(e) for e in errors] == [RuntimeError]
        assert "empty buffer" in str(errors[0])

    arun(main)


# ---------------------------------------------------------------- ssl


@pytest.fixture
def cert(sock_dir: str) -> tuple[str, str]:
    """A self-signed certificate for 'localhost', made now with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (needed to make a test certificate)")
    certfile, keyfile = os.path.join(sock_dir, "cert.pem"), os.path.join(sock_dir, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", keyfile, "-out", certfile],
        check=True, capture_output=True, timeout=DEADLINE,
    )  # fmt: skip
    return certfile, keyfile


def test_ssl_through_asyncios_sslprotocol(sock_path: str, cert: tuple[str, str]) -> None:
    certfile, keyfile = cert
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certfile, keyfile)
    client_ctx = ssl.create_default_context(cafile=certfile)
    seen: list[Any] = []
    handled: list[asyncio.Future[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("sslcontext"))
        seen.append(writer.get_extra_info("socket").getsockname())
        await stream_echo(reader, writer)
        handled[0].set_result(None)

    async def main() -> None:
        handled.append(asyncio.get_running_loop().create_future())
        server = await ua.start_unix_server(
            handle, sock_path, ssl=server_ctx, ssl_handshake_timeout=DEADLINE
        )
        async with server:
            reader, writer = await asyncio.open_unix_connection(
                sock_path, ssl=client_ctx, server_hostname="localhost"
            )
            writer.write(b"secret " * 10_000)
            await writer.drain()
            got = await reader.readexactly(70_000)
            writer.close()
            await writer.wait_closed()
            await handled[0]  # the server side closed its writer too
            assert got == b"secret " * 10_000
            assert server.stats()["bytes_in"] > 70_000  # TLS records, not plain text
        assert seen == [server_ctx, sock_path]

    arun(main)


def test_ssl_handshake_failure_reaches_no_app_protocol(
    sock_path: str, cert: tuple[str, str]
) -> None:
    certfile, keyfile = cert
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certfile, keyfile)
    made: list[Any] = []

    class App(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)

    async def main() -> None:
        server = await ua.create_unix_server(App, sock_path, ssl=server_ctx)
        async with server:
            untrusting = ssl.create_default_context()  # no CA: the handshake fails
            with pytest.raises(ssl.SSLError):
                await asyncio.open_unix_connection(
                    sock_path, ssl=untrusting, server_hostname="localhost"
                )
            await until(
                lambda: server.open_connections == 0
            )  # the server side gave up its half too
            for _ in range(3):  # asyncio's client transport finishes in call_soon() callbacks
                await asyncio.sleep(0)
            assert server.stats()["accepted"] == 1
        assert made == []

    arun(main)


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="StreamWriter.start_tls() is new in Python 3.11"
)
def test_start_tls_upgrades_a_hosted_connection(sock_path: str, cert: tuple[str, str]) -> None:
    """STARTTLS: plain text first, then loop.start_tls() on unixsrv's transport."""
    certfile, keyfile = cert
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certfile, keyfile)
    client_ctx = ssl.create_default_context(cafile=certfile)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"STARTTLS\n"
        writer.write(b"GO\n")
        await writer.drain()
        await writer.start_tls(server_ctx)  # type: ignore[attr-defined]
        await stream_echo(reader, writer)

    async def main() -> None:
        server = await ua.start_unix_server(handle, sock_path)
        async with server:
            reader, writer = await asyncio.open_unix_connection(sock_path)
            writer.write(b"STARTTLS\n")
            assert await reader.readline() == b"GO\n"
            await writer.start_tls(client_ctx, server_hostname="localhost")  # type: ignore[attr-defined]
            writer.write(b"over tls")
            assert await reader.readexactly(8) == b"over tls"
            assert writer.get_extra_info("peercert")["subject"] == ((("commonName", "localhost"),),)
            writer.close()
            await writer.wait_closed()
            await until(lambda: server.open_connections == 0)

    arun(main)


def test_sendfile_answers_not_implemented_on_unixsrv_loops(sock_path: str, sock_dir: str) -> None:
    """loop.sendfile() on a unixsrv transport raises NotImplementedError (as on
    uvloop), the answer aiohttp's FileResponse falls back from."""
    outcome: list[str] = []

    class Send(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            asyncio.get_running_loop().create_task(self.send(transport))

        async def send(self, transport: Any) -> None:
            try:
                await asyncio.get_running_loop().sendfile(transport, file)
            except NotImplementedError:
                outcome.append("NotImplementedError")
            transport.close()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_unix_server(Send, sock_path)
        async with server:
            assert await roundtrip(sock_path, b"") == b""
            await until(lambda: outcome == ["NotImplementedError"])

    with open(os.path.join(sock_dir, "f"), "wb+") as file:
        file.write(b"file")
        arun(main, ua.new_event_loop)


# ---------------------------------------------------------------- sockets


def test_every_socket_reports_the_configured_path(sock_path: str) -> None:
    """The listener is bound under a temporary name and renamed; no socket
    object handed out shows that name."""
    names: list[Any] = []

    class Peek(Echo):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            names.append(transport.get_extra_info("socket").getsockname())

    async def main() -> None:
        server = await ua.create_unix_server(Peek, sock_path)
        async with server:
            names.append(server.sockets[0].getsockname())
            assert await roundtrip(sock_path, b"x") == b"x"
            assert server.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1

    arun(main)
    assert names == [sock_path, sock_path]


def test_sock_adoption(sock_path: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(sock_path)
    os.chmod(sock_path, 0o600)
    sock.listen(8)

    async def main() -> None:
        server = await ua.create_unix_server(Echo, sock=sock, cleanup_socket=False, idle_timeout=30)
        assert server.sockets[0].fileno() == sock.fileno() and server.path == sock_path
        assert await roundtrip(sock_path, b"adopted") == b"adopted"
        server.close()
        await server.wait_closed()

    arun(main)
    assert sock.fileno() == -1  # closed with the server, as asyncio does
    assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600  # never chmod-ed, not removed


@pytest.mark.skipif(
    sys.version_info >= (3, 13), reason="from 3.13 on asyncio removes an adopted socket's file"
)
def test_sock_adoption_never_unlinks_before_313(sock_path: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(sock_path)

    async def main() -> None:
        server = await ua.create_unix_server(Echo, sock=sock)
        server.close()
        await server.wait_closed()

    arun(main)
    assert os.path.exists(sock_path)


def test_sock_adoption_checks(sock_path: str) -> None:
    async def main() -> None:
        for family, kind in (
            (socket.AF_INET, socket.SOCK_STREAM),
            (socket.AF_UNIX, socket.SOCK_DGRAM),
        ):
            with (
                socket.socket(family, kind) as sock,
                pytest.raises(ValueError, match="UNIX Domain Stream"),
            ):
                await ua.create_unix_server(Echo, sock=sock)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(sock_path)
            with pytest.raises(ValueError, match="never chmods"):
                await ua.create_unix_server(Echo, sock=sock, mode=0o666)
            with pytest.raises(ValueError, match="at the same time"):
                await ua.create_unix_server(Echo, sock_path, sock=sock)
        with pytest.raises(ValueError, match="no sock"):
            await ua.create_unix_server(Echo)
        with pytest.raises(TypeError, match="SSLContext"):
            await ua.create_unix_server(Echo, sock_path, ssl=True)  # type: ignore[arg-type]

    arun(main)


def test_socket_file_rules_apply(sock_path: str) -> None:
    async def main() -> None:
        server = await ua.create_unix_server(Echo, sock_path, mode="0640")
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o640
        with pytest.raises(AddressInUseError, match=r"Address .* is already in use"):
            await ua.create_unix_server(Echo, sock_path)
        server.close()
        assert not os.path.exists(sock_path)
        again = await ua.create_unix_server(Echo, config=ServerConfig(path=sock_path, backlog=4))
        assert again._backlog == 4
        again.close()

    arun(main)


@pytest.mark.linux("abstract socket names")
def test_abstract_name(sock_path: str) -> None:
    name = "@us-" + os.path.basename(os.path.dirname(sock_path))

    socknames: list[Any] = []

    class Peek(Echo):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            socknames.append(transport.get_extra_info("sockname"))

    async def main() -> None:
        server = await ua.create_unix_server(Peek, name)
        async with server:
            assert server.path == name
            assert server.sockets[0].getsockname() == b"\0" + name[1:].encode()
            assert await roundtrip("\0" + name[1:], b"abstract") == b"abstract"
        assert socknames == [b"\0" + name[1:].encode()]  # as asyncio's transports report it

    arun(main)


# ---------------------------------------------------------------- lifecycle


def test_close_keeps_connections_and_wait_closed_waits(sock_path: str) -> None:
    async def main() -> None:
        server = await ua.start_unix_server(stream_echo, sock_path, start_serving=False)
        assert not server.is_serving()
        await server.start_serving()
        assert server.is_serving()
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b"one")
        assert await reader.readexactly(3) == b"one"
        server.close()
        assert not server.is_serving() and server.sockets == () and not os.path.exists(sock_path)
        with pytest.raises(OSError):
            await asyncio.open_unix_connection(sock_path)
        writer.write(b"two")  # the accepted connection goes on
        assert await reader.readexactly(3) == b"two"
        waiting = asyncio.create_task(server.wait_closed())
        await asyncio.sleep(0)
        if sys.version_info >= (
            3,
            12,
        ):  # asyncio's wait_closed waits for the connections from 3.12 on
            assert not waiting.done()
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(waiting, DEADLINE)
        await until(lambda: server.open_connections == 0)
        assert server._waiters is None  # asyncio's "closed and drained" mark
        with pytest.raises(RuntimeError, match="is closed"):
            await server.serve_forever()

    arun(main)


def test_serve_forever_cancelled_closes(sock_path: str) -> None:
    async def main() -> None:
        server = await ua.create_unix_server(Echo, sock_path, start_serving=False)
        task = asyncio.create_task(server.serve_forever())
        await until(server.is_serving)
        assert await roundtrip(sock_path, b"forever") == b"forever"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not server.is_serving() and not os.path.exists(sock_path)

    arun(main)


class Hoarder(asyncio.Protocol):
    """Writes more than the peer will read, then never closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"z" * (4 * 1024 * 1024))  # type: ignore[attr-defined]


def test_shutdown_graceful_and_timeout(sock_path: str) -> None:
    lost: list[BaseException | None] = []

    class Slow(Echo):
        def connection_lost(self, exc: BaseException | None) -> None:
            lost.append(exc)

    async def main() -> None:
        server = await ua.create_unix_server(Slow, sock_path)
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        await server.shutdown(DEADLINE)  # closes the idle connection: the client sees EOF
        assert await reader.read() == b"" and lost == [None]
        assert not os.path.exists(sock_path) and server.open_connections == 0
        writer.close()
        await server.shutdown(1.0)  # idempotent

        hoarding = await ua.create_unix_server(Hoarder, sock_path)
        reader, writer = await asyncio.open_unix_connection(sock_path)
        await until(lambda: hoarding.open_connections == 1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(ShutdownTimeoutError, match="1 connection"):
            await hoarding.shutdown(0.2)
        assert 0.2 <= loop.time() - start < 0.2 + DEADLINE
        assert hoarding.open_connections == 0
        writer.close()
        for bad, err in (
            (math.nan, ValueError),
            (-1, ValueError),
            ("1", TypeError),
            (None, TypeError),
        ):
            with pytest.raises(err):
                await hoarding.shutdown(bad)  # type: ignore[arg-type]

    arun(main)


def test_idle_timeout_on_a_hosted_server(sock_path: str) -> None:
    lost: list[BaseException | None] = []

    class Quiet(Echo):
        def connection_lost(self, exc: BaseException | None) -> None:
            lost.append(exc)

    async def main() -> None:
        server = await ua.create_unix_server(Quiet, sock_path, idle_timeout=0.2)
        async with server:
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_unix_connection(sock_path)
            for n in range(3):  # activity keeps it open past the timeout
                if n:
                    await asyncio.sleep(0.1)  # the client's pace: time passing is the behaviour
                last = loop.time()  # the server's last activity (its echo) comes after this
                writer.write(b"k")
                assert await reader.readexactly(1) == b"k"
            assert await asyncio.wait_for(reader.read(), DEADLINE) == b""  # the idle timer fired
            assert 0.2 <= loop.time() - last < 0.2 + DEADLINE
            assert len(lost) == 1 and isinstance(lost[0], IdleTimeoutError)
            writer.close()

    arun(main)


# ---------------------------------------------------------------- callbacks and counters


class Raiser(Echo):
    def data_received(self, data: bytes) -> None:
        if data == b"boom":
            raise ValueError("boom")
        super().data_received(data)


def test_callback_errors_go_to_the_loops_exception_handler(sock_path: str) -> None:
    contexts: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: contexts.append(ctx))
        server = await ua.create_unix_server(Raiser, sock_path)
        async with server:
            assert await roundtrip(sock_path, b"boom") == b""  # that connection is closed
            assert await roundtrip(sock_path, b"fine") == b"fine"  # the server goes on
            assert server.stats()["errors"] == 1

    arun(main)
    assert len(contexts) == 1
    assert isinstance(contexts[0]["exception"], ValueError) and contexts[0]["server"] is not None


def test_on_error_takes_precedence(sock_path: str) -> None:
    contexts: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: contexts.append(ctx))
        server = await ua.create_unix_server(Raiser, sock_path)
        server.on_error(errors.append)
        async with server:
            assert await roundtrip(sock_path, b"boom") == b""

    arun(main)
    assert contexts == [] and [str(e) for e in errors] == ["boom"]


def test_stats_conn_state_and_server_info(sock_path: str) -> None:
    states: list[tuple[str, ConnState]] = []
    info: list[str] = []

    async def main() -> ua.UnixServer:
        server = await ua.create_unix_server(
            Echo, sock_path, start_serving=False, max_connections=1
        )
        server.on_conn_state(lambda local, remote, state: states.append((local, state)))
        server.on_server_info(info.append)
        await server.start_serving()
        async with server:
            for n in range(3):
                assert await roundtrip(sock_path, b"x" * (n + 1)) == b"x" * (n + 1)
            assert server.open_connections == 0
        return server

    server = arun(main)
    assert server.stats() == {
        "accepted": 3, "rejected": 0, "closed": 3, "open": 0, "bytes_in": 6, "bytes_out": 6, "errors": 0, "denied": 0,
    }  # fmt: skip
    assert states == [(sock_path, ConnState.NEW), (sock_path, ConnState.CLOSE)] * 3
    assert info == [
        f"starting listening socket 'unix {sock_path}'",
        f"closing listen socket 'unix {sock_path}'",
    ]


def test_fds_released_after_close(sock_path: str) -> None:
    async def main() -> None:
        before = open_fds()
        for _ in range(3):
            server = await ua.start_unix_server(stream_echo, sock_path)
            assert await roundtrip(sock_path, b"fd") == b"fd"
            server.close()
            await server.wait_closed()
            await asyncio.sleep(0)  # the C loop's fds go on the next turn of the loop
        assert open_fds() == before

    arun(main)


# ---------------------------------------------------------------- uvloop


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")
def test_hosted_on_uvloop(sock_path: str) -> None:
    import uvloop

    data = payload(1024 * 1024)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, uvloop.Loop)
        server = await asyncio.start_unix_server(stream_echo, sock_path, limit=4096)
        assert isinstance(server, ua.UnixServer)
        async with server:
            assert sha(await roundtrip(sock_path, data)) == sha(data)
            assert await roundtrip(sock_path, b"uvloop") == b"uvloop"
            assert server.stats()["accepted"] == 2

    arun(main, lambda: ua.new_event_loop(uvloop.Loop))


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")
def test_idle_timeout_on_uvloop(sock_path: str) -> None:
    import uvloop

    async def main() -> None:
        server = await ua.create_unix_server(Echo, sock_path, idle_timeout=0.1)
        async with server:
            reader, writer = await asyncio.open_unix_connection(sock_path)
            assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
            writer.close()

    arun(main, lambda: ua.new_event_loop(uvloop.Loop))


def test_transport_methods_refuse_other_threads(sock_path: str) -> None:
    """_check_thread accepts the host loop's thread and refuses others."""
    transports: list[Any] = []

    class Keep(Echo):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            transports.append(transport)

    async def main() -> None:
        server = await ua.create_unix_server(Keep, sock_path)
        async with server:
            reader, writer = await asyncio.open_unix_connection(sock_path)
            writer.write(b"a")
            assert await reader.readexactly(1) == b"a"
            errors: list[BaseException] = []

            def other() -> None:
                t = transports[0]
                for call in (
                    lambda: t.write(b"no"),
                    t.get_protocol,
                    lambda: t.set_protocol(Echo()),
                    lambda: t.get_extra_info("socket"),
                ):
                    try:
                        call()
                    except RuntimeError as exc:
                        errors.append(exc)
                names.append(t.get_extra_info("sockname"))  # fixed at accept: any thread

            names: list[Any] = []
            await asyncio.get_running_loop().run_in_executor(None, other)
            assert len(errors) == 4 and all("loop thread" in str(e) for e in errors)
            assert names == [sock_path] and isinstance(transports[0].get_protocol(), Keep)
            transports[0].write(b"b")  # this thread is the loop's
            assert await reader.readexactly(1) == b"b"
            writer.close()
            await writer.wait_closed()

    arun(main)


def test_write_after_close_follows_asyncio(sock_path: str) -> None:
    """Hosted, a transport takes writes after close() while it still flushes
    (they go out before the close) and drops them afterwards, as asyncio's
    transports do; the standalone Server's raise ServerClosedError instead."""
    big = payload(2 * 1024 * 1024)
    late: list[Any] = []

    class CloseThenWrite(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            transport.write(big)  # type: ignore[attr-defined]
            transport.close()
            transport.write(b"tail")  # type: ignore[attr-defined]

        def connection_lost(self, exc: BaseException | None) -> None:
            late.append(self.transport.write(b"dropped"))

    async def main() -> None:
        server = await ua.create_unix_server(CloseThenWrite, sock_path)
        async with server:
            reader, writer = await asyncio.open_unix_connection(sock_path)
            got = await asyncio.wait_for(reader.read(), DEADLINE)
            writer.close()
            assert sha(got) == sha(big + b"tail")
            await until(lambda: late == [None])

    arun(main)


def test_close_after_the_loop_closed(sock_path: str) -> None:
    """As with asyncio's servers, close() still works once the loop is closed
    (a cleanup that runs late): the socket file and the fds go."""
    before = open_fds()

    async def main() -> ua.UnixServer:
        return await ua.create_unix_server(Echo, sock_path)

    server = arun(main)
    server.close()
    assert not os.path.exists(sock_path) and server.sockets == ()
    assert open_fds() == before


# A hosted server in a child process (argv: path): records what reaches the
# loop's exception handler, prints "ready", serves until stdin closes, then
# prints those exceptions as JSON (type and errno).
_HOSTED_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    import unixsrv.asyncio as ua

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
        def data_received(self, data):
            self.transport.write(data)

    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        loop.set_exception_handler(lambda loop, ctx: seen.append(ctx.get("exception")))
        server = await ua.create_unix_server(Echo, sys.argv[1])
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        server.close()
        print(json.dumps([[type(e).__name__, getattr(e, "errno", None)] for e in seen]), flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.linux("strace (system-call error injection)")
def test_accept_back_off_runs_on_the_loops_timers(
    sock_path: str, run_traced: Callable[..., Any]
) -> None:
    """accept4 failing with EMFILE five times in a row: the hosted server
    reports it once to the loop's exception handler, stops polling the
    listener and resumes from a loop timer (call_at) - every client is served."""
    proc = run_traced(["-e", "inject=accept4:error=EMFILE:when=1..5"], _HOSTED_CHILD, sock_path)
    assert read_line(proc) == "ready"
    for i in range(4):
        echo_once(sock_path, b"client %d" % i)
    code, out, err = finish(proc)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == [["OSError", errno.EMFILE]]


@pytest.mark.skipif(
    sys.version_info < (3, 13),
    reason="Server.close_clients()/abort_clients() are new in Python 3.13",
)
def test_close_clients_and_abort_clients(sock_path: str) -> None:
    async def main() -> None:
        server = await ua.create_unix_server(Hoarder, sock_path)
        clients = [await asyncio.open_unix_connection(sock_path) for _ in range(2)]
        await until(lambda: len(server._clients) == 2)
        server.close()
        server.abort_clients()  # output still queued (the clients do not read): dropped
        await asyncio.wait_for(server.wait_closed(), DEADLINE)
        assert server.open_connections == 0 and server.stats()["closed"] == 2
        for _, writer in clients:
            writer.close()

        echo = await ua.create_unix_server(Echo, sock_path)
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        echo.close()
        echo.close_clients()
        assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
        await asyncio.wait_for(echo.wait_closed(), DEADLINE)
        writer.close()

    arun(main)


def test_hosted_on_a_loop_in_another_thread(sock_path: str) -> None:
    """The loop thread is whichever thread runs the host loop (not the main one)."""

    async def main() -> tuple[bytes, int, int]:
        server = await ua.start_unix_server(stream_echo, sock_path)
        async with server:
            answer = await roundtrip(sock_path, b"thread")
            return answer, server.stats()["accepted"], threading.get_ident()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer, accepted, ident = pool.submit(arun, main).result(3 * DEADLINE)
    assert (answer, accepted) == (b"thread", 1) and ident != threading.get_ident()


def test_access_control_and_inherited_fd_apply_when_hosted(sock_path: str) -> None:
    """The config's allow-lists are checked in C at accept (a denied peer
    never reaches the protocol, counted in 'denied'); config.fd (an inherited
    listening socket, systemd) is served and its file left alone."""
    built: list[Any] = []

    def factory() -> Echo:
        built.append(1)
        return Echo()

    async def main() -> None:
        denying = await ua.create_unix_server(factory, sock_path, allowed_uids=[os.getuid() + 1])
        async with denying:
            reader, writer = await asyncio.open_unix_connection(sock_path)
            assert await asyncio.wait_for(reader.read(), DEADLINE) == b""  # closed at accept
            writer.close()
            await until(lambda: denying.stats()["denied"] == 1)
        assert built == [] and denying.stats()["accepted"] == 0

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as inherited:
            inherited.bind(sock_path)
            inherited.listen()
            before = os.stat(sock_path)
            server = await ua.create_unix_server(
                factory, config=ServerConfig(path=sock_path, fd=inherited.fileno())
            )
            async with server:
                assert await roundtrip(sock_path, b"fd") == b"fd"
            after = os.stat(sock_path)
            assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode) and built == [1]

    arun(main)


def test_authorize_runs_at_accept_when_hosted(sock_path: str) -> None:
    """authorize= (as on Server) runs at accept after the allow-lists: False
    or an exception denies before any protocol exists (the exception goes to
    on_error); True admits; a non-callable is refused up front."""
    built: list[Any] = []
    seen: list[Any] = []
    errors: list[BaseException] = []

    def factory() -> Echo:
        built.append(1)
        return Echo()

    def refuse(peer: Any) -> bool:
        seen.append(peer)
        return False

    def explode(peer: Any) -> bool:
        raise LookupError("policy store unreachable")

    async def main() -> None:
        for policy, denied in ((refuse, 1), (explode, 1), (lambda peer: True, 0)):
            server = await ua.create_unix_server(factory, sock_path, authorize=policy)
            server.on_error(errors.append)
            async with server:
                if denied:
                    reader, writer = await asyncio.open_unix_connection(sock_path)
                    assert (
                        await asyncio.wait_for(reader.read(), DEADLINE) == b""
                    )  # closed at accept
                    writer.close()
                    await until(lambda s=server: s.stats()["denied"] == 1)
                    assert server.stats()["accepted"] == 0
                else:
                    assert await roundtrip(sock_path, b"in") == b"in"
                    assert server.stats()["denied"] == 0
        with pytest.raises(InvalidHandlerError):
            await ua.create_unix_server(factory, sock_path, authorize="yes")

    arun(main)
    assert built == [1]
    assert [p.uid for p in seen] == [os.getuid()]
    assert [type(e) for e in errors] == [LookupError]
