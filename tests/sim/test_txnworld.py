"""The transaction simulator: real shard replicas and two-phase commit under seeded faults."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections import Counter

import pytest

import pykv.replica.shard as shard
from pykv.cluster.shardmap import StepKind, next_step
from pykv.errors import CorruptData
from pykv.replica import commitflow
from pykv.replica.stored import StoredShardState
from pykv.sim import txnworld
from pykv.sim.txnworld import TXN_MIXES, TxnWorld, run_txn_seed
from pykv.txn import model
from pykv.txn.model import first_live


@pytest.mark.parametrize("mix", list(TXN_MIXES))
def test_every_mix_commits_only_strictly_serializable_histories(mix):
    for seed in range(2):
        result = run_txn_seed(seed, TXN_MIXES[mix])
        assert result.ok, f"seed {seed}: {result.kind}: {result.detail}"
        assert result.committed > 10 and result.aborted > 0


def test_a_seed_replays_identically():
    runs = []
    for _ in range(2):
        world = TxnWorld(7, TXN_MIXES["base"])
        world.run()
        runs.append((world.history, dict(world.events), world.now))
    assert runs[0] == runs[1]


def test_faults_and_recoveries_really_happen():
    seen: set[str] = set()
    for seed in range(6):
        seen |= {kind for kind, n in run_txn_seed(seed, TXN_MIXES["base"]).events.items() if n}
    assert {
        "crashes", "partitions", "snapshot installs", "clients vanished after prepare",
        "prepares settled by recovery", "consistent scans",
    } <= seen


def test_the_check_catches_validation_that_misses_conflicts(monkeypatch):
    """A shard that validates nothing a transaction observed lets two transactions append
    after reading the same list: the history check must say so."""
    validate = shard.validate

    def blind(request, state, resolvers):
        observed_nothing = dataclasses.replace(
            request, reads={},
            writes=tuple(dataclasses.replace(op, observed=None) for op in request.writes),
        )
        return validate(observed_nothing, state, resolvers)

    monkeypatch.setattr(shard, "validate", blind)
    result = run_txn_seed(0, TXN_MIXES["base"])
    assert not result.ok and result.kind == "not serializable"


def test_the_check_catches_a_participant_that_loses_a_committed_part(monkeypatch):
    """Atomicity: if one shard released a committed transaction's locks without applying
    its part, other transactions' appends would order around the missing element."""
    finish = shard.ShardState._finish

    def dropping_finish(self, txid, commit):
        prepared = self.prepared.get(txid)
        if commit and prepared is not None and self.shard == 1:
            prepared.updates, prepared.shared = [], []
        return finish(self, txid, commit)

    monkeypatch.setattr(shard.ShardState, "_finish", dropping_finish)
    result = run_txn_seed(0, TXN_MIXES["base"])
    assert not result.ok and result.kind == "not serializable"


def test_a_participant_never_finds_its_commit_forgotten(monkeypatch):
    """In the "forgetful" mix (shards remember 2 txids, recovery waits 3 s, a crash every
    0.6 s), a participant whose FINISH died with its coordinator's node asks for the
    decision long after the commit, the coordinator shard having decided many transactions
    since; 3 of the first 80 such seeds have it. With commits forgotten like any decision, such a
    participant records abort and the history breaks; the coordinator shard keeps a commit
    until every participant applied it (ShardState.unfinished), and the same seed passes."""
    commit_decide = shard.ShardState._commit_decide
    forgetful = [s for s in range(1000) if txnworld.txn_params_for(s)[0] == "forgetful"][:80]
    with monkeypatch.context() as patch:
        patch.setattr(
            shard.ShardState, "_commit_decide",
            lambda self, request, others: commit_decide(self, request, []),  # never kept
        )
        broken = next((s for s in forgetful if run_txn_seed(s).kind == "not serializable"), None)
    assert broken is not None, "no forgetful seed reached a late decision: the mix lost the case"
    result = run_txn_seed(broken)
    assert result.ok, f"seed {broken}: {result.kind}: {result.detail}"
    assert result.events["releases proposed"] > 0


def test_consistent_scans_are_snapshots_and_one_pass_scans_are_caught(monkeypatch):
    """A scanner records each consistent scan of every list as a read-only transaction; the
    strict-serializability check passes it (above) only if it is one snapshot. A scan that
    stopped after one pass reads shards at different moments, and the check says so."""
    def one_pass(self, items):
        self.result = first_live(items, None, deleted=False)
        return True

    monkeypatch.setattr(model.ScanPasses, "feed", one_pass)
    result = run_txn_seed(0, TXN_MIXES["base"])
    assert not result.ok and result.kind == "not serializable"


def test_replicas_move_between_nodes_while_transactions_commit():
    """The "moves" mix: five nodes, three replicas per shard, and replicas moving under the
    faults, one membership step at a time (shardmap.next_step, as the metadata leader takes
    them): every kind of step happens, replicas removed while their node was down drop
    themselves, and the history stays strictly serializable with every group where the map
    places it at the end (the check says "replicas not placed" otherwise)."""
    seen: Counter = Counter()
    for seed in range(3):
        result = run_txn_seed(seed, TXN_MIXES["moves"])
        assert result.ok, f"seed {seed}: {result.kind}: {result.detail}"
        seen.update(result.events)
    steps = ("add_learner", "promote", "transfer", "remove")
    assert all(seen[f"membership steps: {kind}"] > 0 for kind in steps), seen
    assert seen["replica moves"] >= 10 and seen["stale replicas dropped"] > 0, seen
    assert seen["replicas moved back while their DROP was late"] > 0, seen


def test_the_check_catches_a_late_drop_that_deletes_a_member(monkeypatch):
    """In the "moves" mix some DROPs arrive late, after the replica was moved back to their
    node. The node's DROP asks the group's leader first (Node._drop_if_removed); one that
    deleted the replica at once would leave a voter that hosts nothing."""
    confirm = TxnWorld._confirm_membership

    def at_once_on_drop(self, node, gid):
        if sys._getframe(1).f_code.co_name == "_drop_stale_replicas":
            return confirm(self, node, gid)  # the sweep of stale replicas stays as it is
        host = self.hosts.get(node)

        def drop() -> None:
            if self.hosts.get(node) is host and gid in host.groups and not host.groups[gid].raft.is_leader():
                host.remove_group(gid)

        self.at(0.0, drop)

    monkeypatch.setattr(TxnWorld, "_confirm_membership", at_once_on_drop)
    kinds = []
    for seed in range(30):  # the first seed that catches it moves with any change of the mix
        kinds.append(run_txn_seed(seed, TXN_MIXES["moves"]).kind)
        if kinds[-1] == "replicas not placed":
            break
    assert kinds[-1] == "replicas not placed", kinds


def test_the_check_catches_a_move_left_half_done(monkeypatch):
    """A placement driver that adds and promotes the new replica but never removes the old
    one leaves groups with four voters where the map says three."""

    def never_removing(voters, learners, leader, target):
        step = next_step(voters, learners, leader, target)
        return None if step is not None and step.kind in (StepKind.REMOVE, StepKind.TRANSFER_LEADER) else step

    monkeypatch.setattr(txnworld, "next_step", never_removing)
    result = run_txn_seed(0, TXN_MIXES["moves"])
    assert not result.ok and result.kind == "replicas not placed", result.detail


def test_scans_lock_the_range_and_the_check_catches_writers_that_ignore_it(monkeypatch):
    """Scanners lock the range after 0 or 3 differing passes (commitflow.scan_rounds), so
    most scans here take the lock; all of them are one snapshot (the check above). A shard
    that let writers into a locked range would let a scan see half of a transaction."""
    seen: Counter = Counter()
    for seed in range(2):
        seen.update(run_txn_seed(seed, TXN_MIXES["base"]).events)
    assert seen["scans that locked the range"] >= 4 and seen["consistent scans"] >= 4, seen

    monkeypatch.setattr(shard.ShardState, "_in_locked_ranges", lambda self, txid, written: [])
    results = [run_txn_seed(seed, TXN_MIXES["base"]) for seed in range(4)]
    assert any(r.kind == "not serializable" for r in results), [r.kind for r in results]


def test_snapshots_lock_their_keys_and_the_check_catches_a_lock_that_holds_nothing(monkeypatch):
    """Snapshotters read 2 or more lists as one snapshot (commitflow.snapshot_rounds, what
    get_many does on a cluster), locking the keys after 0 or 3 differing passes; each is
    recorded as a read-only transaction that the history check requires to be one moment.
    A lock range that holds no key lets writers change the keys under the locked pass, and
    taking two passes as agreeing when they do not returns a mix of two moments."""
    seen: Counter = Counter()
    for seed in range(2):
        result = run_txn_seed(seed, TXN_MIXES["base"])
        assert result.ok, result.detail
        seen.update(result.events)
    assert seen["snapshots that locked the keys"] >= 4 and seen["snapshots"] >= 8, seen

    with monkeypatch.context() as patched:
        patched.setattr(commitflow, "point_range", lambda key: model.KeyRange(key, None, key))
        results = [run_txn_seed(seed, TXN_MIXES["base"]) for seed in range(4)]
        assert any(r.kind == "not serializable" for r in results), [r.kind for r in results]
    monkeypatch.setattr(commitflow, "same_cut", lambda first, second: True)
    results = [run_txn_seed(seed, TXN_MIXES["base"]) for seed in range(4)]
    assert any(r.kind == "not serializable" for r in results), [r.kind for r in results]


def test_a_scan_whose_lock_recovery_took_fails_rather_than_returns(monkeypatch):
    """Recovery releases the lock of a scanner that looks gone (recovery_after, 0.15 s in
    the "recovery-race" mix), possibly while it still scans; here the scanner does not
    renew its lock, so that happens often. The release answers that the lock was no longer
    held, and the scan fails (scan again). Taking every release as good lets such scans
    return ranges that writers changed meanwhile."""
    unrenewed = dataclasses.replace(TXN_MIXES["recovery-race"], renew_every=math.inf)
    finish = shard.ShardState._finish
    results = [run_txn_seed(seed, unrenewed) for seed in range(2)]
    assert all(r.ok for r in results) and sum(r.events["scans failed"] for r in results) > 0
    scanner = unrenewed.clients + 1  # its txids: (client + 1) << 32 | n

    def always_released(self, txid, commit):
        outcome = finish(self, txid, commit)
        return None if txid >> 32 == scanner else outcome

    monkeypatch.setattr(shard.ShardState, "_finish", always_released)
    kinds = []
    for seed in range(10):  # the lock is held only while the exports begin: a short window
        kinds.append(run_txn_seed(seed, unrenewed).kind)
        if kinds[-1] == "not serializable":
            break
    assert kinds[-1] == "not serializable", kinds


def test_a_scanner_renewing_its_lock_keeps_it_however_long_its_pass_waits(monkeypatch):
    """A locked pass can outlast recovery_after (0.3 s here): a page waits for writers
    prepared in the range, which wait for the lock a moment and give up. The scanner
    PREPAREs its lock again every recovery_after / 4 while it waits (Round.keep), so
    recovery leaves a live scanner's lock alone and every locked scan returns; without
    renewals, or when a renewal does not restart the recovery wait, many fail."""
    calm = dataclasses.replace(
        TXN_MIXES["base"], recovery_after=0.3, loss=0.0, vanish=0.0, crash_every=1e9,
        partition_every=1e9,
    )
    seen: Counter = Counter()
    for seed in range(2):
        result = run_txn_seed(seed, calm)
        assert result.ok, result.detail
        seen.update(result.events)
    assert seen["range locks renewed during a locked pass"] > 0 and seen["scans that locked the range"] >= 10
    assert seen["scans failed"] == 0, seen

    def failed(params) -> int:
        return sum(run_txn_seed(seed, params).events["scans failed"] for seed in range(2))

    assert failed(dataclasses.replace(calm, renew_every=math.inf)) > 0
    prepare = shard.ShardState._prepare

    def not_restarting(self, request, coordinator_shard, participants):
        held = self.prepared.get(request.txid)
        since = held.since if held is not None else None
        outcome = prepare(self, request, coordinator_shard, participants)
        if held is not None:
            held.since = since
        return outcome

    monkeypatch.setattr(shard.ShardState, "_prepare", not_restarting)
    assert failed(calm) > 0


def test_power_losses_cut_what_stored_shards_had_not_synced(monkeypatch):
    """In the "stored" mix half the crashes are power losses: each shard's storage (fsync
    off) keeps what it fdatasync'd and a random prefix of what it wrote after, and the Raft
    log its commit indexes as last fsync'd. The host
    syncs a shard's storage before Raft drops the log up to it (make_durable), so the log
    replays the rest; a host that did not would lose commands nobody holds any more."""
    seen = _events_of_passing_runs(TXN_MIXES["stored"], seeds=2)
    assert seen["power losses"] > 0 and seen["storage bytes lost to power losses"] > 0, seen
    assert seen["storage checkpoints"] > 0, seen  # restarts replay from a hint, too
    # The node writes a hard state that only moves the commit index without waiting for
    # its fsync, and applies at once: after a power loss the shard's storage may be past
    # the commit index Raft restarts with.
    assert seen["commit indexes lost to power losses"] > 0, seen

    monkeypatch.setattr(StoredShardState, "make_durable", lambda self: self.flush())
    assert _caught(TXN_MIXES["stored"], seeds=4)


def test_compactions_at_any_index_and_the_crashes_after_them_lose_nothing(monkeypatch):
    """The "stored" mix also compacts random replicas at whatever they have applied (as an
    ADD_LEARNER does), sometimes crashing the node right after, and moves leaderships about
    (each new leader's first entry carries no command): a snapshot taken just after
    entries that carry no command (a new leader's first, a membership change) must find
    the storage at its index on restart. A checkpoint that records the applied index only
    with a command's rows (as before the fix) leaves it behind its snapshot."""
    seen = _events_of_passing_runs(TXN_MIXES["stored"], seeds=2)
    assert seen["compactions at any index"] > 0 and seen["crashes"] > 0, seen
    assert seen["leadership transfers"] > 0, seen  # each new leader's first entry has no command

    real_flush = StoredShardState.flush

    def flush_only_rows(self):
        if self._rows:
            real_flush(self)

    monkeypatch.setattr(StoredShardState, "flush", flush_only_rows)
    assert _caught(TXN_MIXES["stored"], seeds=6)


def _events_of_passing_runs(params, *, seeds: int) -> Counter:
    """The events of the first ``seeds`` runs, each of which must pass its check."""
    seen: Counter = Counter()
    for seed in range(seeds):
        result = run_txn_seed(seed, params)
        assert result.ok, f"seed {seed}: {result.kind}: {result.detail}"
        seen.update(result.events)
    return seen


def _caught(params, *, seeds: int) -> bool:
    """Whether one of the first ``seeds`` runs fails its check, or a node refuses to
    restart over storage behind its snapshot (CorruptData)."""
    for seed in range(seeds):
        try:
            if not run_txn_seed(seed, params).ok:
                return True
        except CorruptData:
            return True
    return False


def test_prepares_orphaned_by_closed_connections_are_settled_with_the_coordinator(monkeypatch):
    """In the "lossy" and "five-nodes" mixes a client's connections close now and then after
    its prepares, while it goes on or as it vanishes: the nodes settle those prepares at once
    (Node.orphaned), racing the client's own COMMIT_DECIDE. Settling asks the coordinator
    shard, whose first recorded decision stands for both; a node that aborted an orphaned
    prepare without asking would break atomicity whenever the client's commit came first."""
    seen = _events_of_passing_runs(TXN_MIXES["lossy"], seeds=2)
    assert seen["orphaned prepares settled"] > 0, seen

    def settle_by_aborting(self, gid, txid, coordinator_shard, timestamp):
        try:
            yield from self._call(gid, txnworld.FINISH, [txid, False])
        finally:
            self._settling.discard((gid, txid))

    monkeypatch.setattr(txnworld.TxnWorld, "_settle", settle_by_aborting)
    assert _caught(TXN_MIXES["lossy"], seeds=4)
