# cython: language_level=3
"""unixsrv._loadgen - the load generator behind ``unixsrv bench``: the client
side of the core's poller and socket shims, in an extension of its own (the
server extension, _core, carries none of it).
"""

# What follows is the design, for the reader of the source.
#
# A LoadGen drives N non-blocking AF_UNIX connections from one thread, with
# the GIL released for the whole connect phase and the whole run: the poller
# shim of the server loop (level-triggered; token = generation << 32 | slot),
# plain recv/send, no Python object per message.  The GIL is taken about once
# a second for an optional progress callback, and nowhere else.
#
# Verification.  Every connection streams a fixed pseudo-random pattern
# (LG_PATLEN bytes, repeated) starting at its own offset.  The pattern buffer
# holds LG_PATLEN + LG_CHUNK bytes, so the bytes of any stream position form
# one contiguous slice: sends come straight out of it (no copy) and each
# received chunk (at most LG_CHUNK bytes) is checked with one memcmp against
# the slice at its receive offset.  A differing byte, a byte more than was
# sent, or an EOF before the last echo ends that connection and is counted
# as an error.
#
# Latency.  A message's time runs from the moment it is queued for sending
# (it goes out at once unless the socket buffer is full) to the arrival of its
# last echoed byte.  It lands in a log-linear histogram over nanoseconds:
# exact below 128 ns, then 128 sub-buckets per power of two (bucket width
# under 0.8 % of the value) up to 2**36 ns (68.7 s; above lands in the last
# bucket).  Histograms of several processes merge by adding bucket counts.
#
# Modes.
#   pingpong  N connections each keep P messages of S bytes in flight.
#   connect   N slots each loop: connect, send S bytes, read the echo, close.
#   hold      N connections each do one verified round trip, then stay open
#             (for memory measurements) until the duration passes, the stop
#             fd becomes readable, or the watched fd (stdin) reaches EOF.
#
# Connecting.  A non-blocking AF_UNIX connect() either completes at once or,
# when the listener's backlog is full, fails with EAGAIN (Linux); the slot is
# then retried after LG_RETRY_NS, oldest first, and no new connect is tried
# in the same round.  Where connect() answers EINPROGRESS (BSD) the slot waits
# for writability and reads SO_ERROR.  The whole connect phase is bounded by
# a deadline, and may be paced (connections per second).

from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport int64_t, uint32_t, uint64_t

from .includes.platform cimport (
    MSG_NOSIGNAL,
    US_REFUSED_MAY_BE_FULL,
    US_EDGE,
    US_READ,
    US_WRITE,
    us_event_readable,
    us_event_token,
    us_event_writable,
    us_make_addr,
    us_now_ns,
    us_poll_event,
    us_poller_add,
    us_poller_create,
    us_poller_modify,
    us_poller_remove,
    us_poller_wait,
    us_socket,
    us_would_block,
)
from .includes.system cimport *

import math as _lg_math

include "_oserror.pxi"


cdef uint64_t LG_TOKEN_STOP = 0xFFFFFFFFFFFFFFFFULL
cdef uint64_t LG_TOKEN_WATCH = 0xFFFFFFFFFFFFFFFEULL
cdef int64_t LG_SECOND = 1000000000LL
cdef int64_t LG_RETRY_NS = 1000000LL        # backlog full: retry in 1 ms
cdef int64_t LG_BACKOFF_NS = 10000000LL     # connect mode, failed connect: 10 ms

cdef enum:
    LG_PATLEN = 65537          # prime, > 64 KiB: never aligned with a message size
    LG_CHUNK = 262144          # largest single recv/send
    LG_MAX_EVENTS = 1024
    # Connected sockets are edge-triggered: a readable socket is read until
    # a short read (which, on an AF_UNIX stream, means its queue is empty),
    # so the level-triggered re-poll of every ready socket on each wait is
    # saved.
    LG_RD = US_READ | US_EDGE

    LG_PINGPONG = 0
    LG_CONNECT = 1
    LG_HOLD = 2

    # slot states
    CS_FREE = 0                # no socket
    CS_RETRY = 1               # socket made, connect() said EAGAIN: queued for retry
    CS_CONNECTING = 2          # connect() in progress: waiting for writability
    CS_OPEN = 3                # connected
    CS_READY = 4               # hold: connected and its round trip verified
    CS_DEAD = 5                # failed (or abandoned); no socket

    # error kinds (LoadGen.errors[...])
    ERR_CONNECT = 0
    ERR_MISMATCH = 1
    ERR_EOF = 2
    ERR_IO = 3
    ERR_EXTRA = 4
    ERR_STALL = 5
    ERR_KINDS = 6

    # histogram
    H_SUB_BITS = 7
    H_SUB = 128
    H_MAX_EXP = 36
    H_BUCKETS = 3840           # H_SUB + (H_MAX_EXP - H_SUB_BITS) * H_SUB

_LG_MODES = {"pingpong": LG_PINGPONG, "connect": LG_CONNECT, "hold": LG_HOLD}
_LG_ERROR_NAMES = ("connect", "mismatch", "eof", "io", "extra", "stall")

#: Number of latency histogram buckets (see hist_bucket_ns).
HIST_BUCKETS = H_BUCKETS


cdef struct lg_conn:
    int fd
    int state
    int interest               # US_READ/US_WRITE registered with the poller
    uint32_t gen               # bumped per socket: stale events are ignored
    uint64_t base              # pattern offset of stream byte 0
    uint64_t tx_off            # bytes sent
    uint64_t tx_want           # bytes queued (sent or still to send)
    uint64_t rx_off            # bytes received and verified
    uint64_t sent_msgs         # pingpong: messages queued; connect: cycles begun
    uint64_t done_msgs         # pingpong: messages fully echoed
    int64_t t0                 # connect/hold: when this socket's connect began
    int64_t retry_at           # CS_RETRY / connect-mode backoff: when to try again


# ------------------------------------------------------------------ histogram

cdef inline int _h_index(uint64_t v) noexcept nogil:
    cdef int e
    if v < H_SUB:
        return <int>v
    e = 63 - __builtin_clzll(v)
    if e >= H_MAX_EXP:
        return H_BUCKETS - 1
    return (e - H_SUB_BITS + 1) * H_SUB + <int>((v >> (e - H_SUB_BITS)) & (H_SUB - 1))


cdef inline uint64_t _h_lower(int i) noexcept nogil:
    cdef int e
    if i < H_SUB:
        return <uint64_t>i
    e = i // H_SUB + H_SUB_BITS - 1
    return (<uint64_t>(H_SUB + i % H_SUB)) << (e - H_SUB_BITS)


cdef inline uint64_t _h_width(int i) noexcept nogil:
    if i < H_SUB:
        return 1
    return (<uint64_t>1) << (i // H_SUB - 1)


def hist_bucket_ns(int i):
    """(lower, upper) bounds in ns of histogram bucket i (upper exclusive)."""
    if i < 0 or i >= H_BUCKETS:
        raise IndexError(i)
    return _h_lower(i), _h_lower(i) + _h_width(i)


def hist_index(uint64_t ns):
    """The histogram bucket a latency of `ns` nanoseconds falls in."""
    return _h_index(ns)


def hist_percentiles(counts, quantiles):
    """Latencies (ns, bucket midpoints) at the given quantiles (0..1) of a
    histogram given as {bucket: count} or pairs; None for an empty one.
    Histograms of several runs merge by adding their counts."""
    cdef list items = sorted(dict(counts).items())
    cdef object total = sum(c for _, c in items)
    for i, _ in items:
        if not 0 <= i < H_BUCKETS:
            raise IndexError(f"histogram bucket {i} out of range 0..{H_BUCKETS - 1}")
    out = []
    for q in quantiles:
        if not total:
            out.append(None)
            continue
        target = max(1, int(_lg_math.ceil(round(q * total, 6))))
        cum = 0
        for i, c in items:
            cum += c
            if cum >= target:
                out.append(_h_lower(i) + (_h_width(i) - 1) / 2.0)
                break
        else:
            last = items[len(items) - 1][0]     # (wraparound is off here)
            out.append(_h_lower(last) + (_h_width(last) - 1) / 2.0)
    return out


# ------------------------------------------------------------------ helpers

cdef inline uint64_t _lg_token(lg_conn *c, int i) noexcept nogil:
    return (<uint64_t>c.gen << 32) | <uint32_t>i


cdef inline int _ms_until(int64_t wake, int64_t now) noexcept nogil:
    """Poll timeout in ms to reach `wake`, rounded up, at most 1 s."""
    if wake <= now:
        return 0
    if wake - now >= LG_SECOND:
        return 1000
    return <int>((wake - now + 999999) // 1000000)


cdef double _lg_cpu_seconds() noexcept nogil:
    """User + system CPU time of this process (all its threads)."""
    cdef rusage ru
    if getrusage(RUSAGE_SELF, &ru) < 0:
        return 0.0
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec
            + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6)


cdef int64_t _lg_proc_ticks(int pid) noexcept nogil:
    """utime + stime of process `pid` in clock ticks (/proc/PID/stat fields
    14 and 15, summed over its threads), or -1 where there is no /proc."""
    cdef char path[64]
    cdef char buf[1024]
    cdef int fd, field
    cdef ssize_t n
    cdef char *p
    cdef char *end
    cdef int64_t val, total = 0
    if pid <= 0:
        return -1
    snprintf(path, sizeof(path), b"/proc/%d/stat", pid)
    fd = c_open(path, O_RDONLY | O_CLOEXEC)
    if fd < 0:
        return -1
    n = read(fd, buf, sizeof(buf) - 1)
    close(fd)
    if n <= 0:
        return -1
    buf[n] = 0
    end = buf + n
    # The command name (field 2) may hold spaces and parentheses: start
    # after the last ')'.
    p = end
    while p > buf and p[0] != b')':
        p -= 1
    if p == buf:
        return -1
    p += 1
    field = 2
    while p < end and field < 15:
        while p < end and p[0] == b' ':
            p += 1
        field += 1
        val = 0
        while p < end and p[0] != b' ':
            if field >= 14:
                val = val * 10 + (p[0] - 48)
            p += 1
        if field >= 14:
            total += val
    return total if field == 15 else -1


cdef void _lg_fill_pattern(char *buf) noexcept nogil:
    """The fixed pseudo-random pattern (xorshift64*) of LG_PATLEN bytes,
    repeated up to LG_PATLEN + LG_CHUNK bytes."""
    cdef uint64_t x = 0x9E3779B97F4A7C15ULL
    cdef size_t i, n, total = <size_t>LG_PATLEN + <size_t>LG_CHUNK
    for i in range(<size_t>LG_PATLEN):
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        buf[i] = <char>((x * 0x2545F4914F6CDD1DULL) >> 56)
    i = LG_PATLEN
    while i < total:
        n = min(<size_t>LG_PATLEN, total - i)
        memcpy(buf + i, buf, n)
        i += n


# ------------------------------------------------------------------ LoadGen

cdef class LoadGen:
    """A load generator over N non-blocking AF_UNIX connections.

    LoadGen(path, mode, connections, size, pipeline=1, first_index=0,
            server_pid=0, stop_fd=-1, watch_fd=-1, progress=None)

    `path` is the address as bytes (b"\\0name" for an abstract name).
    Call connect() (the connect phase; nothing to do in connect mode), then
    run(), then result(); close() releases every fd (also on deallocation).
    Both connect() and run() release the GIL until they return, except for
    `progress(info)` about once a second.  A readable `stop_fd` (e.g. a
    signal wakeup pipe) ends either phase early; `watch_fd` reaching EOF ends
    a hold.
    """

    cdef int mode
    cdef int nconn
    cdef size_t size
    cdef int pipeline
    cdef int pfd
    cdef int stop_fd
    cdef int watch_fd
    cdef int server_pid
    cdef lg_conn *conns
    cdef int64_t *ts
    cdef char *pattern
    cdef char *rxbuf
    cdef us_poll_event *events
    cdef uint64_t *hist
    cdef int *rq
    cdef int rq_head
    cdef int rq_len
    cdef sockaddr_un addr
    cdef socklen_t addrlen
    cdef int next_slot
    cdef int established
    cdef int failed
    cdef bint connected_phase_done
    cdef bint ran
    cdef bint backlog_full
    cdef bint ever_connected
    cdef bint stopping
    cdef bint stop_requested
    cdef bint measuring
    cdef int fatal_errno
    cdef int last_connect_errno
    cdef uint64_t requests
    cdef uint64_t completed
    cdef uint64_t total_done
    cdef uint64_t verified
    cdef uint64_t errors[6]
    cdef uint64_t lat_max
    cdef uint64_t lat_sum
    cdef int64_t t_begin
    cdef int64_t connect_ns
    cdef int64_t t_measure
    cdef int64_t t_stop
    cdef int64_t last_done
    cdef double cpu0
    cdef double cpu1
    cdef int64_t srv0
    cdef int64_t srv1
    cdef bint has_progress
    cdef object progress
    cdef object cb_exc
    cdef bint ready             # __init__ completed: every array is there

    def __cinit__(self):
        self.pfd = -1
        self.stop_fd = -1
        self.watch_fd = -1

    def __init__(self, bytes path, str mode, int connections, size_t size,
                 int pipeline=1, long first_index=0, int server_pid=0,
                 int stop_fd=-1, int watch_fd=-1, progress=None):
        cdef int i
        if self.conns != NULL:
            raise RuntimeError("LoadGen.__init__ called twice")
        if mode not in _LG_MODES:
            raise ValueError(f"mode must be one of {sorted(_LG_MODES)}, got {mode!r}")
        if connections < 1:
            raise ValueError("connections must be >= 1")
        if size < 1:
            raise ValueError("size must be >= 1")
        if pipeline < 1:
            raise ValueError("pipeline must be >= 1")
        if not path:
            raise ValueError("empty socket path")
        self.mode = _LG_MODES[mode]
        if self.mode != LG_PINGPONG:
            pipeline = 1
        self.nconn = connections
        self.size = size
        self.pipeline = pipeline
        self.server_pid = server_pid
        self.stop_fd = stop_fd
        self.watch_fd = watch_fd
        self.progress = progress
        self.has_progress = progress is not None
        self.srv0 = self.srv1 = -1
        self.addrlen = us_make_addr(&self.addr, path, len(path))
        if self.addrlen == <socklen_t>-1:
            raise _oserror(errno, path.decode(errors="replace"))
        self.conns = <lg_conn *>calloc(connections, sizeof(lg_conn))
        self.ts = <int64_t *>calloc(<size_t>connections * pipeline, sizeof(int64_t))
        self.rq = <int *>calloc(connections, sizeof(int))
        self.pattern = <char *>malloc(LG_PATLEN + LG_CHUNK)
        self.rxbuf = <char *>malloc(LG_CHUNK)
        self.events = <us_poll_event *>malloc(sizeof(us_poll_event) * LG_MAX_EVENTS)
        self.hist = <uint64_t *>calloc(H_BUCKETS, sizeof(uint64_t))
        if (self.conns == NULL or self.ts == NULL or self.rq == NULL or self.pattern == NULL
                or self.rxbuf == NULL or self.events == NULL or self.hist == NULL):
            raise MemoryError()
        _lg_fill_pattern(self.pattern)
        for i in range(connections):
            self.conns[i].fd = -1
            self.conns[i].base = <uint64_t>((first_index + i) * 7919) % LG_PATLEN
        self.pfd = us_poller_create()
        if self.pfd < 0:
            raise _oserror(errno)
        if stop_fd >= 0 and us_poller_add(self.pfd, stop_fd, LG_TOKEN_STOP, US_READ) < 0:
            raise _oserror(errno)
        self.ready = True

    def __dealloc__(self):
        self._close_all()
        free(self.conns)
        free(self.ts)
        free(self.rq)
        free(self.pattern)
        free(self.rxbuf)
        free(self.events)
        free(self.hist)

    def close(self):
        """Close every connection and the poller (idempotent)."""
        self._close_all()

    cdef int _check_init(self) except -1:
        # LoadGen.__new__(LoadGen), or an __init__ that raised part-way:
        # the arrays every phase indexes are missing.
        if not self.ready:
            raise RuntimeError("this LoadGen was not initialised (LoadGen.__init__ did not complete)")
        return 0

    cdef void _close_all(self) noexcept nogil:
        cdef int i
        # Not before __init__ completed: a calloc()ed slot says fd 0 until
        # __init__ marks it -1, and no connection was opened before that.
        if self.conns != NULL and self.ready:
            for i in range(self.nconn):
                if self.conns[i].fd >= 0:
                    close(self.conns[i].fd)
                    self.conns[i].fd = -1
                    self.conns[i].state = CS_DEAD
        if self.pfd >= 0:
            close(self.pfd)
            self.pfd = -1

    # ------------------------------------------------------------ connecting

    cdef void _rq_push(self, int i, int64_t when) noexcept nogil:
        self.conns[i].retry_at = when
        self.rq[(self.rq_head + self.rq_len) % self.nconn] = i
        self.rq_len += 1

    cdef void _run_retries(self, int64_t now) noexcept nogil:
        cdef int i, n = self.rq_len
        # At most the entries queued before this call (a retry that fails
        # again goes to the back, with a later time).
        while n > 0 and self.rq_len and not self.backlog_full and not self.stopping:
            i = self.rq[self.rq_head]
            if self.conns[i].retry_at > now:
                break
            self.rq_head = (self.rq_head + 1) % self.nconn
            self.rq_len -= 1
            n -= 1
            self._start_connect(i, now)

    cdef int _start_connect(self, int i, int64_t now) noexcept nogil:
        """Create slot i's socket if needed and try connect(); 1 connected,
        0 pending (queued retry or in progress), -1 failed."""
        cdef lg_conn *c = &self.conns[i]
        cdef int r, err
        if c.fd < 0:
            c.fd = us_socket(1)
            if c.fd < 0:
                return self._connect_failed(i, errno, now)
            c.gen += 1
            c.interest = 0
            c.t0 = now
            c.tx_off = c.tx_want = c.rx_off = 0
            if self.mode == LG_CONNECT:
                c.base = (c.base + 104729) % LG_PATLEN     # a new stretch each cycle
        while True:
            r = connect(c.fd, <sockaddr *>&self.addr, self.addrlen)
            if r == 0 or errno != EINTR:
                break
        if r == 0:
            return self._connected(i, now)
        err = errno
        if us_would_block(err) or (err == ECONNREFUSED and US_REFUSED_MAY_BE_FULL
                                   and self.ever_connected):
            # The listener's backlog is full.  Retry this one later and
            # start no other connect in this round.  (Where a full backlog
            # looks like ECONNREFUSED, only once the server has accepted a
            # connection from us, and on a fresh socket.)
            if err == ECONNREFUSED:
                close(c.fd)
                c.fd = -1
            self.backlog_full = True
            c.state = CS_RETRY
            self._rq_push(i, now + LG_RETRY_NS)
            return 0
        if err == EISCONN:
            return self._connected(i, now)
        if err == EINPROGRESS or err == EALREADY:
            if c.interest == 0:
                if us_poller_add(self.pfd, c.fd, _lg_token(c, i), US_WRITE) < 0:
                    return self._connect_failed(i, errno, now)
                c.interest = US_WRITE
            c.state = CS_CONNECTING
            return 0
        return self._connect_failed(i, err, now)

    cdef int _connect_failed(self, int i, int err, int64_t now) noexcept nogil:
        self.last_connect_errno = err
        return self._drop(i, ERR_CONNECT, now, True)

    cdef int _finish_connect(self, int i, int64_t now) noexcept nogil:
        """A CS_CONNECTING socket became writable: read its outcome."""
        cdef lg_conn *c = &self.conns[i]
        cdef int soerr = 0
        cdef socklen_t sl = sizeof(soerr)
        if getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0:
            soerr = errno
        if soerr != 0:
            return self._connect_failed(i, soerr, now)
        return self._connected(i, now)

    cdef int _connected(self, int i, int64_t now) noexcept nogil:
        cdef lg_conn *c = &self.conns[i]
        cdef int r
        if c.interest:
            r = us_poller_modify(self.pfd, c.fd, _lg_token(c, i), c.interest, LG_RD)
        else:
            r = us_poller_add(self.pfd, c.fd, _lg_token(c, i), LG_RD)
        if r < 0:
            return self._connect_failed(i, errno, now)
        c.interest = LG_RD
        c.state = CS_OPEN
        self.ever_connected = True
        if self.mode == LG_PINGPONG:
            self.established += 1          # traffic starts in run()
            return 1
        # connect and hold: one message of `size` bytes
        c.sent_msgs += 1
        c.tx_want = self.size
        self._flush(i)
        return 1

    def connect(self, double timeout=30.0, double rate=0.0):
        """Connect phase (pingpong and hold modes; a no-op in connect mode):
        open every connection, retrying on a full backlog, at most `rate`
        new connections per second (0 = as fast as possible), for at most
        `timeout` seconds.  In hold mode each connection also does its one
        verified round trip.  Returns {"established", "failed", "seconds"};
        connections not established by the deadline count as connect errors."""
        cdef int64_t start, deadline, now, next_tick, wake
        cdef int allowed
        cdef double per_ns = rate / 1e9
        self._check_init()
        if self.connected_phase_done:
            raise RuntimeError("connect() was already called")
        self.connected_phase_done = True
        if self.mode == LG_CONNECT:
            return {"established": 0, "failed": 0, "seconds": 0.0}
        with nogil:
            start = us_now_ns()
            self.t_begin = start
            deadline = start + <int64_t>(timeout * 1e9)
            next_tick = start + LG_SECOND
            while self.established + self.failed < self.nconn and not self.stopping:
                now = us_now_ns()
                if now >= deadline:
                    break
                if now >= next_tick:
                    self._tick(now, 0)
                    next_tick = now + LG_SECOND
                self.backlog_full = False
                self._run_retries(now)
                allowed = self.nconn
                if rate > 0:
                    allowed = <int>min(<double>self.nconn, (now - start) * per_ns + 1)
                while self.next_slot < allowed and not self.backlog_full:
                    self.next_slot += 1
                    self._start_connect(self.next_slot - 1, now)
                wake = min(deadline, next_tick)
                if self.rq_len:
                    wake = min(wake, self.conns[self.rq[self.rq_head]].retry_at)
                if self.next_slot < self.nconn and rate > 0 and not self.backlog_full:
                    wake = min(wake, start + <int64_t>((self.next_slot) / per_ns))
                if self.established + self.failed < self.nconn:
                    self._poll(_ms_until(wake, now))
            self.connect_ns = us_now_ns() - start
            self._abandon_unestablished()
        return self._after_phase({
            "established": self.established,
            "failed": self.failed,
            "seconds": self.connect_ns / 1e9,
        })

    cdef void _abandon_unestablished(self) noexcept nogil:
        cdef int i
        cdef int done_state = CS_OPEN if self.mode == LG_PINGPONG else CS_READY
        cdef lg_conn *c
        for i in range(self.nconn):
            c = &self.conns[i]
            if c.state == done_state or c.state == CS_DEAD:
                continue
            if c.fd >= 0:
                close(c.fd)
                c.fd = -1
            if not self.stop_requested:
                self.errors[ERR_CONNECT] += 1
                if self.last_connect_errno == 0:
                    self.last_connect_errno = ETIMEDOUT
            c.state = CS_DEAD
            c.interest = 0
            self.failed += 1
        self.rq_len = 0

    cdef object _after_phase(self, object value):
        exc = self.cb_exc
        if exc is not None:
            self.cb_exc = None
            raise exc
        if self.fatal_errno:
            raise _oserror(self.fatal_errno)
        return value

    # ------------------------------------------------------------ traffic

    cdef int _flush(self, int i) noexcept nogil:
        """Send queued bytes of slot i straight from the pattern."""
        cdef lg_conn *c = &self.conns[i]
        cdef size_t n
        cdef ssize_t r
        cdef int want
        while c.tx_off < c.tx_want:
            n = <size_t>min(c.tx_want - c.tx_off, <uint64_t>LG_CHUNK)
            r = send(c.fd, self.pattern + (c.base + c.tx_off) % LG_PATLEN, n, MSG_NOSIGNAL)
            if r > 0:
                c.tx_off += r
            elif r < 0 and errno == EINTR:
                continue
            elif r < 0 and us_would_block(errno):
                break
            else:
                return self._fail(i, ERR_IO)
        want = LG_RD | US_WRITE if c.tx_off < c.tx_want else LG_RD
        if want != c.interest:
            if us_poller_modify(self.pfd, c.fd, _lg_token(c, i), c.interest, want) < 0:
                return self._fail(i, ERR_IO)
            c.interest = want
        return 0

    cdef int _fail(self, int i, int kind) noexcept nogil:
        """End slot i's socket with an error (connect mode: start again later)."""
        cdef lg_conn *c = &self.conns[i]
        if (self.mode == LG_PINGPONG and c.state == CS_OPEN) or c.state == CS_READY:
            self.established -= 1
        return self._drop(i, kind, us_now_ns(), not self.stopping)

    cdef int _drop(self, int i, int kind, int64_t now, bint retry) noexcept nogil:
        """Count an error of `kind` and close slot i's socket.  Connect mode
        frees the slot (tried again after a back-off if `retry`); the other
        modes retire it.  Returns -1."""
        cdef lg_conn *c = &self.conns[i]
        self.errors[kind] += 1
        if c.fd >= 0:
            close(c.fd)
            c.fd = -1
        c.interest = 0
        if self.mode == LG_CONNECT:
            c.state = CS_FREE
            if retry:
                self._rq_push(i, now + LG_BACKOFF_NS)
        else:
            c.state = CS_DEAD
            self.failed += 1
        return -1

    cdef inline void _record(self, uint64_t lat) noexcept nogil:
        self.hist[_h_index(lat)] += 1
        self.lat_sum += lat
        if lat > self.lat_max:
            self.lat_max = lat

    cdef int _on_readable(self, int i) noexcept nogil:
        cdef lg_conn *c = &self.conns[i]
        cdef ssize_t r
        cdef int64_t now
        cdef uint64_t done
        cdef int64_t *ts = self.ts + <size_t>i * self.pipeline
        while True:
            r = recv(c.fd, self.rxbuf, LG_CHUNK, 0)
            if r > 0:
                if c.rx_off + <uint64_t>r > c.tx_off:
                    return self._fail(i, ERR_EXTRA)
                if memcmp(self.rxbuf, self.pattern + (c.base + c.rx_off) % LG_PATLEN, r) != 0:
                    return self._fail(i, ERR_MISMATCH)
                c.rx_off += r
                if self.measuring or self.mode == LG_HOLD:
                    self.verified += r
                now = us_now_ns()
                if self.mode == LG_PINGPONG:
                    done = c.rx_off // self.size
                    while c.done_msgs < done:
                        self._record_rt(now - ts[c.done_msgs % self.pipeline], now)
                        c.done_msgs += 1
                        if not self.stopping:
                            ts[c.sent_msgs % self.pipeline] = now
                            c.sent_msgs += 1
                            c.tx_want += self.size
                elif c.rx_off == self.size:
                    if self.mode == LG_CONNECT:
                        self._record_rt(now - c.t0, now)
                        close(c.fd)
                        c.fd = -1
                        c.interest = 0
                        c.state = CS_FREE
                        if not self.stopping:
                            if self.backlog_full:
                                c.state = CS_RETRY
                                self._rq_push(i, now)
                            else:
                                self._start_connect(i, now)
                        return 0
                    # hold: this connection is established
                    if c.state == CS_OPEN:
                        c.state = CS_READY
                        self.established += 1
                        self.total_done += 1
                        self.completed += 1
                        self.last_done = now
                        self._record(<uint64_t>(now - c.t0))
                if r < LG_CHUNK:
                    break
            elif r == 0:
                return self._fail(i, ERR_EOF)
            elif errno == EINTR:
                continue
            elif us_would_block(errno):
                break
            else:
                return self._fail(i, ERR_IO)
        if c.tx_off < c.tx_want:
            return self._flush(i)
        return 0

    cdef inline void _record_rt(self, int64_t lat, int64_t now) noexcept nogil:
        self.total_done += 1
        self.last_done = now
        if self.measuring and not self.stopping:
            self._record(<uint64_t>lat)
            self.completed += 1
            if self.requests and self.completed >= self.requests:
                self.stopping = True
                self.t_stop = now

    cdef void _poll(self, int timeout_ms) noexcept nogil:
        cdef int n, k, i, err
        cdef uint64_t tok
        cdef uint32_t gen
        cdef lg_conn *c
        cdef char sink[256]
        cdef ssize_t r
        n = us_poller_wait(self.pfd, self.events, LG_MAX_EVENTS, timeout_ms)
        if n < 0:
            err = errno
            if err != EINTR:
                self.fatal_errno = err
                self.stopping = True
            return
        for k in range(n):
            tok = us_event_token(&self.events[k])
            if tok == LG_TOKEN_STOP:
                while read(self.stop_fd, sink, sizeof(sink)) > 0:
                    pass
                self.stop_requested = True
                self.stopping = True
                continue
            if tok == LG_TOKEN_WATCH:
                r = read(self.watch_fd, sink, sizeof(sink))
                if r == 0 or (r < 0 and errno != EINTR and not us_would_block(errno)):
                    us_poller_remove(self.pfd, self.watch_fd, US_READ)
                    self.stop_requested = True
                    self.stopping = True
                continue
            i = <int>(tok & 0xFFFFFFFFULL)
            gen = <uint32_t>(tok >> 32)
            if i >= self.nconn:
                continue
            c = &self.conns[i]
            if c.gen != gen or c.fd < 0:
                continue        # stale: that socket was closed in this batch
            if c.state == CS_CONNECTING:
                if us_event_writable(&self.events[k]) or us_event_readable(&self.events[k]):
                    self._finish_connect(i, us_now_ns())
                continue
            if us_event_readable(&self.events[k]):
                self._on_readable(i)
                if c.gen != gen or c.fd < 0:
                    continue
            if us_event_writable(&self.events[k]) and c.tx_off < c.tx_want:
                self._flush(i)

    cdef void _tick(self, int64_t now, int phase) noexcept nogil:
        """About once a second: hand progress to Python (and let it see
        signals)."""
        if not self.has_progress:
            return
        with gil:
            try:
                PyErr_CheckSignals()
                self.progress({
                    "phase": ("connect", "warmup", "measure", "hold")[phase],
                    "elapsed": (now - self.t_begin) / 1e9,
                    "done": self.total_done,
                    "round_trips": self.completed,
                    "errors": self._error_total(),
                    "established": self.established,
                })
            except BaseException as exc:
                if self.cb_exc is None:
                    self.cb_exc = exc
                self.stopping = True

    cdef uint64_t _error_total(self) noexcept nogil:
        cdef uint64_t t = 0
        cdef int k
        for k in range(ERR_KINDS):
            t += self.errors[k]
        return t

    cdef void _begin_measure(self, int64_t now) noexcept nogil:
        if self.mode != LG_HOLD:
            memset(self.hist, 0, H_BUCKETS * sizeof(uint64_t))
            self.completed = 0
            self.verified = 0
            self.lat_max = 0
            self.lat_sum = 0
        self.cpu0 = _lg_cpu_seconds()
        self.srv0 = _lg_proc_ticks(self.server_pid)
        self.t_measure = now
        self.measuring = True

    def run(self, double duration=5.0, double warmup=0.0, uint64_t requests=0,
            double stall_timeout=10.0):
        """The measured run.  pingpong/connect: `warmup` seconds of traffic,
        then measure for `duration` seconds (0 = no time bound) or until
        `requests` round trips (0 = no count bound), whichever comes first;
        the run also ends when no round trip completes for `stall_timeout`
        seconds (counted as a "stall" error), when every connection has
        failed, or when the stop fd fires.  hold: keep the connections open
        for `duration` seconds (0 = until the stop or watch fd fires).
        Returns result()."""
        cdef int64_t now, next_tick, wake, t_measure, dur_ns, stall_ns
        cdef int i, k
        cdef lg_conn *c
        self._check_init()
        if not self.connected_phase_done:
            self.connect()
        if self.ran:
            raise RuntimeError("run() was already called")
        self.ran = True
        if self.pfd < 0:
            raise RuntimeError("this LoadGen is closed")
        if self.mode == LG_HOLD and self.watch_fd >= 0:
            # Only pipes, sockets and terminals can be polled; a regular
            # file or /dev/null cannot and is simply not watched.
            if us_poller_add(self.pfd, self.watch_fd, LG_TOKEN_WATCH, US_READ) < 0:
                self.watch_fd = -1
        self.requests = requests if self.mode != LG_HOLD else 0
        dur_ns = <int64_t>(duration * 1e9) if duration > 0 else 0
        stall_ns = <int64_t>(stall_timeout * 1e9) if stall_timeout > 0 else 0
        with nogil:
            now = us_now_ns()
            if self.t_begin == 0:
                self.t_begin = now
            self.last_done = now
            if self.mode == LG_PINGPONG:
                for i in range(self.nconn):
                    c = &self.conns[i]
                    if c.state != CS_OPEN:
                        continue
                    for k in range(self.pipeline):
                        self.ts[<size_t>i * self.pipeline + k] = now
                    c.sent_msgs = self.pipeline
                    c.tx_want = <uint64_t>self.pipeline * self.size
                    self._flush(i)
            elif self.mode == LG_CONNECT:
                for i in range(self.nconn):
                    self._rq_push(i, now)
            t_measure = now + (<int64_t>(warmup * 1e9) if warmup > 0 and self.mode != LG_HOLD else 0)
            if t_measure <= now:
                self._begin_measure(now)
            next_tick = now + LG_SECOND
            while not self.stopping:
                now = us_now_ns()
                if not self.measuring and now >= t_measure:
                    self._begin_measure(now)
                if self.measuring and dur_ns and now >= self.t_measure + dur_ns:
                    break
                if now >= next_tick:
                    self._tick(now, 3 if self.mode == LG_HOLD else (2 if self.measuring else 1))
                    next_tick = now + LG_SECOND
                    if self.stopping:
                        break
                if self.mode == LG_CONNECT:
                    self.backlog_full = False
                    self._run_retries(now)
                elif self.established == 0:
                    break                      # nothing left to drive or hold
                if (self.mode != LG_HOLD and stall_ns and now - self.last_done > stall_ns):
                    self.errors[ERR_STALL] += 1
                    break
                wake = next_tick
                if not self.measuring:
                    wake = min(wake, t_measure)
                elif dur_ns:
                    wake = min(wake, self.t_measure + dur_ns)
                if self.mode != LG_HOLD and stall_ns:
                    wake = min(wake, self.last_done + stall_ns + 1)
                if self.rq_len:
                    wake = min(wake, self.conns[self.rq[self.rq_head]].retry_at)
                self._poll(_ms_until(wake, now))
            now = us_now_ns()
            if not self.measuring:
                self._begin_measure(now)
            if self.t_stop == 0:
                self.t_stop = now
            if self.t_stop < self.t_measure:
                self.t_stop = self.t_measure
            self.cpu1 = _lg_cpu_seconds()
            self.srv1 = _lg_proc_ticks(self.server_pid)
            self.measuring = False
        return self._after_phase(self.result())

    def result(self):
        """The raw outcome: counts, the measured window, the histogram as
        [[bucket, count], ...] (nonzero buckets), errors by kind, CPU."""
        cdef int k
        self._check_init()
        hist = [[k, self.hist[k]] for k in range(H_BUCKETS) if self.hist[k]]
        srv_ticks = None
        if self.srv0 >= 0 and self.srv1 >= 0:
            srv_ticks = self.srv1 - self.srv0
        return {
            "mode": ("pingpong", "connect", "hold")[self.mode],
            "connections": self.nconn,
            "established": self.established,
            "connect_s": self.connect_ns / 1e9,
            "connect_errno": self.last_connect_errno,
            "duration_s": (self.t_stop - self.t_measure) / 1e9 if self.t_stop else 0.0,
            "round_trips": self.completed,
            "all_round_trips": self.total_done,
            "verified_bytes": self.verified,
            "hist": hist,
            "lat_max_ns": self.lat_max,
            "lat_sum_ns": self.lat_sum,
            "errors": {_LG_ERROR_NAMES[k]: self.errors[k] for k in range(ERR_KINDS)},
            "stopped": bool(self.stop_requested),
            "client_cpu_s": self.cpu1 - self.cpu0 if self.t_stop else 0.0,
            "server_cpu_ticks": srv_ticks,
            "clk_tck": sysconf(_SC_CLK_TCK),
        }
