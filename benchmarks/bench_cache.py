"""What a node's full read cache costs: each full garbage collection, hits and puts.

A node's shards share one read cache (pykv.storage.cache.SharedCache, 64 MiB by default).
Full of small values, it holds hundreds of thousands of entries; a full collection stops
the node's event loop for as long as it walks them. Measured in the same run, with the
same 400,000 entries (16-byte keys, 100-byte values), against the obvious layout: one
``OrderedDict`` of (view, key) -> (lsn, value) tuples, ``move_to_end`` on a hit. Its hits
are timed as a bare loop, without the cache's lock and method call: the cost of those
(about 300 ns) is in SharedCache's figure.

    python3 -m pytest benchmarks/bench_cache.py -q -p no:randomly
    python3 benchmarks/bench_cache.py
"""

from __future__ import annotations

import time
from collections import OrderedDict

from gcpause import best_full_collection, record_pause

from pykv.storage.cache import ENTRY_OVERHEAD, SharedCache

HELD = 400_000
KEY_BYTES, VALUE_BYTES = 16, 100
KEYS = [b"%016d" % i for i in range(HELD)]
VALUE = b"v" * VALUE_BYTES


def _full_cache() -> SharedCache:
    cache = SharedCache(HELD * (KEY_BYTES + VALUE_BYTES + ENTRY_OVERHEAD))
    view = cache.view()
    for lsn, key in enumerate(KEYS):
        view.put(key, lsn, VALUE)
    return cache


def _ordered_dict() -> OrderedDict:
    return OrderedDict(((1, key), (lsn, VALUE)) for lsn, key in enumerate(KEYS))


def _hits(cache: SharedCache) -> float:
    """Seconds per hit, every key read once in order (each hit moves it to the recent end)."""
    (view,) = cache._views.values()
    start = time.perf_counter()
    for lsn, key in enumerate(KEYS):
        view.get(key, lsn)
    return (time.perf_counter() - start) / HELD


def _ordered_dict_hits(entries: OrderedDict) -> float:
    start = time.perf_counter()
    for lsn, key in enumerate(KEYS):
        slot = (1, key)
        held = entries.get(slot)
        if held is not None and held[0] == lsn:
            entries.move_to_end(slot)
    return (time.perf_counter() - start) / HELD


def test_full_collection_nothing_held(benchmark, record) -> None:
    record_pause(benchmark, record, "read cache", "nothing held")


def test_full_collection_cache_held(benchmark, record) -> None:
    cache = _full_cache()
    record_pause(benchmark, record, "read cache", "SharedCache, 400k entries", subject=True)
    assert cache.stats()["entries"] == HELD


def test_full_collection_ordered_dict_held(benchmark, record) -> None:
    entries = _ordered_dict()
    record_pause(benchmark, record, "read cache", "OrderedDict, 400k entries")
    assert len(entries) == HELD


def test_hits_cache(benchmark, record) -> None:
    cache = _full_cache()
    per_hit = benchmark.pedantic(_hits, args=(cache,), rounds=3)
    record("cache hits", "SharedCache", per_hit, subject=True)


def test_hits_ordered_dict(benchmark, record) -> None:
    entries = _ordered_dict()
    per_hit = benchmark.pedantic(_ordered_dict_hits, args=(entries,), rounds=3)
    record("cache hits", "OrderedDict, bare loop", per_hit)


def main() -> None:
    print(f"{HELD:,} entries, {KEY_BYTES}-byte keys, {VALUE_BYTES}-byte values")
    print(f"full collection, best of 5 (ms): nothing held {1000 * best_full_collection():.1f}")
    cache = _full_cache()
    print(f"  SharedCache held {1000 * best_full_collection():.1f}")
    print(f"  hits: {1e9 * min(_hits(cache) for _ in range(3)):.0f} ns each")
    del cache
    entries = _ordered_dict()
    print(f"  OrderedDict held {1000 * best_full_collection():.1f}")
    print(f"  hits: {1e9 * min(_ordered_dict_hits(entries) for _ in range(3)):.0f} ns each")


if __name__ == "__main__":
    main()
