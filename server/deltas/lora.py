"""LoRA: y = base(x) + s * x A^T B^T at any linear (q, k, v, o, gate, up, down), per request.

Unified view: functional form x W_down W_up, parallel insertion, modifies a linear's output,
composition h <- h + s * delta. Weights live in preallocated per-site stacks with one slot per
resident adapter; the scale is folded into B at placement. Segments are grouped for batched products
(server/deltas/groups.py); each linear applies only the groups whose adapters target it.
"""

from __future__ import annotations

import torch

from adapters_store.types import LoraParts
from server.deltas.base import DeltaLimits, DeltaRejected, register_method
from server.deltas.groups import GroupedMethod, GroupPlanner, RankedStacks, SegmentGroups
from server.model.batch import BatchDescriptor
from server.model.llama import AdaptableLinear, CausalLM


class LoraSite:
    """Stacked LoRA weights of every slot at one linear, and the hook that applies them."""

    def __init__(self, linear: AdaptableLinear, limits: DeltaLimits, planner: GroupPlanner) -> None:
        slots, rank = limits.num_slots, limits.max_lora_rank
        weight = linear.weight
        # torch.empty: only the rows placements write become resident (RankedStacks zeroes what is read beyond)
        self.a = torch.empty(slots, rank, linear.in_features, dtype=weight.dtype, device=weight.device)
        self.bt = torch.empty(slots, rank, linear.out_features, dtype=weight.dtype, device=weight.device)
        self.stacks = RankedStacks(self.a, self.bt)
        self.ranks = self.stacks.ranks   # slot -> rank here; 0: the slot's adapter does not target this linear
        self.planner = planner
        # the step's groups whose adapters target this linear, and their weights ([G, in, r], [G, r, out])
        self.gathered: tuple[SegmentGroups, torch.Tensor, torch.Tensor] | None = None
        self.gathered_plan = -1
        linear.hooks.append(self)

    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        r = a.shape[0]
        self.a[slot, :r].copy_(a)
        self.bt[slot, :r].copy_((b.float() * scale).t())
        self.stacks.placed(slot, r)

    def erase(self, slot: int) -> None:
        self.stacks.erase(slot)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, batch: BatchDescriptor) -> None:
        step: SegmentGroups | None = batch.method_state.get(LoraMethod.name)
        if step is None:
            return
        if step.groups:
            self._apply_groups(step, x, y)
        for start, end, slot in step.loop:
            r = self.ranks[slot]
            if r:
                y[start:end].addmm_(x[start:end] @ self.a[slot, :r].t(), self.bt[slot, :r])

    def _apply_groups(self, step: SegmentGroups, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.gathered_plan != step.plan_id:
            self.gathered, self.gathered_plan = self._gather(step), step.plan_id
        if self.gathered is None:
            return
        groups, a_t, bt = self.gathered
        # Decode is bound by reading the groups' weights: two batched products, the second accumulating
        # straight into y's rows when the groups need no padding (no [G, M, out] temporary written and read back).
        h = torch.bmm(groups.pad(x), a_t)                       # [G, M, r]
        if groups.unpadded:
            groups.spanned(y).baddbmm_(h, bt)
        else:
            groups.add_to(y, torch.bmm(h, bt))                  # [G, M, out]

    def _gather(self, step: SegmentGroups) -> tuple[SegmentGroups, torch.Tensor, torch.Tensor] | None:
        """The groups whose adapters target this linear, with their weights; None when there are none."""
        found = self.stacks.gather(step, self.planner)
        if found is None:
            return None
        groups, (a, bt) = found
        return groups, a.transpose(1, 2), bt


@register_method
class LoraMethod(GroupedMethod):
    """Per-request LoRA over all adaptable linears."""

    name = "lora"

    def __init__(self, model: CausalLM, limits: DeltaLimits) -> None:
        super().__init__(model, limits)
        self.linears = model.adaptable_linears()
        self.sites: dict[str, LoraSite] = {}

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
                site = self.sites[path] = LoraSite(self.linears[path], self.limits, self.planner)
            site.write(slot, module.a, module.b, module.scale)
        self.slot_has[slot] = bool(part.modules)
        self.version += 1
