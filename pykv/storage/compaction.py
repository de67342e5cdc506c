"""Compaction policy: which oldest WAL segments to rewrite, and the report of one compaction.

The WAL is the value log, so compaction works like a log-structured cleaner (WiscKey's vLog
garbage collection): it takes a PREFIX of the sealed segments (the oldest ones), copies their
still-live values to the head of the log, and then deletes the whole prefix. Keeping the WAL a
contiguous range of lsns means recovery never meets a hole, and tombstones never need copying:
a tombstone only hides older versions, and those sit in segments deleted before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CompactionStats:
    """What one compaction did."""

    segments: list[int] = field(default_factory=list)  # the segments rewritten and deleted
    keys_moved: int = 0  # live values copied to the head of the log
    bytes_moved: int = 0  # value bytes copied
    bytes_reclaimed: int = 0  # size of the deleted segment files
    aborted: bool = False  # stopped early (the store was closing); nothing was deleted


@dataclass(frozen=True)
class SegmentUsage:
    """Size of one WAL segment file and how many of its bytes are values still live."""

    segment_id: int
    total_bytes: int
    live_bytes: int

    @property
    def dead_bytes(self) -> int:
        return max(0, self.total_bytes - self.live_bytes)


def choose_prefix(sealed: list[SegmentUsage], *, min_dead_ratio: float, min_dead_bytes: int) -> int | None:
    """The last segment id of the longest prefix worth compacting, or None.

    A prefix is worth it when at least ``min_dead_ratio`` of its bytes are dead (so copying its
    live bytes writes at most (1 - r) / r bytes per byte reclaimed) and it frees at least
    ``min_dead_bytes``. ``sealed`` lists the sealed segments oldest first.
    """
    best = None
    dead = total = 0
    for usage in sealed:
        dead += usage.dead_bytes
        total += usage.total_bytes
        if total and dead >= min_dead_bytes and dead >= min_dead_ratio * total:
            best = usage.segment_id
    return best
