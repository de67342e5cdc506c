# cython: boundscheck=True, wraparound=True
# (Python-level list indexing here must stay checked; the hot loops use raw C pointers.)
"""Group-commit write-ahead log: one background writer, one write() and one fdatasync() per batch.

On-disk format
==============

A log is a directory of segment files named ``f"{first_lsn:020d}.wal"``; a segment's id is
the log sequence number (lsn) of its first record. Lsns are contiguous across segments, so
a record's lsn is implicit: the segment's first lsn plus the record's index in the segment.
All integers are little-endian.

Segment header (32 bytes)::

    magic      8 bytes  b"PYKVWAL\\n"
    version    u32      1
    reserved   u32      0
    first_lsn  u64      equal to the number in the file name
    crc        u32      crc32c of the 24 bytes above
    pad        u32      0

then records, back to back, up to about ``segment_bytes`` per file::

    length     u32      payload length in bits 0..30; bit 31 = CONTINUED
    crc        u32      crc32c of the 4 length bytes followed by the payload
    payload    length bytes

With ``preallocate=True`` the writer keeps the segment it writes allocated up to
PREALLOCATE_STEP (1 MiB) past its last record (``fallocate``), so that an fdatasync after an
append need not also commit a new file size (one in every MiB of appends does): the bytes
after the last record then read as zeros, and a segment is trimmed to its records when it is
sealed. Zeros after the last complete batch are a clean end, not a torn tail.

CONTINUED marks a record of an ``append_many`` batch that is followed by more records of
the same batch: a batch is all or nothing, so recovery cuts a batch whose last record is
missing. A batch never spans two segments (segments roll between batches; a batch larger
than ``segment_bytes`` gets a segment of its own).

Recovery (``WalWriter`` on open, ``read_wal``) reads the segments in order. In the last
segment the first record that is short, has a bad CRC, or belongs to an unfinished batch
starts the *tail*: it and everything after it is cut (truncated with ``repair=True``). A
record can be cut only if its append was never acknowledged, because an append is
acknowledged after the fdatasync that covers it (policy ``always``), and every earlier
segment was fdatasync'd before the next one was created. A torn tail is the END of the
file: when a well-formed record with a valid CRC follows a bad one at any later offset, the
bad record is mid-log corruption (a flipped bit in acknowledged data), and recovery raises
``CorruptData`` naming the segment and offset instead of cutting, leaving the file as it
is. (The price: a power cut that persisted the pages of the last, never-acknowledged write
out of order, leaving a hole before a complete record, also reads as corruption and needs
an operator; a process crash never does that, the page cache keeps every write whole.)
The same defects in an earlier segment, a bad header, or a gap in the lsns raise
``CorruptData``. A last segment shorter than its header (torn while it was being created)
is given a fresh header.

Group commit
============

``submit`` frames a payload into the pending buffer under a mutex and returns its lsn at
once. One writer thread swaps the pending buffer for an empty one, computes the CRCs, does
one ``write()`` per segment touched and one ``fdatasync()``, all without the GIL (C calls
that return error codes; the exception is raised by the waiting Python caller), then
advances the durable lsn and wakes every waiter. ``append`` is ``submit`` + ``wait``. A
waiter whose record is the only one pending while the writer thread sleeps (a lone writer)
writes that round itself instead, in its own thread: waking the writer and being woken back
cost a single writer about a fifth of each commit. Records of several threads are left to
the writer thread, which goes from round to round without sleeping.
Policies: ``always`` acknowledges after fdatasync; ``interval`` acknowledges after write()
and fdatasyncs at most every ``interval_ms`` (and when idle); ``off`` fdatasyncs a batch
only when ``sync()`` asks. Under every policy a segment is fdatasync'd when it is sealed, and
the last segment when a writer opens it, so that ``sync()`` covers every record before it
with one fdatasync of the segment being written.

Failpoints
==========

``PYKV_FAILPOINT=wal.before_fsync`` or ``wal.after_fsync`` (optionally ``:N`` to fire at
the Nth time that point is reached, default 1) makes the writer thread end the process
with ``_exit(137)`` right before or after the fdatasync of a batch, as a crash would. The
variable is read once when a ``WalWriter`` is created; the check is one integer compare.
"""

import atexit
import os
import weakref
from collections import namedtuple

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport EINTR, errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove, memset
from posix.fcntl cimport O_CREAT, O_EXCL, O_RDONLY, O_WRONLY, open as c_open
from posix.stat cimport fstat, struct_stat
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.types cimport off_t
from posix.unistd cimport (
    SEEK_SET,
    _exit,
    close as c_close,
    fdatasync,
    fsync,
    ftruncate,
    lseek,
    write as c_write,
)

from pykv.errors import CorruptData, StoreClosed, ValueTooLarge


cdef extern from *:
    """
    #include <stdint.h>
    static inline uint64_t pykv_atomic_load_u64(const uint64_t* p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void pykv_atomic_store_u64(uint64_t* p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    #if defined(__x86_64__) || defined(__i386__)
    static inline void pykv_cpu_relax(void) { __builtin_ia32_pause(); }
    #else
    static inline void pykv_cpu_relax(void) { }
    #endif
    """
    uint64_t atomic_load_u64 "pykv_atomic_load_u64"(const uint64_t* p) noexcept nogil
    void atomic_store_u64 "pykv_atomic_store_u64"(uint64_t* p, uint64_t v) noexcept nogil
    void cpu_relax "pykv_cpu_relax"() noexcept nogil


cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, off_t offset, off_t length)


cdef extern from "crc32c.h" nogil:
    void pykv_crc32c_init()
    uint32_t pykv_crc32c(uint32_t crc, const uint8_t* data, size_t length)
    void pykv_crc32c_allow_hw(int allow)


pykv_crc32c_init()

HEADER_SIZE = 32
RECORD_OVERHEAD = 8
MAGIC = b"PYKVWAL\n"
FORMAT_VERSION = 1

cdef enum:
    C_HEADER_SIZE = 32
    C_RECORD_OVERHEAD = 8
    POLICY_ALWAYS = 0
    POLICY_INTERVAL = 1
    POLICY_OFF = 2
    FP_NONE = 0
    FP_BEFORE_FSYNC = 1
    FP_AFTER_FSYNC = 2

cdef uint32_t CONTINUED = <uint32_t>0x80000000
cdef uint32_t LENGTH_MASK = <uint32_t>0x7FFFFFFF
# Payloads and batches stay well below 2 GiB so that offsets fit in 32 bits.
cdef uint64_t MAX_PAYLOAD = 0x7FFFFFFF - C_RECORD_OVERHEAD
cdef uint64_t MAX_SEGMENT_BYTES = <uint64_t>1 << 31
# Try-locks before a contended mutex is taken with the GIL released (see WalWriter._lock).
cdef int LOCK_SPINS = 200
# submit() blocks (GIL released) while this much is waiting for the writer.
cdef size_t MAX_PENDING_BYTES = <size_t>64 << 20
# A batch buffer that a burst grew past this (a compaction's 4 MiB relocation records, a busy
# node log) is freed once written: a node runs a writer per shard, and each would otherwise
# keep its largest batch resident for good.
cdef size_t KEEP_BATCH_BYTES = <size_t>1 << 20
# With preallocate, how far past the last record the segment being written is allocated:
# one appending fdatasync in every so many bytes records a new file size, not every one.
cdef off_t PREALLOCATE_STEP = <off_t>1 << 20

# Writers still open at interpreter exit are closed, so that what they acknowledged under the
# interval policy gets its fdatasync (the writer thread is a daemon and would just stop).
_OPEN_WRITERS = weakref.WeakSet()


@atexit.register
def _close_open_writers() -> None:
    for writer in list(_OPEN_WRITERS):
        try:
            writer.close()
        except OSError:
            pass  # the failure was already reported to the writer's callers


def _failure(directory: str, int err) -> OSError:
    """The error of every call after the writer failed (a full disk, an I/O error)."""
    return OSError(err, f"the WAL in {directory} failed: {os.strerror(err)}; it takes no more "
                        "records (those acknowledged before are kept): fix the cause, then open "
                        "the store again")


def _disown_after_fork() -> None:
    # A child made by fork() has copies of the writers but not their threads, and their
    # mutexes may be copied locked: each is closed here without touching its lock, and never
    # writes to the parent's segments (not at exit either). The child opens its own store.
    cdef WalWriter writer
    for writer in list(_OPEN_WRITERS):
        writer.closed = True
        writer.thread = None
        if writer.fd >= 0:
            c_close(writer.fd)  # the child's copy; the parent's stays open
            writer.fd = -1
    _OPEN_WRITERS.clear()


os.register_at_fork(after_in_child=_disown_after_fork)

POLICIES = {"always": POLICY_ALWAYS, "interval": POLICY_INTERVAL, "off": POLICY_OFF}

WalRecord = namedtuple("WalRecord", ["lsn", "segment_id", "offset", "payload"])
WalRecord.__doc__ = "One record: its lsn, segment id, payload offset in the segment file, payload."


def crc32c(data, uint32_t value=0) -> int:
    """CRC32C of data, continuing from value (the crc32c package's convention)."""
    cdef const uint8_t[::1] view = data
    cdef uint32_t crc
    with nogil:
        crc = pykv_crc32c(value, &view[0] if view.shape[0] else NULL, view.shape[0])
    return crc


def _use_hardware_crc(bint allow) -> None:
    """Tests only: switch between the hardware and the table implementation."""
    pykv_crc32c_allow_hw(allow)


def segment_path(directory: str, segment_id: int) -> str:
    """The file of the segment whose first lsn is segment_id."""
    return os.path.join(directory, f"{segment_id:020d}.wal")


# --- little-endian helpers ---------------------------------------------------------------------

cdef inline uint32_t load_u32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0]) | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void store_u32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline uint64_t load_u64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>load_u32(p)) | ((<uint64_t>load_u32(p + 4)) << 32)


cdef inline void store_u64(uint8_t* p, uint64_t v) noexcept nogil:
    store_u32(p, <uint32_t>(v & 0xFFFFFFFFu))
    store_u32(p + 4, <uint32_t>(v >> 32))


cdef void build_header(uint8_t* out, uint64_t first_lsn) noexcept nogil:
    memset(out, 0, C_HEADER_SIZE)
    memcpy(out, b"PYKVWAL\n", 8)
    store_u32(out + 8, 1)
    store_u64(out + 16, first_lsn)
    store_u32(out + 24, pykv_crc32c(0, out, 24))


def segment_header(uint64_t first_lsn) -> bytes:
    cdef uint8_t buf[32]
    build_header(buf, first_lsn)
    return PyBytes_FromStringAndSize(<char*>buf, C_HEADER_SIZE)


# --- reading and recovery ----------------------------------------------------------------------

cdef class SegmentScan:
    """What one pass over a segment's bytes found (see the format in the module docstring)."""

    @property
    def clean(self) -> bool:
        """Nothing but zeros (a preallocated segment's unused end), if anything, after the
        last complete batch."""
        return self.good_end == self.file_size or self.zero_tail

    @property
    def next_lsn(self) -> int:
        return self.first_lsn + len(self.offsets)


def check_segment_header(bytes data, uint64_t expected_lsn, str path) -> None:
    if len(data) < C_HEADER_SIZE:
        raise CorruptData(f"{path}: segment shorter than its header")
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(data)
    if data[:8] != MAGIC:
        raise CorruptData(f"{path}: not a pykv WAL segment (bad magic)")
    if load_u32(p + 24) != pykv_crc32c(0, p, 24):
        raise CorruptData(f"{path}: segment header checksum mismatch")
    if load_u32(p + 8) != FORMAT_VERSION:
        raise CorruptData(f"{path}: unsupported WAL format version {load_u32(p + 8)}")
    if load_u64(p + 16) != expected_lsn:
        raise CorruptData(f"{path}: header says first lsn {load_u64(p + 16)}, name says {expected_lsn}")


cdef inline bint valid_record_at(const uint8_t* base, Py_ssize_t q, Py_ssize_t size) noexcept nogil:
    """Whether a complete record with a valid CRC starts at offset q."""
    cdef uint32_t length
    if q + C_RECORD_OVERHEAD > size:
        return False
    length = load_u32(base + q) & LENGTH_MASK
    return (<Py_ssize_t>length <= size - q - C_RECORD_OVERHEAD
            and pykv_crc32c(pykv_crc32c(0, base + q, 4), base + q + 8, length) == load_u32(base + q + 4))


cdef Py_ssize_t find_valid_record(const uint8_t* base, Py_ssize_t start, Py_ssize_t size) noexcept nogil:
    """The first offset >= start holding a complete record with a valid CRC, or -1.

    Cheap on what a torn tail leaves behind: garbage lengths mostly point past the end of the
    file and zeros fail the CRC of their length field after 4 bytes.
    """
    cdef Py_ssize_t q = start
    while q + C_RECORD_OVERHEAD <= size:
        if valid_record_at(base, q, size):
            return q
        q += 1
    return -1


cdef bint all_zero(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if p[i]:
            return False
    return True


cdef SegmentScan scan_bytes(bytes data, uint64_t first_lsn, str path):
    """Find the complete records of a segment whose header is already checked."""
    cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = len(data), pos = C_HEADER_SIZE, batch_start_count = 0
    cdef Py_ssize_t later
    cdef uint32_t word, length
    cdef bint ended
    cdef SegmentScan scan = SegmentScan.__new__(SegmentScan)
    scan.path = path
    scan.first_lsn = first_lsn
    scan.offsets = []
    scan.lengths = []
    scan.file_size = size
    scan.data = data
    scan.good_end = C_HEADER_SIZE
    while pos + C_RECORD_OVERHEAD <= size:
        if not valid_record_at(base, pos, size):
            break
        word = load_u32(base + pos)
        length = word & LENGTH_MASK
        scan.offsets.append(pos + C_RECORD_OVERHEAD)
        scan.lengths.append(length)
        pos += C_RECORD_OVERHEAD + length
        if not (word & CONTINUED):
            scan.good_end = pos
            batch_start_count = len(scan.offsets)
    with nogil:
        # Zeros where the next record would be: the unused end of a preallocated segment.
        ended = all_zero(base + pos, size - pos)
    if pos + C_RECORD_OVERHEAD <= size and not ended:
        # A bad record. It starts a torn tail only if nothing valid follows it: a torn append
        # is the last thing in the file, while a flipped bit in the middle of the log leaves
        # intact records after it, which a cut would silently drop.
        with nogil:
            later = find_valid_record(base, pos + 1, size)
        if later >= 0:
            raise CorruptData(
                f"{path}: corrupt record at byte {pos} of segment {first_lsn} (lsn "
                f"{first_lsn + len(scan.offsets)}), but a valid record follows at byte {later}: "
                "mid-log corruption, not a torn tail; nothing was cut"
            )
    # Drop the records of an unfinished batch.
    del scan.offsets[batch_start_count:]
    del scan.lengths[batch_start_count:]
    scan.zero_tail = ended and pos == scan.good_end
    return scan


def damaged_spans(bytes data, uint64_t first_lsn):
    """For salvage (pykv.storage.salvage): where a segment whose header is checked has damage.

    Returns ``(spans, records, end)``: ``spans``, a list of ``(start, stop, valid records
    before it)`` for each byte range that holds no valid record and is followed by one
    (mid-log damage: a record with a bad CRC or a garbage length); ``records``, how many valid
    records the segment holds; ``end``, where
    the last of them ends (what follows is zeros, a torn tail, or damage with nothing valid
    after it). A damaged record's end is where its length field says, when a valid record
    starts there (a flipped bit in its payload), else the next offset holding a valid record.
    """
    cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = len(data), pos = C_HEADER_SIZE, later, claimed
    cdef uint32_t length
    cdef Py_ssize_t records = 0
    spans = []
    while pos + C_RECORD_OVERHEAD <= size:
        length = load_u32(base + pos) & LENGTH_MASK
        if valid_record_at(base, pos, size):
            records += 1
            pos += C_RECORD_OVERHEAD + length
            continue
        if all_zero(base + pos, size - pos):
            break
        claimed = pos + C_RECORD_OVERHEAD + length
        if <Py_ssize_t>length <= size - pos - C_RECORD_OVERHEAD and valid_record_at(base, claimed, size):
            later = claimed
        else:
            with nogil:
                later = find_valid_record(base, pos + 1, size)
        if later < 0:
            break
        spans.append((pos, later, records))
        pos = later
    return spans, records, pos


def list_segments(directory: str) -> list[int]:
    ids = []
    for name in os.listdir(directory):
        stem, dot, ext = name.partition(".")
        if ext == "wal" and len(stem) == 20 and stem.isdigit():
            ids.append(int(stem))
    ids.sort()
    return ids


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rewrite_header(path: str, first_lsn: int) -> None:
    """Give a segment torn during its creation (shorter than a header) a fresh header."""
    with open(path, "r+b") as f:
        f.truncate(0)
        f.write(segment_header(first_lsn))
        f.flush()
        os.fsync(f.fileno())


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def _scan_segment(directory: str, segment_id: int, is_last: bool, repair: bool) -> SegmentScan:
    path = segment_path(directory, segment_id)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < C_HEADER_SIZE:
        if not is_last:
            raise CorruptData(f"{path}: segment shorter than its header")
        if repair:
            _rewrite_header(path, segment_id)
        data = segment_header(segment_id)
    check_segment_header(data[:C_HEADER_SIZE], segment_id, path)
    scan = scan_bytes(data, segment_id, path)
    if not scan.clean:
        if not is_last:
            raise CorruptData(
                f"{path}: bad record at byte {scan.good_end} in a segment that is not the last"
            )
        if repair:
            _truncate(path, scan.good_end)
    return scan


def read_wal(directory: str, *, repair: bool = True, from_lsn: int = 1):
    """Yield the records with lsn >= from_lsn in lsn order, stopping at a torn or corrupt tail.

    With repair=True the tail is truncated away (do not repair a log a WalWriter has open).
    """
    ids = list_segments(directory)
    expected = None
    for index, segment_id in enumerate(ids):
        is_last = index == len(ids) - 1
        if expected is not None and segment_id != expected:
            raise CorruptData(f"{directory}: lsn gap, expected segment {expected}, found {segment_id}")
        if not is_last and ids[index + 1] <= from_lsn:
            expected = ids[index + 1]
            continue
        scan = _scan_segment(directory, segment_id, is_last, repair)
        expected = scan.next_lsn
        if not is_last and expected != ids[index + 1]:
            raise CorruptData(f"{scan.path}: ends at lsn {expected - 1}, next segment starts at {ids[index + 1]}")
        yield from _records_of(scan, from_lsn)


def _records_of(SegmentScan scan, from_lsn: int):
    data = scan.data
    lsn = scan.first_lsn
    for offset, length in zip(scan.offsets, scan.lengths):
        if lsn >= from_lsn:
            yield WalRecord(lsn, scan.first_lsn, offset, data[offset:offset + length])
        lsn += 1


# --- the writer --------------------------------------------------------------------------------

cdef int batch_reserve(batch* b, size_t extra) noexcept nogil:
    cdef size_t cap = b.cap if b.cap else 4096
    cdef uint8_t* grown
    while cap < b.size + extra:
        cap *= 2
    if cap != b.cap:
        grown = <uint8_t*>realloc(b.buf, cap)
        if grown == NULL:
            return -1
        b.buf = grown
        b.cap = cap
    return 0


cdef int batch_add_chunk(batch* b, uint64_t segment_id) noexcept nogil:
    cdef chunk* grown
    if b.nchunks == b.chunk_cap:
        grown = <chunk*>realloc(b.chunks, (b.chunk_cap * 2 + 4) * sizeof(chunk))
        if grown == NULL:
            return -1
        b.chunks = grown
        b.chunk_cap = b.chunk_cap * 2 + 4
    b.chunks[b.nchunks].segment_id = segment_id
    b.chunks[b.nchunks].start = b.size
    b.nchunks += 1
    return 0


cdef void batch_free(batch* b) noexcept nogil:
    free(b.buf)
    free(b.chunks)
    memset(b, 0, sizeof(batch))


cdef inline double now_seconds() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef int write_all(int fd, const uint8_t* data, size_t length) noexcept nogil:
    cdef ssize_t n
    while length:
        n = c_write(fd, data, length)
        if n < 0:
            if errno == EINTR:
                continue
            return errno
        data += n
        length -= n
    return 0


cdef int fsync_dir(const char* path) noexcept nogil:
    cdef int fd = c_open(path, O_RDONLY)
    cdef int rc = 0
    if fd < 0:
        return errno
    if fsync(fd) != 0:
        rc = errno
    c_close(fd)
    return rc


cdef class WalWriter:
    """A group-commit WAL writer over a directory of segments (format: module docstring)."""

    def __cinit__(self):
        self.fd = -1
        self.offsets = NULL
        self.seg_ids = NULL
        memset(&self.pending, 0, sizeof(batch))
        memset(&self.inflight, 0, sizeof(batch))

    def __init__(self, directory: str, *, segment_bytes: int = 64 << 20, fsync: str = "always",
                 interval_ms: int = 5, start_lsn: int | None = None, preallocate: bool = False):
        if fsync not in POLICIES:
            raise ValueError(f"fsync must be one of {sorted(POLICIES)}, not {fsync!r}")
        if not C_HEADER_SIZE + C_RECORD_OVERHEAD < segment_bytes <= MAX_SEGMENT_BYTES:
            raise ValueError(f"segment_bytes must be in (40, 2**31], not {segment_bytes}")
        if interval_ms < 0:
            raise ValueError("interval_ms must be >= 0")
        if start_lsn is not None and start_lsn < 1:
            raise ValueError("start_lsn must be >= 1")
        self.directory = os.fspath(directory)
        self.directory_c = os.fsencode(self.directory)
        self.dir_cstr = self.directory_c
        self.policy = POLICIES[fsync]
        self.interval = interval_ms / 1000.0
        self.segment_bytes = segment_bytes
        self.preallocate = preallocate
        self._arm_failpoint(os.environ.get("PYKV_FAILPOINT", ""))
        os.makedirs(self.directory, exist_ok=True)
        self._recover(start_lsn)
        self._init_sync_primitives()
        import threading
        self.thread = threading.Thread(target=self._run, name="pykv-wal-writer", daemon=True)
        self.thread.start()
        _OPEN_WRITERS.add(self)

    cdef _arm_failpoint(self, str spec):
        name, _, count = spec.partition(":")
        self.failpoint = {"wal.before_fsync": FP_BEFORE_FSYNC,
                          "wal.after_fsync": FP_AFTER_FSYNC}.get(name, FP_NONE)
        self.failpoint_countdown = int(count) if count else 1

    cdef _recover(self, start_lsn):
        """Cut the torn tail of the last segment and continue after its last good record."""
        ids = list_segments(self.directory)
        for segment_id in ids[:-1]:
            with open(segment_path(self.directory, segment_id), "rb") as f:
                check_segment_header(f.read(C_HEADER_SIZE), segment_id, f.name)
        if ids:
            last = _scan_segment(self.directory, ids[-1], True, True)
            next_lsn = last.next_lsn
            if start_lsn is not None and start_lsn != next_lsn:
                if next_lsn != last.first_lsn or len(ids) > 1:
                    raise ValueError(f"start_lsn {start_lsn} does not continue the log at {next_lsn}")
                # Only an empty segment: start over at start_lsn.
                os.unlink(last.path)
                _fsync_path(self.directory, directory=True)
                ids = []
        if not ids:
            next_lsn = start_lsn or 1
            path = segment_path(self.directory, next_lsn)
            with open(path, "xb") as f:
                f.write(segment_header(next_lsn))
                f.flush()
                os.fsync(f.fileno())
            _fsync_path(self.directory, directory=True)
            ids = [next_lsn]
            offsets, tail_pos = [], C_HEADER_SIZE
        else:
            offsets, tail_pos = last.offsets, last.good_end
        self.next_lsn = next_lsn
        self.index_base_at_open = next_lsn - 1
        self.written_lsn = self.synced_upto = self.durable_target = next_lsn - 1
        self.tail_segment = ids[-1]
        self.tail_pos = tail_pos
        cdef bytes tail_path = os.fsencode(segment_path(self.directory, ids[-1]))
        self.fd = c_open(tail_path, O_WRONLY)
        # Writes go on at the end of the last complete batch: past it there is nothing, or
        # zeros (preallocated), or a torn tail that the scan above has just cut.
        if self.fd < 0 or lseek(self.fd, <off_t>tail_pos, SEEK_SET) < 0:
            raise OSError(errno, os.strerror(errno), segment_path(self.directory, ids[-1]))
        self.fd_pos = tail_pos
        self.allocated_to = 0
        # What the last run wrote may still be only in the page cache (it crashed, or ran
        # with fsync off): it counts as synced from here, so make it so.
        if fdatasync(self.fd) != 0:
            raise OSError(errno, os.strerror(errno), segment_path(self.directory, ids[-1]))
        self.fd_segment = ids[-1]
        for segment_id in ids:
            self._push_segment(segment_id)
        self.index_base = ids[-1]
        for offset in offsets:
            self._push_offset(offset)

    cdef void _preallocate(self, size_t length) noexcept nogil:
        """With ``preallocate``: before ``length`` bytes are written at fd_pos, make sure the
        file is allocated past them, PREALLOCATE_STEP at a time, if the file system can (a
        speed-up only, so a refusal, unsupported or no space, is ignored)."""
        cdef off_t end = self.fd_pos + <off_t>length
        if self.preallocate and end > self.allocated_to:
            if fallocate(self.fd, 0, self.fd_pos, <off_t>length + PREALLOCATE_STEP) == 0:
                self.allocated_to = end + PREALLOCATE_STEP

    cdef _init_sync_primitives(self):
        cdef pthread_condattr_t attr
        pthread_mutex_init(&self.mu, NULL)
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(&self.work_cv, &attr)
        pthread_cond_init(&self.done_cv, &attr)
        pthread_condattr_destroy(&attr)
        self.last_sync_time = now_seconds()
        self.sync_primitives_ready = True

    def __dealloc__(self):
        if self.fd >= 0:
            c_close(self.fd)
        batch_free(&self.pending)
        batch_free(&self.inflight)
        free(self.offsets)
        free(self.seg_ids)
        if self.sync_primitives_ready:
            pthread_cond_destroy(&self.work_cv)
            pthread_cond_destroy(&self.done_cv)
            pthread_mutex_destroy(&self.mu)

    # -- index (called with the mutex held or before the thread starts) --

    cdef int _push_offset(self, uint32_t offset) except -1:
        cdef uint32_t* grown
        if self.offsets_len == self.offsets_cap:
            grown = <uint32_t*>realloc(self.offsets, (self.offsets_cap * 2 + 1024) * sizeof(uint32_t))
            if grown == NULL:
                raise MemoryError()
            self.offsets = grown
            self.offsets_cap = self.offsets_cap * 2 + 1024
        self.offsets[self.offsets_len] = offset
        self.offsets_len += 1
        return 0

    cdef int _push_segment(self, uint64_t segment_id) except -1:
        cdef uint64_t* grown
        if self.seg_len == self.seg_cap:
            grown = <uint64_t*>realloc(self.seg_ids, (self.seg_cap * 2 + 16) * sizeof(uint64_t))
            if grown == NULL:
                raise MemoryError()
            self.seg_ids = grown
            self.seg_cap = self.seg_cap * 2 + 16
        self.seg_ids[self.seg_len] = segment_id
        self.seg_len += 1
        return 0

    # -- submitting --

    cdef int _check_usable(self) except -1:
        # The failure first: a writer that failed is closed too, and "closed" would hide why.
        if self.error:
            raise _failure(self.directory, self.error)
        if self.closing or self.closed:
            raise StoreClosed(f"the WAL in {self.directory} is closed")
        return 0

    cdef void _lock(self) noexcept:
        """Take the mutex from a thread holding the GIL.

        Never block on the mutex while holding the GIL: the holder may need the GIL back (a
        Python allocation inside its critical section can switch threads), so a contended
        lock is taken with the GIL released. The writer thread never touches the GIL, and
        holds the mutex only to swap buffers and publish counters, so a short spin of
        try-locks nearly always gets it first: releasing the GIL here is costly, because a
        caller like Storage.submit holds its own lock meanwhile and every other thread then
        queues behind the GIL hand-over.
        """
        cdef int spins
        for spins in range(LOCK_SPINS):
            if pthread_mutex_trylock(&self.mu) == 0:
                return
            cpu_relax()
        with nogil:
            pthread_mutex_lock(&self.mu)

    cdef uint64_t _enqueue(self, list payloads, uint64_t* segment_out, uint32_t* offset_out,
                           bint wake=True) except 0:
        """Frame payloads as one batch into the pending buffer; return the last lsn.

        segment_out/offset_out (may be NULL) receive the last record's location. The common
        case takes the mutex once and never releases the GIL; only a full pending buffer
        (back-pressure) waits, with the GIL released. wake=False leaves an idle writer asleep
        (the caller calls wake() later, see submit_located).
        """
        cdef Py_ssize_t count = len(payloads), got = 0, i
        cdef uint64_t total = 0, length, last = 0
        cdef uint8_t* dst
        cdef bint signal = False
        cdef Py_buffer* views = <Py_buffer*>malloc(count * sizeof(Py_buffer))
        if views == NULL:
            raise MemoryError()
        try:
            for got in range(count):
                PyObject_GetBuffer(payloads[got], &views[got], PyBUF_SIMPLE)
                if <uint64_t>views[got].len > MAX_PAYLOAD:
                    got += 1
                    raise ValueTooLarge(f"WAL payload of {views[got - 1].len} bytes is too large")
                total += C_RECORD_OVERHEAD + views[got].len
            got = count
            if total > MAX_PAYLOAD:
                raise ValueTooLarge(f"WAL batch of {total} bytes is too large")
            if self.closed:
                # Closed for good, without taking the lock: a forked child's copy of it may
                # be locked for ever (_disown_after_fork).
                self._check_usable()
            self._lock()
            while self._no_room(total):
                pthread_mutex_unlock(&self.mu)
                self._wait_for_room(total)
                self._lock()
            try:
                self._check_usable()
                if batch_reserve(&self.pending, total) < 0:
                    raise MemoryError()
                # Roll to a new segment before the batch if it does not fit (never inside it).
                if self.tail_pos + total > self.segment_bytes and self.tail_pos > C_HEADER_SIZE:
                    self._push_segment(self.next_lsn)
                    self.tail_segment = self.next_lsn
                    self.tail_pos = C_HEADER_SIZE
                    if batch_add_chunk(&self.pending, self.tail_segment) < 0:
                        raise MemoryError()
                elif self.pending.nchunks == 0:
                    if batch_add_chunk(&self.pending, self.tail_segment) < 0:
                        raise MemoryError()
                for i in range(count):
                    length = views[i].len
                    dst = self.pending.buf + self.pending.size
                    store_u32(dst, <uint32_t>length | (CONTINUED if i < count - 1 else 0))
                    if length:
                        memcpy(dst + C_RECORD_OVERHEAD, views[i].buf, length)
                    self.pending.size += C_RECORD_OVERHEAD + length
                    self._push_offset(<uint32_t>(self.tail_pos + C_RECORD_OVERHEAD))
                    if i == count - 1:
                        if segment_out != NULL:
                            segment_out[0] = self.tail_segment
                        if offset_out != NULL:
                            offset_out[0] = <uint32_t>(self.tail_pos + C_RECORD_OVERHEAD)
                    self.tail_pos += C_RECORD_OVERHEAD + length
                    self.next_lsn += 1
                last = self.next_lsn - 1
                self.pending.last_lsn = last
                # A busy writer picks the records up when its write/fdatasync returns; only
                # an idle one needs the signal (a syscall, and a wake-up that would contend
                # for the mutex we still hold).
                signal = wake and self.writer_idle
            finally:
                pthread_mutex_unlock(&self.mu)
            if signal:
                # Waking a thread may hand it this CPU at once: never keep the GIL meanwhile.
                with nogil:
                    pthread_cond_signal(&self.work_cv)
        finally:
            for i in range(got):
                PyBuffer_Release(&views[i])
            free(views)
        return last

    cdef bint _no_room(self, uint64_t total) noexcept:
        """Whether a batch of total bytes must wait for the writer (caller holds the mutex)."""
        return (self.pending.size > 0 and self.pending.size + total > MAX_PENDING_BYTES
                and not self.closing and not self.error)

    cdef int _wait_for_room(self, uint64_t total) except -1:
        """Back-pressure: wait (GIL released) while too much is queued for the writer.

        Another submitter may fill the buffer again before this one enqueues; the limit is a
        soft one that keeps memory bounded, not an exact cap.
        """
        with nogil:
            pthread_mutex_lock(&self.mu)
            while (self.pending.size > 0 and self.pending.size + total > MAX_PENDING_BYTES
                   and not self.closing and not self.error):
                if self.writer_idle:  # records submitted with wake=False
                    pthread_cond_signal(&self.work_cv)
                pthread_cond_wait(&self.done_cv, &self.mu)
            pthread_mutex_unlock(&self.mu)
        return 0

    def submit(self, payload) -> int:
        """Queue one record and return its lsn at once (not yet durable; see wait)."""
        return self._enqueue([payload], NULL, NULL)

    def submit_located(self, payload, bint wake=True) -> tuple:
        """submit() that also returns where the record goes: (lsn, segment_id, payload offset).

        The same answer as submit() followed by locate(lsn), in one critical section. With
        wake=False an idle writer is not woken: a caller submitting under its own lock calls
        wake() once it has let go of it, so that the writer thread, which may preempt the
        caller on a busy machine, never runs while the caller holds its lock and the GIL.
        A record submitted with wake=False is written only after the next wake(), wait(),
        sync() or an ordinary submit.
        """
        cdef uint64_t segment_id = 0
        cdef uint32_t offset = 0
        cdef uint64_t lsn = self._enqueue([payload], &segment_id, &offset, wake)
        return lsn, segment_id, offset

    def wake(self) -> None:
        """Wake the writer if it sleeps while records wait (after submit_located(wake=False))."""
        # A writer that is not idle takes the pending records when its write or fdatasync
        # returns (it checks under the mutex before it sleeps), so it needs no signal. The
        # flag was set under the mutex that our submit took after it, so it is seen here.
        if not self.writer_idle:
            return
        cdef bint idle
        with nogil:  # the woken writer may preempt this thread: not while holding the GIL
            pthread_mutex_lock(&self.mu)
            idle = self.writer_idle and self.pending.size > 0
            pthread_mutex_unlock(&self.mu)
            if idle:
                pthread_cond_signal(&self.work_cv)

    def append(self, payload) -> int:
        """Append one record and return its lsn once it is durable under the fsync policy
        (written by this thread when no other writes: see _wait)."""
        cdef uint64_t lsn = self._enqueue([payload], NULL, NULL, False)
        self._wait(lsn)
        return lsn

    def append_many(self, payloads) -> int:
        """Append records as one all-or-nothing batch; return the last lsn once durable."""
        payloads = list(payloads)
        if not payloads:
            raise ValueError("append_many needs at least one payload")
        cdef uint64_t lsn = self._enqueue(payloads, NULL, NULL, False)
        self._wait(lsn)
        return lsn

    def wait(self, lsn: int) -> None:
        """Block (GIL released) until lsn is durable under the fsync policy."""
        self._wait(lsn)

    cdef int _wait(self, uint64_t lsn) except -1:
        cdef int err = 0
        cdef bint stopped = False
        if lsn >= self.next_lsn:
            raise ValueError(f"lsn {lsn} has not been assigned (last is {self.next_lsn - 1})")
        # Already durable: no mutex, no GIL hand-over. durable_target only grows, and a
        # stale read just takes the slow path below.
        if atomic_load_u64(&self.durable_target) >= lsn:
            return 0
        with nogil:
            pthread_mutex_lock(&self.mu)
            while self.durable_target < lsn and not self.error and not self.closed:
                if (self.writer_idle and not self.writing and not self.closing
                        and self.pending.size > 0 and self.pending.last_lsn == self.written_lsn + 1):
                    # The writer thread sleeps and one record waits, ours: a lone writer.
                    # Write it here rather than wake the writer thread and wait to be woken
                    # in turn, two thread hand-overs of every commit. (Records of several
                    # threads are a stream of commits: the writer thread goes from round to
                    # round without sleeping, where a waiter would first be woken for each.)
                    self.writing = True
                    self._write_round()
                    self.writing = False
                    if self.pending.size > 0 or self.sync_requested or self.closing:
                        self.writer_idle = False  # others submitted meanwhile: the writer's
                        pthread_cond_signal(&self.work_cv)
                    continue
                if self.writer_idle and self.pending.size > 0:  # submitted with wake=False
                    self.writer_idle = False
                    pthread_cond_signal(&self.work_cv)
                pthread_cond_wait(&self.done_cv, &self.mu)
            if self.durable_target < lsn:
                err = self.error
                stopped = True
            pthread_mutex_unlock(&self.mu)
        if stopped:
            if err:
                raise _failure(self.directory, err)
            raise StoreClosed(f"the WAL in {self.directory} closed before lsn {lsn} was durable")
        return 0

    def sync(self) -> None:
        """fdatasync everything submitted so far (under any policy) and wait for it."""
        cdef uint64_t target
        cdef int err = 0
        self._check_usable()
        with nogil:
            pthread_mutex_lock(&self.mu)
            target = self.next_lsn - 1
            self.sync_requested = True
            pthread_cond_signal(&self.work_cv)
            while self.synced_upto < target and not self.error and not self.closed:
                pthread_cond_wait(&self.done_cv, &self.mu)
            err = self.error
            pthread_mutex_unlock(&self.mu)
        if err:
            raise _failure(self.directory, err)

    # -- queries --

    @property
    def durable_lsn(self) -> int:
        """The highest lsn durable under the fsync policy (written, and fdatasync'd for always)."""
        return self.durable_target

    @property
    def synced_lsn(self) -> int:
        """The highest lsn covered by an fdatasync."""
        return self.synced_upto

    @property
    def last_lsn(self) -> int:
        """The last lsn assigned (0 before any record)."""
        return self.next_lsn - 1

    def stats(self) -> dict:
        """Counters since open: records appended, write batches, fdatasyncs of batches and
        of sealed segments; and the bytes its two batch buffers hold allocated now."""
        self._lock()
        buffer_bytes = self.pending.cap + self.inflight.cap
        pthread_mutex_unlock(&self.mu)
        return {"records": self.next_lsn - 1 - self.index_base_at_open, "batches": self.batches,
                "fsyncs": self.fsyncs, "seal_fsyncs": self.seal_fsyncs,
                "buffer_bytes": buffer_bytes}

    def locate(self, lsn: int) -> tuple:
        """(segment_id, payload offset) of a record appended or recovered by this writer."""
        cdef uint64_t n
        cdef size_t lo, hi, mid
        if not isinstance(lsn, int) or lsn < <object>self.index_base or lsn >= <object>self.next_lsn:
            raise KeyError(lsn)
        n = lsn
        self._lock()
        lo, hi = 0, self.seg_len
        while hi - lo > 1:   # the last segment whose id is <= n
            mid = (lo + hi) // 2
            if self.seg_ids[mid] <= n:
                lo = mid
            else:
                hi = mid
        result = (self.seg_ids[lo], self.offsets[n - self.index_base])
        pthread_mutex_unlock(&self.mu)
        return result

    def tail(self) -> tuple:
        """(segment_id, bytes) of the last segment: where the next record goes. Its file may be
        longer (preallocate), so this is how much of it the log uses."""
        self._lock()
        result = (self.tail_segment, self.tail_pos)
        pthread_mutex_unlock(&self.mu)
        return result

    def segment_sizes(self) -> dict:
        """{segment_id: bytes of it the log uses}, in order: a sealed segment's file size,
        the last one's tail (its file may be longer: preallocate). A segment deleted
        meanwhile (truncate_before) is left out."""
        self._lock()
        ids = [self.seg_ids[i] for i in range(self.seg_len)]
        tail_segment, tail_pos = self.tail_segment, self.tail_pos
        pthread_mutex_unlock(&self.mu)
        sizes = {}
        for segment_id in ids:
            if segment_id == tail_segment:
                sizes[segment_id] = tail_pos
                continue
            try:
                sizes[segment_id] = os.path.getsize(segment_path(self.directory, segment_id))
            except FileNotFoundError:
                pass
        return sizes

    def segments(self) -> list:
        """The ids (first lsns) of the segments, in order."""
        self._lock()
        ids = [self.seg_ids[i] for i in range(self.seg_len)]
        pthread_mutex_unlock(&self.mu)
        return ids

    def truncate_before(self, lsn: int) -> int:
        """Delete whole segments whose records are all < lsn (and written); return how many."""
        cdef size_t drop = 0, i
        cdef uint64_t keep_from
        self._lock()
        # Segment i holds [seg_ids[i], seg_ids[i+1]); the last segment is never deleted, and a
        # segment whose records are not all written yet may still be reopened by the writer.
        while (drop + 1 < self.seg_len and self.seg_ids[drop + 1] <= lsn
               and self.seg_ids[drop + 1] - 1 <= self.written_lsn):
            drop += 1
        doomed = [self.seg_ids[i] for i in range(drop)]
        if drop:
            keep_from = self.seg_ids[drop]
            memmove(self.seg_ids, self.seg_ids + drop, (self.seg_len - drop) * sizeof(uint64_t))
            self.seg_len -= drop
            if keep_from > self.index_base:
                memmove(self.offsets, self.offsets + (keep_from - self.index_base),
                        (self.offsets_len - (keep_from - self.index_base)) * sizeof(uint32_t))
                self.offsets_len -= keep_from - self.index_base
                self.index_base = keep_from
        pthread_mutex_unlock(&self.mu)
        for segment_id in doomed:
            os.unlink(segment_path(self.directory, segment_id))
        if doomed and self.policy != POLICY_OFF:
            _fsync_path(self.directory, directory=True)
        return len(doomed)

    # -- shutting down --

    def close(self) -> None:
        """Write and sync everything queued, stop the writer thread, close the file. Idempotent."""
        if self.thread is None:
            return
        with nogil:
            pthread_mutex_lock(&self.mu)
            self.closing = True
            pthread_cond_signal(&self.work_cv)
            pthread_mutex_unlock(&self.mu)
        self.thread.join()
        self.thread = None
        _OPEN_WRITERS.discard(self)
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1
        err = self.error
        if err:
            raise _failure(self.directory, err)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- the writer thread --

    def _run(self) -> None:
        with nogil:
            self._loop()

    cdef void _loop(self) noexcept nogil:
        pthread_mutex_lock(&self.mu)
        while True:
            # Wait for records, a sync request, closing, or (interval) the next sync deadline,
            # while no submitter writes a batch itself (_wait).
            while not self._writer_has_work():
                self.writer_idle = True
                if (self.policy == POLICY_INTERVAL and self.synced_upto < self.written_lsn
                        and not self.writing):
                    self._timed_wait(self.last_sync_time + self.interval)
                else:
                    pthread_cond_wait(&self.work_cv, &self.mu)
                self.writer_idle = False
            if self.error:
                break
            self.writing = True
            self._write_round()
            self.writing = False
            if self.error or (self.closing and self.pending.size == 0):
                break
        if not self.error and self.policy != POLICY_OFF and self.synced_upto < self.written_lsn:
            if fdatasync(self.fd) == 0:
                self.synced_upto = self.written_lsn
        self.closed = True
        pthread_cond_broadcast(&self.done_cv)
        pthread_mutex_unlock(&self.mu)

    cdef bint _writer_has_work(self) noexcept nogil:
        """Whether the writer thread should write a round now (caller holds the mutex)."""
        if self.error:
            return True
        if self.writing:
            return False
        if self.pending.size > 0 or self.sync_requested or self.closing:
            return True
        return (self.policy == POLICY_INTERVAL and self.synced_upto < self.written_lsn
                and now_seconds() >= self.last_sync_time + self.interval)

    cdef void _write_round(self) noexcept nogil:
        """Write the pending batch, fdatasync it under the policy, publish the new durable
        lsn and wake the waiters. Called with the mutex held and ``writing`` claimed, by the
        writer thread or by a submitter waiting for its own records (_wait: one hand-over
        to the writer thread and one back less per commit); returns with the mutex held."""
        cdef batch tmp
        cdef bint want_sync, synced, sync_req, closing
        cdef uint64_t target
        cdef int rc
        tmp = self.inflight
        self.inflight = self.pending
        self.pending = tmp
        self.pending.size = 0
        self.pending.nchunks = 0
        target = self.inflight.last_lsn if self.inflight.size else self.written_lsn
        sync_req = self.sync_requested
        self.sync_requested = False
        closing = self.closing
        pthread_cond_broadcast(&self.done_cv)   # room in the pending buffer again
        pthread_mutex_unlock(&self.mu)

        if self.inflight.size:
            self.batches += 1
        rc = self._write_batch(&self.inflight)
        want_sync = (self.policy == POLICY_ALWAYS or sync_req
                     or (self.policy == POLICY_INTERVAL
                         and (closing or now_seconds() - self.last_sync_time >= self.interval)))
        synced = False
        if rc == 0 and want_sync and self.synced_upto < target:
            self._failpoint(FP_BEFORE_FSYNC)
            self.fsyncs += 1
            if fdatasync(self.fd) != 0:
                rc = errno
            else:
                synced = True
                self._failpoint(FP_AFTER_FSYNC)
        if want_sync:
            self.last_sync_time = now_seconds()

        pthread_mutex_lock(&self.mu)
        self.inflight.size = 0
        self.inflight.nchunks = 0
        if self.inflight.cap > KEEP_BATCH_BYTES:  # under the mutex: stats() reads cap
            batch_free(&self.inflight)
        if rc != 0:
            self.error = rc
        else:
            self.written_lsn = target
            if synced or (want_sync and self.synced_upto >= target):
                self.synced_upto = target
            if self.policy == POLICY_ALWAYS:
                atomic_store_u64(&self.durable_target, self.synced_upto)
            else:
                atomic_store_u64(&self.durable_target, self.written_lsn)
        pthread_cond_broadcast(&self.done_cv)

    cdef void _timed_wait(self, double deadline) noexcept nogil:
        cdef timespec ts
        ts.tv_sec = <long>deadline
        ts.tv_nsec = <long>((deadline - ts.tv_sec) * 1e9)
        pthread_cond_timedwait(&self.work_cv, &self.mu, &ts)

    cdef void _failpoint(self, int point) noexcept nogil:
        if self.failpoint == point:
            self.failpoint_countdown -= 1
            if self.failpoint_countdown <= 0:
                _exit(137)

    cdef int _write_batch(self, batch* b) noexcept nogil:
        """CRC the records, write each chunk to its segment (creating new ones); errno or 0."""
        cdef Py_ssize_t c
        cdef size_t pos = 0, end
        cdef uint32_t length
        cdef int rc
        while pos < b.size:
            length = load_u32(b.buf + pos) & LENGTH_MASK
            store_u32(b.buf + pos + 4, pykv_crc32c(pykv_crc32c(0, b.buf + pos, 4),
                                                   b.buf + pos + 8, length))
            pos += C_RECORD_OVERHEAD + length
        for c in range(b.nchunks):
            end = b.chunks[c + 1].start if c + 1 < b.nchunks else b.size
            if b.chunks[c].segment_id != self.fd_segment:
                rc = self._roll(b.chunks[c].segment_id)
                if rc != 0:
                    return rc
            self._preallocate(end - b.chunks[c].start)
            rc = write_all(self.fd, b.buf + b.chunks[c].start, end - b.chunks[c].start)
            if rc != 0:
                return rc
            self.fd_pos += <off_t>(end - b.chunks[c].start)
        return 0

    cdef int _roll(self, uint64_t segment_id) noexcept nogil:
        """Finish the current segment (fdatasync'd) and create the next one.

        Under every policy, "off" too: sync() fdatasyncs the segment being written only, so
        a sealed segment must be durable already when it asks, and creating one costs one
        fdatasync per segment, not per commit.
        """
        cdef char path[4096]
        cdef uint8_t header[32]
        cdef int fd, rc
        cdef struct_stat st
        self.seal_fsyncs += 1
        # A sealed segment keeps its records only: no zeros after them, whether this writer
        # preallocated them or found them there (a previous run's preallocation).
        if fstat(self.fd, &st) != 0 or (st.st_size > self.fd_pos and ftruncate(self.fd, self.fd_pos) != 0):
            return errno
        if fdatasync(self.fd) != 0:
            return errno
        c_close(self.fd)
        self.fd = -1
        snprintf(path, sizeof(path), "%s/%020llu.wal", self.dir_cstr,
                 <unsigned long long>segment_id)
        fd = c_open(path, O_WRONLY | O_CREAT | O_EXCL, 0o644)
        if fd < 0:
            return errno
        self.fd = fd
        self.fd_segment = segment_id
        self.fd_pos = 0
        self.allocated_to = 0
        build_header(header, segment_id)
        rc = write_all(fd, header, C_HEADER_SIZE)
        if rc != 0:
            return rc
        self.fd_pos = C_HEADER_SIZE
        if fdatasync(fd) != 0:
            return errno
        return fsync_dir(self.dir_cstr)


cdef extern from "<stdio.h>" nogil:
    int snprintf(char* buf, size_t size, const char* fmt, ...)
