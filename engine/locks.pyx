# cython: boundscheck=True, wraparound=True
# (Python-level indexing stays checked; the tables are walked with raw C pointers.)
"""Lock table: per-key shared/exclusive locks owned by transaction ids, try-lock only.

Nothing here ever waits for a lock: ``try_lock`` and ``try_lock_all`` answer at once, so a
caller that cannot get its locks aborts or retries later, and no cycle of waiting
transactions (a deadlock) can form. A transaction takes all its locks with one
``try_lock_all`` (all or nothing) and drops them with ``release_all``.

Rules: any number of transactions may share a key; an exclusive lock excludes everyone
else. Locking again a key one already holds succeeds (re-entrant); a sole shared holder may
upgrade to exclusive; an exclusive holder asking for shared keeps its exclusive lock.

Locks and the per-transaction lists of held locks are C structures in two open-addressing
hash tables. Each method holds the table's mutex for its whole run (taken with the GIL
released when contended), so the table is safe to use from several threads.
"""

import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy

from pykv.errors import KeyTooLarge

SHARED = LOCK_SHARED
EXCLUSIVE = LOCK_EXCLUSIVE

cdef enum:
    C_MAX_KEY = 256
    MIN_CAPACITY = 16


cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_trylock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)


include "keyhash.pxi"


cdef inline uint8_t* lock_key(lk_lock* lock) noexcept nogil:
    return (<uint8_t*>lock) + sizeof(lk_lock)


# --- one request ----------------------------------------------------------------------------

cdef struct request:
    const uint8_t* key
    Py_ssize_t key_len
    uint64_t hash           # hash_key(key): where key's lock is looked for
    uint64_t txid           # who asks: where its list of held locks is looked for
    int mode


# --- the two hash tables: key -> lock, txid -> held locks -------------------------------------
#
# Both are the same table: a power-of-two array of entry pointers, linear probing from
# hash & mask, doubled at 3/4 full, halved by release_all() below 1/8 full, and backward-shift
# deletion (no tombstones). The table_* functions below are that one implementation, written
# over the fused type table_t: Cython compiles each of them once per table struct and resolves
# the `if table_t is ...` tests at compile time, so each table runs the same straight C as
# when it was written out twice over its own entry type (no function pointer per probe, no
# extra load of an index into a payload array, no change to the lk_* structs of locks.pxd,
# which are the module's contract). What differs between the two tables is confined to the
# small inline helpers that come first: which hash places an entry (a lock keeps its key's
# hash; a transaction is placed by mix(txid)), which entry a request is looking for (a key or
# a txid), and how slot arrays and entries are allocated and freed.

ctypedef fused table_t:
    lk_lock_table
    lk_txn_table


cdef inline uint64_t entry_hash(table_t* t, size_t i) noexcept nogil:
    """The hash that places the entry of slot i (its home slot is hash & mask)."""
    if table_t is lk_lock_table:
        return t.slots[i].hash
    else:
        return mix(t.slots[i].txid)


cdef inline uint64_t request_hash(table_t* t, const request* r) noexcept nogil:
    """The hash that places the entry r looks for: its key's lock, or its txid's locks."""
    if table_t is lk_lock_table:
        return r.hash
    else:
        return mix(r.txid)


cdef inline bint entry_matches(table_t* t, size_t i, const request* r) noexcept nogil:
    if table_t is lk_lock_table:
        return (t.slots[i].hash == r.hash and t.slots[i].key_len == r.key_len
                and memcmp(lock_key(t.slots[i]), r.key, r.key_len) == 0)
    else:
        return t.slots[i].txid == r.txid


cdef inline bint alloc_slots(table_t* t, size_t capacity) noexcept nogil:
    """Point t.slots at capacity empty slots; False when out of memory."""
    if table_t is lk_lock_table:
        t.slots = <lk_lock**>calloc(capacity, sizeof(lk_lock*))
    else:
        t.slots = <lk_txn**>calloc(capacity, sizeof(lk_txn*))
    return t.slots != NULL


cdef inline void free_entry(table_t* t, size_t i) noexcept nogil:
    if table_t is lk_lock_table:
        free_lock(t.slots[i])
    else:
        free(t.slots[i].locks)
        free(t.slots[i])


cdef int table_init(table_t* t) noexcept nogil:
    if not alloc_slots(t, MIN_CAPACITY):
        return -1
    t.capacity = MIN_CAPACITY
    t.count = 0
    return 0


cdef void table_free(table_t* t) noexcept nogil:
    """Free every entry and the slots (the table is empty and unusable after)."""
    cdef size_t i
    if t.slots == NULL:
        return
    for i in range(t.capacity):
        if t.slots[i] != NULL:
            free_entry(t, i)
    free(t.slots)
    t.slots = NULL
    t.capacity = t.count = 0


cdef Py_ssize_t table_find(table_t* t, const request* r) noexcept nogil:
    """The slot of the entry r looks for, or -(free slot) - 1."""
    cdef size_t mask = t.capacity - 1, i = request_hash(t, r) & mask
    while t.slots[i] != NULL:
        if entry_matches(t, i, r):
            return i
        i = (i + 1) & mask
    return -<Py_ssize_t>i - 1


cdef int table_resize(table_t* t, size_t capacity) noexcept nogil:
    cdef table_t fresh
    cdef size_t i, j, mask = capacity - 1
    if not alloc_slots(&fresh, capacity):
        return -1
    for i in range(t.capacity):
        if t.slots[i] != NULL:
            j = entry_hash(t, i) & mask
            while fresh.slots[j] != NULL:
                j = (j + 1) & mask
            fresh.slots[j] = t.slots[i]
    free(t.slots)
    t.slots = fresh.slots
    t.capacity = capacity
    return 0


cdef Py_ssize_t table_reserve(table_t* t, Py_ssize_t slot, const request* r) noexcept nogil:
    """The free slot for the entry r looks for, which table_find() did not find (returned
    slot < 0), after growing the table when 3/4 full; -1 when out of memory. The caller puts
    its new entry there and counts it."""
    if (t.count + 1) * 4 > t.capacity * 3:
        if table_resize(t, t.capacity * 2) < 0:
            return -1
        slot = table_find(t, r)
    return -slot - 1


cdef void table_remove(table_t* t, size_t hole) noexcept nogil:
    """Empty slot hole and shift its cluster back (no tombstones)."""
    cdef size_t mask = t.capacity - 1, j = hole, home
    t.slots[hole] = NULL
    while True:
        j = (j + 1) & mask
        if t.slots[j] == NULL:
            break
        home = entry_hash(t, j) & mask
        if hole <= j:
            if hole < home <= j:
                continue
        elif home > hole or home <= j:
            continue
        t.slots[hole] = t.slots[j]
        t.slots[j] = NULL
        hole = j
    t.count -= 1


cdef void table_shrink(table_t* t) noexcept nogil:
    # Give memory back after a burst of entries; failure to shrink is harmless.
    if t.capacity > MIN_CAPACITY and t.count * 8 < t.capacity:
        table_resize(t, t.capacity // 2)


# --- txid -> held locks ----------------------------------------------------------------------

cdef lk_txn* txn_get_or_add(lk_txn_table* t, const request* r) noexcept nogil:
    cdef Py_ssize_t slot = table_find(t, r)
    cdef lk_txn* txn
    if slot >= 0:
        return t.slots[slot]
    slot = table_reserve(t, slot, r)
    if slot < 0:
        return NULL
    txn = <lk_txn*>calloc(1, sizeof(lk_txn))
    if txn == NULL:
        return NULL
    txn.txid = r.txid
    t.slots[slot] = txn
    t.count += 1
    return txn


cdef int txn_push(lk_txn* txn, lk_lock* lock) noexcept nogil:
    cdef lk_lock** grown
    if txn.nlocks == txn.cap:
        grown = <lk_lock**>realloc(txn.locks, (txn.cap * 2 + 4) * sizeof(lk_lock*))
        if grown == NULL:
            return -1
        txn.locks = grown
        txn.cap = txn.cap * 2 + 4
    txn.locks[txn.nlocks] = lock
    txn.nlocks += 1
    return 0


# --- holders ---------------------------------------------------------------------------------

cdef inline bint holds(lk_lock* lock, uint64_t txid) noexcept nogil:
    cdef uint32_t i
    for i in range(lock.nholders):
        if lock.holders[i] == txid:
            return True
    return False


cdef int add_holder(lk_lock* lock, uint64_t txid) noexcept nogil:
    cdef uint64_t* grown
    if lock.nholders == lock.cap:
        if lock.holders == &lock.one:
            grown = <uint64_t*>malloc(4 * sizeof(uint64_t))
            if grown == NULL:
                return -1
            grown[0] = lock.one
            lock.cap = 4
        else:
            grown = <uint64_t*>realloc(lock.holders, lock.cap * 2 * sizeof(uint64_t))
            if grown == NULL:
                return -1
            lock.cap *= 2
        lock.holders = grown
    lock.holders[lock.nholders] = txid
    lock.nholders += 1
    return 0


cdef void remove_holder(lk_lock* lock, uint64_t txid) noexcept nogil:
    cdef uint32_t i
    for i in range(lock.nholders):
        if lock.holders[i] == txid:
            lock.holders[i] = lock.holders[lock.nholders - 1]
            lock.nholders -= 1
            return


cdef void free_lock(lk_lock* lock) noexcept nogil:
    if lock.holders != &lock.one:
        free(lock.holders)
    free(lock)


# --- granting -------------------------------------------------------------------------------

cdef bint grantable(lk_lock_table* t, const request* r) noexcept nogil:
    cdef Py_ssize_t slot = table_find(t, r)
    cdef lk_lock* lock
    if slot < 0:
        return True
    lock = t.slots[slot]
    if holds(lock, r.txid):
        return r.mode <= lock.mode or lock.nholders == 1
    return r.mode == LOCK_SHARED and lock.mode == LOCK_SHARED


cdef int grant(LockTable self, const request* r) noexcept nogil:
    """Take a lock that grantable() allowed; -1 when out of memory."""
    cdef lk_lock_table* t = &self.locks
    cdef Py_ssize_t slot = table_find(t, r)
    cdef lk_lock* lock
    cdef lk_txn* txn
    if slot >= 0:
        lock = t.slots[slot]
        if holds(lock, r.txid):
            if r.mode > lock.mode:
                lock.mode = r.mode   # upgrade of a sole shared holder
            return 0
        if add_holder(lock, r.txid) < 0:
            return -1
    else:
        slot = table_reserve(t, slot, r)
        if slot < 0:
            return -1
        lock = <lk_lock*>malloc(sizeof(lk_lock) + r.key_len)
        if lock == NULL:
            return -1
        lock.hash = r.hash
        lock.holders = &lock.one
        lock.one = r.txid
        lock.nholders = 1
        lock.cap = 1
        lock.key_len = <uint16_t>r.key_len
        lock.mode = <uint8_t>r.mode
        memcpy(lock_key(lock), r.key, r.key_len)
        t.slots[slot] = lock
        t.count += 1
    txn = txn_get_or_add(&self.txns, r)
    if txn == NULL or txn_push(txn, lock) < 0:
        return -1
    return 0


cdef int check_mode(int mode) except -1:
    if mode != LOCK_SHARED and mode != LOCK_EXCLUSIVE:
        raise ValueError(f"lock mode must be SHARED (1) or EXCLUSIVE (2), not {mode}")
    return 0


cdef int fill_request(request* r, object key, uint64_t seed, int mode, uint64_t txid) except -1:
    if not isinstance(key, bytes):
        raise TypeError(f"keys must be bytes, not {type(key).__name__}")
    r.key_len = PyBytes_GET_SIZE(key)
    if r.key_len > C_MAX_KEY:
        raise KeyTooLarge(f"key of {r.key_len} bytes is longer than {C_MAX_KEY}")
    r.key = <const uint8_t*>PyBytes_AS_STRING(key)
    r.hash = hash_key(r.key, r.key_len, seed)
    r.mode = mode
    r.txid = txid
    return 0


cdef class LockTable:
    """Per-key shared/exclusive locks owned by transaction ids (uint64); never blocks."""

    def __cinit__(self):
        if table_init(&self.locks) < 0 or table_init(&self.txns) < 0:
            raise MemoryError()
        pthread_mutex_init(&self.mu, NULL)
        self.mu_ready = True
        self.seed = int.from_bytes(os.urandom(8), "little")

    def __dealloc__(self):
        table_free(&self.locks)
        table_free(&self.txns)
        if self.mu_ready:
            pthread_mutex_destroy(&self.mu)

    cdef void _lock(self) noexcept:
        # Block on the mutex only with the GIL released: its holder may need the GIL.
        if pthread_mutex_trylock(&self.mu) != 0:
            with nogil:
                pthread_mutex_lock(&self.mu)

    def try_lock(self, key, txid, int mode) -> bool:
        """Take key in mode for txid if compatible with the other holders; never waits."""
        cdef request r
        cdef uint64_t tx = txid
        cdef bint ok
        cdef int rc = 0
        check_mode(mode)
        fill_request(&r, key, self.seed, mode, tx)
        self._lock()
        ok = grantable(&self.locks, &r)
        if ok:
            rc = grant(self, &r)
        pthread_mutex_unlock(&self.mu)
        if rc < 0:
            raise MemoryError()
        return ok

    def try_lock_all(self, shared, exclusive, txid) -> bool:
        """Take every key (shared or exclusive) for txid, or none of them."""
        cdef uint64_t tx = txid
        cdef Py_ssize_t n, i
        cdef bint ok = True
        cdef int rc = 0
        # Hold references to the keys while C pointers into them are in use; a key listed
        # in both lists is taken exclusive.
        exclusive_keys = tuple(exclusive)
        wanted = {key: LOCK_SHARED for key in shared}
        wanted.update({key: LOCK_EXCLUSIVE for key in exclusive_keys})
        keys = tuple(wanted)
        n = len(keys)
        cdef request* requests = <request*>malloc((n if n else 1) * sizeof(request))
        if requests == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                fill_request(&requests[i], keys[i], self.seed, wanted[keys[i]], tx)
            self._lock()
            for i in range(n):
                if not grantable(&self.locks, &requests[i]):
                    ok = False
                    break
            if ok:
                for i in range(n):
                    rc = grant(self, &requests[i])
                    if rc < 0:
                        break
            pthread_mutex_unlock(&self.mu)
        finally:
            free(requests)
        if rc < 0:
            raise MemoryError()
        return ok

    def release_all(self, txid) -> int:
        """Drop every lock txid holds; return how many keys it held."""
        cdef request r, of_lock
        cdef Py_ssize_t slot
        cdef lk_txn* txn
        cdef lk_lock* lock
        cdef uint32_t i, released = 0
        r.txid = txid
        self._lock()
        slot = table_find(&self.txns, &r)
        if slot >= 0:
            txn = self.txns.slots[slot]
            for i in range(txn.nlocks):
                lock = txn.locks[i]
                remove_holder(lock, r.txid)
                if lock.nholders == 0:
                    of_lock.key = lock_key(lock)
                    of_lock.key_len = lock.key_len
                    of_lock.hash = lock.hash
                    table_remove(&self.locks, table_find(&self.locks, &of_lock))
                    free_lock(lock)
            released = txn.nlocks
            table_remove(&self.txns, slot)
            free(txn.locks)
            free(txn)
            self._shrink()
        pthread_mutex_unlock(&self.mu)
        return released

    cdef void _shrink(self) noexcept:
        table_shrink(&self.locks)
        table_shrink(&self.txns)

    def holders(self, key) -> tuple:
        """(mode, frozenset of txids) of key; (0, frozenset()) when nobody holds it."""
        cdef request r
        cdef Py_ssize_t slot
        cdef lk_lock* lock
        fill_request(&r, key, self.seed, LOCK_SHARED, 0)
        self._lock()
        try:
            slot = table_find(&self.locks, &r)
            if slot < 0:
                return (LOCK_FREE, frozenset())
            lock = self.locks.slots[slot]
            return (lock.mode, frozenset([lock.holders[i] for i in range(lock.nholders)]))
        finally:
            pthread_mutex_unlock(&self.mu)

    def held_by(self, txid) -> list:
        """The keys txid holds a lock on, in the order it took them."""
        cdef request r
        cdef Py_ssize_t slot
        cdef lk_txn* txn
        r.txid = txid
        self._lock()
        try:
            slot = table_find(&self.txns, &r)
            if slot < 0:
                return []
            txn = self.txns.slots[slot]
            return [PyBytes_FromStringAndSize(<char*>lock_key(txn.locks[i]), txn.locks[i].key_len)
                    for i in range(txn.nlocks)]
        finally:
            pthread_mutex_unlock(&self.mu)

    def __len__(self):
        return self.locks.count

    def __repr__(self):
        return f"<LockTable keys={self.locks.count} transactions={self.txns.count}>"
