"""Shared fixtures: ``store`` (the API suite on every backend of KeyValueStore), ``run_threads``."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The backends tests/test_api.py runs on: every API test runs on both unchanged. The cluster
# is one real 3-node cluster (separate processes on 127.0.0.1) shared by the whole session and
# wiped before each test, since starting one costs seconds.
BACKENDS = ["embedded", "cluster"]


def _embedded_factory(directory: Path) -> Callable[..., Any]:
    import pykv

    def make(**options: Any) -> Any:
        return pykv.open(directory, **options)

    return make


@pytest.fixture(scope="session")
def cluster_addresses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """The addresses of a running 3-node cluster, stopped at the end of the session."""
    from cluster_harness import running_cluster

    with running_cluster(tmp_path_factory.mktemp("api-cluster"), nodes=3) as addresses:
        yield addresses


def _cluster_factory(addresses: list[str]) -> Callable[..., Any]:
    from cluster_harness import wipe_cluster

    import pykv

    wipe_cluster(addresses)

    def make(**options: Any) -> Any:
        return pykv.connect(addresses, **options)

    return make


@pytest.fixture(params=BACKENDS)
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """make(**options) -> a KeyValueStore on one store shared by every call of this test.

    For the embedded backend a directory allows one open handle at a time, so close the
    previous one before making the next. Every handle made is closed after the test.
    """
    if request.param == "embedded":
        make = _embedded_factory(tmp_path / "db")
    elif request.param == "cluster":
        make = _cluster_factory(request.getfixturevalue("cluster_addresses"))
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


def _run_threads(count: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            target(index)
        except BaseException as exc:  # re-raised in the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.fixture
def run_threads() -> Callable[[int, Callable[[int], None]], None]:
    """run_threads(count, target): target(0) .. target(count - 1), each in its own thread,
    all at once; returns when every one is done and re-raises the first error any raised
    (an exception in a plain thread would only be printed, and the test would pass)."""
    return _run_threads
