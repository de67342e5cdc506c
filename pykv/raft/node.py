"""RaftNode: one member of one Raft group as a pure state machine (inputs in, a Ready out).

Inputs: ``tick()`` (one unit of logical time), ``step(msg)`` (a message from a peer),
``propose(data)``, ``propose_conf_change(cc)``, ``read_index(ctx)``,
``transfer_leadership(to)``, ``compact(index, data)`` and the storage-done notice
``advance(ready)``. Output: ``ready()``. The node never touches a clock, a file or a socket;
its only randomness is the injected ``random.Random`` that spreads election timeouts.

The Ready contract (what a driver must do with each Ready, in this order)
--------------------------------------------------------------------------
1. Persist durably (write + fsync): the ``snapshot`` if any (it replaces the whole log),
   then ``entries`` (the first entry's index says where to cut the stored log: drop every
   stored entry at or after it, then append), and the ``hard_state`` if any. Raft's safety
   rests on this: a vote must not be granted, nor an append acknowledged, by a node that
   could forget it after a crash (Raft paper, Figure 2: "updated on stable storage before
   responding to RPCs").
2. Then send ``messages``. Every response (vote grants, append acknowledgements) in them
   assumes step 1 is done.
3. Then apply: restore the state machine from ``snapshot`` if any, then apply
   ``committed_entries`` in order, then serve ``read_states`` once the state machine has
   applied each one's index.
4. Then call ``advance(ready)``. Only one Ready may be outstanding; the node keeps taking
   ticks, messages and proposals meanwhile and collects their effects for the next Ready.

Leader-side optimisation (allowed, and safe by construction): a *leader* may send its
MsgApp messages before (or while) it persists its own new entries, as the Raft thesis
§10.2.1 describes. This is safe here because the leader counts its own log towards a
commit quorum only when ``advance()`` reports the entries durable, so an entry is never
committed on the strength of the leader's unsynced copy. This does not extend to hard state:
a leader's term must be durable before it sends anything (its messages carry the term). A
driver that is unsure follows steps 1-4 strictly, which is always correct.

Reads: ``read_index(ctx)`` is linearizable. With ``read_only="safe"`` (the default) the
leader confirms its leadership by a heartbeat round with a quorum after the request arrived
(ReadIndex, thesis §6.4). With ``read_only="lease"`` it skips that round while a quorum
acknowledged a heartbeat less than ``lease_ticks()`` ago: safe only while no clock runs off
by more than ``max_clock_drift`` (voters refuse other candidates for an election timeout
after hearing the leader, and a restarted node behaves as if it just heard one).

Quiescence (``quiesce_ticks`` > 0): a leader whose group has been idle that long (everything
committed, applied and on every member) sends QUIESCE instead of heartbeats and stops its
timers, and so does a follower that receives it with a log equal to the leader's: an idle
group then costs no tick work and no messages. Any proposal, read or message that needs the
group wakes it. A quiesced follower no longer times out by itself, so its driver must watch
the leader's *node* (one KEEPALIVE per peer per heartbeat, whatever the number of groups)
and call ``wake(silent_ticks=...)`` when that node falls silent (pykv.replica.host does),
which is how CockroachDB and TiKV keep thousands of idle ranges cheap.

Membership changes are single-server changes (thesis §4.1): each node uses the latest
configuration in its log, committed or not; a leader proposes a change only after the
previous one committed and after an entry of its own term committed (the fix for the
single-server bug found in 2015); learners receive the log but do not vote, and a learner is
promoted only once it has caught up with the leader's commit index.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pykv.errors import InvalidArgument
from pykv.raft.errors import ConfChangeRejected, NotLeader, RaftInvariantError, RaftUsageError
from pykv.raft.log import RaftLog
from pykv.raft.messages import (
    CAMPAIGN_TRANSFER,
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MsgType,
    PersistentState,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
)
from pykv.raft.progress import (
    Progress,
    ProgressState,
    VoteResult,
    committed_index,
    majority,
    vote_result,
)

READ_SAFE = "safe"  # ReadIndex: confirm leadership with a heartbeat round (no clock assumptions)
READ_LEASE = "lease"  # leader lease: no round trip while a quorum acked recently (bounded drift)


@dataclass(frozen=True)
class RaftConfig:
    """Timing in ticks and flow-control limits for one Raft node."""

    election_ticks: int = 10
    heartbeat_ticks: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_batch_entries: int = 256
    max_batch_bytes: int = 1 << 20
    max_inflight: int = 64
    max_apply_entries: int = 4096
    read_only: str = READ_SAFE
    # Lease reads assume no node's tick rate differs from real time by more than this
    # fraction; the lease lasts election_ticks * (1 - drift) / (1 + drift) - 1 ticks.
    max_clock_drift: float = 0.1
    # Ticks of complete idleness after which a leader quiesces its group (0 = never); only
    # for a driver that wakes quiesced followers when the leader's node goes silent.
    quiesce_ticks: int = 0
    # A leader compacting its log keeps up to this many entries before the snapshot that a
    # follower has not matched yet, so that a follower a little behind (or down a short
    # while) catches up from the log instead of receiving the whole snapshot.
    catch_up_entries: int = 0

    def __post_init__(self) -> None:
        if self.heartbeat_ticks < 1 or self.election_ticks <= self.heartbeat_ticks:
            raise InvalidArgument("need 1 <= heartbeat_ticks < election_ticks")
        if self.max_batch_entries < 1 or self.max_inflight < 1 or self.max_apply_entries < 1:
            raise InvalidArgument("batch, inflight and apply limits must be positive")
        if self.read_only not in (READ_SAFE, READ_LEASE):
            raise InvalidArgument(f"read_only must be {READ_SAFE!r} or {READ_LEASE!r}")
        if self.read_only == READ_LEASE and not self.check_quorum:
            raise InvalidArgument("lease reads need check_quorum")
        if self.quiesce_ticks < 0:
            raise InvalidArgument("quiesce_ticks must be >= 0")
        if self.catch_up_entries < 0:
            raise InvalidArgument("catch_up_entries must be >= 0")
        if not 0 <= self.max_clock_drift < 1:
            raise InvalidArgument("max_clock_drift must be in [0, 1)")

    def lease_ticks(self) -> int:
        """How long a leader may serve reads locally after a quorum acknowledged a heartbeat."""
        e = self.election_ticks
        return int(e * (1 - self.max_clock_drift) / (1 + self.max_clock_drift)) - 1


def bootstrap_state(voters: Iterable[int]) -> PersistentState:
    """The durable state every founding member of a new group starts from.

    The founding configuration is entry 1 (term 1, committed), so that members added later
    learn it from the log like any other configuration change.
    """
    voters = sorted(set(voters))
    if not voters:
        raise InvalidArgument("a group needs at least one voter")
    cc = ConfChange(tuple((ConfChangeKind.ADD_NODE, v) for v in voters))
    entry = Entry(1, 1, EntryKind.CONF_CHANGE, cc.to_wire())
    return PersistentState(HardState(term=1, vote=None, commit=1), (entry,), None)


class _ReadRequest:
    __slots__ = ("index", "context", "origin", "acks")

    def __init__(self, index: int, context: Any, origin: int) -> None:
        self.index = index
        self.context = context
        self.origin = origin
        self.acks: set[int] = set()


class RaftNode:
    """One Raft participant; see the module docstring for the driver contract."""

    def __init__(
        self,
        node_id: int,
        *,
        state: PersistentState | None = None,
        config: RaftConfig | None = None,
        rng: random.Random,
        group: int = 0,
    ) -> None:
        self.id = node_id
        self.cfg = config or RaftConfig()
        self.rng = rng
        self.group = group
        state = state or PersistentState()
        self.log = RaftLog(state.snapshot, state.entries)
        hs = state.hard_state
        self.term = hs.term
        self.vote: int | None = hs.vote
        # A stored commit beyond the stored log (log lost, hard state kept) is clamped.
        self.log.committed = max(self.log.offset, min(hs.commit, self.log.last_index()))
        self.log.applied = self.log.applying = self.log.offset
        self.role = Role.FOLLOWER
        # Configuration: the snapshot's, overridden by every configuration entry after it.
        self._conf_base = self.log.snapshot.meta.conf
        self._conf_log: list[tuple[int, ConfState]] = []
        self.conf = self._conf_base
        self._note_conf_entries(self.log.conf_changes_from(self.log.first_index()))

        self.lead: int | None = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_timeout = self.cfg.election_ticks
        self.votes: dict[int, bool] = {}
        self.prs: dict[int, Progress] = {}
        self.lead_transferee: int | None = None
        # Leader: followers found holding less than they acknowledged, as (follower, index it
        # acknowledged, index its log ends at now), noticed since the driver last took them.
        self.lost_acks: list[tuple[int, int, int]] = []
        self.pending_conf_index = 0
        self._reads: list[_ReadRequest] = []  # leader: reads awaiting a heartbeat quorum
        self._reads_waiting_commit: list[tuple[Any, int]] = []  # until our term commits
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self._bcast_pending = False
        # Leader lease bookkeeping: ticks since this node became leader, and per voter the
        # latest such tick stamped on a heartbeat it acknowledged.
        self._lease_clock = 0
        self._lease_acks: dict[int, int] = {}
        # A restarted node does not know when it last heard a leader; with lease reads it
        # behaves as if it just had, so that it cannot help elect a rival inside a lease.
        self._start_quiet = self.cfg.read_only == READ_LEASE
        # Quiescence: no timers run while quiesced; the leader counts idle ticks towards it.
        self.quiesced = False
        self._idle_ticks = 0

        self._prev_hard = HardState(self.term, self.vote, self.log.committed)
        self._prev_soft = SoftState(None, Role.FOLLOWER)
        self._outstanding: Ready | None = None
        self._reset_randomized_timeout()

    # ===== public queries ================================================================
    @property
    def leader_id(self) -> int | None:
        return self.lead

    @property
    def commit_index(self) -> int:
        return self.log.committed

    @property
    def applied_index(self) -> int:
        return self.log.applied

    def last_index(self) -> int:
        return self.log.last_index()

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def durable_hard_state(self) -> HardState:
        """The hard state handed out by the last advanced Ready: what the driver has persisted."""
        return self._prev_hard

    def conf_at(self, index: int) -> ConfState:
        """The configuration in force at log index ``index`` (for a snapshot taken there)."""
        return self._conf_at(index)

    def is_leader(self) -> bool:
        return self.role == Role.LEADER

    def progress(self, node_id: int) -> Progress | None:
        return self.prs.get(node_id)

    def conf_committed(self) -> bool:
        """Whether the latest configuration in the log is committed."""
        return self._conf_log_committed()

    def promotable(self) -> bool:
        return self.id in self.conf.voters

    # ===== time ===========================================================================
    def tick(self, *, heartbeat: bool | None = None) -> None:
        """Advance logical time by one tick.

        ``heartbeat`` lets the driver clock a leader's heartbeats itself (True: send them on
        this tick): a node hosting many groups beats them all on the same tick, so their
        heartbeats share one frame per peer and one wake-up of each peer. None: every
        ``heartbeat_ticks`` ticks since this group's own last heartbeat.
        """
        if self.quiesced:
            return  # nothing times out in a quiesced group (see wake())
        if self.role == Role.LEADER:
            self._tick_leader(heartbeat)
        else:
            self.election_elapsed += 1
            if self._start_quiet and self.election_elapsed >= self.cfg.election_ticks:
                # The post-restart quiet period is over. (Found by the simulator: a node that
                # stayed "quiet" while campaigning reset its timer at every pre-vote round and
                # so ignored every other candidate forever; no leader could be elected.)
                self._start_quiet = False
            if self.promotable() and self.election_elapsed >= self.randomized_timeout:
                self.election_elapsed = 0
                self._campaign(pre=self.cfg.pre_vote)

    def _tick_leader(self, heartbeat: bool | None) -> None:
        self._lease_clock += 1
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        for pid, pr in self.prs.items():
            if pr.state == ProgressState.SNAPSHOT and pid != self.id:
                pr.snapshot_elapsed += 1
        if self.election_elapsed >= self.cfg.election_ticks:
            self.election_elapsed = 0
            if self.cfg.check_quorum and not self._quorum_active():
                # Check-quorum: a leader that cannot hear a majority steps down, so that a
                # partitioned leader stops serving (and stops promising lease reads).
                self._become_follower(self.term, None)
                return
            if self.lead_transferee is not None:
                self.lead_transferee = None  # the transfer did not finish in time: abort it
        if heartbeat is None:
            heartbeat = self.heartbeat_elapsed >= self.cfg.heartbeat_ticks
        if heartbeat:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat(None)
        if self.cfg.quiesce_ticks:
            self._maybe_quiesce()

    # ===== quiescence ======================================================================
    def _maybe_quiesce(self) -> None:
        if not self._idle():
            self._idle_ticks = 0
            return
        self._idle_ticks += 1
        if self._idle_ticks < self.cfg.quiesce_ticks:
            return
        self.quiesced = True
        last = self.log.last_index()
        for pid, pr in self.prs.items():
            if pid != self.id:
                # As in a heartbeat, the commit index only up to what the member is known to
                # hold: one that stopped answering may hold a different entry there (found by
                # the simulator, seed 30030 "lease": a restarted node committed its own
                # uncommitted entry of an older term).
                self._send(
                    MsgType.QUIESCE, pid, index=last, log_term=self.log.term(last),
                    commit=min(pr.match, self.log.committed),
                )

    def _idle(self) -> bool:
        """Nothing left to do: every entry committed, applied, durable, and on every member
        that answers (one that stopped answering, e.g. a dead node, is caught up by the
        beat that wakes the group when its node speaks again)."""
        log = self.log
        last = log.last_index()
        if not (log.committed == log.applied == log.stabled == last):
            return False
        if self._reads or self._reads_waiting_commit or self.lead_transferee is not None:
            return False
        matched = {self.id}
        for pid, pr in self.prs.items():
            if pr.match == last and pr.state == ProgressState.REPLICATE:
                matched.add(pid)
            elif pr.recent_active and pid != self.id:
                return False  # a live member still catching up
        return len(matched & self.conf.voters) >= majority(len(self.conf.voters))

    def wake(self, *, silent_ticks: int = 0) -> None:
        """Leave quiescence: timers run again.

        A leader beats at once and forgets its lease and which followers it heard from (it
        heard nothing while quiesced), so check-quorum and lease reads start afresh. A
        follower's driver passes ``silent_ticks``, how long the leader's node has been
        silent, so that it campaigns as soon as an election timeout has passed.
        """
        if not self.quiesced:
            return
        self.quiesced = False
        self._idle_ticks = 0
        if self.role == Role.LEADER:
            self.election_elapsed = self.heartbeat_elapsed = 0
            self._lease_acks = {}
            for pid, pr in self.prs.items():
                pr.recent_active = pid == self.id
            self._bcast_heartbeat(None)
        else:
            self.election_elapsed = silent_ticks

    def _wakes(self, m: Message) -> bool:
        """Whether message ``m`` ends this node's quiescence."""
        if self.role == Role.LEADER:
            # Late answers to the last beats or appends ask for nothing.
            return not (m.type == MsgType.HEARTBEAT_RESP or (m.type == MsgType.APP_RESP and not m.reject))
        return m.type != MsgType.QUIESCE

    def _quorum_active(self) -> bool:
        active = {pid for pid, pr in self.prs.items() if pr.recent_active or pid == self.id}
        for pid, pr in self.prs.items():
            if pid != self.id:
                pr.recent_active = False
        voters = self.conf.voters
        return len(active & voters) >= majority(len(voters)) if voters else True

    # ===== proposals =======================================================================
    def propose(self, data: Any) -> tuple[int, int]:
        """Append a command to the leader's log; returns its (term, index).

        Raises NotLeader (with a leader hint) on a non-leader or during a leadership transfer.
        The command is committed when it comes back in ``Ready.committed_entries`` with the
        same term at that index; a different term there means it was lost.
        """
        self._check_can_propose()
        entry = Entry(self.term, self.log.last_index() + 1, EntryKind.NORMAL, data)
        self._append_local([entry])
        return entry.term, entry.index

    def propose_conf_change(self, cc: ConfChange) -> tuple[int, int]:
        """Propose one membership step; returns its (term, index) like ``propose``."""
        self._check_can_propose()
        if len(cc.changes) != 1:
            raise ConfChangeRejected("only single-server changes may be proposed")
        if self.pending_conf_index > self.log.committed:
            raise ConfChangeRejected(
                "a configuration change (or this leader's first entry) is not yet committed"
            )
        kind, node = cc.changes[0]
        conf = self.conf
        if kind == ConfChangeKind.ADD_NODE:
            if node in conf.voters:
                raise ConfChangeRejected(f"node {node} already votes")
            if node in conf.learners:
                pr = self.prs.get(node)
                if pr is None or pr.match < self.log.committed:
                    raise ConfChangeRejected(
                        f"learner {node} has not caught up (match "
                        f"{pr.match if pr else 0} < commit {self.log.committed})"
                    )
        elif kind == ConfChangeKind.ADD_LEARNER:
            if node in conf.members():
                raise ConfChangeRejected(f"node {node} is already a member")
        else:
            if node not in conf.members():
                raise ConfChangeRejected(f"node {node} is not a member")
            if conf.voters == {node}:
                raise ConfChangeRejected("cannot remove the last voter")
        entry = Entry(self.term, self.log.last_index() + 1, EntryKind.CONF_CHANGE, cc.to_wire())
        self._append_local([entry])
        self.pending_conf_index = entry.index
        return entry.term, entry.index

    def _check_can_propose(self) -> None:
        if self.role != Role.LEADER:
            raise NotLeader(self.lead)
        if self.lead_transferee is not None:
            raise NotLeader(self.lead_transferee, "leadership transfer in progress")
        self.wake()

    def _append_local(self, entries: list[Entry]) -> None:
        self.log.append(entries)
        if any(e.kind == EntryKind.CONF_CHANGE for e in entries):
            self._note_conf_entries(entries)
        self._bcast_pending = True  # sent in one batch at the next ready()

    # ===== reads ==========================================================================
    def read_index(self, context: Any) -> None:
        """Ask for a linearizable read; a ReadState with ``context`` appears in a later Ready.

        ``context`` must be hashable, msgpack-encodable and unique among outstanding reads.
        Reads that cannot complete (leader lost) never produce a ReadState: time them out.
        """
        if self.role == Role.LEADER:
            self.wake()
            self._leader_read(context, self.id)
        elif self.role == Role.FOLLOWER and self.lead is not None:
            self._send(MsgType.READ_INDEX, self.lead, context=context)
        else:
            raise NotLeader(self.lead, "no known leader to serve the read")

    def _leader_read(self, context: Any, origin: int) -> None:
        if self.log.term(self.log.committed) != self.term:
            # A new leader does not know the latest commit index until an entry of its own
            # term commits (thesis §6.4, step 1); hold the read until then.
            self._reads_waiting_commit.append((context, origin))
            return
        if self.conf.voters == {self.id} or self._lease_valid():
            self._release_read(self.log.committed, context, origin)
            return
        req = _ReadRequest(self.log.committed, context, origin)
        req.acks.add(self.id)
        self._reads.append(req)
        self._bcast_heartbeat(context)

    def _lease_valid(self) -> bool:
        """Whether no other leader can exist yet (thesis §6.4.1), by heartbeat acks and ticks.

        A voter that acknowledged a heartbeat stamped at lease tick s reset its election
        timer after s, so it will not vote for anyone else for election_ticks of its own
        ticks; with drift bounded, that outlasts lease_ticks of ours from s.
        """
        if self.cfg.read_only != READ_LEASE or self.lead_transferee is not None:
            return False
        voters = self.conf.voters
        if self.id not in voters:
            return False
        stamps = sorted(
            (self._lease_clock if v == self.id else self._lease_acks.get(v, -1) for v in voters),
            reverse=True,
        )
        quorum_stamp = stamps[majority(len(voters)) - 1]
        return quorum_stamp >= 0 and self._lease_clock - quorum_stamp < self.cfg.lease_ticks()

    def _release_read(self, index: int, context: Any, origin: int) -> None:
        if origin == self.id:
            self.read_states.append(ReadState(index, context))
        else:
            self._send(MsgType.READ_INDEX_RESP, origin, index=index, context=context)

    def _read_acked(self, context: Any, frm: int) -> None:
        for pos, req in enumerate(self._reads):
            if req.context == context:
                req.acks.add(frm)
                if len(req.acks & self.conf.voters) >= majority(len(self.conf.voters)):
                    # A quorum confirmed us leader after this read arrived; every earlier
                    # read is confirmed with it (they arrived even earlier).
                    done, self._reads = self._reads[: pos + 1], self._reads[pos + 1 :]
                    for r in done:
                        self._release_read(r.index, r.context, r.origin)
                return

    # ===== leadership transfer, compaction, reports ========================================
    def transfer_leadership(self, to: int) -> None:
        """Hand leadership to voter ``to`` once its log is up to date (thesis §3.10)."""
        if self.role != Role.LEADER:
            raise NotLeader(self.lead)
        if to == self.id or to not in self.conf.voters:
            return
        if self.lead_transferee == to:
            return
        self.wake()
        self.lead_transferee = to
        self.election_elapsed = 0  # give the transfer one election timeout to finish
        pr = self.prs[to]
        if pr.match == self.log.last_index():
            self._send(MsgType.TIMEOUT_NOW, to)
        else:
            self._send_append(to)

    def compact(self, index: int, data: Any) -> None:
        """The driver has durably stored a state-machine snapshot at ``index``: drop the log before.

        ``index`` must be applied already. The snapshot is kept to send to lagging followers;
        a leader keeps the entries a follower still needs, up to ``catch_up_entries`` of them.
        """
        if index <= self.log.snapshot.meta.index:
            return
        term = self.log.term(index)
        if term is None:
            raise RaftInvariantError(f"cannot compact to {index}: not in the log")
        meta = SnapshotMeta(index, term, self._conf_at(index))
        self.log.compact(meta, data, keep_after=self._compact_floor(index))
        self._conf_base = meta.conf
        self._conf_log = [(i, c) for i, c in self._conf_log if i > index]

    def _compact_floor(self, index: int) -> int:
        """How far a compaction at ``index`` drops the log: to the least a follower has
        matched, when this node leads, but keeping at most ``catch_up_entries`` more."""
        keep = self.cfg.catch_up_entries
        if self.role != Role.LEADER or keep == 0:
            return index
        behind = min((pr.match for pid, pr in self.prs.items() if pid != self.id), default=index)
        return max(behind, index - keep)

    def hold_snapshot_data(self, index: int, data: Any) -> None:
        """The driver stored the snapshot at ``index`` (one received from the leader, say):
        keep ``data`` for it instead, e.g. a handle to where it lies, so the image itself is
        not held in memory. Data is opaque here; a snapshot at another index is left alone."""
        snap = self.log.snapshot
        if snap.meta.index == index:
            self.log.snapshot = Snapshot(snap.meta, data)

    def report_unreachable(self, to: int) -> None:
        """The transport could not deliver to ``to``: stop pipelining to it."""
        pr = self.prs.get(to)
        if self.role == Role.LEADER and pr is not None and pr.state == ProgressState.REPLICATE:
            pr.become_probe()

    def report_snapshot(self, to: int, failed: bool) -> None:
        """The transport finished (or failed) sending a snapshot to ``to``."""
        pr = self.prs.get(to)
        if self.role != Role.LEADER or pr is None or pr.state != ProgressState.SNAPSHOT:
            return
        if failed:
            pr.pending_snapshot = 0
        pr.become_probe()
        pr.probe_sent = True  # wait for a heartbeat response before probing again

    # ===== the Ready cycle =================================================================
    def has_ready(self) -> bool:
        """Whether ready() would return work (False while a Ready is outstanding)."""
        if self._outstanding is not None:
            return False
        log = self.log
        if (
            self.msgs
            or self.read_states
            or log.unstable_snapshot is not None
            or log.stabled < log.last_index()
            or log.committed > log.applying
            or (self._bcast_pending and self.role == Role.LEADER)
        ):
            return True
        hard, soft = self._prev_hard, self._prev_soft
        return (
            hard.term != self.term or hard.vote != self.vote or hard.commit != log.committed
            or soft.leader != self.lead or soft.role != self.role
        )

    def ready(self) -> Ready:
        """Collect the work accumulated since the last Ready (call ``advance`` after)."""
        if self._outstanding is not None:
            raise RaftUsageError("advance() the previous Ready before asking for another")
        if self._bcast_pending:
            self._bcast_pending = False
            if self.role == Role.LEADER:
                self._bcast_append()
        hs = self.hard_state()
        soft = self._soft_state()
        snap = self.log.unstable_snapshot
        committed = self.log.next_committed(self.cfg.max_apply_entries)
        rd = Ready(
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hs if hs != self._prev_hard else None,
            snapshot=snap,
            entries=tuple(self.log.unstable_entries()),
            committed_entries=tuple(committed),
            read_states=tuple(self.read_states),
            messages=tuple(self.msgs),
        )
        self.msgs = []
        self.read_states = []
        if committed:
            self.log.applying = committed[-1].index
        elif snap is not None:
            self.log.applying = max(self.log.applying, snap.meta.index)
        if rd.soft_state is not None:
            self._prev_soft = soft
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied ``rd``."""
        if rd is not self._outstanding:
            raise RaftUsageError("advance() must be given the outstanding Ready")
        self._outstanding = None
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        if rd.snapshot is not None:
            if self.log.unstable_snapshot is rd.snapshot:
                self.log.unstable_snapshot = None
            self.log.applied_to(rd.snapshot.meta.index)
        if rd.entries:
            self.log.stable_to(rd.entries)
        if rd.committed_entries:
            self.log.applied_to(rd.committed_entries[-1].index)
        if self.role == Role.LEADER:
            pr = self.prs.get(self.id)
            if pr is not None:
                pr.maybe_update(self.log.stabled)
                # Followers learn the new commit index from the next append or heartbeat:
                # an empty append (and its ack) per commit would double the messages.
                self._maybe_commit()

    def _soft_state(self) -> SoftState:
        return SoftState(self.lead, self.role)

    # ===== stepping messages ===============================================================
    def step(self, m: Message) -> None:
        """Process one message from a peer."""
        if self.quiesced and self._wakes(m):
            self.wake()
        if m.term > self.term:
            if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
                force = m.context == CAMPAIGN_TRANSFER
                in_lease = (
                    self.cfg.check_quorum
                    and (self.lead is not None or self._start_quiet)
                    and self.election_elapsed < self.cfg.election_ticks
                )
                if in_lease and not force:
                    # We heard from a live leader within the election timeout: a candidate
                    # that cannot hear it must not depose it (thesis §4.2.3).
                    return
            if m.type == MsgType.PRE_VOTE:
                pass  # a pre-vote never changes our term
            elif m.type == MsgType.PRE_VOTE_RESP and not m.reject:
                pass  # a granted pre-vote comes back with the term we would campaign for
            elif m.type in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP, MsgType.QUIESCE):
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            if (self.cfg.check_quorum or self.cfg.pre_vote) and m.type in (
                MsgType.HEARTBEAT, MsgType.APP, MsgType.QUIESCE,
            ):
                # A stale leader (e.g. healed from a partition) learns our term and steps down;
                # without pre-vote the term would otherwise only come back via a vote request.
                self._send(MsgType.APP_RESP, m.frm)
            elif m.type == MsgType.PRE_VOTE:
                self._send(MsgType.PRE_VOTE_RESP, m.frm, reject=True)
            return

        if m.type in (MsgType.VOTE, MsgType.PRE_VOTE):
            self._handle_vote_request(m)
            return
        if self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role == Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type == MsgType.PRE_VOTE
        # Only a voter of its own latest configuration votes. A replica that joins a group
        # starts empty, as a learner: its node may have been a member before, with a log it
        # no longer has, and a stale candidate still using that older configuration would
        # count its vote and win without the entries committed since (found by the
        # transaction simulator, seed 1700263: two acknowledged commits lost).
        can_vote = self.promotable() and (
            self.vote == m.frm
            or (self.vote is None and self.lead is None)
            or (pre and m.term > self.term)
        )
        resp = MsgType.PRE_VOTE_RESP if pre else MsgType.VOTE_RESP
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # The grant of a real vote is in the hard state, which the driver persists
            # before this response leaves (Ready contract step 1).
            self._send(resp, m.frm, term=m.term)
            if not pre:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(resp, m.frm, reject=True)

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t == MsgType.APP:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_append(m)
        elif t == MsgType.HEARTBEAT:
            self.election_elapsed = 0
            self.lead = m.frm
            self.log.commit_to(min(m.commit, self.log.last_index()))
            self._send(MsgType.HEARTBEAT_RESP, m.frm, context=m.context, index=m.index)
        elif t == MsgType.QUIESCE:
            self.election_elapsed = 0
            self.lead = m.frm
            # Only a log equal to the leader's may stop waiting: a follower missing entries
            # (or holding a stale tail) keeps its timer, and its next campaign wakes the leader.
            last = self.log.last_index()
            self.quiesced = last == m.index and self.log.term(last) == m.log_term
            if self.quiesced:
                # Equal through the leader's last entry (Log Matching), and a leader quiesces
                # only with all of it committed: commit it all. ``m.commit`` stops at what
                # the leader knew this member held, so an ack still on its way when the
                # leader went quiet (simulator seed 200810, "crash") would leave this member
                # behind until the group woke again.
                self.log.commit_to(last)
            else:
                self.log.commit_to(min(m.commit, last))
        elif t == MsgType.SNAP:
            self.election_elapsed = 0
            self.lead = m.frm
            self._handle_snapshot(m)
        elif t == MsgType.TIMEOUT_NOW:
            if self.promotable():
                self._campaign(pre=False, transfer=True)
        elif t == MsgType.READ_INDEX_RESP:
            self.read_states.append(ReadState(m.index, m.context))
        elif t == MsgType.READ_INDEX:
            if self.lead is not None and self.lead != m.frm:
                self._send(MsgType.READ_INDEX, self.lead, context=m.context, frm_override=m.frm)

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (MsgType.APP, MsgType.HEARTBEAT, MsgType.SNAP, MsgType.QUIESCE):
            # Someone won this term (a pre-candidate: someone leads our current term).
            self._become_follower(m.term, m.frm)
            self._step_follower(m)
            return
        expected = MsgType.PRE_VOTE_RESP if self.role == Role.PRE_CANDIDATE else MsgType.VOTE_RESP
        if t != expected:
            return
        self.votes.setdefault(m.frm, not m.reject)
        result = vote_result(self.conf.voters, self.votes)
        if result == VoteResult.WON:
            if self.role == Role.PRE_CANDIDATE:
                self._campaign(pre=False)
            else:
                self._become_leader()
        elif result == VoteResult.LOST:
            self._become_follower(self.term, None)

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == MsgType.READ_INDEX:
            self._leader_read(m.context, m.frm)
            return
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        if t == MsgType.APP_RESP:
            pr.recent_active = True
            if m.reject:
                hint = m.hint
                if m.log_term > 0:
                    hint = self.log.find_conflict_by_term(m.hint, m.log_term)
                if m.index >= pr.match > m.hint:
                    # The follower refuses what follows an entry it acknowledged, its log
                    # ending before it. Asked again, if it still does, it lost written entries
                    # (a directory restored from an older copy, a disk that dropped writes):
                    # its match no longer holds, and appends after it would be refused for
                    # ever, so it is probed from scratch.
                    if pr.doubt_match():
                        self.lost_acks.append((m.frm, pr.match, m.hint))
                        pr.forget_match(hint)
                    self._send_append(m.frm)
                    return
                if pr.maybe_decr_to(m.index, hint):
                    if pr.state == ProgressState.REPLICATE:
                        pr.become_probe()
                    self._send_append(m.frm)
                return
            was_paused = pr.is_paused()
            if not pr.maybe_update(m.index):
                return
            if pr.state == ProgressState.PROBE:
                pr.become_replicate()
            elif pr.state == ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
                pr.become_probe()
                pr.become_replicate()
            elif pr.state == ProgressState.REPLICATE:
                pr.free_inflights_to(m.index)
            if self._maybe_commit() and self.role != Role.LEADER:
                return  # the commit removed us from the configuration
            if was_paused:
                self._send_append(m.frm)
            while self._send_append(m.frm, send_empty=False):
                pass  # pipeline: keep the follower's window full
            if m.frm == self.lead_transferee and pr.match == self.log.last_index():
                self._send(MsgType.TIMEOUT_NOW, m.frm)
        elif t == MsgType.HEARTBEAT_RESP:
            pr.recent_active = True
            if m.index > self._lease_acks.get(m.frm, -1):
                self._lease_acks[m.frm] = m.index
            pr.probe_sent = False
            if pr.state == ProgressState.REPLICATE and len(pr.inflights) >= pr.max_inflight:
                pr.inflights.popleft()
            if pr.state == ProgressState.SNAPSHOT and pr.snapshot_elapsed >= self.cfg.election_ticks:
                # The snapshot (or its answer) was probably lost: probe again.
                pr.become_probe()
            if pr.match < self.log.last_index():
                self._send_append(m.frm)
            if m.context is not None:
                self._read_acked(m.context, m.frm)

    # ===== follower handlers ===============================================================
    def _handle_append(self, m: Message) -> None:
        if m.index < self.log.committed:
            self._send(MsgType.APP_RESP, m.frm, index=self.log.committed)
            return
        result = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if result is not None:
            last_new, first_written = result
            if first_written:
                self._after_log_change(first_written)
            self._send(MsgType.APP_RESP, m.frm, index=last_new)
            return
        hint = self.log.find_conflict_by_term(min(m.index, self.log.last_index()), m.log_term)
        hint_term = self.log.term(hint) or 0
        self._send(MsgType.APP_RESP, m.frm, index=m.index, reject=True, hint=hint, log_term=hint_term)

    def _handle_snapshot(self, m: Message) -> None:
        snap = m.snapshot
        if snap is None:
            return
        meta = snap.meta
        if meta.index <= self.log.committed:
            self._send(MsgType.APP_RESP, m.frm, index=self.log.committed)
            return
        if self.log.match_term(meta.index, meta.term):
            # We hold the snapshot's last entry already: just fast-forward the commit.
            self.log.commit_to(meta.index)
            self._send(MsgType.APP_RESP, m.frm, index=self.log.committed)
            return
        self.log.restore(snap)
        self._conf_base = meta.conf
        self._conf_log = []
        self.conf = meta.conf
        self._send(MsgType.APP_RESP, m.frm, index=self.log.last_index())

    # ===== configuration ===================================================================
    def _note_conf_entries(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            if e.kind == EntryKind.CONF_CHANGE:
                prev = self._conf_log[-1][1] if self._conf_log else self._conf_base
                self._conf_log.append((e.index, ConfChange.from_wire(e.data).apply_to(prev)))
        self._set_conf(self._conf_log[-1][1] if self._conf_log else self._conf_base)

    def _after_log_change(self, first_changed: int) -> None:
        """Entries from ``first_changed`` on were (re)written: drop overwritten configurations."""
        while self._conf_log and self._conf_log[-1][0] >= first_changed:
            self._conf_log.pop()
        self._note_conf_entries(self.log.conf_changes_from(first_changed))

    def _conf_at(self, index: int) -> ConfState:
        conf = self._conf_base
        for i, c in self._conf_log:
            if i > index:
                break
            conf = c
        return conf

    def _set_conf(self, conf: ConfState) -> None:
        if conf == self.conf:
            return
        self.conf = conf
        if self.role != Role.LEADER:
            return
        members = conf.members() | {self.id}
        for pid in list(self.prs):
            if pid not in members:
                del self.prs[pid]
        for pid in members:
            if pid not in self.prs:
                self.prs[pid] = Progress(self.log.last_index() + 1, self.cfg.max_inflight)
        if self.lead_transferee is not None and self.lead_transferee not in conf.voters:
            self.lead_transferee = None
        self._bcast_pending = True
        if self._maybe_commit():
            self._bcast_pending = True

    # ===== role changes ====================================================================
    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.lead = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._reset_randomized_timeout()
        self.lead_transferee = None
        self.votes = {}
        self.prs = {}
        self._reads = []
        self._reads_waiting_commit = []
        self._bcast_pending = False
        self.pending_conf_index = 0
        self._lease_clock = 0
        self._lease_acks = {}
        self._start_quiet = False
        self.quiesced = False
        self._idle_ticks = 0

    def _reset_randomized_timeout(self) -> None:
        e = self.cfg.election_ticks
        self.randomized_timeout = e + self.rng.randrange(e)

    def _become_follower(self, term: int, lead: int | None) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.lead = lead

    def _become_leader(self) -> None:
        if self.role == Role.FOLLOWER:
            raise RaftInvariantError("a follower cannot become leader without an election")
        self._reset(self.term)
        self.role = Role.LEADER
        self.lead = self.id
        last = self.log.last_index()
        for pid in self.conf.members() | {self.id}:
            self.prs[pid] = Progress(last + 1, self.cfg.max_inflight)
        me = self.prs[self.id]
        me.match = self.log.stabled
        me.become_replicate()
        me.recent_active = True
        # An empty entry of the new term: committing it commits everything before it
        # (§5.4.2: only entries of the current term are committed by counting replicas).
        # Until it commits no configuration change may be proposed.
        self._append_local([Entry(self.term, last + 1, EntryKind.NORMAL, None)])
        self.pending_conf_index = last + 1

    def _campaign(self, pre: bool, transfer: bool = False) -> None:
        if not self.promotable():
            return
        if pre:
            self.role = Role.PRE_CANDIDATE
            self.lead = None
            self.votes = {}
            vote_type, term = MsgType.PRE_VOTE, self.term + 1
        else:
            self._reset(self.term + 1)
            self.role = Role.CANDIDATE
            self.vote = self.id
            vote_type, term = MsgType.VOTE, self.term
        self.votes[self.id] = True
        if vote_result(self.conf.voters, self.votes) == VoteResult.WON:
            if pre:
                self._campaign(pre=False, transfer=transfer)
            else:
                self._become_leader()
            return
        ctx = CAMPAIGN_TRANSFER if transfer else None
        for pid in sorted(self.conf.voters):
            if pid != self.id:
                self.msgs.append(Message(
                    vote_type, pid, self.id, term, log_term=self.log.last_term(),
                    index=self.log.last_index(), context=ctx, group=self.group,
                ))

    # ===== leader replication ==============================================================
    def _maybe_commit(self) -> bool:
        match = {pid: pr.match for pid, pr in self.prs.items()}
        index = committed_index(self.conf.voters, match)
        if index > self.log.committed and self.log.term(index) == self.term:
            self.log.commit_to(index)
            self._on_commit_advanced()
            return True
        return False

    def _on_commit_advanced(self) -> None:
        if self._reads_waiting_commit and self.log.term(self.log.committed) == self.term:
            waiting, self._reads_waiting_commit = self._reads_waiting_commit, []
            for ctx, origin in waiting:
                self._leader_read(ctx, origin)
        # A leader that the committed configuration removed steps down (thesis §4.2.2).
        if self.id not in self.conf.voters and self._conf_log_committed():
            self._become_follower(self.term, None)

    def _conf_log_committed(self) -> bool:
        return not self._conf_log or self._conf_log[-1][0] <= self.log.committed

    def _bcast_append(self) -> None:
        for pid in self.prs:
            if pid != self.id and self._send_append(pid):
                while self._send_append(pid, send_empty=False):
                    pass  # pipeline up to the inflight window

    def _bcast_heartbeat(self, context: Any) -> None:
        for pid, pr in self.prs.items():
            if pid != self.id:
                # ``index`` carries the lease clock; the response echoes it (lease reads).
                self._send(
                    MsgType.HEARTBEAT, pid, commit=min(pr.match, self.log.committed), context=context,
                    index=self._lease_clock,
                )

    def _send_append(self, to: int, send_empty: bool = True) -> bool:
        pr = self.prs[to]
        if pr.is_paused():
            return False
        prev_index = pr.next - 1
        prev_term = self.log.term(prev_index)
        if prev_term is None or pr.next <= self.log.offset:
            if not pr.recent_active:
                return False
            snap = self.log.snapshot
            self._send(MsgType.SNAP, to, snapshot=snap)
            pr.become_snapshot(snap.meta.index)
            return True
        entries = self.log.slice(
            pr.next, pr.next + self.cfg.max_batch_entries, self.cfg.max_batch_entries,
            self.cfg.max_batch_bytes,
        )
        if not entries and not send_empty:
            return False
        self._send(
            MsgType.APP, to, index=prev_index, log_term=prev_term, entries=tuple(entries),
            commit=self.log.committed,
        )
        pr.sent_append(entries[-1].index if entries else None)
        return True

    def _send(
        self,
        type_: MsgType,
        to: int,
        *,
        term: int | None = None,
        frm_override: int | None = None,
        **fields: Any,
    ) -> None:
        self.msgs.append(Message(
            type_, to, self.id if frm_override is None else frm_override,
            self.term if term is None else term, group=self.group, **fields,
        ))

    def __repr__(self) -> str:
        return (
            f"RaftNode(id={self.id}, role={self.role.name}, term={self.term}, lead={self.lead}, "
            f"last={self.log.last_index()}, commit={self.log.committed}, "
            f"applied={self.log.applied})"
        )
