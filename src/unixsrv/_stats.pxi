# _stats.pxi - server counters kept as C atomics, readable from any thread.


cdef inline uint64_t _open_count(us_stats *s, uint64_t *accepted=NULL, uint64_t *closed=NULL) noexcept nogil:
    """accepted - closed, read in the order that keeps it >= 0 (atomics.h);
    also hands out the two counts it read."""
    cdef uint64_t c = us_load_u64_acquire(&s.closed)
    cdef uint64_t a = us_load_u64(&s.accepted)
    if accepted != NULL:
        accepted[0] = a
    if closed != NULL:
        closed[0] = c
    return a - c


cdef class Stats:
    """Counters of one Server, cumulative over its runs.

    The loop thread and worker threads update them with atomic adds; a
    snapshot never takes a lock and never waits for the loop.  "open" is
    not a counter of its own but accepted - closed, so a snapshot always
    satisfies accepted == closed + open.
    """

    def __cinit__(self):
        self.s = &self._own

    def snapshot(self):
        """A dict: accepted, rejected, closed, open, bytes_in, bytes_out, errors, denied."""
        cdef uint64_t accepted, closed
        cdef uint64_t open_ = _open_count(self.s, &accepted, &closed)
        return {
            "accepted": accepted,
            "rejected": us_load_u64(&self.s.rejected),
            "closed": closed,
            "open": open_,
            "bytes_in": us_load_u64(&self.s.bytes_in),
            "bytes_out": us_load_u64(&self.s.bytes_out),
            "errors": us_load_u64(&self.s.errors),
            "denied": us_load_u64(&self.s.denied),
        }

    @property
    def open(self):
        """Connections accepted and not yet closed."""
        return _open_count(self.s)

    def count_error(self):
        """Count one error reported through on_error."""
        us_add_u64(&self.s.errors, 1)


cdef class SharedStats:
    """``count`` counter slots in memory shared with the processes forked
    after it was made (see us_shared_alloc): Server(workers=N) gives each
    worker process a slot, which that worker's Loop adds to, and the parent
    reads every slot without a lock."""

    def __init__(self, Py_ssize_t count):
        # Not __cinit__: __new__ alone must give a valid (empty) object.
        if self.slots != NULL:
            raise RuntimeError("SharedStats.__init__ called twice")
        if count < 1:
            raise ValueError("count must be >= 1")
        self.size = sizeof(us_stats) * <size_t>count
        self.slots = <us_stats *>us_shared_alloc(self.size)
        if self.slots == NULL:
            raise _oserror(errno)
        self.count = count

    def __dealloc__(self):
        if self.slots != NULL:
            us_shared_free(self.slots, self.size)

    def __len__(self):
        return self.count

    def slot(self, Py_ssize_t index):
        """A Stats object reading and adding to slot ``index``."""
        cdef Stats stats
        if not 0 <= index < <Py_ssize_t>self.count:
            raise IndexError("slot index out of range")
        stats = Stats()
        stats.s = &self.slots[index]
        stats._mapping = self      # the mapping outlives every view of it
        return stats

    def clear(self, Py_ssize_t index):
        """Zero slot ``index`` (only while no process writes to it)."""
        if not 0 <= index < <Py_ssize_t>self.count:
            raise IndexError("slot index out of range")
        memset(&self.slots[index], 0, sizeof(us_stats))
