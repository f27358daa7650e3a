"""unixsrv.socketserver: the standard library's socketserver API, unixsrv underneath.

Change one import and keep the server code::

    from unixsrv.socketserver import ThreadingUnixStreamServer, StreamRequestHandler

    class Echo(StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line)

    with ThreadingUnixStreamServer("/tmp/echo.sock", Echo) as server:
        server.serve_forever()

The classes behave as the running Python's ``socketserver`` documents them
(constructor, ``server_bind``/``server_activate``, ``serve_forever``,
``shutdown``, ``handle_request`` with ``timeout``, every hook, ``socket``,
``fileno()``, ``daemon_threads``, ``block_on_close``, context manager); the
handler's ``request`` is a connected ``socket.socket``.  Underneath, the C
core of :class:`unixsrv.Server` accepts (``max_connections``, counters),
times out idle connections and owns the socket file:

- the file gets its mode and group before anyone can connect (class
  attributes ``socket_mode`` / ``socket_group``, or ``config=ServerConfig``);
  without ``socket_mode`` it keeps the mode bind(2) gives, as in the stdlib;
- an existing live server at the path is never replaced, a stale socket is;
- ``server_close()`` removes the file if it is still ours;
- ``idle_timeout``: a request with no byte in or out for that long is shut
  down by the core (the handler's recv() returns b"", send() fails);
- ``stats()``: accepted, rejected, denied, closed, open, bytes in/out;
- with ``config=``, every ServerConfig field applies (the peer allow-lists
  and per-uid limits too: a denied peer never reaches get_request();
  ``authorize`` runs in get_request(), since the core hands connections
  over without taking the GIL).

``workers=N`` (keyword or class attribute; an int or ``"auto"``: one per
CPU) serves from N pre-forked processes: the parent binds the socket once
(``server_bind()``), ``serve_forever()`` forks the workers, each running
this server's own ``serve_forever`` on the shared listener, and supervises
them (see unixsrv.prefork: a worker that dies is replaced, ``shutdown()``
drains every worker, ``stats()`` sums them).  ``server.supervisor`` is the
parent's :class:`unixsrv.Server` (``reload()``, ``worker_stats()``,
``on_error``); a worker process sees ``None`` there.

``ThreadingMixIn`` runs requests on unixsrv's thread pool (threads are
reused) instead of a new thread per request; while ``serve_forever()``
runs, a worker that finished a request takes the next waiting connection
itself (``get_request()`` on that thread) unless the class overrides
``get_request``, ``verify_request`` or ``process_request``.  ``ForkingMixIn``, the request
handlers and the TCP and datagram classes are the stdlib's own, re-exported:
they already work as they are.

What differs: the core accepts from ``server_bind()`` on (mode and group are
set between bind and listen, and the file only appears then), connections
wait in unixsrv's queue rather than the kernel's backlog (the core queues
them in C without taking the GIL; the idle clock of a request starts when
get_request() takes it), and ``fileno()``
is the fd that is readable while a connection waits there (what
``serve_forever`` and ``handle_request`` wait on), not the listening
socket's.  ``server.socket`` is the listening socket; its timeout is what
``handle_request()`` honours, but the fd itself stays non-blocking (the core
accepts on it), so do not accept() on it yourself.  With ``ForkingMixIn``
the parent counts each connection (accepted, closed) but the bytes a child
moves are counted in the child, and the idle timeout does not follow a
request into its child.

This module uses absolute imports only, so that a test runner can load it
under the name ``socketserver`` (see tests/cpython_socketserver.py).
"""

from __future__ import annotations

import _socket
import _thread
import dataclasses
import errno
import logging
import os
import socket
import socketserver as _std
import sys
import threading
import time
import warnings
import weakref
from socketserver import (
    BaseRequestHandler,
    BaseServer,
    DatagramRequestHandler,
    StreamRequestHandler,
    TCPServer,
    ThreadingTCPServer,
    ThreadingUDPServer,
    ThreadingUnixDatagramServer,
    UDPServer,
    UnixDatagramServer,
)
from typing import Any

from unixsrv import _core
from unixsrv._core import Connection, Stats
from unixsrv.config import ServerConfig
from unixsrv.server import Server
from unixsrv.threadpool import ThreadPool, exit_forked_child

if hasattr(os, "fork"):
    from socketserver import ForkingMixIn, ForkingTCPServer, ForkingUDPServer

__all__ = [
    "BaseRequestHandler",
    "BaseServer",
    "DatagramRequestHandler",
    "StreamRequestHandler",
    "TCPServer",
    "ThreadingMixIn",
    "ThreadingTCPServer",
    "ThreadingUDPServer",
    "ThreadingUnixDatagramServer",
    "ThreadingUnixStreamServer",
    "UDPServer",
    "UnixDatagramServer",
    "UnixStreamServer",
]
if hasattr(os, "fork"):
    __all__ += [
        "ForkingMixIn",
        "ForkingTCPServer",
        "ForkingUDPServer",
        "ForkingUnixStreamServer",
    ]
    if hasattr(_std, "ForkingUnixDatagramServer"):  # Python 3.12+
        ForkingUnixDatagramServer = _std.ForkingUnixDatagramServer
        __all__ += ["ForkingUnixDatagramServer"]

logger = logging.getLogger("unixsrv.socketserver")

#: sendall() with an idle timeout sends in pieces of this size, each one
#: activity for the timeout (a big answer to a slow reader is not idle).
_SEND_PIECE = 65536


class _ListeningSocket(_core.NamedSocket):
    """``server.socket``: the listening socket the core accepts on.

    Its timeout is kept here, for handle_request(), without changing the
    fd: the listener is shared with the core's accept loop, which must never
    block in accept(2).
    """

    __slots__ = ("_timeout",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timeout = socket.getdefaulttimeout()

    def settimeout(self, value: float | None) -> None:
        if value is not None and value < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = None if value is None else float(value)

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0


class _RequestSocket(_core.NamedSocket):
    """The handler's ``request``: a connected socket.socket on a dup of the
    connection's fd.

    The core keeps its own fd of the connection, to shut it down at the idle
    timeout; the bytes moved here are reported to it (counters, idle
    clock): recv, recv_into, send and sendall, the hot path, in C
    (unixsrv/_request.pxi), as are shutdown and the close of the fd.  Closing (or detaching) this socket closes the
    connection for the core: counted once, its fd closed, never shut down,
    since a forked child may still be serving the socket through its copy.
    """

    __slots__ = ("_conn",)

    def __init__(self, *args: Any, name: Any = None, conn: Connection | None = None) -> None:
        super().__init__(*args)
        self._name = name  # what getsockname() says (NamedSocket)
        self._conn = conn

    recv = _core.request_recv
    recv_into = _core.request_recv_into
    send = _core.request_send
    sendall = _core.request_sendall
    shutdown = _core.request_shutdown

    def _note(self, n_in: int, n_out: int) -> None:
        conn = self._conn
        if conn is not None and (n_in or n_out):
            conn._activity(n_in, n_out)

    def recvfrom(self, bufsize: int, flags: int = 0) -> Any:
        result = _socket.socket.recvfrom(self, bufsize, flags)
        self._note(len(result[0]), 0)
        return result

    def recvfrom_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> Any:
        result = _socket.socket.recvfrom_into(self, buffer, nbytes, flags)
        self._note(result[0], 0)
        return result

    def recvmsg(self, *args: Any) -> Any:
        result = _socket.socket.recvmsg(self, *args)
        self._note(len(result[0]), 0)
        return result

    def recvmsg_into(self, *args: Any) -> Any:
        result = _socket.socket.recvmsg_into(self, *args)
        self._note(result[0], 0)
        return result

    def sendto(self, *args: Any) -> int:
        n = _socket.socket.sendto(self, *args)
        self._note(0, n)
        return n

    def sendmsg(self, *args: Any) -> int:
        n = _socket.socket.sendmsg(self, *args)
        self._note(0, n)
        return n

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        try:
            sent: int = self._sendfile_use_sendfile(file, offset, count)  # type: ignore[attr-defined]
        except socket._GiveupOnSendfile:  # type: ignore[attr-defined]
            # Through send(), which counts each block.
            return self._sendfile_use_send(file, offset, count)  # type: ignore[attr-defined,no-any-return]
        self._note(0, sent)
        return sent

    def detach(self) -> int:
        fd = super().detach()
        self._release()
        return fd

    def _real_close(self) -> None:
        try:
            _core.request_close_fd(self)
        finally:
            self._release()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn._finish(False)


class _PacedRequestSocket(_RequestSocket):
    """The request socket of a server with an idle timeout: a long write is
    reported as it goes, so an answer that a slow but steady reader takes
    longer than the timeout to drain is not cut off as idle."""

    __slots__ = ()

    def sendall(self, data: Any, flags: int = 0) -> None:
        # Piece by piece, each one activity.  The socket's timeout still
        # bounds the whole call, as it does sendall()'s.
        timeout = self.gettimeout()
        deadline = time.monotonic() + timeout if timeout else None
        with memoryview(data) as view, view.cast("B") as flat:
            try:
                for start in range(0, len(flat), _SEND_PIECE):
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError("timed out")
                        _socket.socket.settimeout(self, left)
                    piece = flat[start : start + _SEND_PIECE]
                    _socket.socket.sendall(self, piece, flags)
                    self._note(0, len(piece))
            finally:
                if deadline is not None:
                    _socket.socket.settimeout(self, timeout)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        # Through send(): each block is idle-timeout activity.
        return self._sendfile_use_send(file, offset, count)  # type: ignore[attr-defined,no-any-return]


class _Pending:
    """Accepted connections waiting for get_request(): the core's accept
    queue (Loop.queue_accepted), which the loop thread fills without taking
    the GIL, and a pipe that is readable exactly while one waits (what
    serve_forever's selector watches).  Taking the GIL for each accepted
    connection made the loop thread one more GIL contender per connect."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()  # close-on-exec (PEP 446)
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._loop: _core.Loop | None = None

    def attach(self, loop: _core.Loop) -> None:
        """Queue ``loop``'s accepted connections here (before it opens)."""
        loop.queue_accepted(self._r, self._w)
        self._loop = loop

    def fileno(self) -> int:
        return self._r

    def __len__(self) -> int:
        loop = self._loop
        return 0 if loop is None else loop.accepted_waiting

    def get(self) -> Connection:
        loop = self._loop
        conn = None if loop is None else loop.take_accepted()
        if conn is None:
            raise BlockingIOError(errno.EAGAIN, "no connection is waiting")
        return conn

    def close(self) -> None:
        """Close every waiting connection (clients see EOF), then the pipe."""
        loop, self._loop = self._loop, None
        if self._r < 0:
            return
        if loop is not None:
            loop.close_queue()  # the loop never touches the pipe after this
        os.close(self._r)
        os.close(self._w)
        self._r = self._w = -1


class _Acceptor(Server):
    """The C core of one socketserver server.

    A blocking-model Server whose "handler" is the hand-over to the request
    queue, called on the loop thread for each accepted connection instead of
    on a worker: the serving thread takes the connection with get_request().
    """

    _core_thread: threading.Thread | None = None

    def __init__(self, config: ServerConfig, pending: _Pending) -> None:
        # A blocking-model Server whose connections never reach its
        # handler (closing them) or thread pool: the core queues each one
        # for get_request() (Loop.queue_accepted, set in _new_loop).
        super().__init__(config, Connection._finish)
        self._pending = pending

    def _new_loop(self, cfg: ServerConfig, factory: Any, *args: Any) -> _core.Loop:
        loop = super()._new_loop(cfg, factory, *args)
        self._pending.attach(loop)
        return loop

    def start(self) -> None:
        super().start()
        self._core_thread = self._thread

    def close(self) -> None:
        """Stop now, and (unless called on it) join the loop thread: like the
        stdlib's thread joins, nothing of the server runs afterwards."""
        super().close()
        thread = self._core_thread
        if thread is not None and thread is not threading.current_thread() and not self._forked():
            thread.join()
            self._core_thread = None

    @property
    def listen_fileno(self) -> int:
        loop = self._loop
        return -1 if loop is None else loop.listen_fileno

    def stop_accepting(self) -> None:
        """Close the listener and remove the socket file if it is still
        ours; connections go on, and the core stops once the last one is
        closed (it keeps their idle timeouts until then)."""
        loop = self._loop
        if loop is None or self._forked():
            return
        done = threading.Event()

        def step() -> None:
            try:
                self._stop_accepting(loop)
            finally:
                done.set()

        if loop.on_loop_thread():
            step()
        elif loop.call_soon_threadsafe(step):
            # No user code runs on this loop (only the hand-over to the
            # queue), so the step comes promptly; a closed loop refuses it
            # and its teardown has closed the listener already.
            done.wait()
        loop.drain_waiting = True  # _notify_drained() when the last one closes
        if self.open_connections == 0:
            self.close()

    def _notify_drained(self) -> None:
        super()._notify_drained()
        self.close()


def _abandon(acceptor: Server, pending: _Pending | None, sock: socket.socket) -> None:
    """A server was garbage-collected (or the interpreter exits) without
    server_close(): close everything, with the ResourceWarning the stdlib's
    unclosed socket would give.  ``acceptor`` is the core, or with
    ``workers`` the supervisor (no queue in the parent: ``pending`` None)."""
    warnings.warn(f"unclosed server {acceptor.path!r}", ResourceWarning, stacklevel=1)
    sock.close()
    if pending is not None:
        pending.close()
    acceptor.close()


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status") as f:  # Linux >= 4.7
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    # Elsewhere only umask(2) reads it, by setting it: set the strictest
    # value meanwhile, so a file another thread creates now is never wider.
    mask = os.umask(0o777)
    os.umask(mask)
    return mask


class UnixStreamServer(_std.UnixStreamServer):
    """socketserver.UnixStreamServer on unixsrv's core (see the module doc).

    Class attributes (or instance attributes set before ``server_bind()``):
    ``socket_mode`` (int or ``"0660"``-style string; ``None`` keeps the mode
    bind(2) gives, 0o777 & ~umask), ``socket_group`` (gid or name),
    ``idle_timeout`` (seconds, ``None`` = off), ``max_connections``, and the
    stdlib's ``request_queue_size`` (the listen backlog).  Or pass
    ``config=ServerConfig(...)``: all of these come from it then (its path
    too, when ``server_address`` is None).
    """

    socket_mode: int | str | None = None
    socket_group: int | str | None = None
    idle_timeout: float | None = None
    max_connections: int | None = None
    workers: int | str | None = None
    supervisor: Server | None = None

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Any,
        bind_and_activate: bool = True,
        *,
        config: ServerConfig | None = None,
        workers: int | str | None = None,
    ) -> None:
        if config is not None and not isinstance(config, ServerConfig):
            raise TypeError(f"config must be a ServerConfig, not {type(config).__name__}")
        if server_address is None and config is not None:
            server_address = config.address if config.is_abstract else config.path
        BaseServer.__init__(self, server_address, RequestHandlerClass)
        self.config = config
        if workers is not None:
            self.workers = workers
        self._acceptor: _Acceptor | None = None
        self._pending: _Pending | None = None
        self._abandoned: (
            weakref.finalize[[Server, _Pending | None, socket.socket], UnixStreamServer] | None
        ) = None
        self.socket = _ListeningSocket(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    def _server_config(self) -> ServerConfig:
        address: Any = self.server_address
        if self.config is not None:
            cfg = self.config
            if address != cfg.path and address != cfg.address:
                cfg = dataclasses.replace(cfg, path=address)
            self.request_queue_size = cfg.backlog
            return cfg
        raw = address if isinstance(address, bytes) else os.fsencode(address)
        if raw[:1] == b"@":
            # A file named "@...", as the stdlib binds it (not an abstract name).
            raw = b"./" + raw
        abstract = raw[:1] == b"\0"
        mode = self.socket_mode
        if mode is None and not abstract:
            mode = 0o777 & ~_umask()
        return ServerConfig(
            path=raw,
            mode=mode,
            group=self.socket_group,
            idle_timeout=self.idle_timeout,
            max_connections=self.max_connections,
            backlog=self.request_queue_size,
        )

    def server_bind(self) -> None:
        """Create the socket file and start the core: bind a temporary name,
        set mode and group, listen, rename it into place, accept."""
        if self._acceptor is not None or self.supervisor is not None:
            raise OSError(errno.EINVAL, "the server is bound already")
        cfg = self._server_config()
        if self.workers is not None:
            self._bind_for_workers(cfg, self.workers)
            return
        pending = _Pending()
        acceptor = _Acceptor(cfg, pending)
        try:
            acceptor.start()
            os.dup2(acceptor.listen_fileno, self.socket.fileno(), inheritable=False)
        except BaseException:
            acceptor.close()
            pending.close()
            raise
        self._acceptor, self._pending = acceptor, pending
        # Dropped without server_close() (or still open at exit): stop the
        # core and remove the file rather than leave a listener whose
        # connections nobody will ever take.
        self._abandoned = weakref.finalize(self, _abandon, acceptor, pending, self.socket)
        self._name_socket(cfg)

    def _name_socket(self, cfg: ServerConfig) -> None:
        # What the stdlib's getsockname() would say: str for a path, bytes
        # for an abstract name.
        address: Any = self.server_address
        name = cfg.address if cfg.is_abstract else os.fsdecode(address)
        self.socket._name = name  # type: ignore[attr-defined]
        self.server_address = name

    def _bind_for_workers(self, cfg: ServerConfig, workers: int | str) -> None:
        """``workers=N``: the parent creates the listener now and supervises
        the worker processes that ``serve_forever()`` forks (it accepts nothing itself)."""
        supervisor = Server(cfg, _served_by_the_workers, workers=workers)
        prefork = supervisor._prefork
        assert prefork is not None
        # A weak reference: the finalizer below holds the supervisor, which
        # must not keep this server alive (in the child the copy is alive).
        server = weakref.ref(self)
        prefork.make_worker = lambda stats, fd: _WorkerProcess(server(), stats, fd)
        prefork.listen()
        os.dup2(prefork.listen_fileno, self.socket.fileno(), inheritable=False)
        self.supervisor = supervisor
        self._abandoned = weakref.finalize(self, _abandon, supervisor, None, self.socket)
        self._name_socket(cfg)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """With ``workers``: fork the workers (each serves with this
        ``poll_interval``) and supervise them until ``shutdown()``."""
        if self.supervisor is None:
            self._unixsrv_serving = True  # workers may take connections (ThreadingMixIn)
            try:
                super().serve_forever(poll_interval)
            finally:
                self._unixsrv_serving = False
            return
        self._poll_interval = poll_interval
        self.supervisor.serve_forever()

    def shutdown(self) -> None:
        """With ``workers``: every worker drains (stops accepting, serves
        what it accepted) and ends, within ``supervisor.shutdown``'s default
        30 s; the listener closes and the socket file goes, if still ours."""
        if self.supervisor is None:
            self._unixsrv_serving = False  # before the serving thread's last loop
            super().shutdown()
        else:
            self.supervisor.shutdown()

    def fileno(self) -> int:
        """The fd that is readable while an accepted connection waits for
        get_request() (-1 when not bound or closed)."""
        pending = self._pending
        return -1 if pending is None else pending.fileno()

    def get_request(self) -> tuple[socket.socket, Any]:
        """The next connection the core accepted, as a connected socket.
        BlockingIOError (an OSError, so the serve loop just goes on) if none
        is waiting."""
        pending = self._pending
        if pending is None:
            raise OSError(errno.EBADF, "the server is not bound")
        conn = pending.get()
        acceptor = self._acceptor
        assert acceptor is not None
        try:
            fd = conn._dup()  # ServerClosedError (an OSError) if it timed out meanwhile
        except BaseException:
            conn._finish()
            raise
        paced = acceptor.config.idle_timeout is not None
        try:
            request = (_PacedRequestSocket if paced else _RequestSocket)(
                self.address_family,
                self.socket_type,
                0,
                fd,
                name=self.server_address,
                conn=conn,
            )
        except BaseException:
            os.close(fd)
            conn._finish()
            raise
        address: Any = conn.remote_address
        if address:  # a client that bound a name (rare): in the stdlib's form
            try:
                address = request.getpeername()
            except OSError:
                pass
        return request, address

    def server_close(self) -> None:
        """Stop accepting, remove the socket file if it is still ours, close
        the connections nobody took yet; requests being served go on."""
        acceptor, pending = self._acceptor, self._pending
        self._pending = None
        if self._abandoned is not None:
            self._abandoned.detach()
        try:
            if self.supervisor is not None:
                self.supervisor.close()
            if acceptor is not None:
                acceptor.stop_accepting()
        finally:
            self.socket.close()
            if pending is not None:
                pending.close()

    def stats(self) -> dict[str, int]:
        """The core's counters, as unixsrv.Server.stats() (accepted,
        rejected, closed, open, bytes_in, bytes_out, errors, denied)."""
        acceptor = self.supervisor or self._acceptor
        return Stats().snapshot() if acceptor is None else acceptor.stats()


def _served_by_the_workers(conn: Connection) -> None:
    """The handler of the parent's supervising Server with ``workers``:
    never called, the parent accepts nothing (Server wants a handler)."""
    raise AssertionError("the supervising server of workers= accepts nothing")


class _WorkerProcess:
    """A worker process of ``workers=N`` (a unixsrv.prefork.PreforkWorker):
    this process's copy of the server object serves the inherited listener
    ``listen_fd`` with its own core (counting into ``stats``) and runs the
    stdlib's ``serve_forever`` on a thread."""

    def __init__(self, server: UnixStreamServer | None, stats: Stats, listen_fd: int) -> None:
        assert server is not None  # the worker's copy of the server object (fork copied it)
        parent = server.supervisor
        assert parent is not None
        server.supervisor = None  # from here on a single-process server
        self._server = server
        pending = _Pending()
        acceptor = _Acceptor(parent.config, pending)
        acceptor._stats = stats
        acceptor._listen_fd = listen_fd
        acceptor._info_level = logging.DEBUG
        acceptor._callbacks.on_error = parent._callbacks.on_error
        acceptor._callbacks.on_conn_state = parent._callbacks.on_conn_state
        server._acceptor, server._pending = acceptor, pending
        self._acceptor = acceptor
        self._done = threading.Event()

    @property
    def open_connections(self) -> int:
        return self._acceptor.open_connections

    def start(self) -> None:
        self._acceptor.start()
        interval = getattr(self._server, "_poll_interval", 0.5)
        threading.Thread(target=self._server.serve_forever, args=(interval,), daemon=True).start()

    def stop_accepting(self) -> None:
        self._acceptor.stop_accepting()

    def shutdown(self, timeout: float) -> None:
        """Hand what the core accepted to serve_forever (its queue empties),
        drain as unixsrv.Server's blocking model does (the read sides are
        shut: a handler reads what its client sent, then EOF, and finishes),
        then stop the serve loop and server_close()."""
        end = time.monotonic() + timeout
        pending = self._server._pending
        while pending is not None and len(pending) and time.monotonic() < end:
            time.sleep(0.01)  # bounded by timeout; serve_forever takes them
        try:
            self._acceptor.shutdown(max(end - time.monotonic(), 0.0))
        finally:
            try:
                self._server.shutdown()
                self._server.server_close()
            finally:
                self._done.set()

    def close(self) -> None:
        self._acceptor.close()
        self._done.set()  # the process exits; running requests end with it

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


class _Job:
    """A request on a pool worker, as ThreadingMixIn._threads keeps it:
    thread-like (``daemon``, ``is_alive()``, ``join()``), so the stdlib's own
    list reaps and joins it."""

    __slots__ = ("_running", "_started", "daemon")

    def __init__(self, daemon: bool, handed_over: bool) -> None:
        self.daemon = daemon
        self._running = _thread.allocate_lock()
        self._running.acquire()
        # Only a request the serving thread hands over is waited for.
        self._started: _thread.LockType | None = None
        if handed_over:
            self._started = _thread.allocate_lock()
            self._started.acquire()

    def start(self) -> None:
        """Called by the worker that took the job."""
        if self._started is not None:
            self._started.release()

    def wait_started(self) -> None:
        if self._started is not None:
            self._started.acquire()

    def is_alive(self) -> bool:
        return self._running.locked()

    def join(self, timeout: float | None = None) -> None:
        if self._running.acquire(True, -1 if timeout is None else timeout):
            self._running.release()

    def done(self) -> None:
        self._running.release()


class _Jobs(_std._Threads):  # type: ignore[name-defined,misc]
    """``ThreadingMixIn._threads``: the stdlib's list, reaped less often.
    The stdlib reaps (walks the whole list) at every append, a walk over
    every running request per request; here the walk comes once the list
    has doubled since the last one, so the list stays under twice the
    running requests (and 8), at a constant cost per request."""

    _reap_at = 8

    def append(self, job: _Job) -> None:
        if len(self) >= self._reap_at:
            self.reap()
            self._reap_at = max(8, 2 * len(self))
        if not job.daemon:
            list.append(self, job)


#: Requests of servers with ``daemon_threads`` False still running: at exit
#: the interpreter waits for them, as it does for the stdlib's non-daemon
#: request threads (pool threads are not threading.Thread objects, which
#: threading._shutdown() would join).
_running_requests: set[_Job] = set()


def _join_running_requests() -> None:
    while _running_requests:
        for job in list(_running_requests):
            job.join()


# Run by threading._shutdown() at interpreter exit, before the non-daemon
# threads are joined (concurrent.futures registers its workers the same way).
threading._register_atexit(_join_running_requests)  # type: ignore[attr-defined]


class ThreadingMixIn(_std.ThreadingMixIn):
    """Each request on a worker thread of unixsrv's pool.

    Threads are reused (parked after a request) instead of created per
    request; ``daemon_threads``, ``block_on_close`` and ``server_close()``
    (joining what ``_threads`` keeps) mean what they mean in the stdlib.
    An exception escaping ``process_request_thread`` goes to
    ``threading.excepthook``, as from a thread of its own.  Unless
    ``daemon_threads`` is set, interpreter exit waits for requests still
    running, as for non-daemon threads.
    """

    def _new_job(self, handed_over: bool) -> _Job:
        """A request's entry in ``_threads`` (and, unless daemon, in what
        interpreter exit waits for), made before the request is taken: a
        ``server_close()`` that joins ``_threads`` meanwhile waits for it."""
        if self.block_on_close:
            vars(self).setdefault("_threads", _Jobs())
        job = _Job(self.daemon_threads, handed_over)
        self._threads.append(job)  # type: ignore[attr-defined]
        if not job.daemon:
            _running_requests.add(job)
        return job

    def process_request(self, request: Any, client_address: Any) -> None:
        job = self._new_job(handed_over=True)
        pool = vars(self).get("_unixsrv_pool")
        if pool is None:
            pool = vars(self).setdefault("_unixsrv_pool", ThreadPool(self._run_request))
        try:
            pool.submit((job, request, client_address))
        except BaseException:
            _running_requests.discard(job)
            job.done()
            raise
        # Thread.start() returns once its thread runs; waiting here for this
        # request's start would cost the serve loop a sleep and a wake-up
        # (two context switches and a GIL hand-off) per request.  Waiting
        # for the previous request's start bounds the loop as well: it is
        # never more than one request ahead of its workers, so however busy
        # the machine, _threads keeps only requests that really run.
        previous = vars(self).get("_unixsrv_last_job")
        self._unixsrv_last_job = job
        if previous is not None:
            previous.wait_started()

    def _run_request(self, item: tuple[_Job, Any, Any] | None) -> None:
        """A worker runs its request, then (see _next_request) the next
        connection that waits, as long as there is one."""
        while item is not None:
            self._run_one_request(item)
            item = self._next_request()

    def _next_request(self) -> tuple[_Job, Any, Any] | None:
        """The next waiting connection, taken by the worker that just
        finished a request: under load, handing each connection from the
        serving thread to a worker costs two context switches and a GIL
        hand-off, more than the rest of a short request (with 16 clients
        connecting at once, 80 -> 40 us of server CPU per connection).

        Only while ``serve_forever()`` runs (no ``shutdown()`` asked for)
        and only where what the serving thread would run between accepting
        and the handler is the library's own (``get_request``,
        ``verify_request``, ``process_request``, ``_handle_request_noblock``):
        then nothing a subclass wrote runs on another thread than in the
        stdlib.  None when there is nothing to take."""
        if not getattr(self, "_unixsrv_serving", False) or not self._default_hand_over():
            return None
        pending = self._pending  # type: ignore[attr-defined]
        if pending is None or not len(pending):
            return None
        job = self._new_job(handed_over=False)
        try:
            request, address = self.get_request()  # type: ignore[attr-defined]
        except BaseException:
            # OSError: the serving thread (or another worker) took it, or
            # the server closed; as _handle_request_noblock, not an error.
            _running_requests.discard(job)
            job.done()
            return None
        return job, request, address

    def _default_hand_over(self) -> bool:
        for name, own in _HAND_OVER:
            if getattr(getattr(self, name), "__func__", None) is not own:
                return False
        return True

    def _run_one_request(self, item: tuple[_Job, Any, Any]) -> None:
        """A worker runs one request.  In a process the handler forked, the
        child exits once the request ends there (as the child of a request
        thread does when that thread, its only one, ends), with the status
        it asked for: see threadpool.exit_forked_child."""
        job, request, client_address = item
        pid = os.getpid()
        ended: BaseException | None = None
        job.start()
        try:
            self.process_request_thread(request, client_address)
        except BaseException as exc:
            ended = exc
            if not (
                isinstance(exc, SystemExit) and os.getpid() != pid
            ):  # a child's sys.exit() is its status
                _report_to_excepthook()
        finally:
            if os.getpid() != pid:
                exit_forked_child(ended)
            ended = None  # no reference cycle through the traceback's frame
            _running_requests.discard(job)
            job.done()

    def server_close(self) -> None:
        try:
            super().server_close()
        finally:
            pool = vars(self).get("_unixsrv_pool")
            if pool is not None:
                pool.close()
                if self.block_on_close and not self.daemon_threads:
                    # Every request is done (_threads joined): let the
                    # workers exit too, as the stdlib's threads have.
                    pool.join()


def _report_to_excepthook() -> None:
    """The exception being handled escaped a request's thread: hand it to
    threading.excepthook (which ignores SystemExit by default)."""
    exc_type, exc, tb = sys.exc_info()
    try:
        threading.excepthook(threading.ExceptHookArgs([exc_type, exc, tb, None]))
    except BaseException:
        logger.exception("threading.excepthook raised while reporting %r", exc)
    finally:
        exc = tb = None


#: What the serving thread runs between accepting and the handler: a worker
#: takes the next connection itself only where these are the library's own.
_HAND_OVER = (
    ("get_request", UnixStreamServer.get_request),
    ("verify_request", _std.BaseServer.verify_request),
    ("process_request", ThreadingMixIn.process_request),
    ("_handle_request_noblock", _std.BaseServer._handle_request_noblock),  # type: ignore[attr-defined]
)


class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer):
    pass


if hasattr(os, "fork"):

    class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
        pass
