"""LoRA: y = base(x) + s * x A^T B^T at any linear (q, k, v, o, gate, up, down), per request.

Unified view: functional form x W_down W_up, parallel insertion, modifies a linear's output,
composition h <- h + s * delta. Weights live in preallocated per-site stacks with one slot per
resident adapter; the scale is folded into B at placement. Segments are grouped for batched products
(server/deltas/groups.py); each linear applies only the groups whose adapters target it.
"""

from __future__ import annotations

import torch

from adapters_store.types import LoraParts
from server.deltas.base import DeltaLimits, DeltaMethod, DeltaRejected, adapter_segments, register_method
from server.deltas.groups import GroupPlanner, SegmentGroups
from server.model.batch import BatchDescriptor
from server.model.llama import AdaptableLinear, CausalLM


class LoraSite:
    """Stacked LoRA weights of every slot at one linear, and the hook that applies them."""

    def __init__(self, linear: AdaptableLinear, limits: DeltaLimits, planner: GroupPlanner) -> None:
        slots, rank = limits.num_slots, limits.max_lora_rank
        weight = linear.weight
        # torch.empty, rows beyond a slot's rank never written: on CPU only what placements write becomes
        # resident. Gathered copies zero their padding; in-place reads zero the rows they need once (_zero_to).
        self.a = torch.empty(slots, rank, linear.in_features, dtype=weight.dtype, device=weight.device)
        self.bt = torch.empty(slots, rank, linear.out_features, dtype=weight.dtype, device=weight.device)
        self.ranks = [0] * slots   # 0: the slot's adapter does not target this linear
        self.zeroed = [0] * slots  # rows known to hold the slot's weights or zeros
        self.planner = planner
        # the step's groups whose adapters target this linear, and their weights ([G, in, r], [G, r, out])
        self.gathered: tuple[SegmentGroups, torch.Tensor, torch.Tensor] | None = None
        self.gathered_plan = -1
        linear.hooks.append(self)

    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        r = a.shape[0]
        self.a[slot, :r].copy_(a)
        self.bt[slot, :r].copy_((b.float() * scale).t())
        self.ranks[slot] = self.zeroed[slot] = r

    def erase(self, slot: int) -> None:
        self.ranks[slot] = 0

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
        members = tuple(g for g, (_, _, slot) in enumerate(step.groups) if self.ranks[slot])
        if not members:
            return None
        groups = self.planner.subset(step, members)
        r = max(self.ranks[step.groups[g][2]] for g in members)
        if groups.slot_range is not None:
            lo, hi = groups.slot_range
            for g in members:
                self._zero_to(step.groups[g][2], r)
            return groups, self.a[lo:hi + 1, :r].transpose(1, 2), self.bt[lo:hi + 1, :r]   # views, no copy
        ranks = [self.ranks[slot] for _, _, slot in groups.groups]
        a = self.a[groups.group_slots, :r]                       # [G, r, in], a copy
        bt = self.bt[groups.group_slots, :r]                     # [G, r, out]
        for g, rank in enumerate(ranks):
            if rank < r:  # lower-rank adapters: zero the rows the stacks never wrote
                a[g, rank:] = 0
                bt[g, rank:] = 0
        return groups, a.transpose(1, 2), bt

    def _zero_to(self, slot: int, rank: int) -> None:
        """Zeroes the slot's rows up to `rank`, beyond its own, for the products that read them in place."""
        if self.zeroed[slot] < rank:
            self.a[slot, self.zeroed[slot]:rank].zero_()
            self.bt[slot, self.zeroed[slot]:rank].zero_()
            self.zeroed[slot] = rank


@register_method
class LoraMethod(DeltaMethod):
    """Per-request LoRA over all adaptable linears."""

    name = "lora"

    def __init__(self, model: CausalLM, limits: DeltaLimits) -> None:
        super().__init__(model, limits)
        self.linears = model.adaptable_linears()
        self.sites: dict[str, LoraSite] = {}
        self.slot_has = [False] * limits.num_slots
        self.version = 0          # bumped by every place/clear: invalidates gathered weights
        self.planner = GroupPlanner(model.lm_head.weight.device)

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

    def clear(self, slot: int) -> None:
        for site in self.sites.values():
            site.erase(slot)
        self.slot_has[slot] = False
        self.version += 1

    def prepare(self, batch: BatchDescriptor) -> None:
        segments = [s for s in adapter_segments(batch, self.slot_has) if s[1] > s[0]]
        if segments:
            batch.method_state[self.name] = self.planner.plan(batch, segments, self.version)
