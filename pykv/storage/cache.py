"""A read cache of encoded values bounded by bytes, evicting the entries unused longest first.

One store has a ``ByteLRU`` of its own, or several stores (a node's shards) take views of one
``SharedCache``: one byte budget and one LRU order for them all, so that a node's cache
memory stays within its budget however many shards it hosts (as a shared block cache does
for the column families of one RocksDB).

The entries live in plain dicts of bytes and ints only, which the garbage collector stops
tracking: an ``OrderedDict`` of tuples, the obvious LRU, is walked by every full collection
(35 ms at 400,000 entries, against 0.4 ms for these dicts). The LRU order is kept in two
generations instead (see ``SharedCache``).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

# What one cached entry costs beyond its key and value bytes: the slot key's header and view
# prefix, the value's header, the int lsn, its share of the dicts (two generations' tables
# exist at once) and of the order list. Measured with tracemalloc on CPython 3.11 (16-byte
# keys, 100-byte values, half of them read): 295 bytes per entry in all, 303 at the peak.
ENTRY_OVERHEAD = 200
# A slot key is the view's id in these many bytes, then the store's key.
_PREFIX_BYTES = 4


class _Generation:
    """Entries by slot key: their values, in the order they came in, and their lsns. An entry
    read since it came in has its lsn stored as ``~lsn`` (negative: lsns never are), a mark
    that costs no dict of its own."""

    __slots__ = ("values", "lsns")

    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}
        self.lsns: dict[bytes, int] = {}

    def least_recent_first(self) -> list[bytes]:
        """The slots, those not read since they came in first, then the others; each part in
        the order they came in."""
        lsns = self.lsns
        return [s for s in lsns if lsns[s] >= 0] + [s for s in lsns if lsns[s] < 0]

    def add(self, slot: bytes, lsn: int, value: bytes) -> None:
        self.values[slot] = value
        self.lsns[slot] = lsn

    def take(self, slot: bytes) -> bytes:
        """Remove ``slot``, which is here; its value."""
        del self.lsns[slot]
        return self.values.pop(slot)

    def pop(self, slot: bytes) -> bytes | None:
        """Remove ``slot``; its value, or None if it is not here."""
        value = self.values.pop(slot, None)
        if value is not None:
            del self.lsns[slot]
        return value


class SharedCache:
    """The byte budget and LRU order that several ``ByteLRU`` views share. Thread-safe.

    The order is an approximation of least recently used, in two generations. ``young``
    holds the entries put or read since the last turnover, ``old`` the others. Eviction
    takes old entries only, so an entry used since the last turnover outlives every entry
    not used since. It takes them in ``_order``: old's entries as they were at the
    turnover: those not read while young first, then the others, each part in the order
    they came into young. When old is empty, young becomes old (the turnover).

    Exact LRU would move an entry on every hit; in a plain dict that is a delete and an
    insert, whose holes make the dict resize (a pause) every few hundred thousand hits.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = max(0, int(capacity_bytes))
        self.bytes = 0
        self._lock = threading.Lock()
        self._young = _Generation()
        self._old = _Generation()
        # Old's slots at the turnover, least recent first; None where evicted already. A list
        # rather than a tuple, so that an evicted key's bytes are freed at once.
        self._order: list[bytes | None] = []
        self._cursor = 0  # every slot still old is at or after it in _order
        self._views: dict[bytes, ByteLRU] = {}
        self._ids = itertools.count(1)

    def view(self) -> ByteLRU:
        """A cache for one store, within this budget."""
        return ByteLRU(self.capacity_bytes, shared=self)

    def stats(self) -> dict[str, int]:
        """The budget, what it holds, and the lookups of the views open now."""
        with self._lock:
            views = list(self._views.values())
            held = len(self._young.values) + len(self._old.values)
        return {"capacity_bytes": self.capacity_bytes, "bytes": self.bytes, "entries": held,
                "hits": sum(v.hits for v in views), "misses": sum(v.misses for v in views)}

    def _attach(self, view: ByteLRU) -> bytes:
        prefix = next(self._ids).to_bytes(_PREFIX_BYTES, "big")
        self._views[prefix] = view
        return prefix

    def _detach(self, prefix: bytes) -> None:
        self._views.pop(prefix, None)

    def _slots(self) -> Iterator[tuple[bytes, int, bytes]]:
        """Every entry as (slot, lsn, value). Call with the lock held."""
        for generation in (self._old, self._young):
            for slot, value in generation.values.items():
                yield slot, generation.lsns[slot], value

    def _drop(self, slot: bytes) -> bytes | None:
        """Remove ``slot`` from whichever generation holds it; its value, or None."""
        value = self._young.pop(slot)
        return self._old.pop(slot) if value is None else value

    def _evict_until_within_budget(self) -> None:
        while self.bytes > self.capacity_bytes:
            slot, value = self._evict_least_recent()
            # Every entry has an attached owner: a view leaves only after clear().
            self._views[slot[:_PREFIX_BYTES]]._account(-ByteLRU._cost(slot, value), -1)

    def _evict_least_recent(self) -> tuple[bytes, bytes]:
        old = self._old
        if not old.values:
            # Young turns old; the drained old generation serves as the new young one.
            old, self._young = self._young, old
            self._old = old
            self._order = old.least_recent_first()
            self._cursor = 0
        order, cursor = self._order, self._cursor
        while True:  # ends: every slot still old is at or after the cursor
            slot = order[cursor]
            order[cursor] = None
            cursor += 1
            if slot is not None and slot in old.values:
                break
        if cursor > 1024 and 2 * cursor > len(order):
            del order[:cursor]  # amortized: the list shrinks as the old generation drains
            cursor = 0
        self._cursor = cursor
        return slot, old.take(slot)


class ByteLRU:
    """key -> (lsn, value) with a byte budget (its own, or a SharedCache's). Thread-safe.

    The lsn identifies the version, so a stale entry (the key was overwritten since) is never
    returned: ``get`` asks for the version the key directory points at.
    """

    def __init__(self, capacity_bytes: int, *, shared: SharedCache | None = None) -> None:
        self._shared = shared if shared is not None else SharedCache(capacity_bytes)
        self._prefix = self._shared._attach(self)
        self.capacity_bytes = self._shared.capacity_bytes
        self.bytes = 0  # of this view's entries
        self.entries = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return self.entries

    @staticmethod
    def _cost(slot: bytes, value: bytes) -> int:
        return len(slot) - _PREFIX_BYTES + len(value) + ENTRY_OVERHEAD

    def get(self, key: bytes, lsn: int) -> bytes | None:
        shared = self._shared
        slot = self._prefix + key
        with shared._lock:
            young = shared._young
            held = young.lsns.get(slot)
            if held is not None:
                if held == lsn:
                    young.lsns[slot] = ~lsn  # read since it came in
                elif ~held != lsn:
                    self.misses += 1
                    return None
                value = young.values[slot]
            else:
                old = shared._old
                held = old.lsns.get(slot)
                if held is None or (held if held >= 0 else ~held) != lsn:
                    self.misses += 1
                    return None
                value = old.take(slot)
                young.add(slot, lsn, value)
            self.hits += 1
            return value

    def put(self, key: bytes, lsn: int, value: bytes) -> None:
        shared = self._shared
        slot = self._prefix + key
        cost = len(key) + len(value) + ENTRY_OVERHEAD
        if lsn < 0:  # the read mark (see _Generation) needs them never negative
            raise ValueError(f"a cached entry's lsn cannot be negative: {lsn}")
        with shared._lock:
            self._drop(slot)
            if cost > shared.capacity_bytes:
                return
            shared._young.add(slot, lsn, value)
            self._account(cost, 1)
            if shared.bytes > shared.capacity_bytes:
                shared._evict_until_within_budget()

    def refresh(self, key: bytes, lsn: int, value: bytes) -> None:
        """put() a newer version of a key only if the key is cached already."""
        slot = self._prefix + key
        shared = self._shared
        with shared._lock:
            cached = slot in shared._young.lsns or slot in shared._old.lsns
        if cached:
            self.put(key, lsn, value)

    def discard(self, key: bytes) -> None:
        with self._shared._lock:
            self._drop(self._prefix + key)

    def clear(self) -> None:
        """Forget this view's entries (the store closes or is reset)."""
        shared = self._shared
        with shared._lock:
            mine = [slot for slot, _, _ in shared._slots() if slot.startswith(self._prefix)]
            for slot in mine:
                self._drop(slot)

    def close(self) -> None:
        """Forget this view's entries and leave the shared budget."""
        self.clear()
        self._shared._detach(self._prefix)

    def _drop(self, slot: bytes) -> None:
        old = self._shared._drop(slot)
        if old is not None:
            self._account(-self._cost(slot, old), -1)

    def _account(self, cost: int, count: int) -> None:
        self.bytes += cost
        self.entries += count
        self._shared.bytes += cost
