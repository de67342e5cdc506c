"""The in-memory Raft log: a snapshot prefix, the entries after it, and commit/apply/stable marks."""

from __future__ import annotations

from collections.abc import Iterable

from pykv.raft.errors import RaftInvariantError
from pykv.raft.messages import Entry, Snapshot, SnapshotMeta


def entry_size(entry: Entry) -> int:
    """Bytes an entry counts for when batching (the payload length, or 1 for tiny payloads)."""
    data = entry.data
    return len(data) if isinstance(data, (bytes, str)) else 16


class RaftLog:
    """Entries ``offset+1 .. last_index`` after a snapshot that ends at ``offset``.

    Marks, always ``offset <= applied <= applying <= committed <= last_index``:
    - ``committed``: known committed by a quorum;
    - ``applying``: handed to the driver in a Ready; ``applied``: the driver advanced past it;
    - ``stabled``: the driver has made entries up to here durable (entries after it are
      "unstable" and go into the next Ready).
    """

    __slots__ = (
        "snapshot", "offset", "entries", "committed", "applied", "applying", "stabled",
        "unstable_snapshot",
    )

    def __init__(self, snapshot: Snapshot | None = None, entries: Iterable[Entry] = ()) -> None:
        self.snapshot = snapshot if snapshot is not None else Snapshot()
        self.offset = self.snapshot.meta.index
        self.entries: list[Entry] = []
        expect = self.offset + 1
        for e in entries:
            if e.index <= self.offset:
                continue  # the snapshot already covers it
            if e.index != expect:
                raise RaftInvariantError(f"log has a gap: expected index {expect}, got {e.index}")
            self.entries.append(e)
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
        return self.offset + len(self.entries)

    def term(self, index: int) -> int | None:
        """The term of the entry at ``index``; None when compacted away or not present."""
        if index == self.offset:
            return self.snapshot.meta.term
        if index < self.offset or index > self.offset + len(self.entries):
            return None
        return self.entries[index - self.offset - 1].term

    def last_term(self) -> int:
        t = self.term(self.last_index())
        return 0 if t is None else t

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def entry(self, index: int) -> Entry | None:
        if index <= self.offset or index > self.last_index():
            return None
        return self.entries[index - self.offset - 1]

    def slice(self, lo: int, hi: int, max_entries: int = 1 << 30, max_bytes: int = 1 << 62) -> list[Entry]:
        """Entries ``lo .. hi-1`` (at least one if any, then within the limits)."""
        if lo <= self.offset:
            raise RaftInvariantError(f"slice from {lo} reaches into the snapshot at {self.offset}")
        hi = min(hi, self.last_index() + 1)
        if lo >= hi:
            return []
        out = self.entries[lo - self.offset - 1 : hi - self.offset - 1]
        if len(out) > max_entries:
            out = out[:max_entries]
        if max_bytes < (1 << 62):
            size = 0
            for n, e in enumerate(out):
                size += entry_size(e)
                if size > max_bytes and n > 0:
                    return out[:n]
        return out

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
        return self.entries[self.stabled - self.offset :]

    def next_committed(self, limit: int = 1 << 30) -> list[Entry]:
        """Committed entries not yet handed to the driver."""
        lo = max(self.applying + 1, self.first_index())
        if lo > self.committed:
            return []
        return self.entries[lo - self.offset - 1 : min(self.committed, lo + limit - 1) - self.offset]

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
        del self.entries[first - self.offset - 1 :]
        self.entries.extend(entries)
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
        self.entries = []
        self.committed = self.offset
        self.applying = self.offset
        self.stabled = self.offset
        self.unstable_snapshot = snapshot

    def compact(self, meta: SnapshotMeta, data: object) -> None:
        """Drop entries up to ``meta.index`` behind a snapshot the driver has taken."""
        index = meta.index
        if index <= self.offset:
            return
        if index > self.applied:
            raise RaftInvariantError(f"cannot compact to {index}: only {self.applied} applied")
        del self.entries[: index - self.offset]
        self.offset = index
        self.snapshot = Snapshot(meta, data)
