"""OCC validation: turn a commit request and the committed state into key updates, or refuse.

``validate`` is the one place the rules of DESIGN §3 live; the embedded store and every
cluster replica call it in commit (log) order, so it must be deterministic and pure.

1. A key only read whose clock changed since it was read -> ``TransactionConflict``,
   under every isolation level.
2. A written key the transaction observed (read it, or passed a context clock) whose
   current clock is not <= the observed one changed concurrently:
   - ``SERIALIZABLE`` (the default): ``TransactionConflict``, whatever resolver the key
     has; merging would not be serializable.
   - ``MERGE``: the key's resolver decides (``ResolverRegistry.resolver_for``, default
     ``abort``): it gets (base = observed, current = stored, mine = the value the
     transaction computed from base) and returns the value to store, or raises
     ``NonResolvableConflict``. Keys only read still validate as in rule 1.
   Two different observed clocks for one key (a read and a context that disagree) mean
   the key changed between them: ``TransactionConflict``.
3. A key written without being observed (a blind write) is not checked: its ops fold
   onto the current value in commit order. So ``incr``/``append`` on keys the transaction
   did not read commute with every other commit and never conflict.
4. Each written key's clock becomes the pointwise max of the current and observed clocks
   with the coordinator's entry incremented, pruned to ``MAX_CLOCK_ENTRIES`` entries
   (keeping the coordinator's entry, then the highest counters, then the lowest node ids).
   Its timestamp becomes max(current timestamp, request timestamp), so per-key timestamps
   never go back and ``lww`` agrees with commit order when there is no conflict.

Ops on one key fold in program order with ``pykv.txn.ops.fold_writes`` (its docstring
has the rules of put, delete, incr and append), the same fold a transaction's reads use.
Each stored value must encode within the value limit (``ValueTooLarge``).

Any error aborts the whole transaction: ``validate`` returns updates only when every key
passed, and never changes the state.
"""

from __future__ import annotations

from pykv._engine.vclock import BEFORE, EQUAL, VClock, compare_encoded, merge_encoded
from pykv.codec import encode_value, size_bound
from pykv.errors import (
    Error,
    NonResolvableConflict,
    TransactionConflict,
    TransactionTooLarge,
)
from pykv.txn.model import (
    MISSING,
    CommitRequest,
    Isolation,
    KeyUpdate,
    StateView,
    Versioned,
    WriteOp,
    _Missing,
)
from pykv.txn.ops import fold_writes
from pykv.txn.resolvers import ResolverRegistry
from pykv.types import (
    MAX_KEY_BYTES,
    MAX_TXN_OPS,
    MAX_VALUE_BYTES,
    OpKind,
    Value,
    check_key,
    check_value,
)

MAX_CLOCK_ENTRIES = 16
"""Clocks keep at most this many node entries (one per node that coordinated a write)."""

# Ops after which a key's earlier value no longer matters.
_OVERWRITES = (OpKind.PUT, OpKind.DELETE)


class _Unread:
    """The value of a current version that validation did not read (it is overwritten)."""

    def __repr__(self) -> str:
        return "UNREAD"


_UNREAD = _Unread()

# A str of at most this many chars encodes within the value limit (4 bytes a char + header).
_SAFE_STR_CHARS = (MAX_VALUE_BYTES - 5) // 4


def validate(
    request: CommitRequest,
    state: StateView,
    resolvers: ResolverRegistry,
    *,
    max_ops: int = MAX_TXN_OPS,
) -> list[KeyUpdate]:
    """The updates that committing ``request`` against ``state`` stores, one per written key.

    Raises TransactionConflict, NonResolvableConflict, InvalidOperation or a limit error
    (see the module docstring); then nothing of the transaction may be applied.
    """
    if len(request.reads) + len(request.writes) > max_ops:
        raise TransactionTooLarge(
            f"transaction has {len(request.reads)} reads and {len(request.writes)} writes;"
            f" the limit is {max_ops} operations"
        )
    ops_by_key: dict[str, list[WriteOp]] = {}
    for op in request.writes:
        ops = ops_by_key.get(op.key)
        if ops is None:
            ops_by_key[op.key] = [op]
        else:
            ops.append(op)

    reads = request.reads
    for key, seen in reads.items():  # rule 1
        if key in ops_by_key:
            continue
        _check_key(key)
        if state.stamp_of(key)[0] != seen.clock:  # canonical encodings: equal clocks, equal bytes
            raise TransactionConflict(f"key {key!r} changed since the transaction read it")

    return [
        _update_key(key, ops, reads.get(key), _current(key, ops, state, request), request, resolvers)
        for key, ops in ops_by_key.items()
    ]


def _current(key: str, ops: list[WriteOp], state: StateView, request: CommitRequest) -> Versioned:
    """The key's current version, with its value only when the commit can use it.

    Ops that start with a put or a delete replace the value, and under serializable
    isolation a conflict aborts rather than going to a resolver: then only the clock and
    timestamp are needed, and reading the value (a disk read and a decode) is skipped.
    """
    if ops[0].kind in _OVERWRITES and request.isolation is Isolation.SERIALIZABLE:
        clock, timestamp = state.stamp_of(key)
        return Versioned(_UNREAD, clock, timestamp)
    return state.get(key)


def _update_key(
    key: str,
    ops: list[WriteOp],
    read: Versioned | None,
    current: Versioned,
    request: CommitRequest,
    resolvers: ResolverRegistry,
) -> KeyUpdate:
    _check_key(key)
    observed = _observed(key, ops, read)
    coordinator = request.coordinator
    if observed is None:  # rule 3: blind write, commutative incr/append
        value = fold_writes(current.value, ops)
        clock = next_clock(current.clock, b"", coordinator)
    else:
        relation = compare_encoded(current.clock, observed.clock)
        if relation == EQUAL or relation == BEFORE:
            value = fold_writes(current.value, ops)
        elif request.isolation is Isolation.MERGE:
            mine = Versioned(
                fold_writes(observed.value, ops),
                next_clock(observed.clock, b"", coordinator),
                request.timestamp,
            )
            value = _resolve(key, resolvers, observed, current, mine)
        else:
            raise TransactionConflict(
                f"key {key!r} was written concurrently since the transaction observed it"
            )
        clock = next_clock(current.clock, observed.clock, coordinator)
    check_fits(value)
    return KeyUpdate(key, value, clock, max(current.timestamp, request.timestamp))


def _observed(key: str, ops: list[WriteOp], read: Versioned | None) -> Versioned | None:
    """The one version the transaction observed for a written key (None: a blind write)."""
    observed = read
    for op in ops:
        seen = op.observed
        if seen is None:
            continue
        if observed is None:
            observed = seen
        elif seen.clock != observed.clock:
            raise TransactionConflict(
                f"key {key!r} was observed at two different versions: it changed in between"
            )
    return observed


def _resolve(
    key: str,
    resolvers: ResolverRegistry,
    base: Versioned,
    current: Versioned,
    mine: Versioned,
) -> Value | _Missing:
    resolver = resolvers.resolver_for(key)
    try:
        merged = resolver(base, current, mine)
    except NonResolvableConflict as exc:
        raise NonResolvableConflict(f"key {key!r}: {exc}") from exc
    except TransactionConflict as exc:
        raise TransactionConflict(f"key {key!r}: {exc}") from exc
    except Error:
        raise
    except Exception as exc:
        # A failing user resolver fails alike on every replica (it is pure), so turning
        # its error into an abort keeps replicas in step instead of stopping the apply loop.
        name = resolvers.name_for(key)
        raise NonResolvableConflict(f"key {key!r}: resolver {name} failed: {exc!r}") from exc
    if merged is not MISSING:
        check_value(merged)
    return merged


# --- limits --------------------------------------------------------------------------------


def _check_key(key: str) -> None:
    """check_key() without encoding ASCII keys, whose length is their size in bytes."""
    if type(key) is not str or not key.isascii() or not 0 < len(key) <= MAX_KEY_BYTES:
        check_key(key)


def check_fits(value: Value | _Missing) -> None:
    """Raise ValueTooLarge when value would encode past the limit (exact only when close)."""
    if type(value) is str and len(value) <= _SAFE_STR_CHARS:
        return
    if value is MISSING or size_bound(value) <= MAX_VALUE_BYTES:
        return
    encode_value(value)  # type: ignore[arg-type]  # raises ValueTooLarge


# --- clocks (rule 4) -----------------------------------------------------------------------


def next_clock(current: bytes, observed: bytes, coordinator: int) -> bytes:
    """max(current, observed) with the coordinator's entry incremented, pruned (encoded)."""
    merged = current if not observed or observed == current else merge_encoded(current, observed)
    clock = VClock.decode(merged).increment(coordinator)
    if len(clock) > MAX_CLOCK_ENTRIES:
        clock = _prune(clock, coordinator)
    return clock.encode()


def _prune(clock: VClock, keep: int) -> VClock:
    """Drop entries past MAX_CLOCK_ENTRIES, never the entry just incremented.

    Keeping it guarantees the new clock is not <= the one it replaces, so the write
    stays visible to every later validation.
    """
    entries = clock.to_dict()
    kept = entries.pop(keep)
    rest = VClock(entries).prune(MAX_CLOCK_ENTRIES - 1).to_dict()
    rest[keep] = kept
    return VClock(rest)
