"""Domain objects of the store: one loaded, validated adapter and its per-method parts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class AdapterPart(Protocol):
    """What every method's part offers the store (for accounting; the engine knows the concrete type)."""

    def tensors(self) -> Iterator[torch.Tensor]: ...


@dataclass
class LoraModule:
    """LoRA on one linear: y = base(x) + scale * x @ a.T @ b.T."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (per-module alpha/rank from patterns)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoraParts:
    """The LoRA modules of one adapter, keyed by linear module path (ModelSpec.linears keys)."""

    modules: dict[str, LoraModule]

    def tensors(self) -> Iterator[torch.Tensor]:
        for module in self.modules.values():
            yield module.a
            yield module.b

    @property
    def ranks(self) -> dict[str, int]:
        return {path: module.rank for path, module in self.modules.items()}

    @property
    def max_rank(self) -> int:
        return max((module.rank for module in self.modules.values()), default=0)


@dataclass
class AdapterWeights:
    """One loaded, validated adapter: method parts keyed by method name."""

    name: str
    path: str
    format: str  # "peft_lora"
    parts: dict[str, Any]  # {"lora": LoraParts}; later methods add "prefix", "bottleneck", ...
    config: dict = field(default_factory=dict)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.parts)

    def tensors(self) -> Iterator[torch.Tensor]:
        for part in self.parts.values():
            yield from part.tensors()

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
