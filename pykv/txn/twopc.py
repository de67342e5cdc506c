"""Two-phase commit over shards as pure state machines: messages, Participant, CoordinatorLog.

Both machines are replicated state: the driver feeds them in Raft log order on every
replica of a shard, passing ``now`` (a time the log entry carries, in the unit the
timeouts use), and they return effects instead of doing I/O. The driver performs ``Apply``
on every replica and ``Send``/``Decided`` on the leader only, always after the entry that
produced them is committed, so that a decision is durable before anyone hears of it.
Queries that change nothing (``expired``, ``unacknowledged``) are for the leader's timer;
``collect_garbage`` changes state, so it runs when a log entry (e.g. a periodic tick entry
carrying ``now``) is applied, alike on every replica.

Protocol (presumed abort, the coordinator shard being the decision point):

1. The committing node splits the request by shard (``plan_commit``) and sends each
   participant shard a ``Prepare`` (its part of the request, the participant list, the
   coordinator shard). A transaction on one shard skips 2PC: ``Participant.apply_single``.
2. ``Participant.on_prepare`` takes the locks (exclusive on written keys, shared on keys
   only read) in the lock table without waiting, validates the part (``occ.validate``)
   and keeps the resulting updates: vote YES. A lock held by another prepared
   transaction or a failed validation votes NO (the error's class name and message
   travel with the vote). Nothing waits, so nothing deadlocks.
3. Votes go to the coordinator shard, whose ``CoordinatorLog.on_vote`` decides COMMIT
   once every participant voted YES, or ABORT at the first NO. The first decision for a
   transaction wins; later votes, queries or decisions only learn it.
4. The decision reaches the participants as ``Decision``: ``Participant.on_decision``
   applies the kept updates (COMMIT) or drops them (ABORT), releases the locks and
   answers ``DecisionAck``; the coordinator forgets the transaction once every
   participant acknowledged and the retention has passed.

Recovery: a participant whose prepared transaction has waited past ``prepare_timeout``
sends ``QueryDecision`` (``Participant.expired``); if the coordinator shard recorded no
decision it records ABORT (``CoordinatorLog.on_query``), so a crashed client or
coordinator never leaves a transaction in doubt. Transactions whose votes stall are
listed by ``CoordinatorLog.expired`` for the driver to abort (``CoordinatorLog.decide``).

Every handler is idempotent under re-delivery: a duplicate Prepare re-sends the same vote,
a duplicate Decision only re-sends the ack, a duplicate vote re-sends the decision. Both
machines remember decided transactions for ``retention`` (a duration in the unit of
``now``) and then keep only a watermark: the highest request timestamp forgotten. A
Prepare or vote at or below it for an unknown transaction is refused (voted NO, or
presumed aborted), so a message delayed past the retention can never prepare or commit a
transaction that was already decided. Hence the requests' ``timestamp`` must come from a
hybrid logical clock.

Messages (``message_to_wire``/``message_from_wire`` give msgpack-able lists tagged by type):

=================  ============================  =============================================
message            from -> to                    fields
=================  ============================  =============================================
``Prepare``        committing node -> each       txid, coordinator_shard, participants,
                   participant shard             request (that shard's part)
``Vote``           participant -> coordinator    txid, shard, participants, timestamp, yes,
                   shard                         error (exception class name), reason
``Decision``       coordinator shard ->          txid, commit, coordinator_shard, timestamp,
                   participants                  error, reason
``QueryDecision``  participant -> coordinator    txid, shard, participants, timestamp
``DecisionAck``    participant -> coordinator    txid, shard
=================  ============================  =============================================
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pykv import errors
from pykv._engine.locks import LockTable
from pykv.errors import Error, ProtocolError, TransactionAborted, TransactionConflict
from pykv.txn.model import CommitRequest, KeyUpdate, StateView
from pykv.txn.occ import validate
from pykv.txn.resolvers import ResolverRegistry

# --- messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepare:
    """Prepare ``request`` (one shard's part of transaction ``txid``) and vote."""

    txid: int
    coordinator_shard: int
    participants: tuple[int, ...]
    request: CommitRequest


@dataclass(frozen=True, slots=True)
class Vote:
    """A participant's vote; a NO carries the error that refused the transaction."""

    txid: int
    shard: int
    participants: tuple[int, ...]
    timestamp: int
    yes: bool
    error: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """The recorded outcome of a transaction; an ABORT carries the error that caused it.

    ``coordinator_shard`` is where the ack goes; ``timestamp`` is the request's.
    """

    txid: int
    commit: bool
    coordinator_shard: int
    timestamp: int
    error: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class QueryDecision:
    """A participant, in doubt past its timeout, asks the coordinator shard for the outcome."""

    txid: int
    shard: int
    participants: tuple[int, ...]
    timestamp: int


@dataclass(frozen=True, slots=True)
class DecisionAck:
    """A participant applied (or dropped) a decided transaction and released its locks."""

    txid: int
    shard: int


Message = Prepare | Vote | Decision | QueryDecision | DecisionAck


def message_to_wire(message: Message) -> list:
    """A msgpack-able list: [tag, fields...]."""
    if isinstance(message, Prepare):
        return [
            "prepare",
            message.txid,
            message.coordinator_shard,
            list(message.participants),
            message.request.to_wire(),
        ]
    if isinstance(message, Vote):
        return [
            "vote",
            message.txid,
            message.shard,
            list(message.participants),
            message.timestamp,
            message.yes,
            message.error,
            message.reason,
        ]
    if isinstance(message, Decision):
        return [
            "decision",
            message.txid,
            message.commit,
            message.coordinator_shard,
            message.timestamp,
            message.error,
            message.reason,
        ]
    if isinstance(message, QueryDecision):
        return ["query", message.txid, message.shard, list(message.participants), message.timestamp]
    if isinstance(message, DecisionAck):
        return ["ack", message.txid, message.shard]
    raise ProtocolError(f"not a 2PC message: {message!r:.80}")


def message_from_wire(data: Any) -> Message:
    """Rebuild what message_to_wire() produced; raise ProtocolError on anything else."""
    if not isinstance(data, (list, tuple)) or not data:
        raise ProtocolError("a 2PC message must be a non-empty array")
    tag, fields = data[0], list(data[1:])
    try:
        if tag == "prepare":
            txid, coordinator, participants, request = fields
            return Prepare(
                _int(txid),
                _int(coordinator),
                _shards(participants),
                CommitRequest.from_wire(request),
            )
        if tag == "vote":
            txid, shard, participants, timestamp, yes, error, reason = fields
            return Vote(
                _int(txid),
                _int(shard),
                _shards(participants),
                _int(timestamp),
                _bool(yes),
                _str(error),
                _str(reason),
            )
        if tag == "decision":
            txid, commit, coordinator, timestamp, error, reason = fields
            return Decision(
                _int(txid),
                _bool(commit),
                _int(coordinator),
                _int(timestamp),
                _str(error),
                _str(reason),
            )
        if tag == "query":
            txid, shard, participants, timestamp = fields
            return QueryDecision(_int(txid), _int(shard), _shards(participants), _int(timestamp))
        if tag == "ack":
            txid, shard = fields
            return DecisionAck(_int(txid), _int(shard))
    except ValueError as exc:  # wrong number of fields
        raise ProtocolError(f"malformed 2PC {tag!r} message: {exc}") from None
    raise ProtocolError(f"unknown 2PC message type {tag!r:.40}")


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"expected an int, got {value!r:.40}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"expected a bool, got {value!r:.40}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"expected a str, got {value!r:.40}")
    return value


def _shards(value: object) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ProtocolError("expected an array of shard ids")
    return tuple(_int(shard) for shard in value)


# --- effects -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` to the leader of shard ``to_shard`` (the leader's driver does it)."""

    to_shard: int
    message: Message


@dataclass(frozen=True, slots=True)
class Apply:
    """Store ``updates`` (every replica, at this log position) - a transaction committed."""

    txid: int
    updates: tuple[KeyUpdate, ...]


@dataclass(frozen=True, slots=True)
class Decided:
    """The coordinator shard recorded the outcome of ``txid``: answer whoever waits on it."""

    txid: int
    commit: bool
    error: str = ""
    reason: str = ""


Effect = Send | Apply | Decided


def error_from(name: str, reason: str) -> Error:
    """The pykv exception a NO vote or an ABORT decision names (TransactionAborted if unknown).

    Lets the client raise, say, InvalidOperation for a transaction that another shard
    refused, exactly as a single-shard commit would.
    """
    found = getattr(errors, name, None)
    if isinstance(found, type) and issubclass(found, Error):
        return found(reason)
    return TransactionAborted(reason or "the transaction was aborted")


# --- planning a commit ---------------------------------------------------------------------


def split_by_shard(
    request: CommitRequest, shard_of: Callable[[str], int]
) -> dict[int, CommitRequest]:
    """Each shard's part of ``request`` (reads and writes of its keys), shards in first-use order."""
    keys_by_shard: dict[int, set[str]] = {}
    for key in (*(op.key for op in request.writes), *request.reads):
        keys_by_shard.setdefault(shard_of(key), set()).add(key)
    return {shard: request.restricted_to(keys) for shard, keys in keys_by_shard.items()}


def plan_commit(request: CommitRequest, shard_of: Callable[[str], int]) -> tuple[int, list[Send]]:
    """The coordinator shard (the first written key's, else the first read key's) and the
    Prepare messages to send; a single entry means the transaction needs no 2PC."""
    parts = split_by_shard(request, shard_of)
    participants = tuple(parts)
    coordinator = participants[0] if participants else 0
    sends = [
        Send(shard, Prepare(request.txid, coordinator, participants, part))
        for shard, part in parts.items()
    ]
    return coordinator, sends


# --- the participant -----------------------------------------------------------------------


@dataclass(slots=True)
class PreparedTxn:
    """A transaction this shard voted YES for: its kept updates and the locks it holds."""

    txid: int
    coordinator_shard: int
    participants: tuple[int, ...]
    timestamp: int
    prepared_at: int
    updates: tuple[KeyUpdate, ...]
    shared: tuple[str, ...]
    exclusive: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _DecidedTxn:
    commit: bool
    timestamp: int  # the request's
    decided_at: int


def _lock_sets(request: CommitRequest) -> tuple[list[str], list[str]]:
    exclusive = request.written_keys()
    written = set(exclusive)
    shared = [key for key in request.reads if key not in written]
    return shared, exclusive


def _encode_keys(keys: list[str] | tuple[str, ...]) -> list[bytes]:
    return [key.encode("utf-8") for key in keys]


class Participant:
    """One shard's side of 2PC, plus single-shard commits that must respect its locks."""

    def __init__(
        self,
        shard: int,
        resolvers: ResolverRegistry,
        *,
        prepare_timeout: int = 5_000,
        retention: int = 600_000,
    ) -> None:
        self.shard = shard
        self.resolvers = resolvers
        self.prepare_timeout = prepare_timeout
        self.retention = retention
        self.locks = LockTable()
        self.prepared: dict[int, PreparedTxn] = {}
        self._decided: dict[int, _DecidedTxn] = {}
        self.watermark = -1  # highest request timestamp of a forgotten decided transaction

    # -- single-shard transactions --

    def apply_single(self, request: CommitRequest, state: StateView) -> list[KeyUpdate]:
        """Validate a transaction that lives on this shard only; returns the updates to store.

        Raises TransactionConflict when a prepared, undecided transaction holds a lock
        the request needs: its updates were computed against the current values, so
        nothing may change them (or read past them) until it is decided.
        """
        if self.prepared:
            shared, exclusive = _lock_sets(request)
            free = self._try_lock(request.txid, shared, exclusive)
            self.locks.release_all(request.txid)
            if not free:
                raise TransactionConflict(
                    f"transaction {request.txid} touches keys locked by an in-doubt transaction"
                )
        return validate(request, state, self.resolvers)

    # -- 2PC --

    def on_prepare(self, message: Prepare, state: StateView, now: int) -> list[Effect]:
        """Validate and lock this shard's part, keep its updates, and vote."""
        txid, request = message.txid, message.request
        decided = self._decided.get(txid)
        if decided is not None:  # re-delivered after the decision: repeat what we voted
            return [self._vote(message, decided.commit)]
        if txid in self.prepared:
            return [self._vote(message, True)]
        if request.timestamp <= self.watermark:
            reason = "the prepare is older than this shard's memory of decided transactions"
            return [self._refuse(message, now, "TransactionConflict", reason)]
        shared, exclusive = _lock_sets(request)
        if not self._try_lock(txid, shared, exclusive):
            self.locks.release_all(txid)
            reason = "keys are locked by another in-doubt transaction"
            return [self._refuse(message, now, "TransactionConflict", reason)]
        try:
            updates = validate(request, state, self.resolvers)
        except Error as exc:
            self.locks.release_all(txid)
            return [self._refuse(message, now, type(exc).__name__, str(exc))]
        self.prepared[txid] = PreparedTxn(
            txid,
            message.coordinator_shard,
            message.participants,
            request.timestamp,
            now,
            tuple(updates),
            tuple(shared),
            tuple(exclusive),
        )
        return [self._vote(message, True)]

    def on_decision(self, message: Decision, now: int) -> list[Effect]:
        """Apply (COMMIT) or drop (ABORT) a prepared transaction, release its locks, ack."""
        txid = message.txid
        effects: list[Effect] = []
        prepared = self.prepared.pop(txid, None)
        if prepared is not None:
            self.locks.release_all(txid)
            if message.commit:
                effects.append(Apply(txid, prepared.updates))
            self._decided[txid] = _DecidedTxn(message.commit, prepared.timestamp, now)
        elif txid not in self._decided:
            # Never prepared here (an ABORT that overtook its Prepare): remember it so
            # that the late Prepare votes NO instead of taking locks.
            self._decided[txid] = _DecidedTxn(message.commit, message.timestamp, now)
        effects.append(Send(message.coordinator_shard, DecisionAck(txid, self.shard)))
        return effects

    def expired(self, now: int) -> list[Send]:
        """Queries for prepared transactions undecided past prepare_timeout (changes nothing)."""
        return [
            Send(
                txn.coordinator_shard,
                QueryDecision(txn.txid, self.shard, txn.participants, txn.timestamp),
            )
            for txn in self.prepared.values()
            if now - txn.prepared_at >= self.prepare_timeout
        ]

    def collect_garbage(self, now: int) -> int:
        """Forget decided transactions older than the retention; returns how many."""
        old = [
            txid
            for txid, decided in self._decided.items()
            if now - decided.decided_at >= self.retention
        ]
        for txid in old:
            self.watermark = max(self.watermark, self._decided.pop(txid).timestamp)
        return len(old)

    def outcome(self, txid: int) -> bool | None:
        """True/False once this shard knows the decision, None while prepared or unknown."""
        decided = self._decided.get(txid)
        return None if decided is None else decided.commit

    def _refuse(self, message: Prepare, now: int, error: str, reason: str) -> Send:
        """Vote NO. That is a unilateral abort, so remember it: a re-delivered Prepare
        (once the locks in its way are gone) must not vote YES for an aborted transaction."""
        self._decided[message.txid] = _DecidedTxn(False, message.request.timestamp, now)
        return self._vote(message, False, error, reason)

    def _vote(self, message: Prepare, yes: bool, error: str = "", reason: str = "") -> Send:
        vote = Vote(
            message.txid,
            self.shard,
            message.participants,
            message.request.timestamp,
            yes,
            error,
            reason,
        )
        return Send(message.coordinator_shard, vote)

    def _try_lock(self, txid: int, shared: list[str], exclusive: list[str]) -> bool:
        return self.locks.try_lock_all(_encode_keys(shared), _encode_keys(exclusive), txid)

    # -- snapshots --

    def to_wire(self) -> dict:
        """The replicated state (prepared and remembered transactions), msgpack-able."""
        return {
            "shard": self.shard,
            "watermark": self.watermark,
            "prepared": [
                [
                    t.txid,
                    t.coordinator_shard,
                    list(t.participants),
                    t.timestamp,
                    t.prepared_at,
                    [u.to_wire() for u in t.updates],
                    list(t.shared),
                    list(t.exclusive),
                ]
                for t in self.prepared.values()
            ],
            "decided": [
                [txid, d.commit, d.timestamp, d.decided_at] for txid, d in self._decided.items()
            ],
        }

    def restore(self, data: dict) -> None:
        """Replace this participant's state by a to_wire() snapshot (re-taking the locks)."""
        try:
            self.locks = LockTable()
            self.prepared = {}
            for txid, coord, parts, ts, at, updates, shared, exclusive in data["prepared"]:
                txn = PreparedTxn(
                    txid,
                    coord,
                    tuple(parts),
                    ts,
                    at,
                    tuple(KeyUpdate.from_wire(u) for u in updates),
                    tuple(shared),
                    tuple(exclusive),
                )
                if not self._try_lock(txid, list(shared), list(exclusive)):
                    raise ProtocolError(f"snapshot holds conflicting locks for txn {txid}")
                self.prepared[txid] = txn
            self._decided = {
                txid: _DecidedTxn(commit, ts, at) for txid, commit, ts, at in data["decided"]
            }
            self.watermark = data["watermark"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed participant snapshot: {exc!r}") from None


# --- the coordinator's decision record -----------------------------------------------------


class TxnStatus(str, enum.Enum):
    """Where a transaction stands in the coordinator's decision record."""

    COLLECTING = "collecting"
    COMMITTED = "committed"
    ABORTED = "aborted"


@dataclass(slots=True)
class TxnRecord:
    """The coordinator shard's record of one transaction."""

    txid: int
    participants: tuple[int, ...]
    timestamp: int
    started_at: int
    status: TxnStatus = TxnStatus.COLLECTING
    yes: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)
    decided_at: int = 0
    error: str = ""
    reason: str = ""


class CoordinatorLog:
    """The decision record on a coordinator shard: collecting -> COMMITTED | ABORTED.

    The first decision recorded for a transaction is final; everything after it only
    re-sends it. Unknown transactions are presumed aborted when a participant asks.
    """

    def __init__(self, shard: int, *, vote_timeout: int = 5_000, retention: int = 600_000):
        self.shard = shard
        self.vote_timeout = vote_timeout
        self.retention = retention
        self.records: dict[int, TxnRecord] = {}
        self.watermark = -1  # highest request timestamp of a forgotten transaction

    def on_vote(self, vote: Vote, now: int) -> list[Effect]:
        """Record a vote; decide at the first NO or once every participant voted YES."""
        record = self._record(vote.txid, vote.participants, vote.timestamp, now)
        if record.status is not TxnStatus.COLLECTING:
            return [Send(vote.shard, self._decision(record))]
        if vote.shard not in record.participants:
            return []  # not a participant of this transaction: ignore the stray vote
        if not vote.yes:
            return self._decide(record, False, now, vote.error, vote.reason)
        record.yes.add(vote.shard)
        if record.yes.issuperset(record.participants):
            return self._decide(record, True, now)
        return []

    def on_query(self, query: QueryDecision, now: int) -> list[Effect]:
        """Answer an in-doubt participant; with no decision recorded yet, record ABORT."""
        record = self._record(query.txid, query.participants, query.timestamp, now)
        if record.status is TxnStatus.COLLECTING:
            reason = f"shard {query.shard} timed out waiting for the decision"
            return self._decide(record, False, now, "TransactionAborted", reason)
        return [Send(query.shard, self._decision(record))]

    def decide(
        self,
        txid: int,
        commit: bool,
        participants: tuple[int, ...],
        timestamp: int,
        now: int,
        error: str = "",
        reason: str = "",
    ) -> list[Effect]:
        """Record a decision made outside on_vote (a driver that collected the votes itself,
        a client abort, a vote timeout); if one is already recorded, it stands and is re-sent."""
        record = self._record(txid, participants, timestamp, now)
        if record.status is not TxnStatus.COLLECTING:
            return [
                Decided(txid, record.status is TxnStatus.COMMITTED, record.error, record.reason)
            ]
        return self._decide(record, commit, now, error, reason)

    def on_ack(self, ack: DecisionAck, now: int) -> list[Effect]:
        """A participant applied the decision; it needs no more re-sends."""
        record = self.records.get(ack.txid)
        if record is not None and record.status is not TxnStatus.COLLECTING:
            record.acked.add(ack.shard)
        return []

    def outcome(self, txid: int) -> TxnStatus | None:
        record = self.records.get(txid)
        return None if record is None else record.status

    def expired(self, now: int) -> list[int]:
        """Transactions still collecting votes past vote_timeout: the driver should abort them."""
        return [
            r.txid
            for r in self.records.values()
            if r.status is TxnStatus.COLLECTING and now - r.started_at >= self.vote_timeout
        ]

    def unacknowledged(self) -> list[Send]:
        """Decisions to send again to participants that have not acknowledged them."""
        return [
            Send(shard, self._decision(record))
            for record in self.records.values()
            if record.status is not TxnStatus.COLLECTING
            for shard in record.participants
            if shard not in record.acked
        ]

    def collect_garbage(self, now: int) -> int:
        """Forget decided, fully acknowledged records older than the retention."""
        old = [
            r.txid
            for r in self.records.values()
            if r.status is not TxnStatus.COLLECTING
            and r.acked.issuperset(r.participants)
            and now - r.decided_at >= self.retention
        ]
        for txid in old:
            self.watermark = max(self.watermark, self.records.pop(txid).timestamp)
        return len(old)

    def _record(
        self, txid: int, participants: tuple[int, ...], timestamp: int, now: int
    ) -> TxnRecord:
        record = self.records.get(txid)
        if record is None:
            record = TxnRecord(txid, tuple(participants), timestamp, now)
            self.records[txid] = record
            if timestamp <= self.watermark:
                # It may be a forgotten transaction's delayed message: never let it commit.
                record.status = TxnStatus.ABORTED
                record.decided_at = now
                record.error = "TransactionAborted"
                record.reason = "the transaction is older than the coordinator's memory"
        return record

    def _decide(
        self, record: TxnRecord, commit: bool, now: int, error: str = "", reason: str = ""
    ) -> list[Effect]:
        record.status = TxnStatus.COMMITTED if commit else TxnStatus.ABORTED
        record.decided_at = now
        record.error, record.reason = (
            ("", "") if commit else (error or "TransactionConflict", reason)
        )
        decision = self._decision(record)
        effects: list[Effect] = [Send(shard, decision) for shard in record.participants]
        effects.append(Decided(record.txid, commit, record.error, record.reason))
        return effects

    def _decision(self, record: TxnRecord) -> Decision:
        commit = record.status is TxnStatus.COMMITTED
        return Decision(
            record.txid, commit, self.shard, record.timestamp, record.error, record.reason
        )

    # -- snapshots --

    def to_wire(self) -> dict:
        """The replicated decision records, msgpack-able."""
        return {
            "shard": self.shard,
            "watermark": self.watermark,
            "records": [
                [
                    r.txid,
                    list(r.participants),
                    r.timestamp,
                    r.started_at,
                    r.status.value,
                    sorted(r.yes),
                    sorted(r.acked),
                    r.decided_at,
                    r.error,
                    r.reason,
                ]
                for r in self.records.values()
            ],
        }

    def restore(self, data: dict) -> None:
        """Replace the records by a to_wire() snapshot."""
        try:
            self.records = {}
            for txid, parts, ts, started, status, yes, acked, at, error, reason in data["records"]:
                self.records[txid] = TxnRecord(
                    txid, tuple(parts), ts, started, TxnStatus(status), set(yes), set(acked),
                    at, error, reason,
                )  # fmt: skip
            self.watermark = data["watermark"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed coordinator snapshot: {exc!r}") from None
