"""What a paused node costs clients: transfers on a 3-node cluster while node 1 is SIGSTOPped.

``--threads`` threads share one client (given every node's address) and move 1 between two
of 24 accounts in a transaction (2 reads, 2 writes, usually two shards), without pause. After
a second of that, node 1 (the first seed, and the leader of about a third of the shards) is
SIGSTOPped for ``--pause`` seconds, then continued. Reported, never asserted: the
transactions' p50, p99 and longest before the pause (the baseline of the same run) and from
the pause to a second after it, how many of those took over 1 s, the attempts that timed
out on each node, and the longest as a ratio of the baseline's p99.

    python3 benchmarks/bench_frozen_node.py --pause 8
    python3 -m pytest benchmarks/bench_frozen_node.py --benchmark-only -s      # a 4 s pause
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pykv
import pykv.client
from pykv.server.cmd_cluster import cluster_down, cluster_up, read_pid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from transfers import Transfers  # noqa: E402 - the tests' transfers, timed

ACCOUNTS = [f"acct{i:02d}" for i in range(24)]


def _figures(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {
        "transactions": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 1),
        "longest_ms": round(ordered[-1] * 1000, 1),
    }


def bench_frozen_node(pause: float, threads: int = 4, base: int = 28760) -> dict:
    with tempfile.TemporaryDirectory(prefix="pykv-bench-frozen-") as tmp:
        data = Path(tmp) / "cluster"
        try:
            config = cluster_up(data, 3, base, partitions=8)
            with pykv.client.connect([config.nodes[n] for n in sorted(config.nodes)]) as db:
                with db.transaction() as tx:
                    for account in ACCOUNTS:
                        tx.put(account, 100)
                with Transfers(db, ACCOUNTS, threads, keep_going=True) as moving:
                    time.sleep(1.0)
                    stopped = time.monotonic()
                    pid = read_pid(data, 1)
                    assert pid is not None, "node 1 has no pid file"
                    os.kill(pid, signal.SIGSTOP)
                    try:
                        time.sleep(pause)
                    finally:
                        os.kill(pid, signal.SIGCONT)
                    time.sleep(1.0)
                timeouts = dict(db.backend.core.router.timeouts)
                total = sum(db.get_many(ACCOUNTS).values())
        finally:
            cluster_down(data)
    before = _figures([s for end, s in moving.done if end < stopped])
    during = _figures([s for end, s in moving.done if end >= stopped])
    during["over_1s"] = sum(1 for end, s in moving.done if end >= stopped and s > 1.0)
    return {
        "pause_s": pause, "threads": threads, "before": before, "during_and_after": during,
        "longest_vs_baseline_p99": round(during["longest_ms"] / before["p99_ms"], 1),
        "timeouts_per_node": timeouts, "errors": [repr(e) for e in moving.errors[:3]], "total_kept": total == 100 * len(ACCOUNTS),
    }


def test_frozen_node(benchmark) -> None:
    """pytest-benchmark entry: a 4 s pause."""
    result = benchmark.pedantic(lambda: bench_frozen_node(4.0), rounds=1, iterations=1)
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pause", type=float, default=8.0, help="seconds node 1 stays stopped")
    parser.add_argument("--threads", type=int, default=4, help="threads sharing the client")
    args = parser.parse_args()
    print(json.dumps(bench_frozen_node(args.pause, args.threads), indent=2))
