"""Simulator and Raft-core speed: virtual seconds per real second, and Raft steps per second.

Ratios are against baselines measured in the same run, never asserted:
- the simulator's virtual seconds/s under a calm and a chaos fault mix, against the bare
  event loop (a heap of no-op events, as many as the calm run processed), which shows what
  share of the time Raft, the checks and the clients take;
- RaftNode message steps/s for a replicated proposal (leader + 2 followers in lockstep),
  against encoding and decoding the same messages with msgpack (pykv.codec).

Run: python3 -m pytest benchmarks/bench_sim.py -p no:randomly --benchmark-columns=mean,rounds
"""

from __future__ import annotations

import heapq
import time

from pykv.codec import pack, unpack
from pykv.raft import Message
from pykv.raft.harness import Harness
from pykv.sim.faults import PROFILES
from pykv.sim.runner import params_for
from pykv.sim.world import SimParams, World

PARAMS = SimParams(fault_time=10.0)


def _run_world(seed: int, mix: str) -> World:
    world = World(seed, PROFILES[mix], params_for(seed, PARAMS))
    world.run()
    return world


def test_simulator_virtual_seconds_per_real_second(benchmark, record, note):
    worlds: list[World] = []

    def calm() -> None:
        worlds.append(_run_world(0, "calm"))

    benchmark.pedantic(calm, rounds=3, iterations=1)
    w = worlds[-1]
    record("sim: virtual seconds", "calm (3 nodes)", benchmark.stats.stats.mean, units=w.now,
           subject=True)
    start = time.perf_counter()
    chaos = _run_world(1, "chaos")
    record("sim: virtual seconds", "chaos (5 nodes)", time.perf_counter() - start, units=chaos.now)

    # Baseline: the bare event loop with as many events as the calm run handled.
    events = w.events

    def noop() -> None:
        pass

    start = time.perf_counter()
    q: list = []
    for i in range(events):
        heapq.heappush(q, (i * 0.001, i, noop, ()))
    while q:
        _, _, fn, args = heapq.heappop(q)
        fn(*args)
    bare = time.perf_counter() - start
    record("sim: events", "simulated cluster", benchmark.stats.stats.mean, units=events, subject=True)
    record("sim: events", "bare heap event loop", bare, units=events)
    note(f"sim: calm run = {w.events:,} events, {len(w.history):,} client ops in {w.now:.1f} "
         f"virtual s")


def test_raft_steps_per_second(benchmark, record):
    h = Harness([1, 2, 3])
    leader = h.elect(1)
    steps = [0]

    def replicate() -> None:
        for _ in range(50):
            leader.propose(b"x" * 64)
            h.flush()
            while h.in_flight:
                h.deliver(h.in_flight.popleft())
                steps[0] += 1
                h.flush()

    benchmark.pedantic(replicate, rounds=5, iterations=1)
    per_round = steps[0] / 5
    record("raft: message steps", "RaftNode.step + Ready cycle", benchmark.stats.stats.mean,
           units=per_round, subject=True)
    sample = Message(1, 2, 1, 3, 2, 10, (), 9)
    wire_msgs = [sample] * int(per_round)
    start = time.perf_counter()
    for m in wire_msgs:
        Message.from_wire(unpack(pack(m.to_wire())))
    record("raft: message steps", "msgpack encode+decode only", time.perf_counter() - start,
           units=len(wire_msgs))
