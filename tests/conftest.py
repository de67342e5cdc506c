"""Shared fixtures: ``store`` runs the API suite against every backend of pykv.KeyValueStore."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The backends tests/test_api.py runs on. The cluster adds "cluster" here, with a factory
# that connects to a local cluster; every API test then runs on both unchanged.
BACKENDS = ["embedded"]


def _embedded_factory(directory: Path) -> Callable[..., Any]:
    import pykv

    def make(**options: Any) -> Any:
        return pykv.open(directory, **options)

    return make


@pytest.fixture(params=BACKENDS)
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """make(**options) -> a KeyValueStore on one store shared by every call of this test.

    For the embedded backend a directory allows one open handle at a time, so close the
    previous one before making the next. Every handle made is closed after the test.
    """
    if request.param == "embedded":
        make = _embedded_factory(tmp_path / "db")
    else:  # pragma: no cover - a backend listed without a factory is a bug in this file
        raise AssertionError(f"no factory for backend {request.param!r}")
    opened: list[Any] = []

    def tracked(**options: Any) -> Any:
        db = make(**options)
        opened.append(db)
        return db

    yield tracked
    for db in opened:
        db.close()


@pytest.fixture
def store(store_factory: Callable[..., Any]) -> Any:
    """A fresh, empty KeyValueStore with default options."""
    return store_factory()
