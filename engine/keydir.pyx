# cython: boundscheck=True, wraparound=True
# (Python-level indexing stays checked; the table itself is walked with raw C pointers.)
"""Key directory: byte keys -> (file_id, offset, size, clock, lsn), all in C memory.

An open-addressing hash table with linear probing over a power-of-two array of 16-byte
slots (the key's 64-bit hash and a pointer to its entry). Each entry is one malloc'd block
holding the fixed-size record followed by the key and the encoded vector clock, so the
table keeps no Python object per key. Deletion shifts the following cluster back instead of
leaving tombstones, so lookups never slow down after many deletes. The table doubles past
a load factor of 3/4 and halves below 1/8 (never under its initial capacity).

Keys are at most 256 bytes (``KeyTooLarge``), clocks at most ``MAX_CLOCK_BYTES``
(``LimitError``). The hash is seeded per table from os.urandom, so crafted keys cannot
force long probe chains.
"""

import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport UINT32_MAX, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

from pykv.errors import KeyTooLarge, LimitError

MAX_KEY_BYTES = 256
MAX_CLOCK_BYTES = 1024

cdef enum:
    C_MAX_KEY = 256
    C_MAX_CLOCK = 1024


# --- hashing -----------------------------------------------------------------------------------

include "keyhash.pxi"


# --- entries -----------------------------------------------------------------------------------

cdef inline uint8_t* entry_key(kd_entry* e) noexcept nogil:
    return (<uint8_t*>e) + sizeof(kd_entry)


cdef inline uint8_t* entry_clock(kd_entry* e) noexcept nogil:
    return (<uint8_t*>e) + sizeof(kd_entry) + e.key_len


cdef inline size_t entry_alloc_size(size_t key_len, size_t clock_len) noexcept nogil:
    return sizeof(kd_entry) + key_len + clock_len


cdef inline size_t malloc_footprint(size_t requested) noexcept nogil:
    # glibc: an 8-byte chunk header, 16-byte granularity, 32 bytes at least.
    cdef size_t chunk = (requested + 8 + 15) & ~(<size_t>15)
    return chunk if chunk >= 32 else 32


cdef const uint8_t* key_ptr(object key, Py_ssize_t* length) except NULL:
    if not isinstance(key, bytes):
        raise TypeError(f"keys must be bytes, not {type(key).__name__}")
    length[0] = PyBytes_GET_SIZE(key)
    if length[0] > C_MAX_KEY:
        raise KeyTooLarge(f"key of {length[0]} bytes is longer than {C_MAX_KEY}")
    return <const uint8_t*>PyBytes_AS_STRING(key)


cdef tuple record_of(kd_entry* e):
    return (e.file_id, e.offset, e.size,
            PyBytes_FromStringAndSize(<char*>entry_clock(e), e.clock_len), e.lsn)


cdef class KeyDir:
    """A hash table from bytes keys to (file_id, offset, size, clock, lsn) records in C memory."""

    def __cinit__(self):
        self.slots = NULL

    def __init__(self, capacity: int = 1024):
        cdef size_t cap = 16
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        # Room for `capacity` keys under the 3/4 load factor.
        while cap * 3 < <size_t>capacity * 4:
            cap *= 2
        self.min_capacity = cap
        self.seed = int.from_bytes(os.urandom(8), "little")
        self.slots = <kd_slot*>PyMem_Malloc(cap * sizeof(kd_slot))
        if self.slots == NULL:
            raise MemoryError()
        memset(self.slots, 0, cap * sizeof(kd_slot))
        self.capacity = cap

    def __dealloc__(self):
        cdef size_t i
        if self.slots != NULL:
            for i in range(self.capacity):
                free(self.slots[i].entry)
            PyMem_Free(self.slots)

    # -- the table --

    cdef Py_ssize_t find(self, const uint8_t* key, Py_ssize_t key_len, uint64_t h) noexcept:
        """The slot holding key, or -(free slot where it would go) - 1."""
        cdef size_t mask = self.capacity - 1
        cdef size_t i = h & mask
        cdef kd_entry* e
        while True:
            e = self.slots[i].entry
            if e == NULL:
                return -<Py_ssize_t>i - 1
            if (self.slots[i].hash == h and e.key_len == key_len
                    and memcmp(entry_key(e), key, key_len) == 0):
                return i
            i = (i + 1) & mask

    cdef int resize(self, size_t new_capacity) except -1:
        cdef kd_slot* old = self.slots
        cdef size_t old_capacity = self.capacity, i, j, mask = new_capacity - 1
        cdef kd_slot* fresh = <kd_slot*>PyMem_Malloc(new_capacity * sizeof(kd_slot))
        if fresh == NULL:
            raise MemoryError()
        memset(fresh, 0, new_capacity * sizeof(kd_slot))
        for i in range(old_capacity):
            if old[i].entry != NULL:
                j = old[i].hash & mask
                while fresh[j].entry != NULL:
                    j = (j + 1) & mask
                fresh[j] = old[i]
        self.slots = fresh
        self.capacity = new_capacity
        PyMem_Free(old)
        return 0

    cdef void remove_at(self, size_t index) noexcept:
        """Empty slot index and shift the rest of its cluster back (no tombstones)."""
        cdef size_t mask = self.capacity - 1
        cdef size_t hole = index, j = index, home
        self.slots[hole].entry = NULL
        while True:
            j = (j + 1) & mask
            if self.slots[j].entry == NULL:
                return
            home = self.slots[j].hash & mask
            # The entry at j may fill the hole only if its home is not in (hole, j] (cyclically).
            if hole <= j:
                if hole < home <= j:
                    continue
            elif home > hole or home <= j:
                continue
            self.slots[hole] = self.slots[j]
            self.slots[j].entry = NULL
            hole = j

    # -- the mapping --

    def put(self, key, file_id, offset, size, clock=b"", lsn=0) -> None:
        """Insert or replace key's record."""
        cdef Py_ssize_t key_len, clock_len, slot
        cdef const uint8_t* k = key_ptr(key, &key_len)
        if not isinstance(clock, bytes):
            raise TypeError(f"clock must be bytes, not {type(clock).__name__}")
        clock_len = PyBytes_GET_SIZE(clock)
        if clock_len > C_MAX_CLOCK:
            raise LimitError(f"clock of {clock_len} bytes is longer than {C_MAX_CLOCK}")
        if not 0 <= size <= UINT32_MAX:
            raise ValueError(f"size {size} does not fit in 32 bits")
        # Convert before allocating so that a bad number leaks nothing.
        cdef uint64_t c_file_id = file_id, c_offset = offset, c_lsn = lsn
        cdef uint32_t c_size = size
        cdef uint64_t h = hash_key(k, key_len, self.seed)
        cdef kd_entry* e = <kd_entry*>malloc(entry_alloc_size(key_len, clock_len))
        if e == NULL:
            raise MemoryError()
        e.file_id = c_file_id
        e.offset = c_offset
        e.lsn = c_lsn
        e.size = c_size
        e.key_len = <uint16_t>key_len
        e.clock_len = <uint16_t>clock_len
        memcpy(entry_key(e), k, key_len)
        memcpy(entry_clock(e), PyBytes_AS_STRING(clock), clock_len)
        slot = self.find(k, key_len, h)
        if slot >= 0:
            self.entry_bytes -= malloc_footprint(
                entry_alloc_size(self.slots[slot].entry.key_len, self.slots[slot].entry.clock_len))
            free(self.slots[slot].entry)
            self.slots[slot].entry = e
        else:
            if (self.count + 1) * 4 > self.capacity * 3:
                try:
                    self.resize(self.capacity * 2)
                except MemoryError:
                    free(e)
                    raise
                slot = self.find(k, key_len, h)
            slot = -slot - 1
            self.slots[slot].hash = h
            self.slots[slot].entry = e
            self.count += 1
        self.entry_bytes += malloc_footprint(entry_alloc_size(key_len, clock_len))
        self.version += 1

    def get(self, key):
        """(file_id, offset, size, clock, lsn), or None if key is absent."""
        cdef Py_ssize_t key_len
        cdef const uint8_t* k = key_ptr(key, &key_len)
        cdef Py_ssize_t slot = self.find(k, key_len, hash_key(k, key_len, self.seed))
        if slot < 0:
            return None
        return record_of(self.slots[slot].entry)

    def delete(self, key) -> bool:
        """Remove key; False if it was absent."""
        cdef Py_ssize_t key_len
        cdef const uint8_t* k = key_ptr(key, &key_len)
        cdef Py_ssize_t slot = self.find(k, key_len, hash_key(k, key_len, self.seed))
        cdef kd_entry* e
        if slot < 0:
            return False
        e = self.slots[slot].entry
        self.entry_bytes -= malloc_footprint(entry_alloc_size(e.key_len, e.clock_len))
        free(e)
        self.remove_at(slot)
        self.count -= 1
        self.version += 1
        if self.capacity > self.min_capacity and self.count * 8 < self.capacity:
            self.resize(self.capacity // 2)
        return True

    def clear(self) -> None:
        """Remove every key and return to the initial capacity."""
        cdef size_t i
        for i in range(self.capacity):
            free(self.slots[i].entry)
            self.slots[i].entry = NULL
        self.count = 0
        self.entry_bytes = 0
        self.version += 1
        self.resize(self.min_capacity)

    def __len__(self):
        return self.count

    def __contains__(self, key):
        cdef Py_ssize_t key_len
        cdef const uint8_t* k = key_ptr(key, &key_len)
        return self.find(k, key_len, hash_key(k, key_len, self.seed)) >= 0

    def memory_bytes(self) -> int:
        """C memory held: the slot array plus the (estimated malloc footprint of the) entries."""
        return self.capacity * sizeof(kd_slot) + self.entry_bytes

    # -- iteration (changing the table while iterating raises RuntimeError, like a dict) --

    def keys(self):
        return KeyDirIterator.start(self, False)

    def items(self):
        return KeyDirIterator.start(self, True)

    def __iter__(self):
        return KeyDirIterator.start(self, False)

    def __repr__(self):
        return f"<KeyDir keys={self.count} capacity={self.capacity}>"


cdef class KeyDirIterator:
    cdef KeyDir table
    cdef size_t index
    cdef uint64_t version
    cdef bint with_records

    @staticmethod
    cdef KeyDirIterator start(KeyDir table, bint with_records):
        cdef KeyDirIterator it = KeyDirIterator.__new__(KeyDirIterator)
        it.table = table
        it.version = table.version
        it.with_records = with_records
        return it

    def __iter__(self):
        return self

    def __next__(self):
        cdef kd_entry* e
        if self.table.version != self.version:
            raise RuntimeError("KeyDir changed during iteration")
        while self.index < self.table.capacity:
            e = self.table.slots[self.index].entry
            self.index += 1
            if e != NULL:
                key = PyBytes_FromStringAndSize(<char*>entry_key(e), e.key_len)
                return (key, record_of(e)) if self.with_records else key
        raise StopIteration
