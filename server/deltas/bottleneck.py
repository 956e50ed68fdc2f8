"""Bottleneck adapters: parallel, scaled parallel, sequential, at the attention or the FFN sub-block.

Unified view: functional form act(x W_down) W_up; insertion parallel (input = the sub-block's input)
or sequential (input = its output); composition h <- h + s * delta on the residual stream after the
sub-block. The multi-head parallel adapter is the parallel form at the attention sub-block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from adapters_store.types import ACTIVATIONS, BOTTLENECK_INPUTS, BottleneckModule, BottleneckParts
from server.deltas.base import DeltaLimits, DeltaMethod, DeltaRejected, adapter_segments, register_method
from server.model.batch import BatchDescriptor
from server.model.llama import SUB_BLOCKS, CausalLM


@dataclass
class BottleneckStep:
    """Per-step metadata: the adapter segments that hold bottleneck modules."""

    segments: list[tuple[int, int, int]]  # (first row, end row, slot)


class BottleneckSite:
    """The hook at one layer's sub-block: applies each segment's modules to its rows, in order."""

    def __init__(self, method: BottleneckMethod, key: tuple[int, str]) -> None:
        self.method = method
        self.key = key

    def __call__(self, sub_in: torch.Tensor, sub_out: torch.Tensor, block_out: torch.Tensor,
                 batch: BatchDescriptor) -> None:
        step: BottleneckStep | None = batch.method_state.get(BottleneckMethod.name)
        if step is None:
            return
        inputs = {"sublayer_input": sub_in, "sublayer_output": sub_out, "block_output": block_out}
        for start, end, slot in step.segments:
            for module in self.method.slot_modules[slot].get(self.key, ()):
                block_out[start:end] += module.delta(inputs[module.input][start:end])


@register_method
class BottleneckMethod(DeltaMethod):
    """Per-request bottleneck adapters; each slot holds its adapter's modules once, on the device."""

    name = "bottleneck"

    def __init__(self, model: CausalLM, limits: DeltaLimits) -> None:
        super().__init__(model, limits)
        self.layers = model.model.layers
        self.hidden = model.shape.hidden_size
        self.slot_modules: list[dict[tuple[int, str], list[BottleneckModule]]] = [{} for _ in range(limits.num_slots)]
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

    def place(self, slot: int, part: BottleneckParts) -> None:
        placed: dict[tuple[int, str], list[BottleneckModule]] = {}
        for m in part.modules:
            key = (m.layer, m.site)
            placed.setdefault(key, []).append(dataclasses.replace(
                m, down=self._device(m.down), down_bias=self._device(m.down_bias), up=self._device(m.up),
                up_bias=self._device(m.up_bias)))
            if key not in self.sites:
                self.sites[key] = BottleneckSite(self, key)
                self.layers[m.layer].block_hooks[m.site].append(self.sites[key])
        self.slot_modules[slot] = placed

    def _device(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device=self.device, dtype=self.dtype).contiguous()

    def clear(self, slot: int) -> None:
        self.slot_modules[slot] = {}

    def prepare(self, batch: BatchDescriptor) -> None:
        segments = adapter_segments(batch, [bool(m) for m in self.slot_modules])
        if segments:
            batch.method_state[self.name] = BottleneckStep(segments)
