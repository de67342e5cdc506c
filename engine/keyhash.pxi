# Key hashing shared by the key directory and the lock table (textually included by both).
# Needs uint8_t/uint64_t from libc.stdint and memcpy from libc.string cimported by the includer.

cdef inline uint64_t mix(uint64_t x) noexcept nogil:
    # The splitmix64 finaliser: every input bit affects every output bit.
    x ^= x >> 30
    x *= <uint64_t>0xBF58476D1CE4E5B9
    x ^= x >> 27
    x *= <uint64_t>0x94D049BB133111EB
    x ^= x >> 31
    return x


cdef inline uint64_t hash_key(const uint8_t* key, Py_ssize_t length, uint64_t seed) noexcept nogil:
    cdef uint64_t h = seed ^ (<uint64_t>length * <uint64_t>0x9E3779B97F4A7C15)
    cdef uint64_t word
    cdef Py_ssize_t i = 0
    while i + 8 <= length:
        memcpy(&word, key + i, 8)
        h = mix(h ^ word) + <uint64_t>0x9E3779B97F4A7C15
        i += 8
    word = 0
    if i < length:
        memcpy(&word, key + i, length - i)
        h = mix(h ^ word ^ (<uint64_t>(length - i) << 56))
    return mix(h)
