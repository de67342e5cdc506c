"""Keys, values, transaction ids and mutations, with the limit checks of DESIGN §1 (a leaf)."""

from __future__ import annotations

import enum
import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pykv.errors import InvalidKey, InvalidValue, KeyTooLarge, ValueTooLarge

MAX_KEY_BYTES = 256
MAX_VALUE_BYTES = 1 << 20
MAX_TXN_OPS = 10_000
# The bytes of keys and values a transaction may write (about: as msgpack encodes them, at
# most). All of it in one shard must fit one request and one Raft entry (within
# pykv.net.framing.CLUSTER_MAX_FRAME, with room for keys and clocks); and past some tens of
# MiB a two-phase commit's prepares outlast the participants' patience (recovery_after).
MAX_TXN_BYTES = 32 << 20
# What a scan that returns its whole range at once (a consistent one) may hold of one pass.
MAX_SCAN_BYTES = 256 << 20
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

Scalar = str | int | bytes
Value = str | int | bytes | list


def check_key(key: object) -> bytes:
    """Return the key as UTF-8 bytes, or raise InvalidKey/KeyTooLarge."""
    if not isinstance(key, str):
        raise InvalidKey(f"keys must be str, not {type(key).__name__}")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidKey(f"keys must be valid Unicode text; {e.reason} at position {e.start}") from None
    if not raw:
        raise KeyTooLarge("keys must be 1 to 256 bytes as UTF-8; got an empty key")
    if len(raw) > MAX_KEY_BYTES:
        raise KeyTooLarge(f"key is {len(raw)} bytes as UTF-8; the limit is {MAX_KEY_BYTES}")
    return raw


def _check_scalar(value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (str, int, bytes)):
        raise InvalidValue(
            f"{where} must be str, int, bytes or a list of those; got {type(value).__name__}"
        )
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise InvalidValue(f"{where} int {value} is outside the signed 64-bit range")
    if type(value) is str and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidValue(f"{where} must be valid Unicode text; {e.reason} at position {e.start}") from None


def check_value(value: object) -> None:
    """Raise InvalidValue unless value is one of the types of DESIGN §1."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_scalar(item, f"list item {i}")
    else:
        _check_scalar(value, "value")


def check_encoded_size(encoded: bytes, limit: int = MAX_VALUE_BYTES) -> None:
    """Raise ValueTooLarge when an encoded value exceeds the limit."""
    if len(encoded) > limit:
        raise ValueTooLarge(f"value encodes to {len(encoded)} bytes; the limit is {limit}")


E = TypeVar("E", bound=enum.Enum)


def enum_decoder(cls: type[E]) -> Callable[[Any], E]:
    """``cls(value)`` as a dict lookup (ValueError for an unknown value): about 10x faster than
    an Enum call, which matters where every message and request decodes a few of them."""
    members = {member.value: member for member in cls}

    def decode(value: Any) -> E:
        try:
            return members[value]
        except (KeyError, TypeError):
            raise ValueError(f"{value!r} is not a valid {cls.__name__}") from None

    return decode


class OpKind(enum.IntEnum):
    """What a buffered mutation does to its key when the transaction commits."""

    PUT = 1
    DELETE = 2
    INCR = 3
    APPEND = 4


# The records built per key on every request and every replica's apply (Mutation, WriteOp,
# Versioned, CommitRequest, KeyUpdate, the storage's Update and StoredVersion) are immutable
# by convention, not frozen: a frozen dataclass's __init__ sets each field through
# object.__setattr__, 3.5 times the cost of a plain one, and those inits were 8% of a node's
# CPU under the bench. unsafe_hash keeps the hash that frozen gave them.
@dataclass(slots=True, unsafe_hash=True)  # not frozen, for speed: see above
class Mutation:
    """One buffered write of a transaction: the key, what to do, and its argument."""

    key: str
    kind: OpKind
    arg: Value | None = None


class TxnIdSource:
    """Makes transaction ids unique across processes without a round trip.

    An id is a 64-bit int: 24 random bits chosen at start-up (a process/node tag) and a
    40-bit counter that starts at a random point of its first half. Two clients alive at
    once share a tag about once in 16.7 million pairs (with 1,000 clients, 3% of the
    time); had both counters started at 1, they would have made the same ids, and a shard
    answers a repeated id with the first one's outcome, unapplied. Now their ids meet only
    if their counters' runs overlap too: about 2 in a million for runs of a million ids.
    """

    def __init__(self, tag: int | None = None) -> None:
        self._tag = (tag if tag is not None else int.from_bytes(os.urandom(3), "big")) & 0xFFFFFF
        self._counter = itertools.count(1 + int.from_bytes(os.urandom(5), "big") % (1 << 39))
        self._lock = threading.Lock()

    def next_id(self) -> int:
        with self._lock:
            n = next(self._counter)
        return (self._tag << 40) | (n & ((1 << 40) - 1))


op_kind = enum_decoder(OpKind)
