"""Type stubs for the C extension unixsrv._loadgen (the load generator of
``unixsrv bench``)."""

from collections.abc import Callable, Iterable
from typing import Any

#: Number of latency histogram buckets.
HIST_BUCKETS: int

def hist_bucket_ns(i: int) -> tuple[int, int]: ...
def hist_index(ns: int) -> int: ...
def hist_percentiles(
    counts: dict[int, int] | Iterable[tuple[int, int]] | Iterable[list[int]],
    quantiles: Iterable[float],
) -> list[float | None]: ...

class LoadGen:
    """N non-blocking AF_UNIX client connections driven from C without the GIL."""

    def __init__(
        self,
        path: bytes,
        mode: str,
        connections: int,
        size: int,
        pipeline: int = 1,
        first_index: int = 0,
        server_pid: int = 0,
        stop_fd: int = -1,
        watch_fd: int = -1,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None: ...
    def connect(self, timeout: float = 30.0, rate: float = 0.0) -> dict[str, Any]: ...
    def run(
        self,
        duration: float = 5.0,
        warmup: float = 0.0,
        requests: int = 0,
        stall_timeout: float = 10.0,
    ) -> dict[str, Any]: ...
    def result(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
