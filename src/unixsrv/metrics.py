"""Prometheus metrics for unixsrv servers (the optional extra ``unixsrv[metrics]``).

:class:`ServerCollector` is a ``prometheus_client`` collector: each scrape
reads ``stats()`` of every server it watches (C atomics, no lock, no wait for
a loop) and reports, labelled ``socket="<path>"``:

==========================================  =======  ==========================
metric                                      type     from ``stats()``
==========================================  =======  ==========================
``unixsrv_connections_accepted_total``      counter  ``accepted``
``unixsrv_connections_closed_total``        counter  ``closed``
``unixsrv_connections_denied_total``        counter  ``denied`` (allow-lists, authorize)
``unixsrv_connections_rejected_total``      counter  ``rejected`` (connection limits)
``unixsrv_errors_total``                    counter  ``errors``
``unixsrv_received_bytes_total``            counter  ``bytes_in``
``unixsrv_sent_bytes_total``                counter  ``bytes_out``
``unixsrv_open_connections``                gauge    ``open``
==========================================  =======  ==========================

:func:`serve_metrics` exposes a registry over plain HTTP, on ``HOST:PORT``
(prometheus_client's own server) or on a Unix socket ``PATH`` (a unixsrv
server, with the same socket-file safety as any other).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, start_http_server
from prometheus_client.registry import Collector, CollectorRegistry

from .config import ServerConfig
from .errors import ConfigError
from .server import Server


class Measured(Protocol):
    """What the collector reads of a server: a unixsrv.Server, a
    unixsrv.asyncio server or a unixsrv.socketserver server alike."""

    @property
    def path(self) -> str: ...

    def stats(self) -> dict[str, int]: ...


__all__ = ["MetricsEndpoint", "ServerCollector", "collect_servers", "serve_metrics"]

logger = logging.getLogger("unixsrv.metrics")

# name (without _total), stats() key, help text
_COUNTERS = (
    ("unixsrv_connections_accepted", "accepted", "Connections handed to a handler or protocol."),
    ("unixsrv_connections_closed", "closed", "Accepted connections closed since."),
    (
        "unixsrv_connections_denied",
        "denied",
        "Connections refused by the allow-lists or authorize.",
    ),
    (
        "unixsrv_connections_rejected",
        "rejected",
        "Connections refused by max_connections or max_connections_per_uid.",
    ),
    ("unixsrv_errors", "errors", "Errors reported through on_error."),
    ("unixsrv_received_bytes", "bytes_in", "Bytes received from clients."),
    ("unixsrv_sent_bytes", "bytes_out", "Bytes sent to clients."),
)

# An HTTP request head larger than this is refused (the scraper sends a few hundred bytes).
_MAX_REQUEST_HEAD = 64 * 1024


class ServerCollector(Collector):
    """Collects the counters of one or more servers (see the module docstring).

    ``ServerCollector(server, ...)``; register it with
    ``prometheus_client.REGISTRY.register(collector)`` or a registry of your
    own.  :meth:`add` and :meth:`remove` change the watched servers at any time.
    """

    def __init__(self, *servers: Measured) -> None:
        self._servers: list[Measured] = list(servers)
        self._lock = threading.Lock()

    def add(self, server: Measured) -> None:
        with self._lock:
            self._servers.append(server)

    def remove(self, server: Measured) -> None:
        with self._lock:
            self._servers.remove(server)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            servers = list(self._servers)
        counters = [
            CounterMetricFamily(name, text, labels=["socket"]) for name, _key, text in _COUNTERS
        ]
        gauge = GaugeMetricFamily(
            "unixsrv_open_connections",
            "Connections accepted and not yet closed.",
            labels=["socket"],
        )
        for server in servers:
            stats = server.stats()
            for family, (_name, key, _text) in zip(counters, _COUNTERS, strict=True):
                family.add_metric([server.path], stats[key])
            gauge.add_metric([server.path], stats["open"])
        yield from counters
        yield gauge


class MetricsEndpoint:
    """A running metrics endpoint: ``url`` says where, ``close()`` stops it."""

    def __init__(self, url: str, close: Callable[[], None]) -> None:
        self.url = url
        self.close = close


def serve_metrics(address: str, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve ``registry`` over HTTP on ``address``: ``HOST:PORT`` (``[::1]:9100``
    for IPv6; port 0 picks a free one) or a Unix socket path (anything else)."""
    tcp = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d+)", address)
    if tcp and "/" not in address:
        host, port = tcp.group(1) or "0.0.0.0", int(tcp.group(2))
        if not 0 <= port <= 65535:
            raise ConfigError(f"--metrics: port {port} is out of range")
        httpd, thread = start_http_server(port, addr=host, registry=registry)

        def stop_tcp() -> None:
            httpd.shutdown()
            httpd.server_close()
            thread.join()

        shown = f"[{host}]" if ":" in host else host
        endpoint = MetricsEndpoint(f"http://{shown}:{httpd.server_port}/metrics", stop_tcp)
    else:
        server = Server(ServerConfig(path=address), _http_handler(registry))
        server.start()
        endpoint = MetricsEndpoint(f"unix:{server.path} http://localhost/metrics", server.close)
    logger.info("metrics on %s", endpoint.url)
    return endpoint


def _http_handler(registry: CollectorRegistry) -> Callable[[Any], None]:
    """A blocking-model handler answering one HTTP/1.x request per connection
    with the registry's exposition (GET or HEAD of / or /metrics)."""

    def handler(conn: Any) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.read()
            if not chunk:
                return
            head += chunk
            if len(head) > _MAX_REQUEST_HEAD:
                _respond(conn, 431, "text/plain", b"request header too large\n")
                return
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        target = rest.partition(" ")[0].partition("?")[0]
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
        }
        if method not in ("GET", "HEAD"):
            _respond(conn, 405, "text/plain", b"method not allowed\n")
        elif target not in ("/", "/metrics"):
            _respond(conn, 404, "text/plain", b"not found: try /metrics\n")
        else:
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            _respond(conn, 200, content_type, encoder(registry), head_only=method == "HEAD")

    return handler


_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


def _respond(
    conn: Any, status: int, content_type: str, body: bytes, head_only: bool = False
) -> None:
    header = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    conn.write(header if head_only else header + body)


def collect_servers(servers: Iterable[Measured]) -> CollectorRegistry:
    """A fresh registry holding one ServerCollector for ``servers``."""
    registry = CollectorRegistry()
    registry.register(ServerCollector(*servers))
    return registry
