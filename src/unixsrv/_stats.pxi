# _stats.pxi - server counters kept as C atomics, readable from any thread.


cdef inline uint64_t _open_count(us_stats *s) noexcept nogil:
    """accepted - closed, read in the order that keeps it >= 0 (atomics.h)."""
    cdef uint64_t closed = us_load_u64_acquire(&s.closed)
    return us_load_u64(&s.accepted) - closed


cdef class Stats:
    """Counters of one Server, cumulative over its runs.

    The loop thread and worker threads update them with atomic adds; a
    snapshot never takes a lock and never waits for the loop.  "open" is
    not a counter of its own but accepted - closed, so a snapshot always
    satisfies accepted == closed + open.
    """

    def snapshot(self):
        """A dict: accepted, rejected, closed, open, bytes_in, bytes_out, errors."""
        cdef uint64_t closed = us_load_u64_acquire(&self.s.closed)
        cdef uint64_t accepted = us_load_u64(&self.s.accepted)
        return {
            "accepted": accepted,
            "rejected": us_load_u64(&self.s.rejected),
            "closed": closed,
            "open": accepted - closed,
            "bytes_in": us_load_u64(&self.s.bytes_in),
            "bytes_out": us_load_u64(&self.s.bytes_out),
            "errors": us_load_u64(&self.s.errors),
        }

    @property
    def open(self):
        """Connections accepted and not yet closed."""
        return _open_count(&self.s)

    def count_error(self):
        """Count one error reported through on_error."""
        us_add_u64(&self.s.errors, 1)
