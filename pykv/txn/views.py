"""Copy-on-write views: versions as they were at one moment, read a part at a time while
commits go on (Raft snapshot images, a cluster's exports, an embedded store's consistent scans).

A view walks the versions in key order. A key written after the view began, and not yet
passed by the walk, has its version of then kept aside (``Imaging.keep``, called before the
write), so the walk sees every key as it was when the view began. What is kept is bounded by
the keys written while the view is read. The live walk must hold deleted keys that have a
clock (tombstones: storage keeps them), so that a key deleted after the view began comes in
its place in key order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Protocol

from pykv.txn.model import KeyRange, KeyUpdate, Versioned


class VersionSource(Protocol):
    """Where a view reads a key's current version (a shard's state, an embedded store)."""

    def get(self, key: str) -> Versioned: ...


class Imaging:
    """Copy on write for a view read between other work: the version, as the view began,
    of every key written since that the walk had not passed yet (None: the key did not
    exist then)."""

    def __init__(self, key_range: KeyRange | None = None) -> None:
        self.passed: str | None = None  # the last key the walk took
        self.kept: dict[str, Versioned | None] = {}
        self._range = key_range  # the keys the view walks (None: all)

    def keep(self, state: VersionSource, updates: list[KeyUpdate]) -> None:
        kept, passed, key_range = self.kept, self.passed, self._range
        for u in updates:
            key = u.key
            if (passed is None or key > passed) and key not in kept and (key_range is None or key_range.holds(key)):
                version = state.get(key)
                kept[key] = version if version.clock else None  # no clock: never written

    def walk(self, live: Iterator[tuple[str, Versioned]]) -> Iterator[tuple[str, Versioned]]:
        """Every version as it was when the view began, in key order, given the live walk
        of the versions (which may see writes made since): marks each key taken as passed."""
        for key, version in itertools.chain(self._versions(live), self._rest()):
            self.passed = key
            yield key, version

    def _versions(self, live: Iterator[tuple[str, Versioned]]) -> Iterator[tuple[str, Versioned]]:
        kept = self.kept
        for key, version in live:
            if key in kept:
                if kept[key] is None:
                    continue  # written since, and not there before (the mark stays)
                version = kept.pop(key)  # type: ignore[assignment]
            yield key, version

    def _rest(self) -> Iterator[tuple[str, Versioned]]:
        """Kept keys the live walk no longer found (it went on without them)."""
        for key in sorted(k for k, v in self.kept.items() if v is not None):
            yield key, self.kept[key]  # type: ignore[misc]
