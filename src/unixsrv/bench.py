"""``unixsrv bench`` (placeholder wiring; the load generator lands with the event-model work)."""

from __future__ import annotations

import argparse

__all__ = ["add_bench_parser"]


def add_bench_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``bench`` sub-command."""
