"""How long a node's driver holds its event loop at a time, its GC pauses and its memory.

Every request a node serves waits while the driver persists, applies or snapshots on the
loop thread, so the longest of those stretches are what a client's p99 sees beyond
queueing. ``StepTimes`` keeps their count, total, maximum and how many passed each of a few
thresholds (a histogram cheap enough for every step); ``GcPauses`` times the collector's
runs, which stop every thread; ``resident_bytes`` reads the process's RSS from /proc.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field

THRESHOLDS_MS = (10, 50, 200)
SLOW_STEP_S = THRESHOLDS_MS[-1] / 1000  # a step this long is logged with what it did
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(slots=True)
class StepTimes:
    """Durations of the driver's steps (seconds each), summarized for ``pykv status``."""

    steps: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    over: list[int] = field(default_factory=lambda: [0] * len(THRESHOLDS_MS))

    def record(self, seconds: float) -> bool:
        """Count a step; True if it was slow (over SLOW_STEP_S)."""
        self.steps += 1
        self.total_s += seconds
        if seconds > self.max_s:
            self.max_s = seconds
        if seconds * 1000 > THRESHOLDS_MS[0]:  # most steps stop here
            for i, limit in enumerate(THRESHOLDS_MS):
                if seconds * 1000 > limit:
                    self.over[i] += 1
        return seconds > SLOW_STEP_S

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "mean_ms": round(self.total_s * 1000 / self.steps, 3) if self.steps else 0.0,
            "max_ms": round(self.max_s * 1000, 1),
            **{f"over_{limit}ms": n for limit, n in zip(THRESHOLDS_MS, self.over, strict=True)},
        }


class GcPauses:
    """Collections per generation, their total and longest pause, timed by gc.callbacks."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.total_s = 0.0
        self.max_s = [0.0, 0.0, 0.0]
        self._started = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        generation = info["generation"]
        self.collections[generation] += 1
        self.total_s += seconds
        self.max_s[generation] = max(self.max_s[generation], seconds)

    def as_dict(self) -> dict:
        return {
            "collections": list(self.collections),
            "total_ms": round(self.total_s * 1000, 1),
            "max_ms": [round(s * 1000, 1) for s in self.max_s],
        }


def resident_bytes() -> int | None:
    """This process's resident set size, or None where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None
