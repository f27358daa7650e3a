"""The ``unixsrv`` command (src/unixsrv/cli.py, src/unixsrv/__main__.py), run as a real process.

docs/design.md: "the CLI maps SIGTERM to a graceful shutdown"; layout "cli.py,
__main__.py: the `unixsrv` command".  Each test starts
``python -m unixsrv ...`` and ends it by its PID.  Readiness is a successful
connect polled with a deadline, never a sleep.  Checklist items 2 (a second
server never takes over a live one), 12 (mode), 42 (signal -> cleanup).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import unixsrv
from conftest import (
    connect,
    echo,
    end_processes,
    finish,
    make_room,
    read_line,
    recv_exactly,
    recv_until_eof,
    wait_until,
)

Cli = Callable[..., subprocess.Popen]


@pytest.fixture
def cli(tmp_path) -> Iterator[Cli]:
    """Start ``python -m unixsrv ARGS`` (stdout/stderr captured, ``tmp_path`` on
    PYTHONPATH for handler modules; ``env=`` adds variables, ``stdin=`` and
    ``stderr=`` replace the defaults); every process is ended by its PID."""
    procs: list[subprocess.Popen] = []

    def factory(*args: str, **kwargs: Any) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
        env.pop("PYTHONWARNINGS", None)
        env.update(kwargs.pop("env", {}))
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(
            [sys.executable, "-m", "unixsrv", *args],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            **kwargs,
        )
        procs.append(proc)
        return proc

    yield factory
    end_processes(procs)


def wait_serving(proc: subprocess.Popen, path: str) -> None:
    """Poll until a client can connect to ``path``; fail early if the process died."""

    def ready() -> bool:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"unixsrv exited with {proc.returncode} before serving:\n{out}\n{err}"
            )
        if not os.path.exists(path):
            return False
        try:
            with connect(path, timeout=1.0):
                return True
        except OSError:
            return False

    wait_until(ready)


def echo_round_trip(path: str, payload: bytes = b"ping over unix") -> None:
    with connect(path) as s:
        make_room(s, len(payload))  # all of it is sent before the echo is read
        s.sendall(payload)
        assert recv_exactly(s, len(payload)) == payload
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b""


def terminate(proc: subprocess.Popen) -> str:
    """SIGTERM a serving ``unixsrv``; it must exit 0 by itself; its stderr."""
    os.kill(proc.pid, signal.SIGTERM)
    status, _, err = finish(proc)
    assert status == 0, err
    return err


def write_module(directory, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")


# ---------------------------------------------------------------------- serving


@pytest.mark.parametrize("model", ["event", "blocking"])
def test_serve_echo(cli, sock_path, model):
    """`serve --socket P --echo --model M` serves the built-in echo."""
    proc = cli("serve", "--socket", sock_path, "--echo", "--model", model)
    wait_serving(proc, sock_path)
    echo_round_trip(sock_path)
    echo_round_trip(sock_path, os.urandom(200_000))
    assert proc.poll() is None


def test_default_mode_is_0770(cli, sock_path):
    """Without --mode the socket file gets golib's default 0770 (docs/design.md)."""
    proc = cli("serve", "--socket", sock_path, "--echo")
    wait_serving(proc, sock_path)
    st = os.lstat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o770


@pytest.mark.parametrize("mode", ["0660", "rw-------"])
def test_mode_flag(cli, sock_path, mode):
    """Checklist 12: `--mode 0660` gives exactly mode 0660 on the socket file."""
    proc = cli("serve", "--socket", sock_path, "--echo", "--mode", mode)
    wait_serving(proc, sock_path)
    st = os.lstat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == (0o660 if mode == "0660" else 0o600)
    echo_round_trip(sock_path)


# ---------------------------------------------------------------------- signals


@pytest.mark.parametrize("model", ["event", "blocking"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully(cli, sock_path, model, signum):
    """docs/design.md: the CLI maps SIGTERM (and SIGINT) to a graceful shutdown: a connected
    client gets EOF, the process exits 0, the socket file is removed, the log says so
    (checklist 42)."""
    proc = cli("serve", "--socket", sock_path, "--echo", "--model", model)
    wait_serving(proc, sock_path)
    with connect(sock_path) as client:
        echo(client, b"before")
        os.kill(proc.pid, signum)
        assert recv_until_eof(client) == b""  # graceful: the idle client is released
        status, _, err = finish(proc)
    assert status == 0, err
    assert not os.path.lexists(sock_path)
    name = signal.Signals(signum).name
    assert name in err
    assert "shutting down" in err.lower()
    assert "stopped" in err.lower()
    assert "Traceback" not in err


def test_signal_with_no_client(cli, sock_path):
    """SIGTERM on an idle server: exit 0 promptly, file gone."""
    proc = cli("serve", "--socket", sock_path, "--echo")
    wait_serving(proc, sock_path)
    terminate(proc)
    assert not os.path.lexists(sock_path)


def test_sigterm_as_soon_as_socket_appears(cli, sock_path):
    """A SIGTERM that lands right after the socket file appears (a service manager
    stopping a unit it just started) still stops the server gracefully: exit 0,
    file gone.  Tried several times, signalling the moment the file exists."""
    for _ in range(5):
        proc = cli("serve", "--socket", sock_path, "--echo")
        wait_until(lambda p=proc: os.path.exists(sock_path) or p.poll() is not None, interval=0.0)
        terminate(proc)
        assert not os.path.lexists(sock_path)


# ---------------------------------------------------------------------- address in use


def test_second_server_on_same_path_fails(cli, sock_path):
    """Checklist 2 / W3: a second server on a live path exits with status 2 and an
    'in use' message naming the path; the first keeps its file and keeps serving."""
    first = cli("serve", "--socket", sock_path, "--echo")
    wait_serving(first, sock_path)
    inode = os.lstat(sock_path).st_ino
    second = cli("serve", "--socket", sock_path, "--echo", "--model", "blocking")
    status, _, err = finish(second)
    assert status == 2, err
    assert "in use" in err.lower()
    assert sock_path in err
    assert "Traceback" not in err
    assert os.lstat(sock_path).st_ino == inode
    assert first.poll() is None
    echo_round_trip(sock_path)


def test_path_taken_by_regular_file(cli, sock_path):
    """Checklist 1: a regular file at the path -> exit 2, file untouched."""
    with open(sock_path, "wb") as f:
        f.write(b"precious")
    status, _, err = finish(cli("serve", "--socket", sock_path, "--echo"))
    assert status == 2, err
    assert sock_path in err
    with open(sock_path, "rb") as f:
        assert f.read() == b"precious"


# ---------------------------------------------------------------------- --config


def test_config_file_with_golib_keys(cli, sock_path, tmp_path):
    """`--config file.json` takes golib's keys (network, address, perm-file, con-idle-timeout)."""
    cfg = tmp_path / "server.json"
    cfg.write_text(
        json.dumps(
            {
                "network": "unix",
                "address": sock_path,
                "perm-file": "0600",
                "group-perm": -1,
                "con-idle-timeout": "300ms",
                "tls": {"enabled": False},
            }
        ),
        encoding="utf-8",
    )
    proc = cli("serve", "--config", str(cfg), "--echo")
    wait_serving(proc, sock_path)
    assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
    echo_round_trip(sock_path)
    # con-idle-timeout "300ms": a silent client is closed by the server.
    with connect(sock_path) as idle:
        assert recv_until_eof(idle) == b""


def test_flags_override_config_file(cli, sock_dir, tmp_path):
    """Flags win over the file: --socket, --mode and --idle-timeout replace the file's values."""
    file_path = os.path.join(sock_dir, "from-file.sock")
    flag_path = os.path.join(sock_dir, "from-flag.sock")
    cfg = tmp_path / "server.json"
    cfg.write_text(
        json.dumps(
            {"network": "unix", "address": file_path, "perm-file": "0600", "con-idle-timeout": "1h"}
        ),
        encoding="utf-8",
    )
    proc = cli(
        "serve",
        "--config",
        str(cfg),
        "--socket",
        flag_path,
        "--mode",
        "0640",
        "--idle-timeout",
        "0.3",
        "--echo",
        "--model",
        "blocking",
    )
    wait_serving(proc, flag_path)
    assert not os.path.lexists(file_path)
    assert stat.S_IMODE(os.lstat(flag_path).st_mode) == 0o640
    echo_round_trip(flag_path)
    # --idle-timeout 0.3 replaced the file's 1h: a silent client is closed well within DEADLINE.
    with connect(flag_path) as idle:
        assert recv_until_eof(idle) == b""


@pytest.mark.parametrize(
    "content",
    [
        {"network": "tcp", "address": "/tmp/unused-unixsrv.sock"},
        {"address": "/tmp/unused-unixsrv.sock", "tls": {"enabled": True}},
        {"address": "/tmp/unused-unixsrv.sock", "no-such-key": 1},
    ],
)
def test_bad_config_file(cli, tmp_path, content):
    """A config the library rejects (W20 network, enabled tls, unknown key) -> exit 2, no traceback."""
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps(content), encoding="utf-8")
    status, _, err = finish(cli("serve", "--config", str(cfg), "--echo"))
    assert status == 2, err
    assert "Traceback" not in err
    assert not os.path.lexists("/tmp/unused-unixsrv.sock")


def test_missing_config_file(cli, tmp_path):
    """A --config file that does not exist -> exit 2 naming it."""
    missing = str(tmp_path / "absent.json")
    status, _, err = finish(cli("serve", "--config", missing, "--echo"))
    assert status == 2, err
    assert missing in err


def test_no_socket_given(cli):
    """Neither --socket nor a config address -> exit 2 with a message."""
    status, _, err = finish(cli("serve", "--echo"))
    assert status == 2, err
    assert "--socket" in err


# ---------------------------------------------------------------------- --handler / --protocol


def test_handler_module_function(cli, sock_path, tmp_path):
    """`--handler module:function` runs a user's blocking handler from PYTHONPATH."""
    write_module(
        tmp_path,
        "clihandler_mod",
        """
        def handle(conn):
            data = b""
            while chunk := conn.read():
                data += chunk
            conn.write(b"handled:" + data.upper())
        """,
    )
    proc = cli("serve", "--socket", sock_path, "--handler", "clihandler_mod:handle")
    wait_serving(proc, sock_path)
    with connect(sock_path) as s:
        s.sendall(b"hello")
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b"handled:HELLO"
    assert "clihandler_mod:handle" in terminate(proc)


def test_protocol_module_class(cli, sock_path, tmp_path):
    """`--protocol module:Class` runs a user's asyncio.Protocol (event model)."""
    write_module(
        tmp_path,
        "cliproto_mod",
        """
        import asyncio

        class Upper(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                self.transport.write(data.upper())

            def eof_received(self):
                self.transport.write(b"<bye>")
                self.transport.close()
        """,
    )
    proc = cli("serve", "--socket", sock_path, "--protocol", "cliproto_mod:Upper")
    wait_serving(proc, sock_path)
    with connect(sock_path) as s:
        s.sendall(b"abc")
        assert recv_exactly(s, 3) == b"ABC"
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b"<bye>"
    terminate(proc)


#: A protocol that needs a running event loop: a task greets, call_later
#: timers answer and close, b"flood" gets a 16 MiB answer.
LOOP_PROTOCOL = """
import asyncio

class Delayed(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.loop.create_task(self.greet())

    async def greet(self):
        await asyncio.sleep(0)
        if not self.transport.is_closing():
            self.transport.write(b"hi from a task\\n")

    def data_received(self, data):
        if data == b"flood":
            self.transport.write(b"x" * (16 * 1024 * 1024))
        else:
            self.loop.call_later(0.01, self.transport.write, data.upper())

    def eof_received(self):
        self.loop.call_later(0.01, self.transport.close)
        return True
"""
GREETING = b"hi from a task\n"


def stopped_stats(err: str) -> dict[str, int]:
    """The counters of the "stopped: accepted=N, ..." log line."""
    [line] = [line for line in err.splitlines() if "stopped: " in line]
    return {
        k: int(v)
        for k, v in (item.split("=") for item in line.split("stopped: ", 1)[1].split(", "))
    }


def test_protocol_using_the_loop(cli, sock_path, tmp_path):
    """`--protocol` runs the factory through unixsrv.asyncio: a protocol that
    uses the running loop (create_task, call_later) works from the command
    line; SIGTERM stops it gracefully (an idle client gets EOF), exit 0, the
    socket file is removed and the final stats are logged."""
    write_module(tmp_path, "cliloop_mod", LOOP_PROTOCOL)
    proc = cli(
        "serve",
        "--socket",
        sock_path,
        "--protocol",
        "cliloop_mod:Delayed",
        "--shutdown-timeout",
        "5",
    )
    wait_serving(proc, sock_path)
    with connect(sock_path) as s, connect(sock_path) as idle:
        assert recv_exactly(s, len(GREETING)) == GREETING
        s.sendall(b"abc")
        assert recv_exactly(s, 3) == b"ABC"  # written by a call_later timer
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b""  # closed by a call_later timer
        assert recv_exactly(idle, len(GREETING)) == GREETING
        os.kill(proc.pid, signal.SIGTERM)
        assert recv_until_eof(idle) == b""  # graceful: the idle client is released
        status, _, err = finish(proc)
    assert status == 0, err
    assert not os.path.lexists(sock_path)
    assert "SIGTERM: shutting down gracefully" in err
    assert "Traceback" not in err and "exception" not in err.lower(), err
    stats = stopped_stats(err)
    assert stats["accepted"] >= 3 and stats["closed"] == stats["accepted"] and stats["open"] == 0, (
        stats
    )
    assert stats["errors"] == 0, stats


@pytest.mark.parametrize("stop", ["second-signal", "grace-expires"])
def test_protocol_stop_that_cannot_drain_exits_1(cli, sock_path, tmp_path, stop):
    """A client that never reads a 16 MiB answer keeps the graceful stop of
    `--protocol` waiting for the flush: a second signal closes at once, or
    --shutdown-timeout expires and the rest is aborted; either way the
    process exits 1 promptly, says why, and removes the socket file (the
    other models' rules, test_graceful_stop_that_times_out_exits_1 and
    test_second_signal_cutting_connections_exits_1)."""
    write_module(tmp_path, "cliflood_mod", LOOP_PROTOCOL)
    grace = "1h" if stop == "second-signal" else "200ms"
    proc = cli(
        "serve",
        "--socket",
        sock_path,
        "--protocol",
        "cliflood_mod:Delayed",
        "--shutdown-timeout",
        grace,
        stderr=subprocess.STDOUT,
    )
    wait_serving(proc, sock_path)
    with connect(sock_path) as s:
        assert recv_exactly(s, len(GREETING)) == GREETING
        s.sendall(b"flood")
        recv_exactly(s, 1)  # the answer is being written; the rest stays unread
        os.kill(proc.pid, signal.SIGTERM)
        if stop == "second-signal":
            while "shutting down gracefully (up to 3600 s" not in read_line(proc):
                pass
            os.kill(proc.pid, signal.SIGINT)
        status, out, _ = finish(proc)
    assert status == 1, out
    assert not os.path.lexists(sock_path)
    assert "Traceback" not in out, out
    if stop == "second-signal":
        assert "SIGINT: closing now" in out
        # The flooded connection, and wait_serving's probe if its delayed close is still pending.
        assert re.search(r"closed the server with [12] connection\(s\) open", out), out
    else:
        assert "timed out" in out
    stats = stopped_stats(out)
    assert stats["open"] == 0 and stats["closed"] == stats["accepted"], stats


def test_nested_attribute_spec(cli, sock_path, tmp_path):
    """`module:Obj.attr` resolves dotted attributes."""
    write_module(
        tmp_path,
        "clinested_mod",
        """
        class Holder:
            @staticmethod
            def handle(conn):
                conn.write(b"nested")
        """,
    )
    proc = cli("serve", "--socket", sock_path, "--handler", "clinested_mod:Holder.handle")
    wait_serving(proc, sock_path)
    with connect(sock_path) as s:
        assert recv_until_eof(s) == b"nested"


@pytest.mark.parametrize(
    ("option", "spec"),
    [
        ("--handler", "no_colon_here"),
        ("--handler", ":handle"),
        ("--handler", "clibad_mod:"),
        ("--handler", "clibad_mod:missing_function"),
        ("--handler", "no_such_module_unixsrv_test:handle"),
        ("--handler", "clibad_mod:NOT_CALLABLE"),
        ("--protocol", "clibad_mod:MissingProtocol"),
        ("--protocol", "no_such_module_unixsrv_test:Proto"),
        ("--protocol", "clibad_mod:NOT_CALLABLE"),
    ],
)
def test_bad_handler_spec(cli, sock_path, tmp_path, option, spec):
    """A bad --handler/--protocol spec (malformed, unknown module or attribute, not
    callable) -> exit status 2 with an error message, no traceback, nothing created."""
    write_module(tmp_path, "clibad_mod", "NOT_CALLABLE = 42\n")
    status, _, err = finish(cli("serve", "--socket", sock_path, option, spec))
    assert status == 2, err
    assert "Traceback" not in err
    assert "ERROR" in err
    assert not os.path.lexists(sock_path)


def test_handler_and_echo_are_exclusive(cli, sock_path):
    """--echo, --handler and --protocol are mutually exclusive (argparse exits 2)."""
    status, _, err = finish(cli("serve", "--socket", sock_path, "--echo", "--handler", "m:f"))
    assert status == 2
    assert "not allowed" in err
    assert not os.path.lexists(sock_path)


def test_workers_with_protocol(cli, sock_path, tmp_path):
    """--protocol --workers 2: each worker process runs the factory on an
    asyncio loop of its own (unixsrv.asyncio.prefork_server); SIGHUP
    replaces the workers, SIGTERM stops them all (exit 0, file removed)."""
    write_module(
        tmp_path,
        "cliworkers_mod",
        """
        import asyncio, os

        class Proto(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                # Through the running loop: only an asyncio loop serves this.
                asyncio.get_running_loop().call_soon(transport.write, b"%d\\n" % os.getpid())

            def data_received(self, data):
                self.transport.write(data)
        """,
    )
    proc = cli(
        *("serve", "--socket", sock_path, "--protocol", "cliworkers_mod:Proto", "--workers", "2"),
        stderr=subprocess.STDOUT,
    )
    while "(2 workers)" not in read_line(proc):  # read_line fails after DEADLINE
        pass

    def greeter() -> int:
        with connect(sock_path) as s, s.makefile("rb") as f:
            pid = int(f.readline())
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"ping"
        return pid

    first = greeter()
    assert first not in (proc.pid, os.getpid())
    os.kill(proc.pid, signal.SIGHUP)
    while "reloaded 2 workers" not in read_line(proc):
        pass
    assert greeter() != first  # a new worker process
    os.kill(proc.pid, signal.SIGTERM)
    status, out, _ = finish(proc)
    assert status == 0, out
    assert not os.path.lexists(sock_path)


# ---------------------------------------------------------------------- misc


def test_version(cli):
    """`--version` prints 'unixsrv <version>' and exits 0."""
    status, out, err = finish(cli("--version"))
    assert status == 0, err
    assert out.strip() == f"unixsrv {unixsrv.__version__}"


def test_no_command(cli):
    """No sub-command -> usage error, exit 2."""
    status, _, err = finish(cli())
    assert status == 2
    assert "usage" in err.lower()


def test_console_script_entry_point():
    """The `unixsrv` console script points at unixsrv.cli:main."""
    from importlib.metadata import entry_points

    scripts = {
        ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name == "unixsrv"
    }
    assert scripts == {"unixsrv": "unixsrv.cli:main"}


# ---------------------------------------------------------------------- issue 8: signals at any moment


def error_line(err: str) -> str:
    """The one line a CLI error prints: no traceback, nothing else."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def pausing(cli: Cli, point: str, *args: str) -> subprocess.Popen:
    """``unixsrv ARGS`` with the CLI's test hook (UNIXSRV_TEST_PAUSE_AT, see
    cli.py) set to stop at ``point``; its stderr is merged into stdout."""
    return cli(
        *args, env={"UNIXSRV_TEST_PAUSE_AT": point}, stdin=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def wait_paused(proc: subprocess.Popen, point: str) -> None:
    """Until the process says it is held at ``point``; it goes on when a
    line is written to its stdin (``resume``)."""
    while (line := read_line(proc)) != f"unixsrv-test: paused at {point}":
        assert "Traceback" not in line, line


def paused(cli: Cli, point: str, *args: str) -> subprocess.Popen:
    """``unixsrv ARGS`` held at ``point`` of its start-up."""
    proc = pausing(cli, point, *args)
    wait_paused(proc, point)
    return proc


def resume(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()


@pytest.mark.parametrize("model", ["event", "blocking", "protocol"])
@pytest.mark.parametrize("point", ["handlers", "built", "listening", "started"])
def test_sigterm_at_any_point_of_startup_stops(cli, sock_path, tmp_path, point, model):
    """Issue 8 finding 6: a SIGTERM at any moment of start-up stops the server
    (it used to be lost when it landed before the loop existed: the log said
    "shutting down" and the server kept serving).  The CLI's test hook holds
    start-up at each point while the signal is sent: exit 0, file gone.
    "protocol": `--protocol` with a loop-using protocol, whose server starts
    on a loop thread through unixsrv.asyncio."""
    what = ["--echo", "--model", model]
    if model == "protocol":
        write_module(tmp_path, "clipoint_mod", LOOP_PROTOCOL)
        what = ["--protocol", "clipoint_mod:Delayed"]
    proc = paused(cli, point, "serve", "--socket", sock_path, *what)
    os.kill(proc.pid, signal.SIGTERM)
    resume(proc)
    status, out, _ = finish(proc)
    assert status == 0, out
    assert "SIGTERM: shutting down gracefully" in out
    assert "stopped:" in out
    assert "Traceback" not in out
    assert not os.path.lexists(sock_path)


def test_signals_after_the_stop_keep_the_exit_status(cli, sock_path):
    """Issue 8 finding 8 (README "Command line"): once a stop has begun the
    process never dies of SIGINT/SIGTERM; signals that land after the server
    stopped are ignored and it exits 0 after a clean stop (it used to die
    with -15 or -2)."""
    proc = pausing(cli, "stopped", "serve", "--socket", sock_path, "--echo")
    wait_serving(proc, sock_path)
    os.kill(proc.pid, signal.SIGTERM)
    wait_paused(proc, "stopped")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        os.kill(proc.pid, signum)
    resume(proc)
    status, out, _ = finish(proc)
    assert status == 0, out


def test_signal_burst_exits_0_when_nothing_was_cut(cli, sock_path):
    """A burst of signals on an idle server: the first shuts down, the
    second closes at once (no connection was open, so nothing was cut), the
    rest are logged or ignored; exit status 0, never death by signal."""
    proc = cli("serve", "--socket", sock_path, "--echo", stderr=subprocess.STDOUT)
    # Ready once it says it serves: wait_serving's probe connection may not
    # be closed on the server's side yet when the burst lands, and the
    # second signal would then rightly report it as cut (exit 1).
    while "SIGINT or SIGTERM stops it" not in read_line(proc):
        pass
    for _ in range(5):
        os.kill(proc.pid, signal.SIGTERM)
    status, out, _ = finish(proc)
    assert status == 0, out
    assert "closed the server with" not in out
    assert not os.path.lexists(sock_path)


_STUBBORN = """
import threading

def handle(conn):
    conn.write(b"r")
    threading.Event().wait(60)   # ignores the shutdown: only the force-close ends it
"""


def test_graceful_stop_that_times_out_exits_1(cli, sock_path, tmp_path):
    """Issue 8 finding 8: a graceful stop that times out (a handler ignores
    it) exits 1, not 0, and says why."""
    write_module(tmp_path, "clistubborn_mod", _STUBBORN)
    proc = cli(
        "serve",
        "--socket",
        sock_path,
        "--handler",
        "clistubborn_mod:handle",
        "--shutdown-timeout",
        "200ms",
    )
    wait_serving(proc, sock_path)
    with connect(sock_path) as s:
        assert recv_exactly(s, 1) == b"r"
        os.kill(proc.pid, signal.SIGTERM)
        status, _, err = finish(proc)
    assert status == 1, err
    assert "timed out" in err
    assert "force-closed" in err


@pytest.mark.parametrize(("timeout", "said"), [("1h", "up to 3600 s"), ("inf", "no time limit")])
def test_second_signal_cutting_connections_exits_1(cli, sock_path, tmp_path, timeout, said):
    """A second signal closes at once; connections it cut make the status 1.
    With `--shutdown-timeout inf` too: the graceful stop that has no limit
    still gives way to the second signal."""
    module = f"clistubborn2_{timeout}_mod"
    write_module(tmp_path, module, _STUBBORN)
    proc = cli(
        "serve",
        "--socket",
        sock_path,
        "--handler",
        f"{module}:handle",
        "--shutdown-timeout",
        timeout,
        stderr=subprocess.STDOUT,
    )
    # Ready once it says it serves: wait_serving's probe connection would be
    # served by the stubborn handler too and count as a second open one.
    while "SIGINT or SIGTERM stops it" not in read_line(proc):
        pass
    with connect(sock_path) as s:
        assert recv_exactly(s, 1) == b"r"
        os.kill(proc.pid, signal.SIGTERM)
        while f"shutting down gracefully ({said}" not in read_line(proc):
            pass
        os.kill(proc.pid, signal.SIGTERM)
        status, out, _ = finish(proc)
    assert status == 1, out
    assert "closed the server with 1 connection(s) open" in out, out


_SIGNAL_TO_A_WORKER = """
import signal, threading

def handle(conn):
    # Thread-directed (pthread_kill): the kernel delivers it to this worker
    # thread, as it may deliver a process-directed one (signal(7)).
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
"""


def test_a_signal_delivered_to_another_thread_stops_the_server(cli, sock_path, tmp_path):
    """A process-directed SIGTERM may land on any thread (the loop's, a
    worker's); the main thread must hear of it.  It used to wait in a queue
    that only a signal delivered to the main thread itself could interrupt:
    the stop was lost and the server kept serving (a flaky test on a loaded
    machine).  Made certain here: the handler sends SIGTERM to its own
    worker thread (wait_serving's probe connection runs it)."""
    write_module(tmp_path, "clisigworker_mod", _SIGNAL_TO_A_WORKER)
    proc = cli("serve", "--socket", sock_path, "--handler", "clisigworker_mod:handle")
    wait_serving(proc, sock_path)
    status, _, err = finish(proc)
    assert status == 0, err
    assert "SIGTERM: shutting down gracefully" in err
    assert not os.path.lexists(sock_path)


# ---------------------------------------------------------------------- issue 8: durations


@pytest.mark.parametrize("value", ["1m30s", "90", "0.5", "500ms"])
def test_idle_timeout_takes_config_durations(cli, sock_path, value):
    """Issue 8 finding 8: --idle-timeout takes what the config file takes: a Go
    duration (1m30s was refused) or seconds."""
    proc = cli("serve", "--socket", sock_path, "--echo", "--idle-timeout", value)
    wait_serving(proc, sock_path)
    echo_round_trip(sock_path)
    terminate(proc)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--shutdown-timeout", "nan"),
        ("--shutdown-timeout", "-1"),
        ("--shutdown-timeout", "-1s"),
        ("--shutdown-timeout", "soon"),
        ("--idle-timeout", "inf"),
        ("--idle-timeout", "-5"),
        ("--idle-timeout", "1x"),
    ],
)
def test_bad_duration_refused_at_startup(cli, sock_path, option, value):
    """NaN, negatives and garbage are refused before anything is created:
    one line naming the option, exit 2 (`-1` used to be accepted and give a
    traceback at SIGTERM)."""
    status, _, err = finish(
        cli("serve", "--socket", sock_path, "--echo", f"{option}={value}")
    )  # "=": "-1s" is no option
    assert status == 2, err
    assert option in error_line(err)
    assert not os.path.lexists(sock_path)


def test_shutdown_timeout_inf_means_no_limit(cli, sock_path):
    """`--shutdown-timeout inf`: no limit, and SIGTERM still stops the server."""
    proc = cli("serve", "--socket", sock_path, "--echo", "--shutdown-timeout", "inf")
    wait_serving(proc, sock_path)
    assert "no time limit" in terminate(proc)
    assert not os.path.lexists(sock_path)


# ---------------------------------------------------------------------- issue 8: bad files, one line


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"address": "/tmp/x\xff"}', "not UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'"/tmp/x.sock"', "JSON object"),
        (b"", "not valid JSON"),
        (b'{"address": "SOCK", "tls": {"enable": true}}', "'enable'"),
    ],
)
def test_unreadable_config_file_is_one_line(cli, sock_path, tmp_path, content, problem):
    """Issue 8 finding 8: a config file that is not JSON, not UTF-8, not an
    object, or has an unknown key in a nested section: one line naming the
    file and the problem, exit 2, no traceback, no socket file."""
    cfg = tmp_path / "bad.json"
    cfg.write_bytes(content.replace(b"SOCK", sock_path.encode()))
    status, _, err = finish(cli("serve", "--config", str(cfg), "--echo"))
    assert status == 2, err
    line = error_line(err)
    assert str(cfg) in line
    assert problem in line
    assert not os.path.lexists(sock_path)


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("def handle(conn)\n    pass\n", "SyntaxError"),
        ("raise RuntimeError('no config here')\n", "no config here"),
        ("import no_such_module_unixsrv_dep\n", "no_such_module_unixsrv_dep"),
    ],
)
def test_broken_handler_module_is_one_line(cli, sock_path, tmp_path, source, problem):
    """Issue 8 finding 8: a handler module with a syntax error, or that raises
    at import (a missing dependency included): one line naming the module's
    file and the problem, exit 2, nothing created."""
    (tmp_path / "clibroken_mod.py").write_text(source, encoding="utf-8")
    status, _, err = finish(
        cli("serve", "--socket", sock_path, "--handler", "clibroken_mod:handle")
    )
    assert status == 2, err
    line = error_line(err)
    assert str(tmp_path / "clibroken_mod.py") in line
    assert problem in line
    assert not os.path.lexists(sock_path)


def test_handler_module_from_the_current_directory(cli, sock_path, tmp_path):
    """Issue 8 finding 8: `--handler mymod:fn` imports from the current
    directory, as uvicorn and gunicorn do, also where the interpreter does not
    put it on sys.path (the `unixsrv` console script; here PYTHONSAFEPATH=1,
    which keeps `python -m` from adding it)."""
    app = tmp_path / "app"
    app.mkdir()
    write_module(app, "clicwd_mod", "def handle(conn):\n    conn.write(b'from cwd')\n")
    proc = cli(
        "serve",
        "--socket",
        sock_path,
        "--handler",
        "clicwd_mod:handle",
        cwd=str(app),
        env={"PYTHONSAFEPATH": "1"},
    )
    wait_serving(proc, sock_path)
    with connect(sock_path) as s:
        assert recv_until_eof(s) == b"from cwd"
    terminate(proc)


# ---------------------------------------------------------------------- issue 8: --log-level, usage


def test_log_level_after_serve(cli, sock_path):
    """Issue 8 finding 8: --log-level works after `serve` too."""
    proc = cli("serve", "--log-level", "WARNING", "--socket", sock_path, "--echo")
    wait_serving(proc, sock_path)
    assert "INFO" not in terminate(proc)


def test_usage_shows_version_and_log_level(cli):
    """The synopsis of `unixsrv` and of `unixsrv serve` name --log-level; the top one --version."""
    status, top, _ = finish(cli("--help"))
    assert status == 0
    assert "--version" in top and "--log-level" in top
    status, serve, _ = finish(cli("serve", "--help"))
    assert status == 0
    assert "--log-level" in serve
