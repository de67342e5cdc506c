# Contract of pykv._engine.wal: the group-commit writer's state and the segment scanner.
# The on-disk format and the concurrency rules are in the module docstring of engine/wal.pyx.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from posix.time cimport timespec
from posix.types cimport off_t


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef struct pthread_condattr_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_trylock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_condattr_init(pthread_condattr_t*)
    int pthread_condattr_setclock(pthread_condattr_t*, int)
    int pthread_condattr_destroy(pthread_condattr_t*)
    int pthread_cond_init(pthread_cond_t*, pthread_condattr_t*)
    int pthread_cond_destroy(pthread_cond_t*)
    int pthread_cond_wait(pthread_cond_t*, pthread_mutex_t*)
    int pthread_cond_timedwait(pthread_cond_t*, pthread_mutex_t*, const timespec*)
    int pthread_cond_broadcast(pthread_cond_t*)
    int pthread_cond_signal(pthread_cond_t*)


cdef struct chunk:
    uint64_t segment_id    # the segment these bytes go to
    size_t start           # where they start in the batch buffer


cdef struct batch:
    uint8_t* buf
    size_t size
    size_t cap
    chunk* chunks
    Py_ssize_t nchunks
    Py_ssize_t chunk_cap
    uint64_t last_lsn


cdef class SegmentScan:
    cdef public object path
    cdef public uint64_t first_lsn
    cdef public list offsets          # payload offsets of the complete records
    cdef public list lengths
    cdef public Py_ssize_t good_end   # byte offset just after the last complete batch
    cdef public Py_ssize_t file_size
    cdef public bint zero_tail        # only zeros after good_end (a preallocated segment's end)
    cdef public object data


cdef class WalWriter:
    cdef pthread_mutex_t mu
    cdef pthread_cond_t work_cv       # the writer waits here for work
    cdef pthread_cond_t done_cv       # submitters wait here for durability or room
    cdef bint sync_primitives_ready
    cdef batch pending
    cdef batch inflight
    # lsns: assigned <= last; written <= last; synced <= written
    cdef uint64_t next_lsn
    cdef uint64_t written_lsn
    cdef uint64_t synced_upto
    cdef uint64_t durable_target      # durable_lsn under the policy
    # where the next record goes (assigned at submit time, so locate() is exact)
    cdef uint64_t tail_segment
    cdef uint64_t tail_pos
    cdef uint64_t segment_bytes
    cdef bint preallocate             # keep the file allocated a step past fd_pos (fallocate)
    # the file the writer thread has open
    cdef int fd
    cdef uint64_t fd_segment
    cdef off_t fd_pos                 # where the next write goes in that file
    cdef off_t allocated_to           # with preallocate: the file is allocated up to here
    cdef int policy
    cdef double interval
    cdef double last_sync_time
    cdef bint sync_requested
    cdef bint writer_idle             # the writer waits on work_cv: submitters must signal
    cdef bint writing                 # a thread (the writer's, or a waiting submitter) writes a batch
    cdef bint closing
    cdef bint closed
    cdef int error                    # errno of a failed write/fsync: the log is then unusable
    cdef int failpoint
    cdef uint64_t fsyncs              # counters for stats()
    cdef uint64_t batches
    cdef uint64_t seal_fsyncs
    cdef long failpoint_countdown
    # locate(): payload offset of every lsn from index_base on; the segment ids in order
    cdef uint32_t* offsets
    cdef size_t offsets_len
    cdef size_t offsets_cap
    cdef uint64_t index_base
    cdef uint64_t index_base_at_open
    cdef uint64_t* seg_ids
    cdef size_t seg_len
    cdef size_t seg_cap
    cdef bytes directory_c
    cdef const char* dir_cstr          # points into directory_c, for the writer thread
    cdef object thread
    cdef readonly str directory
    cdef object __weakref__

    cdef _arm_failpoint(self, str spec)
    cdef _recover(self, start_lsn)
    cdef _init_sync_primitives(self)
    cdef void _preallocate(self, size_t length) noexcept nogil
    cdef int _push_offset(self, uint32_t offset) except -1
    cdef int _push_segment(self, uint64_t segment_id) except -1
    cdef int _check_usable(self) except -1
    cdef void _lock(self) noexcept
    cdef uint64_t _enqueue(self, list payloads, uint64_t* segment_out, uint32_t* offset_out,
                           bint wake=*) except 0
    cdef bint _no_room(self, uint64_t total) noexcept
    cdef int _wait_for_room(self, uint64_t total) except -1
    cdef int _wait(self, uint64_t lsn) except -1
    cdef void _loop(self) noexcept nogil
    cdef bint _writer_has_work(self) noexcept nogil
    cdef void _write_round(self) noexcept nogil
    cdef void _timed_wait(self, double deadline) noexcept nogil
    cdef void _failpoint(self, int point) noexcept nogil
    cdef int _write_batch(self, batch* b) noexcept nogil
    cdef int _roll(self, uint64_t segment_id) noexcept nogil
