"""All delta methods of one served model, driven by part name: the engine never names a method."""

from __future__ import annotations

from typing import Any

from server.deltas import bottleneck, lora, prefix  # noqa: F401  (each registers its method)
from server.deltas.base import METHODS, DeltaLimits, DeltaMethod, DeltaRejected
from server.model.attention import PagedKVCache
from server.model.batch import BatchDescriptor
from server.model.llama import CausalLM


class DeltaSet:
    """Instantiates every registered method on the model and routes adapter parts to them."""

    def __init__(self, model: CausalLM, limits: DeltaLimits) -> None:
        self.limits = limits
        self.methods: dict[str, DeltaMethod] = {name: cls(model, limits) for name, cls in METHODS.items()}
        self._used: set[str] = set()

    def check(self, parts: dict[str, Any]) -> None:
        for name, part in parts.items():
            if name not in self.methods:
                raise DeltaRejected(f"no delta method serves {name!r} parts (known: {', '.join(self.methods)})")
            self.methods[name].check(part)

    def place(self, slot: int, parts: dict[str, Any]) -> None:
        self.check(parts)
        for name, part in parts.items():
            self.methods[name].place(slot, part)
            self._used.add(name)

    def clear(self, slot: int, parts: dict[str, Any]) -> None:
        for name in parts:
            self.methods[name].clear(slot)

    def bind_kv_cache(self, kv_cache: PagedKVCache) -> None:
        for method in self.methods.values():
            method.bind_kv_cache(kv_cache)

    def kv_prefix(self, slot: int) -> tuple[list[int], int] | None:
        if slot < 0:
            return None
        for name in self._used:
            found = self.methods[name].kv_prefix(slot)
            if found is not None:
                return found
        return None

    def position_offset(self, slot: int) -> int:
        if slot < 0:
            return 0
        return sum(self.methods[name].position_offset(slot) for name in self._used)

    def prepare(self, batch: BatchDescriptor) -> None:
        if not batch.segments.has_adapters:
            return
        for name in self._used:
            self.methods[name].prepare(batch)
