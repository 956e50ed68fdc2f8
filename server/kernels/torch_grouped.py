"""The grouped torch path (CPU): short segments as batched products over [G, M, d], long ones looped.

The layouts come from server/deltas/groups.py (GroupPlanner, RankedStacks); each site kernel gathers its groups'
weights once per plan and reuses them while the batch layout and the placements stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapters_store.types import activate
from server.deltas.groups import GroupPlanner, SegmentGroups
from server.kernels.interface import BottleneckWeights, DecodeVisibility, KernelBackend, LoraWeights


class GroupedLoraKernel:
    """One LoRA site: grouped batched products for short segments, one addmm pair per long segment."""

    def __init__(self, weights: LoraWeights, planner: GroupPlanner) -> None:
        self.w = weights
        self.planner = planner
        # the step's groups whose adapters target this linear, and their weights ([G, in, r], [G, r, out])
        self.gathered: tuple[SegmentGroups, torch.Tensor, torch.Tensor] | None = None
        self.gathered_plan = -1

    def __call__(self, step: SegmentGroups, x: torch.Tensor, y: torch.Tensor) -> None:
        if step.groups:
            self._apply_groups(step, x, y)
        if step.loop:
            ranks, a, bt = self.w.stacks.ranks, self.w.a, self.w.bt
            for start, end, slot in step.loop:
                r = ranks[slot]
                if r:
                    y[start:end].addmm_(x[start:end] @ a[slot, :r].t(), bt[slot, :r])

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
        found = self.w.stacks.gather(step, self.planner)
        if found is None:
            return None
        groups, (a, bt) = found
        return groups, a.transpose(1, 2), bt


@dataclass
class GroupedWeights:
    """One bottleneck site's weights for a step's groups, gathered once per plan."""

    groups: SegmentGroups     # the step's groups with a module at this site
    down_t: torch.Tensor      # [G, d, r]
    down_bias: torch.Tensor   # [G, 1, r]
    up_t: torch.Tensor        # [G, r, d], scale folded in
    up_bias: torch.Tensor     # [G, 1, d], scale folded in
    # (name, [G, 1, 1] mask of the groups using it); the first applies wherever no later mask does.
    inputs: list[tuple[str, torch.Tensor | None]]
    activations: list[tuple[str, torch.Tensor | None]]


class GroupedBottleneckKernel:
    """One bottleneck site: grouped batched products (lower ranks zero-padded), long segments looped."""

    def __init__(self, weights: BottleneckWeights, planner: GroupPlanner) -> None:
        self.w = weights
        self.planner = planner
        self.gathered: GroupedWeights | None = None
        self.gathered_plan = -1

    def __call__(self, step: SegmentGroups, inputs: dict[str, torch.Tensor], block_out: torch.Tensor) -> None:
        if step.groups:
            self._apply_groups(step, inputs, block_out)
        for start, end, slot in step.loop:
            self._apply_segment(start, end, slot, inputs, block_out)

    def _apply_groups(self, step: SegmentGroups, inputs: dict[str, torch.Tensor], block_out: torch.Tensor) -> None:
        if self.gathered_plan != step.plan_id:
            self.gathered, self.gathered_plan = self._gather(step), step.plan_id
        w = self.gathered
        if w is None:
            return
        groups = w.groups
        x = groups.pad(inputs[w.inputs[0][0]])                   # [G, M, d]
        for name, mask in w.inputs[1:]:
            x = torch.where(mask, groups.pad(inputs[name]), x)
        hid = torch.baddbmm(w.down_bias, x, w.down_t)            # [G, M, r]
        act = activate(w.activations[0][0], hid)
        for name, mask in w.activations[1:]:
            act = torch.where(mask, activate(name, hid), act)
        groups.add_to(block_out, torch.baddbmm(w.up_bias, act, w.up_t))  # [G, M, d]

    def _gather(self, step: SegmentGroups) -> GroupedWeights | None:
        """The groups with one module here and their weights; None when there are none."""
        found = self.w.stacks.gather(step, self.planner)
        if found is None:
            return None
        groups, (down, down_bias, up_t) = found
        up_bias = groups.slot_rows(self.w.up_bias)
        slots = [slot for _, _, slot in groups.groups]

        def choices(values: list[str]) -> list[tuple[str, torch.Tensor | None]]:
            """(name, [G, 1, 1] mask of the groups using it) of each value in use; the first needs no mask."""
            used = list(dict.fromkeys(values[g] for g, (start, end, _) in enumerate(groups.groups) if end > start))
            return [(name, None if i == 0 else torch.tensor([v == name for v in values], device=down.device)
                     .view(-1, 1, 1)) for i, name in enumerate(used)]

        return GroupedWeights(
            groups=groups, down_t=down.transpose(1, 2), down_bias=down_bias.unsqueeze(1), up_t=up_t,
            up_bias=up_bias.unsqueeze(1), inputs=choices([self.w.inputs[s] for s in slots]),
            activations=choices([self.w.activations[s] for s in slots]))

    def _apply_segment(self, start: int, end: int, slot: int, inputs: dict[str, torch.Tensor],
                       block_out: torch.Tensor) -> None:
        w = self.w
        r = w.stacks.ranks[slot]
        if not r:
            return
        x = inputs[w.inputs[slot]][start:end]
        hid = torch.addmm(w.down_bias[slot, :r], x, w.down[slot, :r].t())      # [n, r]
        act = activate(w.activations[slot], hid)
        block_out[start:end] += torch.addmm(w.up_bias[slot], act, w.up_t[slot, :r])


def gathered_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                              visibility: DecodeVisibility, block_size: int, scale: float,
                              workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Gathers each row's blocks (into the workspace when given), then one fused SDPA call with grouped-query heads
    (no K/V copy per head)."""
    num_seqs, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    width = tables.shape[1] * block_size
    row = block_size * kv_heads * head_dim
    flat = tables.reshape(-1).long()                                            # [B * max_blocks]
    outs = (None, None) if workspace is None else (workspace[0][:flat.shape[0]], workspace[1][:flat.shape[0]])
    k = torch.index_select(k_cache.reshape(-1, row), 0, flat, out=outs[0])
    v = torch.index_select(v_cache.reshape(-1, row), 0, flat, out=outs[1])
    k = k.view(num_seqs, width, kv_heads, head_dim).transpose(1, 2)             # [B, kvh, L, hd]
    v = v.view(num_seqs, width, kv_heads, head_dim).transpose(1, 2)
    mask = visibility.mask(width).view(num_seqs, 1, 1, width)
    qg = q.view(num_seqs, kv_heads, num_heads // kv_heads, head_dim)            # [B, kvh, group, hd]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


class TorchGroupedBackend(KernelBackend):
    """The CPU backend: today's grouped torch path."""

    name = "torch_grouped"

    def planner(self, device: torch.device) -> GroupPlanner:
        return GroupPlanner(device)

    def lora_kernel(self, weights: LoraWeights, planner: GroupPlanner) -> GroupedLoraKernel:
        return GroupedLoraKernel(weights, planner)

    def bottleneck_kernel(self, weights: BottleneckWeights, planner: GroupPlanner) -> GroupedBottleneckKernel:
        return GroupedBottleneckKernel(weights, planner)

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         tables: torch.Tensor, visibility: DecodeVisibility, block_size: int, scale: float,
                         workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return gathered_decode_attention(q, k_cache, v_cache, tables, visibility, block_size, scale, workspace)
