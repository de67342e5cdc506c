"""FrozenLog: the write-ahead log of a store opened read-only, as it was found (never changed)."""

from __future__ import annotations

import os

from pykv._engine.wal import HEADER_SIZE, list_segments, segment_path
from pykv.errors import ReadOnlyStore


class FrozenLog:
    """Stands in for the WalWriter of a Storage opened with ``read_only=True``.

    It answers what readers ask of a log (its last lsn, its segments, where its last whole
    record ends) from what recovery read, and refuses every append. Nothing on disk is
    touched, not even a torn tail: a writer's next open cuts that.
    """

    def __init__(self, directory: str, last_lsn: int, tail: tuple[int, int] | None) -> None:
        """``tail``: (segment, offset) just past the last whole record; None for a log with
        no record."""
        self.directory = directory
        self._last_lsn = last_lsn
        self._segments = list_segments(directory)
        self._tail = tail

    @property
    def last_lsn(self) -> int:
        return self._last_lsn

    # Every record found is on disk already.
    durable_lsn = synced_lsn = last_lsn

    def segments(self) -> list[int]:
        return list(self._segments)

    def segment_sizes(self) -> dict[int, int]:
        return {seg: os.path.getsize(segment_path(self.directory, seg)) for seg in self._segments}

    def tail(self) -> tuple[int, int]:
        """(segment, bytes) of the log's whole records: what a backup copies."""
        if self._tail is not None:
            return self._tail
        if not self._segments:
            raise ReadOnlyStore(f"{self.directory} holds no log segment to copy")
        return self._segments[-1], HEADER_SIZE

    def wait(self, lsn: int) -> None:
        """Everything is durable: nothing to wait for."""

    def sync(self) -> None:
        """Nothing was written: nothing to sync."""

    def wake(self) -> None:
        """No writer thread to wake."""

    def close(self) -> None:
        """Nothing to flush or close."""

    def _refuse(self, *_args: object, **_kwargs: object) -> int:
        raise ReadOnlyStore(
            f"the store of {os.path.dirname(self.directory)} was opened with read_only=True: "
            "open it without read_only to write"
        )

    submit = submit_located = append = append_many = truncate_before = _refuse
