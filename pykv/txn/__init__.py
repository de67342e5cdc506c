"""Transaction semantics as pure code: OCC validation, vector-clock conflicts, resolvers, 2PC.

One piece of code shared by the embedded store and every cluster replica (DESIGN §3):

- ``model``: ``Versioned``, ``WriteOp``, ``CommitRequest`` (with ``to_wire``/``from_wire``),
  ``KeyUpdate``, the ``StateView`` protocol and a dict-backed ``DictState``;
- ``occ``: ``validate(request, state, resolvers) -> list[KeyUpdate]``, the rules of §3;
- ``ops``: ``fold_writes(value, ops) -> value``, what put/delete/incr/append do to a value
  (validation and a transaction's read-your-writes both fold with it);
- ``resolvers``: the built-in resolvers and the per-prefix ``ResolverRegistry``;
- ``twopc``: the multi-shard commit as pure state machines (``Participant``,
  ``CoordinatorLog``) that return effects instead of doing I/O.

Nothing here reads a clock, touches a file or a socket, or starts a thread: timestamps and
times are passed in, so the simulator can drive it deterministically.
"""

from pykv.txn.model import (
    ABSENT,
    MISSING,
    CommitRequest,
    DictState,
    Isolation,
    KeyUpdate,
    MissingType,
    StateView,
    Versioned,
    WriteOp,
)
from pykv.txn.occ import MAX_CLOCK_ENTRIES, next_clock, validate
from pykv.txn.ops import fold_writes
from pykv.txn.resolvers import (
    BUILTIN,
    Resolver,
    ResolverRegistry,
    canonical_key,
    canonical_order,
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

__all__ = [
    "ABSENT",
    "BUILTIN",
    "MAX_CLOCK_ENTRIES",
    "MISSING",
    "Apply",
    "CommitRequest",
    "CoordinatorLog",
    "Decided",
    "Decision",
    "DecisionAck",
    "DictState",
    "Isolation",
    "KeyUpdate",
    "MissingType",
    "Participant",
    "Prepare",
    "QueryDecision",
    "Resolver",
    "ResolverRegistry",
    "Send",
    "StateView",
    "TxnStatus",
    "Versioned",
    "Vote",
    "WriteOp",
    "canonical_key",
    "canonical_order",
    "error_from",
    "fold_writes",
    "message_from_wire",
    "message_to_wire",
    "next_clock",
    "plan_commit",
    "split_by_shard",
    "validate",
]
