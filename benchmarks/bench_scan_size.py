"""Reading a large range back: a 3-node cluster's paged scans against the embedded store's.

The same ``--keys`` keys of ``--value-bytes`` random bytes go into a 3-node cluster (real
processes, 16 partitions) and into an embedded store; each is then read back whole with
``scan(consistent=False)`` (a page of about 1 MiB per shard at a time on the cluster) and
with a consistent scan (two passes that agree, on a quiet range). Reported, never
asserted: MB/s of each, the cluster's as a ratio of the embedded store's (same run, same
machine), and the peak of the memory Python allocated during a plain scan (tracemalloc)
against the range's size: a lazy scan holds a page per shard, not the range.

    python3 benchmarks/bench_scan_size.py --keys 40000 --value-bytes 1000
    python3 -m pytest benchmarks/bench_scan_size.py --benchmark-only -s      # 10,000 keys
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

import pykv
import pykv.client
from pykv.server.cmd_cluster import cluster_down, cluster_up


def _fill(db, keys: int, value_bytes: int) -> None:
    rng = random.Random(7)
    for first in range(0, keys, 100):
        with db.transaction() as tx:
            for i in range(first, min(keys, first + 100)):
                tx.put(f"big/{i:07d}", rng.randbytes(value_bytes))


def _read_back(db, keys: int, range_mb: float) -> dict:
    """MB/s of a plain and of a consistent scan, and a plain scan's allocation peak."""
    out = {}
    for name, consistent in (("plain", False), ("consistent", True)):
        started = time.monotonic()
        count = sum(1 for _ in db.scan("big/", consistent=consistent))
        assert count == keys
        out[f"{name}_mb_per_s"] = round(range_mb / (time.monotonic() - started), 1)
    tracemalloc.start()
    try:
        count = sum(1 for _ in db.scan("big/", consistent=False))
        out["plain_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 1e6, 1)
    finally:
        tracemalloc.stop()
    assert count == keys
    return out


def bench_scan_size(keys: int, value_bytes: int, base: int = 28700) -> dict:
    range_mb = keys * value_bytes / 1e6
    result: dict = {"keys": keys, "value_bytes": value_bytes, "range_mb": round(range_mb, 1)}
    with tempfile.TemporaryDirectory(prefix="pykv-bench-scan-size-") as tmp:
        data = Path(tmp)
        with pykv.open(data / "embedded") as db:
            _fill(db, keys, value_bytes)
            result["embedded"] = _read_back(db, keys, range_mb)
        try:
            cluster_up(data / "cluster", 3, base)
            with pykv.client.connect([f"127.0.0.1:{base}"], timeout=60) as db:
                _fill(db, keys, value_bytes)
                result["cluster"] = _read_back(db, keys, range_mb)
        finally:
            cluster_down(data / "cluster")
    for kind in ("plain", "consistent"):
        key = f"{kind}_mb_per_s"
        result[f"cluster_vs_embedded_{kind}"] = round(result["cluster"][key] / result["embedded"][key], 2)
    return result


def test_scan_size(benchmark) -> None:
    """pytest-benchmark entry: 10,000 keys of 1,000 bytes (10 MB)."""
    result = benchmark.pedantic(lambda: bench_scan_size(10_000, 1000), rounds=1, iterations=1)
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=40_000, help="keys in the range")
    parser.add_argument("--value-bytes", type=int, default=1000, help="bytes of each value")
    args = parser.parse_args()
    print(json.dumps(bench_scan_size(args.keys, args.value_bytes), indent=2))
