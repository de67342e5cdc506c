"""Hash ring: lookup cost against raw xxhash, and balance / movement figures.

From the repo root; the pytest form works as is (``python3 -m`` puts the root on
sys.path and benchmarks/conftest.py collects bench_*.py), the script form needs pykv
installed (``pip install -e .``):

    python3 -m pytest benchmarks/bench_ring.py -q   # lookup speed against raw xxhash
    python3 benchmarks/bench_ring.py                # load balance and moved fractions
"""

from __future__ import annotations

import sys

import xxhash

from pykv.cluster.ring import HashRing

KEYS = [f"user:{i}".encode() for i in range(10_000)]


def test_baseline_raw_xxhash(benchmark):
    benchmark(lambda: [xxhash.xxh64_intdigest(k) for k in KEYS])


def test_owners_lookup(benchmark):
    ring = HashRing(range(1, 10))
    benchmark(lambda: [ring.owners(k) for k in KEYS])


def test_build_ring_9_nodes(benchmark):
    benchmark(lambda: HashRing(range(1, 10)))


def figures(out=sys.stdout) -> None:
    """Per node count: max/min/mean replica slots per node, and slots moved by a join."""
    print("Q=256 partitions, V=64 vnodes, R=3 replicas; nodes are ints 1..N", file=out)
    print(f"{'N':>3} {'min':>5} {'max':>5} {'mean':>6} {'max/min':>8} "
          f"{'moved on join':>14} {'ideal':>6} {'ratio':>6} {'moved on leave':>15}", file=out)  # fmt: skip
    for n in (3, 4, 5, 8, 12, 16, 24, 32):
        ring = HashRing(range(1, n + 1))
        load = ring.load().values()
        joined = ring.with_node(n + 1)
        moved = sum(len(set(joined.replicas(p)) - set(ring.replicas(p))) for p in range(256))
        ideal = 256 * 3 / (n + 1)
        left = ring.without_node(1)
        moved_leave = sum(len(set(left.replicas(p)) - set(ring.replicas(p))) for p in range(256))
        print(
            f"{n:>3} {min(load):>5} {max(load):>5} {sum(load) / n:>6.1f} "
            f"{max(load) / min(load):>8.2f} {moved:>14} {ideal:>6.1f} {moved / ideal:>6.2f} "
            f"{moved_leave:>15}",
            file=out,
        )


if __name__ == "__main__":
    figures()
