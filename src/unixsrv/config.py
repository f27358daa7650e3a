"""ServerConfig: every setting of a server, validated when it is built.

A rejected value raises the matching :class:`~unixsrv.errors.ConfigError`
subclass at construction, before anything touches the filesystem.  Values are
normalised: ``mode`` becomes an int (golib's default ``0o770`` when omitted),
``group`` a numeric gid (names are resolved here, once), ``idle_timeout`` a
float number of seconds or ``None``.
"""

from __future__ import annotations

import datetime
import grp
import math
import os
import pwd
import re
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Union

from . import systemd
from ._core import HAVE_ABSTRACT, SUN_PATH_MAX
from .errors import ConfigError, InvalidGroupError, InvalidModeError, InvalidPathError

__all__ = ["DEFAULT_MODE", "MAX_GID", "ServerConfig", "parse_duration", "parse_mode"]

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

#: golib's default mode for the socket file when none is configured.
DEFAULT_MODE = 0o770
#: Largest valid gid: gid_t is 32-bit and 4294967295 means "unchanged" to chown(2).
MAX_GID = 4294967294

_MAX_BUFFER = 1 << 30


@dataclass(frozen=True, kw_only=True, init=False)
class ServerConfig:
    """Settings of one Unix socket server.

    ``path`` (required): filesystem path of the socket.  On Linux a leading
    ``"@"`` or NUL selects the abstract namespace (no file, so no mode/group).
    ``mode``: permission bits of the socket file: an int (``0o660``) or a
    string (``"0660"``, ``"660"``, ``"0o660"``, ``"rw-rw----"``); ``None``
    means ``0o770``.  An abstract name has no file: its mode must be
    ``None`` and the field then holds 0 (so ``dataclasses.replace()`` of an
    abstract config passes ``mode=None``).
    ``group``: gid (0..4294967294) or group name given to the socket file;
    ``None`` leaves the process's group.
    ``idle_timeout``: seconds without a byte received or sent after which a
    connection is closed (a number, a ``timedelta`` or a Go duration string
    such as ``"1m30s"``); ``None`` or 0 disables it.
    ``backlog``: listen(2) queue length (the kernel caps it at somaxconn).
    ``max_connections``: connections served at once; a client over the limit is
    accepted and closed at once.  ``None`` means only the fd limit applies.
    ``read_buffer_size``: largest chunk one receive delivers (event model) and
    the default size of ``Connection.read()``.
    ``write_buffer_high`` / ``write_buffer_low``: event-model flow-control marks
    (``pause_writing`` above high, ``resume_writing`` at or below low; low
    defaults to high // 4).
    ``max_write_buffer``: hard cap on one connection's unsent output; a write
    beyond it aborts that connection (a peer that never reads cannot exhaust
    memory even if the protocol ignores ``pause_writing``).
    ``allowed_uids`` / ``allowed_gids``: ``None`` (anyone the file mode lets
    in) or collections of ids or names (resolved here; a string may list
    several, comma-separated).  A peer is admitted if its uid is listed or its
    primary or any supplementary group is; checked in C at accept, before any
    Python code sees the peer.  uid 0 is not special.
    ``max_connections_per_uid``: open connections one uid may have; over it a
    client is accepted and closed at once (counted as ``rejected``).
    ``fd``: serve this inherited, already listening ``AF_UNIX`` stream socket
    (systemd socket activation, see :meth:`from_systemd`) instead of creating
    one; ``path`` must be its address.  It is never chmod-ed or unlinked, so
    ``mode`` and ``group`` must stay ``None`` (the fields then hold 0 and
    ``None``, as for an abstract name).
    ``sd_notify``: tell systemd READY=1, WATCHDOG=1, STATUS= and STOPPING=1
    through ``$NOTIFY_SOCKET`` (nothing happens where it is unset).

    The fields hold the normalised values, and are typed so: ``path`` is
    ``str | bytes``, ``mode`` an int, ``group`` a gid or ``None``,
    ``idle_timeout`` seconds or ``None``, ``write_buffer_low`` an int,
    ``allowed_uids``/``allowed_gids`` sorted tuples of ids or ``None``.  The
    constructor (written out below rather than generated, so that it can
    take the wider input types) accepts everything documented above.
    """

    path: str | bytes
    mode: int
    group: int | None
    idle_timeout: float | None
    backlog: int
    max_connections: int | None
    read_buffer_size: int
    write_buffer_high: int
    write_buffer_low: int
    max_write_buffer: int
    allowed_uids: tuple[int, ...] | None
    allowed_gids: tuple[int, ...] | None
    max_connections_per_uid: int | None
    fd: int | None
    sd_notify: bool

    def __init__(
        self,
        *,
        path: PathArg,
        mode: int | str | None = None,
        group: int | str | None = None,
        idle_timeout: float | str | datetime.timedelta | None = None,
        backlog: int = 1024,
        max_connections: int | None = None,
        read_buffer_size: int = 65536,
        write_buffer_high: int = 65536,
        write_buffer_low: int | None = None,
        max_write_buffer: int = 16 * 1024 * 1024,
        allowed_uids: Collection[int | str] | str | int | None = None,
        allowed_gids: Collection[int | str] | str | int | None = None,
        max_connections_per_uid: int | None = None,
        fd: int | None = None,
        sd_notify: bool = False,
    ) -> None:
        if fd is not None and (mode is not None or group is not None):
            raise ConfigError(
                "an inherited socket (fd=) is never chmod-ed: mode and group must be None"
            )
        normalised_path, abstract = _normalise_path(path)
        _set(self, "path", normalised_path)
        if abstract:
            if mode is not None:
                raise InvalidModeError("an abstract socket has no file: mode must be None")
            if group is not None:
                raise InvalidGroupError("an abstract socket has no file: group must be None")
            _set(self, "mode", 0)
            _set(self, "group", None)
        elif fd is not None:  # systemd's socket: its file is the .socket unit's
            _set(self, "mode", 0)
            _set(self, "group", None)
        else:
            _set(self, "mode", DEFAULT_MODE if mode is None else parse_mode(mode))
            _set(self, "group", _parse_group(group))
        _set(self, "idle_timeout", _parse_timeout(idle_timeout))
        _check_int("backlog", backlog, 1, 1 << 20)
        if max_connections is not None:
            _check_int("max_connections", max_connections, 1, 1 << 30)
        _check_int("read_buffer_size", read_buffer_size, 256, 16 * 1024 * 1024)
        _check_int("write_buffer_high", write_buffer_high, 0, _MAX_BUFFER)
        low = write_buffer_high // 4 if write_buffer_low is None else write_buffer_low
        _check_int("write_buffer_low", low, 0, write_buffer_high)
        _check_int("max_write_buffer", max_write_buffer, max(write_buffer_high, 1), _MAX_BUFFER)
        for name, value in (
            ("backlog", backlog),
            ("max_connections", max_connections),
            ("read_buffer_size", read_buffer_size),
            ("write_buffer_high", write_buffer_high),
            ("write_buffer_low", low),
            ("max_write_buffer", max_write_buffer),
        ):
            _set(self, name, value)
        _set(self, "allowed_uids", _parse_ids(allowed_uids, "allowed_uids", _uid_by_name))
        _set(self, "allowed_gids", _parse_ids(allowed_gids, "allowed_gids", _gid_by_name))
        if max_connections_per_uid is not None:
            _check_int("max_connections_per_uid", max_connections_per_uid, 1, 1 << 30)
        _set(self, "max_connections_per_uid", max_connections_per_uid)
        if not isinstance(sd_notify, bool):
            raise ConfigError(f"sd_notify must be a bool, not {sd_notify!r}")
        _set(self, "sd_notify", sd_notify)
        _set(self, "fd", fd)
        if fd is not None:
            _check_int("fd", fd, 0, (1 << 31) - 1)
            try:
                bound = systemd.listening_address(fd)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"fd {fd}: {exc}") from None
            if bound != self.address:
                raise InvalidPathError(
                    f"fd {fd} is bound to {bound!r}, not to the path {self.display_path!r}"
                )

    @classmethod
    def from_systemd(cls, name: str | None = None, **fields: Any) -> ServerConfig:
        """A config serving the listening socket systemd passed to this
        process (socket activation: ``$LISTEN_FDS``, ``$LISTEN_PID``,
        ``$LISTEN_FDNAMES``, see sd_listen_fds(3)); ``name`` picks one by its
        ``FileDescriptorName=`` when several are passed.  ``path`` is the
        socket's address; ``sd_notify`` defaults to True; other fields as
        given.  The three variables are unset afterwards (so child processes
        do not take the sockets for theirs).  Not socket-activated, or no
        such socket: ConfigError."""
        fields.setdefault("sd_notify", True)
        try:
            fd = systemd.listen_fd(name)
            address = systemd.listening_address(fd)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"systemd socket activation: {exc}") from None
        path = address if address[:1] == b"\0" else os.fsdecode(address)
        return cls(path=path, fd=fd, **fields)

    # ---------------------------------------------------------------- derived

    @property
    def is_abstract(self) -> bool:
        """True for a Linux abstract-namespace name (no file on disk)."""
        return _is_abstract(self.path)

    @property
    def address(self) -> bytes:
        """The exact ``sun_path`` bytes: the encoded path, or NUL + name."""
        raw = self.path if isinstance(self.path, bytes) else os.fsencode(self.path)
        return b"\0" + raw[1:] if self.is_abstract else raw

    @property
    def display_path(self) -> str:
        """The path as text for messages and callbacks (``@name`` when abstract)."""
        if self.is_abstract:
            return "@" + self.address[1:].decode("utf-8", "backslashreplace")
        return os.fsdecode(self.path)

    # ---------------------------------------------------------------- golib keys

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ServerConfig:
        """Build a config from a mapping (a parsed JSON/YAML/TOML document).

        Accepts this class's field names and golib's keys: ``network`` (must be
        ``"unix"``), ``address``, ``perm-file`` (0 or absent = default mode),
        ``group-perm`` (-1 = the process's group), ``con-idle-timeout`` (a Go
        duration such as ``"1m30s"`` or a number of seconds) and ``tls`` (must
        not be enabled: a Unix socket server never silently drops TLS that was
        asked for; its section holds golib's ``enabled`` and ``config``).
        Unknown keys are an error, in the ``tls`` section as at the top.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}

        def put(field: str, value: Any, key: str) -> None:
            if field in kwargs:
                raise ConfigError(f"{key!r} sets {field!r} a second time")
            kwargs[field] = value

        fields = set(cls.__dataclass_fields__)
        for key, value in data.items():
            if key == "network":
                net = str(value).strip().strip("'\"").lower()
                if net != "unix":
                    raise ConfigError(
                        f"network {value!r} is not supported: unixsrv serves 'unix' (stream) sockets"
                    )
            elif key == "address":
                put("path", value, key)
            elif key == "perm-file":
                if value not in (0, "0", "", None):
                    put("mode", value, key)
            elif key == "group-perm":
                gid = value.strip() if isinstance(value, str) else value
                if isinstance(gid, str) and re.fullmatch(r"-?\d+", gid):
                    gid = int(gid)
                if isinstance(gid, bool) or not isinstance(gid, int):
                    raise InvalidGroupError(
                        f"group-perm must be an integer gid (-1 = the process's group), got {value!r}"
                    )
                if gid != -1:
                    put("group", gid, key)
            elif key == "con-idle-timeout":
                put("idle_timeout", parse_duration(value), key)
            elif key == "tls":
                if isinstance(value, Mapping):
                    _check_keys("tls", value, _TLS_KEYS)
                    enabled = value.get("enabled", False)
                else:
                    enabled = value
                if enabled:
                    raise ConfigError(
                        "TLS is enabled in the configuration but unixsrv serves plain Unix sockets"
                    )
            elif key in fields:
                put(key, value, key)
            else:
                raise ConfigError(f"unknown configuration key {key!r}")
        if "path" not in kwargs:
            raise InvalidPathError("the configuration has no 'address' (socket path)")
        return cls(**kwargs)


#: The keys of golib's ``tls`` section (socket/config TLSServer).
_TLS_KEYS = frozenset({"enabled", "config"})


def _check_keys(section: str, data: Mapping[Any, Any], known: frozenset[str]) -> None:
    """A key of a nested section that golib does not define is a typo, as at
    the top level: a ConfigError naming it."""
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown configuration key {key!r} in the {section!r} section")


# ------------------------------------------------------------------ parsing


def parse_mode(value: int | str) -> int:
    """Parse a permission: ``0o660``, ``"0660"``, ``"660"``, ``"0o660"`` or ``"rw-rw----"``.

    A 10-character symbolic form may start with a file-type letter, as golib
    accepts (``"srw-rw----"``); the type is ignored.
    """
    if isinstance(value, bool):
        raise InvalidModeError(f"mode must be an int or a string, not {value!r}")
    if isinstance(value, int):
        mode = value
    elif isinstance(value, str):
        text = value.strip().replace('"', "").replace("'", "")
        if re.fullmatch(r"(0o)?[0-7]{1,4}", text):
            mode = int(text.removeprefix("0o"), 8)
        elif re.fullmatch(r"[-dlcbpsD]?[r-][w-][x-][r-][w-][x-][r-][w-][x-]", text):
            bits = text[-9:]
            mode = sum(1 << (8 - i) for i, ch in enumerate(bits) if ch != "-")
        else:
            raise InvalidModeError(
                f"invalid permission {value!r}: use octal like '0660' or symbolic like 'rw-rw----'"
            )
    else:
        raise InvalidModeError(f"mode must be an int or a string, not {type(value).__name__}")
    if not 0 <= mode <= 0o777:
        raise InvalidModeError(f"mode {mode:#o} is out of range 0..0o777")
    return mode


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")


def parse_duration(value: Any) -> float:
    """Seconds from a Go duration string (``"1m30s"``, ``"500ms"``, ``"2h"``,
    golib's ``"1d"``) or from a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, str):
        text = value.strip().strip("'\"")
        if text in ("0", ""):
            return 0.0
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        pos, seconds = 0, 0.0
        while pos < len(body):
            m = _DURATION_PART.match(body, pos)
            if not m:
                raise ConfigError(
                    f"invalid duration {value!r}: expected a Go duration such as '1m30s' or '500ms'"
                )
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if not body:
            raise ConfigError(f"invalid duration {value!r}")
        seconds *= sign
    else:
        raise ConfigError(f"invalid duration {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"duration must be a finite number of seconds >= 0, got {value!r}")
    return seconds


# ------------------------------------------------------------------ helpers


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _is_abstract(path: str | bytes) -> bool:
    return path[:1] in ("@", "\0", b"@", b"\0")


def _normalise_path(value: Any) -> tuple[str | bytes, bool]:
    if isinstance(value, (str, bytes)):
        path = value
    elif isinstance(value, os.PathLike):
        path = os.fspath(value)
    else:
        raise InvalidPathError(
            f"path must be str, bytes or os.PathLike, not {type(value).__name__}"
        )
    if not path:
        raise InvalidPathError("the socket path is empty")
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    if _is_abstract(path):
        if not HAVE_ABSTRACT:
            raise InvalidPathError(
                f"abstract socket names exist only on Linux, not on {sys.platform}: {path!r}"
            )
        if len(raw) < 2:
            raise InvalidPathError(
                "an abstract socket name needs at least one character after '@' or NUL"
            )
        # sun_path holds the leading NUL plus the name, with no terminator.
        if len(raw) > SUN_PATH_MAX + 1:
            raise InvalidPathError(
                f"abstract name is {len(raw) - 1} bytes; the limit is {SUN_PATH_MAX} bytes: {path!r}"
            )
        return path, True
    if b"\0" in raw:
        raise InvalidPathError(f"a filesystem socket path cannot contain NUL: {path!r}")
    if len(raw) > SUN_PATH_MAX:
        raise InvalidPathError(
            f"socket path is {len(raw)} bytes; the limit on {sys.platform} is {SUN_PATH_MAX} bytes: {path!r}"
        )
    base = os.path.basename(raw)
    if base in (b"", b".", b".."):
        raise InvalidPathError(f"socket path must name a file, not a directory: {path!r}")
    return path, False


def _parse_group(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidGroupError(f"group must be a gid or a group name, not {value!r}")
    if isinstance(value, str):
        name = value.strip()
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            if name.isdigit():
                value = int(name)
            else:
                raise InvalidGroupError(f"unknown group {value!r}") from None
    if not isinstance(value, int):
        raise InvalidGroupError(f"group must be a gid or a group name, not {type(value).__name__}")
    if not 0 <= value <= MAX_GID:
        raise InvalidGroupError(f"gid {value} is out of range 0..{MAX_GID}")
    return value


def _uid_by_name(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid_by_name(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _parse_ids(value: Any, field: str, by_name: Any) -> tuple[int, ...] | None:
    """An allow-list: None, or ids and names (a string may hold several,
    comma-separated) -> sorted unique ids."""
    if value is None:
        return None
    if isinstance(value, str):
        items: list[Any] = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, Collection) and not isinstance(value, (bytes, Mapping)):
        items = list(value)
    else:
        raise ConfigError(f"{field} must be None or a collection of ids or names, not {value!r}")
    ids = set()
    for item in items:
        if isinstance(item, str):
            name = item.strip()
            try:
                ident = by_name(name)
            except KeyError:
                if not name.isdigit():
                    error = InvalidGroupError if field == "allowed_gids" else ConfigError
                    raise error(f"{field}: unknown name {item!r}") from None
                ident = int(name)
        elif isinstance(item, int) and not isinstance(item, bool):
            ident = item
        else:
            raise ConfigError(f"{field}: expected an id or a name, got {item!r}")
        if not 0 <= ident <= MAX_GID:
            raise ConfigError(f"{field}: id {ident} is out of range 0..{MAX_GID}")
        ids.add(ident)
    return tuple(sorted(ids))


def _parse_timeout(value: Any) -> float | None:
    if value is None:
        return None
    seconds = parse_duration(value)
    return seconds if seconds > 0 else None


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, not {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in {low}..{high}, got {value}")
