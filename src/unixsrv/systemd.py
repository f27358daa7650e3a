"""systemd integration, written here (no libsystemd): socket activation and sd_notify.

Socket activation (sd_listen_fds(3)): systemd passes listening sockets as fds
3, 4, ... and describes them in ``$LISTEN_FDS`` (how many), ``$LISTEN_PID``
(the process they are meant for) and ``$LISTEN_FDNAMES`` (their
``FileDescriptorName=``, colon-separated).  :func:`listen_fd` picks one,
checks that it is a listening ``AF_UNIX`` stream socket and unsets the three
variables, as ``sd_listen_fds(unset_environment=1)`` does.

Notification (sd_notify(3)): a datagram of ``KEY=value`` lines sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` means the
Linux abstract namespace).  :class:`Notifier` sends READY=1 once the server
accepts, WATCHDOG=1 every ``$WATCHDOG_USEC / 2`` from the server's loop thread
(so a loop stuck in a callback stops the pings and systemd restarts the
service), STATUS= with the open connection count, and STOPPING=1 at shutdown.
With ``workers=N`` the parent alone notifies (see unixsrv.prefork), and
``reload()`` is announced as RELOADING=1 then READY=1.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import time

__all__ = ["LISTEN_FDS_START", "Notifier", "listen_fd", "listening_address", "notify"]

logger = logging.getLogger("unixsrv.systemd")

#: The first fd systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

# Without a watchdog, STATUS= is refreshed this often (seconds).
_STATUS_INTERVAL = 5.0


def listen_fd(name: str | None = None) -> int:
    """The inherited listening socket named ``name`` (its
    ``FileDescriptorName=``), or the only one when ``name`` is None.

    Raises ValueError when this process was not socket-activated, when
    ``name`` is not among the passed sockets, or when several are passed and
    no name is given.  The fd is validated (:func:`listening_address`) and
    marked close-on-exec; the environment variables are unset in every case.
    """
    try:
        pid_text = os.environ.get("LISTEN_PID", "")
        fds_text = os.environ.get("LISTEN_FDS", "")
        names_text = os.environ.get("LISTEN_FDNAMES")
    finally:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    if not fds_text:
        raise ValueError("$LISTEN_FDS is not set: this process was not socket-activated")
    if not pid_text.isdigit() or int(pid_text) != os.getpid():
        raise ValueError(f"$LISTEN_PID is {pid_text!r}, not this process ({os.getpid()})")
    if not fds_text.isdigit() or int(fds_text) < 1:
        raise ValueError(f"$LISTEN_FDS is {fds_text!r}: no socket passed")
    count = int(fds_text)
    names = names_text.split(":") if names_text is not None else []
    if name is None:
        if count != 1:
            raise ValueError(
                f"{count} sockets passed ({', '.join(names) or 'unnamed'}): choose one by name"
            )
        index = 0
    else:
        if name not in names[:count]:
            raise ValueError(
                f"no socket named {name!r} passed (FileDescriptorName=; passed: {names[:count]})"
            )
        index = names.index(name)
    fd = LISTEN_FDS_START + index
    listening_address(fd)
    # sd_listen_fds(3) sets FD_CLOEXEC on every passed fd.
    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
    return fd


def listening_address(fd: int) -> bytes:
    """The address (``sun_path`` bytes; a leading NUL for an abstract name)
    of the listening ``AF_UNIX`` stream socket ``fd``.  Raises ValueError for
    anything else (checked with fstat and getsockopt SO_DOMAIN/SO_TYPE/
    SO_ACCEPTCONN, socket(7)), OSError for a closed fd."""
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise ValueError(f"fd {fd} is not a socket")
    sock = socket.socket(fileno=os.dup(fd))
    try:
        if sock.family != socket.AF_UNIX:
            raise ValueError(f"fd {fd} is not an AF_UNIX socket ({sock.family!r})")
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM:
            raise ValueError(f"fd {fd} is not a stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"fd {fd} is not listening")
        name = sock.getsockname()
    finally:
        sock.close()
    address = os.fsencode(name) if isinstance(name, str) else bytes(name)
    if not address:
        raise ValueError(f"fd {fd} is not bound to an address")
    return address


def notify(message: str) -> bool:
    """Send one sd_notify(3) datagram to ``$NOTIFY_SOCKET``; False when it is
    unset or not an ``AF_UNIX`` address.  A failure to send is logged, never
    raised: the service keeps running without its manager's bookkeeping."""
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target or target[0] not in "/@":
        return False  # unset, or a vsock: address (not supported here)
    address: str | bytes = "\0" + target[1:] if target[0] == "@" else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)  # never stall the loop thread on a full queue
            sock.sendto(message.encode(), address)
        return True
    except OSError as exc:
        level = logging.DEBUG if exc.errno == errno.EAGAIN else logging.WARNING
        logger.log(level, "sd_notify to %s failed: %s", target, exc)
        return False


class Notifier:
    """The notifications of one server run (see the module docstring).

    :meth:`tick` runs on the server's loop thread, first as soon as the loop
    runs (READY=1) and then every :attr:`interval` seconds; :meth:`stopping`
    when the server stops accepting.
    """

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC", "")
        wd_pid = os.environ.get("WATCHDOG_PID", "")
        mine = not wd_pid or (wd_pid.isdigit() and int(wd_pid) == os.getpid())
        #: Seconds between WATCHDOG=1 pings (half the timeout, as sd_watchdog_enabled(3)
        #: recommends), None without a watchdog.
        self.watchdog: float | None = (
            int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        )
        self.interval = self.watchdog if self.watchdog is not None else _STATUS_INTERVAL
        self._ready = False
        self._status: int | None = None

    @staticmethod
    def wanted() -> bool:
        """True when there is a manager to notify."""
        return bool(os.environ.get("NOTIFY_SOCKET"))

    def tick(self, open_connections: int) -> None:
        lines = []
        if not self._ready:
            self._ready = True
            lines.append("READY=1")
        elif self.watchdog is not None:
            lines.append("WATCHDOG=1")
        if open_connections != self._status:
            self._status = open_connections
            lines.append(f"STATUS=serving, {open_connections} open connection(s)")
        if lines:
            notify("\n".join(lines))

    def stopping(self) -> None:
        notify("STOPPING=1\nSTATUS=stopping")

    def reloading(self) -> None:
        """A reload begins: RELOADING=1 with the CLOCK_MONOTONIC time in
        microseconds, which ``Type=notify-reload`` requires (sd_notify(3));
        :meth:`reloaded` follows."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading")

    def reloaded(self) -> None:
        """The reload ended (done or failed): READY=1 again."""
        notify("READY=1\nSTATUS=serving")
