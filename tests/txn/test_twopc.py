"""Two-phase commit state machines driven by an in-test message loop over several shards."""

from __future__ import annotations

import random

import pytest

from pykv.codec import pack, unpack
from pykv.errors import InvalidOperation, ProtocolError, TransactionAborted, TransactionConflict
from pykv.txn import (
    MISSING,
    CommitRequest,
    DictState,
    Isolation,
    ResolverRegistry,
    Versioned,
    WriteOp,
)
from pykv.txn.twopc import (
    Apply,
    CoordinatorLog,
    Decided,
    Decision,
    DecisionAck,
    Participant,
    Prepare,
    QueryDecision,
    Send,
    TxnStatus,
    Vote,
    error_from,
    message_from_wire,
    message_to_wire,
    plan_commit,
    split_by_shard,
)
from pykv.types import OpKind

TIMEOUT = 100
RETENTION = 1_000


def shard_of(key: str) -> int:
    """Keys are "<shard>/<name>" in these tests."""
    return int(key.split("/", 1)[0])


class Shard:
    """One shard's replicated machines and its committed data."""

    def __init__(self, shard_id: int, resolvers: ResolverRegistry) -> None:
        self.id = shard_id
        self.participant = Participant(
            shard_id, resolvers, prepare_timeout=TIMEOUT, retention=RETENTION
        )
        self.coordinator = CoordinatorLog(shard_id, vote_timeout=TIMEOUT, retention=RETENTION)
        self.state = DictState()


class Net:
    """Delivers Sends between shards and performs the effects, as replica drivers would."""

    def __init__(self, shard_ids=(1, 2, 3), resolvers=None) -> None:
        resolvers = resolvers or ResolverRegistry()
        self.shards = {i: Shard(i, resolvers) for i in shard_ids}
        self.queue: list[Send] = []
        self.decided: dict[int, list[Decided]] = {}
        self.applied: list[tuple[int, int]] = []  # (shard, txid)
        self.now = 0

    def effects(self, shard_id: int, effects) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self.queue.append(effect)
            elif isinstance(effect, Apply):
                self.shards[shard_id].state.apply(effect.updates)
                self.applied.append((shard_id, effect.txid))
            else:
                assert isinstance(effect, Decided)
                self.decided.setdefault(effect.txid, []).append(effect)

    def deliver(self, send: Send) -> None:
        # every message crosses the wire encoded, as it would between processes
        message = message_from_wire(unpack(pack(message_to_wire(send.message))))
        shard = self.shards[send.to_shard]
        if isinstance(message, Prepare):
            effects = shard.participant.on_prepare(message, shard.state, self.now)
        elif isinstance(message, Decision):
            effects = shard.participant.on_decision(message, self.now)
        elif isinstance(message, Vote):
            effects = shard.coordinator.on_vote(message, self.now)
        elif isinstance(message, QueryDecision):
            effects = shard.coordinator.on_query(message, self.now)
        else:
            effects = shard.coordinator.on_ack(message, self.now)
        self.effects(shard.id, effects)

    def run(self, keep=lambda send: True) -> list[Send]:
        """Deliver until quiet; messages ``keep`` refuses are dropped (and returned)."""
        dropped = []
        while self.queue:
            send = self.queue.pop(0)
            if keep(send):
                self.deliver(send)
            else:
                dropped.append(send)
        return dropped

    def begin(self, request: CommitRequest) -> int:
        coordinator, sends = plan_commit(request, shard_of)
        self.queue.extend(sends)
        return coordinator

    def tick(self, dt: int) -> None:
        """Time passes; in-doubt participants ask their coordinator."""
        self.now += dt
        for shard in self.shards.values():
            self.effects(shard.id, shard.participant.expired(self.now))

    def get(self, key: str) -> Versioned:
        return self.shards[shard_of(key)].state.get(key)

    def value(self, key: str):
        return self.get(key).value

    def seed(self, **values) -> None:
        for name, value in values.items():
            key = name.replace("_", "/", 1)
            shard = self.shards[shard_of(key)]
            request = CommitRequest(0, 99, {}, (WriteOp(key, OpKind.PUT, value),))
            shard.state.apply(shard.participant.apply_single(request, shard.state))

    def outcome(self, txid: int) -> bool:
        (decided,) = {(d.commit, d.error) for d in self.decided[txid]}
        return decided[0]


def request(txid, net, reads=(), writes=(), timestamp=None, isolation=Isolation.SERIALIZABLE):
    """A request that read ``reads`` now and buffers ``writes`` ((key, kind, arg) tuples)."""
    observed = {key: net.get(key) for key in reads}
    ops = tuple(WriteOp(key, kind, arg, observed.get(key)) for key, kind, arg in writes)
    return CommitRequest(txid, 7, observed, ops, isolation, timestamp or 1_000 + txid)


def transfer(txid, net, source, target, amount, timestamp=None):
    """Move ``amount`` from source to target (a read-modify-write on both)."""
    writes = (
        (source, OpKind.PUT, net.value(source) - amount),
        (target, OpKind.PUT, net.value(target) + amount),
    )
    return request(txid, net, (source, target), writes, timestamp)


def no_locks_left(net: Net) -> bool:
    """No prepared transaction remains and no key is locked on any shard."""
    return all(
        not shard.participant.prepared and len(shard.participant.locks) == 0
        for shard in net.shards.values()
    )


# --- planning --------------------------------------------------------------------------------


def test_plan_splits_reads_and_writes_by_shard_and_picks_the_first_written_keys_shard():
    net = Net()
    req = request(
        1, net, reads=("1/a", "3/c"), writes=(("2/b", OpKind.PUT, 1), ("1/a", OpKind.INCR, 1))
    )
    parts = split_by_shard(req, shard_of)
    assert set(parts) == {1, 2, 3}
    assert list(parts[1].reads) == ["1/a"] and [op.key for op in parts[1].writes] == ["1/a"]
    assert not parts[3].writes and list(parts[3].reads) == ["3/c"]
    coordinator, sends = plan_commit(req, shard_of)
    assert coordinator == 2
    assert {s.to_shard for s in sends} == {1, 2, 3}
    assert all(s.message.participants == (2, 1, 3) for s in sends)


# --- the happy path and NO votes ------------------------------------------------------------


def test_all_yes_votes_commit_on_every_participant():
    net = Net()
    net.seed(**{"1_alice": 100, "2_bob": 5})
    net.begin(transfer(1, net, "1/alice", "2/bob", 30))
    net.run()
    assert net.outcome(1) is True
    assert (net.value("1/alice"), net.value("2/bob")) == (70, 35)
    assert sorted(net.applied) == [(1, 1), (2, 1)]
    assert no_locks_left(net)
    coordinator = net.shards[1].coordinator
    assert coordinator.outcome(1) is TxnStatus.COMMITTED
    assert coordinator.unacknowledged() == []
    net.now += RETENTION
    assert coordinator.collect_garbage(net.now) == 1
    assert coordinator.outcome(1) is None


def test_one_no_vote_aborts_everywhere_and_names_the_error():
    net = Net()
    net.seed(**{"1_alice": 100, "2_bob": 5})
    stale = transfer(1, net, "1/alice", "2/bob", 30)
    net.seed(**{"2_bob": 6})  # bob changed after the transaction read him
    net.begin(stale)
    net.run()
    assert net.outcome(1) is False
    assert (net.value("1/alice"), net.value("2/bob")) == (100, 6)
    assert net.applied == []
    assert no_locks_left(net)
    (decided,) = set(net.decided[1])
    assert isinstance(error_from(decided.error, decided.reason), TransactionConflict)


def test_an_invalid_operation_on_one_shard_surfaces_as_that_error():
    net = Net()
    net.seed(**{"1_n": 1, "2_s": "text"})
    net.begin(request(1, net, writes=(("1/n", OpKind.INCR, 1), ("2/s", OpKind.INCR, 1))))
    net.run()
    (decided,) = set(net.decided[1])
    assert not decided.commit
    assert isinstance(error_from(decided.error, decided.reason), InvalidOperation)
    assert net.value("1/n") == 1
    assert isinstance(error_from("NoSuchError", "x"), TransactionAborted)


# --- locks of prepared, undecided transactions ----------------------------------------------


def test_prepared_locks_refuse_conflicting_work_without_waiting():
    net = Net()
    net.seed(**{"1_a": 1, "1_r": 1, "1_free": 1, "2_b": 1})
    net.begin(
        request(1, net, reads=("1/r",), writes=(("1/a", OpKind.PUT, 2), ("2/b", OpKind.PUT, 2)))
    )
    votes = net.run(keep=lambda send: isinstance(send.message, Prepare))  # votes held back
    assert len(votes) == 2 and all(v.message.yes for v in votes)
    p1, state1 = net.shards[1].participant, net.shards[1].state

    def single(txid, reads=(), writes=()):
        return p1.apply_single(request(txid, net, reads, writes), state1)

    with pytest.raises(TransactionConflict):
        single(2, writes=(("1/a", OpKind.INCR, 1),))  # even a blind incr must wait
    with pytest.raises(TransactionConflict):
        single(3, reads=("1/a",), writes=(("1/free", OpKind.PUT, 0),))  # a read of a locked write
    with pytest.raises(TransactionConflict):
        single(4, writes=(("1/r", OpKind.PUT, 0),))  # a write over a prepared read
    assert single(5, reads=("1/r",), writes=(("1/free", OpKind.PUT, 9),))  # shared + free: fine
    net.begin(request(6, net, writes=(("1/a", OpKind.PUT, 5), ("2/z", OpKind.PUT, 5))))
    net.run()
    assert net.outcome(6) is False  # a second prepare on a locked key votes NO at once

    for vote in votes:
        net.deliver(vote)
    net.run()
    assert net.outcome(1) is True and net.value("1/a") == 2
    assert single(7, writes=(("1/a", OpKind.INCR, 1),))[0].value == 3  # locks released


# --- recovery --------------------------------------------------------------------------------


def test_coordinator_crash_after_prepare_recovers_to_a_single_abort():
    net = Net()
    net.seed(**{"1_x": 1, "2_y": 1})
    net.begin(request(1, net, writes=(("1/x", OpKind.INCR, 1), ("2/y", OpKind.INCR, 1))))
    lost_votes = net.run(keep=lambda send: isinstance(send.message, Prepare))
    assert len(lost_votes) == 2  # the driver that carried them crashed
    assert all(shard.participant.prepared for shard in (net.shards[1], net.shards[2]))

    net.tick(TIMEOUT - 1)
    assert net.queue == []  # nobody gives up early
    net.tick(1)
    assert len(net.queue) == 2 and all(isinstance(s.message, QueryDecision) for s in net.queue)
    net.run()
    assert net.shards[1].coordinator.outcome(1) is TxnStatus.ABORTED
    assert no_locks_left(net) and net.applied == []

    for vote in lost_votes:  # the votes turn up late: the decision stands
        net.deliver(vote)
    net.run()
    assert net.shards[1].coordinator.outcome(1) is TxnStatus.ABORTED
    assert net.shards[1].coordinator.decide(1, True, (1, 2), 1001, net.now) == [
        Decided(1, False, "TransactionAborted", "shard 1 timed out waiting for the decision")
    ]
    assert (net.value("1/x"), net.value("2/y")) == (1, 1)
    assert {d.commit for d in net.decided[1]} == {False}


def test_a_recorded_commit_survives_a_coordinator_restart_and_reaches_everyone():
    net = Net()
    net.seed(**{"1_x": 1, "2_y": 1})
    net.begin(request(1, net, writes=(("1/x", OpKind.PUT, 10), ("2/y", OpKind.PUT, 20))))
    lost = net.run(keep=lambda send: not isinstance(send.message, Decision))
    assert len(lost) == 2  # recorded COMMIT, then the leader died before sending it
    old = net.shards[1].coordinator
    restarted = CoordinatorLog(1, vote_timeout=TIMEOUT, retention=RETENTION)
    restarted.restore(unpack(pack(old.to_wire())))  # the new leader, from a snapshot
    net.shards[1].coordinator = restarted
    net.tick(TIMEOUT)
    net.run()
    assert (net.value("1/x"), net.value("2/y")) == (10, 20)
    assert sorted(net.applied) == [(1, 1), (2, 1)]
    assert restarted.unacknowledged() == []
    assert no_locks_left(net)


def test_the_coordinator_resends_unacknowledged_decisions():
    net = Net()
    net.begin(request(1, net, writes=(("1/x", OpKind.PUT, 1), ("2/y", OpKind.PUT, 1))))
    net.run(keep=lambda send: not isinstance(send.message, Decision) or send.to_shard == 1)
    coordinator = net.shards[1].coordinator
    (resend,) = coordinator.unacknowledged()
    assert resend.to_shard == 2 and resend.message.commit
    net.queue.append(resend)
    net.run()
    assert net.value("2/y") == 1 and coordinator.unacknowledged() == []


def test_stalled_vote_collection_is_listed_for_abort():
    coordinator = CoordinatorLog(1, vote_timeout=TIMEOUT)
    coordinator.on_vote(Vote(5, 2, (1, 2), 1005, True), now=0)
    assert coordinator.expired(TIMEOUT - 1) == []
    assert coordinator.expired(TIMEOUT) == [5]
    effects = coordinator.decide(5, False, (1, 2), 1005, TIMEOUT, "Timeout", "votes stalled")
    assert {s.to_shard for s in effects if isinstance(s, Send)} == {1, 2}
    assert coordinator.on_vote(Vote(5, 1, (1, 2), 1005, True), now=TIMEOUT) == [
        Send(1, Decision(5, False, 1, 1005, "Timeout", "votes stalled"))
    ]


# --- idempotence -----------------------------------------------------------------------------


def test_every_message_delivered_twice_applies_once():
    net = Net()
    net.seed(**{"1_n": 0, "2_n": 0, "3_n": 0})
    writes = tuple((f"{s}/n", OpKind.INCR, 5) for s in (1, 2, 3))
    net.begin(request(1, net, writes=writes))
    delivered = []
    while net.queue:
        send = net.queue.pop(0)
        delivered.append(send)
        net.deliver(send)
        net.deliver(send)
    for send in delivered:  # and once more, long after the end
        net.deliver(send)
    net.run()
    assert [net.value(f"{s}/n") for s in (1, 2, 3)] == [5, 5, 5]
    assert sorted(net.applied) == [(1, 1), (2, 1), (3, 1)]
    assert {d.commit for d in net.decided[1]} == {True}
    assert no_locks_left(net)


def test_an_abort_that_overtakes_its_prepare_keeps_the_prepare_out():
    net = Net()
    req = request(1, net, writes=(("1/x", OpKind.PUT, 1), ("2/y", OpKind.PUT, 1)))
    _, sends = plan_commit(req, shard_of)
    p1 = net.shards[1].participant
    assert p1.on_decision(Decision(1, False, 1, req.timestamp), 0) == [Send(1, DecisionAck(1, 1))]
    prepare_1 = next(s.message for s in sends if s.to_shard == 1)
    (vote,) = p1.on_prepare(prepare_1, net.shards[1].state, 0)
    assert vote.message.yes is False and not p1.prepared


def test_a_no_vote_stays_no_when_its_prepare_is_delivered_again():
    net = Net()
    net.begin(request(1, net, writes=(("1/x", OpKind.PUT, 1), ("2/y", OpKind.PUT, 1))))
    net.run(keep=lambda send: isinstance(send.message, Prepare))  # 1 is in doubt, holding 1/x
    net.begin(request(2, net, writes=(("1/x", OpKind.PUT, 2),)))
    (prepare_2,) = net.queue
    net.run(keep=lambda send: isinstance(send.message, Prepare))  # 2 votes NO: 1/x is locked
    net.tick(TIMEOUT)
    net.run()  # 1 is presumed aborted and releases 1/x
    assert no_locks_left(net)
    p1 = net.shards[1].participant
    (vote,) = p1.on_prepare(prepare_2.message, net.shards[1].state, net.now)
    assert vote.message.yes is False and not p1.prepared and len(p1.locks) == 0


def test_forgotten_transactions_leave_a_watermark_that_refuses_late_messages():
    net = Net()
    req = request(1, net, writes=(("1/x", OpKind.PUT, 1), ("2/y", OpKind.PUT, 1)))
    net.begin(req)
    dup_prepares = list(net.queue)
    net.run()
    assert net.outcome(1) is True
    net.now += RETENTION
    for shard in net.shards.values():
        shard.participant.collect_garbage(net.now)
        shard.coordinator.collect_garbage(net.now)
    assert net.shards[2].participant.outcome(1) is None  # forgotten
    net.queue.extend(dup_prepares)  # delayed duplicates of the prepares arrive
    net.run()
    assert sorted(net.applied) == [(1, 1), (2, 1)]  # not applied a second time
    assert no_locks_left(net)
    assert net.shards[1].coordinator.outcome(1) is TxnStatus.ABORTED  # presumed, never commit


# --- snapshots and the wire -----------------------------------------------------------------


def test_a_participant_snapshot_keeps_prepared_transactions_and_their_locks():
    net = Net()
    net.seed(**{"1_x": 1})
    net.begin(
        request(1, net, reads=("1/x",), writes=(("1/x", OpKind.PUT, 2), ("2/y", OpKind.PUT, 2)))
    )
    votes = net.run(keep=lambda send: isinstance(send.message, Prepare))
    shard = net.shards[1]
    restored = Participant(1, ResolverRegistry(), prepare_timeout=TIMEOUT, retention=RETENTION)
    restored.restore(unpack(pack(shard.participant.to_wire())))
    shard.participant = restored
    with pytest.raises(TransactionConflict):
        restored.apply_single(request(2, net, writes=(("1/x", OpKind.PUT, 0),)), shard.state)
    for vote in votes:
        net.deliver(vote)
    net.run()
    assert net.value("1/x") == 2 and no_locks_left(net)
    with pytest.raises(ProtocolError):
        restored.restore({"prepared": "nonsense"})


def test_messages_round_trip_and_malformed_ones_are_protocol_errors():
    req = CommitRequest(
        9,
        3,
        {"1/a": Versioned(MISSING, b"", 0), "1/b": Versioned([1, b"x"], b"\x01\x02", 5)},
        (WriteOp("1/a", OpKind.APPEND, "x", None), WriteOp("1/b", OpKind.DELETE)),
        Isolation.MERGE,
        77,
    )
    messages = [
        Prepare(9, 1, (1, 2), req),
        Vote(9, 2, (1, 2), 77, False, "TransactionConflict", "k changed"),
        Decision(9, True, 1, 77),
        QueryDecision(9, 2, (1, 2), 77),
        DecisionAck(9, 2),
    ]
    for message in messages:
        assert message_from_wire(unpack(pack(message_to_wire(message)))) == message
    for bad in ([], ["nope"], ["ack", 1], ["ack", "1", 2], ["vote", 1, 2, [1], 3, 1, "", ""], 5):
        with pytest.raises(ProtocolError):
            message_from_wire(bad)


# --- randomized schedules --------------------------------------------------------------------


def test_random_loss_duplication_and_reordering_never_split_a_decision():
    """Bank transfers over 3 shards under a lossy network: money is conserved and every
    transaction has one outcome on every shard."""
    committed = [_transfers_under_a_lossy_network(seed) for seed in range(12)]
    assert sum(committed) >= 12  # the schedules exercise commits, not only aborts


def _transfers_under_a_lossy_network(seed: int) -> int:
    rng = random.Random(seed)
    net = Net()
    accounts = [f"{s}/acct{i}" for s in (1, 2, 3) for i in range(4)]
    net.seed(**{key.replace("/", "_", 1): 100 for key in accounts})
    participants = {}
    for txid in range(1, 16):
        source, target = rng.sample(accounts, 2)
        req = transfer(txid, net, source, target, rng.randint(1, 30), timestamp=txid)
        participants[txid] = (shard_of(source), {shard_of(source), shard_of(target)})
        net.begin(req)
        for _ in range(rng.randint(0, 12)):
            if not net.queue:
                break
            send = net.queue.pop(rng.randrange(len(net.queue)))
            roll = rng.random()
            if roll < 0.15:
                continue  # lost
            net.deliver(send)
            if roll > 0.85:
                net.deliver(send)  # duplicated
    rng.shuffle(net.queue)
    net.run()  # the network heals: what is in flight arrives in any order
    for _ in range(5):  # then timeouts and re-sends finish what the losses left in doubt
        net.tick(TIMEOUT)
        for shard in net.shards.values():
            net.queue.extend(shard.coordinator.unacknowledged())
        rng.shuffle(net.queue)
        net.run()
    assert no_locks_left(net)
    assert sum(net.value(key) for key in accounts) == 100 * len(accounts)
    committed = 0
    for txid, (coordinator, shards) in participants.items():
        status = net.shards[coordinator].coordinator.outcome(txid)
        applied_on = [s for s, t in net.applied if t == txid]
        if status is None:  # no vote or query ever reached the coordinator: nobody prepared
            assert applied_on == [] and txid not in net.decided
            continue
        commit = status is TxnStatus.COMMITTED
        committed += commit
        assert {net.shards[s].participant.outcome(txid) for s in shards} == {commit}
        assert sorted(applied_on) == (sorted(shards) if commit else [])
        assert {d.commit for d in net.decided[txid]} == {commit}
    return committed
