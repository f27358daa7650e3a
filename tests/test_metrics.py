"""unixsrv.metrics: the Prometheus collector and the --metrics endpoint.

The endpoint is scraped with curl (as a Prometheus server fetches it, over
TCP on loopback or over the Unix socket) and the text is parsed with
prometheus_client's own parser; its counters must equal stats().
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest

from conftest import (
    CHILD_LOG_LINES,
    DEADLINE,
    Echo,
    connect,
    echo,
    echo_once,
    env_without_preload,
    finish,
    read_line,
    wait_until,
)
from unixsrv import PeerCredentials, Server, ServerConfig

prometheus_client = pytest.importorskip(
    "prometheus_client", reason="prometheus_client (unixsrv[metrics]) is not installed"
)
from prometheus_client.parser import text_string_to_metric_families

from unixsrv.metrics import ServerCollector, collect_servers, serve_metrics

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")

KEYS = {
    "unixsrv_connections_accepted": "accepted",
    "unixsrv_connections_closed": "closed",
    "unixsrv_connections_denied": "denied",
    "unixsrv_connections_rejected": "rejected",
    "unixsrv_errors": "errors",
    "unixsrv_received_bytes": "bytes_in",
    "unixsrv_sent_bytes": "bytes_out",
}


def parse(text: str) -> dict[str, dict[str, float]]:
    """{family name: {socket label: value}} (a counter by its _total sample)."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                out.setdefault(family.name, {})[sample.labels["socket"]] = sample.value
    return out


def curl(*args: str) -> str:
    assert CURL is not None
    env = env_without_preload()
    done = subprocess.run(
        [CURL, "-sS", "--max-time", str(DEADLINE), *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE + 5,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def busy(sock_path: str) -> Iterator[tuple[Server, socket.socket]]:
    """A server with something in every counter but errors: one peer denied
    by authorize, two admitted (one still open), bytes both ways, one
    rejected by max_connections_per_uid."""
    verdicts = iter([False, True, True, True])

    def authorize(peer: PeerCredentials) -> bool:
        return next(verdicts)

    srv = Server(
        ServerConfig(path=sock_path, max_connections_per_uid=2), protocol=Echo, authorize=authorize
    )
    srv.start()
    try:
        denied = connect(sock_path)
        assert denied.recv(1) == b""
        denied.close()
        a, b = connect(sock_path), connect(sock_path)
        echo(a, b"hello")
        echo(b, b"world!")
        c = connect(sock_path)  # the third of this uid: rejected
        assert c.recv(1) == b""
        c.close()
        b.close()
        wait_until(lambda: srv.stats()["closed"] == 1 and srv.stats()["rejected"] == 1)
        yield srv, a
        a.close()
    finally:
        srv.close()


def test_collector_reports_every_server(make_server: Callable[..., Server], sock_dir: str) -> None:
    paths = [os.path.join(sock_dir, f"{i}.sock") for i in range(2)]
    servers = [make_server(p, protocol=Echo) for p in paths]
    s = connect(paths[1])
    try:
        echo(s, b"abc")
        registry = prometheus_client.CollectorRegistry()
        collector = ServerCollector(servers[0])
        registry.register(collector)
        collector.add(servers[1])
        got = parse(prometheus_client.generate_latest(registry).decode())
        assert got["unixsrv_connections_accepted"] == {paths[0]: 0, paths[1]: 1}
        assert (
            got["unixsrv_received_bytes"][paths[1]] == 3
            and got["unixsrv_open_connections"][paths[1]] == 1
        )
        collector.remove(servers[0])
        got = parse(prometheus_client.generate_latest(registry).decode())
        assert list(got["unixsrv_connections_accepted"]) == [paths[1]]
    finally:
        s.close()


@needs_curl
@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_endpoint_scraped_with_curl_equals_stats(
    busy: tuple[Server, socket.socket], sock_dir: str, where: str
) -> None:
    srv, _open_client = busy
    address = "127.0.0.1:0" if where == "tcp" else os.path.join(sock_dir, "m.sock")
    endpoint = serve_metrics(address, collect_servers([srv]))
    try:
        args = (
            [endpoint.url]
            if where == "tcp"
            else ["--unix-socket", address, "http://localhost/metrics"]
        )
        stats = srv.stats()
        got = parse(curl(*args))
        for name, key in KEYS.items():
            assert got[name][srv.path] == stats[key], name
        assert got["unixsrv_open_connections"][srv.path] == stats["open"]
        assert (
            stats["denied"],
            stats["accepted"],
            stats["open"],
            stats["rejected"],
            stats["bytes_in"],
        ) == (
            1,
            2,
            1,
            1,
            11,
        )
    finally:
        endpoint.close()
    if where == "unix":
        assert not os.path.exists(address)


@needs_curl
def test_unix_endpoint_answers_http_errors(
    make_server: Callable[..., Server], sock_dir: str
) -> None:
    srv = make_server(os.path.join(sock_dir, "s.sock"), protocol=Echo)
    metrics_path = os.path.join(sock_dir, "m.sock")
    endpoint = serve_metrics(metrics_path, collect_servers([srv]))
    try:
        base = ["--unix-socket", metrics_path, "-o", "/dev/null", "-w", "%{http_code}"]
        assert curl(*base, "http://localhost/nope") == "404"
        assert curl(*base, "-X", "POST", "http://localhost/metrics") == "405"
        assert curl(*base, "-I", "http://localhost/") == "200"
    finally:
        endpoint.close()


@needs_curl
def test_cli_metrics_flag(sock_path: str, spawn: Callable[..., subprocess.Popen[str]]) -> None:
    """unixsrv serve --metrics HOST:PORT: the served counters, scraped while it runs."""
    code = (
        CHILD_LOG_LINES + "import sys; from unixsrv.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = spawn(code, "serve", "--socket", sock_path, "--echo", "--metrics", "127.0.0.1:0")
    url = ""
    while not url:
        match = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", read_line(proc))
        url = match.group(1) if match else ""
    wait_until(lambda: os.path.exists(sock_path))
    echo_once(sock_path, b"ping\n")
    got = parse(curl(url))
    assert (
        got["unixsrv_connections_accepted"][sock_path] == 1
        and got["unixsrv_received_bytes"][sock_path] == 5
    )
    proc.terminate()
    rc, _out, err = finish(proc)
    assert rc == 0, err
