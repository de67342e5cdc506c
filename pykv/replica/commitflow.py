"""How a client commits a transaction with the shard commands, as rounds of requests (sans-I/O).

The network client (pykv.client.cluster) and the transaction simulator (pykv.sim.txnworld)
run the same steps: ``commit_rounds`` yields each ``Round`` of requests to send, takes back
their results, and decides what comes next, so the simulator proves the client's own
protocol rather than a copy of it.

- Every key of the transaction (read or written) belongs to a shard. Keys in one shard: ONE
  COMMIT there, validated when every replica applies it.
- Otherwise two-phase commit over the shards' Raft groups: PREPARE each other shard's part
  (validated and locked, replicated), then, if every vote is yes, COMMIT_DECIDE on the
  coordinator shard (its own part and the decision record in one proposal); the coordinator
  shard's leader then sends FINISH to the others. A refused prepare aborts: FINISH(abort)
  goes to the others, nobody waiting for it (a participant that never hears it asks the
  coordinator shard, which then records abort).

A consistent scan runs here too (``scan_rounds``): passes over every shard until two agree,
and, when the range keeps changing or is large, exports of the range begun at one moment
under a lock on it (a PREPARE that holds the range against writers while they begin).
``stream_scan_rounds`` hands what it holds to the caller past a budget, with the exports
left to read as the caller iterates (``Scanned.rest``).

A COMMIT or PREPARE refused because a key is locked (KeyLocked: a prepared transaction not
finished yet, typically one whose FINISH is a few milliseconds away) changed nothing on its
shard, so the same request goes again after a pause (LOCK_PAUSES) before the commit gives
up: a client that commits transactions on the same keys one after another does not see a
conflict that only the previous one's FINISH in flight caused. A COMMIT_DECIDE still
locked after the pauses is given up with DECIDE(abort), so that the prepared parts do not
wait for their recovery.
"""

from __future__ import annotations

import bisect
import operator
import sys
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from pykv.errors import KeyLocked, ScanTooLarge, Timeout, TransactionConflict, Unavailable, by_name
from pykv.replica.shard import ALREADY_COMMITTED, COMMIT, COMMIT_DECIDE, DECIDE, FINISH, PREPARE
from pykv.txn.model import (
    MISSING,
    PASSES_BEFORE_LOCKING,
    SCAN_PAGE_BYTES,
    CommitRequest,
    HeldPass,
    KeyRange,
    ScanItems,
    ScanPasses,
    Versioned,
    same_cut,
)
from pykv.types import MAX_SCAN_BYTES, MAX_VALUE_BYTES

T = TypeVar("T")

# Seconds to wait before sending a request refused on a lock again, one pause per retry.
LOCK_PAUSES = (0.002, 0.005, 0.01, 0.02, 0.04)
# A Send's command for a page of a pass over one shard: args [prefix, start, end, limit,
# deleted, page bytes] (PagedPass).
SCAN = "scan"
# A Send's command for a linearizable read of some keys of one shard: args [keys]; the
# reply is their versions (Versioned.to_wire), in order, as the node's READ answers.
READ = "read"
# A Send's command about an export of one shard: args [export id, "begin", prefix, start,
# end] (the reply is [node id, [], True, the shard's resolvers]: that node holds the export,
# read later: see export_rounds), [export id, "next", page number] ([node id, page, more?]; the last page
# again when asked again) or [export id, "end"], the last two sent to the node that holds it
# (Send.node).
EXPORT = "export"
# Times a request about an export is sent to the node that holds it before the export counts
# as lost (a page asked again is answered again).
EXPORT_CALL_ATTEMPTS = 3
# Backups begun again after their exports were lost (a node restarted, an idle export
# dropped) or a shard had no leader to begin one (the errors that says), and the seconds
# between two attempts (pykv.client.cluster.copy_cluster; the simulator's backups too).
BACKUP_ATTEMPTS = 3
BACKUP_PAUSE = 1.0
BACKUP_RETRIED = (TransactionConflict, Timeout, Unavailable)
# A consistent scan whose pass disagreed with the one before and held more than this reads
# the range from exports at once, rather than in another pass.
EXPORT_PAST_BYTES = 1 << 20
# Seconds the lock round and the export round of a backup or a busy scan may take each:
# writers into the range wait meanwhile, so a shard without a leader fails the read (taken
# again) rather than holding them for the client's whole timeout.
EXPORT_BEGIN_TIMEOUT = 1.0
# Keys per READ request of a snapshot: replies of values at the size limit still fit in a
# frame (pykv.net.framing.DEFAULT_MAX_FRAME, the client's).
READ_BATCH_KEYS = (16 << 20) // (MAX_VALUE_BYTES + 4096)
# Seconds between two renewals of a consistent scan's range lock while its pass runs: well
# within a node's recovery_after (2 s), which would otherwise release the lock.
LOCK_RENEW_EVERY = 0.5


@dataclass(slots=True)
class Send:
    """One request: a shard command (its tag in pykv.replica.shard) and its arguments."""

    shard: int
    command: str
    args: list
    node: int | None = None  # the node to ask (an export's holder); None: the shard's leader


@dataclass(slots=True)
class Round:
    """Requests to send at once. ``wait``: their results come back to the flow (in order:
    each the request's result, or the exception it raised); else nobody waits for them."""

    # "commit", "prepare", "decide", "give up", "abort"; "scan", "lock", "release"; "read",
    # "lock keys"; "lock all", "export", "export pages", "end exports"
    name: str
    sends: list[Send] = field(default_factory=list)
    wait: bool = True
    pause: float = 0.0  # seconds to wait before sending (a retry after KeyLocked)
    # Sent again every ``keep_every`` seconds while the results are awaited, answers unused
    # (a consistent scan renewing its range lock; its release tells whether it held).
    keep: list[Send] = field(default_factory=list)
    keep_every: float = 0.0
    # Seconds each request may take, retries included (None: the client's timeout): a round
    # sent while others wait behind a lock gives up sooner.
    timeout: float | None = None


CommitFlow = Generator[Round, "list[Any] | None", None]


@dataclass(slots=True)
class Scanned:
    """What a streamed consistent scan read before it returned (stream_scan_rounds): the
    items, then, when the range passed the budget, the exports still to read (``rest``: feed
    its rounds until done; every item it gives follows ``items`` in key order), else None."""

    items: ScanItems
    rest: ExportPass | None = None


def placement(request: CommitRequest, shard_of: Callable[[str], int]) -> dict[int, set[str]]:
    """The shards a transaction touches, each with its keys (read or written)."""
    reads = request.reads
    by_shard: dict[int, set[str]] = {}
    for key in reads:
        by_shard.setdefault(shard_of(key), set()).add(key)
    for op in request.writes:
        if op.key not in reads:  # a key read and written is placed already
            by_shard.setdefault(shard_of(op.key), set()).add(op.key)
    return by_shard


def commit_rounds(request: CommitRequest, shard_of: Callable[[str], int]) -> CommitFlow:
    """The rounds that commit ``request``. Returns once it committed; raises its refusal
    (TransactionConflict and the like: it did not commit) or Timeout/Unavailable from the
    last round (it may have: the participants settle it with the coordinator shard)."""
    by_shard = placement(request, shard_of)
    if len(by_shard) == 1:
        (shard,) = by_shard
        (result,) = yield from _until_unlocked("commit", [Send(shard, COMMIT, [request.to_wire()])])
        _raise_if_error(result)
        return
    shards = sorted(by_shard)
    # Spread coordinator duty over the shards, deterministically per transaction.
    coordinator = shards[request.txid % len(shards)]
    others = [s for s in shards if s != coordinator]
    votes = yield from _until_unlocked("prepare", [
        Send(s, PREPARE, [request.to_wire(by_shard[s]), coordinator, shards]) for s in others
    ])
    refusal = _refusal(votes)
    if refusal is not None:
        yield Round("abort", [Send(s, FINISH, [request.txid, False]) for s in others], wait=False)
        if isinstance(refusal, (Timeout, Unavailable)):
            raise TransactionConflict(
                f"transaction {request.txid} aborted: a participant did not vote ({refusal})"
            ) from refusal
        raise refusal
    # The coordinator's own part and the decision record: one proposal, one round. Until
    # the others apply FINISH their prepared keys stay locked and reads of them wait, so
    # nobody sees half of the transaction.
    (result,) = yield from _until_unlocked("decide", [
        Send(coordinator, COMMIT_DECIDE, [request.to_wire(by_shard[coordinator]), others])
    ])
    if _locked(result):
        # Its own part is still locked, and nothing is recorded: record abort rather than
        # leave the others locked until their recovery does (an earlier copy of the
        # COMMIT_DECIDE may still have committed meanwhile: then that decision stands).
        (decision,) = yield Round("give up", [Send(coordinator, DECIDE, [request.txid, False, request.timestamp])])
        if decision is True:
            return
        if decision is not False:
            raise Timeout(f"transaction {request.txid}: its decision is unknown ({decision})")
        yield Round("abort", [Send(s, FINISH, [request.txid, False]) for s in others], wait=False)
    _raise_if_error(result)


class PagedPass:
    """One pass over a range on every shard, a page per shard per round (SCAN with page
    bytes), merged in key order as the pages come: ``sends`` the round to send, ``feed``
    its replies, ``ready`` the items that can be taken in order, until ``done``. Only a
    page per shard is held at a time, so a caller that consumes ``ready`` as it goes (a
    lazy scan) holds no more than that of a range of any size."""

    def __init__(
        self, key_range: KeyRange, shards: list[int], limit: int | None, deleted: bool = True,
        page_bytes: int = SCAN_PAGE_BYTES,
    ) -> None:
        self._range, self._limit, self._deleted, self._page_bytes = key_range, limit, deleted, page_bytes
        # Each shard's page in hand, and how much of it was handed out already.
        self._pages: dict[int, ScanItems] = {s: [] for s in shards}
        self._taken: dict[int, int] = {s: 0 for s in shards}
        self._resume: dict[int, str | None] = {s: key_range.start for s in shards}
        self._more = set(shards)  # shards with pages still to fetch
        self._live = 0  # live items handed out (towards the limit)
        self._asked: list[int] = []

    @property
    def done(self) -> bool:
        return self._limit_reached() or not (self._more or any(map(self._in_hand, self._pages)))

    def sends(self) -> list[Send]:
        """The next page of every shard that has more and nothing left in hand."""
        self._asked = [s for s in sorted(self._more) if not self._in_hand(s)]
        prefix, _, end = self._range
        limit = None if self._limit is None else self._limit - self._live
        return [
            Send(s, SCAN, [prefix, self._resume[s], end, limit, self._deleted, self._page_bytes])
            for s in self._asked
        ]

    def feed(self, replies: list[Any]) -> None:
        """The replies to ``sends()``, in order; raises the first error among them."""
        for shard, reply in zip(self._asked, replies, strict=True):
            _raise_if_error(reply)
            items, resume = reply
            self._resume[shard] = resume
            self._take_page(shard, items, resume is not None)

    def _take_page(self, shard: int, items: list, more: bool) -> None:
        self._pages[shard] = [(k, Versioned.from_wire(v)) for k, v in items]
        self._taken[shard] = 0
        if not more:
            self._more.discard(shard)

    def ready(self) -> ScanItems:
        """Items in key order up to where a shard must send its next page first: a shard
        with more pages sends only keys after the last of its page in hand, so every key
        up to the least such last key is known."""
        pages, taken = self._pages, self._taken
        if self._limit_reached() or not all(map(self._in_hand, self._more)):
            return []
        bound = min((pages[s][-1][0] for s in self._more), default=None)
        out: ScanItems = []
        for shard, page in pages.items():
            start = taken[shard]
            end = len(page) if bound is None else bisect.bisect_right(page, bound, start, key=_key)
            out += page[start:end]
            taken[shard] = end
        out.sort(key=_key)  # runs sorted per shard: a merge
        return self._counted(out)

    def _counted(self, items: ScanItems) -> ScanItems:
        """items up to the limit-th live one, counted towards the limit."""
        for index, item in enumerate(items):
            if item[1].value is not MISSING:
                self._live += 1
                if self._limit_reached():
                    return items[:index + 1]
        return items

    def _in_hand(self, shard: int) -> bool:
        return self._taken[shard] < len(self._pages[shard])

    def _limit_reached(self) -> bool:
        return self._limit is not None and self._live >= self._limit


_key = operator.itemgetter(0)


class ExportPass(PagedPass):
    """A pass over the exports of a range that a reader began (export_rounds), merged in
    key order as PagedPass merges pages (unless not ``ordered``): each shard's next page is
    asked of the node that holds its export, and holds live keys only."""

    def __init__(self, export_id: int, holders: dict[int, int], key_range: KeyRange, limit: int | None,
                 ordered: bool = True) -> None:
        super().__init__(key_range, sorted(holders), limit, deleted=False)
        self._export_id, self._holders = export_id, holders
        self._read = dict.fromkeys(holders, 0)  # pages read of each shard's export
        # Unordered (a backup): every page is taken as it comes, so that every round asks
        # each shard that has more, rather than only those whose pages the merge used up.
        self._ordered = ordered

    def ready(self) -> ScanItems:
        if self._ordered:
            return super().ready()
        out: ScanItems = []
        for shard, page in self._pages.items():
            out += page[self._taken[shard]:]
            self._taken[shard] = len(page)
        return self._counted(out)

    @property
    def shards_done(self) -> int:
        """Shards whose export was read to its end."""
        return len(self._holders) - len(self._more)

    def sends(self) -> list[Send]:
        self._asked = [s for s in sorted(self._more) if not self._in_hand(s)]
        return [Send(s, EXPORT, [self._export_id, "next", self._read[s]], self._holders[s]) for s in self._asked]

    def feed(self, replies: list[Any]) -> None:
        for shard, reply in zip(self._asked, replies, strict=True):
            _raise_if_error(reply)
            _, items, more = reply
            self._read[shard] += 1
            self._take_page(shard, items, more)

    def ends(self) -> list[Send]:
        """What drops the exports not read to their end (the limit came first, or an error)."""
        return [Send(s, EXPORT, [self._export_id, "end"], self._holders[s]) for s in sorted(self._more)]


def read_pass(
    key_range: KeyRange, shards: list[int], limit: int | None, page_bytes: int = SCAN_PAGE_BYTES,
    deleted: bool = True, max_bytes: int = MAX_SCAN_BYTES,
) -> Generator[Round, Any, ScanItems]:
    """The rounds of one pass (PagedPass): every item at once, tombstones too unless not
    ``deleted``. Raises the first error among a round's replies, and ScanTooLarge once the
    items pass ``max_bytes``."""
    return (yield from _held_pass(key_range, shards, limit, page_bytes, deleted, max_bytes)).items


def _held_pass(
    key_range: KeyRange, shards: list[int], limit: int | None, page_bytes: int, deleted: bool, max_bytes: int,
) -> Generator[Round, Any, HeldPass]:
    """read_pass's rounds; the pass as held (its items, and their size)."""
    paged = PagedPass(key_range, shards, limit, deleted, page_bytes)
    held = HeldPass(key_range, max_bytes)
    while not paged.done:
        paged.feed((yield Round("scan", paged.sends())))
        held.take(paged.ready())
    return held


def scan_rounds(
    request: CommitRequest, shards: list[int], limit: int | None,
    passes_before_locking: int = PASSES_BEFORE_LOCKING, page_bytes: int = SCAN_PAGE_BYTES,
    renew_every: float = LOCK_RENEW_EVERY, max_bytes: int = MAX_SCAN_BYTES,
) -> Generator[Round, Any, ScanItems]:
    """The rounds of a consistent scan of ``request.ranges[0]`` over ``shards``; returns its
    live items (at most ``limit``): one snapshot of the range, taken inside the scan.

    Passes over every shard first (each a page per shard at a time: read_pass), until two
    in a row agree (ScanPasses; cheap while the range is quiet). When the range changed
    under each of ``passes_before_locking`` passes (writers keep writing there), or a pass
    held more than EXPORT_PAST_BYTES, it is read from exports instead (_export_scan):
    ``request`` (no keys, the range) is PREPAREd on every shard, each shard its own
    coordinator (so that recovery releases a lock whose client vanished), which refuses
    writes into the range (KeyLocked, which writers retry); each shard begins a
    copy-on-write view of the range once the writers prepared before are done; the lock is
    released with FINISH(abort), answered None by each shard that still held it (else
    TransactionConflict: scan again). The views are then read a page at a time while
    writers go on: the range as of the moment all were locked. Writers wait for the lock
    rounds only, not for the pages. Raises Timeout/Unavailable when a shard does not
    answer, TransactionConflict when an export is lost (its node restarted), and
    ScanTooLarge when a pass holds more than ``max_bytes``.
    """
    scanned = yield from _scan(request, shards, limit, passes_before_locking, page_bytes,
                               renew_every, max_bytes, stream=False)
    return scanned.items


def stream_scan_rounds(
    request: CommitRequest, shards: list[int], limit: int | None,
    passes_before_locking: int = PASSES_BEFORE_LOCKING, page_bytes: int = SCAN_PAGE_BYTES,
    renew_every: float = LOCK_RENEW_EVERY, max_bytes: int = MAX_SCAN_BYTES,
) -> Generator[Round, Any, Scanned]:
    """scan_rounds for a caller that iterates: instead of ScanTooLarge, a pass that would
    hold more than ``max_bytes`` goes to exports, and once the exports' pages held pass
    ``max_bytes`` the flow returns them with the exports still to read (Scanned.rest),
    which the caller reads a page per shard at a time (ExportPass, export_pages) and ends
    if it stops early. Until it returns, a lost export makes the flow fail (its caller
    scans again, nothing handed out yet); after, it fails the caller's reading."""
    return (yield from _scan(request, shards, limit, passes_before_locking, page_bytes,
                             renew_every, max_bytes, stream=True))


def _scan(
    request: CommitRequest, shards: list[int], limit: int | None, passes_before_locking: int,
    page_bytes: int, renew_every: float, max_bytes: int, stream: bool,
) -> Generator[Round, Any, Scanned]:
    key_range = request.ranges[0]
    passes = ScanPasses()
    for _ in range(passes_before_locking):
        try:
            held = yield from _held_pass(key_range, shards, limit, page_bytes, True, max_bytes)
        except ScanTooLarge:
            if not stream:
                raise
            break  # too large to hold: the exports stream it
        if passes.feed(held.items):
            return Scanned(passes.result)
        if held.bytes > EXPORT_PAST_BYTES:
            break  # another pass costs more than the export's lock rounds
    return (yield from _export_scan(request, shards, limit, renew_every, max_bytes, stream))


def _export_scan(
    request: CommitRequest, shards: list[int], limit: int | None, renew_every: float,
    max_bytes: int, stream: bool,
) -> Generator[Round, Any, Scanned]:
    """The live items of ``request.ranges[0]`` (at most ``limit``) as of one moment, read
    from exports of the range: the range locked on every shard only while they begin
    (export_rounds), then their pages (ExportPass). Exports not read to their end are
    dropped. TransactionConflict when an export is lost; past ``max_bytes`` held,
    ScanTooLarge, or with ``stream`` the exports left to read (Scanned.rest)."""
    key_range = request.ranges[0]
    begun = yield from export_rounds(request, shards, renew_every, "lock")
    paged = ExportPass(request.txid, holders(shards, begun), key_range, limit)
    # Streamed, the pages are held only until they pass max_bytes (then the caller reads on).
    held = HeldPass(key_range, sys.maxsize if stream else max_bytes)

    def take(ready: ScanItems) -> bool:
        held.take(ready)
        return stream and held.bytes > max_bytes

    full = yield from export_pages(paged, take)
    return Scanned(held.items, paged if full else None)


def holders(shards: list[int], begun: list) -> dict[int, int]:
    """Each shard's node that holds its export, from the replies to the begins (export_rounds)."""
    return {shard: reply[0] for shard, reply in zip(shards, begun, strict=True)}


def resolvers_of(begun: list) -> dict[str, str]:
    """The resolvers registered on the shards ({prefix: built-in name}) when their exports
    began, from the replies to the begins (a node of an older release sends none)."""
    names: dict[str, str] = {}
    for reply in begun:
        if len(reply) > 3 and isinstance(reply[3], dict):
            names.update({str(prefix): str(name) for prefix, name in reply[3].items()})
    return names


def export_pages(paged: ExportPass, take: Callable[[ScanItems], Any]) -> Generator[Round, Any, bool]:
    """The rounds that read ``paged`` to its end, ``take`` getting the items as they are
    ready; then (or on an error, raised after) the exports not read to their end (a limit,
    an error) are dropped. A ``take`` that returns True stops the reading before the end:
    the exports stay for the caller to read on (or end: ``paged.ends()``), and the flow
    returns True."""
    try:
        while not paged.done:
            paged.feed((yield Round("export pages", paged.sends())))
            if take(paged.ready()) is True and not paged.done:
                return True
    except Exception:
        yield Round("end exports", paged.ends(), wait=False)
        raise
    if paged.ends():
        yield Round("end exports", paged.ends(), wait=False)
    return False


def snapshot_rounds(
    request: CommitRequest, batches: list[tuple[int, list[str]]],
    passes_before_locking: int = PASSES_BEFORE_LOCKING, renew_every: float = LOCK_RENEW_EVERY,
) -> Generator[Round, Any, dict[str, Versioned]]:
    """The rounds of one snapshot of some keys (KeyValueStore.get_many): their versions, all
    current at one moment inside the flow. ``batches``: the keys, as (shard, keys) requests
    (read_batches); ``request``: the lock to take, no keys (its ranges are filled in here).

    What scan_rounds does for a range, for a set of keys. Passes of linearizable reads, every
    request of a pass at once, until two in a row agree: each key then held its version from
    its read in the first pass to its read in the second (versions never repeat), so every
    key held it at the moment between the passes. When writers keep changing the keys, each
    shard locks its keys (``request`` with a range per key, PREPAREd there) for one more
    pass, released as a scan's lock is (_locked_pass).
    """
    last: ScanItems | None = None
    for _ in range(passes_before_locking):
        items = yield from _read_keys(batches)
        if last is not None and same_cut(last, items):
            return dict(items)
        last = items
    by_shard: dict[int, list[str]] = {}
    for shard, keys in batches:
        by_shard.setdefault(shard, []).extend(keys)
    shards = sorted(by_shard)
    lock = [
        Send(s, PREPARE, [replace(request, ranges=tuple(map(point_range, by_shard[s]))).to_wire(), s, shards])
        for s in shards
    ]
    items = yield from _locked_pass(
        request.txid, lock, lambda keep: _read_keys(batches, keep, renew_every), "lock keys"
    )
    return dict(items)


def export_rounds(
    request: CommitRequest, shards: list[int], renew_every: float = LOCK_RENEW_EVERY, name: str = "lock all",
) -> Generator[Round, Any, list]:
    """The rounds that begin a reader's export of a range on every shard at one moment (the
    exports: pykv.replica.imaging). ``request``: the lock to take, on the range to export
    (``request.ranges[0]``; a backup's is every key); ``name``: the lock round's.

    The range is locked on every shard as a consistent scan locks it (PREPAREd, each shard
    its own coordinator), so writers are refused meanwhile (KeyLocked, which they retry);
    then every shard begins its export (EXPORT "begin", a linearizable read that waits for
    the transactions prepared before the lock to finish); then the lock is released
    (_locked_pass). Every export is then a view of the same moment. Writers wait only for
    this, not while the pages are read. Returns each shard's [node id, [], True, its
    resolvers] (the node that holds its export: holders; resolvers_of), in the order of ``shards``; TransactionConflict when a shard no
    longer held the lock when it was released, or did not lock or begin within
    EXPORT_BEGIN_TIMEOUT (begin again).
    """
    lock = [Send(s, PREPARE, [request.to_wire(), s, shards]) for s in shards]

    def begin(keep: list[Send]) -> Generator[Round, Any, list]:
        begins = [Send(s, EXPORT, [request.txid, "begin", *request.ranges[0]]) for s in shards]
        replies = yield Round("export", begins, keep=keep, keep_every=renew_every, timeout=EXPORT_BEGIN_TIMEOUT)
        for reply in replies:
            _raise_if_error(reply)
        return replies

    try:
        return (yield from _locked_pass(request.txid, lock, begin, name, EXPORT_BEGIN_TIMEOUT))
    except (Timeout, Unavailable) as exc:  # a shard without a leader for now: the reader retries
        raise TransactionConflict(f"read {request.txid}: a shard did not lock the range or begin its "
                                  f"export within {EXPORT_BEGIN_TIMEOUT:g} s ({exc}); read again") from exc


def read_batches(keys: list[str], shard_of: Callable[[str], int]) -> list[tuple[int, list[str]]]:
    """The READ requests that fetch ``keys``: (shard, keys), at most READ_BATCH_KEYS each, so
    that a reply fits in a frame whatever the values' sizes."""
    by_shard: dict[int, list[str]] = {}
    for key in keys:
        by_shard.setdefault(shard_of(key), []).append(key)
    return [
        (shard, shard_keys[i:i + READ_BATCH_KEYS])
        for shard, shard_keys in by_shard.items()
        for i in range(0, len(shard_keys), READ_BATCH_KEYS)
    ]


def point_range(key: str) -> KeyRange:
    """The range that holds ``key`` and no other key (a lock on one key, as a range)."""
    return KeyRange(key, None, key + "\x00")


def _read_keys(
    batches: list[tuple[int, list[str]]], keep: list[Send] | None = None, keep_every: float = 0.0,
) -> Generator[Round, Any, ScanItems]:
    """One pass: every batch's linearizable READ at once; the items in key order."""
    replies = yield Round(
        "read", [Send(shard, READ, [keys]) for shard, keys in batches], keep=keep or [], keep_every=keep_every
    )
    items: ScanItems = []
    for (_, keys), reply in zip(batches, replies, strict=True):
        _raise_if_error(reply)
        items += [(key, Versioned.from_wire(wire)) for key, wire in zip(keys, reply, strict=True)]
    items.sort(key=_key)
    return items


def _locked_pass(
    txid: int, lock: list[Send], read: Callable[[list[Send]], Generator[Round, Any, T]], name: str = "lock",
    timeout: float | None = None,
) -> Generator[Round, Any, T]:
    """A pass under a lock: PREPARE ``lock`` (one request per shard; the round's ``name``
    and ``timeout``),
    run ``read(lock)`` (a pass whose rounds send the lock again while they wait,
    Round.keep), then release the lock with FINISH(abort) on every shard. The pass's result
    once every shard answers that it still held the lock; else TransactionConflict (read
    again)."""
    refusal = _refusal((yield Round(name, lock, timeout=timeout)))
    result: T | None = None
    if refusal is None:
        # Every round renews the lock while it waits: a read may wait for a writer prepared
        # before the lock, which itself may wait for this lock a moment.
        try:
            result = yield from read(lock)
        except Exception as exc:  # noqa: BLE001 - a reply's error: release, then raise it
            refusal = exc
    release = [Send(send.shard, FINISH, [txid, False]) for send in lock]
    if refusal is not None:
        yield Round("release", release, wait=False)
        raise refusal
    released = yield Round("release", release)
    if any(r is not None for r in released):
        # Not released by us while held (recovery took the lock of a reader that ran too
        # long, or the answer was lost): writers may have changed the keys before the pass.
        raise TransactionConflict(f"read {txid}: a shard no longer held its lock; read again")
    return result  # type: ignore[return-value] - set whenever there was no refusal


def _until_unlocked(name: str, sends: list[Send]) -> Generator[Round, Any, list[Any]]:
    """Send a round; send again, after a pause, the requests refused on a lock while that
    is all that went wrong (LOCK_PAUSES). The results, in the order of ``sends``."""
    results: list[Any] = [None] * len(sends)
    waiting = list(range(len(sends)))
    for pause in (0.0, *LOCK_PAUSES):
        got = yield Round(name, [sends[i] for i in waiting], pause=pause)
        for i, result in zip(waiting, got, strict=True):
            results[i] = result
        waiting = [i for i in waiting if _locked(results[i])]
        if not waiting or any(_no(r) and not _locked(r) for r in results):
            break
    return results


def _locked(result: Any) -> bool:
    """A refusal on a lock: KeyLocked raised, or a vote naming it."""
    return isinstance(result, KeyLocked) or (isinstance(result, list) and result[0] == KeyLocked.__name__)


def _no(result: Any) -> bool:
    """A refusal of any kind (as opposed to None, a yes)."""
    return isinstance(result, BaseException) or (isinstance(result, list) and result[0] != ALREADY_COMMITTED)


def _refusal(votes: list[Any]) -> BaseException | None:
    """The first no among the votes (an exception, or a refusal [error name, message])."""
    for vote in votes:
        if isinstance(vote, BaseException):
            return vote
        if _no(vote):
            return by_name(vote[0], vote[1])
    return None


def _raise_if_error(result: Any) -> None:
    if isinstance(result, BaseException):
        raise result
