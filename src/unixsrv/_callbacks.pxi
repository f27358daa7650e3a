# _callbacks.pxi - what the user registered on a Server.


cdef class Callbacks:
    """The callbacks of one Server (None = not registered), shared by the
    Server and its loops: the loop checks them for every connection, and a
    C field read costs nothing next to an attribute lookup on the Server."""


cdef class LoopOwner:
    """The one interface through which a loop calls the server layer that
    owns it (unixsrv.server.CallbackHost: Server, the asyncio layer's server,
    socketserver's acceptor).  The core makes no other call into it.

    ``report(exc, level)``
        An error to report (on_error, else the log at ``level``); loop thread.
    ``conn_state(conn, state)``
        Fire on_conn_state for ``conn`` (ConnState.NEW or CLOSE).
    ``update_conn(conn) -> bool``
        Run the registered update_conn for ``conn``; False (after reporting)
        if it raised, and the connection is then closed unserved.
    ``spawn(conn)``
        Blocking model: start serving a new Connection (its handler); None
        for a host that only runs the event model.
    ``drained()``
        The last connection closed while ``Loop.drain_waiting`` was set; None
        for a host that never sets it.

    The first three run inside the connection lifecycle that both models
    share (_ConnBase._lifecycle_begin/_lifecycle_end in _conn.pxi).
    """

    def __init__(self, report, conn_state, update_conn, spawn=None, drained=None):
        for name, fn, optional in (("report", report, False), ("conn_state", conn_state, False),
                                   ("update_conn", update_conn, False), ("spawn", spawn, True),
                                   ("drained", drained, True)):
            if not (callable(fn) or (optional and fn is None)):
                raise TypeError(f"LoopOwner {name} must be callable, got {fn!r}")
        self.report = report
        self.conn_state = conn_state
        self.update_conn = update_conn
        self.spawn = spawn
        self.drained = drained

    cdef int _check(self, bint blocking_model) except -1:
        # LoopOwner.__new__ skips __init__: nothing to call.
        if self.report is None or self.conn_state is None or self.update_conn is None:
            raise TypeError("this LoopOwner was not initialised (made through __new__)")
        if blocking_model and self.spawn is None:
            raise TypeError("a blocking-model loop needs a LoopOwner with spawn")
        return 0
