"""Resident adapters: which adapter holds which preallocated slot, with reference counts and LRU."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

from adapters_store.errors import AdapterNotFound
from adapters_store.types import AdapterWeights
from server.deltas.deltaset import DeltaSet
from server.engine.errors import Overloaded, UnknownAdapter


class AdapterSource(Protocol):
    """Where adapters come from (the adapter store)."""

    def get(self, name: str) -> AdapterWeights: ...


class AdapterSlots:
    """Maps adapter names to device slots for the engine (`acquire` / `release`).

    A slot in use by any request is never evicted; idle slots are reused least recently used
    first. `can_place()` says whether `place()` would find a slot.
    """

    def __init__(self, source: AdapterSource, deltas: DeltaSet) -> None:
        self.source = source
        self.deltas = deltas
        self.num_slots = deltas.limits.num_slots
        self._lock = threading.Lock()
        self._slot_of: dict[str, int] = {}
        self._adapter: list[AdapterWeights | None] = [None] * self.num_slots
        self._refs = [0] * self.num_slots
        self._idle: OrderedDict[int, None] = OrderedDict()   # resident, unreferenced; oldest first
        self._free = list(range(self.num_slots - 1, -1, -1))

    def acquire(self, adapter_id: str) -> int:
        with self._lock:
            slot = self._slot_of.get(adapter_id)
            if slot is None:
                try:
                    adapter = self.source.get(adapter_id)
                except AdapterNotFound as error:
                    raise UnknownAdapter(str(error)) from error
                if not self.can_place():
                    raise Overloaded(f"all {self.num_slots} adapter slots are held by running requests; "
                                     f"retry later or raise --max-adapter-slots")
                slot = self.place(adapter)
            self._refs[slot] += 1
            self._idle.pop(slot, None)
            return slot

    def release(self, slot: int) -> None:
        if slot < 0:
            return
        with self._lock:
            self._refs[slot] -= 1
            if self._refs[slot] == 0:
                self._idle[slot] = None

    def can_place(self) -> bool:
        return bool(self._free or self._idle)

    def place(self, adapter: AdapterWeights) -> int:
        """Puts an adapter in a free slot, evicting the least recently used idle one if needed."""
        if self._free:
            slot = self._free.pop()
        else:
            slot, _ = self._idle.popitem(last=False)
            self._evict(slot)
        self.deltas.place(slot, adapter.parts)
        self._adapter[slot] = adapter
        self._slot_of[adapter.name] = slot
        return slot

    def _evict(self, slot: int) -> None:
        old = self._adapter[slot]
        if old is not None:
            self.deltas.clear(slot, old.parts)
            del self._slot_of[old.name]
        self._adapter[slot] = None

    def resident(self) -> dict[str, int]:
        with self._lock:
            return dict(self._slot_of)
