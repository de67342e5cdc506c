"""The key directory against a dict model: random puts, deletes, resizes and iteration."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pykv._engine.keydir import MAX_CLOCK_BYTES, MAX_KEY_BYTES, KeyDir
from pykv.errors import KeyTooLarge, LimitError

# Few distinct short keys make overwrites and deletes of present keys common; long keys
# exercise the multi-word hash and the 256-byte limit.
keys = st.one_of(
    st.binary(max_size=3),
    st.binary(min_size=250, max_size=MAX_KEY_BYTES),
    st.sampled_from([b"k%d" % i for i in range(40)]),
)
records = st.tuples(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=40),
    st.integers(0, 2**64 - 1),
)


class KeyDirAgainstDict(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.table = KeyDir(capacity=1)
        self.model: dict[bytes, tuple] = {}

    @rule(key=keys, record=records)
    def put(self, key: bytes, record: tuple) -> None:
        self.table.put(key, *record)
        self.model[key] = record

    @rule(key=keys)
    def delete_any(self, key: bytes) -> None:
        assert self.table.delete(key) == (key in self.model)
        self.model.pop(key, None)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete_present(self, data) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        assert self.table.delete(key)
        del self.model[key]

    @rule(n=st.integers(1, 300))
    def bulk_insert(self, n: int) -> None:
        # Enough keys at once to force several doublings.
        for i in range(n):
            key = b"bulk-%d" % i
            self.table.put(key, i, i, i, b"", i)
            self.model[key] = (i, i, i, b"", i)

    @rule()
    def bulk_delete(self) -> None:
        # Enough deletes at once to force shrinking.
        for key in [k for k in self.model if k.startswith(b"bulk-")]:
            assert self.table.delete(key)
            del self.model[key]

    @rule(key=keys)
    def get(self, key: bytes) -> None:
        assert self.table.get(key) == self.model.get(key)
        assert (key in self.table) == (key in self.model)

    @invariant()
    def same_contents(self) -> None:
        assert len(self.table) == len(self.model)
        assert dict(self.table.items()) == self.model
        assert sorted(self.table.keys()) == sorted(self.model)
        assert len(self.model) * 4 <= self.table.capacity * 3


TestKeyDirAgainstDict = KeyDirAgainstDict.TestCase
TestKeyDirAgainstDict.settings = settings(deadline=None, max_examples=60, stateful_step_count=40)


def test_every_key_survives_many_resizes_and_deletes() -> None:
    table = KeyDir(capacity=0)
    for i in range(20_000):
        table.put(b"key-%d" % i, i, i * 8, i % 1000, b"c%d" % (i % 7), i)
    grown = table.capacity
    for i in range(0, 20_000, 2):
        assert table.delete(b"key-%d" % i)
    for i in range(20_000):
        expected = None if i % 2 == 0 else (i, i * 8, i % 1000, b"c%d" % (i % 7), i)
        assert table.get(b"key-%d" % i) == expected
    for i in range(1, 20_000, 2):
        assert table.delete(b"key-%d" % i)
    assert len(table) == 0
    assert table.capacity < grown


def test_overwrite_replaces_the_record_and_keeps_one_key() -> None:
    table = KeyDir()
    table.put(b"a", 1, 2, 3, b"old-clock", 4)
    table.put(b"a", 5, 6, 7, b"", 8)
    assert len(table) == 1
    assert table.get(b"a") == (5, 6, 7, b"", 8)


def test_defaults_and_limits() -> None:
    table = KeyDir()
    table.put(b"k", 1, 2, 3)
    assert table.get(b"k") == (1, 2, 3, b"", 0)
    table.put(b"x" * MAX_KEY_BYTES, 0, 0, 0)
    with pytest.raises(KeyTooLarge):
        table.put(b"x" * (MAX_KEY_BYTES + 1), 0, 0, 0)
    with pytest.raises(KeyTooLarge):
        table.get(b"x" * (MAX_KEY_BYTES + 1))
    with pytest.raises(LimitError):
        table.put(b"k", 0, 0, 0, b"c" * (MAX_CLOCK_BYTES + 1))
    with pytest.raises(TypeError):
        table.put("str key", 0, 0, 0)
    with pytest.raises(ValueError):
        table.put(b"k", 0, 0, 2**32)
    with pytest.raises(OverflowError):
        table.put(b"k", -1, 0, 0)
    assert table.get(b"k") == (1, 2, 3, b"", 0)  # a rejected put changes nothing
    assert len(table) == 2


def test_changing_the_table_while_iterating_raises() -> None:
    table = KeyDir()
    for i in range(10):
        table.put(b"%d" % i, 0, 0, 0)
    iterator = iter(table.keys())
    next(iterator)
    table.put(b"new", 0, 0, 0)
    with pytest.raises(RuntimeError):
        next(iterator)


def test_memory_accounting_follows_the_contents() -> None:
    table = KeyDir(capacity=16)
    empty = table.memory_bytes()
    for i in range(1000):
        table.put(b"key-%04d" % i, i, i, i, b"\x01\x02", i)
    full = table.memory_bytes()
    assert full > empty + 1000 * (len(b"key-0000") + 2)
    table.clear()
    assert len(table) == 0 and table.memory_bytes() == empty
    assert table.get(b"key-0001") is None
