"""Blocking threads calling coroutines on a loop thread: LoopBridge against asyncio's
run_coroutine_threadsafe (the baseline), in the same run.

Each call runs a coroutine that yields to the loop once (as a network reply would) and
returns; reported, never asserted: calls per second and process CPU per call, for one
calling thread and for 64 (the sync cluster client's threads).

    python3 benchmarks/bench_bridge.py --calls 40000
    python3 -m pytest benchmarks/bench_bridge.py --benchmark-only -s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import threading
import time
from collections.abc import Callable

from pykv.client.bridge import LoopBridge
from pykv.net.protocol import new_event_loop


async def _one_turn() -> int:
    await asyncio.sleep(0)
    return 1


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _drive(call: Callable[[], int], threads: int, calls: int) -> tuple[float, float]:
    """(calls per second, CPU microseconds per call) of ``calls`` spread over ``threads``."""
    each = max(1, calls // threads)

    def body() -> None:
        for _ in range(each):
            call()

    pool = [threading.Thread(target=body) for _ in range(threads)]
    cpu, start = _cpu_seconds(), time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    total = each * threads
    return total / elapsed, cpu / total * 1e6


def bench_bridge(threads: int, calls: int = 40_000) -> list[dict]:
    loop = new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    bridge = LoopBridge(loop)
    ways = {
        "LoopBridge": lambda: bridge.run(_one_turn(), 10),
        "run_coroutine_threadsafe": lambda: asyncio.run_coroutine_threadsafe(_one_turn(), loop).result(10),
    }
    try:
        results = []
        for name, call in ways.items():
            rate, cpu_us = _drive(call, threads, calls)
            results.append({"way": name, "threads": threads, "calls_per_s": round(rate),
                            "cpu_us_per_call": round(cpu_us, 1)})
        return results
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()


def test_bridge_calls_from_64_threads(benchmark, record) -> None:
    """pytest-benchmark entry: 20,000 calls each way from 64 threads, in the same run."""
    results = benchmark.pedantic(lambda: bench_bridge(64, 20_000), rounds=1, iterations=1)
    for result in results:
        print(json.dumps(result))
        record("coroutine calls from 64 threads", result["way"], 20_000 / result["calls_per_s"],
               units=20_000, subject=result["way"] == "LoopBridge")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40_000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    for count in args.threads:
        for row in bench_bridge(count, args.calls):
            print(json.dumps(row))
