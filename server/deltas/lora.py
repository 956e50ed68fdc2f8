"""LoRA: y = base(x) + s * x A^T B^T at any linear (q, k, v, o, gate, up, down), per request.

Unified view: functional form x W_down W_up, parallel insertion, modifies a linear's output,
composition h <- h + s * delta. Weights live in preallocated per-site stacks with one slot per
resident adapter; the scale is folded into B at placement. The kernel backend chosen for the device
(server/kernels/) applies them: on CPU segments grouped for batched products (server/deltas/groups.py), each
linear applying only the groups whose adapters target it; on CUDA rank-exact Triton shrink/expand kernels.
"""

from __future__ import annotations

import torch

from adapters_store.types import LoraParts
from server.deltas.base import DeltaLimits, DeltaRejected, register_method
from server.deltas.groups import GroupedMethod, RankedStacks
from server.kernels.interface import KernelBackend, LoraKernel, SegmentPlanner
from server.model.batch import BatchDescriptor
from server.model.llama import AdaptableLinear, CausalLM


class LoraSite:
    """Stacked LoRA weights of every slot at one linear, and the hook that applies them through the backend's
    kernel for this site."""

    def __init__(self, linear: AdaptableLinear, limits: DeltaLimits, backend: KernelBackend,
                 planner: SegmentPlanner) -> None:
        slots, rank = limits.num_slots, limits.max_lora_rank
        weight = linear.weight
        # torch.empty: only the rows placements write become resident (kernels never read beyond a slot's rank,
        # or zero what they read)
        self.a = torch.empty(slots, rank, linear.in_features, dtype=weight.dtype, device=weight.device)
        self.bt = torch.empty(slots, rank, linear.out_features, dtype=weight.dtype, device=weight.device)
        self.stacks = RankedStacks(self.a, self.bt)
        self.ranks = self.stacks.ranks   # slot -> rank here; 0: the slot's adapter does not target this linear
        self.kernel: LoraKernel = backend.lora_kernel(self, planner)
        linear.hooks.append(self)

    @property
    def gathered(self) -> object:
        """What the kernel gathered for the current plan (the grouped torch backend; None elsewhere)."""
        return getattr(self.kernel, "gathered", None)

    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        r = a.shape[0]
        self.a[slot, :r].copy_(a)
        self.bt[slot, :r].copy_((b.float() * scale).t())
        self.stacks.placed(slot, r)

    def erase(self, slot: int) -> None:
        self.stacks.erase(slot)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, batch: BatchDescriptor) -> None:
        step = batch.method_state.get(LoraMethod.name)
        if step is not None:
            self.kernel(step, x, y)


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
                site = self.sites[path] = LoraSite(self.linears[path], self.limits, self.backend, self.planner)
            site.write(slot, module.a, module.b, module.scale)
        self.slot_has[slot] = bool(part.modules)
        self.version += 1
