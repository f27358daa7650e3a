# _callbacks.pxi - what the user registered on a Server.


cdef class Callbacks:
    """The callbacks of one Server (None = not registered), shared by the
    Server and its loops: the loop checks them for every connection, and a
    C field read costs nothing next to an attribute lookup on the Server."""
