"""SharedCache: several stores' read caches within one byte budget and one LRU order."""

from __future__ import annotations

import random
import threading

from pykv.replica.shard import COMMIT, encode_command
from pykv.replica.stored import StoredShardState
from pykv.storage.cache import ENTRY_OVERHEAD, SharedCache
from pykv.txn.model import CommitRequest, WriteOp
from pykv.types import OpKind

VALUE = 1000
COST = 1 + VALUE + ENTRY_OVERHEAD  # a one-byte key


def test_views_share_one_budget_and_evict_the_least_recent_entry_of_any_view():
    shared = SharedCache(3 * COST)
    a, b = shared.view(), shared.view()
    a.put(b"1", 1, b"x" * VALUE)
    b.put(b"1", 1, b"y" * VALUE)  # the same key in another store is another entry
    a.put(b"2", 1, b"x" * VALUE)
    assert b.get(b"1", 1) == b"y" * VALUE and a.get(b"1", 1) == b"x" * VALUE
    b.put(b"2", 1, b"y" * VALUE)  # over budget: evicts a's b"2", the least recently used
    assert a.get(b"2", 1) is None
    assert (len(a), len(b)) == (1, 2)
    assert (a.bytes, b.bytes, shared.bytes) == (COST, 2 * COST, 3 * COST)


def test_clearing_or_closing_one_view_leaves_the_others_entries():
    shared = SharedCache(10 * COST)
    a, b = shared.view(), shared.view()
    for key in (b"1", b"2"):
        a.put(key, 1, b"x" * VALUE)
        b.put(key, 1, b"y" * VALUE)
    a.clear()
    assert a.get(b"1", 1) is None and len(a) == 0 and a.bytes == 0
    assert b.get(b"1", 1) == b"y" * VALUE and shared.bytes == 2 * COST
    b.close()
    assert shared.bytes == 0
    a.put(b"3", 1, b"x" * VALUE)  # the survivor still works
    assert a.get(b"3", 1) == b"x" * VALUE


def test_threads_on_many_views_keep_the_accounting_exact():
    shared = SharedCache(40 * COST)
    views = [shared.view() for _ in range(4)]

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(3000):
            view = views[rng.randrange(4)]
            key = bytes([rng.randrange(256)])
            if rng.random() < 0.5:
                view.put(key, rng.randrange(3), b"v" * rng.randrange(VALUE))
            elif rng.random() < 0.8:
                view.get(key, rng.randrange(3))
            else:
                view.discard(key)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shared.bytes <= shared.capacity_bytes
    assert shared.bytes == sum(v.bytes for v in views)
    assert sum(len(v) for v in views) == len(shared._entries)
    assert shared.bytes == sum(len(k) + len(v[1]) + ENTRY_OVERHEAD for (_, k), v in shared._entries.items())


def test_a_nodes_shards_stay_within_the_node_cache_budget(tmp_path):
    """Each shard alone would cache up to its own 8 MiB default; sharing, 20 shards that read
    all their values back hold no more than the node's budget between them."""
    budget = 256 << 10
    shared = SharedCache(budget)
    for gid in range(20):
        shard = StoredShardState(gid, tmp_path / f"g{gid}")
        writes = tuple(WriteOp(f"k{i}", OpKind.PUT, b"v" * 2000) for i in range(100))
        shard.apply(1, encode_command(COMMIT, None, CommitRequest(gid + 1, 1, {}, writes).to_wire()))
        shard.close()
    shards = [StoredShardState(g, tmp_path / f"g{g}", cache=shared) for g in range(20)]
    try:
        for shard in shards:
            for i in range(100):
                assert shard.get(f"k{i}").value == b"v" * 2000
        assert 0 < shared.bytes <= budget
    finally:
        for shard in shards:
            shard.close()
    assert shared.bytes == 0  # closing the stores leaves nothing behind
