"""PeerCredentials: who is on the other end of a connection."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["PeerCredentials"]


class PeerCredentials(NamedTuple):
    """The client's process id, user id and group id when it connected.

    Read with SO_PEERCRED on Linux and getpeereid()/LOCAL_PEERPID on macOS
    (pid is 0 where the platform cannot tell).  It is a snapshot: an fd
    passed to another process keeps the connector's identity.
    """

    pid: int
    uid: int
    gid: int
