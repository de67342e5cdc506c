"""Read-only transactions under writers, embedded: with read marks, and without (the baseline).

``--movers`` threads move 1 between two of 12 accounts in transactions, without pause;
``--readers`` threads sum all 12 in a transaction, then hold it ``--work-ms`` (work on what
was read) before the commit. With read marks (pykv.api.ReadMark), a sum whose reads all found
versions already current when its first read began commits without validation; the baseline
is the same store with its marks turned off (every sum validated at its commit), measured in
the same run. Reported, never asserted: sums committed per second, conflicts, and whether
every committed sum had the full total.

    python3 benchmarks/bench_readonly.py --work-ms 2
    python3 -m pytest benchmarks/bench_readonly.py --benchmark-only -s
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path

import pykv

ACCOUNTS = [f"sum/{i:02d}" for i in range(12)]


def _without_marks(db: pykv.KeyValueStore) -> None:
    """Turn the store's read marks off: every read-only transaction of two keys or more is
    validated at its commit, as before marks."""
    db.backend.mark = lambda: None


def bench_readonly(marks: bool, *, movers: int = 4, readers: int = 2, work_ms: float = 2.0,
                   duration: float = 5.0) -> dict:
    with tempfile.TemporaryDirectory(prefix="pykv-bench-readonly-") as tmp, pykv.open(Path(tmp) / "db") as db:
        if not marks:
            _without_marks(db)
        with db.transaction() as tx:
            for account in ACCOUNTS:
                tx.put(account, 100)
        counts = {"moves": 0, "sums": 0, "conflicts": 0, "wrong_totals": 0}
        lock = threading.Lock()
        deadline = time.monotonic() + duration

        def move(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                source, target = rng.sample(ACCOUNTS, 2)
                try:
                    with db.transaction() as tx:
                        tx[source] = tx.get(source) - 1
                        tx[target] = tx.get(target) + 1
                except pykv.TransactionConflict:
                    continue
                with lock:
                    counts["moves"] += 1

        def read(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                try:
                    with db.transaction() as tx:
                        total = sum(tx.get(account) for account in rng.sample(ACCOUNTS, len(ACCOUNTS)))
                        time.sleep(work_ms / 1000)
                except pykv.TransactionConflict:
                    with lock:
                        counts["conflicts"] += 1
                    continue
                with lock:
                    counts["sums"] += 1
                    counts["wrong_totals"] += total != 100 * len(ACCOUNTS)

        threads = [threading.Thread(target=move, args=(i,)) for i in range(movers)]
        threads += [threading.Thread(target=read, args=(100 + i,)) for i in range(readers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return {"marks": marks, "sums_per_s": round(counts["sums"] / duration, 1),
            "moves_per_s": round(counts["moves"] / duration, 1), **counts}


def test_readonly_sums_under_movers(benchmark, record) -> None:
    """pytest-benchmark entry: 3 s with marks, 3 s without, in the same run."""
    results = benchmark.pedantic(
        lambda: [bench_readonly(marks, duration=3.0) for marks in (True, False)], rounds=1, iterations=1
    )
    for result in results:
        print(json.dumps(result))
        record("read-only sums under 4 movers (2 ms of work each)",
               "with read marks" if result["marks"] else "validated (baseline)",
               3.0, units=max(result["sums"], 1), subject=result["marks"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--movers", type=int, default=4)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--work-ms", type=float, default=2.0, help="ms a sum holds its transaction")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    args = parser.parse_args()
    for with_marks in (True, False):
        print(json.dumps(bench_readonly(with_marks, movers=args.movers, readers=args.readers,
                                        work_ms=args.work_ms, duration=args.duration)))
