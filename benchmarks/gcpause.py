"""How long a full garbage collection takes: the pause a node's event loop sees (shared by
the bench_*.py files that measure what a structure adds to it)."""

from __future__ import annotations

import gc
import time


def full_collection() -> float:
    """Seconds one full collection takes, after a first that untracks what it can."""
    gc.collect()
    start = time.perf_counter()
    gc.collect()
    return time.perf_counter() - start


def best_full_collection(rounds: int = 5) -> float:
    return min(full_collection() for _ in range(rounds))


def record_pause(benchmark, record, group: str, name: str, subject: bool = False) -> None:
    """pytest-benchmark form: the median full collection, kept for the summary."""
    gc.collect()
    benchmark(gc.collect)
    record(f"full gc pause, {group}", name, benchmark.stats.stats.median, subject=subject)
