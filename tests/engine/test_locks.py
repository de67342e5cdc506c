"""The lock table against a Python model, and mutual exclusion under real threads."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pykv._engine.locks import EXCLUSIVE, SHARED, LockTable
from pykv.errors import KeyTooLarge

KEYS = [b"k%d" % i for i in range(6)] + [b"long-" * 40]
keys = st.sampled_from(KEYS)
txids = st.sampled_from([1, 2, 3, 2**64 - 1])
modes = st.sampled_from([SHARED, EXCLUSIVE])


class Model:
    """The rules of the module docstring, written the obvious way."""

    def __init__(self) -> None:
        self.locks: dict[bytes, tuple[int, set[int]]] = {}

    def grantable(self, key: bytes, txid: int, mode: int) -> bool:
        if key not in self.locks:
            return True
        held_mode, holders = self.locks[key]
        if txid in holders:
            return mode <= held_mode or len(holders) == 1
        return mode == SHARED and held_mode == SHARED

    def grant(self, key: bytes, txid: int, mode: int) -> None:
        held_mode, holders = self.locks.get(key, (mode, set()))
        self.locks[key] = (max(held_mode, mode), holders | {txid})

    def release_all(self, txid: int) -> int:
        released = 0
        for key, (_mode, holders) in list(self.locks.items()):
            if txid in holders:
                released += 1
                holders.discard(txid)
                if not holders:
                    del self.locks[key]
        return released


class LockTableAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = LockTable()
        self.model = Model()

    @rule(key=keys, txid=txids, mode=modes)
    def try_lock(self, key: bytes, txid: int, mode: int) -> None:
        expected = self.model.grantable(key, txid, mode)
        assert self.table.try_lock(key, txid, mode) == expected
        if expected:
            self.model.grant(key, txid, mode)

    @rule(shared=st.lists(keys, max_size=4), exclusive=st.lists(keys, max_size=3), txid=txids)
    def try_lock_all(self, shared: list[bytes], exclusive: list[bytes], txid: int) -> None:
        wanted = {key: SHARED for key in shared} | {key: EXCLUSIVE for key in exclusive}
        expected = all(self.model.grantable(k, txid, m) for k, m in wanted.items())
        assert self.table.try_lock_all(shared, exclusive, txid) == expected
        if expected:
            for key, mode in wanted.items():
                self.model.grant(key, txid, mode)

    @rule(txid=txids)
    def release_all(self, txid: int) -> None:
        assert self.table.release_all(txid) == self.model.release_all(txid)

    @invariant()
    def same_locks(self) -> None:
        assert len(self.table) == len(self.model.locks)
        for key in KEYS:
            mode, holders = self.model.locks.get(key, (0, set()))
            assert self.table.holders(key) == (mode, frozenset(holders))
        for txid in (1, 2, 3, 2**64 - 1):
            held = {k for k, (_, holders) in self.model.locks.items() if txid in holders}
            assert set(self.table.held_by(txid)) == held
            assert len(self.table.held_by(txid)) == len(held)


TestLockTableAgainstModel = LockTableAgainstModel.TestCase
TestLockTableAgainstModel.settings = settings(deadline=None, max_examples=80, stateful_step_count=30)


def test_shared_exclusive_and_upgrade() -> None:
    table = LockTable()
    assert table.try_lock(b"a", 1, SHARED)
    assert table.try_lock(b"a", 2, SHARED)
    assert not table.try_lock(b"a", 1, EXCLUSIVE)  # not the sole holder
    assert not table.try_lock(b"a", 3, EXCLUSIVE)
    assert table.release_all(2) == 1
    assert table.try_lock(b"a", 1, EXCLUSIVE)  # sole holder upgrades
    assert table.try_lock(b"a", 1, SHARED)  # re-entrant, stays exclusive
    assert table.holders(b"a") == (EXCLUSIVE, frozenset({1}))
    assert not table.try_lock(b"a", 2, SHARED)
    assert table.release_all(1) == 1
    assert table.holders(b"a") == (0, frozenset())
    assert len(table) == 0


def test_try_lock_all_takes_nothing_when_one_key_is_taken() -> None:
    table = LockTable()
    assert table.try_lock(b"busy", 9, EXCLUSIVE)
    assert not table.try_lock_all([b"r1", b"r2"], [b"w1", b"busy"], 1)
    assert table.held_by(1) == []
    assert len(table) == 1
    assert table.try_lock_all([b"r1", b"r2", b"w1"], [b"w1"], 1)  # in both: exclusive
    assert table.holders(b"w1") == (EXCLUSIVE, frozenset({1}))
    assert table.release_all(1) == 3


def test_many_keys_grow_and_shrink_the_tables() -> None:
    table = LockTable()
    for txid in range(200):
        assert table.try_lock_all([], [b"key-%d-%d" % (txid, i) for i in range(20)], txid)
    assert len(table) == 4000
    for txid in range(200):
        assert table.release_all(txid) == 20
    assert len(table) == 0
    assert table.release_all(5) == 0


def test_bad_arguments() -> None:
    table = LockTable()
    with pytest.raises(ValueError):
        table.try_lock(b"k", 1, 3)
    with pytest.raises(OverflowError):
        table.try_lock(b"k", 2**64, SHARED)
    with pytest.raises(OverflowError):
        table.try_lock(b"k", -1, SHARED)
    with pytest.raises(TypeError):
        table.try_lock("k", 1, SHARED)
    with pytest.raises(KeyTooLarge):
        table.try_lock_all([b"x" * 257], [], 1)
    assert len(table) == 0


def test_exclusive_locks_exclude_across_threads() -> None:
    table = LockTable()
    keys = [b"hot-%d" % i for i in range(4)]
    inside = {key: 0 for key in keys}
    readers = {key: 0 for key in keys}
    guard = threading.Lock()
    violations: list[str] = []
    granted = [0]

    def worker(thread: int) -> None:
        rng = random.Random(thread)
        for attempt in range(3000):
            txid = thread * 1_000_000 + attempt
            writes = rng.sample(keys, 1)
            reads = [k for k in rng.sample(keys, 2) if k not in writes]
            if not table.try_lock_all(reads, writes, txid):
                continue
            with guard:
                granted[0] += 1
                for key in writes:
                    inside[key] += 1
                    if inside[key] != 1 or readers[key]:
                        violations.append(f"{key!r} written by two or read while written")
                for key in reads:
                    readers[key] += 1
                    if inside[key]:
                        violations.append(f"{key!r} read while written")
            with guard:
                for key in writes:
                    inside[key] -= 1
                for key in reads:
                    readers[key] -= 1
            assert table.release_all(txid) == len(reads) + len(writes)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert violations == []
    assert granted[0] > 0
    assert len(table) == 0


def test_resize_while_keys_have_many_holders() -> None:
    # Both tables grow (and later shrink) while every shared key has hundreds of holders.
    table = LockTable()
    shared = [b"shared-%d" % i for i in range(50)]
    txids = list(range(1, 301))
    for txid in txids:
        own = [b"own-%d-%d" % (txid, i) for i in range(10)]
        assert table.try_lock_all(shared, own, txid)
    assert len(table) == 50 + 300 * 10
    for key in shared:
        assert table.holders(key) == (SHARED, frozenset(txids))
    assert not table.try_lock(shared[0], 999, EXCLUSIVE)
    random.Random(7).shuffle(txids)
    for n, txid in enumerate(txids, 1):
        assert table.release_all(txid) == 60
        assert table.held_by(txid) == []
        if n % 50 == 0:
            left = frozenset(txids[n:])
            assert table.holders(shared[n % 50]) == ((SHARED, left) if left else (0, frozenset()))
            assert len(table) == (50 + 10 * len(left) if left else 0)
            for other in txids[n : n + 5]:
                assert len(table.held_by(other)) == 60
    assert len(table) == 0
    assert table.try_lock(shared[0], 999, EXCLUSIVE)


def test_release_all_of_a_txid_with_many_keys() -> None:
    table = LockTable()
    keys = [b"bulk-%d" % i for i in range(5000)]
    assert table.try_lock_all(keys[:2500], keys[2500:], 1)
    assert table.try_lock_all(keys[:10], [], 2)  # shares ten of them
    assert len(table) == 5000
    assert table.held_by(1) == keys[:2500] + keys[2500:]
    assert table.release_all(1) == 5000
    assert len(table) == 10
    assert table.held_by(1) == []
    for key in keys[:10]:
        assert table.holders(key) == (SHARED, frozenset({2}))
    for key in keys[10:]:
        assert table.holders(key) == (0, frozenset())
    assert table.try_lock_all([], keys[10:], 3)  # the emptied slots are usable again
    assert table.release_all(3) == 4990
    assert table.release_all(2) == 10
    assert len(table) == 0


_M64 = 2**64 - 1


def _mix(x: int) -> int:
    """The splitmix64 finaliser of engine/keyhash.pxi: the transaction table's hash of a txid."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _txids_with_home(home: int, count: int, mask: int = 15) -> list[int]:
    found, txid = [], 1
    while len(found) < count:
        if _mix(txid) & mask == home:
            found.append(txid)
        txid += 1
    return found


# The txid -> held locks table is placed by mix(txid) with no seed, and starts (and stays, with
# at most 12 transactions) at 16 slots, so these txids crowd its last slots and the first ones:
# their cluster wraps around the end. The key -> lock table is the same code (seeded hashes).
_WRAPPING = [t for home in (13, 14, 15, 0, 1) for t in _txids_with_home(home, 3)]


def test_backward_shift_delete_across_the_wrap_around() -> None:
    table = LockTable()
    a, b, c, d = (_txids_with_home(14, 1)[0], *_txids_with_home(15, 2), _txids_with_home(0, 1)[0])
    for n, txid in enumerate((a, b, c, d)):  # slots 14, 15, 0 (wrapped), 1
        assert table.try_lock(b"w%d" % n, txid, EXCLUSIVE)
    assert table.release_all(b) == 1  # c shifts back over the end to 15, d to 0
    assert table.held_by(a) == [b"w0"]
    assert table.held_by(c) == [b"w2"]
    assert table.held_by(d) == [b"w3"]
    assert table.release_all(a) == 1
    assert table.held_by(c) == [b"w2"]
    assert table.held_by(d) == [b"w3"]
    assert table.try_lock(b"w4", c, SHARED)
    assert table.held_by(c) == [b"w2", b"w4"]
    assert table.release_all(c) == 2
    assert table.release_all(d) == 1
    assert len(table) == 0


@settings(deadline=None, max_examples=150)
@given(st.lists(st.tuples(st.sampled_from(_WRAPPING), st.booleans()), max_size=60))
def test_wrapping_cluster_against_a_model(ops: list[tuple[int, bool]]) -> None:
    table = LockTable()
    model: dict[int, list[bytes]] = {}
    for step, (txid, take) in enumerate(ops):
        if take and (txid in model or len(model) < 12):
            key = b"t%d-%d" % (txid, step)
            assert table.try_lock(key, txid, EXCLUSIVE)
            model.setdefault(txid, []).append(key)
        else:
            assert table.release_all(txid) == len(model.pop(txid, []))
        for other in _WRAPPING:
            assert table.held_by(other) == model.get(other, [])
        assert len(table) == sum(map(len, model.values()))
