# cython: language_level=3
# The core's own types: counters, connection state, the records of a wakeup
# and the extension types of _core.pyx.  The system calls and the platform
# shims they use are declared in includes/ (shared with _loadgen).

from cpython.object cimport PyObject, PyTypeObject
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

from .includes.platform cimport *
from .includes.python cimport *
from .includes.system cimport *


# ----------------------------------------------------------------- core types

cdef struct us_stats:
    uint64_t accepted     # connections handed to a handler / protocol
    uint64_t closed       # accepted connections closed since (open = accepted - closed)
    uint64_t rejected     # refused by max_connections or max_connections_per_uid
    uint64_t bytes_in
    uint64_t bytes_out
    uint64_t errors       # errors reported through on_error
    uint64_t denied       # refused by the allow-lists or authorize=


# Connection state bits (conn_t.state), set with us_or_u32.
cdef enum:
    ST_CLOSING = 1        # our side closed it: new I/O raises ServerClosedError
    ST_QUEUED = 2         # event model: queued for _finalize (exactly once)
    ST_EOF = 4            # the peer's EOF (or a reset) was seen
    ST_IDLE = 8           # closed by the idle timeout
    ST_LOST = 16          # event model: fd closed, connection_lost scheduled
    ST_WRITE_EOF = 32     # event model: write_eof() requested
    ST_PAUSED = 64        # event model: pause_writing() was called
    ST_READ_PAUSED = 128  # event model: pause_reading() was called
    ST_PEER_ERROR = 256   # event model: the connection failed (reset, broken pipe)
    ST_EXPOSED = 512      # a socket object for the fd was handed to user code
    ST_ANNOUNCED = 1024   # on_conn_state NEW fired, so CLOSE fires too
    ST_FINISHED = 2048    # blocking model: _finish() ran
    ST_BUFFERED = 4096    # event model: the protocol is an asyncio.BufferedProtocol
    ST_ATTACHED = 8192    # hosted: Loop.on_attach accepted it, so on_detach follows


cdef struct conn_t:
    int fd
    uint32_t seq          # distinguishes fd reuse; part of the poller token
    uint32_t state        # ST_* bits
    int32_t uses          # fd lifetime: the fd is closed when this drops to 0
    int interest          # event model: US_READ/US_WRITE currently registered
    int64_t last_active   # monotonic ns of the last byte in or out
    PyObject *owner       # the Python object embedding this struct (borrowed)
    char *obuf            # event model: unsent output, obuf[ooff:ooff+olen]
    size_t ooff
    size_t olen
    size_t ocap
    size_t high           # event model: pause_writing above this many bytes
    size_t low            # event model: resume_writing at or below this
    long peer_pid         # SO_PEERCRED, read once at accept
    long peer_uid
    long peer_gid


cdef enum RecKind:
    REC_NEW = 1           # an accepted fd waiting for its Python objects
    REC_DATA = 2          # rxbuf[off:off+n] arrived
    REC_EOF = 3
    REC_ERROR = 4         # n = errno
    REC_RESUME = 5        # output fell to the low-water mark
    REC_FLUSHED = 6       # output of a closing connection fully sent
    REC_IDLE = 7          # idle timeout expired
    REC_ACCEPT_ERROR = 8  # n = errno
    REC_READABLE = 9      # readable; a BufferedProtocol connection receives in the dispatch
    REC_DENIED = 20       # a denied peer to log (pid/uid/gid); n = denials not logged before it
    REC_DENIED_MORE = 21  # n = denials not logged since the last report


cdef struct rec_t:
    int kind
    int fd
    uint32_t seq
    size_t off
    ssize_t n
    long pid              # REC_NEW, REC_DENIED: the peer (SO_PEERCRED), -1 = unknown
    long uid
    long gid


cdef class Stats:
    # The counters: _own, or one slot of a SharedStats (Server(workers=N):
    # each worker process adds to its own slot, the parent sums them).
    cdef us_stats *s
    cdef us_stats _own
    cdef object _mapping     # the SharedStats whose slot s points into


cdef class SharedStats:
    cdef us_stats *slots
    cdef size_t count
    cdef size_t size


cdef class Callbacks:
    cdef public object on_error
    cdef public object on_conn_state
    cdef public object on_server_info
    cdef public object update_conn


cdef class LoopOwner:
    cdef readonly object report
    cdef readonly object conn_state
    cdef readonly object update_conn
    cdef readonly object spawn
    cdef readonly object drained
    cdef int _check(self, bint blocking_model) except -1


cdef class LoopConfig:
    cdef readonly LoopOwner owner
    cdef readonly Stats stats
    cdef readonly Callbacks callbacks
    cdef readonly object factory
    cdef readonly double idle_timeout
    cdef readonly size_t max_connections
    cdef readonly size_t read_size
    cdef readonly size_t high_water
    cdef readonly size_t low_water
    cdef readonly size_t max_write_buffer


cdef class Loop


cdef class _ConnBase:
    cdef conn_t c
    cdef Loop loop
    cdef object _peer
    cdef object _remote
    cdef Loop _loop(self)
    cdef int _use(self) except -1
    cdef void _unuse(self) noexcept nogil
    cdef void _shutdown_fd(self, int how) noexcept
    cdef int _idle_expired(self) except -1
    cdef int _begin_drain(self) except -1
    cdef int _force_close(self) except -1
    cdef bint _lifecycle_begin(self) except -1
    cdef int _lifecycle_end(self) except -1


cdef class Connection(_ConnBase):
    cdef object _done
    cdef bint _done_set
    cdef bint _big_reads
    cdef bint _wrote_last       # the last I/O was a write (see _recv_now)
    cdef int _deferred_err
    cdef object _read_big(self, Py_ssize_t n, const char *head, ssize_t have)
    cdef Py_ssize_t _write_buf(self, const char *p, Py_ssize_t n) except -1
    cdef int _raise_deferred(self) except -1
    cdef int _close_now(self) except -1
    cdef ssize_t _recv_now(self, char *buf, size_t n, int *err) except? -2
    cdef object _read_result(self, ssize_t r, int err)
    cdef int _set_done(self) except -1
    cdef object _io_error(self, int err)
    cdef void _count_in(self, ssize_t r) noexcept
    cdef void _io_done(self, size_t n_in, size_t n_out) noexcept


cdef class _Stream(_ConnBase):
    cdef object protocol
    cdef object transport
    cdef object _sock
    cdef object _sock_view
    cdef object _lost_exc
    cdef list _held
    cdef object _data_received    # protocol.data_received, looked up once (_deliver)
    cdef int _write_obj(self, object data) except -1
    cdef int _write_buf(self, const char *data, size_t n) except -1
    cdef int _start(self) except -1
    cdef int _on_record(self, rec_t *r) except -1
    cdef int _close(self) except -1
    cdef int _abort(self, object exc) except -1
    cdef int _fail(self, int err) except -1
    cdef int _queue_finalize(self) except -1
    cdef int _check_high_water(self) except -1
    cdef int _deliver(self, bytes data) except -1
    cdef int _feed_buffered(self, bytes data) except -1
    cdef int _recv_buffered(self) except -1
    cdef int _set_protocol(self, object protocol) except -1
    cdef int _deliver_eof(self) except -1
    cdef int _hold(self, object item) except -1
    cdef int _finalize(self) except -1
    cdef int _pause_protocol(self) except -1
    cdef int _resume_protocol(self) except -1
    cdef int _callback_failed(self, object exc) except -1
    cdef int _check_thread(self) except -1


cdef class Loop:
    cdef int pfd
    cdef int wake_r
    cdef int wake_w
    cdef int lfd
    cdef bint event_model
    cdef bint accepting
    cdef bint accept_paused
    cdef bint accept_reported
    cdef bint rotate_listener     # shared with other processes' loops (workers=N)
    cdef bint exiting
    cdef bint closed
    cdef bint drain_waiting
    cdef bint dispatching
    cdef bint hosted
    cdef bint kicked
    cdef int64_t timer_deadline
    cdef public object kick
    cdef public object set_timer
    cdef public object on_attach
    cdef public object on_detach
    cdef readonly object sockname
    cdef int accept_backoff_ms
    cdef int64_t accept_resume_ns
    cdef int64_t idle_ns
    cdef int64_t next_sweep_ns
    cdef int64_t now
    cdef uint32_t next_seq
    cdef size_t max_conns
    cdef size_t read_size
    cdef size_t high_water
    cdef size_t low_water
    cdef size_t max_wbuf
    cdef uint64_t batch_in
    cdef uint64_t batch_out
    cdef long owner_pid
    cdef unsigned long thread_id
    cdef Stats stats
    cdef Callbacks callbacks
    cdef LoopOwner owner
    cdef object factory
    cdef list pending
    cdef list finalizing
    cdef object stash_exc
    cdef conn_t **table
    cdef int table_cap
    cdef int table_hi
    cdef pthread_mutex_t mu
    cdef char *rxbuf
    cdef size_t rxcap
    cdef size_t rx_used
    cdef rec_t *recs
    cdef int nrecs
    cdef us_poll_event *events
    cdef readonly object display_path
    cdef object unlink_path
    cdef dev_t sock_dev
    cdef ino_t sock_ino
    cdef object __weakref__
    # Access control (Loop.set_access): allow-lists, authorize=, per-uid limit
    cdef bint lists_on
    cdef uint32_t *allow_uids       # NULL: no uid list (None)
    cdef size_t n_allow_uids
    cdef uint32_t *allow_gids       # NULL: no group list (None)
    cdef size_t n_allow_gids
    cdef bint has_authorize
    cdef object authorize
    cdef uint32_t max_per_uid       # 0: no per-uid limit
    cdef us_uid_counts uid_counts
    cdef pthread_mutex_t uid_mu     # guards uid_counts (worker threads close connections)
    cdef int64_t deny_window_end    # rate limit of the WARNING per denied peer
    cdef int deny_logged
    cdef uint64_t deny_quiet
    # Loop.set_tick: a callback run on the loop thread every tick_ns
    cdef int64_t tick_ns
    cdef int64_t next_tick_ns
    cdef object tick
    # Loop.queue_accepted(): accepted connections wait in a C queue (a ring
    # of REC_NEW records) for take_accepted() on another thread, and the
    # loop thread takes the GIL only for what else needs Python.
    cdef bint queue_new
    cdef bint aq_closed
    cdef bint woken               # this pass saw the wakeup pipe
    cdef rec_t *aq
    cdef size_t aq_cap
    cdef size_t aq_head
    cdef size_t aq_len
    cdef int aq_r
    cdef int aq_w
    cdef pthread_mutex_t aq_mu

    cdef void _lock(self) noexcept nogil
    cdef void _unlock(self) noexcept nogil
    cdef void _lock_with_gil(self) noexcept
    cdef void _push(self, int kind, int fd, uint32_t seq, size_t off, ssize_t n) noexcept nogil
    cdef int _table_put(self, conn_t *c) except -1
    cdef conn_t *_table_get(self, int fd, uint32_t seq) noexcept nogil
    cdef int _table_del(self, conn_t *c) noexcept
    cdef int _timeout_ms(self) noexcept
    cdef int64_t _next_deadline(self) noexcept
    cdef int _request_pass(self) except -1
    cdef int _open_with(self, display, unlink_path, make_listener, tuple args) except -1
    cdef void _collect(self, int n) noexcept nogil
    cdef void _accept_batch(self) noexcept nogil
    cdef void _recv_one(self, conn_t *c) noexcept nogil
    cdef void _flush(self, conn_t *c) noexcept nogil
    cdef void _sweep(self) noexcept nogil
    cdef int _dispatch(self) except -1
    cdef void _drop_accepted(self, int fd, long uid) noexcept nogil
    cdef int _open_connection(self, rec_t *r) except -1
    cdef object _new_connection(self, rec_t *r)
    cdef void _enqueue_new(self, int fd, size_t named, long pid, long uid, long gid) noexcept nogil
    cdef bint _quiet_pass(self) noexcept nogil
    cdef int64_t _timer_deadline(self) noexcept nogil
    cdef bint _aq_pop(self, rec_t *out) noexcept nogil
    cdef size_t _drop_queue(self) noexcept nogil
    cdef object _lookup(self, int fd, uint32_t seq)
    cdef int _run_finalizing(self) except -1
    cdef int _finalize_unless_dispatching(self) except -1
    cdef int _run_pending(self) except -1
    cdef int _conn_closed(self) except -1
    cdef void _count_closed(self, long uid) noexcept nogil
    cdef void _close_fds(self) noexcept
    cdef list _snapshot(self)
    cdef int _callback_error(self, object exc, object level=*) except -1
    cdef void _wake(self) noexcept
    cdef int _check_init(self) except -1
    cdef int _setup(self, LoopConfig config) except -1
    cdef int _check_owner(self) except -1
    cdef void _rotate_listener(self) noexcept nogil
    cdef void _push_peer(self, int kind, int fd, size_t off, ssize_t n, long pid, long uid, long gid) noexcept nogil
    cdef bint _listed(self, int fd, long uid, long gid) noexcept nogil
    cdef void _uid_put(self, long uid) noexcept nogil
    cdef bint _note_denied(self, uint64_t *quiet) noexcept nogil
    cdef bint _authorized(self, rec_t *r) except -1
    cdef void _drop_new(self, rec_t *r) noexcept nogil
    cdef int _log_denied(self, long pid, long uid, long gid, uint64_t quiet) except -1
    cdef int _run_tick(self) except -1
