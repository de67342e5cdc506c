"""Linearizability checker for per-key register histories (Wing–Gong/Lowe search, like Porcupine).

A history is a list of :class:`Op`, each with the real time it was called and the time it
returned (``ret=None`` when the client never learned the outcome: the operation may have
taken effect at any time after its call, or never). Every key is an independent register
whose initial value is ``initial`` (``None`` = absent), so the history is split by key and
each key is checked on its own (linearizability is compositional).

The search is Lowe's refinement of the Wing–Gong algorithm: walk the history as a linked
list of call/return events; linearize any operation whose call comes before the first
pending return, backtrack when a return is reached whose operation is not yet linearized,
and memoize every (set of linearized operations, register state) pair already explored so
no configuration is searched twice.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from pykv.errors import InvalidArgument

READ, WRITE, CAS = "read", "write", "cas"
_KINDS = (READ, WRITE, CAS)
# How many search steps run between two looks at the clock.
_CLOCK_CHECK_EVERY = 4096
# How many operations an explanation lists before eliding the rest.
_SHOW_PREFIX = 12
_SHOW_CANDIDATES = 12


@dataclass(frozen=True)
class Op:
    """One client operation on one key, with its real-time call and return.

    ``value``: the new value of a write, ``(expected, new)`` for a cas, None for a read.
    ``output``: the value a read saw (None = absent), whether a cas succeeded, None for a
    write. ``ret=None`` means the outcome is unknown.
    """

    process: int
    kind: str
    key: str
    value: Any = None
    output: Any = None
    call: float = 0.0
    ret: float | None = None


@dataclass
class LinResult:
    """The verdict: ``ok`` only when every key was proven linearizable within the time limit."""

    ok: bool
    key: str | None = None
    explanation: str = ""
    timed_out: bool = False


def check_linearizable(
    ops: list[Op], *, time_limit_s: float = 10.0, initial: Any = None
) -> LinResult:
    """Check that the history is linearizable, key by key, as a set of registers.

    Returns ``LinResult(ok=True)`` when it is; otherwise the first failing key (in sorted
    order) with a readable explanation. If the search for one key runs past
    ``time_limit_s`` (counted over the whole call) the result is ``ok=False,
    timed_out=True``: not proven either way. Raises InvalidArgument on a malformed operation.
    """
    for op in ops:
        _validate(op)
    deadline = time.monotonic() + time_limit_s
    by_key: dict[str, list[Op]] = {}
    for op in ops:
        if op.kind == READ and op.ret is None:
            continue  # a read whose result nobody saw constrains nothing
        by_key.setdefault(op.key, []).append(op)
    for key in sorted(by_key, key=str):
        result = _KeySearch(key, _drop_unobservable(by_key[key]), initial, deadline).run()
        if not result.ok:
            return result
    return LinResult(ok=True)


def _validate(op: Op) -> None:
    if op.kind not in _KINDS:
        raise InvalidArgument(f"op kind must be one of {_KINDS}, got {op.kind!r}: {op}")
    if op.ret is not None and op.ret < op.call:
        raise InvalidArgument(f"op returns before it is called: {op}")
    if op.kind == CAS:
        if not (isinstance(op.value, (tuple, list)) and len(op.value) == 2):
            raise InvalidArgument(f"a cas value must be (expected, new): {op}")
        if op.ret is not None and not isinstance(op.output, bool):
            raise InvalidArgument(f"a completed cas must have a bool output: {op}")


def _drop_unobservable(ops: list[Op]) -> list[Op]:
    """Drop unknown-outcome writes and cas ops whose effect no operation could observe.

    Such an op may be linearized "never" (at the end), and that is always at least as
    good as any other place when no read saw its value, no cas expected it, and no cas
    failed (a failed cas is the one thing a value nobody read can explain). Crash-heavy
    histories are full of these, and each kept one doubles the search space.
    """
    unknown = [op for op in ops if op.ret is None]
    if not unknown or any(op.kind == CAS and op.ret is not None and not op.output for op in ops):
        return ops
    observed = {_freeze(op.output) for op in ops if op.kind == READ}
    observed |= {_freeze(op.value[0]) for op in ops if op.kind == CAS}

    def invisible(op: Op) -> bool:
        if op.ret is not None or op.kind == READ:
            return False
        return _freeze(op.value if op.kind == WRITE else op.value[1]) not in observed

    return [op for op in ops if not invisible(op)]


def _freeze(value: Any) -> Hashable:
    """A hashable stand-in for a value, equal exactly when the values are equal."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((_freeze(k), _freeze(v)) for k, v in value.items())))
    if isinstance(value, set):
        return ("set", frozenset(_freeze(v) for v in value))
    return value


def describe(op: Op) -> str:
    """A one-line, human-readable rendering of an operation."""
    ret = "?" if op.ret is None else f"{op.ret:g}"
    if op.kind == WRITE:
        body = f"write({op.value!r})"
    elif op.kind == READ:
        body = f"read() -> {op.output!r}"
    else:
        outcome = "unknown" if op.ret is None else op.output
        body = f"cas({op.value[0]!r} -> {op.value[1]!r}) -> {outcome}"
    return f"p{op.process} {body} [{op.call:g}, {ret}]"


class _KeySearch:
    """The WGL search over the history of one key, with values interned to small ints."""

    def __init__(self, key: str, ops: list[Op], initial: Any, deadline: float) -> None:
        self.key = key
        self.ops = ops
        self.deadline = deadline
        self._ids: dict[Hashable, int] = {}
        self.values: list[Any] = []
        self.initial = self._intern(initial)
        # Per op: kind code (0 read, 1 write, 2 cas), and the interned arguments.
        self.kind = [_KINDS.index(op.kind) for op in ops]
        self.arg_a = [0] * len(ops)  # read: output seen; write: new value; cas: expected
        self.arg_b = [0] * len(ops)  # cas: new value
        for i, op in enumerate(ops):
            if op.kind == READ:
                self.arg_a[i] = self._intern(op.output)
            elif op.kind == WRITE:
                self.arg_a[i] = self._intern(op.value)
            else:
                self.arg_a[i] = self._intern(op.value[0])
                self.arg_b[i] = self._intern(op.value[1])
        self.completed = [op.ret is not None for op in ops]

    def _intern(self, value: Any) -> int:
        frozen = _freeze(value)
        found = self._ids.get(frozen)
        if found is None:
            found = self._ids[frozen] = len(self.values)
            self.values.append(value)
        return found

    def _step(self, state: int, i: int) -> int:
        """The register state after op i, or -1 when op i cannot happen in this state."""
        kind = self.kind[i]
        if kind == 0:
            return state if self.arg_a[i] == state else -1
        if kind == 1:
            return self.arg_a[i]
        matches = self.arg_a[i] == state
        if not self.completed[i]:
            # An unknown cas that takes effect succeeds exactly when the value matches.
            return self.arg_b[i] if matches else state
        if self.ops[i].output:
            return self.arg_b[i] if matches else -1
        return -1 if matches else state

    def _event_list(self) -> tuple[list[int], list[int], int]:
        """A circular doubly linked list of events: 2i = call of op i, 2i+1 = its return.

        Events are ordered by time; at equal times calls come first, so operations that
        merely touch are treated as concurrent (the lenient reading, never a false alarm).
        """
        events = []
        for i, op in enumerate(self.ops):
            events.append((op.call, 0, 2 * i))
            events.append((math.inf if op.ret is None else op.ret, 1, 2 * i + 1))
        events.sort()
        head = 2 * len(self.ops)
        nxt = [0] * (head + 1)
        prv = [0] * (head + 1)
        order = [head] + [e for _, _, e in events] + [head]
        for a, b in zip(order, order[1:], strict=False):
            nxt[a] = b
            prv[b] = a
        return nxt, prv, head

    def run(self) -> LinResult:
        nxt, prv, head = self._event_list()
        remaining = sum(self.completed)
        state = self.initial
        linearized = 0  # bitset of linearized ops
        stack: list[tuple[int, int]] = []  # (call event, state before it)
        seen: set[tuple[int, int]] = set()
        best: list[int] = []
        steps = 0
        entry = nxt[head]
        while remaining:
            steps += 1
            if steps % _CLOCK_CHECK_EVERY == 0 and time.monotonic() > self.deadline:
                return LinResult(
                    ok=False,
                    key=self.key,
                    timed_out=True,
                    explanation=f"key {self.key!r}: the search ran out of time after "
                    f"{steps} steps over {len(self.ops)} operations; not proven either way",
                )
            if entry & 1 == 0:  # a call: try to linearize this op now
                i = entry >> 1
                after = self._step(state, i)
                if after >= 0:
                    config = (linearized | (1 << i), after)
                    if config not in seen:
                        seen.add(config)
                        stack.append((entry, state))
                        state, linearized = after, config[0]
                        ret = entry + 1
                        nxt[prv[entry]] = nxt[entry]  # lift the call and its return
                        prv[nxt[entry]] = prv[entry]
                        nxt[prv[ret]] = nxt[ret]
                        prv[nxt[ret]] = prv[ret]
                        remaining -= self.completed[i]
                        if len(stack) > len(best):
                            best = [e >> 1 for e, _ in stack]
                        entry = nxt[head]
                        continue
                entry = nxt[entry]
            else:  # a return of an op not yet linearized: undo the last choice
                if not stack:
                    return self._failure(best)
                entry, state = stack.pop()
                i = entry >> 1
                linearized &= ~(1 << i)
                ret = entry + 1
                nxt[prv[ret]] = ret  # unlift in reverse order
                prv[nxt[ret]] = ret
                nxt[prv[entry]] = entry
                prv[nxt[entry]] = entry
                remaining += self.completed[i]
                entry = nxt[entry]
        return LinResult(ok=True, key=self.key)

    def _failure(self, best: list[int]) -> LinResult:
        """Explain the deepest point the search reached and what could not follow it."""
        state = self.initial
        for i in best:
            state = self._step(state, i)
        placed = set(best)
        left = [i for i in range(len(self.ops)) if i not in placed]
        must_by = min(self.ops[i].ret for i in left if self.completed[i])
        candidates = [i for i in left if self.ops[i].call <= must_by]
        lines = [
            f"key {self.key!r} is not linearizable: the longest linearizable prefix found "
            f"orders {len(best)} of {len(self.ops)} operations:"
        ]
        shown = best[-_SHOW_PREFIX:]
        if len(best) > len(shown):
            lines.append(f"  ... {len(best) - len(shown)} earlier operations")
        lines += [f"  {describe(self.ops[i])}" for i in shown]
        lines.append(
            f"after which the register holds {self.values[state]!r}, and none of these "
            f"could be placed next (each is impossible or leads to a dead end) before "
            f"time {must_by:g}:"
        )
        for i in candidates[:_SHOW_CANDIDATES]:
            lines.append(f"  {describe(self.ops[i])}{self._why_not(state, i)}")
        if len(candidates) > _SHOW_CANDIDATES:
            lines.append(f"  ... and {len(candidates) - _SHOW_CANDIDATES} more")
        return LinResult(ok=False, key=self.key, explanation="\n".join(lines))

    def _why_not(self, state: int, i: int) -> str:
        if self._step(state, i) >= 0:
            return ""
        op = self.ops[i]
        if op.kind == READ:
            return f"  <- saw {op.output!r}, but the register holds {self.values[state]!r}"
        if op.output:
            return f"  <- succeeded, but the register holds {self.values[state]!r}"
        return f"  <- failed, but the register holds the expected {op.value[0]!r}"
