"""A read cache of encoded values bounded by bytes, evicting the least recently used first.

One store has a ``ByteLRU`` of its own, or several stores (a node's shards) take views of one
``SharedCache``: one byte budget and one LRU order for them all, so that a node's cache
memory stays within its budget however many shards it hosts (as a shared block cache does
for the column families of one RocksDB).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict

# What one cached entry costs beyond its value bytes: the dict slot, the tuple, the int lsn and
# the bytes object headers. Measured with sys.getsizeof on CPython 3.11, rounded up.
ENTRY_OVERHEAD = 200


class SharedCache:
    """The byte budget and LRU order that several ``ByteLRU`` views share. Thread-safe."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = max(0, int(capacity_bytes))
        self.bytes = 0
        self._lock = threading.Lock()
        # (view id, key) -> (lsn, value), least recently used first
        self._entries: OrderedDict[tuple[int, bytes], tuple[int, bytes]] = OrderedDict()
        self._views: dict[int, ByteLRU] = {}
        self._ids = itertools.count(1)

    def view(self) -> ByteLRU:
        """A cache for one store, within this budget."""
        return ByteLRU(self.capacity_bytes, shared=self)

    def stats(self) -> dict[str, int]:
        """The budget, what it holds, and the lookups of the views open now."""
        with self._lock:
            views = list(self._views.values())
            held = len(self._entries)
        return {"capacity_bytes": self.capacity_bytes, "bytes": self.bytes, "entries": held,
                "hits": sum(v.hits for v in views), "misses": sum(v.misses for v in views)}

    def _attach(self, view: ByteLRU) -> int:
        view_id = next(self._ids)
        self._views[view_id] = view
        return view_id

    def _detach(self, view_id: int) -> None:
        self._views.pop(view_id, None)


class ByteLRU:
    """key -> (lsn, value) with a byte budget (its own, or a SharedCache's). Thread-safe.

    The lsn identifies the version, so a stale entry (the key was overwritten since) is never
    returned: ``get`` asks for the version the key directory points at.
    """

    def __init__(self, capacity_bytes: int, *, shared: SharedCache | None = None) -> None:
        self._shared = shared if shared is not None else SharedCache(capacity_bytes)
        self._id = self._shared._attach(self)
        self.capacity_bytes = self._shared.capacity_bytes
        self.bytes = 0  # of this view's entries
        self.entries = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return self.entries

    @staticmethod
    def _cost(key: bytes, value: bytes) -> int:
        return len(key) + len(value) + ENTRY_OVERHEAD

    def get(self, key: bytes, lsn: int) -> bytes | None:
        shared = self._shared
        slot = (self._id, key)
        with shared._lock:
            entry = shared._entries.get(slot)
            if entry is None or entry[0] != lsn:
                self.misses += 1
                return None
            shared._entries.move_to_end(slot)
            self.hits += 1
            return entry[1]

    def put(self, key: bytes, lsn: int, value: bytes) -> None:
        shared = self._shared
        cost = self._cost(key, value)
        with shared._lock:
            self._drop((self._id, key))
            if cost > shared.capacity_bytes:
                return
            shared._entries[(self._id, key)] = (lsn, value)
            self._account(cost, 1)
            entries = shared._entries
            while shared.bytes > shared.capacity_bytes:
                # Every entry has an attached owner: a view leaves only after clear().
                (view_id, old_key), (_, old_value) = entries.popitem(last=False)
                shared._views[view_id]._account(-self._cost(old_key, old_value), -1)

    def refresh(self, key: bytes, lsn: int, value: bytes) -> None:
        """put() a newer version of a key only if the key is cached already."""
        with self._shared._lock:
            cached = (self._id, key) in self._shared._entries
        if cached:
            self.put(key, lsn, value)

    def discard(self, key: bytes) -> None:
        with self._shared._lock:
            self._drop((self._id, key))

    def clear(self) -> None:
        """Forget this view's entries (the store closes or is reset)."""
        shared = self._shared
        with shared._lock:
            mine = [slot for slot in shared._entries if slot[0] == self._id]
            for slot in mine:
                self._drop(slot)

    def close(self) -> None:
        """Forget this view's entries and leave the shared budget."""
        self.clear()
        self._shared._detach(self._id)

    def _drop(self, slot: tuple[int, bytes]) -> None:
        old = self._shared._entries.pop(slot, None)
        if old is not None:
            self._account(-self._cost(slot[1], old[1]), -1)

    def _account(self, cost: int, count: int) -> None:
        self.bytes += cost
        self.entries += count
        self._shared.bytes += cost
