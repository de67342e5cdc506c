"""Conflict resolvers: the built-in merge functions and the per-key-prefix registry.

A resolver is called when a transaction under ``isolation="merge"`` writes a key that
changed concurrently (DESIGN §3 rule 2). It receives three versions:

- ``base``: what the transaction observed (value, clock, timestamp);
- ``current``: what is stored now;
- ``mine``: the value the transaction computed from ``base``, with the clock it would
  have had (the observed clock with the coordinator's entry incremented) and the
  transaction's timestamp;

and returns the merged value (``MISSING`` deletes the key) or raises
``NonResolvableConflict``, which aborts the whole transaction.

Every built-in resolver is symmetric in ``current`` and ``mine``: swapping them never
changes the result, so the outcome does not depend on which of two concurrent writes
committed first. Where the result has an order (``union``, ``merge3``) the two versions
are first put in their canonical order (``canonical_order``: by timestamp, then clock
bytes, then encoded value), which in practice puts the version written earlier first.

Values of different types are non-resolvable, except under ``lww``, which picks one
whole version and so never mixes types (a delete can win under ``lww``). When both
sides deleted the key, every built-in except ``abort`` keeps it deleted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Final

from pykv.codec import pack
from pykv.errors import InvalidOperation, InvalidValue, NonResolvableConflict, TransactionConflict
from pykv.txn.model import MISSING, Versioned, _Missing
from pykv.types import INT64_MAX, INT64_MIN, Value

Resolver = Callable[[Versioned, Versioned, Versioned], "Value | _Missing"]


def canonical_key(version: Versioned) -> tuple[int, bytes, bytes]:
    """A total order on versions that every replica computes alike."""
    packed = b"" if version.value is MISSING else pack(version.value)
    return (version.timestamp, version.clock, packed)


def canonical_order(*versions: Versioned) -> list[Versioned]:
    """The versions sorted canonically: the order resolvers use instead of arrival order."""
    return sorted(versions, key=canonical_key)


def _type_name(value: object) -> str:
    return "missing" if value is MISSING else type(value).__name__


def _require(kind: type, resolver: str, *versions: Versioned) -> None:
    for version in versions:
        if type(version.value) is not kind:
            names = ", ".join(_type_name(v.value) for v in versions)
            raise NonResolvableConflict(
                f"{resolver} merges {kind.__name__} values; the versions hold {names}"
            )


def _both_deleted(current: Versioned, mine: Versioned) -> bool:
    return current.value is MISSING and mine.value is MISSING


# --- the built-in resolvers ----------------------------------------------------------------


def resolve_abort(base: Versioned, current: Versioned, mine: Versioned) -> Value:
    """Refuse every concurrent write: the commit raises TransactionConflict (retryable)."""
    raise TransactionConflict("the key changed since the transaction observed it")


def resolve_lww(base: Versioned, current: Versioned, mine: Versioned) -> Value | _Missing:
    """Last writer wins: the highest timestamp, then clock bytes, then encoded value."""
    return max(current, mine, key=canonical_key).value


def resolve_max(base: Versioned, current: Versioned, mine: Versioned) -> Value | _Missing:
    """The larger of two ints."""
    if _both_deleted(current, mine):
        return MISSING
    _require(int, "max", current, mine)
    return max(current.value, mine.value)  # type: ignore[type-var]


def resolve_min(base: Versioned, current: Versioned, mine: Versioned) -> Value | _Missing:
    """The smaller of two ints."""
    if _both_deleted(current, mine):
        return MISSING
    _require(int, "min", current, mine)
    return min(current.value, mine.value)  # type: ignore[type-var]


def resolve_counter(base: Versioned, current: Versioned, mine: Versioned) -> Value | _Missing:
    """A 3-way counter merge: current + (mine - base); an absent base counts as 0."""
    if _both_deleted(current, mine):
        return MISSING
    _require(int, "counter", current, mine)
    start = 0 if base.value is MISSING else base.value
    if type(start) is not int:
        raise NonResolvableConflict(
            f"counter needs an int base; the base holds {_type_name(start)}"
        )
    merged = current.value + mine.value - start  # type: ignore[operator]
    if not INT64_MIN <= merged <= INT64_MAX:
        raise InvalidValue(f"counter merge {merged} is outside the signed 64-bit range")
    return merged


def _merge_counts(first: list, second: list, wanted: Counter) -> list:
    """first's items in order, then second's, each kept while ``wanted`` still counts it."""
    remaining = Counter(wanted)
    out = []
    for item in (*first, *second):
        if remaining[item] > 0:
            out.append(item)
            remaining[item] -= 1
    return out


def resolve_union(base: Versioned, current: Versioned, mine: Versioned) -> Value | _Missing:
    """Multiset union of two lists (each item as often as in the side holding most of it).

    Order: the canonically first version's items, then the other's extra items, in order.
    Idempotent: the union of a list with itself is the list.
    """
    if _both_deleted(current, mine):
        return MISSING
    _require(list, "union", current, mine)
    first, second = canonical_order(current, mine)
    wanted = Counter(first.value) | Counter(second.value)  # type: ignore[arg-type]
    return _merge_counts(first.value, second.value, wanted)  # type: ignore[arg-type]


def resolve_merge3(base: Versioned, current: Versioned, mine: Versioned) -> Value | _Missing:
    """3-way list merge: apply both sides' additions and removals relative to base.

    Each item is kept ``count(current) + count(mine) - count(base)`` times (at least 0), so
    an item one side removed and the other left alone is removed, and items both sides
    added are all kept. Order: the canonically first version's surviving items in order,
    then the other side's additions in order. An absent base counts as [].
    """
    if _both_deleted(current, mine):
        return MISSING
    _require(list, "merge3", current, mine)
    start = [] if base.value is MISSING else base.value
    if type(start) is not list:
        raise NonResolvableConflict(f"merge3 needs a list base; the base holds {_type_name(start)}")
    first, second = canonical_order(current, mine)
    wanted = Counter(first.value) + Counter(second.value)  # type: ignore[arg-type]
    wanted.subtract(Counter(start))
    return _merge_counts(first.value, second.value, +wanted)  # type: ignore[arg-type]


BUILTIN: Final[dict[str, Resolver]] = {
    "abort": resolve_abort,
    "lww": resolve_lww,
    "max": resolve_max,
    "min": resolve_min,
    "counter": resolve_counter,
    "union": resolve_union,
    "merge3": resolve_merge3,
}


# --- the registry --------------------------------------------------------------------------


class ResolverRegistry:
    """Resolvers by key prefix; the longest registered prefix of a key wins.

    Keys no prefix matches get the default (``abort``). Every replica must hold the same
    registrations, since validation runs on each of them: in a cluster, register built-in
    names (or functions every server imports) from the configuration.
    """

    def __init__(self, default: str | Resolver = "abort") -> None:
        self._default = self._lookup(default)
        self._by_prefix: dict[str, Resolver] = {}
        self._lengths: list[int] = []

    @staticmethod
    def _lookup(resolver: str | Resolver) -> Resolver:
        if isinstance(resolver, str):
            try:
                return BUILTIN[resolver]
            except KeyError:
                known = ", ".join(sorted(BUILTIN))
                raise InvalidOperation(
                    f"no built-in resolver {resolver!r} (known: {known})"
                ) from None
        if not callable(resolver):
            raise InvalidOperation(
                f"a resolver must be a built-in name or callable, not {resolver!r}"
            )
        return resolver

    def register(self, prefix: str, resolver: str | Resolver) -> None:
        """Use ``resolver`` (a built-in name or a function) for keys starting with ``prefix``."""
        if not isinstance(prefix, str):
            raise InvalidOperation(f"a resolver prefix must be a str, not {type(prefix).__name__}")
        self._by_prefix[prefix] = self._lookup(resolver)
        self._lengths = sorted({len(p) for p in self._by_prefix}, reverse=True)

    def unregister(self, prefix: str) -> None:
        """Forget the resolver registered for exactly ``prefix`` (no-op if none)."""
        self._by_prefix.pop(prefix, None)
        self._lengths = sorted({len(p) for p in self._by_prefix}, reverse=True)

    def resolver_for(self, key: str) -> Resolver:
        """The resolver of the longest registered prefix of ``key``, else the default."""
        by_prefix = self._by_prefix
        for length in self._lengths:
            found = by_prefix.get(key[:length])
            if found is not None:
                return found
        return self._default

    def name_for(self, key: str) -> str:
        """A readable name of the resolver ``key`` gets (for errors and diagnostics)."""
        return _name_of(self.resolver_for(key))

    def registrations(self) -> dict[str, Resolver]:
        """A copy of prefix -> resolver."""
        return dict(self._by_prefix)

    def names(self) -> dict[str, str]:
        """prefix -> the registered resolver's name (a built-in's, or a function's qualified
        name), in prefix order."""
        return {prefix: _name_of(self._by_prefix[prefix]) for prefix in sorted(self._by_prefix)}


def _name_of(resolver: Resolver) -> str:
    """A built-in resolver's name, else the function's qualified name."""
    for name, builtin in BUILTIN.items():
        if builtin is resolver:
            return name
    return getattr(resolver, "__qualname__", repr(resolver))
