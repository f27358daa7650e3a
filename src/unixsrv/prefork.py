"""Pre-fork workers: ``Server(..., workers=N)`` runs the C loop in N processes.

One event loop uses one core.  With ``workers=N`` the parent process creates
the listening socket once (the same safe sequence as a single server: mode
and group are applied before ``listen``), then forks N worker processes.
Each worker builds its own loop after the fork and adopts the inherited
listening fd (``Loop.adopt``): the kernel hands every incoming connection to
exactly one worker's ``accept``.  On Linux the listener is registered with
``EPOLLEXCLUSIVE`` (poller.h), so one worker wakes per connection; kqueue
has no such flag, so on macOS every idle worker wakes and all but one find
nothing to accept (the "thundering herd": correct, one wasted wakeup each).
The same holds for unixsrv.asyncio workers on Linux: their C loop's epoll
is nested in the asyncio loop's, and an exclusive wakeup counts as such
only when a thread waits on that epoll itself (ep_poll_callback).

The parent serves nothing itself.  A supervisor thread forks the workers,
notices when one ends (its status pipe reaches EOF, then ``waitpid``) and
replaces it: at once the first time, then with a doubling back-off while
workers keep dying within ``MIN_UPTIME`` of their start; after
``CRASH_LOOP_LIMIT`` such deaths in a row the server reports
:class:`~unixsrv.errors.WorkerCrashLoopError` and stops instead of spinning.

Signals to a worker: SIGTERM = graceful shutdown (the worker stops
accepting, dispatches what already arrived, then drains, at most
``WORKER_GRACE`` seconds on its own), SIGUSR1 = the same after serving on
for up to ``RETIRE_LINGER`` while connections are open (reload), SIGQUIT =
close now; SIGINT and SIGHUP are ignored (a terminal's Ctrl-C reaches the
whole process group: the parent decides what the workers do).  ``shutdown(timeout)`` in the parent removes
the socket file, sends SIGTERM to every worker, waits up to ``timeout``,
then sends SIGQUIT and, ``STOP_GRACE`` later, SIGKILL.  ``reload()`` replaces
the workers one at a time: a new worker is forked and accepting before the
old one is asked to retire (SIGUSR1), and the listener never closes, so no
connection is refused.

What a worker runs is the Prefork's ``make_worker(stats, listen_fd)``,
called in the child after the fork: it returns a :class:`PreforkWorker`
(start, stop accepting, drain, close, wait) that serves the inherited
listener and counts into ``stats``.  ``unixsrv.Server`` runs a copy of
itself (both handler models, :class:`ServerWorker`); :mod:`unixsrv.asyncio`
runs a protocol factory on an asyncio loop of the worker's own
(:func:`unixsrv.asyncio.prefork_server`, ``unixsrv serve --protocol
--workers``); :mod:`unixsrv.socketserver` runs the server's own
``serve_forever`` (``workers=``).  Every model shares this one supervisor,
the C listener and the counters.

systemd (``ServerConfig(sd_notify=True)`` with ``$NOTIFY_SOCKET`` set):
only the parent notifies: READY=1 once every worker accepts, STATUS= and
WATCHDOG=1 from the supervisor thread while at least one worker is ready,
RELOADING=1 during :meth:`Prefork.reload` (READY=1 again after it) and
STOPPING=1 when the stop begins.  Workers never notify.

Counters: every worker adds to its own slot of a
:class:`unixsrv._core.SharedStats` (a ``MAP_SHARED`` anonymous mapping made
before the first fork, written with the same lock-free atomics as one
process); the parent sums the slots, the counters of workers that ended,
and its own (errors it reported).  A worker that ends with connections open
lost them: they count as closed.

Workers never unlink, chmod or chown the socket file (they adopt the fd
without a path); the parent removes it once, at stop, if it is still ours.
A worker whose parent dies exits: Linux ``PR_SET_PDEATHSIG`` (SIGTERM when
the supervisor thread, which forks every worker and lives as long as any
of them, ends), checked against ``getppid()`` for a parent that died first;
elsewhere a pipe whose write end only the parent holds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import selectors
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from . import _core, systemd
from .errors import (
    ConfigError,
    ServerClosedError,
    ShutdownTimeoutError,
    WorkerCrashLoopError,
    WorkerError,
)

if TYPE_CHECKING:
    from .server import Server

__all__ = ["MakeWorker", "Prefork", "PreforkWorker", "ServerWorker", "worker_count"]

logger = logging.getLogger("unixsrv.prefork")

#: A worker that ends sooner than this after its fork (or before it accepted)
#: counts towards a crash loop.
MIN_UPTIME = 1.0
#: That many such ends in a row stop the server.
CRASH_LOOP_LIMIT = 5
#: Back-off before the 2nd, 3rd, ... replacement in a row: 0.1 s doubling, at most 2 s.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0
#: How long a worker drains on SIGTERM by itself (the parent's deadline usually ends it sooner).
WORKER_GRACE = 30.0
#: How long a worker replaced by reload() (SIGUSR1) serves on its open
#: connections, no longer accepting, before it drains them: a client that
#: connected just before and sends its request a moment later is answered.
RETIRE_LINGER = 0.5
#: After a stop's deadline: SIGQUIT, then SIGKILL this much later.
STOP_GRACE = 1.0
#: The supervisor also polls waitpid this often: a worker's status pipe can
#: outlive it when the worker forked a child of its own.
_REAP_EVERY = 0.1
_READY = b"R"
#: Written by a worker once it stopped accepting (SIGUSR1, SIGTERM): reload()
#: waits for it, so after "reloaded" no old worker takes a new connection.
_RETIRED = b"S"
_COUNTERS = tuple(_core.Stats().snapshot())  # accepted, rejected, closed, open, ...


def worker_count(workers: object) -> int:
    """The number of workers ``workers=`` asks for: an int >= 1, or "auto"
    (the CPUs this process may run on)."""
    if workers == "auto":
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise ConfigError(f"workers must be an int >= 1 or 'auto', not {workers!r}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1 or 'auto', got {workers}")
    return workers


class PreforkWorker(Protocol):
    """What one worker process runs: built in the child by the Prefork's
    ``make_worker(stats, listen_fd)``, serving the inherited listener
    ``listen_fd`` (never unlinked, chmod-ed or chown-ed) and counting into
    ``stats`` (its slot of the shared counters)."""

    @property
    def open_connections(self) -> int:
        """Connections accepted and not closed yet."""

    def start(self) -> None:
        """Serve; return once the listener is being accepted on."""

    def stop_accepting(self) -> None:
        """Stop accepting (the listener stays open for the other workers);
        return once what clients already sent on the connections accepted
        until now has been dispatched.  ServerClosedError if not running."""

    def shutdown(self, timeout: float) -> None:
        """Drain what is left, then stop; ShutdownTimeoutError past ``timeout``."""

    def close(self) -> None:
        """Stop now."""

    def wait(self, timeout: float | None = None) -> bool:
        """True once stopped (after ``timeout`` seconds at most)."""


#: ``make_worker(stats, listen_fd)``: see :class:`PreforkWorker`.
MakeWorker = Callable[[_core.Stats, int], PreforkWorker]


class ServerWorker:
    """A :class:`unixsrv.Server` serving in a worker process (both handler
    models): ``Server._worker_copy`` builds it."""

    def __init__(self, server: Server) -> None:
        self.server = server

    @property
    def open_connections(self) -> int:
        return self.server.open_connections

    def start(self) -> None:
        self.server.start()

    def stop_accepting(self) -> None:
        # One loop pass after the listener closed dispatches what already
        # arrived on the accepted connections (an event-model drain stops
        # reading at once).
        passed = threading.Event()
        self.server._stop_accepting_then(passed.set)
        passed.wait(STOP_GRACE)

    def shutdown(self, timeout: float) -> None:
        self.server.shutdown(timeout)

    def close(self) -> None:
        self.server.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self.server.wait(timeout)


class _Worker:
    """The parent's record of one worker process."""

    def __init__(
        self, slot: int, pid: int, status_fd: int, stats: _core.Stats, spare: bool
    ) -> None:
        self.slot = slot
        self.pid = pid
        self.status_fd = status_fd  # read end; -1 once EOF was seen
        self.stats = stats
        self.started = time.monotonic()
        self.ready = False  # its loop accepts
        self.stopped_accepting = False  # it said so (_RETIRED) after SIGUSR1 or SIGTERM
        self.retiring = (
            False  # asked to stop, or being replaced by reload(): not replaced when it ends
        )
        self.spare = spare  # forked by reload(): not replaced if it ends before it took over
        self.ended = False


class _Spawn:
    """A request to fork one worker at time ``at`` (monotonic)."""

    def __init__(self, at: float, spare: bool = False) -> None:
        self.at = at
        self.spare = spare
        self.worker: _Worker | None = None
        self.failed: BaseException | None = None


class Prefork:
    """The supervisor of ``Server(..., workers=N)`` (created by the Server).

    ``server`` is the parent's Server: its config, its counters (errors the
    parent reports), its callbacks; ``make_worker`` builds what each worker
    process runs (see :class:`PreforkWorker`).
    """

    def __init__(self, server: Server, count: int, make_worker: MakeWorker) -> None:
        self._server = server
        self._count = count
        self.make_worker = make_worker
        self._cond = threading.Condition()  # every attribute below; never held by a child
        self._start_lock = threading.Lock()
        self._workers: dict[int, _Worker] = {}
        self._requests: list[_Spawn] = []
        # (when, signal, past the deadline) to send every worker while stopping
        self._signals: list[tuple[float, int, bool]] = []
        self._stopping = False
        self._starting = False  # start() is making the listener
        self._stop_requested = False  # a stop came meanwhile
        self._forced = 0  # workers still running at the stop's deadline
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._stopped.set()
        self._ready = threading.Event()
        self._crashes = 0
        self._retired = dict.fromkeys(_COUNTERS, 0)
        self._shared: _core.SharedStats | None = None
        self._free: list[int] = []
        self._lfd = -1
        self._dev = self._ino = 0
        self._unlink_path: bytes | None = None
        self._wake_r = self._wake_w = -1
        self._orphan_r = self._orphan_w = -1  # parent-death pipe (no PR_SET_PDEATHSIG)
        self._selector: selectors.BaseSelector | None = None
        self._parent_pid = os.getpid()
        self._notifier: systemd.Notifier | None = None
        self._next_tick = math.inf  # when the supervisor next calls the notifier's tick()

    # ------------------------------------------------------------------ state

    @property
    def is_running(self) -> bool:
        return self._ready.is_set() and not self._stopping and not self._stopped.is_set()

    def stats(self) -> dict[str, int]:
        """The sum over every worker, live or ended, plus the parent's own counters."""
        total = self._server._stats.snapshot()
        with self._cond:
            for key in _COUNTERS:
                total[key] += self._retired[key]
            views = [w.stats for w in self._workers.values()]
        for view in views:
            for key, value in view.snapshot().items():
                total[key] += value
        return total

    def worker_stats(self) -> list[dict[str, Any]]:
        """One row per live worker: slot, pid, state, and its counters."""
        with self._cond:
            workers = sorted(self._workers.values(), key=lambda w: w.started)
        rows: list[dict[str, Any]] = []
        for w in workers:
            state = "stopping" if w.retiring and not w.spare else "ready" if w.ready else "starting"
            rows.append({"slot": w.slot, "pid": w.pid, "state": state, **w.stats.snapshot()})
        return rows

    def wait(self, timeout: float | None) -> bool:
        return self._stopped.wait(timeout)

    # ------------------------------------------------------------------ starting

    def start(self) -> None:
        """Create the listener, fork the workers, return once every one
        accepts.  A no-op while running; a stop called meanwhile wins (then
        this returns with the server stopped, or raises what stopped it)."""
        with self._start_lock:
            if not self._stopped.is_set():
                return
            with self._cond:
                self._starting = True
                self._stop_requested = False
            try:
                self._open()
            finally:
                with self._cond:
                    self._starting = False
            if self._stopped.is_set():  # a stop came while the listener was made
                return
            self._thread = threading.Thread(
                target=self._supervise, name=f"unixsrv workers {self._server.path}"
            )
            self._thread.start()
        try:
            self._wait_started()
        except BaseException:  # Ctrl-C while the workers start: none is left running
            self.stop(graceful=False, timeout=0.0)
            raise

    def listen(self) -> None:
        """Create the listening socket now; start() forks the workers later
        (unixsrv.socketserver binds in ``server_bind()``, serves in
        ``serve_forever()``).  A no-op if it exists or the server runs; a
        stop() before start() closes it (and removes the file)."""
        with self._start_lock:
            with self._cond:
                if self._lfd >= 0 or not self._stopped.is_set():
                    return
                self._starting = True
                self._stop_requested = False
            try:
                listener = self._new_listener()
            finally:
                with self._cond:
                    self._starting = False
            with self._cond:
                if self._stop_requested:
                    _close_listener(*listener)
                    return
                self._lfd, self._unlink_path, self._dev, self._ino = listener

    @property
    def listen_fileno(self) -> int:
        """The listening socket's fd in the parent (-1 when there is none)."""
        return self._lfd

    def _new_listener(self) -> tuple[int, bytes | None, int, int]:
        """(fd, unlink_path, dev, ino) of a new listener made the unixsrv
        way, or a duplicate of the inherited ``config.fd`` (socket
        activation: systemd's socket, never unlinked)."""
        from .server import _listener_args

        cfg = self._server.config
        if cfg.fd is not None:
            return os.dup(cfg.fd), None, 0, 0
        args = _listener_args(cfg)
        unlink_path = args.pop("unlink_path")
        lfd, dev, ino = _core.open_listener(backlog=cfg.backlog, **args)
        return lfd, unlink_path, dev, ino

    def _open(self) -> None:
        """The listener (listen()'s, or a new one), the shared counters and
        the wakeup pipe; on failure (or a stop requested meanwhile) nothing
        is left open or on disk."""
        with self._cond:
            listener = (self._lfd, self._unlink_path, self._dev, self._ino)
            self._lfd = -1  # ours now: a stop meanwhile only sets _stop_requested
        if listener[0] < 0:
            listener = self._new_listener()
        try:
            shared = _core.SharedStats(2 * self._count + 1)  # room for reload()'s overlap
            wake_r, wake_w = os.pipe()
        except BaseException:
            _close_listener(*listener)
            raise
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        cfg = self._server.config
        notifier = systemd.Notifier() if cfg.sd_notify and systemd.Notifier.wanted() else None
        with self._cond:
            if self._stop_requested:
                _close_listener(*listener)
                os.close(wake_r)
                os.close(wake_w)
                return
            self._lfd, self._unlink_path, self._dev, self._ino = listener
            self._notifier = notifier
            self._next_tick = math.inf
            self._shared = shared
            self._free = list(range(len(shared)))[::-1]
            self._wake_r, self._wake_w = wake_r, wake_w
            self._stopping = False
            self._forced = 0
            self._failure = None
            self._crashes = 0
            self._signals = []
            self._requests = [_Spawn(0.0) for _ in range(self._count)]
            self._ready.clear()
            self._stopped.clear()

    def _wait_started(self) -> None:
        with self._cond:
            while (
                not self._stopped.is_set()
                and sum(w.ready for w in self._workers.values()) < self._count
            ):
                self._cond.wait()
            failure = self._failure
            ok = not self._stopped.is_set() and not self._stopping
            if ok:
                self._ready.set()
                if self._notifier is not None:  # READY=1, from the supervisor thread
                    self._next_tick = 0.0
                    self._wake()
        if ok:
            self._server._info(
                f"starting listening socket 'unix {self._server.path}' ({self._count} workers)"
            )
            return
        self._stopped.wait()
        if failure is not None:
            raise failure

    def serve_forever(self, cancel: threading.Event | None) -> None:
        self.start()
        watcher = None
        if cancel is not None:
            watcher = threading.Thread(target=self._watch_cancel, args=(cancel,), daemon=True)
            watcher.start()
        try:
            self._stopped.wait()
        except BaseException:  # Ctrl-C: stop the workers, as a single server does
            self.stop(graceful=False, timeout=0.0)
            raise
        with self._cond:
            failure = self._failure
        if failure is not None:
            raise failure

    def _watch_cancel(self, cancel: threading.Event) -> None:
        while not self._stopped.is_set():
            if cancel.wait(0.05):
                self.stop(graceful=False, timeout=0.0)
                return

    # ------------------------------------------------------------------ stopping

    def stop(self, *, graceful: bool, timeout: float) -> None:
        """Stop every worker: SIGTERM (graceful) or SIGQUIT now, SIGQUIT at
        the deadline, SIGKILL ``STOP_GRACE`` later; wait for them all."""
        now = time.monotonic()
        deadline = now + timeout
        with self._cond:
            if self._stopped.is_set():
                self._stop_requested = self._starting  # start() or listen() undoes itself
                if not self._starting and self._lfd >= 0:  # listen() without start()
                    lfd, self._lfd = self._lfd, -1
                    _close_listener(lfd, self._unlink_path, self._dev, self._ino)
                return
            closed = self._begin_stop(signal.SIGTERM if graceful else signal.SIGQUIT)
            if not math.isinf(timeout):
                self._signals.append((deadline, signal.SIGQUIT, True))
                self._signals.append((deadline + STOP_GRACE, signal.SIGKILL, True))
            self._wake()
        if closed:
            self._server._info(f"closing listen socket 'unix {self._server.path}'")
        self._stopped.wait(None if math.isinf(timeout) else timeout + 3 * STOP_GRACE)
        with self._cond:
            forced = self._forced
        if graceful and forced:
            raise ShutdownTimeoutError(
                f"{forced} worker(s) still draining after {timeout:g} s were stopped"
            )

    def _begin_stop(self, first: int) -> bool:
        """With _cond held: no more forks, the socket file removed and our
        listener closed, ``first`` sent to every worker.  True if this call
        closed the listener (the caller reports it, without the lock)."""
        self._signals.insert(0, (0.0, first, False))
        if self._stopping:
            return False
        self._stopping = True
        self._requests.clear()
        self._next_tick = math.inf
        if self._notifier is not None:
            self._notifier.stopping()
        if self._lfd < 0:
            return False
        lfd, self._lfd = self._lfd, -1
        _close_listener(lfd, self._unlink_path, self._dev, self._ino)
        return True

    # ------------------------------------------------------------------ reload

    def reload(self, timeout: float) -> None:
        """Replace every worker, one at a time, without refusing a connection."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self.is_running:
                raise ServerClosedError("the server is not running")
            old = [w for w in self._workers.values() if not w.retiring and not w.spare]
            notifier = self._notifier
        self._server._info(f"reloading {len(old)} workers")
        if notifier is not None:
            notifier.reloading()
        try:
            self._replace(old, deadline)
        finally:
            if notifier is not None:
                notifier.reloaded()
        self._server._info(f"reloaded {len(old)} workers")

    def _replace(self, old: list[_Worker], deadline: float) -> None:
        """reload(): each of ``old`` replaced by a new worker that accepts
        before the old one is asked to retire."""
        for w in old:
            with self._cond:
                if self._stopping:
                    raise ServerClosedError("the server stopped during reload()")
                if not w.ended:  # else it died meanwhile: already replaced
                    self._replace_one(w, deadline)

    def _replace_one(self, w: _Worker, deadline: float) -> None:
        """_replace() for one old worker, with _cond held."""
        w.retiring = True  # the new worker is its replacement, even if it dies now
        request = _Spawn(0.0, spare=True)
        self._requests.append(request)
        self._wake()
        self._cond.wait_for(
            lambda: (
                self._stopping
                or request.failed is not None
                or (request.worker is not None and (request.worker.ready or request.worker.ended))
            ),
            deadline - time.monotonic(),
        )
        new = request.worker
        if new is None or not new.ready:
            if w.ended:  # it died meanwhile (not replaced: it was retiring): replace it now
                self._requests.append(_Spawn(time.monotonic()))
                self._wake()
            else:
                w.retiring = False  # it stays
            if new is not None and not new.ended:
                new.retiring = True  # too late: it goes
                _kill(new.pid, signal.SIGQUIT)
            raise WorkerError("reload(): a new worker did not start") from request.failed
        new.spare = False
        if not w.ended:
            _kill(w.pid, signal.SIGUSR1)
        # Until the old worker has stopped accepting, a client may
        # still land on it: wait for its word (or its end), so that
        # once reload() returns every new connection goes to the new
        # workers.  Bounded by the deadline; it keeps serving what it
        # accepted until then (RETIRE_LINGER, then it drains).
        if not self._cond.wait_for(
            lambda: w.stopped_accepting or w.ended or self._stopping,
            deadline - time.monotonic(),
        ):
            raise WorkerError(f"reload(): worker {w.slot} did not stop accepting in time")

    # ------------------------------------------------------------------ the supervisor thread

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # full: a wakeup is pending anyway

    def _supervise(self) -> None:
        self._selector = selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while True:
                with self._cond:
                    if self._stopping and not self._workers:
                        break
                    now = time.monotonic()
                    due = [r for r in self._requests if r.at <= now]
                    self._requests = [r for r in self._requests if r.at > now]
                    for entry in [e for e in self._signals if e[0] <= now]:
                        self._signals.remove(entry)
                        self._send(entry[1], late=entry[2])
                    if now >= self._next_tick:
                        self._tick(now)
                    wait = min(
                        [r.at for r in self._requests]
                        + [e[0] for e in self._signals]
                        + [now + _REAP_EVERY, self._next_tick]
                    )
                for request in due:
                    self._fork(request)
                for key, _ in selector.select(max(wait - time.monotonic(), 0.0)):
                    if key.fd == self._wake_r:
                        while _read(self._wake_r):
                            pass
                    else:
                        self._status(key.data)
                self._reap()
        except BaseException as exc:  # a bug here must not leave workers unsupervised
            logger.exception("unixsrv %s: the worker supervisor failed", self._server.path)
            with self._cond:
                self._failure = self._failure or exc
                self._begin_stop(signal.SIGKILL)  # the failure itself is logged above
                self._send(signal.SIGKILL, late=False)
            for w in list(self._workers.values()):
                _waitpid(w.pid, 0)
        finally:
            selector.close()
            with self._cond:
                self._selector = None
                for fd in (self._wake_r, self._wake_w, self._orphan_r, self._orphan_w):
                    if fd >= 0:
                        os.close(fd)
                self._wake_r = self._wake_w = self._orphan_r = self._orphan_w = -1
                for w in self._workers.values():
                    self._close_status(w)
                self._workers.clear()
                self._shared = None
                self._thread = None
                self._stopped.set()
                self._cond.notify_all()

    def _tick(self, now: float) -> None:
        """With _cond held, on the supervisor thread: the notifier's tick
        (READY=1 the first time, then WATCHDOG=1 and STATUS=) while at least
        one worker is ready: a parent whose workers all died or hang in
        their start stops the pings, and systemd's watchdog acts."""
        assert self._notifier is not None
        self._next_tick = now + self._notifier.interval
        if any(w.ready and not w.ended for w in self._workers.values()):
            self._notifier.tick(sum(w.stats.open for w in self._workers.values() if not w.ended))

    def _send(self, sig: int, *, late: bool) -> None:
        """With _cond held: send ``sig`` to every live worker; ``late``: the
        stop's deadline passed (those workers did not finish in time)."""
        live = [w for w in self._workers.values() if not w.ended]
        if late and live:
            self._forced = max(self._forced, len(live))
        for w in live:
            w.retiring = True
            _kill(w.pid, sig)

    def _fork(self, request: _Spawn) -> None:
        """Fork one worker.  _cond is held across fork(): no stop can close
        the listener under a child that is about to adopt it, and the child
        never touches _cond."""
        with self._cond:
            if self._stopping:
                request.failed = ServerClosedError("the server is stopping")
                self._cond.notify_all()
                return
            if not self._free:  # every slot is taken by draining workers: try again soon
                request.at = time.monotonic() + _REAP_EVERY
                self._requests.append(request)
                return
            assert self._shared is not None
            if self._orphan_w < 0 and not sys.platform.startswith("linux"):
                self._orphan_r, self._orphan_w = os.pipe()
            slot = self._free.pop()
            self._shared.clear(slot)
            status_r, status_w = os.pipe()
            try:
                # The child runs only its own objects (a new Server and loop),
                # so Python 3.12's warning about forking with threads does not
                # apply to it.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    pid = os.fork()
            except OSError as exc:
                os.close(status_r)
                os.close(status_w)
                self._free.append(slot)
                request.failed = exc
                self._cond.notify_all()
                failed: OSError | None = exc
            else:
                if pid == 0:
                    self._child(slot, status_r, status_w)  # never returns
                failed = None
                os.close(status_w)
                worker = _Worker(slot, pid, status_r, self._shared.slot(slot), request.spare)
                self._workers[pid] = worker
                request.worker = worker
        if failed is not None:
            self._server._report(WorkerError(f"cannot fork a worker: {failed}"))
            if not request.spare:
                with self._cond:
                    self._requests.append(_Spawn(time.monotonic() + BACKOFF_MAX))
            return
        assert self._selector is not None
        self._selector.register(status_r, selectors.EVENT_READ, worker)
        self._server._info(f"worker {slot} started (pid {pid})")

    def _status(self, worker: _Worker) -> None:
        data = _read(worker.status_fd)
        with self._cond:
            if data:
                worker.ready = worker.ready or _READY in data
                worker.stopped_accepting = worker.stopped_accepting or _RETIRED in data
                self._cond.notify_all()
                return
            self._close_status(
                worker
            )  # EOF: it is ending; _reap collects it (now or within _REAP_EVERY)

    def _close_status(self, worker: _Worker) -> None:
        if worker.status_fd >= 0:
            if self._selector is not None:
                self._selector.unregister(worker.status_fd)
            os.close(worker.status_fd)
            worker.status_fd = -1

    def _reap(self) -> None:
        # waitpid under _cond, where every kill() is sent and checks
        # `ended`: once reaped, the pid may belong to another process.
        ended = []
        with self._cond:
            for pid, w in self._workers.items():
                status = _waitpid(pid, os.WNOHANG)
                if status is not None:
                    w.ended = True
                    ended.append((pid, status))
        for pid, status in ended:
            self._ended(pid, status)

    def _ended(self, pid: int, status: int) -> None:
        now = time.monotonic()
        with self._cond:
            w = self._workers.pop(pid)
            w.ended = True
            self._close_status(w)
            final = w.stats.snapshot()
            for key in _COUNTERS:
                if key != "open":
                    self._retired[key] += final[key]
            self._retired["closed"] += final["open"]  # its connections died with it
            self._free.append(w.slot)
            expected = w.retiring or self._stopping
            replace = not expected and not w.spare
            if not expected:
                quick = not w.ready or now - w.started < MIN_UPTIME
                self._crashes = self._crashes + 1 if quick else 1
            crash_loop = not expected and self._crashes >= CRASH_LOOP_LIMIT
            if replace and not crash_loop:
                delay = (
                    0.0
                    if self._crashes <= 1
                    else min(BACKOFF_FIRST * 2 ** (self._crashes - 2), BACKOFF_MAX)
                )
                self._requests.append(_Spawn(now + delay))
            self._cond.notify_all()
        how = _describe(status)
        if expected:
            self._server._info(f"worker {w.slot} (pid {pid}) {how}")
            return
        self._server._report(WorkerError(f"worker {w.slot} (pid {pid}) {how}; it is replaced"))
        if crash_loop:
            failure = WorkerCrashLoopError(
                f"{self._crashes} workers in a row ended within {MIN_UPTIME:g} s of their start"
                f" (the last {how}): stopping the server"
            )
            with self._cond:
                self._failure = failure
                closed = self._begin_stop(signal.SIGQUIT)
                self._signals.append((time.monotonic() + STOP_GRACE, signal.SIGKILL, False))
            if closed:
                self._server._info(f"closing listen socket 'unix {self._server.path}'")
            self._server._report(failure)

    # ------------------------------------------------------------------ in the worker

    def _child(self, slot: int, status_r: int, status_w: int) -> None:
        """The worker process, from fork() to os._exit(): never returns into
        the supervisor's frames it inherited."""
        code = 1
        try:
            code = self._worker_main(slot, status_r, status_w)
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError, AttributeError):
                    pass
            os._exit(code)

    def _worker_main(self, slot: int, status_r: int, status_w: int) -> int:
        # Signals are read from a wakeup pipe and acted on here, on this
        # thread, rather than in Python-level handlers: a process-directed
        # signal goes to any thread of the worker (signal(7)), and when
        # another thread gets it, nothing interrupts the read below; on
        # Python 3.13 the handler then does not run either in a process
        # forked from a thread that is not the main one (the supervisor's),
        # so the worker ignored SIGTERM now and then.  CPython's C-level
        # handler writes each signal's number to the pipe, whichever thread
        # receives it.  The pipe also replaces a wakeup fd the parent set
        # (unixsrv serve reads its own stop signals from one): ours must not
        # reach the parent's pipe.
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        if not _core.exit_with_parent(signal.SIGTERM):
            threading.Thread(target=_watch_parent, args=(self._orphan_r,), daemon=True).start()
        if os.getppid() != self._parent_pid:  # the parent died before the prctl
            return 0
        # The supervisor's fds are not the worker's (the other workers'
        # status pipes, the wakeup pipe, the parent-death pipe's write end).
        inherited = [status_r, self._wake_r, self._wake_w, self._orphan_w]
        inherited += [w.status_fd for w in self._workers.values()]
        for fd in inherited:
            if fd >= 0:
                os.close(fd)
        if self._selector is not None:
            self._selector.close()
        assert self._shared is not None
        worker = self.make_worker(self._shared.slot(slot), self._lfd)
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGQUIT):
            signal.signal(signum, _recorded_in_the_pipe)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        worker.start()
        os.write(status_w, _READY)

        def stopped() -> None:
            worker.wait()
            os.write(wake_w, b"\0")  # 0 is no signal number: it only wakes the read

        threading.Thread(target=stopped, daemon=True).start()
        while not worker.wait(0):
            for number in os.read(wake_r, 64):
                if number in (signal.SIGTERM, signal.SIGUSR1):
                    linger = RETIRE_LINGER if number == signal.SIGUSR1 else 0.0
                    threading.Thread(
                        target=_retire, args=(worker, linger, status_w), daemon=True
                    ).start()
                elif number == signal.SIGQUIT:
                    threading.Thread(target=worker.close, daemon=True).start()
        return 0


def _recorded_in_the_pipe(signum: int, frame: object) -> None:
    """A Python-level signal handler with nothing to do: installing it only
    replaces the default action (death, KeyboardInterrupt); CPython's
    C-level handler has written the signal's number to the wakeup fd
    (``signal.set_wakeup_fd``), whose reader acts on it (a worker's main
    loop here, ``unixsrv serve``'s main thread in unixsrv.cli)."""


def _close_listener(lfd: int, unlink_path: bytes | None, dev: int, ino: int) -> None:
    """Remove the socket file if it is still ours, then close the listener
    (in this order: while it is open its inode number cannot be reused by a
    successor's socket file)."""
    try:
        if unlink_path is not None:
            _core.unlink_if_same(unlink_path, dev, ino)
    finally:
        os.close(lfd)


def _retire(worker: PreforkWorker, linger: float, status_w: int) -> None:
    """SIGTERM (``linger`` 0) or SIGUSR1 in a worker: stop accepting (and
    tell the parent so on the status pipe), dispatch what already arrived on
    the connections accepted until then, serve on while connections are
    open for at most ``linger`` seconds, then drain."""
    try:
        worker.stop_accepting()
    except ServerClosedError:
        pass  # not running (any more): shutdown() below is a no-op
    with contextlib.suppress(OSError):  # the parent is gone: nobody waits for it
        os.write(status_w, _RETIRED)
    end = time.monotonic() + linger
    while worker.open_connections and time.monotonic() < end:
        time.sleep(0.01)  # bounded by linger; the clients' closes are not signalled to this thread
    try:
        worker.shutdown(WORKER_GRACE)
    except ShutdownTimeoutError as exc:
        logger.warning("worker %d: %s", os.getpid(), exc)


def _watch_parent(fd: int) -> None:
    """A worker's thread where PR_SET_PDEATHSIG does not exist: the read end
    of a pipe whose write end only the parent holds reaches EOF when the
    parent ends; then the worker stops as on SIGTERM."""
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:
            continue
    os.kill(os.getpid(), signal.SIGTERM)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 64)
    except BlockingIOError:
        return b""


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it ended; the supervisor reaps it


def _waitpid(pid: int, flags: int) -> int | None:
    """The wait status of our child ``pid`` if it ended, else None."""
    try:
        done, status = os.waitpid(pid, flags)
    except ChildProcessError:
        return 0  # already reaped elsewhere (a SIGCHLD handler): treat as a clean end
    return status if done == pid else None


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
