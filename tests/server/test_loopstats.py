"""What `pykv status` shows of a node's event loop: driver steps over each threshold, GC pauses, RSS."""

from __future__ import annotations

import gc
import os

from pykv.server.loopstats import SLOW_STEP_S, GcPauses, StepTimes, resident_bytes


def test_step_times_count_each_threshold_passed_and_keep_the_longest() -> None:
    times = StepTimes()
    for seconds in (0.001, 0.004, 0.012, 0.060, 0.250):
        times.record(seconds)
    assert times.as_dict() == {
        "steps": 5, "mean_ms": 65.4, "max_ms": 250.0,
        "over_10ms": 3, "over_50ms": 2, "over_200ms": 1,
    }
    assert StepTimes().as_dict()["mean_ms"] == 0.0


def test_resident_bytes_is_this_process_rss() -> None:
    with open(f"/proc/{os.getpid()}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    assert abs(resident_bytes() - rss_kb * 1024) < 8 << 20


def test_gc_pauses_count_and_time_each_generation() -> None:
    pauses = GcPauses()
    pauses.install()
    try:
        gc.collect(2)
        gc.collect(0)
    finally:
        pauses.uninstall()
    gc.collect(2)  # uninstalled: not counted
    summary = pauses.as_dict()
    assert summary["collections"][0] >= 1 and summary["collections"][2] == 1
    assert 0 < summary["max_ms"][2] <= summary["total_ms"]


def test_a_step_over_the_slow_threshold_says_so() -> None:
    times = StepTimes()
    assert not times.record(SLOW_STEP_S / 2)
    assert times.record(SLOW_STEP_S * 1.5)
