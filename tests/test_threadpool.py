"""ThreadPool (src/unixsrv/threadpool.py): the threads of the blocking handler model.

docs/design.md "Precise semantics / Blocking model threads": every accepted
connection gets a worker at once (the pool grows on demand and reuses idle
threads); a handler never waits for a free worker.  golib runs one goroutine
per connection (spec b.5), so no golib handler ever queues either.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import DEADLINE, connect, fork_quietly, reap, recv_until_eof, wait_until
from unixsrv.threadpool import ThreadPool


class Recorder:
    """A ``run`` for ThreadPool: calls each job (a callable), records its thread
    and any exception (``run`` itself must never raise)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idents: list[int] = []
        self.native_ids: list[int] = []
        self.errors: list[BaseException] = []
        self.done = 0

    def __call__(self, job: Callable[[], Any]) -> None:
        with self.lock:
            self.idents.append(threading.get_ident())
            self.native_ids.append(threading.get_native_id())
        try:
            job()
        except BaseException as exc:
            with self.lock:
                self.errors.append(exc)
        finally:
            with self.lock:
                self.done += 1


def thread_alive(native_id: int) -> bool:
    """True while the OS thread still exists in this process (Linux:
    /proc/self/task/<tid>).  Without /proc (macOS) the nearest portable
    evidence: a Python thread with that native id is still alive."""
    if os.path.isdir("/proc/self/task"):
        return os.path.exists(f"/proc/self/task/{native_id}")
    return any(t.native_id == native_id for t in threading.enumerate())


def release_all(pool: ThreadPool) -> None:
    """Let every parked worker go and wait until no thread is left."""
    pool.release_idle()
    wait_until(lambda: pool.threads == 0)


def wait_threads_gone(rec: Recorder) -> None:
    """Wait until every OS thread that ran one of the jobs has exited."""
    for tid in rec.native_ids:
        wait_until(lambda tid=tid: not thread_alive(tid))


def make_pool(idle_timeout: float = 60.0) -> tuple[ThreadPool, Recorder]:
    rec = Recorder()
    return ThreadPool(rec, idle_timeout=idle_timeout), rec


def test_new_pool_is_empty():
    """No thread exists before the first job."""
    pool, _ = make_pool()
    assert pool.threads == 0
    assert pool.idle == 0


def test_all_jobs_run_concurrently_when_every_worker_is_busy():
    """docs/design.md: a job runs at once even when all existing workers are busy.
    N jobs that each block until all N are running meet at a barrier; with
    any queueing the barrier would time out."""
    n = 12
    pool, rec = make_pool()
    barrier = threading.Barrier(n + 1, timeout=DEADLINE)
    release = threading.Event()

    def job():
        barrier.wait()
        assert release.wait(DEADLINE)

    try:
        for _ in range(n):
            pool.submit(job)
        barrier.wait()  # all n jobs are running at the same time
        assert pool.threads == n
        assert pool.idle == 0
        assert len(set(rec.idents)) == n
    finally:
        release.set()
        wait_until(lambda: rec.done == n)
        release_all(pool)
    assert rec.errors == []


def test_grows_while_busy_then_parks():
    """A busy pool grows by exactly one thread per extra job; finished workers park."""
    pool, rec = make_pool()
    gates = [threading.Event() for _ in range(3)]
    running = threading.Semaphore(0)

    def blocker(gate):
        def job():
            running.release()
            assert gate.wait(DEADLINE)

        return job

    try:
        for i, gate in enumerate(gates, start=1):
            pool.submit(blocker(gate))
            assert running.acquire(timeout=DEADLINE)
            assert pool.threads == i
            assert pool.idle == 0
        for gate in gates:
            gate.set()
        wait_until(lambda: pool.idle == 3)
        assert pool.threads == 3
    finally:
        for gate in gates:
            gate.set()
        release_all(pool)
    assert rec.errors == []


def test_parked_thread_is_reused():
    """After a job finishes and its worker parks, the next submit runs on that
    same thread instead of creating a new one."""
    pool, rec = make_pool()
    try:
        pool.submit(lambda: None)
        wait_until(lambda: pool.idle == 1)
        assert pool.threads == 1
        first = rec.idents[0]

        inside = threading.Event()
        release = threading.Event()

        def job():
            inside.set()
            assert release.wait(DEADLINE)

        pool.submit(job)
        assert inside.wait(DEADLINE)
        assert pool.threads == 1  # no thread created
        assert pool.idle == 0  # the parked one is busy again
        assert rec.idents[1] == first
        release.set()
        wait_until(lambda: pool.idle == 1)
        assert pool.threads == 1
    finally:
        release_all(pool)
    assert rec.errors == []
    assert rec.done == 2


def test_many_sequential_jobs_use_one_thread():
    """Sequential jobs never accumulate threads."""
    pool, rec = make_pool()
    try:
        for i in range(50):
            pool.submit(lambda: None)
            wait_until(lambda i=i: rec.done == i + 1 and pool.idle == 1)
            assert pool.threads == 1
        assert len(set(rec.idents)) == 1
    finally:
        release_all(pool)


def test_idle_threads_exit_after_idle_timeout():
    """A parked worker exits after idle_timeout seconds without work, and the
    OS thread really ends."""
    pool, rec = make_pool(idle_timeout=0.05)
    gates = threading.Event()
    started = threading.Semaphore(0)

    def job():
        started.release()
        assert gates.wait(DEADLINE)

    for _ in range(3):
        pool.submit(job)
    for _ in range(3):
        assert started.acquire(timeout=DEADLINE)
    assert pool.threads == 3
    gates.set()
    wait_until(lambda: pool.threads == 0)
    assert pool.idle == 0
    assert rec.done == 3
    wait_threads_gone(rec)
    assert rec.errors == []


def test_pool_works_again_after_idle_exit():
    """After every worker timed out, a new job starts a new thread."""
    pool, rec = make_pool(idle_timeout=0.05)
    pool.submit(lambda: None)
    wait_until(lambda: rec.done == 1 and pool.threads == 0)
    ran = threading.Event()
    pool.submit(ran.set)
    assert ran.wait(DEADLINE)
    wait_until(lambda: pool.threads == 0)
    assert rec.done == 2
    assert rec.errors == []


def test_release_idle_ends_parked_threads():
    """release_idle() lets every parked thread exit now (long idle_timeout)."""
    pool, rec = make_pool(idle_timeout=600.0)
    for _ in range(4):
        pool.submit(lambda: None)
    wait_until(lambda: rec.done == 4 and pool.idle == pool.threads)
    parked = pool.threads
    assert 1 <= parked <= 4
    pool.release_idle()
    assert pool.idle == 0
    wait_until(lambda: pool.threads == 0)
    wait_threads_gone(rec)
    assert rec.errors == []


def test_release_idle_leaves_busy_workers_alone():
    """Busy workers keep running through release_idle() and finish their job."""
    pool, rec = make_pool(idle_timeout=600.0)
    pool.submit(lambda: None)
    wait_until(lambda: pool.idle == 1)

    inside = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    def busy():
        inside.set()
        assert release.wait(DEADLINE)
        finished.set()

    pool.submit(busy)  # takes the parked thread
    assert inside.wait(DEADLINE)
    pool.submit(lambda: None)  # a second thread that parks
    wait_until(lambda: pool.threads == 2 and pool.idle == 1)

    pool.release_idle()
    wait_until(lambda: pool.threads == 1)  # only the parked one left
    assert not finished.is_set()
    release.set()
    assert finished.wait(DEADLINE)
    wait_until(lambda: pool.idle == 1)
    assert pool.threads == 1
    release_all(pool)
    assert rec.errors == []
    assert rec.done == 3


def test_release_idle_on_empty_pool_is_harmless():
    """release_idle() with nothing parked is a no-op; the pool still works."""
    pool, rec = make_pool()
    pool.release_idle()
    ran = threading.Event()
    pool.submit(ran.set)
    assert ran.wait(DEADLINE)
    pool.release_idle()
    wait_until(lambda: pool.threads == 0 and rec.done == 1)


def test_submit_from_inside_a_job():
    """A job may submit another job (a handler spawning work) without deadlock."""
    pool, rec = make_pool()
    inner = threading.Event()

    def outer():
        pool.submit(inner.set)
        assert inner.wait(DEADLINE)

    try:
        pool.submit(outer)
        assert inner.wait(DEADLINE)
        wait_until(lambda: rec.done == 2)
        assert rec.errors == []
    finally:
        release_all(pool)


def test_close_ends_threads_after_their_job_and_join_waits_for_them():
    """close(): parked threads exit now, a busy one once its job is done
    (instead of parking); join() returns once no thread is left; a job
    submitted after close() still runs."""
    pool, rec = make_pool(idle_timeout=600.0)
    pool.submit(lambda: None)
    wait_until(lambda: pool.idle == 1)
    inside, release = threading.Event(), threading.Event()

    def busy() -> None:
        inside.set()
        assert release.wait(DEADLINE)

    pool.submit(busy)  # the parked thread takes it
    pool.submit(lambda: None)  # a second thread, parked afterwards
    assert inside.wait(DEADLINE)
    wait_until(lambda: pool.threads == 2 and pool.idle == 1)
    pool.close()
    assert not pool.join(0.05)  # the busy one is still working
    wait_until(lambda: pool.threads == 1)  # the parked one left at once
    release.set()
    assert pool.join(DEADLINE) and pool.threads == 0 and pool.idle == 0
    late = threading.Event()
    pool.submit(late.set)
    assert late.wait(DEADLINE) and pool.join(DEADLINE)
    wait_threads_gone(rec)
    assert rec.errors == [] and rec.done == 4


# ---------------------------------------------------------------------- a handler that forks


def _forking_handler(child_ends: str) -> Callable[[Any], None]:
    """A blocking handler that forks; the child ends the handler as
    ``child_ends`` says, the parent sends the child's pid to the client."""

    def handler(conn: Any) -> None:
        pid = fork_quietly()
        if pid == 0:
            if child_ends == "sys.exit(8)":
                sys.exit(8)
            if child_ends == "sys.exit('why')":
                sys.exit("why")
            if child_ends == "raises":
                raise RuntimeError("child handler failed")
            return  # "returns"
        conn.write(str(pid).encode())

    return handler


@pytest.mark.parametrize(
    ("child_ends", "status"),
    [("sys.exit(8)", 8), ("sys.exit('why')", 1), ("raises", 1), ("returns", 0)],
)
def test_forked_child_exits_at_once_with_its_status(make_server, sock_path, child_ends, status):
    """Issue 8 finding 7: a child forked by a handler exits as soon as the
    handler ends in it, with the status it asked for (sys.exit(8) -> 8, a
    message -> 1, an exception -> 1, a return -> 0), instead of parking its
    thread in the pool for the pool's idle time (30 s) and exiting 0.
    threadpool.exit_forked_child; the parent server keeps serving."""
    server = make_server(sock_path, _forking_handler(child_ends))
    began = time.monotonic()
    with connect(sock_path) as s:
        pid = int(recv_until_eof(s))
    assert reap(pid, timeout=DEADLINE) == status  # reap kills it (status -9) if it lingers
    assert time.monotonic() - began < DEADLINE / 2  # far less than the pool's 30 s idle time
    assert server.is_running
    with connect(sock_path) as s:  # the parent still serves, and forks again
        again = int(recv_until_eof(s))
    assert reap(again) == status
