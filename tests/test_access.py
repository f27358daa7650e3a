"""Who may connect: allow-lists (in C, at accept), authorize=, max_connections_per_uid.

The allow-list tests that need other uids and groups run as root: a forked
child drops to the ids under test with setgroups/setgid/setuid and connects
to the server, which sees exactly those credentials through SO_PEERCRED and
SO_PEERGROUPS (no mock of the kernel).  A denied peer must never reach
Python code, so every callback a server has is counted.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import (
    DEADLINE,
    Echo,
    connect,
    echo,
    echo_handler,
    finish,
    fork_quietly,
    reap,
    wait_until,
)
from unixsrv import (
    ConfigError,
    InvalidGroupError,
    PeerCredentials,
    Server,
    ServerConfig,
)

# Ids no account on the machine uses (the tests need nobody's files).
U1, U2 = 52001, 52002
G1, G2, G9 = 53001, 53002, 53009

# --------------------------------------------------------------------------- helpers


class Seen:
    """Every callback a server has, counted (thread-safe): a denied peer must
    leave all of them untouched."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.uids: list[int] = []  # the peers update_conn saw (SO_PEERCRED)
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self.calls[name] += 1

    def handler(self, conn: Any) -> None:
        self.add("handler")
        echo_handler(conn)

    def factory(self) -> Echo:
        self.add("factory")
        return Echo()

    def update_conn(self, sock: socket.socket) -> None:
        self.add("update_conn")
        _pid, uid, _gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
        with self._lock:
            self.uids.append(uid)

    def on_conn_state(self, local: str, remote: str, state: Any) -> None:
        self.add(f"state {int(state)}")

    def on_error(self, exc: BaseException) -> None:
        self.add("on_error")
        with self._lock:
            self.errors.append(exc)


@pytest.fixture
def open_dir(sock_dir: str) -> str:
    """sock_dir, traversable by the other uids the children switch to."""
    os.chmod(sock_dir, 0o755)
    return sock_dir


@pytest.fixture
def serve(sock_path: str, model: str) -> Iterator[Callable[..., tuple[Server, Seen]]]:
    """``serve(authorize=None, **config_fields)``: a started echo server in
    the model under test with every callback counted; closed at the end."""
    servers: list[Server] = []

    def factory(authorize: Any = None, **fields: Any) -> tuple[Server, Seen]:
        seen = Seen()
        cfg = ServerConfig(path=sock_path, mode=0o777, **fields)
        if model == "blocking":
            srv = Server(cfg, seen.handler, update_conn=seen.update_conn, authorize=authorize)
        else:
            srv = Server(
                cfg, protocol=seen.factory, update_conn=seen.update_conn, authorize=authorize
            )
        srv.on_conn_state(seen.on_conn_state)
        srv.on_error(seen.on_error)
        servers.append(srv)
        srv.start()
        return srv, seen

    yield factory
    for srv in servers:
        srv.close()
        assert srv.wait(DEADLINE)


def outcome(s: socket.socket) -> str:
    """Send b"ping" on a connected client: "admitted" (the echo comes back) or
    "denied" (EOF; or a broken pipe or a reset: the server closed without
    reading, before or after the send)."""
    try:
        s.sendall(b"ping")
        got = s.recv(16)
    except (BrokenPipeError, ConnectionResetError):
        return "denied"
    return "admitted" if got == b"ping" else "denied" if got == b"" else f"unexpected {got!r}"


def connect_as(path: str, uid: int, gid: int, groups: list[int]) -> str:
    """A forked child takes these ids (setgroups, setgid, setuid), connects,
    sends b"ping" and reports its outcome()."""
    r, w = os.pipe()
    pid = fork_quietly()
    if pid == 0:  # pragma: no cover - child
        result = "error"
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(DEADLINE)
            s.connect(path)
            result = outcome(s)
        except BaseException as exc:
            result = f"error {exc!r}"
        finally:
            os.write(w, result.encode())
            os._exit(0)
    os.close(w)
    try:
        assert reap(pid) == 0
        with os.fdopen(r, "rb") as f:
            r = -1
            return f.read().decode()
    finally:
        if r >= 0:
            os.close(r)


def own_outcome(path: str) -> str:
    s = connect(path)
    try:
        return outcome(s)
    finally:
        s.close()


def assert_untouched_by_denied(
    srv: Server, seen: Seen, model: str, admitted_uids: list[int], denied: int
) -> None:
    """Every callback ran once per admitted peer and never for a denied one."""
    n = len(admitted_uids)
    wait_until(lambda: srv.stats()["closed"] == n and seen.calls["state 7"] == n)
    assert seen.calls["handler" if model == "blocking" else "factory"] == n
    assert seen.calls["handler" if model == "event" else "factory"] == 0
    assert seen.calls["update_conn"] == n and sorted(seen.uids) == sorted(admitted_uids)
    assert seen.calls["state 1"] == n
    assert seen.errors == []
    stats = srv.stats()
    assert stats["accepted"] == n and stats["denied"] == denied and stats["rejected"] == 0


# --------------------------------------------------------------------------- config


class TestConfig:
    def test_none_is_the_default(self, sock_path: str) -> None:
        cfg = ServerConfig(path=sock_path)
        assert (
            cfg.allowed_uids is None
            and cfg.allowed_gids is None
            and cfg.max_connections_per_uid is None
        )

    def test_names_and_ids_resolve_sorted_unique(self, sock_path: str) -> None:
        cfg = ServerConfig(
            path=sock_path, allowed_uids=["root", 5, "5", 0], allowed_gids={"root", 7}
        )
        assert cfg.allowed_uids == (0, 5) and cfg.allowed_gids == (0, 7)

    def test_a_string_lists_comma_separated_names(self, sock_path: str) -> None:
        cfg = ServerConfig(path=sock_path, allowed_uids="root, 1000", allowed_gids=42)
        assert cfg.allowed_uids == (0, 1000) and cfg.allowed_gids == (42,)

    def test_empty_collection_admits_nobody_by_that_list(self, sock_path: str) -> None:
        assert ServerConfig(path=sock_path, allowed_uids=[]).allowed_uids == ()

    def test_unknown_names_raise(self, sock_path: str) -> None:
        with pytest.raises(ConfigError, match="no-such-user-x"):
            ServerConfig(path=sock_path, allowed_uids=["no-such-user-x"])
        with pytest.raises(InvalidGroupError, match="no-such-group-x"):
            ServerConfig(path=sock_path, allowed_gids=["no-such-group-x"])

    @pytest.mark.parametrize("bad", [[-1], [4294967295], [True], [1.5], b"0", {"a": 1}, 2.0])
    def test_bad_values_raise(self, sock_path: str, bad: Any) -> None:
        with pytest.raises(ConfigError):
            ServerConfig(path=sock_path, allowed_uids=bad)

    @pytest.mark.parametrize("bad", [0, -1, True, "2"])
    def test_bad_per_uid_limit(self, sock_path: str, bad: Any) -> None:
        with pytest.raises(ConfigError):
            ServerConfig(path=sock_path, max_connections_per_uid=bad)

    def test_config_file_keys(self, sock_path: str) -> None:
        cfg = ServerConfig.from_mapping(
            {
                "address": sock_path,
                "allowed_uids": ["root"],
                "allowed_gids": [0, 9],
                "max_connections_per_uid": 3,
            }
        )
        assert (cfg.allowed_uids, cfg.allowed_gids, cfg.max_connections_per_uid) == (
            (0,),
            (0, 9),
            3,
        )

    def test_authorize_must_be_callable(self, sock_path: str) -> None:
        with pytest.raises(TypeError):
            Server(ServerConfig(path=sock_path), echo_handler, authorize=42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the lists (this process's own ids)


def test_own_uid_listed_is_admitted(
    serve: Callable[..., tuple[Server, Seen]], sock_path: str, model: str
) -> None:
    srv, seen = serve(allowed_uids=[os.getuid()])
    assert own_outcome(sock_path) == "admitted"
    assert_untouched_by_denied(srv, seen, model, [os.getuid()], denied=0)


def test_unlisted_peer_is_denied_before_python(
    serve: Callable[..., tuple[Server, Seen]], sock_path: str, model: str
) -> None:
    """uid 0 is not special: root is denied like anyone unlisted."""
    srv, seen = serve(allowed_uids=[U1], allowed_gids=[G1])
    for _ in range(3):
        assert own_outcome(sock_path) == "denied"
    wait_until(lambda: srv.stats()["denied"] == 3)
    assert_untouched_by_denied(srv, seen, model, [], denied=3)
    assert srv.open_connections == 0


def test_own_primary_group_listed_is_admitted(
    serve: Callable[..., tuple[Server, Seen]], sock_path: str, model: str
) -> None:
    srv, seen = serve(allowed_uids=[], allowed_gids=[os.getgid()])
    assert own_outcome(sock_path) == "admitted"
    assert_untouched_by_denied(srv, seen, model, [os.getuid()], denied=0)


def test_denials_are_logged_rate_limited(
    serve: Callable[..., tuple[Server, Seen]], sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A flood of 40 denied connects: a few WARNINGs with pid/uid/gid, the
    rest counted and reported as "N more" once the second is over."""
    caplog.set_level(logging.WARNING, logger="unixsrv.access")
    srv, _seen = serve(allowed_uids=[U1])
    started = time.monotonic()
    for _ in range(40):
        assert own_outcome(sock_path) == "denied"
    elapsed = time.monotonic() - started
    wait_until(lambda: srv.stats()["denied"] == 40)

    def logged() -> tuple[list[str], int]:
        """The one-by-one records, and the denials reported only as a count
        (in a summary, or attached to the next one-by-one record)."""
        messages = [r.getMessage() for r in caplog.records]
        one_by_one = [m for m in messages if "denied a connection" in m]
        more = sum(int(n) for m in messages for n in re.findall(r"(\d+) more", m))
        return one_by_one, more

    wait_until(lambda: len(logged()[0]) + logged()[1] == 40)
    one_by_one, more = logged()
    # At most 5 records per started second of the flood, plus the window it ends in.
    assert 1 <= len(one_by_one) <= 5 * (int(elapsed) + 2), (elapsed, one_by_one)
    assert more == 40 - len(one_by_one) > 0
    assert f"pid {os.getpid()} uid {os.getuid()} gid {os.getgid()}" in one_by_one[0]
    assert all(r.levelno == logging.WARNING and r.name == "unixsrv.access" for r in caplog.records)


# --------------------------------------------------------------------------- authorize=


def test_authorize_gets_the_peer_and_true_admits(
    serve: Callable[..., tuple[Server, Seen]], sock_path: str, model: str
) -> None:
    peers: list[PeerCredentials] = []
    threads: list[threading.Thread] = []

    def authorize(peer: PeerCredentials) -> bool:
        peers.append(peer)
        threads.append(threading.current_thread())
        return True

    srv, seen = serve(authorize=authorize, allowed_uids=[os.getuid()])
    assert own_outcome(sock_path) == "admitted"
    assert peers == [PeerCredentials(os.getpid(), os.getuid(), os.getgid())]
    assert threads[0].name == f"unixsrv {srv.path}"  # the loop thread
    assert_untouched_by_denied(srv, seen, model, [os.getuid()], denied=0)


@pytest.mark.parametrize("verdict", [False, None, 1, "yes"])
def test_authorize_anything_but_true_denies(
    serve: Callable[..., tuple[Server, Seen]], sock_path: str, model: str, verdict: Any
) -> None:
    srv, seen = serve(authorize=lambda peer: verdict)
    assert own_outcome(sock_path) == "denied"
    wait_until(lambda: srv.stats()["denied"] == 1)
    assert_untouched_by_denied(srv, seen, model, [], denied=1)


def test_authorize_raising_denies_and_is_reported(
    serve: Callable[..., tuple[Server, Seen]], sock_path: str, model: str
) -> None:
    def authorize(peer: PeerCredentials) -> bool:
        raise LookupError("policy service down")

    srv, seen = serve(authorize=authorize)
    assert own_outcome(sock_path) == "denied"
    wait_until(lambda: seen.errors)
    assert [type(e) for e in seen.errors] == [LookupError] and seen.calls["on_error"] == 1
    seen.errors.clear()
    assert_untouched_by_denied(srv, seen, model, [], denied=1)
    assert srv.stats()["errors"] == 1


def test_authorize_runs_after_the_lists(
    serve: Callable[..., tuple[Server, Seen]], sock_path: str
) -> None:
    called: list[PeerCredentials] = []
    srv, _seen = serve(authorize=lambda peer: called.append(peer) or True, allowed_uids=[U1])
    assert own_outcome(sock_path) == "denied"
    wait_until(lambda: srv.stats()["denied"] == 1)
    assert called == []


def test_authorize_with_max_connections_counts_the_waiting(
    serve: Callable[..., tuple[Server, Seen]], sock_path: str
) -> None:
    """accepted is counted once authorize admits; the global limit still holds."""
    srv, _seen = serve(authorize=lambda peer: True, max_connections=2)
    a, b = connect(sock_path), connect(sock_path)
    try:
        echo(a, b"1")
        echo(b, b"2")
        assert own_outcome(sock_path) == "denied"  # over max_connections: EOF
        wait_until(lambda: srv.stats()["rejected"] == 1)
        assert srv.stats()["accepted"] == 2 and srv.stats()["denied"] == 0
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------- max_connections_per_uid


def test_per_uid_limit(serve: Callable[..., tuple[Server, Seen]], sock_path: str) -> None:
    srv, _seen = serve(max_connections_per_uid=2)
    a, b = connect(sock_path), connect(sock_path)
    try:
        echo(a, b"a")
        echo(b, b"b")
        assert own_outcome(sock_path) == "denied"  # the third: accepted and closed
        wait_until(lambda: srv.stats()["rejected"] == 1)
        a.close()
        wait_until(lambda: srv.stats()["closed"] == 1)  # its slot is given back at close
        c = connect(sock_path)
        try:
            echo(c, b"c")
        finally:
            c.close()
        stats = srv.stats()
        assert stats["accepted"] == 3 and stats["rejected"] == 1 and stats["denied"] == 0
    finally:
        a.close()
        b.close()


def test_per_uid_slot_returned_when_authorize_denies(
    serve: Callable[..., tuple[Server, Seen]], sock_path: str
) -> None:
    verdicts = iter([False, False, False, True])
    srv, _seen = serve(authorize=lambda peer: next(verdicts), max_connections_per_uid=1)
    for _ in range(3):
        assert own_outcome(sock_path) == "denied"
    assert own_outcome(sock_path) == "admitted"  # the denied ones held no slot
    stats = srv.stats()
    assert stats["denied"] == 3 and stats["rejected"] == 0


# --------------------------------------------------------------------------- other uids and groups (root)


@pytest.mark.root
def test_lists_decide_for_other_ids(
    serve: Callable[..., tuple[Server, Seen]], open_dir: str, sock_path: str, model: str
) -> None:
    """Each child admitted or denied exactly as the lists say, by uid, by
    primary group, by a supplementary group (also past 64 groups, the first
    buffer SO_PEERGROUPS is read into), or not at all."""
    srv, seen = serve(allowed_uids=[U1], allowed_gids=[G1])
    cases = [
        ((U1, G9, []), "admitted"),  # uid listed
        ((U2, G1, []), "admitted"),  # primary group listed
        ((U2, G9, [G9, G1]), "admitted"),  # supplementary group listed
        ((U2, G9, [G2, *range(G9 + 1, G9 + 100), G1]), "admitted"),  # ... the last of 101
        ((U2, G9, [G9, G2]), "denied"),
        ((U2, G2, []), "denied"),
    ]
    got = [connect_as(sock_path, *ids) for ids, _ in cases]
    assert got == [want for _, want in cases]
    assert own_outcome(sock_path) == "denied"  # root: not listed, not special
    assert_untouched_by_denied(srv, seen, model, [U1, U2, U2, U2], denied=3)


@pytest.mark.root
def test_per_uid_limit_is_per_uid(
    serve: Callable[..., tuple[Server, Seen]], open_dir: str, sock_path: str
) -> None:
    """root holds its one slot; other uids still get theirs."""
    srv, _seen = serve(max_connections_per_uid=1)
    mine = connect(sock_path)
    try:
        echo(mine, b"x")
        assert own_outcome(sock_path) == "denied"
        assert connect_as(sock_path, U1, G9, []) == "admitted"
        assert connect_as(sock_path, U2, G9, []) == "admitted"
        assert srv.stats()["rejected"] == 1
    finally:
        mine.close()


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("how", ["flags", "config file"])
def test_cli_allow_lists(
    sock_dir: str, sock_path: str, spawn: Callable[..., Any], how: str
) -> None:
    """unixsrv serve --allow-uid/--allow-gid/--max-connections-per-uid, or the
    same keys in a --config file: an unlisted peer is denied."""
    if how == "flags":
        args = [
            "--socket",
            sock_path,
            "--allow-uid",
            str(U1),
            "--allow-gid",
            f"{G1},{G2}",
            "--max-connections-per-uid",
            "3",
        ]
    else:
        conf = os.path.join(sock_dir, "conf.json")
        with open(conf, "w") as f:
            json.dump(
                {
                    "address": sock_path,
                    "allowed_uids": [U1],
                    "allowed_gids": [G1, G2],
                    "max_connections_per_uid": 3,
                },
                f,
            )
        args = ["--config", conf]
    code = "import sys; from unixsrv.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = spawn(code, "serve", "--echo", *args)
    wait_until(lambda: os.path.exists(sock_path) or proc.poll() is not None)
    assert own_outcome(sock_path) == "denied"
    proc.terminate()
    rc, _out, err = finish(proc)
    assert rc == 0, err
    assert "denied=1" in err and "accepted=0" in err
    assert f"denied a connection from pid {os.getpid()} uid {os.getuid()}" in err
