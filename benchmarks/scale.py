"""Connection scale: how many idle connections one unixsrv server holds, and
what each costs in memory (issue 3, deliverable 5).

    python benchmarks/scale.py            # writes docs/scale.md (+ benchmarks/.build/scale.json)
    python benchmarks/scale.py --quick    # 1,000 and 5,000 only; writes benchmarks/.build/scale.md

For each model (event, blocking) one fresh ``unixsrv serve --echo`` process
is started with its soft RLIMIT_NOFILE raised to the hard limit and primed
as benchmarks/run.py primes every server (harness.prime: 0.2 s of
connect -> echo -> close traffic); its VmRSS then is the baseline.  Then connections are
added in steps (default 1,000, then up to 10,000, then up to the most the fd
limit allows) by ``unixsrv bench --mode hold`` generators, each step's
connections spread over several generator processes (``--processes``); every
connection does one verified echo before it counts as established, and all
earlier steps stay connected.  After each step: the server's VmRSS (settled),
its threads and open fds, RSS per connection since the baseline, and the
marginal RSS per connection of that step.  At the top step the server's CPU
over a few idle seconds is measured too (idle connections should cost none).

Per-connection cost is flat when the marginal cost of the last step is about
the average one.  The script reports; it does not assert.  Every process is
ended by PID; every step is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness

PER_PROCESS = 5000  # connections per generator process
FD_MARGIN = 32  # fds kept free in the server besides its base ones


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def scale_model(model: str, targets: list[int | str], idle_s: float) -> dict[str, Any]:
    name = f"unixsrv-{model}"
    out: dict[str, Any] = {"model": model, "steps": []}
    hard = harness.raise_nofile_limit()
    with harness.running_server(name) as srv, contextlib.ExitStack() as holds:
        harness.prime(name, srv.path)
        base = harness.settled_rss(srv.pid)
        base_fds = harness.open_fds(srv.pid) or 0
        limit = _nofile_soft(srv.pid) or hard  # inherited from us: raised to the hard limit
        max_conns = limit - base_fds - FD_MARGIN
        out.update(
            rss_before_kib=base,
            server_fds_before=base_fds,
            server_nofile=limit,
            max_connections=max_conns,
            threads_before=harness.threads(srv.pid),
        )
        log(
            f"{name}: pid {srv.pid}, RSS {base} KiB, {base_fds} fds open, fd limit {limit}: "
            f"aiming at {max_conns:,} connections"
        )
        held = 0
        prev_rss = base
        for t in targets:
            goal = max_conns if t == "max" else min(int(t), max_conns)
            add = goal - held
            if add <= 0:
                continue
            procs = max(1, -(-add // PER_PROCESS))
            t0 = time.monotonic()
            step: dict[str, Any] = {"target": goal, "added": add, "processes": procs}
            try:
                h = holds.enter_context(
                    harness.hold(
                        srv.path, add, processes=procs, connect_timeout=120.0, max_hold=900.0
                    )
                )
            except harness.BenchError as exc:
                step["failure"] = str(exc)[:500]
                out["steps"].append(step)
                log(f"{name}: step to {goal:,} failed: {exc}")
                break
            est = h.established
            held += est["connections"]
            rss = harness.settled_rss(srv.pid, timeout=10.0)
            step.update(
                established=est["connections"],
                failed=est["failed"],
                errors=est["errors"],
                held=held,
                setup_s=round(time.monotonic() - t0, 2),
                rss_kib=rss,
                threads=harness.threads(srv.pid),
                server_fds=harness.open_fds(srv.pid),
                per_conn_bytes=round((rss - base) * 1024 / held, 1)
                if rss and base and held
                else None,
                marginal_bytes=(
                    round((rss - prev_rss) * 1024 / est["connections"], 1)
                    if rss and prev_rss and est["connections"]
                    else None
                ),
            )
            prev_rss = rss
            out["steps"].append(step)
            log(
                f"{name}: {held:,} held ({est['connections']:,} added in {step['setup_s']} s over "
                f"{procs} generator(s), {est['failed']} failed, {est['errors']} errors): RSS {rss:,} KiB, "
                f"{step['per_conn_bytes']} B/conn, marginal {step['marginal_bytes']} B/conn, "
                f"{step['threads']} threads"
            )
            if est["connections"] < add:
                break
        if held and idle_s > 0:
            cpu0 = harness.proc_cpu_s(srv.pid)
            time.sleep(idle_s)  # let time pass: CPU of idle connections
            cpu1 = harness.proc_cpu_s(srv.pid)
            if cpu0 is not None and cpu1 is not None:
                out["idle_cpu_share"] = round((cpu1 - cpu0) / idle_s, 4)
                out["idle_held"] = held
        out["survived"] = srv.alive()
    return out


def _nofile_soft(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/limits", encoding="ascii") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError):
        pass
    return None


def render(data: dict[str, Any]) -> str:
    m = data["machine"]
    L = [
        "# unixsrv connection scale",
        "",
        "Generated by `benchmarks/scale.py` (see [benchmarks/README.md](../benchmarks/README.md)); "
        "do not edit by hand.",
        "",
        "```",
        data["command"],
        "```",
        "",
        f"- **Date**: {m['date']}; wall time {data['wall_s']:.0f} s.",
        f"- **Machine**: {m['nproc']} CPUs, Linux {m['kernel']}, Python {m['python']}, "
        f"hard RLIMIT_NOFILE {m['nofile_hard']} (cannot be raised here, not even as root); "
        f"before the run {m['busy_before']:.2f} cores were in use (3 s sample of /proc/stat), load average "
        f"{m['load_before']} (it counts threads: a previous 10,000-thread run keeps it up for minutes).",
        "",
        "One server process per model (`python -m unixsrv serve --echo --model M --backlog 4096`, soft "
        "fd limit raised to the hard one). Baseline = VmRSS after 0.2 s of connect → 64 B echo → close priming traffic. Each step "
        "adds connections with `unixsrv bench --mode hold --processes K` (each connection does one "
        "verified 64 B echo before it counts); earlier steps stay connected. *per conn* = (RSS − "
        "baseline) / connections held; *marginal* = RSS growth of the step / connections it added. "
        "Kernel socket memory is not part of RSS.",
        "",
    ]
    for res in data["models"]:
        L.append(f"## {res['model']} model")
        L.append("")
        L.append(
            f"Baseline RSS {res.get('rss_before_kib', 0) / 1024:.1f} MiB, "
            f"{res.get('server_fds_before')} fds open, fd limit {res.get('server_nofile')}: "
            f"at most {res.get('max_connections', 0):,} connections."
        )
        L.append("")
        L.append(
            "| connections held | added (generators) | setup s | failed / errors | RSS MiB | per conn B "
            "| marginal B | threads | server fds |"
        )
        L.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in res["steps"]:
            if "failure" in s:
                L.append(
                    f"| (step to {s['target']:,} failed: {s['failure'][:120]}) | | | | | | | | |"
                )
                continue
            L.append(
                f"| {s['held']:,} | {s['added']:,} ({s['processes']}) | {s['setup_s']} "
                f"| {s['failed']} / {s['errors']} | {s['rss_kib'] / 1024:.1f} "
                f"| {s['per_conn_bytes']:,.0f} | {s['marginal_bytes']:,.0f} | {s['threads']:,} "
                f"| {s['server_fds']:,} |"
            )
        L.append("")
        ok = [s for s in res["steps"] if "failure" not in s and s.get("per_conn_bytes")]
        if ok:
            pcs = [s["per_conn_bytes"] for s in ok]
            margs = [s["marginal_bytes"] for s in ok[1:] if s.get("marginal_bytes") is not None]
            line = (
                f"Most held: **{ok[-1]['held']:,}** connections, **{ok[-1]['per_conn_bytes']:,.0f} B** each "
                f"(per conn ranges {min(pcs):,.0f}–{max(pcs):,.0f} B over the steps"
            )
            if margs:
                line += f"; marginal cost of the later steps {min(margs):,.0f}–{max(margs):,.0f} B"
            line += ")."
            if "idle_cpu_share" in res:
                line += (
                    f" Server CPU while holding them idle: {res['idle_cpu_share'] * 100:.2f} % of a core "
                    f"over {data['idle_s']:g} s."
                )
            if not res.get("survived", True):
                line += " **The server exited during the run.**"
            L.append(line)
            L.append("")
    L.append("## Notes")
    L.append("")
    for n in data.get("notes", []):
        L.append(f"- {n}")
    L.append("")
    return "\n".join(L)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="steps 1,000 and 5,000 only; output under benchmarks/.build/",
    )
    p.add_argument("--models", default="event,blocking")
    p.add_argument(
        "--event-steps",
        default="1000,10000,max",
        help="cumulative connection counts for the event model ('max' = the fd limit)",
    )
    p.add_argument(
        "--blocking-steps",
        default="1000,10000,max",
        help="the same for the blocking model (one thread per connection)",
    )
    p.add_argument(
        "--idle", type=float, default=3.0, help="seconds of idle CPU measurement at the top step"
    )
    p.add_argument(
        "--out", help="markdown output (default docs/scale.md; --quick benchmarks/.build/scale.md)"
    )
    args = p.parse_args()
    if args.quick:
        args.event_steps = args.blocking_steps = "1000,5000"
        args.idle = 1.0
    out = args.out or (
        os.path.join(harness.BUILD, "scale.md")
        if args.quick
        else os.path.join(harness.ROOT, "docs", "scale.md")
    )
    command = "python benchmarks/scale.py" + (
        "" if len(sys.argv) < 2 else " " + " ".join(sys.argv[1:])
    )
    hard = harness.raise_nofile_limit()
    t0 = time.monotonic()
    load = tuple(round(x, 2) for x in os.getloadavg())
    a = harness.CpuSnapshot.take()
    time.sleep(3.0)  # let time pass: sample the machine's CPU use
    b = harness.CpuSnapshot.take()
    busy = (b.busy - a.busy) / (b.wall - a.wall)
    data: dict[str, Any] = {
        "command": command,
        "idle_s": args.idle,
        "machine": {
            "nproc": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "nofile_hard": hard,
            "load_before": "/".join(map(str, load)),
            "busy_before": round(busy, 3),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        },
        "models": [],
    }
    for model in args.models.split(","):
        steps: list[int | str] = [
            s if s == "max" else int(s)
            for s in (args.event_steps if model == "event" else args.blocking_steps).split(",")
        ]
        data["models"].append(scale_model(model, steps, args.idle))
    data["wall_s"] = round(time.monotonic() - t0, 1)
    data["notes"] = [
        f"The fd limit is the ceiling: the server needs one fd per connection plus its own "
        f"(listener, poller, wake-up pipe, stdio), and {FD_MARGIN} are kept spare; the generators run as "
        f"separate processes ({PER_PROCESS:,} connections each at most), each with its own fd limit.",
        "The blocking model runs one handler thread per connection; its per-connection RSS is mostly the "
        "touched part of each thread's stack plus the Python thread state.",
        "Every connection counted as held has echoed 64 B, verified byte for byte by the generator "
        "(hold mode), after which it stays idle; a failed connect or echo would show under failed / errors.",
        "The first step's per-connection figure can be lower than the later ones: its connections partly "
        "fit into memory the server had already reserved (allocator pools, pre-sized tables). The "
        "marginal cost of the later steps is the one to compare; flat means it stays about the same up "
        "to the fd limit.",
    ]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(os.path.join(harness.BUILD, "scale.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    with open(out, "w", encoding="utf-8") as f:
        f.write(render(data))
    log(f"wrote {out} in {data['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
