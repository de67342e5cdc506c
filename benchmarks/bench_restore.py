"""`pykv restore` into a 3-node cluster: loads that keep every version's clock, against
transactions of blind puts through the public API (the baseline), in the same run.

An embedded store of ``--keys`` keys (100-byte values) is the backup. It is restored into an
empty 3-node cluster by pykv.server.cmd_restore.restore (batches of versions: LOAD, 4 at
once), then the cluster is wiped and the same keys are written by transactions of the same
batches of blind puts, 4 at once. Reported, never asserted: keys/s of each, and whether the
restored versions kept their clocks (the puts' do not).

    python3 benchmarks/bench_restore.py --keys 100000
    python3 -m pytest benchmarks/bench_restore.py --benchmark-only -s
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pykv
from pykv.replica.shard import bounded_runs
from pykv.server.cmd_cluster import cluster_down, cluster_up
from pykv.server.cmd_restore import BATCH_BYTES, BATCH_KEYS, IN_FLIGHT, item_bytes, restore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cluster_harness import wipe_cluster  # noqa: E402 - the tests' way to empty a cluster


def _put_batches(backup: pykv.KeyValueStore, cluster: pykv.KeyValueStore) -> int:
    """The baseline: the same batches as restore's, as transactions of blind puts."""
    def put_all(batch: list) -> None:
        def puts(tx: pykv.Transaction) -> None:
            for key, version in batch:
                tx.put(key, version.value)
        cluster.transact(puts)

    done = 0
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        batches = bounded_runs(backup.backend.scan("", None, None, None), item_bytes, BATCH_KEYS, BATCH_BYTES)
        while wave := list(itertools.islice(batches, IN_FLIGHT)):
            list(pool.map(put_all, wave))
            done += sum(len(batch) for batch in wave)
    return done


def bench_restore(keys: int, base: int = 28860) -> dict:
    with tempfile.TemporaryDirectory(prefix="pykv-bench-restore-") as tmp:
        source = Path(tmp) / "backup"
        with pykv.open(source) as db:
            for start in range(0, keys, 2_000):
                with db.transaction() as tx:
                    for i in range(start, min(keys, start + 2_000)):
                        tx.put(f"k{i:08d}", "v" * 100)
        data = Path(tmp) / "cluster"
        try:
            config = cluster_up(data, 3, base, partitions=16)
            addresses = [config.nodes[n] for n in sorted(config.nodes)]
            seconds = {}
            with pykv.open(source, read_only=True) as backup, pykv.connect(addresses) as cluster:
                for name, write in (("load (pykv restore)", restore), ("blind puts (baseline)", _put_batches)):
                    wipe_cluster(addresses)
                    started = time.perf_counter()
                    assert write(backup, cluster) == keys
                    seconds[name] = time.perf_counter() - started
                    sample = [f"k{i:08d}" for i in range(0, keys, max(1, keys // 100))]
                    kept = all(backup.get_versioned(k)[1] == cluster.get_versioned(k)[1] for k in sample)
                    seconds[f"{name}: clocks kept"] = kept
        finally:
            cluster_down(data)
    return {"keys": keys, **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in seconds.items()}}


def test_restore(benchmark, record) -> None:
    """pytest-benchmark entry: 30,000 keys each way."""
    result = benchmark.pedantic(lambda: bench_restore(30_000), rounds=1, iterations=1)
    print(json.dumps(result))
    for name in ("load (pykv restore)", "blind puts (baseline)"):
        record("restore of 30,000 keys into 3 nodes", name, result[name], units=result["keys"],
               subject=name.startswith("load"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    args = parser.parse_args()
    print(json.dumps(bench_restore(args.keys), indent=2))
