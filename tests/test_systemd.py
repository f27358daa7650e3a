"""systemd integration: inherited listening sockets (fd=, from_systemd,
systemd-socket-activate) and sd_notify (READY, WATCHDOG, STATUS, STOPPING).

Nothing of systemd is mocked: the notifications go to a real datagram socket
the test binds and names in $NOTIFY_SOCKET (as systemd does), and the
activation test runs the real systemd-socket-activate where it is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import unixsrv
from conftest import (
    DEADLINE,
    LINUX,
    Echo,
    connect,
    echo,
    echo_handler,
    echo_once,
    env_without_preload,
    finish,
    is_listening,
    wait_until,
)
from unixsrv import ConfigError, InvalidPathError, Server, ServerConfig

SRC = os.path.dirname(os.path.dirname(os.path.abspath(unixsrv.__file__)))


class NotifySocket:
    """The manager's end of sd_notify: a datagram socket; each message with
    its arrival time (monotonic).  On Linux ``senders`` collects the pid of
    every message's sender (SO_PASSCRED, unix(7)), as systemd checks them."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.senders: set[int] = set()
        if LINUX:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def next(self, timeout: float = DEADLINE) -> tuple[float, dict[str, str]]:
        """The next message as {KEY: value}; TimeoutError if none comes."""
        self.sock.settimeout(timeout)
        data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        for level, kind, cred in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                self.senders.add(int.from_bytes(cred[:4], sys.byteorder))  # struct ucred's pid
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        return time.monotonic(), fields

    def drain(self) -> None:
        """Drop the messages already queued."""
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self.sock.recv(4096)

    def wait_for(self, key: str, timeout: float = DEADLINE) -> tuple[float, dict[str, str]]:
        end = time.monotonic() + timeout
        while True:
            at, fields = self.next(max(end - time.monotonic(), 0.001))
            if key in fields:
                return at, fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(sock_dir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    path = os.path.join(sock_dir, "notify")
    ns = NotifySocket(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield ns
    ns.close()


@pytest.fixture
def listener(sock_path: str) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)
    os.chmod(sock_path, 0o640)
    s.listen()
    yield s
    s.close()


# --------------------------------------------------------------------------- fd=


def test_fd_serves_and_never_touches_the_file(
    listener: socket.socket, sock_path: str, model: str
) -> None:
    """Served as given; stop leaves the file (mode included) and the
    inherited fd listening, so the server can start again on it."""
    before = os.stat(sock_path)
    cfg = ServerConfig(path=sock_path, fd=listener.fileno())
    srv = Server(cfg, echo_handler) if model == "blocking" else Server(cfg, protocol=Echo)
    for _ in range(2):
        srv.start()
        s = connect(sock_path)
        try:
            echo(s, b"hello")
        finally:
            s.close()
        srv.shutdown(DEADLINE)
        after = os.stat(sock_path)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
        assert is_listening(listener.fileno())
    assert srv.stats()["accepted"] == 2


def test_fd_config_has_no_mode_or_group(listener: socket.socket, sock_path: str) -> None:
    cfg = ServerConfig(path=sock_path, fd=listener.fileno())
    assert (
        cfg.mode == 0 and cfg.group is None and cfg.fd == listener.fileno()
    )  # as for an abstract name
    with pytest.raises(ConfigError, match="never chmod-ed"):
        ServerConfig(path=sock_path, fd=listener.fileno(), mode=0o600)
    with pytest.raises(ConfigError, match="never chmod-ed"):
        ServerConfig(path=sock_path, fd=listener.fileno(), group=0)


def test_fd_path_must_be_the_bound_address(listener: socket.socket, sock_dir: str) -> None:
    with pytest.raises(InvalidPathError, match="bound to"):
        ServerConfig(path=os.path.join(sock_dir, "other.sock"), fd=listener.fileno())


@pytest.mark.parametrize("kind", ["not listening", "datagram", "tcp", "file", "closed"])
def test_fd_must_be_a_listening_unix_stream_socket(sock_dir: str, kind: str) -> None:
    path = os.path.join(sock_dir, "x.sock")
    if kind == "file":
        fd = os.open(sock_dir, os.O_RDONLY)
        obj: Any = None
    else:
        family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
        obj = socket.socket(family, socket.SOCK_DGRAM if kind == "datagram" else socket.SOCK_STREAM)
        obj.bind(("127.0.0.1", 0) if kind == "tcp" else path)
        if kind == "tcp":
            obj.listen()
        fd = obj.fileno()
    if kind == "closed":
        obj.close()
    try:
        with pytest.raises(ConfigError, match=f"fd {fd}"):
            ServerConfig(path=path, fd=fd)
    finally:
        if obj is None:
            os.close(fd)
        else:
            obj.close()


# --------------------------------------------------------------------------- from_systemd (the $LISTEN_* protocol)

FROM_SYSTEMD = """
import json, os, socket, sys
from unixsrv import ConfigError, ServerConfig
socks = []
for name in ("a.sock", "b.sock"):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.path.join(sys.argv[1], name)); s.listen(); socks.append(s)
os.dup2(socks[0].fileno(), 3); os.dup2(socks[1].fileno(), 4)
out = {}
def activate(pid, names="first:second"):
    os.environ.update(LISTEN_FDS="2", LISTEN_PID=str(pid), LISTEN_FDNAMES=names)
for case, pid, name in [("by name", os.getpid(), "second"), ("no name", os.getpid(), None),
                        ("unknown name", os.getpid(), "third"), ("other pid", 1, "first")]:
    activate(pid)
    try:
        cfg = ServerConfig.from_systemd(name, idle_timeout=5)
        out[case] = [cfg.fd, os.path.basename(cfg.path), cfg.sd_notify, cfg.idle_timeout, cfg.mode]
    except ConfigError as exc:
        out[case] = "ConfigError: " + str(exc)
    out[case + " env"] = sorted(k for k in os.environ if k.startswith("LISTEN_"))
try:
    ServerConfig.from_systemd()
except ConfigError as exc:
    out["not activated"] = str(exc)
print(json.dumps(out))
"""


def test_from_systemd_parses_listen_fds(
    sock_dir: str, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    rc, out, err = finish(spawn(FROM_SYSTEMD, sock_dir))
    assert rc == 0, err
    got = json.loads(out)
    assert got["by name"] == [4, "b.sock", True, 5.0, 0]  # mode 0: no file of ours
    assert "choose one by name" in got["no name"]
    assert "third" in got["unknown name"]
    assert "not this process" in got["other pid"]
    assert "not socket-activated" in got["not activated"]
    # sd_listen_fds(3) with unset_environment: gone after every attempt
    assert all(
        got[case + " env"] == [] for case in ("by name", "no name", "unknown name", "other pid")
    )


# --------------------------------------------------------------------------- sd_notify


def test_ready_status_stopping(notify: NotifySocket, sock_path: str) -> None:
    srv = Server(ServerConfig(path=sock_path, sd_notify=True), protocol=Echo)
    srv.start()
    try:
        _at, fields = notify.next()
        assert fields["READY"] == "1" and "0 open" in fields["STATUS"]
        s = connect(sock_path)
        echo(s, b"x")
    finally:
        srv.shutdown(DEADLINE)
    s.close()
    _at, fields = notify.wait_for("STOPPING")
    assert fields["STOPPING"] == "1"


def test_workers_notify_from_the_parent_only(
    notify: NotifySocket, sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Server(workers=2): the parent alone notifies: READY=1 once both
    workers accept, WATCHDOG=1 pings from the supervisor, RELOADING=1 (with
    MONOTONIC_USEC, as Type=notify-reload wants) then READY=1 around
    reload(), STOPPING=1 at shutdown."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    srv = Server(ServerConfig(path=sock_path, sd_notify=True), protocol=Echo, workers=2)
    srv.start()
    workers = {w["pid"] for w in srv.worker_stats()}
    try:
        _at, fields = notify.wait_for("READY")
        assert fields["READY"] == "1" and "0 open" in fields["STATUS"]
        assert [w["state"] for w in srv.worker_stats()] == ["ready", "ready"]
        pings = [notify.wait_for("WATCHDOG")[0] for _ in range(3)]
        assert pings[-1] - pings[0] < DEADLINE
        with connect(sock_path) as s:
            echo(s, b"x")
            wait_until(lambda: "1 open" in notify.next()[1].get("STATUS", ""))
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        srv.reload()
        _at, fields = notify.wait_for("RELOADING")
        assert (
            before
            <= int(fields["MONOTONIC_USEC"])
            <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )
        assert notify.wait_for("READY")[1]["READY"] == "1"
        workers |= {w["pid"] for w in srv.worker_stats()}
    finally:
        srv.shutdown(DEADLINE)
    assert notify.wait_for("STOPPING")[1]["STOPPING"] == "1"
    if LINUX:
        assert notify.senders == {os.getpid()} and not notify.senders & workers


def test_no_notifications_unless_asked(notify: NotifySocket, sock_path: str) -> None:
    with Server(ServerConfig(path=sock_path), protocol=Echo):
        s = connect(sock_path)
        try:
            echo(s, b"x")
        finally:
            s.close()
    with pytest.raises(socket.timeout):
        notify.next(0.3)


@pytest.mark.linux("abstract socket names")
def test_abstract_notify_socket(sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"unixsrv-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    ns = NotifySocket("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        with Server(ServerConfig(path=sock_path, sd_notify=True), protocol=Echo):
            assert ns.next()[1]["READY"] == "1"
    finally:
        ns.close()


class Blocker(Echo):
    """data_received blocks the loop thread until `release` is set."""

    entered = threading.Event()
    release = threading.Event()

    def data_received(self, data: bytes) -> None:
        Blocker.entered.set()
        Blocker.release.wait(DEADLINE)
        super().data_received(data)


def test_watchdog_pings_at_half_the_timeout_and_stop_while_blocked(
    notify: NotifySocket, sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    period = 0.1
    monkeypatch.setenv("WATCHDOG_USEC", str(int(2 * period * 1e6)))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    Blocker.entered.clear()
    Blocker.release.clear()
    srv = Server(ServerConfig(path=sock_path, sd_notify=True), protocol=Blocker)
    srv.start()
    s = connect(sock_path)
    try:
        ready_at, _ = notify.wait_for("READY")
        pings = [notify.wait_for("WATCHDOG")[0] for _ in range(5)]
        gaps = [b - a for a, b in zip([ready_at, *pings], pings, strict=False)]
        # The loop's timer never fires early (it rounds up) and is late only
        # by scheduling; the receive times add jitter to single gaps, not to
        # their mean.
        assert period * 0.9 <= sum(gaps) / len(gaps) <= period * 3, gaps
        assert min(gaps) >= period * 0.5, gaps
        s.sendall(b"block")
        assert Blocker.entered.wait(DEADLINE)
        blocked_at = time.monotonic()
        # sendto(2) on a Unix datagram socket queues at the receiver before it
        # returns: whatever the loop sent before the block is here already.
        notify.drain()
        # A loop stuck in a callback sends nothing: ten periods of silence.
        with pytest.raises(TimeoutError):
            notify.next(10 * period)
        Blocker.release.set()
        assert s.recv(16) == b"block"
        resumed_at, _ = notify.wait_for("WATCHDOG")
        assert resumed_at - blocked_at >= 10 * period
    finally:
        Blocker.release.set()
        s.close()
        srv.close()


# --------------------------------------------------------------------------- systemd-socket-activate + unixsrv serve


@pytest.mark.skipif(not LINUX, reason="systemd-socket-activate is Linux-only")
@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed",
)
def test_cli_under_systemd_socket_activate(
    sock_dir: str, sock_path: str, notify: NotifySocket
) -> None:
    """unixsrv serve on the socket systemd-socket-activate passes: READY=1,
    watchdog pings, connections served, STOPPING=1 on SIGTERM, the socket
    file left where it was."""
    env = {
        "PYTHONPATH": SRC,
        "NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"],
        "WATCHDOG_USEC": "400000",
    }
    # The sanitiser run's settings reach the Python service, not systemd-socket-activate.
    env.update(
        {
            k: os.environ[k]
            for k in ("LD_PRELOAD", "PYTHONMALLOC", "ASAN_OPTIONS")
            if k in os.environ
        }
    )
    argv = ["systemd-socket-activate", "-l", sock_path]
    for key, value in env.items():
        argv += ["-E", f"{key}={value}"]
    argv += [
        sys.executable,
        "-m",
        "unixsrv",
        "--log-level",
        "DEBUG",
        "serve",
        "--echo",
        "--allow-uid",
        str(os.getuid()),
    ]
    own_env = env_without_preload()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=own_env
    )
    try:
        # It binds the path, then starts (execs) the service at the first connection.
        wait_until(lambda: os.path.exists(sock_path) or proc.poll() is not None)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        before = os.stat(sock_path)

        def served() -> bool:
            # The file appears at bind(2), a moment before listen(2): refused until then.
            try:
                echo_once(sock_path, b"hi\n")
            except ConnectionRefusedError:
                return False
            return True

        wait_until(served)
        _at, fields = notify.wait_for("READY")
        assert fields["READY"] == "1"
        assert notify.wait_for("WATCHDOG")[1]["WATCHDOG"] == "1"
        os.kill(proc.pid, signal.SIGTERM)  # systemd-socket-activate exec()s the service: same pid
        assert notify.wait_for("STOPPING")[1]["STOPPING"] == "1"
        rc, _out, err = finish(proc)
        assert rc == 0, err
        assert "denied=0" in err and "accepted=1" in err
        after = os.stat(sock_path)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(DEADLINE)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_cli_socket_name_needs_activation(
    sock_path: str, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    code = "import sys; from unixsrv.cli import main; sys.exit(main(sys.argv[1:]))"
    rc, _out, err = finish(
        spawn(code, "serve", "--socket", sock_path, "--echo", "--socket-name", "echo")
    )
    assert rc == 2 and "--socket-name" in err and "LISTEN_FDS" in err
    assert not os.path.exists(sock_path)
