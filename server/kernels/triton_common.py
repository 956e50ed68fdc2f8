"""What the Triton kernels share: the interpreter switch, launch with or without autotuning, segment tables.

Under TRITON_INTERPRET=1 (CPU tests) every kernel runs in Triton's interpreter with one fixed configuration, and
products are taken in fp32 (the interpreter's bf16 `tl.dot` is not exact; a bf16 × bf16 product is exact in fp32,
so the upcast computes what a tensor core with fp32 accumulation does, up to summation order). The variable must
be set before this module is imported: `triton.jit` reads it when it decorates.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

Segment = tuple[int, int, int]  # (first row, end row, slot)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands are multiplied exactly (no TF32), so fp32 results match the reference to fp32 rounding."""
    return "ieee" if dtype == torch.float32 or INTERPRET else "tf32"


@dataclass
class SegmentTable:
    """A step's segments as device tensors: what every segment kernel reads (rows of a segment are contiguous)."""

    segments: list[Segment]
    starts: torch.Tensor    # [S] int32 first row
    lengths: torch.Tensor   # [S] int32 rows
    slots: torch.Tensor     # [S] int32 adapter slot
    max_len: int            # longest segment (the grid's row blocks)
    count: int = -1         # S when `segments` is not listed on the host (a captured step's rows)

    @property
    def num(self) -> int:
        return len(self.segments) if self.count < 0 else self.count

    @classmethod
    def build(cls, segments: Sequence[Segment], device: torch.device | str) -> SegmentTable:
        rows = torch.tensor([[s, e - s, slot] for s, e, slot in segments] or [[0, 0, 0]], dtype=torch.int32)
        rows = rows.to(device)
        return cls(list(segments), rows[:, 0].contiguous(), rows[:, 1].contiguous(), rows[:, 2].contiguous(),
                   max((e - s for s, e, _ in segments), default=0))


    @classmethod
    def rows(cls, row_slots: torch.Tensor) -> SegmentTable:
        """Every row its own segment (a captured decode step): slots from row_slots [B] int32 (-1 = base, an
        empty segment). Device operations only, no host copy: captured once, they follow the rows at replay."""
        count = row_slots.shape[0]
        starts = torch.arange(count, dtype=torch.int32, device=row_slots.device)
        lengths = (row_slots >= 0).to(torch.int32)
        return cls([], starts, lengths, row_slots.clamp(min=0), max_len=1, count=count)


class Launcher:
    """A kernel with its autotuned twin: autotuned on a GPU, one fixed configuration under the interpreter.

    `restore`: the arguments the kernel updates in place (y += ...): autotuning runs every configuration on the
    same inputs, so their values are restored after each trial run.
    """

    def __init__(self, kernel: Any, configs: list[triton.Config], key: list[str], default: dict[str, int],
                 restore: tuple[str, ...] = ()) -> None:
        self.kernel = kernel
        self.default = default
        self.tuned = triton.autotune(configs=configs, key=key, restore_value=list(restore) or None)(kernel)

    def __call__(self, grid: Callable[[dict[str, int]], tuple[int, ...]], *args: Any, **kwargs: Any) -> None:
        if INTERPRET:
            self.kernel[grid(self.default)](*args, **kwargs, **self.default)
        else:
            self.tuned[grid](*args, **kwargs)
