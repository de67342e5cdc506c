# Contract of pykv._engine.vclock: vector clocks as sorted (node, counter) arrays in C memory.
#
# Encoding (canonical: equal clocks give equal bytes; the empty clock is b""):
#   repeat { varint(node delta) varint(counter) }
#   the first node delta is the node id itself, every later one is >= 1 (nodes strictly
#   ascending); counters are >= 1; varints are LEB128 without overlong (zero-padded) forms.

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef enum:
    VC_EQUAL = 0
    VC_BEFORE = 1
    VC_AFTER = 2
    VC_CONCURRENT = 3


cdef struct vc_entry:
    uint32_t node
    uint64_t counter


cdef class VClock:
    cdef vc_entry* entries
    cdef Py_ssize_t size
    cdef Py_hash_t cached_hash
    cdef bint hash_ready

    cdef Py_ssize_t find(self, uint32_t node) noexcept


# C-level helpers other engine modules may cimport. All return 0 on success, -1 on bad input.
cdef int vc_decode_into(const uint8_t* data, Py_ssize_t length,
                        vc_entry** out, Py_ssize_t* out_size) noexcept nogil
cdef Py_ssize_t vc_encode_into(const vc_entry* entries, Py_ssize_t size,
                               uint8_t* out) noexcept nogil
cdef int vc_compare_raw(const uint8_t* a, Py_ssize_t alen,
                        const uint8_t* b, Py_ssize_t blen) noexcept nogil
