"""The small interface every kernel backend implements.

A backend supplies, per method, a planner (per-step segment metadata, built once per step in `prepare`) and one
kernel object per site (a LoRA linear, a bottleneck sub-block), created at the site's first placement and holding
whatever the backend caches for that site; and decode attention over paged KV blocks. Every kernel adds its delta
in place into the rows of the segments whose slot it holds weights for (rank 0 at a site: nothing), exactly as
the torch reference does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from server.deltas.groups import RankedStacks
    from server.model.batch import BatchDescriptor

Segment = tuple[int, int, int]  # (first row, end row, slot)


class SegmentPlanner(Protocol):
    """Plans one method's segments for a step (the object its sites' kernels receive)."""

    def plan(self, batch: BatchDescriptor, segments: list[Segment], version: int) -> Any:
        """`segments`: the batch's non-empty segments this method applies; `version`: bumped by every place/clear."""

    def plan_rows(self, row_slots: torch.Tensor) -> Any:
        """A captured decode step's plan: every row its own segment, its slot read from row_slots [B] int32 (-1 =
        base) on the device, so that the plan's tensors follow the rows without any host work (backends whose
        `captures` is True)."""


class LoraWeights(Protocol):
    """One linear's LoRA stacks: a [slots, R, in], bt [slots, R, out] (scale folded in), ranks per slot."""

    a: torch.Tensor
    bt: torch.Tensor
    stacks: RankedStacks


class BottleneckWeights(Protocol):
    """One sub-block's bottleneck stacks; `inputs`/`activations`: each slot's input name and activation, `codes`
    the same on the device ([2, slots] int32: index into BOTTLENECK_INPUTS, into ACTIVATIONS)."""

    down: torch.Tensor        # [slots, R, d]
    down_bias: torch.Tensor   # [slots, R]
    up_t: torch.Tensor        # [slots, R, d], scale folded in
    up_bias: torch.Tensor     # [slots, d], scale folded in
    stacks: RankedStacks
    inputs: list[str]
    activations: list[str]
    codes: torch.Tensor


class LoraKernel(Protocol):
    def __call__(self, step: Any, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[rows] += x[rows] · A_slotᵀ · Btᵀ_slot for every segment of the step. x [N, in], y [N, out]."""


class BottleneckKernel(Protocol):
    def __call__(self, step: Any, inputs: dict[str, torch.Tensor], block_out: torch.Tensor) -> None:
        """block_out[rows] += act(x·downᵀ + b_down)·up_t + b_up, x = the slot's input; every tensor [N, d]."""


@dataclass
class DecodeVisibility:
    """Which table positions each decode row attends to: [0, prefix_len) and [own_start, own_start + length)
    (the runner's decode mask). Built once per step and shared by every layer."""

    prefix_lens: torch.Tensor   # [B] int32
    own_starts: torch.Tensor    # [B] int32: the first position of the row's own blocks in its table
    lengths: torch.Tensor       # [B] int32: the row's own tokens, this step's included
    _masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def mask(self, width: int) -> torch.Tensor:
        """[B, width] bool, True = attend; built on first use, then shared."""
        found = self._masks.get(width)
        if found is None:
            cols = torch.arange(width, device=self.lengths.device).unsqueeze(0)     # [1, L]
            own = self.own_starts.long().unsqueeze(1)
            found = (cols < self.prefix_lens.long().unsqueeze(1)) | (
                (cols >= own) & (cols < own + self.lengths.long().unsqueeze(1)))
            self._masks[width] = found
        return found


class KernelBackend(ABC):
    """One implementation of the hot operations (torch_ref, torch_grouped, triton)."""

    name: ClassVar[str]
    # Its kernels read every per-step value from device tensors and launch a grid fixed by the shapes, so a decode
    # step can be captured once (a CUDA graph) and replayed for other rows and adapters (needs `plan_rows`).
    captures: ClassVar[bool] = False

    @abstractmethod
    def planner(self, device: torch.device) -> SegmentPlanner:
        """A fresh planner for one method."""

    @abstractmethod
    def lora_kernel(self, weights: LoraWeights, planner: SegmentPlanner) -> LoraKernel:
        """The kernel of one LoRA site."""

    @abstractmethod
    def bottleneck_kernel(self, weights: BottleneckWeights, planner: SegmentPlanner) -> BottleneckKernel:
        """The kernel of one bottleneck site (single-module slots; several modules stay on the reference loop)."""

    @abstractmethod
    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         tables: torch.Tensor, visibility: DecodeVisibility, block_size: int, scale: float,
                         workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """q [B, H, hd]; k_cache, v_cache [num_blocks * block_size, kvh, hd]; tables [B, max_blocks] block ids.
        Returns [B, H, hd]; head h reads KV head h // (H / kvh). `workspace`: preallocated
        [≥ B * max_blocks, block_size * kvh * hd] buffers for backends that gather blocks (the cache's gather_k/v)."""
