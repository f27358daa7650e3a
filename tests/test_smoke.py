"""The first things a user tries: an echo round trip in each model."""

from conftest import connect, recv_exactly


def test_echo_round_trip(echo_server):
    with connect(echo_server.path) as s:
        s.sendall(b"Hello, Unix Socket!")
        assert recv_exactly(s, 19) == b"Hello, Unix Socket!"
