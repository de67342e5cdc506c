"""Differential test: Storage against a dict model through commits, reopens, checkpoints, compactions.

The model keeps a deleted key's tombstone (value None, its clock and timestamp) when the
delete carried a clock, and forgets the key when it did not; scans show live keys only.
"""

from __future__ import annotations

import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pykv.storage import ABSENT, Storage, StoredVersion, Update

KEYS = st.sampled_from([b"a", b"b", b"ba", b"c", b"k1", b"k2", b"k10", b"zz"])
VALUES = st.one_of(st.none(), st.binary(max_size=40), st.binary(min_size=500, max_size=3000))
UPDATES = st.lists(st.tuples(KEYS, VALUES, st.binary(max_size=6), st.integers(0, 2**64 - 1)),
                   min_size=1, max_size=5)


class StorageModel(RuleBasedStateMachine):
    """Every step leaves get/scan equal to the model: key -> (value, clock, timestamp, lsn)."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="pykv-model-")
        self.store = self._open()
        self.model: dict[bytes, StoredVersion] = {}

    def _open(self) -> Storage:
        return Storage.open(self.dir, segment_bytes=2048, cache_bytes=4096, compaction=False)

    @rule(updates=UPDATES)
    def commit(self, updates) -> None:
        self._record(updates, self.store.commit([Update(*u) for u in updates]))

    @rule(updates=UPDATES)
    def submit_without_waiting(self, updates) -> None:
        # Visible at once; close() flushes it before a reopen.
        self._record(updates, self.store.submit([Update(*u) for u in updates]))

    def _record(self, updates, lsn: int) -> None:
        for key, value, clock, timestamp in updates:
            if value is None and not clock:
                self.model.pop(key, None)
            else:
                self.model[key] = StoredVersion(value, clock, timestamp, lsn)

    def _live(self) -> list[tuple[bytes, StoredVersion]]:
        return sorted((k, v) for k, v in self.model.items() if v.value is not None)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = self._open()

    @rule()
    def checkpoint(self) -> None:
        self.store.checkpoint()

    @rule()
    def compact(self) -> None:
        self.store.compact()

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def scan_a_range(self, data) -> None:
        start = data.draw(st.sampled_from(sorted(self.model)))
        limit = data.draw(st.integers(1, 4))
        expect = [(k, v) for k, v in self._live() if k >= start][:limit]
        assert list(self.store.scan(start=start, limit=limit)) == expect

    @invariant()
    def matches_the_model(self) -> None:
        for key in [b"a", b"b", b"ba", b"c", b"k1", b"k2", b"k10", b"zz"]:
            assert self.store.get(key) == self.model.get(key, ABSENT)
            model = self.model.get(key, ABSENT)
            assert self.store.stamp_of(key) == (model.clock, model.timestamp)
        assert list(self.store.scan()) == self._live()
        assert [k for k, _ in self.store.scan(prefix=b"k1")] == [
            k for k, _ in self._live() if k.startswith(b"k1")]
        stats = self.store.stats()
        assert stats["keys"] == len(self._live())
        assert stats["tombstones"] == len(self.model) - len(self._live())

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


StorageModel.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
test_storage_matches_a_dict_model = StorageModel.TestCase
