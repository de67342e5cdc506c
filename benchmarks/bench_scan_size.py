"""Reading a large range back: a 3-node cluster's paged scans against the embedded store's.

The same ``--keys`` keys of ``--value-bytes`` random bytes go into a 3-node cluster (real
processes, 16 partitions) and into an embedded store; each is then read back whole with
``scan(consistent=False)`` (a page of about 1 MiB per shard at a time on the cluster) and
with a consistent scan (two passes that agree, on a quiet range). Reported, never
asserted: MB/s of each, the cluster's as a ratio of the embedded store's (same run, same
machine), and the peak of the memory Python allocated during each scan (tracemalloc)
against the range's size: a lazy scan holds a page per shard, not the range; a consistent
scan holds up to ``max_scan_bytes`` (256 MiB by default: here the whole range, in its two
passes), then streams from a copy-on-write view (``--budget-mb``, 1 by default: the
"streamed" figures).

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


def _read_back(db, keys: int, range_mb: float, kinds=(("plain", False), ("consistent", True))) -> dict:
    """MB/s of each kind of scan (name, consistent), and its allocation peak."""
    out = {}
    for name, consistent in kinds:
        started = time.monotonic()
        count = sum(1 for _ in db.scan("big/", consistent=consistent))
        assert count == keys
        out[f"{name}_mb_per_s"] = round(range_mb / (time.monotonic() - started), 1)
    for name, consistent in kinds:
        tracemalloc.start()
        try:
            count = sum(1 for _ in db.scan("big/", consistent=consistent))
            out[f"{name}_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 1e6, 1)
        finally:
            tracemalloc.stop()
        assert count == keys
    return out


STREAMED = (("streamed", True),)


def bench_scan_size(keys: int, value_bytes: int, base: int = 28700, budget_mb: float = 1.0) -> dict:
    range_mb = keys * value_bytes / 1e6
    budget = int(budget_mb * (1 << 20))
    result: dict = {"keys": keys, "value_bytes": value_bytes, "range_mb": round(range_mb, 1),
                    "budget_mb": budget_mb}
    with tempfile.TemporaryDirectory(prefix="pykv-bench-scan-size-") as tmp:
        data = Path(tmp)
        with pykv.open(data / "embedded") as db:
            _fill(db, keys, value_bytes)
            result["embedded"] = _read_back(db, keys, range_mb)
        with pykv.open(data / "embedded", max_scan_bytes=budget) as db:
            result["embedded"].update(_read_back(db, keys, range_mb, STREAMED))
        try:
            cluster_up(data / "cluster", 3, base)
            address = [f"127.0.0.1:{base}"]
            with pykv.client.connect(address, timeout=60) as db:
                _fill(db, keys, value_bytes)
                result["cluster"] = _read_back(db, keys, range_mb)
            with pykv.client.connect(address, timeout=60, max_scan_bytes=budget) as db:
                result["cluster"].update(_read_back(db, keys, range_mb, STREAMED))
        finally:
            cluster_down(data / "cluster")
    for kind in ("plain", "consistent", "streamed"):
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
    parser.add_argument("--budget-mb", type=float, default=1.0,
                        help="max_scan_bytes of the streamed consistent scans, in MiB")
    args = parser.parse_args()
    print(json.dumps(bench_scan_size(args.keys, args.value_bytes, budget_mb=args.budget_mb), indent=2))
