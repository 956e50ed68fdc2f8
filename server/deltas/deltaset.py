"""All delta methods of one served model, driven by part name: the engine never names a method."""

from __future__ import annotations

from typing import Any

import torch

from server.deltas import bottleneck, lora, prefix  # noqa: F401  (each registers its method)
from server.deltas.base import METHODS, NOTHING_MORE, DeltaLimits, DeltaMethod, DeltaRejected, Placement
from server.model.batch import BatchDescriptor
from server.model.llama import CausalLM


class DeltaSet:
    """Instantiates every registered method on the model and routes adapter parts to them."""

    def __init__(self, model: CausalLM, limits: DeltaLimits) -> None:
        self.limits = limits
        self.methods: dict[str, DeltaMethod] = {name: cls(model, limits) for name, cls in METHODS.items()}
        self._used: set[str] = set()
        self._changes = 0                              # placements and clears so far
        self._key: tuple[int, tuple] = (-1, ())        # the launch key as of a count of changes

    def check(self, parts: dict[str, Any]) -> None:
        for name, part in parts.items():
            if name not in self.methods:
                raise DeltaRejected(f"no delta method serves {name!r} parts (known: {', '.join(self.methods)})")
            self.methods[name].check(part)

    def place(self, slot: int, parts: dict[str, Any]) -> Placement:
        """Places every part in the slot; returns what the slot's requests need from the engine, all parts
        together (offsets add up; shared keys/values are joined in part order)."""
        self.check(parts)
        self._changes += 1
        placements = []
        for name, part in parts.items():
            placement = self.methods[name].place(slot, part)
            if placement is not None:
                placements.append(placement)
            self._used.add(name)
        return combine(placements)

    def clear(self, slot: int, parts: dict[str, Any]) -> None:
        self._changes += 1
        for name in parts:
            self.methods[name].clear(slot)

    def prepare(self, batch: BatchDescriptor) -> None:
        if not batch.segments.has_adapters and batch.row_slots is None:
            return
        for name in self._used:
            self.methods[name].prepare(batch)

    def launch_key(self) -> tuple:
        """Changes exactly when a captured decode step must be captured again (see DeltaMethod.launch_key)."""
        if self._key[0] != self._changes:
            self._key = (self._changes, tuple((name, self.methods[name].launch_key()) for name in sorted(self._used)))
        return self._key[1]

    def capturable(self, slots: set[int]) -> bool:
        return all(method.capturable(slot) for method in self.methods.values() for slot in slots if slot >= 0)


def combine(placements: list[Placement]) -> Placement:
    """One placement for several parts of one adapter."""
    shared = [p for p in placements if p.shared_keys is not None]
    if not placements:
        return NOTHING_MORE
    keys = torch.cat([p.shared_keys for p in shared], dim=1) if shared else None
    values = torch.cat([p.shared_values for p in shared], dim=1) if shared else None
    return Placement(sum(p.position_offset for p in placements), keys, values)
