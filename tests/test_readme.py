"""README.md as a newcomer meets it (issue 11, point 5).

- Every Python example that is a whole program runs as written, on a machine
  with nothing prepared: each in a child process with ``$XDG_RUNTIME_DIR``
  pointing at a fresh directory (where the examples put their sockets).  A
  program ends by itself with status 0, or (one that calls
  ``serve_forever()``) serves: its socket appears, it answers a connection,
  and SIGINT (sent to its PID) stops it and removes the socket file.  The fragments (a signature, a line that continues the
  example above it) are listed in ``FRAGMENTS`` with the reason, and compile.
- Every reference to a README section from the code, the tests and the docs
  (``README "Section"``, ``README section "Section"``, ``README.md#anchor``,
  and the README's own ``(#anchor)`` links) names a section that exists.
- The code map in "Development" lists exactly the files of the repository,
  one sentence each.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from conftest import DEADLINE, connect, env_for_child, recv_exactly, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

#: Python blocks that are not whole programs, by their first line: why not.
FRAGMENTS = {
    "server.shutdown(timeout=10)  # stop accepting now, let work finish, force-close after 10 s": (
        "continues the quick-start example above it"
    ),
    "Server(config, handler=None, *, protocol=None, update_conn=None)": "a signature",
    "ServerConfig(": "the arguments of a config and a server (handler, blocked_pid: the reader's)",
    "from prometheus_client import REGISTRY, start_http_server": (
        "server_a and server_b are the reader's servers; it binds a TCP port"
    ),
    'srv = Server(ServerConfig(path="/run/app.sock", mode=0o660), protocol=AppProtocol, workers=4)': (
        "AppProtocol is the reader's protocol"
    ),
}

#: What each serving example answers, by the name of its socket file.
EXCHANGES = {
    "upper.sock": (b"hello", b"HELLO"),  # Quick start, blocking model
    "app.sock": (b"hello", b"hello"),  # Switching from asyncio (an echo)
    "http.sock": (b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.0 200"),  # Switching from socketserver
}
# Every serving example gets an answer before its SIGINT: the answer shows
# that it reached serve_forever() (the socket file exists from the bind on,
# and an interrupt before serve_forever() would end it another way).


def _blocks(text: str) -> Iterator[tuple[int, str, str]]:
    """(line number, language, body) of each fenced code block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang, start = lines[i][3:].strip(), i + 1
            end = start
            while not lines[end].startswith("```"):
                end += 1
            yield start, lang, "\n".join(lines[start:end]) + "\n"
            i = end
        i += 1


def _outside_code(text: str) -> str:
    """The text without its fenced code blocks (a '#' there is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _headings(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", _outside_code(text), re.M)]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _python_blocks() -> list[tuple[int, str]]:
    return [(line, body) for line, lang, body in _blocks(README) if lang == "python"]


def _programs() -> list[tuple[int, str]]:
    return [
        (line, body) for line, body in _python_blocks() if body.splitlines()[0] not in FRAGMENTS
    ]


def test_fragments_are_still_there_and_compile() -> None:
    """FRAGMENTS names blocks that exist (no stale entry) and each is valid Python."""
    firsts = {body.splitlines()[0]: body for _, body in _python_blocks()}
    assert sorted(set(FRAGMENTS) - set(firsts)) == []
    for first, why in FRAGMENTS.items():
        code = firsts[first]
        if why == "a signature":
            code = f"def {code.strip()}: ..."
        compile(code, f"README fragment {first!r}", "exec")
    assert len(_programs()) >= 5, "the examples were not found: the parser is broken"


def _socket_files(directory: str) -> list[str]:
    out = []
    for name in os.listdir(directory):
        if name.startswith("."):  # unixsrv binds under a hidden temporary name first
            continue
        with contextlib.suppress(FileNotFoundError):  # gone between listdir and lstat
            if stat.S_ISSOCK(os.lstat(os.path.join(directory, name)).st_mode):
                out.append(name)
    return out


@pytest.mark.parametrize(("line", "code"), _programs(), ids=[f"line{n}" for n, _ in _programs()])
def test_example_runs_as_written(
    line: int, code: str, sock_dir: str, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    """The example at README line ``line``, unchanged, in a child process."""
    workdir = os.path.join(sock_dir, "cwd")
    os.mkdir(workdir)
    proc = spawn(code, cwd=workdir, env=env_for_child(XDG_RUNTIME_DIR=sock_dir))
    if "serve_forever()" not in code:  # it ends by itself
        _, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == 0, f"README line {line} exited {proc.returncode}:\n{err}"
        return
    # It serves: its socket file appears in $XDG_RUNTIME_DIR once it accepts.
    sockets = wait_until(lambda: proc.poll() is not None or _socket_files(sock_dir))
    assert proc.poll() is None, (
        f"README line {line} exited {proc.returncode}:\n{proc.communicate()[1]}"
    )
    (name,) = sockets
    path = os.path.join(sock_dir, name)
    sent, expected = EXCHANGES[name]
    with connect(path) as s:
        s.sendall(sent)
        assert recv_exactly(s, len(expected)) == expected
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=DEADLINE)
    assert not os.path.exists(path), f"README line {line} left {path} behind:\n{err}"
    assert "Traceback" not in err or "KeyboardInterrupt" in err, err


# ---------------------------------------------------------------- references

#: Where README sections are cited: code, tests, docs, benchmarks, CI.
_CITING = ("src/**/*.py", "src/**/*.pyx", "src/**/*.pxi", "tests/*.py", "docs/**/*.md")
_CITING += ("docs/**/*.rst", "benchmarks/*.py", "benchmarks/*.md", ".ci/*", ".github/**/*.yml")
_CITING += ("CHANGELOG.md", "README.md", "setup.py", "pyproject.toml")


def _citing_files() -> list[pathlib.Path]:
    files = {p for pattern in _CITING for p in ROOT.glob(pattern) if p.is_file()}
    return sorted(files - {pathlib.Path(__file__).resolve()})


def _normalise(quoted: str) -> str:
    """A quoted name that wraps over lines of a docstring or a comment."""
    return " ".join(re.sub(r"\n\s*#?", " ", quoted).split())


def test_every_cited_readme_section_exists() -> None:
    """``README "X"``, ``README's "X" section``, ``README section "X"`` and
    ``README.md#x`` anywhere in the repository name a heading of README.md."""
    headings = _headings(README)
    anchors = {_anchor(h) for h in headings}
    names = {h.replace("`", "") for h in headings}
    cited, missing = 0, []
    for path in _citing_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        where = path.relative_to(ROOT)
        for m in re.finditer(r"README(?:'s)?\s+(?:section\s+)?\"([^\"]+)\"", text):
            cited += 1
            if _normalise(m.group(1)) not in names:
                missing.append(f"{where}: README {m.group(1)!r}")
        for m in re.finditer(r"README\.md#([\w-]+)", text):
            cited += 1
            if m.group(1) not in anchors:
                missing.append(f"{where}: README.md#{m.group(1)}")
    assert cited >= 5, "no citation found: the patterns are broken"
    assert missing == []


def test_readme_in_page_links_resolve() -> None:
    anchors = {_anchor(h) for h in _headings(README)}
    links = re.findall(r"\]\(#([^)]+)\)", _outside_code(README))
    assert links, "no in-page link found: the pattern is broken"
    assert sorted(set(links) - anchors) == []


def test_anchor_rule() -> None:
    assert _anchor("Blocking model: `Connection`") == "blocking-model-connection"
    assert (
        _anchor("Event model: `Protocol` and `Transport`") == "event-model-protocol-and-transport"
    )


# ---------------------------------------------------------------- code map


def _code_map() -> dict[str, str]:
    """{repository path: its sentence} from README's "Code map"."""
    section = README.split("\n### Code map\n", 1)[1].split("\n### ", 1)[0]
    entries: dict[str, str] = {}
    folder = ""
    for line in section.splitlines():
        m = re.match(r"^( *)- `([^`]+)` — (.+)$", line)
        if not m:
            continue
        indent, name, sentence = m.groups()
        if not indent:
            folder = name if name.endswith("/") else ""
            if folder:
                continue  # the folder's own line
            entries[name] = sentence
        else:
            assert folder, f"an indented entry outside a folder: {line!r}"
            entries[folder + name] = sentence
    return entries


def _tracked_files() -> set[str]:
    if shutil.which("git") is None:
        pytest.skip("listing the repository's files needs git")
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        pytest.skip(f"not a git checkout (an sdist?): {out.stderr.strip()}")
    return set(out.stdout.splitlines())


def test_code_map_lists_every_file_once_with_a_sentence() -> None:
    entries = _code_map()
    files = _tracked_files()
    assert sorted(files - set(entries)) == [], "files missing from README's code map"
    assert sorted(set(entries) - files) == [], "code map entries naming no file"
    short = [name for name, sentence in entries.items() if not re.match(r"\S.{8,}\.$", sentence)]
    assert short == [], "each entry says in one sentence (ending in '.') what the file does"


def test_example_sockets_are_found_by_their_socket_type(sock_dir: str) -> None:
    """The runner above recognises a serving example by a socket file in its
    directory: not a plain file, not unixsrv's hidden temporary name."""
    pathlib.Path(sock_dir, "plain").write_text("x")
    with socket.socket(socket.AF_UNIX) as s, socket.socket(socket.AF_UNIX) as hidden:
        s.bind(os.path.join(sock_dir, "s.sock"))
        hidden.bind(os.path.join(sock_dir, ".us-0123"))
        assert _socket_files(sock_dir) == ["s.sock"]


def test_examples_get_ctrl_c_when_the_suite_runs_in_the_background() -> None:
    """The suite started with SIGINT ignored, as a non-interactive shell
    starts `pytest &` or a nohup job: the serve_forever() examples still stop
    on the SIGINT the test sends (conftest gives children the terminal's
    disposition; without it they inherited SIG_IGN and never stopped)."""
    example = next(f"line{n}" for n, code in _programs() if "serve_forever()" in code)
    suite = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    suite += [f"{__file__}::test_example_runs_as_written[{example}]"]
    launcher = "import signal, subprocess, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    launcher += "sys.exit(subprocess.call(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", launcher, *suite],
        cwd=ROOT,
        env=env_for_child(),
        capture_output=True,
        text=True,
        timeout=6 * DEADLINE,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
