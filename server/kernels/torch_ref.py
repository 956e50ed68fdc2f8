"""The plain torch reference backend: one segment, one row at a time, in fp32. The oracle for the fast backends
(slow; selected only by configure("torch_ref") or DELTASERVE_KERNELS=torch_ref)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters_store.types import activate
from server.kernels.interface import (
    BottleneckWeights,
    DecodeVisibility,
    KernelBackend,
    LoraWeights,
    Segment,
    SegmentPlanner,
)
from server.model.batch import BatchDescriptor


@dataclass
class SegmentList:
    """A step's segments, as given."""

    segments: list[Segment]


class ListPlanner:
    """Plans nothing: the step is its segment list."""

    def plan(self, batch: BatchDescriptor, segments: list[Segment], version: int) -> SegmentList:
        return SegmentList(list(segments))

    def plan_rows(self, row_slots: torch.Tensor) -> SegmentList:
        raise NotImplementedError("the torch_ref kernels loop over host segments: no captured decode steps")


def lora_segments_reference(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor,
                            ranks: list[int], segments: list[Segment]) -> None:
    """y[rows] += x[rows] · a[slot, :r]ᵀ · bt[slot, :r] per segment, computed in fp32, rounded once into y."""
    for start, end, slot in segments:
        r = ranks[slot]
        if r and end > start:
            h = x[start:end].float() @ a[slot, :r].float().t()                   # [n, r]
            y[start:end] = (y[start:end].float() + h @ bt[slot, :r].float()).to(y.dtype)


def bottleneck_segments_reference(inputs: dict[str, torch.Tensor], block_out: torch.Tensor,
                                  weights: BottleneckWeights, segments: list[Segment]) -> None:
    """block_out[rows] += act(x·downᵀ + b_down)·up_t + b_up per segment (x: the slot's input), in fp32."""
    w = weights
    for start, end, slot in segments:
        r = w.stacks.ranks[slot]
        if not r or end <= start:
            continue
        x = inputs[w.inputs[slot]][start:end].float()                          # [n, d]
        hid = x @ w.down[slot, :r].float().t() + w.down_bias[slot, :r].float()  # [n, r]
        act = activate(w.activations[slot], hid)
        delta = act @ w.up_t[slot, :r].float() + w.up_bias[slot].float()        # [n, d]
        block_out[start:end] = (block_out[start:end].float() + delta).to(block_out.dtype)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               tables: torch.Tensor, visibility: DecodeVisibility, block_size: int,
                               scale: float) -> torch.Tensor:
    """Row by row, head by head: softmax over the visible table positions, in fp32."""
    num_seqs, num_heads, head_dim = q.shape
    group = num_heads // k_cache.shape[1]
    mask = visibility.mask(tables.shape[1] * block_size)                       # [B, L]
    out = torch.zeros(num_seqs, num_heads, head_dim, dtype=torch.float32, device=q.device)
    offsets = torch.arange(block_size, device=q.device)
    for b in range(num_seqs):
        positions = (tables[b].long().unsqueeze(1) * block_size + offsets).reshape(-1)[mask[b]]  # [n] cache slots
        if positions.numel() == 0:
            continue
        k = k_cache[positions].float()                                         # [n, kvh, hd]
        v = v_cache[positions].float()
        for h in range(num_heads):
            weights = torch.softmax((k[:, h // group] @ q[b, h].float()) * scale, dim=0)   # [n]
            out[b, h] = weights @ v[:, h // group]
    return out.to(q.dtype)


class RefLoraKernel:
    def __init__(self, weights: LoraWeights) -> None:
        self.w = weights

    def __call__(self, step: SegmentList, x: torch.Tensor, y: torch.Tensor) -> None:
        lora_segments_reference(x, y, self.w.a, self.w.bt, self.w.stacks.ranks, step.segments)


class RefBottleneckKernel:
    def __init__(self, weights: BottleneckWeights) -> None:
        self.w = weights

    def __call__(self, step: SegmentList, inputs: dict[str, torch.Tensor], block_out: torch.Tensor) -> None:
        bottleneck_segments_reference(inputs, block_out, self.w, step.segments)


class TorchRefBackend(KernelBackend):
    """The reference backend (oracle)."""

    name = "torch_ref"

    def planner(self, device: torch.device) -> SegmentPlanner:
        return ListPlanner()

    def lora_kernel(self, weights: LoraWeights, planner: SegmentPlanner) -> RefLoraKernel:
        return RefLoraKernel(weights)

    def bottleneck_kernel(self, weights: BottleneckWeights, planner: SegmentPlanner) -> RefBottleneckKernel:
        return RefBottleneckKernel(weights)

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         tables: torch.Tensor, visibility: DecodeVisibility, block_size: int, scale: float,
                         workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return decode_attention_reference(q, k_cache, v_cache, tables, visibility, block_size, scale)
