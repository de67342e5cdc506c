"""What buffered write ops do to a key's value: the one fold that reads and commits share.

``validate`` folds a key's ops onto the stored value at commit; a transaction folds its
buffered ops onto the value it read (read-your-writes). Both call ``fold_writes``, so what a
transaction reads is what its commit stores.

Ops on one key fold in program order, each of them checked:
- ``put`` stores its argument (a valid value, else ``InvalidValue``); ``delete`` stores MISSING.
- ``incr`` by an int: an absent key starts at 0; a non-int stored value raises
  ``InvalidOperation``; leaving the signed 64-bit range raises ``InvalidValue``.
- ``append`` of a scalar (str, int or bytes): an absent key becomes ``[x]``; a list gets
  ``x`` at its end; a str gets a str ``x`` concatenated, bytes get bytes ``x``
  concatenated; any other pairing raises ``InvalidOperation``.
"""

from __future__ import annotations

from collections.abc import Iterable

from pykv.errors import InvalidOperation, InvalidValue
from pykv.txn.model import MISSING, WriteOp, _Missing
from pykv.types import INT64_MAX, INT64_MIN, OpKind, Value, check_value


def fold_writes(
    value: Value | _Missing, ops: Iterable[WriteOp], *, owned: bool = False
) -> Value | _Missing:
    """``value`` after applying ``ops`` (all on one key) in program order.

    A list is never changed in place unless ``owned`` says the caller made ``value`` for
    this fold; otherwise the first append copies it, so a stored or a caller's list stays
    as it was. Raises InvalidValue or InvalidOperation (see the module docstring).
    """
    for op in ops:
        kind = op.kind
        if kind is OpKind.PUT:
            arg = op.arg
            if type(arg) is not str and type(arg) is not bytes:  # those need no check
                check_value(arg)
            value, owned = arg, False
        elif kind is OpKind.DELETE:
            value, owned = MISSING, False
        elif kind is OpKind.INCR:
            value, owned = _incr(value, op), False
        elif kind is OpKind.APPEND:
            value, owned = _append(value, op, owned), True
        else:
            raise InvalidOperation(f"unknown operation {kind!r} on key {op.key!r}")
    return value


def _incr(value: Value | _Missing, op: WriteOp) -> int:
    amount = op.arg
    if type(amount) is not int:
        raise InvalidValue(f"incr needs an int amount, not {type(amount).__name__}")
    if value is MISSING:
        value = 0
    elif type(value) is not int:
        raise InvalidOperation(
            f"incr applies to int values; {op.key!r} holds a {type(value).__name__}"
        )
    result = value + amount
    if not INT64_MIN <= result <= INT64_MAX:
        raise InvalidValue(f"incr of {op.key!r} to {result} is outside the signed 64-bit range")
    return result


def _append(value: Value | _Missing, op: WriteOp, owned: bool) -> Value:
    item = op.arg
    if isinstance(item, list):
        raise InvalidValue("append takes one scalar (str, int or bytes), not a list")
    check_value(item)
    if value is MISSING:
        return [item]
    if type(value) is list:
        if not owned:
            value = list(value)  # never mutate the stored (or the caller's) list
        value.append(item)
        return value
    if type(value) is type(item) and type(value) in (str, bytes):
        return value + item  # type: ignore[operator]
    raise InvalidOperation(
        f"cannot append a {type(item).__name__} to {op.key!r}, which holds a"
        f" {type(value).__name__}"
    )
