"""The interface every delta method implements, and the registry that picks one by part name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from server.model.attention import PagedKVCache
from server.model.batch import BatchDescriptor
from server.model.llama import CausalLM


class DeltaRejected(ValueError):
    """An adapter part this server cannot hold (e.g. a rank above --max-lora-rank)."""


@dataclass(frozen=True)
class DeltaLimits:
    """Static capacity of the preallocated adapter slots."""

    num_slots: int
    max_lora_rank: int
    max_prefix_tokens: int = 64
    max_bottleneck_rank: int = 256


class DeltaMethod(ABC):
    """One method of the unified view: where it acts (sites), how it is inserted, how it composes.

    A method owns preallocated per-slot storage for its weights, hooks itself into the model's
    sites once, and per step reads the batch's adapter segments to give every row its own delta.
    """

    name: ClassVar[str]  # the key of its part in AdapterWeights.parts

    def __init__(self, model: CausalLM, limits: DeltaLimits) -> None:
        self.model = model
        self.limits = limits
        self.kv_cache = None

    @abstractmethod
    def check(self, part: Any) -> None:
        """Raises DeltaRejected if the part cannot be placed in a slot."""

    @abstractmethod
    def place(self, slot: int, part: Any) -> None:
        """Copies the part's weights into a slot (off the hot path)."""

    @abstractmethod
    def clear(self, slot: int) -> None:
        """Empties a slot."""

    @abstractmethod
    def prepare(self, batch: BatchDescriptor) -> None:
        """Per-step metadata for this method, stored in batch.method_state[self.name]."""

    def position_offset(self, slot: int) -> int:
        """How far this slot's adapter shifts its requests' token positions (PEFT prefix tuning)."""
        return 0

    def bind_kv_cache(self, kv_cache: PagedKVCache) -> None:
        """Gives the method the KV cache, for methods that keep keys/values in it."""
        self.kv_cache: PagedKVCache | None = kv_cache

    def kv_prefix(self, slot: int) -> tuple[list[int], int] | None:
        """KV blocks every request of this slot attends to in front of its own, and how many tokens they hold."""
        return None


def adapter_segments(batch: BatchDescriptor, has_part: list[bool]) -> list[tuple[int, int, int]]:
    """The batch's (first row, end row, slot) segments whose slot holds this method's part."""
    seg = batch.segments
    return [(seg.bounds[i], seg.bounds[i + 1], slot) for i, slot in enumerate(seg.slots)
            if slot >= 0 and has_part[slot]]


METHODS: dict[str, type[DeltaMethod]] = {}


def register_method(cls: type[DeltaMethod]) -> type[DeltaMethod]:
    METHODS[cls.name] = cls
    return cls
