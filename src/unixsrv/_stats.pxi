# _stats.pxi - server counters kept as C atomics, readable from any thread.


cdef class Stats:
    """Counters of one Server, cumulative over its runs.

    The loop thread and worker threads update them with atomic adds; a
    snapshot never takes a lock and never waits for the loop.
    """

    def snapshot(self):
        """A dict: accepted, rejected, closed, open, bytes_in, bytes_out, errors."""
        return {
            "accepted": us_load_u64(&self.s.accepted),
            "rejected": us_load_u64(&self.s.rejected),
            "closed": us_load_u64(&self.s.closed),
            "open": us_load_i64(&self.s.open),
            "bytes_in": us_load_u64(&self.s.bytes_in),
            "bytes_out": us_load_u64(&self.s.bytes_out),
            "errors": us_load_u64(&self.s.errors),
        }

    @property
    def open(self):
        """Connections accepted and not yet closed."""
        return us_load_i64(&self.s.open)

    def count_error(self):
        """Count one error reported through on_error."""
        us_add_u64(&self.s.errors, 1)
