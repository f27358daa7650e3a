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

    def snapshot(self):
        """A dict: accepted, rejected, closed, open, bytes_in, bytes_out, errors, denied."""
        cdef uint64_t accepted, closed
        cdef uint64_t open_ = _open_count(&self.s, &accepted, &closed)
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
        return _open_count(&self.s)

    def count_error(self):
        """Count one error reported through on_error."""
        us_add_u64(&self.s.errors, 1)
