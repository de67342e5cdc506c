"""Transaction semantics as pure code: OCC validation, vector-clock conflicts, resolvers.

One piece of code shared by the embedded store and every cluster replica (DESIGN §3):

- ``model``: ``Versioned``, ``WriteOp``, ``CommitRequest`` (with ``to_wire``/``from_wire``),
  ``KeyUpdate``, the ``StateView`` protocol and a dict-backed ``DictState``;
- ``occ``: ``validate(request, state, resolvers) -> list[KeyUpdate]``, the rules of §3;
- ``ops``: ``fold_writes(value, ops) -> value``, what put/delete/incr/append do to a value
  (validation and a transaction's read-your-writes both fold with it);
- ``resolvers``: the built-in resolvers and the per-prefix ``ResolverRegistry``.

A cluster's multi-shard commit (two-phase commit, prepared locks, the coordinator shard's
decision) is part of each shard's replicated state machine, ``pykv.replica.shard``, which
validates with this same code.

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

__all__ = [
    "ABSENT",
    "BUILTIN",
    "MAX_CLOCK_ENTRIES",
    "MISSING",
    "CommitRequest",
    "DictState",
    "Isolation",
    "KeyUpdate",
    "MissingType",
    "Resolver",
    "ResolverRegistry",
    "StateView",
    "Versioned",
    "WriteOp",
    "canonical_key",
    "canonical_order",
    "fold_writes",
    "next_clock",
    "validate",
]
