"""LoRA: y = base(x) + s * x A^T B^T at any linear (q, k, v, o, gate, up, down), per request.

Unified view: functional form x W_down W_up, parallel insertion, modifies a linear's output,
composition h <- h + s * delta. Weights live in preallocated per-site stacks with one slot per
resident adapter (plus an all-zero slot for base rows); the scale is folded into B at placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters_store.types import LoraParts
from server.deltas.base import DeltaLimits, DeltaMethod, DeltaRejected, register_method
from server.model.batch import BatchDescriptor
from server.model.llama import AdaptableLinear, CausalLM

# Below this many rows per adapter segment, one gathered batched product beats a loop of matmuls.
GATHER_MAX_ROWS_PER_SEGMENT = 4


@dataclass
class LoraStep:
    """Per-step LoRA metadata, shared by every site."""

    gather: bool                       # True: batched gather path; False: loop over segments
    token_slots: torch.Tensor          # [num_tokens] slot of each row, base rows -> the zero slot
    rank: int                          # largest rank among this step's adapters (gather width)
    segments: list[tuple[int, int, int]]  # [num_adapter_segments] (first row, end row, slot)
    # Same rows, slots, rank and placements as the previous gathered step: the per-row weights
    # each site gathered then are still right. Decode batches keep their composition for many
    # steps, so the gather (a copy of every row's weights) is paid only when rows join or leave.
    reuse_gathered: bool = False


class LoraSite:
    """Stacked LoRA weights of every slot at one linear, and the hook that applies them."""

    def __init__(self, linear: AdaptableLinear, limits: DeltaLimits) -> None:
        slots, rank = limits.num_slots + 1, limits.max_lora_rank
        weight = linear.weight
        self.zero_slot = limits.num_slots
        # torch.empty: on CPU only the regions a placement writes become resident.
        self.a = torch.empty(slots, rank, linear.in_features, dtype=weight.dtype, device=weight.device)
        self.bt = torch.empty(slots, rank, linear.out_features, dtype=weight.dtype, device=weight.device)
        self.a[self.zero_slot].zero_()
        self.bt[self.zero_slot].zero_()
        self.ranks = [0] * slots
        # slot -> itself where that slot's adapter targets this site, else the zero slot
        self.slot_map = torch.full((slots,), self.zero_slot, dtype=torch.long, device=weight.device)
        self.rows_a: torch.Tensor | None = None    # [N, r, in] gathered weights of the last gathered step
        self.rows_bt: torch.Tensor | None = None   # [N, r, out]
        linear.hooks.append(self)

    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        r = a.shape[0]
        self.a[slot, :r].copy_(a)
        self.a[slot, r:].zero_()
        self.bt[slot, :r].copy_((b.float() * scale).t())
        self.bt[slot, r:].zero_()
        self.ranks[slot] = r
        self.slot_map[slot] = slot

    def erase(self, slot: int) -> None:
        self.ranks[slot] = 0
        self.slot_map[slot] = self.zero_slot

    def __call__(self, x: torch.Tensor, y: torch.Tensor, batch: BatchDescriptor) -> None:
        step: LoraStep | None = batch.method_state.get("lora")
        if step is None:
            return
        if step.gather:
            if not step.reuse_gathered or self.rows_a is None:
                idx = self.slot_map[step.token_slots]              # [N]
                self.rows_a = self.a[idx, :step.rank]              # [N, r, in]
                self.rows_bt = self.bt[idx, :step.rank]            # [N, r, out]
            h = torch.bmm(x.unsqueeze(1), self.rows_a.transpose(1, 2))  # [N, 1, r]
            y += torch.bmm(h, self.rows_bt).squeeze(1)                 # [N, out]
            return
        for start, end, slot in step.segments:
            r = self.ranks[slot]
            if r:
                y[start:end].addmm_(x[start:end] @ self.a[slot, :r].t(), self.bt[slot, :r])


@register_method
class LoraMethod(DeltaMethod):
    """Per-request LoRA over all adaptable linears."""

    name = "lora"

    def __init__(self, model: CausalLM, limits: DeltaLimits) -> None:
        super().__init__(model, limits)
        self.linears = model.adaptable_linears()
        self.sites: dict[str, LoraSite] = {}
        self.slot_rank = [0] * limits.num_slots
        self.zero_slot = limits.num_slots
        self.version = 0          # bumped by every place/clear: invalidates gathered rows
        self._last_gather: tuple | None = None

    def check(self, part: LoraParts) -> None:
        for path, module in part.modules.items():
            if path not in self.linears:
                raise DeltaRejected(f"LoRA targets {path}, which is not a linear of this model")
            if module.rank > self.limits.max_lora_rank:
                raise DeltaRejected(f"LoRA rank {module.rank} at {path} exceeds --max-lora-rank "
                                    f"{self.limits.max_lora_rank}")

    def place(self, slot: int, part: LoraParts) -> None:
        for path, module in part.modules.items():
            site = self.sites.get(path)
            if site is None:
                site = self.sites[path] = LoraSite(self.linears[path], self.limits)
            site.write(slot, module.a, module.b, module.scale)
        self.slot_rank[slot] = part.max_rank
        self.version += 1

    def clear(self, slot: int) -> None:
        for site in self.sites.values():
            site.erase(slot)
        self.slot_rank[slot] = 0
        self.version += 1

    def prepare(self, batch: BatchDescriptor) -> None:
        seg = batch.segments
        segments = [(seg.bounds[i], seg.bounds[i + 1], slot) for i, slot in enumerate(seg.slots)
                    if slot >= 0 and self.slot_rank[slot]]
        if not segments:
            return
        gather = len(segments) > 2 and batch.num_tokens <= GATHER_MAX_ROWS_PER_SEGMENT * len(segments)
        rank = max(self.slot_rank[s] for _, _, s in segments)
        step = LoraStep(gather=gather, token_slots=seg.token_slots, rank=rank, segments=segments)
        if gather:
            step.token_slots = torch.where(seg.token_slots < 0, self.zero_slot, seg.token_slots)
            key = (tuple(seg.bounds), tuple(seg.slots), rank, self.version)
            step.reuse_gathered = key == self._last_gather
            self._last_gather = key
        batch.method_state[self.name] = step
