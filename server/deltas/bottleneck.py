"""Bottleneck adapters: parallel, scaled parallel, sequential, at the attention or the FFN sub-block.

Unified view: functional form act(x W_down) W_up; insertion parallel (input = the sub-block's input)
or sequential (input = its output); composition h <- h + s * delta on the residual stream after the
sub-block. The multi-head parallel adapter is the parallel form at the attention sub-block.

Weights live in preallocated per-(layer, sub-block) stacks with one slot per resident adapter, the scale folded
into the up projection and its bias. Each site applies the step's groups (server/deltas/groups.py) whose
adapters act there, reading their weights in place or gathering them once per plan, lower ranks zero-padded to
the group's largest (exact for any activation: the padded rows of the up projection are zero).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from adapters_store.types import ACTIVATIONS, BOTTLENECK_INPUTS, BottleneckModule, BottleneckParts, activate
from server.deltas.base import DeltaLimits, DeltaRejected, register_method
from server.deltas.bottleneck_reference import apply_bottleneck_reference
from server.deltas.groups import GroupedMethod, GroupPlanner, RankedStacks, SegmentGroups
from server.model.batch import BatchDescriptor
from server.model.llama import SUB_BLOCKS, CausalLM


@dataclass
class GroupedWeights:
    """One site's weights for a step's groups, gathered once per plan."""

    groups: SegmentGroups     # the step's groups with a module at this site
    down_t: torch.Tensor      # [G, d, r]
    down_bias: torch.Tensor   # [G, 1, r]
    up_t: torch.Tensor        # [G, r, d], scale folded in
    up_bias: torch.Tensor     # [G, 1, d], scale folded in
    # (name, [G, 1, 1] mask of the groups using it); the first applies wherever no later mask does.
    inputs: list[tuple[str, torch.Tensor | None]]
    activations: list[tuple[str, torch.Tensor | None]]


class BottleneckSite:
    """Stacked bottleneck weights of every slot at one layer's sub-block, and the hook that applies them.

    A slot whose adapter has several modules here (rare) keeps them as modules and is applied by the
    reference loop, so that their order holds.
    """

    def __init__(self, limits: DeltaLimits, hidden: int, dtype: torch.dtype, device: torch.device,
                 planner: GroupPlanner) -> None:
        slots, rank = limits.num_slots, limits.max_bottleneck_rank
        # torch.empty: only the rows placements write become resident (RankedStacks zeroes what is read beyond)
        self.down = torch.empty(slots, rank, hidden, dtype=dtype, device=device)
        self.down_bias = torch.empty(slots, rank, dtype=dtype, device=device)
        self.up_t = torch.empty(slots, rank, hidden, dtype=dtype, device=device)
        self.up_bias = torch.empty(slots, hidden, dtype=dtype, device=device)
        self.stacks = RankedStacks(self.down, self.down_bias, self.up_t)
        self.ranks = self.stacks.ranks   # slot -> rank here; 0: no single module here
        self.inputs = [BOTTLENECK_INPUTS[0]] * slots
        self.activations = [ACTIVATIONS[0]] * slots
        self.multi: dict[int, list[BottleneckModule]] = {}
        self.planner = planner
        self.gathered: GroupedWeights | None = None
        self.gathered_plan = -1

    def write(self, slot: int, m: BottleneckModule) -> None:
        r = m.rank
        self.down[slot, :r].copy_(m.down)
        self.down_bias[slot, :r].zero_()
        if m.down_bias is not None:
            self.down_bias[slot, :r].copy_(m.down_bias)
        self.up_t[slot, :r].copy_((m.up.float() * m.scale).t())
        self.up_bias[slot].zero_()
        if m.up_bias is not None:
            self.up_bias[slot].copy_(m.up_bias.float() * m.scale)
        self.inputs[slot], self.activations[slot] = m.input, m.activation
        self.stacks.placed(slot, r)

    def hold(self, slot: int, modules: list[BottleneckModule]) -> None:
        self.erase(slot)
        self.multi[slot] = modules

    def erase(self, slot: int) -> None:
        self.stacks.erase(slot)
        self.multi.pop(slot, None)

    def __call__(self, sub_in: torch.Tensor, sub_out: torch.Tensor, block_out: torch.Tensor,
                 batch: BatchDescriptor) -> None:
        step: SegmentGroups | None = batch.method_state.get(BottleneckMethod.name)
        if step is None:
            return
        inputs = {"sublayer_input": sub_in, "sublayer_output": sub_out, "block_output": block_out}
        if step.groups:
            self._apply_groups(step, inputs, block_out)
        for start, end, slot in step.loop:
            self._apply_segment(start, end, slot, inputs, block_out)

    def _apply_groups(self, step: SegmentGroups, inputs: dict[str, torch.Tensor], block_out: torch.Tensor) -> None:
        if self.gathered_plan != step.plan_id:
            self.gathered, self.gathered_plan = self._gather(step), step.plan_id
        w = self.gathered
        if w is not None:
            groups = w.groups
            x = groups.pad(inputs[w.inputs[0][0]])                   # [G, M, d]
            for name, mask in w.inputs[1:]:
                x = torch.where(mask, groups.pad(inputs[name]), x)
            hid = torch.baddbmm(w.down_bias, x, w.down_t)            # [G, M, r]
            act = activate(w.activations[0][0], hid)
            for name, mask in w.activations[1:]:
                act = torch.where(mask, activate(name, hid), act)
            groups.add_to(block_out, torch.baddbmm(w.up_bias, act, w.up_t))  # [G, M, d]
        if self.multi:
            sub_in, sub_out = inputs["sublayer_input"], inputs["sublayer_output"]
            apply_bottleneck_reference(sub_in, sub_out, block_out,
                                       [(b, e, self.multi[s]) for b, e, s in step.groups if s in self.multi])

    def _gather(self, step: SegmentGroups) -> GroupedWeights | None:
        """The groups with one module here and their weights; None when there are none."""
        found = self.stacks.gather(step, self.planner)
        if found is None:
            return None
        groups, (down, down_bias, up_t) = found
        up_bias = groups.slot_rows(self.up_bias)
        slots = [slot for _, _, slot in groups.groups]

        def choices(values: list[str]) -> list[tuple[str, torch.Tensor | None]]:
            """(name, [G, 1, 1] mask of the groups using it) of each value in use; the first needs no mask."""
            used = list(dict.fromkeys(values[g] for g, (start, end, _) in enumerate(groups.groups) if end > start))
            return [(name, None if i == 0 else torch.tensor([v == name for v in values], device=down.device)
                     .view(-1, 1, 1)) for i, name in enumerate(used)]

        return GroupedWeights(
            groups=groups, down_t=down.transpose(1, 2), down_bias=down_bias.unsqueeze(1), up_t=up_t,
            up_bias=up_bias.unsqueeze(1), inputs=choices([self.inputs[s] for s in slots]),
            activations=choices([self.activations[s] for s in slots]))

    def _apply_segment(self, start: int, end: int, slot: int, inputs: dict[str, torch.Tensor],
                       block_out: torch.Tensor) -> None:
        if slot in self.multi:
            apply_bottleneck_reference(inputs["sublayer_input"], inputs["sublayer_output"], block_out,
                                       [(start, end, self.multi[slot])])
            return
        r = self.ranks[slot]
        if not r:
            return
        x = inputs[self.inputs[slot]][start:end]
        hid = torch.addmm(self.down_bias[slot, :r], x, self.down[slot, :r].t())      # [n, r]
        act = activate(self.activations[slot], hid)
        block_out[start:end] += torch.addmm(self.up_bias[slot], act, self.up_t[slot, :r])


@register_method
class BottleneckMethod(GroupedMethod):
    """Per-request bottleneck adapters over every layer's attention and FFN sub-blocks."""

    name = "bottleneck"

    def __init__(self, model: CausalLM, limits: DeltaLimits) -> None:
        super().__init__(model, limits)
        self.layers = model.model.layers
        self.hidden = model.shape.hidden_size
        self.sites: dict[tuple[int, str], BottleneckSite] = {}
        param = model.lm_head.weight
        self.dtype, self.device = param.dtype, param.device

    def check(self, part: BottleneckParts) -> None:
        for m in part.modules:
            where = f"bottleneck at layer {m.layer} {m.site}"
            if not 0 <= m.layer < len(self.layers) or m.site not in SUB_BLOCKS:
                raise DeltaRejected(f"{where}: no such place in this {len(self.layers)}-layer model")
            if m.input not in BOTTLENECK_INPUTS or m.activation not in ACTIVATIONS:
                raise DeltaRejected(f"{where}: unknown input {m.input!r} or activation {m.activation!r}")
            if m.down.shape[1] != self.hidden or m.up.shape[0] != self.hidden:
                raise DeltaRejected(f"{where}: acts on width {m.down.shape[1]}, the model's is {self.hidden}")
            if m.rank > self.limits.max_bottleneck_rank:
                raise DeltaRejected(f"{where}: rank {m.rank} exceeds the bottleneck rank limit "
                                    f"{self.limits.max_bottleneck_rank}")

    def place(self, slot: int, part: BottleneckParts) -> None:
        self.clear(slot)
        by_site: dict[tuple[int, str], list[BottleneckModule]] = {}
        for m in part.modules:
            by_site.setdefault((m.layer, m.site), []).append(m)
        for key, modules in by_site.items():
            site = self.sites.get(key)
            if site is None:
                site = BottleneckSite(self.limits, self.hidden, self.dtype, self.device, self.planner)
                self.sites[key] = site
                self.layers[key[0]].block_hooks[key[1]].append(site)
            if len(modules) == 1:
                site.write(slot, modules[0])
            else:
                site.hold(slot, [self._on_device(m) for m in modules])
        self.slot_has[slot] = bool(by_site)

    def _on_device(self, m: BottleneckModule) -> BottleneckModule:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=self.device, dtype=self.dtype).contiguous()

        return dataclasses.replace(m, down=move(m.down), down_bias=move(m.down_bias), up=move(m.up),
                                   up_bias=move(m.up_bias))
