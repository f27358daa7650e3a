"""The cost of access control (issue 13's acceptance benchmark).

    python benchmarks/access.py                  # 3 rounds of 3 s measurements
    python benchmarks/access.py --quick          # smoke run: 1 round of 0.5 s

Two comparisons, each between two ``unixsrv serve --echo`` processes (event
model) started fresh for every measurement and ended by PID:

``round trip``
    ping-pong, 64 B, 100 connections (``unixsrv bench``), against a server
    without allow-lists and one with ``--allow-uid``/``--allow-gid`` that
    admit the generator (the lists are checked at every accept; the round
    trips themselves must cost the same).  Target: server CPU per round trip
    with the lists within 2 % of without.

``denied flood``
    16 slots, each looping connect -> wait for the server's EOF -> close (a
    plain non-blocking client here: ``unixsrv bench --mode connect`` backs
    off after each refused cycle, so it cannot flood), against
    a server whose allow-list denies the generator's uid, and against the
    accept-and-close baseline: a server at its ``--max-connections 1``, held
    by one idle connection, which accepts and closes every further client in
    C.  Target: server CPU per denied connect <= 1.2x per accepted-and-closed
    one.

Rounds interleave the two servers of each comparison, so machine noise falls
on both alike; the report gives medians.  It reports, it does not assert.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import socket
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness

SERVER = "unixsrv-event"
UNLISTED_UID = 2147483646  # nobody's uid: everyone is denied


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def round_trip_cpu(extra: list[str], duration: float, warmup: float) -> float | None:
    """Server CPU (µs) per ping-pong round trip."""
    with harness.running_server(SERVER, extra_args=extra) as srv:
        result = harness.run_bench(
            srv.path,
            timeout=duration + 120.0,
            connections=100,
            duration=duration,
            warmup=warmup,
            server_pid=srv.pid,
        )
    value = result.get("server_cpu_us_per_rt")
    return None if value is None else float(value)


def flood(path: str, slots: int, seconds: float) -> int:
    """Connect cycles completed in `seconds` by `slots` concurrent clients,
    each connect -> EOF (or a reset) from the server -> close -> again."""
    sel = selectors.DefaultSelector()
    done = 0

    end = time.monotonic() + seconds

    def start() -> None:
        while time.monotonic() < end:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:  # the backlog is full (EAGAIN): try again
                s.close()
                continue
            sel.register(s, selectors.EVENT_READ)
            return

    for _ in range(slots):
        start()
    try:
        while time.monotonic() < end:
            for key, _ in sel.select(max(end - time.monotonic(), 0)):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                sel.unregister(s)
                try:
                    s.recv(1)
                except OSError as exc:
                    if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                        raise
                s.close()
                done += 1
                start()
    finally:
        for key in list(sel.get_map().values()):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            sock.close()
        sel.close()
    return done


def flood_cpu(extra: list[str], hold_one: bool, duration: float, warmup: float) -> float | None:
    """Server CPU (µs) per refused connect under a 16-slot flood."""
    with harness.running_server(SERVER, extra_args=extra) as srv:
        if hold_one:
            with harness.hold(srv.path, 1, server_pid=srv.pid):
                return _measure_flood(srv, duration, warmup)
        return _measure_flood(srv, duration, warmup)


def _measure_flood(srv: harness.RunningServer, duration: float, warmup: float) -> float | None:
    flood(srv.path, 16, warmup)
    before = harness.proc_cpu_s(srv.pid)
    cycles = flood(srv.path, 16, duration)
    after = harness.proc_cpu_s(srv.pid)
    return (
        None
        if not cycles or before is None or after is None
        else round((after - before) / cycles * 1e6, 3)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="1 round of 0.5 s (smoke run)")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 0.5, 0.1
    uid, gid = os.getuid(), os.getgid()
    lists = ["--allow-uid", str(UNLISTED_UID), "--allow-gid", f"{gid}"]  # admitted by its group
    runs: dict[str, list[float]] = {
        "rt off": [],
        "rt lists": [],
        "flood accept+close": [],
        "flood denied": [],
    }
    for r in range(args.rounds):
        order = [0, 1] if r % 2 == 0 else [1, 0]
        for i in order:
            key, extra = [("rt off", []), ("rt lists", lists)][i]
            value = round_trip_cpu(extra, args.duration, args.warmup)
            log(f"round {r + 1}: {key}: {value} µs server CPU per round trip")
            if value is not None:
                runs[key].append(value)
        for i in order:
            key, extra, held = [
                ("flood accept+close", ["--max-connections", "1"], True),
                ("flood denied", ["--allow-uid", str(UNLISTED_UID)], False),
            ][i]
            value = flood_cpu(extra, held, args.duration, args.warmup)
            log(f"round {r + 1}: {key}: {value} µs server CPU per connect")
            if value is not None:
                runs[key].append(value)
    med = {k: statistics.median(v) if v else None for k, v in runs.items()}
    report: dict[str, Any] = {
        "uid": uid,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "runs": runs,
        "median": med,
    }

    def ratio(a: str, b: str) -> float | None:
        return None if not med[a] or not med[b] else round(med[a] / med[b], 3)

    report["rt_ratio"] = ratio("rt lists", "rt off")
    report["flood_ratio"] = ratio("flood denied", "flood accept+close")
    print("| comparison | without | with | ratio | target |")
    print("|---|---|---|---|---|")
    print(
        f"| server CPU per round trip, allow-lists off / on (µs) | {med['rt off']} | {med['rt lists']} "
        f"| {report['rt_ratio']} | ≤ 1.02 |"
    )
    print(
        f"| server CPU per connect, accept+close / denied (µs) | {med['flood accept+close']} "
        f"| {med['flood denied']} | {report['flood_ratio']} | ≤ 1.2 |"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
