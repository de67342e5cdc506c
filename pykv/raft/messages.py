"""Raft's value types: entries, hard state, snapshots, membership, messages and their wire forms.

Every type is a small frozen dataclass. ``to_wire()`` turns one into nested lists of ints,
bools, None, str and bytes that ``pykv.codec.pack`` (msgpack) encodes; ``from_wire()`` is
the inverse. Entry payloads (``Entry.data``) and read contexts must themselves be
msgpack-encodable (bytes is the usual choice).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pykv.types import enum_decoder


class MsgType(enum.IntEnum):
    """The kinds of messages Raft peers exchange."""

    APP = 1  # AppendEntries (also the probe)
    APP_RESP = 2
    VOTE = 3  # RequestVote
    VOTE_RESP = 4
    PRE_VOTE = 5  # RequestVote for term+1 without bumping the term (thesis §9.6)
    PRE_VOTE_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAP = 9  # InstallSnapshot
    TIMEOUT_NOW = 10  # leadership transfer: campaign now (thesis §3.10)
    READ_INDEX = 11  # follower asks the leader for a linearizable read index
    READ_INDEX_RESP = 12
    QUIESCE = 13  # leader -> follower: the group is idle, stop the election timer (a heartbeat)
    KEEPALIVE = 14  # node -> node, no group: "this node is alive" (watched by drivers, not Raft)


class EntryKind(enum.IntEnum):
    """What a log entry carries."""

    NORMAL = 0
    CONF_CHANGE = 1


_msg_type = enum_decoder(MsgType)
_entry_kind = enum_decoder(EntryKind)


class ConfChangeKind(enum.IntEnum):
    """One membership step."""

    ADD_NODE = 0  # add a voter, or promote a learner to voter
    ADD_LEARNER = 1  # add a non-voting member that receives the log
    REMOVE_NODE = 2


class Role(enum.IntEnum):
    """A node's role in its current term."""

    FOLLOWER = 0
    PRE_CANDIDATE = 1
    CANDIDATE = 2
    LEADER = 3


# Context of a vote request that a leadership transfer started: it overrides the leader lease.
CAMPAIGN_TRANSFER = "transfer"


# Entry and Message are built for every proposal and every message received: not frozen,
# since a frozen dataclass's __init__ costs about 3x more; nothing changes them once built.
@dataclass(slots=True)
class Entry:
    """One log entry; ``data`` is the command (or a ConfChange wire form for CONF_CHANGE)."""

    term: int
    index: int
    kind: EntryKind = EntryKind.NORMAL
    data: Any = None

    def to_wire(self) -> list:
        return [self.term, self.index, int(self.kind), self.data]

    @classmethod
    def from_wire(cls, w: list) -> Entry:
        return cls(w[0], w[1], _entry_kind(w[2]), w[3])


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message that depends on it is sent."""

    term: int = 0
    vote: int | None = None
    commit: int = 0

    def to_wire(self) -> list:
        return [self.term, self.vote, self.commit]

    @classmethod
    def from_wire(cls, w: list) -> HardState:
        return cls(w[0], w[1], w[2])


@dataclass(frozen=True, slots=True)
class ConfState:
    """A membership configuration: who votes and who only learns."""

    voters: frozenset[int] = frozenset()
    learners: frozenset[int] = frozenset()

    def to_wire(self) -> list:
        return [sorted(self.voters), sorted(self.learners)]

    @classmethod
    def from_wire(cls, w: list) -> ConfState:
        return cls(frozenset(w[0]), frozenset(w[1]))

    def members(self) -> frozenset[int]:
        return self.voters | self.learners


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A membership change: one step, or several only when bootstrapping an empty group."""

    changes: tuple[tuple[ConfChangeKind, int], ...]
    context: Any = None

    @classmethod
    def single(cls, kind: ConfChangeKind, node_id: int, context: Any = None) -> ConfChange:
        return cls(((ConfChangeKind(kind), node_id),), context)

    def to_wire(self) -> list:
        return [[[int(k), n] for k, n in self.changes], self.context]

    @classmethod
    def from_wire(cls, w: list) -> ConfChange:
        return cls(tuple((ConfChangeKind(k), n) for k, n in w[0]), w[1])

    def apply_to(self, conf: ConfState) -> ConfState:
        voters, learners = set(conf.voters), set(conf.learners)
        for kind, node in self.changes:
            if kind == ConfChangeKind.ADD_NODE:
                voters.add(node)
                learners.discard(node)
            elif kind == ConfChangeKind.ADD_LEARNER:
                if node not in voters:
                    learners.add(node)
            else:
                voters.discard(node)
                learners.discard(node)
        return ConfState(frozenset(voters), frozenset(learners))


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """Where a snapshot ends in the log, and the membership as of that index."""

    index: int = 0
    term: int = 0
    conf: ConfState = field(default_factory=ConfState)

    def to_wire(self) -> list:
        return [self.index, self.term, self.conf.to_wire()]

    @classmethod
    def from_wire(cls, w: list) -> SnapshotMeta:
        return cls(w[0], w[1], ConfState.from_wire(w[2]))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A state-machine image (``data``, opaque to Raft) and its metadata."""

    meta: SnapshotMeta = field(default_factory=SnapshotMeta)
    data: Any = None

    def to_wire(self) -> list:
        return [self.meta.to_wire(), self.data]

    @classmethod
    def from_wire(cls, w: list) -> Snapshot:
        return cls(SnapshotMeta.from_wire(w[0]), w[1])


@dataclass(slots=True)
class Message:
    """One Raft message. ``group`` names the Raft group so one frame can carry many groups.

    Field use by type: APP carries (index, log_term) of the entry before ``entries`` and the
    leader's ``commit``; APP_RESP carries the acknowledged ``index`` or, when ``reject``, the
    rejected index plus a back-off ``hint`` index and its term in ``log_term``; VOTE and
    PRE_VOTE carry the candidate's last (index, log_term); HEARTBEAT carries ``commit`` and an
    optional read ``context`` that its response echoes; SNAP carries ``snapshot``.
    """

    type: MsgType
    to: int
    frm: int
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    hint: int = 0
    context: Any = None
    snapshot: Snapshot | None = None
    group: int = 0

    def to_wire(self) -> list:
        return [
            int(self.type), self.to, self.frm, self.term, self.log_term, self.index,
            [e.to_wire() for e in self.entries], self.commit, self.reject, self.hint,
            self.context, None if self.snapshot is None else self.snapshot.to_wire(), self.group,
        ]

    @classmethod
    def from_wire(cls, w: list) -> Message:
        return cls(
            _msg_type(w[0]), w[1], w[2], w[3], w[4], w[5],
            tuple(Entry.from_wire(e) for e in w[6]), w[7], bool(w[8]), w[9], w[10],
            None if w[11] is None else Snapshot.from_wire(w[11]), w[12],
        )


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read may be served once the state machine has applied ``index``."""

    index: int
    context: Any


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state worth telling the driver about when it changes."""

    leader: int | None
    role: Role


@dataclass(frozen=True, slots=True)
class PersistentState:
    """What a node restarts from: exactly what its driver made durable."""

    hard_state: HardState = field(default_factory=HardState)
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    """One batch of work for the driver; see the contract in pykv.raft.node."""

    soft_state: SoftState | None
    hard_state: HardState | None
    snapshot: Snapshot | None
    entries: tuple[Entry, ...]
    committed_entries: tuple[Entry, ...]
    read_states: tuple[ReadState, ...]
    messages: tuple[Message, ...]

    def must_sync(self) -> bool:
        """True when something must reach the disk before ``messages`` may be sent."""
        return self.hard_state is not None or bool(self.entries) or self.snapshot is not None
