"""Read-only file descriptors of WAL segments: shared by readers, bounded, closed once unused.

A reader takes an fd under the store lock (``acquire``), does its ``os.pread`` without the
lock, and gives it back (``release``). An fd is closed only when no reader holds it, so a
pread never meets a closed (or, worse, reused) descriptor: after compaction deletes a segment
(``forget``), readers still holding its fd finish reading the unlinked file, whose bytes stay
intact until the last descriptor closes. At most ``max_open`` idle fds are kept, least
recently used first out, so a store with thousands of segments stays under RLIMIT_NOFILE.
Not thread-safe: the store calls it under its lock.
"""

from __future__ import annotations

import os
from collections import OrderedDict


class _Handle:
    __slots__ = ("fd", "segment_id", "users", "retired")

    def __init__(self, fd: int, segment_id: int) -> None:
        self.fd = fd
        self.segment_id = segment_id
        self.users = 0
        self.retired = False  # evicted or forgotten: close when the last user releases it


class SegmentFiles:
    """segment id -> shared read-only fd, with reader counts."""

    def __init__(self, path_of, max_open: int = 128) -> None:
        self._path_of = path_of
        self.max_open = max_open
        self._open: OrderedDict[int, _Handle] = OrderedDict()  # LRU order, by segment id
        self._by_fd: dict[int, _Handle] = {}  # every fd not yet closed, retired ones too

    def __len__(self) -> int:
        return len(self._by_fd)

    def acquire(self, segment_id: int) -> int:
        handle = self._open.get(segment_id)
        if handle is None:
            handle = _Handle(os.open(self._path_of(segment_id), os.O_RDONLY), segment_id)
            self._open[segment_id] = handle
            self._by_fd[handle.fd] = handle
            self._evict()
        else:
            self._open.move_to_end(segment_id)
        handle.users += 1
        return handle.fd

    def release(self, fd: int) -> None:
        handle = self._by_fd[fd]
        handle.users -= 1
        if handle.retired and handle.users == 0:
            self._close(handle)

    def forget(self, segment_id: int) -> None:
        """The segment file was deleted: close its fd now, or when its last reader is done."""
        handle = self._open.pop(segment_id, None)
        if handle is not None:
            self._retire(handle)

    def close_all(self) -> None:
        """Close every idle fd now and every fd in use when its reader releases it."""
        for handle in list(self._by_fd.values()):
            self._retire(handle)
        self._open.clear()

    def _evict(self) -> None:
        if len(self._open) <= self.max_open:
            return
        for segment_id in list(self._open):
            if len(self._open) <= self.max_open:
                break
            self._retire(self._open.pop(segment_id))

    def _retire(self, handle: _Handle) -> None:
        handle.retired = True
        if handle.users == 0:
            self._close(handle)

    def _close(self, handle: _Handle) -> None:
        if self._by_fd.pop(handle.fd, None) is not None:
            os.close(handle.fd)
