"""Run one seed of the simulator (or many), check everything, and explain a failure readably."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

from pykv.raft import Message
from pykv.sim.faults import FaultConfig
from pykv.sim.linearizability import check_linearizable
from pykv.sim.world import SimParams, SimViolation, World


@dataclass
class SimResult:
    """The outcome of one seed."""

    seed: int
    faults: str
    ok: bool
    kind: str = ""
    detail: str = ""
    trace: list[str] = field(default_factory=list)
    virtual_seconds: float = 0.0
    real_seconds: float = 0.0
    events: int = 0
    ops: int = 0
    leaders: int = 0
    nodes: int = 0


def params_for(seed: int, base: SimParams | None = None) -> SimParams:
    """The run shape a seed gets: odd seeds run 5 nodes, even seeds 3."""
    base = base or SimParams()
    return replace(base, nodes=5 if seed % 2 else 3)


def format_event(event: tuple) -> str:
    when, kind, detail = event
    node = detail[0] if detail else None
    rest = detail[1:] if detail else ()
    where = "" if node is None else (f"n{node}" if node < 1000 else f"c{node - 1000}")
    text = " ".join(_describe(x) for x in rest)
    return f"{when:10.4f}s {kind:<10} {where:<5} {text}"


def _describe(x: object) -> str:
    if isinstance(x, Message):
        parts = [f"{x.type.name} n{x.frm}->n{x.to} t{x.term}"]
        if x.index or x.log_term:
            parts.append(f"i{x.index}/t{x.log_term}")
        if x.entries:
            parts.append(f"entries {x.entries[0].index}..{x.entries[-1].index}")
        if x.commit:
            parts.append(f"commit {x.commit}")
        if x.reject:
            parts.append(f"REJECT hint {x.hint}")
        if x.snapshot is not None:
            parts.append(f"snapshot@{x.snapshot.meta.index}")
        if x.context is not None:
            parts.append(f"ctx {x.context!r}")
        return " ".join(parts)
    return str(x)


def run_seed(
    seed: int,
    faults: FaultConfig,
    params: SimParams | None = None,
    *,
    check_history: bool = True,
    trace_events: int = 400,
) -> SimResult:
    """Run one seed to the end, then check the client history for linearizability."""
    p = params_for(seed, params)
    world = World(seed, faults, p)
    world.trace = type(world.trace)(maxlen=trace_events)
    start = time.perf_counter()
    result = SimResult(seed, faults.name, True, nodes=p.nodes)
    try:
        world.run()
        if check_history:
            lin = check_linearizable(world.history, time_limit_s=30.0)
            if not lin.ok:
                kind = "linearizability (search timed out)" if lin.timed_out else "linearizability"
                raise SimViolation(kind, f"key {lin.key}: {lin.explanation}")
    except SimViolation as exc:
        result.ok = False
        result.kind = exc.kind
        result.detail = exc.detail
        result.trace = [format_event(e) for e in world.trace]
    result.real_seconds = time.perf_counter() - start
    result.virtual_seconds = world.now
    result.events = world.events
    result.ops = len(world.history)
    result.leaders = len(world.leader_of_term)
    return result


def run_seeds(
    seeds: Iterable[int],
    mixes: list[FaultConfig],
    params: SimParams | None = None,
    on_result: Callable[[SimResult], None] | None = None,
) -> Iterator[SimResult]:
    """Run each seed with the mix ``mixes[seed % len(mixes)]``."""
    for seed in seeds:
        result = run_seed(seed, mixes[seed % len(mixes)], params)
        if on_result is not None:
            on_result(result)
        yield result
