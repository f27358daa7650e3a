"""fd hygiene: close-on-exec and non-blocking flags, nothing inherited by
child processes, no leak across many connections or failed starts
(docs/reliability-checklist.md, section E: items 33-35)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import select
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator

import pytest

from conftest import (
    DEADLINE,
    FD_DIR,
    LINUX,
    connect,
    connected,
    echo,
    echo_handler,
    fd_count,
    fd_identity,
    fd_snapshot,
    finish,
    is_listening,
    make_room,
    opened_since,
    read_line,
    recv_until_eof,
    start_echo,
    wait_until,
)
from unixsrv import AddressInUseError, Server, ServerConfig

# As /proc/<pid>/fdinfo prints them on Linux (0o2000000, 0o4000); fd_flags
# builds the same bits from fcntl(2) elsewhere.
O_CLOEXEC_FLAG = os.O_CLOEXEC
O_NONBLOCK_FLAG = os.O_NONBLOCK


def fd_flags(fd: int) -> int:
    """The open-file flags of an fd: on Linux the "flags:" line of
    /proc/self/fdinfo (octal; it includes O_CLOEXEC when FD_CLOEXEC is set);
    elsewhere fcntl(F_GETFL), plus O_CLOEXEC if fcntl(F_GETFD) has FD_CLOEXEC."""
    if not LINUX:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
            flags |= os.O_CLOEXEC
        return flags
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"no flags line for fd {fd}")


def is_kqueue(fd: int) -> bool:
    """True if fd is a kqueue: kevent(2) on it works (it fails with EBADF on
    anything else).  macOS's fstat reports a kqueue as a FIFO, like a pipe."""
    if not hasattr(select, "kqueue"):
        return False
    kq = select.kqueue.fromfd(os.dup(fd))
    try:
        kq.control(None, 0, 0)
    except OSError:
        return False
    finally:
        kq.close()
    return True


def fd_kind(fd: int) -> str:
    """listener, connection, poller (epoll/kqueue), pipe or other.  Linux:
    from the /proc/self/fd link; elsewhere from fstat and kevent."""
    if LINUX:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith("socket:"):
            return "listener" if is_listening(fd) else "connection"
        if target == "anon_inode:[eventpoll]":
            return "poller"
        return "pipe" if target.startswith("pipe:") else "other"
    mode = os.fstat(fd).st_mode
    if stat.S_ISSOCK(mode):
        return "listener" if is_listening(fd) else "connection"
    if is_kqueue(fd):
        return "poller"
    return "pipe" if stat.S_ISFIFO(mode) else "other"


@pytest.fixture
def served(
    model: str, sock_path: str, make_server: Callable[..., Server]
) -> Iterator[tuple[Server, dict[str, list[int]], list[socket.socket]]]:
    """A running server with 5 connected clients, and its own fds sorted by
    kind: listener, connection, poller, pipe, other."""
    before = fd_snapshot()
    srv = start_echo(make_server, sock_path, model)
    with connected(sock_path, 5) as clients:
        for i, c in enumerate(clients):
            echo(c, b"client %d" % i)
        wait_until(lambda: srv.stats()["accepted"] == 5)
        mine = {c.fileno() for c in clients}
        kinds: dict[str, list[int]] = {
            "listener": [],
            "connection": [],
            "poller": [],
            "pipe": [],
            "other": [],
        }
        for fd in sorted(opened_since(before) - mine):
            kinds[fd_kind(fd)].append(fd)
        yield srv, kinds, clients


# ---------------------------------------------------------------------------- 33

# A child that prints fd_identity() of each of its open fds as JSON, then
# waits for stdin to close.
_REPORT_FDS = """
import json, os, stat, sys
ids = []
for name in os.listdir(sys.argv[1]):
    try:
        st = os.fstat(int(name))
    except OSError:
        continue  # the directory fd listdir used, closed by now
    ids.append([stat.S_IFMT(st.st_mode), st.st_dev, st.st_ino])
print(json.dumps(ids), flush=True)
sys.stdin.read()
"""


@pytest.mark.linux("/proc/self/fdinfo, epoll")
def test_poller_fd_is_nonblocking(
    model: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 33 ("create every fd with CLOEXEC and O_NONBLOCK ... the
    listener, connections, epoll and wakeup fds"): the epoll fd is
    O_NONBLOCK too (epoll_create1 takes only EPOLL_CLOEXEC: poller.h sets
    it with fcntl)."""
    before = fd_snapshot()
    start_echo(make_server, sock_path, model)
    pollers = [fd for fd in sorted(opened_since(before)) if fd_kind(fd) == "poller"]
    assert pollers, "no epoll fd found"
    for fd in pollers:
        assert fd_flags(fd) & O_NONBLOCK_FLAG, (
            f"epoll fd {fd}: flags {fd_flags(fd):o} lack O_NONBLOCK"
        )


def test_every_server_fd_is_close_on_exec(
    model: str, served: tuple[Server, dict[str, list[int]], list[socket.socket]]
) -> None:
    """Checklist 33: the listener, every accepted connection, the poller
    and the wakeup pipe are created with FD_CLOEXEC (O_CLOEXEC in fdinfo)."""
    _srv, kinds, _clients = served
    assert len(kinds["listener"]) == 1
    assert len(kinds["connection"]) == 5
    assert len(kinds["poller"]) >= 1
    assert len(kinds["pipe"]) >= 2  # the wakeup pipe's two ends
    for kind, fds in kinds.items():
        for fd in fds:
            assert fd_flags(fd) & O_CLOEXEC_FLAG, (
                f"{kind} fd {fd} ({fd_identity(fd)}) lacks O_CLOEXEC"
            )
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_listener_and_event_connections_are_nonblocking(
    model: str, served: tuple[Server, dict[str, list[int]], list[socket.socket]]
) -> None:
    """Checklist 33: the listener is O_NONBLOCK (the accept loop must never
    block), and so is every connection of the event model (one loop thread
    serves them all) and both ends of the wakeup pipe; blocking-model
    connections are deliberately blocking (each is served by its own
    thread, which waits in recv/send without the GIL)."""
    _srv, kinds, _clients = served
    (listener,) = kinds["listener"]
    assert fd_flags(listener) & O_NONBLOCK_FLAG
    if model == "event":
        for fd in kinds["connection"]:
            assert fd_flags(fd) & O_NONBLOCK_FLAG, f"connection fd {fd} is blocking"
    for fd in kinds["pipe"]:
        assert fd_flags(fd) & O_NONBLOCK_FLAG, f"wakeup pipe fd {fd} is blocking"


def test_child_process_inherits_no_server_fd(
    model: str,
    served: tuple[Server, dict[str, list[int]], list[socket.socket]],
    spawn: Callable[..., subprocess.Popen[str]],
) -> None:
    """Checklist 33 (a child holding the listener keeps the socket "alive"):
    a Popen(close_fds=False) child holds none of the server's fds (the child
    reports what each of its fds refers to: file type, st_dev, st_ino)."""
    srv, kinds, clients = served
    ours = {fd_identity(fd) for fds in kinds.values() for fd in fds}
    proc = spawn(_REPORT_FDS, FD_DIR, close_fds=False, stdin=subprocess.PIPE)
    inherited = {tuple(ident) for ident in json.loads(read_line(proc))}
    assert len(inherited) >= 3  # stdin, stdout, stderr at least
    assert inherited & ours == set()
    code, _out, err = finish(proc)
    assert code == 0, err
    echo(clients[0], b"still served")
    assert srv.is_running


# ---------------------------------------------------------------------------- 34


def _cycle(path: str, kind: int) -> None:
    with connect(path) as s:
        if kind == 0:
            pass  # connect and close at once
        elif kind == 1:
            make_room(s, 70000)
            s.sendall(b"x" * 70000)  # close with the echo unread: the server meets a reset
        elif kind == 2:
            echo(s, b"round trip")
        else:
            s.sendall(b"half")
            s.shutdown(socket.SHUT_WR)
            assert recv_until_eof(s) == b"half"


#: Checklist 34's 10,000 cycles: ordinary ones (the four kinds of _cycle,
#: a quarter of them resets), denials over max_connections, and idle
#: timeouts, 50 clients at a time (one by one, 500 idle timeouts of 0.05 s
#: would take 25 s).
PLAIN_CYCLES, DENIALS, TIMEOUT_BATCHES, TIMEOUT_BATCH = 7500, 2000, 10, 50


def test_no_fd_leak_over_10000_cycles(
    model: str, sock_dir: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 34: 10,000 connect/disconnect cycles in random order, of
    every kind: closed at once, closed with unread data (a reset), a round
    trip, a half-close (on a plain echo server); a client denied by
    max_connections=1 (EOF at once; one client holds the only slot); a
    silent client closed by a 0.05 s idle timeout (50 at a time).
    Afterwards the process's fd count is where it was, every connection is
    counted (closed, or rejected), and the held client is still served."""
    plain = start_echo(make_server, os.path.join(sock_dir, "p.sock"), model)
    limited = start_echo(make_server, os.path.join(sock_dir, "l.sock"), model, max_connections=1)
    idle = start_echo(make_server, os.path.join(sock_dir, "i.sock"), model, idle_timeout=0.05)
    rng = random.Random(34)
    plan = (
        [rng.randrange(4) for _ in range(PLAIN_CYCLES)]
        + ["deny"] * DENIALS
        + ["idle"] * TIMEOUT_BATCHES
    )
    rng.shuffle(plan)
    assert PLAIN_CYCLES + DENIALS + TIMEOUT_BATCHES * TIMEOUT_BATCH == 10_000
    with connect(limited.path) as held:
        echo(held, b"held")
        base = fd_count()
        for step in plan:
            if step == "deny":
                with connect(limited.path) as s:
                    assert s.recv(10) == b""
            elif step == "idle":
                with connected(idle.path, TIMEOUT_BATCH) as clients:
                    for c in clients:
                        assert c.recv(10) == b""
            else:
                _cycle(plain.path, step)
        wait_until(lambda: plain.stats()["closed"] == PLAIN_CYCLES)
        wait_until(lambda: limited.stats()["rejected"] == DENIALS)
        wait_until(lambda: idle.stats()["closed"] == TIMEOUT_BATCHES * TIMEOUT_BATCH)
        wait_until(lambda: fd_count() == base)
        echo(held, b"still held")
    assert plain.stats()["accepted"] == PLAIN_CYCLES and plain.stats()["open"] == 0
    assert limited.stats()["accepted"] == 1
    assert idle.stats()["accepted"] == TIMEOUT_BATCHES * TIMEOUT_BATCH and idle.stats()["open"] == 0


# ---------------------------------------------------------------------------- 35


@pytest.fixture
def immutable_dir(sock_dir: str) -> Iterator[str]:
    """A directory nobody (not even root) can create files in: chattr +i."""
    d = os.path.join(sock_dir, "ro")
    os.mkdir(d)
    subprocess.run(["chattr", "+i", d], check=True, timeout=DEADLINE)
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-i", d], check=True, timeout=DEADLINE)


@pytest.mark.parametrize(
    "where",
    [
        "missing directory",
        "file as directory",
        "not a socket",
        pytest.param(
            "under /proc", marks=pytest.mark.linux("/proc, a directory that cannot hold sockets")
        ),
    ],
)
def test_failed_starts_leak_no_fd(
    where: str, sock_dir: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 35 (CPython test_tcpserver_bind_leak): 1,024 failed starts
    leave the fd count unchanged, whether start() fails before anything is
    created (missing directory, a file in the directory's place), at the
    existing path (a directory there) or at bind (a directory that cannot
    hold sockets)."""
    if where == "missing directory":
        path, exc_type = os.path.join(sock_dir, "missing", "s.sock"), FileNotFoundError
    elif where == "file as directory":
        open(os.path.join(sock_dir, "file"), "wb").close()
        path, exc_type = os.path.join(sock_dir, "file", "s.sock"), NotADirectoryError
    elif where == "not a socket":
        os.mkdir(os.path.join(sock_dir, "s.sock"))
        path, exc_type = os.path.join(sock_dir, "s.sock"), AddressInUseError
    else:
        path, exc_type = f"/proc/us-{os.getpid()}.sock", OSError
    srv = make_server(path, echo_handler, start=False)
    base = fd_count()
    for _ in range(1024):
        with pytest.raises(exc_type):
            srv.start()
    assert fd_count() == base
    assert not srv.is_running


@pytest.mark.root
@pytest.mark.linux("chattr +i (an immutable directory)")
def test_failed_starts_in_an_unwritable_directory_leak_no_fd(
    immutable_dir: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 35: 1,024 starts in a directory where bind() fails (EPERM:
    immutable, so even root cannot create the socket) leave the fd count
    unchanged and nothing on disk."""
    srv = make_server(os.path.join(immutable_dir, "s.sock"), echo_handler, start=False)
    base = fd_count()
    for _ in range(1024):
        with pytest.raises(PermissionError) as info:
            srv.start()
    assert info.value.errno == errno.EPERM
    assert fd_count() == base
    assert os.listdir(immutable_dir) == []


def test_failed_starts_against_a_live_server_leak_no_fd(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 35 (and 2): 1,024 starts refused because a live server holds
    the path (each one probes it) leave the fd count unchanged."""
    live = make_server(sock_path, echo_handler)
    srv = make_server(ServerConfig(path=sock_path), echo_handler, start=False)
    base = fd_count()
    for _ in range(1024):
        with pytest.raises(AddressInUseError):
            srv.start()
    wait_until(lambda: live.stats()["closed"] == live.stats()["accepted"])
    wait_until(lambda: fd_count() == base)
    assert live.is_running
