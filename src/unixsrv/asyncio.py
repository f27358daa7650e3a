"""unixsrv.asyncio: unixsrv's C core on the caller's own asyncio (or uvloop) loop.

A drop-in for ``loop.create_unix_server`` and ``asyncio.start_unix_server``::

    server = await unixsrv.asyncio.create_unix_server(MyProtocol, "/run/app.sock", mode=0o660)
    server = await unixsrv.asyncio.start_unix_server(handle_client, "/run/app.sock")

or, for code that calls ``loop.create_unix_server`` itself (aiohttp's
``UnixSite``, uvicorn's ``--uds``), a loop whose ``create_unix_server`` is
this one::

    unixsrv.asyncio.run(main())                    # asyncio.run on such a loop
    loop = unixsrv.asyncio.new_event_loop()        # or uvloop: base=uvloop.Loop

How it runs: the server's C loop (listener, poller, connection table,
counters, socket-file handling: the same one ``unixsrv.Server`` uses) is
hosted by the running event loop.  Its poller fd is watched with
``loop.add_reader``; each readiness runs one non-blocking pass of the C loop
(accept, receive and send without the GIL, then one dispatch of the protocol
callbacks), and its timers (idle timeout sweep, accept back-off) are
``loop.call_at`` timers.  Protocol callbacks therefore run on the event loop's
own thread: ``asyncio.get_running_loop()``, tasks, timers, futures and
streams work inside them as on asyncio.

On every core: :func:`prefork_server` returns a :class:`unixsrv.Server`
that serves a protocol factory from N pre-forked worker processes, each
running the protocols on an asyncio loop of its own thread (the same
supervisor, listener and counters as ``Server(..., workers=N)``)::

    server = unixsrv.asyncio.prefork_server(MyProtocol, ServerConfig(path=...), workers="auto")
    server.serve_forever()                         # reload(), shutdown(), stats() ...

What differs from asyncio's own server:

* the socket file is created the unixsrv way (mode and group applied before
  anyone can connect, a live server never replaced, a stale socket removed,
  the file removed at close only if it is still ours), so the socket listens
  from the moment the call returns, also with ``start_serving=False`` (it
  accepts only once serving starts);
* ``sock=`` adopts a bound socket and never changes its mode; its file is
  removed at close only where asyncio does that too (Python 3.13+, with
  ``cleanup_socket=True``, and only if it is still the same file);
* a callback exception goes to ``on_error`` if one is registered, else to
  ``loop.call_exception_handler()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import sys
import threading
import weakref
from asyncio import base_events, sslproto
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, cast

from . import _core
from .config import ServerConfig
from .errors import (
    AddressInUseError,
    InvalidHandlerError,
    ServerClosedError,
    ShutdownTimeoutError,
)
from .peer import PeerCredentials
from .server import CallbackHost, Server, _adopt_inherited, _check_timeout, _listener_args

if TYPE_CHECKING:
    import ssl as _ssl

__all__ = [
    "UnixServer",
    "create_unix_server",
    "loop_class",
    "new_event_loop",
    "prefork_server",
    "run",
    "start_unix_server",
]

logger = logging.getLogger("unixsrv.asyncio")

_T = TypeVar("_T")
ProtocolFactory = Callable[[], asyncio.BaseProtocol]
ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], "Awaitable[None] | None"]


class UnixServer(CallbackHost, base_events.Server):
    """The ``asyncio.Server`` that :func:`create_unix_server` returns.

    It is an ``asyncio.base_events.Server`` (the class asyncio's own unix
    servers are) with the same public surface and the same private state
    (``_sockets``, ``_waiters``, ``_serving``, the connection count or
    ``_clients``), so code and tests written against asyncio see no
    difference; plus unixsrv's ``await shutdown(timeout)``, ``stats()``,
    ``path``, ``open_connections`` and the ``on_error`` / ``on_conn_state`` /
    ``on_server_info`` callbacks.  Create it with :func:`create_unix_server`.
    (``close_clients()`` / ``abort_clients()`` are asyncio's, from 3.13 on.)
    """

    # asyncio.base_events.Server's private state, set by its __init__ and
    # kept with the same meaning here (typeshed leaves it out).
    _loop: asyncio.AbstractEventLoop
    _sockets: list[socket.socket] | None
    _backlog: int
    _serving: bool
    _serving_forever_fut: asyncio.Future[None] | None
    _active_count: int  # Python < 3.13
    _clients: weakref.WeakSet[asyncio.BaseTransport]  # Python 3.13+

    if TYPE_CHECKING:

        def _wakeup(self) -> None: ...

        if sys.version_info >= (3, 13):

            def _attach(self, transport: asyncio.BaseTransport) -> None: ...
            def _detach(self, transport: asyncio.BaseTransport) -> None: ...

        else:

            def _attach(self) -> None: ...
            def _detach(self) -> None: ...

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol_factory: ProtocolFactory,
        config: ServerConfig,
        ssl: _ssl.SSLContext | None,
        ssl_handshake_timeout: float | None,
        ssl_shutdown_timeout: float | None,
        stats: _core.Stats | None = None,
    ) -> None:
        if sys.version_info >= (3, 11):
            super().__init__(
                loop,
                [],
                protocol_factory,
                ssl,
                config.backlog,
                ssl_handshake_timeout,
                ssl_shutdown_timeout,
            )
        else:
            super().__init__(loop, [], protocol_factory, ssl, config.backlog, ssl_handshake_timeout)
        self._init_callbacks()
        if stats is not None:  # a pre-fork worker's slot of the shared counters
            self._stats = stats
        self._config = config
        self._authorize: Callable[[PeerCredentials], bool] | None = None
        self._path = config.display_path
        self._adopted: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._polling = False
        self._drained: asyncio.Future[None] | None = None
        factory = protocol_factory
        if ssl is not None:
            factory = _ssl_protocol_factory(
                loop, protocol_factory, ssl, ssl_handshake_timeout, ssl_shutdown_timeout
            )
        core: _core.Loop | None = self._new_loop(config, factory)
        self._core = core

    def __repr__(self) -> str:
        return f"<unixsrv.asyncio.UnixServer {self._path!r} sockets={self.sockets!r}>"

    # ------------------------------------------------------------------ set-up

    def _open(self, cleanup_socket: bool, shared: int | None = None) -> None:
        """Create the listener the unixsrv way (see unixsrv.Server), or serve
        the inherited one of ``config.fd`` (systemd; never unlinked), or the
        parent's listener ``shared`` in a pre-fork worker (never unlinked)."""
        cfg = self._config
        core = self._live_core()
        self._set_access(core)
        if shared is not None:
            _adopt_inherited(core, cfg, shared)
            core.share_listener()
        elif cfg.fd is not None:
            _adopt_inherited(core, cfg, cfg.fd)
        else:
            args = _listener_args(cfg)
            if not cleanup_socket:
                args["unlink_path"] = None
            try:
                core.open(backlog=cfg.backlog, **args)
            except AddressInUseError as exc:
                # asyncio's wording, which callers match on.
                exc.strerror = f"Address {exc.filename!r} is already in use ({exc.reason})"
                raise
        self._host(core)
        self._sockets = [_core.named_socket(os.dup(core.listen_fileno), core.sockname)]

    def _adopt(self, sock: socket.socket, cleanup_socket: bool) -> None:
        """Serve a socket the caller bound; asyncio's checks and its cleanup rule."""
        core = self._live_core()
        name = sock.getsockname()
        unlink_path = None
        dev = ino = 0
        # asyncio removes an adopted socket's file at close from 3.13 on (if
        # it is still the same file); earlier versions never do.
        if sys.version_info >= (3, 13) and cleanup_socket and isinstance(name, str) and name:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(name)
                unlink_path, dev, ino = (
                    os.fsencode(os.path.abspath(name)),
                    st.st_dev,
                    st.st_ino,
                )
        sock.setblocking(False)
        self._set_access(core)
        core.adopt(os.dup(sock.fileno()), name, self._path, unlink_path, dev, ino)
        self._host(core)
        self._adopted = sock
        self._sockets = [sock]

    def _host(self, core: _core.Loop) -> None:
        core.host(self._kick, self._set_timer)
        core.on_attach = self._attach_transport
        core.on_detach = self._detach_transport

    def _set_access(self, core: _core.Loop) -> None:
        """The config's allow-lists and per-uid limit, checked in C at accept (as Server)."""
        cfg = self._config
        core.set_access(
            cfg.allowed_uids, cfg.allowed_gids, cfg.max_connections_per_uid or 0, self._authorize
        )

    def _live_core(self) -> _core.Loop:
        core = self._core
        if core is None:
            raise RuntimeError(f"{self!r} is closed")
        return core

    # ------------------------------------------------------------------ asyncio.Server

    @property
    def path(self) -> str:
        """The socket path (``@name`` for a Linux abstract name)."""
        return self._path

    def _start_serving(self) -> None:
        if self._serving or self._sockets is None:
            return
        self._serving = True
        if self._adopted is not None:
            self._adopted.listen(
                self._backlog
            )  # as asyncio: an adopted socket listens once serving starts
        core = self._live_core()
        if not self._polling:
            # The C method itself is the reader callback: no Python frame per pass.
            self._loop.add_reader(core.fileno, core.run_once)
            self._polling = True
        self._info(f"starting listening socket 'unix {self._path}'")

    def close(self) -> None:
        """Stop listening and remove the socket file (if it is still ours and
        ``cleanup_socket`` was true); connections already accepted go on.
        ``wait_closed()`` waits for them."""
        sockets = self._sockets
        if sockets is None:
            return
        self._sockets = None
        core = self._core
        try:
            if core is not None and core.stop_accepting():
                self._info(f"closing listen socket 'unix {self._path}'")
        finally:
            for sock in sockets:
                sock.close()
        self._serving = False
        fut = self._serving_forever_fut
        if fut is not None and not fut.done():
            fut.cancel()
            self._serving_forever_fut = None
        if self._client_count() == 0:
            self._wakeup()
        self._release_when_idle()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop gracefully: close the listener (and the socket file) at once,
        then every connection stops reading, flushes its output and closes.
        Connections still open after ``timeout`` seconds are aborted and
        ShutdownTimeoutError is raised.  Idempotent."""
        seconds = _check_timeout(timeout)
        self.close()
        core = self._core
        if core is None or self.open_connections == 0:
            return
        core.begin_drain()
        drained = self._drained_future()
        try:
            await asyncio.wait_for(
                asyncio.shield(drained), None if math.isinf(seconds) else seconds
            )
            return
        except asyncio.TimeoutError:
            left = self.open_connections
        if self._core is not None:
            self._core.abort_all()
        await drained  # aborting finalizes in the next pass
        raise ShutdownTimeoutError(
            f"{left} connection(s) still open after {timeout:g} s of graceful shutdown were aborted"
        )

    # ------------------------------------------------------------------ the hosted C loop

    def _on_timer(self) -> None:
        self._timer = None
        core = self._core
        if core is not None:
            core.run_once(True)

    def _set_timer(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._loop.time() + delay, self._on_timer)

    def _kick(self) -> None:
        core = self._core
        if core is not None:
            self._loop.call_soon(core.run_once)

    def _attach_transport(self, transport: asyncio.Transport) -> bool:
        if self._sockets is None:
            # Accepted in the same pass that close() ran in (from a callback).
            self._loop.call_soon(self._after_connection)
            return False
        if sys.version_info >= (3, 13):
            self._attach(transport)
        else:
            self._attach()
        return True

    def _detach_transport(self, transport: asyncio.Transport) -> None:
        if sys.version_info >= (3, 13):
            self._detach(transport)
        else:
            self._detach()
        self._after_connection()

    def _after_connection(self) -> None:
        if self.open_connections == 0:
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
            self._release_when_idle()

    def _client_count(self) -> int:
        if sys.version_info >= (3, 13):
            return len(self._clients)
        return self._active_count

    def _drained_future(self) -> asyncio.Future[None]:
        if self._drained is None or self._drained.done():
            self._drained = self._loop.create_future()
        if self.open_connections == 0:
            self._drained.set_result(None)
        return self._drained

    def _release_when_idle(self) -> None:
        """Once closed with no connection left, the C loop's fds go (not in
        the middle of its own dispatch: on the next turn of the host loop)."""
        if self._sockets is None and self.open_connections == 0 and self._core is not None:
            if self._loop.is_closed():
                self._release()  # nothing runs any more (asyncio's close() works then too)
            else:
                self._loop.call_soon(self._release)

    def _release(self) -> None:
        core = self._core
        if core is None or self._sockets is not None or self.open_connections:
            return
        self._core = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._polling:
            self._polling = False
            if not self._loop.is_closed():
                self._loop.remove_reader(core.fileno)
        core.teardown()

    # ------------------------------------------------------------------ reporting

    def _unreported(self, exc: BaseException, level: int) -> None:
        """No on_error: to the event loop's exception handler, as asyncio
        reports a protocol's errors (peer resets stay DEBUG log records)."""
        if level < logging.WARNING:
            logger.log(level, "unixsrv %s: %s", self._path, exc)
            return
        self._loop.call_exception_handler(
            {
                "message": f"unixsrv {self._path}: unhandled error while serving",
                "exception": exc,
                "server": self,
            }
        )


class _HostedServer:
    """A protocol factory served by a :class:`UnixServer` on an asyncio
    event loop run by a thread of its own, behind blocking calls like a
    Server's (start, shutdown, close, wait, stats, path, open_connections,
    on_server_info): ``unixsrv serve --protocol``, and each worker process
    of :func:`prefork_server` (a :class:`unixsrv.prefork.PreforkWorker`,
    serving the parent's listener ``shared`` and counting into ``stats``).
    Protocol callbacks run on that loop's thread with the loop running, so
    a protocol may use ``asyncio.get_running_loop()``, tasks, timers and
    futures.

    Stops are ``UnixServer.shutdown(timeout)`` (``close()``: a timeout of 0,
    what is left is aborted).  The loop stops when the last stop call in
    progress has returned, never while one still waits for its result, and
    takes no call after that.
    """

    def __init__(
        self,
        config: ServerConfig,
        factory: Any,
        what: str,
        authorize: Callable[[PeerCredentials], bool] | None,
        *,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
        shared: tuple[_core.Stats, int] | None = None,
        parent: CallbackHost | None = None,
    ) -> None:
        if not callable(factory):
            raise InvalidHandlerError(
                f"{what} is not a protocol factory (not callable): {factory!r}"
            )
        self._config = config
        self._factory = factory
        self._authorize = authorize
        self._info: Callable[[str], object] | None = None
        self._server: UnixServer | None = None
        self._shared = shared
        self._parent = parent
        self._loop = (loop_factory or new_event_loop)()
        self._thread = threading.Thread(
            target=self._run_loop, name="unixsrv asyncio loop", daemon=True
        )
        self._lock = threading.Lock()
        self._stopping = 0  # stop calls waiting for their result
        self._done = False  # the loop was told to stop

    @property
    def path(self) -> str:
        return self._config.display_path

    @property
    def open_connections(self) -> int:
        return 0 if self._server is None else self._server.open_connections

    def on_server_info(self, fn: Callable[[str], object]) -> None:
        self._info = fn

    def stats(self) -> dict[str, int]:
        return {} if self._server is None else self._server.stats()

    def start(self) -> None:
        """Create the server on the loop and start serving; a failure (the
        address in use, ...) stops the loop and is raised here."""
        self._thread.start()
        try:
            self._call(self._open())
        except BaseException:
            self._stop_loop()
            self._thread.join()
            raise

    async def _open(self) -> None:
        if self._shared is None:
            server = await create_unix_server(
                self._factory, config=self._config, start_serving=False, authorize=self._authorize
            )
        else:
            stats, listen_fd = self._shared
            server = UnixServer(
                self._loop, self._factory, self._config, None, None, None, stats=stats
            )
            server._authorize = self._authorize
            server._open(True, shared=listen_fd)
        if (
            self._parent is not None
        ):  # its error and state callbacks; lifecycle messages are its own
            server._info_level = logging.DEBUG
            server.on_error(self._parent._callbacks.on_error)
            server.on_conn_state(self._parent._callbacks.on_conn_state)
        if self._info is not None:
            server.on_server_info(self._info)
        self._server = server
        await server.start_serving()

    def stop_accepting(self) -> None:
        """Close the listener (asyncio's ``Server.close()``; connections go
        on); return once what already arrived on them has been dispatched."""
        with self._lock:
            server = None if self._done else self._server
        if server is None:
            raise ServerClosedError("the server is not running")
        self._call(_stop_accepting(server))

    def shutdown(self, timeout: float) -> None:
        """Graceful stop; ShutdownTimeoutError once what was left got aborted."""
        with self._lock:
            if self._done or self._server is None:
                return
            self._stopping += 1
            server = self._server
        try:
            self._call(server.shutdown(timeout))
        finally:
            with self._lock:
                self._stopping -= 1
                if self._stopping == 0:
                    self._stop_loop_locked()

    def close(self) -> None:
        """Stop now: every connection still open is aborted."""
        with contextlib.suppress(ShutdownTimeoutError):
            self.shutdown(0.0)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the loop has ended; True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        with self._lock:
            self._stop_loop_locked()

    def _stop_loop_locked(self) -> None:
        if not self._done:
            self._done = True
            self._loop.call_soon_threadsafe(self._loop.stop)

    def _run_loop(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # What the protocols left running ends with the loop, as in asyncio.run().
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


async def _stop_accepting(server: UnixServer) -> None:
    server.close()
    # The C loop runs as a reader callback of this loop: the first turn
    # polls and queues it after this coroutine, the second runs after it,
    # so what was readable when the listener closed has been dispatched.
    for _ in range(2):
        await asyncio.sleep(0)


def prefork_server(
    protocol_factory: ProtocolFactory,
    config: ServerConfig,
    *,
    workers: int | str,
    authorize: Callable[[PeerCredentials], bool] | None = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> Server:
    """A :class:`unixsrv.Server` (not started) that serves
    ``protocol_factory`` from ``workers`` pre-forked processes (an int, or
    ``"auto"``: one per CPU), each running the protocols on an asyncio event
    loop of its own thread made by ``loop_factory()`` (default
    :func:`new_event_loop`; ``uvloop.new_event_loop`` works), so protocols
    may use tasks, timers, futures and ``asyncio.get_running_loop()``.

    The parent binds the socket once and supervises the workers as for
    ``Server(config, protocol=..., workers=N)`` (see :mod:`unixsrv.prefork`):
    ``start()`` / ``serve_forever()``, ``shutdown(timeout)``, ``reload()``,
    ``stats()`` summed over the workers, ``worker_stats()``; ``on_error``
    and ``on_conn_state`` registered before the start run in the workers.
    Call it from synchronous code (the parent runs no event loop): an
    application whose own code creates its server (aiohttp's ``UnixSite``,
    uvicorn) is not pre-forked this way.
    """
    server = Server(config, protocol=protocol_factory, authorize=authorize, workers=workers)
    assert server._prefork is not None

    def make_worker(stats: _core.Stats, listen_fd: int) -> _HostedServer:
        return _HostedServer(
            config,
            protocol_factory,
            repr(protocol_factory),
            authorize,
            loop_factory=loop_factory,
            shared=(stats, listen_fd),
            parent=server,
        )

    server._prefork.make_worker = make_worker
    return server


def _ssl_protocol_factory(
    loop: asyncio.AbstractEventLoop,
    app_factory: ProtocolFactory,
    context: _ssl.SSLContext,
    handshake_timeout: float | None,
    shutdown_timeout: float | None,
) -> ProtocolFactory:
    """Wrap each application protocol in asyncio's own SSLProtocol, as the
    selector event loop does for a server with ssl=."""

    def handshake_done(waiter: asyncio.Future[None]) -> None:
        # asyncio reports a failed handshake of an incoming connection only
        # in debug mode; the SSLProtocol has closed the transport already.
        exc = None if waiter.cancelled() else waiter.exception()
        if exc is not None and loop.get_debug():
            loop.call_exception_handler(
                {
                    "message": "Error on transport creation for incoming connection",
                    "exception": exc,
                }
            )

    def factory() -> asyncio.BaseProtocol:
        waiter: asyncio.Future[None] = loop.create_future()
        waiter.add_done_callback(handshake_done)
        app = app_factory()
        if sys.version_info >= (3, 11):
            return sslproto.SSLProtocol(
                loop,
                app,
                context,
                waiter,
                server_side=True,
                ssl_handshake_timeout=cast(
                    Any, handshake_timeout
                ),  # typeshed says int; asyncio takes seconds
                ssl_shutdown_timeout=cast(Any, shutdown_timeout),
            )
        return sslproto.SSLProtocol(
            loop,
            app,
            context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=cast(Any, handshake_timeout),
        )

    return factory


async def _create_unix_server(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: ProtocolFactory,
    path: Any,
    sock: socket.socket | None,
    backlog: int,
    ssl: _ssl.SSLContext | None,
    ssl_handshake_timeout: float | None,
    ssl_shutdown_timeout: float | None,
    start_serving: bool,
    cleanup_socket: bool,
    config: ServerConfig | None,
    config_fields: dict[str, Any],
) -> UnixServer:
    # asyncio's checks, in asyncio's order and words.
    if isinstance(ssl, bool):
        raise TypeError("ssl argument must be an SSLContext or None")
    if ssl_handshake_timeout is not None and not ssl:
        raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
    if ssl_shutdown_timeout is not None and not ssl:
        raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
    if sys.version_info < (3, 11) and ssl_shutdown_timeout is not None:
        raise TypeError("ssl_shutdown_timeout needs Python 3.11 or later")
    # authorize= is a Server argument, not a config field: the same policy
    # hook, run by the core at accept after the allow-lists.
    authorize = config_fields.pop("authorize", None)
    if authorize is not None and not callable(authorize):
        raise InvalidHandlerError(f"authorize must be callable, not {type(authorize).__name__}")
    if config is not None and config_fields:
        raise TypeError(
            f"give either config= or ServerConfig fields, not both: {sorted(config_fields)}"
        )
    if path is not None:
        if sock is not None:
            raise ValueError("path and sock can not be specified at the same time")
    elif sock is None:
        if config is None:
            raise ValueError("path was not specified, and no sock specified")
        path = config.path
    else:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
        if "mode" in config_fields or "group" in config_fields:
            raise ValueError(
                "mode and group do not apply to an adopted socket (sock=): unixsrv never chmods it"
            )
        path = sock.getsockname()
        if not path:
            raise ValueError(f"the socket passed as sock= is not bound: {sock!r}")
    cfg = _config_for(path, backlog, sock is not None, config, config_fields)
    running = asyncio.get_running_loop()
    if running is not loop:
        raise RuntimeError(f"create_unix_server() of {loop!r} called while {running!r} runs")
    server = UnixServer(
        loop, protocol_factory, cfg, ssl, ssl_handshake_timeout, ssl_shutdown_timeout
    )
    server._authorize = authorize
    if sock is not None:
        server._adopt(sock, cleanup_socket)
    else:
        server._open(cleanup_socket)
    if start_serving:
        server._start_serving()
        await asyncio.sleep(0)  # as asyncio: one loop turn, so the reader is registered
    return server


def _config_for(
    path: Any,
    backlog: int,
    adopted: bool,
    config: ServerConfig | None,
    fields: dict[str, Any],
) -> ServerConfig:
    if config is None:
        return ServerConfig(path=path, backlog=backlog, **fields)
    if adopted or os.fspath(path) != os.fspath(config.path):
        # The path of an adopted socket is the socket's, and it is never chmod-ed.
        values = {
            f: getattr(config, f)
            for f in config.__dataclass_fields__
            if f not in ("path", "mode", "group")
        }
        if not adopted:
            values.update(mode=config.mode, group=config.group)
        return ServerConfig(path=path, **values)
    return config


async def create_unix_server(
    protocol_factory: ProtocolFactory,
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None = None,
    *,
    sock: socket.socket | None = None,
    backlog: int = 100,
    ssl: _ssl.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    start_serving: bool = True,
    cleanup_socket: bool = True,
    config: ServerConfig | None = None,
    **config_fields: Any,
) -> UnixServer:
    """``loop.create_unix_server`` on the running loop, served by unixsrv.

    The arguments are asyncio's (``cleanup_socket`` is accepted on every
    Python version) plus unixsrv's: a whole ``config=ServerConfig(...)`` or its
    fields as keywords (``mode``, ``group``, ``idle_timeout``,
    ``max_connections``, buffer sizes ...), and ``authorize=fn`` as on
    :class:`unixsrv.Server` (``fn(peer) -> bool``, run at accept after the
    allow-lists).  With ``config=``, its backlog applies and ``path`` may be
    left out.
    """
    return await _create_unix_server(
        asyncio.get_running_loop(),
        protocol_factory,
        path,
        sock,
        backlog,
        ssl,
        ssl_handshake_timeout,
        ssl_shutdown_timeout,
        start_serving,
        cleanup_socket,
        config,
        config_fields,
    )


async def start_unix_server(
    client_connected_cb: ClientConnected,
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None = None,
    *,
    limit: int = 2**16,
    **kwds: Any,
) -> UnixServer:
    """``asyncio.start_unix_server`` served by unixsrv: each client gets a
    ``(StreamReader, StreamWriter)`` pair; the keywords are
    :func:`create_unix_server`'s."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.BaseProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_unix_server(factory, path, **kwds)


async def _loop_create_unix_server(
    self: asyncio.AbstractEventLoop,
    protocol_factory: ProtocolFactory,
    path: Any = None,
    *,
    sock: socket.socket | None = None,
    backlog: int = 100,
    ssl: _ssl.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    start_serving: bool = True,
    cleanup_socket: bool = True,
    config: ServerConfig | None = None,
    **config_fields: Any,
) -> UnixServer:
    """The event loop method: the same as :func:`create_unix_server`."""
    return await _create_unix_server(
        self,
        protocol_factory,
        path,
        sock,
        backlog,
        ssl,
        ssl_handshake_timeout,
        ssl_shutdown_timeout,
        start_serving,
        cleanup_socket,
        config,
        config_fields,
    )


class _HostingLoop:
    """What the loop classes of :func:`new_event_loop` add to their base."""

    create_unix_server = _loop_create_unix_server

    async def sendfile(
        self, transport: asyncio.WriteTransport, file: Any, offset: int = 0, count: int | None = None, *,
        fallback: bool = True,
    ) -> int:  # fmt: skip
        """A unixsrv transport has no sendfile: NotImplementedError, as uvloop's
        loops (and asyncio.AbstractEventLoop) answer, which callers such as
        aiohttp's FileResponse take as "write the data instead"; other
        transports get the base loop's sendfile."""
        if isinstance(transport, _core.Transport):
            raise NotImplementedError(
                "unixsrv transports have no sendfile(); write the file's data"
            )
        base_sendfile = cast(Any, super()).sendfile
        return cast(int, await base_sendfile(transport, file, offset, count, fallback=fallback))


_loop_classes: dict[type[asyncio.AbstractEventLoop], type[asyncio.AbstractEventLoop]] = {}


def loop_class(
    base: type[asyncio.AbstractEventLoop] | None = None,
) -> type[asyncio.AbstractEventLoop]:
    """The subclass of ``base`` (default: asyncio's event loop class) whose
    ``create_unix_server`` is unixsrv's (one class per base)."""
    if base is None:
        base = asyncio.SelectorEventLoop
    cls = _loop_classes.get(base)
    if cls is None:
        doc = f"{base.__qualname__} serving Unix sockets with unixsrv."
        cls = type(
            f"UnixSrv{base.__name__}",
            (_HostingLoop, base),
            {"__module__": __name__, "__doc__": doc},
        )
        _loop_classes[base] = cls
    return cls


def new_event_loop(
    base: type[asyncio.AbstractEventLoop] | None = None,
) -> asyncio.AbstractEventLoop:
    """A new event loop of class ``base`` (asyncio's default loop class when
    None; ``uvloop.Loop`` works) whose ``create_unix_server`` - and so
    ``asyncio.start_unix_server``, aiohttp's ``UnixSite``, uvicorn's
    ``--uds`` - is unixsrv's."""
    return loop_class(base)()


def run(main: Coroutine[Any, Any, _T], *, debug: bool | None = None) -> _T:
    """``asyncio.run(main)`` on a :func:`new_event_loop` loop (like ``uvloop.run``)."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(debug=debug, loop_factory=new_event_loop) as runner:
            return runner.run(main)
    # Python 3.10's asyncio.run() takes its loop from the policy.
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_Policy())
    try:
        return asyncio.run(main, debug=debug)
    finally:
        asyncio.set_event_loop_policy(previous)


class _Policy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return new_event_loop()
