"""The served model's shape, as far as adapters care: sizes, dtype and every adaptable linear."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

# Hugging Face's Llama module paths of the decoder layers' linears (lm_head is never a LoRA target here).
_LAYER_LINEAR = re.compile(r"model\.layers\.(\d+)\.[^.]+\.[^.]+")


@dataclass(frozen=True)
class ModelSpec:
    """What the served model looks like, for validating adapters against it."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype: torch.dtype
    # module path, e.g. "model.layers.0.self_attn.q_proj" -> (in_features, out_features)
    linears: Mapping[str, tuple[int, int]] = field(hash=False)

    @classmethod
    def from_hf_model(cls, model: nn.Module) -> ModelSpec:
        """Reads a Llama-like CausalLM: a transformers model (`.config`) or one exposing a
        ModelShape-like `.shape` (num_layers, num_heads, ...) with Hugging Face module names."""
        cfg = getattr(model, "config", None)
        cfg = getattr(model, "shape", None) if cfg is None else cfg
        if cfg is None:
            raise ValueError(f"{type(model).__name__} has neither .config nor .shape to read sizes from")
        heads = _first(cfg, "num_attention_heads", "num_heads")
        hidden = _first(cfg, "hidden_size")
        linears = {
            name: (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and _LAYER_LINEAR.fullmatch(name)
        }
        if not linears:
            raise ValueError(f"{type(model).__name__} has no nn.Linear under model.layers.* (not a Llama-like model?)")
        return cls(
            model_type=str(_first(cfg, "model_type")),
            num_layers=int(_first(cfg, "num_hidden_layers", "num_layers")),
            hidden_size=int(hidden),
            num_heads=int(heads),
            num_kv_heads=int(_first(cfg, "num_key_value_heads", "num_kv_heads", default=heads)),
            head_dim=int(_first(cfg, "head_dim", default=hidden // heads)),
            intermediate_size=int(_first(cfg, "intermediate_size")),
            vocab_size=int(_first(cfg, "vocab_size")),
            dtype=_param_dtype(model),
            linears=MappingProxyType(linears),
        )

    def layer_of(self, module_path: str) -> int | None:
        """The decoder layer index of a linear's module path, or None if it is not a layer linear."""
        match = _LAYER_LINEAR.fullmatch(module_path)
        return int(match.group(1)) if match else None

    def describe(self) -> str:
        """A one-line summary for error messages."""
        return (f"{self.model_type}, {self.num_layers} layers, hidden {self.hidden_size}, "
                f"{self.num_heads}/{self.num_kv_heads} heads of {self.head_dim}")


_MISSING = object()


def _first(cfg: Any, *names: str, default: Any = _MISSING) -> Any:
    """The first of `names` that `cfg` has and is not None (configs spell some sizes differently)."""
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    if default is _MISSING:
        raise ValueError(f"model config has none of {names}")
    return default


def _param_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    raise ValueError(f"{type(model).__name__} has no floating-point parameters")
