"""One shard's replicated state machine: committed versions, 2PC locks, decisions, dedup by txid.

Every replica of a shard applies the same commands in the same (Raft log) order, and
``apply`` is deterministic, so all replicas hold the same state and return the same result
for each command. Commands (``Command`` below, packed with msgpack into Raft entries):

- ``commit``: a single-shard transaction. Validated (pykv.txn.occ.validate) against the
  current state, applied atomically, or refused with the validation error.
- ``prepare``: this shard's part of a multi-shard transaction. Validated, then its keys are
  locked and its updates kept aside; the result is the vote (None = yes, else the error).
- ``decide``: the decision record of a multi-shard transaction, kept on its coordinator
  shard. The first decision recorded wins; later ones get the recorded one back. A
  participant whose prepared transaction waits too long proposes ``decide(abort)`` here,
  so a coordinator or client that crashed never leaves the transaction in doubt.
- ``commit_decide``: the coordinator shard's own part of a multi-shard transaction and
  its decision record in one proposal, sent once every other participant voted yes:
  validated and applied like ``commit``, recording decision commit when it passes and
  abort when it fails (but nothing when its part only found a key locked: the client
  sends it again, or records abort with ``decide``). If a decision is already recorded
  (a participant gave up waiting and recorded abort), that decision stands. This saves the separate prepare and decide
  rounds on the coordinator shard. A commit decision is kept (``Unfinished``) until
  ``release``, so a participant never finds its decision forgotten. It may carry txids
  to release too (saving a command of their own).
- ``finish``: apply (commit) or drop (abort) what ``prepare`` kept, and unlock.
- ``release``: the other participants all finished these commits (their coordinator's
  leader saw each FINISH applied): their decisions may now be forgotten in turn.
- ``resolver``: register (or, with no name, unregister) a built-in resolver for a key
  prefix, at the same log position on every replica.
- ``wipe``: forget every key, resolver and outcome (lets tests reuse one cluster).

Retries are safe: the outcome of every finished transaction id is remembered (the last
``remembered`` of them, ``REMEMBERED_TXIDS`` unless the node shares out its budget with
``remembered_per_shard``), so a retried commit or prepare returns the first outcome
instead of applying twice. Beyond that window a retry is refused, not applied: the newest
request timestamp among the forgotten txids is kept (``Remembered.watermark``), and an
unknown txid at or below it gets ``OutcomeUnknown``. A single-shard commit that touches a key locked by a prepared
transaction is refused with KeyLocked (a TransactionConflict; not remembered, so the same
command may be sent again), which keeps prepared transactions atomic without blocking the log.

Locks come in two modes. A key a transaction reads, or writes with a plain put/delete or
after observing it, is locked *exclusively*. A key it only changes by blind ``incr`` or
``append`` is locked *shared*: such operations commute (DESIGN §3), so any number of
transactions may hold a shared lock on a key at once, and a FINISH re-validates the
prepared request against the state at that point, folding the increments onto whatever
the others committed meanwhile. Exclusive locks exclude every other lock.

A prepared request may also hold key *ranges* (``CommitRequest.ranges``: a consistent
scan's lock, taken when the range kept changing under its passes). It locks no key; any
other transaction that would write a key in one is refused with KeyLocked until it is
finished (released: FINISH abort, which answers None only when the lock was still held and
recovery had not decided to release it). A scan of a range waits for the prepared
transactions holding keys in it, and only those.

Values live in memory (a sorted dict, for scans), and the shard is made durable by the
Raft log in the node's WAL plus snapshots of this state (``snapshot``/``restore``).
"""

from __future__ import annotations

import io
import itertools
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import msgpack
from sortedcontainers import SortedDict

from pykv import errors
from pykv._engine.vclock import BEFORE, EQUAL, compare_encoded
from pykv.codec import pack, unpack, unpack_stream
from pykv.errors import CorruptData, ProtocolError, TransactionConflict
from pykv.replica.imaging import Exports
from pykv.storage.walk import key_batches
from pykv.txn.model import (
    ABSENT,
    EVERY_KEY,
    CommitRequest,
    KeyRange,
    KeyUpdate,
    Versioned,
    first_live,
    scan_page,
)
from pykv.txn.occ import next_clock, validate
from pykv.txn.resolvers import ResolverRegistry
from pykv.txn.views import Imaging
from pykv.types import OpKind

REMEMBERED_TXIDS = 200_000  # per shard and table, unless the node says (remembered_per_shard)
# A node remembers at most this many txids per table over all the shards it may host (a
# remembered txid costs about 190 bytes once the table is full, Remembered): shared out by
# the partition count, so a node's memory does not grow with the number of partitions (at
# most about 190 MB for the two tables). At 16 partitions a shard keeps 31,250: over two minutes of transactions at the
# rates a 2-core machine reaches, and a retry comes within the client's timeout (10 s).
REMEMBERED_PER_NODE = 500_000
MIN_REMEMBERED = 10_000

# Snapshot images (snapshot_parts): the format, versions per run, the trailer's tag.
IMAGE_FORMAT = 2
IMAGE_RUN = 1_000
IMAGE_RUN_BYTES = 1 << 20
IMAGE_END = "end"
_WALK_BATCH = 1_000  # keys per step of a walk over the versions (_all_versions)

T = TypeVar("T")


def remembered_per_shard(partitions: int) -> int:
    """How many txids each shard remembers when the cluster has ``partitions`` shards. It must
    be the same on every replica of a shard (they forget alike): it depends on the cluster's
    partition count only, which never changes."""
    return max(MIN_REMEMBERED, REMEMBERED_PER_NODE // max(1, partitions))

# Command tags (the first element of a packed command).
COMMIT, PREPARE, DECIDE, FINISH, RESOLVER, NOOP = "c", "p", "d", "f", "r", "n"
WIPE = "w"
COMMIT_DECIDE = "x"
RELEASE = "l"  # [txids]: every other participant finished these commits (see Unfinished)
LOAD = "o"  # [key updates, coordinator]: versions a backup kept, stored as they are (_load)
ALREADY_COMMITTED = "Committed"  # a prepare's vote when a retry finds the txn committed

Outcome = list | None
"""None when a command succeeded; [error class name, message] when it was refused."""


def error_outcome(exc: BaseException) -> list:
    return [type(exc).__name__, str(exc)]


def recorded_decision(outcome: Outcome) -> bool | None:
    """What the outcome of a COMMIT_DECIDE recorded: True commit, False abort, or None
    nothing (its own part was refused on a key a prepared transaction holds: KeyLocked)."""
    if outcome is None:
        return True
    return None if outcome[0] == errors.KeyLocked.__name__ else False


def written_keys(request_wire: dict) -> tuple[str, ...]:
    """The keys a commit request's wire form (already validated) writes, each once: what
    the host marks as being written, so that optimistic reads of them wait."""
    return tuple(dict.fromkeys(op[0] for op in request_wire["writes"]))


def scan_reply(state: ShardState, args: list, max_bytes: int) -> list:
    """A SCAN's answer for args [prefix, start, end, limit, deleted, page bytes or None]
    (the node's and the simulator's): with page bytes, one page of at most that many and
    ``max_bytes`` bytes, [[[key, version wire], ...], the key the next page starts at or
    None]; without, every item at once (what clients from before pages expect)."""
    prefix, start, end, limit, deleted, page_bytes = args
    if page_bytes is None:
        return [[k, v.to_wire()] for k, v in state.scan(prefix, start, end, limit, deleted)]
    items, resume = state.scan_page(prefix, start, end, limit, deleted, min(page_bytes, max_bytes))
    return [[[k, v.to_wire()] for k, v in items], resume]


def encode_command(tag: str, proposal: Any, *args: Any) -> bytes:
    """Pack a command; ``proposal`` identifies the proposer's waiting request (or None)."""
    return pack([tag, proposal, *args])


def decode_command(data: bytes) -> list:
    cmd = unpack(data)
    if not isinstance(cmd, list) or len(cmd) < 2 or not isinstance(cmd[0], str):
        raise ProtocolError(f"malformed shard command {cmd!r:.80}")
    return cmd


@dataclass
class Prepared:
    """A transaction this shard voted yes for: its locked keys and the updates kept aside."""

    txid: int
    coordinator_shard: int
    participants: list[int]
    updates: list[KeyUpdate]
    keys: list[str]  # exclusively locked
    shared: list[str]  # locked in the commutative (shared) mode
    request: CommitRequest
    # Node-local (not replicated): when this replica applied the prepare, for recovery.
    since: float = field(default=0.0, compare=False)


@dataclass
class Unfinished:
    """A commit this shard recorded as coordinator that some participant may not have
    applied yet. Kept, never forgotten, until RELEASE says they all have: a participant
    still prepared must always find its decision (a forgotten commit would leave it locked
    for ever, or an abort guessed in its place would break atomicity)."""

    participants: list[int]  # the other participants' shards
    timestamp: int  # its request's, for the decisions' watermark once it is released
    # Node-local (not replicated): when this replica recorded it, for the coordinator's sweep.
    since: float = field(default=0.0, compare=False)


class ShardState:
    """The deterministic state of one shard, and the StateView that validation reads."""

    # Whether the state survives a restart by itself (pykv.replica.stored). Such a state is
    # its own snapshot: compaction makes it durable instead of writing an image of it.
    durable = False

    def __init__(
        self, shard: int, resolvers: ResolverRegistry | None = None, *,
        remembered: int | None = None,
    ) -> None:
        self.shard = shard
        # Txids remembered per table (outcomes, decisions): the oldest beyond it is forgotten.
        self.remembered = REMEMBERED_TXIDS if remembered is None else remembered
        self.versions: SortedDict = SortedDict()  # key -> Versioned
        self.resolvers = resolvers if resolvers is not None else ResolverRegistry()
        self.resolver_names: dict[str, str] = {}
        self.outcomes = Remembered(self.remembered)  # finished txid -> its outcome
        self.prepared: dict[int, Prepared] = {}
        self.locks: dict[str, int] = {}  # key -> txid of the prepared txn holding it exclusively
        self.shared: dict[str, set[int]] = {}  # key -> txids holding it in the commutative mode
        # txid -> the key ranges a prepared scan lock holds: no other transaction writes there.
        self.range_locks: dict[int, tuple[KeyRange, ...]] = {}
        self.decisions = Remembered(self.remembered)  # coordinator records: txid -> commit
        self.unfinished: dict[int, Unfinished] = {}  # commits not yet released (never forgotten)
        self.applied_index = 0
        self.clock = lambda: 0.0  # node-local time source for Prepared.since (set by the host)
        self._imaging: Imaging | None = None  # the image under way (snapshot_parts), if any
        self.exports = Exports(shard)  # views that backups and busy scans read a page at a time

    # --- StateView --------------------------------------------------------------------------

    def get(self, key: str) -> Versioned:
        return self.versions.get(key, ABSENT)

    def stamp_of(self, key: str) -> tuple[bytes, int]:
        version = self.versions.get(key, ABSENT)
        return version.clock, version.timestamp

    def locked(self, key: str) -> bool:
        """Whether a prepared transaction may still change the key (reads of it wait)."""
        return key in self.locks or key in self.shared

    def range_locked(self, key_range: KeyRange) -> bool:
        """Whether a prepared transaction may still change a key of the range (scans wait)."""
        return any(key_range.holds(k) for k in self.locks) or any(key_range.holds(k) for k in self.shared)

    # --- applying commands ------------------------------------------------------------------

    def apply(self, index: int, data: bytes) -> tuple[Any, Any]:
        """Apply the command at log ``index``; return (proposal id, result)."""
        self.applied_index = index
        cmd = decode_command(data)
        tag, proposal = cmd[0], cmd[1]
        if tag == COMMIT:
            return proposal, self._commit(CommitRequest.from_wire(cmd[2]))
        if tag == PREPARE:
            return proposal, self._prepare(CommitRequest.from_wire(cmd[2]), cmd[3], list(cmd[4]))
        if tag == DECIDE:  # [txid, commit, timestamp of its request (0: unknown)]
            return proposal, self._decide(cmd[2], bool(cmd[3]), cmd[4] if len(cmd) > 4 else 0)
        if tag == COMMIT_DECIDE:  # [request, the other participants, txids to release]
            if len(cmd) > 4:
                self._release(cmd[4])
            others = [int(s) for s in cmd[3]] if len(cmd) > 3 else []  # older logs: none
            return proposal, self._commit_decide(CommitRequest.from_wire(cmd[2]), others)
        if tag == FINISH:
            return proposal, self._finish(cmd[2], bool(cmd[3]))
        if tag == RELEASE:
            return proposal, self._release(cmd[2])
        if tag == RESOLVER:
            return proposal, self._register(cmd[2], cmd[3])
        if tag == WIPE:
            return proposal, self._wipe()
        if tag == LOAD:
            return proposal, self._load([KeyUpdate.from_wire(u) for u in cmd[2]], int(cmd[3]))
        if tag == NOOP:
            return proposal, None
        raise ProtocolError(f"unknown shard command {tag!r}")

    # --- lifetime (a durable subclass keeps files) ---------------------------------------------

    def make_durable(self) -> None:
        """Make the applied state durable (before the Raft log under it is compacted)."""

    def set_leading(self, leading: bool) -> None:
        """This replica now leads its group (it serves the reads), or no longer does."""

    def flush(self) -> None:
        """The commands applied so far are all written (a durable subclass batches them)."""

    def batch_applied(self) -> None:
        """A batch of log entries was applied: a durable subclass may write them now or
        keep them for a later flush() (the Raft log holds them either way)."""

    def close(self) -> None:
        """Release files (the node stops)."""

    def destroy(self) -> None:
        """Release and delete files (the node left the group)."""

    # --- hooks a durable subclass (pykv.replica.stored) journals ------------------------------

    def _journal(self, kind: str, key: Any, value: Any) -> None:
        """A change of replicated metadata (outcome, decision, prepared txn, resolver)."""

    def key_count(self) -> int:
        return len(self.versions)

    def _all_versions(self, key_range: KeyRange | None = None) -> Iterator[tuple[str, Versioned]]:
        """Every stored version (of ``key_range``, None: all) in key order, a batch of keys
        at a time, so that writes may come between two steps (an image or an export made
        between other work: snapshot_parts, begin_export)."""
        versions = self.versions
        prefix, start, end = key_range or EVERY_KEY

        def take(low: str, inclusive: bool) -> list[str]:
            return list(itertools.islice(versions.irange(low, end, inclusive=(inclusive, False)), _WALK_BATCH))

        for key in key_batches(take, prefix, start):
            version = versions.get(key)
            if version is not None:
                yield key, version

    def _replace_versions(self, items: Iterator[tuple[str, Versioned]]) -> None:
        self._drop_views()
        self.versions = SortedDict(items)

    def _drop_views(self) -> None:
        """The images and exports under way were of the state being replaced."""
        self._imaging = None
        self.exports.clear()

    def begin_export(self, export_id: int, page_bytes: int, key_range: KeyRange = EVERY_KEY) -> list:
        """Start an export (pykv.replica.imaging.Exports) of the live versions of
        ``key_range`` as they are now: [[], True] (its pages come with export_page)."""
        return self.exports.begin(
            export_id, lambda: self._all_versions(key_range), self.clock(), page_bytes, key_range
        )

    def export_page(self, export_id: int, number: int) -> list:
        return self.exports.page(export_id, self.clock(), number)

    def _remember(self, txid: int, outcome: Outcome, timestamp: int) -> Outcome:
        """Record a transaction's outcome; the first one recorded stands (a retry gets it).
        ``timestamp``: its request's, for the watermark once it is forgotten."""
        if txid in self.outcomes:
            return self.outcomes[txid]
        forgotten = self.outcomes.add(txid, outcome, timestamp)
        self._journal("o", txid, (outcome, timestamp))
        if forgotten is not None:
            self._journal("o", forgotten, _FORGET)
        return outcome

    def _store(self, updates: list[KeyUpdate]) -> None:
        if self._imaging is not None:
            self._imaging.keep(self, updates)
        if self.exports:
            self.exports.keep(self, updates)
        self._write(updates)

    def _write(self, updates: list[KeyUpdate]) -> None:
        for u in updates:
            self.versions[u.key] = Versioned(u.value, u.clock, u.timestamp)

    def _lock_modes(self, request: CommitRequest) -> tuple[list[str], list[str]]:
        """(exclusive keys, shared keys) of a request: blind incr-only keys are shared.

        Only incr commutes invisibly: two appends to the same lists prepared at once could
        land in opposite orders on two shards, a write cycle (G0) that the list order shows,
        so appends lock exclusively like any other write."""
        writes = request.writes
        if not any(op.kind is OpKind.INCR for op in writes):  # the common case: no incr
            return list(dict.fromkeys([*request.reads, *(op.key for op in writes)])), []
        commutative: dict[str, bool] = {}
        for op in writes:
            ok = op.observed is None and op.kind is OpKind.INCR
            commutative[op.key] = commutative.get(op.key, True) and ok
        shared = [k for k, ok in commutative.items() if ok and k not in request.reads]
        exclusive = list(dict.fromkeys(
            [*request.reads, *(k for k in commutative if k not in shared)]
        ))
        return exclusive, shared

    def _locked_keys(self, txid: int, exclusive: list[str], shared: list[str]) -> list[str]:
        """The keys that a prepared transaction (other than txid) holds in a conflicting mode."""
        locks, holders = self.locks, self.shared
        if not locks and not holders:
            return []
        busy = [
            k for k in exclusive
            if locks.get(k, txid) != txid or (k in holders and holders[k] - {txid})
        ]
        busy += [k for k in shared if locks.get(k, txid) != txid]
        return busy

    def _in_locked_ranges(self, txid: int, written: Iterable[str]) -> list[str]:
        """The written keys in a range another transaction's scan holds."""
        held = [r for holder, ranges in self.range_locks.items() if holder != txid for r in ranges]
        return [key for key in written if any(r.holds(key) for r in held)]

    def _lock_refusal(
        self, txid: int, modes: tuple[list[str], list[str]], written: Iterable[str]
    ) -> Outcome:
        """KeyLocked (an outcome) when a prepared transaction other than txid holds one of
        the keys in a conflicting mode (``modes``: exclusive keys, shared keys), or a scan
        holds a range one of the ``written`` keys is in; else None."""
        busy = self._locked_keys(txid, *modes)
        if busy:
            return error_outcome(errors.KeyLocked(f"key {busy[0]!r} is locked by a prepared transaction"))
        scanned = self._in_locked_ranges(txid, written) if self.range_locks else None
        if scanned:
            return error_outcome(errors.KeyLocked(f"key {scanned[0]!r} is in a range a consistent scan holds"))
        return None

    def _validated(
        self, request: CommitRequest, modes: tuple[list[str], list[str]]
    ) -> tuple[list[KeyUpdate] | None, Outcome]:
        """(updates, None) when the request may go ahead here, else (None, its outcome).

        ``modes`` are its lock modes (_lock_modes). A key locked by a prepared transaction is
        a conflict that is not remembered (the same txid may retry once the lock is gone); a
        failed validation is remembered: it finishes the transaction here, so a later commit
        or prepare of it must not succeed.
        """
        refused = self._lock_refusal(request.txid, modes, (op.key for op in request.writes))
        if refused is not None:
            return None, refused
        try:
            return validate(request, self, self.resolvers), None
        except errors.Error as exc:
            return None, self._remember(request.txid, error_outcome(exc), request.timestamp)

    def _commit(self, request: CommitRequest) -> Outcome:
        if request.txid in self.outcomes:
            return self.outcomes[request.txid]  # a retry: the first outcome stands
        if self.outcomes.forgot(request.timestamp):
            return _forgotten_outcome(request.txid)
        updates, refused = self._validated(request, self._lock_modes(request))
        if updates is None:
            return refused
        self._store(updates)
        return self._remember(request.txid, None, request.timestamp)

    def _prepare(self, request: CommitRequest, coordinator_shard: int, participants: list[int]) -> Outcome:
        txid = request.txid
        if txid in self.prepared:
            # A retried prepare, or a consistent scan renewing its range lock: already voted
            # yes, and its recovery waits from now again (commitflow.scan_rounds).
            self.prepared[txid].since = self.clock()
            return None
        if txid in self.outcomes:
            outcome = self.outcomes[txid]
            if outcome is None:
                return [ALREADY_COMMITTED, f"transaction {txid} already committed"]
            return outcome
        if self.outcomes.forgot(request.timestamp):
            return _forgotten_outcome(txid)  # a no vote: it may have finished here long ago
        modes = self._lock_modes(request)
        updates, refused = self._validated(request, modes)
        if updates is None:
            return refused  # a no vote
        self._lock(Prepared(txid, coordinator_shard, participants, updates, *modes,
                            request, since=self.clock()))
        return None

    def _lock(self, prepared: Prepared) -> None:
        self.prepared[prepared.txid] = prepared
        self._journal("p", prepared.txid, prepared)
        for key in prepared.keys:
            self.locks[key] = prepared.txid
        for key in prepared.shared:
            self.shared.setdefault(key, set()).add(prepared.txid)
        if prepared.request.ranges:
            self.range_locks[prepared.txid] = prepared.request.ranges

    def _unlock(self, prepared: Prepared) -> None:
        self._journal("p", prepared.txid, _FORGET)
        self.range_locks.pop(prepared.txid, None)
        for key in prepared.keys:
            if self.locks.get(key) == prepared.txid:
                del self.locks[key]
        for key in prepared.shared:
            holders = self.shared.get(key)
            if holders is not None:
                holders.discard(prepared.txid)
                if not holders:
                    del self.shared[key]

    def decision(self, txid: int) -> bool | None:
        """The decision recorded for txid as coordinator: True commit, False abort, None none."""
        if txid in self.unfinished:
            return True
        return self.decisions.get(txid)

    def _decide(self, txid: int, commit: bool, timestamp: int) -> bool:
        """Record ``commit`` unless a decision is recorded already; the one that stands.

        A participant asks this (with abort) when its coordinator went quiet. Nothing
        recorded means the transaction never committed, however old it is: a commit is
        kept (Unfinished) until every participant has applied it, and the asker has not.
        """
        recorded = self.decision(txid)
        if recorded is None:
            recorded = commit
            self._record_decision(txid, commit, timestamp)
        return recorded

    def _record_decision(self, txid: int, commit: bool, timestamp: int) -> None:
        forgotten = self.decisions.add(txid, commit, timestamp)
        self._journal("d", txid, (commit, timestamp))
        if forgotten is not None:
            self._journal("d", forgotten, _FORGET)

    def _commit_decide(self, request: CommitRequest, others: list[int]) -> Outcome:
        txid = request.txid
        recorded = self.decision(txid)
        if recorded is not None:
            if recorded:
                return None
            return self.outcomes.get(txid) or error_outcome(
                TransactionConflict(f"transaction {txid} was aborted: a participant gave up waiting for its coordinator")
            )
        if self.decisions.forgot(request.timestamp):
            return _forgotten_outcome(txid)
        outcome = self._commit(request)
        if recorded_decision(outcome) is None:
            return outcome  # refused on a lock: nothing recorded, the same command may come again
        if outcome is None and others:
            unfinished = Unfinished(others, request.timestamp, since=self.clock())
            self.unfinished[txid] = unfinished
            self._journal("u", txid, unfinished)
        else:
            self._record_decision(txid, outcome is None, request.timestamp)  # none was recorded
        return outcome

    def _release(self, txids: list[int]) -> Outcome:
        """Every other participant applied these commits: remember them like any decision
        from now on (forgotten in turn, the watermark refusing late retries)."""
        for txid in txids:
            unfinished = self.unfinished.pop(txid, None)
            if unfinished is not None:
                self._journal("u", txid, _FORGET)
                self._record_decision(txid, True, unfinished.timestamp)
        return None

    def _finish(self, txid: int, commit: bool) -> Outcome:
        prepared = self.prepared.pop(txid, None)
        if prepared is None:
            if txid not in self.outcomes:
                # Finished before this shard ever prepared (an abort): refuse a late prepare.
                # Its request (and timestamp) never came here; once this is forgotten, a
                # late prepare would lock its keys until recovery aborts it again.
                outcome = None if commit else error_outcome(
                    TransactionConflict(f"transaction {txid} was aborted")
                )
                self._remember(txid, outcome, 0)
            return self.outcomes.get(txid)
        self._unlock(prepared)
        if commit:
            updates = prepared.updates
            if prepared.shared:
                # Fold the commutative ops onto what other transactions committed since the
                # prepare; exclusive keys were locked, so they validate exactly as then. A
                # failure here (an incr leaving the int64 range meanwhile) keeps the
                # prepare-time values: the decision to commit is final.
                try:
                    updates = validate(prepared.request, self, self.resolvers)
                except errors.Error:
                    updates = prepared.updates
            self._store(updates)
            return self._remember(txid, None, prepared.request.timestamp)
        if prepared.request.ranges and self.decision(txid) is None:
            # A scan's lock released by its scanner: held until now, so the scan's last pass
            # stands. Recovery records abort (DECIDE) before it releases a lock: the scanner
            # then learns that its lock may have gone before its pass ended.
            return self._remember(txid, None, prepared.request.timestamp)
        return self._remember(
            txid, error_outcome(TransactionConflict(f"transaction {txid} was aborted")),
            prepared.request.timestamp,
        )

    def _wipe(self) -> Outcome:
        """Forget every key, resolver and remembered outcome (test clusters reuse one)."""
        if self.prepared:
            return error_outcome(TransactionConflict("prepared transactions are in flight"))
        for txid in self.outcomes:
            self._journal("o", txid, _FORGET)
        for txid in self.decisions:
            self._journal("d", txid, _FORGET)
        for txid in self.unfinished:
            self._journal("u", txid, _FORGET)
        for prefix in self.resolver_names:
            self._journal("r", prefix, _FORGET)
        self._replace_versions(iter(()))
        self.resolvers = ResolverRegistry()
        self.resolver_names = {}
        self.outcomes.clear()
        self.decisions.clear()
        self.unfinished = {}
        return None

    def _load(self, updates: list[KeyUpdate], coordinator: int) -> Outcome:
        """Store versions another store committed (a restore), all or none: KeyLocked while a
        prepared transaction or a scan holds one of their keys. A key the shard holds no
        version of gets the loaded one as it is, so that the clocks clients kept from before
        the backup still match it; one it holds (an overwrite) gets a clock after both and the
        later timestamp, as a commit's, so that nobody's context from either side matches a
        value it did not see.
        A key that holds the loaded value with the loaded clock or a later one is left as
        it is, so a retried load changes nothing."""
        keys = [u.key for u in updates]
        refused = self._lock_refusal(0, (keys, []), keys)  # (0: no transaction's own locks)
        if refused is not None:
            return refused
        stored = []
        for update in updates:
            current = self.get(update.key)
            if current.value == update.value and compare_encoded(update.clock, current.clock) in (BEFORE, EQUAL):
                continue  # it holds this value already, as of the loaded version or after it
            if current.clock:
                clock = next_clock(current.clock, update.clock, coordinator)
                update = KeyUpdate(update.key, update.value, clock, max(current.timestamp, update.timestamp))
            stored.append(update)
        self._store(stored)
        return None

    def _register(self, prefix: str, name: str | None) -> Outcome:
        if name is None:
            self.resolvers.unregister(prefix)
            self.resolver_names.pop(prefix, None)
            self._journal("r", prefix, _FORGET)
            return None
        try:
            self.resolvers.register(prefix, name)
        except errors.Error as exc:
            return error_outcome(exc)
        self.resolver_names[prefix] = name
        self._journal("r", prefix, name)
        return None

    # --- reads and scans (served by the leader after a ReadIndex) ---------------------------

    def scan(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        deleted: bool = False,
    ) -> list:
        """[(key, Versioned)] of live keys with the prefix in [start, end), in key order, at
        most ``limit``; with ``deleted``, deleted keys' tombstones among them too (uncounted)."""
        return first_live(self._range(prefix, start, end), limit, deleted)

    def scan_page(
        self, prefix: str, start: str | None, end: str | None, limit: int | None,
        deleted: bool, max_bytes: int,
    ) -> tuple[list, str | None]:
        """One page of ``scan``, about ``max_bytes`` at most: (items, the key the next page
        starts at, or None when the range ends here). See pykv.txn.model.scan_page."""
        return scan_page(self._range(prefix, start, end), limit, deleted, max_bytes)

    def _range(self, prefix: str, start: str | None, end: str | None) -> Iterator[tuple[str, Versioned]]:
        """(key, version) of every key with the prefix in [start, end), tombstones included."""
        lo = max(prefix, start) if start is not None else prefix
        for key in self.versions.irange(minimum=lo or None, maximum=end, inclusive=(True, False)):
            if not key.startswith(prefix):
                if key > prefix:
                    break
                continue
            yield key, self.versions[key]

    # --- snapshots ----------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state as bytes (what InstallSnapshot carries and what restart loads)."""
        return b"".join(self.snapshot_parts())

    def snapshot_parts(self) -> Iterator[bytes]:
        """The image as a stream of msgpack objects, made as it is read, so that neither
        end holds a whole shard in memory: a header (everything but the versions), runs
        of at most IMAGE_RUN versions, and a trailer that counts them (a cut image is
        refused, not half restored).

        The image is of the state when the first part is taken, even if commands are
        applied between two parts: a key written before the image has passed it keeps
        its version of then aside (copy on write, pykv.replica.imaging). Raises CorruptData if
        the whole state is replaced meanwhile (a snapshot installed, a wipe).
        """
        if self._imaging is not None:
            raise errors.Unavailable(f"shard {self.shard} is already being imaged")
        imaging = self._imaging = Imaging()
        try:
            yield from self._image(imaging)
        finally:
            if self._imaging is imaging:
                self._imaging = None

    def _image(self, imaging: Imaging) -> Iterator[bytes]:
        yield pack(
            {
                "format": IMAGE_FORMAT,
                "shard": self.shard,
                "applied": self.applied_index,
                "resolvers": self.resolver_names,
                "outcomes": self.outcomes.entries(),
                "decisions": self.decisions.entries(),
                "watermarks": [self.outcomes.watermark, self.decisions.watermark],
                "prepared": [_prepared_wire(p) for p in self.prepared.values()],
                "unfinished": [_unfinished_wire(t, u) for t, u in self.unfinished.items()],
            }
        )
        # A run is packed pair by pair (a msgpack array header, then the packed pairs), so
        # it ends at IMAGE_RUN versions or IMAGE_RUN_BYTES, whichever comes first.
        count = 0
        for run in bounded_runs(self._image_pairs(imaging), len, IMAGE_RUN, IMAGE_RUN_BYTES):
            count += len(run)
            yield _array_header(len(run)) + b"".join(run)
        yield pack([IMAGE_END, count])

    def _image_pairs(self, imaging: Imaging) -> Iterator[bytes]:
        """The image's versions, each packed as it is taken (commands may be applied
        between two runs: the first pair taken after them checks the state is the same)."""
        for k, v in imaging.walk(self._all_versions()):
            if self._imaging is not imaging:
                raise CorruptData(f"shard {self.shard} was replaced while it was imaged")
            yield pack([k, v.to_wire()])

    def restore(self, image: bytes | BinaryIO) -> None:
        """Replace the whole state with a snapshot() image (bytes, or a file to stream)."""
        objects = unpack_stream(io.BytesIO(image) if isinstance(image, bytes) else image)
        raw = next(objects, None)
        if not isinstance(raw, dict):
            raise CorruptData("a shard image must start with its header")
        if "format" in raw:
            versions: Iterator = _image_versions(objects)
        else:  # the one-object image of earlier releases
            versions = iter(raw["versions"])
        self.applied_index = raw["applied"]
        self._replace_versions((k, Versioned.from_wire(v)) for k, v in versions)
        self.resolvers = ResolverRegistry()
        self.resolver_names = {}
        for prefix, name in raw["resolvers"].items():
            self._register(prefix, name)
        outcomes_mark, decisions_mark = raw.get("watermarks", (0, 0))  # older snapshots: none
        self.outcomes = _remembered(self.remembered, raw["outcomes"], outcomes_mark)
        self.decisions = _remembered(self.remembered, raw["decisions"], decisions_mark)
        self.prepared = {}
        self.locks = {}
        self.shared = {}
        self.range_locks = {}
        now = self.clock()
        for wire in raw["prepared"]:
            self._lock(self._prepared_from_wire(wire, now))
        self.unfinished = dict(  # older images: none
            _unfinished_from_wire(wire, now) for wire in raw.get("unfinished", ())
        )

    def _prepared_from_wire(self, wire: list, since: float) -> Prepared:
        txid, coord, parts, updates, request_wire = wire
        request = CommitRequest.from_wire(request_wire)
        return Prepared(txid, coord, list(parts), [KeyUpdate.from_wire(u) for u in updates],
                        *self._lock_modes(request), request, since=since)


def bounded_runs(
    items: Iterable[T], size_of: Callable[[T], int], max_items: int, max_bytes: int
) -> Iterator[list[T]]:
    """``items`` in consecutive runs, each ending at ``max_items`` items or once its
    ``size_of`` total reaches ``max_bytes``, whichever comes first (the last may be short).
    A run is taken only when asked for: what follows it is not read before."""
    run: list[T] = []
    size = 0
    for item in items:
        run.append(item)
        size += size_of(item)
        if len(run) == max_items or size >= max_bytes:
            yield run
            run, size = [], 0
    if run:
        yield run


def _array_header(length: int) -> bytes:
    return msgpack.Packer().pack_array_header(length)


def _image_versions(objects: Iterator[Any]) -> Iterator[list]:
    """The [key, version wire] pairs of a streamed image, checked against its trailer."""
    count = 0
    for obj in objects:
        if isinstance(obj, list) and len(obj) == 2 and obj[0] == IMAGE_END:
            if obj[1] != count:
                raise CorruptData(f"a shard image holds {count} versions; its trailer says {obj[1]}")
            return
        if not isinstance(obj, list):
            raise CorruptData("a shard image's versions must come in runs (lists)")
        count += len(obj)
        yield from obj
    raise CorruptData(f"a shard image ends after {count} versions, without its trailer")


def _forgotten_outcome(txid: int) -> Outcome:
    # It may have been applied long ago, or never; applying it now could apply it twice.
    return error_outcome(errors.OutcomeUnknown(
        f"transaction {txid} is as old as transactions this shard has forgotten: it may be a "
        "retry of one committed long ago, so its outcome is unknown (or the client's clock "
        "is minutes behind the others')"
    ))


def _remembered(cap: int, entries: list, watermark: int) -> Remembered:
    """A Remembered from Remembered.entries() (snapshots older than timestamps: 0)."""
    table = Remembered(cap)
    for entry in entries:
        table.add(entry[0], entry[1], entry[2] if len(entry) > 2 else 0)
    table.watermark = max(table.watermark, watermark)
    return table


class Remembered:
    """The last ``cap`` finished txids of one kind (outcome or decision), in the order they
    were recorded, and a watermark: the newest request timestamp among those forgotten.

    Only insertions, never updates, so every replica, and a replica replaying what it
    journaled, forgets exactly the same txids in the same order. A request for a txid not
    remembered whose timestamp is at or below the watermark may be a retry of a forgotten
    one (``forgot``): it must be refused, never applied a second time.

    A node keeps a million of these, and nothing in them is an object the garbage collector
    walks (it walked them all at every full collection: 35 ms of a pause, and deques of
    int objects took 32 MB): the order is two arrays used as a ring, and the table's values
    are atomic (an error outcome, a list, is kept msgpack-encoded), so the dict itself is
    left untracked. A txid is a 64-bit id, as in the journal's keys; a timestamp beyond the
    int64 range counts as its bound.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._table: dict[int, Any] = {}  # txid -> value (_atomic), in the order recorded
        self._txids = array("Q")  # the txids in the order recorded; once full, a ring
        self._stamps = array("q")  # their request timestamps, in the same places
        self._oldest = 0  # where the ring's oldest entry is, once full
        self.watermark = 0

    def add(self, txid: int, value: Any, timestamp: int) -> int | None:
        """Record txid (not yet here) as the newest; the txid forgotten to make room, if any."""
        txid &= _TXID_MASK
        if txid in self._table:  # never happens (see above); kept in its place if it does
            self._table[txid] = _atomic(value)
            return None
        stamp = min(max(timestamp, _STAMP_MIN), _STAMP_MAX)
        if self.cap <= 0:
            self.watermark = max(self.watermark, stamp)
            return txid
        self._table[txid] = _atomic(value)
        if len(self._txids) < self.cap:
            self._txids.append(txid)
            self._stamps.append(stamp)
            return None
        at = self._oldest
        oldest, self._txids[at] = self._txids[at], txid
        self.watermark = max(self.watermark, self._stamps[at])
        self._stamps[at] = stamp
        self._oldest = (at + 1) % self.cap
        del self._table[oldest]
        return oldest

    def forgot(self, timestamp: int) -> bool:
        """Whether a request this old may be a retry of a forgotten txid (never while
        nothing with a timestamp was forgotten)."""
        return 0 < self.watermark and timestamp <= self.watermark

    def get(self, txid: int, default: Any = None) -> Any:
        value = self._table.get(txid & _TXID_MASK, _ABSENT)
        return default if value is _ABSENT else _decoded(value)

    def __contains__(self, txid: object) -> bool:
        return isinstance(txid, int) and txid & _TXID_MASK in self._table

    def __getitem__(self, txid: int) -> Any:
        return _decoded(self._table[txid & _TXID_MASK])

    def __iter__(self) -> Iterator[int]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def keys(self) -> Iterator[int]:
        return iter(self._table)

    def items(self) -> Iterator[tuple[int, Any]]:
        return ((txid, _decoded(value)) for txid, value in self._table.items())

    def entries(self) -> list[list]:
        """[txid, value, timestamp] in the order recorded (what a snapshot carries)."""
        at = self._oldest
        order = zip(self._txids[at:] + self._txids[:at], self._stamps[at:] + self._stamps[:at], strict=True)
        return [[txid, _decoded(self._table[txid]), stamp] for txid, stamp in order]

    def clear(self) -> None:
        self._table.clear()
        self._txids, self._stamps, self._oldest = array("Q"), array("q"), 0


_TXID_MASK = (1 << 64) - 1
_STAMP_MIN, _STAMP_MAX = -(1 << 63), (1 << 63) - 1
_ABSENT = object()


def _atomic(value: Any) -> Any:
    """A value the garbage collector need not track: None and bools as they are, else its
    msgpack bytes (values are never bytes themselves: outcomes and decisions)."""
    return value if value is None or value is True or value is False else pack(value)


def _decoded(value: Any) -> Any:
    return unpack(value) if type(value) is bytes else value


_FORGET = object()
"""Journal value meaning "this metadata entry is gone"."""


def _prepared_wire(p: Prepared) -> list:
    return [p.txid, p.coordinator_shard, p.participants, [u.to_wire() for u in p.updates],
            p.request.to_wire()]


def _unfinished_wire(txid: int, u: Unfinished) -> list:
    return [txid, u.participants, u.timestamp]


def _unfinished_from_wire(wire: list, since: float) -> tuple[int, Unfinished]:
    txid, participants, timestamp = wire
    return txid, Unfinished(list(participants), timestamp, since=since)
