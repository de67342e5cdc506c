"""Benchmark collection (bench_*.py files) and a summary of speed ratios measured in the same run.

Run: python3 -m pytest benchmarks/ -p no:randomly --benchmark-columns=mean,ops,rounds
A benchmark calls ``record(group, name, seconds, units=..., subject=...)``; at the end of
the run every group prints each entry's units/s, and the subject's speed-up over each of
the other entries (its baselines).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

_RESULTS: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
_SUBJECTS: dict[str, str] = {}
_NOTES: list[str] = []


def pytest_collect_file(file_path: Path, parent):
    # pyproject's python_files only matches test_*.py; benchmarks are bench_*.py.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if not parent.session.isinitpath(file_path):
            return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def record():
    """record(group, name, seconds, units=1, subject=False): keep a figure for the summary."""

    def keep(group: str, name: str, seconds: float, units: float = 1.0, subject: bool = False) -> None:
        _RESULTS[group][name] = (seconds, units)
        if subject:
            _SUBJECTS[group] = name

    return keep


@pytest.fixture
def note():
    """note(text): a line for the summary (figures that are not speeds, e.g. bytes per key)."""
    return _NOTES.append


def pytest_terminal_summary(terminalreporter) -> None:
    if not _RESULTS and not _NOTES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("ratios measured in this run")
    for group in sorted(_RESULTS):
        rates = {name: units / seconds for name, (seconds, units) in _RESULTS[group].items()}
        subject = _SUBJECTS.get(group)
        write(f"{group}:")
        for name, rate in rates.items():
            write(f"  {name:<24} {rate:>14,.0f} /s")
        if subject in rates:
            for name, rate in rates.items():
                if name != subject:
                    write(f"  -> {subject} / {name} = x{rates[subject] / rate:,.2f}")
    for text in _NOTES:
        write(text)
