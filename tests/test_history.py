"""Histories recorded from many threads through the public API are strictly serializable.

A list-append workload (each write appends a unique element, reads read whole lists) is
checked for dependency cycles by pykv.sim.listappend, and a register workload for
linearizability by pykv.sim.linearizability. A backend that skips read validation shows
that the checks can fail: the pipeline, not the checker, is what keeps the history clean.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import threading
import time

import pytest

import pykv
from pykv.api import KeyValueStore
from pykv.sim.linearizability import Op, check_linearizable
from pykv.sim.listappend import Txn, check_serializable

KEYS = [f"list/{i}" for i in range(4)]


def _random_list_append_history(
    store, run_threads, *, threads: int, txns_per_thread: int
) -> list[Txn]:
    history: list[Txn] = []
    record = threading.Lock()
    ids = itertools.count(1)
    elements = itertools.count(1)

    def client(index: int) -> None:
        rng = random.Random(index)
        for _ in range(txns_per_thread):
            plan = [
                ("append" if rng.random() < 0.5 else "r", rng.choice(KEYS))
                for _ in range(rng.randint(1, 4))
            ]
            ops = []
            start = time.monotonic()
            tx = store.transaction()
            for kind, key in plan:
                if kind == "append":
                    elem = next(elements)
                    tx.append(key, elem)
                    ops.append(("append", key, elem))
                else:
                    value = tx.get(key)
                    ops.append(("r", key, None if value is None else tuple(value)))
            try:
                tx.commit()
                committed = True
            except pykv.TransactionConflict:
                committed = False
            end = time.monotonic()
            with record:
                history.append(Txn(next(ids), tuple(ops), committed, start, end))

    run_threads(threads, client)
    return history


def _final_read(store, history: list[Txn]) -> dict[str, list]:
    start = time.monotonic()
    with store.transaction() as tx:
        final = {key: tx.get(key, []) for key in KEYS}
    ops = tuple(("r", key, tuple(value)) for key, value in final.items())
    history.append(Txn(len(history) + 1_000_000, ops, True, start, time.monotonic()))
    return final


def test_list_append_history_is_strictly_serializable(store, run_threads):
    history = _random_list_append_history(store, run_threads, threads=6, txns_per_thread=40)
    final = _final_read(store, history)

    result = check_serializable(history, strict=True)
    assert result.ok, result.explanation

    committed = [t for t in history if t.committed]
    assert len(committed) > len(history) // 3  # the workload did commit work
    appended = {(op[1], op[2]) for t in committed for op in t.ops if op[0] == "append"}
    aborted = {(op[1], op[2]) for t in history if not t.committed for op in t.ops if op[0] == "append"}
    stored = {(key, elem) for key, items in final.items() for elem in items}
    assert stored == appended  # every acknowledged append present, no aborted one
    assert not stored & aborted
    for txn in committed:
        for kind, key, value in txn.ops:
            if kind == "r" and value is not None:
                assert list(value) == final[key][: len(value)], f"txn {txn.id} read a non-prefix"


def test_register_history_is_linearizable(store, run_threads):
    ops: list[Op] = []
    record = threading.Lock()
    values = itertools.count(1)
    keys = ["reg/a", "reg/b"]

    def client(process: int) -> None:
        rng = random.Random(100 + process)
        for _ in range(30):
            key = rng.choice(keys)
            roll = rng.random()
            call = time.monotonic()
            if roll < 0.4:
                output = store.get(key)
                op = Op(process, "read", key, None, output, call, time.monotonic())
            elif roll < 0.75:
                value = next(values)
                store.put(key, value)
                op = Op(process, "write", key, value, None, call, time.monotonic())
            else:
                op = _cas(store, process, key, next(values), call)
                if op is None:
                    continue  # conflicted: it had no effect at all
            with record:
                ops.append(op)

    run_threads(5, client)
    result = check_linearizable(ops, time_limit_s=30)
    assert result.ok, result.explanation


def _cas(store, process: int, key: str, new: int, call: float) -> Op | None:
    """Compare-and-set as a transaction: expect the value just read, set a fresh one."""
    tx = store.transaction()
    expected = tx.get(key)
    if random.Random(new).random() < 0.3:
        expected = -new  # a value no write ever stores: this cas must fail
    swapped = tx.get(key) == expected
    if swapped:
        tx.put(key, new)
    try:
        tx.commit()
    except pykv.TransactionConflict:
        return None
    return Op(process, "cas", key, (expected, new), swapped, call, time.monotonic())


class SkipsReadValidation:
    """A broken backend: it drops the read set before committing (rule 1 never runs)."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.node_id = inner.node_id
        self.resolvers = inner.resolvers
        self.optimistic_reads = inner.optimistic_reads

    def mark(self):
        return None  # no read marks: every transaction that read two keys goes to commit()

    def read(self, key, *, optimistic=False, mark=None):
        return self._inner.read(key, optimistic=optimistic)

    def commit(self, request):
        self._inner.commit(dataclasses.replace(request, reads={}))

    def scan(self, prefix, start, end, limit, deleted=False):
        return self._inner.scan(prefix, start, end, limit, deleted)

    def consistent_scan(self, prefix, start, end, limit, max_bytes):
        return self._inner.consistent_scan(prefix, start, end, limit, max_bytes)

    def close(self) -> None:
        """The fixture closes the real store."""


def _write_skew(store) -> list[Txn]:
    """T1 reads x and appends to y; T2 reads y and appends to x; both try to commit."""
    t1, t2 = store.transaction(), store.transaction()
    start = time.monotonic()
    seen_x, seen_y = t1.get("list/x"), t2.get("list/y")
    t1.append("list/y", 1)
    t2.append("list/x", 2)
    outcomes = []
    for tx in (t1, t2):
        try:
            tx.commit()
            outcomes.append(True)
        except pykv.TransactionConflict:
            outcomes.append(False)
    end = time.monotonic()
    as_read = [None if v is None else tuple(v) for v in (seen_x, seen_y)]
    history = [
        Txn(1, (("r", "list/x", as_read[0]), ("append", "list/y", 1)), outcomes[0], start, end),
        Txn(2, (("r", "list/y", as_read[1]), ("append", "list/x", 2)), outcomes[1], start, end),
    ]
    final_start = time.monotonic()
    with store.transaction() as tx:
        final = tuple(("r", key, tuple(tx.get(key, []))) for key in ("list/x", "list/y"))
    history.append(Txn(3, final, True, final_start, time.monotonic()))
    return history


def test_the_checker_catches_a_pipeline_that_skips_validation(store):
    broken = KeyValueStore(SkipsReadValidation(store.backend))
    history = _write_skew(broken)
    assert [t.committed for t in history] == [True, True, True]
    result = check_serializable(history)
    assert not result.ok
    assert set(result.cycle) >= {1, 2}, result.explanation


def test_the_real_pipeline_refuses_the_same_write_skew(store):
    history = _write_skew(store)
    assert [t.committed for t in history] == [True, False, True]
    assert check_serializable(history, strict=True).ok


@pytest.mark.parametrize("threads", [8])
def test_commutative_appends_from_many_threads_all_land(store, threads, run_threads):
    def client(index: int) -> None:
        for n in range(20):
            store.append("log", index * 1000 + n)

    run_threads(threads, client)
    items = store.get("log")
    assert sorted(items) == sorted(i * 1000 + n for i in range(threads) for n in range(20))
    for i in range(threads):  # each thread's appends keep their program order
        mine = [x for x in items if x // 1000 == i]
        assert mine == sorted(mine)
