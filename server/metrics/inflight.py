"""Requests waiting and running, in total and per adapter, kept up to date from engine events.

The engine thread owns the scheduler's queues and reorders them every step; reading them from the
scrape thread could catch a list mid-sort (it looks empty then). Counting from events avoids that.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class InFlightSnapshot:
    """Requests in the engine at one instant; adapter names sorted, the base model left out."""

    running: int
    waiting: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]


class InFlight:
    """Counts of waiting and running requests; updated on the engine thread, read by scrapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = {False: 0, True: 0}                       # running? -> requests
        self._by_adapter: dict[bool, dict[str, int]] = {False: {}, True: {}}

    def add(self, adapter: str, running: bool) -> None:
        with self._lock:
            self._change(adapter, running, 1)

    def remove(self, adapter: str, running: bool) -> None:
        with self._lock:
            self._change(adapter, running, -1)

    def move(self, adapter: str, to_running: bool) -> None:
        with self._lock:
            self._change(adapter, not to_running, -1)
            self._change(adapter, to_running, 1)

    def _change(self, adapter: str, running: bool, delta: int) -> None:
        self._total[running] += delta
        if not adapter:
            return
        table = self._by_adapter[running]
        count = table.get(adapter, 0) + delta
        if count > 0:
            table[adapter] = count
        else:
            table.pop(adapter, None)

    def snapshot(self) -> InFlightSnapshot:
        with self._lock:
            return InFlightSnapshot(self._total[True], self._total[False], tuple(sorted(self._by_adapter[True])),
                                    tuple(sorted(self._by_adapter[False])))
