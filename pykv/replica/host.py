"""ReplicaHost: every Raft group a node hosts, driven through one persist/send/apply/advance cycle.

The host is synchronous and owns no socket and no thread: the server's event loop calls

1. ``tick()`` every tick and ``step(msg)`` for every message that arrives;
2. ``collect()`` to take one Ready from every group that has work;
3. ``batch.early``: messages a *leader* may send before its own entries are
   durable (Raft thesis §10.2.1; pykv.raft.node explains why that is safe). Never a
   message of a group whose term or vote changed in this batch: those wait for step 4;
4. ``persist(batch)`` (blocking: run it off the loop) — snapshot files, then ONE WAL record
   for all groups, one fdatasync. Raft safety needs this before step 5: a vote or an append
   acknowledgement must never come from a node that could forget it in a crash;
5. ``batch.late``: every other message, sent only now (persist before send);
6. ``apply(batch)``: restore snapshots, apply committed entries to the shard state machines
   in log order, complete waiting proposals and reads, then ``advance`` every group. A
   driver may have snapshots restored off its thread (``restore_in_background``): such a
   group sits out the cycle until its restore is done.
   A durable state machine writes what it applied every ``flush_ticks`` ticks (or when
   much is pending), not every batch: the Raft log already holds it.

Requests complete through callbacks ``done(result, error)``, called on the loop thread.

Idle groups quiesce (``RaftConfig.quiesce_ticks``, see pykv.raft.node): they are not ticked
and send nothing; the host keeps the node liveness they rely on (pykv.raft.quiescence).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from pykv.cluster.shardmap import Step, StepKind
from pykv.errors import CorruptData, Error, ProtocolError, TransactionConflict, Unavailable
from pykv.raft.errors import ConfChangeRejected, NotLeader
from pykv.raft.messages import (
    ConfChange,
    ConfChangeKind,
    Entry,
    EntryKind,
    Message,
    MsgType,
    PersistentState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
)
from pykv.raft.node import RaftConfig, RaftNode, bootstrap_state
from pykv.raft.progress import ProgressState
from pykv.raft.quiescence import NodeLiveness
from pykv.replica.durable import GroupWork, NodeLog, open_image, snapshot_data
from pykv.replica.failpoints import failpoint
from pykv.replica.shard import ShardState, encode_command
from pykv.txn.model import EVERY_KEY, KeyRange

# The Raft change behind each membership step (a transfer is not one).
_CONF_KINDS = {
    StepKind.ADD_LEARNER: ConfChangeKind.ADD_LEARNER,
    StepKind.PROMOTE: ConfChangeKind.ADD_NODE,
    StepKind.REMOVE: ConfChangeKind.REMOVE_NODE,
}

Done = Callable[[Any, BaseException | None], None]


# A group's Raft log stays in memory until the group snapshots (about 500 bytes an entry in a
# transactional workload). A node keeps at most this many entries over all its groups,
# shared out by the partition count, so memory does not grow with the partitions (a leader
# may keep up to half as many again for a lagging follower: RaftConfig.catch_up_entries).
LOG_ENTRIES_PER_NODE = 256_000
# The node's WAL is shared by its groups, and a segment goes only once every group is done
# with it. A quiet group (the metadata group, a shard nobody writes) may never reach
# snapshot_every, so every this many ticks the groups that keep more than
# MAX_LOG_SEGMENTS segments alive are snapshotted, and the WAL stays bounded.
UNPIN_EVERY_TICKS = 100
MAX_LOG_SEGMENTS = 3
MIN_SNAPSHOT_EVERY = 1_000


def snapshot_every_for(partitions: int) -> int:
    """Applied entries between two snapshots of each group, for ``partitions`` shards."""
    return max(MIN_SNAPSHOT_EVERY, LOG_ENTRIES_PER_NODE // max(1, partitions))


@dataclass
class _Read:
    """A linearizable read waiting for its ReadIndex, then for the apply index to reach it."""

    fn: Callable[[ShardState], Any]  # runs against the state; returns the result
    # Keys that must not be locked by a prepared transaction, or for a scan (whose keys are
    # not known in advance) the range in which none may be: a read must not see half of a
    # decided two-phase commit.
    keys: tuple[str, ...] | KeyRange
    done: Done
    index: int = 0


@dataclass
class Group:
    """One Raft group member and its shard state machine."""

    gid: int
    raft: RaftNode
    state: ShardState
    pending: dict[int, tuple[int, Done, tuple[str, ...]]] = field(default_factory=dict)  # seq ->
    # (index, done, keys it writes)
    writing: dict[str, int] = field(default_factory=dict)  # key -> pending proposals writing it
    by_index: dict[int, int] = field(default_factory=dict)  # log index -> seq
    read_queue: list[_Read] = field(default_factory=list)  # not yet asked for a read index
    read_waiting: dict[int, list[_Read]] = field(default_factory=dict)  # ctx -> reads
    read_ready: list[_Read] = field(default_factory=list)  # index known; wait for apply/locks
    conf_pending: dict[int, tuple[int, Done]] = field(default_factory=dict)  # index -> (term, done)
    snapshot_index: int = 0
    sending: set[int] = field(default_factory=set)  # nodes a snapshot is travelling to
    # The Ready whose snapshot is being restored off the loop (restore_in_background): the
    # group takes no other Ready, and nothing but the restore touches its state, until then.
    restoring: Ready | None = None

    def status(self) -> dict:
        raft = self.raft
        info: dict[str, Any] = {
            "leader": raft.leader_id,
            "role": Role(raft.role).name.lower(),
            "term": raft.term,
            "commit": raft.commit_index,
            "last_index": raft.last_index(),
            "voters": sorted(raft.conf.voters),
            "learners": sorted(raft.conf.learners),
            "quiesced": raft.quiesced,
            "snapshot": self.snapshot_index,  # the log before it is compacted away
        }
        if self.restoring is not None:  # the state is being replaced: none of it to report
            info.update(applied=0, prepared=0, unfinished=0, keys=0, restoring=True)
        else:
            state = self.state
            info.update(applied=state.applied_index, prepared=len(state.prepared),
                        unfinished=len(state.unfinished),  # commits not yet applied everywhere
                        keys=state.key_count())
        if raft.is_leader():
            info["match"] = {
                str(n): raft.progress(n).match for n in raft.conf.members() if raft.progress(n)
            }
        return info


@dataclass
class Batch:
    """One collected round of Readies, its messages split once at collect time."""

    readies: list[tuple[Group, Ready]]
    early: list[Message] = field(default_factory=list)  # may go out before persist
    late: list[Message] = field(default_factory=list)  # only after persist

    def must_sync(self) -> bool:
        """Something to write to the WAL."""
        return any(rd.must_sync() for _, rd in self.readies)

    def must_wait(self) -> bool:
        """Something whose fsync must finish before sending and applying: entries, a
        snapshot, or a new term or vote. A hard state that only moves the commit index is
        written without waiting: a commit index lost in a crash is learnt again from the
        leader, and nothing a peer relies on depends on it.
        """
        return any(
            rd.entries or rd.snapshot is not None or not _term_unchanged(group, rd)
            for group, rd in self.readies
        )


class ReplicaHost:
    """All the groups of one node (see the module docstring for the cycle)."""

    def __init__(
        self,
        node_id: int,
        log: NodeLog,
        *,
        raft_config: RaftConfig | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = lambda: 0.0,
        snapshot_every: int = 50_000,
        state_factory: Callable[[int], ShardState] = ShardState,
        flush_ticks: int = 10,
    ) -> None:
        self.node_id = node_id
        self.log = log
        self.raft_config = raft_config or RaftConfig()
        self.rng = rng or random.Random(node_id)
        self.clock = clock
        self.snapshot_every = snapshot_every
        self.state_factory = state_factory
        # Every this many ticks each shard state writes what it applied since its last
        # write (a durable state batches the writes of many Ready batches into one).
        self.flush_ticks = flush_ticks
        self._ticks = 0
        self.groups: dict[int, Group] = {}
        # Groups removed while a background restore still writes into their storage: their
        # data goes once it ends, and the group is not hosted again before.
        self.leaving: dict[int, Group] = {}
        # Proposal ids are [incarnation, seq]: a restarted node never mistakes an old
        # entry for one of its new proposals.
        self.incarnation = self.rng.getrandbits(48)
        self._seq = 0
        self._read_ctx = 0
        # Groups that may have a Ready: stepped, proposed to, ticked or advanced since the
        # last collect. Asking only them keeps an idle node with many shards cheap.
        self._dirty: set[int] = set()
        # Node liveness for quiesced groups, and the KEEPALIVEs to send with the next batch.
        self.liveness = NodeLiveness(node_id, self.raft_config.election_ticks)
        self._keepalives: list[Message] = []
        self.on_role_change: Callable[[int, Role, int | None], None] | None = None
        # Called with (group, follower, index it acknowledged, index its log ends at now)
        # when a leader here finds a follower that lost entries it had acknowledged.
        self.on_lost_ack: Callable[[int, int, int, int], None] | None = None
        # Restoring a snapshot's image takes seconds per GB. With this hook the host hands
        # it over: ``restore_in_background(gid, work, then)`` runs ``work()`` elsewhere (a
        # thread), then calls ``then(error)`` back on the host's own thread; the node's
        # other groups go on meanwhile. Without it, apply() restores in place.
        self.restore_in_background: Callable[[int, Callable[[], None], Callable[[BaseException | None], None]], None] | None = None

    # --- groups -----------------------------------------------------------------------------

    def add_group(
        self,
        gid: int,
        voters: list[int] | None,
        state_type: Callable[[int], ShardState] | None = None,
    ) -> Group:
        """Host group ``gid``: restart it from the WAL, or found it with ``voters``.

        ``voters=None`` joins an existing group empty, to be filled by the leader (a new
        replica during a rebalance: it catches up from a snapshot or the log).
        """
        if gid in self.leaving:
            raise Unavailable(
                f"shard group {gid}: the replica that left this node is still being restored "
                "(its storage is in use); host it again once that ends"
            )
        state = self.log.persistent_state(gid)
        if state is None:
            state = bootstrap_state(voters) if voters else PersistentState()
            if voters:
                # Raft takes the founding configuration as already durable: make it so
                # before the group says anything, or a restart would find no members.
                self.log.persist([GroupWork(gid, state.hard_state, state.entries, None)])
        raft = RaftNode(self.node_id, state=state, config=self.raft_config, rng=self.rng, group=gid)
        sm = (state_type or self.state_factory)(gid)
        sm.clock = self.clock
        if state.snapshot is not None and sm.applied_index < state.snapshot.meta.index:
            # A durable state machine may already be past the snapshot: then it is kept.
            with open_image(state.snapshot.data) as image:
                if image is None:
                    raise CorruptData(
                        f"shard group {gid}: its storage is at index {sm.applied_index}, behind "
                        f"its snapshot at {state.snapshot.meta.index}, which keeps no image"
                    )
                sm.restore(image)
        # The snapshot's index, not the log's first index: a leader's may be lower
        # (RaftConfig.catch_up_entries), though a restarted log starts right after it.
        snapshot_index = raft.log.snapshot.meta.index
        if sm.durable and snapshot_index > 0:
            raft.hold_snapshot_data(snapshot_index, self._image_of(gid, sm))
        self.log.release(gid)  # the group holds its log now; the snapshot stays in its file
        group = Group(gid, raft, sm, snapshot_index=snapshot_index)
        self.groups[gid] = group
        self._dirty.add(gid)
        return group

    def remove_group(self, gid: int) -> None:
        """This node is no longer a member of ``gid``: stop hosting it and forget its data."""
        group = self.groups.pop(gid, None)
        if group is not None:
            self._fail_all(group, Unavailable(f"shard group {gid} left this node"))
            self.log.drop(gid)
            if group.restoring is not None:
                self.leaving[gid] = group  # _restored destroys it: the restore still writes there
            else:
                group.state.destroy()

    def members(self, gid: int) -> dict[str, Any]:
        """The group's members as its leader knows them (NotLeader elsewhere): leader,
        voters, learners, commit index and each member's match index (string keys)."""
        raft = self._leading(gid).raft
        match = {str(n): raft.progress(n).match for n in raft.conf.members() if raft.progress(n)}
        return {
            "leader": raft.leader_id, "voters": sorted(raft.conf.voters),
            "learners": sorted(raft.conf.learners), "commit": raft.commit_index, "match": match,
        }

    def change_membership(self, gid: int, step: Step, done: Done) -> None:
        """One membership step on the group's leader (NotLeader elsewhere); ``done`` once it
        is applied, or at once for a leadership transfer (which may still fail: the caller
        finds out from the members). A step Raft refuses for now raises Unavailable."""
        group = self._leading(gid)
        self._dirty.add(gid)
        if step.kind is StepKind.TRANSFER_LEADER:
            group.raft.transfer_leadership(step.node)
            done(None, None)
            return
        if step.kind is StepKind.ADD_LEARNER:
            # Snapshot first, so the learner catches up from a snapshot, not the whole log.
            self.snapshot_group(group)
        try:
            term, index = group.raft.propose_conf_change(ConfChange.single(_CONF_KINDS[step.kind], step.node))
        except ConfChangeRejected as exc:
            raise Unavailable(f"membership change refused for now: {exc}") from None
        group.conf_pending[index] = (term, done)

    def _leading(self, gid: int) -> Group:
        group = self._group(gid)
        if not group.raft.is_leader():
            raise NotLeader(group.raft.leader_id)
        return group

    # --- inputs -----------------------------------------------------------------------------

    def tick(self) -> None:
        self._ticks += 1
        self.liveness.tick()
        flush = self._ticks % self.flush_ticks == 0
        # Every leader here beats on the same tick: one frame per peer carries them all.
        beat = self._ticks % self.raft_config.heartbeat_ticks == 0
        dirty = self._dirty
        for gid, group in self.groups.items():
            raft = group.raft
            if flush and group.restoring is None:
                group.state.flush()
            if raft.quiesced:
                if beat and self.liveness.watch(raft):
                    dirty.add(gid)
                continue
            # Most ticks of most groups only move a timer: such a group needs no Ready, and
            # asking it for one on every tick is what an idle node with many shards pays.
            sent, role = len(raft.msgs), raft.role
            raft.tick(heartbeat=beat)
            if len(raft.msgs) != sent or raft.role is not role:
                dirty.add(gid)
        if beat:
            self._keepalives += self.liveness.keepalives()
        if self._ticks % UNPIN_EVERY_TICKS == 0:
            self._unpin_log()

    def _unpin_log(self) -> None:
        """Snapshot the groups whose oldest entries keep old WAL segments alive."""
        for gid in self.log.pinning(MAX_LOG_SEGMENTS):
            group = self.groups.get(gid)
            if group is not None and group.restoring is None and not group.sending:
                self.snapshot_group(group)

    def step(self, msg: Message) -> bool:
        """Deliver a message to its group; False when this node does not host the group."""
        if self.liveness.heard(msg.frm):
            rafts = (group.raft for group in self.groups.values())
            self._dirty.update(raft.group for raft in self.liveness.returned(msg.frm, rafts))
        if msg.type == MsgType.KEEPALIVE:
            return True
        group = self.groups.get(msg.group)
        if group is None:
            return False
        group.raft.step(msg)
        self._dirty.add(msg.group)
        return True

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def propose(
        self, gid: int, tag: str, args: list, done: Done, writes: tuple[str, ...] = ()
    ) -> None:
        """Propose a shard command; ``done(result, None)`` once applied, or an error.

        ``writes``: the keys the command may write; optimistic reads of them wait until it
        is applied (see read_now). Raises NotLeader (with a hint) when this node does not
        lead the group, and Unavailable when it does not host it.
        """
        group = self._group(gid)
        seq = self._next_seq()
        data = encode_command(tag, [self.incarnation, seq], *args)
        _, index = group.raft.propose(data)
        self._dirty.add(gid)
        group.pending[seq] = (index, done, writes)
        group.by_index[index] = seq
        for key in writes:
            group.writing[key] = group.writing.get(key, 0) + 1

    def read(
        self, gid: int, fn: Callable[[ShardState], Any], keys: tuple[str, ...] | KeyRange, done: Done
    ) -> None:
        """Run ``fn(state)`` as a linearizable read on the leader (ReadIndex), then ``done``."""
        group = self._leading(gid)
        group.read_queue.append(_Read(fn, keys, done))
        self._dirty.add(gid)

    def read_now(self, gid: int, fn: Callable[[ShardState], Any], keys: tuple[str, ...]) -> tuple[bool, Any]:
        """An optimistic read: ``(True, fn(state))`` at once on the leader, with no leadership
        round, so it may be stale after a partition (whoever asks validates it later).
        ``(False, None)`` when it should wait, as a linearizable read does: the state is behind
        the commit index, or a prepared transaction may still change one of the keys.
        """
        group = self._leading(gid)
        if (
            group.state.applied_index < group.raft.commit_index
            or any(k in group.writing for k in keys)
            or self._read_blocked(group.state, keys)
        ):
            return False, None
        return True, fn(group.state)

    def exports_under_way(self) -> int:
        """Exports (of backups and busy scans) begun on this node's replicas and not yet read."""
        return sum(g.state.exports.under_way for g in self.groups.values() if g.restoring is None)

    def export(self, gid: int, export_id: int, step: str, page_bytes: int, done: Done,
               key_range: KeyRange = EVERY_KEY, page: int = 0) -> None:
        """A reader's EXPORT of ``key_range`` of the group's shard (a backup's, or a consistent
        scan's: pykv.replica.imaging.Exports), answered with ``done([this node's id, page,
        more?] or None, error)``: "begin" as a linearizable read of the range, once no
        prepared transaction holds a key of it (the reader holds a lock on the range
        meanwhile), so every shard's view is of the same moment, answered [this node's id,
        [], True, the shard's resolvers {prefix: built-in name} then] (what a backup keeps of
        them); "next" and "end" on this node's replica, which holds the view ("next" asks for
        page number ``page``)."""
        node_id = self.node_id
        if step == "begin":
            self.read(gid, lambda state: [node_id, *state.begin_export(export_id, page_bytes, key_range),
                                          dict(state.resolver_names)], key_range, done)
            return
        group = self.groups.get(gid)
        try:
            if group is None or group.restoring is not None:  # (restoring: the state is the
                # restore thread's until it ends, and it replaces what the export viewed)
                raise TransactionConflict(f"shard {gid}: node {node_id} no longer hosts it or is "
                                          "replacing it by a snapshot; its export is gone: read again")
            if step == "next":
                done([node_id, *group.state.export_page(export_id, page)], None)
            elif step == "end":
                group.state.exports.end(export_id)
                done(None, None)
            else:
                raise ProtocolError(f"EXPORT step must be begin, next or end, not {step!r}")
        except Error as exc:
            done(None, exc)

    def _group(self, gid: int) -> Group:
        group = self.groups.get(gid)
        if group is None:
            raise Unavailable(f"node {self.node_id} does not host shard group {gid}")
        return group

    def leader_of(self, gid: int) -> int | None:
        group = self.groups.get(gid)
        return None if group is None else group.raft.leader_id

    # --- the cycle --------------------------------------------------------------------------

    def _flush_reads(self) -> None:
        """Ask one read index per group for every read queued since the last round."""
        for gid in self._dirty:
            group = self.groups.get(gid)
            if group is None or not group.read_queue:
                continue
            reads, group.read_queue = group.read_queue, []
            self._read_ctx += 1
            ctx = self._read_ctx
            try:
                group.raft.read_index(ctx)
            except NotLeader as exc:
                for r in reads:
                    r.done(None, exc)
                continue
            group.read_waiting[ctx] = reads

    def collect(self, *, load_snapshots: bool = True) -> Batch:
        """Every group's Ready, and the messages to send before and after persisting.

        An InstallSnapshot message carries its image, made or read now; with
        ``load_snapshots=False`` it carries the handle instead, for a driver that streams
        the image itself (pykv.server.snapshots) and so reads it once per transfer.
        """
        self._flush_reads()
        batch = Batch([], early=self._keepalives)
        self._keepalives = []
        dirty, self._dirty = self._dirty, set()
        for gid in dirty:
            group = self.groups.get(gid)
            if group is not None and group.raft.lost_acks:
                self._report_lost_acks(gid, group.raft.lost_acks)
            if group is None or group.restoring is not None or not group.raft.has_ready():
                continue
            rd = group.raft.ready()
            batch.readies.append((group, rd))
            messages = rd.messages
            if load_snapshots and any(m.snapshot is not None for m in messages):
                messages = [_with_snapshot_data(m) for m in messages]
            # Only a leader in a term (and vote) that is already durable may send before
            # persisting (thesis §10.2.1); decided now, since the role may change while
            # the batch is being persisted.
            if group.raft.role == Role.LEADER and _term_unchanged(group, rd) and rd.snapshot is None:
                batch.early.extend(messages)
            else:
                batch.late.extend(messages)
        return batch

    def _report_lost_acks(self, gid: int, lost: list[tuple[int, int, int]]) -> None:
        for follower, acknowledged, ends in lost:
            if self.on_lost_ack is not None:
                self.on_lost_ack(gid, follower, acknowledged, ends)
        lost.clear()

    def snapshot_sending(self, gid: int, to: int, sending: bool) -> None:
        """A snapshot of group ``gid`` started (or stopped) travelling to node ``to``.

        While one travels, the group's log is not compacted: the follower resumes from the
        entries after the snapshot's index, and if they were gone by the time it arrived
        it would need another snapshot, and so on for ever while writes continue.
        """
        group = self.groups.get(gid)
        if group is None:
            return
        if sending:
            group.sending.add(to)
        else:
            group.sending.discard(to)
            self._dirty.add(gid)

    def snapshot_failed(self, gid: int, to: int) -> None:
        """Sending group ``gid``'s snapshot to node ``to`` broke off: Raft probes it again."""
        group = self.groups.get(gid)
        if group is not None:
            group.raft.report_snapshot(to, failed=True)
            self._dirty.add(gid)

    def persist(self, batch: Batch, *, wait: bool = True) -> None:
        """Write the batch to the WAL; with ``wait``, block until it is fsync'd.

        Touches no Raft node, so it may run on a worker thread while the loop goes on.
        """
        work = [
            GroupWork(group.gid, rd.hard_state, rd.entries, rd.snapshot)
            for group, rd in batch.readies
            if rd.must_sync()
        ]
        if work:
            self.log.persist(work, wait=wait)
        if wait:
            failpoint("replica.after_persist")

    def apply(self, batch: Batch) -> None:
        """Apply every group's committed entries and reads, then advance every group."""
        for group, rd in batch.readies:
            if self._restores_later(group, rd):
                continue
            try:
                self._apply_group(group, rd)
            finally:
                self._advance(group, rd)
            self._maybe_snapshot(group)

    def _advance(self, group: Group, rd: Ready) -> None:
        group.raft.advance(rd)
        self._dirty.add(group.gid)  # advancing may commit more, or apply more

    def _apply_group(self, group: Group, rd: Ready) -> None:
        if _installs(rd):
            self._restore(group, rd)
            self._installed(group, rd)
        self._apply_ready(group, rd)

    def _restores_later(self, group: Group, rd: Ready) -> bool:
        """Hand the restore of ``rd``'s snapshot over to restore_in_background, if set: the
        rest of the Ready is applied, and the group advanced, once it is done (_restored).
        Only a durable state's: the node reads the metadata group's state (the shard map,
        in memory and small) on its own thread at any time."""
        if self.restore_in_background is None or not group.state.durable or not _installs(rd):
            return False
        group.restoring = rd
        self.restore_in_background(
            group.gid, partial(self._restore, group, rd), partial(self._restored, group, rd)
        )
        return True

    def _restore(self, group: Group, rd: Ready) -> None:
        """Replace the group's state with the image of ``rd``'s snapshot (persisted already)."""
        assert rd.snapshot is not None
        with open_image(rd.snapshot.data) as image:
            if image is None:
                raise CorruptData(f"shard group {group.gid}: a snapshot to install has no image")
            group.state.restore(image)  # streamed: the image may not fit in memory

    def _restored(self, group: Group, rd: Ready, error: BaseException | None) -> None:
        """The background restore of ``rd`` ended: finish applying it (or raise its error:
        a replica whose state is half replaced must not go on)."""
        group.restoring = None
        if self.leaving.get(group.gid) is group:
            del self.leaving[group.gid]
            group.state.destroy()
            return
        if error is not None:
            raise error
        try:
            self._installed(group, rd)
            self._apply_ready(group, rd)
        finally:
            self._advance(group, rd)
        self._maybe_snapshot(group)

    def _installed(self, group: Group, rd: Ready) -> None:
        """The state holds ``rd``'s snapshot now: Raft's log and files follow."""
        assert rd.snapshot is not None
        index = rd.snapshot.meta.index
        group.snapshot_index = index
        self.log.compacted(group.gid, index)
        # Persisted before apply: Raft may hold a handle instead of the image.
        if group.state.durable:
            # restore() made the storage durable at index: it is the snapshot now, and
            # the copy of the image in the snapshot file (kept for a crash before the
            # restore) can go, as local compaction writes none.
            self.log.save_snapshot(group.gid, Snapshot(rd.snapshot.meta, None))
            held: Any = self._image_of(group.gid, group.state)
        else:
            held = self.log.snapshot_file(group.gid, index)
        group.raft.hold_snapshot_data(index, held)
        failpoint("replica.after_snapshot_install")

    def _apply_ready(self, group: Group, rd: Ready) -> None:
        """Apply the Ready's committed entries, serve its reads, report a role change."""
        self._apply_entries(group, rd.committed_entries)
        for rs in rd.read_states:
            reads = group.read_waiting.pop(rs.context, None)
            if reads:
                for r in reads:
                    r.index = rs.index
                group.read_ready.extend(reads)
        if group.read_ready:
            self._serve_reads(group)
        if rd.soft_state is not None:
            group.state.set_leading(rd.soft_state.role == Role.LEADER)
            if rd.soft_state.role != Role.LEADER:
                self._fail_all(group, NotLeader(rd.soft_state.leader, "leadership changed"))
            if self.on_role_change is not None:
                self.on_role_change(group.gid, rd.soft_state.role, rd.soft_state.leader)

    def _apply_entries(self, group: Group, entries: Iterable[Entry]) -> None:
        state = group.state
        for entry in entries:
            if entry.index <= state.applied_index:
                continue  # already in the restored snapshot
            if entry.kind != EntryKind.NORMAL or entry.data is None:
                state.applied_index = entry.index
                self._complete_index(group, entry.index, None, None)
                waiting = group.conf_pending.pop(entry.index, None)
                if waiting is not None:
                    if waiting[0] == entry.term:
                        waiting[1](None, None)
                    else:
                        waiting[1](None, NotLeader(group.raft.leader_id, "the change was lost"))
                continue
            proposal, result = state.apply(entry.index, entry.data)
            seq = None
            if isinstance(proposal, list) and len(proposal) == 2 and proposal[0] == self.incarnation:
                seq = proposal[1]
            self._complete_index(group, entry.index, seq, result)
        state.batch_applied()  # a durable state writes many batches as one record

    def _image_of(self, gid: int, state: ShardState) -> StateImage:
        return StateImage(state, partial(self.image_parts, gid))

    def image_parts(self, gid: int) -> Iterator[bytes]:
        """The group's state image a part at a time (ShardState.snapshot_parts), for a
        driver that writes it out between other work: commands go on being applied, and
        the image stays the state's as it was when the first part was taken (copy on
        write). Raises CorruptData if the group leaves, or its state is replaced (a
        snapshot installed), meanwhile."""
        group = self._group(gid)
        for part in group.state.snapshot_parts():
            yield part
            if self.groups.get(gid) is not group:
                raise CorruptData(f"shard group {gid} left this node while it was imaged")

    def _complete_index(self, group: Group, index: int, seq: int | None, result: Any) -> None:
        expected = group.by_index.pop(index, None)
        if expected is not None and expected != seq:
            # Another leader's entry took this index: our proposal was lost.
            lost = group.pending.pop(expected, None)
            if lost is not None:
                _written(group, lost[2])
                lost[1](None, NotLeader(group.raft.leader_id, "the proposal was lost"))
        if seq is not None:
            waiting = group.pending.pop(seq, None)
            if waiting is not None:
                _written(group, waiting[2])
                waiting[1](result, None)

    def _serve_reads(self, group: Group) -> None:
        applied = group.state.applied_index
        still = []
        for r in group.read_ready:
            if r.index > applied or self._read_blocked(group.state, r.keys):
                still.append(r)  # wait for the apply index, or for a prepared txn to finish
                continue
            try:
                result = r.fn(group.state)
            except Exception as exc:  # noqa: BLE001 - reported to the requester
                r.done(None, exc)
            else:
                r.done(result, None)
        group.read_ready = still

    @staticmethod
    def _read_blocked(state: ShardState, keys: tuple[str, ...] | KeyRange) -> bool:
        if isinstance(keys, KeyRange):  # a scan (a KeyRange is a tuple too: test it first)
            return state.range_locked(keys)
        return any(state.locked(k) for k in keys)

    def _fail_all(self, group: Group, exc: BaseException) -> None:
        pending, group.pending, group.by_index = group.pending, {}, {}
        group.writing = {}
        for _, done, _ in pending.values():
            done(None, exc)
        conf, group.conf_pending = group.conf_pending, {}
        for _, done in conf.values():
            done(None, exc)
        waiting = [r for reads in group.read_waiting.values() for r in reads]
        waiting += group.read_queue + group.read_ready
        group.read_waiting, group.read_queue, group.read_ready = {}, [], []
        for r in waiting:
            r.done(None, exc)

    def _maybe_snapshot(self, group: Group) -> None:
        if group.sending:
            return  # a snapshot is on its way: compacted once it has arrived
        applied = group.state.applied_index
        since = applied - group.snapshot_index
        if since < self.snapshot_every:
            return
        if since < 2 * self.snapshot_every and _installing(group.raft):
            # A follower is installing a snapshot that has arrived: leave it the entries
            # after it a while longer, within twice the usual log (it may never answer).
            return
        self.snapshot_group(group)

    def snapshot_group(self, group: Group) -> bool:
        """Snapshot the state machine durably, then let Raft drop the log before it; False
        if there is nothing new to snapshot."""
        index = group.state.applied_index
        term = group.raft.log.term(index)
        if term is None or index <= group.snapshot_index or group.raft.applied_index < index:
            # The last case: a restarted durable state is past what Raft has handed out
            # again so far, and Raft compacts only what it has applied.
            return False
        group.state.make_durable()  # the log below index may go only once the state is safe
        meta = SnapshotMeta(index, term, group.raft.conf_at(index))
        if group.state.durable:
            # Its storage, durable up to index now, is the snapshot: no image is written.
            self.log.save_snapshot(group.gid, Snapshot(meta, None))
            held: Any = self._image_of(group.gid, group.state)
        else:
            held = self.log.save_snapshot(group.gid, Snapshot(meta, group.state.snapshot()))
        group.raft.compact(index, held)  # a handle: the image is not kept in memory
        group.snapshot_index = index
        self.log.compacted(group.gid, index)
        self.log.truncate()
        return True

    # --- diagnostics --------------------------------------------------------------------------

    def close(self) -> None:
        for group in self.groups.values():
            group.state.close()

    def status(self) -> dict[int, dict]:
        return {gid: g.status() for gid, g in sorted(self.groups.items())}


def _installs(rd: Ready) -> bool:
    """Whether the Ready carries a snapshot to restore the state machine from."""
    return rd.snapshot is not None and rd.snapshot.data is not None


@dataclass(frozen=True)
class StateImage:
    """The snapshot of a durable state machine, made from the live state when a lagging
    replica needs it rather than kept. It is the state at its applied index, at or past the
    snapshot's own index: the receiver restores it and skips the log entries it covers
    (``_apply_group``), which the leader's log still holds."""

    state: ShardState
    # The host's image_parts for the group: the image a part at a time (copy on write).
    parts: Callable[[], Iterator[bytes]] | None = None

    def load(self) -> bytes:
        return self.state.snapshot()



def _with_snapshot_data(msg: Message) -> Message:
    """An InstallSnapshot message with its image loaded (Raft holds a handle to the file)."""
    snap = msg.snapshot
    if snap is None or snap.data is None:
        return msg
    return replace(msg, snapshot=Snapshot(snap.meta, snapshot_data(snap.data)))


def _written(group: Group, keys: tuple[str, ...]) -> None:
    """A proposal that writes ``keys`` is applied (or lost): optimistic reads may see them."""
    writing = group.writing
    for key in keys:
        left = writing.pop(key) - 1
        if left:
            writing[key] = left


def _installing(raft: RaftNode) -> bool:
    """Whether, as leader, raft waits for a follower to install a snapshot it was sent."""
    if not raft.is_leader():
        return False
    return any(
        (pr := raft.progress(n)) is not None and pr.state == ProgressState.SNAPSHOT
        for n in raft.conf.members() if n != raft.id
    )


def _term_unchanged(group: Group, rd: Ready) -> bool:
    hs = rd.hard_state
    if hs is None:
        return True
    prev = group.raft.durable_hard_state()  # already durable before this Ready
    return hs.term == prev.term and hs.vote == prev.vote

