"""The socket file: what start() may and may not do at the path, and what
close() removes (docs/reliability-checklist.md, section A and B: items 1-16).

Where the checklist and docs/design.md differ, docs/design.md wins: the default mode is
golib's 0o770 (not 0600), and abstract names need no allow-list (items 17-21
are not part of unixsrv yet).
"""

from __future__ import annotations

import errno
import json
import os
import platform
import select
import signal
import socket
import stat
import subprocess
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest

from conftest import (
    DEADLINE,
    connect,
    echo,
    echo_handler,
    echo_once,
    fork_quietly,
    listening_socket,
    proc_stat,
    read_line,
    reap,
    recv_until_eof,
    wait_until,
)
from unixsrv import AddressInUseError, InvalidPathError, Server, ServerConfig
from unixsrv._core import SUN_PATH_MAX

# Facilities of the Linux-only tests (see conftest: @pytest.mark.linux).
STRACE = "strace (system-call delay and error injection)"

# ---------------------------------------------------------------------------- helpers


def child_json(proc: subprocess.Popen[Any], timeout: float = DEADLINE) -> Any:
    """The JSON document a child prints as its last line; checks exit 0."""
    result = json.loads(read_line(proc, timeout))
    assert proc.wait(timeout) == 0, proc.stderr.read() if proc.stderr is not None else ""
    return result


def snapshot(root: str) -> dict[str, tuple[Any, ...]]:
    """Everything under ``root`` (not following links): lstat identity and
    content, so a test can prove that nothing was touched or left behind."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            content: Any = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    content = f.read()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            out[os.path.relpath(p, root)] = (
                st.st_dev,
                st.st_ino,
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_nlink,
                content,
            )
    return out


def tagged(tag: bytes) -> Callable[[Any], None]:
    """A handler that answers every connection with ``tag`` and closes."""

    def handler(conn: Any) -> None:
        conn.write(tag)

    return handler


# ---------------------------------------------------------------------------- 1: non-sockets


def _plant(kind: str, path: str, sock_dir: str) -> None:
    if kind == "regular file":
        with open(path, "wb") as f:
            f.write(b"precious data")
    elif kind == "directory":
        os.mkdir(path)
        with open(os.path.join(path, "inside"), "wb") as f:
            f.write(b"also precious")
    elif kind == "symlink to a file":
        target = os.path.join(sock_dir, "target")
        with open(target, "wb") as f:
            f.write(b"link target")
        os.symlink(target, path)
    elif kind == "dangling symlink":
        os.symlink(os.path.join(sock_dir, "nowhere"), path)
    elif kind == "symlink to a stale socket":
        target = os.path.join(sock_dir, "stale.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(target)  # closed without unlink: a stale socket file
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "regular file",
        "directory",
        "symlink to a file",
        "dangling symlink",
        "symlink to a stale socket",
        "fifo",
    ],
)
def test_non_socket_at_path_is_refused_and_left_untouched(
    kind: str, sock_dir: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 1 (golib spec d: golib deletes whatever is at the path):
    anything that is not a socket is refused with AddressInUseError naming
    the path, and neither it (lstat identity, content) nor a symlink's target
    changes; no temporary file is left behind."""
    _plant(kind, sock_path, sock_dir)
    before = snapshot(sock_dir)
    srv = make_server(sock_path, echo_handler, start=False)
    with pytest.raises(AddressInUseError) as info:
        srv.start()
    assert info.value.errno == errno.EADDRINUSE
    assert sock_path in str(info.value)
    assert snapshot(sock_dir) == before
    assert not srv.is_running and srv.is_gone


# ---------------------------------------------------------------------------- 2, 3: live servers


def test_live_server_is_not_taken_over(
    sock_dir: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 2 (python/cpython#121252): a second server on the path of a
    live one gets AddressInUseError; the file stays the first server's and a
    client still reaches the first server."""
    first = make_server(sock_path, tagged(b"first"))
    before = snapshot(sock_dir)
    second = make_server(sock_path, tagged(b"second"), start=False)
    with pytest.raises(AddressInUseError) as info:
        second.start()
    assert info.value.errno == errno.EADDRINUSE and sock_path in str(info.value)
    assert snapshot(sock_dir) == before
    assert first.is_running and not second.is_running
    for _ in range(3):
        with connect(sock_path) as s:
            assert recv_until_eof(s) == b"first"


@pytest.mark.linux(
    "EAGAIN from connect() to a full listen backlog (macOS refuses it: ECONNREFUSED)"
)
def test_full_backlog_counts_as_live(
    sock_dir: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 3: a listener whose backlog is full answers the liveness
    probe with EAGAIN; that means "alive", so start() refuses and keeps the
    file (and the pending clients stay queued)."""
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pending: list[socket.socket] = []
    try:
        raw.bind(sock_path)
        raw.listen(1)
        for _ in range(8):  # listen(1) queues 2 on Linux; fill it whatever the kernel does
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(sock_path)
            except BlockingIOError:
                c.close()
                break
            pending.append(c)
        else:
            raise AssertionError("the backlog never filled")
        assert len(pending) >= 2
        before = snapshot(sock_dir)
        srv = make_server(sock_path, echo_handler, start=False)
        with pytest.raises(AddressInUseError) as info:
            srv.start()
        assert sock_path in str(info.value)
        assert snapshot(sock_dir) == before
        raw.settimeout(DEADLINE)
        for _ in pending:
            conn, _addr = raw.accept()
            conn.close()
    finally:
        for c in pending:
            c.close()
        raw.close()


# ---------------------------------------------------------------------------- 4: stale socket

# An echo server on argv[1] in a child process: prints "ready <pid>"; a line
# on stdin makes it close() and print "closed"; it exits when stdin closes.
_CLOSE_ON_REQUEST = textwrap.dedent(
    """
    import os, sys
    from unixsrv import Server, ServerConfig
    from unixsrv.echo import echo_handler
    srv = Server(ServerConfig(path=sys.argv[1]), echo_handler)
    srv.start()
    print("ready", os.getpid(), flush=True)
    sys.stdin.readline()
    srv.close()
    print("closed", flush=True)
    sys.stdin.read()
    """
)


def test_stale_socket_of_a_killed_server_is_replaced(
    sock_dir: str, sock_path: str, spawn: Callable[..., Any], make_server: Callable[..., Server]
) -> None:
    """Checklist 4: a server killed with SIGKILL leaves its socket file; a new
    server on that path finds it stale (connect refused), replaces it at
    once and serves."""
    proc = spawn(_CLOSE_ON_REQUEST, sock_path, text=False, stdin=subprocess.PIPE)
    assert read_line(proc).startswith("ready")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(DEADLINE)
    old = os.lstat(sock_path)
    assert stat.S_ISSOCK(old.st_mode)
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s,
        pytest.raises(ConnectionRefusedError),
    ):
        s.connect(sock_path)  # precondition: it really is stale
    srv = make_server(sock_path, echo_handler)
    assert srv.is_running
    echo_once(sock_path, b"alive again")
    assert sorted(os.listdir(sock_dir)) == ["s.sock"]


# ---------------------------------------------------------------------------- 5: racing starters

_RACE = textwrap.dedent(
    """
    import json, multiprocessing as mp, os, socket, sys
    from unixsrv import AddressInUseError, Server, ServerConfig
    from unixsrv.echo import echo_handler

    path = sys.argv[1]
    directory = os.path.dirname(path)
    N = 16

    def racer(barrier, results, release):
        srv = Server(ServerConfig(path=path), echo_handler)
        barrier.wait()
        try:
            srv.start()
        except AddressInUseError as exc:
            results.put(["in use", exc.errno, str(exc)])
            return
        except BaseException as exc:
            results.put(["other", repr(exc), ""])
            return
        results.put(["serving", os.getpid(), ""])
        release.wait(30)
        srv.close()

    ctx = mp.get_context("fork")          # this coordinator is single-threaded
    barrier, results, release = ctx.Barrier(N), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=racer, args=(barrier, results, release)) for _ in range(N)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=30) for _ in range(N)]
        listing = sorted(os.listdir(directory))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(b"who wins")
            echoed = b""
            while len(echoed) < 8:
                echoed += s.recv(8)
    finally:
        release.set()
        for p in procs:
            p.join(30)
    print(json.dumps(dict(outcomes=outcomes, listing=listing, echoed=echoed.decode(),
                          exitcodes=[p.exitcode for p in procs], after=sorted(os.listdir(directory)))))
    """
)


@pytest.mark.parametrize(
    "at_path", ["nothing", pytest.param("a stale socket", marks=pytest.mark.linux(STRACE))]
)
def test_one_of_sixteen_racing_starters_wins(
    at_path: str,
    sock_dir: str,
    sock_path: str,
    spawn: Callable[..., Any],
    run_traced: Callable[..., Any],
) -> None:
    """Checklist 5 (and 4 under contention): 16 processes released by one
    multiprocessing.Barrier start on the same path: exactly one serves, 15
    get a clean AddressInUseError naming the path, and no stray file (no
    '.us-*' temporary) is left.

    With a stale socket at the path, all racers find it and probe it; strace
    delays each probe's connect() by 3 ms (a delay, not an error) so that
    the racers' "stale -> remove it" steps overlap, as they do when several
    instances of a crashed service restart at once.  Whoever removes the
    stale file must never remove a live socket another racer just put there
    (python/cpython#121252: the first server keeps running, unreachable)."""
    if at_path == "a stale socket":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(sock_path)
        delay = ["--seccomp-bpf", "-e", "trace=connect", "-e", "inject=connect:delay_exit=3000"]
        proc = run_traced(delay, _RACE, sock_path)
    else:
        proc = spawn(_RACE, sock_path, text=False)
    result = child_json(proc, timeout=60)
    kinds = [o[0] for o in result["outcomes"]]
    assert kinds.count("serving") == 1, result["outcomes"]
    assert kinds.count("in use") == 15, result["outcomes"]
    for kind, err, msg in result["outcomes"]:
        if kind == "in use":
            assert err == errno.EADDRINUSE and sock_path in msg
    assert result["listing"] == ["s.sock"]
    assert result["echoed"] == "who wins"
    assert result["exitcodes"] == [0] * 16
    assert result["after"] == []  # the winner removed its file on close
    assert os.listdir(sock_dir) == []


_TAKEOVER = textwrap.dedent(
    """
    import os, sys
    from unixsrv import AddressInUseError, Server, ServerConfig
    path, tag, when = sys.argv[1:4]

    def handler(conn):
        conn.write(tag.encode())

    srv = Server(ServerConfig(path=path), handler)
    print("go", os.getpid(), flush=True)
    if when == "on request":
        sys.stdin.readline()
    try:
        srv.start()
    except AddressInUseError:
        print("in use", flush=True)
    else:
        print("serving", flush=True)
    sys.stdin.read()
    srv.close()
    """
)


@pytest.mark.linux(STRACE)
def test_stale_socket_removal_never_removes_a_live_successor(
    sock_path: str, spawn: Callable[..., Any], run_traced: Callable[..., Any]
) -> None:
    """Checklist 4 and 5 (python/cpython#121252; docs/design.md: "an existing path is
    never blindly deleted: a live server there -> AddressInUseError"): two
    starters B and A both find the same stale socket.  B decides "stale,
    remove it" and is held just before its unlink (strace delays B's first
    unlinkat by 1.5 s; a delay, not an error).  Meanwhile A removes the stale
    file and starts serving.  When B goes on, it must not delete A's live
    socket: exactly one of them serves, and the path leads to that one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(sock_path)  # stale: nobody listens
    a = spawn(_TAKEOVER, sock_path, "A", "on request", text=False, stdin=subprocess.PIPE)
    assert read_line(a).startswith("go")
    hold = [
        "--seccomp-bpf",
        "-e",
        "trace=unlinkat",
        "-e",
        "inject=unlinkat:delay_enter=1500000:when=1",
    ]
    b = run_traced(hold, _TAKEOVER, sock_path, "B", "at once", stdin=subprocess.PIPE)
    b_pid = int(read_line(b).split()[1])

    def b_held_or_done() -> bool:
        # 't' = stopped by strace, i.e. held at its unlinkat (the only traced
        # call); or B already answered (an implementation that never unlinks)
        return proc_stat(b_pid)[0] == "t" or bool(select.select([b.stdout], [], [], 0)[0])

    wait_until(b_held_or_done)
    assert a.stdin is not None and b.stdin is not None
    a.stdin.write(b"start\n")
    a.stdin.flush()
    outcome = {"A": read_line(a), "B": read_line(b)}
    winners = [name for name, what in outcome.items() if what == "serving"]
    assert len(winners) == 1, f"{outcome}: two servers believe they own {sock_path}"
    assert set(outcome.values()) == {"serving", "in use"}
    with connect(sock_path) as s:
        assert recv_until_eof(s) == winners[0].encode()
    for proc in (a, b):
        proc.stdin.close()
        assert proc.wait(DEADLINE) == 0


# ---------------------------------------------------------------------------- 6: unlink on close


def test_close_removes_the_socket_file(
    sock_dir: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 6a (python/cpython#111246): a normal close removes the file."""
    srv = make_server(sock_path, echo_handler)
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    srv.close()
    assert not os.path.lexists(sock_path)
    assert os.listdir(sock_dir) == []


@pytest.mark.parametrize("stop", ["close", "shutdown"])
def test_close_keeps_a_foreign_socket_at_the_path(
    stop: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 6b (benoitc/gunicorn#476): if our file was replaced by
    another server's socket, stopping must not remove the other one."""
    srv = make_server(sock_path, echo_handler)
    os.unlink(sock_path)
    with listening_socket(sock_path, 4):
        ino = os.lstat(sock_path).st_ino
        getattr(srv, stop)()
        assert os.lstat(sock_path).st_ino == ino
        with connect(sock_path):
            pass  # the foreign server still listens there


#: System call numbers of lstat(2) and newfstatat(2) (what lstat() becomes
#: in glibc >= 2.33), the calls strace holds in the test below.
_STAT_SYSCALLS = {"x86_64": {"6", "262"}, "aarch64": {"79"}}.get(platform.machine(), set())


def _stat_stops(pid: int) -> set[tuple[str, str]]:
    """(tid, /proc/<pid>/task/<tid>/syscall line) of each thread of ``pid``
    stopped by its tracer ('t') inside an lstat/newfstatat call."""
    stops = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if proc_stat(pid, int(tid))[0] != "t":
                continue
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                line = f.read().strip()
        except OSError:
            continue
        if line.split()[0] in _STAT_SYSCALLS:
            stops.add((tid, line))
    return stops


def _held_at_stat(pid: int) -> bool:
    """True if a thread of ``pid`` is held by strace in an lstat call: the
    same stop (thread, call and arguments) seen twice 50 ms apart.  strace
    -f stops every thread briefly at every system call it sees; only the
    injected delay lasts that long."""
    first = _stat_stops(pid)
    if not first:
        return False
    time.sleep(0.05)  # tells a held call from a passing stop; synchronises nothing
    return bool(first & _stat_stops(pid))


def _listeners_of(pid: int) -> set[int]:
    """The sockfs inodes of the listening AF_UNIX sockets that process
    ``pid`` has open (/proc/net/unix: flags __SO_ACCEPTCON).  Not matched by
    path: /proc lists the name bind() used, unixsrv's temporary name."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            held.add(int(target[len("socket:[") : -1]))
    listening = set()
    with open(f"/proc/{pid}/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 7 and int(fields[3], 16) & 0x10000:
                listening.add(int(fields[6]))
    return held & listening


@pytest.mark.linux(STRACE + "; /proc/<pid>/net/unix")
def test_close_keeps_a_successor_bound_during_the_check(
    sock_path: str, run_traced: Callable[..., Any]
) -> None:
    """Checklist 6b (libuv unlinks *before* close() because "the other way
    around introduces a race where our process unlinks a socket ... just
    created by another process"): our file was deleted behind our back, and
    while we close, a successor binds the path.  strace holds the closing
    server for 1.5 s at its lstat of the path (a delay, not an error); the
    test asserts that the server is held there when the successor binds,
    so the scenario is reached every time.  At that moment the server's
    listener is still open, which is what makes the (dev, ino) check sound:
    the open listener pins our inode, so the successor's socket has another
    inode number (asserted; once our listener were closed, ext4 could hand
    the successor our number and the check would remove it).  The
    successor's socket survives our close and still accepts."""
    hold = [
        "-P",
        sock_path,
        "-e",
        "trace=newfstatat,lstat",
        "-e",
        "inject=newfstatat,lstat:delay_enter=1500000:when=1",
    ]
    srv = run_traced(hold, _CLOSE_ON_REQUEST, sock_path, stdin=subprocess.PIPE)
    pid = int(read_line(srv).split()[1])
    ours = os.lstat(sock_path).st_ino
    listener = _listeners_of(pid)
    assert len(listener) == 1
    os.unlink(sock_path)  # someone removes our file; we keep listening
    assert srv.stdin is not None
    srv.stdin.write(b"close\n")
    srv.stdin.flush()
    wait_until(lambda: _held_at_stat(pid))
    with listening_socket(sock_path, 4):  # the successor
        theirs = os.lstat(sock_path).st_ino
        assert _held_at_stat(pid), "the server was not held at its check while the successor bound"
        assert _listeners_of(pid) == listener  # our listener is open during the check
        assert theirs != ours
        assert read_line(srv) == "closed"
        assert _listeners_of(pid) == set()
        assert os.path.lexists(sock_path), (
            f"our close() removed the successor's socket (inode {theirs})"
        )
        assert os.lstat(sock_path).st_ino == theirs
        with connect(sock_path):
            pass
    srv.stdin.close()
    assert srv.wait(DEADLINE) == 0


def test_close_when_the_file_is_already_gone(
    sock_dir: str, sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 6c (MagicStack/uvloop#28): the file was removed behind our
    back; close() raises nothing and creates nothing."""
    srv = make_server(sock_path, echo_handler)
    os.unlink(sock_path)
    srv.close()
    assert not srv.is_running
    assert os.listdir(sock_dir) == []


# ---------------------------------------------------------------------------- 8: fork


def test_forked_child_closing_the_server_keeps_the_parents_socket(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 8 (benoitc/gunicorn#1298): a forked child that closes (and
    shuts down) its inherited Server removes nothing; the parent's file and
    its open connections keep working and it answers 100 requests after."""
    srv = make_server(sock_path, echo_handler)
    ino = os.lstat(sock_path).st_ino
    early = connect(sock_path)
    try:
        echo(early, b"before")
        pid = fork_quietly()
        if pid == 0:  # child: only fork-safe work, then _exit
            code = 1
            try:
                srv.close()
                srv.shutdown(timeout=1.0)
                code = 0 if os.path.exists(sock_path) else 3
            finally:
                os._exit(code)
        assert reap(pid) == 0
        assert os.lstat(sock_path).st_ino == ino
        assert srv.is_running
        echo(early, b"after")
        for i in range(100):
            echo_once(sock_path, b"request %d" % i)
    finally:
        early.close()


# ---------------------------------------------------------------------------- 9, 10: path syntax


@pytest.mark.parametrize(
    "layout",
    [
        "long file name",
        pytest.param(
            "long directory",
            marks=pytest.mark.linux(
                "/proc/self/fd/N/ to bind in a directory too deep for sun_path"
            ),
        ),
    ],
)
def test_path_of_107_bytes_binds(
    layout: str, sock_dir: str, make_server: Callable[..., Server]
) -> None:
    """Checklist 9: a path of SUN_PATH_MAX bytes (sun_path - 1: 107 on
    Linux, 103 on macOS) works, also when the directory itself is so deep
    that a temporary name beside the socket would not fit (Linux: reached
    through /proc/self/fd); after close nothing is left."""
    if layout == "long file name":
        directory = sock_dir
        path = os.path.join(directory, "n" * (SUN_PATH_MAX - len(sock_dir) - 1))
    else:
        directory = os.path.join(sock_dir, "d" * (SUN_PATH_MAX - 2 - len(sock_dir) - 1))
        os.mkdir(directory)
        path = os.path.join(directory, "s")
    assert len(os.fsencode(path)) == SUN_PATH_MAX
    srv = make_server(path, echo_handler)
    assert os.listdir(directory) == [os.path.basename(path)]
    echo_once(path, b"max")
    srv.close()
    assert os.listdir(directory) == []


@pytest.mark.parametrize("as_bytes", [False, True])
def test_path_of_108_bytes_is_rejected_with_nothing_created(as_bytes: bool, sock_dir: str) -> None:
    """Checklist 9 (python/cpython#93852): SUN_PATH_MAX + 1 bytes (108 on
    Linux, 104 on macOS) never fit sun_path: InvalidPathError (a ValueError)
    when the config is built, nothing on disk."""
    path = os.path.join(sock_dir, "n" * (SUN_PATH_MAX + 1 - len(sock_dir) - 1))
    assert len(path) == SUN_PATH_MAX + 1
    with pytest.raises(InvalidPathError) as info:
        ServerConfig(path=os.fsencode(path) if as_bytes else path)
    assert isinstance(info.value, ValueError)
    assert os.listdir(sock_dir) == []


@pytest.mark.parametrize("path", ["{d}/x\0y", b"{d}/x\0y", "{d}/s.sock\0"])
def test_embedded_nul_is_rejected(path: str | bytes, sock_dir: str) -> None:
    """Checklist 10 (benoitc/gunicorn#2699): NUL inside a filesystem path is
    rejected (ValueError), nothing on disk."""
    if isinstance(path, bytes):
        full: str | bytes = path.replace(b"{d}", os.fsencode(sock_dir))
    else:
        full = path.format(d=sock_dir)
    with pytest.raises(InvalidPathError) as info:
        ServerConfig(path=full)
    assert isinstance(info.value, ValueError)
    assert os.listdir(sock_dir) == []


@pytest.mark.linux("abstract socket names")
def test_abstract_names_are_length_exact(make_server: Callable[..., Server]) -> None:
    """Checklist 10 (MagicStack/uvloop#528): b'\\0n' and b'\\0n\\0' are
    different abstract names: two independent listeners, each reached by its
    exact name; a second start on one of them is AddressInUseError."""
    name = b"\0us-len-" + os.urandom(6).hex().encode()
    make_server(name, tagged(b"one"))
    make_server(name + b"\0", tagged(b"two"))
    for addr, tag in ((name, b"one"), (name + b"\0", b"two"), (name, b"one")):
        with connect(addr) as s:
            assert recv_until_eof(s) == tag
    third = make_server(name, echo_handler, start=False)
    with pytest.raises(AddressInUseError):
        third.start()


# ---------------------------------------------------------------------------- 11-13, 16: mode

_MODES = textwrap.dedent(
    """
    import json, os, stat, sys
    from unixsrv import Server, ServerConfig
    from unixsrv.echo import echo_handler
    path, umask = sys.argv[1], int(sys.argv[2], 8)
    os.umask(umask)
    modes = {}
    for mode in (0o600, 0o640, 0o660, 0o666, 0o777, 0o700, 0o000, None):
        srv = Server(ServerConfig(path=path, mode=mode), echo_handler)
        srv.start()
        try:
            modes[str(mode)] = stat.S_IMODE(os.lstat(path).st_mode)
        finally:
            srv.close()
    print(json.dumps(dict(modes=modes, umask_after=os.umask(umask))))
    """
)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_mode_is_exact_whatever_the_umask(
    umask: int, sock_path: str, spawn: Callable[..., Any]
) -> None:
    """Checklist 12 and 16 (docs/design.md: default 0o770, golib's): under umask
    000, 022 and 077 the file gets exactly the configured mode, the default
    is 0o770, and the process umask is unchanged afterwards (checklist 13)."""
    result = child_json(spawn(_MODES, sock_path, f"{umask:o}", text=False))
    expected = {str(m): m for m in (0o600, 0o640, 0o660, 0o666, 0o777, 0o700, 0o000)}
    expected["None"] = 0o770
    assert {k: oct(v) for k, v in result["modes"].items()} == {
        k: oct(v) for k, v in expected.items()
    }
    assert result["umask_after"] == umask


def test_default_mode_in_process(sock_path: str, make_server: Callable[..., Server]) -> None:
    """Checklist 16 as docs/design.md states it: no mode given -> 0o770."""
    make_server(sock_path, echo_handler)
    assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o770


_UMASK_UNTOUCHED = textwrap.dedent(
    """
    import json, os, stat, sys, threading
    from unixsrv import Server, ServerConfig
    from unixsrv.echo import echo_handler
    path, files = sys.argv[1], sys.argv[2]
    os.umask(0o022)
    stop = threading.Event()
    made = []

    def creator():
        i = 0
        while not stop.is_set():
            p = os.path.join(files, "f%d" % i)
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o666))
            made.append(stat.S_IMODE(os.lstat(p).st_mode))
            os.unlink(p)
            i += 1

    t = threading.Thread(target=creator)
    t.start()
    socket_modes = set()
    try:
        for _ in range(100):
            srv = Server(ServerConfig(path=path, mode=0o600), echo_handler)
            srv.start()
            socket_modes.add(stat.S_IMODE(os.lstat(path).st_mode))
            srv.close()
    finally:
        stop.set()
        t.join()
    print(json.dumps(dict(file_modes=sorted(set(made)), files=len(made),
                          socket_modes=sorted(socket_modes), umask_after=os.umask(0o022))))
    """
)


def test_process_umask_is_never_changed(
    sock_dir: str, sock_path: str, spawn: Callable[..., Any]
) -> None:
    """Checklist 13: a library must not touch the process-wide umask: a
    thread creating files while 100 servers start sees 0o644 every time,
    every socket gets 0o600, and the umask is 022 afterwards."""
    files = os.path.join(sock_dir, "files")
    os.mkdir(files)
    result = child_json(spawn(_UMASK_UNTOUCHED, sock_path, files, text=False), timeout=60)
    assert result["files"] > 0
    assert result["file_modes"] == [0o644]
    assert result["socket_modes"] == [0o600]
    assert result["umask_after"] == 0o022


_NEVER_LOOSE = textwrap.dedent(
    """
    import json, os, select, socket, stat, sys
    from unixsrv import Server, ServerConfig
    from unixsrv.echo import echo_handler
    directory = sys.argv[1]
    path = os.path.join(directory, "s.sock")
    os.umask(0)                      # the kernel's own mode would be 0777
    stop_r, stop_w = os.pipe()
    res_r, res_w = os.pipe()
    seen_r, seen_w = os.pipe()
    pid = os.fork()                  # still single-threaded here
    if pid == 0:
        code = 1
        try:
            os.close(stop_w); os.close(res_r); os.close(seen_r)
            os.setgroups([]); os.setgid(1000); os.setuid(1000)
            connected, denied, attempts, told = [], 0, 0, False
            while not select.select([stop_r], [], [], 0)[0]:
                for name in os.listdir(directory):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.setblocking(False)
                    attempts += 1
                    try:
                        s.connect(os.path.join(directory, name))
                    except PermissionError:
                        denied += 1
                        if not told:
                            os.write(seen_w, b"x")
                            told = True
                    except BlockingIOError:   # backlog full: permission was granted
                        connected.append(name)
                    except (FileNotFoundError, ConnectionRefusedError):
                        pass
                    else:
                        connected.append(name)
                    finally:
                        s.close()
                    del connected[10:]
            os.write(res_w, json.dumps(dict(connected=connected, denied=denied, attempts=attempts)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(stop_r); os.close(res_w); os.close(seen_w)
    modes = set()
    srv = None
    try:
        for _ in range(200):
            srv = Server(ServerConfig(path=path, mode=0o600), echo_handler)
            srv.start()
            modes.add(stat.S_IMODE(os.lstat(path).st_mode))
            srv.close()
        srv = Server(ServerConfig(path=path, mode=0o600), echo_handler)
        srv.start()
        seen = bool(select.select([seen_r], [], [], 10)[0])
        final_mode = stat.S_IMODE(os.lstat(path).st_mode)
    finally:
        os.close(stop_w)
        raw = b""
        while chunk := os.read(res_r, 65536):
            raw += chunk
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if srv is not None:
            srv.close()
    child = json.loads(raw)
    print(json.dumps(dict(child=child, child_status=status, seen=seen, modes=sorted(modes),
                          final_mode=final_mode, umask_after=os.umask(0))))
    """
)


@pytest.mark.root
@pytest.mark.linux(STRACE)
def test_never_connectable_with_a_looser_mode(
    sock_dir: str, run_traced: Callable[..., Any]
) -> None:
    """Checklist 11 (golang/go#11822; bind -> chmod -> listen): with umask 0
    and mode 0o600, a uid-1000 process that keeps connecting to every name in
    the directory (the socket and any temporary) during 200 start/close
    cycles never gets in; it is denied (EACCES), never let through.

    strace delays every chmod by 10 ms (a delay, not an error), so if the
    socket listened before its mode was set, that window would be wide
    enough for the uid-1000 process to hit it."""
    os.chmod(sock_dir, 0o755)  # uid 1000 may look and try, the socket's mode decides
    delay = [
        "--seccomp-bpf",
        "-e",
        "trace=chmod,fchmodat",
        "-e",
        "inject=chmod,fchmodat:delay_enter=10000",
    ]
    result = child_json(run_traced(delay, _NEVER_LOOSE, sock_dir), timeout=60)
    assert result["child_status"] == 0
    assert result["child"]["connected"] == []
    assert result["seen"] and result["child"]["denied"] > 0
    assert result["modes"] == [0o600] and result["final_mode"] == 0o600
    assert result["umask_after"] == 0


# ---------------------------------------------------------------------------- 14, 15: group


@pytest.mark.root
@pytest.mark.parametrize("gid", [65536, 2**31, 4294967294])
def test_large_gids_stick(gid: int, sock_path: str, make_server: Callable[..., Server]) -> None:
    """Checklist 14 (golib spec d: golib caps gids at 32767): gids beyond
    the 16-bit and 31-bit ranges are applied as given; the server serves."""
    make_server(sock_path, echo_handler, group=gid, mode=0o660)
    st = os.lstat(sock_path)
    assert st.st_gid == gid
    assert stat.S_IMODE(st.st_mode) == 0o660
    echo_once(sock_path, b"gid")


# Forks a child that becomes uid/gid 1000 and tries one start() at
# <directory>/s.sock with group <argv[2]> ("none" = no group); prints what
# happened as JSON.
_START_AS_UID_1000 = textwrap.dedent(
    """
    import json, os, sys
    from unixsrv import Server, ServerConfig
    from unixsrv.echo import echo_handler
    directory = sys.argv[1]
    group = None if sys.argv[2] == "none" else int(sys.argv[2])
    path = os.path.join(directory, "s.sock")
    r, w = os.pipe()
    pid = os.fork()                  # single-threaded here
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([]); os.setgid(1000); os.setuid(1000)
            srv = Server(ServerConfig(path=path, group=group), echo_handler)
            fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
            base = len(os.listdir(fd_dir))
            out = dict(uid=os.getuid())
            try:
                srv.start()
            except BaseException as exc:
                out.update(type=type(exc).__name__, errno=getattr(exc, "errno", None), msg=str(exc),
                           permission=isinstance(exc, PermissionError))
            else:
                out.update(type=None)
                srv.close()
            out.update(fds_before=base, fds_after=len(os.listdir(fd_dir)),
                       listing=sorted(os.listdir(directory)), running=srv.is_running)
            os.write(w, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    raw = b""
    while chunk := os.read(r, 65536):
        raw += chunk
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    print(json.dumps(dict(child=json.loads(raw), status=status)))
    """
)


@pytest.mark.root
def test_non_member_group_is_permission_error_with_nothing_left(
    sock_dir: str, spawn: Callable[..., Any]
) -> None:
    """Checklist 14 and 15: uid 1000 asking for a group it is not in gets
    PermissionError (EPERM) naming the path; no socket file or temporary is
    left and the fd count is back to where it was."""
    os.chown(sock_dir, 1000, 1000)
    result = child_json(spawn(_START_AS_UID_1000, sock_dir, "4242", text=False))
    assert result["status"] == 0
    child = result["child"]
    assert child["uid"] == 1000
    assert child["type"] == "PermissionError" and child["permission"], child
    assert child["errno"] == errno.EPERM
    assert os.path.join(sock_dir, "s.sock") in child["msg"]
    assert child["listing"] == []
    assert child["fds_after"] == child["fds_before"]
    assert child["running"] is False


_FAILING_START = textwrap.dedent(
    """
    import json, os, sys
    from unixsrv import Server, ServerConfig
    from unixsrv.echo import echo_handler
    path, group = sys.argv[1], int(sys.argv[2])
    srv = Server(ServerConfig(path=path, mode=0o660, group=group), echo_handler)
    base = len(os.listdir("/proc/self/fd"))
    out = {}
    for attempt in range(3):
        try:
            srv.start()
        except OSError as exc:
            out.setdefault("errors", []).append([type(exc).__name__, exc.errno, str(exc)])
        else:
            srv.close()
            out.setdefault("errors", []).append(None)
    out.update(fds_before=base, fds_after=len(os.listdir("/proc/self/fd")),
               listing=sorted(os.listdir(os.path.dirname(path))))
    print(json.dumps(out), flush=True)
    """
)


@pytest.mark.parametrize(
    ("syscalls", "what"),
    [("chmod,fchmodat", "chmod"), ("fchownat,lchown,chown", "chown")],
)
@pytest.mark.linux(STRACE)
def test_chmod_or_chown_failure_cleans_up(
    syscalls: str,
    what: str,
    sock_dir: str,
    sock_path: str,
    run_traced: Callable[..., Any],
    spawn: Callable[..., Any],
) -> None:
    """Checklist 15: when chmod or chown of the new socket fails (strace
    injects EPERM), start() raises PermissionError naming the path, leaves
    no socket file or temporary, and closes every fd it opened.  The group
    asked for is the process's own, which any user may chown to: the same
    child without the injection starts (and closes) three times, so the
    failure is the injected one, as root and not."""
    gid = str(os.getgid())
    control = child_json(spawn(_FAILING_START, sock_path, gid, text=False), timeout=30)
    assert control["errors"] == [None] * 3, control
    assert control["listing"] == [] and control["fds_after"] == control["fds_before"]
    proc = run_traced(["-e", f"inject={syscalls}:error=EPERM"], _FAILING_START, sock_path, gid)
    result = child_json(proc, timeout=30)
    assert result["errors"] == [["PermissionError", errno.EPERM, result["errors"][0][2]]] * 3, (
        what,
        result,
    )
    assert sock_path in result["errors"][0][2]
    assert result["listing"] == []
    assert result["fds_after"] == result["fds_before"]
    assert os.listdir(sock_dir) == []


@pytest.mark.root
def test_probe_denied_is_refused_never_unlinked(
    sock_dir: str, sock_path: str, spawn: Callable[..., Any]
) -> None:
    """Checklist 3 (EACCES from the liveness probe is a reason to refuse,
    never to unlink): uid 1000 starts where root left a stale 0600 socket in
    a directory uid 1000 owns (so it could unlink it); the probe is denied,
    start() raises PermissionError naming the path and the file stays."""
    os.chown(sock_dir, 1000, 1000)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(sock_path)
    os.chmod(sock_path, 0o600)
    before = snapshot(sock_dir)
    result = child_json(spawn(_START_AS_UID_1000, sock_dir, "none", text=False))
    child = result["child"]
    assert result["status"] == 0
    assert child["type"] == "PermissionError" and child["errno"] == errno.EACCES, child
    assert sock_path in child["msg"]
    assert child["fds_after"] == child["fds_before"]
    assert snapshot(sock_dir) == before


@pytest.mark.parametrize("gid", [-1, -2, 4294967295, 2**32, True, False, 1.5])
def test_bad_gids_are_rejected(gid: Any, sock_dir: str, sock_path: str) -> None:
    """Checklist 14 (docs/design.md: gid 0..4294967294; -1 only means "process group"
    in golib's from_mapping): out-of-range values, bool and non-integers are
    a ConfigError (ValueError) when the config is built; nothing on disk."""
    with pytest.raises(ValueError):
        ServerConfig(path=sock_path, group=gid)
    assert os.listdir(sock_dir) == []
