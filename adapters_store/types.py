"""Domain objects of the store: one loaded, validated adapter and its per-method parts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.nn import functional as F


class AdapterPart(Protocol):
    """What every method's part offers the store (for accounting; the engine knows the concrete type)."""

    def tensors(self) -> Iterator[torch.Tensor]: ...


@dataclass
class LoraModule:
    """LoRA on one linear: y = base(x) + scale * x @ a.T @ b.T."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (per-module alpha/rank from patterns)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoraParts:
    """The LoRA modules of one adapter, keyed by linear module path (ModelSpec.linears keys)."""

    modules: dict[str, LoraModule]

    def tensors(self) -> Iterator[torch.Tensor]:
        for module in self.modules.values():
            yield module.a
            yield module.b

    @property
    def ranks(self) -> dict[str, int]:
        return {path: module.rank for path, module in self.modules.items()}

    @property
    def max_rank(self) -> int:
        return max((module.rank for module in self.modules.values()), default=0)


# Positions of a request's tokens when a prefix is joined (see PrefixParts.positions).
PREFIX_POSITIONS = ("shifted", "unshifted")
BOTTLENECK_SITES = ("attn", "ffn")
BOTTLENECK_INPUTS = ("sublayer_input", "sublayer_output", "block_output")
_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # tanh approximation (HF "gelu_new")
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}
ACTIVATIONS = tuple(_ACTIVATIONS)


def activate(name: str, x: torch.Tensor) -> torch.Tensor:
    """Applies a BottleneckModule activation by name (one of ACTIVATIONS)."""
    return _ACTIVATIONS[name](x)


@dataclass
class PrefixParts:
    """Per-layer prefix keys/values (final: after any projection), never rotated by RoPE.

    At every layer the request's queries attend over [keys[l]; K] and [values[l]; V] (prefix first, always
    visible, no causal mask among or towards prefix slots); with GQA each kv head is shared by its query
    heads as the real K/V are. The prefix is not part of the KV cache.
    """

    keys: torch.Tensor  # [num_layers, P, num_kv_heads, head_dim]
    values: torch.Tensor  # [num_layers, P, num_kv_heads, head_dim]
    # "shifted": the request's tokens take positions P..P+T-1 (PEFT: the prefix occupies the cache's first P slots);
    # "unshifted": they take positions 0..T-1 (AdapterHub: the prefix is joined after RoPE).
    positions: str

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.keys
        yield self.values

    @property
    def num_virtual_tokens(self) -> int:
        return self.keys.shape[1]


@dataclass
class BottleneckModule:
    """One bottleneck adapter at one layer and sub-block:

        block_out <- block_out + scale * (act(INPUT @ down.T + down_bias) @ up.T + up_bias)

    The scale multiplies the whole up-projection output, its bias included (AdapterHub: `up = adapter_up(down);
    up = up * scaling`). `block_out` is the residual stream after the sub-block's residual add (the value the
    next sub-block or layer receives). INPUT, by `input`:
    - "sublayer_input": the residual stream entering the sub-block, before its RMSNorm (parallel adapters,
      AdapterHub par_bn / scaled_par_bn);
    - "sublayer_output": the sub-layer's output (attention after o_proj, or the MLP's down_proj) before the
      residual add (sequential Houlsby style, AdapterHub double_seq_bn);
    - "block_output": block_out itself, after the residual add (AdapterHub seq_bn on Llama).
    """

    layer: int
    site: str  # "attn" (the attention sub-block) or "ffn" (the MLP sub-block)
    input: str  # one of BOTTLENECK_INPUTS
    down: torch.Tensor  # [r, d]
    down_bias: torch.Tensor | None  # [r]
    up: torch.Tensor  # [d, r]
    up_bias: torch.Tensor | None  # [d]
    scale: float
    activation: str  # one of ACTIVATIONS

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def tensors(self) -> Iterator[torch.Tensor]:
        for tensor in (self.down, self.down_bias, self.up, self.up_bias):
            if tensor is not None:
                yield tensor

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scale * up(act(down(x))) for INPUT x [..., d]: the reference equation (slow path, tests)."""
        hidden = x @ self.down.T.to(x.dtype)
        if self.down_bias is not None:
            hidden = hidden + self.down_bias.to(x.dtype)
        out = activate(self.activation, hidden) @ self.up.T.to(x.dtype)
        if self.up_bias is not None:
            out = out + self.up_bias.to(x.dtype)
        return self.scale * out


@dataclass
class BottleneckParts:
    """The bottleneck adapters of one adapter, in the order they are applied within a sub-block."""

    modules: list[BottleneckModule]

    def tensors(self) -> Iterator[torch.Tensor]:
        for module in self.modules:
            yield from module.tensors()

    def at(self, layer: int, site: str) -> list[BottleneckModule]:
        """The modules acting at one layer's sub-block."""
        return [m for m in self.modules if m.layer == layer and m.site == site]


@dataclass
class AdapterWeights:
    """One loaded, validated adapter: method parts keyed by method name."""

    name: str
    path: str
    format: str  # "peft_lora", "peft_prefix", "adapterhub" or "native"
    parts: dict[str, Any]  # "lora": LoraParts, "prefix": PrefixParts, "bottleneck": BottleneckParts
    config: dict = field(default_factory=dict)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.parts)

    def tensors(self) -> Iterator[torch.Tensor]:
        for part in self.parts.values():
            yield from part.tensors()

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
