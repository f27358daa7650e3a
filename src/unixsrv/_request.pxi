# _request.pxi - the I/O methods on the hot path of unixsrv.socketserver's
# request socket.  That socket is a socket.socket subclass (a Python class,
# which a cdef class cannot extend), so these are plain functions its class
# takes as methods: the socket call itself, then the bytes (and, with an
# idle timeout, the time) noted on its Connection in C, without a Python
# frame in between.  The other I/O methods are in unixsrv/socketserver.py.
#
# Each first tries the call without waiting (MSG_DONTWAIT, recv(2)/send(2))
# and with the GIL held (a read only when not right after a write, see
# _after_write): on a server with many request threads, every
# release of the GIL wakes a waiting thread and the caller then queues to
# get it back, two context switches for a call that usually finds its data
# there (a request just accepted) or room for its answer.  Only when it
# would block (or fails: the socket module's own call then raises as it
# does) does the socket module's call run, releasing the GIL and honouring
# the socket's timeout.  Only without flags: MSG_DONTWAIT would change what
# MSG_WAITALL and the like mean.

cdef object _sock_recv = _socket_module.socket.recv
cdef object _sock_recv_into = _socket_module.socket.recv_into
cdef object _sock_send = _socket_module.socket.send
cdef object _sock_sendall = _socket_module.socket.sendall
cdef object _sock_shutdown = _socket_module.socket.shutdown
cdef object _sock_detach = _socket_module.socket.detach

#: recv(bufsize) without waiting allocates bufsize bytes first, as the
#: socket module does; larger sizes go to the module's call.
cdef Py_ssize_t _FAST_RECV_MAX = 262144


cdef int _note_io(object sock, size_t n_in, size_t n_out) except -1:
    cdef Connection c
    conn = sock._conn          # None once the socket was closed or detached
    if conn is not None and (n_in or n_out):
        c = <Connection?>conn
        c._io_done(n_in, n_out)
        c._wrote_last = n_out != 0
    return 0


cdef bint _after_write(object sock) except -1:
    """Whether the last I/O on sock was a write.  In request/response
    traffic the next request only comes once the peer has read our answer,
    so a try without waiting right then would be a wasted syscall (and, for
    recv, a wasted bufsize-byte buffer): the blocking model's read skips it
    too (Connection._recv_now)."""
    conn = sock._conn
    return conn is not None and (<Connection?>conn)._wrote_last


cdef int _fast_fd(object sock, object flags) except -2:
    """The fd for a try without waiting, or -1 for the socket module's call."""
    if flags != 0:
        return -1
    return sock.fileno()       # -1 once closed: the module's call raises


def request_recv(self, bufsize, flags=0):
    """socket.recv(bufsize[, flags]), the bytes noted on the connection."""
    cdef PyObject *raw
    cdef ssize_t r
    cdef Py_ssize_t n
    cdef int fd = _fast_fd(self, flags)
    if fd >= 0 and not _after_write(self) and type(bufsize) is int and 0 < bufsize <= _FAST_RECV_MAX:
        n = bufsize
        data = PyBytes_FromStringAndSize(NULL, n)
        r = recv(fd, <char *>data, n, MSG_DONTWAIT)
        if r >= 0:
            if r < n:
                # _PyBytes_Resize needs the only reference: hand ours to `raw`.
                raw = <PyObject *>data
                Py_INCREF(data)
                data = None
                _PyBytes_Resize(&raw, r)
                data = <bytes>raw
                Py_DECREF(data)
            _note_io(self, r, 0)
            return data
        # Not kept while the module's call waits: an idle request would
        # hold a second bufsize-byte buffer all that time.
        data = None
    data = _sock_recv(self, bufsize, flags)
    _note_io(self, len(data), 0)
    return data


def request_recv_into(self, buffer, nbytes=0, flags=0):
    """socket.recv_into(buffer[, nbytes[, flags]]), the bytes noted."""
    cdef Py_buffer view
    cdef ssize_t r = -1
    cdef int fd = _fast_fd(self, flags)
    if fd >= 0 and not _after_write(self) and type(nbytes) is int and nbytes >= 0:
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        try:
            if nbytes <= view.len:
                r = recv(fd, view.buf, nbytes or view.len, MSG_DONTWAIT)
        finally:
            PyBuffer_Release(&view)
        if r >= 0:
            _note_io(self, r, 0)
            return r
    n = _sock_recv_into(self, buffer, nbytes, flags)
    _note_io(self, n, 0)
    return n


def request_send(self, data, flags=0):
    """socket.send(data[, flags]), the bytes noted."""
    n = _sock_send(self, data, flags)
    _note_io(self, 0, n)
    return n


def request_sendall(self, data, flags=0):
    """socket.sendall(data[, flags]) in one call, the bytes noted after it
    (without an idle timeout: nothing needs to see them sooner)."""
    cdef Py_buffer view
    cdef Py_ssize_t n, done = 0
    cdef ssize_t r
    cdef int fd = _fast_fd(self, flags)
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        n = view.len
        while fd >= 0 and done < n:
            r = send(fd, <char *>view.buf + done, n - done, MSG_DONTWAIT)
            if r < 0:
                break
            done += r
        if done < n:
            # The rest (all of it after an error: the module's call raises it).
            with memoryview(data) as whole, whole.cast("B") as flat:
                _sock_sendall(self, flat[done:], flags)
    finally:
        PyBuffer_Release(&view)
    _note_io(self, 0, n)


def request_shutdown(self, how):
    """socket.shutdown(how), keeping the GIL (shutdown(2) never blocks)."""
    cdef int fd = self.fileno()
    if fd < 0 or type(how) is not int:
        return _sock_shutdown(self, how)     # raises as the module does
    if shutdown(fd, how) < 0:
        raise _oserror(errno)


def request_close_fd(self):
    """What socket.socket.close() does to the fd (_socket.socket.close),
    keeping the GIL: close(2) of a Unix socket without SO_LINGER does not
    block.  As there, ECONNRESET is not an error."""
    cdef int fd = _sock_detach(self)
    if fd >= 0 and close(fd) < 0 and errno != ECONNRESET:
        raise _oserror(errno)
