"""Deterministic simulation of the real code under seeded faults, and history checkers.

- ``world``: the simulated cluster (virtual time, faulty network, per-node disks whose
  un-fsync'd tail a crash loses, Raft nodes driven by the Ready contract, KV clients) and
  the Raft safety checks it runs on every event;
- ``faults``: named fault mixes; ``kvsm``: the replicated map the clients use;
- ``runner``: one seed end to end (plus the linearizability check) with a readable trace;
- ``linearizability`` and ``listappend``: history checkers.

Replay a seed: ``pykv sim --seeds 1 --start SEED --faults MIX``.
"""
