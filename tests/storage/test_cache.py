"""SharedCache: several stores' read caches within one byte budget and one LRU order."""

from __future__ import annotations

import gc
import random
import threading
from collections import OrderedDict

import pytest

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
    with shared._lock:
        held = list(shared._slots())
    assert sum(len(v) for v in views) == len(held)
    assert shared.bytes == sum(len(slot) - 4 + len(value) + ENTRY_OVERHEAD for slot, _, value in held)


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


class _ModelCache:
    """The reference for the eviction order: the two generations as OrderedDicts."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.young: OrderedDict[tuple[int, bytes], tuple[int, bytes]] = OrderedDict()
        self.read: set[tuple[int, bytes]] = set()  # young's slots read since they came in
        self.old: OrderedDict[tuple[int, bytes], tuple[int, bytes]] = OrderedDict()

    def used(self) -> int:
        return sum(len(k) + len(v) + ENTRY_OVERHEAD
                   for entries in (self.young, self.old) for (_, k), (_, v) in entries.items())

    def held(self) -> set[tuple[int, bytes]]:
        return set(self.young) | set(self.old)

    def get(self, slot: tuple[int, bytes], lsn: int) -> bytes | None:
        if slot in self.young:
            if self.young[slot][0] != lsn:
                return None
            self.read.add(slot)
            return self.young[slot][1]
        if slot not in self.old or self.old[slot][0] != lsn:
            return None
        self.young[slot] = self.old.pop(slot)
        return self.young[slot][1]

    def drop(self, slot: tuple[int, bytes]) -> None:
        self.young.pop(slot, None)
        self.old.pop(slot, None)
        self.read.discard(slot)

    def put(self, slot: tuple[int, bytes], lsn: int, value: bytes) -> None:
        self.drop(slot)
        if len(slot[1]) + len(value) + ENTRY_OVERHEAD > self.capacity:
            return
        self.young[slot] = (lsn, value)
        while self.used() > self.capacity:
            if not self.old:
                order = sorted(self.young, key=lambda s: s in self.read)  # stable
                self.old = OrderedDict((s, self.young[s]) for s in order)
                self.young, self.read = OrderedDict(), set()
            self.old.popitem(last=False)


@pytest.mark.parametrize("seed", range(6))
def test_eviction_order_through_many_turnovers_matches_the_reference(seed):
    """The dicts, the order list and its cursor evict exactly what the plain two-generation
    reference does, across views, stale lsns, discards and clears."""
    rng = random.Random(seed)
    capacity = rng.choice([3, 7, 20]) * COST
    shared, model = SharedCache(capacity), _ModelCache(capacity)
    views = [shared.view() for _ in range(3)]
    keys = [bytes([i]) for i in range(40)]
    for _ in range(4000):
        v, key, lsn = rng.randrange(3), rng.choice(keys), rng.randrange(2)
        roll = rng.random()
        if roll < 0.45:
            value = bytes([v]) * rng.choice([VALUE // 2, VALUE, 2 * VALUE])
            views[v].put(key, lsn, value)
            model.put((v, key), lsn, value)
        elif roll < 0.9:
            assert views[v].get(key, lsn) == model.get((v, key), lsn)
        elif roll < 0.97:
            views[v].discard(key)
            model.drop((v, key))
        else:
            views[v].clear()
            for slot in [s for s in model.held() if s[0] == v]:
                model.drop(slot)
        assert shared.bytes == model.used() <= capacity
    with shared._lock:
        held = {(int.from_bytes(slot[:4], "big") - 1, slot[4:]) for slot, _, _ in shared._slots()}
    assert held == model.held()


def test_an_entry_read_since_the_last_turnover_outlives_entries_only_put():
    """A scan that puts many entries once does not push out the entries being read."""
    shared = SharedCache(10 * COST)
    view = shared.view()
    hot = [b"h%d" % i for i in range(3)]
    for key in hot:
        view.put(key, 1, b"x" * VALUE)
    for i in range(200):
        view.put(b"s%d" % i, 1, b"x" * VALUE)  # the scan
        for key in hot:
            assert view.get(key, 1) == b"x" * VALUE, f"hot entry {key!r} evicted at {i}"
    assert len(view) <= 10


def test_a_full_cache_adds_nothing_the_garbage_collector_walks():
    """Its entries are bytes and ints in plain dicts, which the collector stops tracking, so
    a node's full cache does not lengthen every full collection (an OrderedDict of tuples of
    400,000 entries had added 35 ms)."""
    shared = SharedCache(10_000 * (ENTRY_OVERHEAD + 8 + 10))  # 10,000 entries
    view = shared.view()
    gc.collect()
    before = len(gc.get_objects())
    for i in range(20_000):  # past the budget: evictions and a turnover
        view.put(b"%08d" % i, i, b"v" * 10)
        if i % 3 == 0:
            view.get(b"%08d" % (i // 2), i // 2)
    gc.collect()
    assert len(gc.get_objects()) - before < 50
    assert len(view) == 10_000
