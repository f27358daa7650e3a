"""ConnState: golib's connection states, as an IntEnum."""

from __future__ import annotations

import enum

__all__ = ["ConnState"]

_TEXT = {
    0: "Dial Connection",
    1: "New Connection",
    2: "Read Incoming Stream",
    3: "Close Incoming Stream",
    4: "Run HandlerFunc",
    5: "Write Outgoing Stream",  # golib spells it "Steam"; fixed here
    6: "Close Outgoing Stream",
    7: "Close Connection",
}


class ConnState(enum.IntEnum):
    """Lifecycle state passed to ``on_conn_state(local, remote, state)``.

    unixsrv reports ``NEW`` and ``CLOSE``, exactly once each per connection
    and in that order; the other members exist for golib compatibility.
    ``str(state)`` is golib's text.
    """

    DIAL = 0
    NEW = 1
    READ = 2
    CLOSE_READ = 3
    HANDLER = 4
    WRITE = 5
    CLOSE_WRITE = 6
    CLOSE = 7

    def __str__(self) -> str:
        return _TEXT[self.value]

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)
