# _stream.pxi - the event model: per-connection state (_Stream) and the
# asyncio-shaped Transport a Protocol talks to.
#
# Everything here runs on the loop thread.  Writes go straight to the socket
# when it takes them; what it does not take is copied into the connection's
# C output buffer, which the loop flushes without the GIL when the poller
# says the socket is writable.


cdef inline uint64_t _token(conn_t *c) noexcept nogil:
    return (<uint64_t>c.seq << 32) | <uint32_t>c.fd


cdef int _set_interest(int pfd, conn_t *c, int interest) noexcept nogil:
    """Register exactly `interest` for c; returns 0 or an errno."""
    if interest == c.interest:
        return 0
    if us_poller_modify(pfd, c.fd, _token(c), c.interest, interest) < 0:
        return errno
    c.interest = interest
    return 0


cdef int _obuf_append(conn_t *c, const char *p, size_t n) noexcept nogil:
    """Queue n bytes behind the unsent output; returns 0 or ENOMEM."""
    cdef size_t need = c.olen + n
    cdef size_t cap
    cdef char *nb
    if c.ooff + need > c.ocap:
        if c.ooff:
            # The unsent bytes to the front first (realloc copies less then).
            memmove(c.obuf, c.obuf + c.ooff, c.olen)
            c.ooff = 0
        if need > c.ocap:
            cap = c.ocap * 2 if c.ocap else 4096
            while cap < need:
                cap *= 2
            nb = <char *>realloc(c.obuf, cap)
            if nb == NULL:
                return ENOMEM
            c.obuf = nb
            c.ocap = cap
    memcpy(c.obuf + c.ooff + c.olen, p, n)
    c.olen = need
    return 0


# asyncio's own no-op implementations: a protocol that inherits them unchanged
# is not called for them (a Python call costs more than the rest of a
# connection's teardown).  The check is on the bound method, so an override
# anywhere - subclass, instance attribute, a patched asyncio - is honoured.
cdef object _BASE_EOF_RECEIVED = _asyncio.Protocol.eof_received
cdef object _BASE_CONNECTION_LOST = _asyncio.BaseProtocol.connection_lost


cdef object _BufferedProtocol = _asyncio.BufferedProtocol


cdef inline bint _is_base(object method, object base):
    return PyMethod_Check(method) and <object>PyMethod_GET_FUNCTION(method) is base


cdef void _obuf_free(conn_t *c) noexcept nogil:
    free(c.obuf)
    c.obuf = NULL
    c.ocap = c.ooff = c.olen = 0


@cython.no_gc
cdef class _Stream(_ConnBase):
    """Loop-side state of one event-model connection."""

    def __dealloc__(self):
        _obuf_free(&self.c)

    cdef int _check_thread(self) except -1:
        if PyThread_get_thread_ident() != self._loop().thread_id:
            raise RuntimeError(
                "Transport methods must be called on the server's loop thread; "
                "use Server.call_soon_threadsafe() (under unixsrv.asyncio: the event "
                "loop's call_soon_threadsafe()) from other threads")
        return 0

    cdef int _start(self) except -1:
        """The start of the lifecycle (NEW, update_conn), then attach to the
        host, build the protocol, connection_made."""
        cdef Loop loop = self.loop
        # The stream keeps its transport until _finalize, as asyncio's event
        # loop keeps a transport alive while its socket is registered (the
        # host's server holds transports only weakly on Python 3.13+).
        self.transport = _new_transport(self)
        try:
            if not self._lifecycle_begin():        # NEW, update_conn (see _conn.pxi)
                return self._abort(None)
            if loop.on_attach is not None:
                if not loop.on_attach(self.transport):
                    return self._abort(None)        # the host's server closed meanwhile
                us_or_u32(&self.c.state, ST_ATTACHED)
        except BaseException as exc:      # KeyboardInterrupt/SystemExit from a callback
            loop._callback_error(exc)
            return self._abort(None)
        try:
            self._set_protocol(loop.factory())
            self.protocol.connection_made(self.transport)
        except BaseException as exc:
            self._callback_failed(exc)
        return 0

    cdef int _set_protocol(self, object protocol) except -1:
        self.protocol = protocol
        if isinstance(protocol, _BufferedProtocol):
            us_or_u32(&self.c.state, ST_BUFFERED)
        else:
            self.c.state &= ~(<uint32_t>ST_BUFFERED)
        return 0

    # ---------------------------------------------------------------- writing

    cdef int _write_obj(self, object data) except -1:
        cdef Py_buffer view
        if PyBytes_CheckExact(data):
            return self._write_buf(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self._write_buf(<const char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int _write_buf(self, const char *p, size_t n) except -1:
        cdef conn_t *c = &self.c
        cdef Loop loop = self.loop
        cdef ssize_t r
        cdef int err
        self._check_thread()
        if c.state & ST_WRITE_EOF:
            raise RuntimeError("Cannot call write() after write_eof()")
        if c.state & ST_PEER_ERROR:
            return 0          # connection_lost() carries the error
        if c.state & (ST_CLOSING | ST_LOST):
            if not loop.hosted:
                raise ServerClosedError("write() on a transport that is closed")
            # Hosted, asyncio's rule (selector_events): a transport takes writes
            # after close(), queued behind the output it is still flushing, and
            # drops them once nothing is left to flush (asyncio's own
            # SSLProtocol writes its close_notify that way).
            if c.state & ST_LOST or c.olen == 0:
                return 0
        if n == 0:
            return 0
        if c.olen == 0:
            while True:
                r = send(c.fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT)
                if r >= 0:
                    break
                err = errno
                if err == EINTR:
                    continue
                if us_would_block(err):
                    r = 0
                    break
                return self._fail(err)
            if r > 0:
                loop.batch_out += r
                c.last_active = loop.now
                if <size_t>r == n:
                    return 0
                p += r
                n -= r
        if c.olen + n > loop.max_wbuf:
            return self._abort(BufferError(
                f"write buffer limit exceeded: {c.olen + n} bytes unsent "
                f"(max_write_buffer={loop.max_wbuf}); the peer is not reading"))
        if _obuf_append(c, p, n) != 0:
            return self._abort(MemoryError())
        err = _set_interest(loop.pfd, c, c.interest | US_WRITE)
        if err:
            return self._fail(err)
        return self._check_high_water()

    cdef int _check_high_water(self) except -1:
        """pause_writing() once the unsent output exceeds the high mark."""
        if self.c.olen > self.c.high and not (self.c.state & (ST_PAUSED | ST_LOST)):
            us_or_u32(&self.c.state, ST_PAUSED)
            self._pause_protocol()
        return 0

    cdef int _pause_protocol(self) except -1:
        try:
            self.protocol.pause_writing()
        except BaseException as exc:
            self.loop._callback_error(exc)
        return 0

    cdef int _resume_protocol(self) except -1:
        self.c.state &= ~(<uint32_t>ST_PAUSED)
        try:
            self.protocol.resume_writing()
        except BaseException as exc:
            self.loop._callback_error(exc)
        return 0

    # ---------------------------------------------------------------- closing

    cdef int _close(self) except -1:
        cdef conn_t *c = &self.c
        if c.state & (ST_CLOSING | ST_LOST):
            return 0
        us_or_u32(&c.state, ST_CLOSING)
        if c.olen == 0:
            self._queue_finalize()               # the fd closes this dispatch
        else:
            # Stop reading while the output drains (closing the fd without
            # this would cost nothing, but draining can take long).
            _set_interest(self.loop.pfd, c, c.interest & ~US_READ)
        return 0

    cdef int _abort(self, object exc) except -1:
        """Close now, dropping unsent output; connection_lost(exc) follows
        (the first reason given wins: later ones are consequences)."""
        cdef conn_t *c = &self.c
        if c.state & ST_LOST:
            return 0
        us_or_u32(&c.state, ST_CLOSING)
        _obuf_free(c)
        if self._lost_exc is None:
            self._lost_exc = exc
        return self._queue_finalize()

    cdef int _fail(self, int err) except -1:
        """The connection failed (reset, broken pipe, poller error): a normal
        way for a client to go, logged at DEBUG; connection_lost() gets it."""
        exc = _oserror(err)
        if _transport_log.isEnabledFor(_DEBUG):
            _transport_log.debug("unixsrv %s: connection %d: %s", self.loop.display_path, self.c.seq, exc)
        us_or_u32(&self.c.state, ST_PEER_ERROR)
        return self._abort(exc)

    cdef int _queue_finalize(self) except -1:
        if not (self.c.state & ST_QUEUED):
            us_or_u32(&self.c.state, ST_QUEUED)
            self.loop.finalizing.append(self)
            self.loop._request_pass()
        return 0

    cdef int _finalize(self) except -1:
        """Close the fd and tell the protocol; runs once, at the end of a
        dispatch, so connection_lost() never runs inside another callback."""
        cdef conn_t *c = &self.c
        cdef Loop loop = self.loop
        if c.state & ST_LOST:
            return 0
        us_or_u32(&c.state, ST_LOST | ST_CLOSING)
        if self._sock is not None:
            self._sock.detach()      # the socket object must not close our fd
            self._sock = None
        c.uses = 0
        if c.fd >= 0:
            # close() drops the poller registration only if no duplicate of the
            # fd exists (epoll(7)); user code that saw a socket object for it
            # could have dup()ed it, so unregister explicitly in that case.
            # (An epoll registration outlives an interest of 0, hence no
            # check of c.interest here.)
            if c.state & ST_EXPOSED:
                us_poller_remove(loop.pfd, c.fd, c.interest)
            close(c.fd)
        loop._table_del(c)
        _obuf_free(c)
        loop._count_closed(c.peer_uid)
        proto, exc, transport = self.protocol, self._lost_exc, self.transport
        self.protocol = self._lost_exc = self._held = self.transport = None
        if proto is not None:
            try:
                connection_lost = proto.connection_lost
                if not _is_base(connection_lost, _BASE_CONNECTION_LOST):
                    connection_lost(exc)
            except BaseException as err:
                loop._callback_error(err)
        if c.state & ST_ATTACHED and loop.on_detach is not None:
            try:
                loop.on_detach(transport)
            except BaseException as err:
                loop._callback_error(err)
        try:
            self._lifecycle_end()
        except BaseException as err:  # KeyboardInterrupt/SystemExit from a callback
            loop._callback_error(err)
        return loop._conn_closed()

    cdef int _callback_failed(self, object exc) except -1:
        """A protocol callback raised: report it and close the connection."""
        self.loop._callback_error(exc)
        return self._abort(None if isinstance(exc, (KeyboardInterrupt, SystemExit)) else exc)

    # ---------------------------------------------------------------- loop side

    cdef int _on_record(self, rec_t *r) except -1:
        cdef conn_t *c = &self.c
        cdef int kind = r.kind
        if kind == REC_DATA:
            if c.state & ST_CLOSING:
                return 0
            data = PyBytes_FromStringAndSize(self.loop.rxbuf + r.off, r.n)
            if c.state & ST_READ_PAUSED or self._held is not None:
                return self._hold(data)
            self._deliver(data)
        elif kind == REC_EOF:
            if c.state & ST_CLOSING:
                return 0
            if c.state & ST_READ_PAUSED or self._held is not None:
                return self._hold(None)
            self._deliver_eof()
        elif kind == REC_ERROR:
            self._fail(<int>r.n)
        elif kind == REC_RESUME:
            if c.state & ST_PAUSED:
                self._resume_protocol()
        elif kind == REC_FLUSHED:
            # As asyncio: a closing transport that drains below the low mark
            # resumes the protocol before connection_lost().
            if c.state & ST_PAUSED:
                self._resume_protocol()
            if c.state & ST_CLOSING:
                self._queue_finalize()
        elif kind == REC_READABLE:
            # Paused or closed since the poller reported it: the bytes stay
            # in the kernel until resume_reading() (level-triggered).
            if c.state & (ST_CLOSING | ST_READ_PAUSED) or self._held is not None:
                return 0
            if c.state & ST_BUFFERED:
                return self._recv_buffered()
            # set_protocol() replaced the BufferedProtocol since: the next
            # pass receives into rxbuf (the socket stays readable).
        elif kind == REC_IDLE:
            self._idle_expired()
        return 0

    cdef int _deliver(self, bytes data) except -1:
        if self.c.state & ST_BUFFERED:
            return self._feed_buffered(data)
        try:
            self.protocol.data_received(data)
        except BaseException as exc:
            self._callback_failed(exc)
        return 0

    cdef int _recv_buffered(self) except -1:
        """A BufferedProtocol connection is readable: recv() straight into
        the buffer get_buffer() returns, then buffer_updated(n) (as asyncio's
        selector transport does, with the same checks)."""
        cdef conn_t *c = &self.c
        cdef Py_buffer view
        cdef ssize_t r
        cdef int err = 0
        try:
            buf = self.protocol.get_buffer(-1)
            PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
        except BaseException as exc:
            return self._callback_failed(exc)
        try:
            if view.len == 0:
                return self._callback_failed(RuntimeError("get_buffer() returned an empty buffer"))
            while True:
                # A non-blocking recv of what the poller reported as there.
                r = recv(c.fd, view.buf, view.len, MSG_DONTWAIT)
                if r >= 0 or errno != EINTR:
                    break
            if r < 0:
                err = errno
        finally:
            PyBuffer_Release(&view)
        if r > 0:
            us_add_u64(&self.loop.stats.s.bytes_in, r)
            c.last_active = self.loop.now
            try:
                self.protocol.buffer_updated(r)
            except BaseException as exc:
                self._callback_failed(exc)
        elif r == 0:
            c.state |= ST_EOF
            self._deliver_eof()
        elif not us_would_block(err):
            _set_interest(self.loop.pfd, c, 0)
            self._fail(err)
        return 0

    cdef int _feed_buffered(self, bytes data) except -1:
        """Data received before the protocol became a BufferedProtocol
        (set_protocol()) or held while reading was paused: copied into its
        buffers, as many get_buffer()/buffer_updated() rounds as it takes."""
        cdef Py_ssize_t n, done = 0, total = len(data)
        view = memoryview(data)
        try:
            while done < total and not (self.c.state & ST_CLOSING):
                buf = memoryview(self.protocol.get_buffer(total - done)).cast("B")
                n = min(len(buf), total - done)
                if n == 0:
                    raise RuntimeError("get_buffer() returned an empty buffer")
                buf[:n] = view[done:done + n]
                done += n
                self.protocol.buffer_updated(n)
        except BaseException as exc:
            self._callback_failed(exc)
        return 0

    cdef int _deliver_eof(self) except -1:
        cdef conn_t *c = &self.c
        try:
            eof_received = self.protocol.eof_received
            keep_open = None if _is_base(eof_received, _BASE_EOF_RECEIVED) else eof_received()
        except BaseException as exc:
            return self._callback_failed(exc)
        if not keep_open:
            return self._close()
        if not (c.state & ST_LOST):
            err = _set_interest(self.loop.pfd, c, c.interest & ~US_READ)
            if err:
                self._fail(err)
        return 0

    # Data (bytes) or EOF (None) received in the same wakeup as a
    # pause_reading() call - or after it, until all held records were
    # replayed - is held back: pause_reading() means no data_received() until
    # resume_reading(), and the order of what arrived is kept.
    cdef int _hold(self, object item) except -1:
        if self._held is None:
            self._held = []
        self._held.append(item)
        return 0

    def _replay_held(self):
        """After resume_reading(): deliver what was held, in order, until
        the protocol pauses again or the transport closes."""
        self._check_thread()      # reachable from Python as transport._s
        while self._held is not None and not (self.c.state & (ST_READ_PAUSED | ST_CLOSING)):
            item = self._held.pop(0)
            if not self._held:
                self._held = None
            if item is None:
                self._deliver_eof()
            else:
                self._deliver(item)

    cdef int _idle_expired(self) except -1:
        return self._abort(IdleTimeoutError(
            f"no byte received or sent for {self.loop.idle_ns / 1e9:g} s"))

    cdef int _begin_drain(self) except -1:
        return self._close()

    cdef int _force_close(self) except -1:
        return self._abort(None)

    # ---------------------------------------------------------------- helpers

    def _socket(self):
        """A socket.socket view of the fd for getsockopt & co (kept until the
        transport is finalized, then detached, never closed by it)."""
        if self._sock is None:
            if self.c.state & ST_LOST:
                return None
            us_or_u32(&self.c.state, ST_EXPOSED)
            # (A stream made with __new__ has no loop, and fd -1: socket() refuses it.)
            self._sock = named_socket(self.c.fd, None if self.loop is None else self.loop.sockname)
            self._sock_view = _TransportSocket(self._sock)
        return self._sock_view


# Transport is a Python class (it must subclass asyncio.Transport), so its
# `_s` slot is reached through a member descriptor; every transport call goes
# through it, so read and write the slot at its fixed offset instead (both set
# right after the class below).
cdef PyTypeObject *_TRANSPORT_TYPE = NULL
cdef PyTypeObject *_STREAM_TYPE = <PyTypeObject *>_Stream
cdef Py_ssize_t _TRANSPORT_SLOT = 0


cdef inline PyObject **_transport_slot(object transport) noexcept:
    return <PyObject **>((<char *><PyObject *>transport) + _TRANSPORT_SLOT)


cdef _Stream _stream_of(object transport):
    """The _Stream behind a Transport (or a subclass of it).  The slot is
    writable from Python (``t._s = x``) and empty in ``Transport.__new__``,
    so what it holds is checked before the cast: the type (an exact match
    costs one compare) and that the loop attached it."""
    cdef PyObject *s
    if not PyObject_TypeCheck(transport, _TRANSPORT_TYPE):
        raise TypeError(f"expected a unixsrv Transport, not {type(transport).__name__}")
    s = _transport_slot(transport)[0]
    if (s == NULL or not PyObject_TypeCheck(<object>s, _STREAM_TYPE)
            or (<_Stream>s).loop is None):
        raise RuntimeError("this Transport is not attached to a connection")
    return <_Stream>s


cdef object _new_transport(_Stream stream):
    """Transport(stream) without the generic type call and __init__."""
    transport = PyType_GenericAlloc(_TRANSPORT_TYPE, 0)
    Py_INCREF(stream)
    _transport_slot(transport)[0] = <PyObject *>stream
    return transport


class Transport(_asyncio.Transport):
    """The asyncio.Transport given to ``Protocol.connection_made``.

    It is a real ``asyncio.Transport`` subclass; all methods must be called
    on the server's loop thread (the thread running protocol callbacks).
    Only the server makes them: ``Transport()`` raises TypeError.
    """

    # __weakref__: asyncio.Server (3.13+) keeps its clients in a WeakSet.
    __slots__ = ("_s", "__weakref__")

    # loop.start_tls() (StreamWriter.start_tls) upgrades it: what it needs -
    # set_protocol, pause/resume_reading, a BufferedProtocol - is here.
    _start_tls_compatible = True

    def __init__(self, *args, **kwargs):
        # The loop makes transports with _new_transport(), never through
        # here: a Transport is only valid bound to a live connection.
        raise TypeError("Transport objects are created by the server, not from Python")

    def __repr__(self):
        try:
            s = _stream_of(self)
        except RuntimeError:      # repr() must work on any object (debuggers, logs)
            return "<unixsrv.Transport not attached>"
        return f"<unixsrv.Transport id={s.c.seq} fd={s.c.fd} closing={self.is_closing()}>"

    def write(self, data):
        """Send data now if the socket takes it, else buffer it."""
        _stream_of(self)._write_obj(data)

    def writelines(self, list_of_data):
        """Write the items in order, as one write (so a bad item sends nothing)."""
        _stream_of(self)._write_obj(b"".join(list_of_data))

    def write_eof(self):
        """Shut down the write side once buffered output is flushed."""
        cdef _Stream s = _stream_of(self)
        s._check_thread()
        if s.c.state & (ST_WRITE_EOF | ST_CLOSING | ST_LOST):
            return
        us_or_u32(&s.c.state, ST_WRITE_EOF)
        if s.c.olen == 0:
            shutdown(s.c.fd, SHUT_WR)

    def can_write_eof(self):
        return True

    def close(self):
        """Stop reading, flush buffered output, then close; connection_lost(None) follows."""
        cdef _Stream s = _stream_of(self)
        s._check_thread()
        s._close()

    def abort(self):
        """Close at once, discarding buffered output; connection_lost(None) follows."""
        cdef _Stream s = _stream_of(self)
        s._check_thread()
        s._abort(None)

    def is_closing(self):
        return bool(_stream_of(self).c.state & (ST_CLOSING | ST_LOST))

    def pause_reading(self):
        cdef _Stream s = _stream_of(self)
        s._check_thread()
        if s.c.state & (ST_READ_PAUSED | ST_CLOSING):
            return
        us_or_u32(&s.c.state, ST_READ_PAUSED)
        err = _set_interest(s.loop.pfd, &s.c, s.c.interest & ~US_READ)
        if err:
            raise _oserror(err)

    def resume_reading(self):
        cdef _Stream s = _stream_of(self)
        s._check_thread()
        if not (s.c.state & ST_READ_PAUSED) or s.c.state & ST_CLOSING:
            return
        s.c.state &= ~(<uint32_t>ST_READ_PAUSED)
        if s._held is not None:
            s.loop.pending.append(s._replay_held)   # this thread runs it after this dispatch
            s.loop._request_pass()                  # (hosted: called from a task, not a dispatch)
        if not (s.c.state & ST_EOF):
            err = _set_interest(s.loop.pfd, &s.c, s.c.interest | US_READ)
            if err:
                raise _oserror(err)

    def is_reading(self):
        return not (_stream_of(self).c.state & (ST_READ_PAUSED | ST_CLOSING | ST_LOST))

    # asyncio's own transports have these private members, and asyncio's
    # SSLProtocol (the ssl= layer of unixsrv.asyncio) uses them.

    def _force_close(self, exc):
        """Close at once with connection_lost(exc) (asyncio's fatal-error path)."""
        cdef _Stream s = _stream_of(self)
        s._check_thread()
        s._abort(exc)

    @property
    def _paused(self):
        """True while reading is paused (Python 3.10's SSLProtocol reads it)."""
        return bool(_stream_of(self).c.state & ST_READ_PAUSED)

    @property
    def _protocol_paused(self):
        """True between pause_writing() and resume_writing()."""
        return bool(_stream_of(self).c.state & ST_PAUSED)

    def set_write_buffer_limits(self, high=None, low=None):
        """asyncio semantics: high defaults to 64 KiB (or 4 * low), low to high // 4."""
        cdef _Stream s = _stream_of(self)
        s._check_thread()
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        s.c.high = high
        s.c.low = low
        if s.c.olen <= s.c.low and s.c.state & ST_PAUSED:
            s._resume_protocol()
        else:
            s._check_high_water()

    def get_write_buffer_limits(self):
        cdef _Stream s = _stream_of(self)
        return (s.c.low, s.c.high)

    def get_write_buffer_size(self):
        return _stream_of(self).c.olen

    def get_extra_info(self, name, default=None):
        """'peername', 'sockname', 'peercred' (PeerCredentials) or 'socket'."""
        cdef _Stream s = _stream_of(self)
        try:
            if name == "peername":
                return s.remote_address
            if name == "sockname":
                # Hosted (unixsrv.asyncio), what asyncio's transports give:
                # getsockname() (bytes for an abstract name).
                return s.loop.sockname if s.loop.hosted else s.loop.display_path
            if name == "peercred":
                return s.peer
            if name == "socket":
                s._check_thread()     # makes and drops `_sock` (see _finalize)
                sock = s._socket()
                return default if sock is None else sock
        except OSError:
            pass
        return default

    # The protocol field is replaced here and dropped by _finalize on the loop
    # thread; read or written from another thread (free-threaded build) the
    # object could be freed under the reader.
    def set_protocol(self, protocol):
        cdef _Stream s = _stream_of(self)
        s._check_thread()
        s._set_protocol(protocol)

    def get_protocol(self):
        cdef _Stream s = _stream_of(self)
        s._check_thread()
        return s.protocol


_TRANSPORT_TYPE = <PyTypeObject *>Transport
_TRANSPORT_SLOT = (<PyMemberDescrObject *>Transport.__dict__["_s"]).d_member.offset
