"""fold_writes: the one fold of put/delete/incr/append that reads and commits share."""

from __future__ import annotations

import copy

import pytest

from pykv.errors import InvalidOperation, InvalidValue
from pykv.txn import MISSING, WriteOp, fold_writes
from pykv.types import OpKind


def test_a_fold_never_changes_a_list_it_does_not_own():
    stored = [1]
    folded = fold_writes(stored, [WriteOp("k", OpKind.APPEND, 2), WriteOp("k", OpKind.APPEND, 3)])
    assert folded == [1, 2, 3] and stored == [1]


def test_an_owned_list_is_extended_in_place():
    mine = [1]
    assert fold_writes(mine, [WriteOp("k", OpKind.APPEND, 2)], owned=True) is mine
    assert mine == [1, 2]


def test_a_put_list_is_copied_before_a_later_append():
    given = [1]
    folded = fold_writes(MISSING, [WriteOp("k", OpKind.PUT, given), WriteOp("k", OpKind.APPEND, 2)])
    assert folded == [1, 2] and given == [1]


def test_no_ops_leave_the_value_as_it_is():
    assert fold_writes("v", []) == "v"
    assert fold_writes(MISSING, []) is MISSING


@pytest.mark.parametrize(
    ("value", "op", "error", "message"),
    [
        ("s", WriteOp("k", OpKind.INCR, 1), InvalidOperation, "'k' holds a str"),
        ([1], WriteOp("k", OpKind.INCR, 1), InvalidOperation, "'k' holds a list"),
        ([1], WriteOp("k", OpKind.APPEND, [2]), InvalidValue, "not a list"),
        (b"b", WriteOp("k", OpKind.APPEND, "s"), InvalidOperation, "to 'k', which holds a bytes"),
    ],
)
def test_errors_name_the_key_and_leave_an_owned_list_unchanged(value, op, error, message):
    before = copy.copy(value)
    with pytest.raises(error, match=message):
        fold_writes(value, [op], owned=True)
    assert value == before
