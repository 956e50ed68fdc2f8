"""The slow, obviously right LoRA delta (PEFT's mixed-batch loop): the oracle for the fast paths."""

from __future__ import annotations

import torch

from adapters_store.types import LoraModule


def lora_delta_reference(x: torch.Tensor, row_adapters: list[LoraModule | None]) -> torch.Tensor:
    """x [N, in]; row_adapters[i] is row i's LoRA at this linear (None: no delta). Returns [N, out]."""
    outs = []
    for row, module in zip(x, row_adapters, strict=True):
        if module is None:
            outs.append(None)
            continue
        outs.append(module.scale * ((row.unsqueeze(0) @ module.a.t()) @ module.b.t()).squeeze(0))
    width = next((o.shape[0] for o in outs if o is not None), 0)
    return torch.stack([o if o is not None else torch.zeros(width, dtype=x.dtype) for o in outs])
