"""Consistent scans (or backups) of a range that writers keep writing: how many return, and what writers feel.

A 3-node cluster (real processes, 16 partitions) holds ``--keys`` keys under one prefix;
``--writers`` threads put random keys of that range without pause while one thread takes
consistent scans of the whole range (``--read backup``: backups of the cluster, each into a
new embedded store, opened and counted) for ``--duration`` seconds. Reported, never
asserted: reads returned and given up, how many had to lock the range (scans whose passes
kept differing; every backup), their latency, and the writers' puts per second against the
same writers with no reader (the baseline, same run): what the locks cost them.

    python3 benchmarks/bench_scan.py --writers 16
    python3 benchmarks/bench_scan.py --writers 16 --keys 100000 --read backup
    python3 -m pytest benchmarks/bench_scan.py --benchmark-only -s      # 4 writers, 5 s
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pykv
import pykv.client
from pykv.server.cmd_cluster import cluster_down, cluster_up
from pykv.server.workload import percentile


def _writes_per_second(db, keys: int, writers: int, seconds: float, during=None) -> float:
    """Puts per second of ``writers`` threads over ``seconds``, while ``during()`` runs."""
    stop, done = threading.Event(), [0] * writers

    def write(i: int) -> None:
        rng = random.Random(i)
        while not stop.is_set():
            try:
                db.put(f"scan/{rng.randrange(keys):06d}", rng.randrange(1 << 30))
                done[i] += 1
            except pykv.TransactionConflict:  # KeyLocked past its retries: a locked range
                pass

    threads = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(writers)]
    for t in threads:
        t.start()
    started = time.monotonic()
    if during is not None:
        during(started + seconds)
    else:
        time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - started)


def _scan_count(db, tmp: Path, n: int) -> int:
    return sum(1 for _ in db.scan("scan/"))


def _backup_count(db, tmp: Path, n: int) -> int:
    target = tmp / f"backup{n}"
    db.backup(target)
    with pykv.open(target) as copy:
        count = copy.backend.stats()["keys"]
    shutil.rmtree(target)
    return count


READS = {"scan": _scan_count, "backup": _backup_count}


def bench_scan(keys: int, writers: int, duration: float, base: int = 28600, read: str = "scan") -> dict:
    with tempfile.TemporaryDirectory(prefix="pykv-bench-scan-") as tmp:
        data = Path(tmp)
        try:
            cluster_up(data, 3, base)
            with pykv.client.connect([f"127.0.0.1:{base}"], timeout=30) as db:
                for first in range(0, keys, 100):
                    with db.transaction() as tx:
                        for i in range(first, min(keys, first + 100)):
                            tx.put(f"scan/{i:06d}", i)
                baseline = _writes_per_second(db, keys, writers, duration)
                scans: list[float] = []
                given_up = [0]
                locks_before = db.backend.core.rounds["lock"] + db.backend.core.rounds["lock all"]

                def scan_until(deadline: float) -> None:
                    while time.monotonic() < deadline:
                        started = time.monotonic()
                        try:
                            count = READS[read](db, data, len(scans))
                        except pykv.TransactionConflict:
                            given_up[0] += 1
                            continue
                        assert count == keys
                        scans.append(time.monotonic() - started)

                with_scans = _writes_per_second(db, keys, writers, duration, during=scan_until)
                locked = db.backend.core.rounds["lock"] + db.backend.core.rounds["lock all"] - locks_before
        finally:
            cluster_down(data)
    scans.sort()
    return {
        "read": read, "keys": keys, "writers": writers, "duration_s": duration,
        "reads": len(scans), "given_up": given_up[0], "locked": locked,
        "read_p50_ms": round(percentile(scans, 50) * 1000, 1) if scans else None,
        "read_max_ms": round(scans[-1] * 1000, 1) if scans else None,
        "puts_per_s_alone": round(baseline), "puts_per_s_while_reading": round(with_scans),
    }


def test_scan_under_writes(benchmark) -> None:
    """pytest-benchmark entry: 1,000 keys, 4 writers, 5 s."""
    result = benchmark.pedantic(lambda: bench_scan(1000, 4, 5.0), rounds=1, iterations=1)
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1000, help="keys in the scanned range")
    parser.add_argument("--writers", type=int, default=8, help="threads putting keys of the range")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each phase")
    parser.add_argument("--read", choices=sorted(READS), default="scan", help="what the reader takes")
    args = parser.parse_args()
    print(json.dumps(bench_scan(args.keys, args.writers, args.duration, read=args.read), indent=2))
