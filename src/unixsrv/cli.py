"""The ``unixsrv`` command (also ``python -m unixsrv``).

``unixsrv serve`` runs a server until SIGINT or SIGTERM, then shuts down
gracefully (a second signal closes at once).  ``--protocol MODULE:FACTORY``
serves the factory through :mod:`unixsrv.asyncio` on an asyncio event loop,
so a protocol that uses the loop (tasks, timers, futures) works as it does
under asyncio.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .asyncio import create_unix_server
from .asyncio import run as run_hosted
from .config import ServerConfig
from .echo import EchoProtocol, echo_handler
from .errors import ConfigError, InvalidHandlerError, ShutdownTimeoutError, UnixSrvError
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
    serve.set_defaults(func=_serve)

    from .bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def _serve(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    if args.echo:
        server = Server(config, echo_handler) if args.model == "blocking" else Server(config, protocol=EchoProtocol)
        what = f"echo ({args.model} model)"
    elif args.handler:
        server = Server(config, _import(args.handler))
        what = args.handler
    else:
        return _serve_protocol(config, _import(args.protocol), args.protocol, args.shutdown_timeout)
    _install_signal_handlers(server, args.shutdown_timeout)
    logger.info("serving %s on %s; SIGINT or SIGTERM stops it", what, server.path)
    server.serve_forever()
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
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "path" not in data:
        raise ConfigError("give --socket PATH or a --config file with an address")
    return ServerConfig(**data)


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


def _serve_protocol(config: ServerConfig, factory: Any, what: str, timeout: float) -> int:
    """``--protocol``: serve ``factory`` with unixsrv.asyncio on an event
    loop of its own (``unixsrv.asyncio.run``), so protocol callbacks run on
    that loop's thread with a running loop, and a server the protocol
    creates with ``loop.create_unix_server`` is unixsrv's too."""
    if not callable(factory):
        raise InvalidHandlerError(f"{what} is not a protocol factory (not callable): {factory!r}")
    stats = run_hosted(_serve_on_loop(config, factory, what, timeout))
    logger.info("stopped: %s", ", ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


async def _serve_on_loop(config: ServerConfig, factory: Any, what: str, timeout: float) -> dict[str, int]:
    """Serve until SIGINT/SIGTERM, then ``shutdown(timeout)``; a second
    signal aborts what is left (``shutdown(0)``).  The signal handlers go in
    before the socket file appears, so a service manager's early SIGTERM is
    a graceful stop too, never the default action (which would leave the
    file behind).  Returns the server's final stats."""
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    handled = (signal.SIGINT, signal.SIGTERM)
    for signum in handled:
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    try:
        server = await create_unix_server(factory, config=config)
        logger.info("serving %s on %s; SIGINT or SIGTERM stops it", what, server.path)
        signum = await signals.get()
        logger.info("%s: shutting down gracefully (up to %g s; repeat to stop at once)", signum.name, timeout)
        graceful = loop.create_task(server.shutdown(timeout))
        second = loop.create_task(signals.get())
        await asyncio.wait((graceful, second), return_when=asyncio.FIRST_COMPLETED)
        stops = [graceful]
        if second.done():
            logger.info("%s: closing now", second.result().name)
            stops.append(loop.create_task(server.shutdown(0)))
        second.cancel()
        for outcome in await asyncio.gather(*stops, return_exceptions=True):
            if isinstance(outcome, ShutdownTimeoutError):
                logger.warning("%s", outcome)
            elif outcome is not None:
                raise outcome
        stats: dict[str, int] = server.stats()
        return stats
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
