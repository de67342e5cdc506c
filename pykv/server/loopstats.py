"""How long a node's driver holds its event loop at a time, and the node's memory: for status.

Every request a node serves waits while the driver persists, applies or snapshots on the
loop thread, so the longest of those stretches are what a client's p99 sees beyond
queueing. ``StepTimes`` keeps their count, total, maximum and how many passed each of a few
thresholds (a histogram cheap enough for every step); ``resident_bytes`` reads the
process's RSS from /proc.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

THRESHOLDS_MS = (10, 50, 200)
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(slots=True)
class StepTimes:
    """Durations of the driver's steps (seconds each), summarized for ``pykv status``."""

    steps: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    over: list[int] = field(default_factory=lambda: [0] * len(THRESHOLDS_MS))

    def record(self, seconds: float) -> None:
        self.steps += 1
        self.total_s += seconds
        if seconds > self.max_s:
            self.max_s = seconds
        if seconds * 1000 > THRESHOLDS_MS[0]:  # most steps stop here
            for i, limit in enumerate(THRESHOLDS_MS):
                if seconds * 1000 > limit:
                    self.over[i] += 1

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "mean_ms": round(self.total_s * 1000 / self.steps, 3) if self.steps else 0.0,
            "max_ms": round(self.max_s * 1000, 1),
            **{f"over_{limit}ms": n for limit, n in zip(THRESHOLDS_MS, self.over, strict=True)},
        }


def resident_bytes() -> int | None:
    """This process's resident set size, or None where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None
