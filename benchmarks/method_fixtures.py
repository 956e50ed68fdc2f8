"""Random adapters of every method for a served model, written in the native format (benchmarks)."""

from __future__ import annotations

from pathlib import Path

import torch

from adapters_store.native import save_native
from adapters_store.types import AdapterWeights, BottleneckModule, BottleneckParts, PrefixParts


def prefix_part(shape: object, tokens: int, positions: str, gen: torch.Generator) -> PrefixParts:
    size = (shape.num_layers, tokens, shape.num_kv_heads, shape.head_dim)  # type: ignore[attr-defined]
    return PrefixParts(torch.randn(size, generator=gen), torch.randn(size, generator=gen), positions)


def bottleneck_part(shape: object, rank: int, site: str, input_: str, scale: float,
                    gen: torch.Generator) -> BottleneckParts:
    d = shape.hidden_size  # type: ignore[attr-defined]
    modules = [BottleneckModule(layer=i, site=site, input=input_, down=torch.randn(rank, d, generator=gen) / d ** 0.5,
                                down_bias=torch.zeros(rank), up=torch.randn(d, rank, generator=gen) * 0.01,
                                up_bias=torch.zeros(d), scale=scale, activation="relu")
               for i in range(shape.num_layers)]  # type: ignore[attr-defined]
    return BottleneckParts(modules)


KINDS = {
    # name: builder(shape, gen) -> parts. Sizes follow the unified-view paper, scaled to this model.
    "prefix-peft-30": lambda s, g: {"prefix": prefix_part(s, 30, "shifted", g)},
    "prefix-hub-30": lambda s, g: {"prefix": prefix_part(s, 30, "unshifted", g)},
    "parallel-ffn-r36": lambda s, g: {"bottleneck": bottleneck_part(s, 36, "ffn", "sublayer_input", 4.0, g)},
    "parallel-attn-r36": lambda s, g: {"bottleneck": bottleneck_part(s, 36, "attn", "sublayer_input", 1.0, g)},
    "sequential-ffn-r36": lambda s, g: {"bottleneck": bottleneck_part(s, 36, "ffn", "block_output", 1.0, g)},
    "mam-l30-r64": lambda s, g: {"prefix": prefix_part(s, 30, "unshifted", g),
                                 "bottleneck": bottleneck_part(s, 64, "ffn", "sublayer_input", 4.0, g)},
}


def write_method_adapter(out_dir: Path, shape: object, kind: str, seed: int) -> Path:
    parts = KINDS[kind](shape, torch.Generator().manual_seed(seed))
    return save_native(AdapterWeights(out_dir.name, str(out_dir), "native", parts), out_dir)
