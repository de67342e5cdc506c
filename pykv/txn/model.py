"""The data a commit carries and produces: versions, write ops, commit requests, key updates."""

from __future__ import annotations

import enum
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

from pykv.codec import size_bound
from pykv.errors import ProtocolError, ScanTooLarge
from pykv.types import OpKind, Value, enum_decoder, op_kind


class _Missing:
    """The type of MISSING: a key that is absent (never written, or deleted)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()
MissingType = _Missing  # for type hints: ``Value | MissingType``


@dataclass(slots=True, unsafe_hash=True)  # not frozen, for speed: see pykv.types
class Versioned:
    """A value with the vector clock (encoded) and hybrid logical timestamp it was stored with.

    ``clock == b""`` means the key was never written. A deleted key is ``value is MISSING``
    with the tombstone's clock, so that a read of an absent key still conflicts with a
    later write. ``timestamp`` is what ``lww`` compares; 0 when unknown.
    """

    value: Value | _Missing
    clock: bytes
    timestamp: int = 0

    @property
    def exists(self) -> bool:
        return self.value is not MISSING

    def to_wire(self) -> list:
        """[clock, timestamp] for an absent key, [clock, timestamp, value] otherwise."""
        if self.value is MISSING:
            return [self.clock, self.timestamp]
        return [self.clock, self.timestamp, self.value]

    @classmethod
    def from_wire(cls, data: Any) -> Versioned:
        if not isinstance(data, (list, tuple)) or len(data) not in (2, 3):
            raise ProtocolError(f"a version must be [clock, timestamp(, value)], got {data!r:.80}")
        clock, timestamp = data[0], data[1]
        if not isinstance(clock, bytes) or not _is_int(timestamp):
            raise ProtocolError("a version's clock must be bytes and its timestamp an int")
        return cls(data[2] if len(data) == 3 else MISSING, clock, timestamp)


ABSENT: Final = Versioned(MISSING, b"", 0)
"""The version of a key that was never written (what a StateView returns for it)."""

# --- consistent scans ------------------------------------------------------------------------
# A scan is one snapshot when two passes over the range, the second begun after the first
# ended, find exactly the same versions, tombstones of deleted keys included: versions never
# repeat, so every key kept its version from its first look to its second, and all of them
# held at once at any moment between the two passes. (Without the tombstones, a key created
# and deleted between the passes would go unseen.) Each pass must be linearizable per shard.
# Passes never agree while writers keep writing the range, so after PASSES_BEFORE_LOCKING
# passes a cluster's shards begin copy-on-write exports of the range at one moment, under a
# lock on it, and read those instead (pykv.txn.views, commitflow.scan_rounds); get_many locks
# its keys for one last pass. (The embedded store takes no passes: it reads such a view at
# once, begun while it keeps writers out of the range a moment.)

PASSES_BEFORE_LOCKING: Final = 3
"""Differing passes after which a consistent read stops passing and takes one moment."""

ScanItems = list[tuple[str, Versioned]]


class KeyRange(NamedTuple):
    """The keys a scan covers: those with ``prefix`` in [start, end) (None: unbounded)."""

    prefix: str
    start: str | None = None
    end: str | None = None

    def holds(self, key: str) -> bool:
        return (
            key.startswith(self.prefix)
            and (self.start is None or key >= self.start)
            and (self.end is None or key < self.end)
        )

    @classmethod
    def from_wire(cls, data: Any) -> KeyRange:
        if (
            not isinstance(data, (list, tuple)) or len(data) != 3 or not isinstance(data[0], str)
            or not all(bound is None or isinstance(bound, str) for bound in data[1:])
        ):
            raise ProtocolError("a key range must be [prefix, start or None, end or None]")
        return cls(*data)


EVERY_KEY: Final = KeyRange("")
"""The range of every key (a backup's, a Raft image's)."""


def live_items(
    items: Iterable[tuple[str, Versioned]], limit: int | None, deleted: bool = True
) -> Iterator[tuple[str, Versioned]]:
    """Items in order up to the ``limit``-th live one; tombstones (deleted keys) ride along
    uncounted, or with ``deleted=False`` are left out. What every scan returns."""
    live = 0
    for item in items:
        if limit is not None and live >= limit:
            return
        if item[1].value is MISSING:
            if deleted:
                yield item
            continue
        yield item
        live += 1


def first_live(
    items: Iterable[tuple[str, Versioned]], limit: int | None, deleted: bool = True
) -> ScanItems:
    """live_items as a list."""
    return list(live_items(items, limit, deleted))


SCAN_PAGE_BYTES: Final = 1 << 20
"""About how many bytes of keys and versions one page of a scan carries (scan_page)."""


def scan_page(
    items: Iterable[tuple[str, Versioned]], limit: int | None, deleted: bool, max_bytes: int
) -> tuple[ScanItems, str | None]:
    """live_items, cut once about ``max_bytes`` are taken (a page has at least one item,
    however big): (the page, the key the next page starts at, or None at the end). A
    shard answers a scan a page at a time, so neither its reply nor its memory grows with
    the range."""
    page: ScanItems = []
    size = 0
    for item in live_items(items, limit, deleted):
        if size >= max_bytes:
            return page, item[0]
        page.append(item)
        size += item_bytes(item)
    return page, None


def item_bytes(item: tuple[str, Versioned]) -> int:
    """About how many bytes a scanned key and its version take on the wire (an upper bound)."""
    key, version = item
    value = version.value
    return len(key) + len(version.clock) + 9 + (0 if value is MISSING else size_bound(value))


class HeldPass:
    """The items of one pass that a scan holds until it returns them all, refused once
    they pass ``max_bytes`` (ScanTooLarge), so that a scan of a huge range fails clearly
    instead of filling the memory."""

    def __init__(self, key_range: KeyRange, max_bytes: int) -> None:
        self.items: ScanItems = []
        self._range = key_range
        self._max_bytes = max_bytes
        self._bytes = 0

    def take(self, items: Iterable[tuple[str, Versioned]]) -> ScanItems:
        """Add ``items`` to the pass (raises ScanTooLarge past the budget); the whole pass."""
        for item in items:
            self._bytes += item_bytes(item)
            if self._bytes > self._max_bytes:
                prefix, start, end = self._range
                raise ScanTooLarge(
                    f"a scan of prefix {prefix!r} from {start!r} to {end!r} would hold more than "
                    f"max_scan_bytes ({self._max_bytes} bytes) at once: read it as you iterate "
                    "(scan_iter on asyncio, scan on the synchronous client), or narrow the range or the limit"
                )
            self.items.append(item)
        return self.items

    @property
    def bytes(self) -> int:
        """About how many bytes the items held take (item_bytes)."""
        return self._bytes


def same_cut(first: ScanItems, second: ScanItems) -> bool:
    """Whether two passes of a scan saw the same version of every key (see above)."""
    return len(first) == len(second) and all(
        a[0] == b[0] and a[1].clock == b[1].clock and a[1].timestamp == b[1].timestamp
        for a, b in zip(first, second, strict=True)
    )


class ScanPasses:
    """A consistent scan's passes: ``feed`` each one (tombstones included) until it says
    done; ``result`` is then the snapshot's live keys. The caller runs the passes (sync or
    asyncio), this decides."""

    def __init__(self) -> None:
        self._last: ScanItems | None = None
        self.result: ScanItems = []

    def feed(self, items: ScanItems) -> bool:
        """True when this pass agrees with the one before."""
        if self._last is not None and same_cut(self._last, items):
            self.result = first_live(items, None, deleted=False)
            return True
        self._last = items
        return False


class Isolation(str, enum.Enum):
    """How a commit treats a written key that changed concurrently (DESIGN §3 rule 2).

    SERIALIZABLE: every conflict aborts with TransactionConflict (strict serializability).
    MERGE: a write-write conflict goes to the key's resolver; keys only read still validate.
    """

    SERIALIZABLE = "serializable"
    MERGE = "merge"


_isolation = enum_decoder(Isolation)


@dataclass(slots=True, unsafe_hash=True)  # not frozen, for speed: see pykv.types
class WriteOp:
    """One buffered mutation, with the version the transaction observed for its key.

    ``observed is None`` is a blind write: the transaction neither read the key nor passed
    a context clock for it.
    """

    key: str
    kind: OpKind
    arg: Value | None = None
    observed: Versioned | None = None

    def to_wire(self) -> list:
        observed = None if self.observed is None else self.observed.to_wire()
        return [self.key, int(self.kind), self.arg, observed]

    @classmethod
    def from_wire(cls, data: Any) -> WriteOp:
        if not isinstance(data, (list, tuple)) or len(data) != 4:
            raise ProtocolError(f"a write op must be [key, kind, arg, observed], got {data!r:.80}")
        key, kind, arg, observed = data
        if not isinstance(key, str):
            raise ProtocolError("a write op's key must be a str")
        try:
            kind = op_kind(kind)
        except ValueError:
            raise ProtocolError(f"unknown write op kind {kind!r}") from None
        return cls(key, kind, arg, None if observed is None else Versioned.from_wire(observed))


@dataclass(slots=True, unsafe_hash=True)  # not frozen, for speed: see pykv.types
class CommitRequest:
    """Everything a replica needs to validate and apply one transaction (or one shard's part).

    ``reads`` holds every key read with the version observed, including keys also written.
    ``writes`` is in program order; several ops on one key fold in that order.
    ``coordinator`` is the node id whose clock entry the commit increments; ``timestamp``
    is the hybrid logical timestamp the coordinator chose (what ``lww`` compares).
    ``ranges``: key ranges that a prepared request holds against writers (a consistent
    scan's lock: no other transaction writes a key in them until it is finished).
    """

    txid: int
    coordinator: int
    reads: Mapping[str, Versioned]
    writes: tuple[WriteOp, ...]
    isolation: Isolation = Isolation.SERIALIZABLE
    timestamp: int = 0
    ranges: tuple[KeyRange, ...] = ()

    def written_keys(self) -> list[str]:
        """The written keys, each once, in order of first write."""
        return list(dict.fromkeys(op.key for op in self.writes))

    def restricted_to(self, keys: set[str] | frozenset[str]) -> CommitRequest:
        """The part of this request that touches only ``keys`` (one shard's part for 2PC)."""
        return CommitRequest(
            self.txid,
            self.coordinator,
            {k: v for k, v in self.reads.items() if k in keys},
            tuple(op for op in self.writes if op.key in keys),
            self.isolation,
            self.timestamp,
            self.ranges,
        )

    def to_wire(self, keys: Container[str] | None = None) -> dict:
        """A msgpack-able dict (pykv.codec.pack) for the Raft log and the network; with
        ``keys``, that of ``restricted_to(keys)`` (one shard's part), without building it."""
        reads: Iterable[tuple[str, Versioned]] = self.reads.items()
        writes: Iterable[WriteOp] = self.writes
        if keys is not None:
            reads = [item for item in reads if item[0] in keys]
            writes = [op for op in writes if op.key in keys]
        wire = {
            "txid": self.txid,
            "coord": self.coordinator,
            "iso": self.isolation.value,
            "ts": self.timestamp,
            "reads": [[key, version.to_wire()] for key, version in reads],
            "writes": [op.to_wire() for op in writes],
        }
        if self.ranges:  # only a scan's lock has any: commits' wire form stays as it was
            wire["ranges"] = [list(r) for r in self.ranges]
        return wire

    @classmethod
    def from_wire(cls, data: Any) -> CommitRequest:
        """Rebuild from to_wire(); raise ProtocolError on a malformed structure."""
        if not isinstance(data, dict):
            raise ProtocolError("a commit request must be a map")
        try:
            txid, coordinator, timestamp = data["txid"], data["coord"], data["ts"]
            isolation = _isolation(data["iso"])
            reads_wire, writes_wire = data["reads"], data["writes"]
        except (KeyError, ValueError) as exc:
            raise ProtocolError(f"malformed commit request: {exc}") from None
        if not (_is_int(txid) and _is_int(coordinator) and _is_int(timestamp)):
            raise ProtocolError("a commit request's txid, coordinator and timestamp must be ints")
        if not isinstance(reads_wire, (list, tuple)) or not isinstance(writes_wire, (list, tuple)):
            raise ProtocolError("a commit request's reads and writes must be arrays")
        reads: dict[str, Versioned] = {}
        for item in reads_wire:
            if (
                not isinstance(item, (list, tuple))
                or len(item) != 2
                or not isinstance(item[0], str)
            ):
                raise ProtocolError("a read must be [key, version]")
            reads[item[0]] = Versioned.from_wire(item[1])
        writes = tuple(WriteOp.from_wire(op) for op in writes_wire)
        ranges_wire = data.get("ranges", ())
        if not isinstance(ranges_wire, (list, tuple)):
            raise ProtocolError("a commit request's ranges must be an array")
        ranges = tuple(KeyRange.from_wire(r) for r in ranges_wire)
        return cls(txid, coordinator, reads, writes, isolation, timestamp, ranges)


@dataclass(slots=True, unsafe_hash=True)  # not frozen, for speed: see pykv.types
class KeyUpdate:
    """What a commit stores for one key: value (MISSING = tombstone), clock and timestamp."""

    key: str
    value: Value | _Missing
    clock: bytes
    timestamp: int

    @property
    def version(self) -> Versioned:
        return Versioned(self.value, self.clock, self.timestamp)

    def to_wire(self) -> list:
        return [self.key, *self.version.to_wire()]

    @classmethod
    def from_wire(cls, data: Any) -> KeyUpdate:
        if not isinstance(data, (list, tuple)) or len(data) not in (3, 4):
            raise ProtocolError("a key update must be [key, clock, timestamp(, value)]")
        if not isinstance(data[0], str):
            raise ProtocolError("a key update's key must be a str")
        version = Versioned.from_wire(list(data[1:]))
        return cls(data[0], version.value, version.clock, version.timestamp)


class StateView(Protocol):
    """Read access to the committed state that validation runs against."""

    def get(self, key: str) -> Versioned:
        """The current committed version; ABSENT (MISSING, b"") if the key was never written."""
        ...

    def stamp_of(self, key: str) -> tuple[bytes, int]:
        """``(get(key).clock, get(key).timestamp)`` without reading the value: what checking a
        read, or overwriting a key, needs."""
        ...


class DictState:
    """A StateView over a dict (key -> Versioned), with apply(); tests, benchmarks, models."""

    def __init__(self, versions: Mapping[str, Versioned] | None = None) -> None:
        self.versions: dict[str, Versioned] = dict(versions or {})

    def get(self, key: str) -> Versioned:
        return self.versions.get(key, ABSENT)

    def stamp_of(self, key: str) -> tuple[bytes, int]:
        version = self.versions.get(key, ABSENT)
        return version.clock, version.timestamp

    def apply(self, updates: list[KeyUpdate] | tuple[KeyUpdate, ...]) -> None:
        """Store each update (a tombstone keeps its clock, so later reads still validate)."""
        for update in updates:
            self.versions[update.key] = Versioned(update.value, update.clock, update.timestamp)

    def value(self, key: str) -> Value | _Missing:
        return self.get(key).value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
