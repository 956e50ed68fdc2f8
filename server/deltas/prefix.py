"""Prefix tuning: per-layer prefix keys/values attended to in front of a request's own.

Unified view: functional form softmax(x W_q P_k^T) P_v; parallel insertion at the attention heads;
composition h <- (1 - lambda) h + lambda * delta, which is exactly attention over [P_k; K], [P_v; V].
Nothing of it runs per step here: placing a prefix hands its keys/values to the engine, which holds them once
in pinned KV blocks that every request of the adapter attends to through its block table, like cached tokens.
Positions follow the adapter's convention: PEFT's prefix shifts the request's tokens to P..P+T-1, AdapterHub's
leaves them at 0..T-1; the prefix keys are never rotated.
"""

from __future__ import annotations

from adapters_store.types import PrefixParts
from server.deltas.base import DeltaLimits, DeltaMethod, DeltaRejected, Placement, register_method
from server.model.batch import BatchDescriptor
from server.model.llama import CausalLM


@register_method
class PrefixMethod(DeltaMethod):
    """Per-adapter prefix keys/values, handed to the engine as shared attention context."""

    name = "prefix"

    def __init__(self, model: CausalLM, limits: DeltaLimits) -> None:
        super().__init__(model, limits)
        shape = model.shape
        self.expected = (shape.num_layers, shape.num_kv_heads, shape.head_dim)
        param = model.lm_head.weight
        self.dtype, self.device = param.dtype, param.device

    def check(self, part: PrefixParts) -> None:
        layers, _, kv_heads, head_dim = part.keys.shape
        if (layers, kv_heads, head_dim) != self.expected or part.values.shape != part.keys.shape:
            raise DeltaRejected(f"prefix of shape {tuple(part.keys.shape)} does not fit this model "
                                f"(layers, kv heads, head dim = {self.expected})")
        if part.num_virtual_tokens > self.limits.max_prefix_tokens:
            raise DeltaRejected(f"prefix of {part.num_virtual_tokens} tokens exceeds --max-prefix-tokens "
                                f"{self.limits.max_prefix_tokens}")

    def place(self, slot: int, part: PrefixParts) -> Placement:
        keys = part.keys.to(device=self.device, dtype=self.dtype)       # [L, P, kvh, hd]
        values = part.values.to(device=self.device, dtype=self.dtype)
        offset = part.num_virtual_tokens if part.positions == "shifted" else 0
        return Placement(position_offset=offset, shared_keys=keys, shared_values=values)

    def clear(self, slot: int) -> None:
        pass

    def prepare(self, batch: BatchDescriptor) -> None:
        pass
