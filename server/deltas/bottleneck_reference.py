"""The slow, obviously right bottleneck delta (one module at a time): the oracle for the fast paths."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adapters_store.types import BottleneckModule


def apply_bottleneck_reference(sub_in: torch.Tensor, sub_out: torch.Tensor, block_out: torch.Tensor,
                               segments: Sequence[tuple[int, int, Sequence[BottleneckModule]]]) -> None:
    """Adds each segment's modules, in list order, to its rows of block_out [N, d] in place.

    segments: (first row, end row, the modules acting at this layer's sub-block for those rows). A module
    reading block_output sees the additions of the modules before it.
    """
    inputs = {"sublayer_input": sub_in, "sublayer_output": sub_out, "block_output": block_out}
    for start, end, modules in segments:
        for module in modules:
            block_out[start:end] += module.delta(inputs[module.input][start:end])
