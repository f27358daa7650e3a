"""The first things a user tries: an echo round trip in each model."""

from conftest import echo_once


def test_echo_round_trip(echo_server):
    echo_once(echo_server.path, b"Hello, Unix Socket!")
