"""Maintainer: one background thread that compacts and checkpoints many stores (a node's shards).

A Storage opened on its own runs its own maintenance thread. A node with hundreds of shards
would then run hundreds of threads that wake every second, so the node's stores share one
Maintainer instead: one thread visits each store in turn, once per ``interval``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pykv.storage.store import Storage


class Maintainer:
    """Runs ``Storage.maintain()`` on every registered store once per ``interval`` seconds."""

    def __init__(self, interval: float = 1.0, name: str = "pykv-maintenance") -> None:
        self.interval = interval
        self._stores: dict[int, Storage] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def add(self, store: Storage) -> None:
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("the maintainer is closed")
            self._stores[id(store)] = store
            if not self._started:
                self._started = True
                self._thread.start()

    def discard(self, store: Storage) -> None:
        with self._lock:
            self._stores.pop(id(store), None)

    def __len__(self) -> int:
        return len(self._stores)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                stores = list(self._stores.values())
            for store in stores:
                if self._stop.is_set():
                    return
                store.maintain()  # a store closed meanwhile does nothing

    def close(self) -> None:
        """Stop the thread (after the store it is visiting, if any); idempotent."""
        self._stop.set()
        if self._started:
            self._thread.join()
