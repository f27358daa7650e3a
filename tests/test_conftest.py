"""The suite's own helpers (tests/conftest.py) where a wrong answer would
mislead: a test that needs a tool the machine lacks must skip with the
reason, never fail (issue 8 finding 10)."""

from __future__ import annotations

import stat

import pytest

import conftest
from conftest import strace_unusable


def _script(path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_strace_missing_is_a_reason(tmp_path):
    """No strace at all: a reason that says so."""
    reason = strace_unusable(str(tmp_path / "no-such-strace"))
    assert reason is not None and "not installed" in reason


def test_strace_that_cannot_trace_is_a_reason(tmp_path):
    """strace present but ptrace forbidden (as in a container without
    CAP_SYS_PTRACE): its own message becomes the reason."""
    fake = _script(
        tmp_path / "strace",
        'echo "strace: attach: ptrace(PTRACE_SEIZE, 1): Operation not permitted" >&2\nexit 1\n',
    )
    reason = strace_unusable(fake)
    assert reason is not None
    assert "Operation not permitted" in reason


def test_strace_that_traces_is_usable(tmp_path):
    """A strace that runs its command successfully is usable."""
    fake = _script(tmp_path / "strace", "exit 0\n")
    assert strace_unusable(fake) is None


def test_run_traced_skips_with_the_reason(run_traced, monkeypatch):
    """run_traced skips the test, naming the reason, instead of starting an
    strace that cannot trace (the test used to fail)."""
    monkeypatch.setattr(
        conftest, "strace_reason", lambda: "strace cannot trace here: Operation not permitted"
    )
    with pytest.raises(pytest.skip.Exception, match="Operation not permitted"):
        run_traced([], "pass")
