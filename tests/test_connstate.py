"""ConnState (src/unixsrv/connstate.py) and PeerCredentials (src/unixsrv/peer.py).

docs/golib-spec.md a.1: `type ConnState uint8` with eight iota values and their
String() texts; golib's "Write Outgoing Steam" typo is fixed here (docs/design.md
"Precise semantics / ConnState").  PeerCredentials: docs/design.md "Connection"
(`peer` is PeerCredentials pid/uid/gid), checklist item 18.
"""

from __future__ import annotations

import enum
import os

import pytest

from conftest import DEADLINE, connect, recv_until_eof
from unixsrv import ConnState, PeerCredentials

#: golib's table (spec a.1), with "Stream" spelled correctly.
GOLIB = [
    ("DIAL", 0, "Dial Connection"),
    ("NEW", 1, "New Connection"),
    ("READ", 2, "Read Incoming Stream"),
    ("CLOSE_READ", 3, "Close Incoming Stream"),
    ("HANDLER", 4, "Run HandlerFunc"),
    ("WRITE", 5, "Write Outgoing Stream"),
    ("CLOSE_WRITE", 6, "Close Outgoing Stream"),
    ("CLOSE", 7, "Close Connection"),
]


def test_is_int_enum():
    """docs/design.md: ConnState is an IntEnum."""
    assert issubclass(ConnState, enum.IntEnum)
    assert issubclass(ConnState, int)


def test_members_in_order():
    """Exactly golib's eight states, DIAL..CLOSE = 0..7, in iota order."""
    assert [(m.name, m.value) for m in ConnState] == [(name, value) for name, value, _ in GOLIB]
    assert len(ConnState) == 8


@pytest.mark.parametrize(("name", "value", "text"), GOLIB)
def test_member(name, value, text):
    """Each member: value, lookup by value and by name, int equality, golib text."""
    member = ConnState[name]
    assert member.value == value
    assert ConnState(value) is member
    assert member == value
    assert int(member) == value
    assert str(member) == text
    assert f"{member}" == text
    assert f"{member}" == text


def test_write_is_spelled_correctly():
    """golib's "Write Outgoing Steam" typo is not reproduced."""
    assert str(ConnState.WRITE) == "Write Outgoing Stream"
    assert all("Steam" not in str(m) for m in ConnState)


def test_unknown_value_rejected():
    """Values outside 0..7 are not states (golib prints "unknown connection state")."""
    for bad in (8, -1, 255):
        with pytest.raises(ValueError):
            ConnState(bad)


def test_ordering():
    """The IntEnum orders like golib's uint8 values: NEW comes before CLOSE."""
    assert ConnState.DIAL < ConnState.NEW < ConnState.HANDLER < ConnState.CLOSE
    assert sorted(ConnState, reverse=True)[0] is ConnState.CLOSE


# ---------------------------------------------------------------------- PeerCredentials


def test_peer_credentials_is_named_tuple():
    """PeerCredentials is a NamedTuple with fields (pid, uid, gid)."""
    assert issubclass(PeerCredentials, tuple)
    assert PeerCredentials._fields == ("pid", "uid", "gid")
    cred = PeerCredentials(pid=10, uid=20, gid=30)
    assert cred == (10, 20, 30)
    assert (cred.pid, cred.uid, cred.gid) == (10, 20, 30)
    pid, uid, gid = cred
    assert (pid, uid, gid) == (10, 20, 30)
    assert cred[1] == 20
    assert cred._asdict() == {"pid": 10, "uid": 20, "gid": 30}


def test_peer_credentials_is_immutable():
    """A snapshot: fields cannot be reassigned."""
    cred = PeerCredentials(1, 2, 3)
    with pytest.raises(AttributeError):
        cred.uid = 0  # type: ignore[misc]
    assert cred.uid == 2


def test_peer_credentials_needs_all_fields():
    """All three fields are required."""
    with pytest.raises(TypeError):
        PeerCredentials(1, 2)  # type: ignore[call-arg]


def test_connection_peer_is_peer_credentials(sock_path, make_server):
    """Checklist 18: conn.peer in the blocking model is PeerCredentials of the client (this process)."""
    seen: list[object] = []

    def handler(conn):
        seen.append(conn.peer)
        conn.write(b"ok")

    make_server(sock_path, handler)
    with connect(sock_path) as s:
        assert recv_until_eof(s) == b"ok"
    assert len(seen) == 1
    peer = seen[0]
    assert type(peer) is PeerCredentials
    assert peer == PeerCredentials(os.getpid(), os.getuid(), os.getgid())


def test_transport_peercred_is_peer_credentials(sock_path, make_server):
    """Event model: get_extra_info('peercred') gives the same PeerCredentials."""
    import asyncio
    import threading

    seen: list[object] = []
    got = threading.Event()

    class P(asyncio.Protocol):
        def connection_made(self, transport):
            seen.append(transport.get_extra_info("peercred"))
            got.set()
            transport.close()

    make_server(sock_path, protocol=P)
    with connect(sock_path) as s:
        assert got.wait(DEADLINE)
        assert recv_until_eof(s) == b""
    assert seen == [PeerCredentials(os.getpid(), os.getuid(), os.getgid())]
    assert type(seen[0]) is PeerCredentials
