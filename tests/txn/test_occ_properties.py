"""Property tests of validate(): random interleavings commit only serializable histories."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pykv.errors import TransactionConflict
from pykv.txn import (
    MISSING,
    CommitRequest,
    DictState,
    Isolation,
    ResolverRegistry,
    WriteOp,
    validate,
)
from pykv.types import OpKind

KEYS = ["a", "b", "c", "d"]

# A transaction: the keys it reads, the keys it writes from what it read, the keys it
# writes blind, the keys it increments without reading; and the step it reads at.
txn_shapes = st.fixed_dictionaries(
    {
        "reads": st.lists(st.sampled_from(KEYS), max_size=3, unique=True),
        "rmw": st.lists(st.sampled_from(KEYS), max_size=2, unique=True),
        "blind": st.lists(st.sampled_from(KEYS), max_size=1, unique=True),
        "incr": st.lists(st.sampled_from(["n1", "n2"]), max_size=2, unique=True),
    }
)


def _num(value) -> int:
    return 0 if value is MISSING else value


class Client:
    """One transaction as a client runs it: reads at one point in time, commits later."""

    def __init__(self, txid: int, shape: dict) -> None:
        self.txid, self.shape = txid, shape
        self.reads: dict = {}

    def read_from(self, state: DictState) -> None:
        for key in {*self.shape["reads"], *self.shape["rmw"]}:
            self.reads[key] = state.get(key)

    def writes(self) -> tuple[WriteOp, ...]:
        seen = sum(_num(v.value) for v in self.reads.values())
        ops = [
            WriteOp(key, OpKind.PUT, seen + self.txid, self.reads[key]) for key in self.shape["rmw"]
        ]
        blind = [k for k in self.shape["blind"] if k not in self.shape["rmw"]]
        ops += [WriteOp(key, OpKind.PUT, 1000 * self.txid) for key in blind]
        ops += [WriteOp(key, OpKind.INCR, self.txid) for key in self.shape["incr"]]
        return tuple(ops)

    def request(self) -> CommitRequest:
        return CommitRequest(
            self.txid, self.txid % 3 + 1, dict(self.reads), self.writes(), Isolation.SERIALIZABLE
        )


@settings(deadline=None, max_examples=120)
@given(
    shapes=st.lists(txn_shapes, min_size=2, max_size=7),
    schedule_seed=st.randoms(use_true_random=False),
)
def test_committed_transactions_replay_serially_in_commit_order(shapes, schedule_seed):
    clients = [Client(i + 1, shape) for i, shape in enumerate(shapes)]
    # Each client appears twice in the schedule: first it reads, then it commits.
    events = [c for c in clients for _ in (0, 1)]
    schedule_seed.shuffle(events)
    state, resolvers = DictState(), ResolverRegistry()
    started: set[int] = set()
    committed: list[Client] = []
    for client in events:
        if client.txid not in started:
            started.add(client.txid)
            client.read_from(state)
            continue
        try:
            updates = validate(client.request(), state, resolvers)
        except TransactionConflict:
            continue
        state.apply(updates)
        committed.append(client)

    serial = DictState()
    for client in committed:
        observed = {key: serial.get(key).value for key in client.reads}
        assert observed == {key: v.value for key, v in client.reads.items()}, (
            f"txn {client.txid} read a state no serial order produces"
        )
        serial.apply(validate(client.request(), serial, resolvers))
    assert {k: v.value for k, v in serial.versions.items()} == {
        k: v.value for k, v in state.versions.items()
    }
    # commutative increments of keys nobody read never abort a transaction on their own
    for client in clients:
        if not client.shape["reads"] and not client.shape["rmw"]:
            assert client in committed
