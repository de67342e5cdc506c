"""A read cache of encoded values bounded by bytes, evicting the least recently used first."""

from __future__ import annotations

from collections import OrderedDict

# What one cached entry costs beyond its value bytes: the dict slot, the tuple, the int lsn and
# the bytes object headers. Measured with sys.getsizeof on CPython 3.11, rounded up.
ENTRY_OVERHEAD = 200


class ByteLRU:
    """key -> (lsn, value) with a byte budget. Not thread-safe: the store calls it under its lock.

    The lsn identifies the version, so a stale entry (the key was overwritten since) is never
    returned: ``get`` asks for the version the key directory points at.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = max(0, int(capacity_bytes))
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, tuple[int, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _cost(key: bytes, value: bytes) -> int:
        return len(key) + len(value) + ENTRY_OVERHEAD

    def get(self, key: bytes, lsn: int) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] != lsn:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: bytes, lsn: int, value: bytes) -> None:
        cost = self._cost(key, value)
        if cost > self.capacity_bytes:
            self.discard(key)
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= self._cost(key, old[1])
        self._entries[key] = (lsn, value)
        self.bytes += cost
        while self.bytes > self.capacity_bytes:
            old_key, (_, old_value) = self._entries.popitem(last=False)
            self.bytes -= self._cost(old_key, old_value)

    def discard(self, key: bytes) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= self._cost(key, old[1])

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
