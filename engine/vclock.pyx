"""Vector clocks: immutable sorted (node id, counter) arrays in C memory, with a canonical encoding.

A clock maps node ids (uint32) to counters (uint64, >= 1; an absent node counts as 0).

Encoding, canonical so that equal clocks give equal bytes (and may be compared as bytes)::

    clock   := entry*                      (the empty clock is b"")
    entry   := varint(node_delta) varint(counter)
    varint  := LEB128, 7 bits per byte, low group first, no overlong (zero-padded) form

The first entry's node_delta is its node id; every later one is the (>= 1) distance to the
previous node, so nodes are strictly ascending. Counters are >= 1. Anything else (truncated
varints, overlong varints, values out of range, zero deltas or counters) is rejected with
``pykv.errors.CorruptData``.

``compare_encoded`` and ``merge_encoded`` work on the bytes directly (the validation hot path
of transactions) without building clock objects.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport UINT32_MAX, UINT64_MAX, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcpy

from pykv.errors import CorruptData

EQUAL = VC_EQUAL
BEFORE = VC_BEFORE
AFTER = VC_AFTER
CONCURRENT = VC_CONCURRENT

# The longest encoded entry: a 5-byte node delta and a 10-byte counter.
cdef enum:
    MAX_ENTRY_BYTES = 15


# --- varints and the streaming cursor -------------------------------------------------------

cdef struct cursor:
    const uint8_t* p
    const uint8_t* end
    uint32_t node
    uint64_t counter
    bint first
    bint has       # an entry is loaded in node/counter
    bint bad       # the bytes are not a canonical clock


cdef inline int read_varint(const uint8_t** pp, const uint8_t* end, uint64_t* out) noexcept nogil:
    cdef const uint8_t* p = pp[0]
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef uint8_t byte
    while True:
        if p >= end or shift > 63:
            return -1
        byte = p[0]
        p += 1
        if shift == 63 and byte > 1:
            return -1  # more than 64 bits
        value |= (<uint64_t>(byte & 0x7F)) << shift
        if not (byte & 0x80):
            if byte == 0 and shift > 0:
                return -1  # overlong: a trailing zero group
            pp[0] = p
            out[0] = value
            return 0
        shift += 7


cdef inline Py_ssize_t write_varint(uint8_t* out, uint64_t value) noexcept nogil:
    cdef Py_ssize_t n = 0
    while value >= 0x80:
        out[n] = <uint8_t>((value & 0x7F) | 0x80)
        value >>= 7
        n += 1
    out[n] = <uint8_t>value
    return n + 1


cdef inline void cursor_init(cursor* c, const uint8_t* data, Py_ssize_t length) noexcept nogil:
    c.p = data
    c.end = data + length
    c.node = 0
    c.counter = 0
    c.first = True
    c.has = False
    c.bad = False


cdef inline void cursor_next(cursor* c) noexcept nogil:
    """Load the next entry into c (c.has False at the end, c.bad True on malformed bytes)."""
    cdef uint64_t delta = 0, counter = 0, node
    if c.p >= c.end:
        c.has = False
        return
    if read_varint(&c.p, c.end, &delta) < 0 or read_varint(&c.p, c.end, &counter) < 0:
        c.bad = True
        c.has = False
        return
    if c.first:
        node = delta
    else:
        node = <uint64_t>c.node + delta
        if delta == 0:
            c.bad = True
    if node > UINT32_MAX or counter == 0 or delta > UINT32_MAX:
        c.bad = True
    if c.bad:
        c.has = False
        return
    c.first = False
    c.node = <uint32_t>node
    c.counter = counter
    c.has = True


# --- C-level API (see vclock.pxd) --------------------------------------------------------------

cdef int vc_decode_into(const uint8_t* data, Py_ssize_t length,
                        vc_entry** out, Py_ssize_t* out_size) noexcept nogil:
    """Decode into a malloc'd array (NULL when empty); the caller frees it."""
    cdef cursor c
    cdef Py_ssize_t count = 0, i = 0
    cdef vc_entry* entries
    cursor_init(&c, data, length)
    cursor_next(&c)
    while c.has:
        count += 1
        cursor_next(&c)
    if c.bad:
        return -1
    out_size[0] = count
    if count == 0:
        out[0] = NULL
        return 0
    entries = <vc_entry*>malloc(count * sizeof(vc_entry))
    if entries == NULL:
        return -2
    cursor_init(&c, data, length)
    cursor_next(&c)
    while c.has:
        entries[i].node = c.node
        entries[i].counter = c.counter
        i += 1
        cursor_next(&c)
    out[0] = entries
    return 0


cdef Py_ssize_t vc_encode_into(const vc_entry* entries, Py_ssize_t size,
                               uint8_t* out) noexcept nogil:
    """Encode into out (at least size * MAX_ENTRY_BYTES long); returns the byte count."""
    cdef Py_ssize_t n = 0, i
    cdef uint32_t prev = 0
    for i in range(size):
        n += write_varint(out + n, entries[i].node - prev if i else entries[i].node)
        n += write_varint(out + n, entries[i].counter)
        prev = entries[i].node
    return n


cdef int vc_compare_raw(const uint8_t* a, Py_ssize_t alen,
                        const uint8_t* b, Py_ssize_t blen) noexcept nogil:
    """Compare two encoded clocks in one pass; -1 if either is malformed."""
    cdef cursor ca, cb
    cdef bint a_bigger = False, b_bigger = False
    cursor_init(&ca, a, alen)
    cursor_init(&cb, b, blen)
    cursor_next(&ca)
    cursor_next(&cb)
    while ca.has or cb.has:
        if ca.has and (not cb.has or ca.node < cb.node):
            a_bigger = True
            cursor_next(&ca)
        elif cb.has and (not ca.has or cb.node < ca.node):
            b_bigger = True
            cursor_next(&cb)
        else:
            if ca.counter > cb.counter:
                a_bigger = True
            elif cb.counter > ca.counter:
                b_bigger = True
            cursor_next(&ca)
            cursor_next(&cb)
    if ca.bad or cb.bad:
        return -1
    return relation(a_bigger, b_bigger)


cdef inline int relation(bint self_bigger, bint other_bigger) noexcept nogil:
    if self_bigger and other_bigger:
        return VC_CONCURRENT
    if self_bigger:
        return VC_AFTER
    if other_bigger:
        return VC_BEFORE
    return VC_EQUAL


cdef Py_ssize_t merge_arrays(const vc_entry* a, Py_ssize_t na, const vc_entry* b, Py_ssize_t nb,
                             vc_entry* out) noexcept nogil:
    cdef Py_ssize_t i = 0, j = 0, n = 0
    while i < na or j < nb:
        if i < na and (j >= nb or a[i].node < b[j].node):
            out[n] = a[i]
            i += 1
        elif j < nb and (i >= na or b[j].node < a[i].node):
            out[n] = b[j]
            j += 1
        else:
            out[n].node = a[i].node
            out[n].counter = a[i].counter if a[i].counter > b[j].counter else b[j].counter
            i += 1
            j += 1
        n += 1
    return n


cdef int by_counter_desc_then_node(const void* x, const void* y) noexcept nogil:
    cdef const vc_entry* a = <const vc_entry*>x
    cdef const vc_entry* b = <const vc_entry*>y
    if a.counter != b.counter:
        return -1 if a.counter > b.counter else 1
    if a.node != b.node:
        return -1 if a.node < b.node else 1
    return 0


cdef int by_node(const void* x, const void* y) noexcept nogil:
    cdef const vc_entry* a = <const vc_entry*>x
    cdef const vc_entry* b = <const vc_entry*>y
    if a.node != b.node:
        return -1 if a.node < b.node else 1
    return 0


# --- the Python value object -------------------------------------------------------------------

cdef VClock make_clock(vc_entry* entries, Py_ssize_t size):
    """Wrap a PyMem_Malloc'd array (ownership passes to the clock)."""
    cdef VClock clock = VClock.__new__(VClock)
    clock.entries = entries
    clock.size = size
    return clock


cdef vc_entry* alloc_entries(Py_ssize_t size) except? NULL:
    if size == 0:
        return NULL
    cdef vc_entry* entries = <vc_entry*>PyMem_Malloc(size * sizeof(vc_entry))
    if entries == NULL:
        raise MemoryError()
    return entries


cdef VClock decode_bytes(const uint8_t* data, Py_ssize_t length):
    cdef vc_entry* tmp = NULL
    cdef Py_ssize_t size = 0
    cdef int rc = vc_decode_into(data, length, &tmp, &size)
    if rc == -1:
        raise CorruptData(f"malformed vector clock encoding ({length} bytes)")
    if rc == -2:
        raise MemoryError()
    cdef vc_entry* entries
    try:
        entries = alloc_entries(size)
        if size:
            memcpy(entries, tmp, size * sizeof(vc_entry))
    finally:
        free(tmp)
    return make_clock(entries, size)


cdef bytes encode_entries(const vc_entry* entries, Py_ssize_t size):
    if size == 0:
        return b""
    cdef uint8_t* buf = <uint8_t*>PyMem_Malloc(size * MAX_ENTRY_BYTES)
    if buf == NULL:
        raise MemoryError()
    try:
        n = vc_encode_into(entries, size, buf)
        return PyBytes_FromStringAndSize(<char*>buf, n)
    finally:
        PyMem_Free(buf)


cdef const uint8_t* bytes_ptr(object data, Py_ssize_t* length) except NULL:
    if not isinstance(data, bytes):
        raise TypeError(f"an encoded vector clock must be bytes, not {type(data).__name__}")
    length[0] = PyBytes_GET_SIZE(data)
    return <const uint8_t*>PyBytes_AS_STRING(data)


cdef class VClock:
    """An immutable vector clock: node id (uint32) -> counter (uint64); absent nodes are 0."""

    def __cinit__(self):
        self.entries = NULL
        self.size = 0
        self.hash_ready = False

    def __init__(self, entries=None):
        """Build from {node: counter}; zero counters are dropped (0 means absent)."""
        if not entries:
            return
        items = sorted((int(node), int(counter)) for node, counter in dict(entries).items())
        kept = [(node, counter) for node, counter in items if counter != 0]
        for node, counter in kept:
            if not 0 <= node <= UINT32_MAX:
                raise ValueError(f"vector clock node id {node} is not a uint32")
            if not 0 < counter <= UINT64_MAX:
                raise ValueError(f"vector clock counter {counter} is not a positive uint64")
        self.entries = alloc_entries(len(kept))
        for i, (node, counter) in enumerate(kept):
            self.entries[i].node = node
            self.entries[i].counter = counter
        self.size = len(kept)

    def __dealloc__(self):
        PyMem_Free(self.entries)

    @staticmethod
    def decode(data) -> VClock:
        """Decode canonical bytes (b"" is the empty clock); raise CorruptData on bad bytes."""
        cdef Py_ssize_t length
        cdef const uint8_t* p = bytes_ptr(data, &length)
        return decode_bytes(p, length)

    def encode(self) -> bytes:
        """The canonical encoding; the empty clock encodes to b""."""
        return encode_entries(self.entries, self.size)

    def to_dict(self) -> dict:
        return {self.entries[i].node: self.entries[i].counter for i in range(self.size)}

    cdef Py_ssize_t find(self, uint32_t node) noexcept:
        """Index of node, or -1 (binary search)."""
        cdef Py_ssize_t lo = 0, hi = self.size - 1, mid
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.entries[mid].node == node:
                return mid
            if self.entries[mid].node < node:
                lo = mid + 1
            else:
                hi = mid - 1
        return -1

    def get(self, node) -> int:
        """The counter of node, 0 if absent."""
        if not 0 <= node <= UINT32_MAX:
            return 0
        cdef Py_ssize_t i = self.find(<uint32_t>node)
        return self.entries[i].counter if i >= 0 else 0

    def compare(self, VClock other not None) -> int:
        """EQUAL, BEFORE (other descends self), AFTER (self descends other) or CONCURRENT."""
        cdef Py_ssize_t i = 0, j = 0
        cdef bint self_bigger = False, other_bigger = False
        cdef const vc_entry* a = self.entries
        cdef const vc_entry* b = other.entries
        while i < self.size or j < other.size:
            if i < self.size and (j >= other.size or a[i].node < b[j].node):
                self_bigger = True
                i += 1
            elif j < other.size and (i >= self.size or b[j].node < a[i].node):
                other_bigger = True
                j += 1
            else:
                if a[i].counter > b[j].counter:
                    self_bigger = True
                elif b[j].counter > a[i].counter:
                    other_bigger = True
                i += 1
                j += 1
            if self_bigger and other_bigger:
                return VC_CONCURRENT
        return relation(self_bigger, other_bigger)

    def descends(self, VClock other not None) -> bool:
        """True if self >= other pointwise (every event other saw, self saw too)."""
        cdef int rel = self.compare(other)
        return rel == VC_EQUAL or rel == VC_AFTER

    def merge(self, VClock other not None) -> VClock:
        """The pointwise maximum of the two clocks."""
        cdef vc_entry* out = alloc_entries(self.size + other.size)
        cdef Py_ssize_t n = merge_arrays(self.entries, self.size, other.entries, other.size, out)
        return make_clock(out, n)

    def increment(self, node) -> VClock:
        """A copy with node's counter one higher."""
        if not 0 <= node <= UINT32_MAX:
            raise ValueError(f"vector clock node id {node} is not a uint32")
        cdef uint32_t n = node
        cdef Py_ssize_t i = self.find(n), k, dst = 0
        cdef vc_entry* out
        if i >= 0:
            if self.entries[i].counter == UINT64_MAX:
                raise OverflowError(f"vector clock counter of node {node} would overflow")
            out = alloc_entries(self.size)
            memcpy(out, self.entries, self.size * sizeof(vc_entry))
            out[i].counter += 1
            return make_clock(out, self.size)
        out = alloc_entries(self.size + 1)
        for k in range(self.size):
            if dst == k and self.entries[k].node > n:
                out[dst].node = n
                out[dst].counter = 1
                dst += 1
            out[dst] = self.entries[k]
            dst += 1
        if dst == self.size:
            out[dst].node = n
            out[dst].counter = 1
        return make_clock(out, self.size + 1)

    def prune(self, Py_ssize_t max_entries) -> VClock:
        """Keep the max_entries entries with the highest counters (ties: lower node id wins)."""
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        if self.size <= max_entries:
            return self
        cdef vc_entry* out = alloc_entries(self.size)
        memcpy(out, self.entries, self.size * sizeof(vc_entry))
        qsort(out, self.size, sizeof(vc_entry), by_counter_desc_then_node)
        qsort(out, max_entries, sizeof(vc_entry), by_node)
        return make_clock(out, max_entries)

    def __len__(self):
        return self.size

    def __bool__(self):
        return self.size > 0

    def __eq__(self, other):
        if not isinstance(other, VClock):
            return NotImplemented
        cdef VClock o = <VClock>other
        if o.size != self.size:
            return False
        for i in range(self.size):
            if (self.entries[i].node != o.entries[i].node
                    or self.entries[i].counter != o.entries[i].counter):
                return False
        return True

    def __hash__(self):
        if not self.hash_ready:
            self.cached_hash = hash(self.encode())
            self.hash_ready = True
        return self.cached_hash

    def __repr__(self):
        return f"VClock({self.to_dict()!r})"

    def __reduce__(self):
        return (VClock.decode, (self.encode(),))


def compare_encoded(a, b) -> int:
    """VClock.decode(a).compare(VClock.decode(b)) in one pass over the bytes, no objects."""
    cdef Py_ssize_t alen, blen
    cdef const uint8_t* pa = bytes_ptr(a, &alen)
    cdef const uint8_t* pb = bytes_ptr(b, &blen)
    cdef int rel = vc_compare_raw(pa, alen, pb, blen)
    if rel < 0:
        raise CorruptData("malformed vector clock encoding")
    return rel


def merge_encoded(a, b) -> bytes:
    """VClock.decode(a).merge(VClock.decode(b)).encode() without building objects."""
    cdef Py_ssize_t alen, blen, na = 0, nb = 0, n
    cdef const uint8_t* pa = bytes_ptr(a, &alen)
    cdef const uint8_t* pb = bytes_ptr(b, &blen)
    cdef vc_entry* ea = NULL
    cdef vc_entry* eb = NULL
    cdef vc_entry* merged = NULL
    cdef int rc
    if alen == 0:
        if vc_compare_raw(pb, blen, pb, 0) < 0:
            raise CorruptData("malformed vector clock encoding")
        return b
    if blen == 0:
        if vc_compare_raw(pa, alen, pa, 0) < 0:
            raise CorruptData("malformed vector clock encoding")
        return a
    try:
        rc = vc_decode_into(pa, alen, &ea, &na)
        if rc == 0:
            rc = vc_decode_into(pb, blen, &eb, &nb)
        if rc == -1:
            raise CorruptData("malformed vector clock encoding")
        if rc == -2:
            raise MemoryError()
        merged = <vc_entry*>malloc((na + nb) * sizeof(vc_entry))
        if merged == NULL:
            raise MemoryError()
        n = merge_arrays(ea, na, eb, nb, merged)
        return encode_entries(merged, n)
    finally:
        free(ea)
        free(eb)
        free(merged)
