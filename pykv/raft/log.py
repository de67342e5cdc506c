"""The in-memory Raft log: a snapshot prefix, the entries after it, and commit/apply/stable marks."""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable

from pykv.raft.errors import RaftInvariantError
from pykv.raft.messages import Entry, EntryKind, Snapshot, SnapshotMeta

_KINDS = {int(kind): kind for kind in EntryKind}
_INDEX = operator.attrgetter("index")


def cut_from(entries: list[Entry], index: int) -> None:
    """Drop the entries at ``index`` and after from a persisted log (``entries`` ascend by
    index), as a new leader's entries replace a conflicting suffix. A batch that only
    appends costs one comparison: rebuilding the list for each of a node's WAL records had
    made its restart quadratic in the log (72 s for 240,000 entries)."""
    if entries and entries[-1].index >= index:
        del entries[bisect.bisect_left(entries, index, key=_INDEX):]


def cut_through(entries: list[Entry], index: int) -> None:
    """Drop the entries at ``index`` and before (``entries`` ascend by index)."""
    if entries and entries[0].index <= index:
        del entries[:bisect.bisect_right(entries, index, key=_INDEX)]


def _data_size(data: object) -> int:
    """Bytes an entry's data counts for when batching (its length, or 16 for other data)."""
    return len(data) if isinstance(data, (bytes, str)) else 16


class RaftLog:
    """Entries ``offset+1 .. last_index`` and the latest snapshot, which ends at ``offset`` or
    later: a leader compacting its log may keep some entries the snapshot covers, so that a
    follower a little behind catches up from them rather than from a whole snapshot.

    Marks, always ``offset <= applied <= applying <= committed <= last_index``:
    - ``committed``: known committed by a quorum;
    - ``applying``: handed to the driver in a Ready; ``applied``: the driver advanced past it;
    - ``stabled``: the driver has made entries up to here durable (entries after it are
      "unstable" and go into the next Ready).

    The entries are kept as rows ``(term, kind as an int, data)``. A node holds up to
    256,000 entries until a snapshot, and as objects the garbage collector traversed every
    one of them at each full collection (pauses of 125-158 ms); a tuple of ints and bytes is
    untracked once a collection has seen it. The entries not yet applied are also kept as
    the Entry objects appended (``_recent``, a suffix of the log): persisting, sending and
    applying them read those, and only an older entry (a lagging follower's) is rebuilt.
    """

    __slots__ = (
        "snapshot", "offset", "_offset_term", "_rows", "_recent", "committed", "applied",
        "applying", "stabled", "unstable_snapshot",
    )

    def __init__(self, snapshot: Snapshot | None = None, entries: Iterable[Entry] = ()) -> None:
        self.snapshot = snapshot if snapshot is not None else Snapshot()
        self.offset = self.snapshot.meta.index
        self._offset_term = self.snapshot.meta.term
        self._rows: list[tuple[int, int, object]] = []
        self._recent: list[Entry] = []  # the last len(_recent) entries, as appended
        expect = self.offset + 1
        for e in entries:
            if e.index <= self.offset:
                continue  # the snapshot already covers it
            if e.index != expect:
                raise RaftInvariantError(f"log has a gap: expected index {expect}, got {e.index}")
            self._rows.append((e.term, int(e.kind), e.data))
            expect += 1
        self.committed = self.offset
        self.applied = self.offset
        self.applying = self.offset
        self.stabled = self.last_index()
        self.unstable_snapshot: Snapshot | None = None

    # --- reading -----------------------------------------------------------------------
    def first_index(self) -> int:
        return self.offset + 1

    def last_index(self) -> int:
        return self.offset + len(self._rows)

    def term(self, index: int) -> int | None:
        """The term of the entry at ``index``; None when compacted away or not present."""
        if index == self.offset:
            return self._offset_term
        if index < self.offset or index > self.offset + len(self._rows):
            return None
        return self._rows[index - self.offset - 1][0]

    def last_term(self) -> int:
        t = self.term(self.last_index())
        return 0 if t is None else t

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def entry(self, index: int) -> Entry | None:
        if index <= self.offset or index > self.last_index():
            return None
        return self._entries(index, index + 1)[0]

    def entries_from(self, index: int) -> list[Entry]:
        """Entries ``index ..`` the last (none below the first index)."""
        return self._entries(max(index, self.first_index()), self.last_index() + 1)

    def slice(self, lo: int, hi: int, max_entries: int = 1 << 30, max_bytes: int = 1 << 62) -> list[Entry]:
        """Entries ``lo .. hi-1`` (at least one if any, then within the limits)."""
        if lo <= self.offset:
            raise RaftInvariantError(f"slice from {lo} reaches into the snapshot at {self.offset}")
        hi = min(hi, self.last_index() + 1, lo + max_entries)
        if lo >= hi:
            return []
        if max_bytes < (1 << 62):
            size = 0
            for n, (_, _, data) in enumerate(self._rows[lo - self.offset - 1 : hi - self.offset - 1]):
                size += _data_size(data)
                if size > max_bytes and n > 0:
                    hi = lo + n
                    break
        return self._entries(lo, hi)

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Whether a candidate whose log ends at (last_index, last_term) is at least as new (§5.4.1)."""
        mine = self.last_term()
        return last_term > mine or (last_term == mine and last_index >= self.last_index())

    def find_conflict(self, entries: Iterable[Entry]) -> int:
        """Index of the first entry that is new or disagrees with ours (0: all already present)."""
        for e in entries:
            if self.term(e.index) != e.term:
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """The largest i <= index whose term is <= term (or that we cannot see): a safe back-off."""
        index = min(index, self.last_index())
        while index > self.offset:
            t = self.term(index)
            if t is not None and t <= term:
                return index
            index -= 1
        return index

    def unstable_entries(self) -> list[Entry]:
        if self.stabled >= self.last_index():
            return []
        return self._entries(self.stabled + 1, self.last_index() + 1)

    def next_committed(self, limit: int = 1 << 30) -> list[Entry]:
        """Committed entries not yet handed to the driver."""
        lo = max(self.applying + 1, self.first_index())
        if lo > self.committed:
            return []
        return self._entries(lo, min(self.committed, lo + limit - 1) + 1)

    def _entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries ``lo .. hi-1``, all of them in the log."""
        recent_from = self.last_index() - len(self._recent) + 1
        if lo >= recent_from:
            return self._recent[lo - recent_from : hi - recent_from]
        kinds = _KINDS
        built = [
            Entry(term, index, kinds[kind], data)
            for index, (term, kind, data) in enumerate(
                self._rows[lo - self.offset - 1 : min(hi, recent_from) - self.offset - 1], lo
            )
        ]
        return built + self._recent[: hi - recent_from] if hi > recent_from else built

    def conf_changes_from(self, index: int) -> list[Entry]:
        """The CONF_CHANGE entries from ``index`` on."""
        conf = int(EntryKind.CONF_CHANGE)
        lo = max(index, self.first_index())
        return [
            Entry(term, i, EntryKind.CONF_CHANGE, data)
            for i, (term, kind, data) in enumerate(self._rows[lo - self.offset - 1 :], lo)
            if kind == conf
        ]

    # --- changing ----------------------------------------------------------------------
    def append(self, entries: list[Entry]) -> None:
        """Append entries, truncating ours from the first one's index (never below commit)."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.committed:
            raise RaftInvariantError(
                f"refusing to overwrite committed entry {first} (committed {self.committed})"
            )
        if first > self.last_index() + 1:
            raise RaftInvariantError(f"append at {first} leaves a gap after {self.last_index()}")
        recent_from = self.last_index() - len(self._recent) + 1
        del self._rows[first - self.offset - 1 :]
        # int(kind): an IntEnum member is a tracked object, which would keep the row tracked.
        self._rows.extend([(e.term, int(e.kind), e.data) for e in entries])
        if first < recent_from:
            self._recent = list(entries)
        else:
            del self._recent[first - recent_from :]
            self._recent.extend(entries)
        if first <= self.stabled:
            self.stabled = first - 1

    def maybe_append(
        self, index: int, log_term: int, commit: int, entries: tuple[Entry, ...]
    ) -> tuple[int, int] | None:
        """AppendEntries receiver rules 2-5 (§5.3).

        Returns (new last index, first index written or 0), or None when the log does not
        hold (index, log_term) and the leader must back off.
        """
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            self.append(list(entries[conflict - index - 1 :]))
        self.commit_to(min(commit, last_new))
        return last_new, conflict

    def applied_to(self, index: int) -> None:
        """The driver applied entries up to ``index`` (or a snapshot that ends there)."""
        if index <= self.applied:
            return
        self.applied = index
        # Applied entries are read again only for a lagging follower's appends: rows will do.
        applied_recent = index - (self.last_index() - len(self._recent))
        if applied_recent > 0:
            del self._recent[:applied_recent]

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise RaftInvariantError(f"commit {index} beyond last index {self.last_index()}")
            self.committed = index

    def stable_to(self, entries: tuple[Entry, ...]) -> None:
        """The driver made ``entries`` durable: move ``stabled`` over those still in the log."""
        for e in reversed(entries):
            if self.term(e.index) == e.term:
                if e.index > self.stabled:
                    self.stabled = e.index
                return

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole log by a snapshot received from the leader."""
        self.snapshot = snapshot
        self.offset = snapshot.meta.index
        self._offset_term = snapshot.meta.term
        self._rows = []
        self._recent = []
        self.committed = self.offset
        self.applying = self.offset
        self.stabled = self.offset
        self.unstable_snapshot = snapshot

    def compact(self, meta: SnapshotMeta, data: object, keep_after: int | None = None) -> None:
        """Take the snapshot the driver has made at ``meta.index``, and drop the entries up to
        ``keep_after`` (by default up to the snapshot; never entries already dropped)."""
        index = meta.index
        if index <= self.snapshot.meta.index:
            return
        if index > self.applied:
            raise RaftInvariantError(f"cannot compact to {index}: only {self.applied} applied")
        cut = index if keep_after is None else min(index, keep_after)
        if cut > self.offset:
            term = self.term(cut)
            if term is None:  # offset < cut <= index <= applied <= last_index: never
                raise RaftInvariantError(f"cannot compact to {cut}: not in the log")
            del self._rows[: cut - self.offset]
            del self._recent[: max(0, len(self._recent) - len(self._rows))]
            self.offset, self._offset_term = cut, term
        self.snapshot = Snapshot(meta, data)
