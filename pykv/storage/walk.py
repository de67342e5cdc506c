"""Walks the keys of a sorted index that start with a prefix, a batch at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

K = TypeVar("K", str, bytes)


def key_batches(take: Callable[[K, bool], list[K]], prefix: K, start: K | None) -> Iterator[K]:
    """The keys from max(prefix, start) on that start with ``prefix``, in order.

    ``take(low, inclusive)`` returns the next batch of the index from ``low`` (included or
    not), up to the walk's end bound, or [] past it. Between two batches the index may
    change (its owner takes a lock for each ``take`` only): the walk goes on after the last
    key it gave.
    """
    low = prefix if start is None or start < prefix else start
    inclusive = True
    while batch := take(low, inclusive):
        for key in batch:
            if not key.startswith(prefix):
                return
            yield key
        low, inclusive = batch[-1], False
