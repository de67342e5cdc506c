"""Serializability checker for list-append transaction histories (Elle-style dependency graph).

Every transaction appends unique elements to lists and reads whole lists. Because an
append never overwrites, a read reveals the order of every append before it, so each
key's version order can be inferred from its longest read; every other read must be a
prefix of it. From those orders come the dependencies between committed transactions:

- ``ww`` T1 -> T2: T2 appended the element right after T1's in a key's order;
- ``wr`` T1 -> T2: T2 read a list whose last element T1 appended;
- ``rw`` T1 -> T2: T1 read a list that T2's append later extended (an anti-dependency);
- ``rt`` T1 -> T2 (only with ``strict=True``): T1 ended before T2 started in real time.

The history is serializable (strictly, with ``rt``) only if that graph has no cycle.
Cycles are found with Tarjan's strongly connected components, and a short concrete cycle
is extracted from each, preferring the weakest kind: G0 (ww only), G1c (ww/wr),
G-single (one rw), G2-item (several rw), each with "-realtime" when it needs an rt edge.
Anomalies that need no cycle are reported too: G1a (aborted read), G1b (intermediate
read), incompatible-order, duplicate-elements, garbage-read (an element never appended),
internal (a transaction's read that misses its own earlier append).
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pykv.errors import InvalidArgument

WW, WR, RW, RT = "ww", "wr", "rw", "rt"
_EDGE_RANK = {WW: 0, WR: 1, RW: 2, RT: 3}
# Edge sets tried in turn when extracting a cycle, so the weakest anomaly is reported.
_EDGE_LEVELS = ({WW}, {WW, WR}, {WW, WR, RW}, {WW, WR, RW, RT})
_MAX_CYCLES_EXPLAINED = 5
_MAX_ANOMALIES_EXPLAINED = 10


@dataclass(frozen=True)
class Txn:
    """One transaction: its operations in order and what its client learned of its fate.

    ``ops``: ``("append", key, elem)`` or ``("r", key, list_or_tuple_or_None)``.
    ``committed``: True acknowledged, False known aborted, None unknown outcome.
    ``start``/``end``: real times, used only by the strict check.
    """

    id: int
    ops: tuple
    committed: bool | None
    start: float | None = None
    end: float | None = None


@dataclass
class ListAppendResult:
    """``ok`` when no anomaly was found; otherwise ``cycle`` (txn ids) and anomaly names."""

    ok: bool
    cycle: list[int] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    explanation: str = ""


@dataclass
class _Edge:
    kind: str
    key: Any
    why: str


class _Graph:
    """Dependency edges between transactions, each labelled with why it exists."""

    def __init__(self) -> None:
        self.out: dict[int, dict[int, list[_Edge]]] = {}

    def add(self, src: int, dst: int, kind: str, key: Any, why: str) -> None:
        if src == dst:
            return
        labels = self.out.setdefault(src, {}).setdefault(dst, [])
        if not any(e.kind == kind for e in labels):
            labels.append(_Edge(kind, key, why))
        self.out.setdefault(dst, {})

    def successors(self, node: int, kinds: set[str]) -> Iterable[int]:
        for dst, labels in self.out.get(node, {}).items():
            if any(e.kind in kinds for e in labels):
                yield dst

    def label(self, src: int, dst: int, kinds: set[str]) -> _Edge:
        usable = [e for e in self.out[src][dst] if e.kind in kinds]
        return min(usable, key=lambda e: _EDGE_RANK[e.kind])


def check_serializable(txns: list[Txn], *, strict: bool = False) -> ListAppendResult:
    """Check a list-append history for serializability (strict serializability if asked).

    Raises InvalidArgument on a malformed transaction (unknown op, duplicate txn id).
    """
    checker = _Checker(txns)
    checker.infer_orders()
    checker.build_edges(strict)
    return checker.result()


class _Checker:
    def __init__(self, txns: list[Txn]) -> None:
        self.txns: dict[int, Txn] = {}
        for txn in txns:
            if txn.id in self.txns:
                raise InvalidArgument(f"duplicate transaction id {txn.id}")
            for op in txn.ops:
                if len(op) != 3 or op[0] not in ("append", "r"):
                    raise InvalidArgument(
                        f"txn {txn.id}: ops are ('append', k, e) or ('r', k, v): {op!r}"
                    )
            self.txns[txn.id] = txn
        self.anomalies: list[tuple[str, str]] = []  # (name, detail)
        # (key, elem) -> id of the txn that appended it (first one, if duplicated)
        self.writer: dict[tuple[Any, Any], int] = {}
        # ids of txns that appended to each key, per txn: key -> [elems in op order]
        self.appends: dict[int, dict[Any, list[Any]]] = {}
        for txn in self.txns.values():
            mine = self.appends.setdefault(txn.id, {})
            for kind, key, elem in txn.ops:
                if kind != "append":
                    continue
                if (key, elem) in self.writer:
                    other = self.writer[(key, elem)]
                    self.anomalies.append(
                        (
                            "duplicate-elements",
                            f"{elem!r} appended to {key!r} by T{other} and T{txn.id}",
                        )
                    )
                    continue
                self.writer[(key, elem)] = txn.id
                mine.setdefault(key, []).append(elem)
        # Reads that count: those of acknowledged transactions. (key, reader, list read)
        self.reads: list[tuple[Any, int, tuple]] = []
        for txn in self.txns.values():
            if txn.committed is True:
                for kind, key, value in txn.ops:
                    if kind == "r":
                        self.reads.append((key, txn.id, tuple(value or ())))
        # Committed = acknowledged, or of unknown outcome but with an append someone read.
        self.committed = {t.id for t in self.txns.values() if t.committed is True}
        for _key, _reader, seen in self.reads:
            for elem in seen:
                w = self.writer.get((_key, elem))
                if w is not None and self.txns[w].committed is None:
                    self.committed.add(w)
        self.order: dict[Any, tuple] = {}
        self.incompatible: set[Any] = set()
        self.graph = _Graph()
        self._unseen: dict[Any, list[int]] = {}

    # --- per-key version orders and the anomalies that need no cycle ----------------------

    def infer_orders(self) -> None:
        for key, reader, seen in self.reads:
            if len(set(seen)) != len(seen):
                self.anomalies.append(
                    (
                        "duplicate-elements",
                        f"T{reader} read {key!r} = {list(seen)!r} with an element twice",
                    )
                )
            longest = self.order.get(key, ())
            if len(seen) > len(longest):
                self.order[key] = seen
        for key, reader, seen in self.reads:
            longest = self.order.get(key, ())
            if longest[: len(seen)] != seen and key not in self.incompatible:
                self.incompatible.add(key)
                self.anomalies.append(
                    (
                        "incompatible-order",
                        f"T{reader} read {key!r} = {list(seen)!r}, not a prefix of "
                        f"{list(longest)!r}: the appends were seen in different orders",
                    )
                )
            self._check_read_elements(key, reader, seen)
        self._check_internal()

    def _check_read_elements(self, key: Any, reader: int, seen: tuple) -> None:
        for elem in seen:
            w = self.writer.get((key, elem))
            if w is None:
                self.anomalies.append(
                    ("garbage-read", f"T{reader} read {elem!r} in {key!r}, which no txn appended")
                )
            elif self.txns[w].committed is False:
                self.anomalies.append(
                    ("G1a", f"T{reader} read {elem!r} in {key!r}, appended by aborted T{w}")
                )
        if seen:
            w = self.writer.get((key, seen[-1]))
            if w is not None and w != reader:
                mine = self.appends[w].get(key, [])
                if mine and mine[-1] != seen[-1]:
                    self.anomalies.append(
                        (
                            "G1b",
                            f"T{reader} read {key!r} ending in {seen[-1]!r}, an intermediate "
                            f"append of T{w} (its last was {mine[-1]!r})",
                        )
                    )

    def _check_internal(self) -> None:
        """A read must end with the transaction's own earlier appends to that key."""
        for txn in self.txns.values():
            if txn.committed is not True:
                continue
            own: dict[Any, list[Any]] = {}
            for kind, key, value in txn.ops:
                if kind == "append":
                    own.setdefault(key, []).append(value)
                    continue
                mine = own.get(key)
                seen = list(value or ())
                if mine and seen[len(seen) - len(mine) :] != mine:
                    self.anomalies.append(
                        ("internal", f"T{txn.id} read {key!r} = {seen!r} after appending {mine!r}")
                    )

    # --- dependency edges ----------------------------------------------------------------

    def build_edges(self, strict: bool) -> None:
        for node in self.committed:
            self.graph.out.setdefault(node, {})
        for key, order in self.order.items():
            if key not in self.incompatible:
                self._ww_edges(key, order)
        for key, reader, seen in self.reads:
            self._read_edges(key, reader, seen)
        if strict:
            self._rt_edges()

    def _writer_if_committed(self, key: Any, elem: Any) -> int | None:
        w = self.writer.get((key, elem))
        return w if w in self.committed else None

    def _unseen_appenders(self, key: Any) -> list[int]:
        """Committed txns that appended to key but whose elements no read contains."""
        found = self._unseen.get(key)
        if found is None:
            seen = set(self.order.get(key, ()))
            found = self._unseen[key] = sorted(
                t
                for t in self.committed
                if any(e not in seen for e in self.appends[t].get(key, ()))
            )
        return found

    def _ww_edges(self, key: Any, order: tuple) -> None:
        writers = [self._writer_if_committed(key, e) for e in order]
        for i in range(len(order) - 1):
            a, b = writers[i], writers[i + 1]
            if a is not None and b is not None:
                self.graph.add(
                    a, b, WW, key, f"appended {order[i]!r} then {order[i + 1]!r} to {key!r}"
                )
        # Appends no read saw come after every element that was read.
        if order and writers[-1] is not None:
            for t in self._unseen_appenders(key):
                self.graph.add(
                    writers[-1], t, WW, key, f"{order[-1]!r} precedes unread appends to {key!r}"
                )

    def _read_edges(self, key: Any, reader: int, seen: tuple) -> None:
        if seen:
            w = self._writer_if_committed(key, seen[-1])
            if w is not None:
                self.graph.add(w, reader, WR, key, f"read {key!r} ending in {seen[-1]!r}")
        if key in self.incompatible:
            return
        order = self.order.get(key, ())
        if len(seen) < len(order):
            nxt = self._writer_if_committed(key, order[len(seen)])
            if nxt is not None:
                self.graph.add(
                    reader,
                    nxt,
                    RW,
                    key,
                    f"read {key!r} = {list(seen)!r}, before {order[len(seen)]!r}",
                )
        for t in self._unseen_appenders(key):
            self.graph.add(reader, t, RW, key, f"read {key!r} = {list(seen)!r}, missing its append")

    def _rt_edges(self) -> None:
        """T1 -> T2 when T1 was acknowledged before T2 began, keeping only the frontier.

        An edge T1 -> T2 is implied by transitivity when some T1' ended before T2 began
        and began after T1 ended, so for each T2 only the txns that ended before it began
        but after the latest start among those are linked: at most the concurrency level.
        """
        done = sorted(
            (
                t
                for t in self.txns.values()
                if t.id in self.committed and t.committed is True and t.end is not None
            ),
            key=lambda t: t.end,
        )
        ends = [t.end for t in done]
        latest_start = []
        m = float("-inf")
        for t in done:
            m = max(m, t.start if t.start is not None else float("-inf"))
            latest_start.append(m)
        for t2 in self.txns.values():
            if t2.id not in self.committed or t2.start is None:
                continue
            before = bisect.bisect_left(ends, t2.start)
            if before == 0:
                continue
            first = bisect.bisect_left(ends, latest_start[before - 1])
            for t1 in done[first:before]:
                self.graph.add(t1.id, t2.id, RT, None, f"ended at {t1.end:g}, before {t2.start:g}")

    # --- cycles and the verdict ------------------------------------------------------------

    def result(self) -> ListAppendResult:
        all_kinds = {WW, WR, RW, RT}
        cycles = []
        for scc in _tarjan(self.graph, all_kinds, sorted(self.graph.out)):
            if len(scc) > 1:
                cycles.append(self._weakest_cycle(scc))
        names = sorted({name for name, _ in self.anomalies} | {name for name, _ in cycles})
        lines = []
        for name, cycle in cycles[:_MAX_CYCLES_EXPLAINED]:
            lines.append(f"{name} cycle: {self._render_cycle(cycle)}")
        if len(cycles) > _MAX_CYCLES_EXPLAINED:
            lines.append(f"... and {len(cycles) - _MAX_CYCLES_EXPLAINED} more cycles")
        for name, detail in self.anomalies[:_MAX_ANOMALIES_EXPLAINED]:
            lines.append(f"{name}: {detail}")
        if len(self.anomalies) > _MAX_ANOMALIES_EXPLAINED:
            lines.append(f"... and {len(self.anomalies) - _MAX_ANOMALIES_EXPLAINED} more anomalies")
        return ListAppendResult(
            ok=not names,
            cycle=[t for t, _ in cycles[0][1]] if cycles else [],
            anomalies=names,
            explanation="\n".join(lines),
        )

    def _weakest_cycle(self, scc: list[int]) -> tuple[str, list[tuple[int, _Edge]]]:
        """A short cycle inside the component that uses the weakest edge kinds possible."""
        members = set(scc)
        for kinds in _EDGE_LEVELS:
            for sub in _tarjan(self.graph, kinds, sorted(members), members):
                if len(sub) > 1:
                    path = _shortest_cycle(self.graph, kinds, sub)
                    steps = [
                        (a, self.graph.label(a, b, kinds))
                        for a, b in zip(path, path[1:] + path[:1], strict=True)
                    ]
                    return _classify([e for _, e in steps]), steps
        raise AssertionError("a strongly connected component without a cycle")

    def _render_cycle(self, steps: list[tuple[int, _Edge]]) -> str:
        parts = [f"T{steps[0][0]}"]
        for i, (_, edge) in enumerate(steps):
            nxt = steps[(i + 1) % len(steps)][0]
            parts.append(f" -{edge.kind}({edge.why})-> T{nxt}")
        return "".join(parts)


def _classify(edges: list[_Edge]) -> str:
    kinds = [e.kind for e in edges]
    anti = kinds.count(RW)
    if anti == 0:
        name = "G1c" if WR in kinds else "G0"
    else:
        name = "G-single" if anti == 1 else "G2-item"
    return name + ("-realtime" if RT in kinds else "")


def _tarjan(
    graph: _Graph, kinds: set[str], nodes: list[int], within: set[int] | None = None
) -> list[list[int]]:
    """Strongly connected components (iterative Tarjan), over edges of the given kinds."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    components: list[list[int]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, None)]
        while work:
            node, succs = work[-1]
            if succs is None:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
                succs = iter(
                    [s for s in graph.successors(node, kinds) if within is None or s in within]
                )
                work[-1] = (node, succs)
            advanced = False
            for s in succs:
                if s not in index:
                    work.append((s, None))
                    advanced = True
                    break
                if s in on_stack:
                    low[node] = min(low[node], index[s])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_cycle(graph: _Graph, kinds: set[str], component: list[int]) -> list[int]:
    """The shortest cycle through the component's first node (BFS back to it)."""
    members = set(component)
    start = component[0]
    parent: dict[int, int] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for s in graph.successors(node, kinds):
            if s not in members:
                continue
            if s == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1]
            if s not in parent:
                parent[s] = node
                queue.append(s)
    raise AssertionError("no cycle through a node of a strongly connected component")
