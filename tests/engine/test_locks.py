"""The lock table against a Python model, and mutual exclusion under real threads."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import settings
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
