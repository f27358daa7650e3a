"""The exception hierarchy (src/unixsrv/errors.py) and the public surface of the package.

docs/design.md "Public contract" (the fixed import list) and "Precise semantics /
Errors": each unixsrv error also derives from the built-in exception a caller
would catch without knowing unixsrv.  golib's errors are bare errorStrings
matched by text (spec a.5); here they are classes.  Also: the library logs
through the 'unixsrv' logger with only a NullHandler, and ships its typing
markers (py.typed, _core.pyi).
"""

from __future__ import annotations

import asyncio
import errno
import importlib.resources
import logging
import os
import pathlib

import pytest

import unixsrv
from conftest import DESIGN_NAMES
from unixsrv import (
    AddressInUseError,
    ConfigError,
    IdleTimeoutError,
    InvalidGroupError,
    InvalidHandlerError,
    InvalidModeError,
    InvalidPathError,
    Server,
    ServerClosedError,
    ServerConfig,
    ShutdownTimeoutError,
    UnixSrvError,
)
from unixsrv import errors as errors_module

# ---------------------------------------------------------------------- hierarchy


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (UnixSrvError, (Exception,)),
        (ConfigError, (UnixSrvError, ValueError)),
        (InvalidPathError, (ConfigError, UnixSrvError, ValueError)),
        (InvalidModeError, (ConfigError, UnixSrvError, ValueError)),
        (InvalidGroupError, (ConfigError, UnixSrvError, ValueError)),
        (InvalidHandlerError, (ConfigError, UnixSrvError, ValueError, TypeError)),
        (AddressInUseError, (UnixSrvError, OSError)),
        (ShutdownTimeoutError, (UnixSrvError, TimeoutError, OSError)),
        (ServerClosedError, (UnixSrvError, ConnectionError, OSError)),
        (IdleTimeoutError, (UnixSrvError, TimeoutError)),
    ],
)
def test_bases(cls, bases):
    """docs/design.md "Errors": each class derives from UnixSrvError and the matching built-in."""
    for base in bases:
        assert issubclass(cls, base), f"{cls.__name__} is not a {base.__name__}"


@pytest.mark.parametrize(
    ("cls", "not_bases"),
    [
        (ConfigError, (OSError, TypeError)),
        (InvalidPathError, (TypeError, OSError)),
        (AddressInUseError, (ValueError, TimeoutError, ConnectionError)),
        (ShutdownTimeoutError, (ConnectionError, ValueError)),
        (ServerClosedError, (TimeoutError, ValueError)),
        (UnixSrvError, (ValueError, OSError)),
    ],
)
def test_no_surprising_bases(cls, not_bases):
    """A caller catching one built-in family does not swallow an unrelated error."""
    for base in not_bases:
        assert not issubclass(cls, base), f"{cls.__name__} should not be a {base.__name__}"


def test_errors_module_all_is_exported_from_package():
    """Every class errors.py exports is re-exported by `unixsrv` (same object)."""
    for name in errors_module.__all__:
        assert getattr(unixsrv, name) is getattr(errors_module, name)
        assert name in unixsrv.__all__
        assert issubclass(getattr(unixsrv, name), UnixSrvError)


def test_caught_as_builtin():
    """Raising a unixsrv error is caught by plain `except ValueError` etc."""
    with pytest.raises(ValueError):
        raise InvalidPathError("bad")
    with pytest.raises(TypeError):
        raise InvalidHandlerError("bad")
    with pytest.raises(TimeoutError):
        raise ShutdownTimeoutError("late")
    with pytest.raises(ConnectionError):
        raise ServerClosedError("closed")
    with pytest.raises(TimeoutError):
        raise IdleTimeoutError("idle")


# ---------------------------------------------------------------------- AddressInUseError


def test_address_in_use_carries_errno_and_path():
    """docs/design.md: AddressInUseError is an OSError with errno EADDRINUSE and filename = path;
    the message names the path."""
    exc = AddressInUseError("/tmp/some/s.sock")
    assert isinstance(exc, OSError)
    assert exc.errno == errno.EADDRINUSE
    assert exc.filename == "/tmp/some/s.sock"
    assert "/tmp/some/s.sock" in str(exc)
    assert os.strerror(errno.EADDRINUSE) in str(exc)


def test_address_in_use_reason_in_message():
    """The optional reason is part of the message; errno and path are unchanged."""
    exc = AddressInUseError("/tmp/x.sock", "the path exists and is not a socket")
    assert exc.errno == errno.EADDRINUSE
    assert exc.filename == "/tmp/x.sock"
    assert "not a socket" in str(exc)


def test_address_in_use_raised_by_second_server(sock_path, make_server):
    """Checklist 2 / W3: a second server on a live path gets AddressInUseError
    (errno EADDRINUSE, filename = the path); the first keeps its file."""
    first = make_server(sock_path, lambda conn: None)
    inode = os.lstat(sock_path).st_ino
    second = make_server(sock_path, lambda conn: None, start=False)
    with pytest.raises(AddressInUseError) as info:
        second.start()
    assert info.value.errno == errno.EADDRINUSE
    assert info.value.filename == sock_path
    assert sock_path in str(info.value)
    assert first.is_running
    assert os.lstat(sock_path).st_ino == inode


def test_address_in_use_for_regular_file(sock_path, make_server):
    """Checklist 1: a non-socket at the path -> AddressInUseError naming it, file untouched."""
    pathlib.Path(sock_path).write_bytes(b"keep me")
    srv = make_server(sock_path, lambda conn: None, start=False)
    with pytest.raises(AddressInUseError) as info:
        srv.start()
    assert info.value.filename == sock_path
    assert pathlib.Path(sock_path).read_bytes() == b"keep me"


def test_invalid_handler_error_from_server(sock_path):
    """docs/design.md: exactly one of handler / protocol, else InvalidHandlerError (a ConfigError and a TypeError)."""
    cfg = ServerConfig(path=sock_path)
    for args, kwargs in [
        ((), {}),
        ((lambda c: None,), {"protocol": asyncio.Protocol}),
        ((42,), {}),
    ]:
        with pytest.raises(InvalidHandlerError) as info:
            Server(cfg, *args, **kwargs)
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    assert not os.path.lexists(sock_path)


# ---------------------------------------------------------------------- public names


def test_all_has_every_design_name():
    """docs/design.md "Public contract": every fixed name is in unixsrv.__all__."""
    missing = [name for name in DESIGN_NAMES if name not in unixsrv.__all__]
    assert missing == []


def test_every_all_name_exists():
    """No dangling names in __all__; `from unixsrv import *` works."""
    for name in unixsrv.__all__:
        assert hasattr(unixsrv, name), name
    namespace: dict[str, object] = {}
    exec("from unixsrv import *", namespace)
    for name in DESIGN_NAMES:
        assert namespace[name] is getattr(unixsrv, name)


def test_version():
    """__version__ is exported and matches the installed distribution metadata."""
    from importlib.metadata import version

    assert unixsrv.__version__ == version("unixsrv")


def test_protocol_is_asyncio_protocol():
    """docs/design.md: Protocol is asyncio.Protocol shaped; an asyncio.Protocol subclass works unchanged."""
    assert unixsrv.Protocol is asyncio.Protocol


def test_transport_subclasses_asyncio_transport():
    """docs/design.md "Event model": Transport subclasses asyncio.Transport."""
    assert issubclass(unixsrv.Transport, asyncio.Transport)


def test_public_classes_are_classes():
    """Server, ServerConfig, Connection, Transport, ConnState and PeerCredentials are types."""
    for name in [
        "Server",
        "ServerConfig",
        "Connection",
        "Transport",
        "ConnState",
        "PeerCredentials",
    ]:
        assert isinstance(getattr(unixsrv, name), type), name


# ---------------------------------------------------------------------- logging


def test_library_logger_has_only_a_null_handler():
    """A library logs; the application decides where records go: exactly one NullHandler,
    propagation on, no level forced."""
    logger = logging.getLogger("unixsrv")
    assert len(logger.handlers) == 1
    assert type(logger.handlers[0]) is logging.NullHandler
    assert logger.propagate is True
    assert logger.level == logging.NOTSET


def test_module_loggers_are_children():
    """Module loggers live under 'unixsrv' and add no handlers of their own."""
    import unixsrv.server
    import unixsrv.threadpool

    for mod in (unixsrv.server, unixsrv.threadpool):
        assert mod.logger.name.startswith("unixsrv.")
        assert mod.logger.handlers == []


# ---------------------------------------------------------------------- typing markers


def test_py_typed_ships():
    """PEP 561: the package carries py.typed."""
    marker = importlib.resources.files("unixsrv") / "py.typed"
    assert marker.is_file()


def test_core_stub_ships():
    """docs/design.md "Layout": src/unixsrv/_core.pyx/.pxd/.pyi; the extension needs a stub for type checkers."""
    stub = importlib.resources.files("unixsrv") / "_core.pyi"
    assert stub.is_file(), "unixsrv/_core.pyi is missing"
    text = stub.read_text(encoding="utf-8")
    for name in ("Connection", "Transport", "Stats"):
        assert f"class {name}" in text, name


def test_package_data_declares_stubs():
    """pyproject ships py.typed and *.pyi as package data (so wheels carry them)."""
    root = pathlib.Path(__file__).resolve().parent.parent
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    line = next(ln for ln in section.splitlines() if ln.strip().startswith("unixsrv"))
    assert '"py.typed"' in line
    assert '"*.pyi"' in line
