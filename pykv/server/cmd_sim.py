"""`pykv sim`: run the deterministic simulator over many seeds and explain any violation."""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from dataclasses import replace

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pykv.sim.faults import ALL, PROFILES, UnknownFaultMix, parse_faults
from pykv.sim.runner import SimResult, run_seed
from pykv.sim.txnworld import TXN_MIXES, run_txn_seed
from pykv.sim.world import SimParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run (default 100)")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument(
        "--faults", default="all",
        help=f"fault mixes, comma-separated, one per seed in turn: {', '.join(PROFILES)}, "
             f"or 'all' (= {','.join(ALL)}); 'mix+crashes' adds a fault to a mix",
    )
    parser.add_argument("--fault-time", type=float, default=20.0,
                        help="virtual seconds of faults per seed before healing (default 20)")
    parser.add_argument("--liveness-bound", type=float, default=15.0,
                        help="virtual seconds after healing within which a proposal must "
                             "commit (default 15)")
    parser.add_argument("--quiesce-ticks", type=int, default=0,
                        help="quiesce idle groups after this many ticks, with client pauses "
                             "(default 0: never)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--trace", type=int, default=80,
                        help="events of the trace to print for a violation (default 80)")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first violation")
    parser.add_argument("--no-linearizability", action="store_true",
                        help="skip the client-history check (Raft checks still run)")
    parser.add_argument("--txn", action="store_true",
                        help="simulate transactions instead: shard replicas and two-phase commit "
                             f"under faults, seeds in turn over {', '.join(TXN_MIXES)} "
                             "(--faults and the Raft options do not apply)")


def _work(job: tuple) -> SimResult:
    seed, mix, params, check, trace = job
    if mix is None:
        return run_txn_seed(seed)  # type: ignore[return-value]
    return run_seed(seed, mix, params, check_history=check, trace_events=trace)


def _report_failure(console: Console, r: SimResult, args: argparse.Namespace) -> None:
    console.print(f"[bold red]VIOLATION[/] seed {r.seed} (faults {r.faults}, {r.nodes} nodes): "
                  f"[bold]{r.kind}[/]")
    console.print(r.detail, markup=False, highlight=False)
    console.print(f"last {len(r.trace)} events before it:", style="dim")
    for line in r.trace:
        console.print(line, markup=False, highlight=False)
    if args.txn:
        console.print(f"replay: pykv sim --txn --seeds 1 --start {r.seed}", style="bold")
        return
    console.print(
        f"replay: pykv sim --seeds 1 --start {r.seed} --faults {args.faults} "
        f"--fault-time {args.fault_time} --liveness-bound {args.liveness_bound} "
        f"--trace {max(args.trace, 400)}",
        style="bold",
    )


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=False)
    try:
        mixes = parse_faults(args.faults)
    except UnknownFaultMix as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    if args.seeds < 1 or args.jobs < 1 or args.fault_time <= 0 or args.liveness_bound <= 0:
        console.print("[red]--seeds, --jobs and --fault-time must be positive[/]")
        return 2
    params = replace(SimParams(), fault_time=args.fault_time, liveness_bound=args.liveness_bound)
    if args.quiesce_ticks:
        params = replace(params, raft=replace(params.raft, quiesce_ticks=args.quiesce_ticks))
    jobs = [
        (seed, None if args.txn else mixes[seed % len(mixes)], params,
         not args.no_linearizability, args.trace)
        for seed in range(args.start, args.start + args.seeds)
    ]
    failures: list[SimResult] = []
    virtual = 0.0
    ops = 0
    started = time.perf_counter()
    progress = Progress(
        TextColumn("[bold]sim[/]"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )
    pool = multiprocessing.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else None
    try:
        results = pool.imap_unordered(_work, jobs, chunksize=4) if pool else map(_work, jobs)
        with progress:
            task = progress.add_task("seeds", total=len(jobs), status="")
            for r in results:
                virtual += r.virtual_seconds
                ops += r.ops
                if not r.ok:
                    failures.append(r)
                    progress.console.print(
                        f"[red]seed {r.seed} ({r.faults}): {r.kind}[/]", highlight=False,
                    )
                elapsed = time.perf_counter() - started
                progress.update(
                    task, advance=1,
                    status=f"{len(failures)} failed, {virtual / max(elapsed, 1e-9):,.0f} vs/s",
                )
                if not console.is_terminal and progress.tasks[0].completed % 500 == 0:
                    # No live bar in a log file: leave a line every 500 seeds instead.
                    console.print(
                        f"{int(progress.tasks[0].completed)}/{len(jobs)} seeds, "
                        f"{len(failures)} failed, {virtual:,.0f} virtual s in {elapsed:,.0f} s",
                        highlight=False,
                    )
                if failures and args.fail_fast:
                    break
    finally:
        if pool is not None:
            pool.terminate()
    elapsed = time.perf_counter() - started
    for r in sorted(failures, key=lambda r: r.seed)[:5]:
        _report_failure(console, r, args)
    done = len(jobs) if not (failures and args.fail_fast) else None
    console.print(
        f"{done if done is not None else 'stopped after a failure;'} seeds, "
        f"{len(failures)} failed; {virtual:,.0f} virtual s in {elapsed:,.1f} real s "
        f"({virtual / max(elapsed, 1e-9):,.0f} virtual s per real s); {ops:,} client "
        f"{'transactions' if args.txn else 'operations'} checked",
    )
    if failures:
        console.print("failing seeds: " + " ".join(str(r.seed) for r in sorted(failures, key=lambda r: r.seed)))
        return 1
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="pykv sim")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
