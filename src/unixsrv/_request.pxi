# _request.pxi - the I/O methods on the hot path of unixsrv.socketserver's
# request socket.  That socket is a socket.socket subclass (a Python class,
# which a cdef class cannot extend), so these are plain functions its class
# takes as methods: the socket call itself, then the bytes (and, with an
# idle timeout, the time) noted on its Connection in C, without a Python
# frame in between.  The other I/O methods are in unixsrv/socketserver.py.

cdef object _sock_recv = _socket_module.socket.recv
cdef object _sock_recv_into = _socket_module.socket.recv_into
cdef object _sock_send = _socket_module.socket.send
cdef object _sock_sendall = _socket_module.socket.sendall


cdef int _note_io(object sock, size_t n_in, size_t n_out) except -1:
    conn = sock._conn          # None once the socket was closed or detached
    if conn is not None and (n_in or n_out):
        (<Connection?>conn)._io_done(n_in, n_out)
    return 0


def request_recv(self, bufsize, flags=0):
    """socket.recv(bufsize[, flags]), the bytes noted on the connection."""
    data = _sock_recv(self, bufsize, flags)
    _note_io(self, len(data), 0)
    return data


def request_recv_into(self, buffer, nbytes=0, flags=0):
    """socket.recv_into(buffer[, nbytes[, flags]]), the bytes noted."""
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
    cdef Py_ssize_t n
    _sock_sendall(self, data, flags)
    if PyBytes_CheckExact(data):
        n = PyBytes_GET_SIZE(data)
    else:
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        n = view.len
        PyBuffer_Release(&view)
    _note_io(self, 0, n)
