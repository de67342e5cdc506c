# Contract of pykv._engine.locks: per-key shared/exclusive locks owned by transaction ids, in C
# memory. Two open-addressing tables (linear probing, backward-shift deletion): key -> lock,
# and txid -> the locks that transaction holds (so release_all touches only its own keys).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef enum:
    LOCK_FREE = 0
    LOCK_SHARED = 1
    LOCK_EXCLUSIVE = 2


cdef struct lk_lock:
    uint64_t hash
    uint64_t* holders       # txids; points at `one` while there is room for a single holder
    uint64_t one
    uint32_t nholders
    uint32_t cap
    uint16_t key_len
    uint8_t mode
    # uint8_t key[key_len] follows


cdef struct lk_txn:
    uint64_t txid
    lk_lock** locks
    uint32_t nlocks
    uint32_t cap


cdef struct lk_lock_table:
    lk_lock** slots
    size_t capacity
    size_t count


cdef struct lk_txn_table:
    lk_txn** slots
    size_t capacity
    size_t count


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass


cdef class LockTable:
    cdef pthread_mutex_t mu
    cdef bint mu_ready
    cdef lk_lock_table locks
    cdef lk_txn_table txns
    cdef uint64_t seed

    cdef void _lock(self) noexcept
    cdef void _shrink(self) noexcept
