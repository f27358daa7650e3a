"""The ``unixsrv`` command (also ``python -m unixsrv``).

``unixsrv serve`` runs a server until SIGINT or SIGTERM, then shuts down
gracefully (a second signal closes at once).  Under systemd it serves the
socket passed by socket activation when no --socket is given, and always
reports readiness, watchdog pings, status and stopping through
``$NOTIFY_SOCKET`` (see unixsrv.systemd).  Exit status: 0 after a stop
that cut no connection, 1 when the stop had to force-close connections (the
graceful stop timed out, or a second signal closed them) or the server
stopped by itself, 2 for a usage, configuration or start-up error (one
line on stderr naming the file or option and the problem).

``--protocol MODULE:FACTORY`` serves the factory through
:mod:`unixsrv.asyncio` on an asyncio event loop of its own thread, so a
protocol that uses the loop (tasks, timers, futures) works as under asyncio;
signals, the stop sequence and the exit statuses are the same as for the
other models.  With ``--workers`` each worker process runs such a loop
(:func:`unixsrv.asyncio.prefork_server`).

Signals are race-free: installed before anything else, they are recorded
in a pipe (``signal.set_wakeup_fd``) whichever thread receives them, and the
main thread applies the requests once the server runs, so a signal at any
moment of start-up stops the server.  With ``--workers``, SIGHUP replaces
the worker processes one by one (``Server.reload``).  From the first signal
on the process never dies of SIGINT or SIGTERM: every later one is handled
or, once the server has stopped, ignored; the exit status is the stop's.

Test hook: with ``UNIXSRV_TEST_PAUSE_AT=<point>`` in the environment,
``serve`` writes ``unixsrv-test: paused at <point>`` to stderr at that
point of its start-up or stop and waits for a line on stdin, so that a test
can send a signal exactly there.  The points, in order: ``handlers`` (signal
handlers installed, nothing else done), ``built`` (the Server exists, not
started), ``listening`` (inside start(): the socket accepts, start() has not
returned), ``started`` (start() returned, no request applied yet),
``stopped`` (the server has stopped, the process has not exited).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import select
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from . import __version__
from .asyncio import _HostedServer, prefork_server
from .config import ServerConfig, parse_duration
from .echo import EchoProtocol, echo_handler
from .errors import ConfigError, ShutdownTimeoutError, UnixSrvError
from .prefork import _recorded_in_the_pipe
from .server import Server

__all__ = ["main"]

logger = logging.getLogger("unixsrv.cli")

_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PAUSE_ENV = "UNIXSRV_TEST_PAUSE_AT"


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
        logger.error("%s", _one_line(str(exc)))
        return 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unixsrv", description="A Unix domain socket server.")
    parser.add_argument("--version", action="version", version=f"unixsrv {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=_LOG_LEVELS, help="default INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a server until SIGINT/SIGTERM")
    serve.add_argument("--socket", dest="path", help="socket path ('@name' = Linux abstract name)")
    serve.add_argument(
        "--config", help="JSON file with ServerConfig fields or golib keys; flags override it"
    )
    serve.add_argument("--mode", help="socket file mode, e.g. 0660 or rw-rw---- (default 0770)")
    serve.add_argument("--group", help="group name or gid for the socket file")
    serve.add_argument(
        "--idle-timeout", metavar="DURATION", help="close connections idle this long (1m30s, 0.5)"
    )
    serve.add_argument("--max-connections", type=int, help="refuse connections beyond this many")
    serve.add_argument("--backlog", type=int, help="listen(2) backlog (default 1024)")
    serve.add_argument(
        "--shutdown-timeout",
        metavar="DURATION",
        default="10",
        help="grace period on SIGINT/SIGTERM (default 10 s; inf = no limit)",
    )
    serve.add_argument(
        "--model", choices=["event", "blocking"], default="event", help="handler model for --echo"
    )
    serve.add_argument(
        "--workers",
        metavar="N|auto",
        help="serve from N worker processes (auto: one per CPU); SIGHUP replaces them one by one",
    )
    what = serve.add_mutually_exclusive_group(required=True)
    what.add_argument("--echo", action="store_true", help="serve the built-in echo")
    what.add_argument("--handler", metavar="MODULE:FUNCTION", help="blocking-model handler(conn)")
    what.add_argument(
        "--protocol", metavar="MODULE:FACTORY", help="event-model asyncio.Protocol factory"
    )
    serve.add_argument(
        "--allow-uid",
        action="append",
        metavar="USER",
        help="admit this user (name or uid; repeat or comma-separate); default: anyone",
    )
    serve.add_argument(
        "--allow-gid",
        action="append",
        metavar="GROUP",
        help="admit members of this group (name or gid, supplementary groups count; repeatable)",
    )
    serve.add_argument(
        "--max-connections-per-uid",
        type=int,
        metavar="N",
        help="open connections one user may have",
    )
    serve.add_argument(
        "--authorize", metavar="MODULE:FUNCTION", help="authorize(peer) -> bool, after the lists"
    )
    serve.add_argument(
        "--socket-name",
        metavar="NAME",
        help="socket activation: the passed socket with this FileDescriptorName=",
    )
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT|PATH",
        help="serve Prometheus metrics over HTTP on HOST:PORT or on a Unix socket PATH",
    )
    serve.set_defaults(func=_serve)

    from .bench import add_bench_parser

    add_bench_parser(sub)
    # --log-level also after the sub-command; SUPPRESS keeps the top-level
    # value when it is not repeated there.
    for command in sub.choices.values():
        command.add_argument(
            "--log-level",
            default=argparse.SUPPRESS,
            choices=_LOG_LEVELS,
            help="as before the sub-command",
        )
    return parser


# ---------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    stops = _StopRequests(
        reload=args.workers is not None
    )  # first of all: from here on a SIGINT/SIGTERM is recorded, never lost
    try:
        _pause_for_test("handlers")
        timeout = _duration("--shutdown-timeout", args.shutdown_timeout, infinite=True)
        server, what = _make_server(args)
        endpoint = _serve_metrics(args.metrics, server) if args.metrics else None
        try:
            _pause_for_test("built")
            server.start()
            _pause_for_test("started")
            logger.info("serving %s on %s; SIGINT or SIGTERM stops it", what, server.path)
            status = stops.serve_until_stopped(server, timeout)
            logger.info("stopped: %s", ", ".join(f"{k}={v}" for k, v in server.stats().items()))
        finally:
            if endpoint is not None:
                endpoint.close()
        _pause_for_test("stopped")
        return status
    finally:
        stops.ignore_further()


def _workers(text: str | None) -> int | str | None:
    """--workers: None (one process), "auto", or a count."""
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--workers: expected a number or 'auto', not {text!r}") from None


def _make_server(args: argparse.Namespace) -> tuple[Server | _HostedServer, str]:
    """The Server the arguments describe, and what it serves (for the log)."""
    config = _config_from_args(args)
    authorize = _import(args.authorize) if args.authorize else None
    server: Server | _HostedServer
    if args.protocol:
        factory = _import(args.protocol)
        workers = _workers(args.workers)
        if workers is None:
            server = _HostedServer(config, factory, args.protocol, authorize)
        else:
            server = prefork_server(factory, config, workers=workers, authorize=authorize)
        what = args.protocol
    else:
        if args.echo:
            handler, factory = (
                (echo_handler, None) if args.model == "blocking" else (None, EchoProtocol)
            )
            what = f"echo ({args.model} model)"
        else:
            handler, factory = _import(args.handler), None
            what = args.handler
        server = Server(
            config, handler, protocol=factory, authorize=authorize, workers=_workers(args.workers)
        )
    if os.environ.get(_PAUSE_ENV) == "listening":
        # start() reports "starting listening socket" on its caller's thread
        # once the socket accepts and before it returns.
        server.on_server_info(lambda message: _pause_for_test("listening"))
    return server, what


class _StopRequests:
    """SIGINT/SIGTERM, recorded in a pipe, applied by the main thread.

    ``signal.set_wakeup_fd`` makes CPython's C-level handler write each
    signal's number to the pipe on whichever thread the kernel delivers it
    to: a process-directed signal goes to any thread that does not block it
    (signal(7)), often the loop or a worker thread.  Python runs the
    Python-level handler later, on the main thread, and only a signal
    delivered to the main thread itself interrupts a wait there: the main
    thread used to wait in a queue that only that handler filled, so such a
    signal was lost and the server kept serving.  A read of the pipe always
    wakes.  The Python-level handlers do nothing (installing them only
    replaces the default actions: death, KeyboardInterrupt); no lock, no
    server method runs in them.  The watcher that sees the server stop
    writes 0, which no signal number is.
    """

    def __init__(self, *, reload: bool) -> None:
        # SIGHUP (--workers) replaces the workers; without them it keeps its default action.
        self._signals = (*_STOP_SIGNALS, signal.SIGHUP) if reload else _STOP_SIGNALS
        self._r, self._w = os.pipe()
        os.set_blocking(
            self._w, False
        )  # set_wakeup_fd requires it; a full pipe drops a byte, never blocks
        # The pipe before the handlers: a signal between the two would run a
        # handler that records nothing.
        self._previous_wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._watching = False  # a watcher thread may still write to the pipe
        for signum in self._signals:
            signal.signal(signum, _recorded_in_the_pipe)

    def serve_until_stopped(self, server: Server | _HostedServer, timeout: float) -> int:
        """Apply the stop requests to the running ``server`` until it has
        stopped; return the exit status.  The first request shuts down
        gracefully (on a thread, so this one stays free for the next), the
        second closes at once, later ones are only logged."""
        self._watching = True
        threading.Thread(
            target=self._put_when_stopped, args=(server,), name="unixsrv stop watcher", daemon=True
        ).start()
        graceful: _GracefulStop | None = None
        cut: int | None = None  # connections open when a second signal closed the server
        while (signum := os.read(self._r, 1)[0]) != 0:
            if signum not in self._signals:
                continue  # a signal some other Python handler (the user's module) receives
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                assert isinstance(server, Server)  # recorded only with --workers
                _reload(server)
            elif graceful is None:
                limit = "no time limit" if math.isinf(timeout) else f"up to {timeout:g} s"
                logger.info(
                    "%s: shutting down gracefully (%s; repeat to stop at once)", name, limit
                )
                graceful = _GracefulStop(server, timeout)
            elif cut is None:
                logger.info("%s: closing now", name)
                cut = server.open_connections
                server.close()
            else:
                logger.info("%s: already closing", name)
        self._watching = False  # its 0 was read: it has returned or is returning
        if graceful is None:
            logger.error("the server stopped without a stop request (see the errors above)")
            return 1
        graceful.join()
        if isinstance(graceful.failure, ShutdownTimeoutError):
            logger.error("graceful shutdown timed out: %s", graceful.failure)
        if graceful.failure is not None:
            return 1
        if cut:
            logger.error("a second signal closed the server with %d connection(s) open", cut)
            return 1
        return 0

    def _put_when_stopped(self, server: Server | _HostedServer) -> None:
        server.wait()
        while True:
            try:
                os.write(self._w, b"\0")
                return
            except BlockingIOError:  # a flood of signals filled the pipe: the main thread drains it
                select.select([], [self._w], [])

    def ignore_further(self) -> None:
        """The server is stopped (or never ran): from now on SIGINT/SIGTERM
        are ignored, so the process ends with the status it chose, even
        while the interpreter shuts down (it resets only Python-level
        handlers, not SIG_IGN)."""
        for signum in self._signals:
            signal.signal(signum, signal.SIG_IGN)
        signal.set_wakeup_fd(self._previous_wakeup)
        if (
            not self._watching
        ):  # else (an error ended serve early) the process exits with the pipe open
            os.close(self._r)
            os.close(self._w)


def _reload(server: Server) -> None:
    """SIGHUP (recorded only with --workers): replace the workers one by one,
    on a thread, so the main thread stays free for a stop."""

    def run() -> None:
        try:
            server.reload()
        except UnixSrvError as exc:
            logger.error("SIGHUP: reload failed: %s", exc)

    logger.info("SIGHUP: replacing the workers one by one")
    threading.Thread(target=run, name="unixsrv reload", daemon=True).start()


class _GracefulStop(threading.Thread):
    """server.shutdown(timeout) on a thread of its own; remembers a timeout.
    If the shutdown itself fails, the server is closed at once instead, so
    the process still stops (with status 1)."""

    def __init__(self, server: Server | _HostedServer, timeout: float) -> None:
        super().__init__(name="unixsrv graceful stop", daemon=True)
        self._server = server
        self._timeout = timeout
        self.failure: Exception | None = None  # why connections may have been cut
        self.start()

    def run(self) -> None:
        try:
            self._server.shutdown(self._timeout)
        except ShutdownTimeoutError as exc:
            self.failure = exc
        except Exception as exc:
            logger.error("graceful shutdown failed (%s: %s); closing now", type(exc).__name__, exc)
            self.failure = exc
            self._server.close()


def _pause_for_test(point: str) -> None:
    """The test hook described in the module docstring."""
    if os.environ.get(_PAUSE_ENV) == point:
        print(f"unixsrv-test: paused at {point}", file=sys.stderr, flush=True)
        sys.stdin.readline()


# ---------------------------------------------------------------------- configuration


def _config_from_args(args: argparse.Namespace) -> ServerConfig:
    data: dict[str, Any] = {}
    if args.config:
        base = _load_config_file(args.config)
        data.update({k: getattr(base, k) for k in base.__dataclass_fields__})
        if (
            base.is_abstract or base.fd is not None
        ):  # no file of ours: the defaults apply to a --socket file
            del data["mode"], data["group"]
    overrides = {
        "path": args.path,
        "mode": args.mode,
        "group": args.group,
        "idle_timeout": None
        if args.idle_timeout is None
        else _duration("--idle-timeout", args.idle_timeout),
        "max_connections": args.max_connections,
        "backlog": args.backlog,
        "allowed_uids": ",".join(args.allow_uid) if args.allow_uid else None,
        "allowed_gids": ",".join(args.allow_gid) if args.allow_gid else None,
        "max_connections_per_uid": args.max_connections_per_uid,
    }
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["sd_notify"] = True  # a no-op unless systemd (or a test) set $NOTIFY_SOCKET
    activated = "path" not in data and os.environ.get("LISTEN_FDS")
    if args.socket_name is not None and not activated:
        raise ConfigError(
            "--socket-name picks a socket passed by socket activation: no $LISTEN_FDS, or --socket given"
        )
    if activated:
        # Socket activation: the socket's mode is the .socket unit's (SocketMode=).
        for key in ("mode", "group"):
            if overrides[key] is None:
                data.pop(key, None)
        return ServerConfig.from_systemd(args.socket_name, **data)
    if "path" not in data:
        raise ConfigError("give --socket PATH or a --config file with an address")
    return ServerConfig(**data)


def _serve_metrics(address: str, server: Server | _HostedServer) -> Any:
    """Start the --metrics endpoint for ``server`` (a MetricsEndpoint: close() stops it)."""
    try:
        from .metrics import collect_servers, serve_metrics
    except ImportError as exc:
        raise ConfigError(
            f"--metrics needs prometheus_client (pip install 'unixsrv[metrics]'): {exc}"
        ) from None
    return serve_metrics(address, collect_servers([server]))


def _load_config_file(path: str) -> ServerConfig:
    """The ServerConfig a JSON file describes; any problem is a ConfigError
    naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the configuration file: {exc.strerror or exc}"
        ) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of settings, not {_json_type(data)}")
    try:
        return ServerConfig.from_mapping(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _json_type(value: Any) -> str:
    names = {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


_NUMBER = re.compile(
    r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE
)


def _duration(option: str, text: str, *, infinite: bool = False) -> float:
    """Seconds from a command-line duration: what the config file takes (a Go
    duration such as "1m30s", parsed by config.parse_duration) or a plain
    number of seconds; "inf" too if ``infinite`` (no limit)."""
    value: str | float = text
    if _NUMBER.fullmatch(text.strip()):
        value = float(text)
        if infinite and value == math.inf:
            return value
    try:
        return parse_duration(value)
    except ConfigError as exc:
        allowed = "a number of seconds >= 0, a Go duration such as 1m30s" + (
            ", or inf" if infinite else ""
        )
        raise ConfigError(f"{option} {text!r}: {exc}; expected {allowed}") from None


# ---------------------------------------------------------------------- --handler / --protocol


def _import(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"expected MODULE:NAME, got {spec!r}")
    # The current directory first, as `python -m` and uvicorn/gunicorn do: the
    # `unixsrv` console script's sys.path starts with its own bin directory.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or module_name.startswith(
            f"{exc.name}."
        ):  # the module (or a parent) is missing
            raise ConfigError(f"cannot load {spec!r}: {exc}") from None
        raise ConfigError(_import_failure(module_name, exc)) from None
    except Exception as exc:
        raise ConfigError(_import_failure(module_name, exc)) from None
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise ConfigError(f"cannot load {spec!r}: {exc}") from None
    return obj


def _import_failure(module_name: str, exc: Exception) -> str:
    """One line naming the module's file and what went wrong importing it."""
    if isinstance(exc, SyntaxError):
        where = f"{exc.filename}, line {exc.lineno}"
        problem = f"SyntaxError: {exc.msg}"
    else:
        try:
            spec = importlib.util.find_spec(module_name)
        except Exception:
            spec = None
        where = spec.origin if spec is not None and spec.origin else "?"
        problem = f"{type(exc).__name__}: {exc}"
    return f"cannot import {module_name!r} ({where}): {problem}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
