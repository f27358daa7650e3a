# _oserror.pxi - an errno as the exception Python code expects, included by
# both extensions (_core, _loadgen).
#
# OSError(errno, strerror) constructs the subclass that matches the errno
# (FileNotFoundError for ENOENT, ConnectionResetError for ECONNRESET, ...:
# PEP 3151), so callers can catch what the socket module would raise.


cdef object _oserror(int err, object filename=None):
    """The OSError subclass matching errno (FileNotFoundError, ...)."""
    msg = strerror(err).decode("utf-8", "replace")
    if filename is None:
        return OSError(err, msg)
    return OSError(err, msg, filename)
