# Contract of pykv._engine.keydir: an open-addressing hash table (linear probing, backward-shift
# deletion) from byte keys to fixed-size records, with every key and record in C memory.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


# One malloc'd block per key: the record, then the key bytes, then the clock bytes.
cdef struct kd_entry:
    uint64_t file_id
    uint64_t offset
    uint64_t lsn
    uint32_t size
    uint16_t key_len
    uint16_t clock_len
    # uint8_t data[key_len + clock_len] follows


# A slot of the table: the key's full hash (fast reject, and the home slot on resize) and
# the entry, NULL when free.
cdef struct kd_slot:
    uint64_t hash
    kd_entry* entry


cdef class KeyDir:
    cdef kd_slot* slots
    cdef readonly size_t capacity # number of slots, a power of two
    cdef size_t count
    cdef size_t min_capacity
    cdef size_t entry_bytes       # estimated malloc footprint of the entries
    cdef uint64_t seed
    cdef uint64_t version         # bumped by every change, so iterators detect mutation

    cdef Py_ssize_t find(self, const uint8_t* key, Py_ssize_t key_len, uint64_t h) noexcept
    cdef int resize(self, size_t new_capacity) except -1
    cdef void remove_at(self, size_t index) noexcept
