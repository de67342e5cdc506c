"""`pykv sim`: runs seeds, reports a violation with its seed and trace, exits non-zero."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pykv_sim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pykv.server.cli", "sim", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(ROOT), "COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def test_clean_seeds_exit_zero_with_a_summary():
    out = pykv_sim("--seeds", "4", "--start", "100", "--fault-time", "5", "--faults", "calm,chaos")
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"4 seeds, 0 failed; [\d,]+ virtual s", out.stdout)


def test_a_violation_prints_seed_trace_and_replay_command_and_fails():
    args = ("--seeds", "2", "--start", "7", "--fault-time", "3", "--faults", "lossy",
            "--liveness-bound", "0.001", "--trace", "20")
    out = pykv_sim(*args)
    assert out.returncode == 1
    assert "VIOLATION seed 7" in out.stdout and "liveness" in out.stdout
    assert "replay: pykv sim --seeds 1 --start 7 --faults lossy" in out.stdout
    assert "failing seeds: 7 8" in out.stdout
    # The same seed replays identically: the same trace, event for event.
    again = pykv_sim(*args)
    trace = [line for line in out.stdout.splitlines() if re.match(r"\s+\d+\.\d{4}s ", line)]
    trace_again = [line for line in again.stdout.splitlines() if re.match(r"\s+\d+\.\d{4}s ", line)]
    assert trace and trace == trace_again


def test_unknown_fault_mix_is_a_usage_error():
    out = pykv_sim("--seeds", "1", "--faults", "tornado")
    assert out.returncode == 2 and "unknown fault mix" in out.stdout


def test_the_transaction_simulator_runs_from_the_command_line():
    out = pykv_sim("--txn", "--seeds", "5", "--start", "40")
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"5 seeds, 0 failed; .* [\d,]+ client transactions checked", out.stdout)
