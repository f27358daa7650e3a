# _loop.pxi - the poll loop: one thread, the GIL released while it waits and
# while it does the per-wakeup I/O, taken once per wakeup to dispatch.
#
# Each iteration:
#   1. without the GIL: poller wait; accept until EAGAIN (bounded); recv every
#      readable connection into one shared buffer; flush pending output; run
#      the idle sweep.  Everything that needs Python becomes a rec_t.
#   2. with the GIL: turn the records into Python calls (new connections,
#      data_received, eof_received, ...), finalize closed transports, run the
#      callbacks queued by other threads, check for signals.
#
# Hosted mode (unixsrv.asyncio): the same loop is driven by the caller's
# asyncio/uvloop event loop instead of run().  That loop watches the poller fd
# (readable whenever one of our fds has an event, epoll(7) / kqueue(2) fds can
# be polled themselves) and calls run_once() for each readiness: the same two
# phases with a zero poller timeout.  Timers become the host's call_at(), and
# work queued outside a dispatch (a transport closed from a task) asks the
# host for a pass through the `kick` callable instead of waiting for an event.
#
# The connection table maps fd -> conn_t.  In the blocking model worker
# threads remove their own connection from it, so it is guarded by a mutex;
# in the event model only the loop thread touches it and the mutex is
# skipped.  The same mutex makes call_soon_threadsafe's "not closed? queue
# it and wake the loop" one step against teardown (both models).
#
# Lock order: the mutex, then the GIL.  A thread may hold the mutex while it
# waits for the GIL: _mutex_lock_with_gil waits for a busy mutex with the
# GIL released and takes the GIL back holding it.  So no thread may wait for
# the mutex while it holds the GIL (that would deadlock with such a thread):
# holding the GIL, a thread only tries the mutex.  Code under the mutex runs
# no Python code (table slots, the pending deque's append), so a thread that
# holds both never gives the GIL up before it releases the mutex.


cdef uint64_t TOKEN_WAKE = 0xFFFFFFFFFFFFFFFFULL
cdef uint64_t TOKEN_LISTEN = 0xFFFFFFFFFFFFFFFEULL
cdef int64_t NEVER = 0x7FFFFFFFFFFFFFFFLL

cdef enum:
    MAX_EVENTS = 512
    ACCEPT_BATCH = 128
    SWEEP_BATCH = 512
    # Records of one wakeup: at most two per connection event (one from the
    # flush, one from the receive), one per accept, and what the idle sweep
    # may add (it stops at SWEEP_BATCH and resumes on the next wakeup).  So
    # the record array never grows and a record is never lost.
    # Plus one for the summary of denials not logged one by one (REC_DENIED_MORE).
    RECS_CAP = 2 * MAX_EVENTS + ACCEPT_BATCH + SWEEP_BATCH + 1
    BACKOFF_MIN_MS = 10
    BACKOFF_MAX_MS = 1000
    # A denied peer is logged one by one at most DENY_LOG_BURST times per
    # DENY_LOG_WINDOW_NS; the rest are counted and reported as "N more".
    DENY_LOG_BURST = 5

cdef int64_t DENY_LOG_WINDOW_NS = 1000000000

# Idle timeouts beyond this are treated as this (about 31 years), so that
# "now + timeout" in nanoseconds can never overflow.
cdef double IDLE_MAX_S = 1e9


cdef inline int64_t _sweep_slack(int64_t idle_ns) noexcept nogil:
    """How late an idle sweep may run: 1/64 of the timeout, 1..250 ms, so
    that connections expiring close together share one sweep."""
    return min(max(idle_ns // 64, 1000000), 250000000)


cdef inline void _mutex_lock_with_gil(pthread_mutex_t *mu) noexcept:
    """Lock mu from a thread holding the GIL: try first; if it is busy, wait
    without the GIL (see Loop._lock_with_gil)."""
    if pthread_mutex_trylock(mu) != 0:
        with nogil:
            pthread_mutex_lock(mu)


cdef inline int _poll_ms_until(int64_t deadline) noexcept nogil:
    """A poller timeout for `deadline`: -1 for NEVER, 0 for now or past."""
    cdef int64_t now
    if deadline == NEVER:
        return -1
    if deadline == 0:
        return 0
    now = us_now_ns()
    if deadline <= now:
        return 0
    # Round up: waking a little late is fine, spinning early is not.
    return <int>min((deadline - now + 999999) // 1000000, 86400000)


cdef class Loop:
    """The C core of one server run: listener, poller, connection table."""

    def __cinit__(self):
        self.pfd = self.wake_r = self.wake_w = self.lfd = -1
        self.owner_pid = getpid()
        self.next_seq = 0
        self.next_sweep_ns = NEVER
        self.timer_deadline = NEVER
        self.accept_backoff_ms = BACKOFF_MIN_MS
        self.next_tick_ns = NEVER
        pthread_mutex_init(&self.mu, NULL)
        pthread_mutex_init(&self.uid_mu, NULL)
        pthread_mutex_init(&self.aq_mu, NULL)
        self.aq_r = self.aq_w = -1

    def __init__(self, *args, **kwargs):
        # new_loop() makes loops with __new__ (which skips __init__) and
        # fills them in once; a second fill would swap the table and buffers
        # under live connections, so Python gets no way to run it.
        raise TypeError("Loop objects are created by the server (unixsrv._core.new_loop), not from Python")

    cdef int _setup(self, LoopConfig config) except -1:
        cdef size_t read_size = config.read_size
        cdef bint event_model = config.factory is not None
        if config.owner is None or config.stats is None or config.callbacks is None:
            raise TypeError("this LoopConfig was not initialised (made through __new__)")
        config.owner._check(not event_model)
        if read_size > <size_t>PY_SSIZE_T_MAX // 4:
            raise OverflowError("read_size is too large")
        self.owner = config.owner
        self.stats = config.stats
        self.callbacks = config.callbacks
        self.event_model = event_model
        self.factory = config.factory
        self.idle_ns = (<int64_t>(min(config.idle_timeout, IDLE_MAX_S) * 1e9)
                        if config.idle_timeout > 0 else 0)
        self.max_conns = config.max_connections
        self.read_size = read_size
        self.high_water = config.high_water
        self.low_water = config.low_water
        self.max_wbuf = config.max_write_buffer
        self.pending = []
        self.finalizing = []
        self.display_path = ""
        self.events = <us_poll_event *>malloc(sizeof(us_poll_event) * MAX_EVENTS)
        self.recs = <rec_t *>malloc(sizeof(rec_t) * RECS_CAP)
        self.rxcap = max(4 * read_size, <size_t>(256 * 1024)) if event_model else 0
        self.rxbuf = <char *>malloc(self.rxcap) if event_model else NULL
        self.table_cap = 1024
        self.table = <conn_t **>calloc(self.table_cap, sizeof(conn_t *))
        if (self.events == NULL or self.recs == NULL or self.table == NULL
                or (event_model and self.rxbuf == NULL)):
            # All or nothing: _check_init() trusts a non-NULL table to mean
            # every buffer is there.
            free(self.events)
            free(self.recs)
            free(self.rxbuf)
            free(self.table)
            self.events = self.recs = self.table = NULL
            self.rxbuf = NULL
            raise MemoryError()
        return 0

    def __dealloc__(self):
        self._close_fds()
        free(self.events)
        free(self.recs)
        free(self.rxbuf)
        free(self.table)
        free(self.allow_uids)
        free(self.allow_gids)
        us_uid_counts_free(&self.uid_counts)
        self._drop_queue()     # a loop never torn down (its open() was never called)
        free(self.aq)
        pthread_mutex_destroy(&self.mu)
        pthread_mutex_destroy(&self.uid_mu)
        pthread_mutex_destroy(&self.aq_mu)

    # ---------------------------------------------------------------- set-up

    def open(self, address, display, unlink_path, int backlog, int mode, long gid,
             bytes dir_path, bytes base, bytes tmp_name, bint use_proc):
        """Create the wakeup pipe, the poller and the listener.  On failure
        nothing is left open or on disk."""
        self._open_with(display, unlink_path, open_listener,
                        (address, display, backlog, mode, gid, dir_path, base, tmp_name, use_proc))
        # What getsockname() reports for the listener: the final name, not
        # the temporary one it was bound under (see _listener.pxi).
        self.sockname = address if address[:1] == b"\0" else _os.fsdecode(address)

    def share_listener(self):
        """The listener is shared with other processes' loops
        (Server(workers=N)): after each accept batch, go to the back of the
        queue of pollers it wakes (see _rotate_listener)."""
        self.rotate_listener = True

    cdef void _rotate_listener(self) noexcept nogil:
        # EPOLLEXCLUSIVE wakes the first idle poller in the listener's wait
        # queue: the same worker every time while it keeps up, and the others
        # idle.  Registering again puts this one at the tail (an exclusive
        # waiter is added there, epoll_ctl(2)), so idle workers take turns.
        # If the new registration fails, the accept back-off re-adds it.
        if us_poller_modify(self.pfd, self.lfd, TOKEN_LISTEN, US_LISTEN, 0) < 0:
            return
        if us_poller_modify(self.pfd, self.lfd, TOKEN_LISTEN, 0, US_LISTEN) < 0:
            self.accept_paused = True
            self.accept_resume_ns = self.now + <int64_t>BACKOFF_MIN_MS * 1000000

    def adopt(self, int fd, object sockname, display, unlink_path, dev_t dev, ino_t ino):
        """Serve a socket the caller bound (``fd`` is a duplicate that this
        loop now owns and closes).  Its file is removed at stop only if
        ``unlink_path`` is given and still names the inode (dev, ino); it is
        never chmod-ed.  On failure fd is closed, unless the loop refused it
        at once (not initialised, or already opened)."""
        self._check_init()
        if fd < 0:
            raise ValueError(f"not a file descriptor: {fd}")
        if self.pfd >= 0 or self.closed or self.lfd >= 0:
            raise RuntimeError("this Loop was already opened")
        self.lfd = fd        # owned from here: _close_fds closes it on failure
        self._open_with(display, unlink_path, _adopted, (fd, dev, ino))
        self.sockname = sockname

    cdef int _open_with(self, display, unlink_path, make_listener, tuple args) except -1:
        cdef int fds[2]
        self._check_init()
        if self.pfd >= 0 or self.closed:
            raise RuntimeError("this Loop was already opened")
        self.display_path = display
        try:
            if us_pipe(fds) < 0:
                raise _oserror(errno)
            self.wake_r, self.wake_w = fds[0], fds[1]
            self.pfd = us_poller_create()
            if self.pfd < 0:
                raise _oserror(errno)
            if us_poller_add(self.pfd, self.wake_r, TOKEN_WAKE, US_READ) < 0:
                raise _oserror(errno)
            self.lfd, self.sock_dev, self.sock_ino = make_listener(*args)
            self.unlink_path = unlink_path
            if us_poller_add(self.pfd, self.lfd, TOKEN_LISTEN, US_LISTEN) < 0:
                raise _oserror(errno)
            self.accepting = True
        except BaseException:
            self.closed = True
            try:
                self.stop_accepting()
            finally:
                self._close_fds()
            raise
        _live_loops.add(self)
        return 0

    def set_access(self, object allowed_uids, object allowed_gids, unsigned int max_per_uid, object authorize):
        """Who may connect, checked at accept before any Python code sees
        the peer: ``allowed_uids``/``allowed_gids`` (None, or sorted
        sequences of ids: a peer is admitted if its uid is listed or its
        primary or any supplementary group is), at most ``max_per_uid`` open
        connections per uid (0 = no limit), then ``authorize(peer)`` on the
        loop thread (None = none).  Call before open()."""
        cdef uint32_t *arr
        cdef Py_ssize_t k
        self._check_init()
        if self.pfd >= 0:
            raise RuntimeError("set_access() must be called before the loop is opened")
        if authorize is not None and not callable(authorize):
            raise TypeError("authorize must be callable or None")
        for ids, is_uids in ((allowed_uids, True), (allowed_gids, False)):
            arr = NULL
            if ids is not None:
                ids = sorted(set(ids))
                arr = <uint32_t *>malloc(sizeof(uint32_t) * max(len(ids), 1))
                if arr == NULL:
                    raise MemoryError()
                for k in range(len(ids)):
                    arr[k] = <uint32_t>ids[k]
            if is_uids:
                free(self.allow_uids)
                self.allow_uids, self.n_allow_uids = arr, (0 if ids is None else len(ids))
            else:
                free(self.allow_gids)
                self.allow_gids, self.n_allow_gids = arr, (0 if ids is None else len(ids))
        self.lists_on = self.allow_uids != NULL or self.allow_gids != NULL
        self.max_per_uid = max_per_uid
        self.authorize = authorize
        self.has_authorize = authorize is not None

    def set_tick(self, double interval, object callback):
        """Run ``callback()`` on the loop thread now and then every
        ``interval`` seconds, from the loop's own dispatch (so a callback
        that blocks the loop thread delays it: a liveness signal, see
        unixsrv.systemd).  ``callback=None`` stops it."""
        self._check_init()
        if callback is not None and not (interval > 0):
            raise ValueError("interval must be > 0")
        self.tick = callback
        self.tick_ns = <int64_t>(min(interval, IDLE_MAX_S) * 1e9) if callback is not None else 0
        self.next_tick_ns = us_now_ns() if callback is not None else NEVER
        self._wake()

    @property
    def wakeup_fileno(self):
        """Write end of the wakeup pipe (for signal.set_wakeup_fd)."""
        return self.wake_w

    @property
    def is_closed(self):
        return self.closed

    @property
    def drain_waiting(self):
        return self.drain_waiting

    @drain_waiting.setter
    def drain_waiting(self, bint value):
        # Paired with _conn_closed (see there).
        with cython.critical_section(self):
            self.drain_waiting = value

    def claim_thread(self):
        """Make the calling thread this loop's thread before run() starts, so a
        signal handler that runs in between is known to be on the loop thread."""
        self.thread_id = PyThread_get_thread_ident()

    def on_loop_thread(self):
        """True when called from the thread running this loop."""
        return self.thread_id != 0 and PyThread_get_thread_ident() == self.thread_id

    def is_forked(self):
        """True in a child process that inherited this loop through fork()."""
        return getpid() != self.owner_pid

    # ---------------------------------------------------------------- running

    def run(self):
        """Serve until request_exit(); may raise (KeyboardInterrupt, ...)."""
        cdef int n, err, timeout
        self._check_init()
        if self.closed:
            raise RuntimeError("this loop is closed")
        if self.pfd < 0:
            raise RuntimeError("this loop was not opened")
        # One thread at a time: two would share the record array and the
        # receive buffer (a callback calling run() would reuse them under
        # the dispatch walking them).
        if self.dispatching or (self.thread_id != 0 and self.thread_id != PyThread_get_thread_ident()):
            raise RuntimeError("this loop is already running in another thread or callback")
        # A loop serves one run; an exit requested before run() (a signal
        # handler during set-up) must not be forgotten here.
        self.thread_id = PyThread_get_thread_ident()
        PyErr_CheckSignals()   # one that arrived before the wakeup fd was set
        while not self.exiting:
            timeout = self._timeout_ms()
            with nogil:
                while True:
                    n = us_poller_wait(self.pfd, self.events, MAX_EVENTS, timeout)
                    err = errno
                    self.now = us_now_ns()
                    self._collect(n)
                    # With the accept queue, a pass that only queued
                    # connections needs no Python: wait again without
                    # taking the GIL (see queue_accepted).
                    if n < 0 or not self._quiet_pass():
                        break
                    timeout = _poll_ms_until(self._timer_deadline())
            if n < 0 and err != EINTR:
                raise _oserror(err)
            self._dispatch()

    def request_exit(self):
        """Make run() return after the current dispatch."""
        self.exiting = True
        self._wake()

    def call_soon_threadsafe(self, callback):
        """Queue callback() to run on the loop thread; False if closed."""
        self._check_init()
        # Any thread.  teardown() sets `closed` under the same mutex before
        # its last run of `pending` and before it closes the wakeup pipe, so
        # a callback is either queued in time to run or refused, and never
        # written to a closed (maybe reused) fd.  The GIL made this one step;
        # a free-threaded build needs the mutex (a critical section would be
        # suspended while deque.append waits for the deque's own lock).
        _mutex_lock_with_gil(&self.mu)
        try:
            if self.closed:
                return False
            self.pending.append(callback)
            self._wake()
        finally:
            pthread_mutex_unlock(&self.mu)
        return True

    cdef void _wake(self) noexcept:
        cdef char b = 0
        if self.wake_w >= 0:
            write(self.wake_w, &b, 1)   # EAGAIN: the pipe is full, a wakeup is pending

    cdef int _check_init(self) except -1:
        # Loop.__new__(Loop) skips _setup(): no table, buffers or stats,
        # which every method below the guard dereferences.
        if self.table == NULL:
            raise RuntimeError("this Loop was not initialised (made through Loop.__new__, not new_loop())")
        return 0

    cdef int _check_owner(self) except -1:
        """Event model: the transports (their output buffers, the table) belong
        to the loop thread, which reads them without the GIL; closing them from
        another thread while it runs would free memory under it."""
        self._check_init()
        if self.event_model and self.thread_id != 0 and self.thread_id != PyThread_get_thread_ident():
            raise RuntimeError("must be called on the loop thread (use call_soon_threadsafe)")
        return 0

    cdef int64_t _next_deadline(self) noexcept:
        """When the loop must run again without an event: 0 = at once,
        NEVER = only on an event."""
        if self.pending or self.finalizing:
            return 0
        return self._timer_deadline()

    cdef int64_t _timer_deadline(self) noexcept nogil:
        """The earliest timer of _next_deadline (it needs no GIL)."""
        cdef int64_t deadline = NEVER
        if self.idle_ns:
            deadline = self.next_sweep_ns
        if self.accept_paused and self.accept_resume_ns < deadline:
            deadline = self.accept_resume_ns
        if self.tick_ns and self.next_tick_ns < deadline:
            deadline = self.next_tick_ns
        if self.deny_quiet and self.deny_window_end < deadline:
            deadline = self.deny_window_end
        return deadline

    cdef int _timeout_ms(self) noexcept:
        return _poll_ms_until(self._next_deadline())

    cdef bint _quiet_pass(self) noexcept nogil:
        """Queue mode, after _collect: nothing for the dispatch (no record,
        no wakeup, so no callback queued and no exit requested; no tick due)."""
        return (self.queue_new and self.nrecs == 0 and not self.woken
                and not (self.tick_ns and self.now >= self.next_tick_ns))

    # ---------------------------------------------------------------- hosted

    def host(self, kick, set_timer):
        """Switch to hosted mode on the calling thread, which runs the host
        event loop: it calls run_once() whenever `fileno` is readable, soon
        after kick() (nothing to wait for), and run_once(True) when the timer
        asked for by set_timer(delay_seconds) fires (a new request replaces
        the previous timer)."""
        self._check_init()
        self.hosted = True
        self.kick = kick
        self.set_timer = set_timer
        self.thread_id = PyThread_get_thread_ident()

    @property
    def fileno(self):
        """The poller's fd (hosted mode watches it for readability)."""
        return self.pfd

    @property
    def listen_fileno(self):
        """The listening socket's fd, -1 once it is closed."""
        return self.lfd

    def run_once(self, bint timer=False):
        """Hosted mode: one non-blocking pass (I/O without the GIL, then one
        dispatch).  ``timer`` says the host's timer fired (it is used up).
        Then asks the host for what comes next without an event: kick() for
        "at once", set_timer(delay) for an idle sweep or the end of an accept
        back-off earlier than the timer already set."""
        cdef int n, err
        cdef int64_t deadline
        if self.closed:
            return
        self._check_owner()
        self.kicked = False
        if timer:
            self.timer_deadline = NEVER
        with nogil:
            n = us_poller_wait(self.pfd, self.events, MAX_EVENTS, 0)
            err = errno
            self.now = us_now_ns()
            self._collect(n)
        if n < 0 and err != EINTR:
            self.nrecs = 0
            raise _oserror(err)
        self._dispatch()
        deadline = self._next_deadline()
        if deadline == 0:
            self._request_pass()
        elif deadline < self.timer_deadline:
            # A timer set for a later moment fires anyway and finds nothing to do.
            self.timer_deadline = deadline
            self.set_timer(max(deadline - us_now_ns(), 0) / 1e9)

    cdef int _request_pass(self) except -1:
        """Hosted mode, outside a dispatch: work is queued (a connection to
        finalize, callbacks to run) that no event would make the host report."""
        if self.hosted and not self.kicked and not self.dispatching and not self.closed:
            self.kicked = True
            self.kick()
        return 0

    # ---------------------------------------------------------------- phase 1

    # The table mutex (blocking model only).  Its holder may be waiting for the
    # GIL (lock order: the mutex, then the GIL; see the top of this file), so
    # a thread holding the GIL never blocks on it: it tries it and, if it is
    # busy, waits with the GIL released.  _lock() blocks, and is only called
    # without the GIL.  The try spares the GIL hand-off in the common,
    # uncontended case.
    cdef void _lock(self) noexcept nogil:
        if not self.event_model:
            pthread_mutex_lock(&self.mu)

    cdef void _unlock(self) noexcept nogil:
        if not self.event_model:
            pthread_mutex_unlock(&self.mu)

    cdef void _lock_with_gil(self) noexcept:
        if not self.event_model:
            _mutex_lock_with_gil(&self.mu)

    cdef void _push(self, int kind, int fd, uint32_t seq, size_t off, ssize_t n) noexcept nogil:
        # Never more than RECS_CAP per wakeup (see there).
        self.recs[self.nrecs].kind = kind
        self.recs[self.nrecs].fd = fd
        self.recs[self.nrecs].seq = seq
        self.recs[self.nrecs].off = off
        self.recs[self.nrecs].n = n
        self.nrecs += 1

    cdef void _push_peer(self, int kind, int fd, size_t off, ssize_t n, long pid, long uid, long gid) noexcept nogil:
        """A record about a peer just accepted (REC_NEW, REC_DENIED)."""
        self._push(kind, fd, 0, off, n)
        self.recs[self.nrecs - 1].pid = pid
        self.recs[self.nrecs - 1].uid = uid
        self.recs[self.nrecs - 1].gid = gid

    cdef conn_t *_table_get(self, int fd, uint32_t seq) noexcept nogil:
        cdef conn_t *c
        if fd < 0 or fd >= self.table_cap:
            return NULL
        c = self.table[fd]
        if c == NULL or c.seq != seq:
            return NULL
        return c

    cdef void _collect(self, int n) noexcept nogil:
        cdef int i, fd
        cdef uint64_t tok
        cdef conn_t *c
        cdef char sink[256]
        self.nrecs = 0
        self.rx_used = 0
        self.woken = False
        for i in range(n):
            tok = us_event_token(&self.events[i])
            if tok == TOKEN_WAKE:
                self.woken = True
                while read(self.wake_r, sink, sizeof(sink)) > 0:
                    pass
            elif tok == TOKEN_LISTEN:
                if self.accepting and not self.accept_paused:
                    self._accept_batch()
                    if self.rotate_listener and not self.accept_paused:
                        self._rotate_listener()
            else:
                c = self._table_get(<int>(tok & 0xFFFFFFFFULL), <uint32_t>(tok >> 32))
                if c == NULL:
                    continue           # stale: that fd was closed (and maybe reused)
                if us_event_writable(&self.events[i]) and c.olen > 0:
                    self._flush(c)
                if us_event_readable(&self.events[i]) and (c.interest & US_READ):
                    if c.state & ST_BUFFERED:
                        # Received in the dispatch, straight into the buffer the
                        # protocol's get_buffer() returns (no copy).
                        self._push(REC_READABLE, c.fd, c.seq, 0, 0)
                    else:
                        self._recv_one(c)
        if self.idle_ns and self.now >= self.next_sweep_ns:
            self._sweep()
        if self.deny_quiet and self.now >= self.deny_window_end:
            self._push(REC_DENIED_MORE, -1, 0, 0, <ssize_t>self.deny_quiet)
            self.deny_quiet = 0
        if self.accept_paused and self.now >= self.accept_resume_ns and self.lfd >= 0:
            if us_poller_modify(self.pfd, self.lfd, TOKEN_LISTEN, 0, US_LISTEN) == 0:
                self.accept_paused = False

    cdef void _accept_batch(self) noexcept nogil:
        cdef int k, fd, err, named, taken
        cdef long pid, uid, gid
        cdef uint64_t quiet
        # With authorize=, accepted is counted in the dispatch (only for the
        # peers it admits); the limit counts this batch's waiting ones too.
        cdef size_t waiting = 0
        for k in range(ACCEPT_BATCH):
            fd = us_accept(self.lfd, self.event_model, &named)
            if fd < 0:
                err = errno
                if us_would_block(err):
                    return
                if err == EINTR or err == ECONNABORTED or err == EPROTO:
                    # accept(2): errors of one pending connection (it gave
                    # up); "treat them like EAGAIN by retrying".
                    continue
                # EMFILE, ENFILE, ENOBUFS, ENOMEM, ...: retrying at once would
                # spin on a listener that stays readable.  Stop polling it for
                # a while (10 ms doubling to 1 s) and report once per episode.
                if not self.accept_reported:
                    self.accept_reported = True
                    self._push(REC_ACCEPT_ERROR, -1, 0, 0, err)
                if us_poller_modify(self.pfd, self.lfd, TOKEN_LISTEN, US_LISTEN, 0) == 0:
                    self.accept_paused = True
                    self.accept_resume_ns = self.now + <int64_t>self.accept_backoff_ms * 1000000
                    self.accept_backoff_ms = min(self.accept_backoff_ms * 2, BACKOFF_MAX_MS)
                return
            self.accept_backoff_ms = BACKOFF_MIN_MS
            self.accept_reported = False
            if self.max_conns and _open_count(self.stats.s) + waiting >= self.max_conns:
                # Counted before the client can see its EOF, so whoever saw
                # the EOF also sees the count.
                us_add_u64(&self.stats.s.rejected, 1)
                close(fd)          # over the limit: the client sees EOF at once
                continue
            # Who the peer is, recorded while the fd is certainly open, so it
            # stays readable after a close (connection_lost, on_conn_state CLOSE).
            if us_peercred(fd, &pid, &uid, &gid) < 0:
                pid = uid = gid = -1
            if self.lists_on and not self._listed(fd, uid, gid):
                # Counted before the close, so a client that sees EOF sees the count.
                if self._note_denied(&quiet):
                    self._push_peer(REC_DENIED, -1, 0, <ssize_t>quiet, pid, uid, gid)
                close(fd)          # before any Python code sees it
                continue
            if self.max_per_uid and uid >= 0:
                pthread_mutex_lock(&self.uid_mu)
                taken = us_uid_take(&self.uid_counts, <uint32_t>uid, self.max_per_uid)
                pthread_mutex_unlock(&self.uid_mu)
                if taken != 1:       # over this uid's limit (or no memory to count it)
                    us_add_u64(&self.stats.s.rejected, 1)
                    close(fd)
                    continue
            if self.has_authorize:
                waiting += 1
            else:
                us_add_u64(&self.stats.s.accepted, 1)
            if self.queue_new:
                self._enqueue_new(fd, named, pid, uid, gid)
            else:
                self._push_peer(REC_NEW, fd, named, 0, pid, uid, gid)

    cdef bint _listed(self, int fd, long uid, long gid) noexcept nogil:
        """The allow-lists admit this peer: its uid is listed, or its primary
        or one of its supplementary groups.  Unknown credentials are denied."""
        if uid < 0:
            return False
        if self.allow_uids != NULL and us_id_listed(self.allow_uids, self.n_allow_uids, <uint32_t>uid):
            return True
        if self.allow_gids == NULL or self.n_allow_gids == 0:
            return False
        if gid >= 0 and us_id_listed(self.allow_gids, self.n_allow_gids, <uint32_t>gid):
            return True
        return us_peer_group_listed(fd, self.allow_gids, self.n_allow_gids) == 1

    cdef bint _note_denied(self, uint64_t *quiet) noexcept nogil:
        """Count a denied peer (loop thread); True if it is to be logged, with
        *quiet set to the denials not logged before it.  A flood of denied
        connects thus costs a counter, not a log record, per peer."""
        us_add_u64(&self.stats.s.denied, 1)
        if self.now >= self.deny_window_end:
            self.deny_window_end = self.now + DENY_LOG_WINDOW_NS
            self.deny_logged = 0
        if self.deny_logged >= DENY_LOG_BURST:
            self.deny_quiet += 1   # reported when the window ends (_collect)
            return False
        self.deny_logged += 1
        quiet[0] = self.deny_quiet
        self.deny_quiet = 0
        return True

    cdef void _uid_put(self, long uid) noexcept nogil:
        """A connection counted by the per-uid limit is gone (any thread)."""
        if self.max_per_uid and uid >= 0:
            pthread_mutex_lock(&self.uid_mu)
            us_uid_put(&self.uid_counts, <uint32_t>uid)
            pthread_mutex_unlock(&self.uid_mu)

    cdef void _recv_one(self, conn_t *c) noexcept nogil:
        cdef ssize_t r
        cdef int err
        cdef size_t off = self.rx_used
        if self.rxcap - off < self.read_size:
            return     # shared buffer full: level-triggered, so it comes back
        while True:
            # MSG_DONTWAIT: never block the loop, even if update_conn made
            # the socket blocking.
            r = recv(c.fd, self.rxbuf + off, self.read_size, MSG_DONTWAIT)
            if r >= 0 or errno != EINTR:
                break
        if r > 0:
            self.rx_used = off + r
            self.batch_in += r
            c.last_active = self.now
            self._push(REC_DATA, c.fd, c.seq, off, r)
        elif r == 0:
            # EOF stays readable forever (level-triggered); the dispatch either
            # closes the fd or, if eof_received() keeps it open, stops reading.
            c.state |= ST_EOF
            self._push(REC_EOF, c.fd, c.seq, 0, 0)
        elif not us_would_block(errno):
            err = errno
            _set_interest(self.pfd, c, 0)
            self._push(REC_ERROR, c.fd, c.seq, 0, err)

    cdef void _flush(self, conn_t *c) noexcept nogil:
        cdef ssize_t r
        cdef int err
        while c.olen > 0:
            r = send(c.fd, c.obuf + c.ooff, c.olen, MSG_NOSIGNAL | MSG_DONTWAIT)
            if r > 0:
                c.ooff += r
                c.olen -= r
                self.batch_out += r
                c.last_active = self.now
            elif r < 0 and errno == EINTR:
                continue
            elif r < 0 and us_would_block(errno):
                break
            else:
                err = errno if r < 0 else EPIPE
                _set_interest(self.pfd, c, 0)
                self._push(REC_ERROR, c.fd, c.seq, 0, err)
                return
        if c.olen == 0:
            c.ooff = 0
            if c.ocap > 65536:
                _obuf_free(c)          # an idle connection keeps no big buffer
            _set_interest(self.pfd, c, c.interest & ~US_WRITE)
            if c.state & ST_WRITE_EOF:
                shutdown(c.fd, SHUT_WR)
            if c.state & ST_CLOSING:
                self._push(REC_FLUSHED, c.fd, c.seq, 0, 0)
                return
        if (c.state & ST_PAUSED) and c.olen <= c.low:
            self._push(REC_RESUME, c.fd, c.seq, 0, 0)

    cdef void _sweep(self) noexcept nogil:
        """Close connections idle for idle_ns; schedule the next sweep."""
        cdef int fd
        cdef conn_t *c
        cdef int64_t deadline, earliest = NEVER
        cdef int room = RECS_CAP - self.nrecs
        self._lock()
        for fd in range(self.table_hi + 1):
            c = self.table[fd]
            if c == NULL:
                continue
            if us_load_u32(&c.state) & (ST_IDLE | (ST_CLOSING if not self.event_model else ST_LOST)):
                continue
            deadline = us_load_i64(&c.last_active) + self.idle_ns
            if deadline > self.now:
                earliest = min(earliest, deadline)
                continue
            if room == 0:
                earliest = self.now      # the rest on the next wakeup, at once
                break
            # Closed in the dispatch, where conn.done is set before the
            # handler can see the socket shut down.
            us_or_u32(&c.state, ST_IDLE)
            self._push(REC_IDLE, fd, c.seq, 0, 0)
            room -= 1
        self._unlock()
        if earliest == NEVER and self.queue_new:
            # A queued connection enters the table on another thread, which
            # cannot schedule a sweep: keep sweeping every idle_ns (a pass
            # without the GIL when nothing expired).
            earliest = self.now + self.idle_ns
        self.next_sweep_ns = NEVER if earliest == NEVER else earliest + _sweep_slack(self.idle_ns)

    # ---------------------------------------------------------------- phase 2

    cdef int _dispatch(self) except -1:
        cdef int i = 0
        cdef rec_t *r
        if self.batch_in:
            us_add_u64(&self.stats.s.bytes_in, self.batch_in)
            self.batch_in = 0
        self.dispatching = True
        try:
            while i < self.nrecs:
                r = &self.recs[i]
                i += 1
                if r.kind == REC_NEW:
                    self._open_connection(r)
                elif r.kind == REC_DENIED:
                    self._log_denied(r.pid, r.uid, r.gid, <uint64_t>r.n)
                elif r.kind == REC_DENIED_MORE:
                    _access_log.warning("unixsrv %s: %d more connection(s) denied", self.display_path, r.n)
                elif r.kind == REC_ACCEPT_ERROR:
                    # Resource exhaustion the server rides out (it backs off
                    # and recovers): a warning, not an error.
                    self._callback_error(_oserror(<int>r.n, self.display_path), _WARNING)
                else:
                    obj = self._lookup(r.fd, r.seq)
                    if obj is None:
                        continue
                    if self.event_model:
                        (<_Stream>obj)._on_record(r)
                    else:
                        (<_ConnBase>obj)._idle_expired()
            self._run_finalizing()
            self._run_pending()
            self._run_finalizing()     # what the queued callbacks closed
            if self.tick_ns and self.now >= self.next_tick_ns:
                self._run_tick()
        except BaseException:
            # Never leak the fds of connections accepted in this batch.
            while i < self.nrecs:
                if self.recs[i].kind == REC_NEW:
                    self._drop_new(&self.recs[i])
                i += 1
            raise
        finally:
            self.dispatching = False
            self.nrecs = 0
            if self.batch_out:
                us_add_u64(&self.stats.s.bytes_out, self.batch_out)
                self.batch_out = 0
        PyErr_CheckSignals()
        if self.stash_exc is not None:
            exc, self.stash_exc = self.stash_exc, None
            raise exc
        return 0

    cdef void _drop_accepted(self, int fd, long uid) noexcept nogil:
        """An accepted fd that never got its connection object."""
        close(fd)
        self._count_closed(uid)

    cdef void _drop_new(self, rec_t *r) noexcept nogil:
        """A REC_NEW the dispatch did not reach (a callback raised)."""
        if self.has_authorize:         # not counted as accepted yet
            close(r.fd)
            self._uid_put(r.uid)
        else:
            self._drop_accepted(r.fd, r.uid)

    cdef bint _authorized(self, rec_t *r) except -1:
        """authorize(peer) on the loop thread, after the lists and before
        anything else sees the connection: only ``True`` admits; False,
        anything else, or an exception (reported) denies and closes."""
        cdef bint ok = False, log
        cdef uint64_t quiet
        if r.uid >= 0:
            try:
                ok = self.authorize(PeerCredentials(r.pid, r.uid, r.gid)) is True
            except BaseException as exc:
                self._callback_error(exc)
        if ok:
            us_add_u64(&self.stats.s.accepted, 1)
            return True
        self._uid_put(r.uid)
        log = self._note_denied(&quiet)
        close(r.fd)
        if log:
            self._log_denied(r.pid, r.uid, r.gid, quiet)
        return False

    cdef int _log_denied(self, long pid, long uid, long gid, uint64_t quiet) except -1:
        more = f" ({quiet} more denied before it)" if quiet else ""
        _access_log.warning("unixsrv %s: denied a connection from pid %d uid %d gid %d%s",
                            self.display_path, pid, uid, gid, more)
        return 0

    cdef int _run_tick(self) except -1:
        self.next_tick_ns = self.now + self.tick_ns
        try:
            self.tick()
        except BaseException as exc:
            self._callback_error(exc)
        return 0

    cdef int _open_connection(self, rec_t *r) except -1:
        cdef int err
        obj = self._new_connection(r)
        if obj is None:
            return 0
        cdef _ConnBase conn = <_ConnBase>obj
        if self.event_model:
            if us_poller_add(self.pfd, conn.c.fd, _token(&conn.c), US_READ) < 0:
                err = errno
                (<_Stream>conn)._abort(None)
                self._callback_error(_oserror(err, self.display_path))
                return 0
            conn.c.interest = US_READ
            return (<_Stream>conn)._start()
        try:
            self.owner.spawn(conn)
        except BaseException as exc:
            (<Connection>conn)._finish()
            self._callback_error(exc)
        return 0

    cdef object _new_connection(self, rec_t *r):
        """The connection object of an accepted fd, in the table; None if
        authorize() refused it.  On the loop thread, or (queue mode) on the
        thread calling take_accepted()."""
        cdef _ConnBase conn
        cdef int fd = r.fd
        cdef bint named = r.off != 0
        if self.has_authorize and not self._authorized(r):
            return None
        if self.queue_new:
            _mutex_lock_with_gil(&self.aq_mu)    # next_seq is shared with other takers
        self.next_seq = (self.next_seq + 1) & 0x7FFFFFFF
        if self.next_seq == 0:
            self.next_seq = 1
        cdef uint32_t seq = self.next_seq
        if self.queue_new:
            pthread_mutex_unlock(&self.aq_mu)
        try:
            conn = _Stream.__new__(_Stream) if self.event_model else Connection.__new__(Connection)
            conn.loop = self
            conn.c.fd = fd
            conn.c.seq = seq
            conn.c.uses = 1
            conn.c.high = self.high_water
            conn.c.low = self.low_water
            # Queued: the idle clock starts when the connection is taken
            # (`now` belongs to the loop thread).
            conn.c.last_active = us_now_ns() if self.queue_new else self.now
            conn.c.peer_pid, conn.c.peer_uid, conn.c.peer_gid = r.pid, r.uid, r.gid
            self._table_put(&conn.c)
        except BaseException:
            self._drop_accepted(fd, r.uid)     # nothing else knows this fd yet
            raise
        if not named:
            conn._remote = ""
        else:
            try:
                conn.remote_address   # rare: read it while the fd is surely open
            except OSError:
                conn._remote = ""
        if self.idle_ns and self.next_sweep_ns == NEVER and not self.queue_new:
            self.next_sweep_ns = self.now + self.idle_ns + _sweep_slack(self.idle_ns)
        return conn

    # ---------------------------------------------------------------- accept queue

    def queue_accepted(self, int read_fd, int write_fd):
        """Blocking model, before open(): accepted connections wait in a C
        queue for take_accepted() (unixsrv.socketserver's get_request)
        instead of going to owner.spawn on the loop thread.  The loop
        thread queues them without the GIL, and writes one byte to the
        non-blocking pipe ``write_fd`` when the queue stops being empty;
        take_accepted() reads it from ``read_fd`` when it empties the queue,
        so ``read_fd`` is readable exactly while a connection waits.  The
        caller owns the pipe and closes it after close_queue()."""
        self._check_init()
        if self.event_model or self.pfd >= 0:
            raise RuntimeError("queue_accepted() is for a blocking-model loop not yet opened")
        self.aq_r, self.aq_w = read_fd, write_fd
        self.queue_new = True

    def take_accepted(self):
        """The next queued connection (a Connection, in the table from now
        on, its idle clock started), or None if none waits (any thread)."""
        cdef rec_t r
        cdef bint got
        cdef char sink[16]
        _mutex_lock_with_gil(&self.aq_mu)
        got = self._aq_pop(&r)
        if got and self.aq_len == 0:
            read(self.aq_r, sink, sizeof(sink))
        pthread_mutex_unlock(&self.aq_mu)
        if not got:
            return None
        try:
            return self._new_connection(&r)
        except BaseException:
            self._conn_closed()
            raise

    @property
    def accepted_waiting(self):
        """How many queued connections wait for take_accepted()."""
        cdef size_t n
        _mutex_lock_with_gil(&self.aq_mu)
        n = self.aq_len
        pthread_mutex_unlock(&self.aq_mu)
        return n

    def close_queue(self):
        """Close the queued connections (their clients see EOF) and queue
        no more: accepted from now on means closed at once (any thread)."""
        cdef size_t n
        with nogil:
            n = self._drop_queue()
        if n:
            self._conn_closed()

    cdef void _enqueue_new(self, int fd, size_t named, long pid, long uid, long gid) noexcept nogil:
        cdef rec_t *grown
        cdef rec_t *r
        cdef size_t k, cap
        cdef char b = 0
        pthread_mutex_lock(&self.aq_mu)
        if self.aq_len == self.aq_cap and not self.aq_closed:
            cap = self.aq_cap * 2 if self.aq_cap else 64
            grown = <rec_t *>malloc(sizeof(rec_t) * cap)
            if grown != NULL:
                for k in range(self.aq_len):
                    grown[k] = self.aq[(self.aq_head + k) % self.aq_cap]
                free(self.aq)
                self.aq, self.aq_cap, self.aq_head = grown, cap, 0
        if self.aq_closed or self.aq_len == self.aq_cap:
            pthread_mutex_unlock(&self.aq_mu)
            r = NULL
        else:
            r = &self.aq[(self.aq_head + self.aq_len) % self.aq_cap]
            memset(r, 0, sizeof(rec_t))
            r.kind, r.fd, r.off = REC_NEW, fd, named
            r.pid, r.uid, r.gid = pid, uid, gid
            self.aq_len += 1
            if self.aq_len == 1:
                write(self.aq_w, &b, 1)
            pthread_mutex_unlock(&self.aq_mu)
        if r == NULL:      # closed queue, or no memory to queue it
            if self.has_authorize:
                close(fd)
                self._uid_put(uid)
            else:
                self._drop_accepted(fd, uid)
        elif self.idle_ns and self.next_sweep_ns == NEVER:
            self.next_sweep_ns = self.now + self.idle_ns + _sweep_slack(self.idle_ns)

    cdef bint _aq_pop(self, rec_t *out) noexcept nogil:
        """Take the oldest queued connection into *out; False if none waits.
        With aq_mu held (or on the only thread: a forked child)."""
        if self.aq_len == 0:
            return False
        out[0] = self.aq[self.aq_head]
        self.aq_head = (self.aq_head + 1) % self.aq_cap
        self.aq_len -= 1
        return True

    cdef size_t _drop_queue(self) noexcept nogil:
        """Close every queued connection and refuse new ones; how many
        were closed."""
        cdef size_t n = 0
        cdef rec_t r
        cdef char sink[16]
        pthread_mutex_lock(&self.aq_mu)
        self.aq_closed = True
        while self._aq_pop(&r):
            self._drop_new(&r)
            n += 1
        if n and self.aq_r >= 0:
            read(self.aq_r, sink, sizeof(sink))
        pthread_mutex_unlock(&self.aq_mu)
        return n

    cdef int _table_put(self, conn_t *c) except -1:
        cdef conn_t **grown
        cdef int cap = self.table_cap
        while c.fd >= cap:
            cap *= 2
        self._lock_with_gil()
        if cap != self.table_cap:
            grown = <conn_t **>realloc(self.table, sizeof(conn_t *) * cap)
            if grown != NULL:
                memset(grown + self.table_cap, 0, sizeof(conn_t *) * (cap - self.table_cap))
                self.table = grown
                self.table_cap = cap
        if c.fd < self.table_cap:
            self.table[c.fd] = c
            if c.fd > self.table_hi:
                self.table_hi = c.fd
        self._unlock()
        if c.fd >= self.table_cap:
            raise MemoryError()
        Py_INCREF(<object>c.owner)
        return 0

    cdef int _table_del(self, conn_t *c) noexcept:
        """Unregister c (any thread, GIL held); drops the table's reference,
        so the caller must hold its own."""
        cdef bint removed = False
        cdef int fd = c.fd
        self._lock_with_gil()
        if 0 <= fd < self.table_cap and self.table[fd] == c:
            self.table[fd] = NULL
            removed = True
        self._unlock()
        if removed:
            Py_DECREF(<object>c.owner)
        return 0

    cdef object _lookup(self, int fd, uint32_t seq):
        cdef conn_t *c
        cdef object obj = None
        self._lock_with_gil()
        c = self._table_get(fd, seq)
        if c != NULL:
            obj = <object>c.owner      # a new reference, taken under the lock
        self._unlock()
        return obj

    cdef list _snapshot(self):
        """The live connections, referenced, taken under the lock."""
        cdef int fd
        cdef list out = []
        cdef PyObject **owners = <PyObject **>malloc(sizeof(PyObject *) * (self.table_hi + 1))
        cdef int k = 0
        if owners == NULL:
            raise MemoryError()
        self._lock_with_gil()
        for fd in range(self.table_hi + 1):
            if self.table[fd] != NULL:
                owners[k] = self.table[fd].owner
                Py_INCREF(<object>owners[k])
                k += 1
        self._unlock()
        try:
            for fd in range(k):
                out.append(<object>owners[fd])
        finally:
            for fd in range(k):
                Py_DECREF(<object>owners[fd])
            free(owners)
        return out

    cdef int _run_finalizing(self) except -1:
        # By index: a connection_lost() may close more transports, which
        # append to the list while it is walked.
        cdef Py_ssize_t i = 0
        if not self.finalizing:
            return 0           # the common case: every dispatch comes here twice
        try:
            while i < len(self.finalizing):
                (<_Stream>self.finalizing[i])._finalize()
                i += 1
        finally:
            del self.finalizing[:i]
        return 0

    cdef int _run_pending(self) except -1:
        # What is queued now runs; what these callbacks queue runs next
        # time.  Taken under the mutex call_soon_threadsafe appends under;
        # the unlocked look first may miss an append in progress (a
        # free-threaded build), whose wakeup brings the loop back for it.
        cdef list batch
        if not self.pending:
            return 0
        _mutex_lock_with_gil(&self.mu)
        batch, self.pending = self.pending, []
        pthread_mutex_unlock(&self.mu)
        for cb in batch:
            try:
                cb()
            except BaseException as exc:
                self._callback_error(exc)
        return 0

    cdef int _callback_error(self, object exc, object level=_ERROR) except -1:
        """A user callback raised on the loop thread (or the loop met an
        error to report, logged at `level` without on_error):
        KeyboardInterrupt and SystemExit stop the loop (after this dispatch),
        the rest is reported."""
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            try:
                self.owner.report(exc, level)
                return 0
            except BaseException as err:   # on_error itself raised KeyboardInterrupt
                exc = err
        if self.stash_exc is None:
            self.stash_exc = exc
        return 0

    cdef void _count_closed(self, long uid) noexcept nogil:
        """An accepted connection of the peer `uid` is closed (any thread)."""
        self._uid_put(uid)
        us_add_u64_release(&self.stats.s.closed, 1)

    cdef int _conn_closed(self) except -1:
        # Called after the `closed` counter went up, on the loop or a worker
        # thread; the shutdown thread sets drain_waiting, then reads the
        # count.  Both flag accesses share the loop's critical section, so
        # either this sees the flag or the waiter sees the new count: a
        # free-threaded build cannot lose the last wakeup.
        cdef bint waiting
        with cython.critical_section(self):
            waiting = self.drain_waiting
        if waiting and _open_count(self.stats.s) == 0 and self.owner.drained is not None:
            self.owner.drained()
        return 0

    # ---------------------------------------------------------------- stopping
    # These run on the loop thread (the Server posts them with
    # call_soon_threadsafe) or after run() has returned.

    def stop_accepting(self):
        """Close the listener and remove our socket file.  True the first time."""
        if self.lfd < 0:
            return False
        forked = self.is_forked()
        try:
            if self.unlink_path is not None and not forked:
                # Unlink first: while our listener is open its inode number
                # cannot be handed to a successor's socket file.
                unlink_if_same(self.unlink_path, self.sock_dev, self.sock_ino)
        finally:
            if self.pfd >= 0 and not forked:
                us_poller_remove(self.pfd, self.lfd, 0 if self.accept_paused else US_LISTEN)
            close(self.lfd)
            self.lfd = -1
            self.accepting = False
        return True

    def begin_drain(self):
        """Graceful shutdown: stop reading everywhere and let work finish
        (blocking: set conn.done, shut the read side; event: close each
        transport, which flushes first)."""
        self._check_owner()
        for conn in self._snapshot():
            (<_ConnBase>conn)._begin_drain()
        self._finalize_unless_dispatching()

    def abort_all(self):
        """Close every connection now (clients see EOF)."""
        self._check_owner()
        for conn in self._snapshot():
            (<_ConnBase>conn)._force_close()
        self._finalize_unless_dispatching()

    cdef int _finalize_unless_dispatching(self) except -1:
        # Called from a protocol callback (Server.close() in data_received),
        # the dispatch finalizes after it: connection_lost() must never run
        # inside another callback of the same loop.
        # Hosted, the caller is user code on the host loop (close_clients()
        # in a task): the finalizing runs in a pass of its own, as asyncio
        # runs connection_lost() from call_soon().
        if self.dispatching:
            return 0
        if self.hosted and not self.closed:
            return self._request_pass()
        return self._run_finalizing()

    def teardown(self):
        """After run(): close everything, run the callbacks still queued,
        release the fds.  Then raises what a callback raised meanwhile
        (KeyboardInterrupt, SystemExit), as run() would have."""
        self._check_owner()
        _mutex_lock_with_gil(&self.mu)      # see call_soon_threadsafe
        self.closed = True
        pthread_mutex_unlock(&self.mu)
        try:
            self.stop_accepting()
        finally:
            try:
                self.close_queue()
                self.abort_all()
                while self.pending:
                    self._run_pending()
                    self._run_finalizing()
            finally:
                self.thread_id = 0
                # They refer to the host.
                self.kick = self.set_timer = self.on_attach = self.on_detach = None
                self._close_fds()
                _live_loops.discard(self)
        if self.stash_exc is not None:
            exc, self.stash_exc = self.stash_exc, None
            raise exc

    cdef void _close_fds(self) noexcept:
        if self.lfd >= 0:
            close(self.lfd)
        if self.pfd >= 0:
            close(self.pfd)
        if self.wake_r >= 0:
            close(self.wake_r)
        if self.wake_w >= 0:
            close(self.wake_w)
        self.lfd = self.pfd = self.wake_r = self.wake_w = -1

    def _after_fork_in_child(self):
        """The child of a fork must not serve, poll or unlink anything of the
        parent's: close our copies of the fds and retire the loop."""
        cdef int fd
        cdef rec_t r
        self.closed = True
        self.exiting = True
        # Only the forking thread exists here; the mutex may have been held
        # by another thread at fork() time and would never be released.
        pthread_mutex_init(&self.mu, NULL)
        pthread_mutex_init(&self.uid_mu, NULL)
        pthread_mutex_init(&self.aq_mu, NULL)
        self._close_fds()
        # The queued fds are the parent's connections: close our copies,
        # without counting (the parent counts them).
        while self._aq_pop(&r):
            close(r.fd)
        self.aq_closed = True
        if self.table == NULL:
            return
        for fd in range(self.table_hi + 1):
            if self.table[fd] != NULL and self.table[fd].fd >= 0:
                close(self.table[fd].fd)
                self.table[fd].fd = -1


cdef class LoopConfig:
    """What one loop is made of, for new_loop(): who owns it (LoopOwner), the
    counters and callbacks it shares with its server, and the settings of
    the run.  ``factory`` (a protocol factory) selects the event model; None
    the blocking model, where ``owner.spawn`` serves each connection.
    ``idle_timeout`` 0 and ``max_connections`` 0 mean none.  Every setting is
    a keyword, given explicitly (the defaults are ServerConfig's).  Immutable
    once made."""

    def __init__(self, LoopOwner owner not None, Stats stats not None, Callbacks callbacks not None,
                 *, factory, double idle_timeout, size_t max_connections, size_t read_size,
                 size_t high_water, size_t low_water, size_t max_write_buffer):
        if factory is not None and not callable(factory):
            raise TypeError(f"factory must be callable or None, got {factory!r}")
        self.owner = owner
        self.stats = stats
        self.callbacks = callbacks
        self.factory = factory
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.read_size = read_size
        self.high_water = high_water
        self.low_water = low_water
        self.max_write_buffer = max_write_buffer


def new_loop(LoopConfig config not None):
    """The loop of one server run, not yet opened (unixsrv.Server's only way
    to make one: Loop() itself raises TypeError)."""
    cdef Loop loop = Loop.__new__(Loop)
    loop._setup(config)
    return loop
