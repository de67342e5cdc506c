"""Exports: views of a shard's versions as they were at one moment (pykv.txn.views.Imaging,
also what Raft snapshot images are read through), read a page at a time over the network.

An export (``Exports``) is such a view of a key range that a client reads over the network
a page at a time (a cluster backup, or a consistent scan of a busy range: pykv.client.cluster,
pykv.replica.commitflow.export_rounds). It lives on the replica that began it, in
memory only: a restart, or a state replaced by a snapshot, ends it, and so does a client
that asks for no page for ``EXPORT_IDLE_S``. Its pages hold live keys only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pykv.errors import InvalidOperation, TransactionConflict
from pykv.txn.model import KeyRange, KeyUpdate, Versioned, item_bytes
from pykv.txn.views import Imaging, VersionSource

# An export nobody asked a page of for this long is dropped (its client is gone).
EXPORT_IDLE_S = 30.0
# Exports under way at once on one replica: each keeps aside what is written meanwhile, and
# every write pays for each (consistent scans of busy ranges and backups take them).
MAX_EXPORTS = 32
EXPORT_PAGE_ITEMS = 10_000
# Seconds a finished export keeps its last page, for a reader whose answer was lost.
FINISHED_KEEP_S = 5.0


@dataclass
class _Export:
    imaging: Imaging
    items: Iterator[tuple[str, Versioned]]
    page_bytes: int
    used: float  # when a page was last asked for
    served: int = 0  # pages served so far
    last: list | None = None  # the last page served, for a reader whose answer was lost

    @property
    def finished(self) -> bool:
        return self.last is not None and not self.last[1]

    def expired(self, now: float) -> bool:
        return now - self.used > (FINISHED_KEEP_S if self.finished else EXPORT_IDLE_S)


class Exports:
    """The exports under way on one replica, by id (the reader's: the txid of its lock).

    Pages are numbered, and the last one served is answered again when asked again (its
    answer was lost: the reader asks once more), so a reader may retry a page. A finished
    export keeps its last page for FINISHED_KEEP_S, and no versions."""

    def __init__(self, shard: int) -> None:
        self.shard = shard
        self._by_id: dict[int, _Export] = {}

    def __bool__(self) -> bool:
        return bool(self._by_id)

    @property
    def under_way(self) -> int:
        """Exports begun and not read to their end (those that keep versions aside)."""
        return sum(not e.finished for e in self._by_id.values())

    def keep(self, state: VersionSource, updates: list[KeyUpdate]) -> None:
        for export in self._by_id.values():
            if not export.finished:
                export.imaging.keep(state, updates)

    def begin(self, export_id: int, live: Callable[[], Iterator[tuple[str, Versioned]]],
              now: float, page_bytes: int, key_range: KeyRange) -> list:
        """Start export ``export_id`` of the versions of ``key_range`` as they are now
        (``live()`` walks them). Returns [no items, more]: the pages are read later, with
        ``page`` (a reader keeps writers out while its exports begin, and reading is what
        takes time)."""
        self._drop_idle(now)
        if export_id in self._by_id:
            raise InvalidOperation(f"shard {self.shard}: export {export_id} is under way already")
        if self.under_way >= MAX_EXPORTS:
            raise TransactionConflict(  # (the reader tries again: another ends soon)
                f"shard {self.shard}: {MAX_EXPORTS} exports (consistent scans, backups) are under "
                "way on this replica; read again"
            )
        imaging = Imaging(key_range)
        items = (item for item in imaging.walk(live()) if item[1].exists)
        self._by_id[export_id] = _Export(imaging, items, page_bytes, now)
        return [[], True]

    def page(self, export_id: int, now: float, number: int) -> list:
        """Page ``number`` (0, 1, ...) of the export: [[[key, version wire], ...] of about
        ``page_bytes``, whether more pages follow]. The last page served is answered again;
        any other but the next is refused."""
        export = self._by_id.get(export_id)
        if export is None or export.expired(now):
            self._by_id.pop(export_id, None)
            raise TransactionConflict(
                f"shard {self.shard}: export {export_id} is gone (no page asked for "
                f"{EXPORT_IDLE_S:g} s, {FINISHED_KEEP_S:g} s once read to its end, the replica "
                "restarted or its state was replaced); read again"
            )
        export.used = now
        if number == export.served - 1:
            return export.last  # type: ignore[return-value] - served - 1 >= 0: one was served
        if number != export.served or export.finished:
            raise TransactionConflict(f"shard {self.shard}: export {export_id} has served {export.served} "
                                      f"pages; page {number} cannot be next: read again")
        export.last = self._next_page(export)
        export.served += 1
        if export.finished:
            export.items, export.imaging = iter(()), Imaging()  # nothing more to keep aside
        return export.last

    @staticmethod
    def _next_page(export: _Export) -> list:
        page: list = []
        size = 0
        for item in export.items:
            page.append([item[0], item[1].to_wire()])
            size += item_bytes(item)
            if size >= export.page_bytes or len(page) == EXPORT_PAGE_ITEMS:
                return [page, True]
        return [page, False]

    def end(self, export_id: int) -> None:
        self._by_id.pop(export_id, None)

    def clear(self) -> None:
        """Drop every export: the state they view was replaced (a snapshot installed, a wipe)."""
        self._by_id.clear()

    def _drop_idle(self, now: float) -> None:
        for export_id, export in list(self._by_id.items()):
            if export.expired(now):
                del self._by_id[export_id]
