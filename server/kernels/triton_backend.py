"""The Triton backend (CUDA): rank-exact segment kernels for LoRA and the bottleneck adapters, paged decode
attention. Per step the planner uploads the method's segment table once; every site reuses it."""

from __future__ import annotations

import torch

from server.kernels.interface import BottleneckWeights, DecodeVisibility, KernelBackend, LoraWeights, Segment
from server.kernels.triton_attention import paged_decode_attention
from server.kernels.triton_bottleneck import bottleneck_fused
from server.kernels.triton_common import SegmentTable
from server.kernels.triton_lora import lora_expand, lora_shrink
from server.model.batch import BatchDescriptor


class TablePlanner:
    """Builds a step's SegmentTable, reusing the last one while the batch layout and the placements stay."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._last: tuple[tuple, SegmentTable] | None = None

    def plan(self, batch: BatchDescriptor, segments: list[Segment], version: int) -> SegmentTable:
        key = (tuple(segments), version)
        if self._last is None or self._last[0] != key:
            self._last = (key, SegmentTable.build(segments, self.device))
        return self._last[1]

    def plan_rows(self, row_slots: torch.Tensor) -> SegmentTable:
        return SegmentTable.rows(row_slots)


class TritonLoraKernel:
    """One LoRA site: shrink into an fp32 [N, rank bound] buffer, expand into y."""

    def __init__(self, weights: LoraWeights) -> None:
        self.w = weights

    def __call__(self, step: SegmentTable, x: torch.Tensor, y: torch.Tensor) -> None:
        bound = self.w.stacks.bound   # the grid's rank bound: fixed while ranks stay within it (capturable)
        if not bound or not step.num:
            return
        x = x if x.stride(1) == 1 else x.contiguous()
        ranks = self.w.stacks.device_ranks
        h = torch.empty(x.shape[0], bound, dtype=torch.float32, device=x.device)   # [N, r]
        lora_shrink(x, self.w.a, ranks, step, h, bound)
        lora_expand(h, self.w.bt, ranks, step, y, bound)


class TritonBottleneckKernel:
    """One bottleneck site: the fused kernel over the step's segments (single-module slots)."""

    def __init__(self, weights: BottleneckWeights) -> None:
        self.w = weights

    def __call__(self, step: SegmentTable, inputs: dict[str, torch.Tensor], block_out: torch.Tensor) -> None:
        w = self.w
        bound = w.stacks.bound
        if not bound or not step.num:
            return
        bottleneck_fused(inputs["sublayer_input"], inputs["sublayer_output"], block_out, w.down, w.down_bias,
                         w.up_t, w.up_bias, w.stacks.device_ranks, w.codes[0], w.codes[1], step, bound)


class TritonBackend(KernelBackend):
    """The CUDA backend."""

    name = "triton"
    captures = True

    def planner(self, device: torch.device) -> TablePlanner:
        return TablePlanner(device)

    def lora_kernel(self, weights: LoraWeights, planner: TablePlanner) -> TritonLoraKernel:
        return TritonLoraKernel(weights)

    def bottleneck_kernel(self, weights: BottleneckWeights, planner: TablePlanner) -> TritonBottleneckKernel:
        return TritonBottleneckKernel(weights)

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         tables: torch.Tensor, visibility: DecodeVisibility, block_size: int, scale: float,
                         workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return paged_decode_attention(q, k_cache, v_cache, tables, visibility.prefix_lens, visibility.own_starts,
                                      visibility.lengths, block_size, scale)
