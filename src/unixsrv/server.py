"""Server: the lifecycle of one Unix socket server and its two handler models.

Blocking model, ``Server(config, handler)``: each accepted connection runs
``handler(conn)`` on a worker thread of its own (threads are pooled and
reused); ``Connection`` I/O releases the GIL while it waits.

Event model, ``Server(config, protocol=factory)``: one loop thread runs
asyncio.Protocol callbacks; the C core does the I/O without the GIL and
dispatches each wakeup's events in one batch.

Both run on the same C loop (``unixsrv._core.Loop``): it owns the listener,
the poller, the connection table and the counters.  This module decides when
to start and stop it, runs the callbacks the user registered and keeps every
callback's exception away from the server.

``Server(..., workers=N)`` runs that loop in N forked worker processes
sharing one listener, supervised by the parent (see unixsrv.prefork).
"""

from __future__ import annotations

import enum
import logging
import math
import numbers
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _core, systemd
from .config import ServerConfig
from .connstate import ConnState
from .errors import InvalidHandlerError, ServerClosedError, ShutdownTimeoutError
from .peer import PeerCredentials
from .prefork import Prefork, ServerWorker, worker_count
from .threadpool import ThreadPool

__all__ = ["Server"]

logger = logging.getLogger("unixsrv.server")

Handler = Callable[["_core.Connection"], Any]
ErrorCallback = Callable[[BaseException], Any]
StateCallback = Callable[[str, str, ConnState], Any]
InfoCallback = Callable[[str], Any]

# How long a stop waits for the loop thread past its own deadline (close():
# past the moment it was called) to finish: force-close what is left, remove
# the socket file, tear down.  The loop does that in milliseconds unless a
# protocol callback blocks it; no stop waits for that callback: the loop
# thread completes the stop when it returns.  Longer than the stop path's
# wait for the directory lock (250 ms, see _listener.pxi), so a lock held by
# another process alone never makes a stop miss its deadline.
_STOP_GRACE = 1.0


class _State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"  # creating the listener (see Server._open)
    RUNNING = "running"
    STOPPING = "stopping"


class CallbackHost:
    """What every unixsrv server object has besides its lifecycle: the
    counters, the user's callbacks (``on_error``, ``on_conn_state``,
    ``on_server_info``, ``update_conn``) and the one way errors are reported.

    The C loop calls back into its host only through the
    :class:`unixsrv._core.LoopOwner` that :meth:`_new_loop` hands it:
    ``_report``, ``_fire_state`` and ``_call_update_conn`` here, and (a
    blocking-model :class:`Server`) ``_spawn`` and ``_notify_drained``.
    Shared by :class:`Server` and the asyncio layer's server
    (:mod:`unixsrv.asyncio`), which report an error nobody registered
    ``on_error`` for differently (``_unreported``).
    """

    _callbacks: _core.Callbacks
    _stats: _core.Stats
    _workers: threading.local
    _info_level = logging.INFO  # a prefork worker's own lifecycle: DEBUG (its parent reports it)

    @property
    def path(self) -> str:
        raise NotImplementedError

    def _init_callbacks(self) -> None:
        self._callbacks = _core.Callbacks()
        self._stats = _core.Stats()
        self._workers = threading.local()  # .active is True on a thread running our handler

    def _new_loop(
        self,
        cfg: ServerConfig,
        factory: Callable[[], Any] | None,
        spawn: Callable[[_core.Connection], Any] | None = None,
        drained: Callable[[], Any] | None = None,
    ) -> _core.Loop:
        """The C loop of one run: the event model with a protocol factory,
        else the blocking model, whose connections go to ``spawn(conn)``;
        ``drained()`` is called when the last one closes while
        ``loop.drain_waiting`` is set."""
        owner = _core.LoopOwner(
            self._report, self._fire_state, self._call_update_conn, spawn, drained
        )
        return _core.new_loop(
            _core.LoopConfig(
                owner,
                self._stats,
                self._callbacks,
                factory=factory,
                idle_timeout=cfg.idle_timeout or 0.0,
                max_connections=cfg.max_connections or 0,
                read_size=cfg.read_buffer_size,
                high_water=cfg.write_buffer_high,
                low_water=cfg.write_buffer_low,
                max_write_buffer=cfg.max_write_buffer,
            )
        )

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed."""
        return self._stats.open

    def stats(self) -> dict[str, int]:
        """Counters (cumulative over restarts): accepted, rejected, closed,
        open, bytes_in, bytes_out, errors."""
        return self._stats.snapshot()

    # ------------------------------------------------------------------ callbacks

    def on_error(self, fn: ErrorCallback | None) -> ErrorCallback | None:
        """Register ``fn(exc)``, called once per error (handler or callback
        exceptions, accept errors, shutdown timeouts reported from a
        background thread).  Usable as a decorator; ``None`` resets to
        logging the error."""
        self._callbacks.on_error = _callable_or_none(fn, "on_error")
        return fn

    def on_conn_state(self, fn: StateCallback | None) -> StateCallback | None:
        """Register ``fn(local, remote, state)``: ``ConnState.NEW`` before the
        handler starts, ``ConnState.CLOSE`` after it returned and the
        connection is closed, exactly once each."""
        self._callbacks.on_conn_state = _callable_or_none(fn, "on_conn_state")
        return fn

    def on_server_info(self, fn: InfoCallback | None) -> InfoCallback | None:
        """Register ``fn(message)`` for lifecycle messages (golib's texts)."""
        self._callbacks.on_server_info = _callable_or_none(fn, "on_server_info")
        return fn

    def _call_update_conn(self, conn: Any) -> bool:
        """Run update_conn with a socket.socket for the connection; False
        (after reporting) if it raised.

        The socket holds a duplicate of the connection's fd, closed after the
        call: whatever update_conn does with it (close it, keep it), our fd
        stays ours.  It shares the open socket, so options set on it apply.
        The fd is open here: until the handler or protocol runs, only this
        thread closes it.
        """
        update_conn = self._callbacks.update_conn
        fd = conn.fileno()
        if update_conn is None or fd < 0:  # closed by the server (idle timeout, shutdown)
            return True
        conn._expose()  # the user may keep a dup of it (epoll registration)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, os.dup(fd))
        try:
            update_conn(sock)
            return True
        except BaseException as exc:
            self._user_error(exc)
            return False
        finally:
            sock.close()

    def _fire_state(self, conn: Any, state: ConnState) -> None:
        fn = self._callbacks.on_conn_state
        if fn is None:
            return
        try:
            try:
                remote = conn.remote_address
            except OSError:
                remote = ""
            fn(conn.local_address, remote, state)
        except BaseException as exc:
            self._user_error(exc)

    def _info(self, message: str) -> None:
        logger.log(self._info_level, "%s", message)
        fn = self._callbacks.on_server_info
        if fn is not None:
            try:
                fn(message)
            except BaseException as exc:
                self._user_error(exc)

    def _user_error(self, exc: BaseException) -> None:
        """A user callback raised: report it.  KeyboardInterrupt and SystemExit
        outside a handler thread are not swallowed: they propagate (the loop
        stops after its current dispatch, serve_forever cleans up and
        re-raises)."""
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) and not getattr(
            self._workers, "active", False
        ):
            raise exc
        self._report(exc)

    def _report(self, exc: BaseException, level: int = logging.ERROR) -> None:
        """One error: to on_error if registered, else to the log, at `level`
        (peer resets and broken pipes, a normal way for a client to go, at
        DEBUG)."""
        self._stats.count_error()
        fn = self._callbacks.on_error
        if fn is None:
            if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                level = logging.DEBUG
            self._unreported(exc, level)
            return
        try:
            fn(exc)
        except (KeyboardInterrupt, SystemExit) as err:
            if getattr(self._workers, "active", False):
                logger.exception(
                    "unixsrv %s: the on_error callback raised while reporting %r", self.path, exc
                )
            else:
                raise err from exc
        except BaseException:
            logger.exception(
                "unixsrv %s: the on_error callback raised while reporting %r", self.path, exc
            )

    def _unreported(self, exc: BaseException, level: int) -> None:
        """An error with no on_error registered: logged at `level`."""
        logger.log(
            level,
            "unixsrv %s: %s",
            self.path,
            exc,
            exc_info=exc if level >= logging.ERROR else None,
        )


class Server(CallbackHost):
    """A Unix domain socket server.

    Give exactly one of ``handler`` (blocking model: ``handler(conn)`` runs on
    a worker thread per connection) or ``protocol`` (event model: a factory of
    ``asyncio.Protocol`` objects).  ``update_conn(sock)`` runs once per
    accepted connection before the handler, with a ``socket.socket`` for
    getsockopt/setsockopt: a duplicate of the connection's fd, closed after
    the call.  ``authorize(peer: PeerCredentials) -> bool`` runs on the loop
    thread for each peer the allow-lists admit, before anything else sees the
    connection: only ``True`` admits; anything else, or an exception
    (reported through on_error), closes it and counts it as ``denied``.

    ``workers=N`` (an int >= 1, or ``"auto"``: one per CPU) serves from N
    forked processes sharing the listener, supervised by this one: see
    :mod:`unixsrv.prefork`, :meth:`reload` and :meth:`worker_stats`.
    """

    def __init__(
        self,
        config: ServerConfig,
        handler: Handler | None = None,
        *,
        protocol: Callable[[], Any] | None = None,
        update_conn: Callable[[socket.socket], Any] | None = None,
        authorize: Callable[[PeerCredentials], bool] | None = None,
        workers: int | str | None = None,
    ) -> None:
        if not isinstance(config, ServerConfig):
            raise TypeError(f"config must be a ServerConfig, not {type(config).__name__}")
        if (handler is None) == (protocol is None):
            raise InvalidHandlerError(
                "give exactly one of handler= (blocking model) or protocol= (event model)"
            )
        if handler is not None and not callable(handler):
            raise InvalidHandlerError(f"handler must be callable, not {type(handler).__name__}")
        if protocol is not None and not callable(protocol):
            raise InvalidHandlerError(
                f"protocol must be a callable protocol factory, not {type(protocol).__name__}"
            )
        if update_conn is not None and not callable(update_conn):
            raise InvalidHandlerError(
                f"update_conn must be callable, not {type(update_conn).__name__}"
            )
        if authorize is not None and not callable(authorize):
            raise InvalidHandlerError(f"authorize must be callable, not {type(authorize).__name__}")
        self._authorize = authorize
        self._notifier: systemd.Notifier | None = None
        self._config = config
        self._handler = handler
        self._protocol = protocol
        self._init_callbacks()
        self._callbacks.update_conn = update_conn
        self._pool = ThreadPool(self._serve_connection) if handler is not None else None
        self._lock = threading.Lock()  # state changes; never held across a wait
        self._start_lock = threading.Lock()  # one start at a time
        self._stop_requested = False  # a stop called while STARTING
        self._state = _State.STOPPED
        self._loop: _core.Loop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._stopped.set()
        self._stoppers = 0  # threads inside _stop() (under _lock)
        self._setup_thread: int | None = None
        self._drained = threading.Condition(threading.Lock())
        self._owner_pid = os.getpid()
        self._listen_fd: int | None = None  # in a worker process: the parent's listener
        self._prefork = (
            None if workers is None else Prefork(self, worker_count(workers), self._worker_copy)
        )

    def __repr__(self) -> str:
        model = "blocking" if self._handler is not None else "event"
        return f"<unixsrv.Server {self.path!r} {model} {self._state.value}>"

    # ------------------------------------------------------------------ state

    @property
    def config(self) -> ServerConfig:
        """The configuration this server was built with."""
        return self._config

    @property
    def path(self) -> str:
        """The socket path (``@name`` for a Linux abstract name)."""
        return self._config.display_path

    @property
    def is_running(self) -> bool:
        """True while the server accepts connections."""
        if self._prefork is not None:
            return self._prefork.is_running and not self._forked()
        return self._state is _State.RUNNING and not self._forked()

    @property
    def is_gone(self) -> bool:
        """True before the first start and from the moment a stop begins."""
        return not self.is_running

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed."""
        if self._prefork is not None:
            return self._prefork.stats()["open"]
        return self._stats.open

    def stats(self) -> dict[str, int]:
        """Counters (cumulative over restarts): accepted, rejected, closed,
        open, bytes_in, bytes_out, errors, denied (refused by the allow-lists
        or authorize).  With workers: the sum over every worker process,
        those that ended included."""
        if self._prefork is not None:
            return self._prefork.stats()
        return self._stats.snapshot()

    def worker_stats(self) -> list[dict[str, Any]]:
        """With workers: one row per live worker process (``slot``, ``pid``,
        ``state``: starting/ready/stopping, and its counters); else []."""
        return [] if self._prefork is None else self._prefork.worker_stats()

    def reload(self, timeout: float = 30.0) -> None:
        """With workers: replace every worker process, one at a time, without
        refusing a connection: each new worker accepts before the one it
        replaces is asked to retire (SIGUSR1: it stops accepting, serves on
        for up to prefork.RETIRE_LINGER seconds, then drains).  Returns once
        every old worker has reported that it stopped accepting: from then
        on every new connection goes to a new worker.  Raises WorkerError if
        a new worker does not start, or an old one does not stop accepting,
        within ``timeout`` seconds (an old one that did not start retiring is
        then kept), ServerClosedError if the server is not running,
        RuntimeError without workers."""
        timeout = _check_timeout(timeout)
        if self._prefork is None:
            raise RuntimeError("reload() needs Server(..., workers=N)")
        self._prefork.reload(timeout)

    # ------------------------------------------------------------------ starting

    def start(self) -> None:
        """Bind and serve on a background thread; return once it accepts.

        Setup errors (address in use, permissions, ...) raise here and leave
        nothing behind.  A no-op if the server is already running.  A stop
        called while start() sets up wins: start() undoes its work and
        returns with the server stopped.
        """
        self._check_not_forked()
        if self._prefork is not None:
            self._prefork.start()
            return
        with self._start_lock:
            while True:
                with self._lock:
                    if self._state is _State.RUNNING:
                        return
                    stopped = self._state is _State.STOPPED
                    abandoned = self._state is _State.STOPPING and self._stoppers == 0
                if stopped:
                    break
                if abandoned:  # its shutdown() was interrupted (Ctrl-C): finish it
                    self._stop(graceful=False, timeout=0.0)
                self._stopped.wait()  # a stop is in progress: start after it
            loop = self._open(foreground=False)
            if loop is None:
                return
            ready = threading.Event()
            self._thread = threading.Thread(
                target=self._run_in_background,
                args=(loop, ready),
                name=f"unixsrv {self.path}",
                daemon=True,
            )
            self._thread.start()
        try:
            self._info(f"starting listening socket 'unix {self.path}'")
            ready.wait()
        except BaseException:  # Ctrl-C (or a raising callback's SystemExit) during start()
            self.close()
            raise

    def serve_forever(self, cancel: threading.Event | None = None) -> None:
        """Bind and serve on this thread until shutdown(), close() or ``cancel``.

        ``cancel`` (a threading.Event) acts as close() when it is set.  On
        Ctrl-C the server stops (the socket file is removed) and the
        KeyboardInterrupt is re-raised.  If the server was started with
        start(), this waits for it to stop instead.
        """
        self._check_not_forked()
        if cancel is not None and cancel.is_set():
            return
        if self._prefork is not None:
            self._prefork.serve_forever(cancel)
            return
        with self._start_lock:
            loop = self._open(foreground=True)
        if loop is not None:
            self._run_here(loop, cancel)
            return
        watcher = _CancelWatcher(cancel, self.close) if cancel is not None else None
        try:
            self._stopped.wait()
        except BaseException:  # Ctrl-C: stop the server, as when it runs here
            self.close()
            raise
        finally:
            if watcher is not None:
                watcher.stop()

    def _open(self, *, foreground: bool) -> _core.Loop | None:
        """Create the loop and its listener if the server is stopped (called
        with _start_lock held); None if it is not, or if a stop was called
        meanwhile (then nothing is left open or on disk).

        _lock is not held while the listener is created: that may wait 10 s
        for a directory lock another process holds, and no stop may wait
        that long for _lock.  A stop meanwhile (state STARTING) only sets
        _stop_requested; this undoes the start when it sees it.

        A signal handler may run on this thread at any bytecode from here on;
        if it stops the server, _on_server_thread() must be true so the stop
        is handed to another thread instead of waiting for this one.
        """
        with self._lock:
            if self._state is not _State.STOPPED:
                return None
            self._state = _State.STARTING
            self._stop_requested = False
        cfg = self._config
        self._setup_thread = threading.get_ident()
        try:
            loop = self._new_loop(cfg, self._protocol, self._spawn, self._notify_drained)
            try:
                if foreground:
                    loop.claim_thread()
                self._open_listener(loop)
                with self._lock:
                    if not self._stop_requested:
                        self._loop = loop
                        self._state = _State.RUNNING
                        self._stopped.clear()
                        return loop
            except BaseException:
                loop.teardown()  # after a failed open() too: nothing is left open
                raise
            loop.teardown()  # a stop was called while the listener was created
            return None
        finally:
            with self._lock:
                if self._state is _State.STARTING:
                    self._state = _State.STOPPED
            self._setup_thread = None

    def _open_listener(self, loop: _core.Loop) -> None:
        """Access control, the listener (created, or the inherited fd=), and
        the systemd notifications of this run."""
        cfg = self._config
        loop.set_access(
            cfg.allowed_uids, cfg.allowed_gids, cfg.max_connections_per_uid or 0, self._authorize
        )
        # A worker process of workers=N serves the parent's listener, whose
        # file only the parent unlinks (no unlink_path, never chmod-ed).
        inherited = cfg.fd if self._listen_fd is None else self._listen_fd
        if inherited is None:
            loop.open(backlog=cfg.backlog, **_listener_args(cfg))
        else:
            _adopt_inherited(loop, cfg, inherited)
            if self._listen_fd is not None:
                loop.share_listener()
        wanted = (
            cfg.sd_notify and self._listen_fd is None and systemd.Notifier.wanted()
        )  # not from workers
        self._notifier = systemd.Notifier() if wanted else None
        if self._notifier is not None:
            notifier, stats = self._notifier, self._stats
            loop.set_tick(notifier.interval, lambda: notifier.tick(stats.open))

    def _run_in_background(self, loop: _core.Loop, ready: threading.Event) -> None:
        ready.set()
        try:
            try:
                loop.run()
            finally:
                self._finish_run(loop)
        except BaseException as exc:  # the loop failed, or a callback raised SystemExit & co
            self._report(exc)

    def _run_here(self, loop: _core.Loop, cancel: threading.Event | None) -> None:
        previous = None
        watcher = None
        try:
            # On the main thread, a signal that lands on any thread writes to
            # the loop's wakeup pipe, so its handler runs at once instead of
            # after the next event (signal.set_wakeup_fd; restored afterwards).
            if threading.current_thread() is threading.main_thread():
                previous = signal.set_wakeup_fd(loop.wakeup_fileno, warn_on_full_buffer=False)
            self._info(f"starting listening socket 'unix {self.path}'")
            if cancel is not None:
                watcher = _CancelWatcher(cancel, self.close)
            loop.run()
        finally:
            if previous is not None:
                signal.set_wakeup_fd(previous)
            self._finish_run(loop)
            if watcher is not None:  # after the loop closed: its close() cannot wait now
                watcher.stop()

    def _finish_run(self, loop: _core.Loop) -> None:
        """On the loop thread after run() returned (normally or not)."""
        try:
            try:
                self._stop_accepting(loop)
            finally:
                loop.teardown()
        finally:
            if self._pool is not None:
                self._pool.release_idle()
            with self._lock:
                if self._loop is loop:
                    self._loop = None
                    self._thread = None
                    self._state = _State.STOPPED
                self._stopped.set()
            with self._drained:
                self._drained.notify_all()

    # ------------------------------------------------------------------ stopping

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop gracefully; safe from any thread, idempotent.

        Stops accepting and removes the socket file at once, sets every
        ``conn.done``, shuts down the read side of every connection (blocked
        reads return b"") and lets handlers finish; in the event model each
        transport stops reading, flushes its output and closes.  Connections
        still open after ``timeout`` seconds are force-closed and
        ShutdownTimeoutError is raised.  Called from a handler or a protocol
        callback, it starts the shutdown and returns at once (a timeout is
        then reported through on_error).

        ``timeout`` is a number of seconds >= 0, or ``math.inf`` for no limit;
        anything else raises ValueError (NaN, negative) or TypeError (not a
        number, or a bool) before anything changes.  The call returns or
        raises within ``timeout`` plus a small margin even while a protocol
        callback blocks the loop thread (the loop completes the stop when it
        returns).  If it is interrupted (KeyboardInterrupt), calling
        shutdown() or close() again finishes the stop.
        """
        timeout = _check_timeout(timeout)
        if self._forked():
            return
        if self._prefork is not None:
            self._prefork.stop(graceful=True, timeout=timeout)
            return
        if self._on_server_thread():
            threading.Thread(target=self._shutdown_reporting, args=(timeout,), daemon=True).start()
            return
        self._stop(graceful=True, timeout=timeout)

    def close(self) -> None:
        """Stop now: no grace, every connection closed (clients see EOF).

        Returns promptly even with handlers blocked in read() or a protocol
        callback blocking the loop thread (the loop then completes the stop
        when the callback returns).  Idempotent, safe from any thread.
        """
        if self._forked():
            return
        if self._prefork is not None:
            self._prefork.stop(graceful=False, timeout=0.0)
            return
        loop = self._loop
        if loop is not None and loop.on_loop_thread():
            self._close_now(loop)  # from a callback: the loop exits after it
        elif self._on_server_thread():
            threading.Thread(
                target=self._stop, kwargs={"graceful": False, "timeout": 0.0}, daemon=True
            ).start()
        else:
            self._stop(graceful=False, timeout=0.0)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the server is stopped, at most ``timeout`` seconds
        (None or math.inf: no limit); True if it is."""
        if self._prefork is not None:
            return self._prefork.wait(
                _finite(math.inf if timeout is None else _check_timeout(timeout))
            )
        return _wait_event(self._stopped, math.inf if timeout is None else _check_timeout(timeout))

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop thread (where transports may be
        used).  Raises ServerClosedError if the server is not running (or
        runs in worker processes: their loops are not in this one)."""
        loop = self._loop
        if loop is None or not loop.call_soon_threadsafe(lambda: callback(*args)):
            raise ServerClosedError("the server is not running")

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _shutdown_reporting(self, timeout: float) -> None:
        try:
            self._stop(graceful=True, timeout=timeout)
        except ShutdownTimeoutError as exc:
            self._report(exc)

    def _stop(self, *, graceful: bool, timeout: float) -> None:
        """Stop the server and wait for it, within ``timeout`` plus _STOP_GRACE.

        Every call drives the stop itself: each step it posts to the loop is
        idempotent, so a stop whose caller was interrupted is finished by the
        next shutdown() or close(), and two concurrent stops each keep their
        own deadline.  Steps are posted, never waited for one by one: a
        callback blocking the loop thread delays them, not this caller.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._state is _State.STARTING:
                self._stop_requested = True  # _open() undoes the start
                return
            loop = self._loop
            if loop is None:
                return
            self._state = _State.STOPPING
            self._stoppers += 1
        try:
            left = 0
            if graceful:
                self._post(loop, lambda: self._begin_shutdown(loop))
                if not self._wait_drained(loop, deadline):
                    left = self._stats.open
            if not graceful or left:
                self._post(loop, lambda: self._close_now(loop))
            else:
                self._post(loop, loop.request_exit)
            stopped = _wait_event(
                self._stopped, max(deadline - time.monotonic(), 0.0) + _STOP_GRACE
            )
        finally:
            with self._lock:
                self._stoppers -= 1
        if stopped and not left:
            return
        if stopped:
            raise ShutdownTimeoutError(
                f"{left} connection(s) still open after {timeout:g} s of graceful shutdown were force-closed"
            )
        busy = (
            "the loop thread is busy in a callback; it completes the stop when the callback returns"
        )
        if graceful:
            raise ShutdownTimeoutError(f"the server did not stop within {timeout:g} s: {busy}")
        logger.warning("unixsrv %s: close(): %s", self.path, busy)

    def _begin_shutdown(self, loop: _core.Loop) -> None:
        try:
            self._stop_accepting(loop)
        finally:
            loop.begin_drain()

    def _close_now(self, loop: _core.Loop) -> None:
        # No lock here: this may run in a signal handler on a thread that holds it.
        if self._loop is loop:
            self._state = _State.STOPPING
        # Whatever stopping the listener raises (a callback's KeyboardInterrupt
        # through _info), the connections are closed and the loop exits:
        # every stop waits for that.
        try:
            self._stop_accepting(loop)
        finally:
            try:
                loop.abort_all()
            finally:
                loop.request_exit()

    def _stop_accepting(self, loop: _core.Loop) -> None:
        if loop.stop_accepting():
            if self._notifier is not None:
                self._notifier.stopping()
            self._info(f"closing listen socket 'unix {self.path}'")

    def _post(self, loop: _core.Loop, fn: Callable[[], None]) -> None:
        """Run fn on the loop thread: now if this is it, else queued (the loop
        runs queued callbacks even while it tears down; once it is closed,
        the teardown does what fn would).  Never waits: the caller waits for
        the outcome with its own deadline."""
        if loop.on_loop_thread():
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    def _wait_drained(self, loop: _core.Loop, deadline: float) -> bool:
        with self._drained:
            loop.drain_waiting = True
            try:
                while self._stats.open > 0 and not self._stopped.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._drained.wait(_finite(remaining))
                return True
            finally:
                loop.drain_waiting = False

    def _notify_drained(self) -> None:
        with self._drained:
            self._drained.notify_all()

    def _on_server_thread(self) -> bool:
        """True on a thread that must not wait for the server to stop: the loop
        thread, a handler's worker thread, or the thread setting the server up."""
        loop = self._loop
        return (
            (loop is not None and loop.on_loop_thread())
            or self._setup_thread == threading.get_ident()
            or getattr(self._workers, "active", False)
        )

    def _forked(self) -> bool:
        return os.getpid() != self._owner_pid

    def _check_not_forked(self) -> None:
        if self._forked():
            raise RuntimeError(
                "this Server was inherited through fork(); create a new one in the child process"
            )

    def _stop_accepting_then(self, then: Callable[[], None]) -> None:
        """A worker process retiring: stop accepting now (on the loop thread)
        and call ``then()`` one loop pass later, once what clients already
        sent on the connections accepted until now has been dispatched (an
        event-model drain stops reading at once).  ServerClosedError if the
        server is not running."""

        def stop() -> None:
            loop = self._loop
            if loop is not None:
                self._stop_accepting(loop)
            # Queued from a callback: runs in the next dispatch, after a poll.
            self.call_soon_threadsafe(then)

        self.call_soon_threadsafe(stop)

    def _worker_copy(self, stats: _core.Stats, listen_fd: int) -> ServerWorker:
        """In a worker process of ``workers=N``: a single-process Server like
        this one that serves the inherited listener ``listen_fd`` and counts
        into ``stats`` (its slot of the shared counters).  Lifecycle messages
        are the parent's: on_server_info is not copied."""
        worker = Server(
            self._config,
            self._handler,
            protocol=self._protocol,
            update_conn=self._callbacks.update_conn,
            authorize=self._authorize,
        )
        worker._stats = stats
        worker._listen_fd = listen_fd
        worker._info_level = logging.DEBUG
        worker._callbacks.on_error = self._callbacks.on_error
        worker._callbacks.on_conn_state = self._callbacks.on_conn_state
        return ServerWorker(worker)

    # ------------------------------------------------------------------ per connection

    def _spawn(self, conn: _core.Connection) -> None:
        """Blocking model: a worker thread for a new connection (loop thread)."""
        self._pool.submit(conn)  # type: ignore[union-attr]

    def _serve_connection(self, conn: _core.Connection) -> None:
        """Worker thread: the connection's lifecycle (NEW, update_conn, see
        ``Connection._begin``), the handler, then ``Connection._finish``
        (close, CLOSE).

        In a process the handler forked, the child exits as soon as the
        handler ends there, with the status it asked for (sys.exit(8) -> 8,
        returned -> 0, raised -> 1): see threadpool.exit_forked_child.  The
        connection's close and CLOSE belong to the parent.
        """
        workers = self._workers
        workers.active = True
        ended: BaseException | None = None
        try:
            if conn._begin():
                self._handler(conn)  # type: ignore[misc]
        except BaseException as exc:  # even SystemExit: a handler never ends a worker
            ended = exc
            if not (
                isinstance(exc, SystemExit) and self._forked()
            ):  # a child's sys.exit() is its status
                self._report(exc)
        finally:
            if self._forked():
                # Imported here, not at the top: the rare path.
                from .threadpool import exit_forked_child

                exit_forked_child(ended)
            ended = None  # no reference cycle through the traceback's frame
            conn._finish()
            workers.active = False


class _CancelWatcher:
    """Calls close() when a threading.Event is set (serve_forever's cancel)."""

    def __init__(self, cancel: threading.Event, close: Callable[[], None]) -> None:
        self._cancel = cancel
        self._close = close
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="unixsrv cancel watcher", daemon=True
        )
        self._thread.start()

    def _watch(self) -> None:
        # threading.Event offers no callback, so poll it in short waits; a set
        # event returns from wait() at once, so cancellation is immediate.
        while not self._done.is_set():
            if self._cancel.wait(0.05):
                self._close()
                return

    def stop(self) -> None:
        self._done.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


def _check_timeout(timeout: object) -> float:
    """A stop's timeout: seconds >= 0, or math.inf for no limit.  A bool is
    refused too: ``shutdown(True)`` reads as a flag, not as one second."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(
            f"timeout must be a number of seconds or math.inf, not {type(timeout).__name__}"
        )
    seconds = float(timeout)
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"timeout must be a number of seconds >= 0 or math.inf, got {timeout!r}")
    return seconds


def _finite(seconds: float) -> float | None:
    """A timeout for threading's waits, which refuse more than TIMEOUT_MAX
    (OverflowError): None, no limit, beyond it."""
    return None if seconds > threading.TIMEOUT_MAX else seconds


def _wait_event(event: threading.Event, seconds: float) -> bool:
    return event.wait(_finite(seconds))


def _callable_or_none(fn: Any, name: str) -> Any:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} expects a callable or None, not {type(fn).__name__}")
    return fn


def _adopt_inherited(loop: _core.Loop, cfg: ServerConfig, inherited: int) -> None:
    """Serve the inherited listening socket ``inherited`` (``cfg.fd``, or a
    worker process's copy of the parent's listener; never unlinked)."""
    # A duplicate per run: stopping closes it, the inherited fd stays
    # open and listening for a restart (and for systemd).  The accept
    # loop needs it non-blocking; systemd passes it blocking.
    fd = os.dup(inherited)
    try:
        os.set_blocking(fd, False)
    except BaseException:
        os.close(fd)
        raise
    sockname = cfg.address if cfg.is_abstract else os.fsdecode(cfg.address)
    loop.adopt(fd, sockname, cfg.display_path, None, 0, 0)


def _listener_args(cfg: ServerConfig) -> dict[str, Any]:
    """Where and how _core.open_listener creates the socket file."""
    address = cfg.address
    if cfg.is_abstract:
        return dict(
            address=address,
            display=cfg.display_path,
            unlink_path=None,
            mode=0,
            gid=-1,
            dir_path=b"",
            base=b"",
            tmp_name=b"",
            use_proc=False,
        )
    dir_path, base = os.path.split(address)
    dir_path = dir_path or b"."
    tmp_name = b".us-" + os.urandom(6).hex().encode()
    # The temporary name must fit sun_path too; if the directory is deep,
    # reach it through /proc/self/fd (Linux) instead.
    use_proc = len(dir_path) + 1 + len(tmp_name) > _core.SUN_PATH_MAX
    if use_proc and not os.path.isdir("/proc/self/fd"):
        from .errors import InvalidPathError

        raise InvalidPathError(
            f"the directory of {cfg.display_path!r} is too deep for a temporary socket name; use a shorter path"
        )
    return dict(
        address=address,
        display=cfg.display_path,
        unlink_path=os.path.abspath(address),
        mode=cfg.mode,
        gid=-1 if cfg.group is None else cfg.group,
        dir_path=dir_path,
        base=base,
        tmp_name=tmp_name,
        use_proc=use_proc,
    )
