"""Bottleneck adapters: parallel, scaled parallel, sequential, at the attention or the FFN sub-block.

Unified view: functional form act(x W_down) W_up; insertion parallel (input = the sub-block's input)
or sequential (input = its output); composition h <- h + s * delta on the residual stream after the
sub-block. The multi-head parallel adapter is the parallel form at the attention sub-block.

Weights live in preallocated per-(layer, sub-block) stacks with one slot per resident adapter, the scale folded
into the up projection and its bias. Each site applies them through the kernel backend chosen for the device
(server/kernels/): on CPU the step's groups (server/deltas/groups.py) whose adapters act there, reading their
weights in place or gathering them once per plan, lower ranks zero-padded to the group's largest (exact for any
activation: the padded rows of the up projection are zero); on CUDA one fused rank-exact Triton kernel.
"""

from __future__ import annotations

import dataclasses

import torch

from adapters_store.types import ACTIVATIONS, BOTTLENECK_INPUTS, BottleneckModule, BottleneckParts
from server.deltas.base import DeltaLimits, DeltaRejected, register_method
from server.deltas.bottleneck_reference import apply_bottleneck_reference
from server.deltas.groups import GroupedMethod, RankedStacks
from server.kernels.interface import BottleneckKernel, KernelBackend, SegmentPlanner
from server.model.batch import BatchDescriptor
from server.model.llama import SUB_BLOCKS, CausalLM


class BottleneckSite:
    """Stacked bottleneck weights of every slot at one layer's sub-block, and the hook that applies them.

    A slot whose adapter has several modules here (rare) keeps them as modules and is applied by the
    reference loop, so that their order holds.
    """

    def __init__(self, limits: DeltaLimits, hidden: int, dtype: torch.dtype, device: torch.device,
                 backend: KernelBackend, planner: SegmentPlanner) -> None:
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
        # [2, slots] int32: each slot's input and activation as indices into BOTTLENECK_INPUTS and ACTIVATIONS,
        # written at placement (kernels that read them on the device)
        self.codes = torch.zeros(2, slots, dtype=torch.int32, device=device)
        self.multi: dict[int, list[BottleneckModule]] = {}
        self.kernel: BottleneckKernel = backend.bottleneck_kernel(self, planner)

    @property
    def gathered(self) -> object:
        """What the kernel gathered for the current plan (the grouped torch backend; None elsewhere)."""
        return getattr(self.kernel, "gathered", None)

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
        self.codes[:, slot] = torch.tensor([BOTTLENECK_INPUTS.index(m.input), ACTIVATIONS.index(m.activation)])
        self.stacks.placed(slot, r)

    def hold(self, slot: int, modules: list[BottleneckModule]) -> None:
        self.erase(slot)
        self.multi[slot] = modules

    def erase(self, slot: int) -> None:
        self.stacks.erase(slot)
        self.multi.pop(slot, None)

    def __call__(self, sub_in: torch.Tensor, sub_out: torch.Tensor, block_out: torch.Tensor,
                 batch: BatchDescriptor) -> None:
        step = batch.method_state.get(BottleneckMethod.name)
        if step is None:
            return
        inputs = {"sublayer_input": sub_in, "sublayer_output": sub_out, "block_output": block_out}
        self.kernel(step, inputs, block_out)
        if self.multi:   # slots with several modules here: in order, by the reference loop
            apply_bottleneck_reference(sub_in, sub_out, block_out,
                                       [(b, e, self.multi[s]) for b, e, s in step.segments if s in self.multi])


@register_method
class BottleneckMethod(GroupedMethod):
    """Per-request bottleneck adapters over every layer's attention and FFN sub-blocks."""

    name = "bottleneck"

    def __init__(self, model: CausalLM, limits: DeltaLimits) -> None:
        super().__init__(model, limits)
        self.layers = model.model.layers
        self.hidden = model.shape.hidden_size
        self.sites: dict[tuple[int, str], BottleneckSite] = {}
        self.multi_slots: set[int] = set()   # slots with several modules at one place (the reference loop)
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
                site = BottleneckSite(self.limits, self.hidden, self.dtype, self.device, self.backend, self.planner)
                self.sites[key] = site
                self.layers[key[0]].block_hooks[key[1]].append(site)
            if len(modules) == 1:
                site.write(slot, modules[0])
            else:
                site.hold(slot, [self._on_device(m) for m in modules])
                self.multi_slots.add(slot)
        self.slot_has[slot] = bool(by_site)

    def clear(self, slot: int) -> None:
        super().clear(slot)
        self.multi_slots.discard(slot)

    def capturable(self, slot: int) -> bool:
        return slot not in self.multi_slots

    def _on_device(self, m: BottleneckModule) -> BottleneckModule:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=self.device, dtype=self.dtype).contiguous()

        return dataclasses.replace(m, down=move(m.down), down_bias=move(m.down_bias), up=move(m.up),
                                   up_bias=move(m.up_bias))
