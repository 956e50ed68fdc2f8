"""Prefix tuning: per-layer prefix keys/values joined in front of a request's own, per request.

Unified view: functional form softmax(x W_q P_k^T) P_v; parallel insertion at the attention heads;
composition h <- (1 - lambda) h + lambda * delta, which is exactly attention over [P_k; K], [P_v; V].
An adapter's prefix is held once in its slot and shared by all its requests; it is never written
into the KV cache. Positions follow the adapter's convention: PEFT's prefix shifts the request's
tokens to P..P+T-1, AdapterHub's leaves them at 0..T-1; the prefix keys are never rotated.
"""

from __future__ import annotations

import torch

from adapters_store.types import PrefixParts
from server.deltas.base import DeltaLimits, DeltaMethod, DeltaRejected, register_method
from server.model.batch import BatchDescriptor
from server.model.llama import CausalLM


class PrefixJoin:
    """The step's joined keys/values (batch.joined_kv), as the attention asks for them."""

    def __init__(self, method: PrefixMethod, prefill_slots: list[int], decode: tuple | None) -> None:
        self.method = method
        self.prefill_slots = prefill_slots    # [num_prefill] slot of each prefill sequence
        self.decode_kv = decode               # (keys, values [L, B, kvh, P, hd], mask [B, 1, 1, P]) or None

    def prefill(self, layer: int, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        keys = self.method.keys[self.prefill_slots[index]] if self.prefill_slots[index] >= 0 else None
        if keys is None:
            return None
        return keys[layer], self.method.values[self.prefill_slots[index]][layer]   # [P, kvh, hd]

    def decode(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.decode_kv is None:
            return None
        keys, values, mask = self.decode_kv
        return keys[layer], values[layer], mask


@register_method
class PrefixMethod(DeltaMethod):
    """Per-request prefix keys/values, held once per adapter slot."""

    name = "prefix"

    def __init__(self, model: CausalLM, limits: DeltaLimits) -> None:
        super().__init__(model, limits)
        shape = model.shape
        self.expected = (shape.num_layers, shape.num_kv_heads, shape.head_dim)
        param = model.lm_head.weight
        self.dtype, self.device = param.dtype, param.device
        self.keys: list[torch.Tensor | None] = [None] * limits.num_slots     # [L, P, kvh, hd]
        self.values: list[torch.Tensor | None] = [None] * limits.num_slots
        self.offsets = [0] * limits.num_slots
        self.version = 0
        self._decode_cache: tuple[tuple, tuple | None] | None = None

    def check(self, part: PrefixParts) -> None:
        layers, _, kv_heads, head_dim = part.keys.shape
        if (layers, kv_heads, head_dim) != self.expected or part.values.shape != part.keys.shape:
            raise DeltaRejected(f"prefix of shape {tuple(part.keys.shape)} does not fit this model "
                                f"(layers, kv heads, head dim = {self.expected})")
        if part.num_virtual_tokens > self.limits.max_prefix_tokens:
            raise DeltaRejected(f"prefix of {part.num_virtual_tokens} tokens exceeds --max-prefix-tokens "
                                f"{self.limits.max_prefix_tokens}")

    def place(self, slot: int, part: PrefixParts) -> None:
        self.keys[slot] = part.keys.to(device=self.device, dtype=self.dtype).contiguous()
        self.values[slot] = part.values.to(device=self.device, dtype=self.dtype).contiguous()
        if self.kv_cache is not None:
            self.kv_cache.write_prefix(slot, self.keys[slot], self.values[slot])
        self.offsets[slot] = part.num_virtual_tokens if part.positions == "shifted" else 0
        self.version += 1

    def clear(self, slot: int) -> None:
        self.keys[slot] = self.values[slot] = None
        self.offsets[slot] = 0
        self.version += 1

    def position_offset(self, slot: int) -> int:
        return self.offsets[slot]

    def kv_prefix(self, slot: int) -> tuple[list[int], int] | None:
        keys = self.keys[slot]
        if self.kv_cache is None or keys is None:
            return None
        return self.kv_cache.prefix_blocks(slot, keys.shape[1]), keys.shape[1]

    def prepare(self, batch: BatchDescriptor) -> None:
        if not any(slot >= 0 and self.keys[slot] is not None for slot in batch.segments.slots):
            return
        row_slots = batch.segments.token_slots.tolist()
        prefill_slots = [self._own(row_slots[start]) for start, _ in batch.prefill_ranges]
        # With a KV cache bound, decode rows reach their prefix through their block tables (the runner
        # puts the slot's prefix blocks first); the padded copy below is the path without one.
        decode = None
        if self.kv_cache is None:
            decode = self._decode_kv(tuple(self._own(row_slots[row]) for row in batch.decode_rows.tolist()))
        batch.joined_kv = PrefixJoin(self, prefill_slots, decode)

    def _own(self, slot: int) -> int:
        return slot if slot >= 0 and self.keys[slot] is not None else -1

    def _decode_kv(self, slots: tuple[int, ...]) -> tuple | None:
        """Padded per-row prefixes of the decode rows; rebuilt only when the rows change."""
        key = (slots, self.version)
        if self._decode_cache is not None and self._decode_cache[0] == key:
            return self._decode_cache[1]
        lengths = [self.keys[s].shape[1] if s >= 0 else 0 for s in slots]
        width = max(lengths, default=0)
        built = None
        if width:
            layers, kv_heads, head_dim = self.expected
            shape = (layers, len(slots), kv_heads, width, head_dim)
            keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
            values = torch.zeros(shape, dtype=self.dtype, device=self.device)
            for row, slot in enumerate(slots):
                if slot >= 0:
                    keys[:, row, :, :lengths[row]] = self.keys[slot].transpose(1, 2)
                    values[:, row, :, :lengths[row]] = self.values[slot].transpose(1, 2)
            cols = torch.arange(width, device=self.device).unsqueeze(0)
            mask = (cols < torch.tensor(lengths, device=self.device).unsqueeze(1)).view(len(slots), 1, 1, width)
            built = (keys, values, mask)
        self._decode_cache = (key, built)
        return built
