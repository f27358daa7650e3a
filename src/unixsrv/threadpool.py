"""ThreadPool: the threads of the blocking handler model.

Not to be confused with ``Server(workers=N)``, which serves from worker
*processes* (:mod:`unixsrv.prefork`): this pool is the threads of one process.

Every submitted job gets a thread at once: an idle thread if there is one,
otherwise a new one, so a handler never waits for a free worker.  A thread
that finishes a job parks for the next one and exits after ``idle_timeout``
seconds without work.

Workers are raw ``_thread`` threads rather than ``threading.Thread``: a
``Thread`` object with its locks and events costs about 10 KB more per
thread, and a server with 10,000 parked handlers pays that 10,000 times.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = ["ThreadPool", "exit_forked_child"]

logger = logging.getLogger("unixsrv.threadpool")


class _Worker:
    __slots__ = ("job", "wake")

    def __init__(self) -> None:
        self.wake = _thread.allocate_lock()
        self.wake.acquire()
        self.job: Any = None


class ThreadPool:
    """Run ``run(job)`` for each submitted job on its own (reused) thread.

    ``run`` must not raise: it is the server's own wrapper, which reports
    handler errors itself.
    """

    def __init__(self, run: Callable[[Any], None], idle_timeout: float = 30.0) -> None:
        self._run = run
        self._idle_timeout = idle_timeout
        self._lock = _thread.allocate_lock()
        self._idle: list[_Worker] = []
        self._threads = 0
        self._closed = False
        self._gone = threading.Condition(self._lock)  # notified when _threads drops to 0

    @property
    def threads(self) -> int:
        """Worker threads alive now (busy or parked)."""
        return self._threads

    @property
    def idle(self) -> int:
        """Parked worker threads."""
        return len(self._idle)

    def submit(self, job: Any) -> None:
        """Start ``run(job)`` now, on a parked thread or a new one."""
        with self._lock:
            if self._idle:
                worker = self._idle.pop()  # the most recently parked: its stack is warm
                worker.job = job
                worker.wake.release()
                return
            self._threads += 1
        worker = _Worker()
        worker.job = job  # not a thread argument: those live as long as the thread
        try:
            _thread.start_new_thread(self._main, (worker,))
        except BaseException:
            with self._lock:
                self._threads -= 1
            raise

    def close(self) -> None:
        """Let every thread exit once it is done with its job instead of
        parking (parked ones now).  A later submit() still runs its job,
        on a thread that then exits."""
        with self._lock:
            self._closed = True
        self.release_idle()

    def join(self, timeout: float | None = None) -> bool:
        """After close(): wait until every thread has exited; True if they have."""
        with self._gone:
            return self._gone.wait_for(lambda: self._threads == 0, timeout)

    def release_idle(self) -> None:
        """Let every parked thread exit now (busy ones keep working)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.job = None
            worker.wake.release()

    def _main(self, me: _Worker) -> None:
        job, me.job = me.job, None
        try:
            while job is not None:
                self._run(job)
                job = None
                with self._lock:
                    if self._closed:
                        return
                    self._idle.append(me)
                if not me.wake.acquire(timeout=self._idle_timeout):
                    with self._lock:
                        try:
                            self._idle.remove(me)
                            return
                        except ValueError:
                            pass  # submit() picked us just now: its release is coming
                    me.wake.acquire()
                job, me.job = me.job, None
        finally:
            with self._lock:
                self._threads -= 1
                if self._threads == 0:
                    self._gone.notify_all()


def exit_forked_child(ended: BaseException | None) -> NoReturn:
    """End a process that a job forked, now, with the status its job asked for.

    A handler that calls os.fork() leaves the child running the rest of the
    job on a copy of the worker thread, the child's only thread.  Parking
    that thread in the pool would keep the child alive for the pool's idle
    time and then end it with status 0 whatever it asked for, so the server
    calls this instead when the job ends in the child.  ``ended`` is how the
    job ended: ``None`` (returned) -> status 0; ``SystemExit`` -> its code
    as the interpreter maps it (None -> 0, an int as is, anything else
    printed to stderr -> 1); any other exception (already reported) -> 1.
    Buffered output is flushed, then os._exit(): atexit handlers and other
    cleanup belong to the parent, as with socketserver.ForkingMixIn and
    multiprocessing's forked children.
    """
    status = 0
    if isinstance(ended, SystemExit):
        code = ended.code
        if isinstance(code, int):
            status = code & 0xFF
        elif code is not None:
            print(code, file=sys.stderr)
            status = 1
    elif ended is not None:
        status = 1
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(
                OSError, ValueError
            ):  # broken or closed: it must not keep the child alive
                stream.flush()
    os._exit(status)
