"""`pykv bench`: run the standard 4-op transaction workload and print tps, latency and aborts."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pykv.api import KeyValueStore
from pykv.server.cli import add_addresses_argument
from pykv.server.workload import (
    WorkloadConfig,
    WorkloadResult,
    preload,
    run_workload,
    run_workload_on_cluster,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--embedded", action="store_true",
                        help="benchmark the embedded store (pykv.open); the default")
    add_addresses_argument(target, help="benchmark a running cluster through pykv.connect")
    parser.add_argument("--threads", type=int, default=8,
                        help="concurrent clients for --embedded, one transaction each (default 8)")
    parser.add_argument("--clients", type=int, default=None,
                        help="concurrent clients for --addresses (default: --threads)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds to run (default 10)")
    parser.add_argument("--ops", type=int, default=4,
                        help="operations per transaction: half reads, half writes (default 4)")
    parser.add_argument("--keys", type=int, default=100_000, help="key space (default 100000)")
    parser.add_argument("--value-bytes", type=int, default=100, help="value size (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the key and value choices")
    parser.add_argument("--no-preload", action="store_true",
                        help="skip writing every key once before the run")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="embedded store directory (default: a temporary one, removed after)")
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object instead of progress and a table")


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    clients = args.clients if args.clients is not None else args.threads
    try:
        config = WorkloadConfig(keys=args.keys, value_bytes=args.value_bytes, ops=args.ops,
                                clients=clients, duration=args.duration, seed=args.seed)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
    if args.addresses:
        return _run_cluster(args, config, err)
    data_dir = args.data_dir
    temporary = data_dir is None
    if temporary:
        data_dir = Path(tempfile.mkdtemp(prefix="pykv-bench-"))
    try:
        import pykv

        try:
            store = pykv.open(data_dir)
        except pykv.Error as exc:
            err.print(f"[red]error:[/red] cannot open the store in {data_dir}: {exc}")
            return 2
        with store:
            result = _measure(store, config, lambda report: run_workload(store, config, report),
                              preload_keys=not args.no_preload, quiet=args.json)
            stats = _storage_stats(store)
    finally:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    _report(args, result, "embedded", f"embedded store ({'temporary dir' if temporary else data_dir})",
            {"storage": stats} if stats else {})
    return 0


def _run_cluster(args: argparse.Namespace, config: WorkloadConfig, err: Console) -> int:
    from pykv.client import connect
    from pykv.errors import Error

    try:
        store = connect(args.addresses)
    except Error as exc:
        err.print(f"[red]error:[/red] cannot reach the cluster at {' '.join(args.addresses)}: {exc}")
        return 2
    with store:
        # The clients are coroutines on one asyncio client (pykv.aio): 64 threads on one
        # GIL would measure the client's thread switching more than the cluster.
        result = _measure(store, config, lambda report: run_workload_on_cluster(args.addresses, config, report),
                          preload_keys=not args.no_preload, quiet=args.json)
    _report(args, result, "cluster", f"cluster at {' '.join(args.addresses)}",
            {"addresses": list(args.addresses)})
    return 0


def _report(args: argparse.Namespace, result: WorkloadResult, target: str, title: str,
            extra: dict) -> None:
    if args.json:
        print(json.dumps({**result.to_dict(), "target": target, **extra}))
    else:
        _print_table(Console(), result, title)


def _storage_stats(store: KeyValueStore) -> dict:
    stats = getattr(store.backend, "stats", None)
    if stats is None:
        return {}
    return {k: v for k, v in stats().items() if isinstance(v, (int, float, str))}


def _measure(store: KeyValueStore, config: WorkloadConfig,
             run: Callable[[Callable[[float, int], None] | None], WorkloadResult], *,
             preload_keys: bool, quiet: bool) -> WorkloadResult:
    """Preload through ``store``, then ``run(report)``, with progress bars unless quiet."""
    if quiet:
        if preload_keys:
            preload(store, config)
        return run(None)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        if preload_keys:
            task = bar.add_task("preload", total=config.keys, info="")
            preload(store, config, lambda n: bar.update(task, advance=n, info=f"{n} keys/txn"))
        task = bar.add_task(f"{config.clients} clients", total=config.duration, info="")

        def report(elapsed: float, committed: int) -> None:
            rate = committed / elapsed if elapsed > 0 else 0.0
            bar.update(task, completed=elapsed, info=f"{committed} txns, {rate:,.0f} tps")

        return run(report)


def _print_table(console: Console, result: WorkloadResult, target: str) -> None:
    c = result.config
    table = Table(title=f"pykv bench: {c.ops}-op transactions, {c.clients} clients, {target}")
    for name in ("tps", "p50 ms", "p99 ms", "committed", "aborts", "abort rate", "errors"):
        table.add_column(name, justify="right")
    table.add_row(
        f"{result.tps:,.0f}",
        f"{result.percentile_ms(50):.3f}",
        f"{result.percentile_ms(99):.3f}",
        f"{result.committed:,}",
        f"{result.conflicts:,}",
        f"{result.abort_rate:.2%}",
        f"{result.errors:,}",
    )
    console.print(table)
    console.print(
        f"keys uniform over {c.keys:,}, {c.value_bytes}-byte values, "
        f"{c.reads} reads + {c.writes} writes (1 read-modify-write) per transaction, "
        f"every commit fsync'd; {result.elapsed:.1f} s",
        style="dim",
    )


if __name__ == "__main__":  # pragma: no cover - `pykv bench` is the entry point
    parser = argparse.ArgumentParser(prog="pykv bench")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
