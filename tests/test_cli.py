"""The ``unixsrv`` command (src/unixsrv/cli.py, src/unixsrv/__main__.py), run as a real process.

DESIGN.md: "the CLI maps SIGTERM to a graceful shutdown"; layout "cli.py,
__main__.py: the `unixsrv` command".  Each test starts
``python -m unixsrv ...`` and ends it by its PID.  Readiness is a successful
connect polled with a deadline, never a sleep.  Checklist items 2 (a second
server never takes over a live one), 12 (mode), 42 (signal -> cleanup).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import connect, echo, end_processes, finish, make_room, recv_exactly, recv_until_eof, wait_until

import unixsrv

Cli = Callable[..., subprocess.Popen]


@pytest.fixture
def cli(tmp_path) -> Iterator[Cli]:
    """Start ``python -m unixsrv ARGS`` (stdout/stderr captured, ``tmp_path`` on
    PYTHONPATH for handler modules); every process is ended by its PID."""
    procs: list[subprocess.Popen] = []

    def factory(*args: str, **kwargs: Any) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
        env.pop("PYTHONWARNINGS", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "unixsrv", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
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
            raise AssertionError(f"unixsrv exited with {proc.returncode} before serving:\n{out}\n{err}")
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
    """Without --mode the socket file gets golib's default 0770 (DESIGN)."""
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
    """DESIGN: the CLI maps SIGTERM (and SIGINT) to a graceful shutdown: a connected
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
        wait_until(lambda: os.path.exists(sock_path) or proc.poll() is not None, interval=0.0)
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
        json.dumps({"network": "unix", "address": file_path, "perm-file": "0600", "con-idle-timeout": "1h"}),
        encoding="utf-8",
    )
    proc = cli("serve", "--config", str(cfg), "--socket", flag_path, "--mode", "0640", "--idle-timeout", "0.3",
               "--echo", "--model", "blocking")
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
#: timers answer and close, a large answer is written on request.
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


def stopped_stats(err: str) -> dict[str, int]:
    """The counters of the "stopped: accepted=N, ..." log line."""
    [line] = [line for line in err.splitlines() if "stopped: " in line]
    return {k: int(v) for k, v in (item.split("=") for item in line.split("stopped: ", 1)[1].split(", "))}


def test_protocol_using_the_loop(cli, sock_path, tmp_path):
    """`--protocol` runs the factory through unixsrv.asyncio: a protocol that
    uses the running loop (create_task, call_later) works from the command
    line; SIGTERM stops it gracefully (an idle client gets EOF), exit 0, the
    socket file is removed and the final stats are logged."""
    write_module(tmp_path, "cliloop_mod", LOOP_PROTOCOL)
    proc = cli("serve", "--socket", sock_path, "--protocol", "cliloop_mod:Delayed", "--shutdown-timeout", "5")
    wait_serving(proc, sock_path)
    with connect(sock_path) as s, connect(sock_path) as idle:
        assert recv_exactly(s, 15) == b"hi from a task\n"
        s.sendall(b"abc")
        assert recv_exactly(s, 3) == b"ABC"  # written by a call_later timer
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b""  # closed by a call_later timer
        assert recv_exactly(idle, 15) == b"hi from a task\n"
        os.kill(proc.pid, signal.SIGTERM)
        assert recv_until_eof(idle) == b""  # graceful: the idle client is released
        status, _, err = finish(proc)
    assert status == 0, err
    assert not os.path.lexists(sock_path)
    assert "SIGTERM: shutting down gracefully" in err
    assert "Traceback" not in err and "exception" not in err.lower(), err
    stats = stopped_stats(err)
    assert stats["accepted"] >= 3 and stats["closed"] == stats["accepted"] and stats["open"] == 0, stats
    assert stats["errors"] == 0, stats


@pytest.mark.parametrize("stop", ["second-signal", "grace-expires"])
def test_protocol_shutdown_that_cannot_drain(cli, sock_path, tmp_path, stop):
    """A client that never reads a 16 MiB answer keeps the graceful
    shutdown of `--protocol` waiting for the flush: a second signal closes
    at once ("closing now"), or --shutdown-timeout expires and the rest is
    aborted with a WARNING; either way the process exits 0 promptly and
    removes the socket file."""
    write_module(tmp_path, "cliflood_mod", LOOP_PROTOCOL)
    grace = "60" if stop == "second-signal" else "0.5"
    proc = cli("serve", "--socket", sock_path, "--protocol", "cliflood_mod:Delayed", "--shutdown-timeout", grace)
    wait_serving(proc, sock_path)
    with connect(sock_path) as s:
        assert recv_exactly(s, 15) == b"hi from a task\n"
        s.sendall(b"flood")
        recv_exactly(s, 1)  # the answer is being written; the rest stays unread
        os.kill(proc.pid, signal.SIGTERM)
        if stop == "second-signal":
            wait_until(lambda: not os.path.lexists(sock_path))  # the first signal was handled
            os.kill(proc.pid, signal.SIGINT)
        status, _, err = finish(proc)
    assert status == 0, err
    assert not os.path.lexists(sock_path)
    assert "Traceback" not in err, err
    if stop == "second-signal":
        assert "SIGINT: closing now" in err
    assert "aborted" in err  # the connection that could not drain, reported
    stats = stopped_stats(err)
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

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name == "unixsrv"}
    assert scripts == {"unixsrv": "unixsrv.cli:main"}
