"""The ``unixsrv`` command (also ``python -m unixsrv``).

``unixsrv serve`` runs a server until SIGINT or SIGTERM, then shuts down
gracefully (a second signal closes at once).  Under systemd it serves the
socket passed by socket activation when no --socket is given, and always
reports readiness, watchdog pings, status and stopping through
``$NOTIFY_SOCKET`` (see unixsrv.systemd).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .config import ServerConfig
from .echo import EchoProtocol, echo_handler
from .errors import ConfigError, UnixSrvError
from .server import Server

__all__ = ["main"]

logger = logging.getLogger("unixsrv.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (UnixSrvError, OSError) as exc:
        logger.error("%s", exc)
        return 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unixsrv", description="A Unix domain socket server.")
    parser.add_argument("--version", action="version", version=f"unixsrv {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a server until SIGINT/SIGTERM")
    serve.add_argument("--socket", dest="path", help="socket path ('@name' = Linux abstract name)")
    serve.add_argument("--config", help="JSON file with ServerConfig fields or golib keys; flags override it")
    serve.add_argument("--mode", help="socket file mode, e.g. 0660 or rw-rw---- (default 0770)")
    serve.add_argument("--group", help="group name or gid for the socket file")
    serve.add_argument("--idle-timeout", type=float, help="close connections idle this many seconds")
    serve.add_argument("--max-connections", type=int, help="refuse connections beyond this many")
    serve.add_argument("--backlog", type=int, help="listen(2) backlog (default 1024)")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0, help="grace period on SIGINT/SIGTERM")
    serve.add_argument("--model", choices=["event", "blocking"], default="event", help="handler model for --echo")
    what = serve.add_mutually_exclusive_group(required=True)
    what.add_argument("--echo", action="store_true", help="serve the built-in echo")
    what.add_argument("--handler", metavar="MODULE:FUNCTION", help="blocking-model handler(conn)")
    what.add_argument("--protocol", metavar="MODULE:FACTORY", help="event-model asyncio.Protocol factory")
    serve.add_argument("--allow-uid", action="append", metavar="USER",
                       help="admit this user (name or uid; repeat or comma-separate); default: anyone")
    serve.add_argument("--allow-gid", action="append", metavar="GROUP",
                       help="admit members of this group (name or gid, supplementary groups count; repeatable)")
    serve.add_argument("--max-connections-per-uid", type=int, metavar="N", help="open connections one user may have")
    serve.add_argument("--authorize", metavar="MODULE:FUNCTION", help="authorize(peer) -> bool, after the lists")
    serve.add_argument("--socket-name", metavar="NAME",
                       help="socket activation: the passed socket with this FileDescriptorName=")
    serve.add_argument("--metrics", metavar="HOST:PORT|PATH",
                       help="serve Prometheus metrics over HTTP on HOST:PORT or on a Unix socket PATH")
    serve.set_defaults(func=_serve)

    from .bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def _serve(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    authorize = _import(args.authorize) if args.authorize else None
    if args.echo:
        handler, factory = (echo_handler, None) if args.model == "blocking" else (None, EchoProtocol)
        what = f"echo ({args.model} model)"
    elif args.handler:
        handler, factory = _import(args.handler), None
        what = args.handler
    else:
        handler, factory = None, _import(args.protocol)
        what = args.protocol
    server = Server(config, handler, protocol=factory, authorize=authorize)
    _install_signal_handlers(server, args.shutdown_timeout)
    endpoint = _serve_metrics(args.metrics, server) if args.metrics else None
    logger.info("serving %s on %s; SIGINT or SIGTERM stops it", what, server.path)
    try:
        server.serve_forever()
    finally:
        if endpoint is not None:
            endpoint.close()
    stats = server.stats()
    logger.info("stopped: %s", ", ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


def _config_from_args(args: argparse.Namespace) -> ServerConfig:
    data: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            loaded = json.load(f)
        base = ServerConfig.from_mapping(loaded)
        data.update({k: getattr(base, k) for k in base.__dataclass_fields__})
    overrides = {
        "path": args.path,
        "mode": args.mode,
        "group": args.group,
        "idle_timeout": args.idle_timeout,
        "max_connections": args.max_connections,
        "backlog": args.backlog,
        "allowed_uids": ",".join(args.allow_uid) if args.allow_uid else None,
        "allowed_gids": ",".join(args.allow_gid) if args.allow_gid else None,
        "max_connections_per_uid": args.max_connections_per_uid,
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["sd_notify"] = True  # a no-op unless systemd (or a test) set $NOTIFY_SOCKET
    if "path" not in data and os.environ.get("LISTEN_FDS"):
        # Socket activation: the socket's mode is the .socket unit's (SocketMode=).
        for key in ("mode", "group"):
            if overrides[key] is None:
                data.pop(key, None)
        return ServerConfig.from_systemd(args.socket_name, **data)
    if "path" not in data:
        raise ConfigError("give --socket PATH or a --config file with an address")
    return ServerConfig(**data)


def _serve_metrics(address: str, server: Server) -> Any:
    """Start the --metrics endpoint for ``server``; returns its stop function."""
    try:
        from .metrics import collect_servers, serve_metrics
    except ImportError as exc:
        raise ConfigError(f"--metrics needs prometheus_client (pip install 'unixsrv[metrics]'): {exc}") from None
    return serve_metrics(address, collect_servers([server]))


def _import(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"expected MODULE:NAME, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load {spec!r}: {exc}") from exc
    return obj


def _install_signal_handlers(server: Server, timeout: float) -> None:
    received = 0

    def on_signal(signum: int, frame: object) -> None:
        nonlocal received
        received += 1
        name = signal.Signals(signum).name
        if received == 1:
            logger.info("%s: shutting down gracefully (up to %g s; repeat to stop at once)", name, timeout)
            server.shutdown(timeout)
        else:
            logger.info("%s: closing now", name)
            server.close()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
