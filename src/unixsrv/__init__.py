"""unixsrv: a production Unix domain socket server with a Cython epoll/kqueue core.

Quick start (blocking model)::

    from unixsrv import Server, ServerConfig

    def echo(conn):
        while data := conn.read():
            conn.write(data)

    Server(ServerConfig(path="/tmp/echo.sock", mode=0o660), echo).serve_forever()

Event model: ``Server(config, protocol=MyAsyncioProtocol)``.
"""

import logging as _logging

from ._core import Connection, Stats, Transport
from .config import ServerConfig
from .connstate import ConnState
from .errors import (
    AddressInUseError,
    ConfigError,
    IdleTimeoutError,
    InvalidGroupError,
    InvalidHandlerError,
    InvalidModeError,
    InvalidPathError,
    ServerClosedError,
    ShutdownTimeoutError,
    UnixSrvError,
    WorkerCrashLoopError,
    WorkerError,
)
from .peer import PeerCredentials
from .protocol import Protocol
from .server import Server

__version__ = "0.1.0"

__all__ = [
    "AddressInUseError",
    "ConfigError",
    "ConnState",
    "Connection",
    "IdleTimeoutError",
    "InvalidGroupError",
    "InvalidHandlerError",
    "InvalidModeError",
    "InvalidPathError",
    "PeerCredentials",
    "Protocol",
    "Server",
    "ServerClosedError",
    "ServerConfig",
    "ShutdownTimeoutError",
    "Stats",
    "Transport",
    "UnixSrvError",
    "WorkerCrashLoopError",
    "WorkerError",
    "__version__",
]

# A library logs; the application decides where the records go.
_logging.getLogger("unixsrv").addHandler(_logging.NullHandler())
