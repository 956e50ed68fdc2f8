"""Writing adapters in deltaserve's native format (docs/native-format.md); reading is formats/native.py."""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapters_store.formats.native import (
    CONFIG_FILE,
    FORMAT,
    PREFIX_KEYS,
    VERSION,
    WEIGHTS_FILE,
    NativeReader,
    bottleneck_key,
    lora_keys,
)
from adapters_store.spec import ModelSpec
from adapters_store.types import AdapterWeights, BottleneckParts, LoraParts, PrefixParts

__all__ = ["NativeReader", "native_config", "save_native"]


def save_native(weights: AdapterWeights, out_dir: str | PathLike[str], spec: ModelSpec | None = None,
                base_model_name: str | None = None, source: dict[str, Any] | None = None) -> Path:
    """Writes `weights` (any of its "lora", "bottleneck", "prefix" parts) as a native adapter in `out_dir`.

    `spec` fills base_model with the model's sizes (checked when the adapter is loaded); without it, base_model
    holds what the parts themselves show (layers, hidden size, kv heads, head dim). Returns `out_dir`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, tensors = native_config(weights, spec, base_model_name, source)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def native_config(weights: AdapterWeights, spec: ModelSpec | None = None, base_model_name: str | None = None,
                  source: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The native adapter_config.json and tensors for `weights` (what save_native writes)."""
    unknown = sorted(set(weights.parts) - {"lora", "bottleneck", "prefix"})
    if unknown:
        raise ValueError(f"the native format cannot express part(s) {unknown}")
    methods: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    base: dict[str, Any] = {}
    if isinstance(lora := weights.parts.get("lora"), LoraParts):
        methods["lora"] = {"modules": {}}
        for module, part in sorted(lora.modules.items()):
            methods["lora"]["modules"][module] = {"rank": part.rank, "scale": float(part.scale)}
            tensors.update(zip(lora_keys(module), (part.a, part.b), strict=True))
    if isinstance(bottleneck := weights.parts.get("bottleneck"), BottleneckParts):
        methods["bottleneck"] = {"modules": []}
        for i, m in enumerate(bottleneck.modules):
            methods["bottleneck"]["modules"].append({
                "layer": m.layer, "site": m.site, "input": m.input, "activation": m.activation,
                "scale": float(m.scale), "rank": m.rank, "down_bias": m.down_bias is not None,
                "up_bias": m.up_bias is not None})
            for name, tensor in (("down", m.down), ("down_bias", m.down_bias), ("up", m.up), ("up_bias", m.up_bias)):
                if tensor is not None:
                    tensors[bottleneck_key(i, name)] = tensor
            base["hidden_size"] = m.down.shape[1]
    if isinstance(prefix := weights.parts.get("prefix"), PrefixParts):
        methods["prefix"] = {"num_virtual_tokens": prefix.num_virtual_tokens, "positions": prefix.positions}
        tensors.update(zip(PREFIX_KEYS, (prefix.keys, prefix.values), strict=True))
        base.update(num_layers=prefix.keys.shape[0], num_kv_heads=prefix.keys.shape[2], head_dim=prefix.keys.shape[3])
    if not methods:
        raise ValueError(f"adapter {weights.name!r} has no lora, bottleneck or prefix part to save")
    if spec is not None:
        base = {"model_type": spec.model_type, "num_layers": spec.num_layers, "hidden_size": spec.hidden_size,
                "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim}
    if base_model_name:
        base["name"] = base_model_name
    config: dict[str, Any] = {"format": FORMAT, "version": VERSION, "base_model": base, "methods": methods}
    if source:
        config["source"] = source
    return config, tensors
