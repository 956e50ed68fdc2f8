"""The interface every delta method implements, and the registry that picks one by part name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from server.model.batch import BatchDescriptor
from server.model.llama import CausalLM


class DeltaRejected(ValueError):
    """An adapter part this server cannot hold (e.g. a rank above --max-lora-rank)."""


@dataclass(frozen=True)
class Placement:
    """What an adapter placed in a slot asks of the engine beyond its own weights (nothing, for most methods)."""

    position_offset: int = 0                      # how far it shifts its requests' token positions
    shared_keys: torch.Tensor | None = None       # [layers, T, kv_heads, head_dim] keys every one of its
    #                                               requests attends to in front of its own (never rotated)
    shared_values: torch.Tensor | None = None     # [layers, T, kv_heads, head_dim]

    @property
    def shared_tokens(self) -> int:
        return 0 if self.shared_keys is None else int(self.shared_keys.shape[1])


NOTHING_MORE = Placement()


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

    @abstractmethod
    def check(self, part: Any) -> None:
        """Raises DeltaRejected if the part cannot be placed in a slot."""

    @abstractmethod
    def place(self, slot: int, part: Any) -> Placement | None:
        """Copies the part's weights into a slot (off the hot path); returns what else the slot's requests need
        from the engine, or None for nothing."""

    @abstractmethod
    def clear(self, slot: int) -> None:
        """Empties a slot."""

    @abstractmethod
    def prepare(self, batch: BatchDescriptor) -> None:
        """Per-step metadata for this method, stored in batch.method_state[self.name]. On a captured decode step
        (batch.row_slots set) it may only run device operations on the batch's tensors: it runs once, at capture."""

    def launch_key(self) -> tuple:
        """Whatever decides which kernels a step launches and their grids (sites, rank bounds): a captured decode
        step is captured again when it changes; placements that leave it alone need no new capture."""
        return ()

    def capturable(self, slot: int) -> bool:
        """Whether the slot's part applies through device tensors alone (a captured decode step may carry it)."""
        return True


def adapter_segments(batch: BatchDescriptor, has_part: list[bool]) -> list[tuple[int, int, int]]:
    """The batch's (first row, end row, slot) segments whose slot holds this method's part."""
    seg = batch.segments
    return [(seg.bounds[i], seg.bounds[i + 1], slot) for i, slot in enumerate(seg.slots)
            if slot >= 0 and has_part[slot]]


METHODS: dict[str, type[DeltaMethod]] = {}


def register_method(cls: type[DeltaMethod]) -> type[DeltaMethod]:
    METHODS[cls.name] = cls
    return cls
