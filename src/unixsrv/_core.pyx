# cython: language_level=3
"""unixsrv._core - the C loop of unixsrv.

The listener, the epoll/kqueue loop, the connection table, the counters and
the per-connection I/O of both handler models live here.  The GIL is released
around every call that may block, and only there (``with nogil``), in these
functions (tests/test_core_surface.py keeps this list true):

* ``Loop.run`` and ``Loop.run_once`` (_loop.pxi): the poller wait and the
  I/O of each wakeup (accept, recv, flush, idle sweep);
* ``_mutex_lock_with_gil`` (_loop.pxi): waiting for a busy loop mutex;
* ``Connection._recv_now`` and ``Connection.write`` (_conn.pxi): a
  blocking-model handler's read and write that have to wait;
* ``_examine_existing`` (_listener.pxi): the connect that probes whether a
  socket file is stale; ``_lock_dir``: waiting for the directory lock.

Callbacks into Python run with the GIL, each inside try/except BaseException.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE, _PyBytes_Resize
from cpython.exc cimport PyErr_CheckSignals
from cpython.method cimport PyMethod_Check, PyMethod_GET_FUNCTION
from cpython.object cimport PyObject, PyObject_TypeCheck, PyTypeObject
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.ref cimport Py_DECREF, Py_INCREF

import asyncio as _asyncio
import asyncio.trsock as _trsock
import logging as _logging
import os as _os
import socket as _socket_module
import threading as _threading
import weakref as _weakref
from collections import deque as _deque

from .connstate import ConnState as _ConnState
from .errors import AddressInUseError, IdleTimeoutError, ServerClosedError
from .peer import PeerCredentials

#: True where abstract socket names exist (Linux).
HAVE_ABSTRACT = bool(US_HAVE_ABSTRACT)
#: Longest filesystem socket path in bytes (sizeof(sun_path) - 1).
SUN_PATH_MAX = US_SUN_PATH_MAX

_Event = _threading.Event
_TransportSocket = _trsock.TransportSocket
_AF_UNIX = _socket_module.AF_UNIX
_SOCK_STREAM = _socket_module.SOCK_STREAM
_NEW = _ConnState.NEW
_CLOSE = _ConnState.CLOSE
_DEBUG = _logging.DEBUG
_WARNING = _logging.WARNING
_ERROR = _logging.ERROR
_transport_log = _logging.getLogger("unixsrv.transport")
_access_log = _logging.getLogger("unixsrv.access")



class NamedSocket(_socket_module.socket):
    """A socket.socket for one of the server's fds whose getsockname() is the
    server's configured path.  unixsrv binds its listener under a temporary
    name and renames the file onto the path (see _listener.pxi), and the
    kernel goes on reporting the name bound (unix(7)), for the listener and
    for every connection accepted from it."""

    __slots__ = ("_name",)

    def getsockname(self):
        name = getattr(self, "_name", None)
        return _socket_module.socket.getsockname(self) if name is None else name

    def dup(self):
        return named_socket(_os.dup(self.fileno()), getattr(self, "_name", None))


def named_socket(int fd, object name):
    """A NamedSocket owning fd whose getsockname() returns ``name`` (None: the
    kernel's answer)."""
    sock = NamedSocket(_AF_UNIX, _SOCK_STREAM, 0, fd)
    sock._name = name
    return sock


# Loops that may need retiring in a forked child.
_live_loops = _weakref.WeakSet()

include "_oserror.pxi"
include "_stats.pxi"
include "_callbacks.pxi"
include "_listener.pxi"
include "_conn.pxi"
include "_stream.pxi"
include "_loop.pxi"
include "_request.pxi"


def _after_fork_in_child():
    for loop in list(_live_loops):
        loop._after_fork_in_child()
    _live_loops.clear()


_os.register_at_fork(after_in_child=_after_fork_in_child)


def exit_with_parent(int sig):
    """Have the kernel send ``sig`` to this process once the thread that
    forked it exits (Linux PR_SET_PDEATHSIG, prctl(2)).  False where the
    platform has no such call (the caller then watches a pipe instead)."""
    if us_exit_with_parent(sig) == 0:
        return True
    if errno == ENOSYS:
        return False
    raise _oserror(errno)
