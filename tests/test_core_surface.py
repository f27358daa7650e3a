"""The surface of the C extensions ``unixsrv._core`` and ``unixsrv._loadgen`` as plain Python can reach it.

The loop makes its objects through ``__new__`` (or ``PyType_GenericAlloc``)
and fills in their C fields itself; Python code can also make them, through
the constructor or through ``__new__``, with nothing filled in (no loop, fd -1,
a NULL table).  Whatever Python does with such an object must end in a Python
exception, never in a crash.  Each test runs its calls in a child process, so
a segfault fails the test (a negative return code) instead of killing pytest.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import pytest

from conftest import DEADLINE, Collect, Recorder, connect, finish, on_loop, wait_until
from unixsrv import Server

#: Each finding of the hardening issue (issue 8, finding 1) that crashed the
#: interpreter, or its nearest form now that the constructors refuse: the code
#: and the exception it must end in.
REPRODUCTIONS = {
    "Connection()": ("unixsrv.Connection().local_address", "TypeError"),
    "Connection() _finish": ("unixsrv.Connection()._finish()", "TypeError"),
    "Connection.__new__ local_address": ("C.__new__(C).local_address", "RuntimeError"),
    "Connection.__new__ _finish": ("C.__new__(C)._finish()", "RuntimeError"),
    "Connection.__new__ read()": ("C.__new__(C).read()", "RuntimeError"),
    "Connection.__new__ read(n)": ("C.__new__(C).read(10)", "ServerClosedError"),
    "Connection.__new__ write": ("C.__new__(C).write(b'x')", "ServerClosedError"),
    "Transport(None) write": ("unixsrv.Transport(None).write(b'x')", "TypeError"),
    "Transport(None) set_protocol": (
        "unixsrv.Transport(None).set_protocol(object())",
        "TypeError",
    ),
    "Transport(_Stream())": (
        "unixsrv.Transport(_core._Stream()).get_extra_info('sockname')",
        "TypeError",
    ),
    "_Stream()": ("_core._Stream()", "TypeError"),
    "_ConnBase()": ("_core._ConnBase()", "TypeError"),
    "Transport.__new__ write": ("T.__new__(T).write(b'x')", "RuntimeError"),
    "Transport._s = None": (
        "t = T.__new__(T); t._s = None; t.set_protocol(object())",
        "RuntimeError",
    ),
    "Transport._s = a str": (
        "t = T.__new__(T); t._s = 'x'; t.write(b'x')",
        "RuntimeError",
    ),
    "Transport._s = _Stream.__new__": (
        "t = T.__new__(T); t._s = S.__new__(S); t.get_extra_info('sockname')",
        "RuntimeError",
    ),
    "_Stream.__new__ local_address": ("S.__new__(S).local_address", "RuntimeError"),
    "Loop.__new__ abort_all": ("L.__new__(L).abort_all()", "RuntimeError"),
    "Loop.__new__ begin_drain": ("L.__new__(L).begin_drain()", "RuntimeError"),
    "Loop.__new__ teardown": ("L.__new__(L).teardown()", "RuntimeError"),
    "Loop.__new__ run": ("L.__new__(L).run()", "RuntimeError"),
    "Loop.__new__ after fork": (
        "L.__new__(L)._after_fork_in_child(); raise LookupError",
        "LookupError",
    ),
    "Loop()": ("L()", "TypeError"),
    "Loop(config)": ("L(config())", "TypeError"),
    "Loop.__new__ then __init__": ("L.__new__(L).__init__(config())", "TypeError"),
    "new_loop(None)": ("_core.new_loop(None)", "TypeError"),
    "new_loop(LoopConfig.__new__)": (
        "_core.new_loop(_core.LoopConfig.__new__(_core.LoopConfig))",
        "TypeError",
    ),
    "new_loop(LoopOwner.__new__)": (
        "_core.new_loop(config(owner=_core.LoopOwner.__new__(_core.LoopOwner)))",
        "TypeError",
    ),
    "new_loop blocking model without spawn": (
        "_core.new_loop(config(factory=None, owner=_core.LoopOwner(print, print, print)))",
        "TypeError",
    ),
    "LoopOwner(not callable)": ("_core.LoopOwner(print, print, 1)", "TypeError"),
    "new_loop out of memory": ("_core.new_loop(config(read_size=2**60))", "MemoryError"),
    "new_loop never opened: run": ("_core.new_loop(config()).run()", "RuntimeError"),
    "LoadGen.__new__ result": (
        "_loadgen.LoadGen.__new__(_loadgen.LoadGen).result()",
        "RuntimeError",
    ),
    "LoadGen.__init__ out of memory keeps fd 0": (
        (
            "import gc, os\n"
            "try: _loadgen.LoadGen(b'/tmp/x', 'pingpong', 2**20, 1, pipeline=2**31 - 1)\n"
            "except MemoryError: pass\n"
            "gc.collect(); os.fstat(0); raise LookupError"
        ),
        "LookupError",
    ),
    "LoadGen.__new__ run": (
        "_loadgen.LoadGen.__new__(_loadgen.LoadGen).run(0.1)",
        "RuntimeError",
    ),
}

_PRELUDE = """\
import unixsrv
from unixsrv import _core, _loadgen
C, S, T, L = _core.Connection, _core._Stream, _core.Transport, _core.Loop

def config(owner=None, factory=object, **settings):
    # A LoopConfig as unixsrv.server makes one (event model unless factory=None).
    if owner is None:
        owner = _core.LoopOwner(print, print, print, spawn=print, drained=print)
    values = dict(idle_timeout=0, max_connections=0, read_size=256, high_water=0,
                  low_water=0, max_write_buffer=0)
    values.update(settings)
    return _core.LoopConfig(owner, _core.Stats(), _core.Callbacks(), factory=factory, **values)
"""


def _run_child(
    spawn: Callable[..., subprocess.Popen[str]], code: str, cwd: str | None = None
) -> tuple[int, str, str]:
    # Under AddressSanitizer (setup.py) a too-big allocation aborts unless it
    # may return NULL, as the allocator does without it (a MemoryError here).
    asan = ":".join(filter(None, [os.environ.get("ASAN_OPTIONS"), "allocator_may_return_null=1"]))
    proc = spawn(_PRELUDE + code, cwd=cwd, env={**os.environ, "ASAN_OPTIONS": asan})
    code_, out, err = finish(proc, timeout=6 * DEADLINE)
    assert code_ >= 0, f"the child died of signal {-code_}; stderr:\n{err}"
    return code_, out, err


@pytest.mark.parametrize("name", list(REPRODUCTIONS))
def test_misuse_raises_instead_of_crashing(
    name: str, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    """Each reproduction ends in the expected Python exception (a traceback
    and exit status 1), not in a signal."""
    code, expected = REPRODUCTIONS[name]
    returncode, _, err = _run_child(spawn, code)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert returncode == 1, f"exit {returncode}; stderr:\n{err}"
    assert last.split(":")[0].rsplit(".", 1)[-1] == expected, f"expected {expected}; stderr:\n{err}"


#: The fuzzer, run in a child: every type defined by unixsrv._core and unixsrv._loadgen (and their
#: module-level functions), made with (), (None,) and __new__; every method
#: called and every property read with each argument shape; every settable
#: attribute set to each shape, after which every method is called again
#: (a Transport whose slot holds something odd, a Loop with drain_waiting
#: set, ...).  It prints how many calls it made and which types it made.
_FUZZ = """\
import types

SKIP = {"__init_subclass__", "__subclasshook__", "__class__", "__new__", "__getattribute__",
        "__setattr__", "__delattr__", "__dir__"}
shapes_base = [None, 0, -1, b"x", 2**100, "s"]
MODULES = (_core, _loadgen)
core_types = sorted((v for m in MODULES for v in vars(m).values()
                     if isinstance(v, type) and v.__module__ == m.__name__), key=lambda t: t.__name__)
calls = 0
made = set()

def attempt(fn, *args):
    global calls
    calls += 1
    try:
        return fn(*args)
    except KeyboardInterrupt:
        raise
    except BaseException:
        return None

def instances(t):
    out = []
    for make in (lambda: t(), lambda: t(None), lambda: t.__new__(t)):
        obj = attempt(make)
        if isinstance(obj, t):
            out.append(obj)
            made.add(t.__name__)
    return out

def names(t):
    return sorted(n for n in dir(t) if n not in SKIP)

def call_shapes(fn, shapes):
    attempt(fn)
    for s in shapes:
        attempt(fn, s)
    # Every arity up to 11 (more than any signature takes), all None or
    # all 0, to get past the argument count into the body.
    for n in range(2, 12):
        attempt(fn, *[None] * n)
        attempt(fn, *[0] * n)

def poke(obj, shapes):
    t = type(obj)
    for name in names(t):
        attr = attempt(getattr, obj, name)
        if callable(attr):
            call_shapes(attr, shapes)

def settable(t, name):
    d = None
    for k in t.__mro__:
        if name in vars(k):
            d = vars(k)[name]
            break
    return d is not None and hasattr(type(d), "__set__")

# A foreign core object of every kind as one more argument shape.
extras = [t.__new__(t) for t in core_types if t.__name__ != "Transport"]
shapes = shapes_base + extras

def instances_and_loops(t):
    out = instances(t)
    if t is _core.Loop:
        # What new_loop() makes: set up, never opened (Loop() refuses).
        for factory in (None, object):
            out.append(_core.new_loop(config(factory=factory)))
            made.add("new_loop")
    return out

for t in core_types:
    for obj in instances_and_loops(t):
        poke(obj, shapes)
        for name in names(t):
            if settable(t, name):
                for s in shapes:
                    if attempt(setattr, obj, name, s) is None:
                        poke(obj, shapes_base)
                    attempt(delattr, obj, name)
for m in MODULES:
    for name, fn in sorted(vars(m).items()):
        if isinstance(fn, types.BuiltinFunctionType) and fn.__module__ == m.__name__:
            call_shapes(fn, shapes_base)
print("calls", calls)
print("made", " ".join(sorted(made)))
"""


def test_fuzz_every_core_type_never_dies_of_a_signal(
    spawn: Callable[..., subprocess.Popen[str]], tmp_path: str
) -> None:
    """The whole surface, with odd arguments, in a child (cwd: an empty
    temporary directory, in case a call touches files): it must finish
    normally, having made every type through __new__ and made enough calls
    that the run cannot pass by doing nothing."""
    returncode, out, err = _run_child(spawn, _FUZZ, cwd=str(tmp_path))
    assert returncode == 0, f"exit {returncode}; stderr:\n{err}"
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert int(lines["calls"]) > 5000, out
    assert set(lines["made"].split()) >= {
        "Callbacks",
        "Connection",
        "LoadGen",
        "Loop",
        "LoopConfig",
        "LoopOwner",
        "Stats",
        "Transport",
        "_ConnBase",
        "_Stream",
        "new_loop",
    }, out


def test_repr_of_unattached_objects() -> None:
    """repr() works on anything Python can make (debuggers and logs call it)."""
    from unixsrv import _core

    assert repr(_core.Transport.__new__(_core.Transport)) == "<unixsrv.Transport not attached>"
    assert (
        repr(_core.Connection.__new__(_core.Connection))
        == "<unixsrv.Connection id=0 fd=-1 closed=False>"
    )


@pytest.mark.parametrize("name", ["Connection", "_Stream", "_ConnBase", "Transport", "Loop"])
def test_core_made_types_refuse_construction(name: str) -> None:
    """The per-connection types exist only bound to a live connection, the
    loop only as new_loop() sets it up: their constructors raise TypeError
    (as uvloop's handles do).  Stats, Callbacks, LoopOwner and LoopConfig
    stay constructible: they hold no pointer or fd (new_loop refuses a
    LoopOwner or LoopConfig made through __new__, see REPRODUCTIONS), and the
    fuzz above calls all they have."""
    from unixsrv import _core

    cls = getattr(_core, name)
    for args in ((), (None,)):
        with pytest.raises(TypeError, match="created by the server"):
            cls(*args)


def test_event_loop_closes_transports_only_on_its_thread(
    sock_path: str, make_server: Callable[..., Server]
) -> None:
    """In the event model the loop thread reads the transports' output
    buffers and the table without the GIL: abort_all(), begin_drain() and
    teardown() (and the stream's _replay_held()) from another thread while it
    runs raise RuntimeError instead of freeing them under it, and change
    nothing; on the loop thread they work (Server.close() posts them there)."""
    factory = Collect(Recorder)
    srv = make_server(sock_path, protocol=factory)
    with connect(srv.path) as s:
        proto = factory.one()
        loop = srv._loop
        assert loop is not None
        for name in ("abort_all", "begin_drain", "teardown"):
            with pytest.raises(RuntimeError, match="loop thread"):
                getattr(loop, name)()
        with pytest.raises(RuntimeError, match="loop thread"):
            proto.transport._s._replay_held()  # the stream is reachable from Python
        assert on_loop(srv, proto.transport.is_closing) is False
        s.sendall(b"still served")
        wait_until(lambda: proto.received == b"still served")
        on_loop(srv, loop.abort_all)
        assert s.recv(1) == b""


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "event"])
def test_the_core_calls_its_owner_only_through_loop_owner(sock_path: str, blocking: bool) -> None:
    """A loop made directly (new_loop) with a recording LoopOwner: one
    connection goes through the lifecycle both models share, NEW ->
    update_conn -> (spawn: the handler) -> CLOSE, each hook called once, in
    that order, and nothing else is called on the owner."""
    from unixsrv import _core
    from unixsrv.config import ServerConfig
    from unixsrv.connstate import ConnState
    from unixsrv.server import _listener_args

    calls: list[str] = []
    lock = threading.Lock()
    closed = threading.Event()

    def note(what: str) -> None:
        with lock:
            calls.append(what)

    def conn_state(conn: Any, state: ConnState) -> None:
        note(state.name)
        if state is ConnState.CLOSE:
            closed.set()

    def update_conn(conn: Any) -> bool:
        note("update_conn")
        return True

    def spawn(conn: Any) -> None:
        note("spawn")

        def serve() -> None:
            if conn._begin():
                note("handler")
            conn._finish()

        threading.Thread(target=serve).start()

    owner = _core.LoopOwner(
        lambda exc, level: note(f"report {exc!r}"),
        conn_state,
        update_conn,
        spawn=spawn,
        drained=lambda: note("drained"),
    )
    callbacks = _core.Callbacks()
    callbacks.on_conn_state = lambda *args: None  # registered: NEW and CLOSE fire
    callbacks.update_conn = lambda sock: None
    cfg = ServerConfig(path=sock_path)
    factory = None if blocking else asyncio.Protocol
    loop = _core.new_loop(
        _core.LoopConfig(
            owner,
            _core.Stats(),
            callbacks,
            factory=factory,
            idle_timeout=0,
            max_connections=0,
            read_size=cfg.read_buffer_size,
            high_water=cfg.write_buffer_high,
            low_water=cfg.write_buffer_low,
            max_write_buffer=cfg.max_write_buffer,
        )
    )
    loop.open(backlog=cfg.backlog, **_listener_args(cfg))

    def run() -> None:
        try:
            loop.run()
        finally:
            loop.teardown()

    runner = threading.Thread(target=run)
    runner.start()
    try:
        with connect(sock_path):
            wait_until(lambda: len(calls) >= (3 if blocking else 2))
        assert closed.wait(DEADLINE)
    finally:
        loop.call_soon_threadsafe(loop.request_exit)
        runner.join(DEADLINE)
    assert not runner.is_alive()
    if blocking:
        assert calls == ["spawn", "NEW", "update_conn", "handler", "CLOSE"]
    else:
        assert calls == ["NEW", "update_conn", "CLOSE"]


def test_the_gil_is_released_where_the_core_docstring_says() -> None:
    """_core.pyx's docstring lists the functions that release the GIL
    (``with nogil``); every such function in the core's sources is listed,
    and every listed one does."""
    src = pathlib.Path(__file__).resolve().parent.parent / "src" / "unixsrv"
    found = set()
    for path in [*sorted(src.glob("_*.pxi")), src / "_core.pyx"]:
        function = None
        for line in path.read_text(encoding="utf-8").splitlines():
            m = re.match(r"\s*(?:cdef|cpdef|def)\s[^=(]*?(\w+)\(", line)  # not `cdef x = f(`
            if m and not line.lstrip().startswith("cdef class"):
                function = m.group(1)
            if line.strip() == "with nogil:":
                found.add(function)
    doc = (src / "_core.pyx").read_text(encoding="utf-8").split('"""')[1]  # the module docstring
    listed = {name.rsplit(".", 1)[-1] for name in re.findall(r"``([\w.]+)``", doc)}
    assert found, "no `with nogil:` found: the scan is broken"
    assert found == listed
