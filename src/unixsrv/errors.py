"""The exception hierarchy of unixsrv.

Every exception the library raises on purpose derives from :class:`UnixSrvError`
and also from the built-in exception a caller would catch without knowing
unixsrv (``ValueError`` for bad configuration, ``OSError`` for an address in
use, ``TimeoutError`` for a shutdown deadline, ``ConnectionError`` for I/O on a
connection the server closed).  Other operating-system failures surface as the
matching ``OSError`` subclass (``FileNotFoundError``, ``PermissionError``,
``BrokenPipeError``, ``ConnectionResetError``), carrying the path where there
is one.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "AddressInUseError",
    "ConfigError",
    "IdleTimeoutError",
    "InvalidGroupError",
    "InvalidHandlerError",
    "InvalidModeError",
    "InvalidPathError",
    "ServerClosedError",
    "ShutdownTimeoutError",
    "UnixSrvError",
    "WorkerCrashLoopError",
    "WorkerError",
]


class UnixSrvError(Exception):
    """Base class of every error raised by unixsrv itself."""


class ConfigError(UnixSrvError, ValueError):
    """A configuration value is invalid; raised when the config is built."""


class InvalidPathError(ConfigError):
    """The socket path is empty, contains NUL, is too long or is malformed."""


class InvalidModeError(ConfigError):
    """The socket file mode cannot be parsed or is out of range."""


class InvalidGroupError(ConfigError):
    """The group is out of range (0..4294967294) or names no known group."""


class InvalidHandlerError(ConfigError, TypeError):
    """Not exactly one of ``handler`` / ``protocol`` is given, or it is not callable."""


class AddressInUseError(UnixSrvError, OSError):
    """A live server already listens at the path, or the path is not a socket.

    ``errno`` is ``EADDRINUSE`` and ``filename`` is the path.
    """

    def __init__(self, path: str, reason: str = "a server is already listening there") -> None:
        super().__init__(errno.EADDRINUSE, f"{os.strerror(errno.EADDRINUSE)} ({reason})", path)
        self.reason = reason


class ShutdownTimeoutError(UnixSrvError, TimeoutError):
    """Graceful shutdown ran out of time; the remaining connections were force-closed."""


class ServerClosedError(UnixSrvError, ConnectionError):
    """I/O on a connection that our side already closed.

    Raised after the handler closed it, the idle timeout fired, or the server
    was shut down or closed.
    """


class IdleTimeoutError(UnixSrvError, TimeoutError):
    """Given to ``Protocol.connection_lost`` when the idle timeout closed the connection."""


class WorkerError(UnixSrvError, ChildProcessError):
    """A worker process of ``Server(..., workers=N)`` ended without being
    asked to (it is replaced), or a new one could not be started."""


class WorkerCrashLoopError(WorkerError):
    """Workers kept dying right after they started: the server stopped
    instead of restarting them for ever."""
