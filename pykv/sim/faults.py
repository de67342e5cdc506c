"""Fault mixes for the simulator: what can go wrong in a run, by name."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pykv.errors import Error


class UnknownFaultMix(Error, ValueError):
    """A --faults name that is not a known fault mix."""


@dataclass(frozen=True)
class FaultConfig:
    """Probabilities and switches for one run's faults (all driven by the run's seed)."""

    name: str = "calm"
    loss: float = 0.0  # each message is dropped with this probability
    duplicate: float = 0.0  # ... delivered twice
    reorder: float = 0.0  # ... delayed by up to ``reorder_delay`` (so overtaken by later ones)
    reorder_delay: float = 0.3
    partitions: bool = False  # symmetric splits, isolated nodes and one-way cuts that heal
    crashes: bool = False  # crashes that lose the un-fsync'd tail, then restarts
    clock_skew: float = 0.0  # each node's tick rate is off by up to this fraction
    slow_disk: float = 0.0  # an fsync takes 50-500 ms with this probability
    transfers: bool = False  # leadership transfers at random moments
    membership: bool = False  # learners added, promoted, and voters removed at random
    compaction: bool = True  # snapshots and log compaction (then InstallSnapshot to laggards)
    lease_reads: bool = False  # leaders serve reads under a lease sized for ``lease_drift``
    lease_drift: float = 0.1  # the clock-drift bound the lease assumes (clock_skew must fit)
    pre_vote: bool = True  # Raft options under test (the "classic" mix turns both off)
    check_quorum: bool = True


PROFILES: dict[str, FaultConfig] = {
    "calm": FaultConfig("calm"),
    "lossy": FaultConfig("lossy", loss=0.05, duplicate=0.03, reorder=0.05),
    "partition": FaultConfig("partition", partitions=True, loss=0.01),
    "crash": FaultConfig("crash", crashes=True, slow_disk=0.2, loss=0.02),
    "skew": FaultConfig("skew", clock_skew=0.3, slow_disk=0.1, reorder=0.05, transfers=True),
    "membership": FaultConfig("membership", membership=True, crashes=True, loss=0.02),
    "lease": FaultConfig(
        "lease", lease_reads=True, clock_skew=0.1, lease_drift=0.1, partitions=True,
        crashes=True, loss=0.02, reorder=0.03,
    ),
    "classic": FaultConfig(
        "classic", pre_vote=False, check_quorum=False, crashes=True, loss=0.03, reorder=0.05,
        duplicate=0.02, partitions=True,
    ),
    "chaos": FaultConfig(
        "chaos", loss=0.05, duplicate=0.03, reorder=0.05, partitions=True, crashes=True,
        clock_skew=0.2, slow_disk=0.05, transfers=True, membership=True,
    ),
}

# What `--faults all` cycles through, one mix per seed.
ALL = ("lossy", "partition", "crash", "skew", "membership", "lease", "classic", "chaos")


def parse_faults(spec: str) -> list[FaultConfig]:
    """Parse "all", or a comma-separated list of mix names (each may be tweaked: crash+loss).

    ``name+flag`` switches a boolean fault on over a mix, e.g. ``partition+crashes``.
    """
    names = ALL if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    out = []
    for name in names:
        base, *extras = name.split("+")
        if base not in PROFILES:
            raise UnknownFaultMix(f"unknown fault mix {base!r}; known: {', '.join(PROFILES)}, all")
        cfg = PROFILES[base]
        for extra in extras:
            if extra not in ("partitions", "crashes", "transfers", "membership"):
                raise UnknownFaultMix(f"unknown fault switch {extra!r}")
            cfg = replace(cfg, **{extra: True}, name=name)
        out.append(cfg)
    if not out:
        raise UnknownFaultMix("no fault mix given")
    return out
