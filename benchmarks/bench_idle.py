"""What an idle cluster costs: CPU per node while no client sends anything.

A 3-node cluster (real processes, ``--partitions`` shards) starts and is left alone for a
few seconds, until its groups have quiesced; then each node's CPU time (user + system,
from /proc) is read over ``--seconds``. The baseline, measured in the same run, is a bare
uvloop process that only wakes every 10 ms (a node's tick): the least a ticking node can
cost. Reported, never asserted: CPU % of one core per node, the ratio to the baseline,
and how many times the node's main thread entered epoll per second (strace, if present).

    python3 benchmarks/bench_idle.py
    python3 -m pytest benchmarks/bench_idle.py --benchmark-only -s
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pykv.server.cmd_cluster import cluster_down, cluster_up, read_pid

_TICKER = """
import asyncio, uvloop
async def main():
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0.01)
uvloop.run(main())
"""


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_percent(pids: list[int], seconds: float) -> list[float]:
    before = [_cpu_seconds(p) for p in pids]
    time.sleep(seconds)
    return [round(100 * (_cpu_seconds(p) - b) / seconds, 2) for p, b in zip(pids, before, strict=True)]


def _epolls_per_second(pid: int, seconds: float = 2.0) -> float | None:
    """How often the main thread polls its loop (None without strace or its permission)."""
    if shutil.which("strace") is None:
        return None
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        try:
            subprocess.run(
                ["timeout", "-s", "INT", str(seconds), "strace", "-c", "-e", "trace=epoll_pwait,epoll_wait",
                 "-p", str(pid), "-o", out.name], capture_output=True, check=False,
            )
        except OSError:
            return None
        calls = [line.split() for line in out.read().splitlines() if "epoll" in line]
    return round(sum(int(c[3]) for c in calls if len(c) >= 5) / seconds, 1) if calls else None


def bench_idle(seconds: float = 10.0, partitions: int = 16, base: int = 28600) -> dict:
    ticker = subprocess.Popen([sys.executable, "-c", _TICKER])
    try:
        time.sleep(1.0)
        baseline = _cpu_percent([ticker.pid], seconds)[0]
    finally:
        ticker.kill()
        ticker.wait()
    with tempfile.TemporaryDirectory(prefix="pykv-bench-idle-") as tmp:
        data = Path(tmp)
        try:
            cluster_up(data, 3, base, partitions=partitions)
            pids = [read_pid(data, n) for n in (1, 2, 3)]
            time.sleep(5.0)  # idle groups quiesce after a few election timeouts
            per_node = _cpu_percent(pids, seconds)
            epolls = _epolls_per_second(pids[0])
        finally:
            cluster_down(data)
    mean = sum(per_node) / len(per_node)
    return {
        "partitions": partitions, "node_cpu_percent": per_node,
        "ticking_loop_cpu_percent": baseline,
        "node_over_ticking_loop": round(mean / baseline, 2) if baseline else None,
        "node1_epolls_per_s": epolls,
    }


def test_idle(benchmark) -> None:
    """pytest-benchmark entry: 5 s of idleness."""
    result = benchmark.pedantic(lambda: bench_idle(5.0), rounds=1, iterations=1)
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to measure")
    parser.add_argument("--partitions", type=int, default=16, help="shards of the cluster")
    args = parser.parse_args()
    print(json.dumps(bench_idle(args.seconds, args.partitions), indent=2))
