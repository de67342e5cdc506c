"""A replica catching up from a large snapshot: how long, and what the cluster feels meanwhile.

A 3-node cluster (real processes, one partition, short log) loses node 3 (SIGKILL) while
``--mb`` megabytes of incompressible 100 KB values are written; node 3 then restarts and
catches up from an InstallSnapshot image of the whole shard while a writer keeps putting.
Reported, never asserted: the catch-up time; the writer's put latency during the catch-up
against the same writer before it (the baseline, same run); how long node 3 takes to
answer a status request meanwhile (a node whose loop is held answers nothing, and its other
groups go without heartbeats and votes); peak RSS of the leader and of node 3; images sent.

    python3 benchmarks/bench_catchup.py --mb 1000
    python3 -m pytest benchmarks/bench_catchup.py --benchmark-only -s      # 100 MB
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pykv.client
from pykv.client.admin import fetch_status
from pykv.server.cmd_cluster import cluster_down, cluster_up, read_pid
from pykv.server.workload import percentile

VALUE_BYTES = 100 << 10


def _rss_mb(pid: int | None) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))
    except (OSError, StopIteration, TypeError):
        return 0


class _Sampler(threading.Thread):
    """Calls ``probe`` in a loop until stopped, keeping the seconds each call took."""

    def __init__(self, probe, pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.probe, self.pause = probe, pause
        self.seconds: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                self.probe()
            except Exception:  # noqa: BLE001 - a node restarting: no answer counts as none
                pass
            else:
                self.seconds.append(time.monotonic() - started)
            time.sleep(self.pause)

    def stop(self) -> dict:
        self.stopping.set()
        self.join()
        got = sorted(self.seconds)
        self.seconds = []
        return {"n": len(got), "p50_ms": round(percentile(got, 50) * 1000, 1),
                "max_ms": round(got[-1] * 1000, 1) if got else None}


def bench_catchup(mb: int, snapshot_every: int = 200, base: int = 28500) -> dict:
    with tempfile.TemporaryDirectory(prefix="pykv-bench-catchup-") as tmp:
        data = Path(tmp)
        addresses = [f"127.0.0.1:{base + i}" for i in range(3)]
        try:
            cluster_up(data, 3, base, partitions=1, snapshot_every=snapshot_every)
            with pykv.client.connect(addresses[:2], timeout=30) as db:
                os.kill(read_pid(data, 3), signal.SIGKILL)
                count = mb * (1 << 20) // VALUE_BYTES
                for first in range(0, count, 8):
                    with db.transaction() as tx:
                        for i in range(first, min(count, first + 8)):
                            tx.put(f"big/{i:06d}", os.urandom(VALUE_BYTES))
                target = max(fetch_status(a)["groups"]["0"]["commit"] for a in addresses[:2])
                with pykv.client.connect(addresses[:2], timeout=30) as w:
                    n = iter(range(1 << 30))
                    writer = _Sampler(lambda: w.put(f"probe/{next(n) % 50}", 1))
                    writer.start()
                    time.sleep(2.0)
                    before = writer.stop()
                    writer = _Sampler(writer.probe)
                    pinger = _Sampler(lambda: fetch_status(addresses[2], timeout=30.0), pause=0.05)
                    peak = {"leader": 0, "node 3": 0}
                    started = time.monotonic()
                    cluster_up(data, 3, base, partitions=1, snapshot_every=snapshot_every)
                    writer.start()
                    pinger.start()
                    while True:
                        peak["leader"] = max(peak["leader"], max(_rss_mb(read_pid(data, i)) for i in (1, 2)))
                        peak["node 3"] = max(peak["node 3"], _rss_mb(read_pid(data, 3)))
                        try:
                            if fetch_status(addresses[2])["groups"]["0"]["applied"] >= target:
                                break
                        except Exception:  # noqa: BLE001 - not up yet
                            pass
                        time.sleep(0.05)
                    caught_up = time.monotonic() - started
                    during, status_calls = writer.stop(), pinger.stop()
            images = fetch_status(addresses[2])["snapshots"]["received"]
        finally:
            cluster_down(data)
    return {"mb": mb, "caught_up_s": round(caught_up, 2), "images": images,
            "puts_before": before, "puts_during": during, "node3_status_calls": status_calls,
            "peak_rss_mb": peak}


def test_catchup(benchmark) -> None:
    """pytest-benchmark entry: a 100 MB shard."""
    result = benchmark.pedantic(lambda: bench_catchup(100), rounds=1, iterations=1)
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the shard node 3 must catch up with")
    parser.add_argument("--snapshot-every", type=int, default=200, help="applied entries between snapshots")
    args = parser.parse_args()
    print(json.dumps(bench_catchup(args.mb, args.snapshot_every), indent=2))
