# _conn.pxi - what every accepted connection has (_ConnBase), and the
# blocking-model Connection a handler thread reads and writes.
#
# fd lifetime: conn_t.uses starts at 1, the "lifetime" use held until the
# handler returns (blocking model) or the transport is finalized (event
# model).  Every system call on the fd from Python first takes a use and
# drops it afterwards; the fd is closed when the count reaches zero.  So an fd
# is never closed while another thread is inside recv()/send() on it, and a
# closed fd number (which the kernel may hand to a new connection) is never
# touched again.


# The connection objects opt out of cyclic GC (one object less per
# connection for every collection to scan): the only cycle they take part in
# is _Stream -> protocol -> transport -> _Stream, and _finalize(), which every
# connection reaches (teardown finalizes whatever is left), breaks it.
@cython.no_gc
cdef class _ConnBase:

    def __cinit__(self):
        self.c.fd = -1
        self.c.peer_uid = -1              # no credentials until accept
        self.c.owner = <PyObject *>self

    def __init__(self, *args, **kwargs):
        # The loop makes these with __new__ (which skips __init__) and fills
        # in the fd and the loop; one made from Python would have neither.
        raise TypeError(f"{type(self).__name__} objects are created by the server, not from Python")

    cdef Loop _loop(self):
        """The loop, or RuntimeError for an object that was never attached
        to one (made through __new__ from Python)."""
        if self.loop is None:
            raise RuntimeError(f"this {type(self).__name__} is not attached to a server")
        return self.loop

    cdef int _use(self) except -1:
        if (us_load_u32(&self.c.state) & ST_CLOSING) or not us_use_acquire(&self.c.uses):
            raise ServerClosedError("the connection was closed by the server")
        return 0

    cdef void _unuse(self) noexcept nogil:
        if us_use_release(&self.c.uses) and self.c.fd >= 0:
            close(self.c.fd)

    cdef void _shutdown_fd(self, int how) noexcept:
        """shutdown(2) the socket if its fd is still open (any thread)."""
        if us_use_acquire(&self.c.uses):
            shutdown(self.c.fd, how)
            self._unuse()

    cdef int _idle_expired(self) except -1:
        raise NotImplementedError

    cdef int _begin_drain(self) except -1:
        raise NotImplementedError

    cdef int _force_close(self) except -1:
        raise NotImplementedError

    # The lifecycle every connection goes through, in both models:
    #   _lifecycle_begin: on_conn_state NEW, then update_conn;
    #   the handler (blocking, on a worker thread) or the protocol (event);
    #   close; _lifecycle_end: on_conn_state CLOSE, exactly when NEW fired.
    # Blocking: the worker thread runs it (Server._serve_connection, through
    # _begin() and _finish()); event: the loop thread (_Stream._start and
    # _Stream._finalize).

    cdef bint _lifecycle_begin(self) except -1:
        """NEW, then update_conn.  False: update_conn raised (reported); the
        connection is to be closed unserved."""
        cdef Loop loop = self.loop
        cdef LoopOwner owner = loop.owner
        if loop.callbacks.on_conn_state is not None:
            us_or_u32(&self.c.state, ST_ANNOUNCED)      # CLOSE will follow
            owner.conn_state(self, _NEW)
        return loop.callbacks.update_conn is None or bool(owner.update_conn(self))

    cdef int _lifecycle_end(self) except -1:
        """CLOSE, if NEW was fired (after the close)."""
        if us_load_u32(&self.c.state) & ST_ANNOUNCED:
            self.loop.owner.conn_state(self, _CLOSE)
        return 0

    def _expose(self):
        """Note that user code got a socket object for the fd (update_conn),
        which it may dup(): then close() no longer drops the fd's epoll
        registration (epoll(7)), so _finalize removes it explicitly."""
        us_or_u32(&self.c.state, ST_EXPOSED)

    def fileno(self):
        """The socket's fd, or -1 once it is closed."""
        if us_load_u32(&self.c.state) & ST_CLOSING or us_load_i32(&self.c.uses) <= 0:
            return -1
        return self.c.fd

    @property
    def id(self):
        """A number that identifies this connection within one server run."""
        return self.c.seq

    @property
    def local_address(self):
        """The server's socket path (``@name`` for an abstract name)."""
        return self._loop().display_path

    @property
    def remote_address(self):
        """The client's address: usually ``""``, since clients rarely bind."""
        cdef sockaddr_un sa
        cdef socklen_t sl = sizeof(sa)
        cdef int r, err
        if self._remote is None:
            # Only a client that bound a name gets here (see us_accept), and
            # only at accept time (_open_connection).
            self._use()
            r = getpeername(self.c.fd, <sockaddr *>&sa, &sl)
            err = errno
            self._unuse()
            if r < 0:
                raise _oserror(err)
            self._remote = _decode_sockaddr(sa.sun_path, us_sun_path_len(sl))
        return self._remote

    @property
    def peer(self):
        """PeerCredentials(pid, uid, gid) of the client at connect time
        (SO_PEERCRED on Linux, getpeereid on macOS, where pid may be 0);
        read once when the connection was accepted."""
        if self.c.peer_uid < 0:
            raise _oserror(ENOTCONN)
        if self._peer is None:
            peer = PeerCredentials(self.c.peer_pid, self.c.peer_uid, self.c.peer_gid)
            # Any thread may ask first: the critical section keeps two first
            # readers of a free-threaded build from both storing (the second
            # store would free the object the first is returning).
            with cython.critical_section(self):
                if self._peer is None:
                    self._peer = peer
        return self._peer


cdef str _decode_sockaddr(const char *path, size_t n):
    cdef bytes raw
    if n <= 0:
        return ""
    raw = path[:n]
    if raw[:1] == b"\0":
        return "@" + raw[1:].decode("utf-8", "backslashreplace")
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


cdef ssize_t _recv_blocking(int fd, char *buf, size_t n, int *err) noexcept nogil:
    """recv() that waits, whatever O_NONBLOCK says (update_conn may set it)."""
    cdef ssize_t r
    cdef pollfd p
    while True:
        r = recv(fd, buf, n, 0)
        if r >= 0:
            return r
        if errno == EINTR:
            continue     # PEP 475: worker threads run no signal handlers
        if us_would_block(errno):
            p.fd = fd
            p.events = POLLIN
            poll(&p, 1, -1)
            continue
        err[0] = errno
        return -1


cdef ssize_t _send_blocking(int fd, const char *buf, size_t n, int *err,
                            int64_t *last_active=NULL) noexcept nogil:
    """Send all of buf; returns the bytes sent before an error (err set).
    Each partial send is activity for the idle timeout: a big write to a
    slow but steady reader must not look idle while bytes flow, so the time
    is stored in *last_active (if given) after each one; the loop thread's
    sweep reads it, hence the atomic store.  On a blocking socket a stream
    send() returns only once all of it was sent (send(2)), so with
    last_active each send takes only what fits (MSG_DONTWAIT) and poll()
    does the waiting between them."""
    cdef size_t done = 0
    cdef ssize_t r
    cdef pollfd p
    cdef int flags = MSG_NOSIGNAL | (MSG_DONTWAIT if last_active != NULL else 0)
    while done < n:
        r = send(fd, buf + done, n - done, flags)
        if r >= 0:
            done += r
            if last_active != NULL and r > 0:
                us_store_i64(last_active, us_now_ns())
            continue
        if errno == EINTR:
            continue
        if us_would_block(errno):
            p.fd = fd
            p.events = POLLOUT
            poll(&p, 1, -1)
            continue
        err[0] = errno
        break
    return done


# Small reads land on the stack first and are copied into an exact-size bytes
# object; only a read that fills this buffer pays for a large allocation.
# Kept below one page so the stack frame needs no extra probe pages.
cdef enum:
    SMALL_READ = 2048
    # Writes up to this size are tried without giving up the GIL; copying
    # more than that into the kernel while holding it makes every other
    # handler thread wait longer than a GIL hand-off costs.
    SMALL_WRITE = 8192


@cython.no_gc
cdef class Connection(_ConnBase):
    """One client connection, handed to a blocking ``handler(conn)``.

    Reading and writing release the GIL while they wait.  ``read()`` returns
    ``b""`` at EOF, also when the server's graceful shutdown closed the read
    side; I/O after our side closed the connection (the handler, the idle
    timeout, ``close()``, the shutdown deadline) raises ServerClosedError.
    Only the server makes them: ``Connection()`` raises TypeError.
    """

    def __repr__(self):
        return f"<unixsrv.Connection id={self.c.seq} fd={self.fileno()} closed={self.closed}>"

    def read(self, n=None):
        """Read up to n bytes (default: the server's read_buffer_size); wait
        for at least one.  b"" at EOF."""
        cdef char small[SMALL_READ]
        cdef ssize_t r
        cdef int err = 0
        cdef Py_ssize_t size
        size = self._loop().read_size if n is None else n
        if size < 0:
            raise ValueError("n must be >= 0")
        self._use()
        try:
            self._raise_deferred()
            if size == 0:
                return b""
            if size > SMALL_READ and self._big_reads:
                return self._read_big(size, NULL, 0)
            r = self._recv_now(small, size if size < SMALL_READ else SMALL_READ, &err)
            if r <= 0:
                return self._read_result(r, err)
            if r == SMALL_READ and size > SMALL_READ:
                # The stack buffer filled up: messages here are big, so this
                # and the next reads go straight into a bytes object.
                self._big_reads = True
                return self._read_big(size, small, r)
        finally:
            self._unuse()
        self._count_in(r)
        return small[:r]

    cdef object _read_big(self, Py_ssize_t n, const char *head, ssize_t have):
        """Read into a bytes object of n, shrunk in place to what arrived.
        With `have` bytes already read into `head`, only take what is there
        already (never wait: the caller has data to return)."""
        cdef PyObject *raw
        cdef ssize_t r
        cdef int err = 0
        cdef bytes data = PyBytes_FromStringAndSize(NULL, n)
        if have:
            memcpy(<char *>data, head, have)
            r = recv(self.c.fd, (<char *>data) + have, n - have, MSG_DONTWAIT)
            if r < 0:
                if not us_would_block(errno) and errno != EINTR:
                    self._deferred_err = errno    # raised by the next read
                r = 0
            r += have
        else:
            r = self._recv_now(<char *>data, n, &err)
            if r <= 0:
                return self._read_result(r, err)
            if r <= SMALL_READ:
                self._big_reads = False
        if r < n:
            # _PyBytes_Resize needs the only reference: hand ours to `raw`.
            raw = <PyObject *>data
            Py_INCREF(data)
            data = None
            _PyBytes_Resize(&raw, r)
            data = <bytes>raw
            Py_DECREF(data)
        self._count_in(r)
        return data

    cdef int _raise_deferred(self) except -1:
        """An error that a read hit after it had data to return."""
        cdef int err = self._deferred_err
        if err:
            self._deferred_err = 0
            raise self._io_error(err)
        return 0

    cdef ssize_t _recv_now(self, char *buf, size_t n, int *err) except? -2:
        """recv(), waiting without the GIL; for small messages first tried
        without waiting and without giving up the GIL: under load the data
        is often there already, and handing the GIL to another thread and
        back costs more than this syscall.  Not right after a write, though:
        in request/response traffic the next request only comes once the
        peer has read our answer, so that try would be a wasted syscall."""
        cdef ssize_t r
        cdef bint try_first = not self._big_reads and not self._wrote_last
        self._wrote_last = False
        if try_first:
            r = recv(self.c.fd, buf, n, MSG_DONTWAIT)
            if r >= 0:
                return r
            if not us_would_block(errno) and errno != EINTR:
                err[0] = errno
                return -1
        with nogil:
            r = _recv_blocking(self.c.fd, buf, n, err)
        return r

    cdef object _read_result(self, ssize_t r, int err):
        """b"" at EOF, the matching exception on error."""
        if r < 0:
            raise self._io_error(err)
        us_or_u32(&self.c.state, ST_EOF)
        return b""

    def readinto(self, buffer):
        """Read into a writable buffer; returns the byte count (0 at EOF)."""
        cdef Py_buffer view
        cdef ssize_t r
        cdef int err = 0
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        try:
            self._use()
            try:
                self._raise_deferred()
                if view.len == 0:
                    return 0
                r = self._recv_now(<char *>view.buf, view.len, &err)
                self._big_reads = r > SMALL_READ
            finally:
                self._unuse()
        finally:
            PyBuffer_Release(&view)
        if r <= 0:
            self._read_result(r, err)
            return 0
        self._count_in(r)
        return r

    def write(self, data):
        """Write all of data (any bytes-like object); returns len(data)."""
        cdef Py_buffer view
        cdef ssize_t r
        cdef size_t done = 0
        cdef int err = 0
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._use()
            try:
                # Most small writes fit the socket buffer: try them without
                # waiting (and without giving up the GIL) first.
                if view.len > SMALL_WRITE:
                    r = 0
                else:
                    r = send(self.c.fd, view.buf, view.len, MSG_NOSIGNAL | MSG_DONTWAIT)
                if r >= 0:
                    done = r
                elif not us_would_block(errno) and errno != EINTR:
                    err = errno
                if err == 0 and done < <size_t>view.len:
                    if done and self.loop.idle_ns:
                        us_store_i64(&self.c.last_active, us_now_ns())
                    with nogil:
                        done += _send_blocking(self.c.fd, (<char *>view.buf) + done,
                                               view.len - done, &err,
                                               &self.c.last_active if self.loop.idle_ns else NULL)
            finally:
                self._unuse()
            self._wrote_last = True
            if done:
                us_add_u64(&self.loop.stats.s.bytes_out, done)
                if self.loop.idle_ns:
                    us_store_i64(&self.c.last_active, us_now_ns())
            if err:
                raise self._io_error(err)
            return view.len
        finally:
            PyBuffer_Release(&view)

    def _dup(self):
        """A new close-on-exec fd for this connection's socket, for a
        ``socket.socket`` that user code reads and writes itself
        (unixsrv.socketserver's request).  ServerClosedError once our side
        closed the connection (idle timeout, server close)."""
        cdef int fd
        self._use()
        try:
            # fcntl(2) F_DUPFD_CLOEXEC, as os.dup() does, but keeping the
            # GIL: the serving thread would queue to get it back from the
            # request threads (see _request.pxi); the call never blocks.
            fd = fcntl(self.c.fd, F_DUPFD_CLOEXEC, 0)
            if fd < 0:
                raise _oserror(errno)
            return fd
        finally:
            self._unuse()

    def _activity(self, size_t n_in, size_t n_out):
        """I/O done on a dup of the fd (see _dup): count the bytes and, for
        the idle timeout, note the time."""
        self._io_done(n_in, n_out)

    cdef void _io_done(self, size_t n_in, size_t n_out) noexcept:
        if self.loop is None:
            return       # made through __new__ from Python: no server to tell
        if n_in:
            us_add_u64(&self.loop.stats.s.bytes_in, n_in)
        if n_out:
            us_add_u64(&self.loop.stats.s.bytes_out, n_out)
        if self.loop.idle_ns:
            us_store_i64(&self.c.last_active, us_now_ns())

    cdef void _count_in(self, ssize_t r) noexcept:
        us_add_u64(&self.loop.stats.s.bytes_in, r)
        if self.loop.idle_ns:
            us_store_i64(&self.c.last_active, us_now_ns())

    cdef object _io_error(self, int err):
        if us_load_u32(&self.c.state) & ST_CLOSING:
            return ServerClosedError("the connection was closed by the server")
        if err == ECONNRESET or err == EPIPE:
            us_or_u32(&self.c.state, ST_EOF)
        return _oserror(err)

    def close(self):
        """Close the connection now (the client sees EOF).  Idempotent."""
        self._close_now()

    cdef int _close_now(self) except -1:
        # done first: a handler woken by the shutdown must already see it set.
        self._set_done()
        us_or_u32(&self.c.state, ST_CLOSING)
        # Wakes a recv()/send() blocked on this socket in another thread:
        # Linux's unix_shutdown() wakes the socket's waiters
        # (net/unix/af_unix.c), as do the BSDs (soshutdown); POSIX leaves it
        # unspecified, and close() would not wake them at all.
        self._shutdown_fd(SHUT_RDWR)
        return 0

    @property
    def closed(self):
        """True once our side closed the connection."""
        return bool(us_load_u32(&self.c.state) & ST_CLOSING)

    @property
    def is_connected(self):
        """False once either side closed the connection (or it was reset)."""
        return not (us_load_u32(&self.c.state) & (ST_CLOSING | ST_EOF))

    @property
    def done(self):
        """A threading.Event set when the server stops or the idle timeout
        fires; a handler that loops without reading can poll or wait on it."""
        cdef bint set_now = False
        if self._done is None:
            ev = _Event()
            # The handler's thread asks, the loop thread (idle timeout,
            # shutdown) sets: the critical section (the GIL's job on a
            # default build) makes "store the event / see _done_set" one
            # step, so one of the two threads always sets it.
            with cython.critical_section(self):
                if self._done is None:
                    self._done = ev
                    set_now = self._done_set
            if set_now:
                ev.set()
        return self._done

    cdef int _set_done(self) except -1:
        with cython.critical_section(self):
            self._done_set = True
            ev = self._done
        if ev is not None:
            ev.set()
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -------------------------------------------------- server side (internal)

    cdef int _idle_expired(self) except -1:
        return self._close_now()

    cdef int _begin_drain(self) except -1:
        # Only the read side: a blocked or later read() returns b"", while a
        # handler still writing its answer may go on (see _close_now).
        self._set_done()
        self._shutdown_fd(SHUT_RD)
        return 0

    cdef int _force_close(self) except -1:
        return self._close_now()

    def _begin(self):
        """Worker thread, before the handler: the start of the lifecycle (see
        _ConnBase).  False: do not run the handler, go on to _finish()."""
        self._loop()
        return self._lifecycle_begin()

    def _finish(self, bint shutdown=True):
        """The handler returned: close, count, unregister, then CLOSE if NEW
        was fired.  Worker thread; once per connection.  shutdown=False only
        closes our fd, leaving the socket itself alone: unixsrv.socketserver's
        request socket is a dup that a forked child may still be serving."""
        cdef Loop loop = self._loop()
        if us_or_u32(&self.c.state, ST_FINISHED | ST_CLOSING) & ST_FINISHED:
            return
        loop._table_del(&self.c)
        if shutdown:
            self._shutdown_fd(SHUT_RDWR)     # wakes any other thread using it
        self._unuse()                    # the lifetime use: closes the fd
        self._set_done()
        self.loop._count_closed(self.c.peer_uid)
        self.loop._conn_closed()
        self._lifecycle_end()
